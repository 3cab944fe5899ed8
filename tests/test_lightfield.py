"""make_datasets/lightfield.py: shift-and-add focus stacks from light fields of known answer."""
import shutil

import cv2
import numpy as np
import pytest

from conftest import DATA, requires
from make_datasets import lightfield
from make_datasets.lightfield import (CENTRE, GRID, disparity_range, focus_index_of, get_args_parser,
                                      light_field_stack, refocus, shifted, view_position)
from utils import InputError, read_image, read_stack, to_gray_float

SHARED_DINO = DATA / "lightfields" / "hci_dino"
# HCI's 33-view star: centre row, centre column and both diagonals of the 9 x 9 grid.
STAR = sorted({(r, c) for r in range(GRID) for c in range(GRID)
               if r == CENTRE[0] or c == CENTRE[1] or r - c == 0 or r + c == GRID - 1})


def texture(shape, seed, sigma=1.5):
    """Smooth random texture, uint8 HxWx3 (smooth so that bicubic resampling is near exact)."""
    noise = np.random.default_rng(seed).uniform(0, 255, shape + (3,)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), sigma) * 3 - 255, 0, 255).astype(np.uint8)


def plane_views(image, disparity, positions=STAR):
    """Views of a flat picture at ``disparity``: a point at p in the centre view is at p + d * offset."""
    return {pos: shifted(image, (pos[0] - CENTRE[0], pos[1] - CENTRE[1]), -disparity) for pos in positions}


