"""Orientation conventions of MIDAS: Euler angles, matrices, quaternions, misorientation.

This module owns the conversions between Bunge ZXZ Euler angles (radians, ``U =
Rz(phi1) Rx(Phi) Rz(phi2)``), orientation matrices ``U`` (crystal Cartesian -> sample frame
at omega = 0, row-major ``U[i, j]``) and unit quaternions ``(w, x, y, z)`` with ``w =
cos(angle / 2)``, and the symmetry-aware misorientation of MIDAS's ``GetMisorientation.c``
(angles in radians). Every function is pure ``jax.numpy``: written for one orientation,
broadcast over any leading batch shape, jit/vmap-safe (value branches are ``jnp.where``
selections, never Python ``if``), and dtype-preserving (float32 in, float32 out; float64
in, float64 out; integer input is promoted to the default float); each public function
is wrapped in ``jax.jit`` (one trace per input shape and dtype). It must never do file
I/O, hold state, or pick a crystal symmetry by itself: symmetry operators come in as an
``(S, 4)`` quaternion array (``nfjax.crystal.symmetry_quaternions`` gives MIDAS's tables).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = [
    "euler_to_matrix",
    "euler_to_matrix_midas",
    "matrix_to_euler",
    "matrix_to_quat",
    "quat_to_matrix",
    "quat_multiply",
    "normalize_quat",
    "normalize_mat",
    "fz_reduce",
    "misorientation",
    "misorientation_axis_angle",
    "mean_orientation",
    "euler_to_quat",
    "quat_to_euler",
]

# OrientMat2Euler's tolerance for "Phi is 0 or pi" (gimbal lock).
_EULER_EPS = 1e-9
# Below this norm a quaternion product is treated as degenerate and replaced by identity.
_QUAT_NORM_FLOOR = 1e-15
_TWO_PI = 2.0 * math.pi


def _as_float(x) -> jnp.ndarray:
    """Array view of ``x``; floats keep their dtype, anything else becomes default float."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _check_last(x: jnp.ndarray, n: int, what: str) -> None:
    if x.ndim < 1 or x.shape[-1] != n:
        raise ValueError(f"{what}: expected shape (..., {n}), got {x.shape}")


def _check_mat(m: jnp.ndarray, what: str) -> None:
    if m.ndim < 2 or m.shape[-2:] != (3, 3):
        raise ValueError(f"{what}: expected shape (..., 3, 3), got {m.shape}")


# --------------------------------------------------------------------------- Euler <-> matrix
@jax.jit
def euler_to_matrix(eul) -> jnp.ndarray:
    """Bunge ZXZ Euler angles -> orientation matrix, ``U = Rz(phi1) Rx(Phi) Rz(phi2)``.

    ``eul``: (..., 3) radians (phi1, Phi, phi2). Returns (..., 3, 3). The element formulas
    are MIDAS's ``Euler2OrientMat`` (no re-orthogonalisation: see
    :func:`euler_to_matrix_midas`).
    """
    eul = _as_float(eul)
    _check_last(eul, 3, "euler_to_matrix")
    p1, ph, p2 = eul[..., 0], eul[..., 1], eul[..., 2]
    c1, s1 = jnp.cos(p1), jnp.sin(p1)
    c, s = jnp.cos(ph), jnp.sin(ph)
    c2, s2 = jnp.cos(p2), jnp.sin(p2)
    rows = [
        [c2 * c1 - s2 * c * s1, -c2 * c * s1 - s2 * c1, s * s1],
        [c2 * s1 + s2 * c * c1, c2 * c * c1 - s2 * s1, -s * c1],
        [s2 * s, c2 * s, c],
    ]
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


@jax.jit
def euler_to_matrix_midas(eul) -> jnp.ndarray:
    """Euler -> matrix exactly as MIDAS's fitter builds it: the plain ZXZ matrix, then
    re-orthogonalised through ``OrientMat2Quat`` -> ``QuatToOrientMat33``.

    ``eul``: (..., 3) radians. Returns (..., 3, 3).
    """
    return quat_to_matrix(matrix_to_quat(euler_to_matrix(eul)))


