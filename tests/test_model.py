"""model.load_model: the one loader, with clear errors for wrong files."""
from collections import OrderedDict

import pytest
import torch

from model import CheckpointError, StackMFFV2, load_model, read_state_dict


@pytest.fixture
def state_dict():
    torch.manual_seed(0)
    return StackMFFV2().state_dict()


def assert_same_weights(model, state_dict):
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state_dict[key], rtol=0, atol=0)


class TestLoadModel:
    def test_parameter_count(self):
        assert sum(p.numel() for p in StackMFFV2().parameters()) == 51524

    def test_bare_state_dict(self, tmp_path, state_dict):
        torch.save(state_dict, tmp_path / "m.pth")
        model = load_model(tmp_path / "m.pth")
        assert not model.training
        assert_same_weights(model, state_dict)

    @pytest.mark.parametrize("wrapper", ["model", "state_dict"])
    def test_wrapped_state_dict(self, tmp_path, state_dict, wrapper):
        torch.save({wrapper: state_dict, "epoch": 3}, tmp_path / "m.pth")
        assert_same_weights(load_model(tmp_path / "m.pth"), state_dict)

    def test_only_leading_prefixes_are_stripped(self, tmp_path, state_dict):
        prefixed = OrderedDict((f"module._orig_mod.{k}", v) for k, v in state_dict.items())
        torch.save(prefixed, tmp_path / "m.pth")
        assert_same_weights(load_model(tmp_path / "m.pth"), state_dict)
        assert "a.module.b" in read_state_dict_of(tmp_path, {"a.module.b": torch.zeros(1)})

    def test_missing_file(self, tmp_path):
        with pytest.raises(CheckpointError, match="does not exist"):
            load_model(tmp_path / "nope.pth")

    def test_not_a_checkpoint(self, tmp_path):
        (tmp_path / "junk.pth").write_bytes(b"\x00\x01 definitely not a checkpoint")
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
            load_model(tmp_path / "junk.pth")

    def test_other_architecture(self, tmp_path):
        torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), tmp_path / "other.pth")
        with pytest.raises(CheckpointError, match="not a StackMFF-V2 checkpoint"):
            load_model(tmp_path / "other.pth")

    def test_wrong_shape(self, tmp_path, state_dict):
        broken = dict(state_dict)
        broken["feature_extraction.final.weight"] = torch.zeros(4, 8, 1, 1)
        torch.save(broken, tmp_path / "m.pth")
        with pytest.raises(CheckpointError, match="another shape"):
            load_model(tmp_path / "m.pth")

    def test_not_a_state_dict(self, tmp_path):
        torch.save([1, 2, 3], tmp_path / "list.pth")
        with pytest.raises(CheckpointError, match="no state dict"):
            load_model(tmp_path / "list.pth")


def read_state_dict_of(tmp_path, obj):
    torch.save(obj, tmp_path / "x.pth")
    return read_state_dict(tmp_path / "x.pth")


class TestShapes:
    def test_forward_shapes_and_ranges(self):
        torch.manual_seed(0)
        model = StackMFFV2().eval()
        x = torch.rand(2, 5, 64, 96)
        with torch.inference_mode():
            fused, depth, index = model(x)
        assert fused.shape == (2, 1, 64, 96) and depth.shape == (2, 1, 64, 96) and index.shape == (2, 64, 96)
        assert index.dtype == torch.int64 and int(index.min()) >= 0 and int(index.max()) <= 4
        for b in range(2):
            assert float(depth[b].min()) == 0.0 and float(depth[b].max()) == pytest.approx(1.0)
        # the fused image is made of input pixels
        assert torch.equal(fused, torch.gather(x, 1, index.unsqueeze(1)))
