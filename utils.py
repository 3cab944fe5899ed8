"""Shared image I/O and pre/post-processing: the one home for each helper.

Everything a script reads or writes goes through here: natural sorting,
reading 8/16-bit images in every common format and camera RAW files, stacks
from a folder, a multi-page TIFF or a video, gray conversion, resizing to a
multiple of 32 and back, the depth colormap, atomic writes (with the
reference slice's EXIF and ICC profile), and the device choice.
"""
import io
import os
import re
import secrets
import struct
import sys
import tempfile
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from cli import InputError, run_cli  # noqa: F401  (defined torch-free in cli.py; imported from here)
from options import OUTPUT_FORMATS, TIFF_COMPRESSIONS

PLAIN_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
# Camera RAW formats LibRaw (through rawpy) develops.
RAW_EXTENSIONS = (".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2",
                  ".pef", ".srw", ".x3f", ".3fr", ".fff", ".iiq", ".erf", ".kdc", ".dcr", ".mrw", ".mos", ".rwl")
IMAGE_EXTENSIONS = PLAIN_IMAGE_EXTENSIONS + RAW_EXTENSIONS
TIFF_EXTENSIONS = (".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")
SIZE_MULTIPLE = 32

# Keep 8/16-bit depth and gray/colour, drop alpha, honour EXIF orientation.
_READ_FLAGS = cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH


# ----------------------------------------------------------------------------- naming and listing

def natural_sort_key(name):
    """Sort key that orders embedded numbers by value: '2.png' before '10.png'."""
    parts = re.split(r"(\d+)", os.path.basename(os.fspath(name)))
    return [(0, int(p), p) if p.isdigit() else (1, 0, p.lower()) for p in parts]


def is_image_file(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_raw_file(path) -> bool:
    return Path(path).suffix.lower() in RAW_EXTENSIONS


def list_images(folder):
    """Image files directly in ``folder``, in natural order; InputError if none."""
    folder = Path(folder)
    if not folder.exists():
        if os.path.islink(folder):
            raise InputError(f"input folder '{folder}' is a broken symbolic link or a link loop")
        raise InputError(f"input folder '{folder}' does not exist")
    if not folder.is_dir():
        raise InputError(f"'{folder}' is not a folder")
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise InputError(f"cannot list folder '{folder}': {exc.strerror or exc}") from None
    files = [p for p in entries if p.is_file() and is_image_file(p) and not p.name.startswith(".")]
    if not files:
        raise InputError(f"folder '{folder}' holds no images ({', '.join(PLAIN_IMAGE_EXTENSIONS)}, "
                         f"or camera RAW: {', '.join(RAW_EXTENSIONS[:6])}, ...)")
    return sorted(files, key=natural_sort_key)


def images_by_stem(folder, required: bool = True) -> dict:
    """{file name without extension: path} of the images directly in ``folder``, in natural order.

    Two images of one name ('a.png' and 'a.jpg') are an InputError naming both: which one is
    meant is the user's to say, not a rule's to guess. ``required``: a missing or empty folder is
    an InputError too (``list_images``); without it, {}.
    """
    folder = Path(folder)
    if not required and not (folder.is_dir() and any(is_image_file(p) for p in folder.iterdir())):
        return {}
    found = {}
    for path in list_images(folder):
        if path.stem in found:
            raise InputError(f"'{found[path.stem].name}' and '{path.name}' in '{folder}' share the name "
                             f"'{path.stem}'; keep one")
        found[path.stem] = path
    return found


# ----------------------------------------------------------------------------- reading

def _read_bytes(path, what="image") -> np.ndarray:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"cannot read '{path}': {exc.strerror or exc}") from None
    if not data:
        raise InputError(f"{what} '{path}' is empty (0 bytes)")
    return np.frombuffer(data, dtype=np.uint8)


def _normalise_pixels(image, path):
    """uint8 / uint16, HxW or HxWx3 (BGR); InputError for anything else."""
    if image is None or image.size == 0:
        raise InputError(f"'{path}' is not a readable image (corrupt, truncated or unsupported format)")
    if image.dtype not in (np.uint8, np.uint16):
        raise InputError(f"image '{path}' has {image.dtype} pixels; only 8-bit and 16-bit images are supported")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    elif image.ndim == 3 and image.shape[2] == 2:  # gray + alpha
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise InputError(f"image '{path}' has an unsupported shape {image.shape}")
    return np.ascontiguousarray(image)


