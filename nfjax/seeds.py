"""Seed orientations for the NF fit, built from far-field results.

``seeds_from_grains`` is MIDAS ``GenSeedOrientationsFF2NFHEDM``: one unit quaternion
(w, x, y, z; w ≥ 0) per far-field grain, from its orientation matrix by MIDAS's Shepperd
conversion (``OrientMat2Quat``), with no symmetry expansion and no perturbation (reference
§9.3). Everything is float64 numpy on the host: the result feeds a text file whose 6
decimals must match MIDAS's. File formats live in :mod:`nfjax.io.seeds`.
"""
from __future__ import annotations

import numpy as np

__all__ = ["seeds_from_grains"]


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
