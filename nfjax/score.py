"""Scoring a voxel hypothesis against the observations.

Owns the smooth overlap surrogate used for gradients (this module) and, with the fitting
engine, MIDAS's hard overlap fraction. The surrogate replaces the hard footprint by a
Gaussian splat of the three projected triangle vertices at each distance and the hard frame
bin by Gaussian weights over neighbouring frames, and reads the bit-packed observations at
the pixels around them: a continuous function of the orientation, the voxel position and
the geometry leaves (Lsd, beam centres, tilts, pixel size), built only from
:mod:`nfjax.forward`. Units as in ``forward``; scores are fractions in [0, 1]. Pure jnp, no
I/O.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nfjax.forward import bragg_v, displace, predict_spots, project
from nfjax.geometry import Geometry, tilt_matrix
from nfjax.observe import lookup

Array = Any


def soft_spot_scores(verts: Array, orient: Array, g: Array, theta: Array, geom: Geometry,
                     words: Array, shape: tuple, *, sigma: float = 1.0,
                     sigma_frame: float = 0.5, window: int = 5,
                     frame_window: int = 3) -> tuple[Array, Array]:
    """Soft lit fraction of every predicted spot of one voxel.

    ``verts (3,2)`` µm probe triangle; ``orient (3,3)`` orientation matrix; ``g (R,3)``,
    ``theta (R,)`` reflections; ``words``/``shape`` the bit-packed observation volume.
    ``sigma`` (px) is the width of the splat of each projected vertex, ``sigma_frame``
    (frames) the width of the ω weighting; ``window``/``frame_window`` (static, odd) the
    pixel and frame neighbourhoods read.
    Returns ``(score (2R,), valid (2R,))``: per spot the product over distances of the
    splat-weighted mean of the observed bits (the soft "lit at every distance").
    """
    v = bragg_v(g, theta)
    sp = predict_spots(orient, g, theta, geom, v=v)
    rt = tilt_matrix(geom.tilts)
    half, fhalf = window // 2, frame_window // 2
    offs = jnp.arange(-half, half + 1)
    foffs = jnp.arange(-fhalf, fhalf + 1)
    dtype = sp.yl.dtype

    def one_spot(yl, zl, omega):
        Y, Z = displace(verts, yl, zl, omega, geom.lsd[0])
        ty, tz = project(Y, Z, geom, rt)                      # (3,) px at distance 0
        cy, cz = project(yl, zl, geom, rt)
        ratio = geom.lsd / geom.lsd[0]
        base_y = ((cy - geom.ybc[0]) * geom.px) * ratio / geom.px + geom.ybc   # (D,)
        base_z = ((cz - geom.zbc[0]) * geom.px) * ratio / geom.px + geom.zbc
        vy = base_y[:, None] + (ty - cy)[None, :]             # (D, 3) vertex positions
        vz = base_z[:, None] + (tz - cz)[None, :]
        fpos = (omega - geom.omega_start) / geom.omega_step   # continuous frame coordinate
        f0 = jnp.floor(fpos)
        frames = f0 + foffs                                   # (F,)
        fw = jnp.exp(-0.5 * ((frames + 0.5 - fpos) / sigma_frame) ** 2)
        fw = fw * ((frames >= 0) & (frames < geom.n_frames))
        # Pixel neighbourhood around the rounded vertex centroid, per distance.
        py0 = jnp.floor(jnp.mean(vy, axis=1))                  # (D,)
        pz0 = jnp.floor(jnp.mean(vz, axis=1))
        py = jax.lax.stop_gradient(py0)[:, None] + offs[None, :]   # (D, W)
        pz = jax.lax.stop_gradient(pz0)[:, None] + offs[None, :]
        dy = (py[:, :, None] + 0.5 - vy[:, None, :])          # (D, W, 3)
        dz = (pz[:, :, None] + 0.5 - vz[:, None, :])
        wy = jnp.exp(-0.5 * (dy / sigma) ** 2)                # separable Gaussian per vertex
        wz = jnp.exp(-0.5 * (dz / sigma) ** 2)
        w = jnp.einsum("dav,dbv->dab", wy, wz)                # (D, Wy, Wz)
        L = jnp.arange(geom.n_distances)
        lit = lookup(words, shape, L[:, None, None, None],
                     jax.lax.stop_gradient(frames).astype(jnp.int32)[None, :, None, None],
                     py.astype(jnp.int32)[:, None, :, None],
                     pz.astype(jnp.int32)[:, None, None, :]).astype(dtype)  # (D, F, Wy, Wz)
        num = jnp.einsum("f,dab,dfab->d", fw, w, lit)
        den = jnp.sum(fw) * jnp.sum(w, axis=(1, 2))
        per_dist = num / jnp.where(den > 0, den, 1.0)
        return jnp.prod(per_dist)

    scores = jax.vmap(one_spot)(sp.yl, sp.zl, sp.omega)
    return scores, sp.valid


def soft_overlap(verts: Array, orient: Array, g: Array, theta: Array, geom: Geometry,
                 words: Array, shape: tuple, **kwargs) -> Array:
    """Smooth surrogate of MIDAS's FracOverlap for one voxel: the mean soft spot score over
    the predicted spots (see :func:`soft_spot_scores`). Differentiable in ``verts``,
    ``orient`` and the dynamic leaves of ``geom``; 0 when no spot is predicted."""
    scores, valid = soft_spot_scores(verts, orient, g, theta, geom, words, shape, **kwargs)
    n = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, scores, 0.0)) / jnp.maximum(n, 1)
