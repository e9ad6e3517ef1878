"""The fast feedback indexer's numerical core in jitted JAX (float32, any device).

This module owns stages 0-5 of the ffbidx pipeline (reference ``ffbidx-indexer.md`` §4-§9):
length groups (host NumPy, a few numbers), half-sphere vector sampling, vector refinement,
cell sampling by rotation about the candidate vectors, top-Q selection and the batched cell
refinements ``ifss``/``ifse``/``ifssr``. Units: real-space cell vectors in Å, spots
(reciprocal-lattice vectors) in Å⁻¹, so ``a·s`` is a Miller index. Every array it builds is
float32 or int32 on purpose, whatever ``jax_enable_x64`` says: this is the hot path. It never
validates user input (``nfjax.indexer.api`` does that first) and never touches files.

Speed-up that keeps the numbers: a score is ``frac − (close + 1)`` with ``frac ∈ [0, 1)``, so the
ranking is decided by the close-spot count first. The expensive geometric-mean part is evaluated
only for the directions/cells whose count reaches the P-th (Q-th) best count; a flag reports
when more such ties exist than the fixed candidate slots hold, and the caller then reruns the
frame with ``prune=False`` (every score evaluated), so results never depend on the shortcut.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

f32 = jnp.float32
INF = np.float32(np.inf)
i32 = jnp.int32

#: Candidate slots for the exact pruned selection (stage 1 per group, stage 3 per frame).
STAGE1_SLOTS = 1024
STAGE3_SLOTS = 2048
#: Directions per chunk in the stage-1 count pass and triples per chunk in stage 3 (sized so a
#: chunk's fused loop stays in cache on a CPU; larger chunks were slower on a 2-core host).
DIR_CHUNK = 1024
TRIPLE_CHUNK = 8

# Layout of the float-parameter vector (dynamic: changing a value never recompiles).
F_TRIML, F_TRIMH, F_DELTA, F_DIST1, F_DIST3, F_CONTRACTION, F_MAX_DIST = range(7)
# Layout of the integer-parameter vector.
I_VR_MIN_SPOTS, I_MIN_SPOTS, I_N_ITER = range(3)


# --------------------------------------------------------------------------- host-side tables
def halfsphere_points(n_points: int) -> np.ndarray:
    """Sample directions of §5.1: (N, 3) float32 unit vectors on the upper half sphere.

    ``z = 1 − i/(N−1)``, azimuth ``i·(3 − √5)`` radians (Q5: upstream's step, without π),
    reduced mod 2π in float64 before the float32 cast. N = 1 gives the pole (upstream would
    divide by zero).
    """
    i = np.arange(n_points, dtype=np.int64)
    denom = np.float32(max(n_points - 1, 1))
    z = (np.float32(1.0) - i.astype(np.float32) / denom).astype(np.float32)
    r = np.sqrt(np.maximum(np.float32(1.0) - z * z, np.float32(0.0))).astype(np.float32)
    phi = np.mod(i.astype(np.float64) * (3.0 - np.sqrt(5.0)), 2.0 * np.pi).astype(np.float32)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1).astype(np.float32)


def n_angles(num_halfsphere_points: int, num_angle_points: int) -> int:
    """Rotation-angle count R of §7.2: always a multiple of 1024 (Q4)."""
    if num_angle_points == 0:
        blocks = int((2.5 * np.sqrt(float(num_halfsphere_points)) + 1023.0) / 1024.0)
        return 1024 * max(blocks, 1)
    return 1024 * int(np.ceil(num_angle_points / 1024.0))


def angle_table(n_rot: int) -> np.ndarray:
    """(2, R) float32 cos/sin of ``alpha_q = (float)q · 6.2831853 / (float)R``."""
    q = np.arange(n_rot, dtype=np.float32)
    alpha = (q * np.float32(6.2831853) / np.float32(n_rot)).astype(np.float32)
    return np.stack([np.cos(alpha), np.sin(alpha)]).astype(np.float32)


class Groups(NamedTuple):
    """Stage-0 bookkeeping (§4), all host NumPy.

    ``lengths`` (G,) float32 representative (largest) length of each *sampled* group;
    ``vectors`` (V,) int indices of the input vectors used in cell sampling;
    ``vec_group`` (V,) index into ``lengths`` for each of those vectors.
    """

    lengths: np.ndarray
    vectors: np.ndarray
    vec_group: np.ndarray


def length_groups(vectors: np.ndarray, length_threshold: float, redundant: bool) -> Groups:
    """Group the (3M, 3) input vectors by float32 length, longest first (§4).

    A length joins the current group while ``representative − length < length_threshold``
    (absolute difference, as the code does; the docs say relative).
    """
    vec = np.asarray(vectors, dtype=np.float32)
    lens = np.sqrt((vec * vec).sum(axis=1, dtype=np.float32)).astype(np.float32)
    thr = np.float32(length_threshold)
    reps: list[np.float32] = []
    for length in sorted(lens.tolist(), reverse=True):
        length = np.float32(length)
        if not reps or not (reps[-1] - length < thr):
            reps.append(length)
    group_of = np.array([next(g for g, r in enumerate(reps) if r - length < thr)
                         for length in lens], dtype=np.int64)
    n_cells = len(vec) // 3
    rep_vec = np.array([3 * m + int(np.argmin(group_of[3 * m:3 * m + 3]))
                        for m in range(n_cells)], dtype=np.int64)
    if redundant:
        sampled = list(range(len(reps)))
        used = np.arange(len(vec), dtype=np.int64)
    else:
        sampled = sorted(set(group_of[rep_vec].tolist()))
        used = rep_vec
    remap = {g: k for k, g in enumerate(sampled)}
    return Groups(lengths=np.array([reps[g] for g in sampled], dtype=np.float32),
                  vectors=used,
                  vec_group=np.array([remap[int(group_of[v])] for v in used], dtype=np.int64))


# --------------------------------------------------------------------------- small helpers
def d2i(x):
    """Distance to the nearest integer, round half to even as CUDA ``rintf``."""
    return jnp.abs(x - jnp.round(x))


def round_away(x):
    """Round half away from zero (Eigen/C ``round``), exact also at .5 in float32."""
    tr = jnp.trunc(x)
    return jnp.where(jnp.abs(x - tr) == 0.5, tr + jnp.sign(x), jnp.round(x))


def _normalize(v):
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def _geo_score(logsum, n_spots, close, delta):
    """``2^(logsum/n) − delta − (close + 1)`` in float32 (§5.2, §7.4)."""
    return jnp.exp2(logsum / n_spots) - delta - (close + f32(1.0))


# --------------------------------------------------------------------------- stage 1
def _stage1_full_scores(proj, length, mask, n_spots, fp):
    """score1 (§5.2) for projections ``proj = u·s`` (..., n); lower is better."""
    d = d2i(length * proj)
    close = jnp.sum(jnp.where(mask & (d < fp[F_DIST1]), f32(1.0), f32(0.0)), axis=-1)
    trim = jnp.clip(d, fp[F_TRIML], fp[F_TRIMH])
    logsum = jnp.sum(jnp.where(mask, jnp.log2(trim + fp[F_DELTA]), f32(0.0)), axis=-1)
    return _geo_score(logsum, n_spots, close, fp[F_DELTA])


def _stage1_counts(dirs, spots, mask, lengths, dist1):
    """Close-spot counts (G, Npad) without the log part.

    The direction chunks are static slices and the map runs over groups: XLA:CPU vectorises
    this form along the directions (minor axis) about 5× faster than mapping over dynamic
    direction chunks.
    """
    ls = jnp.where(mask[None, :, None], lengths[:, None, None] * spots[None], f32(0.0))
    dirs_t = dirs.T                                              # (3, Npad)
    out = []
    for j in range(dirs.shape[0] // DIR_CHUNK):
        u = dirs_t[:, j * DIR_CHUNK:(j + 1) * DIR_CHUNK]

        def one(lv, u=u):
            x = lv[:, 0:1] * u[0] + lv[:, 1:2] * u[1] + lv[:, 2:3] * u[2]   # (n, chunk)
            d = d2i(x)
            return jnp.sum(jnp.where(d < dist1, f32(1.0), f32(0.0)), axis=0)
        out.append(jax.lax.map(one, ls))
    counts = jnp.concatenate(out, axis=1)
    # masked spots were zeroed: x = 0 is "close", so remove their contribution
    return counts - jnp.sum((~mask).astype(f32))


def _kth_largest_count(counts, k: int, hi: int):
    """The k-th largest value of integer-valued float ``counts`` (all in [−1, hi]).

    Bisection on the value (a few vector compares). ``lax.top_k(...)[0][k-1]`` would do,
    but indexing top_k's output makes XLA:CPU replace it by a full sort (~10× slower).
    """
    n_steps = int(np.ceil(np.log2(hi + 3))) + 1

    def body(_, lohi):
        lo, up = lohi
        mid = (lo + up + 1) // 2
        ok = jnp.sum((counts >= mid.astype(f32)).astype(i32)) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, up, mid - 1)

    lo, _ = jax.lax.fori_loop(0, n_steps, body, (jnp.int32(-1), jnp.int32(hi)))
    return lo.astype(f32)


def _pick_best(keys_count, slots, k, hi, score_fn):
    """Exact top-k (lowest score) when scores are ``frac − count − 1`` with frac in [0, 1).

    ``keys_count`` (L,) integer-valued float counts in [−1, hi] (−1 marks invalid entries).
    Returns (indices (k,), scores (k,), overflow flag: more ties than ``slots``).
    """
    kth = _kth_largest_count(keys_count, k, hi)
    eligible = keys_count >= kth
    n_eligible = jnp.sum(eligible.astype(i32))
    idx = jnp.nonzero(eligible, size=slots, fill_value=0)[0]
    ok = jnp.arange(slots) < n_eligible
    sc = jnp.where(ok, score_fn(idx), INF)
    neg, pos = jax.lax.top_k(-sc, k)
    return idx[pos], -neg, n_eligible > slots


def stage1(dirs, spots, mask, n_spots, lengths, fp, n_dir_real, n_cand, prune):
    """Best ``n_cand`` directions per length group: (G, P) indices, (G, P) scores, overflow."""
    n_groups = lengths.shape[0]
    if prune:
        counts = _stage1_counts(dirs, spots, mask, lengths, fp[F_DIST1])
        counts = jnp.where(jnp.arange(dirs.shape[0]) < n_dir_real, counts, f32(-1.0))
        idx, sc, ovf = [], [], []
        for g in range(n_groups):
            def score_fn(sel, g=g):
                proj = dirs[sel] @ spots.T                       # (slots, n)
                return _stage1_full_scores(proj, lengths[g], mask, n_spots, fp)
            i, s, o = _pick_best(counts[g], STAGE1_SLOTS, n_cand, spots.shape[0], score_fn)
            idx.append(i), sc.append(s), ovf.append(o)
        return jnp.stack(idx), jnp.stack(sc), jnp.any(jnp.stack(ovf))

    chunks = dirs.reshape(dirs.shape[0] // DIR_CHUNK, DIR_CHUNK, 3)

    def one(u):
        proj = u @ spots.T
        return jnp.stack([_stage1_full_scores(proj, lengths[g], mask, n_spots, fp)
                          for g in range(n_groups)])
    scores = jnp.transpose(jax.lax.map(one, chunks), (1, 0, 2)).reshape(n_groups, -1)
    scores = jnp.where(jnp.arange(dirs.shape[0]) < n_dir_real, scores, INF)
    neg, idx = jax.lax.top_k(-scores, n_cand)
    return idx, -neg, jnp.array(False)


# --------------------------------------------------------------------------- stage 2
_VR_BETAS = (0.1, 0.05, 0.025, 0.01)


def refine_vectors(z0, spots, mask, vr_min_spots):
    """Vector refinement of §6, clean per-round least squares (Q2 not emulated).

    ``z0`` (C, 3) candidate vectors ``L·u`` (Å); Miller indices fixed from ``z0``. A round
    with fewer than ``vr_min_spots`` selected spots stops refinement of that vector; a
    singular system (upstream: inf/NaN, unguarded) or a zero solution also keeps the
    current vector.
    """
    m = jnp.round(z0 @ spots.T)                                  # (C, n)
    z = z0
    active = jnp.full(z0.shape[:1], vr_min_spots > 0)
    for beta in _VR_BETAS:
        resid = jnp.abs(z @ spots.T - m)
        sel = (resid < f32(beta)) & mask[None, :]
        w = sel.astype(f32)
        active = active & (jnp.sum(sel.astype(i32), axis=1) >= vr_min_spots)
        a = jnp.einsum("ck,ki,kj->cij", w, spots, spots)
        b = jnp.einsum("ck,ck,ki->ci", w, m, spots)
        znew = jnp.linalg.solve(a, b[..., None])[..., 0]
        # A zero solution (every selected spot has Miller index 0, e.g. a cell too small
        # for the spots) is as useless as a singular one: keep the current vector.
        good = (active & jnp.all(jnp.isfinite(znew), axis=1)
                & (jnp.sum(znew * znew, axis=1) > 0))
        active = good
        z = jnp.where(good[:, None], znew, z)
    return z


# --------------------------------------------------------------------------- stage 3
class _Geometry(NamedTuple):
    zhat: jax.Array   # (T, 3) unit candidate direction (sign applied)
    lz: jax.Array     # (T,) candidate length (Å)
    x: jax.Array      # (T, 3) in-plane unit vector along a1's projection
    y: jax.Array      # (T, 3) zhat × x
    laz: jax.Array    # (T,) axial / in-plane parts of a and b
    laxy: jax.Array
    lbz: jax.Array
    lbxy: jax.Array
    dab: jax.Array    # (T,) in-plane angle from a1 to b1 (rad)


def _cell_geometry(z, c_in, a_in, b_in, length) -> _Geometry:
    """Steps 1-5 of §7.3 for every triple (vector, candidate, sign); (T, ·) float32."""
    lz = jnp.linalg.norm(z, axis=-1)
    zh = z / lz[:, None]
    t = c_in + length[:, None] * zh
    tn = jnp.linalg.norm(t, axis=-1, keepdims=True)
    alt = _normalize(jnp.cross(zh, a_in))
    t = jnp.where(tn >= f32(np.finfo(np.float32).eps), t / tn, alt)
    a1 = 2.0 * jnp.sum(a_in * t, axis=-1, keepdims=True) * t - a_in
    b1 = 2.0 * jnp.sum(b_in * t, axis=-1, keepdims=True) * t - b_in
    laz = jnp.sum(a1 * zh, axis=-1)
    x = _normalize(a1 - laz[:, None] * zh)
    laxy = jnp.sum(a1 * x, axis=-1)
    lbz = jnp.sum(b1 * zh, axis=-1)
    tb = _normalize(b1 - lbz[:, None] * zh)
    lbxy = jnp.sum(b1 * tb, axis=-1)
    y = jnp.cross(zh, x)
    # Q16: clamp the acos argument (upstream does not; NaN only for degenerate cells).
    dab = jnp.arccos(jnp.clip(jnp.sum(tb * x, axis=-1), f32(-1.0), f32(1.0)))
    dab = jnp.where(jnp.sum(tb * y, axis=-1) < 0, -dab, dab)
    return _Geometry(zh, lz, x, y, laz, laxy, lbz, lbxy, dab)


def _spot_coefficients(geo: _Geometry, spots):
    """Per (triple, spot) terms so that for angle α: ``a·s = A0 + cos α·Ax + sin α·Ay`` and
    ``b·s = B0 + cos α·Bx + sin α·By``; ``hc = c·s`` does not depend on α. (T, n) each."""
    pz = geo.zhat @ spots.T
    px = geo.x @ spots.T
    py = geo.y @ spots.T
    cd, sd = jnp.cos(geo.dab)[:, None], jnp.sin(geo.dab)[:, None]
    laxy, lbxy = geo.laxy[:, None], geo.lbxy[:, None]
    return (geo.lz[:, None] * pz,
            geo.laz[:, None] * pz, laxy * px, laxy * py,
            geo.lbz[:, None] * pz, lbxy * (cd * px + sd * py), lbxy * (cd * py - sd * px))


def _stage3_counts(cz, coef, cs, dist3sq):
    """Close counts (T, R): ``cz`` (T, n) squared c-residual (inf for masked spots)."""
    n_tri = cz.shape[0]
    nchunk = n_tri // TRIPLE_CHUNK
    stacked = jnp.stack(coef).reshape(6, nchunk, TRIPLE_CHUNK, -1).transpose(1, 0, 2, 3)
    czc = cz.reshape(nchunk, TRIPLE_CHUNK, -1)
    ca, sa = cs[0], cs[1]

    def one(args):
        c6, czk = args
        a0, ax, ay, b0, bx, by = (c[:, :, None] for c in c6)    # (chunk, n, 1)
        ha = a0 + ca * ax + sa * ay                              # (chunk, n, R)
        hb = b0 + ca * bx + sa * by
        ea = ha - jnp.round(ha)
        eb = hb - jnp.round(hb)
        dsq = czk[:, :, None] + ea * ea + eb * eb
        return jnp.sum(jnp.where(dsq < dist3sq, f32(1.0), f32(0.0)), axis=1)

    return jax.lax.map(one, (stacked, czc)).reshape(n_tri, -1)


def _stage3_full_scores(tri, q, hc, coef, cs, mask, n_spots, fp):
    """score3 (§7.4, with Q1's leading 1) of cells (triple ``tri``, angle ``q``), (L,)."""
    a0, ax, ay, b0, bx, by = (c[tri] for c in coef)
    ca, sa = cs[0][q][:, None], cs[1][q][:, None]
    ha = a0 + ca * ax + sa * ay
    hb = b0 + ca * bx + sa * by
    dn = jnp.sqrt(d2i(hc[tri]) ** 2 + d2i(ha) ** 2 + d2i(hb) ** 2)
    close = jnp.sum(jnp.where(mask & (dn < fp[F_DIST3]), f32(1.0), f32(0.0)), axis=-1)
    trim = jnp.clip(dn, fp[F_TRIML], fp[F_TRIMH])
    logsum = f32(1.0) + jnp.sum(jnp.where(mask, jnp.log2(trim + fp[F_DELTA]), f32(0.0)), axis=-1)
    return _geo_score(logsum, n_spots, close, fp[F_DELTA])


def _expand_cells(geo: _Geometry, tri, q, pos, n_rot):
    """Cell vectors (k, 3 vectors, 3) for winners; vector j descends from input vector j."""
    alpha = q.astype(f32) * f32(6.2831853) / f32(n_rot)
    beta = alpha + geo.dab[tri]
    zh, x, y = geo.zhat[tri], geo.x[tri], geo.y[tri]
    cvec = geo.lz[tri][:, None] * zh
    avec = geo.laz[tri][:, None] * zh + geo.laxy[tri][:, None] * (
        jnp.cos(alpha)[:, None] * x + jnp.sin(alpha)[:, None] * y)
    bvec = geo.lbz[tri][:, None] * zh + geo.lbxy[tri][:, None] * (
        jnp.cos(beta)[:, None] * x + jnp.sin(beta)[:, None] * y)
    p = pos[tri]                                                 # cell position of c
    out = jnp.zeros((tri.shape[0], 3, 3), f32)
    rows = jnp.arange(tri.shape[0])
    out = out.at[rows, p].set(cvec)
    out = out.at[rows, (p + 1) % 3].set(avec)
    out = out.at[rows, (p + 2) % 3].set(bvec)
    return out


# --------------------------------------------------------------------------- stage 5
def _apply(rows, mats):
    """``rows @ mats[q]`` for rows (K, 3) or (Q, K, 3) and mats (Q, 3, 3): (Q, K, 3).

    Written as three broadcast multiply-adds: XLA:CPU turns the equivalent batched 3×3
    einsum into slow small dots, while this fuses into one vectorised loop.
    """
    if rows.ndim == 2:
        rows = rows[None]
    return (rows[..., 0:1] * mats[:, None, 0, :] + rows[..., 1:2] * mats[:, None, 1, :]
            + rows[..., 2:3] * mats[:, None, 2, :])


def _lstsq(spots, w, target):
    """Least squares ``S B ≈ Y`` over the selected rows, normal equations, (Q, 3, 3).

    ``spots`` (K, 3), ``w`` (Q, K) 0/1 weights, ``target`` (Q, K, 3). Returns B with the cell
    vectors as columns.
    """
    outer = (spots[:, :, None] * spots[:, None, :]).reshape(-1, 9)     # (K, 9)
    a = (w @ outer).reshape(-1, 3, 3)
    ws = w[:, :, None] * spots[None]                                 # (Q, K, 3)
    b = jnp.sum(ws[:, :, :, None] * target[:, :, None, :], axis=1)   # (Q, 3, 3)
    return jnp.linalg.solve(a, b)


def _kth_norm(nrm, min_spots):
    """The ``min_spots``-th smallest of non-negative ``nrm`` (Q, K) per row, exactly (NaN
    counts as +inf).

    Bisection on the float32 bit patterns (monotonic for values ≥ 0, +inf included): 31
    compare-and-count passes instead of a sort, which is slow on XLA:CPU.
    """
    # NaN (its sign bit may be set: 0/0 gives 0xffc00000) ranks as +inf, never as 0.
    nrm = jnp.where(jnp.isnan(nrm), f32(jnp.inf), nrm)
    bits = jax.lax.bitcast_convert_type(nrm, i32)
    k = jnp.clip(min_spots, 1, nrm.shape[1])

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = jnp.sum((bits <= mid[:, None]).astype(i32), axis=1) >= k
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    q = nrm.shape[0]
    lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.zeros(q, i32),
                                            jnp.full(q, 0x7F800000, i32)))
    return jax.lax.bitcast_convert_type(lo, f32)


