"""Pixel maps of a mic: MIDAS ParseMic's ``.map``, ``.map.kam``, ``.map.grainId``, ``.map.grod``.

MIDAS's ``ParseMic`` writes, next to every text mic, the reconstruction resampled on a
square grid of 1 µm pixels, and three maps derived from it (reference §6.6). This module
builds them from mic records and writes them in ParseMic's layouts:

* ``<mic>.map``: the header ``[xSize, ySize, minX, minY]`` (float64), then seven planes of
  ``xSize·ySize`` float64 indexed ``posY·xSize + posX``: Confidence, Eul1, Eul2, Eul3
  (rad), OrientationRowNr, PhaseNr, and the distance from the pixel to its voxel. Pixels
  no voxel reaches hold -15.
* ``<mic>.map.kam``: the same header, then per pixel the mean misorientation (rad) to its
  assigned 8-neighbours; a neighbour owned by the same voxel counts (its misorientation
  is ~0). 0 for unassigned pixels and pixels without an assigned neighbour.
* ``<mic>.map.grainId``: grains as 8-connected groups of pixels, a neighbour joining when
  its misorientation is at most ``GBAngle``; labelled 1, 2, … in the raster order of each
  group's first pixel; 0 where unassigned.
* ``<mic>.map.grod``: per pixel the misorientation (rad) to its grain's reference pixel,
  the first pixel in raster order with the grain's highest confidence; 0 where unassigned.

How pixels are assigned (ParseMic's rules, kept on purpose so that the files match): the
extent of the voxels with a nonzero confidence, widened by ``edge + 25`` µm on each side,
where ``edge`` is field 5 of record 0 (the text mic's ``%TriEdgeSize``); ``xSize =
ceil(maxX) - floor(minX) + 1``. Each voxel at (x, y) reaches the pixels ``trunc(x) + j``,
``trunc(y) + k`` for integers ``j, k`` from ``trunc(-(edge + 5))`` to ``edge + 5``, at map
index ``trunc(j + trunc(x) - minX)``; its distance to that pixel is ParseMic's unbracketed
``sqrt((x - trunc(x) + j)² + (y - trunc(y) + k)²)`` (the sign of ``j``, ``k`` flipped: the
distance to the voxel mirrored about ``(trunc(x), trunc(y))``, at most 1.4 µm away). The
nearest voxel takes the pixel; on a tie the earlier record keeps it.

Misorientations are MIDAS's (:func:`nfjax.orientation.misorientation`, 5-decimal symmetry
tables). Differences from ParseMic, on purpose: the crystal symmetry is ``SGNr`` when the
parameter file sets it, else ``SpaceGroup`` (ParseMic reads only ``SGNr``, default 225, so a
hexagonal run without it gets cubic KAM and grains); KAM, grain membership and GROD use one
misorientation per pair of voxels (MIDAS computes it from each side, which can differ in the
last bit, and sums KAM in another order: the values agree to rounding, and a grain can
differ only for a misorientation equal to ``GBAngle`` to the last bit); PhaseNr is 1 when
unset (ParseMic's is uninitialised); a mic without a voxel of nonzero confidence gets no
maps (ParseMic writes a map of its 1e10 sentinels).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np

from nfjax.chunking import format_bytes, host_available_bytes
from nfjax.errors import NfjaxError

__all__ = ["MAP_SUFFIXES", "MicMaps", "pixel_maps", "write_maps", "read_map_file",
           "map_paths", "map_symmetry"]

MAP_SUFFIXES = (".map", ".map.kam", ".map.grainId", ".map.grod")
UNASSIGNED = -15.0        # ParseMic's fill for pixels no voxel reaches
_MARGIN = 25.0            # µm beyond edge around the voxels' extent
_REACH = 5.0              # µm beyond edge that a voxel's pixel window reaches
# The 8 neighbours as (dy, dx); the first four are the "forward" half (each unordered pair
# of neighbouring pixels appears once among them).
_FORWARD = ((0, 1), (1, -1), (1, 0), (1, 1))
_NEIGHBOURS = _FORWARD + tuple((-dy, -dx) for dy, dx in _FORWARD)
# Candidate (pixel, voxel) pairs per rasterising step, and orientation pairs per
# misorientation call (always this many, padded: one compiled shape).
_RASTER_BATCH = 2_000_000
_PAIR_BATCH = 8192
# Peak host memory of the maps per map pixel (the neighbour pairs of four directions, the
# grain labelling and the seven planes; measured ~400 B on a filled map), and per
# candidate (pixel, voxel) pair of one voxel's window.
_BYTES_PER_PIXEL = 500
_BYTES_PER_CANDIDATE = 48


@dataclasses.dataclass(frozen=True, eq=False)
class MicMaps:
    """The pixel maps of one mic; every 2-D array is ``(y_size, x_size)``, row-major
    (index ``posY·x_size + posX``, as the files).

    Attributes:
      x_size, y_size: map size in 1 µm pixels.
      min_x, min_y: µm position of pixel (0, 0) as ParseMic's header has it (the voxels'
        minimum less ``edge + 25``, not rounded).
      owner: record row of the voxel that owns each pixel, -1 where none.
      distance: µm, ParseMic's distance from the pixel to its owner (0 where none).
      kam: rad, mean misorientation to the assigned 8-neighbours.
      grain_id: 1.. grain labels, 0 where unassigned.
      grod: rad, misorientation to the grain's reference pixel.
      n_grains: number of grain labels.
      space_group: the symmetry used for the misorientations.
      gb_angle: degrees, the grain boundary threshold.
    """

    x_size: int
    y_size: int
    min_x: float
    min_y: float
    owner: np.ndarray
    distance: np.ndarray
    kam: np.ndarray
    grain_id: np.ndarray
    grod: np.ndarray
    n_grains: int
    space_group: int
    gb_angle: float

    def summary(self) -> str:
        """``"G grain(s) at GBAngle A deg (space group S) on X x Y pixels of 1 um"``."""
        return (f"{self.n_grains} grain(s) at GBAngle {self.gb_angle:g} deg (space group "
                f"{self.space_group}) on {self.x_size} x {self.y_size} pixels of 1 um")

    @property
    def header(self) -> np.ndarray:
        return np.array([self.x_size, self.y_size, self.min_x, self.min_y], dtype=np.float64)

    def planes(self, records: np.ndarray, phase_nr: int = 1) -> np.ndarray:
        """The ``.map`` planes ``(7, y_size, x_size)``: Confidence, Eul1-3, OrientationRowNr,
        PhaseNr, distance; -15 where unassigned."""
        rec = np.asarray(records, dtype=np.float64)
        out = np.full((7,) + self.owner.shape, UNASSIGNED, dtype=np.float64)
        hit = self.owner >= 0
        rows = self.owner[hit]
        for plane, col in enumerate((10, 7, 8, 9, 0)):
            out[plane][hit] = rec[rows, col]
        out[5][hit] = float(phase_nr)
        out[6][hit] = self.distance[hit]
        return out


def map_paths(mic_path: str | os.PathLike) -> list[Path]:
    """The four files ParseMic writes beside the text mic ``mic_path``."""
    return [Path(str(mic_path) + s) for s in MAP_SUFFIXES]


def map_symmetry(params) -> int:
    """The space group for the maps' misorientations: ``SGNr`` when the parameter file sets
    it (the key ParseMic reads), else ``SpaceGroup``."""
    if params is None:
        return 225
    if "SGNr" in getattr(params, "lines", {}):
        return int(params.sg_nr)
    return int(params.space_group or 225)


# --------------------------------------------------------------------------- raster
def _window(edge: float) -> np.ndarray:
    """ParseMic's loop ``for (j = -(edge + 5); j <= edge + 5; j++)`` with an integer ``j``
    (the start truncated toward zero)."""
    reach = edge + _REACH
    return np.arange(math.trunc(-reach), math.floor(reach) + 1, dtype=np.int64)


def _raster(records: np.ndarray, edge: float):
    """(x_size, y_size, min_x, min_y, owner, distance) for the records with a nonzero
    confidence, as ParseMic assigns pixels (see the module notes)."""
    rows = np.flatnonzero(records[:, 10] != 0)
    x = records[rows, 3]
    y = records[rows, 4]
    min_x = float(x.min()) - (edge + _MARGIN)
    max_x = float(x.max()) + (edge + _MARGIN)
    min_y = float(y.min()) - (edge + _MARGIN)
    max_y = float(y.max()) + (edge + _MARGIN)
    x_size = int(math.ceil(max_x) - math.floor(min_x) + 1)
    y_size = int(math.ceil(max_y) - math.floor(min_y) + 1)
    win = _window(edge)
    need = _BYTES_PER_PIXEL * x_size * y_size + _BYTES_PER_CANDIDATE * win.size ** 2
    have = host_available_bytes()
    if need > have:
        raise NfjaxError(
            f"the maps would be {x_size} x {y_size} pixels of 1 µm with a {win.size} x "
            f"{win.size} pixel window per voxel (edge {edge:g} µm), about {format_bytes(need)}"
            f" of memory where {format_bytes(have)} is available: the voxels span x "
            f"{x.min():g}..{x.max():g}, y {y.min():g}..{y.max():g} µm")
    jj, kk = np.meshgrid(win, win, indexing="ij")      # j (x) outer, k (y) inner
    jj = jj.ravel().astype(np.float64)
    kk = kk.ravel().astype(np.float64)
    size = x_size * y_size
    ix = np.trunc(x)
    iy = np.trunc(y)
    step = max(1, _RASTER_BATCH // jj.size)

    def candidates():
        """(pixel, distance, record) of every voxel's window, a batch of voxels at a time."""
        for a in range(0, rows.size, step):
            b = min(rows.size, a + step)
            # ParseMic: posX = (int)(-minX + (intX + j)); CalcNorm2(x, intX + j, y, intY + k)
            # expands to sqrt((x - intX + j)^2 + (y - intY + k)^2).
            px = np.trunc(-min_x + (ix[a:b, None] + jj[None, :])).astype(np.int64)
            py = np.trunc(-min_y + (iy[a:b, None] + kk[None, :])).astype(np.int64)
            dx = (x[a:b, None] - ix[a:b, None]) + jj[None, :]
            dy = (y[a:b, None] - iy[a:b, None]) + kk[None, :]
            yield ((py * x_size + px).ravel(), np.sqrt(dx * dx + dy * dy).ravel(),
                   np.repeat(rows[a:b], jj.size))

    # The nearest voxel takes a pixel; of equally near ones the earlier record (ParseMic
    # replaces an owner only when strictly nearer).
    dist = np.full(size, np.inf, dtype=np.float64)
    for pix, d, _ in candidates():
        np.minimum.at(dist, pix, d)
    owner = np.full(size, np.iinfo(np.int64).max, dtype=np.int64)
    for pix, d, who in candidates():
        best = d == dist[pix]
        np.minimum.at(owner, pix[best], who[best])
    unowned = ~np.isfinite(dist)
    owner[unowned] = -1
    dist[unowned] = 0.0
    return x_size, y_size, min_x, min_y, owner, dist


