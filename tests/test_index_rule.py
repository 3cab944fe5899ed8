"""Index rules, the model card beside a checkpoint, and the shipped default weights."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference import DEFAULT_MODEL, fuse_images  # noqa: E402
from model import (CheckpointError, StackMFFV2, argmax_index_and_depth, load_model,  # noqa: E402
                   model_card_path, write_model_card)

OFFICIAL = REPO.parent / "shared" / "reference" / "official" / "model.pth"
PARITY = REPO.parent / "shared" / "reference" / "parity" / "network_cases.npz"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


def save_random_weights(path, card=None):
    torch.manual_seed(0)
    torch.save(StackMFFV2().state_dict(), path)
    if card is not None:
        write_model_card(path, card)
    return path


@pytest.fixture
def argmax_net():
    """A randomly initialised network (fixed seed) that reads the index by argmax."""
    torch.manual_seed(1)
    return StackMFFV2(index_rule="argmax").eval()


class TestArgmaxRule:
    def test_index_is_argmax_of_logits_and_depth_follows(self):
        logits = torch.tensor([[[[0.1, 2.0]], [[1.5, -1.0]], [[0.2, 0.3]]]])  # (1, 3, 1, 2)
        index, depth = argmax_index_and_depth(logits)
        assert index.tolist() == [[[1, 0]]]
        assert torch.allclose(depth, torch.tensor([[[[0.5, 0.0]]]]))

    def test_forward_gathers_the_argmax_slice(self, argmax_net):
        net = argmax_net
        x = torch.rand(1, 4, 32, 32)
        with torch.inference_mode():
            fused, depth, index = net(x)
            logits = net.focus_logits(x)
        assert torch.equal(index, logits.argmax(1))
        assert torch.equal(fused[:, 0], torch.gather(x, 1, index[:, None])[:, 0])
        assert torch.allclose(depth[:, 0], index.float() / 3)

    def test_unknown_rule_is_refused(self):
        with pytest.raises(ValueError, match="index_rule"):
            StackMFFV2(index_rule="median")


class TestModelCard:
    def test_rule_comes_from_the_card_and_can_be_overridden(self, tmp_path):
        path = save_random_weights(tmp_path / "w.pth", {"index_rule": "argmax"})
        assert Path(model_card_path(path)) == tmp_path / "w.json"
        assert load_model(path).index_rule == "argmax"
        assert load_model(path, index_rule="minmax_round").index_rule == "minmax_round"

    def test_no_card_means_released_rule(self, tmp_path):
        assert load_model(save_random_weights(tmp_path / "w.pth")).index_rule == "minmax_round"

    def test_bad_card_is_a_checkpoint_error(self, tmp_path):
        path = save_random_weights(tmp_path / "w.pth")
        Path(model_card_path(path)).write_text(json.dumps({"index_rule": "median"}))
        with pytest.raises(CheckpointError, match="unknown index_rule"):
            load_model(path)
        Path(model_card_path(path)).write_text("{not json")
        with pytest.raises(CheckpointError, match="not readable JSON"):
            load_model(path)


@pytest.mark.skipif(not (OFFICIAL.is_file() and PARITY.is_file()), reason="../shared reference data absent")
def test_official_weights_keep_the_released_rule_and_parity():
    model = load_model(OFFICIAL)
    assert model.index_rule == "minmax_round"
    cases = np.load(PARITY)
    x = torch.from_numpy(cases["random_n3_64x96__x"])
    with torch.inference_mode():
        fused, depth, index = model(x)
    assert np.array_equal(index.numpy(), cases["random_n3_64x96__index"])
    assert np.allclose(depth.numpy(), cases["random_n3_64x96__depth"], atol=1e-5)
    assert np.allclose(fused.numpy(), cases["random_n3_64x96__fused"], atol=1e-6)


class TestShippedWeights:
    def test_default_model_is_the_shipped_file_with_its_card(self):
        assert DEFAULT_MODEL.is_file(), "weights/stackmffv2_synthetic.pth must ship with the project"
        card = json.loads(Path(model_card_path(DEFAULT_MODEL)).read_text())
        model = load_model(DEFAULT_MODEL)
        assert model.index_rule == card["index_rule"] == "argmax"
        assert DEFAULT_MODEL.stat().st_size < 400_000  # a bare state dict, no optimizer state

    def test_shipped_weights_pick_the_sharp_slice(self):
        # Left half sharp in slice 0, right half sharp in slice 2; slice 1 blurred everywhere.
        rng = np.random.default_rng(0)
        sharp = (rng.random((64, 64)) * 255).astype(np.uint8)
        import cv2
        blurred = cv2.GaussianBlur(sharp, (9, 9), 0)
        first, last = blurred.copy(), blurred.copy()
        first[:, :32], last[:, 32:] = sharp[:, :32], sharp[:, 32:]
        result = fuse_images(load_model(DEFAULT_MODEL), [first, blurred, last])
        inner = result.index[8:-8]
        assert (inner[:, 4:24] == 0).mean() > 0.9 and (inner[:, 40:60] == 2).mean() > 0.9

    def test_predict_one_stack_uses_them_by_default(self, tmp_path):
        import cv2
        rng = np.random.default_rng(1)
        stack = tmp_path / "stack"
        stack.mkdir()
        for k in range(3):
            cv2.imwrite(str(stack / f"{k + 1}.png"), (rng.random((40, 48)) * 255).astype(np.uint8))
        r = subprocess.run([sys.executable, str(REPO / "predict_one_stack.py"), "--input_dir", str(stack),
                            "--output_dir", str(tmp_path / "out"), "--fixed_names", "--device", "cpu"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "out" / "fused_gray.png").is_file()


class TestRuleOnEveryPath:
    def test_fast_and_tiled_paths_follow_the_argmax_rule(self, argmax_net):
        from fast_inference import fast_forward, tiled_forward
        net = argmax_net
        x = torch.rand(1, 3, 64, 96)
        with torch.inference_mode():
            _, _, want = net(x)
        _, _, fast_index = fast_forward(net, x)
        assert (fast_index == want).float().mean() >= 0.999
        # one tile covering the whole image: the tiled path must pick the same slices
        _, tiled_depth, tiled_index = tiled_forward(net, x[0], max_memory=4.0)
        assert (tiled_index == want[0]).float().mean() >= 0.999
        assert torch.allclose(tiled_depth, tiled_index.float() / 2)
