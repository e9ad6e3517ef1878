"""The orientation fitting engine (MIDAS ``FitOrientationOMP``, reference §7).

Owns the fit of a voxel grid against an observation volume: screening every
(voxel, orientation) pair with MIDAS's hard overlap fraction, refining every screening
winner with a batched Nelder–Mead over the three Euler angles (optionally polished with
optax on the smooth surrogate), choosing each voxel's solution and its distinct
alternatives, and writing the binary mic, ``.AllMatches`` and text mic. Physics comes only
from :mod:`nfjax.forward` through :mod:`nfjax.score`; chunk sizes only from
:mod:`nfjax.chunking`. Units: µm, degrees for ω and tolerances in parameter files, radians
for Euler angles; fractions in [0, 1]. It never closes a jitted function over the
observation words (a closed-over array becomes a compile-time constant: 1.5 GB for the Au
example) — they are always passed as an argument — and it never expands the bit-packed
volume.

Differences from MIDAS (listed in ``docs/midas-differences.md``): out-of-detector footprint
pixels are dropped one by one (MIDAS's sticky flag drops the rest of the spot); the block
split has no off-by-one; every grid row gets a record (zeros where no orientation passed
screening); ``.AllMatches`` is filled for ``SaveNSolutions 1`` too; the Nelder–Mead is
NLopt's ``nldrmd`` (same coefficients, initial simplex, bound pinning, tie order and stop
tests) run in lockstep over all problems, not NLopt itself (no 30 s wall-clock limit) — it
reproduces MIDAS's refined angles to 0.01° on > 99 % of the Au voxels; by default winners
far below their voxel's best are not refined and one restart round over a rotation vector
follows (see :func:`fit_grid`); RunTime is 0 unless asked for.

Performance design: screening vmaps voxels inside orientations so spot-only work is not
repeated per voxel, and reduces to two counts per pair on the device; refinement keeps a
pool of problems in a ``lax.while_loop`` where every step evaluates exactly one point per
problem (Nelder–Mead phases are a state machine) and a finished problem hands its slot to
the next queued one, so the cost is the total number of evaluations; the objective
evaluates only the reflections that can give a spot in the search box (checked at the
end against the full list).
"""
from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nfjax import observe
from nfjax.chunking import (_pad_to, bucket, chunk_size, map_chunked, parse_memory,
                             progress_bar)
from nfjax.errors import InputFileError, NfjaxError
from nfjax.forward import bragg_v, box_pixels, fit_box, predict_spots
from nfjax.geometry import Geometry, geometry_from_params, tilt_matrix
from nfjax.grid import triangle_vertices, up_down
from nfjax.orientation import (euler_to_matrix_midas, euler_to_quat, matrix_to_euler,
                               misorientation, normalize_mat, rotvec_matrix)
from nfjax.score import frac_from_counts, hard_counts, hard_counts_voxels

Array = Any

#: MIDAS's ``MAX_POINTS_GRID_GOOD``: screening winners kept per voxel (in orientation order).
MAX_WINNERS = 300000

# NLopt's Nelder–Mead coefficients (nldrmd.c): reflection, contraction, expansion, shrink.
_ALPHA, _BETA, _GAMMA, _DELTA = 1.0, 0.5, 2.0, 0.5
# NLopt stop tests as MIDAS sets them (run_nlopt_optimization): relative f and x tolerances
# and the evaluation cap (the 30 s wall-clock cap is not reproduced).
FTOL_REL = 1e-5
XTOL_REL = 1e-5
MAX_EVALS = 5000

# Refinement defaults of :func:`fit_grid` (``prune_ratio=0, restarts=()`` is MIDAS's
# procedure): skip winners below 0.3 × their voxel's best screening fraction; one restart
# round over a rotation vector (initial step 0.1 × OrientTol, box ±0.25 × OrientTol) for the
# winners within 0.9 × their voxel's best that are below 1 and at least 0.3.
PRUNE_RATIO = 0.3
RESTARTS = (0.1,)
RESTART_RATIO = 0.9
RESTART_BOX = 0.25
RESTART_FLOOR = 0.3
# Tie-break of :func:`fit_grid`: winners of one voxel that reach the same best fraction are
# scored again with the probe triangle enlarged 1.5× about its centroid (and to just over a
# pixel at least, so that MIDAS's rasterised footprint replaces its single-pixel rule).
TIE_PROBE = 1.5
# Near misses of :func:`fit_grid` in library passes: for each voxel that no winner resolves
# (best refined fraction below MinConfidence), the 16 best orientations that screened below
# MinFracAccept are refined too.
NEAR_MISSES = 16


def unresolved_below(params) -> float:
    """The confidence below which a voxel counts as unresolved: MinConfidence, 0.5 when the
    file does not set it. The workflow retries such voxels unseeded and :func:`fit_grid`
    refines their near misses."""
    return float(params.min_confidence) if params.min_confidence is not None else 0.5


def refinement_options(midas: bool = False, seeded: bool = False) -> dict:
    """Keyword arguments of :func:`fit_grid` for a fit pass.

    ``midas`` (``--midas-refinement``): every winner refined, no restarts, ties to the
    later winner (MIDAS's procedure). Otherwise the defaults, except that pruning is only
    used when ``seeded``: when every seed is a grain's orientation (FF grains, or the
    grains clustered from the previous loop), so that a low screening fraction means a
    seed of another grain. Against a library the screening fraction says little about
    where refinement ends: on a smooth Au sample a library seed 0.8° from a grain screens
    at 0.06 and refines to 1.0, while a Σ3-twin variant of the grain screens at 0.33 and
    stays there; pruning at 0.3 × 0.33 drops every seed near the grain
    (docs/midas-differences.md). Library passes also refine the near misses of the voxels
    no winner resolves (``near_misses``, :func:`fit_grid`): with a 1° library the seeds
    nearest that grain all screen below MinFracAccept.
    """
    if midas:
        return dict(prune_ratio=0.0, restarts=(), tie_probe=0.0)
    return {} if seeded else dict(prune_ratio=0.0, near_misses=NEAR_MISSES)

# Nelder–Mead phases of the lockstep state machine: every step evaluates one point per
# problem, so a pool of problems never waits for the slowest branch.
_REFLECT, _SECOND, _SHRINK1, _SHRINK2, _SHRINK3, _INIT0 = 0, 1, 2, 3, 4, 5


# =========================================================================== results
@dataclasses.dataclass(frozen=True)
class Winners:
    """Screening winners, sorted by (voxel, orientation) — MIDAS's order.

    ``voxel (M,)`` int64 row in the fitted grid, ``orient (M,)`` int64 row in the spot
    table, ``frac (M,)`` float64 hard overlap; ``count (N,)`` winners per voxel (≤ the cap)
    that passed screening — the near misses :func:`fit_grid` adds to a voxel's winners are
    not counted, so ``count`` stays MIDAS's ``nWinners``.
    """

    voxel: np.ndarray
    orient: np.ndarray
    frac: np.ndarray
    count: np.ndarray

    def __len__(self) -> int:
        return int(self.voxel.shape[0])


@dataclasses.dataclass(frozen=True)
class NearMisses:
    """Per voxel, the best orientations that screened *below* the acceptance fraction.

    ``voxel (M,)``, ``orient (M,)`` int64 and ``frac (M,)`` float64 (0 < frac < the
    threshold), sorted by voxel, then by descending fraction, then by orientation: at most
    ``n`` per voxel (:func:`screen` with ``near_misses=n``). The selection is exact over the
    whole spot table, so it does not depend on how the screen was chunked.
    """

    voxel: np.ndarray
    orient: np.ndarray
    frac: np.ndarray

    def __len__(self) -> int:
        return int(self.voxel.shape[0])


def _group_rank(keys: np.ndarray) -> np.ndarray:
    """Position of each entry within its run of equal values of the sorted ``keys``."""
    return np.arange(keys.size) - np.searchsorted(keys, keys, side="left")


def _top_below(frac: np.ndarray, min_frac: float, n: int):
    """``(o_idx, v_idx)`` of the ``n`` best entries of each column of ``frac (O,V)`` with
    0 < frac < ``min_frac``, ties to the lower row (orientation) — exact, in O(O·V)."""
    below = np.where((frac < min_frac) & (frac > 0), frac, 0.0)
    k = below.shape[0]
    if n >= k:
        return np.nonzero(below > 0)
    cut = np.partition(below, k - n, axis=0)[k - n]             # (V,) the n-th largest
    o_hi, v_hi = np.nonzero(below > cut[None])                  # fewer than n per column
    o_eq, v_eq = np.nonzero((below == cut[None]) & (below > 0))
    # Among the entries equal to the cut, the lowest rows fill each column up to n.
    need = n - np.bincount(v_hi, minlength=below.shape[1])
    order = np.argsort(v_eq, kind="stable")                     # rows stay ascending
    o_eq, v_eq = o_eq[order], v_eq[order]
    keep = _group_rank(v_eq) < need[v_eq]
    return np.concatenate([o_hi, o_eq[keep]]), np.concatenate([v_hi, v_eq[keep]])


def _best_per_voxel(v: np.ndarray, o: np.ndarray, f: np.ndarray, n: int):
    """Keep the ``n`` best ``(v, o, f)`` entries per voxel by (descending f, ascending o),
    sorted by voxel then that order."""
    order = np.lexsort((o, -f, v))
    v, o, f = v[order], o[order], f[order]
    keep = _group_rank(v) < n
    return v[keep], o[keep], f[keep]


