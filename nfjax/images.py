"""Raw detector frames -> background median -> filters -> lit pixels -> observation volume.

This module is nfjax's ProcessImagesCombined (reference §8): it owns MIDAS's raw-frame file
naming, the per-distance temporal median background, the per-frame filters (background and
blanket subtraction, exact 3x3/5x5 spatial median, the two LoG passes of FindPeakPositions)
and the bit-packing of lit pixels into :mod:`nfjax.observe`'s SpotsInfo.bin layout.
Pixel values are raw detector counts (uint16 in, int32 inside); images are ``(NZ, NY)``
arrays as the TIFF stores them (row = z, column = y, *unflipped*); the flip of §0.1
(``y = NY-1-column``, ``z = NZ-1-row``) happens only when lit pixels are packed into the
volume. It must never hold a whole distance's stack in memory unless it fits the memory
budget (the median reads row bands of every frame instead), never expand the volume to
bytes, and never leave a partial output file behind (everything goes through
``atomic_write``).

Differences from MIDAS (also listed in docs/midas-differences.md by the lead):

* ``DoLoGFilter 1``: MIDAS labels LoG zero-crossing contours and flood-fills their interior
  with an order-dependent scanline fill (§8.4). nfjax implements the documented semantics
  in vectorised form instead, which is *not* a literal port: a pixel is lit when it is
  non-zero after the spatial median AND, for either LoG pass ((LoGMaskRadius,
  GaussFiltRadius) and (4, 1.0)), its response L (computed exactly, in integers, with
  MIDAS's truncated kernel) is negative or it is a zero-crossing edge pixel (an 8-neighbour,
  by MIDAS's flat-index neighbourhood that wraps across row ends, has the other sign
  class L >= 0 / L < 0). ``DoLoGFilter 0`` (lit = every non-zero pixel after background
  subtraction and median filtering) is exact.
* No phantom pixel: MIDAS lights pixel index 2045 on a frame with no lit pixel (§8.3
  step 4); nfjax leaves empty frames empty.
* HDF5 input stacks are not supported (MIDAS's TIFF path only).
* The temporal median is the same lower median (rank (n-1)//2) but is computed in row
  bands so a distance's stack need not fit in memory; MIDAS holds all frames (§12 item 15).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nfjax import observe
from nfjax.chunking import progress_bar
from nfjax.errors import InputFileError, NfjaxError, ParamError, warn_once
from nfjax.io.atomic import atomic_write

__all__ = [
    "median3x3",
    "median5x5",
    "median_filter",
    "gaussian_filter",
    "gaussian_laplace",
    "log_kernel_float",
    "log_kernel_int",
    "log_response",
    "zero_crossing_edges",
    "lit_mask",
    "pack_frames",
    "temporal_median",
    "frame_path",
    "frame_paths",
    "median_image_path",
    "read_frame",
    "check_frames",
    "process_distance",
    "process_all",
    "run_process",
    "lit_fraction_warning",
    "lit_per_distance",
    "lit_warnings",
]

LOG_SCALE = 79720  # MIDAS's integer scale of the LoG kernel (§8.4)
SECOND_LOG_PASS = (4, 1.0)  # the always-on second FindPeakPositions(R, sigma) pass (§8.3)
_DEFAULT_MAX_MEMORY = 3 << 30  # host budget when --max-memory is not given (< 4 GB target)
# NF spots are small and sparse: the Au example lights 0.0007% of its pixels over all
# frames. Several percent lit means background noise passes the filters, and noise lights
# some pixel of every candidate orientation, so the fit's scores lose their meaning.
LIT_FRACTION_WARNING = 0.02


# =========================================================================== filters
# All filters take integer or float arrays (..., NZ, NY) and act on the last two axes;
# leading axes are a batch of frames. They are pure jnp and jit-safe.

def _batcher_pairs(n: int) -> list[tuple[int, int]]:
    """Comparators of Batcher's odd-even merge sort for n a power of two (i < j: min to i)."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


@functools.lru_cache(maxsize=None)
def _selection_program(m: int, rank: int) -> tuple[tuple, int]:
    """A min/max program selecting the element of ``rank`` among ``m`` inputs.

    Batcher's network on the next power of two, inputs padded with +inf (comparators with
    a +inf wire become wire moves), then pruned to the ops the output depends on. Returns
    (ops, out) with ops = ((kind, a, b, dest), ...), node ids 0..m-1 the inputs.
    """
    n = 1 << max(1, (m - 1).bit_length())
    INF = -1
    wires = list(range(m)) + [INF] * (n - m)
    ops = []
    nxt = m
    for i, j in _batcher_pairs(n):
        a, b = wires[i], wires[j]
        if b == INF:
            continue
        if a == INF:
            wires[i], wires[j] = b, INF
            continue
        ops.append(("min", a, b, nxt))
        ops.append(("max", a, b, nxt + 1))
        wires[i], wires[j] = nxt, nxt + 1
        nxt += 2
    out = wires[rank]
    needed = {out}
    kept = []
    for op in reversed(ops):
        if op[3] in needed:
            kept.append(op)
            needed.update(op[1:3])
    return tuple(reversed(kept)), out


def _select(values: list, rank: int):
    """Element of ``rank`` (0-based, ascending) of the arrays ``values``, elementwise, exact."""
    ops, out = _selection_program(len(values), rank)
    nodes = dict(enumerate(values))
    for kind, a, b, dest in ops:
        nodes[dest] = (jnp.minimum if kind == "min" else jnp.maximum)(nodes[a], nodes[b])
    return nodes[out]


def _window_views(img, radius: int) -> list:
    """The (2r+1)^2 shifted interior views img[y+dy, x+dx], each (..., NZ-2r, NY-2r)."""
    nz, ny = img.shape[-2:]
    r = radius
    return [img[..., r + dy:nz - r + dy, r + dx:ny - r + dx]
            for dy in range(-r, r + 1) for dx in range(-r, r + 1)]


