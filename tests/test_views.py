"""Test-time views: mirrored/transposed passes whose focus logits are averaged."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fast_inference import fast_forward  # noqa: E402
from model import TEST_VIEWS, CheckpointError, StackMFFV2, load_model, multi_view_logits, write_model_card  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_equivariant_function_is_unchanged_by_any_number_of_views():
    x = torch.rand(2, 3, 8, 8)
    for views in TEST_VIEWS:
        torch.testing.assert_close(multi_view_logits(lambda t: t * 2, x, views), x * 2)


def test_views_average_the_mapped_back_passes():
    x = torch.rand(1, 2, 5, 5)
    along_rows = lambda t: t.cumsum(-1)          # not mirror-symmetric
    two = multi_view_logits(along_rows, x, 2)
    torch.testing.assert_close(two, (x.cumsum(-1) + x.flip(-1).cumsum(-1).flip(-1)) / 2)
    eight = multi_view_logits(along_rows, x, 8)
    # Half of the eight views run the sum down the columns instead: the mean of both directions.
    rows = (x.cumsum(-1) + x.flip(-1).cumsum(-1).flip(-1)) / 2
    cols = (x.cumsum(-2) + x.flip(-2).cumsum(-2).flip(-2)) / 2
    torch.testing.assert_close(eight, (rows + cols) / 2)
    with pytest.raises(ValueError, match="views"):
        multi_view_logits(along_rows, x, 3)


def test_fast_path_and_forward_agree_with_views():
    torch.manual_seed(3)
    net = StackMFFV2(index_rule="argmax", views=4).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        fused, depth, index = net(x)
        single = StackMFFV2(index_rule="argmax").eval()
        single.load_state_dict(net.state_dict())
        one_view = single(x)[2]
    fast_fused, _, fast_index = fast_forward(net, x)
    same = fast_index == index                   # float rounding may flip a near-tie
    assert same.float().mean() > 0.999
    assert torch.equal(fast_fused[:, 0][same], fused[:, 0][same])
    assert not torch.equal(one_view, index)      # the views really change a random network's answer


def test_views_come_from_the_model_card_and_can_be_overridden(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(StackMFFV2().state_dict(), path)
    assert load_model(path).views == 1                     # no card: released single pass
    write_model_card(path, {"index_rule": "argmax", "views": 4})
    assert load_model(path).views == 4 and load_model(path, views=2).views == 2
    write_model_card(path, {"views": 5})
    with pytest.raises(CheckpointError, match="5 views"):
        load_model(path)


def test_cli_flag(tmp_path):
    result = subprocess.run([sys.executable, "predict_one_stack.py", "--help"], cwd=REPO, capture_output=True,
                            text=True)
    assert "--views {1,2,4,8}" in result.stdout
