"""Scoring a voxel hypothesis against the observations.

Owns the smooth overlap surrogate used for gradients (this module) and, with the fitting
engine, MIDAS's hard overlap fraction. The surrogate replaces the hard footprint by a
Gaussian splat of the three projected triangle vertices at each distance and the hard frame
bin by Gaussian weights over neighbouring frames, and reads the bit-packed observations at
the pixels around them: a continuous function of the orientation, the voxel position and
the geometry leaves (Lsd, beam centres, tilts, pixel size), built only from
:mod:`nfjax.forward`. Units as in ``forward``; scores are fractions in [0, 1]. Pure jnp, no
I/O.

The surrogate is for gradients, not for thresholds: at a voxel's true orientation it is
about 0.2-0.5 where the hard fraction is 1.0 (the splats spill past the lit pixels), and
its maximum lies a few hundredths of a degree from the hard score's, so a refinement on it
should be checked, or finished, on the hard score (``nfjax fit --polish`` keeps a polished
orientation only where the hard fraction improves).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nfjax.forward import (SpotTerms, box_pixels, bragg_v, check_reflections, corrected_omega,
                           displace, distance_centres, footprint_pixels, frame_bin, on_detector,
                           predict_spots, project, spot_terms)
from nfjax.geometry import Geometry, tilt_matrix
from nfjax.observe import lookup

Array = Any


def _tapered(d: Array, sigma: float, radius: float) -> Array:
    """A Gaussian of width ``sigma`` times the taper ``(1 - (d/radius)^2)^2``: zero, with a
    zero slope, from ``|d| = radius`` on (C1 everywhere)."""
    x = jnp.clip(d / radius, -1.0, 1.0)
    return jnp.exp(-0.5 * (d / sigma) ** 2) * (1.0 - x * x) ** 2


def soft_spot_scores(verts: Array, orient: Array, g: Array, theta: Array, geom: Geometry,
                     words: Array, shape: tuple, *, sigma: float = 1.0,
                     sigma_frame: float = 0.5, window: int = 5,
                     frame_window: int = 3) -> tuple[Array, Array]:
    """Soft lit fraction of every predicted spot of one voxel.

    ``verts (3,2)`` µm probe triangle; ``orient (3,3)`` orientation matrix; ``g (R,3)``,
    ``theta (R,)`` reflections; ``words``/``shape`` the bit-packed observation volume.
    Each projected vertex is splatted on the ``window`` x ``window`` pixels around it
    (static, odd) with a Gaussian of width ``sigma`` (px) tapered to zero at
    ``window/2`` px, and ω is weighted over ``frame_window`` frames (static, odd) with a
    Gaussian of width ``sigma_frame`` (frames) tapered to zero at ``frame_window/2``
    frames. The tapers make the neighbourhoods' moves (they follow the spot pixel by
    pixel) invisible: the score is continuous, with a continuous gradient, in every
    input, except where a spot enters or leaves the scan (the hard score's rule).
    Returns ``(score (2R,), valid (2R,))``: per spot the product over distances of the
    splat-weighted mean of the observed bits (the soft "lit at every distance"), and
    whether the spot counts: predicted and inside the scan (:func:`nfjax.forward.frame_of`,
    the rule of the hard score, wedge correction included).
    """
    _check_soft_inputs(verts, g, theta, geom, words, shape, window, frame_window)
    v = bragg_v(g, theta)
    sp = predict_spots(orient, g, theta, geom, v=v)
    rt = tilt_matrix(geom.tilts)
    half, fhalf = window // 2, frame_window // 2
    radius, fradius = half + 0.5, fhalf + 0.5
    offs = jnp.arange(-half, half + 1)
    foffs = jnp.arange(-fhalf, fhalf + 1)
    dtype = sp.yl.dtype
    L = jnp.arange(geom.n_distances)

    def one_spot(yl, zl, omega):
        Y, Z = displace(verts, yl, zl, omega, geom.lsd[0])
        ty, tz = project(Y, Z, geom, rt)                      # (3,) px at distance 0
        cy, cz = project(yl, zl, geom, rt)
        base_y, base_z = distance_centres(cy, cz, geom)       # (D,)
        vy = base_y[:, None] + (ty - cy)[None, :]             # (D, 3) vertex positions
        vz = base_z[:, None] + (tz - cz)[None, :]
        w, in_range = corrected_omega(omega, yl, zl, geom)   # as frame_of: wedge, wrap
        _, in_scan = frame_bin(w, in_range, geom)
        fpos = (w - geom.omega_start) / geom.omega_step       # continuous frame coordinate
        frames = jax.lax.stop_gradient(jnp.floor(fpos)) + foffs            # (F,)
        fw = _tapered(frames + 0.5 - fpos, sigma_frame, fradius)
        fw = fw * ((frames >= 0) & (frames < geom.n_frames))
        # Each vertex's own pixel neighbourhood, per distance: the pixel under it and
        # ``half`` on each side. Its splat is zero at every pixel outside.
        py = jax.lax.stop_gradient(jnp.floor(vy))[..., None] + offs     # (D, 3, W)
        pz = jax.lax.stop_gradient(jnp.floor(vz))[..., None] + offs
        wy = _tapered(py + 0.5 - vy[..., None], sigma, radius)            # (D, 3, W)
        wz = _tapered(pz + 0.5 - vz[..., None], sigma, radius)
        lit = lookup(words, shape, L[:, None, None, None, None],
                     frames.astype(jnp.int32)[None, :, None, None, None],
                     py.astype(jnp.int32)[:, None, :, :, None],
                     pz.astype(jnp.int32)[:, None, :, None, :]).astype(dtype)  # (D,F,3,W,W)
        num = jnp.einsum("f,dva,dvb,dfvab->d", fw, wy, wz, lit)
        den = jnp.sum(fw) * jnp.einsum("dva,dvb->d", wy, wz)
        per_dist = num / jnp.where(den > 0, den, 1.0)
        return jnp.prod(per_dist), in_scan

    scores, in_scan = jax.vmap(one_spot)(sp.yl, sp.zl, sp.omega)
    return scores, sp.valid & in_scan


def _check_soft_inputs(verts, g, theta, geom: Geometry, words, shape, window: int,
                       frame_window: int) -> None:
    """Shapes and dtypes of :func:`soft_spot_scores`' inputs, checked when it is traced
    (they are static): a ValueError naming the argument, instead of an error from deep in
    a JAX primitive or, for words that do not fit ``shape``, a silently wrong score."""
    from nfjax.observe import file_words

    if jnp.shape(verts) != (3, 2):
        raise ValueError(f"verts must be one probe triangle (3, 2) in µm, got shape "
                         f"{jnp.shape(verts)}; use jax.vmap for a batch of voxels")
    check_reflections(g, theta)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or shape != tuple(int(s) for s in geom.shape):
        raise ValueError(f"shape must be the observation volume's (distances, frames, Y, Z) "
                         f"= geom.shape {tuple(geom.shape)}, got {shape}")
    counts = sorted(set(file_words(shape)))   # a MIDAS file may drop the last part-word
    if jnp.ndim(words) != 1 or jnp.shape(words)[0] not in counts or \
            jnp.result_type(words) != jnp.uint32:
        raise ValueError(f"words must be the volume's bit-packed uint32 words "
                         f"({' or '.join(map(str, counts))},) for shape {shape}, got "
                         f"{jnp.result_type(words)} {jnp.shape(words)}")
    for name, n in (("window", window), ("frame_window", frame_window)):
        if int(n) < 1 or int(n) % 2 == 0:
            raise ValueError(f"{name} must be a positive odd number, got {n}")


def soft_overlap(verts: Array, orient: Array, g: Array, theta: Array, geom: Geometry,
                 words: Array, shape: tuple, **kwargs) -> Array:
    """Smooth surrogate of MIDAS's FracOverlap for one voxel: the mean soft spot score over
    the predicted spots (see :func:`soft_spot_scores`). Differentiable in ``verts``,
    ``orient`` and the dynamic leaves of ``geom``; 0 when no spot is predicted."""
    scores, valid = soft_spot_scores(verts, orient, g, theta, geom, words, shape, **kwargs)
    n = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, scores, 0.0)) / jnp.maximum(n, 1)


# --------------------------------------------------------------------------- hard overlap
def hard_spot_counts(verts: Array, yl: Array, zl: Array, omega: Array, valid: Array,
                     geom: Geometry, box: int, words: Array, shape: tuple,
                     rt: Array | None = None, *, sticky: bool = False) -> tuple[Array, Array]:
    """MIDAS's pixel counts (``CalcFracOverlap``, reference §5.4) for one voxel, per spot.

    ``verts (3,2)`` µm probe triangle; ``yl, zl`` µm, ``omega`` deg, ``valid`` bool, all
    ``(S,)``: the spots of one orientation (a compacted table row or the ``2R`` slots of
    :func:`nfjax.forward.predict_spots`); ``box`` the static footprint box
    (:func:`nfjax.forward.footprint_box`); ``words``/``shape`` the bit-packed observations.
    Returns ``(total (S,), overlap (S,))`` int32, each spot's :func:`pair_counts` (for a
    footprint of more than ``_STRAIGHT_PIXELS`` pixels, the sums of its
    :func:`pixel_flags`).
    """
    if rt is None:
        rt = tilt_matrix(geom.tilts)
    if box_pixels(box) <= _STRAIGHT_PIXELS:
        return _per_spot(pair_counts, verts, yl, zl, omega, valid, geom, box, words, shape,
                         rt, sticky)
    keep, found = _per_spot(pixel_flags, verts, yl, zl, omega, valid, geom, box, words,
                            shape, rt, sticky)
    return (jnp.sum(keep, axis=-1, dtype=jnp.int32),
            jnp.sum(found, axis=-1, dtype=jnp.int32))


def _per_spot(counter, verts, yl, zl, omega, valid, geom, box, words, shape, rt, sticky):
    """``counter`` (:func:`pair_counts` or :func:`pixel_flags`) of one voxel for each of the
    spots ``yl, zl, omega, valid (S,)``, stacked on a leading spot axis."""
    return jax.vmap(lambda y, z, w, ok: counter(
        verts, y, z, spot_terms(y, z, w, geom, rt), ok, geom, box, words, shape, rt,
        sticky=sticky))(yl, zl, omega, valid)


# The screen counts footprints of at most this many pixels in straight-line code
# (:func:`pair_counts`), larger ones along a pixel axis (:func:`pixel_flags`). Screen of 400
# voxels x 1,200 orientations: 21 pixels (E = 7.5 um) straight-line 3.4 s, pixel axis
# 5.4 s; 48 pixels (15 um) straight-line 10.8 s, pixel axis 5.8-6.0 s.
_STRAIGHT_PIXELS = 32


def pair_counts(verts: Array, yl: Array, zl: Array, terms: SpotTerms, valid: Array,
                geom: Geometry, box, words: Array, shape: tuple, rt: Array, *,
                sticky: bool = False) -> tuple[Array, Array]:
    """``(total, overlap)`` int32 of one voxel ``verts (3,2)`` µm and one spot at ``yl, zl``
    µm with its :func:`nfjax.forward.spot_terms` (``CalcFracOverlap``, reference §5.4).

    A spot counts if it is ``valid``, its frame is in the scan and all three projected
    vertices are on the detector. Each of its footprint pixels counts in the denominator
    unless it is off the detector at some distance, and in the numerator if it is lit at
    every distance. ``sticky=True`` reproduces MIDAS's never-reset out-of-bounds flag (a
    pixel off the detector also drops every later pixel of the same spot, §12 item 6); the
    default drops only that pixel.

    The pixels are counted one by one in straight-line code as the rasteriser gives them,
    with no pixel axis: the whole (voxel, spot) chain — ray shift, projection, raster,
    look-ups — is then one loop on XLA:CPU (with a pixel axis every projected vertex
    coordinate became a loop of its own writing to memory; the screen with 2.5–5 µm probes
    1.7–2x slower). For large footprints the code grows with the pixels and the pixel axis
    (:func:`pixel_flags`) is faster again: see ``_STRAIGHT_PIXELS``.
    """
    verts_in, n, pixel = footprint_pixels(verts, yl, zl, terms, geom, box, rt)
    spot_ok = valid & terms.frame_ok & verts_in
    total = overlap = jnp.zeros(jnp.shape(spot_ok), jnp.int32)
    dropped = False
    for k in range(n):
        ys, zs, ok = pixel(k)
        on_det = _on_detector_all(ys, zs, geom)
        if sticky:
            dropped = dropped | (ok & ~on_det)
            keep = spot_ok & ok & ~dropped
        else:
            keep = spot_ok & ok & on_det
        found = _lit_all(keep, ys, zs, terms.frame, words, shape)
        total = total + keep.astype(jnp.int32)
        overlap = overlap + found.astype(jnp.int32)
    return total, overlap


def _packed_sum(total: Array, overlap: Array, axis, bound: int) -> tuple[Array, Array]:
    """``(sum(total), sum(overlap))`` int32 over ``axis`` of per-pair counts, from one
    reduction of one packed integer per pair (``overlap`` in the high half); ``bound`` is
    the largest sum possible (pairs summed × footprint pixels).

    With two separate sums XLA:CPU computes the footprint chain in several loops and
    streams its float intermediates through memory between them (about 1.5x slower in the
    screen). The halves cannot carry into each other: a sum is at most ``bound``.
    """
    if bound < 1 << 15:
        it, shift = jnp.int32, 16
    elif jax.config.jax_enable_x64 and bound < 1 << 31:
        it, shift = jnp.int64, 32
    else:
        return (jnp.sum(total, axis=axis, dtype=jnp.int32),
                jnp.sum(overlap, axis=axis, dtype=jnp.int32))
    packed = jnp.sum(total.astype(it) + (overlap.astype(it) << shift), axis=axis, dtype=it)
    return ((packed & ((1 << shift) - 1)).astype(jnp.int32),
            (packed >> shift).astype(jnp.int32))


def hard_counts_voxels(verts: Array, yl: Array, zl: Array, omega: Array, valid: Array,
                       geom: Geometry, box: int, words: Array, shape: tuple,
                       rt: Array | None = None, *, sticky: bool = False
                       ) -> tuple[Array, Array]:
    """:func:`hard_counts` of many voxels ``verts (V,3,2)`` against one orientation's
    spots ``(S,)``: ``(total (V,), overlap (V,))`` int32 — the screen's kernel.

    Computed spot-major, voxels innermost: the look-ups of one spot for neighbouring
    voxels fall on nearby pixels of one frame (cache lines shared), and the per-spot
    quantities broadcast along the vector lanes. On the CPU this is about 2x faster than
    vmapping :func:`hard_counts` over the voxels.
    """
    if rt is None:
        rt = tilt_matrix(geom.tilts)
    bound = int(jnp.shape(yl)[0]) * box_pixels(box)
    counter = pair_counts if box_pixels(box) <= _STRAIGHT_PIXELS else pixel_flags

    def one_spot(y, z, w, ok):
        terms = spot_terms(y, z, w, geom, rt)
        return jax.vmap(lambda v: counter(v, y, z, terms, ok, geom, box, words, shape, rt,
                                          sticky=sticky))(verts)

    a, b = jax.vmap(one_spot)(yl, zl, omega, valid)      # (S, V) counts or (S, V, P) flags
    return _packed_sum(a, b, (0,) + tuple(range(2, a.ndim)), bound)


def hard_counts(verts: Array, yl: Array, zl: Array, omega: Array, valid: Array,
                geom: Geometry, box: int, words: Array, shape: tuple,
                rt: Array | None = None, *, sticky: bool = False) -> tuple[Array, Array]:
    """``(Total, Overlap)`` int32 scalars of one voxel and one orientation's spots: the sums
    of :func:`hard_spot_counts` over the spots (the refinement objective's counts).

    Footprints of more than one pixel are counted along a pixel axis
    (:func:`pixel_flags`): with one voxel per problem the spots' prediction chain is split
    from the raster anyway, and the raster vectorises over the pixels (with the straight-line
    :func:`pair_counts`, 1.2x slower for a 5 × 2 box, 1.5x for 7 × 7).
    """
    if rt is None:
        rt = tilt_matrix(geom.tilts)
    bound = int(jnp.shape(yl)[0]) * box_pixels(box)
    if box_pixels(box) == 1:
        total, overlap = hard_spot_counts(verts, yl, zl, omega, valid, geom, box, words,
                                          shape, rt, sticky=sticky)
        return _packed_sum(total, overlap, None, bound)
    keep, found = _per_spot(pixel_flags, verts, yl, zl, omega, valid, geom, box, words,
                            shape, rt, sticky)                            # (S, P)
    return _packed_sum(keep, found, None, bound)


def pixel_flags(verts: Array, yl: Array, zl: Array, terms: SpotTerms, valid: Array,
                geom: Geometry, box, words: Array, shape: tuple, rt: Array, *,
                sticky: bool = False) -> tuple[Array, Array]:
    """:func:`pair_counts` before the sums: ``(keep, found)`` bool ``(P,)``, whether each
    footprint pixel counts in the denominator and whether it is also lit."""
    verts_in, n, pixel = footprint_pixels(verts, yl, zl, terms, geom, box, rt)
    spot_ok = valid & terms.frame_ok & verts_in
    ys, zs, ok = jax.vmap(pixel)(jnp.arange(n, dtype=jnp.int32))
    on_det = _on_detector_all(ys, zs, geom)
    if sticky:
        on_det = jnp.cumsum((ok & ~on_det).astype(jnp.int32), axis=-1) == 0
    keep = spot_ok & ok & on_det
    return keep, _lit_all(keep, ys, zs, terms.frame, words, shape)


def _on_detector_all(ys, zs, geom: Geometry) -> Array:
    """Whether a footprint pixel (its ``ys``, ``zs`` at every distance) is on the detector
    at every distance."""
    on_det = on_detector(ys[0], zs[0], geom)
    for y, z in zip(ys[1:], zs[1:]):
        on_det = on_det & on_detector(y, z, geom)
    return on_det


def _lit_all(keep: Array, ys, zs, frame: Array, words: Array, shape: tuple) -> Array:
    """``keep`` and lit at every distance (distance by distance: see
    :func:`nfjax.forward.distance_centre_list`)."""
    found = keep
    for L, (y, z) in enumerate(zip(ys, zs)):
        found = found & lookup(words, shape, L, frame, y, z)
    return found


def frac_from_counts(total: Array, overlap: Array, dtype=jnp.float64) -> Array:
    """``FracOverlap = Overlap / Total`` (0 when Total is 0), reference §5.5."""
    t = total.astype(dtype)
    return jnp.where(total > 0, overlap.astype(dtype) / jnp.where(total > 0, t, 1), 0)


def hard_overlap(verts: Array, orient: Array, g: Array, theta: Array, geom: Geometry,
                 words: Array, shape: tuple, *, box: int, v: Array | None = None,
                 refl_mask: Array | None = None, sticky: bool = False) -> Array:
    """MIDAS's FracOverlap of one voxel for an orientation matrix (refinement objective
    ``1 − hard_overlap``, reference §5.5, §7.3).

    Spots are predicted from ``orient (3,3)`` with ``v`` (default ``bragg_v(g, theta)``,
    the fitter's convention); ``refl_mask (R,)`` optionally switches reflections off
    (padding of per-problem reflection lists). Returns a float scalar in [0, 1].
    """
    if v is None:
        v = bragg_v(g, theta)
    sp = predict_spots(orient, g, theta, geom, v=v)
    valid = sp.valid
    if refl_mask is not None:
        valid = valid & jnp.repeat(refl_mask, 2)
    total, overlap = hard_counts(verts, sp.yl, sp.zl, sp.omega, valid, geom, box, words,
                                 shape, sticky=sticky)
    return frac_from_counts(total, overlap, sp.yl.dtype)