def refine_cells(cells, raw_scores, spots, mask, n_all, fp, ip, method: str):
    """Refine every cell (§9) with masked fixed-shape least squares; (Q,3,3), (Q,) scores.

    ``cells`` (Q, 3, 3) with vectors as rows (Å); ``spots`` (K, 3) all spots (Å⁻¹), ``mask``
    (K,) valid rows; ``n_all`` the number of valid spots. Iterations run inside a
    ``while_loop`` with an active flag per cell, so the loop ends when every cell has stopped.
    Scores are computed from the residuals of the final cell (Q6 fixed).
    """
    contraction, max_dist = fp[F_CONTRACTION], fp[F_MAX_DIST]
    min_spots, n_iter = ip[I_MIN_SPOTS], ip[I_N_ITER]
    B = jnp.swapaxes(cells, 1, 2)                                # columns = vectors
    frac = raw_scores - jnp.floor(raw_scores)
    maskf = mask.astype(f32)
    too_few = n_all < min_spots

    def miller(B):
        return _apply(spots, B)

    if method == "ifss":
        h_fixed = round_away(miller(B))
        t0, limit = frac, jnp.maximum(n_iter, 1)
    elif method == "ifse":
        h_fixed = None
        t0, limit = frac, n_iter
    else:
        h_fixed = None
        t0, limit = frac / jnp.min(jnp.linalg.norm(cells, axis=2), axis=1), n_iter - 1

    def residuals(B):
        x = miller(B)
        if method == "ifss":
            h = h_fixed
            e = x - h
        elif method == "ifse":
            h = round_away(x)
            e = x - h
        else:
            h = round_away(x)
            e = _apply(h, jnp.linalg.inv(B)) - spots[None]
        nrm = jnp.where(mask[None, :], jnp.linalg.norm(e, axis=2), INF)
        return h, e, nrm

    def cond(state):
        it, _, _, active = state
        return (it < limit) & jnp.any(active)

    def body(state):
        it, B, t, active = state
        active = active & (t > max_dist)
        h, e, nrm = residuals(B)
        sel = nrm < t[:, None]
        active = active & (jnp.sum(sel.astype(i32), axis=1) >= min_spots)
        w = sel.astype(f32) * maskf[None, :]
        if method == "ifse":
            bnew = B - _lstsq(spots, w, e)
        else:
            bnew = _lstsq(spots, w, h)
        good = active & jnp.all(jnp.isfinite(bnew), axis=(1, 2))
        B = jnp.where(good[:, None, None], bnew, B)
        t = jnp.where(active, t * contraction, t)
        return it + 1, B, t, good

    active0 = jnp.full(cells.shape[:1], True) & ~too_few
    _, B, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), B, t0, active0))
    _, _, nrm = residuals(B)
    score = jnp.where(too_few, f32(1.0), _kth_norm(nrm, min_spots))
    return jnp.swapaxes(B, 1, 2), score.astype(f32)


