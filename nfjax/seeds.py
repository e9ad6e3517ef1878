"""Seed orientations for the NF fit: from far-field results, or a uniform library.

``seeds_from_grains`` is MIDAS ``GenSeedOrientationsFF2NFHEDM``: one unit quaternion
(w, x, y, z; w ≥ 0) per far-field grain, from its orientation matrix by MIDAS's Shepperd
conversion (``OrientMat2Quat``), with no symmetry expansion and no perturbation (reference
§9.3). ``uniform_seeds`` builds the unseeded library MIDAS downloads as
``seed_<type>.csv`` (reference §9.4): a near-uniform orientation set restricted to the
fundamental zone of the space group's Laue class, with its spacing given in degrees.
Everything is float64 numpy on the host: the results feed text files. File formats live in
:mod:`nfjax.io.seeds`; this module never writes files.
"""
from __future__ import annotations

import math

import numpy as np

from nfjax.errors import NfjaxError

__all__ = ["seeds_from_grains", "uniform_seeds"]

# Super-Fibonacci spiral constants (Alexa, CVPR 2022): phi = sqrt(2) and psi, the real root
# of psi**4 = psi + 4. They make the two spiral angles incommensurate.
_SF_PHI = math.sqrt(2.0)
_SF_PSI = 1.533751168755204288118041
# Points per rotation-space "ball of radius resolution": the covering density. With 2.0 the
# largest gap measured over 20,000 Haar-random probes is 0.87-1.15 x resolution across the
# eleven Laue classes at 3 and 5 deg (0.96 x for cubic at 1.5 deg), the median distance
# to the nearest seed 0.50-0.53 x resolution.
_COVER_DENSITY = 2.0
# Points whose identity-operator w beats every other operator by less than this lie on the
# FZ boundary; they are dropped so fz_reduce (first maximum wins) returns every kept
# point unchanged whatever the rounding of the comparison.
_FZ_MARGIN = 1e-12
_CHUNK = 1 << 19
# Finest spacing accepted: 0.25 deg means ~19 million cubic orientations.
_MIN_RESOLUTION_DEG = 0.25
# Largest library built: 50 million orientations are 1.6 GB in memory and ~2 GB of CSV, and
# far more than a screen can search (triclinic at 0.25 deg would be ~908 million).
_MAX_SEEDS = 50_000_000


def _n_points(resolution_deg: float) -> int:
    """Points of the whole rotation space at a covering resolution (degrees)."""
    theta = math.radians(resolution_deg)
    return int(math.ceil(2.0 * _COVER_DENSITY * math.pi / (theta - math.sin(theta))))


def seeds_from_grains(grains) -> np.ndarray:
    """``(N, 4)`` float64 quaternions (w, x, y, z), one per grain of a :class:`Grains`.

    ``grains.matrices`` is ``(N, 3, 3)``; each matrix goes through MIDAS's OrientMat2Quat
    (Shepperd branches, w forced ≥ 0, normalised).
    """
    from nfjax.orientation import matrix_to_quat

    mats = np.asarray(grains.matrices, dtype=np.float64)
    if mats.ndim != 3 or mats.shape[1:] != (3, 3):
        raise ValueError(f"grain matrices must have shape (N, 3, 3), not {mats.shape}")
    if mats.shape[0] == 0:
        return np.zeros((0, 4), dtype=np.float64)
    import jax.numpy as jnp

    quats = matrix_to_quat(jnp.asarray(mats, dtype=jnp.float64))
    return np.asarray(quats, dtype=np.float64)


def _super_fibonacci(start: int, stop: int, n: int) -> np.ndarray:
    """Points ``start..stop-1`` of the ``n``-point Super-Fibonacci spiral on S³, (k, 4)."""
    s = np.arange(start, stop, dtype=np.float64) + 0.5
    t = s / n
    r, big_r = np.sqrt(t), np.sqrt(1.0 - t)
    alpha = (2.0 * math.pi / _SF_PHI) * s
    beta = (2.0 * math.pi / _SF_PSI) * s
    return np.stack([r * np.sin(alpha), r * np.cos(alpha),
                     big_r * np.sin(beta), big_r * np.cos(beta)], axis=1)