# One redirection of file descriptor 2 for all threads: each thread's own dup2 and restore would
# interleave and leave descriptor 2 pointing at a closed file (images are decoded in threads).
_CAPTURE_LOCK = threading.Lock()
_capture = {"users": 0, "saved": None, "sink": None}


@contextmanager
def _native_stderr_captured():
    """Collect what C libraries write to file descriptor 2 while the block runs.

    libpng, libtiff and OpenCV print their own lines ("libpng error: ...") when
    they decode a corrupt file; the user should see the one InputError instead.
    Yields a list that holds the captured text (a str) once the block ends:
    what was written while it ran (from any thread: the redirection is shared).
    When descriptor 2 cannot be duplicated nothing is captured.
    """
    captured = []
    with _CAPTURE_LOCK:
        if not _capture["users"]:
            try:
                sys.stderr.flush()
                _capture["saved"] = os.dup(2)
                _capture["sink"] = tempfile.TemporaryFile()
                os.dup2(_capture["sink"].fileno(), 2)
            except (OSError, ValueError, AttributeError):
                _capture["saved"] = _capture["sink"] = None
        _capture["users"] += 1
        sink = _capture["sink"]
        start = os.fstat(sink.fileno()).st_size if sink else 0
    try:
        yield captured
    finally:
        with _CAPTURE_LOCK:
            _capture["users"] -= 1
            if sink is not None:
                end = os.fstat(sink.fileno()).st_size
                captured.append(os.pread(sink.fileno(), end - start, start).decode("utf-8", "replace"))
            if not _capture["users"] and _capture["saved"] is not None:
                os.dup2(_capture["saved"], 2)
                os.close(_capture["saved"])
                _capture["sink"].close()
                _capture["saved"] = _capture["sink"] = None


def read_image(path) -> np.ndarray:
    """Read one image as uint8 or uint16, HxW (gray) or HxWx3 (BGR); alpha dropped.

    A camera RAW file (by extension) is developed by ``develop_raw`` with its own white balance."""
    if is_raw_file(path):
        return develop_raw(path)[0]
    buf = _read_bytes(path)
    try:
        with _native_stderr_captured():
            image = cv2.imdecode(buf, _READ_FLAGS)
    except cv2.error:
        image = None
    return _normalise_pixels(image, path)


def read_tiff_pages(path):
    """All pages of a (multi-page) TIFF, each as read_image returns."""
    buf = _read_bytes(path)
    try:
        with _native_stderr_captured() as native:
            ok, pages = cv2.imdecodemulti(buf, _READ_FLAGS)
    except cv2.error:
        ok, pages = False, []
    # A truncated multi-page TIFF decodes its first pages and only *prints* that
    # the rest is missing: such a file must not pass as a shorter stack.
    if not ok or not pages or "TIFF_Error" in "".join(native):
        raise InputError(f"'{path}' is not a readable TIFF (corrupt, truncated or unsupported)")
    return [_normalise_pixels(p, f"{path} page {k + 1}") for k, p in enumerate(pages)]


# Development of camera RAW files: no auto-brightening (each slice would get its
# own), 16 bits, LibRaw's default sRGB output and BT.709 gamma.
RAW_POSTPROCESS = dict(no_auto_bright=True, output_bps=16)


def _import_rawpy():
    """rawpy, imported only when a RAW file is read so that plain fusion starts without it."""
    try:
        import rawpy
    except ImportError:
        raise InputError("camera RAW files need the rawpy package (pip install rawpy)") from None
    return rawpy


def develop_raw(path, white_balance=None):
    """Develop one camera RAW file into uint16 HxWx3 BGR.

    white_balance: LibRaw multipliers (R, G, B, G2); None takes the camera's
    as-shot white balance (daylight when the file has none). Returns (image,
    the multipliers used), so that a stack's slices share its first slice's.
    """
    rawpy = _import_rawpy()
    buf = _read_bytes(path, "camera RAW file")
    try:
        with _native_stderr_captured(), rawpy.imread(io.BytesIO(buf.tobytes())) as raw:
            if white_balance is None:
                white_balance = [float(v) for v in raw.camera_whitebalance]
                if sum(white_balance[:3]) <= 0:
                    white_balance = [float(v) for v in raw.daylight_whitebalance]
                if white_balance[3] <= 0:            # "same as the first green"
                    white_balance[3] = white_balance[1]
            rgb = raw.postprocess(user_wb=list(white_balance), **RAW_POSTPROCESS)
    except (rawpy.LibRawError, rawpy.NotSupportedError, ValueError, RuntimeError) as exc:
        reason = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise InputError(f"'{path}' is not a readable camera RAW file ({reason})") from None
    return _normalise_pixels(rgb[:, :, ::-1], path), white_balance


