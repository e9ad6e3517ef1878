"""Orientation and confidence maps of a mic file, as one image (``nfjax plot``).

This module owns the inverse-pole-figure (IPF) colouring of orientations and the drawing of
a mic as coloured triangles. IPF-Z: the sample z axis expressed in the crystal frame
(``d = Uᵀ·ẑ`` with U the orientation matrix, crystal Cartesian → sample, MIDAS's crystal
frame with x ∥ a*), reduced by the Laue class (the proper rotations of
:func:`nfjax.crystal.symmetry_quaternions` plus the inversion) and coloured. Positions are
µm, Euler angles radians. It never changes a mic or writes anything but the image (PNG, or
the format its suffix names), which it writes atomically; matplotlib (the ``plot`` extra) is
imported only inside :func:`plot_mic`, with the Agg backend.

Colour keys:

* cubic m-3m: the standard triangle [001]-[101]-[111] (z ≥ x ≥ y ≥ 0), red at [001], green
  at [101], blue at [111];
* hexagonal 6/mmm: the triangle [0001]-[2-1-10]-[10-10], red at [0001], green at [2-1-10]
  (30° from x in MIDAS's frame, where a1 lies at −30°), blue at [10-10] (along x);
* inside a triangle the colour is the direction's barycentric weights on the three unit
  corner vectors (``d = a·v0 + b·v1 + c·v2``) divided by their largest, so corners are pure
  red, green and blue and the centre is white;
* every other Laue class: the symmetry-equivalent direction with the largest z is kept (ties:
  the smallest azimuth in [0, 2π)), and coloured in HSV with hue = ⅔·azimuth / W (W the
  class's azimuth sector: 360° for -1, 180° for 2/m, 120° for -3, 90° for mmm, 4/m and m-3,
  60° for -3m and 6/m, 45° for 4/mmm), saturation = polar angle / its largest value (90°,
  or 54.74° for m-3) and value 1: white at [001]. This rule can jump in colour across the
  sector edges that are not mirror lines.

MIDAS's symmetry tables carry 5-decimal constants (0.70711, 0.86603); for colouring they are
snapped to the exact values (√½, √3/2) so symmetry-equivalent orientations get the same
colour to ~1e-15 rather than ~1e-5.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np

from nfjax.errors import NfjaxError, check_fraction
from nfjax.io.atomic import atomic_write

__all__ = ["ipf_reduce", "ipf_color", "ipf_color_directions", "ipf_color_from_euler",
           "grain_boundaries", "grain_colors", "panels_ok", "mic_figure", "plot_mic", "PANELS",
           "FIGURE_SIZE_IN", "FIGURE_DPI"]

FIGURE_SIZE_IN = (15.0, 6.4)   # width, height in inches
FIGURE_DPI = 110               # -> 1650 x 704 pixels

_CUBIC_CORNERS = np.array([[0.0, 0.0, 1.0],
                           [1.0 / math.sqrt(2), 0.0, 1.0 / math.sqrt(2)],
                           [1.0 / math.sqrt(3), 1.0 / math.sqrt(3), 1.0 / math.sqrt(3)]])
_HEX_CORNERS = np.array([[0.0, 0.0, 1.0],
                         [math.sqrt(3) / 2, 0.5, 0.0],
                         [1.0, 0.0, 0.0]])
_CORNER_LABELS = {"cubic_high": ("001", "101", "111"),
                  "hexagonal_high": ("0001", "2-1-10", "10-10")}
# Generic classes: (azimuth sector width W in degrees, largest polar angle in degrees).
_GENERIC_SECTOR = {
    "triclinic": (360.0, 90.0),
    "monoclinic": (180.0, 90.0),
    "orthorhombic": (90.0, 90.0),
    "tetragonal_low": (90.0, 90.0),
    "tetragonal_high": (45.0, 90.0),
    "trigonal_low": (120.0, 90.0),
    "trigonal_type1": (60.0, 90.0),
    "trigonal_type2": (60.0, 90.0),
    "hexagonal_low": (60.0, 90.0),
    "cubic_low": (90.0, math.degrees(math.atan(math.sqrt(2.0)))),
}
_EXACT = np.array([0.0, 0.5, 1.0 / math.sqrt(2.0), math.sqrt(3.0) / 2.0, 1.0])
_TIE = 1e-9


def _laue_class(space_group: int) -> str:
    from nfjax.crystal import laue_class

    return laue_class(space_group)


def _exact_rotations(space_group: int) -> np.ndarray:
    """(S, 3, 3) proper rotations of the class with MIDAS's constants snapped to exact."""
    from nfjax.crystal import symmetry_quaternions

    q = symmetry_quaternions(space_group)
    mag = np.abs(q)
    snapped = _EXACT[np.argmin(np.abs(mag[..., None] - _EXACT), axis=-1)]
    q = np.sign(q) * snapped
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], axis=-2)