def _left_multiply(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Hamilton product ``p ⊗ q`` for one quaternion ``p`` (4,) and ``q`` (k, 4)."""
    p0, p1, p2, p3 = (float(v) for v in p)
    q0, q1, q2, q3 = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    return np.stack([p0 * q0 - p1 * q1 - p2 * q2 - p3 * q3,
                     p0 * q1 + p1 * q0 + p2 * q3 - p3 * q2,
                     p0 * q2 - p1 * q3 + p2 * q0 + p3 * q1,
                     p0 * q3 + p1 * q2 - p2 * q1 + p3 * q0], axis=1)


def uniform_seeds(space_group: int, resolution_deg: float, seed: int = 0) -> np.ndarray:
    """Near-uniform orientations in the fundamental zone (FZ) of ``space_group``'s Laue class.

    Returns ``(N, 4)`` float64 unit quaternions (w, x, y, z), w ≥ 0, each one its own
    ``nfjax.orientation.fz_reduce`` with MIDAS's symmetry table (the FZ keeps the
    symmetry-equivalent with the largest w).

    Method: a Super-Fibonacci spiral of ``n`` points on S³ (deterministic, near-uniform for
    the Haar measure), rotated as a whole by a random rotation drawn from ``seed`` (any seed
    gives an equally uniform set; a different seed a shifted one), of which the points
    already inside the FZ are kept — the rule MIDAS's ``GenerateSeedLookupTables`` applies
    to its master set (reference §9.4). Keeping instead of reducing needs no
    de-duplication: a uniform SO(3) set meets the FZ in a uniform set, of size n / (2·|G|).
    ``n = 2 · 2.0 · π / (θ − sin θ)`` with θ = ``resolution_deg`` in radians
    ((θ − sin θ)/π is the Haar fraction of SO(3) within θ of a point), so that the largest
    gap — the misorientation from any orientation to its nearest seed, symmetry included —
    is ≈ θ and the median ≈ θ/2. The count scales as θ⁻³ and as 1/|G|: cubic m-3m at 1.5°
    gives 175,108 (MIDAS ships 243,129 random ones with a 1.8° largest gap), hexagonal
    6/mmm twice that, triclinic 24 times.

    Args:
      space_group: 1–230.
      resolution_deg: target largest gap, degrees (0.25 – 90).
      seed: integer for the global random rotation.
    """
    from nfjax.crystal import symmetry_quaternions

    try:
        res = float(resolution_deg)
    except (TypeError, ValueError):
        raise NfjaxError(f"uniform seeds: resolution must be a number of degrees, "
                         f"found {resolution_deg!r}") from None
    if not (_MIN_RESOLUTION_DEG <= res <= 90.0):
        raise NfjaxError(f"uniform seeds: resolution must be between {_MIN_RESOLUTION_DEG:g} "
                         f"and 90 degrees, found {resolution_deg!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise NfjaxError(f"uniform seeds: the random seed must be a non-negative integer, "
                         f"found {seed!r}")
    sym = symmetry_quaternions(space_group)
    n = max(_n_points(res), 4 * sym.shape[0])
    # The points cover the hemisphere w >= 0 of unit quaternions; one in |G| is kept.
    kept = lambda n_points: n_points / sym.shape[0]   # noqa: E731
    if kept(n) > _MAX_SEEDS:
        finest = next(r / 100 for r in range(int(res * 100), 9001)
                      if kept(_n_points(r / 100)) <= _MAX_SEEDS)
        raise NfjaxError(
            f"uniform seeds: space group {space_group} at {res:g} deg would be about "
            f"{kept(n) / 1e6:.0f} million orientations (at most "
            f"{_MAX_SEEDS // 1_000_000} million are built); use --resolution {finest:g} or "
            "coarser")
    # w of q ⊗ s is q · (s0, -s1, -s2, -s3); fz_reduce compares it after normalising the
    # product, i.e. divided by |s| (MIDAS's 5-decimal operators are unit only to ~1e-5).
    conj = sym * np.array([1.0, -1.0, -1.0, -1.0])
    conj /= np.linalg.norm(sym, axis=1)[:, None]
    ident = int(np.argmax(conj[:, 0]))
    others = np.delete(np.arange(sym.shape[0]), ident)
    rot = np.random.default_rng(int(seed)).normal(size=4)
    rot /= np.linalg.norm(rot)
    kept = []
    for start in range(0, n, _CHUNK):
        q = _left_multiply(rot, _super_fibonacci(start, min(start + _CHUNK, n), n))
        q[q[:, 0] < 0] *= -1.0
        w = np.abs(q @ conj.T)
        inside = w[:, ident] > w[:, others].max(axis=1, initial=-1.0) + _FZ_MARGIN
        kept.append(q[inside])
    out = np.concatenate(kept, axis=0)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out
