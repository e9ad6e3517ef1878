"""Render a microstructure (mic) into an observation volume (MIDAS ``simulateNF``).

Owns the simulation workflow: mic rows → probe triangles and orthogonalised orientation
matrices → :mod:`nfjax.forward` footprints for every (voxel, spot) → lit bits of the
``[distance, frame, y, z]`` volume, chunked over voxels so memory stays bounded, with a
progress bar; optionally raw-like TIFF frames for testing image processing end to end;
and the whole-map comparison (:class:`WholeMap`: every voxel of a map rendered as its grid
triangle and counted against the observations, for ``nfjax calibrate --whole-map``).
Differences from simulateNF (listed in ``docs/midas-differences.md``): a footprint pixel
lights every distance at which it is on the detector (simulateNF stops at the first
distance where it is off), and hits are bits, not uint16 counters.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nfjax import observe
from nfjax.chunking import chunk_size, map_chunked
from nfjax.errors import NfjaxError
from nfjax.forward import bit_indices, bragg_v, footprint_box, predict_spots, spot_footprint
from nfjax.geometry import Geometry, geometry_from_params, tilt_matrix
from nfjax.grid import triangle_vertices
from nfjax.orientation import euler_to_matrix_midas


def mic_grid_rows(records: np.ndarray) -> np.ndarray:
    """Grid rows ``(N,5)`` (y1 y2 xs ys gs) of the probe triangles of mic records.

    From the mic columns X, Y, TriEdgeSize E and UpDown as simulateNF rebuilds them: offsets
    E/(2√3) and E/√3 (apex up for UD > 0, down otherwise), half-edge E/2.
    """
    records = np.asarray(records, np.float64)
    x, y, edge, ud = records[:, 3], records[:, 4], records[:, 5], records[:, 6]
    small, big = edge / (2 * math.sqrt(3)), edge / math.sqrt(3)
    up = ud >= 0
    y1 = np.where(up, small, big)
    y2 = np.where(up, big, small)
    return np.stack([y1, y2, x, y, edge / 2], axis=1)


def select_rendered(records: np.ndarray, min_confidence: float | None) -> np.ndarray:
    """MIDAS's rule: only voxels with confidence ≥ MinConfidence when MinConfidence > 0."""
    if min_confidence is not None and min_confidence > 0:
        return records[records[:, 10] >= min_confidence]
    return records


def _voxel_hits(geom: Geometry, eul, verts, g, theta, v, box: int, spots=None, keep=None):
    """Footprint bits of one voxel: ``(bits (S,P,D), lit (S,P,D))`` for Euler angles ``eul
    (3,)`` rad and probe triangle ``verts (3,2)`` µm. ``spots (K,)`` optionally picks the
    predicted spots to render (with ``keep (K,)`` masking padding); default all ``2R``."""
    sp = predict_spots(euler_to_matrix_midas(eul), g, theta, geom, v=v)
    yl, zl, omega, ok = sp.yl, sp.zl, sp.omega, sp.valid
    if spots is not None:
        yl, zl, omega, ok = yl[spots], zl[spots], omega[spots], ok[spots] & keep
    rt = tilt_matrix(geom.tilts)
    fp = jax.vmap(lambda a, b, c: spot_footprint(verts, a, b, c, geom, box, rt))(yl, zl, omega)
    bits = jax.vmap(lambda f: bit_indices(f, geom))(fp)
    lit = (ok & fp.frame_ok)[:, None, None] & fp.pix_ok[:, :, None] & fp.in_range
    return bits, lit


def _voxel_hits_fn(g, theta, geom: Geometry, box: int):
    """Jitted ``(eulers (C,3), verts (C,3,3,2)) → (bits (C,S,P,D), lit (C,S,P,D))``."""
    v = bragg_v(g, theta)
    return jax.jit(jax.vmap(lambda e, vv: _voxel_hits(geom, e, vv, g, theta, v, box)))


def render_bits(eulers: np.ndarray, verts: np.ndarray, g: np.ndarray, theta: np.ndarray,
                geom: Geometry, *, edge_length: float, max_memory=None,
                progress=None) -> np.ndarray:
    """Sorted unique bit indices lit by voxels of Euler angles ``eulers (N,3)`` (rad) and
    probe triangles ``verts (N,3,2)`` µm; ``g (R,3)``, ``theta (R,)`` the reflections."""
    box = footprint_box(float(edge_length), float(np.asarray(geom.px)))
    fn = _voxel_hits_fn(jnp.asarray(g, jnp.float64), jnp.asarray(theta, jnp.float64),
                        geom.astype(jnp.float64), box)
    per_voxel = 2 * len(theta) * box * box * geom.n_distances * (8 + 1) * 4
    chunk = chunk_size(len(eulers), per_voxel, max_memory, maximum=4096)

    def collect(out, k):
        bits, lit = (np.asarray(a)[:k] for a in jax.device_get(out))
        return np.unique(bits[lit])

    parts = map_chunked(fn, [np.asarray(eulers, np.float64), np.asarray(verts, np.float64)],
                        chunk, desc="simulate", unit="voxel", progress=progress,
                        collect=collect)
    if not parts:
        return np.zeros(0, np.int64)
    return np.unique(np.concatenate(parts))