@dataclasses.dataclass(frozen=True)
class FitResult:
    """Output of :func:`fit_grid` for N grid rows.

    ``records (N,11)`` float64 binary-mic rows (zeros past column 6 where no orientation
    passed screening); ``allmatches (N, 7+4n)`` float64 ``.AllMatches`` rows;
    ``winners`` the screening winners; ``refined_euler (M,3)`` rad and ``refined_frac (M,)``
    of every winner after refinement; ``n_evals (M,)`` objective evaluations per winner;
    ``timings`` seconds per stage; ``n_restarted`` Nelder–Mead restarts run; ``n_pruned``
    winners left unrefined (below the prune ratio, see :func:`fit_grid`); ``n_tie_broken``
    voxels whose choice among equal best fractions the enlarged probe changed.
    """

    records: np.ndarray
    allmatches: np.ndarray
    winners: Winners
    refined_euler: np.ndarray
    refined_frac: np.ndarray
    n_evals: np.ndarray
    timings: dict = dataclasses.field(default_factory=dict)
    n_restarted: int = 0
    n_pruned: int = 0
    n_tie_broken: int = 0
    n_near: int = 0
    n_near_voxels: int = 0

    def summary(self) -> str:
        """One line for logs: voxels fitted, the work done per stage and its time."""
        n_fit = int(np.count_nonzero(self.records[:, 10]))
        times = ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())
        near = (f", {self.n_near} near misses refined for {self.n_near_voxels} unresolved "
                f"voxels" if self.n_near else "")
        return (f"{n_fit} of {len(self.records)} voxels fitted; "
                f"{len(self.winners)} winners ({self.n_pruned} pruned, "
                f"{self.n_restarted} restarts{near}), {self.n_tie_broken} tied voxels "
                f"decided by the larger probe; {times}")


# =========================================================================== screening
def _screen_fn(geom: Geometry, box: int, shape: tuple, sticky: bool):
    """Jitted ``(verts (V,3,2), spots (O,S,3), mask (O,S), words) → (total, overlap) (O,V)``.

    :func:`nfjax.score.hard_counts_voxels` (spot-major, voxels innermost) vmapped over
    the orientations; the counts are reduced inside the function.
    """
    rt = tilt_matrix(geom.tilts)

    def per_orient(verts, spots, mask, words):
        return hard_counts_voxels(verts, spots[:, 0], spots[:, 1], spots[:, 2], mask, geom,
                                  box, words, shape, rt, sticky=sticky)

    return jax.jit(jax.vmap(per_orient, in_axes=(None, 0, 0, None)))


def screen_counts(verts: np.ndarray, spots: np.ndarray, mask: np.ndarray, obs, geom: Geometry,
                  *, box: int, sticky: bool = False, dtype=jnp.float64):
    """Hard ``(total, overlap)`` int32 ``(O, V)`` of every orientation × voxel, unchunked.

    ``verts (V,3,2)`` µm, ``spots (O,S,3)`` padded (yl, zl, ω) and ``mask (O,S)``.
    A small-batch helper for tests and callers that chunk themselves.
    """
    fn = _screen_fn(geom.astype(dtype), box, obs.shape, sticky)
    t, o = fn(jnp.asarray(verts, dtype), jnp.asarray(spots, dtype), jnp.asarray(mask),
              observe.device_words(obs.words))
    return np.asarray(t), np.asarray(o)


def screen(verts: np.ndarray, spot_table, obs, geom: Geometry, *, min_frac: float,
           box: int, max_winners: int = MAX_WINNERS, max_memory=None, sticky: bool = False,
           near_misses: int = 0, dtype=jnp.float64, progress=None):
    """Screen every (voxel, orientation) pair (reference §7.2).

    ``verts (N,3,2)`` µm probe triangles; ``spot_table`` a :class:`nfjax.spots.SpotTable`
    (predicted once per orientation: MakeDiffrSpots' spots); ``obs`` an ObsVolume (host or
    device words). Winners are pairs with hard FracOverlap ≥ ``min_frac``, kept per voxel
    in orientation order and capped at ``max_winners`` (MIDAS: 300000). Chunks span
    (voxels × orientations) and are sized from ``max_memory`` (default: half the free
    device memory); only the two counts per pair leave the device.

    Returns :class:`Winners`; with ``near_misses=n > 0`` also, from the same pass, the
    :class:`NearMisses`: each voxel's ``n`` best orientations below ``min_frac`` (see
    :func:`fit_grid`, where they are refined for voxels nothing else resolves).
    """
    verts = np.asarray(verts, np.float64)
    n_vox, n_or = verts.shape[0], len(spot_table)
    if n_vox == 0:
        raise NfjaxError("screening: the grid is empty (0 voxels)")
    spots, mask = spot_table.padded()
    width = max(1, spots.shape[1])
    if spots.shape[1] == 0:
        spots, mask = np.zeros((n_or, 1, 3)), np.zeros((n_or, 1), bool)
    n_dist = obs.shape[0]
    itemsize = np.dtype(dtype).itemsize
    # Live temporaries per (voxel, spot, footprint pixel) when the kernel counts along a
    # pixel axis (footprints of more than 32 pixels): ~12 floats for the vertex shift and
    # projection, and per distance two pixel indices, a word and the flags. Smaller
    # footprints are counted in one loop that keeps far less; the bound is kept for both.
    per_pair = width * (box_pixels(box) * (n_dist * 24 + 16) + 12 * itemsize)
    vox_chunk = min(n_vox, 4096)
    or_chunk = chunk_size(n_or, per_pair * vox_chunk, max_memory, maximum=1 << 16)
    fn = _screen_fn(geom.astype(dtype), box, obs.shape, sticky)
    words = observe.device_words(obs.words)
    spots_d = spots.astype(np.dtype(dtype))
    counts = np.zeros(n_vox, np.int64)
    found_v, found_o, found_f = [], [], []
    near_v, near_o, near_f = [], [], []
    with progress_bar(n_vox * n_or, "screen", "pair", progress) as bar:
        for v0 in range(0, n_vox, vox_chunk):
            vv = _pad_to(verts[v0:v0 + vox_chunk], vox_chunk)
            nv = min(vox_chunk, n_vox - v0)
            vv_d = jnp.asarray(vv, dtype)

            def collect(out, k, v0=v0, nv=nv):
                total, overlap = (np.asarray(a)[:k, :nv] for a in jax.device_get(out))
                frac = np.where(total > 0, overlap / np.maximum(total, 1), 0.0)
                o_idx, v_idx = np.nonzero(frac >= min_frac)
                bar.update(k * nv)
                near = None
                if near_misses:
                    o_n, v_n = _top_below(frac, min_frac, int(near_misses))
                    near = (v_n + v0, o_n, frac[o_n, v_n])
                return v_idx + v0, o_idx, frac[o_idx, v_idx], near

            parts = map_chunked(lambda s, m: fn(vv_d, s, m, words), [spots_d, mask],
                                or_chunk, progress=False, collect=collect)
            for ci, (vi, oi, fr, near) in enumerate(parts):
                found_v.append(vi)
                found_o.append(oi + ci * or_chunk)
                found_f.append(fr)
                if near is not None:
                    near_v.append(near[0])
                    near_o.append(near[1] + ci * or_chunk)
                    near_f.append(near[2])
    if found_v:
        v = np.concatenate(found_v).astype(np.int64)
        o = np.concatenate(found_o).astype(np.int64)
        f = np.concatenate(found_f).astype(np.float64)
    else:
        v = o = np.zeros(0, np.int64)
        f = np.zeros(0)
    order = np.lexsort((o, v))
    v, o, f = v[order], o[order], f[order]
    # Cap per voxel, keeping the first winners in orientation order (as MIDAS fills its
    # fixed buffer).
    keep = _group_rank(v) < max_winners
    v, o, f = v[keep], o[keep], f[keep]
    np.add.at(counts, v, 1)
    winners = Winners(voxel=v, orient=o, frac=f, count=counts)
    if not near_misses:
        return winners
    cat = (lambda parts, dt: np.concatenate(parts).astype(dt) if parts
           else np.zeros(0, dt))
    nv_, no_, nf_ = _best_per_voxel(cat(near_v, np.int64), cat(near_o, np.int64),
                                    cat(near_f, np.float64), int(near_misses))
    return winners, NearMisses(voxel=nv_, orient=no_, frac=nf_)


# =========================================================================== refinement
def start_euler(orient_rows: np.ndarray) -> np.ndarray:
    """Refinement start ``OrientMat2Euler(NormalizeMat(U))`` (rad) of ``(N,9)`` rows."""
    m = jnp.asarray(np.asarray(orient_rows, np.float64).reshape(-1, 3, 3))
    return np.asarray(matrix_to_euler(normalize_mat(m)))


