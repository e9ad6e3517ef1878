"""Detector and scan geometry as a JAX pytree.

Owns the numbers that place a diffraction spot on the near-field detector: per-distance
sample-to-detector distances ``lsd`` (µm) and beam centres ``ybc``/``zbc`` (px), the detector
tilts (deg), pixel size (µm) and wedge (deg) — the differentiable leaves — and the static
scan description (ω start/step in deg, frame count, detector size in px, the ω ranges and
their boxes in µm, the pole-exclusion angle in deg, the wavelength in Å). Conventions are
MIDAS's (reference §0.1, §5): +x along the beam, +z up, ω an active rotation about +z.
This module never reads files and never moves data between devices; ``Params`` in, pytree
out.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any


@dataclass(frozen=True)
class Geometry:
    """NF detector geometry.

    Dynamic leaves (arrays; differentiable): ``lsd (D,)`` µm, ``ybc (D,)``, ``zbc (D,)`` px,
    ``tilts (3,)`` deg (tx, ty, tz), ``px ()`` µm, ``wedge ()`` deg.
    Static fields (Python values; part of the jit cache key): ``omega_start``,
    ``omega_step`` (deg, signed), ``n_frames``, ``nr_pixels_y``, ``nr_pixels_z``,
    ``omega_ranges`` (tuple of (lo, hi) deg), ``box_sizes`` (tuple of (ymin, ymax, zmin,
    zmax) µm, paired by index with ``omega_ranges``), ``exclude_pole_angle`` (deg),
    ``wavelength`` (Å).
    """

    lsd: Array
    ybc: Array
    zbc: Array
    tilts: Array
    px: Array
    wedge: Array
    omega_start: float = field(default=0.0)
    omega_step: float = field(default=1.0)
    n_frames: int = field(default=1)
    nr_pixels_y: int = field(default=2048)
    nr_pixels_z: int = field(default=2048)
    omega_ranges: tuple = field(default=((-180.0, 180.0),))
    box_sizes: tuple = field(default=((-1e30, 1e30, -1e30, 1e30),))
    exclude_pole_angle: float = field(default=0.0)
    wavelength: float = field(default=0.0)

    @property
    def n_distances(self) -> int:
        return int(np.shape(self.lsd)[0])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Shape of the observation volume ``(n_distances, n_frames, NY, NZ)``."""
        return (self.n_distances, self.n_frames, self.nr_pixels_y, self.nr_pixels_z)

    def astype(self, dtype) -> "Geometry":
        """The same geometry with every dynamic leaf cast to ``dtype``."""
        return replace(
            self,
            **{name: jnp.asarray(getattr(self, name), dtype) for name in _DYNAMIC},
        )


_DYNAMIC = ("lsd", "ybc", "zbc", "tilts", "px", "wedge")
_STATIC = ("omega_start", "omega_step", "n_frames", "nr_pixels_y", "nr_pixels_z",
           "omega_ranges", "box_sizes", "exclude_pole_angle", "wavelength")

jax.tree_util.register_dataclass(Geometry, data_fields=list(_DYNAMIC), meta_fields=list(_STATIC))


def geometry_from_params(params, dtype=jnp.float64) -> Geometry:
    """Build the geometry from a parsed parameter file.

    Raises ``ParamError`` (naming the file and key) when a key the forward model needs is
    missing: MIDAS would run with an uninitialised value there.
    """
    params.require("tx", "ty", "tz", "OmegaStart", "OmegaStep", "StartNr", "EndNr",
                   "OmegaRange", "BoxSize", "ExcludePoleAngle")
    lsd = np.asarray(params.lsd, dtype=np.float64)
    bc = np.asarray(params.bc, dtype=np.float64).reshape(-1, 2)
    return Geometry(
        lsd=jnp.asarray(lsd, dtype),
        ybc=jnp.asarray(bc[:, 0], dtype),
        zbc=jnp.asarray(bc[:, 1], dtype),
        tilts=jnp.asarray([params.tx, params.ty, params.tz], dtype),
        px=jnp.asarray(params.px, dtype),
        wedge=jnp.asarray(params.wedge or 0.0, dtype),
        omega_start=float(params.omega_start),
        omega_step=float(params.omega_step),
        n_frames=int(params.n_frames),
        nr_pixels_y=int(params.nr_pixels_y),
        nr_pixels_z=int(params.nr_pixels_z),
        omega_ranges=tuple((float(a), float(b)) for a, b in params.omega_ranges),
        box_sizes=tuple(tuple(float(v) for v in box) for box in params.box_sizes),
        exclude_pole_angle=float(params.exclude_pole_angle),
        wavelength=float(params.wavelength),
    )


def tilt_matrix(tilts_deg: Array) -> Array:
    """``R_t = Rz(tz)·Ry(ty)·Rx(tx)`` (MIDAS ``RotationTilts``), tilts in degrees → (3, 3)."""
    t = jnp.deg2rad(tilts_deg)
    cx, cy, cz = jnp.cos(t[0]), jnp.cos(t[1]), jnp.cos(t[2])
    sx, sy, sz = jnp.sin(t[0]), jnp.sin(t[1]), jnp.sin(t[2])
    one = jnp.ones_like(cx)
    zero = jnp.zeros_like(cx)
    rx = jnp.stack([jnp.stack([one, zero, zero]), jnp.stack([zero, cx, -sx]),
                    jnp.stack([zero, sx, cx])])
    ry = jnp.stack([jnp.stack([cy, zero, sy]), jnp.stack([zero, one, zero]),
                    jnp.stack([-sy, zero, cy])])
    rz = jnp.stack([jnp.stack([cz, -sz, zero]), jnp.stack([sz, cz, zero]),
                    jnp.stack([zero, zero, one])])
    return rz @ (ry @ rx)
