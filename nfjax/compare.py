"""Voxel-by-voxel comparison of two mic files (the check of MIDAS's NF benchmark).

This module owns ``nfjax compare``: it reads two mic files (text or binary), keeps the
voxels that carry a solution (Confidence > 0, which is what a text mic holds), pairs the
voxels of the evaluated map ``a`` with those of the reference ``b`` by position (x, y
rounded to 4 decimals, as MIDAS's ``tests/test_nf_hedm.py`` does), and measures the
symmetry-reduced misorientation of every pair with MIDAS's operator tables. Euler angles in
mic files are radians; every angle this module reports is in **degrees** (the MIDAS
benchmark mistakes the radians for degrees; this module does not). It never writes files
and never changes either map.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nfjax.chunking import map_chunked
from nfjax.crystal import symmetry_quaternions
from nfjax.errors import InputFileError, NfjaxError, check_fraction
from nfjax.io.mic import read_mic
from nfjax.orientation import euler_to_quat, misorientation

__all__ = ["ComparisonResult", "compare_mics", "compare_records", "format_comparison",
           "THRESHOLDS_DEG"]

#: Misorientation thresholds (degrees) of the report.
THRESHOLDS_DEG: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 5.0)

# Mic columns used here (text and binary share the first 11).
_COL_X, _COL_Y, _COL_EUL, _COL_CONF = 3, 4, slice(7, 10), 10
_CHUNK = 1 << 16  # voxel pairs per device call (24 operators x 4 x 8 B each)


@dataclass(frozen=True, eq=False)
class ComparisonResult:
    """Outcome of :func:`compare_mics`.

    Counts are voxels. ``positions`` (n_matched, 2) µm are the (x, y) of the matched
    reference voxels; ``misorientation_deg`` (n_matched,) their misorientation in degrees;
    ``index_a`` / ``index_b`` (n_matched,) the matched rows among the kept (Confidence > 0)
    rows of ``a`` / ``b``, in file order of ``a``. ``frac_matched[i]`` and
    ``frac_reference[i]`` are the fractions of matched voxels and of all reference voxels
    whose misorientation is below ``thresholds_deg[i]``.
    """

    path_a: str
    path_b: str
    space_group: int
    n_a: int
    n_reference: int
    n_matched: int
    coverage: float
    median_deg: float
    thresholds_deg: tuple[float, ...]
    frac_matched: tuple[float, ...]
    frac_reference: tuple[float, ...]
    positions: np.ndarray
    misorientation_deg: np.ndarray
    index_a: np.ndarray
    index_b: np.ndarray


# --------------------------------------------------------------------------- reading
def _load_mic_rows(path: str | Path) -> np.ndarray:
    """The (N, 11) records of a mic file, text or binary (binary holes included)."""
    return np.asarray(read_mic(path).records, dtype=np.float64)


def _kept(rows: np.ndarray) -> np.ndarray:
    """Indices of rows that carry a solution (Confidence > 0): a text mic's content."""
    return np.flatnonzero(rows[:, _COL_CONF] > 0)


def _position_keys(rows: np.ndarray) -> list[tuple[float, float]]:
    xy = np.round(rows[:, [_COL_X, _COL_Y]], 4) + 0.0  # + 0.0 folds -0.0 into 0.0
    return [(float(x), float(y)) for x, y in xy]


# --------------------------------------------------------------------------- misorientation
@jax.jit
def _miso_rad(eul_a: jnp.ndarray, eul_b: jnp.ndarray, sym: jnp.ndarray) -> jnp.ndarray:
    return misorientation(euler_to_quat(eul_a), euler_to_quat(eul_b), sym)


def _symmetry(space_group: int) -> np.ndarray:
    return np.asarray(symmetry_quaternions(space_group), dtype=np.float64)


def _misorientation_deg(eul_a: np.ndarray, eul_b: np.ndarray, sym: np.ndarray) -> np.ndarray:
    n = eul_a.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    sym_j = jnp.asarray(sym, dtype=jnp.float64)
    parts = map_chunked(lambda a, b: _miso_rad(a, b, sym_j),
                        [np.asarray(eul_a, np.float64), np.asarray(eul_b, np.float64)],
                        min(_CHUNK, n), progress=False)
    return np.degrees(np.concatenate(parts))


# --------------------------------------------------------------------------- API
def compare_mics(a: str | Path, b: str | Path, space_group: int = 225, *,
                 nearest: float | None = None,
                 min_confidence: float | None = None) -> ComparisonResult:
    """Compare mic ``a`` (evaluated) with mic ``b`` (reference, e.g. ground truth).

    Both files may be text or binary mic files. Rows with Confidence <= 0 (binary holes)
    are ignored in both. A voxel of ``a`` matches the reference voxel at the same (x, y)
    after rounding to 4 decimals; if several rows share a position the first one in the
    file is used. With ``nearest`` (µm) each reference voxel is paired instead with the
    nearest voxel of ``a`` within that distance. Misorientation uses the crystal symmetry
    of ``space_group`` (MIDAS tables) and is reported in degrees. ``min_confidence``
    restricts the reference to its voxels with Confidence ≥ that value (e.g. those
    ``nfjax simulate`` rendered: MinConfidence).
    """
    return compare_records(_load_mic_rows(a), _load_mic_rows(b), space_group,
                           name_a=str(a), name_b=str(b), nearest=nearest,
                           min_confidence=min_confidence)


