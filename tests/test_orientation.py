"""nfjax.orientation against scipy's Rotation (oracle), closed forms and round trips."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import nfjax  # noqa: F401  (x64)
from nfjax import orientation as ori
from nfjax.crystal import symmetry_quaternions

TWO_PI = 2.0 * math.pi


# --------------------------------------------------------------------------- helpers
def _wxyz(rot: Rotation) -> np.ndarray:
    """scipy quaternions are scalar-last (x, y, z, w); ours are (w, x, y, z)."""
    q = np.atleast_2d(rot.as_quat())
    return np.concatenate([q[:, 3:], q[:, :3]], axis=1)


def _from_wxyz(q: np.ndarray) -> Rotation:
    q = np.atleast_2d(np.asarray(q, dtype=np.float64))
    return Rotation.from_quat(np.concatenate([q[:, 1:], q[:, :1]], axis=1))


@pytest.fixture(scope="module")
def cubic() -> np.ndarray:
    return _wxyz(Rotation.create_group("O"))


@pytest.fixture(scope="module")
def hexagonal() -> np.ndarray:
    return _wxyz(Rotation.create_group("D6"))


def _random_euler(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0, TWO_PI, n), np.arccos(rng.uniform(-1, 1, n)),
                     rng.uniform(0, TWO_PI, n)], axis=-1)


def _random_quats(n: int, seed: int) -> np.ndarray:
    return _wxyz(Rotation.random(n, random_state=seed))


def _wrap(d: np.ndarray) -> np.ndarray:
    """Signed angular difference in (-pi, pi]."""
    return (d + math.pi) % TWO_PI - math.pi


def _oracle_miso(q1: np.ndarray, q2: np.ndarray, group: str) -> np.ndarray:
    """min over the exact group G of the angle of R1^-1 R2 g (crystal symmetry on the right)."""
    d = _from_wxyz(q1).inv() * _from_wxyz(q2)
    return np.min([(d * g).magnitude() for g in Rotation.create_group(group)], axis=0)


# --------------------------------------------------------------------------- Euler <-> matrix
def test_euler_to_matrix_is_scipy_intrinsic_zxz():
    eul = _random_euler(1000, 1)
    got = np.asarray(ori.euler_to_matrix(eul))
    want = Rotation.from_euler("ZXZ", eul).as_matrix()  # intrinsic = Rz(p1) Rx(P) Rz(p2)
    assert got.shape == (1000, 3, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_euler_to_matrix_explicit_elements():
    p1, P, p2 = 0.3, 1.1, 2.5
    U = np.asarray(ori.euler_to_matrix(np.array([p1, P, p2])))
    rz = lambda a: np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(P), -np.sin(P)], [0, np.sin(P), np.cos(P)]])
    np.testing.assert_allclose(U, rz(p1) @ rx @ rz(p2), rtol=0, atol=1e-15)


def test_euler_round_trip_generic():
    eul = _random_euler(2000, 2)
    eul = eul[np.sin(eul[:, 1]) > 1e-3]            # keep away from gimbal lock here
    assert eul.shape[0] >= 1000
    back = np.asarray(ori.matrix_to_euler(ori.euler_to_matrix(eul)))
    np.testing.assert_allclose(_wrap(back - eul), 0.0, atol=1e-12)
    assert np.all((back[:, [0, 2]] >= 0) & (back[:, [0, 2]] < TWO_PI))
    assert np.all((back[:, 1] >= 0) & (back[:, 1] <= math.pi))


def _midas_orientmat2euler(m) -> list[float]:
    """Scalar transcription of MIDAS OrientMat2Euler (reference §3), plain Python math."""
    eps = 1e-9

    def ang(s, c):
        a = math.acos(max(-1.0, min(1.0, c)))
        return a if s >= 0 else TWO_PI - a

    phi = 0.0 if abs(m[2][2] - 1.0) < eps else math.acos(max(-1.0, min(1.0, m[2][2])))
    sph = math.sin(phi)
    if abs(sph) < eps:
        theta = ang(m[1][0], m[0][0]) if abs(m[2][2] - 1.0) < eps else ang(-m[1][0], m[0][0])
        return [0.0, phi, theta]
    return [ang(m[0][2] / sph, -m[1][2] / sph), phi, ang(m[2][0] / sph, m[2][1] / sph)]


def test_euler_round_trip_near_gimbal_lock():
    rng = np.random.default_rng(3)
    n = 200
    phis = np.concatenate([np.full(n, v) for v in (1e-2, 1e-3, 2e-4, math.pi - 1e-2,
                                                   math.pi - 1e-3, math.pi - 1e-6)])
    eul = np.stack([rng.uniform(0, TWO_PI, phis.size), phis,
                    rng.uniform(0, TWO_PI, phis.size)], -1)
    U = np.asarray(ori.euler_to_matrix(eul))
    back = np.asarray(ori.matrix_to_euler(U))
    # The port follows MIDAS's formula to the last bits (XLA's acos/sin vs libm: ~1 ulp) ...
    ref = np.array([_midas_orientmat2euler(u.tolist()) for u in U])
    np.testing.assert_allclose(back, ref, rtol=0, atol=1e-12)
    assert np.all(back[:, 1] > 0) and np.all(back[:, 1] < math.pi)
    assert np.all((back[:, [0, 2]] >= 0) & (back[:, [0, 2]] < TWO_PI))
    # ... and MIDAS's acos-of-(U/sin Phi) rule loses accuracy like eps / sin^2(Phi) near
    # gimbal lock: the matrix comes back to 1e-9 for sin(Phi) >= 1e-2 only.
    ok = np.abs(np.sin(phis)) >= 0.9e-2
    np.testing.assert_allclose(np.asarray(ori.euler_to_matrix(back))[ok], U[ok],
                               rtol=0, atol=1e-9)


def test_euler_exact_gimbal_lock_closed_form():
    rng = np.random.default_rng(4)
    p1, p2 = rng.uniform(0, TWO_PI, 300), rng.uniform(0, TWO_PI, 300)
    # Phi = 0: U = Rz(p1 + p2)  ->  (0, 0, (p1 + p2) mod 2pi)
    e0 = np.asarray(ori.matrix_to_euler(ori.euler_to_matrix(np.stack([p1, 0 * p1, p2], -1))))
    assert np.all(e0[:, 0] == 0) and np.all(e0[:, 1] == 0)
    np.testing.assert_allclose(_wrap(e0[:, 2] - (p1 + p2)), 0, atol=1e-12)
    # Phi = pi: U = Rz(p1) Rx(pi) Rz(p2) = Rx(pi) Rz(p2 - p1) -> (0, pi, (p2 - p1) mod 2pi)
    epi = np.asarray(ori.matrix_to_euler(
        ori.euler_to_matrix(np.stack([p1, np.full_like(p1, math.pi), p2], -1))))
    assert np.all(epi[:, 0] == 0)
    np.testing.assert_allclose(epi[:, 1], math.pi, rtol=0, atol=1e-15)
    np.testing.assert_allclose(_wrap(epi[:, 2] - (p2 - p1)), 0, atol=1e-12)


def test_euler_snaps_small_phi_as_midas():
    # MIDAS's OrientMat2Euler sets Phi = 0 when |U22 - 1| < 1e-9, i.e. Phi < ~4.47e-5;
    # the in-plane rotation then goes to phi2 and the matrix is off by at most ~Phi.
    rng = np.random.default_rng(5)
    p1, p2 = rng.uniform(0, TWO_PI, 100), rng.uniform(0, TWO_PI, 100)
    for P in (1e-10, 1e-6, 4e-5):
        eul = np.stack([p1, np.full_like(p1, P), p2], -1)
        back = np.asarray(ori.matrix_to_euler(ori.euler_to_matrix(eul)))
        assert np.all(back[:, 0] == 0) and np.all(back[:, 1] == 0)
        err = np.abs(np.asarray(ori.euler_to_matrix(back) - ori.euler_to_matrix(eul))).max()
        assert err <= 1.01 * P


def test_euler_to_matrix_midas_is_orthonormal_and_close():
    eul = _random_euler(1000, 6)
    plain = np.asarray(ori.euler_to_matrix(eul))
    midas = np.asarray(ori.euler_to_matrix_midas(eul))
    np.testing.assert_allclose(midas, plain, rtol=0, atol=1e-14)
    eye = np.einsum("nji,njk->nik", midas, midas)
    np.testing.assert_allclose(eye, np.broadcast_to(np.eye(3), eye.shape), rtol=0, atol=1e-14)


# --------------------------------------------------------------------------- quaternions
def _branch_matrices() -> np.ndarray:
    """Rotations that hit every Shepperd branch: trace > 0, and ~180 deg about x, y, z."""
    rng = np.random.default_rng(7)
    mats = []
    for axis in np.eye(3):
        for _ in range(100):
            a = axis + 0.2 * rng.normal(size=3)
            mats.append(Rotation.from_rotvec(a / np.linalg.norm(a)
                                             * rng.uniform(2.6, math.pi)).as_matrix())
        mats.append(Rotation.from_rotvec(axis * math.pi).as_matrix())
    return np.asarray(mats)


def test_matrix_to_quat_matches_scipy_all_branches():
    U = np.concatenate([np.asarray(ori.euler_to_matrix(_random_euler(1000, 8))),
                        _branch_matrices()])
    tr = np.trace(U, axis1=1, axis2=2)
    d = np.diagonal(U, axis1=1, axis2=2)
    neg = tr <= 0
    # every branch is exercised
    assert (tr > 0).sum() > 100
    assert (neg & (d[:, 0] > d[:, 1]) & (d[:, 0] > d[:, 2])).sum() >= 100
    assert (neg & ~((d[:, 0] > d[:, 1]) & (d[:, 0] > d[:, 2])) & (d[:, 1] > d[:, 2])).sum() >= 100
    assert (neg & ~((d[:, 0] > d[:, 1]) & (d[:, 0] > d[:, 2])) & ~(d[:, 1] > d[:, 2])).sum() >= 100
    q = np.asarray(ori.matrix_to_quat(U))
    ref = _wxyz(Rotation.from_matrix(U))
    ref = ref * np.where(ref[:, :1] < 0, -1.0, 1.0)
    assert np.all(q[:, 0] >= 0)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=0, atol=1e-15)
    # at w == 0 (exact 180 deg) q and -q are both "w >= 0": compare the rotation there
    sign = np.where(np.sum(q * ref, axis=1) < 0, -1.0, 1.0)[:, None]
    np.testing.assert_allclose(q, sign * ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ori.quat_to_matrix(q)), U, rtol=0, atol=1e-12)


def test_quat_matrix_quat_round_trip():
    q = _random_quats(1000, 9)
    q = q * np.where(q[:, :1] < 0, -1.0, 1.0)
    U = np.asarray(ori.quat_to_matrix(q))
    np.testing.assert_allclose(U, _from_wxyz(q).as_matrix(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ori.matrix_to_quat(U)), q, rtol=0, atol=1e-12)


def test_quat_to_matrix_does_not_normalise():
    # q = (0.6, 0.9, 0, 0), |q| != 1: closed-form elements of the standard formula
    U = np.asarray(ori.quat_to_matrix(np.array([0.6, 0.9, 0.0, 0.0])))
    want = np.array([[1.0, 0.0, 0.0],
                     [0.0, 1 - 2 * 0.81, -2 * 0.54],
                     [0.0, 2 * 0.54, 1 - 2 * 0.81]])
    np.testing.assert_allclose(U, want, rtol=0, atol=1e-15)


def test_euler_quat_conversions_match_scipy():
    eul = _random_euler(1000, 10)
    q = np.asarray(ori.euler_to_quat(eul))
    ref = _wxyz(Rotation.from_euler("ZXZ", eul))
    ref = ref * np.where(ref[:, :1] < 0, -1.0, 1.0)
    np.testing.assert_allclose(q, ref, rtol=0, atol=1e-12)
    back = np.asarray(ori.quat_to_euler(q))
    keep = np.sin(eul[:, 1]) > 0.05   # away from gimbal lock (see the test above)
    np.testing.assert_allclose(_wrap(back[keep] - eul[keep]), 0, atol=1e-10)


def test_quat_multiply_composes_rotations():
    q, r = _random_quats(1000, 11), _random_quats(1000, 12)
    p = np.asarray(ori.quat_multiply(q, r))
    assert np.all(p[:, 0] >= 0)
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, rtol=0, atol=1e-15)
    want = (_from_wxyz(q) * _from_wxyz(r)).as_matrix()   # R(q) @ R(r)
    np.testing.assert_allclose(np.asarray(ori.quat_to_matrix(p)), want, rtol=0, atol=1e-12)
    # i * j = k (Hamilton), and a degenerate product is identity
    np.testing.assert_allclose(np.asarray(ori.quat_multiply([0, 1, 0, 0], [0, 0, 1, 0])),
                               [0, 0, 0, 1], atol=0)
    np.testing.assert_allclose(np.asarray(ori.quat_multiply([0, 0, 0, 0], [1, 0, 0, 0])),
                               [1, 0, 0, 0], atol=0)


def test_normalize_quat_and_mat():
    q = np.array([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(np.asarray(ori.normalize_quat(q)),
                               [[1, 0, 0, 0], [.5, .5, .5, .5], [1, 0, 0, 0]], atol=1e-16)
    R = Rotation.random(50, random_state=13).as_matrix()
    m = np.asarray(ori.normalize_mat(2.5 * R))        # det(2.5 R) = 2.5^3
    np.testing.assert_allclose(m, R, rtol=0, atol=1e-14)
    np.testing.assert_allclose(np.linalg.det(m), 1.0, rtol=0, atol=1e-14)


# --------------------------------------------------------------------------- misorientation
@pytest.mark.parametrize("group, max_deg", [("O", 62.8), ("D6", 93.8)])
def test_misorientation_matches_scipy_oracle(group, max_deg, cubic, hexagonal):
    sym = cubic if group == "O" else hexagonal
    q1, q2 = _random_quats(600, 14), _random_quats(600, 15)
    got = np.asarray(ori.misorientation(q1, q2, sym))
    np.testing.assert_allclose(got, _oracle_miso(q1, q2, group), rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.asarray(ori.misorientation(q2, q1, sym)), got,
                               rtol=0, atol=1e-12)
    assert got.max() <= math.radians(max_deg)
    # symmetry-equivalent orientations are 0 apart
    eq = np.asarray(ori.quat_multiply(q1, sym[np.arange(600) % len(sym)]))
    np.testing.assert_allclose(np.asarray(ori.misorientation(q1, eq, sym)), 0, atol=1e-7)


@pytest.mark.parametrize("group", ["O", "D6"])
def test_misorientation_with_midas_five_decimal_operators(group, cubic, hexagonal):
    # MIDAS's tables carry 0.70711 / 0.86603 / 0.5: agreement is limited to ~1e-5 rad.
    sym5 = np.round(cubic if group == "O" else hexagonal, 5)
    q1, q2 = _random_quats(500, 16), _random_quats(500, 17)
    got = np.asarray(ori.misorientation(q1, q2, sym5))
    np.testing.assert_allclose(got, _oracle_miso(q1, q2, group), rtol=0, atol=1e-4)


def test_misorientation_closed_forms(cubic, hexagonal):
    rot = lambda axis, deg: _wxyz(Rotation.from_rotvec(
        np.asarray(axis, float) / np.linalg.norm(axis) * math.radians(deg)))[0]
    ident = np.array([1.0, 0, 0, 0])
    cases = [(cubic, rot([0, 0, 1], 90), 0.0), (cubic, rot([0, 0, 1], 45), 45.0),
             (cubic, rot([1, 1, 1], 60), 60.0), (cubic, rot([1, 1, 0], 70), 70.0 - 0.0),
             (hexagonal, rot([0, 0, 1], 60), 0.0), (hexagonal, rot([0, 0, 1], 20), 20.0),
             (hexagonal, rot([1, 0, 0], 90), 90.0)]
    for sym, q, deg in cases:
        want = _oracle_miso(ident[None], q[None], "O" if len(sym) == 24 else "D6")[0]
        got = float(ori.misorientation(ident, q, sym))
        assert got == pytest.approx(want, abs=1e-9)
        if deg in (0.0, 45.0, 60.0, 20.0, 90.0):
            assert math.degrees(got) == pytest.approx(deg, abs=1e-6)


def test_fz_reduce_picks_largest_w(cubic):
    q = _random_quats(500, 18)
    f = np.asarray(ori.fz_reduce(q, cubic))
    all_w = np.stack([np.asarray(ori.quat_multiply(q, s))[:, 0] for s in cubic], axis=1)
    np.testing.assert_allclose(f[:, 0], all_w.max(axis=1), rtol=0, atol=1e-15)
    # same rotation up to a symmetry operator: zero misorientation
    np.testing.assert_allclose(_oracle_miso(q, f, "O"), 0, atol=1e-7)


def test_mean_orientation_closed_form(cubic, hexagonal):
    """Members in inverse pairs about q0 (q0 r and q0 r^-1 sum to a multiple of q0), each
    given a random symmetry variant and sign: the mean is exactly q0's variant nearest the
    reference, whatever variants and signs the members carry."""
    rng = np.random.default_rng(31)
    for sym, group in ((cubic, "O"), (hexagonal, "D6")):
        q0 = _random_quats(1, 32)[0]
        axes = rng.normal(size=(20, 3))
        angles = np.radians(rng.uniform(0.05, 2.0, 20))
        r = _from_wxyz(np.concatenate([np.cos(angles / 2)[:, None],
                                       np.sin(angles / 2)[:, None] * axes
                                       / np.linalg.norm(axes, axis=1, keepdims=True)], 1))
        members = _wxyz(_from_wxyz(q0) * Rotation.concatenate([r, r.inv()]))   # (40, 4)
        variants = sym[rng.integers(0, len(sym), len(members))]
        members = np.asarray(ori.quat_multiply(members, variants))
        members = members * rng.choice([-1.0, 1.0], size=(len(members), 1))
        ref = np.asarray(ori.quat_multiply(q0, sym[5]))
        mean = np.asarray(ori.mean_orientation(members, sym, ref))
        assert _oracle_miso(mean[None], q0[None], group)[0] < 1e-7
        # the variant nearest the reference (here the reference itself), w >= 0
        np.testing.assert_allclose(abs(mean @ ref), 1.0, atol=1e-12)
        assert mean[0] >= 0
    # a one-sided spread is not symmetric: the mean lies strictly inside it
    one_sided = _wxyz(_from_wxyz(q0) * Rotation.from_rotvec(
        np.outer(np.radians([0.1, 0.2, 0.3]), [0.0, 0.0, 1.0])))
    mean = np.asarray(ori.mean_orientation(one_sided, cubic, q0))
    assert math.degrees(_oracle_miso(mean[None], q0[None], "O")[0]) == pytest.approx(0.2, abs=1e-6)


def test_misorientation_axis_angle(cubic, hexagonal):
    for sym, group in ((cubic, "O"), (hexagonal, "D6")):
        q1, q2 = _random_quats(500, 19), _random_quats(500, 20)
        axis, angle = ori.misorientation_axis_angle(q1, q2, sym)
        axis, angle = np.asarray(axis), np.asarray(angle)
        assert axis.shape == (500, 3) and angle.shape == (500,)
        np.testing.assert_allclose(np.linalg.norm(axis, axis=1), 1, rtol=0, atol=1e-12)
        np.testing.assert_allclose(angle, np.asarray(ori.misorientation(q1, q2, sym)), atol=0)
        # the axis lives in the crystal frame of q1's fundamental-zone representative:
        # R(fz(q1)) . Rot(axis, angle) is R2 up to crystal symmetry
        q1_fz = np.asarray(ori.fz_reduce(q1, sym))
        moved = _from_wxyz(q1_fz) * Rotation.from_rotvec(axis * angle[:, None])
        np.testing.assert_allclose(_oracle_miso(_wxyz(moved), q2, group), 0, atol=1e-9)
    axis0, angle0 = ori.misorientation_axis_angle(q1[0], q1[0], cubic)
    np.testing.assert_allclose(np.asarray(axis0), [1, 0, 0], atol=0)
    assert float(angle0) == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------------------- JAX properties
def test_jit_and_vmap_agree(cubic):
    eul = _random_euler(64, 21)
    q1, q2 = _random_quats(64, 22), _random_quats(64, 23)
    np.testing.assert_allclose(np.asarray(jax.jit(ori.euler_to_matrix)(eul)),
                               np.asarray(ori.euler_to_matrix(eul)), rtol=0, atol=1e-15)
    np.testing.assert_allclose(np.asarray(jax.vmap(ori.matrix_to_euler)(
        ori.euler_to_matrix(eul))), np.asarray(ori.matrix_to_euler(ori.euler_to_matrix(eul))),
        rtol=0, atol=1e-15)
    miso = jax.jit(ori.misorientation)
    np.testing.assert_allclose(np.asarray(miso(q1, q2, cubic)),
                               np.asarray(jax.vmap(ori.misorientation, (0, 0, None))(
                                   q1, q2, cubic)), rtol=0, atol=1e-12)
    # any leading batch shape
    out = ori.misorientation(q1.reshape(8, 8, 4), q2.reshape(8, 8, 4), cubic)
    assert out.shape == (8, 8)
    np.testing.assert_allclose(np.asarray(out).ravel(), np.asarray(miso(q1, q2, cubic)),
                               rtol=0, atol=1e-12)


def test_float32_in_float32_out(cubic):
    eul = _random_euler(500, 24)
    q1, q2 = _random_quats(500, 25), _random_quats(500, 26)
    e32, a32, b32 = (x.astype(np.float32) for x in (eul, q1, q2))
    U32 = ori.euler_to_matrix(e32)
    checks = [
        (U32, ori.euler_to_matrix(eul), 1e-6),
        (ori.euler_to_matrix_midas(e32), ori.euler_to_matrix_midas(eul), 1e-6),
        (ori.matrix_to_quat(U32), ori.matrix_to_quat(ori.euler_to_matrix(eul)), 1e-6),
        (ori.quat_to_matrix(a32), ori.quat_to_matrix(q1), 1e-6),
        (ori.quat_multiply(a32, b32), ori.quat_multiply(q1, q2), 1e-6),
        (ori.fz_reduce(a32, cubic), ori.fz_reduce(q1, cubic), 1e-6),
        (ori.misorientation(a32, b32, cubic), ori.misorientation(q1, q2, cubic), 1e-5),
        (ori.normalize_mat(U32), ori.normalize_mat(ori.euler_to_matrix(eul)), 1e-6),
    ]
    for lo, hi, tol in checks:
        assert lo.dtype == jnp.float32 and hi.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(lo), np.asarray(hi), rtol=0, atol=tol)
    keep = np.sin(eul[:, 1]) > 0.05
    e_back = ori.matrix_to_euler(U32)
    assert e_back.dtype == jnp.float32
    np.testing.assert_allclose(_wrap(np.asarray(e_back, np.float64)[keep] - eul[keep]), 0,
                               atol=1e-4)
    ax, an = ori.misorientation_axis_angle(a32, b32, cubic)
    assert ax.dtype == jnp.float32 and an.dtype == jnp.float32


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        ori.euler_to_matrix(np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 3\)"):
        ori.matrix_to_quat(np.zeros((5, 3)))


def test_gradients_are_finite_at_zero_misorientation_and_gimbal_lock():
    """arccos has an infinite slope at 1: the misorientation's gradient at zero angle is 0
    (it was NaN even for angle²), angle² matches central differences just off zero, and
    matrix_to_euler's gradient at Φ = 0 is finite (the unselected arccos branch made it
    NaN)."""
    sym = jnp.asarray(symmetry_quaternions(225))
    e0 = jnp.array([0.3, 0.5, 0.2])
    q0 = ori.euler_to_quat(e0)

    def angle2(e):
        return ori.misorientation(ori.euler_to_quat(e), q0, sym) ** 2

    g0 = np.asarray(jax.grad(angle2)(e0))
    assert np.all(g0 == 0.0)
    g1 = np.asarray(jax.grad(lambda e: ori.misorientation(ori.euler_to_quat(e), q0, sym))(e0))
    assert np.all(np.isfinite(g1))
    x = e0 + jnp.array([1e-3, -2e-3, 1.5e-3])
    ad = np.asarray(jax.grad(angle2)(x))
    h = 1e-6
    fd = np.array([(float(angle2(x.at[i].add(h))) - float(angle2(x.at[i].add(-h)))) / (2 * h)
                   for i in range(3)])
    np.testing.assert_allclose(ad, fd, rtol=1e-5, atol=1e-12)
    gl = jax.grad(lambda e: ori.matrix_to_euler(ori.euler_to_matrix(e))[1])(
        jnp.array([0.3, 0.0, 0.2]))
    assert np.all(np.isfinite(np.asarray(gl)))


def test_rotvec_matrix_batches_and_mean_orientation_refuses_nothing():
    """``rotvec_matrix`` takes any leading batch shape (it failed on (5, 3)) and equals the
    single-vector result and scipy's rotation; ``mean_orientation`` of no rows is an
    error (it returned the identity)."""
    x = np.random.default_rng(3).normal(size=(5, 3)) * 0.4
    x[0] = 0.0
    batch = np.asarray(ori.rotvec_matrix(jnp.asarray(x)))
    assert batch.shape == (5, 3, 3)
    for i in range(5):
        np.testing.assert_array_equal(batch[i], np.asarray(ori.rotvec_matrix(jnp.asarray(x[i]))))
        np.testing.assert_allclose(batch[i], Rotation.from_rotvec(x[i]).as_matrix(), atol=1e-14)
    assert ori.rotvec_matrix(jnp.zeros((2, 4, 3))).shape == (2, 4, 3, 3)
    sym = jnp.asarray(symmetry_quaternions(225))
    with pytest.raises(ValueError, match="no orientations to average"):
        ori.mean_orientation(jnp.zeros((0, 4)), sym, jnp.array([1.0, 0, 0, 0]))
