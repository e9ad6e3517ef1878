"""The forward model: where a voxel of a given orientation lights up the NF detector.

Owns the physics of reference §5, written for ONE orientation / ONE spot / ONE voxel and
lifted with ``jax.vmap`` by the callers (simulation, screening, refinement, calibration and
users' own code all call these functions; there is no second copy):

* :func:`predict_spots` — Bragg solutions ω (both), η, pole exclusion, ω-range/box filter and
  the ideal spot position (yl, zl) on the untilted detector at the first distance. Output
  is a fixed-size, masked :class:`Spots` of ``2·R`` slots (slot ``2i+s`` = reflection i,
  solution s), so it jits and vmaps; compacting the valid slots gives MIDAS's order.
* :func:`displace`, :func:`project` — the voxel-vertex ray shift and the tilted-detector
  projection (§5.2–5.3), in pixels at distance 0.
* :func:`footprint_offsets` — MIDAS's triangle rasteriser ``CalcPixels2`` on a static box,
  or the single-pixel rule when the probe triangle is smaller than a pixel (§5.4).
* :func:`spot_terms` — what a spot's footprint needs whatever the voxel: frame bin (with
  the wedge correction), cos/sin ω, the spot centre at every distance.
* :func:`footprint_pixels` — per (voxel, spot): vertex-in-detector test and the footprint
  pixels at every distance, one pixel at a time (what the hard score consumes);
  :func:`spot_footprint` — both, with the pixels stacked into arrays.

Units: µm for lengths, degrees for ω, η, θ and tilts, radians only for Euler angles,
pixels for detector coordinates, Å⁻¹ for reciprocal vectors (no 2π). Everything is pure
``jnp``: no I/O, no globals, no device transfers, and dtype follows the inputs (float64 for
files and parity, float32 for the accelerator). Integer outputs (pixels, frames) are int32.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nfjax.errors import NfjaxError
from nfjax.geometry import Geometry, tilt_matrix

Array = Any

_EDGE_D2 = 0.9801  # (0.99 px)^2: rasteriser edge-distance acceptance


class Spots(NamedTuple):
    """Predicted spots of one orientation; every field has shape ``(2R,)``.

    ``yl, zl`` µm on the ideal detector at ``lsd[0]`` relative to the beam centre;
    ``omega``, ``eta`` deg; ``theta`` deg (Bragg angle of the reflection); ``refl`` index of
    the reflection in the (ring-selected) list; ``valid`` the MIDAS keep mask.
    """

    yl: Array
    zl: Array
    omega: Array
    eta: Array
    theta: Array
    refl: Array
    valid: Array


def round_half_away(x: Array) -> Array:
    """C ``round``: halves away from zero, exact for every float (no ``x + 0.5`` rounding)."""
    t = jnp.trunc(x)
    return t + jnp.where(jnp.abs(x - t) >= 0.5, jnp.sign(x), jnp.zeros_like(x))


def _safe(x: Array, bad: Array, fill=1.0) -> Array:
    """Replace ``x`` by ``fill`` where ``bad`` (keeps gradients finite through ``where``)."""
    x = jnp.asarray(x)
    return jnp.where(bad, jnp.asarray(fill, x.dtype), x)


def _sqrt0(x: Array) -> Array:
    """√x, 0 where x ≤ 0, with a zero gradient there instead of √'s infinite one (which a
    masking ``where`` downstream would turn into NaN)."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(_safe(x, ~pos)), jnp.zeros_like(x))


def _atan2(y: Array, x: Array) -> Array:
    """atan2(y, x), 0 at (0, 0) as ``arctan2``, with a zero gradient there (0/0 otherwise)."""
    origin = (y == 0) & (x == 0)
    return jnp.where(origin, jnp.zeros_like(y), jnp.arctan2(y, _safe(x, origin)))


def eta_deg(y: Array, z: Array) -> Array:
    """Azimuth η (deg) of a detector/vector component pair: 0 at +z, positive towards −y."""
    # |atan2(y, z)| = acos(z/√(y²+z²)) but stays accurate near the poles in float32.
    eta = jnp.rad2deg(jnp.abs(_atan2(y, z)))
    return jnp.where(y > 0, -eta, eta)


def bragg_v(g: Array, theta: Array, orient: Array | None = None) -> Array:
    """Right-hand side ``v = sin θ · |G|`` of the Bragg equation for each reflection.

    With ``orient`` given, |G| is taken of the rotated vector ``U·g`` (MakeDiffrSpots, where
    U comes from an un-normalised seed quaternion); without, of ``g`` (the fitter's
    precomputed value). ``g (R,3)``, ``theta (R,)`` deg → ``(R,)``.
    """
    G = g if orient is None else g @ orient.T
    return jnp.sin(jnp.deg2rad(theta)) * jnp.linalg.norm(G, axis=-1)