def _unit(d: np.ndarray) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] != 3:
        raise ValueError(f"directions must have shape (N, 3), not {d.shape}")
    n = np.linalg.norm(d, axis=1, keepdims=True)
    return d / np.where(n > 0, n, 1.0)


def _azimuth(d: np.ndarray) -> np.ndarray:
    phi = np.mod(np.arctan2(d[:, 1], d[:, 0]), 2 * math.pi)
    return np.where(phi > 2 * math.pi - _TIE, 0.0, phi)


def ipf_reduce(directions, space_group: int = 225) -> np.ndarray:
    """Crystal directions ``(N, 3)`` → their representatives in the class's standard sector.

    Cubic m-3m: sorted absolute values, z ≥ x ≥ y ≥ 0. Hexagonal 6/mmm: z ≥ 0 and azimuth
    in [0°, 30°]. Other classes: the equivalent (rotations and inversion) with the largest
    z, ties broken by the smallest azimuth. Returns unit vectors ``(N, 3)`` float64.
    """
    d = _unit(directions)
    cls = _laue_class(space_group)
    if cls == "cubic_high":
        a = np.sort(np.abs(d), axis=1)
        return np.stack([a[:, 1], a[:, 0], a[:, 2]], axis=1)
    if cls == "hexagonal_high":
        rho = np.hypot(d[:, 0], d[:, 1])
        phi = np.mod(np.arctan2(d[:, 1], d[:, 0]), math.pi / 3)
        phi = np.where(phi > math.pi / 6, math.pi / 3 - phi, phi)
        return np.stack([rho * np.cos(phi), rho * np.sin(phi), np.abs(d[:, 2])], axis=1)
    rots = _exact_rotations(space_group)
    ops = np.concatenate([rots, -rots])                         # Laue group: add inversion
    eq = np.einsum("kij,nj->nki", ops, d)                       # (N, K, 3)
    z = eq[..., 2]
    top = z >= z.max(axis=1, keepdims=True) - _TIE
    phi = np.where(top, _azimuth(eq.reshape(-1, 3)).reshape(z.shape), np.inf)
    pick = np.argmin(phi, axis=1)
    return eq[np.arange(d.shape[0]), pick]


def _triangle_rgb(d: np.ndarray, corners: np.ndarray) -> np.ndarray:
    w = np.linalg.solve(corners.T, d.T).T                       # barycentric weights
    w = np.clip(w, 0.0, None)
    return w / np.maximum(w.max(axis=1, keepdims=True), 1e-300)


def _hsv_to_rgb(h, s, v):
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack([v, t, p], -1), np.stack([q, v, p], -1),
                      np.stack([p, v, t], -1), np.stack([p, q, v], -1),
                      np.stack([t, p, v], -1), np.stack([v, p, q], -1)], axis=0)
    return table[i, np.arange(h.shape[0])]


def ipf_color(matrices, space_group: int = 225, sample_direction=(0.0, 0.0, 1.0)) -> np.ndarray:
    """IPF colours ``(N, 3)`` float64 RGB in [0, 1] of orientation matrices ``(N, 3, 3)``.

    The sample direction (default z) is taken into the crystal frame (``Uᵀ·v``), reduced
    with :func:`ipf_reduce` and coloured by the class's key (module docstring).
    """
    u = np.asarray(matrices, dtype=np.float64)
    if u.ndim != 3 or u.shape[1:] != (3, 3):
        raise ValueError(f"matrices must have shape (N, 3, 3), not {u.shape}")
    v = np.asarray(sample_direction, dtype=np.float64)
    v = v / np.linalg.norm(v)
    return ipf_color_directions(np.einsum("nji,j->ni", u, v), space_group)