def candidate_reflections(euler0: np.ndarray, g: np.ndarray, theta: np.ndarray,
                          geom: Geometry, tol_rad: float, *, multiple: int = 8):
    """Reflections that can give a spot anywhere in the refinement box of each start.

    The refinement objective is evaluated on these reflections only (typically a third of
    the list). A reflection is kept when one of its Bragg solutions passes the forward
    model's filters at any of the 27 points ``x0 + {−1.25, 0, 1.25}·tol`` per axis — a box
    25 % larger than the search box, because a spot's validity changes only where its η or
    ω crosses a filter edge. :func:`refine` re-checks the final points with the full list.
    ``euler0 (U,3)`` rad. Returns ``idx (U,K)`` int32 and ``mask (U,K)`` bool, K a
    multiple of ``multiple``.
    """
    # float64, or float32 under NFJAX_NO_X64 (asking for float64 there only warns)
    wide = jax.dtypes.canonicalize_dtype(jnp.float64)
    g_j = jnp.asarray(g, wide)
    th_j = jnp.asarray(theta, wide)
    v_j = bragg_v(g_j, th_j)
    geom64 = geom.astype(wide)
    steps = jnp.asarray(np.stack(np.meshgrid(*[[-1.25, 0.0, 1.25]] * 3, indexing="ij"),
                                 -1).reshape(-1, 3) * tol_rad)

    @jax.jit
    def valid_any(e0):
        def one(x):
            sp = predict_spots(euler_to_matrix_midas(x), g_j, th_j, geom64, v=v_j)
            return sp.valid.reshape(-1, 2).any(axis=1)
        return jax.vmap(one)(e0[None, :] + steps).any(axis=0)

    e0 = np.asarray(euler0, np.float64)
    chunk = chunk_size(len(e0), 27 * len(theta) * 2 * 8 * 40, None, maximum=256)
    parts = map_chunked(jax.vmap(valid_any), [e0], chunk, progress=False)
    keep = np.concatenate(parts) if parts else np.zeros((0, len(theta)), bool)
    n_keep = keep.sum(axis=1)
    k = max(multiple, int(math.ceil(max(1, n_keep.max(initial=1)) / multiple) * multiple))
    k = min(k, len(theta)) if len(theta) >= 1 else 1
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k].astype(np.int32)
    mask = np.take_along_axis(keep, order, axis=1)
    return order, mask


def params_to_euler(x: Array, u0: Array, param: str) -> Array:
    """Euler angles (rad) of a refinement variable: ``x`` itself (``"euler"``, MIDAS) or
    the Euler angles of ``R(x)·U0`` (``"rotvec"``: a rotation of the start orientation
    ``u0 (3,3)`` by the rotation vector ``x``)."""
    if param == "euler":
        return x
    return matrix_to_euler(rotvec_matrix(x) @ u0)


def _objective(geom: Geometry, box: int, shape: tuple, sticky: bool, param: str = "euler"):
    """``f(x (3,), u0 (3,3), verts (3,2), g (K,3), theta (K,), v (K,), mask (K,), words)
    = 1 − frac`` of the Euler angles ``params_to_euler(x, u0, param)``."""
    rt = tilt_matrix(geom.tilts)

    def f(x, u0, verts, g, theta, v, mask, words):
        eul = params_to_euler(x, u0, param)
        sp = predict_spots(euler_to_matrix_midas(eul), g, theta, geom, v=v)
        valid = sp.valid & jnp.repeat(mask, 2)
        total, overlap = hard_counts(verts, sp.yl, sp.zl, sp.omega, valid, geom, box, words,
                                     shape, rt, sticky=sticky)
        return 1.0 - frac_from_counts(total, overlap, sp.yl.dtype)

    return f


def _close(a, b):
    """NLopt's ``close``: equal to ~1e-13 relative, every coordinate."""
    return jnp.all(jnp.abs(a - b) <= 1e-13 * (jnp.abs(a) + jnp.abs(b)))


def _nm_geometry(s, lo, hi):
    """Order, centroid and every candidate point of one problem's simplex.

    Vertices stay in fixed slots, as in NLopt's scratch array; ties in f are ordered by
    slot (NLopt orders its red-black tree by (f, address)), which matters because the
    pixel-count objective ties often.
    """
    x, f = s["x"], s["f"]
    o = jnp.argsort(f, stable=True)
    hi_i = o[3]
    xh = x[hi_i]
    not_h = (jnp.arange(4) != hi_i)[:, None]
    c = jnp.sum(jnp.where(not_h, x, 0.0), axis=0) / 3.0
    return o, c, xh


def _nm_point(s, lo, hi):
    """The point one problem evaluates in its current phase, and whether NLopt would stop
    instead (a new point coinciding with the centroid or the point it replaces)."""
    x, f, phase = s["x"], s["f"], s["phase"]
    o, c, xh = _nm_geometry(s, lo, hi)
    fl, fh = f[o[0]], f[o[3]]
    reflect = jnp.clip(c + _ALPHA * (c - xh), lo, hi)
    expand = jnp.clip(c + _GAMMA * (c - xh), lo, hi)
    scale = jnp.where(fh <= s["fr"], -_BETA, _BETA)
    contract = jnp.clip(c + scale * (c - xh), lo, hi)
    second = jnp.where(s["fr"] < fl, expand, contract)
    # Shrink: the k-th vertex (slot order) other than the low one moves halfway to it.
    k = jnp.clip(phase - _SHRINK1, 0, 2)
    slot = jnp.where(k < s["lo_slot"], k, k + 1)
    xl = x[s["lo_slot"]]
    shrink = jnp.clip(xl + _DELTA * (x[slot] - xl), lo, hi)
    init = x[jnp.clip(phase - _INIT0, 0, 3)]
    is_sh = (phase >= _SHRINK1) & (phase <= _SHRINK3)
    pt = jnp.where(phase == _REFLECT, reflect,
                   jnp.where(phase == _SECOND, second, jnp.where(is_sh, shrink, init)))
    centre = jnp.where(is_sh, xl, c)
    old = jnp.where(is_sh, x[slot], xh)
    stop = (phase < _INIT0) & (_close(pt, centre) | _close(pt, old))
    return pt, stop


def _nm_update(s, pt, stop, fp, max_evals):
    """Advance one problem's state after evaluating ``fp = F(pt)`` (NLopt ``nldrmd``)."""
    x, f, phase = s["x"], s["f"], s["phase"]
    o = jnp.argsort(f, stable=True)
    lo_i, hi_i = o[0], o[3]
    fl, f2, fh = f[lo_i], f[o[2]], f[hi_i]
    fr, xr = s["fr"], s["xr"]
    nev = s["nev"] + jnp.where(stop, 0, 1)
    better = (fp <= s["best_f"]) & ~stop          # NLopt keeps the later of equal points
    best_x = jnp.where(better, pt, s["best_x"])
    best_f = jnp.where(better, fp, s["best_f"])

    def put(slot, xv, fv):
        return x.at[slot].set(xv), f.at[slot].set(fv)

    # INIT k: vertex k is already in its slot; store its value.
    ik = jnp.clip(phase - _INIT0, 0, 3)
    init_x, init_f = put(ik, pt, fp)
    init_phase = jnp.where(phase == _INIT0 + 3, _REFLECT, phase + 1)
    # REFLECT: accept when fl <= fr < f(second highest); otherwise a second point.
    accept = (fp >= fl) & (fp < f2)
    acc_x, acc_f = put(hi_i, pt, fp)
    refl_x = jnp.where(accept, acc_x, x)
    refl_f = jnp.where(accept, acc_f, f)
    refl_phase = jnp.where(accept, _REFLECT, _SECOND)
    # SECOND: expansion (fr < fl: keep the better of xe, xr) or contraction; a failed
    # contraction shrinks the simplex towards the low vertex.
    expanding = fr < fl
    take_e = fp < fr
    exp_x, exp_f = put(hi_i, jnp.where(take_e, pt, xr), jnp.where(take_e, fp, fr))
    contr_ok = (fp < fr) & (fp < fh)
    con_x, con_f = put(hi_i, pt, fp)
    moved = expanding | contr_ok
    sec_x = jnp.where(moved, jnp.where(expanding, exp_x, con_x), x)
    sec_f = jnp.where(moved, jnp.where(expanding, exp_f, con_f), f)
    sec_phase = jnp.where(moved, _REFLECT, _SHRINK1)
    lo_slot = jnp.where((phase == _SECOND) & ~moved, lo_i, s["lo_slot"]).astype(jnp.int32)
    # SHRINK k: the k-th non-low vertex takes the shrunk point.
    k = jnp.clip(phase - _SHRINK1, 0, 2)
    slot = jnp.where(k < s["lo_slot"], k, k + 1)
    sh_x, sh_f = put(slot, pt, fp)
    sh_phase = jnp.where(phase == _SHRINK3, _REFLECT, phase + 1)

    is_init, is_refl, is_sec = phase >= _INIT0, phase == _REFLECT, phase == _SECOND
    new_x = jnp.where(is_init, init_x, jnp.where(is_refl, refl_x, jnp.where(is_sec, sec_x, sh_x)))
    new_f = jnp.where(is_init, init_f, jnp.where(is_refl, refl_f, jnp.where(is_sec, sec_f, sh_f)))
    new_phase = jnp.where(is_init, init_phase,
                          jnp.where(is_refl, refl_phase, jnp.where(is_sec, sec_phase, sh_phase)))
    new_xr = jnp.where(is_refl, pt, xr)
    new_fr = jnp.where(is_refl, fp, fr)
    new_x = jnp.where(stop, x, new_x)
    new_f = jnp.where(stop, f, new_f)

    # NLopt's stop tests at the top of an iteration: f (relative, or equal) and x (every
    # coordinate's largest distance from the centroid, relative).
    o2 = jnp.argsort(new_f, stable=True)
    nfl, nfh = new_f[o2[0]], new_f[o2[3]]
    f_conv = (nfl == nfh) | (jnp.abs(nfh - nfl) < FTOL_REL * (jnp.abs(nfl) + jnp.abs(nfh)) / 2)
    not_h = (jnp.arange(4) != o2[3])[:, None]
    c = jnp.sum(jnp.where(not_h, new_x, 0.0), axis=0) / 3.0
    far = c + jnp.max(jnp.abs(new_x - c), axis=0)
    x_conv = jnp.all(jnp.abs(far - c) < XTOL_REL * (jnp.abs(far) + jnp.abs(c)) / 2)
    done = (stop | ((new_phase == _REFLECT) & (f_conv | x_conv)) | (nev >= max_evals))
    return dict(x=new_x, f=new_f, phase=new_phase.astype(jnp.int32), xr=new_xr, fr=new_fr,
                lo_slot=lo_slot, best_x=best_x, best_f=best_f, nev=nev.astype(jnp.int32),
                done=done)