def read_video_frames(path, every=1):
    """Frames 1, every+1, 2*every+1, ... of a video file (OpenCV), each uint8 HxWx3 BGR.

    Returns (frames, number of frames in the file)."""
    _read_bytes(path, "video")                             # missing or empty file: its own message
    frames, count = [], 0
    with _native_stderr_captured():                        # FFmpeg's own complaints stay off the terminal
        capture = cv2.VideoCapture(str(path))
        try:
            while capture.isOpened() and capture.grab():
                if count % every == 0:
                    ok, frame = capture.retrieve()
                    if not ok:
                        break
                    frames.append(_normalise_pixels(frame, f"{path} frame {count + 1}"))
                count += 1
        finally:
            capture.release()
    if not frames:
        raise InputError(f"'{path}' is not a readable video (corrupt, no frames, or a codec OpenCV cannot decode)")
    return frames, count


def check_stack(images, names, source):
    """InputError unless every slice has the same size, channels and bit depth."""
    first = images[0]
    for image, name in zip(images[1:], names[1:]):
        if image.shape[:2] != first.shape[:2]:
            raise InputError(f"stack '{source}' mixes image sizes: '{names[0]}' is "
                             f"{first.shape[1]}x{first.shape[0]} but '{name}' is {image.shape[1]}x{image.shape[0]}")
        if image.dtype != first.dtype:
            raise InputError(f"stack '{source}' mixes bit depths: '{names[0]}' is {first.dtype} "
                             f"but '{name}' is {image.dtype}")
    # Gray and colour slices may mix: promote gray ones so the colour output stays colour.
    if any(im.ndim == 3 for im in images):
        images = [im if im.ndim == 3 else cv2.cvtColor(im, cv2.COLOR_GRAY2BGR) for im in images]
    return images


def _refuse_mixed_raw(files, source):
    raw = [f for f in files if is_raw_file(f)]
    if raw and len(raw) < len(files):
        other = next(f for f in files if not is_raw_file(f))
        raise InputError(f"stack '{source}' mixes camera RAW files ('{raw[0].name}') with other images "
                         f"('{other.name}'); RAW slices are developed together: put only one kind in the folder")


# Threads for image decoding, encoding and resampling: OpenCV releases the GIL in them.
IO_THREADS = min(4, os.cpu_count() or 1)


