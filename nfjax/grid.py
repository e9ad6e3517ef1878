"""The reconstruction grid: MIDAS's hexagonal lattice of triangular probe voxels.

This module owns the grid table (``(N, 5)`` float64, columns ``y1 y2 xs ys gs``, all in µm,
as MIDAS's ``grid.txt`` holds them), the masks that shrink it (``GridMask`` bounds and the
tomography image of ``filterGridfromTomo``), and the triangle each row stands for, rebuilt
exactly as MIDAS's fitter rebuilds it. ``make_hex_grid`` reproduces ``MakeHexGrid`` value for
value, including its quirks (reference §4.1, §12 item 24: upper-half triangles mirrored,
lower-half rows shifted by G/2), because the grid positions are part of the file format: a
MIDAS mic and an nfjax mic must be comparable row by row. It never parses parameter files
(``grid_from_params`` takes a parsed ``Params``), reads no file but the tomography image,
and never writes files (see :mod:`nfjax.io.gridfile`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from nfjax.errors import InputFileError, NfjaxError, ParamError

__all__ = [
    "make_hex_grid",
    "grid_from_params",
    "apply_grid_mask",
    "apply_tomo_mask",
    "triangle_vertices",
    "up_down",
    "round_as_written",
    "read_tomo_image",
    "tomo_keep",
]

GRID_COLUMNS = ("y1", "y2", "xs", "ys", "gs")
# Largest grid built: 50 million rows are 2 GB as float64 (more while building and writing)
# and far more voxels than a fit can score in reasonable time.
_MAX_GRID_ROWS = 50_000_000


def round_as_written(values: np.ndarray) -> np.ndarray:
    """Round float64 values exactly as a ``%f`` write and a ``%lf`` re-read would.

    MIDAS's fitter never sees MakeHexGrid's doubles, only the 6-decimal text of
    ``grid.txt``; to score the same triangles in memory nfjax applies the same rounding.
    Python's ``'%f'`` and glibc's ``printf`` both round the exact binary value half-to-even,
    and ``float()`` / ``strtod`` are both correctly rounded, so the result is bit-identical.
    The grid has few distinct values per column, so only the unique values are formatted.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values.copy()
    uniq, inverse = np.unique(values, return_inverse=True)
    rounded = np.array([float("%f" % v) for v in uniq.tolist()], dtype=np.float64)
    return rounded[inverse].reshape(values.shape)


def make_hex_grid(grid_size: float, edge_length: float, rsample: float, *,
                  as_written: bool = True) -> np.ndarray:
    """MIDAS ``MakeHexGrid``: the full hexagon of triangular voxels, in MIDAS's row order.

    Args:
      grid_size: G, edge of the lattice triangles (µm), > 0.
      edge_length: E, edge of the probe triangle (µm); 0 means E = G (MIDAS's default).
      rsample: R, inscribed radius of the hexagon (µm), > 0.
      as_written: if True (default) every value is rounded as MIDAS's ``%f`` ``grid.txt``
        and the fitter's re-read leave it, so in-memory triangles equal MIDAS's.

    Returns:
      ``(N, 5)`` float64, columns ``y1 y2 xs ys gs`` (µm), N = 6·ceil(2R/(√3·G))².
      A grid of more than 50 million rows is refused (ParamError) before it is built.
    """
    grid_size = float(grid_size)
    edge_length = float(edge_length)
    rsample = float(rsample)
    if not (math.isfinite(grid_size) and grid_size > 0):
        raise ParamError(f"GridSize must be a positive number of µm, found {grid_size!r}")
    if not (math.isfinite(rsample) and rsample > 0):
        raise ParamError(f"Rsample must be a positive number of µm, found {rsample!r}")
    if not (math.isfinite(edge_length) and edge_length >= 0):
        raise ParamError(f"EdgeLength must be >= 0 µm (0 means GridSize), found {edge_length!r}")
    if edge_length == 0:
        edge_length = grid_size

    # Expression order follows MakeHexGrid.c so every double is the same bit pattern.
    sqrt3 = math.sqrt(3.0)
    a_large = (2 * rsample) / sqrt3
    ht = (sqrt3 * grid_size) / 2
    nr_hex = math.ceil(a_large / grid_size)
    n_rows = 6 * nr_hex * nr_hex
    if n_rows > _MAX_GRID_ROWS:
        raise ParamError(f"Rsample {rsample:g} µm with GridSize {grid_size:g} µm would make "
                         f"{n_rows} grid rows (at most {_MAX_GRID_ROWS // 1_000_000} million "
                         "are built); raise GridSize or lower Rsample")
    a_last = grid_size * nr_hex
    ysmall = ht * (1.0 / 3.0)
    ybig = ht * (2.0 / 3.0)
    xt1 = edge_length * sqrt3 / 6
    xt2 = edge_length * sqrt3 * 2 / 6
    half_edge = edge_length / 2

    rows = []
    for i in list(range(-nr_hex, 0)) + list(range(1, nr_hex + 1)):
        n_row = 2 * (2 * nr_hex - abs(i)) + 1
        ythis = ht * i
        xstart = -a_last + (abs(i) * grid_size * 0.5)
        if i < 0:
            xstart += grid_size * 0.5
        j = np.arange(n_row, dtype=np.float64)
        # The "big" state starts True for i < 0 and toggles with every j.
        big = (np.arange(n_row) % 2 == 0) == (i < 0)
        yoff = np.where(big, ybig, ysmall)
        block = np.empty((n_row, 5), dtype=np.float64)
        block[:, 0] = np.where(big, xt2, xt1)
        block[:, 1] = np.where(big, xt1, xt2)
        block[:, 2] = xstart + (grid_size * j) / 2
        # C evaluates ythis - (ynext * i / fabs(i)): multiply first, then divide.
        block[:, 3] = ythis - (yoff * float(i)) / float(abs(i))
        block[:, 4] = half_edge
        rows.append(block)
    grid = np.concatenate(rows, axis=0)
    if as_written:
        grid = np.column_stack([round_as_written(grid[:, k]) for k in range(5)])
    return grid


