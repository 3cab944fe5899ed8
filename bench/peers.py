"""Classical multi-focus fusers the benchmark sets beside the network, and the OpenFocus runner.

Each fuser takes a gray stack (N, H, W) float in [0, 1], slice 0 first, and
returns (fused gray HxW float, slice index HxW int64 or None when the method
picks no slice per pixel). Settings are the published defaults unless said.

- ``argmax_laplacian``: per-pixel argmax of the Gaussian-smoothed squared
  Laplacian (the floor every learned fuser must beat).
- ``laplacian_pyramid``: Burt and Adelson's pyramid fusion: at every detail
  level the coefficient of largest magnitude, the coarsest level averaged.
- ``guided_filter_fusion``: Li, Kang and Hu, "Image fusion with guided
  filtering", IEEE TIP 2013 (GFF): two-scale split by a 31 x 31 mean filter,
  saliency = Gaussian-smoothed |Laplacian|, winner-take-all maps refined by a
  guided filter (base r=45, eps=0.3; detail r=7, eps=1e-6).
- ``dtcwt_fusion``: the dual-tree complex wavelet transform (the ``dtcwt``
  package): per coefficient the slice of largest magnitude, lowpass averaged.

``OpenFocus`` runs StackMFF-V3 (or any method of the ``openfocus`` command)
as a subprocess on slices written to a temporary folder: it lives in its own
virtual environment, since its top-level packages ``core`` and ``utils``
clash with this project's, and is never imported here.
"""
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from utils import InputError, read_image, to_gray_float, write_image  # noqa: E402


def argmax_laplacian(stack: np.ndarray, sigma: float = 2.0):
    """Per-pixel argmax of the smoothed Laplacian energy -> (fused, index)."""
    energy = np.stack([cv2.GaussianBlur(cv2.Laplacian(s, cv2.CV_32F) ** 2, (0, 0), sigma) for s in stack])
    index = energy.argmax(axis=0)
    return np.take_along_axis(stack, index[None], axis=0)[0], index.astype(np.int64)


def _pyramid(image: np.ndarray, levels: int):
    """Laplacian pyramid: ``levels`` detail bands, finest first, then the coarse residual."""
    bands, current = [], image
    for _ in range(levels):
        smaller = cv2.pyrDown(current)
        bands.append(current - cv2.pyrUp(smaller, dstsize=(current.shape[1], current.shape[0])))
        current = smaller
    return bands + [current]


def pyramid_levels(shape, smallest: int = 8, most: int = 5) -> int:
    """Detail levels such that the coarsest band keeps at least ``smallest`` px on its shorter side."""
    return int(max(0, min(most, np.floor(np.log2(min(shape) / smallest)))))


def laplacian_pyramid(stack: np.ndarray, levels: int = None):
    """Pyramid fusion -> (fused, None); ``levels`` None: as many as the size allows, at most 5."""
    stack = np.asarray(stack, np.float32)
    levels = pyramid_levels(stack.shape[1:]) if levels is None else levels
    pyramids = [_pyramid(s, levels) for s in stack]
    fused = [np.mean([p[-1] for p in pyramids], axis=0)]
    for level in reversed(range(levels)):
        bands = np.stack([p[level] for p in pyramids])
        pick = np.abs(bands).argmax(axis=0)[None]
        detail = np.take_along_axis(bands, pick, axis=0)[0]
        fused = [cv2.pyrUp(fused[0], dstsize=(detail.shape[1], detail.shape[0])) + detail]
    return fused[0], None


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter with a gray guide: local linear fit of ``source`` on ``guide``."""
    size = (2 * radius + 1, 2 * radius + 1)

    def mean(x):
        return cv2.boxFilter(x, -1, size, borderType=cv2.BORDER_REFLECT)

    mean_g, mean_s = mean(guide), mean(source)
    a = (mean(guide * source) - mean_g * mean_s) / (mean(guide * guide) - mean_g * mean_g + eps)
    b = mean_s - a * mean_g
    return mean(a) * guide + mean(b)


def guided_filter_fusion(stack: np.ndarray, base_radius: int = 45, base_eps: float = 0.3,
                         detail_radius: int = 7, detail_eps: float = 1e-6, average_size: int = 31,
                         saliency_radius: int = 5, saliency_sigma: float = 5.0):
    """GFF (Li et al. 2013) with the paper's settings -> (fused, None)."""
    stack = np.asarray(stack, np.float32)
    base = np.stack([cv2.blur(s, (average_size, average_size), borderType=cv2.BORDER_REFLECT) for s in stack])
    detail = stack - base
    kernel = 2 * saliency_radius + 1
    saliency = np.stack([cv2.GaussianBlur(np.abs(cv2.Laplacian(s, cv2.CV_32F)), (kernel, kernel), saliency_sigma)
                         for s in stack])
    winner = saliency.argmax(axis=0)
    fused = np.zeros(stack.shape[1:], np.float32)
    for layer, radius, eps in ((base, base_radius, base_eps), (detail, detail_radius, detail_eps)):
        weights = np.stack([guided_filter(s, (winner == k).astype(np.float32), radius, eps)
                            for k, s in enumerate(stack)])
        weights = np.maximum(weights, 0)
        weights /= np.maximum(weights.sum(axis=0), 1e-6)
        fused += (weights * layer).sum(axis=0)
    return fused, None


