"""Training data in the released layout, and a batch sampler that groups stacks by length.

One dataset ("source") is a pair of folders::

    <root>/image_stacks/<scene>/<1..N>.<ext>   focus slices, natural file-name order
    <root>/depth_maps/<scene>.png              8- or 16-bit depth map (0 = slice 1)
    <root>/all_in_focus/<scene>.png            optional: the all-in-focus image the
                                               stack was made from (``all_in_focus=True``)

Every slice is read as the Y channel of YCbCr (for 8-bit images this equals
OpenCV's BGR->GRAY, ITU-R 601 weights, which ``utils.to_gray_float`` applies),
resized to the square training size with the depth map, and scaled to [0, 1].

All the randomness of an epoch (order and flips) is drawn by
``GroupedBatchSampler`` from (seed, epoch): the dataset itself is
deterministic, so an epoch is the same whatever the number of loader workers,
and a resumed run sees exactly the batches an uninterrupted one would.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from utils import InputError, images_by_stem, list_images, natural_sort_key, read_image, read_stack, to_gray_float

STACK_FOLDER = "image_stacks"
DEPTH_FOLDER = "depth_maps"
ALL_IN_FOCUS_FOLDER = "all_in_focus"


class Augment(NamedTuple):
    """One training item with its random changes (GroupedBatchSampler draws them).

    top/left in [0, 1) place the crop window; zoom >= 1 takes a window that
    much smaller and enlarges it to the crop size (a closer view: coarser
    detail, larger blur); contrast in (0, 1] scales the stack about its mean
    (weaker texture, the same focus order).
    """
    index: int
    hflip: bool = False
    vflip: bool = False
    transpose: bool = False
    top: float = 0.5
    left: float = 0.5
    zoom: float = 1.0
    contrast: float = 1.0


@dataclass(frozen=True)
class Scene:
    """One training sample on disk: its slice folder, depth file, slice count and,
    when the data has one and it is asked for, its all-in-focus image."""
    name: str
    stack_dir: Path
    depth_path: Path
    num_slices: int
    all_in_focus_path: Path = None


def _check_folder(path, role: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{role} folder '{path}' does not exist")
    if not path.is_dir():
        raise InputError(f"{role} '{path}' is not a folder")
    return path


def _first_names(names) -> str:
    """The first three names of a list for an error message, '...' when there are more."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _images_for(names, folder: Path, what: str) -> dict:
    """``utils.images_by_stem(folder)``; InputError "<k> of <n> scenes <what>: <first names>" when some
    of ``names`` have no image there."""
    files = images_by_stem(folder, required=False)
    missing = [name for name in names if name not in files]
    if missing:
        raise InputError(f"{len(missing)} of {len(names)} scenes {what}: {_first_names(missing)}")
    return files


def with_all_in_focus(scenes, depth_root):
    """The scenes with their all-in-focus images from ``<depth_root>/../all_in_focus/<scene>.<ext>``
    (make_datasets/make_synthetic.py writes them); InputError when the folder or a file is missing."""
    folder = Path(depth_root).parent / ALL_IN_FOCUS_FOLDER
    if not folder.is_dir():
        raise InputError(f"all-in-focus images asked for, but '{folder}' does not exist (make_synthetic.py "
                         f"writes it; other data has none)")
    files = _images_for([s.name for s in scenes], folder, f"have no all-in-focus image in '{folder}'")
    return [Scene(s.name, s.stack_dir, s.depth_path, s.num_slices, files[s.name]) for s in scenes]