def apply_grid_mask(grid: np.ndarray, mask4) -> np.ndarray:
    """Keep rows with ``xmin <= xs <= xmax`` and ``ymin <= ys <= ymax`` (inclusive, µm).

    ``mask4`` is ``(xmin, xmax, ymin, ymax)``, the four numbers of the ``GridMask`` key (the
    Au example's comment calls them "ymin ymax zmin zmax": they bound columns xs and ys).
    Row order is kept.
    """
    grid = _check_grid(grid)
    if mask4 is None or len(mask4) != 4:
        raise ParamError(f"GridMask needs 4 numbers (xmin xmax ymin ymax), found {mask4!r}")
    xmin, xmax, ymin, ymax = (float(v) for v in mask4)
    keep = ((grid[:, 2] >= xmin) & (grid[:, 2] <= xmax)
            & (grid[:, 3] >= ymin) & (grid[:, 3] <= ymax))
    return grid[keep]


def read_tomo_image(tomo_path: str | os.PathLike) -> np.ndarray:
    """Read a raw square uint8 tomography image (``filterGridfromTomo`` input) as ``(n, n)``."""
    path = Path(tomo_path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputFileError(f"{path}: tomography image (TomoImage) not found") from None
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read tomography image: {exc.strerror}") from None
    size = len(raw)
    if size == 0:
        raise InputFileError(f"{path}: tomography image is empty (0 bytes); expected a raw "
                             "square uint8 image of n*n bytes")
    n = math.isqrt(size)
    if n * n != size:
        # MIDAS takes n = floor(sqrt(size)) and freads the whole file into n*n bytes (a
        # buffer overrun); a non-square size means the wrong file, so say so.
        raise InputFileError(f"{path}: tomography image must be a raw square uint8 image "
                             f"(n*n bytes), found {size} bytes (not a perfect square)")
    return np.frombuffer(raw, dtype=np.uint8).reshape(n, n)


def tomo_keep(grid: np.ndarray, tomo: np.ndarray, tomo_pixel_size: float) -> np.ndarray:
    """Boolean keep-mask of ``grid`` rows inside the non-zero part of a ``(n, n)`` tomo image.

    Pixel indices as ``filterGridfromTomo``: ``xPos = int(x/px + n/2)``,
    ``yPos = int(y/px + n/2)`` with C truncation toward zero, kept when both lie in
    ``[0, n)`` and the pixel is non-zero. The image row is ``n - 1 - yPos`` (y flipped).
    MIDAS reads row ``n - yPos``, one row off, which for yPos = 0 reads past the end of the
    image (reference §12 item 25); nfjax uses the in-bounds flip the code intends, so a mask
    differs from MIDAS's by one image row (listed in docs/midas-differences.md).
    """
    grid = _check_grid(grid)
    px = float(tomo_pixel_size)
    if not (math.isfinite(px) and px > 0):
        raise ParamError(f"TomoPixelSize must be a positive number of µm, found {px!r}")
    n = tomo.shape[0]
    fx = np.trunc(grid[:, 2] / px + n / 2.0)
    fy = np.trunc(grid[:, 3] / px + n / 2.0)
    inside = (fx >= 0) & (fy >= 0) & (fx < n) & (fy < n)
    keep = np.zeros(grid.shape[0], dtype=bool)
    xi = fx[inside].astype(np.int64)
    yi = fy[inside].astype(np.int64)
    keep[inside] = tomo[n - 1 - yi, xi] != 0
    return keep


def apply_tomo_mask(grid: np.ndarray, tomo_path: str | os.PathLike,
                    tomo_pixel_size: float) -> np.ndarray:
    """Keep the grid rows whose centroid falls on a non-zero pixel of the tomography image.

    ``tomo_path`` is a raw square uint8 image (n·n bytes), ``tomo_pixel_size`` its pixel in
    µm, the image centred on the rotation axis. See :func:`tomo_keep` for the pixel rule.
    """
    return _check_grid(grid)[tomo_keep(grid, read_tomo_image(tomo_path), tomo_pixel_size)]


def grid_from_params(params) -> np.ndarray:
    """The grid a parameter file asks for: MakeHexGrid, then the tomography or GridMask filter.

    Uses ``params.grid_size``, ``edge_length`` (0/None means GridSize), ``rsample``,
    ``tomo_image`` with ``tomo_pixel_size`` (takes precedence, as in MIDAS's drivers), else
    ``grid_mask``. ``GridPoints`` are calibration inputs, not a grid filter, and are ignored.
    Returns the as-written ``(N, 5)`` float64 grid; raises NfjaxError if nothing is left.
    """
    source = getattr(params, "source", None) or "<params>"
    grid_size = getattr(params, "grid_size", None)
    rsample = getattr(params, "rsample", None)
    for key, value in (("GridSize", grid_size), ("Rsample", rsample)):
        if value is None:
            require = getattr(params, "require", None)
            if callable(require):
                require(key, why="to build the grid (MakeHexGrid)")
            raise ParamError(f"{source}: key {key} is required to build the grid, "
                             "but it is missing")
    edge = getattr(params, "edge_length", None) or 0.0
    try:
        grid = make_hex_grid(grid_size, edge, rsample, as_written=True)
    except ParamError as exc:
        raise ParamError(f"{source}: {exc}") from None

    tomo_image = getattr(params, "tomo_image", None)
    grid_mask = getattr(params, "grid_mask", None)
    if tomo_image:
        px = getattr(params, "tomo_pixel_size", None)
        if px is None:
            raise ParamError(f"{source}: TomoImage is set but TomoPixelSize is missing")
        resolve = getattr(params, "resolve", None)
        tomo_path = resolve(tomo_image) if callable(resolve) else tomo_image
        n_before = grid.shape[0]
        grid = apply_tomo_mask(grid, tomo_path, px)
        if grid.shape[0] == 0:
            raise NfjaxError(f"{source}: grid is empty after the tomography mask (TomoImage "
                             f"{tomo_path}, TomoPixelSize {float(px):g} µm): none of the "
                             f"{n_before} grid points lies on a non-zero pixel")
    elif grid_mask is not None:
        n_before = grid.shape[0]
        grid = apply_grid_mask(grid, grid_mask)
        if grid.shape[0] == 0:
            lo_hi = " ".join(f"{float(v):g}" for v in grid_mask)
            raise NfjaxError(f"{source}: grid is empty after GridMask ({lo_hi}): none of the "
                             f"{n_before} grid points has xmin <= x <= xmax and "
                             "ymin <= y <= ymax")
    return grid


def up_down(grid: np.ndarray) -> np.ndarray:
    """``(N,)`` float64 UpDown flag as the fitter sets it: −1 if y1 > y2 else +1."""
    grid = _check_grid(grid)
    return np.where(grid[:, 0] > grid[:, 1], -1.0, 1.0)


def triangle_vertices(grid: np.ndarray) -> np.ndarray:
    """``(N, 3, 2)`` float64 triangle vertices (x, y) in µm, as MIDAS's fitter builds them.

    From a row ``y1 y2 xs ys gs``: if y1 > y2 (UD = −1) ``V0 = (xs, ys − y1)``,
    ``V1 = (xs − gs, ys + y2)``, ``V2 = (xs + gs, ys + y2)``; otherwise (UD = +1)
    ``V0 = (xs, ys + y2)``, ``V1 = (xs − gs, ys − y1)``, ``V2 = (xs + gs, ys − y1)``.
    The vertex order matters downstream (the rasteriser depends on winding).
    """
    grid = _check_grid(grid)
    y1, y2, xs, ys, gs = (grid[:, k] for k in range(5))
    down = y1 > y2
    verts = np.empty((grid.shape[0], 3, 2), dtype=np.float64)
    verts[:, 0, 0] = xs
    verts[:, 0, 1] = np.where(down, ys - y1, ys + y2)
    verts[:, 1, 0] = xs - gs
    verts[:, 2, 0] = xs + gs
    base = np.where(down, ys + y2, ys - y1)
    verts[:, 1, 1] = base
    verts[:, 2, 1] = base
    return verts


def _check_grid(grid) -> np.ndarray:
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 2 or grid.shape[1] != 5:
        raise ValueError(f"grid must have shape (N, 5) (y1 y2 xs ys gs), not {grid.shape}")
    return grid