def ipf_color_directions(directions, space_group: int = 225) -> np.ndarray:
    """IPF colours ``(N, 3)`` float64 RGB in [0, 1] of crystal-frame directions ``(N, 3)``."""
    d = ipf_reduce(directions, space_group)
    cls = _laue_class(space_group)
    if cls == "cubic_high":
        return _triangle_rgb(d, _CUBIC_CORNERS)
    if cls == "hexagonal_high":
        return _triangle_rgb(d, _HEX_CORNERS)
    width, polar_max = _GENERIC_SECTOR[cls]
    hue = (2.0 / 3.0) * np.clip(np.degrees(_azimuth(d)) / width, 0.0, 1.0)
    sat = np.clip(np.degrees(np.arccos(np.clip(d[:, 2], -1, 1))) / polar_max, 0.0, 1.0)
    return _hsv_to_rgb(hue, sat, np.ones_like(hue))


def ipf_color_from_euler(euler, space_group: int = 225) -> np.ndarray:
    """IPF-Z colours ``(N, 3)`` of Bunge ZXZ Euler angles ``(N, 3)`` in radians."""
    import jax.numpy as jnp

    from nfjax.orientation import euler_to_matrix

    mats = np.asarray(euler_to_matrix(jnp.asarray(np.asarray(euler, dtype=np.float64))))
    return ipf_color(mats, space_group)


def _tiling_up_down(xy: np.ndarray, up_down: np.ndarray, dist: np.ndarray,
                    idx: np.ndarray) -> np.ndarray:
    """±1 per voxel: apex up (+1) or down (−1) as the triangle tiling around it says.

    In a tiling of triangles with edge s, the edge-neighbours of an apex-up triangle sit
    s/√3 away at 270°, 30° and 150°; those of an apex-down one at 90°, 210° and 330°. The
    vote of the neighbours found decides; a voxel without any keeps its UpDown flag.
    (MIDAS's grids do need this: in the Au example every voxel with y > 0 carries the
    UpDown opposite to its place in the tiling.)
    """
    near = dist[:, 1:] < 1.15 * np.median(dist[:, 1])
    vec = xy[idx[:, 1:]] - xy[:, None, :]
    ang = np.degrees(np.arctan2(vec[..., 1], vec[..., 0])) % 360.0

    def votes(targets):
        hit = np.zeros(ang.shape, dtype=bool)
        for t in targets:
            hit |= np.abs((ang - t + 180.0) % 360.0 - 180.0) < 15.0
        return (hit & near).sum(axis=1)

    up, down = votes((270.0, 30.0, 150.0)), votes((90.0, 210.0, 330.0))
    return np.where(up > down, 1.0, np.where(down > up, -1.0, np.where(up_down >= 0, 1.0, -1.0)))


def _voxel_triangles(records: np.ndarray) -> tuple[np.ndarray, float]:
    """``(N, 3, 2)`` triangles to draw, and the edge used (µm).

    Vertices come from X, Y, TriEdgeSize and UpDown as simulateNF rebuilds MIDAS's probe
    triangles (:func:`nfjax.simulate.mic_grid_rows`, :func:`nfjax.grid.triangle_vertices`),
    with two changes so the map tiles the sample: when EdgeLength ≪ GridSize the probe
    triangles are sparse dots, so each is drawn with the grid's own edge, √3 × the median
    nearest-centroid distance (centroids of edge-sharing triangles of edge s are s/√3
    apart), never smaller than TriEdgeSize; and each triangle points the way its
    neighbours say (:func:`_tiling_up_down`).
    """
    from scipy.spatial import cKDTree

    from nfjax.grid import triangle_vertices
    from nfjax.simulate import mic_grid_rows

    rec = np.array(records, dtype=np.float64)
    edge = float(np.median(rec[:, 5])) if rec.shape[0] else 1.0
    if rec.shape[0] > 3:
        xy = rec[:, 3:5]
        dist, idx = cKDTree(xy).query(xy, k=4)
        pitch_edge = math.sqrt(3.0) * float(np.median(dist[:, 1]))
        if pitch_edge > 0:
            edge = max(edge, pitch_edge)
            rec[:, 6] = _tiling_up_down(xy, rec[:, 6], dist, idx)
    rec[:, 5] = edge
    return triangle_vertices(mic_grid_rows(rec)), edge