def simulate_records(params, records: np.ndarray, hkls, *, max_memory=None,
                     progress=None) -> observe.ObsVolume:
    """Observation volume of mic ``records (N,11)`` (all of them are rendered)."""
    from nfjax.crystal import reflections

    geom = geometry_from_params(params)
    table = reflections(params, hkls)
    if len(records) == 0:
        return observe.empty(geom.shape)
    verts = triangle_vertices(mic_grid_rows(records))
    edge = float(np.max(records[:, 5]))
    bits = render_bits(records[:, 7:10], verts, table.g, table.theta, geom,
                       edge_length=edge, max_memory=max_memory, progress=progress)
    return observe.from_bit_indices(geom.shape, bits)


def rendered_records(params, mic, mic_path) -> np.ndarray:
    """The records of ``mic`` (a :class:`nfjax.io.mic.MicData` read from ``mic_path``) that
    MIDAS renders (MinConfidence rule); an error naming the file if there are none."""
    if len(mic.records) == 0:
        raise NfjaxError(f"{mic_path}: expected voxel rows, found none (the mic file has no "
                         "voxels) — nothing to render")
    records = select_rendered(mic.records, params.min_confidence)
    if len(records) == 0:
        raise NfjaxError(f"{mic_path}: no voxel has confidence >= MinConfidence "
                         f"({params.min_confidence}) — nothing to render")
    return records


def _rendered_mic(params, mic_path) -> tuple[np.ndarray, int]:
    """:func:`rendered_records` of the mic file ``mic_path`` and the number of records in
    the file."""
    from nfjax.io.mic import read_mic

    mic = read_mic(mic_path)
    return rendered_records(params, mic, mic_path), len(mic.records)


def simulate_mic(params, mic_path, *, max_memory=None, progress=None):
    """``nfjax simulate``: render the mic file with MIDAS's MinConfidence rule.

    Returns ``(volume, n_rendered, n_total)``.
    """
    from nfjax.crystal import hkls_from_params

    records, n_total = _rendered_mic(params, mic_path)
    vol = simulate_records(params, records, hkls_from_params(params), max_memory=max_memory,
                           progress=progress)
    return vol, len(records), n_total


def score_mic(params, mic_path, obs: observe.ObsVolume, *, cell: float | None = None,
              max_memory=None):
    """``nfjax score``: the whole map of the mic file (its voxels at or above MinConfidence,
    each as its grid triangle of edge ``cell``, default :func:`grid_cell`) rendered with
    ``params``' geometry against the observations ``obs``.

    Returns ``(MapScore, n_rendered, n_total, cell)``.
    """
    from nfjax.crystal import reflections

    records, n_total = _rendered_mic(params, mic_path)
    if cell is None:
        try:
            cell = grid_cell(records)
        except NfjaxError as exc:
            raise NfjaxError(f"{mic_path}: {exc}") from None
    geom = geometry_from_params(params)
    table = reflections(params)
    wmap = WholeMap(records, table.g, table.theta, obs, geom, cell=cell,
                    max_memory=max_memory)
    return wmap.score(geom), len(records), n_total, wmap.cell


def grid_cell(records: np.ndarray) -> float:
    """Edge length (µm) of the triangular grid that mic ``records (N,11)`` sit on.

    Triangles of one orientation in one row share their centroid's Y and lie one edge
    apart in X, so the edge is the median gap between X-neighbours of equal Y (robust to
    missing voxels). The mic's TriEdgeSize column can be the probe's ``EdgeLength``
    rather than the grid's, so it is not used.
    """
    records = np.asarray(records, np.float64)
    key = np.round(records[:, 4], 4)
    order = np.lexsort((records[:, 3], key))
    x, y = records[order, 3], key[order]
    gaps = np.diff(x)[(np.diff(y) == 0)]
    gaps = gaps[gaps > 1e-6]
    if gaps.size == 0:
        raise NfjaxError("cannot tell the grid's edge length from the mic: no two voxels "
                         "share a row (give it: --cell E on the command line, cell= in "
                         "Python)")
    return float(np.median(gaps))