def solve_omega(G: Array, v: Array) -> tuple[Array, Array]:
    """Both ω (deg) with ``−Gx cos ω + Gy sin ω = v`` for each rotated vector ``G (R,3)``.

    Returns ``omega (R,2)`` and ``ok (R,2)``. Solved in the well-conditioned form
    ``ρ sin(ω − β) = v`` with ``ρ = |(Gx, Gy)|``, ``β = atan2(Gx, Gy)``: the same two roots as
    MIDAS's quadratic in cos ω (§5.1 step 3), in MIDAS's order (the root with the larger
    cos ω first), but accurate in float32 too (MIDAS's ``acos`` near ±1 loses half the
    digits). A solution exists when ``|v| ≤ ρ``; ω ∈ (−180, 180].
    """
    gx, gy = G[..., 0], G[..., 1]
    # A vector on the rotation axis (Gx = Gy = 0) has no solution. _sqrt0 and _atan2 keep
    # its gradient finite, else the zero weight of that reflection turns into NaN gradients
    # for every other one.
    rho = _sqrt0(gx * gx + gy * gy)
    axis = rho == 0
    r = v / _safe(rho, axis)
    ok = ~axis & (jnp.abs(r) <= 1)
    beta = _atan2(gx, gy)
    a = jnp.arcsin(jnp.where(ok, r, jnp.zeros_like(r)))   # no inf·0 gradients off-solution
    w1 = beta + a
    w2 = beta + jnp.pi - a
    w1 = jnp.arctan2(jnp.sin(w1), jnp.cos(w1))
    w2 = jnp.arctan2(jnp.sin(w2), jnp.cos(w2))
    first = jnp.cos(w1) >= jnp.cos(w2)
    w = jnp.stack([jnp.where(first, w1, w2), jnp.where(first, w2, w1)], axis=-1)
    return jnp.rad2deg(w), jnp.stack([ok, ok], axis=-1)


def check_reflections(g: Array, theta: Array, where: str = "") -> None:
    """ValueError (prefixed by ``where``) unless ``g`` is (R, 3) and ``theta`` (R,): checked
    when traced (shapes are static), instead of an error from inside a JAX primitive."""
    if jnp.ndim(g) != 2 or jnp.shape(g)[1] != 3:
        raise ValueError(f"{where}g must be reflections (R, 3), got shape {jnp.shape(g)}")
    if jnp.shape(theta) != (jnp.shape(g)[0],):
        raise ValueError(f"{where}theta must be ({jnp.shape(g)[0]},), one Bragg angle per "
                         f"reflection of g, got shape {jnp.shape(theta)}")


def predict_spots(orient: Array, g: Array, theta: Array, geom: Geometry,
                  v: Array | None = None) -> Spots:
    """Spots of one orientation (MakeDiffrSpots / CalcDiffractionSpots, §5.1).

    ``orient (3,3)`` orientation matrix U (crystal → lab at ω = 0); ``g (R,3)`` reciprocal
    vectors (Å⁻¹) and ``theta (R,)`` Bragg angles (deg) of the ring-selected reflections;
    ``v (R,)`` the Bragg right-hand side (default ``bragg_v(g, theta, orient)``, as
    MakeDiffrSpots; pass ``bragg_v(g, theta)`` for the fitter's convention).
    Returns :class:`Spots` with ``2R`` slots in MIDAS order (reflection, then solution).
    """
    if jnp.shape(orient) != (3, 3):
        raise ValueError(f"predict_spots: orient must be one (3, 3) matrix, got shape "
                         f"{jnp.shape(orient)}; use jax.vmap for a batch of orientations")
    check_reflections(g, theta, "predict_spots: ")
    dtype = jnp.result_type(orient, g)
    omega, eta, ok = spot_angles(orient, g, theta, v)
    yl, zl, valid = spot_positions(omega, eta, ok, theta, geom)
    n = g.shape[0]
    refl = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, 2))
    th = jnp.broadcast_to(theta[:, None], (n, 2)).astype(dtype)
    flat = lambda x: x.reshape(-1)  # noqa: E731
    return Spots(flat(yl), flat(zl), flat(omega), flat(eta), flat(th), flat(refl),
                 flat(valid))