def _ang(s: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
    """Angle in [0, 2pi] from its sine sign and cosine (MIDAS ``sin_cos_to_angle``)."""
    a = jnp.arccos(jnp.clip(c, -1.0, 1.0))
    return jnp.where(s >= 0, a, _TWO_PI - a)


@jax.jit
def matrix_to_euler(m) -> jnp.ndarray:
    """Orientation matrix -> Bunge ZXZ Euler angles (MIDAS ``OrientMat2Euler``).

    ``m``: (..., 3, 3). Returns (..., 3) radians with phi1, phi2 in [0, 2pi) and Phi in
    [0, pi]. At gimbal lock (|sin Phi| < 1e-9) phi1 = 0 and phi2 carries the whole in-plane
    rotation (``ang(U10, U00)`` for Phi = 0, ``ang(-U10, U00)`` for Phi = pi). Phi snaps
    to 0 when |U22 - 1| < 1e-9, i.e. for Phi below ~4.5e-5.

    Accuracy: this is MIDAS's formula (needed to start refinements where MIDAS starts
    them), and its ``acos(U02 / sin Phi)`` rule is ill-conditioned near gimbal lock: the
    round trip loses accuracy like eps / sin^2(Phi) (about 1e-10 at sin Phi = 1e-2, 1e-9 at
    1e-3, up to ~1e-2 rad at Phi = pi - 1e-6).
    """
    m = _as_float(m)
    _check_mat(m, "matrix_to_euler")
    m22 = m[..., 2, 2]
    at_zero = jnp.abs(m22 - 1.0) < _EULER_EPS
    # arccos only away from m22 = 1, so the unselected branch has a finite gradient too.
    phi = jnp.where(at_zero, jnp.zeros_like(m22),
                    jnp.arccos(jnp.clip(jnp.where(at_zero, 0.0, m22), -1.0, 1.0)))
    sph = jnp.sin(phi)
    locked = jnp.abs(sph) < _EULER_EPS
    # Divide by 1 in the locked branch so the unselected values stay finite (and so do
    # their gradients).
    den = jnp.where(locked, jnp.ones_like(sph), sph)
    psi_free = _ang(m[..., 0, 2] / den, -m[..., 1, 2] / den)
    theta_free = _ang(m[..., 2, 0] / den, m[..., 2, 1] / den)
    theta_lock = jnp.where(at_zero, _ang(m[..., 1, 0], m[..., 0, 0]),
                           _ang(-m[..., 1, 0], m[..., 0, 0]))
    psi = jnp.where(locked, jnp.zeros_like(psi_free), psi_free)
    theta = jnp.where(locked, theta_lock, theta_free)
    return jnp.stack([psi, phi, theta], axis=-1)


def rotvec_matrix(x) -> jnp.ndarray:
    """Rotation matrix of the rotation vector ``x (..., 3)`` rad (Rodrigues), smooth at 0.
    Returns (..., 3, 3)."""
    x = jnp.asarray(x)
    t2 = jnp.sum(x * x, axis=-1)[..., None, None]
    small = t2 < 1e-12
    t = jnp.sqrt(jnp.where(small, 1.0, t2))
    a = jnp.where(small, 1.0 - t2 / 6.0, jnp.sin(t) / t)
    b = jnp.where(small, 0.5 - t2 / 24.0, (1.0 - jnp.cos(t)) / jnp.where(small, 1.0, t2))
    x0, x1, x2 = x[..., 0], x[..., 1], x[..., 2]
    z = jnp.zeros_like(x0)
    k = jnp.stack([jnp.stack([z, -x2, x1], -1), jnp.stack([x2, z, -x0], -1),
                   jnp.stack([-x1, x0, z], -1)], -2)
    return jnp.eye(3, dtype=x.dtype) + a * k + b * (k @ k)


# --------------------------------------------------------------------------- quaternions
@jax.jit
def normalize_quat(q) -> jnp.ndarray:
    """Unit quaternion ``q / |q|``; a (near-)zero quaternion (|q| < 1e-15) becomes identity.

    ``q``: (..., 4) (w, x, y, z). Returns (..., 4).
    """
    q = _as_float(q)
    _check_last(q, 4, "normalize_quat")
    n = jnp.linalg.norm(q, axis=-1, keepdims=True)
    tiny = n < _QUAT_NORM_FLOOR
    ident = jnp.zeros_like(q).at[..., 0].set(1.0)
    return jnp.where(tiny, ident, q / jnp.where(tiny, jnp.ones_like(n), n))


def _positive_w(q: jnp.ndarray) -> jnp.ndarray:
    # MIDAS flips only when w < 0 strictly; w == 0 keeps its sign pattern.
    return jnp.where(q[..., :1] < 0, -q, q)


@jax.jit
def quat_multiply(q, r) -> jnp.ndarray:
    """Hamilton product ``q (x) r`` as MIDAS ``QuaternionProduct``: then w >= 0, normalised.

    ``q``, ``r``: (..., 4) (w, x, y, z), broadcast against each other. The rotation of the
    result is ``R(q) @ R(r)``.
    """
    q = _as_float(q)
    r = _as_float(r)
    _check_last(q, 4, "quat_multiply")
    _check_last(r, 4, "quat_multiply")
    q0, q1, q2, q3 = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    r0, r1, r2, r3 = r[..., 0], r[..., 1], r[..., 2], r[..., 3]
    out = jnp.stack([
        r0 * q0 - r1 * q1 - r2 * q2 - r3 * q3,
        r1 * q0 + r0 * q1 + r3 * q2 - r2 * q3,
        r2 * q0 + r0 * q2 + r1 * q3 - r3 * q1,
        r3 * q0 + r0 * q3 + r2 * q1 - r1 * q2,
    ], axis=-1)
    return normalize_quat(_positive_w(out))


@jax.jit
def quat_to_matrix(q) -> jnp.ndarray:
    """Quaternion -> active rotation matrix (MIDAS ``QuatToOrientMat33``), NOT normalised.

    ``q``: (..., 4) (w, x, y, z). Seed files carry 6-7 decimals, so MIDAS's matrices from
    them are slightly non-orthogonal; this keeps that. Returns (..., 3, 3).
    """
    q = _as_float(q)
    _check_last(q, 4, "quat_to_matrix")
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = [
        [1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y)],
        [2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x)],
        [2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y)],
    ]
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