def _refine_fn(geom: Geometry, box: int, shape: tuple, sticky: bool, pool: int,
               max_evals: int, param: str):
    """Jitted batched Nelder–Mead over a queue of problems with a refilled pool.

    ``pool`` problems advance in lockstep, one objective evaluation each per step; a
    problem that stops hands its slot to the next queued one in the same step, so the cost
    is the total number of evaluations, not pool × the slowest problem.
    """
    objective = _objective(geom, box, shape, sticky, param)

    def run(x0, start, step, tol, vox, cand, u0_tab, verts_tab, cand_idx, cand_mask, g, theta,
            v, words):
        n = x0.shape[0]
        dtype = x0.dtype

        def fresh(p):
            """State of problem ``p`` (clipped to the queue; inactive if p >= n): NLopt's
            initial simplex, start + step·e_i, pinned to the bound or reversed when the
            bound is closer than a tenth of the step."""
            q = jnp.clip(p, 0, n - 1)
            s0, st = start[q], step[q]
            ub = x0[q] + 2 * st
            up = s0 + st
            alt = jnp.where(ub - s0 > 0.1 * st, ub, s0 - st)
            e = jnp.where(up > ub, alt, up)
            xs = jnp.where(jnp.eye(3, dtype=bool), e[None, :], s0[None, :])
            xs = jnp.concatenate([s0[None, :], xs], axis=0)
            return dict(x=xs, f=jnp.full((4,), jnp.inf, dtype),
                        phase=jnp.int32(_INIT0), xr=s0, fr=jnp.asarray(jnp.inf, dtype),
                        lo_slot=jnp.int32(0),
                        best_x=s0, best_f=jnp.asarray(jnp.inf, dtype), nev=jnp.int32(0),
                        done=jnp.asarray(False))

        slots = jnp.arange(pool)
        state = jax.vmap(fresh)(slots)
        prob = jnp.where(slots < n, slots, -1)
        nxt = jnp.minimum(pool, n)
        out_x = jnp.zeros((n + 1, 3), dtype)
        out_f = jnp.zeros((n + 1,), dtype)
        out_n = jnp.zeros((n + 1,), jnp.int32)

        def cond(c):
            _, prob, _, _, _, _ = c
            return jnp.any(prob >= 0)

        def body(c):
            state, prob, nxt, out_x, out_f, out_n = c
            q = jnp.clip(prob, 0, n - 1)
            lo = x0[q] - tol
            hi = x0[q] + tol
            pts, stop = jax.vmap(_nm_point)(state, lo, hi)
            ci = cand[q]
            idx = cand_idx[ci]
            fp = jax.vmap(objective, in_axes=(0, 0, 0, 0, 0, 0, 0, None))(
                pts, u0_tab[ci], verts_tab[vox[q]], g[idx], theta[idx], v[idx], cand_mask[ci],
                words)
            state = jax.vmap(partial(_nm_update, max_evals=max_evals))(state, pts, stop, fp)
            finished = state["done"] & (prob >= 0)
            w = jnp.where(finished, prob, n)
            out_x = out_x.at[w].set(state["best_x"])
            out_f = out_f.at[w].set(state["best_f"])
            out_n = out_n.at[w].set(state["nev"])
            # Hand the finished slots to the next queued problems.
            free = finished | (prob < 0)
            rank = jnp.cumsum(free) - 1
            new_p = nxt + rank
            take = free & (new_p < n)
            new_state = jax.vmap(fresh)(new_p)
            state = jax.tree_util.tree_map(
                lambda a, b: jnp.where(take.reshape((-1,) + (1,) * (a.ndim - 1)), b, a),
                state, new_state)
            prob = jnp.where(take, new_p, jnp.where(finished, -1, prob))
            nxt = jnp.minimum(n, nxt + jnp.sum(free))
            return state, prob, nxt, out_x, out_f, out_n

        c = jax.lax.while_loop(cond, body, (state, prob, nxt, out_x, out_f, out_n))
        xb = c[3][:n]
        eul = jax.vmap(lambda a, b: params_to_euler(a, b, param))(xb, u0_tab[cand])
        return xb, c[4][:n], c[5][:n], eul

    return jax.jit(run)


def refine(euler0: np.ndarray, voxel: np.ndarray, cand: np.ndarray, verts: np.ndarray,
           cand_idx: np.ndarray, cand_mask: np.ndarray, g: np.ndarray, theta: np.ndarray,
           obs, geom: Geometry, *, tol_deg: float, box: int, start: np.ndarray | None = None,
           step_frac: float = 0.5, param: str = "euler", sticky: bool = False,
           pool: int | None = None, max_evals: int = MAX_EVALS, max_memory=None,
           progress=None, dtype=jnp.float64):
    """Refine M problems at once: Nelder–Mead on ``1 − hard frac`` (reference §7.3).

    ``param="euler"`` (MIDAS): the variables are the Euler angles, in the box
    ``euler0[i] ± tol_deg``. ``param="rotvec"``: the variables are a rotation vector
    ``x`` (rad) applied to the start orientation, ``U = R(x)·U(euler0[i])``, in the box
    ``|x_k| ≤ tol_deg`` — the same tolerance, but a box of rotations that does not collapse
    near Φ = 0 where φ1 and φ2 become degenerate. The search starts at ``start[i]``
    (variables of ``param``; default the box centre) with NLopt's initial step
    (``step_frac`` × the tolerance, 0.5 by default) for voxel ``verts[voxel[i]] (3,2)``,
    evaluating the reflections ``cand_idx[cand[i]]`` (masked by ``cand_mask``) of
    ``g, theta``. Problems sharing ``cand`` must share ``euler0`` (one start per
    orientation). The best point's fraction is checked against the full reflection list and
    recomputed with it wherever a non-candidate reflection gives a spot there.
    Returns ``x (M,3)`` (variables), ``euler (M,3)`` rad, ``frac (M,)`` (exact, of
    ``euler``) and ``n_evals (M,)``.
    """
    if param not in ("euler", "rotvec"):
        raise ValueError(f"param must be 'euler' or 'rotvec', not {param!r}")
    m = int(np.shape(euler0)[0])
    if m == 0:
        return np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0, np.int32)
    tol = math.radians(float(tol_deg))
    k = cand_idx.shape[1]
    if pool is None:
        # One evaluation holds ~2K spots × a few dozen floats per problem.
        # On a CPU a finished slot costs as much as a busy one until the pool drains, so
        # the pool holds at most an eighth of the problems (a short tail).
        pool = chunk_size(m, 2 * k * box_pixels(box) * 400, max_memory, maximum=1024, multiple=8,
                          cpu_waves=8, minimum=64)
    geom_d = geom.astype(dtype)
    fn = _refine_fn(geom_d, box, obs.shape, sticky, pool, max_evals, param)
    euler0 = np.asarray(euler0, np.float64)
    cand = np.asarray(cand, np.int32)
    # The tables are padded to bucketed lengths (rows no problem refers to), so that
    # passes of nearby sizes share the compiled program.
    n_tab = bucket(cand_idx.shape[0])
    u0 = np.zeros((n_tab, 3, 3))
    u0[cand] = np.asarray(euler_to_matrix_midas(jnp.asarray(_pad_to(euler0, bucket(m)))))[:m]
    g_d, th_d = jnp.asarray(g, dtype), jnp.asarray(theta, dtype)
    tables = (jnp.asarray(u0, dtype), _bucketed(verts, dtype),
              jnp.asarray(_pad_to(cand_idx, n_tab)), jnp.asarray(_pad_to(cand_mask, n_tab)),
              g_d, th_d, bragg_v(g_d, th_d), observe.device_words(obs.words))
    centre = euler0 if param == "euler" else np.zeros_like(euler0)
    start = centre if start is None else np.asarray(start, np.float64)
    step = np.full((m, 3), step_frac * tol)
    tol_d = jnp.asarray(tol, dtype)
    # A queue chunk holds many pools' worth of problems; memory per queued problem is tiny.
    queue = max(pool, min(bucket(m), 64 * pool))
    parts = map_chunked(lambda a, b, c, d, e: fn(a, b, c, tol_d, d, e, *tables),
                        [centre.astype(dtype), start.astype(dtype), step.astype(dtype),
                         np.asarray(voxel, np.int32), cand],
                        queue, desc="refine", unit="fit", progress=progress)
    x = np.concatenate([p[0] for p in parts]).astype(np.float64)
    frac = 1.0 - np.concatenate([p[1] for p in parts]).astype(np.float64)
    nev = np.concatenate([p[2] for p in parts])
    eul = np.concatenate([p[3] for p in parts]).astype(np.float64)
    missed = missed_reflections(eul, cand, cand_idx, cand_mask, g, theta, geom,
                                max_memory=max_memory)
    if missed.any():
        frac[missed] = exact_fracs(eul[missed], np.asarray(voxel)[missed], verts, g, theta,
                                   obs, geom, box=box, sticky=sticky, max_memory=max_memory,
                                   dtype=dtype)
    return x, eul, frac, nev