def spot_angles(orient: Array, g: Array, theta: Array, v: Array | None = None):
    """First half of :func:`predict_spots`: ``omega``, ``eta`` (deg) and whether a Bragg
    solution exists, ``(R, 2)`` each.

    The two halves are separate functions so that a batch can run them as two compiled
    steps (:mod:`nfjax.spots`): in one, XLA:CPU recomputes the whole ω/η chain of sines,
    cosines and arctangents in each output's loop (MakeDiffrSpots 1.35x slower).
    """
    G = g @ orient.T
    if v is None:
        v = bragg_v(g, theta, orient)
    omega, ok = solve_omega(G, v)                       # (R,2)
    w = jnp.deg2rad(omega)
    gwy = jnp.sin(w) * G[:, 0:1] + jnp.cos(w) * G[:, 1:2]
    gwz = jnp.broadcast_to(G[:, 2:3], gwy.shape)
    return omega, eta_deg(gwy, gwz), ok


def spot_positions(omega: Array, eta: Array, ok: Array, theta: Array, geom: Geometry):
    """Second half of :func:`predict_spots`: ``yl, zl`` (µm) and the keep mask ``(R, 2)`` of
    :func:`spot_angles`' output (pole exclusion, ω ranges and detector boxes)."""
    epa = geom.exclude_pole_angle
    ok = ok & ~((jnp.abs(eta) < epa) | (180 - jnp.abs(eta) < epa))
    radius = geom.lsd[0] * jnp.tan(jnp.deg2rad(2 * theta))[:, None]
    e = jnp.deg2rad(eta)
    yl = -jnp.sin(e) * radius
    zl = jnp.cos(e) * radius
    in_any = jnp.zeros_like(ok)
    for (olo, ohi), (ymin, ymax, zmin, zmax) in zip(geom.omega_ranges, geom.box_sizes):
        in_any = in_any | ((omega > olo) & (omega < ohi) & (yl > ymin) & (yl < ymax)
                           & (zl > zmin) & (zl < zmax))
    return yl, zl, ok & in_any


def displace(verts: Array, yl: Array, zl: Array, omega: Array, lsd0: Array):
    """Ideal-detector position of the ray through each voxel vertex (§5.2).

    ``verts (K,2)`` sample-frame (x, y) µm; spot ``yl, zl`` µm, ``omega`` deg; returns
    ``Y (K,), Z (K,)`` µm on the plane x = lsd0 (the ray from the rotated vertex parallel to
    the ray from the origin to (lsd0, yl, zl)).
    """
    w = jnp.deg2rad(omega)
    return _displace_cs(verts, yl, zl, jnp.cos(w), jnp.sin(w), lsd0)


def _displace_cs(verts: Array, yl: Array, zl: Array, c: Array, s: Array, lsd0: Array):
    """:func:`displace` from the spot's ``cos ω``, ``sin ω``."""
    a, b = verts[..., 0], verts[..., 1]
    xa = a * c - b * s
    ya = a * s + b * c
    t = 1 - xa / lsd0
    return ya + yl * t, zl * t


def project(Y: Array, Z: Array, geom: Geometry, rt: Array | None = None):
    """Tilted-detector pixel coordinates at distance 0 of ideal points ``(Y, Z)`` µm (§5.3).

    ``rt`` is ``tilt_matrix(geom.tilts)`` (pass it in when projecting many points).
    Returns ``(y_px, z_px)`` floats, same shape as ``Y``.
    """
    if rt is None:
        rt = tilt_matrix(geom.tilts)
    lsd0 = geom.lsd[0]
    p0 = -lsd0 * rt[:, 0]                       # R_t · (−Lsd0, 0, 0)
    p1x = Y * rt[0, 1] + Z * rt[0, 2]           # R_t · (0, Y, Z)
    p1y = Y * rt[1, 1] + Z * rt[1, 2]
    p1z = Y * rt[2, 1] + Z * rt[2, 2]
    dx, dy, dz = p1x - p0[0], p1y - p0[1], p1z - p0[2]
    yp = p0[1] - dy * p0[0] / dx
    zp = p0[2] - dz * p0[0] / dx
    return yp / geom.px + geom.ybc[0], zp / geom.px + geom.zbc[0]


def footprint_box(edge_length: float, px: float) -> int:
    """Static side (pixels) of the raster box that holds any footprint of a probe triangle
    of edge ``edge_length`` µm; 1 when MIDAS uses its single-pixel rule (E ≤ px)."""
    import math

    if edge_length <= px:
        return 1
    return int(math.ceil(edge_length / px)) + 3