# --------------------------------------------------------------------------- one frame
class Static(NamedTuple):
    """Settings that fix shapes or code paths (the compilation-cache key)."""

    n_groups: int
    n_vectors: int
    n_cand: int          # P
    n_out: int           # static top-k size (max_output_cells, at most 1024)
    n_rot: int           # R
    prune: bool


def sample_frame(st: Static, dirs, n_dir_real, cs, spots, n_used,
                 cell_vecs, group_len, vec_ids, vec_group, fp, ip):
    """Stages 1-4 for one frame: the best raw cells (Qs, 3, 3) (rows = vectors, Å), their raw
    scores (Qs,) ascending, and the tie-overflow flag.

    ``spots`` (max_spots, 3) float32, the first ``n_used`` rows valid (Å⁻¹); ``dirs`` (Npad, 3)
    half-sphere points padded to a multiple of ``DIR_CHUNK`` (``n_dir_real`` real ones);
    ``cs`` (2, R) angle cos/sin; ``cell_vecs`` (3M, 3) input vectors (Å); ``group_len``,
    ``vec_ids``, ``vec_group`` from :func:`length_groups`; ``fp``/``ip`` the float32/int32
    parameter vectors.
    """
    mask = jnp.arange(spots.shape[0]) < n_used
    nf = n_used.astype(f32)

    # stage 1 + 2
    best, _, ovf1 = stage1(dirs, spots, mask, nf, group_len, fp, n_dir_real, st.n_cand, st.prune)
    z0 = group_len[:, None, None] * dirs[best]                   # (G, P, 3)
    z = refine_vectors(z0.reshape(-1, 3), spots, mask, ip[I_VR_MIN_SPOTS]).reshape(z0.shape)

    # stage 3 triples: vector v × candidate × sign, in that order
    zc = z[vec_group]                                            # (V, P, 3)
    ztri = jnp.concatenate([zc, -zc], axis=1).reshape(-1, 3)     # (V*2P, 3)
    n_tri = ztri.shape[0]
    rep = 2 * st.n_cand
    vv = jnp.repeat(vec_ids, rep)
    base = 3 * (vv // 3)                                         # Q3 fixed
    geo = _cell_geometry(ztri, cell_vecs[vv], cell_vecs[base + (vv + 1) % 3],
                         cell_vecs[base + (vv + 2) % 3], jnp.repeat(group_len[vec_group], rep))
    hc, *coef = _spot_coefficients(geo, spots)

    if st.prune:
        pad = (-n_tri) % TRIPLE_CHUNK
        cz = jnp.where(mask[None, :], d2i(hc) ** 2, INF)
        cz_p = jnp.pad(cz, ((0, pad), (0, 0)), constant_values=INF)
        coef_p = tuple(jnp.pad(c, ((0, pad), (0, 0))) for c in coef)
        counts = _stage3_counts(cz_p, coef_p, cs, fp[F_DIST3] * fp[F_DIST3])[:n_tri]

        def score_fn(flat):
            return _stage3_full_scores(flat // st.n_rot, flat % st.n_rot, hc, coef, cs,
                                       mask, nf, fp)
        flat, scores, ovf3 = _pick_best(counts.reshape(-1), STAGE3_SLOTS, st.n_out,
                                         spots.shape[0], score_fn)
    else:
        def one(t):
            tri = jnp.full((st.n_rot,), t)
            return _stage3_full_scores(tri, jnp.arange(st.n_rot), hc, coef, cs, mask, nf, fp)
        allsc = jax.lax.map(one, jnp.arange(n_tri))
        neg, flat = jax.lax.top_k(-allsc.reshape(-1), st.n_out)
        scores, ovf3 = -neg, jnp.array(False)

    tri, q = flat // st.n_rot, flat % st.n_rot
    cells = _expand_cells(geo, tri, q, vv % 3, st.n_rot)
    return cells, scores, ovf1 | ovf3


_SHARED = (None, None, None, 0, 0, None, None, None, None, None, None)

sample_frame_jit = jax.jit(sample_frame, static_argnums=0)


@partial(jax.jit, static_argnums=0)
def sample_batch_jit(st: Static, *args):
    """:func:`sample_frame` vmapped over a leading frame axis of ``spots``/``n_used``."""
    return jax.vmap(partial(sample_frame, st), in_axes=_SHARED)(*args)


refine_frame_jit = jax.jit(refine_cells, static_argnums=7)


@partial(jax.jit, static_argnums=7)
def refine_batch_jit(cells, raw_scores, spots, mask, n_all, fp, ip, method: str):
    """:func:`refine_cells` vmapped over a leading frame axis of everything but fp/ip."""
    fn = partial(refine_cells, method=method)
    return jax.vmap(fn, in_axes=(0, 0, 0, 0, 0, None, None))(
        cells, raw_scores, spots, mask, n_all, fp, ip)