def _nearest_pairs(xy_a: np.ndarray, xy_b: np.ndarray, max_distance: float):
    """Each reference voxel ``xy_b`` paired with its nearest ``xy_a`` within
    ``max_distance`` µm (an ``a`` voxel may serve several reference voxels)."""
    from scipy.spatial import cKDTree

    if len(xy_a) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    dist, k = cKDTree(xy_a).query(xy_b, distance_upper_bound=float(max_distance) * (1 + 1e-12))
    ok = np.isfinite(dist)
    return k[ok].astype(np.int64), np.flatnonzero(ok).astype(np.int64)


def compare_records(rows_a: np.ndarray, rows_b: np.ndarray, space_group: int = 225, *,
                    name_a: str = "A", name_b: str = "B",
                    nearest: float | None = None,
                    min_confidence: float | None = None) -> ComparisonResult:
    """:func:`compare_mics` on in-memory mic records ``(N, 11)`` (binary-record columns).

    ``nearest`` (µm): pair every reference voxel with the nearest voxel of ``a`` within
    that distance instead of by equal position — for maps on different grids (a
    multi-resolution result against a ground truth at another GridSize).
    ``min_confidence``: only reference voxels with Confidence ≥ it count.
    """
    a, b = name_a, name_b
    if not 1 <= int(space_group) <= 230:
        raise NfjaxError(f"space group: expected an integer in 1..230, found {space_group}")
    if nearest is not None and not (np.isfinite(nearest) and nearest > 0):
        raise NfjaxError(f"--nearest: expected a positive distance in um, found {nearest!r}")
    sym = _symmetry(int(space_group))
    rows_a = np.asarray(rows_a, dtype=np.float64)
    rows_b = np.asarray(rows_b, dtype=np.float64)
    keep_a = _kept(rows_a)
    keep_b = _kept(rows_b)
    if keep_b.size == 0:
        raise InputFileError(f"{b}: reference mic has no voxels with Confidence > 0")
    if min_confidence is not None:
        check_fraction(min_confidence, "--min-confidence")
        keep_b = keep_b[rows_b[keep_b, _COL_CONF] >= min_confidence]
        if keep_b.size == 0:
            raise InputFileError(f"{b}: reference mic has no voxels with Confidence >= "
                                 f"{min_confidence:g}")

    if nearest is not None:
        ia, ib = _nearest_pairs(rows_a[keep_a][:, [_COL_X, _COL_Y]],
                                rows_b[keep_b][:, [_COL_X, _COL_Y]], float(nearest))
    else:
        ref_index: dict[tuple[float, float], int] = {}
        for i, key in enumerate(_position_keys(rows_b[keep_b])):
            ref_index.setdefault(key, i)
        pairs_a: list[int] = []
        pairs_b: list[int] = []
        taken: set[int] = set()
        for i, key in enumerate(_position_keys(rows_a[keep_a])):
            j = ref_index.get(key)
            if j is not None and j not in taken:
                taken.add(j)
                pairs_a.append(i)
                pairs_b.append(j)
        ia = np.asarray(pairs_a, dtype=np.int64)
        ib = np.asarray(pairs_b, dtype=np.int64)

    matched_a = rows_a[keep_a][ia]
    matched_b = rows_b[keep_b][ib]
    miso = _misorientation_deg(matched_a[:, _COL_EUL], matched_b[:, _COL_EUL], sym)

    n_ref = int(keep_b.size)
    n_matched = int(ia.size)
    below = [int(np.count_nonzero(miso < t)) for t in THRESHOLDS_DEG]
    return ComparisonResult(
        path_a=str(a),
        path_b=str(b),
        space_group=int(space_group),
        n_a=int(keep_a.size),
        n_reference=n_ref,
        n_matched=n_matched,
        coverage=n_matched / n_ref,
        median_deg=float(np.median(miso)) if n_matched else float("nan"),
        thresholds_deg=THRESHOLDS_DEG,
        frac_matched=tuple(k / n_matched if n_matched else float("nan") for k in below),
        frac_reference=tuple(k / n_ref for k in below),
        positions=matched_b[:, [_COL_X, _COL_Y]].copy(),
        misorientation_deg=miso,
        index_a=ia,
        index_b=ib,
    )


def _pct(frac: float) -> str:
    return "n/a" if np.isnan(frac) else f"{100.0 * frac:.1f}%"


def format_comparison(result: ComparisonResult) -> str:
    """A short human report of :func:`compare_mics`; ends with a newline."""
    r = result
    lines = [
        f"reference B: {r.n_reference} voxels; A: {r.n_a} voxels; "
        f"matched {r.n_matched} ({_pct(r.coverage)} of B)",
    ]
    if r.n_matched:
        lines.append(f"misorientation (deg, space group {r.space_group}): "
                     f"median {r.median_deg:.4f}")
        for t, fm, fr in zip(r.thresholds_deg, r.frac_matched, r.frac_reference):
            lines.append(f"  < {t:g}: {_pct(fm)} of matched, {_pct(fr)} of B")
    else:
        lines.append("no voxel of A lies at a position of B: nothing to compare")
    return "\n".join(lines) + "\n"