def grain_boundaries(records: np.ndarray, edge: float, space_group: int = 225,
                     max_angle_deg: float = 5.0) -> np.ndarray:
    """Boundary segments ``(M, 2, 2)`` µm between edge-neighbouring voxels of ``records``
    misoriented by more than ``max_angle_deg`` (crystal symmetry of ``space_group``).

    Voxels are the triangles of edge ``edge`` tiling the map (as drawn): the centroids of
    two edge-sharing triangles are ``edge/√3`` apart (the next neighbours ``edge``), and
    their shared edge is the segment of length ``edge`` through the midpoint,
    perpendicular to the line joining them.
    """
    import jax.numpy as jnp
    from scipy.spatial import cKDTree

    from nfjax.crystal import symmetry_quaternions
    from nfjax.orientation import euler_to_quat, misorientation

    rec = np.asarray(records, np.float64)
    if rec.shape[0] < 2:
        return np.zeros((0, 2, 2))
    xy = rec[:, 3:5]
    pairs = cKDTree(xy).query_pairs(0.8 * float(edge), output_type="ndarray")
    # Voxels at the same position (a duplicated row) share no edge.
    pairs = pairs[(xy[pairs[:, 0]] != xy[pairs[:, 1]]).any(axis=1)]
    if pairs.size == 0:
        return np.zeros((0, 2, 2))
    q = euler_to_quat(jnp.asarray(rec[:, 7:10]))
    ang = np.degrees(np.asarray(misorientation(q[pairs[:, 0]], q[pairs[:, 1]],
                                               jnp.asarray(symmetry_quaternions(space_group)))))
    pairs = pairs[ang > float(max_angle_deg)]
    a, b = xy[pairs[:, 0]], xy[pairs[:, 1]]
    mid = 0.5 * (a + b)
    d = b - a
    perp = np.stack([-d[:, 1], d[:, 0]], axis=1) / np.linalg.norm(d, axis=1, keepdims=True)
    half = 0.5 * float(edge) * perp
    return np.stack([mid - half, mid + half], axis=1)


def _draw_key(ax, space_group: int) -> None:
    """The colour key: the standard triangle (stereographic) for m-3m / 6/mmm, otherwise the
    sector of the generic HSV rule, with corner labels."""
    cls = _laue_class(space_group)
    n = 220
    if cls in _CORNER_LABELS:
        corners = _CUBIC_CORNERS if cls == "cubic_high" else _HEX_CORNERS
        proj = corners[:, :2] / (1.0 + corners[:, 2:3])
        lo, hi = proj.min(axis=0), proj.max(axis=0)
    else:
        width, polar_max = _GENERIC_SECTOR[cls]
        rmax = math.tan(math.radians(polar_max) / 2)
        arc = np.radians(np.linspace(0.0, width, 91))
        edge = np.concatenate([[[0.0, 0.0]], rmax * np.stack([np.cos(arc), np.sin(arc)], 1)])
        lo, hi = edge.min(axis=0), edge.max(axis=0)
    pad = 0.06 * (hi - lo).max()
    xs = np.linspace(lo[0] - pad, hi[0] + pad, n)
    ys = np.linspace(lo[1] - pad, hi[1] + pad, n)
    px, py = np.meshgrid(xs, ys)
    r2 = px ** 2 + py ** 2
    d = np.stack([2 * px, 2 * py, 1 - r2], axis=-1).reshape(-1, 3) / (1 + r2).reshape(-1, 1)
    red = ipf_reduce(d, space_group)
    inside = np.abs(red - d).max(axis=1) < 1e-9
    img = np.zeros((d.shape[0], 4))
    if inside.any():
        img[inside, :3] = ipf_color_directions(d[inside], space_group)
        img[inside, 3] = 1.0
    ax.imshow(img.reshape(n, n, 4), origin="lower",
              extent=(xs[0], xs[-1], ys[0], ys[-1]), interpolation="bilinear")
    if cls in _CORNER_LABELS:
        labels = _CORNER_LABELS[cls]
        for (x, y), text, ha, va in zip(proj, labels, ("right", "left", "left"),
                                        ("top", "top", "bottom")):
            ax.annotate(f"[{text}]", (x, y), fontsize=9, ha=ha, va=va,
                        xytext=(-3 if ha == "right" else 3, -3 if va == "top" else 3),
                        textcoords="offset points")
        ax.set_title("IPF-Z key", fontsize=10)
    else:
        ax.annotate("[001]", (0.0, 0.0), fontsize=9, ha="right", va="top",
                    xytext=(-3, -3), textcoords="offset points")
        ax.set_title(f"IPF-Z key ({cls.replace('_', ' ')}, HSV)", fontsize=9)
    span = xs[-1] - xs[0]
    ax.set_xlim(xs[0] - 0.3 * span, xs[-1] + 0.45 * span)   # room for the corner labels
    ax.set_ylim(ys[0] - pad, ys[-1] + 2 * pad)
    ax.set_aspect("equal")
    ax.set_anchor("W")        # leave the right of the column to the corner labels
    ax.axis("off")