def find_scenes(stack_root, depth_root, min_slices: int = 2):
    """Pair every scene folder under ``stack_root`` with ``depth_root/<scene>.<ext>``.

    Returns Scenes in natural order of the scene names. InputError when a
    folder is missing, holds no scenes, a scene has fewer than ``min_slices``
    images, or a scene has no depth map (the first few are named).
    """
    stack_root = _check_folder(stack_root, "stack")
    depth_root = _check_folder(depth_root, "depth map")
    scene_dirs = sorted((p for p in stack_root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=natural_sort_key)
    if not scene_dirs:
        raise InputError(f"stack folder '{stack_root}' holds no scene folders "
                         f"(expected {STACK_FOLDER}/<scene>/<1..N>.png)")
    depth_files = _images_for([d.name for d in scene_dirs], depth_root,
                              f"in '{stack_root}' have no depth map in '{depth_root}' (expected <scene>.png)")
    scenes = []
    for scene_dir in scene_dirs:
        count = len(list_images(scene_dir))
        if count < min_slices:
            raise InputError(f"scene '{scene_dir}' has {count} image(s); a stack needs at least {min_slices}")
        scenes.append(Scene(scene_dir.name, scene_dir, depth_files[scene_dir.name], count))
    return scenes


def dataset_name(stack_root) -> str:
    """A short name for logs: the folder above ``image_stacks``, else the folder itself."""
    path = Path(stack_root).resolve()
    return path.parent.name if path.name == STACK_FOLDER and path.parent.name else path.name


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Any image -> size x size; area averaging when shrinking (no aliasing), bilinear when enlarging."""
    if image.shape[:2] == (size, size):
        return image
    shrink = image.shape[0] > size and image.shape[1] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


class FocusStackDataset(Dataset):
    """Focus stacks with continuous depth maps from one or more sources.

    sources: list of (stack_root, depth_root) pairs (the released
    ``--train_stack`` / ``--train_depth_continuous`` folders).
    Item ``k`` (or ``(k, hflip, vflip)`` or an ``Augment``, as
    GroupedBatchSampler yields) is (stack (N, S, S) float32 in [0, 1], depth
    (1, S, S) float32 in [0, 1]), with the same changes applied to every
    slice and the depth map. With ``all_in_focus`` the target is (2, S, S):
    the depth map, then the gray all-in-focus image (``with_all_in_focus``),
    changed as the slices are. With ``crop`` > 0 items are cut to crop x crop
    (at the centre unless an Augment places the window).
    ``subset_fraction`` keeps a random part of each source, chosen from ``seed``.
    ``cache`` keeps the resized images in memory (per loader worker), which
    pays off from the second epoch when decoding dominates (small sizes, CPU).
    """

    def __init__(self, sources, image_size: int, subset_fraction: float = 1.0, seed: int = 0,
                 cache: bool = False, crop: int = 0, all_in_focus: bool = False):
        if not 0 < subset_fraction <= 1:
            raise InputError(f"subset fraction must be in (0, 1], got {subset_fraction}")
        if not 0 <= crop <= image_size:
            raise InputError(f"crop size must be between 0 and the image size {image_size}, got {crop}")
        self.image_size, self.crop = int(image_size), int(crop)
        self.scenes = []
        for k, (stack_root, depth_root) in enumerate(sources):
            scenes = find_scenes(stack_root, depth_root)
            if all_in_focus:
                scenes = with_all_in_focus(scenes, depth_root)
            if subset_fraction < 1:
                keep = max(1, round(len(scenes) * subset_fraction))
                chosen = np.random.default_rng([seed, k]).choice(len(scenes), keep, replace=False)
                scenes = [scenes[i] for i in sorted(chosen)]
            self.scenes += scenes
        self.cache = {} if cache else None

    @property
    def num_slices(self):
        """Slice count N of every item, for grouping batches by length."""
        return [scene.num_slices for scene in self.scenes]

    def __len__(self):
        return len(self.scenes)

    def _load(self, index: int):
        """Resized images of one scene: (N gray float32 SxS, depth float32 SxS, all-in-focus gray
        float32 SxS or None), all in [0, 1]."""
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        scene, size = self.scenes[index], self.image_size
        images, _ = read_stack(scene.stack_dir)
        if len(images) != scene.num_slices:
            raise InputError(f"scene '{scene.stack_dir}' changed while training: {len(images)} slices "
                             f"instead of {scene.num_slices}")
        # Resizing the integer image first keeps the gray conversion and the cache small.
        stack = np.stack([to_gray_float(_resize(image, size)) for image in images])  # (N, S, S)
        depth = self._read_beside(scene.depth_path, "depth map", scene, images[0].shape)   # (S, S)
        sharp = None
        if scene.all_in_focus_path is not None:
            sharp = self._read_beside(scene.all_in_focus_path, "all-in-focus image", scene, images[0].shape)
        if self.cache is not None:
            self.cache[index] = (stack, depth, sharp)
        return stack, depth, sharp

    def _read_beside(self, path, role: str, scene: Scene, slice_shape) -> np.ndarray:
        """An image that must match the scene's slices in size, as gray float32 S x S in [0, 1]."""
        image = read_image(path)
        if image.shape[:2] != slice_shape[:2]:
            raise InputError(f"{role} '{path}' is {image.shape[1]}x{image.shape[0]} but the slices of "
                             f"'{scene.stack_dir}' are {slice_shape[1]}x{slice_shape[0]}")
        return to_gray_float(_resize(image, self.image_size))

    def __getitem__(self, key):
        key = Augment(int(key)) if isinstance(key, (int, np.integer)) else Augment(*key)
        stack, depth, sharp = self._load(key.index)
        n = len(stack)
        stack = torch.from_numpy(stack)                 # (N, S, S)
        if sharp is not None:                           # changed as one more slice, split off at the end
            stack = torch.cat((stack, torch.from_numpy(sharp)[None]))
        depth = torch.from_numpy(depth)[None]           # (1, S, S)
        out = self.crop or self.image_size
        window = max(2, min(self.image_size, round(out / key.zoom)))
        if window < self.image_size:
            room = self.image_size - window + 1
            y, x = min(int(key.top * room), room - 1), min(int(key.left * room), room - 1)
            stack, depth = (t[:, y:y + window, x:x + window] for t in (stack, depth))
        if window != out:
            # Depth by nearest neighbour: blending across a depth edge would invent depths.
            stack = F.interpolate(stack[None], size=(out, out), mode="bilinear", align_corners=False)[0]
            depth = F.interpolate(depth[None], size=(out, out), mode="nearest")[0]
        dims = ([2] if key.hflip else []) + ([1] if key.vflip else [])
        if dims:
            stack, depth = stack.flip(dims), depth.flip(dims)
        if key.transpose:
            stack, depth = stack.transpose(1, 2), depth.transpose(1, 2)
        if key.contrast != 1.0:
            mean = stack[:n].mean()
            stack = (stack - mean) * key.contrast + mean
        if sharp is not None:
            stack, depth = stack[:n], torch.cat((depth, stack[n:]))
        return stack.contiguous(), depth.contiguous()


class GroupedBatchSampler(Sampler):
    """Batches that hold stacks of one length only, sharded across processes.

    num_slices: N of every item. Each epoch (``set_epoch``) the items of each
    length are shuffled with a generator seeded by (seed, epoch), cut into
    batches of ``batch_size`` (the last of a length may be smaller unless
    ``drop_last``), and the batches of all lengths are shuffled together.
    With ``augment`` every item comes as (index, hflip, vflip) with the flips
    drawn from the same generator. ``rotate`` (a random transpose, which
    with the flips gives all 8 rotations and mirrors), ``crop`` (a random
    window), ``zoom`` (half of the items enlarged by a factor drawn
    uniformly from [1, zoom]) and ``contrast`` (half of the items with their
    contrast scaled by a factor drawn log-uniformly from [contrast, 1]) make
    it an ``Augment``, drawn from a second generator so that the flips stay
    those of the released stream.

    Sharding (DDP): rank r takes batches r, r + R, r + 2R, ... With
    ``pad=True`` (training) the batch list is first repeated up to a multiple
    of R so that every process runs the same number of steps; with
    ``pad=False`` (validation) no batch is seen twice.
    """

    def __init__(self, num_slices, batch_size: int, shuffle: bool = True, augment: bool = False,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0, drop_last: bool = False,
                 pad: bool = True, rotate: bool = False, crop: bool = False, zoom: float = 1.0,
                 contrast: float = 1.0):
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        if zoom < 1 or not 0 < contrast <= 1:
            raise InputError(f"zoom must be >= 1 and contrast in (0, 1], got {zoom} and {contrast}")
        self.num_slices = list(num_slices)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.drop_last, self.pad = drop_last, pad
        self.rotate, self.crop, self.zoom, self.contrast = rotate, crop, zoom, contrast
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _all_batches(self, rng, extra_rng):
        groups = {}
        for index, n in enumerate(self.num_slices):
            groups.setdefault(n, []).append(index)
        batches = []
        for n in sorted(groups):
            indices = np.array(groups[n])
            if self.shuffle:
                indices = rng.permutation(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch.tolist())
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.augment:
            batches = [[(i, bool(h), bool(v)) for i, (h, v) in zip(b, rng.random((len(b), 2)) < 0.5)]
                       for b in batches]
            if self.rotate or self.crop or self.zoom > 1 or self.contrast < 1:
                batches = [[self._augment(key, draw) for key, draw in zip(b, extra_rng.random((len(b), 7)))]
                           for b in batches]
        return batches

    def _augment(self, key, draw) -> Augment:
        turn, top, left, zoom_on, zoom_u, contrast_on, contrast_u = draw
        zoom = 1 + zoom_u * (self.zoom - 1) if zoom_on < 0.5 else 1.0
        contrast = float(np.exp(contrast_u * np.log(self.contrast))) if contrast_on < 0.5 else 1.0
        return Augment(key[0], key[1], key[2], bool(self.rotate and turn < 0.5), float(top), float(left),
                       float(zoom), contrast)

    def _shard(self, batches):
        if self.pad and batches and len(batches) % self.num_replicas:
            total = math.ceil(len(batches) / self.num_replicas) * self.num_replicas
            batches = (batches * math.ceil(total / len(batches)))[:total]
        return batches[self.rank::self.num_replicas]

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        extra_rng = np.random.default_rng([self.seed, self.epoch, 1])
        return iter(self._shard(self._all_batches(rng, extra_rng)))

    def __len__(self):
        return len(self._shard(self._all_batches(np.random.default_rng(0), np.random.default_rng(1))))