class MapScore(NamedTuple):
    """A rendered map against the observations: lit pixels ``predicted``, ``observed`` and
    in ``both`` (each pixel of each frame and distance counted once)."""

    predicted: int
    observed: int
    both: int

    @property
    def precision(self) -> float:
        return self.both / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.both / self.observed if self.observed else 0.0

    @property
    def iou(self) -> float:
        union = self.predicted + self.observed - self.both
        return self.both / union if union else 0.0


class WholeMap:
    """Every voxel of a map rendered at once and set against the observations.

    Each voxel of mic ``records (N,11)`` (Euler columns 7–9, rad) is rendered as its whole
    grid triangle of edge ``cell`` µm (default :func:`grid_cell`), so a grain's spots are
    solid as a real sample's, and :meth:`score` counts the lit pixels predicted by any
    voxel, observed in ``obs`` (an :class:`nfjax.observe.ObsVolume`), and both, exactly
    (sorting the footprint bits). This sees what a per-voxel overlap fraction cannot: a
    predicted spot inside a wider observed spot scores 1.0 voxel by voxel, but the pixels
    that no voxel predicts lower the whole map's recall.

    Only the spots valid at ``reference`` (the geometry's detector boxes, ω ranges and pole
    exclusion) are rendered: a spot that becomes valid only at a geometry :meth:`score` is
    asked about (a few pixels away, across a detector edge) is left out of the prediction.
    ``g (R,3)``, ``theta (R,)`` are the ring-selected reflections. Voxels are chunked to
    ``max_memory``.
    """

    def __init__(self, records: np.ndarray, g, theta, obs: observe.ObsVolume,
                 reference: Geometry, *, cell: float | None = None, max_memory=None):
        records = np.asarray(records, np.float64)
        if records.ndim != 2 or records.shape[0] == 0 or records.shape[1] < 11:
            raise NfjaxError(f"expected (N, 11) mic records to render, found shape "
                             f"{records.shape}")
        self.cell = float(cell) if cell is not None else grid_cell(records)
        px = float(np.asarray(reference.px))
        width = max(reference.shape[-2:])
        if self.cell > width * px:
            raise NfjaxError(f"a grid cell of {self.cell:g} um is wider than the detector "
                             f"({width} pixels of {px:g} um): expected the grid's triangle "
                             f"edge in um")
        rows = records.copy()
        rows[:, 5] = self.cell
        self.n_voxels = len(rows)
        g = jnp.asarray(g, jnp.float64)
        theta = jnp.asarray(theta, jnp.float64)
        v = bragg_v(g, theta)
        eul = jnp.asarray(rows[:, 7:10])
        valid = np.asarray(jax.jit(jax.vmap(lambda e: predict_spots(
            euler_to_matrix_midas(e), g, theta, reference, v=v).valid))(eul))
        k = max(1, int(valid.sum(axis=1).max()))
        # Each voxel's valid spots first (in spot order), padded to k with masked slots.
        self._spots = np.argsort(~valid, axis=1, kind="stable")[:, :k].astype(np.int32)
        self._keep = np.take_along_axis(valid, self._spots, axis=1)
        self._eul = rows[:, 7:10]
        self._verts = triangle_vertices(mic_grid_rows(rows))
        box = footprint_box(self.cell, px)
        per_voxel = k * box * box * reference.n_distances * 32
        self._chunk = chunk_size(len(rows), per_voxel, max_memory,
                                 what=f"one voxel rendered as a {self.cell:g} um triangle")
        self._words = observe.device_words(obs.words)      # on the device once
        self.observed = observe.count(obs)

        def chunk(geom, eul, verts, spots, keep, words):
            bits, lit = jax.vmap(lambda e, vv, s, kp: _voxel_hits(
                geom, e, vv, g, theta, v, box, s, kp))(eul, verts, spots, keep)
            end = jnp.iinfo(bits.dtype).max
            s = jnp.sort(jnp.where(lit, bits, end).ravel())
            first = (s != end) & jnp.concatenate([jnp.ones(1, bool), s[1:] != s[:-1]])
            on = first & observe.bits_set(words, jnp.where(first, s, 0))
            return s, first, on

        def whole(geom, eul, verts, spots, keep, words):
            _, first, on = chunk(geom, eul, verts, spots, keep, words)
            return first.sum(), on.sum()

        self._chunk_fn = jax.jit(chunk)
        self._whole_fn = jax.jit(whole)

    def score(self, geom: Geometry) -> MapScore:
        """The map rendered at ``geom`` against the observations."""
        arrays = [self._eul, self._verts, self._spots, self._keep]
        if self._chunk >= self.n_voxels:
            p, b = self._whole_fn(geom, *arrays, self._words)
            return MapScore(int(p), self.observed, int(b))

        def collect(out, n):
            s, first, on = (np.asarray(a) for a in jax.device_get(out))
            return s[first], on[first]

        parts = map_chunked(lambda *a: self._chunk_fn(geom, *a, self._words), arrays,
                            self._chunk, progress=False, collect=collect)
        bits = np.concatenate([b for b, _ in parts])
        on = np.concatenate([o for _, o in parts])
        bits, first = np.unique(bits, return_index=True)
        return MapScore(int(bits.size), self.observed, int(on[first].sum()))


