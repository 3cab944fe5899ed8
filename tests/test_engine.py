"""engine.py: the cosine clock, one training epoch and one validation pass on tiny synthetic stacks."""
import math

import pytest
import torch

from dataset import FocusStackDataset, GroupedBatchSampler
from engine import COSINE_FLOOR, LogitsAndDepth, RunClock, Runtime, evaluate, train_one_epoch
from losses import DepthLoss
from model import StackMFFV2, init_weights
from synthetic_stacks import make_dataset
from utils import InputError

CPU = Runtime(torch.device("cpu"))


@pytest.fixture(scope="module")
def loader(tmp_path_factory):
    """8 synthetic stacks of 4 slices, 32 x 32, in batches of 4 (2 batches), fixed order."""
    stacks, depths = make_dataset(tmp_path_factory.mktemp("data"), num_scenes=8, slice_counts=(4,), size=32, seed=3)
    dataset = FocusStackDataset([(stacks, depths)], 32)
    return torch.utils.data.DataLoader(dataset, batch_sampler=GroupedBatchSampler(dataset.num_slices, 4,
                                                                                   shuffle=False))


def released_net(seed=0):
    torch.manual_seed(seed)
    model = StackMFFV2()
    init_weights(model)
    return LogitsAndDepth(model)


def sgd_parts(net, lr):
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    return optimizer, torch.amp.GradScaler("cuda", enabled=False)


class TestRunClock:
    def test_cosine_from_lr_to_the_floor(self):
        clock = RunClock(1e-3, total_steps=100)
        assert clock.cosine_lr(0) == pytest.approx(1e-3, rel=1e-3)
        assert clock.cosine_lr(50) == pytest.approx(1e-3 * (COSINE_FLOOR + 1) / 2, rel=1e-3)
        assert clock.cosine_lr(100) == pytest.approx(1e-3 * COSINE_FLOOR)
        assert clock.cosine_lr(500) == pytest.approx(1e-3 * COSINE_FLOOR)   # past the end: stays at the floor
        assert not clock.out_of_time()

    def test_budget_carried_over_a_resume(self):
        late = RunClock(1e-3, 100, max_minutes=1.0, seconds_done=45.0)   # 3/4 of the budget spent
        assert late.progress(0) == pytest.approx(0.75, abs=0.01) and not late.out_of_time()
        assert RunClock(1e-3, 100, max_minutes=1.0, seconds_done=61.0).out_of_time()


class TestTrainOneEpoch:
    def test_steps_lower_the_validation_error(self, loader):
        net = released_net()
        before, _, _ = evaluate(net, loader, CPU)
        optimizer, scaler = sgd_parts(net, 3e-3)
        for epoch in range(3):
            loss, out_of_time, steps = train_one_epoch(net, DepthLoss(), loader, optimizer, scaler, CPU, epoch, 3)
            assert steps == 2 and not out_of_time and math.isfinite(loss)
        after, _, _ = evaluate(net, loader, CPU)
        assert after < 0.8 * before, (before, after)

    def test_max_steps_and_cosine_rate(self, loader):
        net = released_net()
        optimizer, scaler = sgd_parts(net, 1e-3)
        clock = RunClock(1e-3, total_steps=4)
        _, _, steps = train_one_epoch(net, DepthLoss(), loader, optimizer, scaler, CPU, 1, 2, max_steps=1,
                                      clock=clock, cosine=True)
        assert steps == 1
        # epoch 1 of steps 1: global step 1 of 4 set the rate.
        assert optimizer.param_groups[0]["lr"] == pytest.approx(clock.cosine_lr(1))

    def test_spent_budget_takes_no_step(self, loader):
        net = released_net()
        start = {k: v.clone() for k, v in net.state_dict().items()}
        optimizer, scaler = sgd_parts(net, 1e-2)
        clock = RunClock(1e-2, 10, max_minutes=1.0, seconds_done=61.0)
        loss, out_of_time, steps = train_one_epoch(net, DepthLoss(), loader, optimizer, scaler, CPU, 0, 1,
                                                   clock=clock)
        assert out_of_time and steps == 0 and math.isnan(loss)
        assert all(torch.equal(v, start[k]) for k, v in net.state_dict().items())

    def test_non_finite_loss_stops_with_epoch_and_step(self, loader):
        net = released_net()
        optimizer, scaler = sgd_parts(net, 1e-3)

        def nan_loss(logits, depth, target, stack):
            return logits.sum() * float("nan")
        with pytest.raises(InputError, match=r"loss became nan at epoch 2, step 1 \(lr 0.001\)"):
            train_one_epoch(net, nan_loss, loader, optimizer, scaler, CPU, 1, 2)


class TestEvaluate:
    def test_mse_and_mae_of_known_predictions(self, loader):
        # A "network" whose depth is 0.5 everywhere: its errors follow from the targets alone.
        class Half(torch.nn.Module):
            def forward(self, x):
                return x, torch.full_like(x[:, :1], 0.5)
        mse, mae, (predicted, truth) = evaluate(Half(), loader, CPU)
        targets = torch.cat([target[:, :1] for _, target in loader])
        assert mse == pytest.approx(((targets - 0.5) ** 2).mean().item(), rel=1e-6)
        assert mae == pytest.approx((targets - 0.5).abs().mean().item(), rel=1e-6)
        assert predicted.shape == truth.shape == (32, 32) and (predicted == 0.5).all()
        first = evaluate(Half(), loader, CPU, max_batches=1)[0]
        assert first == pytest.approx(((targets[:4] - 0.5) ** 2).mean().item(), rel=1e-6)
