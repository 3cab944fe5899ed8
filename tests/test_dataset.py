"""dataset.py: folder pairing and errors, item shapes and values, shared flips, grouped batches."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dataset import Augment, FocusStackDataset, GroupedBatchSampler, dataset_name, find_scenes
from synthetic_stacks import make_dataset
from utils import InputError


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "set", num_scenes=6, slice_counts=(4, 6), size=64)


class TestFindScenes:
    def test_pairs_scenes_in_natural_order(self, source):
        scenes = find_scenes(*source)
        assert [s.name for s in scenes] == [f"scene{k}" for k in range(6)]
        assert [s.num_slices for s in scenes] == [4, 6, 4, 6, 4, 6]
        assert all(s.depth_path.name == f"{s.name}.png" for s in scenes)

    def test_missing_folders_name_their_role(self, tmp_path, source):
        with pytest.raises(InputError, match="stack folder .*nope.* does not exist"):
            find_scenes(tmp_path / "nope", source[1])
        with pytest.raises(InputError, match="depth map folder .*nope.* does not exist"):
            find_scenes(source[0], tmp_path / "nope")

    def test_no_scene_folders(self, tmp_path, source):
        (tmp_path / "empty").mkdir()
        with pytest.raises(InputError, match="holds no scene folders"):
            find_scenes(tmp_path / "empty", source[1])

    def test_scene_without_depth_map_is_named(self, tmp_path):
        stacks, depths = make_dataset(tmp_path, num_scenes=3, slice_counts=(4,))
        (tmp_path / "depth_maps" / "scene1.png").unlink()
        with pytest.raises(InputError, match=r"1 of 3 scenes .* no depth map .*scene1"):
            find_scenes(stacks, depths)

    def test_one_image_scene_and_empty_scene(self, tmp_path):
        stacks, depths = make_dataset(tmp_path, num_scenes=2, slice_counts=(4,))
        for k in (2, 3, 4):
            (tmp_path / "image_stacks" / "scene0" / f"{k}.png").unlink()
        with pytest.raises(InputError, match="scene0.* has 1 image"):
            find_scenes(stacks, depths)
        for k in range(1, 5):
            (tmp_path / "image_stacks" / "scene1" / f"{k}.png").unlink()
        (tmp_path / "image_stacks" / "scene0" / "1.png").unlink()
        with pytest.raises(InputError, match="holds no images"):
            find_scenes(stacks, depths)

    def test_dataset_name_is_the_folder_above_image_stacks(self, tmp_path):
        assert dataset_name(tmp_path / "NYU" / "image_stacks") == "NYU"
        assert dataset_name(tmp_path / "my_stacks") == "my_stacks"


class TestFocusStackDataset:
    def test_item_shapes_range_and_resize(self, source):
        data = FocusStackDataset([source], image_size=32)
        assert len(data) == 6 and data.num_slices == [4, 6, 4, 6, 4, 6]
        stack, depth = data[1]
        assert stack.shape == (6, 32, 32) and depth.shape == (1, 32, 32)
        assert stack.dtype == depth.dtype == torch.float32
        assert 0 <= stack.min() and stack.max() <= 1 and 0 <= depth.min() and depth.max() <= 1
        # The depth ramp survives the area resize: its 8-bit picture resized by OpenCV.
        raw = cv2.imread(str(data.scenes[1].depth_path), cv2.IMREAD_GRAYSCALE)
        expected = cv2.resize(raw, (32, 32), interpolation=cv2.INTER_AREA) / 255.0
        np.testing.assert_allclose(depth[0].numpy(), expected, atol=1e-6)

    def test_slices_in_natural_order(self, tmp_path):
        (tmp_path / "image_stacks" / "a").mkdir(parents=True)
        (tmp_path / "depth_maps").mkdir()
        for k in range(1, 12):  # 1, 2, ..., 11: '10' must not come before '2'
            cv2.imwrite(str(tmp_path / "image_stacks" / "a" / f"{k}.png"), np.full((32, 32), 20 * k, np.uint8))
        cv2.imwrite(str(tmp_path / "depth_maps" / "a.png"), np.zeros((32, 32), np.uint8))
        stack, _ = FocusStackDataset([(tmp_path / "image_stacks", tmp_path / "depth_maps")], 32)[0]
        np.testing.assert_allclose(stack[:, 0, 0].numpy(), np.arange(1, 12) * 20 / 255, atol=1e-6)

    def test_colour_slices_give_the_y_channel_of_ycbcr(self, tmp_path):
        from PIL import Image
        stacks, depths = make_dataset(tmp_path, num_scenes=1, slice_counts=(3,), size=32, color=True)
        stack, _ = FocusStackDataset([(stacks, depths)], 32)[0]
        y = np.asarray(Image.open(f"{stacks}/scene0/2.png").convert("YCbCr"))[..., 0] / 255.0
        np.testing.assert_allclose(stack[1].numpy(), y, atol=1.01 / 255)

    @pytest.mark.parametrize("hflip, vflip, dims", [(True, False, [-1]), (False, True, [-2]), (True, True, [-2, -1])])
    def test_the_same_flip_on_every_slice_and_the_depth(self, source, hflip, vflip, dims):
        data = FocusStackDataset([source], 64)
        stack, depth = data[3]
        flipped_stack, flipped_depth = data[(3, hflip, vflip)]
        assert torch.equal(flipped_stack, stack.flip(dims))
        assert torch.equal(flipped_depth, depth.flip(dims))

    def test_crop_window_and_transpose(self, source):
        whole = FocusStackDataset([source], 64)
        cropped = FocusStackDataset([source], 64, crop=24)
        stack, depth = whole[3]
        room = 64 - 24 + 1
        for top, left in [(0.0, 0.0), (0.5, 0.25), (0.999, 0.999)]:
            y, x = int(top * room), int(left * room)
            part_stack, part_depth = cropped[(3, False, False, False, top, left)]
            assert part_stack.shape == (stack.shape[0], 24, 24)
            assert torch.equal(part_stack, stack[:, y:y + 24, x:x + 24])
            assert torch.equal(part_depth, depth[:, y:y + 24, x:x + 24])
        turned_stack, turned_depth = whole[(3, True, False, True, 0.5, 0.5)]
        assert torch.equal(turned_stack, stack.flip([-1]).transpose(1, 2))
        assert torch.equal(turned_depth, depth.flip([-1]).transpose(1, 2))
        assert cropped[3][0].shape[1:] == (24, 24)  # a plain index is cut at the centre
        with pytest.raises(InputError, match="crop size"):
            FocusStackDataset([source], 32, crop=40)

    def test_zoom_enlarges_a_smaller_window_and_contrast_keeps_the_mean(self, source):
        whole = FocusStackDataset([source], 64)
        cropped = FocusStackDataset([source], 64, crop=32)
        stack, depth = whole[2]
        zoomed, zoomed_depth = cropped[Augment(2, top=0.0, left=0.0, zoom=2.0)]   # 16 x 16 window -> 32 x 32
        expected = torch.nn.functional.interpolate(stack[None, :, :16, :16], size=(32, 32), mode="bilinear",
                                                   align_corners=False)[0]
        torch.testing.assert_close(zoomed, expected)
        assert torch.equal(zoomed_depth[0, ::2, ::2], depth[0, :16, :16])          # nearest: no invented depths
        faint, faint_depth = whole[Augment(2, contrast=0.25)]
        torch.testing.assert_close(faint.mean(), stack.mean())
        torch.testing.assert_close(faint - faint.mean(), (stack - stack.mean()) * 0.25)
        assert torch.equal(faint_depth, depth)
        with pytest.raises(InputError, match="zoom"):
            GroupedBatchSampler([4, 4], 2, zoom=0.5)

    def test_all_in_focus_channel_changes_as_the_slices(self, tmp_path, source):
        depth_root = source[1]
        with pytest.raises(InputError, match="all_in_focus.*does not exist"):
            FocusStackDataset([source], 64, all_in_focus=True)
        sharp_dir = Path(depth_root).parent / "all_in_focus"
        sharp_dir.mkdir()
        try:
            for k in range(5):          # one scene without: named in the error
                cv2.imwrite(str(sharp_dir / f"scene{k}.png"), np.full((64, 64), 40 * k, np.uint8))
            with pytest.raises(InputError, match="1 of 6 scenes have no all-in-focus image.*scene5"):
                FocusStackDataset([source], 64, all_in_focus=True)
            gradient = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
            cv2.imwrite(str(sharp_dir / "scene5.png"), gradient)
            plain = FocusStackDataset([source], 64, crop=32)
            with_sharp = FocusStackDataset([source], 64, crop=32, all_in_focus=True)
            key = Augment(5, hflip=True, transpose=True, top=0.2, left=0.7, zoom=1.5, contrast=0.5)
            stack, target = with_sharp[key]
            plain_stack, plain_depth = plain[key]
            assert target.shape == (2, 32, 32)
            assert torch.equal(stack, plain_stack) and torch.equal(target[:1], plain_depth)
            # The same window, flip, transpose, zoom and contrast as the slices.
            whole = torch.from_numpy(gradient.astype(np.float32) / 255)
            room, window = 64 - 21 + 1, 21
            y, x = int(0.2 * room), int(0.7 * room)
            part = torch.nn.functional.interpolate(whole[None, None, y:y + window, x:x + window], size=(32, 32),
                                                   mode="bilinear", align_corners=False)[0, 0]
            part = part.flip(-1).transpose(0, 1)
            whole_stack = FocusStackDataset([source], 64)[5][0]
            unchanged = plain[Augment(5, hflip=True, transpose=True, top=0.2, left=0.7, zoom=1.5)][0]
            mean = unchanged.mean()
            torch.testing.assert_close(target[1], (part - mean) * 0.5 + mean)
            assert whole_stack.shape[0] == stack.shape[0]
        finally:
            for path in sharp_dir.iterdir():
                path.unlink()
            sharp_dir.rmdir()

    def test_subset_fraction_is_random_but_reproducible(self, source):
        half = FocusStackDataset([source], 32, subset_fraction=0.5, seed=3)
        again = FocusStackDataset([source], 32, subset_fraction=0.5, seed=3)
        assert len(half) == 3 and half.scenes == again.scenes
        other_seeds = {tuple(s.name for s in FocusStackDataset([source], 32, 0.5, seed=k).scenes) for k in range(8)}
        assert len(other_seeds) > 1
        with pytest.raises(InputError, match="subset fraction"):
            FocusStackDataset([source], 32, subset_fraction=0)

    def test_several_sources_and_cache(self, source):
        data = FocusStackDataset([source, source], 32, cache=True)
        assert len(data) == 12
        first = data[2]
        assert 2 in data.cache and torch.equal(data[2][0], first[0]) and torch.equal(data[8][1], first[1])


class TestGroupedBatchSampler:
    lengths = [4, 6, 4, 8, 6, 4, 4, 6, 8, 4, 6]

    def test_batches_hold_one_length_and_cover_every_item_once(self):
        sampler = GroupedBatchSampler(self.lengths, batch_size=2, shuffle=True)
        batches = list(sampler)
        assert all(len({self.lengths[i] for i in b}) == 1 for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(len(self.lengths)))
        assert len(sampler) == len(batches) == 6  # five 4s -> 3 batches, four 6s -> 2, two 8s -> 1

    def test_order_depends_on_seed_and_epoch_only(self):
        def batches(seed, epoch):
            sampler = GroupedBatchSampler(self.lengths, 3, shuffle=True, augment=True, seed=seed)
            sampler.set_epoch(epoch)
            return list(sampler)
        assert batches(0, 1) == batches(0, 1)
        assert batches(0, 1) != batches(0, 2) and batches(0, 1) != batches(1, 1)
        flips = [key[1:] for b in batches(0, 1) for key in b]
        assert len(set(flips)) > 1 and all(isinstance(f, bool) for pair in flips for f in pair)

    def test_rotate_and_crop_keep_the_released_flips(self):
        def batches(**options):
            sampler = GroupedBatchSampler(self.lengths, 3, shuffle=True, augment=True, seed=4, **options)
            sampler.set_epoch(2)
            return list(sampler)
        plain, long = batches(), batches(rotate=True, crop=True)
        assert [[k[:3] for k in b] for b in long] == plain
        keys = [k for b in long for k in b]
        assert all(isinstance(k, Augment) and 0 <= k.top < 1 and 0 <= k.left < 1 for k in keys)
        assert {k.transpose for k in keys} == {True, False}
        assert all(k.transpose is False and k.zoom == 1 and k.contrast == 1 for b in batches(crop=True) for k in b)
        changed = [k for b in batches(zoom=2.0, contrast=0.25) for k in b]
        zooms, contrasts = [k.zoom for k in changed], [k.contrast for k in changed]
        assert all(1 <= z <= 2 for z in zooms) and 0 < zooms.count(1.0) < len(zooms)
        assert all(0.25 <= c <= 1 for c in contrasts) and 0 < contrasts.count(1.0) < len(contrasts)

    def test_no_shuffle_keeps_file_order(self):
        batches = list(GroupedBatchSampler(self.lengths, 2, shuffle=False))
        assert batches[0] == [0, 2] and all(b == sorted(b) for b in batches)

    def test_training_shards_are_equal_in_length_and_cover_everything(self):
        shards = [list(GroupedBatchSampler(self.lengths, 2, seed=5, num_replicas=3, rank=r)) for r in range(3)]
        assert len({len(s) for s in shards}) == 1
        assert {i for s in shards for b in s for i in b} == set(range(len(self.lengths)))

    def test_validation_shards_are_disjoint(self):
        shards = [list(GroupedBatchSampler(self.lengths, 2, shuffle=False, num_replicas=2, rank=r, pad=False))
                  for r in range(2)]
        items = [i for s in shards for b in s for i in b]
        assert sorted(items) == list(range(len(self.lengths)))

    def test_drop_last_and_bad_batch_size(self):
        batches = list(GroupedBatchSampler(self.lengths, 2, drop_last=True))
        assert all(len(b) == 2 for b in batches) and len(batches) == 5
        with pytest.raises(InputError, match="batch size"):
            GroupedBatchSampler(self.lengths, 0)


def test_depth_map_of_another_size_is_refused(tmp_path):
    stacks, depths = make_dataset(tmp_path, num_scenes=1, slice_counts=(3,), size=64)
    cv2.imwrite(f"{depths}/scene0.png", np.zeros((48, 64), np.uint8))
    with pytest.raises(InputError, match=r"depth map .*scene0.png' is 64x48 but the slices .* are 64x64"):
        FocusStackDataset([(stacks, depths)], 32)[0]