@jax.jit
def matrix_to_quat(m) -> jnp.ndarray:
    """Orientation matrix -> unit quaternion (MIDAS ``OrientMat2Quat``, Shepperd's method).

    Branch order as MIDAS: trace > 0; else U00 largest (U00 > U11 and U00 > U22); else
    U11 > U22; else the U22 branch. Then w >= 0 and normalise. ``m``: (..., 3, 3).
    Returns (..., 4) (w, x, y, z).
    """
    m = _as_float(m)
    _check_mat(m, "matrix_to_quat")
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    trace = m00 + m11 + m22
    b0 = trace > 0
    b1 = (~b0) & (m00 > m11) & (m00 > m22)
    b2 = (~b0) & (~b1) & (m11 > m22)
    b3 = (~b0) & (~b1) & (~b2)
    one = jnp.ones_like(trace)

    # Every candidate is computed; an unselected branch gets a harmless radicand of 1 so
    # no NaN/inf is produced (it would poison gradients through jnp.where).
    s0 = 0.5 / jnp.sqrt(jnp.where(b0, trace + 1.0, one))
    cand0 = jnp.stack([0.25 / s0, (m21 - m12) * s0, (m02 - m20) * s0, (m10 - m01) * s0], -1)
    s1 = 2.0 * jnp.sqrt(jnp.where(b1, 1.0 + m00 - m11 - m22, one))
    cand1 = jnp.stack([(m21 - m12) / s1, 0.25 * s1, (m01 + m10) / s1, (m02 + m20) / s1], -1)
    s2 = 2.0 * jnp.sqrt(jnp.where(b2, 1.0 + m11 - m00 - m22, one))
    cand2 = jnp.stack([(m02 - m20) / s2, (m01 + m10) / s2, 0.25 * s2, (m12 + m21) / s2], -1)
    s3 = 2.0 * jnp.sqrt(jnp.where(b3, 1.0 + m22 - m00 - m11, one))
    cand3 = jnp.stack([(m10 - m01) / s3, (m02 + m20) / s3, (m12 + m21) / s3, 0.25 * s3], -1)

    q = jnp.where(b0[..., None], cand0,
                  jnp.where(b1[..., None], cand1, jnp.where(b2[..., None], cand2, cand3)))
    return normalize_quat(_positive_w(q))


