"""train.py: released flags, init, loss, a tiny end-to-end run, checkpoints, resume, errors, torchrun."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.nn as nn

import train
from model import StackMFFV2, load_model
from network_blocks import ConvGRUCell
from synthetic_stacks import make_dataset
from utils import InputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"train": make_dataset(root / "train", num_scenes=16, slice_counts=(4, 6), size=64, seed=1),
            "val": make_dataset(root / "val", num_scenes=6, slice_counts=(4, 6), size=64, seed=2)}


def tiny_args(data, save_dir, *extra):
    return train.get_args_parser().parse_args([
        "--train_dataset", *data["train"], "--val_dataset", *data["val"],
        "--training_image_size", "64", "--batch_size", "4", "--num_epochs", "2", "--lr", "2e-3",
        "--num_workers", "0", "--num_threads", "1", "--device", "cpu",
        "--save_dir", str(save_dir), "--save_name", "run", *extra])


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """Two uninterrupted epochs: (summary, run folder)."""
    save_dir = tmp_path_factory.mktemp("runs")
    summary = train.main(tiny_args(data, save_dir))
    return summary, save_dir / "run"


class TestArguments:
    parser = train.get_args_parser()

    @pytest.mark.parametrize("text, value", [("True", True), ("False", False), ("false", False), ("0", False),
                                             ("1", True), ("yes", True), ("no", False)])
    def test_released_boolean_flags(self, text, value):
        args = self.parser.parse_args(["--use_train_dataset_2", text, "--use_val_dataset_5", text])
        assert args.use_train_dataset_2 is value and args.use_val_dataset_5 is value
        assert args.use_train_dataset_1 is True  # untouched default

    def test_bare_boolean_flag_is_true_and_junk_is_refused(self, capsys):
        assert self.parser.parse_args(["--use_val_dataset_3"]).use_val_dataset_3 is True
        with pytest.raises(SystemExit):
            self.parser.parse_args(["--use_train_dataset_1", "maybe"])
        assert "expected a boolean" in capsys.readouterr().err

    def test_released_defaults(self):
        args = self.parser.parse_args([])
        assert (args.batch_size, args.num_epochs, args.lr, args.lr_decay, args.training_image_size,
                args.loss) == (12, 50, 1e-3, 0.9, 384, "mse")

    def test_sources_from_released_slots_and_repeatable_flag(self):
        args = self.parser.parse_args([
            "--train_stack", "a/s", "--train_depth_continuous", "a/d",
            "--train_stack_3", "c/s", "--train_depth_continuous_3", "c/d",
            "--train_stack_4", "d/s", "--train_depth_continuous_4", "d/d", "--use_train_dataset_4", "False",
            "--train_dataset", "x/s", "x/d", "--train_dataset", "y/s", "y/d"])
        assert train.dataset_sources(args, "train") == [("x/s", "x/d"), ("y/s", "y/d"), ("a/s", "a/d"),
                                                        ("c/s", "c/d")]
        assert train.dataset_sources(args, "val") == []

    def test_stack_without_depth_is_an_error(self):
        args = self.parser.parse_args(["--val_stack_2", "v/s"])
        with pytest.raises(InputError, match="--val_stack_2 is given without --val_depth_continuous_2"):
            train.dataset_sources(args, "val")

    def test_training_size_must_be_a_multiple_of_32(self):
        with pytest.raises(SystemExit):
            self.parser.parse_args(["--training_image_size", "100"])


class TestInitAndLoss:
    def test_released_init(self):
        torch.manual_seed(0)
        model = StackMFFV2()
        train.init_weights(model)
        gates = model.layer_interaction.layer_interaction_depth.forward_cell_list[0].conv_gates.weight
        flat = gates.reshape(gates.shape[0], -1)                 # (32, 216): orthogonal rows
        torch.testing.assert_close(flat @ flat.T, torch.eye(32), atol=1e-5, rtol=0)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert linears and all(abs(m.weight.std().item() - 0.001) < 0.0005 for m in linears)
        norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
        biases = [m.bias for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None]
        assert all(torch.all(b == 0) for b in biases)
        conv = model.feature_extraction.encoder1[0].weight       # fan_out = 8 * 3 * 3
        assert abs(conv.std().item() - (2 / 72) ** 0.5) < 0.07
        for cell in (m for m in model.modules() if isinstance(m, ConvGRUCell)):
            can = cell.conv_can.weight.reshape(16, -1)           # (16, 216)
            torch.testing.assert_close(can @ can.T, torch.eye(16), atol=1e-5, rtol=0)

    def test_mse_is_the_released_loss_and_ce_adds_a_term(self):
        torch.manual_seed(0)
        logits = torch.randn(2, 4, 8, 8)
        depth, target = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
        mse = train.depth_loss(logits, depth, target, "mse")
        torch.testing.assert_close(mse, ((depth - target) ** 2).mean())
        # Logits that put all mass on the true bin make the cross-entropy vanish.
        index = (target[:, 0] * 4).floor().clamp(0, 3).long()
        perfect = torch.nn.functional.one_hot(index, 4).permute(0, 3, 1, 2).float() * 50
        torch.testing.assert_close(train.depth_loss(perfect, depth, target, "mse+ce"), mse, atol=1e-6, rtol=0)
        assert train.depth_loss(logits, depth, target, "mse+ce", ce_weight=1.0) > mse + 1.0

    def test_fusion_term_counts_only_where_the_slices_differ(self):
        # Two slices that differ by 0.5 on the left half only; the truth is slice 1 everywhere.
        stack = torch.zeros(1, 2, 4, 4)
        stack[0, 0, :, :2] = 0.5
        target = torch.ones(1, 1, 4, 4)                      # floor(1 * 2) -> last slice
        depth = torch.ones(1, 1, 4, 4)                       # no MSE
        wrong = torch.zeros(1, 2, 4, 4)
        wrong[:, 0] = 50.0                                   # confidently slice 0 everywhere
        loss = train.depth_loss(wrong, depth, target, "mse", stack=stack, fusion_weight=2.0)
        torch.testing.assert_close(loss, torch.tensor(2.0 * 0.5 * 0.5))  # half the pixels off by 0.5
        right = wrong.flip(1)
        assert train.depth_loss(right, depth, target, "mse", stack=stack, fusion_weight=2.0) < 1e-12

    def test_fusion_term_uses_the_all_in_focus_channel_when_given(self):
        # Both slices are 0.5 away from the sharp image: picking either costs 0.5 per pixel, while
        # the gathered-slice target would cost nothing for the ground-truth slice.
        stack = torch.zeros(1, 2, 4, 4)
        stack[0, 1] = 1.0
        target = torch.cat((torch.ones(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.5)), dim=1)
        depth = torch.ones(1, 1, 4, 4)
        right = torch.zeros(1, 2, 4, 4)
        right[:, 1] = 50.0                                   # confidently the ground-truth slice
        assert train.depth_loss(right, depth, target[:, :1], "mse", stack=stack, fusion_weight=2.0) < 1e-12
        torch.testing.assert_close(train.depth_loss(right, depth, target, "mse", stack=stack, fusion_weight=2.0),
                                   torch.tensor(2.0 * 0.5))
        even = torch.zeros(1, 2, 4, 4)                       # an even blend is the sharp image here
        assert train.depth_loss(even, depth, target, "mse", stack=stack, fusion_weight=2.0) < 1e-12

    def test_fusion_blend_scores_the_cards_fused_image(self):
        # Flat slices 0.2, 0.5, 1.0 and a torn network: slices 0 and 2 equally likely, slice 1 less.
        # The sharp image is the middle slice. The plain softmax blend is 0.58 there; a narrow
        # depth window around the expected slice (the middle) makes the blend the middle slice.
        stack = torch.tensor([0.2, 0.5, 1.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4).clone()
        target = torch.cat((torch.ones(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.5)), dim=1)
        depth = torch.ones(1, 1, 4, 4)
        torn = torch.tensor([0.0, -1.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
        plain_weights = torch.softmax(torn[0, :, 0, 0], dim=0)
        plain_error = abs(float((plain_weights * torch.tensor([0.2, 0.5, 1.0])).sum()) - 0.5)
        plain = train.depth_loss(torn, depth, target, "mse", stack=stack, fusion_weight=1.0)
        assert plain.item() == pytest.approx(plain_error, abs=1e-6) and plain_error > 0.05
        windowed = train.depth_loss(torn, depth, target, "mse", stack=stack, fusion_weight=1.0,
                                    fusion_blend=(1.0, 0.0, 0.25))
        assert windowed.item() < 0.002
        # With a focus prior too, the term is the L1 of exactly soft_fusion_weights' blend.
        logits, textured = torch.randn(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
        sharp = torch.cat((torch.ones(2, 1, 8, 8), torch.rand(2, 1, 8, 8)), dim=1)
        blend = train.soft_fusion_weights(logits, 0.5, textured, 4.0, 1.5)
        expected = 3.0 * ((blend * textured).sum(dim=1) - sharp[:, 1]).abs().mean()
        torch.testing.assert_close(train.depth_loss(logits, torch.ones(2, 1, 8, 8), sharp, "mse", stack=textured,
                                                    fusion_weight=3.0, fusion_blend=(0.5, 4.0, 1.5)), expected)

    def test_fusion_bands_score_the_two_band_fused_image(self):
        # Two slices that differ by an offset, picked left | right: one band leaves a step at the
        # seam, two bands smooth it. The term must be the L1 of exactly model.blend_slices' image.
        torch.manual_seed(0)
        texture = torch.rand(1, 1, 16, 16)
        stack = torch.cat((texture, texture + 0.3), dim=1)                      # (1, 2, 16, 16)
        logits = torch.zeros(1, 2, 16, 16)
        logits[:, 0, :, :8], logits[:, 1, :, 8:] = 30.0, 30.0
        target = torch.cat((torch.ones(1, 1, 16, 16), texture + 0.15), dim=1)
        depth = torch.ones(1, 1, 16, 16)
        blend = train.soft_fusion_weights(logits, 1.0, stack, 0.0, 0.0)
        losses = {}
        for bands in ((0.0, 0.0), (2.0, 0.7)):
            expected = 5.0 * (train.blend_slices(stack, blend, *bands)[:, 0] - target[:, 1]).abs().mean()
            losses[bands] = train.depth_loss(logits, depth, target, "mse", stack=stack, fusion_weight=5.0,
                                             fusion_bands=bands)
            torch.testing.assert_close(losses[bands], expected)
        assert losses[(0.0, 0.0)].item() == pytest.approx(5.0 * 0.15, abs=1e-4)   # one band: 0.15 off everywhere
        assert losses[(2.0, 0.7)] != losses[(0.0, 0.0)]
        result = subprocess.run([sys.executable, "train.py", "--train_dataset", str(REPO), str(REPO),
                                 "--fusion_bands", "2", "x"], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "invalid --fusion_bands value: 'x'" in result.stderr

    def test_fusion_blend_needs_a_temperature(self, data, tmp_path):
        with pytest.raises(InputError, match="temperature of --fusion_blend must be above 0"):
            train.main(tiny_args(data, tmp_path, "--fusion_weight", "1", "--fusion_blend", "0", "4", "1.5"))
        result = subprocess.run([sys.executable, "train.py", "--train_dataset", str(tmp_path), str(tmp_path),
                                 "--fusion_blend", "1", "-4", "1"], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "--fusion_blend values must be finite and >= 0" in result.stderr

    def test_sharpest_target_replaces_only_spoilt_true_slices(self):
        # 3 slices, 1 x 3 pixels; the truth is slice 2 everywhere. Pixel 0: slice 2 is spoilt
        # (0.3 off), slice 0 is exact -> 0. Pixel 1: every slice is as close (flat) -> stays 2.
        # Pixel 2: slice 1 is closer, but by less than the margin -> stays 2.
        stack = torch.tensor([[[[0.5, 0.2, 0.0]], [[0.9, 0.2, 0.50]], [[0.8, 0.2, 0.51]]]])
        sharp = torch.tensor([[[0.5, 0.2, 0.50]]])
        true_index = torch.full((1, 1, 3), 2)
        assert train.sharpest_slice_index(stack, sharp, true_index).tolist() == [[[0, 2, 2]]]
        target = torch.cat((torch.ones(1, 1, 1, 3), sharp[:, None]), dim=1)    # depth 1 -> last slice
        logits = torch.randn(1, 3, 1, 3)
        depth = torch.ones(1, 1, 1, 3)
        expected = F.cross_entropy(logits, torch.tensor([[[0, 2, 2]]]))
        torch.testing.assert_close(train.depth_loss(logits, depth, target, "mse+ce", ce_weight=1.0, stack=stack,
                                                    ce_target="sharpest"), expected)
        with pytest.raises(InputError, match="needs the all-in-focus"):
            train.depth_loss(logits, depth, target[:, :1], "mse+ce", stack=stack, ce_target="sharpest")

    def test_crop_not_a_multiple_of_32_is_one_usage_line(self, tmp_path):
        result = subprocess.run([sys.executable, "train.py", "--train_dataset", str(tmp_path), str(tmp_path),
                                 "--crop", "48"], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "the crop must be 0 (off) or a positive multiple of 32" in result.stderr

    def test_sharpest_target_without_all_in_focus_is_refused(self, data, tmp_path):
        with pytest.raises(InputError, match="--ce_target sharpest needs --all_in_focus"):
            train.main(tiny_args(data, tmp_path, "--loss", "mse+ce", "--ce_target", "sharpest"))

    def test_distance_term_charges_far_misses_more(self):
        target = torch.zeros(1, 1, 2, 2)                     # truth: slice 0 of 4 everywhere
        depth = torch.zeros(1, 1, 2, 2)
        def confident(k):
            logits = torch.zeros(1, 4, 2, 2)
            logits[:, k] = 60.0
            return logits
        costs = [train.depth_loss(confident(k), depth, target, "mse", distance_weight=0.5).item()
                 for k in range(4)]
        assert costs == pytest.approx([0.0, 0.5, 1.0, 1.5], abs=1e-6)

    def test_cosine_clock(self):
        args = train.get_args_parser().parse_args(["--lr", "1e-3", "--num_epochs", "2", "--lr_schedule",
                                                   "cosine"])
        clock = train.RunClock(args, steps_per_epoch=50)
        assert clock.cosine_lr(0) == pytest.approx(1e-3, rel=1e-3)
        assert clock.cosine_lr(50) == pytest.approx(1e-3 * (train.COSINE_FLOOR + 1) / 2, rel=1e-3)
        assert clock.cosine_lr(100) == pytest.approx(1e-3 * train.COSINE_FLOOR)
        assert not clock.out_of_time()
        args.max_minutes = 1.0
        late = train.RunClock(args, 50, seconds_done=45.0)  # 3/4 of the budget spent
        assert late.progress(0) == pytest.approx(0.75, abs=0.01) and not late.out_of_time()
        assert train.RunClock(args, 50, seconds_done=61.0).out_of_time()


class TestTraining:
    def test_validation_loss_drops(self, reference_run, data):
        summary, run_dir = reference_run
        # Loss of the released init on the validation set, before any step.
        args = tiny_args(data, run_dir.parent)
        torch.manual_seed(args.seed)
        model = StackMFFV2()
        train.init_weights(model)
        from dataset import FocusStackDataset, GroupedBatchSampler
        val_set = FocusStackDataset([data["val"]], 64)
        loader = train.make_loader(val_set, GroupedBatchSampler(val_set.num_slices, 4, shuffle=False), 0,
                                   torch.device("cpu"))
        initial, _, _ = train.evaluate(train.LogitsAndDepth(model), loader, train.Runtime(torch.device("cpu")), args)
        final = summary["history"][-1]["val"]["val"][0]
        assert final < 0.7 * initial, (initial, final)
        with open(run_dir / "validation.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["epoch"] for r in rows] == ["1", "2"]
        assert float(rows[1]["val_mse"]) == pytest.approx(final, rel=1e-4)
        assert float(rows[1]["lr"]) == pytest.approx(2e-3 * 0.9)
        assert sorted(p.name for p in (run_dir / "pictures").iterdir()) == ["val_epoch001.png", "val_epoch002.png"]
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        assert "git_commit" in (run_dir / "run_info.json").read_text()

    def test_checkpoints_load_with_load_model(self, reference_run):
        _, run_dir = reference_run
        assert {p.name for p in run_dir.glob("*.pth")} == {"last.pth", "best.pth", "epoch_001.pth", "epoch_002.pth"}
        state = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=True)
        assert state["epoch"] == 2 and not any(k.startswith("module.") for k in state["model"])
        assert {"optimizer", "scheduler", "args", "rng"} <= set(state)
        model = load_model(run_dir / "last.pth", "cpu")
        for key, value in model.state_dict().items():
            assert torch.equal(value, state["model"][key])

    def test_resume_after_an_interrupted_epoch_gives_the_same_weights(self, reference_run, data, tmp_path,
                                                                      monkeypatch):
        original = train.train_one_epoch

        def interrupted(net, loader, optimizer, scaler, runtime, epoch, args, writer=None, clock=None):
            if epoch == 1:  # take two optimiser steps of the second epoch, then "crash"
                args.max_steps_per_epoch = 2
                original(net, loader, optimizer, scaler, runtime, epoch, args, writer, clock)
                raise KeyboardInterrupt
            return original(net, loader, optimizer, scaler, runtime, epoch, args, writer, clock)

        monkeypatch.setattr(train, "train_one_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train.main(tiny_args(data, tmp_path))
        monkeypatch.setattr(train, "train_one_epoch", original)
        train.main(tiny_args(data, tmp_path, "--resume", str(tmp_path / "run" / "last.pth")))

        expected = torch.load(reference_run[1] / "last.pth", weights_only=True)
        resumed = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
        for key, value in expected["model"].items():
            torch.testing.assert_close(resumed["model"][key], value, atol=0, rtol=0, msg=key)
        assert resumed["scheduler"] == expected["scheduler"] and resumed["epoch"] == 2
        with open(tmp_path / "run" / "validation.csv", newline="") as f:
            assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]

    def test_non_finite_loss_stops_the_run(self, data, tmp_path, monkeypatch):
        monkeypatch.setattr(train, "depth_loss", lambda logits, *a: logits.sum() * float("nan"))
        with pytest.raises(InputError, match="loss became nan at epoch 1, step 1"):
            train.main(tiny_args(data, tmp_path))
        assert not list((tmp_path / "run").glob("*.pth"))

    def test_resume_from_bare_weights_is_refused(self, data, tmp_path):
        torch.save(StackMFFV2().state_dict(), tmp_path / "weights.pth")
        with pytest.raises(InputError, match="weights only.*--pretrained"):
            train.main(tiny_args(data, tmp_path, "--resume", str(tmp_path / "weights.pth")))

    def test_pretrained_weights_are_the_starting_point(self, data, tmp_path):
        torch.manual_seed(7)
        weights = StackMFFV2().state_dict()
        torch.save({"module." + k: v for k, v in weights.items()}, tmp_path / "weights.pth")
        # lr 0: AdamW leaves the weights where they started, so the checkpoint shows the start.
        train.main(tiny_args(data, tmp_path, "--pretrained", str(tmp_path / "weights.pth"), "--lr", "0",
                             "--num_epochs", "1", "--max_steps_per_epoch", "1", "--max_val_batches", "1"))
        saved = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["model"]
        assert all(torch.equal(saved[k], v) for k, v in weights.items())

    def test_compact_recipe_exports_weights_with_their_card(self, data, tmp_path, capsys):
        export = tmp_path / "weights" / "mine.pth"
        summary = train.main(tiny_args(data, tmp_path, "--num_epochs", "1", "--crop", "32", "--rotate",
                                       "--zoom", "1.5", "--contrast", "0.3", "--lr_schedule", "cosine",
                                       "--loss", "mse+ce", "--ce_weight", "1", "--fusion_weight", "1",
                                       "--distance_weight", "1", "--export", str(export),
                                       "--export_fusion_temperature", "0.1", "--export_base_sigma", "2",
                                       "--export_base_weight_sigma", "0.7"))
        assert summary["history"][0]["train_loss"] > 0
        saved = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
        exported = torch.load(export, weights_only=True)
        assert exported.keys() == saved["model"].keys()
        assert all(torch.equal(exported[k], v) for k, v in saved["model"].items())
        card = json.loads(export.with_suffix(".json").read_text())
        assert card["index_rule"] == "argmax" and card["trained_by"] == "train.py"
        assert card["args"]["crop"] == 32 and card["epochs_done"] == 1
        model = load_model(str(export))
        assert model.index_rule == "argmax" and model.fusion_temperature == 0.1
        assert (model.base_sigma, model.base_weight_sigma) == (2.0, 0.7)
        assert "exported the final weights" in capsys.readouterr().out

    def test_resume_of_a_finished_run_still_exports(self, reference_run, data, tmp_path):
        export = tmp_path / "w.pth"
        train.main(tiny_args(data, tmp_path, "--resume", str(reference_run[1] / "last.pth"),
                             "--export", str(export)))
        assert json.loads(export.with_suffix(".json").read_text())["epochs_done"] == 2
        saved = torch.load(reference_run[1] / "last.pth", weights_only=True)["model"]
        assert all(torch.equal(torch.load(export, weights_only=True)[k], v) for k, v in saved.items())

    def test_time_budget_stops_and_still_saves(self, data, tmp_path, capsys):
        # A budget of a few milliseconds runs out at the first check of epoch 1.
        summary = train.main(tiny_args(data, tmp_path, "--max_minutes", "0.00001", "--lr_schedule", "cosine",
                                       "--export", str(tmp_path / "w.pth")))
        assert len(summary["history"]) == 1
        assert (tmp_path / "run" / "last.pth").is_file() and (tmp_path / "w.pth").is_file()
        assert "budget ran out during epoch 1" in capsys.readouterr().out

    def test_budget_spent_between_epochs_adds_no_empty_epoch(self, data, tmp_path, monkeypatch, capsys):
        original = train.train_one_epoch

        def spent_before_epoch_two(net, loader, optimizer, scaler, runtime, epoch, args, writer=None, clock=None):
            if epoch == 1:
                clock.budget = 1e-9     # already spent at the first check of the epoch
            return original(net, loader, optimizer, scaler, runtime, epoch, args, writer, clock)

        monkeypatch.setattr(train, "train_one_epoch", spent_before_epoch_two)
        export = tmp_path / "w.pth"
        summary = train.main(tiny_args(data, tmp_path, "--max_minutes", "10", "--lr_schedule", "cosine",
                                       "--export", str(export)))
        assert [h["epoch"] for h in summary["history"]] == [1]
        assert summary["history"][0]["train_loss"] > 0
        with open(tmp_path / "run" / "validation.csv", newline="") as f:
            assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]
        assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["epoch"] == 1
        assert json.loads(export.with_suffix(".json").read_text())["epochs_done"] == 1
        assert "budget ran out after epoch 1" in capsys.readouterr().out

    def test_cli_error_is_one_line(self, tmp_path):
        result = subprocess.run([sys.executable, "train.py", "--train_dataset", str(tmp_path / "no"),
                                 str(tmp_path / "no_depth")], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [f"error: stack folder '{tmp_path / 'no'}' does not exist"]


def test_torchrun_two_cpu_processes(data, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "train.py", "--train_dataset", *data["train"], "--val_dataset", *data["val"],
               "--training_image_size", "32", "--batch_size", "2", "--num_epochs", "1", "--num_workers", "0",
               "--num_threads", "1", "--device", "cpu", "--max_steps_per_epoch", "3",
               "--save_dir", str(tmp_path), "--save_name", "ddp"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 1/1: train loss") == 1  # only the main process reports
    state = torch.load(tmp_path / "ddp" / "last.pth", weights_only=True)
    assert state["args"]["batch_size"] == 2 and len(state["rng"]) == 2
    model = load_model(tmp_path / "ddp" / "last.pth")
    assert np.isfinite(sum(v.abs().sum().item() for v in model.state_dict().values()))


def test_unreadable_slice_in_a_loader_worker_gives_the_plain_message(data, tmp_path):
    import shutil
    stacks = tmp_path / "set" / "image_stacks"
    shutil.copytree(Path(data["val"][0]), stacks)
    (stacks / "scene2" / "3.png").write_bytes(b"not a png")
    args = train.get_args_parser().parse_args([
        "--train_dataset", str(stacks), data["val"][1], "--training_image_size", "32", "--batch_size", "8",
        "--num_epochs", "1", "--num_workers", "1", "--device", "cpu", "--save_dir", str(tmp_path)])
    with pytest.raises(InputError) as caught:
        train.main(args)
    assert str(caught.value) == f"'{stacks / 'scene2' / '3.png'}' is not a readable image " \
                                "(corrupt, truncated or unsupported format)"


class TestWrongCheckpoints:
    @pytest.mark.parametrize("flag", ["--resume", "--pretrained"])
    def test_junk_file(self, data, tmp_path, flag):
        (tmp_path / "junk.pth").write_bytes(b"\x80\x02 not a checkpoint")
        with pytest.raises(InputError, match="junk.pth.*not a readable PyTorch checkpoint"):
            train.main(tiny_args(data, tmp_path, flag, str(tmp_path / "junk.pth")))
        assert not (tmp_path / "run").exists()

    @pytest.mark.parametrize("flag", ["--resume", "--pretrained"])
    def test_weights_of_another_network(self, data, tmp_path, flag):
        torch.save(nn.Conv2d(1, 1, 3).state_dict(), tmp_path / "other.pth")
        message = "weights only" if flag == "--resume" else "not a StackMFF-V2 checkpoint"
        with pytest.raises(InputError, match=message):
            train.main(tiny_args(data, tmp_path, flag, str(tmp_path / "other.pth")))
        assert not (tmp_path / "run").exists()

    def test_missing_file(self, data, tmp_path):
        with pytest.raises(InputError, match="does not exist"):
            train.main(tiny_args(data, tmp_path, "--resume", str(tmp_path / "gone.pth")))


def test_killed_during_epoch_two_leaves_a_loadable_checkpoint_and_resumes(data, tmp_path):
    """A real SIGTERM to train.py while epoch 2 of 3 runs: exit 130 with one line,
    last.pth (epoch 1) loads with load_model, --resume runs epochs 2 and 3."""
    import os
    import signal
    import time
    argv = ["--train_dataset", *data["train"], "--val_dataset", *data["val"], "--training_image_size", "64",
            "--batch_size", "2", "--num_epochs", "3", "--num_workers", "0", "--num_threads", "1",
            "--device", "cpu", "--save_dir", str(tmp_path), "--save_name", "run"]
    process = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    last = tmp_path / "run" / "last.pth"
    deadline = time.monotonic() + 120
    while process.poll() is None and not last.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)   # into epoch 2: epoch 1 wrote last.pth as it ended
    assert process.poll() is None, "training ended before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].strip() == "interrupted"
    assert "epoch 2/3: train loss" not in stdout
    assert not [p for p in (tmp_path / "run").rglob("*") if ".part" in p.name]
    assert torch.load(last, weights_only=True)["epoch"] == 1
    load_model(last, "cpu")

    summary = train.main(train.get_args_parser().parse_args(argv + ["--resume", str(last)]))
    assert [h["epoch"] for h in summary["history"]] == [2, 3]
    assert torch.load(last, weights_only=True)["epoch"] == 3
    with open(tmp_path / "run" / "validation.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]