def _median_square(img, radius: int):
    img = jnp.asarray(img)
    nz, ny = img.shape[-2:]
    if nz <= 2 * radius or ny <= 2 * radius:
        return img
    views = _window_views(img, radius)
    med = _select(views, (len(views) - 1) // 2)
    # MIDAS copies the radius-wide border unchanged (§8.3 step 2).
    return img.at[..., radius:nz - radius, radius:ny - radius].set(med)


def median3x3(img):
    """Exact 3x3 median of (..., NZ, NY); the 1-pixel border is copied unchanged (MIDAS)."""
    return _median_square(img, 1)


def median5x5(img):
    """Exact 5x5 median of (..., NZ, NY); the 2-pixel border is copied unchanged (MIDAS)."""
    return _median_square(img, 2)


def median_filter(img, radius: int):
    """MIDAS ``MedFiltRadius``: 1 -> 3x3, 2 -> 5x5, anything else -> unchanged copy."""
    if radius == 1:
        return median3x3(img)
    if radius == 2:
        return median5x5(img)
    return jnp.asarray(img)


def _correlate1d_valid(x, w: np.ndarray, axis: int):
    """Valid-mode correlation of x with the 1-D weights w along ``axis`` (-1 or -2)."""
    r = (len(w) - 1) // 2
    n = x.shape[axis]
    out = 0
    for i, wi in enumerate(w):
        sl = [slice(None)] * x.ndim
        sl[axis] = slice(i, n - 2 * r + i)
        out = out + float(wi) * x[tuple(sl)]
    return out


def _gauss1d(sigma: float, radius: int, order: int) -> np.ndarray:
    """Normalised sampled Gaussian (order 0) or its second derivative (order 2), as scipy."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 * x * x / (sigma * sigma))
    phi /= phi.sum()
    if order == 0:
        return phi
    return phi * (x * x / sigma**4 - 1.0 / sigma**2)


def _reflect_pad(img, radius: int):
    # scipy's 'reflect' (d c b a | a b c d) is numpy's 'symmetric'
    pad = [(0, 0)] * (img.ndim - 2) + [(radius, radius), (radius, radius)]
    return jnp.pad(img, pad, mode="symmetric")


def gaussian_filter(img, sigma: float, radius: int | None = None):
    """Gaussian smoothing, separable, same result as scipy.ndimage.gaussian_filter(mode='reflect').

    img: (..., NZ, NY); sigma in pixels; radius defaults to int(4 sigma + 0.5) (scipy's
    truncate=4). Returns float64.
    """
    radius = int(4.0 * sigma + 0.5) if radius is None else int(radius)
    w = _gauss1d(sigma, radius, 0)
    x = _reflect_pad(jnp.asarray(img, dtype=jnp.float64), radius)
    return _correlate1d_valid(_correlate1d_valid(x, w, -1), w, -2)


def gaussian_laplace(img, sigma: float, radius: int | None = None):
    """Laplacian of Gaussian, same result as scipy.ndimage.gaussian_laplace(mode='reflect').

    Separable: d2/dz2 (G) + d2/dy2 (G) with scipy's normalised kernels. Returns float64.
    """
    radius = int(4.0 * sigma + 0.5) if radius is None else int(radius)
    g0, g2 = _gauss1d(sigma, radius, 0), _gauss1d(sigma, radius, 2)
    x = _reflect_pad(jnp.asarray(img, dtype=jnp.float64), radius)
    return (_correlate1d_valid(_correlate1d_valid(x, g2, -1), g0, -2)
            + _correlate1d_valid(_correlate1d_valid(x, g0, -1), g2, -2))


def log_kernel_float(radius: int, sigma: float) -> np.ndarray:
    """MIDAS's LoG weights before scaling: ``-1/(pi s^4) (1 - r^2/2s^2) exp(-r^2/2s^2)``.

    Returns float64 (2R+1, 2R+1), indexed [dy+R, dx+R].
    """
    d = np.arange(-radius, radius + 1, dtype=np.float64)
    r2 = d[:, None] ** 2 + d[None, :] ** 2
    s2 = sigma * sigma
    return (-1.0 / (math.pi * s2 * s2)) * (1.0 - r2 / (2.0 * s2)) * np.exp(-r2 / (2.0 * s2))


def log_kernel_int(radius: int, sigma: float) -> np.ndarray:
    """MIDAS's integer LoG kernel (§8.4): ``(int)(79720 * K)``, truncated toward zero; int64."""
    d = np.arange(-radius, radius + 1)
    out = np.zeros((2 * radius + 1, 2 * radius + 1), dtype=np.int64)
    s2 = sigma * sigma
    for iy, dy in enumerate(d):
        for ix, dx in enumerate(d):
            r2 = float(dx * dx + dy * dy)
            v = (LOG_SCALE * (-1.0 / (math.pi * s2 * s2)) * (1.0 - r2 / (2.0 * s2))
                 * math.exp(-r2 / (2.0 * s2)))
            out[iy, ix] = int(v)  # C's (int) cast truncates toward zero
    return out


def log_response(img, radius: int, sigma: float, *, integer: bool = True):
    """LoG response L = sum K[dy,dx] img[y+dy, x+dx] over |dx|,|dy| <= radius; border L = 0.

    img: (..., NZ, NY) non-negative counts. ``integer=True``: MIDAS's truncated integer
    kernel (:func:`log_kernel_int`), exact int64 (needs JAX x64, on by default in nfjax).
    ``integer=False``: the unscaled float kernel (:func:`log_kernel_float`) in float64, as
    two separable passes (the kernel is (G''(y)G(z) + G(y)G''(z)) / (2 pi s^2)). The
    radius-wide border is 0, as MIDAS's border rule makes it.
    """
    img = jnp.asarray(img)
    nz, ny = img.shape[-2:]
    r = int(radius)
    if nz <= 2 * r or ny <= 2 * r:
        return jnp.zeros(img.shape, jnp.int64 if integer else jnp.float64)
    if integer:
        if not jax.config.jax_enable_x64:
            raise NfjaxError("the integer LoG needs JAX 64-bit mode (unset NFJAX_NO_X64)")
        k = log_kernel_int(r, sigma)
        x = img.astype(jnp.int32)
        # The kernel depends on dx^2+dy^2 only: add the shifted views that share a weight in
        # int32 (at most 8 of them: no overflow for 16-bit counts), multiply once in int64.
        groups: dict[int, list[tuple[int, int]]] = {}
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                groups.setdefault(dy * dy + dx * dx, []).append((dy, dx))
        acc = jnp.zeros(img.shape[:-2] + (nz - 2 * r, ny - 2 * r), jnp.int64)
        for offsets in groups.values():
            w = int(k[offsets[0][0] + r, offsets[0][1] + r])
            if w == 0:
                continue
            s = 0
            for dy, dx in offsets:
                s = s + x[..., r + dy:nz - r + dy, r + dx:ny - r + dx]
            acc = acc + jnp.int64(w) * s.astype(jnp.int64)
        out = jnp.zeros(img.shape, jnp.int64)
    else:
        d = np.arange(-r, r + 1, dtype=np.float64)
        s2 = sigma * sigma
        g = np.exp(-d * d / (2.0 * s2))
        g2 = (d * d / (s2 * s2) - 1.0 / s2) * g
        c = 1.0 / (2.0 * math.pi * s2)
        x = img.astype(jnp.float64)
        acc = c * (_correlate1d_valid(_correlate1d_valid(x, g2, -1), g, -2)
                   + _correlate1d_valid(_correlate1d_valid(x, g, -1), g2, -2))
        out = jnp.zeros(img.shape, jnp.float64)
    return out.at[..., r:nz - r, r:ny - r].set(acc)


def zero_crossing_edges(L, img):
    """MIDAS's LoG edge pixels (§8.4) of (..., NZ, NY) arrays: bool (..., NZ, NY).

    Pixel i (flat index row*NY + col) is an edge if NY+1 <= i < NY*NZ-(NY+1), img[i] != 0,
    and an 8-neighbour at flat offset +-1, +-NY, +-NY+-1 (wrapping across row ends, as
    MIDAS's flat indexing does) is in the other sign class (L >= 0 versus L < 0).
    """
    nz, ny = img.shape[-2:]
    n = nz * ny
    lo, hi = ny + 1, n - (ny + 1)
    lead = img.shape[:-2]
    if hi <= lo:
        return jnp.zeros(img.shape, bool)
    neg = (jnp.asarray(L) < 0).reshape(lead + (n,))
    core = neg[..., lo:hi]
    differs = jnp.zeros(core.shape, bool)
    for off in (-ny - 1, -ny, -ny + 1, -1, 1, ny - 1, ny, ny + 1):
        differs = differs | (neg[..., lo + off:hi + off] != core)
    nonzero = (jnp.asarray(img) != 0).reshape(lead + (n,))[..., lo:hi]
    flat = jnp.zeros(lead + (n,), bool).at[..., lo:hi].set(differs & nonzero)
    return flat.reshape(img.shape)


def lit_mask(img, *, do_log_filter: int, log_passes: Sequence[tuple[int, float]] = ()):
    """Lit pixels of filtered frames (..., NZ, NY) (after background and spatial median).

    ``do_log_filter`` 0: every non-zero pixel. 1: non-zero and, for some (R, sigma) in
    ``log_passes``, integer LoG response < 0 or a zero-crossing edge (module docstring).
    """
    nonzero = jnp.asarray(img) != 0
    if not do_log_filter:
        return nonzero
    hit = jnp.zeros(nonzero.shape, bool)
    for radius, sigma in log_passes:
        L = log_response(img, radius, sigma, integer=True)
        hit = hit | (L < 0) | zero_crossing_edges(L, img)
    return nonzero & hit


def pack_frames(lit):
    """Bit-pack lit frames (B, NZ, NY) bool into SpotsInfo words (B, NY*NZ/32) uint32.

    Applies MIDAS's flip (y = NY-1-column, z = NZ-1-row), so bit y*NZ + z of frame b is
    ``lit[b, NZ-1-z, NY-1-y]``; LSB first. Needs NY*NZ % 32 == 0.
    """
    b, nz, ny = lit.shape
    if (ny * nz) % 32:
        raise ValueError(f"pack_frames needs NY*NZ divisible by 32, got {ny}x{nz}")
    yz = jnp.swapaxes(lit[:, ::-1, ::-1], 1, 2).reshape(b, ny * nz // 32, 32)
    shifts = jnp.arange(32, dtype=jnp.uint32)
    return jnp.sum(yz.astype(jnp.uint32) << shifts, axis=-1, dtype=jnp.uint32)


@functools.partial(jax.jit, static_argnames=("med_radius", "do_log_filter", "log_passes", "pack"))
def _process_batch(raw, median, blanket, *, med_radius, do_log_filter, log_passes, pack):
    """raw (B, NZ, NY) uint16, median (NZ, NY) uint16 -> packed words or lit bools."""
    img = jnp.maximum(raw.astype(jnp.int32) - median.astype(jnp.int32)[None]
                      - blanket.astype(jnp.int32), 0)
    img = median_filter(img, med_radius)
    lit = lit_mask(img, do_log_filter=do_log_filter, log_passes=log_passes)
    return pack_frames(lit) if pack else lit


# =========================================================================== temporal median
def _band_rows(n: int, nz: int, ny: int, max_memory: int) -> int:
    """Rows per band of :func:`temporal_median` over ``n`` frames of ``nz`` x ``ny``: as
    many as fit ``max_memory`` (n x band of uint16), at least one."""
    return max(1, min(nz, max_memory // max(1, 2 * n * ny)))


def temporal_median(frames, n: int, shape: tuple[int, int], *, max_memory: int | None = None,
                    progress: bool | None = False, desc: str = "median"):
    """Per-pixel lower median (element of rank (n-1)//2, as MIDAS) over n frames; uint16 (NZ, NY).

    ``frames`` is either a callable ``frames(row0, row1)`` returning an iterator over the n
    frames' rows [row0, row1) (arrays (row1-row0, NY)), called once per row band — the
    stack is never held whole: the band height is chosen so that n x band fits in
    ``max_memory`` — or a plain iterable of n full frames (NZ, NY), read in one pass and
    held in memory (for small stacks).
    """
    nz, ny = (int(s) for s in shape)
    if n < 1:
        raise ValueError("temporal_median needs at least one frame")
    rank = (n - 1) // 2
    budget = _DEFAULT_MAX_MEMORY if max_memory is None else int(max_memory)
    if callable(frames):
        rows = _band_rows(n, nz, ny, budget)
    else:
        rows = nz
        it = iter(frames)
    out = np.empty((nz, ny), dtype=np.uint16)
    bar = progress_bar(n * math.ceil(nz / rows), desc, "frame-band", progress)
    try:
        for r0 in range(0, nz, rows):
            r1 = min(nz, r0 + rows)
            band_iter = frames(r0, r1) if callable(frames) else it
            try:
                out[r0:r1] = _band_median(band_iter, n, r1 - r0, ny, rank, bar)
            finally:
                if callable(frames) and hasattr(band_iter, "close"):
                    band_iter.close()   # a reader thread stops before its source goes
    finally:
        bar.close()
    return out


def _band_median(band_iter: Iterator, n: int, rows: int, ny: int, rank: int, bar) -> np.ndarray:
    """Lower median of one row band; frames gathered pixel-major so the selection is contiguous."""
    npix = rows * ny
    buf = np.empty((npix, n), dtype=np.uint16)
    step = 32  # frames transposed together: each pixel row of buf receives 64 contiguous bytes
    block = np.empty((step, npix), dtype=np.uint16)
    j = 0
    filled = 0
    for frame in band_iter:
        if j >= n:
            raise ValueError(f"temporal_median: more than {n} frames")
        a = np.asarray(frame)
        if a.shape != (rows, ny):
            raise ValueError(f"temporal_median: frame rows of shape {a.shape}, "
                             f"expected {(rows, ny)}")
        block[filled] = a.reshape(npix)
        filled += 1
        j += 1
        if filled == step:
            buf[:, j - step:j] = block.T
            filled = 0
        bar.update(1)
    if filled:
        buf[:, j - filled:j] = block[:filled].T
    if j != n:
        raise ValueError(f"temporal_median: expected {n} frames, got {j}")
    buf.partition(rank, axis=1)
    return buf[:, rank].reshape(rows, ny)


# =========================================================================== files
def _resolve(params, path) -> Path:
    if hasattr(params, "resolve"):
        return Path(params.resolve(path))
    return Path(path)


def _frames_per_distance(params) -> int:
    start, end = getattr(params, "start_nr", None), getattr(params, "end_nr", None)
    src = getattr(params, "source", "<params>")
    if start is None or end is None:
        raise ParamError(f"{src}: StartNr/EndNr: expected both (frames per distance), "
                         "found them missing")
    if end < start:
        raise ParamError(f"{src}: EndNr: expected an integer >= StartNr ({start}), found {end}")
    n = end - start + 1
    nfiles = getattr(params, "nr_files_per_distance", None)
    if nfiles is not None and nfiles != n:
        raise ParamError(f"{src}: NrFilesPerDistance: expected EndNr - StartNr + 1 = {n} "
                         f"(frames per distance), found {nfiles}")
    return n


def _require_names(params) -> None:
    src = getattr(params, "source", "<params>")
    for key, attr in (("OrigFileName", "orig_file_name"), ("extOrig", "ext_orig")):
        if not getattr(params, attr, None):
            raise ParamError(f"{src}: {key}: expected a value (raw frame file names), "
                             "found none")


def frame_path(params, distance_index: int, j: int) -> Path:
    """Raw frame j (0-based) of distance ``distance_index`` (0-based), MIDAS §8.1 naming.

    ``FileNr = L*NrFilesPerDistance + RawStartNr + L*WFImages + j``;
    ``<DataDirectory>/<OrigFileName>_<FileNr %06d>.<extOrig>``.
    """
    _require_names(params)
    nfiles = getattr(params, "nr_files_per_distance", None) or _frames_per_distance(params)
    L = int(distance_index)
    file_nr = (L * nfiles + int(getattr(params, "raw_start_nr", 0) or 0)
               + L * int(getattr(params, "wf_images", 0) or 0) + int(j))
    directory = _resolve(params, getattr(params, "data_directory", None) or ".")
    return directory / f"{params.orig_file_name}_{file_nr:06d}.{params.ext_orig}"


def frame_paths(params, distance_index: int) -> list[Path]:
    """All raw frame paths of one distance (0-based), in frame order."""
    _require_names(params)
    n = _frames_per_distance(params)
    return [frame_path(params, distance_index, j) for j in range(n)]


def median_image_path(params, distance_index: int) -> Path:
    """``<OutputDirectory>/<ReducedFileName>_Median_Background_Distance_<L>.<extReduced>`` (§6.8).

    L is 0-based (MIDAS's LayerNr - 1). ReducedFileName falls back to OrigFileName, extReduced
    to ``bin``.
    """
    name = getattr(params, "reduced_file_name", None) or params.orig_file_name
    ext = getattr(params, "ext_reduced", None) or "bin"
    L = int(distance_index)
    return Path(params.output_dir) / f"{name}_Median_Background_Distance_{L}.{ext}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class _QuietTifffile(threading.local):
    """A filter on tifffile's logger that drops its records while this thread reads a frame
    (``depth > 0``): nfjax reports a bad frame in one line itself."""

    depth = 0

    def filter(self, record) -> bool:
        return self.depth == 0


_quiet_tifffile = _QuietTifffile()
logging.getLogger("tifffile").addFilter(_quiet_tifffile)


class _FrameFile:
    """One raw frame file: validated once, then read whole or by row band.

    Uncompressed, contiguous TIFFs (what detectors write) are read band by band straight
    from the file at the pixel-data offset. Compressed strips are decoded by tifffile,
    only those a band needs, so the banded median decodes each strip about once; tiled
    frames are decoded whole.
    """

    def __init__(self, path: Path, shape: tuple[int, int]):
        self.path = path
        self.shape = shape
        self.offset: int | None = None
        self.dtype = None
        self.rows_per_strip = 0          # > 0: compressed strips, decoded band by band
        self._checked = False

    def _check(self):
        import tifffile

        if self._checked:
            return
        if not self.path.is_file():
            raise InputFileError(f"{self.path}: raw frame file not found")
        with self._readable(), tifffile.TiffFile(self.path) as tif:
            n_pages = len(tif.pages)
            page = tif.pages[0]
            shape, dtype = tuple(page.shape), np.dtype(page.dtype)
            contiguous = page.is_contiguous and page.compression == 1
            offset = page.dataoffsets[0] if contiguous else None
            byteorder = tif.byteorder
            codec = page.compression
            decodable = codec == 1 or codec in tifffile.TIFF.DECOMPRESSORS
            strips = (not contiguous and not page.is_tiled and page.planarconfig == 1
                      and len(page.dataoffsets) > 1)
            rows_per_strip = int(page.rowsperstrip) if strips else 0
        if n_pages != 1:
            raise InputFileError(f"{self.path}: expected one page (one frame per file), "
                                 f"found {n_pages} pages")
        if shape != self.shape:
            raise InputFileError(
                f"{self.path}: expected a frame of {self.shape[0]} rows x {self.shape[1]} columns "
                f"(NrPixelsZ x NrPixelsY), found shape {shape}")
        if dtype != np.uint16:
            raise InputFileError(f"{self.path}: expected uint16 pixels, found {dtype}")
        if not decodable:
            # Found here, before any work, not while the frames are read.
            raise InputFileError(f"{self.path}: {getattr(codec, 'name', codec)}-compressed "
                                 "TIFF: decoding it needs the imagecodecs package (pip "
                                 "install imagecodecs)")
        if offset is not None:
            need = offset + 2 * self.shape[0] * self.shape[1]
            size = self.path.stat().st_size
            if size < need:
                raise InputFileError(f"{self.path}: truncated TIFF: expected at least {need} "
                                     f"bytes, found {size}")
            self.offset = offset
            self.dtype = np.dtype(np.uint16).newbyteorder(byteorder)
        self.rows_per_strip = rows_per_strip
        self._checked = True

    @property
    def decoded_whole(self) -> bool:
        """Whether reading any rows decodes the whole frame (compressed in one strip, or in
        tiles)."""
        self._check()
        return self.offset is None and not self.rows_per_strip

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) as uint16 (r1-r0, NY)."""
        self._check()
        ny = self.shape[1]
        if self.offset is None:
            if self.rows_per_strip and r1 - r0 < self.shape[0]:
                return self._strip_rows(r0, r1)
            return self.read()[r0:r1]
        count = (r1 - r0) * ny
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + 2 * r0 * ny)
            a = np.fromfile(fh, dtype=self.dtype, count=count)
        if a.size != count:
            raise InputFileError(f"{self.path}: truncated TIFF: expected {2 * count} bytes of "
                                 f"rows {r0}..{r1 - 1}, found {2 * a.size}")
        return a.astype(np.uint16, copy=False).reshape(r1 - r0, ny)

    def _strip_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of a compressed, stripped frame, decoding only their strips."""
        import tifffile

        ny, per = self.shape[1], self.rows_per_strip
        out = np.empty((r1 - r0, ny), np.uint16)
        with self._readable(), tifffile.TiffFile(self.path) as tif:
            page, fh = tif.pages[0], tif.filehandle
            for k in range(r0 // per, (r1 - 1) // per + 1):
                fh.seek(page.dataoffsets[k])
                strip = page.decode(fh.read(page.databytecounts[k]), k)[0]
                strip = np.asarray(strip).reshape(-1, ny)
                first = k * per                  # the strip's first row in the frame
                lo, hi = max(r0, first), min(r1, first + len(strip))
                out[lo - r0:hi - r0] = strip[lo - first:hi - first]
        return out

    def read(self) -> np.ndarray:
        """The whole frame, uint16 (NZ, NY)."""
        import tifffile

        self._check()
        if self.offset is not None:
            return self.rows(0, self.shape[0])
        with self._readable():
            a = tifffile.imread(self.path, key=0)
        return np.asarray(a, dtype=np.uint16)

    @contextlib.contextmanager
    def _readable(self):
        """Any failure of tifffile on this frame (not a TIFF, truncated, a strip that does
        not decode) becomes a one-line error naming the file; tifffile's own log lines
        about it (one per bad tag: 16 for a damaged header) are not printed."""
        _quiet_tifffile.depth += 1          # per thread: the class default is 0
        try:
            yield
        except InputFileError:
            raise
        except Exception as exc:  # noqa: BLE001 - any tifffile failure is a bad file
            raise InputFileError(f"{self.path}: not a readable TIFF ({_one_line(exc)})") from None
        finally:
            _quiet_tifffile.depth -= 1


def read_frame(path, shape: tuple[int, int]) -> np.ndarray:
    """One raw frame as uint16 (NZ, NY); InputFileError (one line, naming the file) if the
    file is missing, not a TIFF, truncated, or of the wrong shape or dtype."""
    return _FrameFile(Path(path), tuple(int(s) for s in shape)).read()


def check_frames(params, distances: Sequence[int] | None = None, *,
                 hint: str | None = None) -> int:
    """Check every raw frame of the distances (0-based; default all) before any is
    processed: the file exists and its TIFF header says one uint16 page of NrPixelsZ x
    NrPixelsY (not truncated when uncompressed). Reads headers only (about 0.1 ms a frame).
    Returns the number of frames; raises InputFileError (one line, naming the first bad
    file) otherwise. ``hint`` is added to the message when frames are missing."""
    shape = (int(params.nr_pixels_z), int(params.nr_pixels_y))
    distances = range(int(params.n_distances)) if distances is None else distances
    frames = [f for L in distances for f in frame_paths(params, L)]
    folder = next((f for f in frames if f.is_dir()), None)
    if folder is not None:
        raise InputFileError(f"{folder}: expected a raw frame (TIFF file), found a directory")
    missing = [f for f in frames if not f.is_file()]
    if missing:
        raise InputFileError(f"{missing[0]}: raw frame not found ({len(missing)} of "
                             f"{len(frames)} frames missing" + (f"; {hint})" if hint else ")"))
    for f in frames:
        _FrameFile(f, shape)._check()
    return len(frames)


def _prefetch(iterable: Iterable, depth: int = 4) -> Iterator:
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead (I/O overlaps compute).

    Exceptions raised by the producer are re-raised in the consumer; closing the consumer
    early stops the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def run():
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        q.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((True, done))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put((False, exc))

    thread = threading.Thread(target=run, daemon=True, name="nfjax-prefetch")
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


# =========================================================================== pipeline
def _config(params) -> dict:
    do_log = int(getattr(params, "do_log_filter", 1))
    first = (int(getattr(params, "log_mask_radius", 4)),
             float(getattr(params, "gauss_filt_radius", 1.0)))
    passes = (first, SECOND_LOG_PASS) if do_log else ()
    return dict(med_radius=int(getattr(params, "med_filt_radius", 1)), do_log_filter=do_log,
                log_passes=passes)


def _frame_work_bytes(ny: int, nz: int, cfg: dict) -> int:
    # Per frame in flight: raw + a few int32/int64/bool temporaries (~40 bytes per pixel with
    # the LoG, ~16 without).
    return ny * nz * (48 if cfg["do_log_filter"] else 16)


def _batch_size(ny: int, nz: int, budget: int, cfg: dict) -> int:
    # Keep the batch to 1/8 of the budget and at most 16 frames.
    return int(max(1, min(16, (budget // 8) // _frame_work_bytes(ny, nz, cfg))))


# Room left beside a temporary copy of decoded frames, so that it never fills a disk.
_SPILL_MARGIN = 1 << 30


def _in_memory_folder(folder: Path, mounts: str = "/proc/self/mounts") -> str | None:
    """The file system type when ``folder`` is on one held in memory (tmpfs, ramfs), where
    a temporary copy would take the memory the budget was meant to spare; else None."""
    try:
        target = os.path.realpath(folder)
        best, kind = "", None
        with open(mounts) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, parts[2]
    except OSError:             # not Linux: nothing to tell
        return None
    return kind if kind in ("tmpfs", "ramfs") else None


class _FrameSpill:
    """A temporary raw copy of rows [z0, z1) of every frame of one distance, for frames that
    can only be decoded whole (compressed in one strip, or in tiles).

    The median's first row band decodes each frame once and writes its rows here (native
    uint16, frame after frame); the later bands, and the spot pass when the copy holds
    whole frames, read them back instead of decoding every frame again. The file is
    unlinked as soon as it is created, so nothing is left behind however the run ends (on
    a local disk; NFS keeps a ``.nfs*`` file until the process ends). A write that fails
    (a full disk) drops the copy with a warning, and the remaining bands decode the frames
    again. Reads and writes run in reader threads; a lock keeps them off a closed file.
    """

    def __init__(self, fd: int, path: Path, n: int, rows: int, ny: int):
        self.fd: int | None = fd
        self.path, self.n, self.rows, self.ny = path, n, rows, ny
        self.frame_bytes = 2 * rows * ny
        self.ready = False      # every frame written
        self._lock = threading.Lock()

    @classmethod
    def create(cls, folder: Path, n: int, rows: int, ny: int, *,
               room: int) -> tuple["_FrameSpill | None", str]:
        """(spill, "") or (None, why not): the folder lacks ``room`` bytes and 1 GB to spare
        (``room``: what every rank's copy may need there together), is held in memory, or
        cannot hold a new file."""
        import shutil
        import tempfile

        from nfjax.chunking import format_bytes

        if not hasattr(os, "pwrite"):
            return None, "this platform has no positional file reads and writes"
        kind = _in_memory_folder(folder)
        if kind is not None:
            return None, f"{folder} is held in memory ({kind})"
        try:
            free = shutil.disk_usage(folder).free
            if free < room + _SPILL_MARGIN:
                return None, (f"{folder} has {format_bytes(free)} free, a temporary copy "
                              f"of the frames needs {format_bytes(room)} and 1 GB to spare")
            fd, name = tempfile.mkstemp(prefix=".nfjax-frames-", suffix=".raw", dir=folder)
        except OSError as exc:
            return None, f"no temporary file can be made in {folder} ({exc.strerror})"
        try:
            os.unlink(name)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name)
            return None, f"{name} cannot be unlinked while open ({exc.strerror})"
        return cls(fd, Path(name), n, rows, ny), ""

    def filling(self, blocks: Iterable[np.ndarray], r0: int, r1: int) -> Iterator[np.ndarray]:
        """Write each frame's rows (``blocks``: n arrays (rows, NY), in frame order) to the
        copy and yield rows [r0, r1) of each."""
        j = 0
        for block in blocks:
            self._write(j, np.ascontiguousarray(block, dtype=np.uint16))
            yield block[r0:r1].copy()   # not a view: the whole block is freed
            j += 1
        # Set in the reader thread before it hands over its end mark, so the band's
        # consumer sees it once the band is done.
        with self._lock:
            self.ready = self.fd is not None and j == self.n

    def _write(self, j: int, block: np.ndarray) -> None:
        view = memoryview(block).cast("B")
        offset = j * self.frame_bytes
        with self._lock:
            if self.fd is None:
                return
            try:
                while len(view):
                    done = os.pwrite(self.fd, view, offset)
                    view, offset = view[done:], offset + done
                return
            except OSError as exc:
                failure = exc.strerror
            self._close_locked()
        warn_once("spill-write", f"warning: {self.path}: writing the temporary copy of the "
                   f"decoded frames failed ({failure}); the median decodes every frame again "
                   "for each row band")

    def band(self, r0: int, r1: int) -> Iterator[np.ndarray]:
        """Rows [r0, r1) of each frame, read back from the copy."""
        count = 2 * (r1 - r0) * self.ny
        for j in range(self.n):
            buf = bytearray(count)
            view, offset = memoryview(buf), j * self.frame_bytes + 2 * r0 * self.ny
            with self._lock:
                if self.fd is None:
                    raise NfjaxError(f"{self.path}: the temporary copy of the decoded frames "
                                     "was closed while being read")
                while len(view):
                    data = os.pread(self.fd, len(view), offset)
                    got = len(data)
                    view[:got] = data
                    if got == 0:
                        raise NfjaxError(f"{self.path}: the temporary copy of the decoded "
                                         f"frames is short (frame {j})")
                    view, offset = view[got:], offset + got
            yield np.frombuffer(buf, dtype=np.uint16).reshape(r1 - r0, self.ny)

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.ready = False


def _process_into(params, L: int, words: np.ndarray, frame0: int, *, progress: bool | None,
                  max_memory: int | None, comm=None,
                  scratch: Path | str | None = None) -> np.ndarray:
    """Process distance L (0-based); OR its lit bits into ``words`` with frame f at volume
    frame ``frame0 + f`` (the caller clears the range first). Returns the median image.

    ``scratch``: the folder of the temporary copy (:class:`_FrameSpill`) of frames that are
    decoded whole, when the median reads them in several row bands (default: the system's
    temporary folder).

    ``comm`` with several ranks (MPI): each rank computes the median of its block of
    detector rows and lights its block of frames (MIDAS splits ImageProcessingLibTiffOMP
    over nodes the same way); every rank gets the whole median, and sets only its frames'
    bits in ``words`` (the caller combines them, :meth:`Comm.or_words`)."""
    from nfjax.parallel import block_range

    nf = _frames_per_distance(params)
    ny, nz = int(params.nr_pixels_y), int(params.nr_pixels_z)
    budget = _DEFAULT_MAX_MEMORY if max_memory is None else int(max_memory)
    # run_process and workflow.preflight check every frame before any work (check_frames);
    # here a bad file fails, with the same one-line error, when it is read.
    files = [_FrameFile(p, (nz, ny)) for p in frame_paths(params, L)]
    size, rank = (1, 0) if comm is None else (comm.size, comm.rank)
    mine = f" (rank 0's share of {size})" if size > 1 else ""

    # Pass 1: the background. If the stack fits in half the budget, keep it for pass 2 so
    # every frame is read once; otherwise read row bands now and whole frames again later.
    # Under MPI a rank reads its rows of every frame, then its frames whole.
    stack_bytes = 2 * nf * ny * nz
    stack = spill = None
    try:
        if size == 1 and stack_bytes <= budget // 2:
            stack = np.empty((nf, nz, ny), dtype=np.uint16)

            def whole():
                for j, frame in enumerate(_prefetch((f.read() for f in files), depth=8)):
                    stack[j] = frame
                    yield frame

            median = temporal_median(whole(), nf, (nz, ny), max_memory=budget,
                                     progress=progress, desc=f"median d{L + 1}")
        else:
            z0, z1 = block_range(nz, rank, size)
            n_bands = -(-(z1 - z0) // _band_rows(nf, z1 - z0, ny, budget // 3))
            if n_bands > 1 and files and files[0].decoded_whole:
                # Decoding every frame once per band costs bands x the decoding (22 ms for
                # a 2048^2 zlib frame): keep the decoded rows in a temporary file instead.
                spill = _spill_or_warn(files[0].path, scratch, nf, z1 - z0, ny, n_bands,
                                       words.nbytes + (2 * stack_bytes if size == 1
                                                       else 6 * nf * ny * (z1 - z0)),
                                       comm)

            def bands(r0, r1):
                if spill is not None and spill.ready:
                    return _prefetch(spill.band(r0, r1), depth=32)
                if spill is not None and spill.fd is not None:     # the first band fills it
                    return _prefetch(spill.filling((f.rows(z0, z1) for f in files), r0, r1),
                                     depth=32)
                return _prefetch((f.rows(z0 + r0, z0 + r1) for f in files), depth=32)

            median = temporal_median(bands, nf, (z1 - z0, ny), max_memory=budget // 3,
                                     progress=progress, desc=f"median d{L + 1}{mine}")
            if size > 1:
                median = comm.allgather_rows(median)
        _light_frames(params, L, files, words, frame0, median, stack,
                      spill if spill is not None and spill.ready and size == 1 else None,
                      budget=budget, progress=progress, comm=comm, mine=mine)
    finally:
        if spill is not None:
            spill.close()
    return median


def _spill_or_warn(first: Path, scratch: Path | str | None, n: int, rows: int, ny: int,
                   n_bands: int, need: int, comm) -> _FrameSpill | None:
    """A :class:`_FrameSpill` in ``scratch`` for ``n`` frames of ``rows`` x ``ny`` (this
    rank's rows), with a note from rank 0 saying so; or, when it cannot be made, None and a
    warning from this rank that every frame is decoded once per band, why, and the
    --max-memory (``need`` bytes) that avoids it. Each is said once per process."""
    import tempfile

    from nfjax.chunking import format_bytes

    size, rank = (1, 0) if comm is None else (comm.size, comm.rank)
    folder = Path(scratch) if scratch is not None else Path(tempfile.gettempdir())
    # an output folder that is not made yet: its first existing parent
    folder = next((p for p in (folder, *folder.parents) if p.is_dir()), folder)
    # Every rank's copy may go to this folder (a shared output folder): room for them all.
    spill, why = _FrameSpill.create(folder, n, rows, ny, room=2 * n * rows * ny * size)
    who = f"rank {rank}: " if size > 1 else ""
    if spill is not None and rank == 0:
        copy = format_bytes(2 * n * rows * ny) + (f" on each of {size} ranks" if size > 1
                                                  else "")
        warn_once("spill", f"note: {first}: compressed in one strip or in tiles, so each "
                   f"frame is decoded once into a temporary file in {folder} ({copy}, "
                   f"deleted when done) for the median's {n_bands} row bands")
    elif spill is None:
        mem = (f"{math.ceil(need / (1 << 20))}MB" if need < 1 << 30
               else f"{math.ceil(10 * need / (1 << 30)) / 10:g}GB")
        warn_once("no-spill", f"warning: {who}{first}: compressed in one strip or in tiles, "
                   f"so every frame is decoded whole for each of the median's {n_bands} row "
                   f"bands (slow: {why}); --max-memory {mem} or more decodes each frame once")
    return spill


def _light_frames(params, L: int, files: list, words: np.ndarray, frame0: int,
                  median: np.ndarray, stack: np.ndarray | None, spill: _FrameSpill | None, *,
                  budget: int, progress: bool | None, comm, mine: str) -> None:
    """Pass 2 of :func:`_process_into`: the per-frame filters of this rank's frames, read
    from ``stack`` (every frame in memory), ``spill`` (whole frames in a temporary copy)
    or the files, lit bits ORed into ``words``."""
    from nfjax.parallel import block_range

    nf = len(files)
    ny, nz = int(params.nr_pixels_y), int(params.nr_pixels_z)
    size, rank = (1, 0) if comm is None else (comm.size, comm.rank)

    # Per-frame filters on the device in fixed-size batches (one compilation).
    f0, f1 = block_range(nf, rank, size)
    count = f1 - f0
    cfg = _config(params)
    aligned = (ny * nz) % 32 == 0
    bsz = _batch_size(ny, nz, budget, cfg)
    median_dev = jnp.asarray(median)
    blanket = jnp.int32(int(getattr(params, "blanket_subtraction", 0) or 0))
    frame_words = ny * nz // 32
    if stack is not None:
        source = (stack[j] for j in range(nf))
    elif spill is not None:
        source = _prefetch(spill.band(0, nz), depth=2 * bsz)
    else:
        source = _prefetch((f.read() for f in files[f0:f1]), depth=2 * bsz)
    bar = progress_bar(count, f"spots d{L + 1}{mine}", "frame", progress)
    pending = None  # (first frame, count, device result): keeps the device one batch ahead

    def drain(item):
        j0, cnt, res = item
        res = np.asarray(res)[:cnt]
        first = frame0 + f0 + j0            # volume frame of the batch's first frame
        if aligned:
            # Only the lit words: the volume's pages without a lit pixel stay untouched.
            flat = res.reshape(-1)
            lit = np.flatnonzero(flat)
            words[first * frame_words + lit] |= flat[lit]
        else:
            # Unaligned frames (NY*NZ not a multiple of 32): set bits one by one.
            yz = np.swapaxes(res[:, ::-1, ::-1], 1, 2).reshape(cnt, -1)
            fr, pix = np.nonzero(yz)
            k = (first + fr).astype(np.int64) * (ny * nz) + pix
            np.bitwise_or.at(words, k >> 5, np.left_shift(np.uint32(1), (k & 31).astype(np.uint32)))
        bar.update(cnt)

    try:
        batch = np.empty((bsz, nz, ny), dtype=np.uint16)
        j = 0
        filled = 0
        for frame in source:
            batch[filled] = frame
            filled += 1
            j += 1
            if filled == bsz or j == count:
                if filled < bsz:
                    batch[filled:] = batch[filled - 1]
                res = _process_batch(jnp.asarray(batch), median_dev, blanket, pack=aligned, **cfg)
                if pending is not None:
                    drain(pending)
                pending = (j - filled, filled, res)
                filled = 0
                batch = np.empty((bsz, nz, ny), dtype=np.uint16)
        if pending is not None:
            drain(pending)
    finally:
        bar.close()
        if hasattr(source, "close"):
            source.close()      # its reader thread stops before the spill is closed


def _clear_bits(words: np.ndarray, k0: int, k1: int) -> None:
    """Zero bits [k0, k1) of ``words`` in place."""
    if k1 <= k0:
        return
    w0, w1 = k0 >> 5, (k1 - 1) >> 5
    lo_mask = np.uint32((1 << (k0 & 31)) - 1)  # bits below k0 in word w0 survive
    hi_bits = (k1 - 1) & 31
    hi_mask = np.uint32(~((1 << (hi_bits + 1)) - 1) & 0xFFFFFFFF)  # bits above k1-1 survive
    if w0 == w1:
        words[w0] &= lo_mask | hi_mask
        return
    words[w0] &= lo_mask
    words[w0 + 1:w1] = 0
    words[w1] &= hi_mask


def _budget_beside(params, max_memory: int | None, volume_bytes: int) -> int:
    """What the median bands and filter batches may use of ``max_memory`` (default
    :data:`_DEFAULT_MAX_MEMORY`) beside the volume, which lives in host memory for the
    whole run. An explicit ``max_memory`` below the smallest unit of the work beside the
    volume (one detector row of every frame for the median, which gets a third; one frame
    for the filters, which get an eighth) warns once
    (:func:`nfjax.chunking.warn_below_budget`)."""
    from nfjax.chunking import warn_below_budget

    budget = _DEFAULT_MAX_MEMORY if max_memory is None else int(max_memory)
    if max_memory is not None:
        nf = _frames_per_distance(params)
        ny, nz = int(params.nr_pixels_y), int(params.nr_pixels_z)
        frame = _frame_work_bytes(ny, nz, _config(params))
        smallest = volume_bytes + max(3 * 2 * nf * ny, 8 * frame)
        if budget < smallest:
            warn_below_budget(budget, smallest)
    return max(budget - volume_bytes, budget // 4)


def process_distance(params, distance_index: int, *, progress: bool | None = True,
                     max_memory: int | None = None, scratch: Path | str | None = None):
    """Process one distance (0-based): returns (median image, lit volume).

    median image: uint16 (NZ, NY), unflipped (as the TIFF). lit volume: ObsVolume of shape
    (1, n_frames, NY, NZ) with host words (flipped y/z, SpotsInfo layout). ``scratch`` as
    in :func:`process_all`.
    """
    nf = _frames_per_distance(params)
    shape = (1, nf, int(params.nr_pixels_y), int(params.nr_pixels_z))
    vol = observe.empty(shape)
    median = _process_into(params, int(distance_index), vol.words, 0, progress=progress,
                           max_memory=_budget_beside(params, max_memory, vol.words.nbytes),
                           scratch=scratch)
    return median, vol


def process_all(params, distances: Sequence[int] | None = None, max_memory: int | None = None,
                *, base: observe.ObsVolume | None = None, progress: bool | None = True,
                median_dir_writer: Callable[[int, np.ndarray], None] | None = None,
                comm=None, scratch: Path | str | None = None) -> observe.ObsVolume:
    """Process the distances (0-based; default all) into one full-shape ObsVolume (host words).

    ``base``: an existing volume to update (its other distances are kept, the processed
    distances are cleared first, as MIDAS does per call); default an empty volume.
    ``median_dir_writer(L, median)`` is called with each distance's median image.
    ``comm`` (:class:`nfjax.parallel.Comm`) with several ranks: the ranks share the work
    of every distance (each its block of detector rows for the median, its block of
    frames for the spots), every rank passes the same ``base`` and returns the whole
    volume; progress is shown by rank 0 only. ``scratch``: the folder for a temporary copy
    of frames that are decoded whole (compressed in one strip, or in tiles) when the median
    reads them in row bands (default: the system's temporary folder; never a folder held
    in memory, such as a tmpfs /tmp).
    """
    nd = int(params.n_distances)
    nf = _frames_per_distance(params)
    shape = (nd, nf, int(params.nr_pixels_y), int(params.nr_pixels_z))
    distances = list(range(nd)) if distances is None else [int(L) for L in distances]
    for L in distances:
        if not 0 <= L < nd:
            raise NfjaxError(f"distance {L + 1}: expected 1..{nd} (nDistances), found {L + 1}")
    if base is not None and tuple(base.shape) != shape:
        raise ValueError(f"base volume shape {base.shape} != {shape}")
    words = observe.zero_words(observe.n_words(shape))
    if base is not None:
        words[:] = np.asarray(base.words, dtype=np.uint32)
    budget_left = _budget_beside(params, max_memory, words.nbytes)
    per_distance_bits = nf * shape[2] * shape[3]
    parallel = comm is not None and comm.size > 1
    if parallel and not comm.is_root:
        progress = False
    for L in distances:
        if base is not None:      # a fresh volume is zero already (and left untouched)
            _clear_bits(words, L * per_distance_bits, (L + 1) * per_distance_bits)
        median = _process_into(params, L, words, L * nf, progress=progress,
                               max_memory=budget_left, comm=comm, scratch=scratch)
        if median_dir_writer is not None:
            median_dir_writer(L, median)
    if parallel:
        # Each rank lit only its own frames: OR the processed distances' words together.
        comm.or_words(words, [(L * per_distance_bits >> 5,
                               (((L + 1) * per_distance_bits - 1) >> 5) + 1)
                              for L in distances])
    return observe.ObsVolume(words, shape)


def write_median_image(path, median: np.ndarray) -> None:
    """Raw little-endian uint16 (NZ, NY) rows, no header (MIDAS's median background file)."""
    with atomic_write(path, "wb") as fh:
        fh.write(np.ascontiguousarray(median, dtype="<u2").tobytes())


def run_process(args, params=None) -> int:
    """``nfjax process PARAMS [--distance L ...] [--max-memory SIZE] [-o SpotsInfo.bin]``."""
    from nfjax.chunking import parse_memory
    from nfjax.io.atomic import check_target
    from nfjax.parallel import bind_device, world
    from nfjax.params import read_params

    # Under mpiexec -n R the ranks share the frames (as MIDAS's ImageProcessingLibTiffOMP
    # splits them over nodes); rank 0 writes and reports. MPI starts first, so that an
    # error every rank meets is printed once (parallel.print_error).
    comm = world()
    if params is None:           # the CLI passes the file it read (and warned about)
        params = read_params(args.params)
    params.require("nDistances", "StartNr", "EndNr", "OrigFileName", "extOrig")
    max_memory = parse_memory(getattr(args, "max_memory", None))
    nd = int(params.n_distances)
    requested = getattr(args, "distance", None)
    if requested:
        for L in requested:
            if not 1 <= L <= nd:
                raise NfjaxError(f"--distance {L}: expected 1..{nd} (nDistances in "
                                 f"{params.source}), found {L}")
        distances = sorted(set(L - 1 for L in requested))
    else:
        distances = list(range(nd))
    out = Path(args.output) if getattr(args, "output", None) \
        else params.output_dir / "SpotsInfo.bin"
    shape = observe.spots_info_shape(params)
    # Every check before any work, so that a failure writes nothing.
    medians = {L: median_image_path(params, L) for L in distances}
    for target in (out, *medians.values()):
        check_target(target)
    check_frames(params, distances)
    if comm.size > 1:
        jax.config.update("jax_default_device", bind_device(comm)[0])
    base = None
    if len(distances) < nd:
        # Like MIDAS, processing some distances keeps the others of an existing file. Rank
        # 0 alone looks: another node may see the file's old state (or none).
        base = comm.share(observe.read_spots_info(out, shape)
                          if comm.is_root and out.exists() else None)
    kept = {}   # median images are written with SpotsInfo.bin, after every distance is done

    t0 = time.perf_counter()
    vol = process_all(params, distances, max_memory, base=base, progress=None,
                      median_dir_writer=kept.__setitem__, comm=comm, scratch=out.parent)
    if not comm.is_root:
        return 0
    observe.write_spots_info(out, vol)
    for L, median in kept.items():
        write_median_image(medians[L], median)
    dt = time.perf_counter() - t0
    nf = shape[1]
    lit_counts = lit_per_distance(vol)
    for L in distances:
        print(f"distance {L + 1}: {lit_counts[L]} lit pixels in {nf} frames; median image "
              f"{medians[L]}")
    for warning in lit_warnings(params, vol.shape, lit_counts, distances):
        print(f"warning: {warning}", file=sys.stderr)
    nframes = nf * len(distances)
    print(f"wrote {out} ({os.path.getsize(out)} bytes) in {dt:.1f} s "
          f"({nframes / dt:.1f} frames/s" + (f", {comm.size} ranks)" if comm.size > 1 else ")"))
    if base is None and len(distances) < nd:
        empty = [L + 1 for L in range(nd) if L not in distances]
        print(f"warning: {out} is new: distance(s) {', '.join(map(str, empty))} were not "
              "processed and are empty (no lit pixel); a fit needs every distance: run nfjax "
              f"process {' '.join(f'--distance {L}' for L in empty)} too", file=sys.stderr)
    return 0


def lit_fraction_warning(params, distance_index: int, lit: int, n_pixels: int) -> str | None:
    """A one-line warning when ``lit`` of the ``n_pixels`` pixels (all frames) of distance
    ``distance_index`` (0-based) exceeds :data:`LIT_FRACTION_WARNING`; None otherwise. It
    names the filter settings that decide what is lit, with their values."""
    if n_pixels <= 0 or lit <= LIT_FRACTION_WARNING * n_pixels:
        return None
    cfg = _config(params)
    keys = [f"BlanketSubtraction ({int(getattr(params, 'blanket_subtraction', 0) or 0)})",
            f"MedFiltRadius ({cfg['med_radius']})", f"DoLoGFilter ({cfg['do_log_filter']})"]
    if cfg["do_log_filter"]:
        radius, sigma = cfg["log_passes"][0]
        keys += [f"LoGMaskRadius ({radius})", f"GaussFiltRadius ({sigma:g})"]
    return (f"distance {distance_index + 1}: {100.0 * lit / n_pixels:.1f}% of all pixels are "
            f"lit (more than {LIT_FRACTION_WARNING:.0%} suggests background lit as spots); "
            f"check {', '.join(keys)} in {getattr(params, 'source', 'the parameter file')}")


def lit_warnings(params, shape, counts, distances=None) -> list[str]:
    """:func:`lit_fraction_warning` of each processed distance (0-based; default all) of an
    observation volume of ``shape`` with :func:`lit_per_distance` ``counts``."""
    per = int(np.prod(shape[1:]))
    distances = range(shape[0]) if distances is None else distances
    return [w for L in distances if (w := lit_fraction_warning(params, L, counts[L], per))]


def lit_per_distance(vol) -> list[int]:
    """Lit pixels of each distance of an observation volume, over all its frames."""
    per = int(np.prod(vol.shape[1:]))
    return [_count_bits(vol.words, L * per, (L + 1) * per) for L in range(vol.shape[0])]


def _count_bits(words: np.ndarray, k0: int, k1: int) -> int:
    """Set bits in [k0, k1)."""
    if k1 <= k0:
        return 0
    w0, w1 = k0 >> 5, (k1 - 1) >> 5
    seg = np.array(words[w0:w1 + 1], dtype=np.uint32)
    seg[0] &= np.uint32(~((1 << (k0 & 31)) - 1) & 0xFFFFFFFF)
    seg[-1] &= np.uint32((1 << (((k1 - 1) & 31) + 1)) - 1 & 0xFFFFFFFF)
    return int(np.bitwise_count(seg).sum(dtype=np.int64))