def _bucketed(table, dtype) -> jax.Array:
    """A table indexed by the problems (the voxels' triangles) on the device, its rows
    padded to :func:`nfjax.chunking.bucket`: an argument of the compiled program, not a
    constant, so that one compilation serves every grid of nearby size."""
    table = np.asarray(table)
    return jnp.asarray(_pad_to(table, bucket(len(table))), dtype)


def missed_reflections(euler: np.ndarray, cand: np.ndarray, cand_idx: np.ndarray,
                       cand_mask: np.ndarray, g: np.ndarray, theta: np.ndarray,
                       geom: Geometry, *, max_memory=None) -> np.ndarray:
    """``(M,)`` bool: does a reflection outside problem i's candidate list give a spot at
    ``euler[i]``? (Then its candidate-list fraction is not MIDAS's and is recomputed.)"""
    m = int(np.shape(euler)[0])
    r = int(np.shape(theta)[0])
    if m == 0:
        return np.zeros(0, bool)
    member = np.zeros((bucket(cand_idx.shape[0]), r), bool)
    rows = np.repeat(np.arange(cand_idx.shape[0]), cand_idx.shape[1])
    member[rows[cand_mask.ravel()], cand_idx.ravel()[cand_mask.ravel()]] = True
    g_j, th_j = jnp.asarray(g, jnp.float64), jnp.asarray(theta, jnp.float64)
    v_j = bragg_v(g_j, th_j)
    geom64 = geom.astype(jnp.float64)

    @jax.jit
    def run(e, c, member):
        def one(x, ci):
            sp = predict_spots(euler_to_matrix_midas(x), g_j, th_j, geom64, v=v_j)
            return jnp.any(sp.valid.reshape(-1, 2).any(axis=1) & ~member[ci])
        return jax.vmap(one)(e, c)

    chunk = chunk_size(m, r * 2 * 8 * 40, max_memory, maximum=2048)
    member_d = jnp.asarray(member)
    parts = map_chunked(lambda e, c: run(e, c, member_d),
                        [np.asarray(euler, np.float64), np.asarray(cand, np.int32)], chunk,
                        progress=False)
    return np.concatenate(parts)


def exact_fracs(euler: np.ndarray, voxel: np.ndarray, verts: np.ndarray, g: np.ndarray,
                theta: np.ndarray, obs, geom: Geometry, *, box: int, sticky: bool = False,
                max_memory=None, dtype=jnp.float64) -> np.ndarray:
    """Hard FracOverlap with every reflection for each ``(euler[i], verts[voxel[i]])``."""
    m = int(np.shape(euler)[0])
    if m == 0:
        return np.zeros(0)
    ones = jnp.ones(np.shape(theta)[0], bool)
    f = _objective(geom.astype(dtype), box, obs.shape, sticky, "euler")
    eye = jnp.eye(3, dtype=dtype)
    g_d, th_d = jnp.asarray(g, dtype), jnp.asarray(theta, dtype)
    v_d = bragg_v(g_d, th_d)
    verts_d = _bucketed(verts, dtype)

    @jax.jit
    def run(e, vi, verts_d, words):
        return 1.0 - jax.vmap(lambda a, b: f(a, eye, verts_d[b], g_d, th_d, v_d, ones,
                                             words))(e, vi)

    chunk = chunk_size(m, 2 * len(theta) * box_pixels(box) * 400, max_memory, maximum=1024)
    words = observe.device_words(obs.words)
    parts = map_chunked(lambda e, vi: run(e, vi, verts_d, words),
                        [np.asarray(euler).astype(dtype), np.asarray(voxel, np.int32)],
                        chunk, progress=False)
    return np.concatenate(parts).astype(np.float64)


# =========================================================================== selection
def _select_fn(n_save: int, min_miso_rad: float, sym: np.ndarray):
    """Jitted per-voxel selection over winners padded to W (reference §7.3).

    Inputs ``euler (V,W,3)``, ``frac (V,W)``, ``key (V,W)``, ``valid (V,W)`` in orientation
    order. Winners are ranked by ``(frac, key)`` lexicographically — with ``key`` all zero
    that is MIDAS's rank by fraction alone. Returns ``best (V,)`` index of the chosen winner
    (−1 if none) and the saved solutions ``saved_idx (V,n)`` (−1 = empty), best first.
    """
    sym_j = jnp.asarray(sym)

    def one(euler, frac, key, valid):
        quats = euler_to_quat(euler)                                   # (W,4)

        def step(carry, item):
            best_i, best_f, best_k, s_idx, s_f, s_k, s_q = carry
            i, f, k, ok, q = item
            # (f, k) >= (best_f, best_k): ties go to the later winner.
            take = ok & ((f > best_f) | ((f == best_f) & (k >= best_k)))
            best_i = jnp.where(take, i, best_i)
            best_f = jnp.where(take, f, best_f)
            best_k = jnp.where(take, k, best_k)
            filled = s_idx >= 0
            miso = misorientation(q[None, :], s_q, sym_j)
            near = jnp.any(filled & (miso < min_miso_rad))
            # Insert before the first saved entry ranked lower than or equal to (f, k).
            lower = ~filled | (s_f < f) | ((s_f == f) & (s_k <= k))
            pos = jnp.argmax(lower)
            room = jnp.any(lower)
            ins = ok & ~near & room
            j = jnp.arange(n_save)

            def insert(saved, new):
                shifted = jnp.concatenate([saved[:1], saved[:-1]])
                before = (j < pos).reshape((-1,) + (1,) * (saved.ndim - 1))
                at = (j == pos).reshape(before.shape)
                out = jnp.where(before, saved, jnp.where(at, new, shifted))
                return jnp.where(ins, out, saved)

            s_idx, s_f, s_k = insert(s_idx, i), insert(s_f, f), insert(s_k, k)
            s_q = insert(s_q, q[None, :])
            return (best_i, best_f, best_k, s_idx, s_f, s_k, s_q), None

        w = frac.shape[0]
        init = (jnp.int32(-1), jnp.asarray(-1.0, frac.dtype), jnp.asarray(-jnp.inf, key.dtype),
                jnp.full((n_save,), -1, jnp.int32), jnp.full((n_save,), -jnp.inf, frac.dtype),
                jnp.full((n_save,), -jnp.inf, key.dtype),
                jnp.zeros((n_save, 4), quats.dtype).at[:, 0].set(1.0))
        (best_i, _, _, s_idx, _, _, _), _ = jax.lax.scan(
            step, init, (jnp.arange(w, dtype=jnp.int32), frac, key, valid, quats))
        return best_i, s_idx

    return jax.jit(jax.vmap(one))


def select_solutions(winners: Winners, euler: np.ndarray, frac: np.ndarray, n_voxels: int,
                     *, n_save: int, min_miso_deg: float, space_group: int,
                     key: np.ndarray | None = None):
    """MIDAS's per-voxel choice among refined winners (reference §7.3).

    The best is the winner with the highest refined fraction, ties to the later one in
    orientation order. The saved list (``SaveNSolutions``) takes winners in orientation
    order, skipping one within ``min_miso_deg`` of an already saved solution (even when it
    is better, as MIDAS), inserting the rest by descending fraction (a new entry goes before
    equal ones) and dropping the last when full. ``key`` (per winner, optional) is a
    secondary rank: winners are compared by ``(frac, key)``, for both the best and the
    saved order, so it only decides between equal fractions (:func:`tie_scores`); without
    it, or all zero, the rule is exactly MIDAS's. Returns ``best (N,)`` winner index (−1:
    none) and ``saved (N, n_save)`` winner indices (−1: empty).
    """
    from nfjax.crystal import symmetry_quaternions

    best = np.full(n_voxels, -1, np.int64)
    saved = np.full((n_voxels, n_save), -1, np.int64)
    if len(winners) == 0:
        return best, saved
    counts = np.bincount(winners.voxel, minlength=n_voxels)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    has = np.flatnonzero(counts)
    width = bucket(int(counts.max()))     # padding columns are not ``valid``
    fn = _select_fn(int(n_save), math.radians(float(min_miso_deg)),
                    symmetry_quaternions(int(space_group)))
    # Pad winners per voxel to the widest voxel; chunk over voxels.
    col = np.arange(len(winners)) - starts[winners.voxel]
    vox_rank = np.searchsorted(has, winners.voxel)
    chunk = chunk_size(has.size, width * (n_save * 24 * 8 * 8 + 64), None, maximum=4096)
    out_b, out_s = [], []
    for c0 in range(0, has.size, chunk):
        sel = (vox_rank >= c0) & (vox_rank < c0 + chunk)
        nv = min(chunk, has.size - c0)
        e = np.zeros((chunk, width, 3))
        e[:, :, 0] = 0.0
        fr = np.full((chunk, width), -1.0)
        ky = np.zeros((chunk, width))
        ok = np.zeros((chunk, width), bool)
        r, cc = vox_rank[sel] - c0, col[sel]
        e[r, cc] = euler[sel]
        fr[r, cc] = frac[sel]
        if key is not None:
            ky[r, cc] = key[sel]
        ok[r, cc] = True
        b, s = fn(jnp.asarray(e), jnp.asarray(fr), jnp.asarray(ky), jnp.asarray(ok))
        out_b.append(np.asarray(b)[:nv])
        out_s.append(np.asarray(s)[:nv])
    b = np.concatenate(out_b).astype(np.int64)
    s = np.concatenate(out_s).astype(np.int64)
    base = starts[has]
    best[has] = np.where(b >= 0, base + b, -1)
    saved[has] = np.where(s >= 0, base[:, None] + s, -1)
    return best, saved