PANELS = ("confidence", "kam", "grains", "grod")
_PANEL_TITLES = {"confidence": "Confidence", "kam": "Kernel average misorientation (KAM)",
                 "grains": "Grains", "grod": "Grain reference orientation deviation (GROD)"}


PANELS_EXPECTED = ("one or more of " + ", ".join(PANELS)
                   + ", separated by commas and each at most once")


def panels_ok(names) -> bool:
    """True when ``names`` are one or more of :data:`PANELS`, none repeated."""
    names = tuple(names)
    return bool(names) and set(names) <= set(PANELS) and len(set(names)) == len(names)


def grain_colors(labels) -> np.ndarray:
    """RGB ``(..., 3)`` for grain labels 1, 2, …: hues a golden-ratio step apart (labels
    close in number, which in raster order are often neighbours, get distinct colours),
    saturation and value alternating between two levels; label 0 gets the map's
    background grey."""
    labels = np.asarray(labels, dtype=np.int64)
    lab = labels.ravel()
    hue = (lab * 0.6180339887498949) % 1.0
    sat = np.where(lab % 2 == 0, 0.55, 0.85)
    val = np.where(lab % 3 == 0, 0.75, 0.95)
    rgb = _hsv_to_rgb(hue, sat, val)
    rgb[lab <= 0] = 0.85
    return rgb.reshape(labels.shape + (3,))


def _panel_maps(mic, space_group: int, min_confidence: float, gb_angle: float):
    """The pixel maps (:func:`nfjax.maps.pixel_maps`) of the voxels of ``mic`` at or above
    ``min_confidence``, as ParseMic would build them from those voxels alone."""
    from nfjax.maps import pixel_maps

    rec = np.array(mic.records, dtype=np.float64)
    rec[rec[:, 10] < float(min_confidence), 10] = 0.0
    maps = pixel_maps(rec, mic.map_edge, space_group=space_group, gb_angle=gb_angle)
    if maps is None:
        raise NfjaxError(f"{mic.path or 'mic'}: no voxel has a confidence >= "
                         f"{min_confidence:g}: the KAM, grain and GROD panels would be empty")
    return maps


def _pixel_extent(maps) -> tuple[float, float, float, float]:
    """imshow's extent of a map: pixel ``i`` is the 1 µm pixel centred on the integer
    position ``ceil(min_x) + i`` (ParseMic's index is ``trunc(p - min_x)``)."""
    x0, y0 = math.ceil(maps.min_x) - 0.5, math.ceil(maps.min_y) - 0.5
    return (x0, x0 + maps.x_size, y0, y0 + maps.y_size)


def _draw_panel(fig, ax, ax_bar, name: str, tris, conf, maps) -> str:
    """Draw one right-hand panel; returns its title."""
    from matplotlib.collections import PolyCollection

    if name == "confidence":
        coll = PolyCollection(tris, array=conf, cmap="viridis", edgecolors="face",
                              linewidths=0.3)
        coll.set_clim(0.0, max(1.0, float(conf.max())))
        ax.add_collection(coll)
        fig.colorbar(coll, cax=ax_bar).set_label("confidence (fraction of spots matched)")
        return _PANEL_TITLES[name]
    extent = _pixel_extent(maps)
    hit = maps.owner >= 0
    if name == "grains":
        img = np.zeros(maps.grain_id.shape + (4,))
        img[..., :3] = grain_colors(maps.grain_id)
        img[..., 3] = hit
        ax.imshow(img, origin="lower", extent=extent, interpolation="nearest")
        ax_bar.axis("off")
        return (f"{maps.n_grains} grain{'s' if maps.n_grains != 1 else ''} "
                f"(neighbours within {maps.gb_angle:g}°)")
    values = np.degrees(maps.kam if name == "kam" else maps.grod)
    shown = ax.imshow(np.ma.masked_array(values, ~hit), origin="lower", extent=extent,
                      interpolation="nearest", vmin=0.0, vmax=maps.gb_angle,
                      cmap="inferno" if name == "kam" else "plasma")
    what = ("mean misorientation to the 8 neighbouring pixels" if name == "kam" else
            "misorientation to the grain's reference pixel")
    fig.colorbar(shown, cax=ax_bar, extend="max").set_label(f"{what} (°)")
    return _PANEL_TITLES[name]