# --------------------------------------------------------------------------- orientations
def _quaternions(records: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp

    from nfjax.orientation import euler_to_quat

    return np.asarray(euler_to_quat(jnp.asarray(records[:, 7:10], dtype=jnp.float64)))


class _PairMisorientation:
    """MIDAS misorientations (rad) of pairs of records, in padded batches."""

    def __init__(self, quats: np.ndarray, space_group: int):
        import jax.numpy as jnp

        from nfjax.crystal import symmetry_quaternions

        self._q = quats
        self._sym = jnp.asarray(symmetry_quaternions(space_group), dtype=jnp.float64)

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        import jax.numpy as jnp

        from nfjax.orientation import misorientation

        out = np.empty(a.size, dtype=np.float64)
        for s in range(0, a.size, _PAIR_BATCH):
            e = min(a.size, s + _PAIR_BATCH)
            n = e - s
            ia = np.zeros(_PAIR_BATCH, dtype=np.int64)
            ib = np.zeros(_PAIR_BATCH, dtype=np.int64)
            ia[:n], ib[:n] = a[s:e], b[s:e]
            ang = misorientation(jnp.asarray(self._q[ia]), jnp.asarray(self._q[ib]), self._sym)
            out[s:e] = np.asarray(ang)[:n]
        return out


def _shifted(shape: tuple[int, int], dy: int, dx: int):
    """Slices ``(here, there)`` of a ``shape`` array pairing each pixel with its neighbour
    at ``(+dy, +dx)`` (pixels whose neighbour is off the map are left out)."""
    ny, nx = shape

    def span(d, n):
        return (slice(0, n - d), slice(d, n)) if d >= 0 else (slice(-d, n), slice(0, n + d))

    (y0, y1), (x0, x1) = span(dy, ny), span(dx, nx)
    return (y0, x0), (y1, x1)


def _neighbour_misorientation(owner2: np.ndarray, mis: _PairMisorientation, n_rec: int):
    """For each forward direction: the flat indices of both pixels of every assigned pair
    and their misorientation (rad). Pairs of one voxel get that voxel's misorientation to
    itself (~0, as MIDAS computes it); other voxel pairs are computed once each."""
    shape = owner2.shape
    flat = np.arange(owner2.size, dtype=np.int64).reshape(shape)
    per_dir = []
    keys = []
    for dy, dx in _FORWARD:
        here, there = _shifted(shape, dy, dx)
        a, b = owner2[here].ravel(), owner2[there].ravel()
        ok = (a >= 0) & (b >= 0)
        pa, pb = flat[here].ravel()[ok], flat[there].ravel()[ok]
        a, b = a[ok], b[ok]
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        per_dir.append((pa, pb, lo, hi))
        keys.append(lo[lo != hi] * n_rec + hi[lo != hi])
    uniq = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    pair_mis = mis(uniq // n_rec, uniq % n_rec)
    voxels = np.unique(owner2[owner2 >= 0])
    self_mis = np.zeros(n_rec, dtype=np.float64)
    self_mis[voxels] = mis(voxels, voxels)
    out = []
    for pa, pb, lo, hi in per_dir:
        m = self_mis[lo].copy()
        diff = lo != hi
        m[diff] = pair_mis[np.searchsorted(uniq, lo[diff] * n_rec + hi[diff])]
        out.append((pa, pb, m))
    return out


def _kam(size: int, pairs) -> np.ndarray:
    total = np.zeros(size, dtype=np.float64)
    count = np.zeros(size, dtype=np.float64)
    for pa, pb, m in pairs:      # each pair counts for both of its pixels
        for p in (pa, pb):
            total += np.bincount(p, weights=m, minlength=size)
            count += np.bincount(p, minlength=size)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def _gb_limit(gb_angle: float) -> float:
    """GBAngle in radians: neighbours misoriented by at most this are one grain."""
    return math.radians(float(gb_angle))


def _components(size: int, assigned: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components of the pixels joined by edges ``u``–``v``: each assigned pixel
    gets the smallest flat index of its component (-1 where unassigned)."""
    parent = np.arange(size, dtype=np.int64)
    while u.size:
        pu, pv = parent[u], parent[v]
        live = pu != pv
        u, v, pu, pv = u[live], v[live], pu[live], pv[live]
        if not u.size:
            break
        # Hook the larger root onto the smaller, then compress every path to its root
        # (parents only ever point to smaller indices, so this is a forest).
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
    return np.where(assigned, parent, -1)


def pixel_maps(records, edge: float, *, space_group: int = 225,
               gb_angle: float = 5.0) -> MicMaps | None:
    """ParseMic's pixel maps of ``records`` (``(N, 11)`` mic records in binary column order,
    holes allowed) with voxel edge ``edge`` µm (field 5 of record 0 of a binary mic, the
    ``%TriEdgeSize`` of a text one). ``space_group`` sets the symmetry of the
    misorientations and ``gb_angle`` (degrees) the grain boundary. Returns ``None`` when no
    record has a nonzero confidence.
    """
    rec = np.asarray(records, dtype=np.float64)
    if rec.ndim != 2 or rec.shape[1] < 11:
        raise NfjaxError(f"expected (N, 11) mic records, found shape {rec.shape}")
    if not (np.isfinite(edge) and edge >= 0):
        raise NfjaxError(f"the voxel edge for the maps must be a finite number >= 0 µm, "
                         f"found {edge!r}")
    if not (np.isfinite(gb_angle) and gb_angle > 0):
        raise NfjaxError(f"the grain boundary angle (GBAngle) must be a number of degrees "
                         f"> 0, found {gb_angle!r}")
    valid = rec[:, 10] != 0
    if not np.any(valid):
        return None
    if not np.all(np.isfinite(rec[valid][:, 3:5])):
        bad = int(np.flatnonzero(valid & ~np.isfinite(rec[:, 3:5]).all(axis=1))[0])
        raise NfjaxError(f"mic record {bad}: expected a finite X and Y (µm), found "
                         f"{float(rec[bad, 3])!r}, {float(rec[bad, 4])!r}")
    x_size, y_size, min_x, min_y, owner, dist = _raster(rec, float(edge))
    shape = (y_size, x_size)
    size = x_size * y_size
    owner2 = owner.reshape(shape)
    mis = _PairMisorientation(_quaternions(rec), int(space_group))
    pairs = _neighbour_misorientation(owner2, mis, rec.shape[0])
    kam = _kam(size, pairs)

    limit = _gb_limit(gb_angle)
    u = np.concatenate([pa[m <= limit] for pa, _, m in pairs])
    v = np.concatenate([pb[m <= limit] for _, pb, m in pairs])
    assigned = owner >= 0
    root = _components(size, assigned, u, v)
    roots = np.unique(root[assigned])          # ascending: raster order of first pixels
    grain = np.zeros(size, dtype=np.int64)
    grain[assigned] = np.searchsorted(roots, root[assigned]) + 1

    # Each grain's reference: its first pixel (raster order) of highest confidence.
    pix = np.flatnonzero(assigned)
    lab = grain[pix]
    conf = rec[owner[pix], 10]
    order = np.lexsort((pix, -conf, lab))
    lab_sorted = lab[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = lab_sorted[1:] != lab_sorted[:-1]
    ref_voxel = np.zeros(roots.size + 1, dtype=np.int64)
    ref_voxel[lab_sorted[first]] = owner[pix[order[first]]]
    vox, ref = owner[pix], ref_voxel[lab]
    key = np.minimum(vox, ref) * rec.shape[0] + np.maximum(vox, ref)
    uniq, inv = np.unique(key, return_inverse=True)
    grod = np.zeros(size, dtype=np.float64)
    grod[pix] = mis(uniq // rec.shape[0], uniq % rec.shape[0])[inv.ravel()]

    return MicMaps(x_size=x_size, y_size=y_size, min_x=min_x, min_y=min_y,
                   owner=owner2, distance=dist.reshape(shape), kam=kam.reshape(shape),
                   grain_id=grain.reshape(shape), grod=grod.reshape(shape),
                   n_grains=int(roots.size), space_group=int(space_group),
                   gb_angle=float(gb_angle))


def write_maps(mic_path: str | os.PathLike, maps: MicMaps, records,
               phase_nr: int = 1) -> list[Path]:
    """Write ``<mic_path>.map``, ``.map.kam``, ``.map.grainId`` and ``.map.grod`` (float64,
    little-endian, ParseMic's layouts) together and atomically. Returns their paths."""
    from nfjax.io.atomic import atomic_write_many

    paths = map_paths(mic_path)
    head = maps.header.astype("<f8").tobytes()
    bodies = (maps.planes(records, phase_nr), maps.kam, maps.grain_id.astype(np.float64),
              maps.grod)
    with atomic_write_many(paths, "wb") as handles:
        for fh, body in zip(handles, bodies):
            fh.write(head)
            fh.write(np.ascontiguousarray(body, dtype="<f8").tobytes())
    return paths


def read_map_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one ParseMic map file: ``(header [xSize, ySize, minX, minY], planes (P, ySize,
    xSize))``, P = 7 for ``.map`` and 1 for the others."""
    from nfjax.errors import InputFileError
    from nfjax.io import read_bytes

    p = Path(path)
    raw = read_bytes(p, "ParseMic map file")
    if len(raw) < 32 or len(raw) % 8:
        raise InputFileError(f"{p}: expected a 32-byte header and float64 planes, found "
                             f"{len(raw)} bytes")
    data = np.frombuffer(raw, dtype="<f8")
    xs, ys = float(data[0]), float(data[1])
    body = data.size - 4
    if not (1 <= xs <= body and 1 <= ys <= body and xs.is_integer() and ys.is_integer()):
        raise InputFileError(f"{p}: the header's map size must be two whole numbers >= 1 "
                             f"that fit the {body} values after it, found {xs!r} x {ys!r}")
    size = int(xs) * int(ys)
    if body % size:
        raise InputFileError(f"{p}: {body} values after the header are not whole planes of "
                             f"{int(xs)} x {int(ys)}")
    return data[:4].copy(), data[4:].reshape(body // size, int(ys), int(xs)).copy()