def box_pixels(box) -> int:
    """Pixels of a static footprint box: ``box²`` for a square side, ``by·bz`` for a
    ``(by, bz)`` box (:func:`footprint_box_yz`)."""
    return box * box if isinstance(box, int) else int(box[0]) * int(box[1])


def footprint_box_yz(edge_length: float, geom: Geometry, rho_max: float, r_max: float):
    """A static raster box ``(by, bz)`` (pixels along detector y and z) that holds every
    footprint of a probe triangle of edge ``edge_length`` µm, for spots at most
    ``rho_max = tan 2θ_max`` off the beam and triangle vertices within ``r_max`` µm of the
    rotation axis; ``1`` for MIDAS's single-pixel rule (E ≤ px).

    The footprint is taken from the bounding box of the rounded projected vertices, so a
    box one pixel wider than the largest continuous vertex spread, plus one for rounding
    (``floor(spread) + 2``), holds all of it. Two vertices differ on the ideal detector by
    at most ``E·√(1+ρ²)`` in y and ``E·ρ`` in z (the ray shift of §5.2 moves a vertex in z
    only through its distance along the beam), and the tilted projection stretches these by
    at most its Jacobian, bounded here over every point the vertices can reach. The
    projected triangle is one or two pixel rows tall, so this is much smaller than the
    square :func:`footprint_box` (E = 5 µm, 1.48 µm pixels: 5 × 2 instead of 7 × 7) with
    exactly the same pixels taken. Falls back to the square box if the bound does not
    apply (a detector tilted so far that the projection is singular) or is larger.
    """
    import math

    import numpy as np

    px = float(np.asarray(geom.px))
    square = footprint_box(edge_length, px)
    if square == 1:
        return 1
    lsd0 = float(np.asarray(geom.lsd)[0])
    rt = np.asarray(tilt_matrix(np.asarray(geom.tilts, np.float64)), np.float64)
    rho, r = float(rho_max), float(r_max)
    # Every displaced vertex (Y, Z) on the ideal detector lies in |Y| <= ym, |Z| <= zm.
    t_max = 1.0 + r / lsd0
    ym = r + lsd0 * rho * t_max
    zm = lsd0 * rho * t_max
    a = np.abs(rt)
    # d = R_t·(0, Y, Z) − p0 with p0 = −Lsd0·R_t[:, 0]: ranges of its components.
    dx_lo = lsd0 * rt[0, 0] - a[0, 1] * ym - a[0, 2] * zm
    if not (math.isfinite(dx_lo) and dx_lo > 0):
        return square
    dmax = [abs(lsd0 * rt[i, 0]) + a[i, 1] * ym + a[i, 2] * zm for i in range(3)]
    p0x = abs(lsd0 * rt[0, 0])
    # |∂(yp, zp)/∂(Y, Z)|: yp = p0y − dy·p0x/dx, so ∂yp/∂Y = −p0x(R11·dx − dy·R01)/dx², ...
    def jac(row, col):
        return p0x * (a[row, col] * dmax[0] + dmax[row] * a[0, col]) / dx_lo ** 2

    dy_ideal = edge_length * math.sqrt(1.0 + rho * rho)
    dz_ideal = edge_length * rho
    spread_y = (jac(1, 1) * dy_ideal + jac(1, 2) * dz_ideal) / px
    spread_z = (jac(2, 1) * dy_ideal + jac(2, 2) * dz_ideal) / px
    slack = 0.01                     # float rounding of the projections (float32 too)
    by = int(math.floor(spread_y + slack)) + 2
    bz = int(math.floor(spread_z + slack)) + 2
    return (min(by, square), min(bz, square))


def fit_box(edge_length: float, verts, theta, geom: Geometry, spots=None):
    """:func:`footprint_box_yz` for a fit: probe triangles ``verts (N,3,2)`` µm of edge
    ``edge_length``, reflections of Bragg angles ``theta`` (deg) and, if given, a table of
    predicted ``spots (T, ≥2)`` (yl, zl µm) that may reach farther out."""
    import math

    import numpy as np

    if footprint_box(edge_length, float(np.asarray(geom.px))) == 1:
        return 1                         # single-pixel rule: no box to bound
    lsd0 = float(np.asarray(geom.lsd)[0])
    theta = np.asarray(theta, np.float64)
    rho = float(np.tan(np.radians(2 * theta)).max(initial=0.0))
    if spots is not None and len(spots):
        # In slices: a library's table holds tens of millions of spots, and one (T,)
        # temporary of their radii would take gigabytes.
        spots = np.asarray(spots, np.float64)
        step = 1 << 20
        r2 = max(float(np.einsum("ij,ij->i", spots[i:i + step, :2], spots[i:i + step, :2]).max())
                 for i in range(0, len(spots), step))
        rho = max(rho, math.sqrt(r2) / lsd0)
    r_max = float(np.sqrt((np.asarray(verts, np.float64) ** 2).sum(axis=-1)).max(initial=0.0))
    return footprint_box_yz(edge_length, geom, rho, r_max)