def _require_matplotlib():
    """The matplotlib module, or the one-line error naming the ``plot`` extra."""
    try:
        import matplotlib
    except ImportError:
        raise NfjaxError("nfjax plot needs matplotlib: pip install 'nfjax[plot]'") from None
    return matplotlib


def mic_figure(mic, space_group: int = 225, *, min_confidence: float = 0.0,
               boundary_deg: float | None = 5.0, panels=("confidence",)):
    """The figure :func:`plot_mic` saves, as a matplotlib ``Figure`` (for a notebook or
    further drawing). ``mic`` is a mic file's path or a :class:`nfjax.io.mic.MicData`;
    ``panels`` a sequence of names or one comma-separated string; the other arguments are
    :func:`plot_mic`'s."""
    check_fraction(min_confidence, "--min-confidence")
    if boundary_deg is not None and not (math.isfinite(boundary_deg) and boundary_deg >= 0):
        raise NfjaxError(f"--boundaries: expected a misorientation >= 0 degrees (0: no "
                         f"lines), found {boundary_deg!r}")
    panels = tuple(panels.split(",") if isinstance(panels, str) else panels)
    if not panels_ok(panels):
        raise NfjaxError(f"--panels: expected {PANELS_EXPECTED}, found "
                         f"{','.join(map(str, panels))!r}")
    _require_matplotlib()
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    from nfjax.io.mic import MicData, read_mic

    if not isinstance(mic, MicData):
        mic = read_mic(mic)
    name = Path(mic.path).name if mic.path else "mic"
    rec = mic.records[mic.valid]
    if rec.shape[0] == 0:
        raise NfjaxError(f"{mic.path or 'mic'}: no voxels with non-zero confidence to plot")
    maps = None
    if any(name != "confidence" for name in panels):
        maps = _panel_maps(mic, space_group, min_confidence, boundary_deg or 5.0)
    tris, edge = _voxel_triangles(rec)
    colors = ipf_color_from_euler(rec[:, 7:10], space_group)
    conf = rec[:, 10]
    trusted = conf >= float(min_confidence)
    colors[~trusted] = 0.6
    segments = (grain_boundaries(rec[trusted], edge, space_group, boundary_deg)
                if boundary_deg else np.zeros((0, 2, 2)))

    # Columns: orientation map, key, then (map, colour bar) per panel, with a spacer column
    # before each further panel (room for the colour bar's label and the next y axis). With
    # one panel this is the 15 in figure; further panels keep its column unit and gap.
    n = len(panels)
    ratios = [1.0, 0.42, 1.0, 0.035] + [0.1, 1.0, 0.035] * (n - 1)
    left_in, right_in = 0.05 * FIGURE_SIZE_IN[0], 0.06 * FIGURE_SIZE_IN[0]
    cols_in = (FIGURE_SIZE_IN[0] - left_in - right_in) / (1.0 + 3 * 0.2 / 4)
    unit_in, gap_in = cols_in / 2.455, 0.2 * cols_in / 4
    cols_in = unit_in * sum(ratios)
    width = left_in + cols_in + gap_in * (len(ratios) - 1) + right_in
    fig = Figure(figsize=(width, FIGURE_SIZE_IN[1]), dpi=FIGURE_DPI)
    grid = fig.add_gridspec(1, len(ratios), width_ratios=ratios,
                            wspace=gap_in * len(ratios) / cols_in, left=left_in / width,
                            right=1.0 - right_in / width, bottom=0.1, top=0.88)
    ax_map = fig.add_subplot(grid[0, 0])
    ax_key = fig.add_subplot(grid[0, 1])
    ax_panels = [(fig.add_subplot(grid[0, 2 + 3 * i]), fig.add_subplot(grid[0, 3 + 3 * i]))
                 for i in range(n)]
    lo = tris.reshape(-1, 2).min(axis=0)
    hi = tris.reshape(-1, 2).max(axis=0)
    margin = 0.03 * (hi - lo).max()
    for ax in [ax_map] + [a for a, _ in ax_panels]:
        ax.set_xlim(lo[0] - margin, hi[0] + margin)
        ax.set_ylim(lo[1] - margin, hi[1] + margin)
        ax.set_aspect("equal")
        ax.set_xlabel("X (µm)")
        ax.set_ylabel("Y (µm)")
        ax.set_facecolor("0.85")
    ax_map.add_collection(PolyCollection(tris, facecolors=colors, edgecolors=colors,
                                         linewidths=0.3))
    if len(segments):
        from matplotlib.collections import LineCollection

        ax_map.add_collection(LineCollection(segments, colors="k", linewidths=0.8))
    title = f"IPF-Z orientation map (space group {int(space_group)})"
    notes = []
    if min_confidence > 0:
        notes.append(f"grey: confidence < {min_confidence:g}")
    if boundary_deg:
        notes.append(f"lines: > {boundary_deg:g}° boundaries")
    ax_map.set_title(title + ("\n" + "; ".join(notes) if notes else ""), fontsize=11)
    for panel, (ax, ax_bar) in zip(panels, ax_panels):
        ax.set_title(_draw_panel(fig, ax, ax_bar, panel, tris, conf, maps),
                     fontsize=11 if panel == "confidence" else 10)
    _draw_key(ax_key, space_group)
    fig.suptitle(f"{name}: {rec.shape[0]} voxels, drawn as triangles of edge {edge:.3g} µm",
                 fontsize=12)
    return fig


