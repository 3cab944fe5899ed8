"""Shared image I/O and pre/post-processing: the one home for each helper.

Everything a script reads or writes goes through here: natural sorting,
reading 8/16-bit images in every common format, stacks from a folder or a
multi-page TIFF, gray conversion, resizing to a multiple of 32 and back, the
depth colormap, atomic writes, and the device choice.
"""
import os
import re
import secrets
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
TIFF_EXTENSIONS = (".tif", ".tiff")
SIZE_MULTIPLE = 32

# Keep 8/16-bit depth and gray/colour, drop alpha, honour EXIF orientation.
_READ_FLAGS = cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH


class InputError(Exception):
    """Bad user input (missing folder, unreadable image, mixed sizes, ...).

    The message is one sentence meant for the user; scripts print it and exit
    non-zero instead of showing a traceback.
    """


# ----------------------------------------------------------------------------- naming and listing

def natural_sort_key(name):
    """Sort key that orders embedded numbers by value: '2.png' before '10.png'."""
    parts = re.split(r"(\d+)", os.path.basename(os.fspath(name)))
    return [(0, int(p), p) if p.isdigit() else (1, 0, p.lower()) for p in parts]


def is_image_file(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


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
        raise InputError(f"folder '{folder}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(files, key=natural_sort_key)


# ----------------------------------------------------------------------------- reading

def _read_bytes(path) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"cannot read '{path}': {exc.strerror or exc}") from None
    if not data:
        raise InputError(f"image '{path}' is empty (0 bytes)")
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


@contextmanager
def _native_stderr_captured():
    """Collect what C libraries write to file descriptor 2 while the block runs.

    libpng, libtiff and OpenCV print their own lines ("libpng error: ...") when
    they decode a corrupt file; the user should see the one InputError instead.
    Yields a list that holds the captured text (a str) once the block ends.
    When descriptor 2 cannot be duplicated nothing is captured.
    """
    captured = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield captured
        return
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield captured
            finally:
                os.dup2(saved, 2)
                sink.seek(0)
                captured.append(sink.read().decode("utf-8", "replace"))
    finally:
        os.close(saved)


def read_image(path) -> np.ndarray:
    """Read one image as uint8 or uint16, HxW (gray) or HxWx3 (BGR); alpha dropped."""
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


def read_stack(source, min_slices=2):
    """Read a focus stack from a folder of images or a multi-page TIFF file.

    Returns (images, names): slices in natural file-name order (or page
    order), each uint8 or uint16, all of one size and bit depth.
    """
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() not in TIFF_EXTENSIONS:
            raise InputError(f"'{source}' is a single image; give a folder of slices or a multi-page TIFF")
        images = read_tiff_pages(source)
        names = [f"{source.name}[{k + 1}]" for k in range(len(images))]
    else:
        files = list_images(source)
        images, names = [], []
        for f in files:
            if f.suffix.lower() in TIFF_EXTENSIONS:
                pages = read_tiff_pages(f)
                images += pages
                names += [f.name] if len(pages) == 1 else [f"{f.name}[{k + 1}]" for k in range(len(pages))]
            else:
                images.append(read_image(f))
                names.append(f.name)
    if len(images) < min_slices:
        raise InputError(f"stack '{source}' has {len(images)} image(s); at least {min_slices} are needed to fuse")
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
    index = np.clip((np.nan_to_num(depth) * 256).astype(np.int64), 0, 255)
    return _RAINBOW[index]


def to_uint8(values: np.ndarray) -> np.ndarray:
    """float in [0, 1] -> uint8 by x255 and truncation, as released."""
    return (np.clip(values, 0, 1) * 255).astype(np.uint8)


def index_picture(index: np.ndarray, num_slices: int) -> np.ndarray:
    """Slice index HxW -> uint8 picture index / (N - 1) x 255 (zeros when N = 1)."""
    scale = 255.0 / max(num_slices - 1, 1)
    return (index.astype(np.float64) * scale).astype(np.uint8)


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


def write_image(path, image: np.ndarray, params=()):
    """Write an image atomically; the format follows the extension (8 or 16 bit).

    ``params`` are OpenCV encoder flags, e.g. (cv2.IMWRITE_JPEG_QUALITY, 95).
    """
    path = Path(path)
    try:
        ok, encoded = cv2.imencode(path.suffix or ".png", image, list(params))
    except cv2.error:
        ok = False
    if not ok:
        raise InputError(f"cannot encode a {image.dtype} image of shape {image.shape} as '{path.suffix}' for '{path}'")
    write_bytes(path, encoded.tobytes())


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


# ----------------------------------------------------------------------------- command line

def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _close_progress_bars():
    """Close the tqdm bars an error left open, so that the closing message gets a
    line of its own and no bar redraws itself after it."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def run_cli(main_fn, parser):
    """Parse arguments and run ``main_fn``; the project's own errors become one
    line on stderr and exit status 2, an interrupt exits 130, never a traceback."""
    args = parser.parse_args()
    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C, so temporary files are
    # removed and checkpoints stay whole instead of the process dying mid-write.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return main_fn(args)
    except InputError as exc:
        _close_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