def footprint_offsets(rel: Array, box: int) -> tuple[Array, Array, Array]:
    """Pixel offsets of a projected triangle footprint (MIDAS ``CalcPixels2``, §5.4).

    ``rel (3,2)`` vertex positions relative to the projected spot centre, px. ``box`` is
    static: 1 selects the single-pixel rule (offset = rounded mean vertex), otherwise the
    rasteriser runs over a ``box × box`` window (or ``by × bz`` for a ``(by, bz)`` box,
    :func:`footprint_box_yz`) from the rounded bounding-box corner. Returns ``oy (P,),
    oz (P,)`` int32 and ``ok (P,)`` with ``P`` = :func:`box_pixels` (z-major order).
    """
    n, pixel = _raster([rel[k, 0] for k in range(3)], [rel[k, 1] for k in range(3)], box)
    return jax.vmap(pixel)(jnp.arange(n, dtype=jnp.int32))


def _raster(ry, rz, box) -> tuple[int, Any]:
    """MIDAS's rasteriser set up for the vertex coordinates ``ry, rz`` (px, relative to the
    spot centre; sequences of the three vertices' scalars). Returns ``(P, pixel)``:
    ``pixel(k)`` gives footprint pixel ``k``'s ``(oy, oz, ok)`` (int32 offsets, z-major over
    the static box, and the rasteriser's mask); ``k`` is a Python int or a traced int32.

    Pixel by pixel and vertex by vertex, elementwise only: no (3,) vectors, reductions or
    stacks over the vertices or the pixels. XLA:CPU lowers a small reduce to a library
    call, and a value broadcast onto a pixel axis is computed in a loop of its own whose
    float intermediates stream through memory (the screen 2x slower). The mean is summed in
    jnp.mean's order, ((r0 + r1) + r2) / 3, so the result is bit-identical to it.
    """
    if box == 1:
        oy = round_half_away((ry[0] + ry[1] + ry[2]) / 3).astype(jnp.int32)
        oz = round_half_away((rz[0] + rz[1] + rz[2]) / 3).astype(jnp.int32)
        return 1, lambda k: (oy, oz, jnp.ones(jnp.shape(oy), bool))
    by, bz = (box, box) if isinstance(box, int) else box
    dtype = jnp.result_type(ry[0])
    vy, vz = [round_half_away(r) for r in ry], [round_half_away(r) for r in rz]
    ymin = jnp.minimum(jnp.minimum(vy[0], vy[1]), vy[2])
    zmin = jnp.minimum(jnp.minimum(vz[0], vz[1]), vz[2])
    ymax = jnp.maximum(jnp.maximum(vy[0], vy[1]), vy[2])
    zmax = jnp.maximum(jnp.maximum(vz[0], vz[1]), vz[2])
    v = list(zip(vy, vz))
    edges = [(v[1], v[2]), (v[2], v[0]), (v[0], v[1])]
    e2 = [(b[0] - a[0]) ** 2 + (b[1] - a[1]) ** 2 for a, b in edges]

    def pixel(k):
        if isinstance(k, int):
            iy, iz = jnp.asarray(k % by, dtype), jnp.asarray(k // by, dtype)
        else:
            iy, iz = (k % by).astype(dtype), (k // by).astype(dtype)
        py, pz = ymin + iy, zmin + iz
        in_box = (py <= ymax) & (pz <= zmax)
        orient = [(b[0] - a[0]) * (pz - a[1]) - (b[1] - a[1]) * (py - a[0]) for a, b in edges]
        take = (orient[0] >= 0) & (orient[1] >= 0) & (orient[2] >= 0)
        for o, d2 in zip(orient, e2):
            # A zero-length edge gives 0/0 or x/0 in MIDAS: the comparison is false.
            take = take | ((d2 > 0) & (o * o < _EDGE_D2 * _safe(d2, d2 == 0)))
        return py.astype(jnp.int32), pz.astype(jnp.int32), in_box & take

    return by * bz, pixel


def _wedge_shift(eta: Array, theta: Array, wavelength, wedge: Array) -> Array:
    """The CorrectWedge formula itself (see :func:`correct_wedge`), at any wedge."""
    th, et, wr = jnp.deg2rad(theta), jnp.deg2rad(eta), jnp.deg2rad(wedge)
    ds = 2 * jnp.sin(th) / wavelength
    pole = jnp.abs(jnp.abs(eta) - 90) == 0
    k1 = -ds * jnp.sin(th)
    k2 = jnp.where(pole, -jnp.sign(eta) * jnp.cos(th), -ds * jnp.cos(th) * jnp.sin(et))
    k3 = jnp.where(pole, 0.0, ds * jnp.cos(th) * jnp.cos(et))
    k1w = k1 * jnp.cos(wr) + k3 * jnp.sin(wr)
    k3w = k3 * jnp.cos(wr) - k1 * jnp.sin(wr)
    norm = _sqrt0(k1w * k1w + k2 * k2 + k3w * k3w)
    scale = ds / _safe(norm, norm == 0)
    g1, g2, g3 = k1w * scale, k2 * scale, k3w * scale
    A = -(g1 * g1 + g2 * g2 + g3 * g3) * wavelength / 2
    a = g1 * g1 + g2 * g2
    a_s = _safe(a, a == 0)

    def roots(b, c):
        d = b * b - 4 * a * c
        ok = d >= 0
        sq = _sqrt0(d)
        r1 = (-b + sq) / (2 * a_s)
        r2 = (-b - sq) / (2 * a_s)
        r1 = jnp.where(ok & (jnp.abs(r1) <= 1), r1, 0.0)
        r2 = jnp.where(ok & (jnp.abs(r2) <= 1), r2, 0.0)
        return r1, r2

    s1, s2 = roots(2 * A * g2, A * A - g1 * g1)
    c1, c2 = roots(-2 * A * g1, A * A - g2 * g2)
    straight = jnp.abs(s1 * s1 + c1 * c1 - 1) < jnp.abs(s1 * s1 + c2 * c2 - 1)
    w1 = _atan2(s1, jnp.where(straight, c1, c2))
    w2 = _atan2(s2, jnp.where(straight, c2, c1))
    return jnp.rad2deg(jnp.where(jnp.abs(w1) <= jnp.abs(w2), w1, w2))


def correct_wedge(eta: Array, theta: Array, wavelength: float, wedge: Array) -> Array:
    """ω shift δ (deg) of a spot at azimuth ``eta`` and Bragg angle ``theta`` (deg) for a
    rotation axis tilted by ``wedge`` (deg) about y (MIDAS ``CorrectWedge``, §5.7).

    nfjax passes the Bragg angle θ here; MIDAS's NF code passes 2θ (a bug, inert at
    Wedge 0). Returns 0 where |wedge| < 1e-10, as MIDAS skips the correction there; its
    gradient is 0 there too (the formula's roots coincide at zero wedge, where its
    derivatives are not finite), so calibrate a wedge by gradient from a small non-zero
    start such as 1e-3°.
    """
    small = jnp.abs(wedge) < 1e-10
    # The formula runs at a harmless wedge where the result is not used, so that the
    # unselected branch of the where has finite gradients as well.
    delta = _wedge_shift(eta, theta, wavelength, jnp.where(small, 1.0, wedge))
    return jnp.where(small, jnp.zeros_like(delta), delta)


def corrected_omega(omega: Array, yl: Array, zl: Array, geom: Geometry) -> tuple[Array, Array]:
    """ω of a spot as the frames bin it (§5.6–5.7), and whether it is inside an ω range.

    With a non-zero wedge the ω is corrected first (θ from the spot radius, see
    :func:`correct_wedge`); it is then wrapped once into (−180, 180) and, with a wedge,
    must lie strictly inside one of the ω ranges (at zero wedge every ω passes, as MIDAS).
    Returns ``(omega (deg), in_range)``; differentiable in ω, the spot position and the
    geometry (the wedge included).
    """
    eta = eta_deg(yl, zl)
    theta = 0.5 * jnp.rad2deg(jnp.arctan(_sqrt0(yl * yl + zl * zl) / geom.lsd[0]))
    delta = correct_wedge(eta, theta, geom.wavelength, geom.wedge)
    w = omega - delta
    w = jnp.where(w >= 180, w - 360, jnp.where(w <= -180, w + 360, w))
    in_range = jnp.zeros(jnp.shape(w), bool)
    for olo, ohi in geom.omega_ranges:
        in_range = in_range | ((w > olo) & (w < ohi))
    return w, jnp.where(jnp.abs(geom.wedge) < 1e-10, True, in_range)


def frame_of(omega: Array, yl: Array, zl: Array, geom: Geometry) -> tuple[Array, Array]:
    """Frame bin of a spot and whether it is inside the scan (§5.6–5.7): the
    :func:`corrected_omega` binned by OmegaStart/OmegaStep. Returns ``frame`` (int32) and
    ``ok`` (in an ω range and 0 ≤ frame < nFrames)."""
    return frame_bin(*corrected_omega(omega, yl, zl, geom), geom)


def frame_bin(w: Array, in_range: Array, geom: Geometry) -> tuple[Array, Array]:
    """``frame`` (int32) and ``ok`` of a :func:`corrected_omega` ``(w, in_range)``: the
    frame bin by OmegaStart/OmegaStep, ok when in an ω range and 0 ≤ frame < nFrames."""
    fbin = jnp.floor((w - geom.omega_start) / geom.omega_step)
    ok = in_range & (fbin >= 0) & (fbin < geom.n_frames)
    return jnp.clip(fbin, -1, geom.n_frames).astype(jnp.int32), ok


def distance_centres(cy: Array, cz: Array, geom: Geometry) -> tuple[Array, Array]:
    """Spot centre at every distance, continuous pixels ``(D,)`` each, from its tilted
    projection ``(cy, cz)`` at distance 0: MIDAS's multi-distance rule, the offset from the
    first beam centre scaled by ``Lsd[L]/Lsd[0]`` about each distance's beam centre,
    evaluated in MIDAS's order (for L = 0 it is not bit-identical to ``cy``)."""
    ys, zs = distance_centre_list(cy, cz, geom)
    return jnp.stack(ys, axis=-1), jnp.stack(zs, axis=-1)


def distance_centre_list(cy: Array, cz: Array, geom: Geometry) -> tuple[list, list]:
    """:func:`distance_centres` as one ``(cy_L, cz_L)`` value per distance (lists of D).

    Written distance by distance, not as a ``(D,)`` vector: a consumer that reads a
    vector's element per distance reads ``cy`` D times, and XLA then declines to fuse the
    divisions that make ``cy`` into it; every such producer becomes a loop of its own that
    recomputes the spot's sines and cosines (measured: the refinement objective 2.3x
    slower). Same operations in the same order as the vector form, so bit-identical."""
    px = geom.px
    ys, zs = [], []
    for L in range(int(jnp.shape(geom.lsd)[0])):
        ratio = geom.lsd[L] / geom.lsd[0]
        ys.append(((cy - geom.ybc[0]) * px) * ratio / px + geom.ybc[L])
        zs.append(((cz - geom.zbc[0]) * px) * ratio / px + geom.zbc[L])
    return ys, zs


class SpotTerms(NamedTuple):
    """What a spot's footprint needs that does not depend on the voxel.

    ``frame ()`` int32 and ``frame_ok`` (:func:`frame_of`); ``cos_w``, ``sin_w`` of ω;
    ``cy, cz`` the spot centre's tilted projection at distance 0 (continuous px); ``fy, fz``
    tuples of its floored pixel at each distance (:func:`distance_centre_list`).
    """

    frame: Array
    frame_ok: Array
    cos_w: Array
    sin_w: Array
    cy: Array
    cz: Array
    fy: tuple
    fz: tuple


def spot_terms(yl: Array, zl: Array, omega: Array, geom: Geometry,
               rt: Array | None = None) -> SpotTerms:
    """:class:`SpotTerms` of a spot at ``yl, zl`` µm, ``omega`` deg (§5.4 steps 1–2, 5)."""
    if rt is None:
        rt = tilt_matrix(geom.tilts)
    frame, frame_ok = frame_of(omega, yl, zl, geom)
    w = jnp.deg2rad(omega)
    cy, cz = project(yl, zl, geom, rt)
    ys, zs = distance_centre_list(cy, cz, geom)
    return SpotTerms(frame, frame_ok, jnp.cos(w), jnp.sin(w), cy, cz,
                     tuple(jnp.floor(a).astype(jnp.int32) for a in ys),
                     tuple(jnp.floor(a).astype(jnp.int32) for a in zs))


def on_detector(y: Array, z: Array, geom: Geometry) -> Array:
    """Whether integer pixel ``(y, z)`` is on the detector."""
    return (y >= 0) & (y < geom.nr_pixels_y) & (z >= 0) & (z < geom.nr_pixels_z)


def footprint_pixels(verts: Array, yl: Array, zl: Array, terms: SpotTerms, geom: Geometry,
                     box, rt: Array) -> tuple[Array, int, Any]:
    """Footprint of the probe triangle ``verts (3,2)`` µm for one spot, pixel by pixel
    (§5.4 steps 3–4): ``(verts_in, P, pixel)``. ``verts_in`` is whether all three projected
    vertices are on the detector (the fitter's spot test); ``pixel(k)`` gives pixel
    ``k < P``'s ``(ys, zs, ok)``: its integer pixel at each distance (tuples of D) and the
    rasteriser's mask.

    The footprint offsets are computed once at distance 0 (tilted) and reused at every
    distance around the spot centre scaled by the Lsd ratio (MIDAS's multi-distance
    approximation, kept because calibrated geometries are defined through it). The hard
    score consumes the pixels one at a time (:func:`nfjax.score.pair_counts`), so that the
    whole (voxel, spot) chain stays one loop.
    """
    cy, cz = terms.cy, terms.cz
    # Vertex by vertex, not as a (3,) vector: see _raster.
    ry, rz, verts_in = [], [], True
    for k in range(3):
        ty, tz = project(*_displace_cs(verts[k], yl, zl, terms.cos_w, terms.sin_w,
                                       geom.lsd[0]), geom, rt)
        verts_in = verts_in & ((ty <= geom.nr_pixels_y) & (ty >= 0)
                               & (tz <= geom.nr_pixels_z) & (tz >= 0))
        ry.append(ty - cy)
        rz.append(tz - cz)
    n, offsets = _raster(ry, rz, box)

    def pixel(k):
        oy, oz, ok = offsets(k)
        return tuple(f + oy for f in terms.fy), tuple(f + oz for f in terms.fz), ok

    return verts_in, n, pixel


class Footprint(NamedTuple):
    """Detector pixels of one (voxel, spot) pair.

    ``frame ()`` int32 and ``frame_ok``; ``verts_in`` whether all three projected vertices
    are on the detector (the fitter's spot test); ``py, pz (P, D)`` int32 pixel indices per
    footprint pixel and distance; ``pix_ok (P,)`` the rasteriser mask; ``in_range (P, D)``
    whether each pixel is on the detector at each distance.
    """

    frame: Array
    frame_ok: Array
    verts_in: Array
    py: Array
    pz: Array
    pix_ok: Array
    in_range: Array


def spot_footprint(verts: Array, yl: Array, zl: Array, omega: Array, geom: Geometry,
                   box: int, rt: Array | None = None) -> Footprint:
    """Footprint of the probe triangle ``verts (3,2)`` µm for one spot (§5.4 steps 1–5),
    as arrays: :func:`spot_terms` and :func:`footprint_pixels` with the pixels stacked."""
    if rt is None:
        rt = tilt_matrix(geom.tilts)
    terms = spot_terms(yl, zl, omega, geom, rt)
    verts_in, n, pixel = footprint_pixels(verts, yl, zl, terms, geom, box, rt)
    ys, zs, ok = jax.vmap(pixel)(jnp.arange(n, dtype=jnp.int32))       # (P,) each
    py, pz = jnp.stack(ys, axis=-1), jnp.stack(zs, axis=-1)          # (P, D)
    return Footprint(terms.frame, terms.frame_ok, verts_in, py, pz, ok,
                     on_detector(py, pz, geom))


def bit_indices(fp: Footprint, geom: Geometry) -> Array:
    """SpotsInfo.bit index ``((L·nFrames + frame)·NY + y)·NZ + z`` for each footprint pixel
    and distance, ``(P, D)`` int64 (invalid entries are garbage: mask them)."""
    n_dist = fp.py.shape[-1]
    n_bits = n_dist * geom.n_frames * geom.nr_pixels_y * geom.nr_pixels_z
    if not jax.config.jax_enable_x64 and n_bits >= 2**31:
        raise NfjaxError(f"the observation volume has {n_bits} bits, too many for 32-bit "
                         "indices: run with JAX's 64-bit mode (unset NFJAX_NO_X64)")
    dist = jnp.arange(n_dist, dtype=jnp.int64)[None, :]
    k = (dist * geom.n_frames + fp.frame.astype(jnp.int64)) * geom.nr_pixels_y
    k = (k + fp.py.astype(jnp.int64)) * geom.nr_pixels_z + fp.pz.astype(jnp.int64)
    return k