@jax.jit
def normalize_mat(m) -> jnp.ndarray:
    """Divide all nine elements by cbrt(det) (MIDAS ``NormalizeMat``). ``m``: (..., 3, 3)."""
    m = _as_float(m)
    _check_mat(m, "normalize_mat")
    return m / jnp.cbrt(jnp.linalg.det(m))[..., None, None]


@jax.jit
def euler_to_quat(eul) -> jnp.ndarray:
    """Bunge ZXZ Euler (..., 3) rad -> quaternion (..., 4) via the plain matrix."""
    return matrix_to_quat(euler_to_matrix(eul))


@jax.jit
def quat_to_euler(q) -> jnp.ndarray:
    """Quaternion (..., 4) -> Bunge ZXZ Euler (..., 3) rad (via the un-normalised matrix)."""
    return matrix_to_euler(quat_to_matrix(q))


# --------------------------------------------------------------------------- symmetry
@jax.jit
def fz_reduce(q, sym) -> jnp.ndarray:
    """Bring ``q`` to the fundamental zone (MIDAS ``BringDownToFundamentalRegionSym``).

    ``q``: (..., 4); ``sym``: (S, 4) symmetry quaternions (w, x, y, z). Normalises ``q``,
    forms ``q (x) S_i`` for every operator (MIDAS product: w >= 0, normalised) and keeps the
    one with the largest w; the first maximum wins. Returns (..., 4).
    """
    q = normalize_quat(q)
    sym = jnp.asarray(sym, dtype=q.dtype)
    _check_last(sym, 4, "fz_reduce sym")
    if sym.ndim != 2:
        raise ValueError(f"fz_reduce: sym must have shape (S, 4), got {sym.shape}")
    cands = quat_multiply(q[..., None, :], sym)                   # (..., S, 4)
    best = jnp.argmax(cands[..., 0], axis=-1)                     # first maximum
    picked = jnp.take_along_axis(cands, best[..., None, None], axis=-2)[..., 0, :]
    return normalize_quat(picked)


def _misorientation_quat(q1, q2, sym) -> jnp.ndarray:
    """The reduced misorientation quaternion of MIDAS ``GetMisOrientation`` (w >= 0)."""
    q1 = _as_float(q1)
    q2 = _as_float(q2)
    dtype = jnp.result_type(q1.dtype, q2.dtype)
    q1f = fz_reduce(q1.astype(dtype), sym)
    q2f = fz_reduce(q2.astype(dtype), sym)
    # MIDAS negates w instead of conjugating: (-w, v) = -conj(q), the same rotation.
    q1inv = q1f * jnp.asarray([-1.0, 1.0, 1.0, 1.0], dtype=dtype)
    return fz_reduce(quat_multiply(q1inv, q2f), sym)