# =========================================================================== the fit
def build_records(grid: np.ndarray, winners: Winners, euler: np.ndarray, frac: np.ndarray,
                  best: np.ndarray, saved: np.ndarray, *, block_nr: int = 0,
                  run_time: np.ndarray | None = None):
    """Binary-mic records ``(N,11)`` and ``.AllMatches`` rows ``(N, 7+4n)`` (§6.4).

    Every row carries x, y, 2gs and UpDown; rows without a winner have zeros elsewhere.
    """
    n = grid.shape[0]
    n_save = saved.shape[1]
    rec = np.zeros((n, 11))
    rec[:, 3] = grid[:, 2]
    rec[:, 4] = grid[:, 3]
    rec[:, 5] = 2 * grid[:, 4]
    rec[:, 6] = up_down(grid)
    rec[:, 1] = winners.count
    ok = best >= 0
    bi = best[ok]
    rec[ok, 0] = winners.orient[bi]
    rec[ok, 7:10] = euler[bi]
    rec[ok, 10] = frac[bi]
    if run_time is not None:
        rec[:, 2] = run_time
    am = np.zeros((n, 7 + 4 * n_save))
    am[:, 0] = block_nr
    am[:, 1] = winners.count
    am[:, 3:7] = rec[:, 3:7]
    for j in range(n_save):
        sj = saved[:, j]
        has = sj >= 0
        am[has, 7 + 4 * j:10 + 4 * j] = euler[sj[has]]
        am[has, 10 + 4 * j] = frac[sj[has]]
    return rec, am


def _voxel_best(voxel: np.ndarray, frac: np.ndarray, n_voxels: int) -> np.ndarray:
    """``(n_voxels,)`` the largest ``frac`` of each voxel's winners (0 where none)."""
    best = np.zeros(n_voxels)
    np.maximum.at(best, voxel, frac)
    return best