def parallel_map(fn, items, workers: int = IO_THREADS) -> list:
    """[fn(item) for item in items], run on ``workers`` threads; results in order, the first error raised."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _read_folder(folder, every):
    """Slices 1, every+1, ... of a folder (multi-page TIFFs count page by page): (images, names, total)."""
    files = list_images(folder)
    _refuse_mixed_raw(files, folder)
    if not any(f.suffix.lower() in TIFF_EXTENSIONS or is_raw_file(f) for f in files):   # one image a file
        kept = files[::every]
        return parallel_map(read_image, kept), [f.name for f in kept], len(files)
    images, names, count, white_balance = [], [], 0, None
    for f in files:
        if f.suffix.lower() in TIFF_EXTENSIONS:
            pages = read_tiff_pages(f)
            for k, page in enumerate(pages):
                if count % every == 0:
                    images.append(page)
                    names.append(f.name if len(pages) == 1 else f"{f.name}[{k + 1}]")
                count += 1
            continue
        if count % every == 0:
            if is_raw_file(f):                 # one development for the stack: the first slice's white balance
                image, white_balance = develop_raw(f, white_balance)
            else:
                image = read_image(f)
            images.append(image)
            names.append(f.name)
        count += 1
    return images, names, count


def read_stack(source, min_slices=2, every=1):
    """Read a focus stack from a folder of images, a multi-page TIFF or a video file.

    Returns (images, names): slices in natural file-name order (page or frame
    order), each uint8 or uint16, all of one size and bit depth. A folder of
    camera RAW files is developed with its first slice's white balance.
    every: keep slices 1, every+1, 2*every+1, ... (a video skips the others
    while decoding).
    """
    source = Path(source)
    if every < 1:
        raise InputError(f"--every must be 1 or more, not {every}")
    if source.is_file():
        suffix = source.suffix.lower()
        if suffix in VIDEO_EXTENSIONS:
            images, total = read_video_frames(source, every)
            names = [f"{source.name}[frame {k * every + 1}]" for k in range(len(images))]
        elif suffix in TIFF_EXTENSIONS:
            pages = read_tiff_pages(source)
            images, total = pages[::every], len(pages)
            names = [f"{source.name}[{k + 1}]" for k in range(0, total, every)]
        else:
            raise InputError(f"'{source}' is a single image; give a folder of slices, a multi-page TIFF "
                             f"or a video ({', '.join(VIDEO_EXTENSIONS)})")
    else:
        images, names, total = _read_folder(source, every)
    if len(images) < min_slices:
        kept = f" (every {every}th of {total} kept)" if every > 1 else ""
        raise InputError(f"stack '{source}' has {len(images)} image(s){kept}; "
                         f"at least {min_slices} are needed to fuse")
    return check_stack(images, names, source), names


def dtype_max(dtype) -> float:
    return float(np.iinfo(dtype).max)


def to_gray(image) -> np.ndarray:
    """uint8/uint16 HxW or HxWx3 BGR -> gray HxW in the same integer type (OpenCV BGR->GRAY)."""
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def to_gray_float(image) -> np.ndarray:
    """uint8/uint16 HxW or HxWx3 BGR -> float32 HxW in [0, 1].

    Colour goes through OpenCV's BGR->GRAY in the image's own integer type
    first, as the released pipeline does for 8-bit images.
    """
    return to_gray(image).astype(np.float32) / dtype_max(image.dtype)


def stack_to_tensor(images) -> torch.Tensor:
    """List of N slices -> (1, N, H, W) float32 gray tensor in [0, 1]."""
    return torch.from_numpy(np.stack([to_gray_float(im) for im in images]))[None]


# ----------------------------------------------------------------------------- sizes

def next_multiple(value: int, multiple: int = SIZE_MULTIPLE) -> int:
    return -(-value // multiple) * multiple


def resize_to_multiple(x: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """(B, N, H, W) -> (B, N, H', W') with H', W' the next multiples of ``multiple``.

    Bilinear, align_corners=False, as released. Unchanged when already a multiple.
    """
    h, w = x.shape[-2:]
    size = (next_multiple(h, multiple), next_multiple(w, multiple))
    if size == (h, w):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resize_back(image: np.ndarray, size, nearest=False) -> np.ndarray:
    """Resize an HxW map to size (H, W) with OpenCV: bilinear, or nearest for indices."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interpolation)


# ----------------------------------------------------------------------------- pictures

def _rainbow_lut() -> np.ndarray:
    """256-entry BGR uint8 table of the 'rainbow' map (violet -> red).

    Channels as functions of x in [0, 1]: red |2x - 1/2|, green sin(pi x),
    blue cos(pi x / 2), clipped to [0, 1].
    """
    x = np.linspace(0.0, 1.0, 256)
    red = np.clip(np.abs(2 * x - 0.5), 0, 1)
    green = np.clip(np.sin(np.pi * x), 0, 1)
    blue = np.clip(np.cos(np.pi * x / 2), 0, 1)
    return (np.stack([blue, green, red], axis=1) * 255).astype(np.uint8)


_RAINBOW = _rainbow_lut()


def depth_colormap(depth: np.ndarray) -> np.ndarray:
    """float HxW depth in [0, 1] -> HxWx3 uint8 BGR picture (violet near 0, red near 1)."""
    index = np.clip(np.nan_to_num(depth) * 256, 0, 255).astype(np.uint8)      # floor, as released
    # OpenCV's table look-up, 5x faster than indexing; it sees any array as an image, hence the reshape
    return cv2.applyColorMap(index.reshape(index.shape[0], -1), _RAINBOW[:, None]).reshape(index.shape + (3,))