def _dtcwt_module():
    """The ``dtcwt`` package, or None when it is not installed.

    dtcwt 0.14 still calls two functions NumPy 2 removed (asfarray, issubsctype);
    its helper module alone gets a NumPy namespace that has them again.
    """
    try:
        import dtcwt
        import dtcwt.utils
    except ImportError:
        return None
    if not hasattr(np, "asfarray"):
        shim = types.ModuleType("numpy")
        shim.__dict__.update(np.__dict__)
        shim.asfarray = lambda a, dtype=None: np.asarray(
            a, dtype=dtype if dtype is not None and np.issubdtype(dtype, np.inexact) else np.float64)
        shim.issubsctype = lambda a, b: np.issubdtype(np.dtype(a), b)
        dtcwt.utils.np = shim
    return dtcwt


def dtcwt_available() -> bool:
    return _dtcwt_module() is not None


def dtcwt_fusion(stack: np.ndarray, levels: int = None):
    """DTCWT fusion -> (fused, None): max-magnitude highpasses, mean lowpass; ``levels`` None: up to 4."""
    dtcwt = _dtcwt_module()
    if dtcwt is None:
        raise InputError("the dtcwt package is not installed (pip install --no-deps dtcwt)")
    stack = np.asarray(stack, np.float64)
    levels = pyramid_levels(stack.shape[1:], most=4) if levels is None else levels
    transform = dtcwt.Transform2d()
    pyramids = [transform.forward(s, nlevels=levels) for s in stack]
    highpasses = []
    for level in range(levels):
        bands = np.stack([p.highpasses[level] for p in pyramids])
        pick = np.abs(bands).argmax(axis=0)[None]
        highpasses.append(np.take_along_axis(bands, pick, axis=0)[0])
    lowpass = np.mean([p.lowpass for p in pyramids], axis=0)
    fused = transform.inverse(dtcwt.Pyramid(lowpass, tuple(highpasses)))
    h, w = stack.shape[1:]
    return fused[:h, :w].astype(np.float32), None


# ----------------------------------------------------------------------------- OpenFocus

class OpenFocus:
    """The ``openfocus`` command as a fuser of colour slices (it reads files, so it takes the slices).

    executable: path of the command (in its own venv); ``available`` is False
    when it does not exist. Each call writes the slices as PNG to a temporary
    folder, runs ``openfocus -i DIR -o OUT -m METHOD --cpu --no-exposure-match``
    and reads the gray of the fused picture; the time includes its start-up.
    """

    def __init__(self, executable, method: str = "stackmffv3", threads: int = 1, timeout: float = 600):
        self.executable = str(executable) if executable else ""
        self.method, self.threads, self.timeout = method, threads, timeout

    @property
    def available(self) -> bool:
        return bool(self.executable) and os.access(self.executable, os.X_OK) and Path(self.executable).is_file()

    def __call__(self, images):
        with tempfile.TemporaryDirectory(prefix="openfocus_") as folder:
            folder = Path(folder)
            (folder / "stack").mkdir()
            for k, image in enumerate(images, start=1):
                write_image(folder / "stack" / f"{k:03d}.png", image)
            output = folder / "fused.png"
            command = [self.executable, "-i", str(folder / "stack"), "-o", str(output), "-m", self.method,
                       "--cpu", "--no-exposure-match", "--threads", str(self.threads)]
            # A clean environment for its own venv: this process's threads setting, not its Python paths.
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
            done = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout, env=env)
            if done.returncode != 0 or not output.is_file():
                last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise InputError(f"openfocus failed (exit {done.returncode}): {last[0]}")
            return to_gray_float(read_image(output)), None