def plot_mic(mic_path: str | os.PathLike, out_png: str | os.PathLike,
             space_group: int = 225, *, min_confidence: float = 0.0,
             boundary_deg: float | None = 5.0, panels=("confidence",)) -> Path:
    """Draw ``mic_path`` as an image: the IPF-Z orientation map with its colour key, then
    one map per name in ``panels`` (:data:`PANELS`), each with its colour bar, axes in µm.
    An ``out_png`` ending in another suffix matplotlib writes (``.jpg``, ``.svg``, ``.pdf``,
    ...) gets that format.

    Voxels with zero confidence (holes) are left out. In the orientation map, voxels below
    ``min_confidence`` are drawn grey (their orientation is not trusted), and black lines
    mark the grain boundaries: edges between confident neighbours misoriented by more than
    ``boundary_deg`` (None or 0: no lines; see :func:`grain_boundaries`).

    Panels: ``confidence``, the voxels' confidence; ``kam``, ``grains`` and ``grod``, the
    pixel maps MIDAS's ParseMic writes (``.map.kam``, ``.map.grainId``, ``.map.grod``;
    :func:`nfjax.maps.pixel_maps`), drawn on their 1 µm pixels and built from the voxels at
    or above ``min_confidence``, with ``boundary_deg`` as the grain boundary angle (5° when
    it is None or 0). KAM and GROD are coloured from 0 to that angle. With one panel the
    figure is :data:`FIGURE_SIZE_IN` at :data:`FIGURE_DPI` (1650 × 704 px); each further
    panel widens it. Returns ``Path(out_png)``.
    """
    _require_matplotlib().use("Agg", force=False)
    from matplotlib.backend_bases import FigureCanvasBase

    out = Path(out_png)
    fmt = out.suffix[1:].lower() or "png"
    # pgf is left out: matplotlib needs a LaTeX installation to write it.
    formats = {f for f in FigureCanvasBase.get_supported_filetypes() if f != "pgf"}
    if fmt not in formats:
        raise NfjaxError(f"{out}: cannot write a '.{fmt}' image; expected a file name ending "
                         f"in one of {', '.join('.' + f for f in sorted(formats))}")
    fig = mic_figure(mic_path, space_group, min_confidence=min_confidence,
                     boundary_deg=boundary_deg, panels=panels)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=FIGURE_DPI)
    with atomic_write(out, "wb") as fh:
        fh.write(buf.getvalue())
    return out