def voronoi_microstructure(records: np.ndarray, grains, *, spread_deg: float = 0.0,
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic polycrystal on the voxels of mic ``records (N,11)``: each voxel takes the
    orientation of the grain whose centre (``grains.positions`` x, y, µm) is nearest
    (Voronoi cells), turned by a random rotation of angle ``|N(0, spread_deg)|`` about a
    random axis (intragranular spread; reproducible with ``seed``).

    Returns a copy of ``records`` with the Euler columns (7–9, rad, MIDAS convention)
    replaced and confidence (column 10) set to 1, and the grain index (0-based) per voxel.
    """
    from nfjax.orientation import matrix_to_euler, rotvec_matrix

    records = np.array(records, np.float64)
    mats = np.asarray(grains.matrices, np.float64)
    if records.ndim != 2 or records.shape[0] == 0:
        raise NfjaxError("voronoi microstructure: the mic has no voxel")
    if mats.shape[0] == 0:
        raise NfjaxError(f"voronoi microstructure: {getattr(grains, 'path', '') or 'the grains'}"
                         " holds no grain")
    centres = np.asarray(grains.positions, np.float64)[:, :2]
    d2 = ((records[:, None, 3:5] - centres[None]) ** 2).sum(-1)
    label = np.argmin(d2, axis=1)
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=(len(records), 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    angle = np.abs(rng.normal(0.0, np.radians(float(spread_deg)), len(records)))
    turn = jax.vmap(rotvec_matrix)(jnp.asarray(axis * angle[:, None]))
    u = jnp.einsum("nij,njk->nik", turn, jnp.asarray(mats[label]))
    records[:, 7:10] = np.asarray(matrix_to_euler(u))
    records[:, 10] = 1.0
    return records, label


def grain_mean_records(records: np.ndarray, params=None, *, tri_edge_size: float = 0.0):
    """The voxels of mic ``records (N,11)`` with every grain given its mean orientation: a
    physically smooth version of a reconstruction, whose voxel-to-voxel orientation noise
    would otherwise scatter each grain's spots.

    Grains are found as ``nfjax cluster`` finds them (:func:`nfjax.cluster.cluster_mic`
    with ``params``' SpaceGroup, MaxAngle and MinConfidence; pass ``tri_edge_size`` for
    the mic's ``%TriEdgeSize`` if the grain radii matter); each grain's mean is
    :func:`nfjax.orientation.mean_orientation` of its voxels about its seed voxel. Voxels
    that join no grain keep their own orientation.

    Returns ``(records, grains)``: a copy of ``records`` with Euler columns 7–9 replaced,
    and the :class:`nfjax.cluster.MicGrains` with ``matrices`` set to the grain means
    (write it with :func:`nfjax.cluster.write_grains_csv` for a GrainsFile of the means).
    """
    import dataclasses

    from nfjax.cluster import cluster_mic
    from nfjax.crystal import symmetry_quaternions
    from nfjax.io.mic import MicData
    from nfjax.orientation import (matrix_to_euler, matrix_to_quat, mean_orientation,
                                   quat_to_matrix)

    records = np.array(records, np.float64)
    mic = MicData(records=records, phase_nr=np.ones(len(records), np.int64),
                  tri_edge_size=float(tri_edge_size), path="")
    grains = cluster_mic(mic, params)
    sym = jnp.asarray(symmetry_quaternions(grains.space_group))
    quats = matrix_to_quat(euler_to_matrix_midas(jnp.asarray(records[:, 7:10])))
    means = np.zeros((len(grains), 3, 3))
    for k, gid in enumerate(grains.ids):
        rows = np.flatnonzero(grains.voxel_grain == gid)
        q = mean_orientation(quats[rows], sym, matrix_to_quat(jnp.asarray(grains.matrices[k])))
        means[k] = np.asarray(quat_to_matrix(q))
        records[rows, 7:10] = np.asarray(matrix_to_euler(jnp.asarray(means[k])))
    return records, dataclasses.replace(grains, matrices=means)


def tomo_outline(records: np.ndarray, *, pixel_size: float = 1.0, size: int = 128,
                 radius: float = 2.0) -> np.ndarray:
    """A tomography-like sample outline of mic ``records (N,11)``: a ``(size, size)`` uint8
    image, 1 where a pixel centre lies within ``radius`` µm of a voxel centre.

    The image follows ``TomoImage``'s convention (:func:`nfjax.grid.tomo_keep`: centred on
    the rotation axis, ``pixel_size`` µm, row 0 at the top, +y up), so writing its bytes
    gives a file that limits a reconstruction grid to the simulated sample — what a
    tomography scan of the sample would give a beamline run.
    """
    records = np.asarray(records, np.float64)
    if records.ndim != 2 or records.shape[0] == 0:
        raise NfjaxError("tomo outline: the mic has no voxel")
    n = int(size)
    centre = (np.arange(n) + 0.5 - n / 2) * float(pixel_size)
    ys = centre[::-1]                       # row r holds yPos = n - 1 - r
    xy = records[:, 3:5]
    img = np.zeros((n, n), np.uint8)
    r2 = float(radius) ** 2
    for r in range(n):
        d2 = (centre[:, None] - xy[None, :, 0]) ** 2 + (ys[r] - xy[None, :, 1]) ** 2
        img[r] = np.any(d2 <= r2, axis=1)
    return img


TIFF_BACKGROUND = 100.0
# BlanketSubtraction that leaves the frames' background noise dark: 6 sigma of
# Poisson(TIFF_BACKGROUND) above the median (the round-trip tests process them with 60; the
# bundled ps_au.txt's 5, meant for real frames, lights about 10 % of the detector).
TIFF_NOISE_FLOOR = 60


def write_tiff_frames(params, vol: observe.ObsVolume, directory: str | Path, *,
                      background: float = TIFF_BACKGROUND, intensity: float = 400.0,
                      seed: int = 0, progress=None) -> list[Path]:
    """Raw-like uint16 TIFF frames of ``vol`` in MIDAS's naming (§8.1), flipped on both
    axes as the detector records them (reduction flips them back).

    Each frame is a Poisson background of mean ``background`` plus, on lit pixels, a
    Poisson signal of mean ``intensity``. Returns the written paths. A failure or an
    interruption part way removes the frames already written (an incomplete stack would
    pass for a scan), says so, and re-raises.
    """
    import tifffile

    from nfjax.chunking import progress_bar
    from nfjax.images import frame_path
    from nfjax.io.atomic import atomic_write

    n_dist, n_frames, ny, nz = vol.shape
    rng = np.random.default_rng(seed)
    lit = observe.lit_indices(vol)
    dist, frame, yy, zz = observe.unravel(vol.shape, lit)
    order = np.lexsort((frame, dist))
    dist, frame, yy, zz = dist[order], frame[order], yy[order], zz[order]
    key = dist.astype(np.int64) * n_frames + frame
    starts = np.searchsorted(key, np.arange(n_dist * n_frames + 1))
    paths = []
    directory = Path(directory)
    try:
        with progress_bar(n_dist * n_frames, "render tiff", "frame", progress) as bar:
            for L in range(n_dist):
                for f in range(n_frames):
                    img = rng.poisson(background, size=(nz, ny)).astype(np.float64)
                    s, e = starts[L * n_frames + f], starts[L * n_frames + f + 1]
                    rows = nz - 1 - zz[s:e]
                    cols = ny - 1 - yy[s:e]
                    img[rows, cols] += rng.poisson(intensity, size=e - s)
                    path = directory / frame_path(params, L, f).name
                    buf = io.BytesIO()  # tifffile wants a named file; encode in memory first
                    tifffile.imwrite(buf, np.clip(img, 0, 65535).astype(np.uint16))
                    with atomic_write(path, "wb") as fh:
                        fh.write(buf.getvalue())
                    paths.append(path)
                    bar.update(1)
    except BaseException:
        remove_frames(paths, f"of {n_dist * n_frames} written to {directory} before the "
                             f"failure (an incomplete stack)")
        raise
    return paths


def remove_frames(paths: list[Path], why: str) -> None:
    """Delete TIFF frames written by :func:`write_tiff_frames` after a failure (an
    incomplete stack would pass for a scan) and say so on stderr:
    ``removed the N frame(s) <why>``."""
    import sys

    for path in paths:
        path.unlink(missing_ok=True)
    if paths:
        print(f"removed the {len(paths)} frame(s) {why}", file=sys.stderr)