_FONT = cv2.FONT_HERSHEY_SIMPLEX      # the colour scale's labels


def colour_scale(picture: np.ndarray, num_slices: int, reverse: bool = False) -> np.ndarray:
    """``depth_colormap``'s picture with its colour scale in a white strip on the right.

    The strip holds the palette from depth 0 (top) to 1 (bottom) and slice
    numbers at their depths (``scale_labels``); the depth-0 end is marked
    near and the other far, as the stack's order says (slice 1 is the
    nearest unless ``reverse``). The map's own pixels stay as they are; a
    picture too short for the scale is padded with white below.
    """
    h, w = picture.shape[:2]
    text = max(10, h // 30)                                   # label height (px), grows with the picture
    scale, thickness = cv2.getFontScaleFromHeight(_FONT, text), max(1, round(text / 12))
    height = max(h, 8 * text)
    top, bottom = text, height - 1 - text                     # the bar's first and last row (depth 0 and 1)
    labels = scale_labels(num_slices, reverse, top, bottom, spacing=2 * text)
    label_width = max(cv2.getTextSize(label, _FONT, scale, thickness)[0][0] for _, label in labels)
    bar = w + text // 2                                       # the bar's first column; it is `text` wide
    out = np.full((height, bar + text + text // 2 + label_width + text // 2, 3), 255, np.uint8)
    out[:h, :w] = picture
    rows = np.arange(top, bottom + 1)
    out[top:bottom + 1, bar:bar + text] = depth_colormap((rows - top) / (bottom - top))[:, None]
    for row, label in labels:
        cv2.line(out, (bar + text, row), (bar + text + text // 3, row), (0, 0, 0), thickness)
        cv2.putText(out, label, (bar + text + text // 2, row + text // 2), _FONT, scale, (0, 0, 0), thickness,
                    cv2.LINE_AA)
    return out


def scale_labels(num_slices: int, reverse: bool, top: int, bottom: int, spacing: int) -> list:
    """The labels of ``colour_scale``: [(row, text)] with slice numbers at their depths, from row
    ``top`` (depth 0) to ``bottom`` (depth 1), every k-th slice for the smallest k of 1, 2, 5, 10,
    20, ... that keeps labels ``spacing`` rows apart, and both ends ('1 near' ... '8 far'; with
    ``reverse``, '8 near' ... '1 far')."""
    last = max(num_slices - 1, 1)                             # depth steps between the two ends
    step = next(k * 10 ** e for e in range(12) for k in (1, 2, 5) if (bottom - top) * k * 10 ** e >= spacing * last)
    row = [top + round((bottom - top) * j / last) for j in range(num_slices)]
    shown = [j for j in range(0, num_slices, step) if bottom - row[j] >= spacing] + [num_slices - 1]

    def name(j):     # slice number of the j-th depth step from the near end
        number = num_slices - j if reverse else j + 1
        return f"{number} near" if j == 0 else f"{number} far" if j == num_slices - 1 else str(number)
    return [(row[j], name(j)) for j in shown]


def to_integer_image(values: np.ndarray, dtype, truncate: bool = False) -> np.ndarray:
    """float in [0, 1] -> uint8 / uint16: x its largest value, rounded to the nearest level
    (``truncate``: cut down, as the released script writes its pictures)."""
    scaled = np.clip(values, 0, 1) * dtype_max(dtype)
    return (scaled if truncate else np.rint(scaled)).astype(dtype)


def index_picture(index: np.ndarray, num_slices: int, truncate: bool = False) -> np.ndarray:
    """Slice index HxW -> uint8 picture index / (N - 1) x 255, rounded (``truncate``: cut down,
    as released); zeros when N = 1."""
    scaled = index.astype(np.float64) * (255.0 / max(num_slices - 1, 1))
    return (scaled if truncate else np.rint(scaled)).astype(np.uint8)


# ----------------------------------------------------------------------------- writing

def write_bytes(path, data: bytes):
    """Write to a temporary file in the same folder, then rename over ``path``.

    A reader never sees a partial file, and a failure (disk full, no
    permission, an interrupt) leaves no temporary file behind. OS errors
    become an InputError naming the file. The file gets the mode open()
    gives (0666 less the umask).
    """
    path = Path(path)
    # Named before it exists: an interrupt arriving just after the file is
    # created (inside mkstemp, say) could otherwise leave it behind unnamed.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.part"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if not isinstance(exc, FileExistsError):   # never remove a file this call did not create
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError):
            raise InputError(f"cannot write '{path}': {exc.strerror or exc}") from None
        raise


# ----------------------------------------------------------------------------- metadata

@dataclass(frozen=True)
class ImageMetadata:
    """What a fused picture takes over from its reference slice.

    exif: TIFF-structured EXIF bytes (from 'II*\\0' or 'MM\\0*'), holding only
    the camera, lens, capture and GPS tags (``camera_exif``); icc_profile: the
    slice's ICC profile. None when the slice has none."""
    exif: Optional[bytes] = None
    icc_profile: Optional[bytes] = None


# Tags that stay true of a fused picture: who and what took it, with which lens
# and settings, when and where. Orientation is left out on purpose: the pixels
# are read upright already, and pixel-layout tags describe the slice's file.
IFD0_TAGS = (270, 271, 272, 306, 315, 33432)         # description, make, model, date, artist, copyright
EXIF_IFD, GPS_IFD, ICC_TAG = 0x8769, 0x8825, 34675
EXIF_TAGS = (33434, 33437, 34850, 34855, 34864, 34866, 36864, 36867, 36868, 36880, 36881, 36882, 37377, 37378,
             37380, 37381, 37382, 37383, 37384, 37385, 37386, 37520, 37521, 37522, 41986, 41987, 41988, 41989,
             41990, 42032, 42033, 42034, 42035, 42036, 42037)
TIFF_HEADERS = (b"II*\0", b"MM\0*")


def camera_exif(source) -> Optional[bytes]:
    """The IFD0_TAGS, EXIF_TAGS and GPS tags of a Pillow ``Image.Exif`` as EXIF bytes (None if none).

    Capture tags are taken from the EXIF sub-IFD, or from IFD0 where DNG
    files keep them."""
    from PIL import Image
    kept = Image.Exif()
    for tag in IFD0_TAGS:
        if tag in source:
            kept[tag] = source[tag]
    capture = source.get_ifd(EXIF_IFD)
    for tag in EXIF_TAGS:
        value = capture.get(tag, source.get(tag))
        if value is not None:
            kept.get_ifd(EXIF_IFD)[tag] = value
    gps = source.get_ifd(GPS_IFD)
    if gps:
        kept.get_ifd(GPS_IFD).update(gps)
    if not len(kept) and not kept.get_ifd(EXIF_IFD) and not gps:
        return None
    return kept.tobytes()[6:]                              # without the 'Exif\0\0' of a JPEG segment


def read_metadata(path) -> ImageMetadata:
    """EXIF (``camera_exif``) and ICC profile of one image or TIFF-based RAW file (DNG, CR2, NEF,
    ARW, ...); empty when the file has none or its tags cannot be parsed."""
    try:
        from PIL import Image
        with open(path, "rb") as f:
            data = f.read()
        with warnings.catch_warnings():                    # Pillow warns about the tags it gives up on
            warnings.simplefilter("ignore")
            if data[:4] in TIFF_HEADERS:                   # TIFF and TIFF-based RAW: the tags, not the pixels
                exif = Image.Exif()
                exif.load(data)
                icc = exif.get(ICC_TAG)
            else:
                with Image.open(io.BytesIO(data)) as image:
                    exif, icc = image.getexif(), image.info.get("icc_profile")
            return ImageMetadata(camera_exif(exif), bytes(icc) if icc else None)
    except Exception:   # metadata is a courtesy: a slice whose pixels decode never fails on its tags
        return ImageMetadata()


def read_stack_metadata(source) -> ImageMetadata:
    """The metadata of a stack's reference slice (its first file; a multi-page TIFF's own tags)."""
    source = Path(source)
    if source.is_file():
        return read_metadata(source) if source.suffix.lower() in TIFF_EXTENSIONS else ImageMetadata()
    return read_metadata(list_images(source)[0])


def _icc_fits(icc, image) -> bool:
    """An ICC profile describes RGB or gray pixels (header bytes 16-19); it must match the image's."""
    return bool(icc) and icc[16:20] == (b"RGB " if image.ndim == 3 else b"GRAY")


def _jpeg_with_metadata(data: bytes, exif, icc) -> bytes:
    """APP1 (EXIF) and APP2 (ICC, in chunks) segments after SOI and the JFIF APP0 segment."""
    at = 2
    if data[2:4] == b"\xff\xe0":
        at = 4 + struct.unpack(">H", data[4:6])[0]
    segments = b""
    if exif and len(exif) + 8 <= 0xFFFF:
        segments += b"\xff\xe1" + struct.pack(">H", len(exif) + 8) + b"Exif\0\0" + exif
    if icc:
        chunks = [icc[k:k + 65519] for k in range(0, len(icc), 65519)]
        for number, chunk in enumerate(chunks, start=1):
            segments += (b"\xff\xe2" + struct.pack(">H", len(chunk) + 16) + b"ICC_PROFILE\0"
                         + bytes((number, len(chunks))) + chunk)
    return data[:at] + segments + data[at:]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_with_metadata(data: bytes, exif, icc) -> bytes:
    """iCCP and eXIf chunks right after IHDR (both must come before the image data)."""
    at = 8 + 12 + struct.unpack(">I", data[8:12])[0]
    chunks = b""
    if icc:
        chunks += _png_chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(icc))
    if exif:
        chunks += _png_chunk(b"eXIf", exif)
    return data[:at] + chunks + data[at:]


def _tiff_with_metadata(data: bytes, exif, icc) -> bytes:
    """A new first IFD appended to the file: the encoder's entries as they are (their
    offsets stay valid) plus the EXIF tags and the ICC profile."""
    from PIL import Image, TiffImagePlugin
    order = "<" if data[:2] == b"II" else ">"
    magic, ifd_at = struct.unpack(order + "HI", data[2:8])
    if magic != 42:                                        # BigTIFF: pixels only
        return data
    count = struct.unpack(order + "H", data[ifd_at:ifd_at + 2])[0]
    entries = {struct.unpack(order + "H", data[ifd_at + 2 + 12 * k:ifd_at + 4 + 12 * k])[0]:
               data[ifd_at + 2 + 12 * k:ifd_at + 14 + 12 * k] for k in range(count)}
    next_ifd = data[ifd_at + 2 + 12 * count:ifd_at + 6 + 12 * count]
    out = bytearray(data)

    def append(blob: bytes) -> int:
        out.extend(b"\0" * (len(out) % 2))                 # TIFF offsets are even
        out.extend(blob)
        return len(out) - len(blob)

    def add(tag, kind, count_, payload):
        field = payload.ljust(4, b"\0") if len(payload) <= 4 else struct.pack(order + "I", append(payload))
        entries[tag] = struct.pack(order + "HHI", tag, kind, count_) + field

    if icc:
        add(ICC_TAG, 7, len(icc), icc)                     # UNDEFINED
    if exif:
        source = Image.Exif()
        source.load(exif)
        for tag in IFD0_TAGS:
            if isinstance(source.get(tag), str):
                text = source[tag].encode("utf-8", "replace") + b"\0"
                add(tag, 2, len(text), text)               # ASCII
        for pointer in (EXIF_IFD, GPS_IFD):
            tags = source.get_ifd(pointer)
            if tags:
                ifd = TiffImagePlugin.ImageFileDirectory_v2(data[:8], group=pointer)
                for tag, value in tags.items():
                    ifd[tag] = value
                out.extend(b"\0" * (len(out) % 2))
                add(pointer, 4, 1, struct.pack(order + "I", append(ifd.tobytes(len(out)))))
    table = struct.pack(order + "H", len(entries)) + b"".join(entries[t] for t in sorted(entries)) + next_ifd
    out[4:8] = struct.pack(order + "I", append(table))
    return bytes(out)


# ----------------------------------------------------------------------------- writing

EIGHT_BIT_EXTENSIONS = (".jpg", ".jpeg", ".bmp", ".webp")      # formats that cannot hold 16 bits


def encoder_params(suffix, jpeg_quality=None, tiff_compression=None) -> list:
    """OpenCV encoder flags for a file of this suffix (None: OpenCV's default, JPEG 95, TIFF LZW)."""
    suffix = suffix.lower()
    if suffix in (".jpg", ".jpeg") and jpeg_quality is not None:
        return [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]
    if suffix in TIFF_EXTENSIONS and tiff_compression is not None:
        return [cv2.IMWRITE_TIFF_COMPRESSION, TIFF_COMPRESSIONS[tiff_compression]]
    return []


def output_format_from_args(args):
    """(suffix of the fused images, keyword arguments for ``encoder_params``); InputError for a
    quality or compression flag that would have no effect."""
    if args.jpeg_quality is not None and args.output_format != "jpeg":
        raise InputError("--jpeg_quality applies to --output_format jpeg only")
    if args.jpeg_quality is not None and not 1 <= args.jpeg_quality <= 100:
        raise InputError(f"--jpeg_quality must be between 1 and 100, not {args.jpeg_quality}")
    if args.tiff_compression is not None and args.output_format != "tiff":
        raise InputError("--tiff_compression applies to --output_format tiff only")
    return OUTPUT_FORMATS[args.output_format], dict(jpeg_quality=args.jpeg_quality,
                                                    tiff_compression=args.tiff_compression)


def write_image(path, image: np.ndarray, params=(), metadata: Optional[ImageMetadata] = None):
    """Write an image atomically; the format follows the extension (8 or 16 bit).

    ``params`` are OpenCV encoder flags, e.g. (cv2.IMWRITE_JPEG_QUALITY, 95).
    A 16-bit image bound for an 8-bit-only format (JPEG, BMP, WebP) is scaled
    to 8 bits (OpenCV would clip it). ``metadata`` (EXIF, ICC profile) goes
    into JPEG, PNG and TIFF files; the ICC profile only onto pixels of its
    colour space (RGB or gray).
    """
    path = Path(path)
    suffix = (path.suffix or ".png").lower()
    if image.dtype == np.uint16 and suffix in EIGHT_BIT_EXTENSIONS:
        image = np.rint(image / 257.0).astype(np.uint8)
    try:
        ok, encoded = cv2.imencode(suffix, image, list(params))
    except cv2.error:
        ok = False
    if not ok:
        raise InputError(f"cannot encode a {image.dtype} image of shape {image.shape} as '{path.suffix}' for '{path}'")
    data = encoded.tobytes()
    if metadata is not None:
        icc = metadata.icc_profile if _icc_fits(metadata.icc_profile, image) else None
        add = {".jpg": _jpeg_with_metadata, ".jpeg": _jpeg_with_metadata, ".png": _png_with_metadata,
               ".tif": _tiff_with_metadata, ".tiff": _tiff_with_metadata}.get(suffix)
        if add and (metadata.exif or icc):
            data = add(data, metadata.exif, icc)
    write_bytes(path, data)


def write_npy(path, array: np.ndarray):
    """Write a .npy file atomically."""
    import io
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes(path, buffer.getvalue())


def write_text(path, text: str):
    """Write a UTF-8 text file (a table, a CSV) atomically."""
    write_bytes(path, text.encode("utf-8"))


def ensure_output_dir(path) -> Path:
    """Create the output folder, or raise InputError saying why it cannot be used."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder '{path}': {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"output folder '{path}' is not writable")
    return path


@contextmanager
def output_folder(path):
    """``ensure_output_dir`` for the block: the folder (and the parents it needed) is made on entry,
    so that an unusable one stops the run before its work, and removed again when the block ends
    in an error or an interrupt having written nothing into it."""
    path = Path(path)
    made = [p for p in (path, *path.parents) if not p.exists()]      # deepest first
    try:
        yield ensure_output_dir(path)
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()
            except FileNotFoundError:    # the failure came before it was made
                continue
            except OSError:              # not empty: something was written, so it stays
                break
        raise


def refuse_output_into_input(output, *inputs, what="output folder"):
    """InputError when ``output`` is one of the ``inputs`` folders (after resolving
    links and '..'): writing there would overwrite input files or mix outputs
    into the input on the next run."""
    target = Path(output).resolve()
    for source in inputs:
        if source is not None and Path(source).resolve() == target:
            raise InputError(f"the {what} '{output}' is the input folder '{source}'; "
                             f"choose another folder so that no input file is overwritten")


# ----------------------------------------------------------------------------- device

def select_device(name=None) -> torch.device:
    """Explicit device if given, else cuda, then mps, then cpu."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise InputError(f"unknown device '{name}' (try cpu, cuda, cuda:1 or mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device '{name}' asked for, but CUDA is not available here")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise InputError(f"device '{name}' asked for, but MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
