"""Grains from a mic file: MIDAS ``Mic2GrainsList`` (reference §9.2), and its Grains.csv.

This module owns the grouping of reconstructed voxels into grains and the writing of the
grain list in Mic2GrainsList's exact text format (9 ``%`` header lines, then one row per
grain, readable by :func:`nfjax.io.grains.read_grains_csv` and by MIDAS's
``GenSeedOrientationsFF2NFHEDM``). Units: positions and edge sizes in µm, Euler angles in
radians, ``max_angle`` in degrees, lattice a b c in Å and α β γ in degrees. Orientations
and misorientations come from :mod:`nfjax.orientation` (MIDAS's conventions and symmetry
tables via :func:`nfjax.crystal.symmetry_quaternions`); this module never converts
orientations itself, and writes its one output file atomically.

Differences from MIDAS, on purpose:

* Voxels are sorted by confidence with a *stable* sort, so equal confidences keep file
  order; MIDAS's ``qsort`` is unstable, so with ties its grain numbering (and which voxel
  seeds a grain) can vary between runs.
* Rows with zero confidence (the holes of a binary mic) are never voxels, even with a
  threshold ≤ 0; MIDAS reads only text mics, which never contain them.
* Parameter keys are read by :mod:`nfjax.params` (exact key names, ``#`` comments), where
  MIDAS's Mic2GrainsList matches key prefixes (``MaxAngleX`` would set ``MaxAngle``).
* The neighbour mode on a mic whose TriEdgeSize is 0 (ParseMic writes 0 when grid row 0
  is a hole) is an error; MIDAS silently falls back to the global mode.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections import deque

import numpy as np

from nfjax.errors import NfjaxError, check_fraction
from nfjax.io.atomic import atomic_write

__all__ = ["MicGrains", "cluster_mic", "write_grains_csv", "DEFAULT_MIN_CONFIDENCE",
           "DEFAULT_MAX_ANGLE"]

DEFAULT_MIN_CONFIDENCE = 0.04   # Mic2GrainsList's default threshold
DEFAULT_MAX_ANGLE = 1.0         # degrees
DEFAULT_SPACE_GROUP = 225
# Neighbour mode: spatial bins of 1.01·TriEdgeSize, neighbours closer than 2·TriEdgeSize
# and in one of the 3x3 bins around the voxel (MIDAS's constants).
_BIN_FACTOR = 1.01
_NEIGHBOUR_FACTOR = 2.0
# The neighbour mode needs a %TriEdgeSize above this (MIDAS falls back to the global mode).
_MIN_EDGE = 1e-6
# Budget of (seed, voxel, symmetry operator) products per batched misorientation call.
_BATCH_ELEMENTS = 2_000_000


@dataclasses.dataclass(frozen=True, eq=False)
class MicGrains:
    """Grains found in a mic, in Mic2GrainsList's order (decreasing seed confidence).

    Attributes:
      ids: ``(G,)`` int64 grain IDs, 1-based.
      matrices: ``(G, 3, 3)`` float64 orientation matrix U of each grain's seed voxel (its
        Euler angles through the orthogonalising MIDAS conversion).
      positions: ``(G, 3)`` float64 seed-voxel x, y (µm) and z = 0.
      lattice: ``(G, 6)`` float64 a b c (Å) α β γ (deg) from ``LatticeParameter`` (zeros
        when no parameter file gave one, as MIDAS).
      n_voxels: ``(G,)`` int64 voxels merged into each grain.
      radius: ``(G,)`` float64 µm, ``sqrt(n_voxels·(√3/4)·E² / π)`` with E = TriEdgeSize
        (the probe-triangle area: an underestimate when EdgeLength ≪ GridSize, as MIDAS).
      confidence: ``(G,)`` float64 confidence of each seed voxel (the file column is 1).
      voxel_grain: ``(N,)`` int64 grain ID of every row of the mic (0: below threshold).
      space_group, max_angle (deg), min_confidence, lattice_parameter (6,), neighbours
        (the mode actually used), tri_edge_size (µm), mic_path: what the header records.
    """

    ids: np.ndarray
    matrices: np.ndarray
    positions: np.ndarray
    lattice: np.ndarray
    n_voxels: np.ndarray
    radius: np.ndarray
    confidence: np.ndarray
    voxel_grain: np.ndarray
    space_group: int
    max_angle: float
    min_confidence: float
    lattice_parameter: np.ndarray
    neighbours: bool
    tri_edge_size: float
    mic_path: str = ""

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _param_threshold(params):
    """MinConfidence or MinFracAccept, whichever comes last in the file (MIDAS: both set the
    one threshold as the file is read); None when neither is set."""
    found = []
    for key, value in (("MinFracAccept", params.min_frac_accept),
                       ("MinConfidence", params.min_confidence)):
        if value is not None:
            found.append((max(params.lines.get(key, (0,)), default=0), value))
    return max(found, key=lambda t: t[0])[1] if found else None


def cluster_settings(params, max_angle=None, min_confidence=None, space_group=None,
                     lattice=None):
    """Effective (space group, max angle deg, threshold, lattice (6,)): argument > params >
    Mic2GrainsList default (zeros for the lattice)."""
    sg = space_group
    if sg is None:
        sg = params.space_group if params is not None else DEFAULT_SPACE_GROUP
    angle = max_angle
    if angle is None:
        angle = params.max_angle if params is not None else DEFAULT_MAX_ANGLE
    thr = min_confidence
    if thr is None and params is not None:
        thr = _param_threshold(params)
    if thr is None:
        thr = DEFAULT_MIN_CONFIDENCE
    if lattice is not None:
        lattice = np.asarray(lattice, dtype=np.float64).reshape(6)
        if not (np.isfinite(lattice).all() and (lattice > 0).all()):
            found = " ".join(map(repr, lattice.tolist()))
            raise NfjaxError("cluster: lattice: expected six positive numbers a b c (Å) "
                             f"alpha beta gamma (deg), found {found}")
    # MIDAS reads only the spelling LatticeParameter (not the alias LatticeConstant).
    elif params is not None and params.lattice_parameter is not None and \
            "LatticeParameter" in params.lines:
        lattice = np.asarray(params.lattice_parameter, dtype=np.float64).reshape(6)
    else:
        lattice = np.zeros(6, dtype=np.float64)
    angle, thr = float(angle), float(thr)
    source = getattr(params, "source", "the parameter file")
    if not math.isfinite(angle) or angle <= 0:
        where = "--max-angle" if max_angle is not None else f"MaxAngle in {source}"
        raise NfjaxError(f"{where}: expected a positive number of degrees, found {angle!r}")
    check_fraction(thr, "--min-confidence" if min_confidence is not None
                   else f"MinConfidence/MinFracAccept in {source}")
    return int(sg), angle, thr, lattice


@functools.lru_cache(maxsize=1)
def _misorientation_rows():
    """The jitted ``(B, 4) seeds × (N, 4) voxels -> (B, N)`` degrees (one module-wide jit, so
    repeated calls with the same shapes reuse the compiled code)."""
    import jax
    import jax.numpy as jnp

    from nfjax.orientation import misorientation

    def rows(seeds, q, s):
        return jnp.degrees(misorientation(seeds[:, None, :], q[None, :, :], s))

    return jax.jit(rows)


class _Misorienter:
    """Batched MIDAS misorientation (degrees) of a few seed voxels against all voxels.

    The voxel array keeps one shape and the seed batch is padded to a fixed size, so the
    jitted call is traced once per mic.
    """

    def __init__(self, quats: np.ndarray, sym: np.ndarray):
        import jax.numpy as jnp

        self._q = jnp.asarray(quats, dtype=jnp.float64)
        self._sym = jnp.asarray(sym, dtype=jnp.float64)
        n_ops = quats.shape[0] * sym.shape[0]
        self.batch = int(max(1, min(256, _BATCH_ELEMENTS // max(1, n_ops))))
        self._fn = _misorientation_rows()

    def __call__(self, seed_idx: np.ndarray) -> np.ndarray:
        """``(len(seed_idx), N)`` degrees; ``seed_idx`` has at most ``self.batch`` entries.

        A single seed runs unpadded (the neighbour mode asks one at a time)."""
        k = len(seed_idx)
        size = 1 if k == 1 else self.batch
        padded = np.full(size, seed_idx[-1], dtype=np.int64)
        padded[:k] = seed_idx
        out = self._fn(self._q[padded], self._q, self._sym)
        return np.asarray(out)[:k]


def _global_groups(mis: _Misorienter, n: int, max_angle: float) -> list[tuple[int, np.ndarray]]:
    """Mic2GrainsList mode 0 on voxels already sorted by confidence: the first unused voxel
    seeds a grain and takes every unused voxel within ``max_angle`` of it (degrees, strict).

    Seeds are tried in batches: the misorientations of the next ``batch`` unused voxels
    are computed together, then applied in order (a batched candidate taken by an earlier
    seed of its batch is simply skipped, exactly as the sequential loop would do).
    Returns [(seed index, member indices)] in seed order.
    """
    used = np.zeros(n, dtype=bool)
    groups: list[tuple[int, np.ndarray]] = []
    cursor = 0
    while True:
        free = np.flatnonzero(~used[cursor:]) + cursor
        if free.size == 0:
            break
        cand = free[:mis.batch]
        rows = mis(cand)
        for c, row in zip(cand, rows):
            if used[c]:
                continue
            members = np.flatnonzero(~used & (row < max_angle))
            members = members[members >= c]   # everything before c is used already
            if members.size == 0 or members[0] != c:
                members = np.concatenate([[c], members[members != c]])
            used[members] = True
            groups.append((int(c), members))
        cursor = int(cand[-1]) + 1
    return groups


def _neighbour_lists(xy: np.ndarray, edge: float) -> list[np.ndarray]:
    """Per voxel, the voxels MIDAS's neighbour search can reach: in the 3x3 spatial bins of
    side 1.01·E around it and closer than 2·E."""
    from scipy.spatial import cKDTree

    bin_size = edge * _BIN_FACTOR
    bins = np.floor((xy - xy.min(axis=0)) / bin_size).astype(np.int64)
    thr = edge * _NEIGHBOUR_FACTOR
    tree = cKDTree(xy)
    out = []
    for i, cand in enumerate(tree.query_ball_point(xy, r=thr)):
        cand = np.asarray(cand, dtype=np.int64)
        cand = cand[cand != i]
        d2 = ((xy[cand] - xy[i]) ** 2).sum(axis=1)
        near = (d2 < thr * thr) & (np.abs(bins[cand] - bins[i]) <= 1).all(axis=1)
        out.append(cand[near])
    return out


def neighbour_reach(mic) -> float:
    """Median number of voxels the neighbour mode links each voxel of ``mic`` to. On a
    triangle grid with EdgeLength = GridSize it is 19 on MIDAS's Au map; with that map's
    own 1 µm probe on its 2.5 µm grid it is 2 (at most the 3 edge-sharing triangles, fewer
    through MIDAS's bin rule), and grains fall apart wherever a voxel is missing or below
    the threshold."""
    edge = float(mic.tri_edge_size)
    records = np.asarray(mic.records, dtype=np.float64)
    xy = records[records[:, 10] != 0][:, 3:5]
    if not edge > _MIN_EDGE or xy.shape[0] < 2:
        return 0.0
    return float(np.median([len(n) for n in _neighbour_lists(xy, edge)]))


def _neighbour_groups(mis: _Misorienter, xy: np.ndarray, edge: float,
                      max_angle: float) -> list[tuple[int, np.ndarray]]:
    """Mic2GrainsList mode 1: from each unused seed (sorted order), flood through spatial
    neighbours whose misorientation *to the seed* is below ``max_angle``. The reached set
    is the seed's connected component among eligible voxels, whatever the visiting order."""
    n = xy.shape[0]
    neigh = _neighbour_lists(xy, edge)
    used = np.zeros(n, dtype=bool)
    groups: list[tuple[int, np.ndarray]] = []
    for seed in range(n):
        if used[seed]:
            continue
        ok = mis(np.array([seed]))[0] < max_angle
        used[seed] = True
        members = [seed]
        queue = deque([seed])
        while queue:
            cur = queue.popleft()
            for j in neigh[cur]:
                if not used[j] and ok[j]:
                    used[j] = True
                    members.append(int(j))
                    queue.append(int(j))
        groups.append((seed, np.asarray(members, dtype=np.int64)))
    return groups


def cluster_mic(mic, params=None, max_angle=None, min_confidence=None, space_group=None,
                neighbours: bool = False, lattice=None) -> MicGrains:
    """Group the voxels of a mic into grains as MIDAS ``Mic2GrainsList`` does.

    Args:
      mic: a :class:`nfjax.io.mic.MicData` (text or binary mic).
      params: optional :class:`nfjax.params.Params` for SpaceGroup, MaxAngle, MinConfidence
        / MinFracAccept and LatticeParameter.
      max_angle: degrees (default: params, else 1.0); voxels join a grain when their
        misorientation to its seed voxel is strictly below it.
      min_confidence: voxels need confidence ≥ this (default: params MinConfidence or
        MinFracAccept, whichever comes last in the file, as MIDAS; else 0.04).
      space_group: crystal symmetry for the misorientation (default: params, else 225).
      neighbours: grow grains through spatial neighbours (mode 1) instead of globally. Needs
        a ``%TriEdgeSize`` > 1e-6 (NfjaxError otherwise, where MIDAS silently falls back to
        the global mode). Neighbours are closer than 2·TriEdgeSize, which finds none when
        EdgeLength ≪ GridSize (each voxel then is its own grain, as in MIDAS).
      lattice: a b c (Å) α β γ (deg) written in the grains' lattice columns (default:
        params LatticeParameter, else zeros as Mic2GrainsList).

    Returns a :class:`MicGrains`.
    """
    import jax.numpy as jnp

    from nfjax.crystal import symmetry_quaternions
    from nfjax.orientation import euler_to_matrix_midas, matrix_to_quat

    sg, angle, thr, lattice = cluster_settings(params, max_angle, min_confidence, space_group,
                                               lattice)
    sym = symmetry_quaternions(sg)
    records = np.asarray(mic.records, dtype=np.float64)
    if records.ndim != 2 or records.shape[1] < 11:
        raise NfjaxError(f"{mic.path or 'mic'}: expected (N, 11) mic records, "
                         f"found shape {records.shape}")
    conf = records[:, 10]
    rows = np.flatnonzero((conf != 0) & (conf >= thr))
    # Stable: equal confidences keep file order (MIDAS's qsort does not promise that).
    rows = rows[np.argsort(-conf[rows], kind="stable")]
    edge = float(mic.tri_edge_size)
    use_neighbours = bool(neighbours)
    if use_neighbours and not edge > _MIN_EDGE:
        rows_say = records[rows[0], 5] if rows.size else 0.0
        fix = (f"its rows say {rows_say:g} µm: put '%TriEdgeSize {rows_say:g}' in the header, "
               "or " if rows_say > _MIN_EDGE and mic.kind == "text" else "")
        raise NfjaxError(f"{mic.path or 'mic'}: TriEdgeSize is {edge:g}, so the neighbour "
                         f"mode has no neighbour distance; {fix}cluster without --neighbours")

    if rows.size:
        mats = np.asarray(euler_to_matrix_midas(jnp.asarray(records[rows, 7:10])))
        quats = np.asarray(matrix_to_quat(jnp.asarray(mats)))
        mis = _Misorienter(quats, sym)
        if use_neighbours:
            groups = _neighbour_groups(mis, records[rows, 3:5], edge, angle)
        else:
            groups = _global_groups(mis, rows.size, angle)
    else:
        mats = np.zeros((0, 3, 3))
        groups = []

    g = len(groups)
    seeds = np.array([s for s, _ in groups], dtype=np.int64)
    n_vox = np.array([m.size for _, m in groups], dtype=np.int64)
    voxel_grain = np.zeros(records.shape[0], dtype=np.int64)
    for gid, (_, members) in enumerate(groups, start=1):
        voxel_grain[rows[members]] = gid
    positions = np.zeros((g, 3), dtype=np.float64)
    if g:
        positions[:, :2] = records[rows[seeds], 3:5]
    # MIDAS's operation order: area = nVox · (E²·√3/4); radius = sqrt(area / π).
    voxel_area = edge * edge * math.sqrt(3.0) / 4.0
    radius = np.sqrt(n_vox * voxel_area / math.pi)
    return MicGrains(
        ids=np.arange(1, g + 1, dtype=np.int64),
        matrices=mats[seeds] if g else np.zeros((0, 3, 3)),
        positions=positions,
        lattice=np.tile(lattice, (g, 1)),
        n_voxels=n_vox,
        radius=radius.astype(np.float64),
        confidence=conf[rows[seeds]] if g else np.zeros(0),
        voxel_grain=voxel_grain,
        space_group=sg,
        max_angle=angle,
        min_confidence=thr,
        lattice_parameter=lattice,
        neighbours=use_neighbours,
        tri_edge_size=edge,
        mic_path=str(mic.path),
    )


def write_grains_csv(path: str | os.PathLike, grains: MicGrains) -> None:
    """Write ``grains`` as Mic2GrainsList's Grains.csv, atomically.

    Header (9 lines): ``%NumGrains G``, the column line, ``%Generated by Mic2GrainsList
    from <mic>``, ``%SpaceGroup``, ``%MaxAngle`` (``%.4f``), ``%MinConfidence`` (``%.4f``),
    ``%LatticeParameter`` (6 × ``%.6f``), ``%DoNeighborSearch`` (0/1), ``%TriEdgeSize``
    (``%.6f``). Rows: ID, U row-major (``%.12f``), x y (``%.6f``) ``0``, lattice (``%.6f``),
    ``0 0 0``, radius (``%.6f``), ``1`` — single spaces.
    """
    lat = tuple(float(v) for v in np.asarray(grains.lattice_parameter).reshape(6))
    lines = [
        f"%NumGrains {len(grains)}",
        "%GrainID OrientMat(9) X Y Z LatC(6) 0 0 0 Radius Confidence",
        f"%Generated by Mic2GrainsList from {grains.mic_path}",
        f"%SpaceGroup {int(grains.space_group)}",
        "%%MaxAngle %.4f" % grains.max_angle,
        "%%MinConfidence %.4f" % grains.min_confidence,
        "%%LatticeParameter %.6f %.6f %.6f %.6f %.6f %.6f" % lat,
        f"%DoNeighborSearch {1 if grains.neighbours else 0}",
        "%%TriEdgeSize %.6f" % grains.tri_edge_size,
    ]
    mats = np.asarray(grains.matrices, dtype=np.float64).reshape(-1, 9)
    pos = np.asarray(grains.positions, dtype=np.float64)
    latt = np.asarray(grains.lattice, dtype=np.float64)
    for k in range(len(grains)):
        lines.append(
            "%d " % int(grains.ids[k])
            + " ".join("%.12f" % v for v in mats[k].tolist())
            + " %.6f %.6f 0 " % (pos[k, 0], pos[k, 1])
            + " ".join("%.6f" % v for v in latt[k].tolist())
            + " 0 0 0 %.6f 1" % float(grains.radius[k]))
    with atomic_write(path, "w", newline="\n") as fh:
        fh.write("\n".join(lines) + "\n")