@jax.jit
def misorientation(q1, q2, sym) -> jnp.ndarray:
    """Symmetry-reduced misorientation angle between two orientations, in radians.

    ``q1``, ``q2``: (..., 4) quaternions (w, x, y, z), broadcast; ``sym``: (S, 4). MIDAS
    ``GetMisOrientationAngle``: normalise, reduce both to the fundamental zone, ``P =
    (-w1, v1) (x) q2``, reduce ``P``, angle = 2 acos(min(P.w, 1)). Returns (...,).
    """
    p = _misorientation_quat(q1, q2, sym)
    w = jnp.clip(p[..., 0], -1.0, 1.0)
    # arccos has an infinite slope at ±1: evaluate it only inside, so that the gradient at
    # a zero misorientation is 0 (not NaN) and that of angle² stays finite near it.
    inner = jnp.abs(w) < 1.0
    edge = jnp.where(w > 0, 0.0, 2.0 * jnp.pi).astype(w.dtype)
    return jnp.where(inner, 2.0 * jnp.arccos(jnp.where(inner, w, 0.0)), edge)


@jax.jit
def misorientation_axis_angle(q1, q2, sym) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Misorientation axis and angle (MIDAS ``GetMisOrientation``).

    Returns ``(axis, angle)``: axis (..., 3) a unit vector in the crystal frame of the
    fundamental-zone representative of ``q1`` (``R(fz_reduce(q1)) @ Rot(axis, angle)``
    equals ``R(q2)`` up to crystal symmetry), angle (...,) radians. For a zero
    misorientation (|P.w - 1| < 1e-10) the axis is (1, 0, 0), as in MIDAS.
    """
    p = _misorientation_quat(q1, q2, sym)
    w = jnp.clip(p[..., 0], -1.0, 1.0)
    angle = 2.0 * jnp.arccos(w)
    # MIDAS divides by sqrt(1 - w^2); |v| is the same for a unit quaternion and keeps
    # the axis unit-length in float32 at small angles, where 1 - w^2 cancels.
    vnorm = jnp.linalg.norm(p[..., 1:], axis=-1)
    ident = (jnp.abs(w - 1.0) < 1e-10) | (vnorm == 0)
    axis = p[..., 1:] / jnp.where(ident, jnp.ones_like(vnorm), vnorm)[..., None]
    x_axis = jnp.zeros_like(axis).at[..., 0].set(1.0)
    return jnp.where(ident[..., None], x_axis, axis), angle


@jax.jit
def mean_orientation(q, sym, reference) -> jnp.ndarray:
    """Mean of a set of nearby orientations under crystal symmetry (quaternion averaging).

    ``q``: (N, 4) quaternions (w, x, y, z) of one grain; ``sym``: (S, 4) symmetry
    operators; ``reference``: (4,) an orientation of the same grain (its seed voxel, say).
    Each ``q_n`` is replaced by the symmetry-equivalent ``q_n (x) S_i`` closest to
    ``reference`` (largest ``|q . reference|``) and sign-aligned with it; the normalised
    sum of those is the mean (the chordal L2 mean, which equals the rotation-angle mean to
    second order in the spread). Meaningful for a spread well inside the fundamental
    zone (a grain, not a texture). Returns (4,) with w >= 0.
    """
    q = normalize_quat(q)
    ref = normalize_quat(jnp.asarray(reference, dtype=q.dtype))
    _check_last(q, 4, "mean_orientation")
    if q.ndim != 2:
        raise ValueError(f"mean_orientation: q must have shape (N, 4), got {q.shape}")
    if q.shape[0] == 0:
        raise ValueError("mean_orientation: no orientations to average (q has 0 rows)")
    cands = quat_multiply(q[:, None, :], jnp.asarray(sym, dtype=q.dtype))   # (N, S, 4)
    dots = cands @ ref                                                       # (N, S)
    best = jnp.argmax(jnp.abs(dots), axis=-1)
    picked = jnp.take_along_axis(cands, best[:, None, None], axis=1)[:, 0, :]
    sign = jnp.where(jnp.take_along_axis(dots, best[:, None], axis=1) < 0, -1.0, 1.0)
    return _positive_w(normalize_quat(jnp.sum(picked * sign, axis=0)))