def two_plane_views(shape, near, far):
    """Left half: a near textured plane at disparity ``near`` in front of a far one at ``far``."""
    front, back = texture(shape, 1), texture(shape, 2)
    mask = np.zeros(shape, np.float32)
    mask[:, : shape[1] // 2] = 1
    views = {}
    for pos in STAR:
        offset = (pos[0] - CENTRE[0], pos[1] - CENTRE[1])
        covered = shifted(mask, offset, -near)[..., None] > 0.5
        views[pos] = np.where(covered, shifted(front, offset, -near), shifted(back, offset, -far))
    return views


def write_views(folder, views, style="hci"):
    folder.mkdir(parents=True, exist_ok=True)
    for (row, col), image in views.items():
        name = f"input_Cam{GRID * row + col:03d}.png" if style == "hci" else f"scene_{row + 1:02d}_{col + 1:02d}.png"
        cv2.imwrite(str(folder / name), image)
    return folder


def inner(image, margin=12):
    return image[margin:-margin, margin:-margin].astype(np.float64)


def test_view_names_of_both_formats():
    assert view_position("input_Cam040") == CENTRE
    assert view_position("input_Cam013") == (1, 4)
    assert view_position("2067_05_05") == CENTRE
    assert view_position("2067_01_09") == (0, 8)
    assert view_position("input_Cam081") is None and view_position("2067_10_01") is None
    assert view_position("notes") is None


@pytest.mark.parametrize("d", [1.0, 0.6])
def test_slice_refocused_at_the_plane_equals_the_centre_view(d):
    image = texture((64, 72), 0)
    views = plane_views(image, d)
    centre = views[CENTRE]
    np.testing.assert_array_equal(centre, image)
    error = np.abs(inner(refocus(views, d)) - inner(centre))
    # Integer shifts are exact; sub-pixel ones go through bicubic resampling twice (views and refocus).
    assert error.max() <= (1 if d == int(d) else 6) and error.mean() < (0.01 if d == int(d) else 1.0)
    assert np.abs(inner(refocus(views, d + 0.5)) - inner(centre)).mean() > 5 * error.mean() + 3


def test_disparity_range_of_a_plane_and_of_two_planes():
    low, high = disparity_range(plane_views(texture((64, 72), 0), 0.6), search=2.0)
    assert low == pytest.approx(0.6, abs=0.051) and high == pytest.approx(0.6, abs=0.051)
    low, high = disparity_range(two_plane_views((64, 96), near=-1.0, far=0.8), search=2.0)
    assert low == pytest.approx(-1.0, abs=0.051) and high == pytest.approx(0.8, abs=0.051)


def test_two_plane_stack_from_a_folder(tmp_path):
    views = two_plane_views((64, 96), near=-1.0, far=0.8)
    result = light_field_stack(write_views(tmp_path / "lf", views, style="lytro"), num_slices=4, search=2.0)
    assert len(result.slices) == 4 and result.focus_index.shape == (64, 96)
    assert result.planes[0] == pytest.approx(-1.0, abs=0.051) and result.planes[-1] == pytest.approx(0.8, abs=0.051)
    np.testing.assert_array_equal(result.all_in_focus, views[CENTRE])
    # Away from the occlusion edge (x = 48) and the border: near half on slice 0, far half on the last.
    assert (result.focus_index[10:-10, 8:38] == 0).all()
    assert (result.focus_index[10:-10, 58:-8] == 3).all()
    centre = views[CENTRE].astype(np.float64)
    for k, cols in ((0, slice(8, 38)), (3, slice(58, -8))):
        in_focus = np.abs(result.slices[k][10:-10, cols] - centre[10:-10, cols]).mean()
        other = np.abs(result.slices[3 - k][10:-10, cols] - centre[10:-10, cols]).mean()
        assert in_focus < 1.5 < other


def test_focus_index_picks_the_matching_plane():
    views = plane_views(texture((48, 48), 3), -0.5)
    index = focus_index_of(views, [-1.5, -0.5, 0.5, 1.5])
    assert (inner(index, 8) == 1).all()


def test_bad_light_fields(tmp_path):
    views = plane_views(texture((32, 32), 0), 0.5)
    no_centre = write_views(tmp_path / "no_centre", {p: v for p, v in views.items() if p != CENTRE})
    with pytest.raises(InputError, match="no centre view"):
        light_field_stack(no_centre)
    alone = write_views(tmp_path / "alone", {CENTRE: views[CENTRE]})
    with pytest.raises(InputError, match="at least two views"):
        light_field_stack(alone)
    mixed = write_views(tmp_path / "mixed", views)
    cv2.imwrite(str(mixed / "input_Cam000.png"), np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(InputError, match="mixes image sizes"):
        light_field_stack(mixed)
    with pytest.raises(InputError, match="num_slices"):
        light_field_stack(write_views(tmp_path / "ok", views), num_slices=1)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    args = get_args_parser().parse_args(["--input", str(empty), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(InputError, match="no light-field views"):
        lightfield.main(args)


@requires(SHARED_DINO, "the shared HCI dino light field")
def test_end_to_end_on_a_crop_of_the_shared_dino(tmp_path):
    """A 128 x 128 crop of every view, through the command line's main, in the released layout."""
    crop = tmp_path / "lf" / "dino"
    crop.mkdir(parents=True)
    for path in sorted(SHARED_DINO.glob("input_Cam*.png")):
        cv2.imwrite(str(crop / path.name), read_image(path)[300:428, 40:168])
    shutil.copy(SHARED_DINO.parent / "SOURCE.md", tmp_path / "lf")   # a stray file beside the scene is ignored
    out = tmp_path / "out"
    args = get_args_parser().parse_args(["--input", str(tmp_path / "lf"), "--output_dir", str(out),
                                         "--num_slices", "6"])
    assert lightfield.main(args) == 1
    slices, names = read_stack(out / "dof_stack" / "dino")
    assert list(names) == [f"{k}.png" for k in range(1, 7)]
    aif = read_image(out / "AiF" / "dino.png")
    np.testing.assert_array_equal(aif, read_image(crop / "input_Cam040.png"))
    planes = np.loadtxt(out / "planes" / "dino.txt")
    assert planes.shape == (6,) and (np.diff(planes) > 0).all() and np.abs(planes).max() <= 4
    index = np.rint(read_image(out / "quantized_depth" / "dino.png") / 51.0).astype(int)   # k / 5 x 255
    assert set(np.unique(index)) <= set(range(6)) and len(np.unique(index)) >= 3
    # Each pixel taken from its focus-index slice is closer to the centre view than any one slice.
    stack = np.stack(slices).astype(np.float64)
    picked = np.take_along_axis(stack, index[None, ..., None], axis=0)[0]
    errors = [np.abs(inner(s) - inner(aif)).mean() for s in stack]
    assert np.abs(inner(picked) - inner(aif)).mean() < 0.8 * min(errors)


def test_benchmark_builds_light_field_stacks_once(tmp_path):
    from bench.benchmark_fusion import light_field_sets
    views = two_plane_views((64, 96), near=-1.0, far=0.8)
    write_views(tmp_path / "fields" / "planes", views)
    cache = tmp_path / "cache"
    sets = light_field_sets(tmp_path / "fields", 4, cache)
    (title, [(slices, centre, index)]), = sets.items()
    assert "planes" in title and len(slices) == 4
    np.testing.assert_array_equal(centre, to_gray_float(views[CENTRE]))
    expected = light_field_stack(tmp_path / "fields" / "planes", 4)
    np.testing.assert_array_equal(index, expected.focus_index)
    for got, made in zip(slices, expected.slices):
        np.testing.assert_array_equal(got, made)
    built = sorted(cache.rglob("*.png"))
    stamps = [p.stat().st_mtime_ns for p in built]
    light_field_sets(tmp_path / "fields", 4, cache)                    # read back, not rebuilt
    assert sorted(cache.rglob("*.png")) == built and [p.stat().st_mtime_ns for p in built] == stamps
    light_field_sets(tmp_path / "fields", 5, cache)                    # another N: its own stack
    assert len(list(cache.iterdir())) == 2