def fit_grid(params, grid: np.ndarray, spot_table, obs, hkls=None, *, max_memory=None,
             polish: bool = False, param: str = "euler", prune_ratio: float = PRUNE_RATIO,
             restarts: tuple = RESTARTS, restart_ratio: float = RESTART_RATIO,
             restart_box: float = RESTART_BOX, restart_floor: float = RESTART_FLOOR,
             tie_probe: float = TIE_PROBE, near_misses: int = 0, near_below: float | None = None,
             sticky: bool = False, progress=None, block_nr: int = 0,
             record_time: bool = False, dtype=jnp.float64) -> FitResult:
    """Fit every row of ``grid (N,5)`` (MIDAS grid columns) in memory.

    ``spot_table`` (:class:`nfjax.spots.SpotTable`) holds the orientations to screen and
    their predicted spots; ``obs`` the observation volume; ``hkls`` the full reflection
    table (default: from ``params``). Needs MinFracAccept and OrientTol.

    Refinement (see ``docs/midas-differences.md``, "Refinement defaults"):

    1. **Pruning.** A winner whose screening fraction is below ``prune_ratio`` × its voxel's
       best screening fraction is not refined: it keeps its start orientation and its
       screening fraction (``n_evals`` 0). It cannot decide its voxel; on the Au example
       0.3 skips 4286 of 11,501 problems (35 % of the evaluations) and changes no chosen
       solution. ``prune_ratio=0`` refines every winner, as MIDAS.
    2. **MIDAS's Nelder–Mead** on every other winner, variables ``param`` (``"euler"`` as
       MIDAS, or ``"rotvec"``, see :func:`refine`).
    3. **Near misses** (``near_misses=n``, off by default, on in library passes through
       :func:`refinement_options`). A voxel whose best refined fraction is still below
       ``near_below`` (default :func:`unresolved_below`) also refines the ``n`` best
       orientations that screened *below* MinFracAccept (collected in the same screening
       pass, :class:`NearMisses`); they join its winners (the record's winner count stays
       MIDAS's: those that passed screening). Why: MinFracAccept only filters what to
       refine, and against a library it can filter out the seeds that would reach the
       grain. On the smooth Au sample's Φ ≈ 6° grain with the 1° uniform library, the
       seeds 0.5–1.1° away screen at 0.01–0.04 (below MinFracAccept 0.04), rank 1–27
       among the ~2000 orientations below it, and refine onto the grain; the seeds that
       pass are Σ3-twin variants stuck at 0.33. Loop 0 of the multi-resolution run then
       misses the grain (docs/midas-differences.md). The cost is ``n`` refinements per
       unresolved voxel, against a screen of the whole library per voxel.
    4. **Restart rounds.** Each entry of ``restarts`` is one round for the winners that
       could still decide their voxel (fraction < 1, ≥ ``restart_ratio`` × the voxel's
       best and ≥ ``restart_floor``: a voxel below 0.3 is empty space or unresolved either
       way): Nelder–Mead again from the refined point, now over a rotation vector about
       it, in the rotation box ``±restart_box`` × OrientTol with an initial step of that
       entry × OrientTol; a restarted point is kept only if strictly better. Why a rotation
       vector: near Φ = 0 (grain 1 of the Au example, Φ ≈ 6°) the Euler box is a narrow
       ridge along φ1 − φ2 where the true orientation is an isolated peak ~0.25° (of
       rotation) from a broad local maximum; a small simplex in rotation space climbs it.
    5. **Tie-break.** Where several winners of a voxel reach its best fraction (MIDAS takes
       the later one), they are scored again with the probe triangle enlarged
       ``tie_probe``× about its centroid (see :func:`tie_scores`) and the best of them is
       chosen — for the record and the order of the saved solutions alike; the record
       keeps its orientation and fraction. With a probe smaller than a
       pixel every spot is one pixel, and at a grain boundary both grains' orientations
       often score 1.0: on the multi-resolution Au run (1.25 µm grid, 1 µm probes, 1.48 µm
       pixels) 277 voxels tie between the two grains (a Σ3 twin pair), and the tie-break
       cuts the misses against the ground truth from 44 to 27.
       ``restarts=()`` with ``prune_ratio=0``, ``tie_probe=0`` and ``near_misses=0`` is
       exactly MIDAS's procedure.

    On the Au example (1514 rendered voxels, within 0.25° of the truth): MIDAS 99.21 %,
    MIDAS's procedure here 99.14 % (mean confidence 0.962), the defaults 99.54 % (0.979).
    ``polish`` adds an optax pass on the smooth surrogate for each voxel's chosen solution
    (see :func:`polish_solutions`).
    """
    from nfjax.crystal import reflections

    params.require("MinFracAccept", "OrientTol", why="by the fitter")
    t0 = time.perf_counter()
    timings = {}
    grid = np.asarray(grid, np.float64)
    if grid.ndim != 2 or grid.shape[0] == 0:
        raise NfjaxError(f"{params.source}: the grid to fit is empty (0 voxels)")
    geom = geometry_from_params(params)
    if tuple(obs.shape) != geom.shape:
        raise NfjaxError(f"observation volume has shape {tuple(obs.shape)}, the parameter "
                         f"file {params.source} describes {geom.shape}")
    table = reflections(params, hkls)
    # One device copy of the words for every stage (shared with the host words on the CPU).
    obs = obs.to_device()
    verts = triangle_vertices(grid)
    edge = float(np.max(2 * grid[:, 4]))
    box = fit_box(edge, verts, table.theta, geom, spot_table.spots)
    winners = screen(verts, spot_table, obs, geom, min_frac=float(params.min_frac_accept),
                     box=box, max_memory=max_memory, sticky=sticky, dtype=dtype,
                     near_misses=int(near_misses), progress=progress)
    near = None
    if near_misses:
        winners, near = winners
    timings["screen"] = time.perf_counter() - t0
    # One refinement start and one reflection subset per distinct winning orientation.
    uniq, inv = np.unique(winners.orient, return_inverse=True)
    tol = float(params.orient_tol)
    if uniq.size:
        e0_u = start_euler(spot_table.orient[uniq])
        cand_idx, cand_mask = candidate_reflections(e0_u, table.g, table.theta, geom,
                                                    math.radians(tol))
    else:
        e0_u = np.zeros((0, 3))
        cand_idx, cand_mask = np.zeros((1, 1), np.int32), np.zeros((1, 1), bool)
    e0 = e0_u[inv] if uniq.size else np.zeros((0, 3))
    common = dict(box=box, sticky=sticky, max_memory=max_memory, dtype=dtype)
    # Pruning: winners far below their voxel's best screening fraction keep their start.
    sbest = _voxel_best(winners.voxel, winners.frac, grid.shape[0])
    sel = np.flatnonzero(winners.frac >= float(prune_ratio) * sbest[winners.voxel])
    eul = np.array(e0, np.float64)
    frac = np.array(winners.frac, np.float64)
    nev = np.zeros(len(winners), np.int32)
    t1 = time.perf_counter()
    if sel.size:
        _, eul[sel], frac[sel], nev[sel] = refine(
            e0[sel], winners.voxel[sel], inv[sel], verts, cand_idx, cand_mask, table.g,
            table.theta, obs, geom, tol_deg=tol, progress=progress, param=param, **common)
    timings["refine"] = time.perf_counter() - t1
    n_near = n_near_vox = 0
    if near is not None and len(near):
        # Near misses: the voxels no winner resolves also refine the orientations that just
        # missed the acceptance fraction (they join the winners, MIDAS's order kept).
        t1 = time.perf_counter()
        below = near_below if near_below is not None else unresolved_below(params)
        vbest = _voxel_best(winners.voxel, frac, grid.shape[0])
        take = np.flatnonzero(vbest[near.voxel] < float(below))
        if take.size:
            n_near, n_near_vox = int(take.size), int(np.unique(near.voxel[take]).size)
            uniq_n, inv_n = np.unique(near.orient[take], return_inverse=True)
            e0_n = start_euler(spot_table.orient[uniq_n])
            ci_n, cm_n = candidate_reflections(e0_n, table.g, table.theta, geom,
                                               math.radians(tol))
            _, eul_n, frac_n, nev_n = refine(
                e0_n[inv_n], near.voxel[take], inv_n, verts, ci_n, cm_n, table.g,
                table.theta, obs, geom, tol_deg=tol, progress=progress, param=param, **common)
            offset = cand_idx.shape[0]
            width = max(cand_idx.shape[1], ci_n.shape[1])
            pad = lambda a, fill: np.pad(a, ((0, 0), (0, width - a.shape[1])),  # noqa: E731
                                         constant_values=fill)
            cand_idx = np.concatenate([pad(cand_idx, 0), pad(ci_n, 0)])
            cand_mask = np.concatenate([pad(cand_mask, False), pad(cm_n, False)])
            vox = np.concatenate([winners.voxel, near.voxel[take]])
            ori = np.concatenate([winners.orient, near.orient[take]])
            order = np.lexsort((ori, vox))
            refined = np.zeros(len(winners) + take.size, bool)
            refined[sel] = True
            refined[len(winners):] = True
            winners = Winners(voxel=vox[order], orient=ori[order],
                              frac=np.concatenate([winners.frac, near.frac[take]])[order],
                              count=winners.count)
            inv = np.concatenate([inv, inv_n + offset])[order]
            e0 = np.concatenate([e0, e0_n[inv_n]])[order]
            eul = np.concatenate([eul, eul_n])[order]
            frac = np.concatenate([frac, frac_n])[order]
            nev = np.concatenate([nev, nev_n])[order]
            sel = np.flatnonzero(refined[order])
        timings["near"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    todo = sel
    n_restarted = 0
    for step in restarts:
        vbest = _voxel_best(winners.voxel, frac, grid.shape[0])
        todo = todo[(frac[todo] < 1.0) & (frac[todo] >= restart_floor)
                    & (frac[todo] >= restart_ratio * vbest[winners.voxel[todo]])]
        if todo.size == 0:
            break
        n_restarted += todo.size
        # One rotation box per problem, about its own refined point.
        _, e2, f2, n2 = refine(eul[todo], winners.voxel[todo], np.arange(todo.size), verts,
                               cand_idx[inv[todo]], cand_mask[inv[todo]], table.g,
                               table.theta, obs, geom, tol_deg=restart_box * tol,
                               step_frac=float(step) / restart_box, param="rotvec",
                               progress=False, **common)
        nev[todo] += n2
        up = f2 > frac[todo]
        eul[todo[up]], frac[todo[up]] = e2[up], f2[up]
    timings["restarts"] = time.perf_counter() - t1
    n_save = int(params.save_n_solutions)
    select = partial(select_solutions, n_save=n_save,
                     min_miso_deg=float(params.min_miso_n_saves),
                     space_group=int(params.space_group))
    best, saved = select(winners, eul, frac, grid.shape[0])
    if polish and len(winners):
        t1 = time.perf_counter()
        chosen = best[best >= 0]
        eul[chosen], frac[chosen] = polish_solutions(
            eul[chosen], frac[chosen], winners.voxel[chosen], e0[chosen], verts, table.g,
            table.theta, obs, geom, tol_deg=tol, box=box, sticky=sticky,
            max_memory=max_memory)
        best, saved = select(winners, eul, frac, grid.shape[0])
        timings["polish"] = time.perf_counter() - t1
    n_tie = 0
    if tie_probe > 0 and len(winners):
        t1 = time.perf_counter()
        key = tie_scores(winners.voxel, eul, frac, verts, table.g, table.theta, obs, geom,
                         scale=float(tie_probe), edge=edge, sticky=sticky,
                         max_memory=max_memory, dtype=dtype)
        if np.any(key):
            midas_best = best
            best, saved = select(winners, eul, frac, grid.shape[0], key=key)
            n_tie = int(np.sum(best != midas_best))
        timings["ties"] = time.perf_counter() - t1
    run_time = None
    if record_time:
        # Wall time of the whole fit shared out by each voxel's evaluations (a batched fit
        # has no per-voxel clock).
        per_vox = np.bincount(winners.voxel, weights=nev, minlength=grid.shape[0])
        total = max(per_vox.sum(), 1.0)
        run_time = per_vox / total * (time.perf_counter() - t0)
    rec, am = build_records(grid, winners, eul, frac, best, saved, block_nr=block_nr,
                            run_time=run_time)
    timings["total"] = time.perf_counter() - t0
    return FitResult(records=rec, allmatches=am, winners=winners, refined_euler=eul,
                     refined_frac=frac, n_evals=nev, timings=timings,
                     n_restarted=n_restarted, n_pruned=len(winners) - sel.size,
                     n_tie_broken=n_tie, n_near=n_near, n_near_voxels=n_near_vox)


def tie_scores(voxel: np.ndarray, euler: np.ndarray, frac: np.ndarray, verts: np.ndarray,
               g: np.ndarray, theta: np.ndarray, obs, geom: Geometry, *, scale: float,
               edge: float, sticky: bool = False, max_memory=None,
               dtype=jnp.float64) -> np.ndarray:
    """Secondary rank for winners that tie at their voxel's best fraction: a larger probe.

    ``voxel``, ``euler``, ``frac`` per winner; ``verts (N,3,2)`` the probe triangles of edge
    ``edge`` µm. Every voxel with two or more winners at exactly its best fraction has those
    winners scored again (hard fraction, every reflection) with its triangle enlarged
    ``scale``× about the centroid — and to at least 1.01 pixel, so that the footprint is
    rasterised rather than MIDAS's one pixel per spot. Returns the enlarged score for those
    winners and 0 for every other: the ``key`` of :func:`select_solutions`, where the
    highest enlarged score wins and equal ones keep MIDAS's rule (the later winner).
    """
    key = np.zeros(len(frac))
    n = int(verts.shape[0])
    vb = _voxel_best(voxel, frac, n)
    tied = np.flatnonzero((frac == vb[voxel]) & (vb[voxel] > 0))
    per_voxel = np.bincount(voxel[tied], minlength=n)
    tied = tied[per_voxel[voxel[tied]] > 1]
    if tied.size == 0:
        return key
    big_edge = max(scale * edge, 1.01 * float(geom.px))
    factor = big_edge / edge
    cen = verts.mean(axis=1, keepdims=True)
    big = cen + factor * (verts - cen)
    key[tied] = exact_fracs(euler[tied], voxel[tied], big, g, theta, obs, geom,
                            box=fit_box(big_edge, big, theta, geom), sticky=sticky,
                            max_memory=max_memory, dtype=dtype)
    return key


def polish_solutions(euler, frac, voxel, euler0, verts, g, theta, obs, geom: Geometry, *,
                     tol_deg: float, box: int, sticky: bool = False, max_memory=None,
                     steps: int = 20, learning_rate: float = 2e-4, window: int = 3,
                     frame_window: int = 3, dtype=jnp.float64):
    """Optax polish: Adam ascent of the smooth surrogate (:func:`nfjax.score.soft_overlap`)
    from each refined ``euler (M,3)`` rad, projected onto the box ``euler0 ± tol_deg``.

    The hard fraction of the polished angles is computed with every reflection and a
    polished angle replaces the refined one only where it is strictly better, so the
    result is never worse than the input by MIDAS's measure. Returns ``(euler, frac)``.
    """
    import optax

    from nfjax.orientation import euler_to_matrix
    from nfjax.score import soft_overlap

    m = int(np.shape(euler)[0])
    euler = np.asarray(euler, np.float64)
    frac = np.asarray(frac, np.float64)
    if m == 0:
        return euler, frac
    tol = math.radians(float(tol_deg))
    geom_d = geom.astype(dtype)
    g_d, th_d = jnp.asarray(g, dtype), jnp.asarray(theta, dtype)
    verts_d = _bucketed(verts, dtype)
    opt = optax.adam(learning_rate)

    def loss(e, vv, words):
        return -soft_overlap(vv, euler_to_matrix(e), g_d, th_d, geom_d, words, obs.shape,
                             window=window, frame_window=frame_window)

    @jax.jit
    def run(e, e0, vi, verts_d, words):
        vv = verts_d[vi]
        grad = jax.vmap(jax.grad(loss), in_axes=(0, 0, None))

        def body(_, c):
            x, st = c
            upd, st = opt.update(grad(x, vv, words), st, x)
            x = jnp.clip(optax.apply_updates(x, upd), e0 - tol, e0 + tol)
            return x, st

        x, _ = jax.lax.fori_loop(0, steps, body, (e, opt.init(e)))
        return x

    chunk = chunk_size(m, 2 * len(theta) * window * window * frame_window * 400, max_memory,
                       maximum=256)
    words = observe.device_words(obs.words)
    parts = map_chunked(lambda e, e0, vi: run(e, e0, vi, verts_d, words),
                        [euler.astype(dtype), np.asarray(euler0).astype(dtype),
                         np.asarray(voxel, np.int32)], chunk, desc="polish", unit="voxel")
    pol = np.concatenate(parts).astype(np.float64)
    pf = exact_fracs(pol, voxel, verts, g, theta, obs, geom, box=box, sticky=sticky,
                     max_memory=max_memory, dtype=dtype)
    better = pf > frac
    return np.where(better[:, None], pol, euler), np.where(better, pf, frac)


# =========================================================================== files / CLI
def _load_spot_table(params, out: Path, hkls, geom, max_memory, progress):
    """Key/DiffractionSpots/OrientMat.bin from the output folder (checked against the
    SeedOrientations file when it exists), or, when they are absent, MakeDiffrSpots from
    the seed file named by SeedOrientations (in memory)."""
    from nfjax.crystal import reflections
    from nfjax.io.spots import NAMES, read_spot_files

    from nfjax.io.seeds import read_seeds
    from nfjax.spots import make_diffraction_spots, seed_matrices

    seeds = (params.resolve(params.seed_orientations) if params.seed_orientations
             else None)
    if any((out / name).exists() for name in NAMES):
        # MIDAS's FitOrientation reads these; make sure they are the seeds' (a spot table
        # left from another seed set would be fitted silently).
        table = read_spot_files(out)
        if seeds is not None and seeds.is_file():
            quats = read_seeds(seeds)
            if (quats.shape[0] != len(table) or not np.allclose(
                    table.orient, seed_matrices(quats).reshape(-1, 9), rtol=0, atol=1e-9)):
                raise InputFileError(
                    f"{out / NAMES[2]}: its {len(table)} orientations are not those of "
                    f"SeedOrientations {seeds} ({quats.shape[0]} seeds): the spot files are "
                    f"from another seed set; delete {', '.join(NAMES)} (the fit then "
                    "predicts the spots from the seeds) or rerun 'nfjax spots'")
        return table

    params.require("SeedOrientations",
                   why=f"because there is no {NAMES[0]} in {out} to take the spots from")
    quats = read_seeds(seeds)
    table = reflections(params, hkls)
    return make_diffraction_spots(quats, table.g, table.theta, geom, max_memory=max_memory,
                                  progress=progress)


def _merge_block(path: Path, rows: np.ndarray, start: int, n_total: int) -> np.ndarray:
    """Full-length records: this block's ``rows`` at ``start``, the other rows from an
    existing file of the right length (another block's results), else zeros. When this is
    one block of several and an existing file has another length (a file from another grid
    or SaveNSolutions), a warning says its rows are not kept."""
    import sys

    width = rows.shape[1]
    full = np.zeros((n_total, width))
    size = path.stat().st_size if path.exists() else None
    if size == n_total * width * 8:
        full[:] = np.fromfile(path, dtype="<f8").reshape(n_total, width)
    elif size is not None and rows.shape[0] < n_total:
        print(f"warning: {path}: {size} bytes, not the {n_total} x {width} float64 records "
              f"of this grid ({n_total * width * 8} bytes): a file from another grid or "
              "SaveNSolutions; its rows are not kept, and the rows of the other blocks stay "
              "zero until they run", file=sys.stderr)
    full[start:start + rows.shape[0]] = rows
    return full


def run_fit(args, params=None) -> int:
    """``nfjax fit PARAMS [--block N --nblocks M] [--device cpu|gpu] [--max-memory SIZE]
    [--polish] [--record-time] [--spots-info PATH]``.

    Reads the grid (GridFileName in the output folder), the spot table (Key.bin & co., or
    the seeds), the observations (SpotsInfo.bin) and hkls.csv (or the reflections computed
    from the parameters), fits this block's contiguous rows and writes MicFileBinary,
    ``.AllMatches`` and MicFileText atomically, each at its full grid length (rows of other
    blocks are kept from the existing file; a lock serialises concurrent blocks).
    """
    import fcntl
    import sys

    from nfjax.crystal import hkls_from_params
    from nfjax.io.atomic import check_target
    from nfjax.io.gridfile import read_grid
    from nfjax.io.hkls import read_hkls_csv
    from nfjax.io.mic import allmatches_path, write_allmatches, write_binary_mic, write_text_mic
    from nfjax.parallel import block_range, device_scope
    from nfjax.params import read_params

    if params is None:           # the CLI passes the file it read (and warned about)
        params = read_params(args.params)
    params.require("MicFileBinary", "MinFracAccept", "OrientTol", why="by nfjax fit")
    ctx = device_scope(getattr(args, "device", None))
    out = params.output_dir
    max_memory = parse_memory(getattr(args, "max_memory", None))    # before any loading
    progress = None
    # The outputs are checked before the fit, so an unwritable one fails first.
    bin_path = out / params.mic_file_binary            # an absolute name stays absolute
    am_path = allmatches_path(bin_path)
    text_path = out / params.mic_file_text if params.mic_file_text else None
    for path in (bin_path, am_path, text_path):
        if path is not None:
            check_target(path)
    with ctx:
        t0 = time.perf_counter()
        grid = read_grid(out / (params.grid_file_name or "grid.txt"))
        if grid.shape[0] == 0:
            raise NfjaxError(f"{out / (params.grid_file_name or 'grid.txt')}: the grid is "
                             "empty (0 points): nothing to fit")
        nblocks = getattr(args, "nblocks", None)
        start, stop = block_range(grid.shape[0], int(getattr(args, "block", 0) or 0),
                                  1 if nblocks is None else int(nblocks))
        if stop <= start:
            raise NfjaxError(f"--block {args.block} of --nblocks {args.nblocks}: no grid "
                             f"rows left for this block ({grid.shape[0]} rows in total)")
        hk_path = out / "hkls.csv"
        hkls = hkls_from_params(params)
        if hk_path.exists():
            # MIDAS reads hkls.csv; one from other crystal or detector keys is a stale file.
            written = read_hkls_csv(hk_path)
            if not (written.hkl.shape == hkls.hkl.shape
                    and np.array_equal(written.hkl, hkls.hkl)
                    and np.allclose(written.theta, hkls.theta, rtol=0, atol=1e-4)):
                raise InputFileError(
                    f"{hk_path}: not the reflections of {params.source} ({len(written.d)} "
                    f"rows, the parameters give {len(hkls.d)}; LatticeParameter, SpaceGroup, "
                    "Wavelength, Lsd or MaxRingRad changed?): rerun 'nfjax hkls' or delete it")
            hkls = written
        geom = geometry_from_params(params)
        spots_path = getattr(args, "spots_info", None)
        spots_path = Path(spots_path) if spots_path else out / "SpotsInfo.bin"
        obs = observe.load_observations(spots_path, geom.shape)
        table = _load_spot_table(params, out, hkls, geom, max_memory, progress)
        result = fit_grid(params, grid[start:stop], table, obs, hkls=hkls,
                          max_memory=max_memory, polish=bool(getattr(args, "polish", False)),
                          progress=progress, block_nr=int(getattr(args, "block", 0) or 0),
                          record_time=bool(getattr(args, "record_time", False)),
                          **refinement_options(bool(getattr(args, "midas_refinement", False)),
                                               seeded=bool(getattr(args, "seeded", False))))
        lock_path = Path(str(bin_path) + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = _merge_block(bin_path, result.records, start, grid.shape[0])
            allm = _merge_block(am_path, result.allmatches, start, grid.shape[0])
            write_binary_mic(bin_path, records)
            write_allmatches(am_path, allm)
            if text_path is not None:
                write_text_mic(text_path, records, phase_nr=params.phase_nr or 1,
                               num_phases=params.num_phases or 1,
                               global_position=params.global_position or 0.0)
        # The lock file stays: unlinking it would let a waiting block lock a dead inode.
    dt = time.perf_counter() - t0
    print(f"nfjax fit: rows {start}..{stop - 1} of {grid.shape[0]}: {result.summary()}; "
          f"{dt:.1f} s in all -> {bin_path}", file=sys.stderr)
    return 0
