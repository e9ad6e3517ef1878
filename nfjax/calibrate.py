"""Detector calibration from voxels of known orientation (``nfjax calibrate``).

The job of MIDAS's ``FitOrientationParametersMultiPoint`` (reference §7.5): given the
processed images (SpotsInfo.bin) and a few voxels whose orientations are roughly known
(the parameter file's ``GridPoints`` lines, or the most confident voxels of a
reconstruction), fit the detector geometry — the tilts, each distance's Lsd and beam
centre — together with the voxels' Euler angles, so that the predicted spots land on the
observed ones. The variables and their bounds are MIDAS's:

* ``tx ty tz`` within ``±TiltsTol`` degrees of the start;
* ``Lsd`` of the first distance within ``±LsdTol`` µm, and each later distance's step
  ``Lsd[i] − Lsd[i−1]`` within ``±LsdRelativeTol`` µm of the start's;
* each distance's beam centre within ``±BCTol`` pixels (y, z);
* each voxel's orientation within ``±OrientTol`` degrees of its start, as a rotation
  vector about it (MIDAS bounds each Euler angle; near Φ = 0 that box is a narrow ridge).

A tolerance that is absent or 0 holds its parameters fixed. The objective is the mean over
the voxels of MIDAS's overlap fraction, with probe triangles of ``EdgeLength`` (or
``GridSize``) as the fitter scores them, so the calibrated geometry is the one under
which ``nfjax fit`` finds these voxels best. (MIDAS builds the triangles from ``GridSize``.)

How, differently from MIDAS (Nelder–Mead and CRS2 global searches on the pixel-count
fraction, minutes per run): two passes.

1. **Gradient pass.** optax Adam on the smooth overlap (:func:`nfjax.score.soft_overlap`)
   through the differentiable forward model, every variable bounded as ``start + tol ·
   tanh(z)``; first with spots splatted 3 pixels wide (a wide basin), then 1.5. It moves a
   start 30 µm and half a pixel off to within a few µm and about a quarter of a pixel.
2. **Pattern pass on the hard fraction.** The smooth score is nearly flat in a beam centre
   over ±0.3 px where MIDAS's fraction falls by 3 %, so the last stretch is a compass
   search on the fraction itself: each round tries every geometry parameter ± its step,
   scores each trial with the voxels' orientations re-fitted to it (a few compass steps
   per voxel; a geometry error is partly absorbed by the orientations), all trials in one
   batched call, and takes the best that raises the mean fraction; a parameter neither of
   whose moves raises it halves its step, down to 0.05 µm, 0.005 px and 5e-4°.

Bounds are kept in both passes. The result reports the mean fraction at the start and at
the end, and writes the calibrated parameter file with every ``Lsd``, ``BC``, ``tx``,
``ty`` and ``tz`` line rewritten (:func:`nfjax.params.update_param_text`).

3. **Whole map** (``--whole-map``, :func:`calibrate_whole_map`; optional, MIDAS has none).
   Every voxel of a reconstruction is rendered as its grid triangle at its fixed
   orientation, and a compass search moves the geometry to maximise the intersection over
   union of the predicted and observed lit pixels. It sees a grain's spot edges, and with
   them the horizontal beam centre that the per-voxel fraction cannot see (below).

Limit (MIDAS's objective shares it): on a solid sample a voxel inside a grain predicts its
spots inside the grain's spot, which is wide along detector y, so the horizontal beam
centre is barely determined by such voxels: the fraction reaches 1.0 with ``BC`` y half a
pixel off (``benchmarks/bench_calibrate.py --solid``). Voxels at grain boundaries and at
the sample's edge constrain it, and so does the whole-map stage (0.44 / 0.54 px →
0.010 / 0.074 px, ``bench_calibrate.py --whole-map``); docs/midas-differences.md,
"Calibration".
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nfjax.errors import NfjaxError
from nfjax.geometry import Geometry

__all__ = ["CalibrationResult", "WholeMapResult", "calibration_points", "calibrate",
           "calibrate_whole_map", "calibrated_changes", "run_calibrate"]

# Compass steps: (first, smallest) per kind of variable.
_STEPS = {"lsd": (2.0, 0.05), "bc": (0.2, 0.005), "tilt": (0.02, 5e-4),
          "rot": (math.radians(0.02), math.radians(5e-4))}
# Gradient pass: (splat sigma px, Adam learning rate in tanh units, share of the steps).
_SOFT_STAGES = ((3.0, 0.05, 0.5), (1.5, 0.02, 0.5))
_INNER = 4           # orientation compass steps per geometry trial
_PASS_GAIN = 1e-4    # whole map: another compass pass only after one that gained this IoU


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """A calibration's outcome.

    Attributes:
      start, geometry: the geometry before and after.
      euler0, euler: ``(P, 3)`` rad, the voxels' Euler angles before and after.
      start_fraction, fraction: ``(P,)`` MIDAS's overlap fraction of each voxel before
        and after.
      soft_steps, rounds: Adam steps and compass rounds run.
      seconds: wall time.
    """

    start: Geometry
    geometry: Geometry
    euler0: np.ndarray
    euler: np.ndarray
    start_fraction: np.ndarray
    fraction: np.ndarray
    soft_steps: int
    rounds: int
    seconds: float

    def lines(self) -> list[str]:
        """Human lines: each fitted quantity before -> after, and the mean fraction."""
        out = _geometry_lines(self.start, self.geometry)
        moved = np.degrees(np.abs(self.euler - self.euler0)).max(axis=1)
        out.append(f"{len(self.fraction)} voxels: mean overlap fraction "
                   f"{self.start_fraction.mean():.4f} -> {self.fraction.mean():.4f} "
                   f"(lowest {self.fraction.min():.4f}); orientations moved up to "
                   f"{moved.max():.3f} deg")
        out.append(f"{self.soft_steps} gradient steps, {self.rounds} compass rounds, "
                   f"{self.seconds:.1f} s")
        return out


# --------------------------------------------------------------------------- inputs
def calibration_points(params, mic=None, n_points: int = 32) -> np.ndarray:
    """``(P, 11)`` mic records of the voxels to calibrate on: the ``n_points`` most
    confident voxels of ``mic`` (a :class:`nfjax.io.mic.MicData`; ties in record order)
    when given, else the parameter file's ``GridPoints`` rows (their first 11 columns are
    a binary mic record: X, Y in columns 3, 4, UpDown in 6, Euler angles in 7–9)."""
    if mic is not None:
        rec = np.asarray(mic.records, np.float64)
        rec = rec[rec[:, 10] > 0]
        if rec.shape[0] == 0:
            raise NfjaxError(f"{mic.path or 'mic'}: no voxel has a nonzero confidence: "
                             "nothing to calibrate on")
        order = np.argsort(-rec[:, 10], kind="stable")
        return rec[order[:max(1, int(n_points))]]
    from nfjax.io.mic import check_euler_radians

    rows = np.asarray(params.grid_points or (), np.float64).reshape(-1, 12)
    if rows.shape[0] == 0:
        raise NfjaxError(f"{params.source}: no GridPoints lines: give --mic MIC (a "
                         "reconstruction) to calibrate on its most confident voxels")
    check_euler_radians(rows[:, 7:10], lambda i: f"{params.source}: GridPoints line {i + 1}")
    return rows[:, :11]


def _tolerances(params, n_dist: int) -> dict:
    """Half-widths of the variables' boxes (0 holds a variable fixed)."""
    bc = params.bc_tol or (0.0, 0.0)
    tol = {"lsd0": float(params.lsd_tol or 0.0),
           "dlsd": float(params.lsd_relative_tol or 0.0) if n_dist > 1 else 0.0,
           "ybc": float(bc[0]), "zbc": float(bc[1]), "tilts": float(params.tilts_tol or 0.0)}
    if not any(tol.values()):
        raise NfjaxError(f"{params.source}: LsdTol, LsdRelativeTol, BCTol and TiltsTol are "
                         "all absent or 0: there is nothing to calibrate (set the ones to "
                         "fit, e.g. 'LsdTol 100', 'BCTol 1 1', 'TiltsTol 0.5')")
    return tol


# --------------------------------------------------------------------------- geometry maps
def _geometry_from(start: Geometry, lsd, ybc, zbc, tilts) -> Geometry:
    return dataclasses.replace(start, lsd=lsd, ybc=ybc, zbc=zbc, tilts=tilts)


def _soft_geometry(start: Geometry, tol: dict, z: dict) -> Geometry:
    """The geometry of the bounded variables ``z`` (tanh units)."""
    lsd0 = start.lsd
    steps = jnp.diff(lsd0)
    first = lsd0[0] + tol["lsd0"] * jnp.tanh(z["lsd"][0])
    rest = steps + tol["dlsd"] * jnp.tanh(z["lsd"][1:])
    lsd = jnp.concatenate([first[None], first + jnp.cumsum(rest)])
    return _geometry_from(start, lsd, start.ybc + tol["ybc"] * jnp.tanh(z["ybc"]),
                          start.zbc + tol["zbc"] * jnp.tanh(z["zbc"]),
                          start.tilts + tol["tilts"] * jnp.tanh(z["tilts"]))


def _vector(geom: Geometry) -> np.ndarray:
    """The geometry's variables as one vector ``[Lsd (D), ybc (D), zbc (D), tilts (3)]``."""
    return np.concatenate([np.asarray(geom.lsd), np.asarray(geom.ybc),
                           np.asarray(geom.zbc), np.asarray(geom.tilts)]).astype(np.float64)


def _from_vector(start: Geometry, x) -> Geometry:
    d = start.n_distances
    return _geometry_from(start, x[:d], x[d:2 * d], x[2 * d:3 * d], x[3 * d:3 * d + 3])


def _feasible(x: np.ndarray, x0: np.ndarray, d: int, tol: dict) -> np.ndarray:
    """Whether each row of ``x (M, n)`` keeps every MIDAS bound about ``x0``."""
    eps = 1e-9
    ok = np.abs(x[:, 0] - x0[0]) <= tol["lsd0"] + eps
    if d > 1:
        ok &= (np.abs(np.diff(x[:, :d], axis=1) - np.diff(x0[:d])) <= tol["dlsd"] + eps).all(1)
    ok &= (np.abs(x[:, d:2 * d] - x0[d:2 * d]) <= tol["ybc"] + eps).all(1)
    ok &= (np.abs(x[:, 2 * d:3 * d] - x0[2 * d:3 * d]) <= tol["zbc"] + eps).all(1)
    ok &= (np.abs(x[:, 3 * d:] - x0[3 * d:]) <= tol["tilts"] + eps).all(1)
    return ok


def _compass_steps(d: int) -> tuple[np.ndarray, np.ndarray]:
    """First and smallest compass steps of each entry of the geometry vector."""
    kinds = ["lsd"] * d + ["bc"] * (2 * d) + ["tilt"] * 3
    return (np.array([_STEPS[k][0] for k in kinds]),
            np.array([_STEPS[k][1] for k in kinds]))


def _movable(x0: np.ndarray, d: int, tol: dict, floor: np.ndarray) -> np.ndarray:
    """Which entries of the geometry vector the bounds let move at all (by ``floor``)."""
    eye = np.eye(x0.size)
    return (_feasible(x0[None] + eye * floor, x0, d, tol)
            & _feasible(x0[None] - eye * floor, x0, d, tol))


def _moves(x: np.ndarray, idx: np.ndarray, step: np.ndarray) -> np.ndarray:
    """The compass trials about ``x``: entries ``idx`` each up, then each down, by their
    ``step``; ``(2·len(idx), n)``."""
    delta = np.eye(x.size)[idx] * step[idx, None]
    return np.concatenate([x[None] + delta, x[None] - delta])


def _geometry_lines(start: Geometry, geometry: Geometry, prefix: str = "") -> list[str]:
    """Human lines: each distance's Lsd and beam centre, and the tilts, before -> after."""
    out = []
    for i in range(start.n_distances):
        out.append(f"{prefix}distance {i}: Lsd {float(start.lsd[i]):.3f} -> "
                   f"{float(geometry.lsd[i]):.3f} um, BC "
                   f"({float(start.ybc[i]):.4f}, {float(start.zbc[i]):.4f}) -> "
                   f"({float(geometry.ybc[i]):.4f}, {float(geometry.zbc[i]):.4f}) px")
    t0, t1 = np.asarray(start.tilts), np.asarray(geometry.tilts)
    out.append(f"{prefix}tilts (tx, ty, tz) (" + ", ".join(f"{v:.5f}" for v in t0)
               + ") -> (" + ", ".join(f"{v:.5f}" for v in t1) + ") deg")
    return out


# --------------------------------------------------------------------------- calibration
def calibrate(params, obs, points: np.ndarray, hkls=None, *, steps: int = 300,
              max_rounds: int = 200, log=None) -> CalibrationResult:
    """Fit the detector geometry of ``params`` and the Euler angles of ``points`` (``(P,
    11)`` mic records, :func:`calibration_points`) to the observations ``obs`` (an
    :class:`nfjax.observe.ObsVolume`). ``hkls`` is the reflection table (default: from
    ``params``, ``RingsToUse`` applied). ``steps`` Adam steps in all (0: no gradient
    pass), then up to ``max_rounds`` compass rounds. ``log(line)`` gets a progress line
    per stage. See the module notes.
    """
    import optax

    from nfjax import observe
    from nfjax.crystal import reflections
    from nfjax.forward import footprint_box
    from nfjax.geometry import geometry_from_params
    from nfjax.grid import triangle_vertices
    from nfjax.orientation import euler_to_matrix_midas, matrix_to_euler, rotvec_matrix
    from nfjax.score import hard_overlap, soft_overlap
    from nfjax.simulate import mic_grid_rows

    t_start = time.perf_counter()
    say = log or (lambda line: None)

    def log(line):
        say(f"{line} ({time.perf_counter() - t_start:.1f} s)")

    params.require("OrientTol", why="by nfjax calibrate (the orientations' bound)")
    start = geometry_from_params(params)
    d = start.n_distances
    tol = _tolerances(params, d)
    orient_tol = math.radians(float(params.orient_tol))
    if obs.shape != start.shape:
        raise NfjaxError(f"the observations are {obs.shape} (distances, frames, y, z) where "
                         f"{params.source} describes {start.shape}")
    pts = np.asarray(points, np.float64)
    if pts.ndim != 2 or pts.shape[0] == 0 or pts.shape[1] < 11:
        raise NfjaxError(f"expected (P, 11) voxel records to calibrate on, found shape "
                         f"{pts.shape}")
    if not np.isfinite(pts[:, [3, 4, 7, 8, 9]]).all():
        raise NfjaxError("a calibration voxel has a non-finite X, Y or Euler angle")
    table = reflections(params, hkls)
    g, theta = jnp.asarray(table.g), jnp.asarray(table.theta)
    edge = float(params.edge_length_effective)
    rows = pts.copy()
    rows[:, 5] = edge
    verts = jnp.asarray(triangle_vertices(mic_grid_rows(rows)))
    box = footprint_box(edge, float(start.px))
    euler0 = pts[:, 7:10].copy()
    u0 = euler_to_matrix_midas(jnp.asarray(euler0))
    n_pts = len(pts)
    words, shape = observe.device_words(obs.words), obs.shape   # one transfer

    def turned(rot, mats):
        """``R(rot_p)·U_p`` for rotation vectors ``rot (M, 3)`` and matrices ``(M, 3, 3)``."""
        return jax.vmap(lambda r, u: rotvec_matrix(r) @ u)(rot, mats)

    def hard(geom, mats, tri, words):
        """The hard fraction of each triangle ``tri (M, 3, 2)`` at orientation ``mats``."""
        return jax.vmap(lambda vv, u: hard_overlap(vv, u, g, theta, geom, words, shape,
                                                   box=box))(tri, mats)

    def fractions(geom, rot, words):
        """Each voxel's hard fraction at orientations ``R(rot_p)·U0_p``."""
        return hard(geom, turned(rot, u0), verts, words)

    frac_fn = jax.jit(fractions)
    rot = np.zeros((n_pts, 3))
    start_fraction = np.array(frac_fn(start, jnp.asarray(rot), words))
    log(f"{n_pts} voxels, {d} distance(s): mean overlap fraction at the start "
        f"{start_fraction.mean():.4f}")

    # 1. Gradient pass on the smooth overlap.
    z = {"lsd": jnp.zeros(d), "ybc": jnp.zeros(d), "zbc": jnp.zeros(d),
         "tilts": jnp.zeros(3), "rot": jnp.zeros((n_pts, 3))}

    def loss(z, words, sigma):
        geom = _soft_geometry(start, tol, z)
        mats = turned(orient_tol * jnp.tanh(z["rot"]), u0)
        per = jax.vmap(lambda vv, u: soft_overlap(vv, u, g, theta, geom, words, shape,
                                                  sigma=sigma))(verts, mats)
        return -jnp.mean(per)

    grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=2)
    done = 0
    for sigma, lr, share in _SOFT_STAGES:
        n = int(round(steps * share))
        opt = optax.adam(lr)
        state = opt.init(z)
        for _ in range(n):
            value, grad = grad_fn(z, words, sigma)
            updates, state = opt.update(grad, state, z)
            z = optax.apply_updates(z, updates)
        done += n
        if n:
            log(f"gradient pass, spots {sigma:g} px wide: {n} steps, smooth overlap "
                f"{-float(value):.4f}")
    x0 = _vector(start)
    x = _vector(_soft_geometry(start, tol, z))
    rot = np.array(orient_tol * jnp.tanh(z["rot"]))
    frac = np.array(frac_fn(_from_vector(start, jnp.asarray(x)), jnp.asarray(rot), words))
    if frac.mean() < start_fraction.mean():
        # The smooth optimum is worse on the hard fraction: the compass starts at the start.
        x, rot, frac = x0.copy(), np.zeros((n_pts, 3)), start_fraction.copy()
    log(f"after the gradient pass: mean overlap fraction {frac.mean():.4f}")

    # 2. Compass search on the hard fraction, each geometry trial scored with the voxels'
    # orientations re-fitted to it (a few compass steps per voxel): a geometry error is
    # partly absorbed by the orientations, so a geometry move judged at fixed
    # orientations is rarely better.
    step, floor = _compass_steps(d)
    free = _movable(x0, d, tol, floor)
    r_step, r_floor = _STEPS["rot"]
    moves6 = jnp.concatenate([jnp.eye(3), -jnp.eye(3)])
    verts6 = jnp.repeat(verts, 6, axis=0)
    u06 = jnp.repeat(u0, 6, axis=0)

    def refit(geom, rot, f, r_cur, words):
        """_INNER compass steps of every voxel's rotation vector at ``geom``."""
        def body(_, carry):
            rot, f, s = carry
            trial = rot[:, None, :] + moves6[None] * s[:, None, None]        # (P, 6, 3)
            ft = hard(geom, turned(trial.reshape(-1, 3), u06), verts6,
                      words).reshape(n_pts, 6)
            ft = jnp.where((jnp.abs(trial) <= orient_tol + 1e-12).all(-1), ft, -1.0)
            k = jnp.argmax(ft, axis=1)
            fb = jnp.take_along_axis(ft, k[:, None], 1)[:, 0]
            better = fb > f
            pick = jnp.take_along_axis(trial, k[:, None, None], 1)[:, 0]
            return (jnp.where(better[:, None], pick, rot), jnp.where(better, fb, f),
                    jnp.where(better, s, s / 2))
        return jax.lax.fori_loop(0, _INNER, body,
                                 (rot, f, jnp.full((n_pts,), r_cur)))[:2]

    @jax.jit
    def profile(xs, rot, r_cur, words):
        """Mean fraction and re-fitted rotations of each geometry trial ``xs (M, n)``."""
        def one(xv):
            geom = _from_vector(start, xv)
            rot2, f2 = refit(geom, rot, fractions(geom, rot, words), r_cur, words)
            return jnp.mean(f2), rot2, f2
        return jax.vmap(one)(xs)

    rounds = 0
    r_cur = r_step
    cur = float(frac.mean())
    while rounds < max_rounds:
        rounds += 1
        live = free & (step >= floor)
        idx = np.flatnonzero(live)
        xs = np.concatenate([x[None], _moves(x, idx, step)])
        means, rots, fracs = profile(jnp.asarray(xs), jnp.asarray(rot), r_cur, words)
        means = np.where(_feasible(xs, x0, d, tol), np.asarray(means), -np.inf)
        k = int(np.argmax(means))
        if means[k] > cur:
            x, rot, frac = xs[k], np.array(rots[k]), np.array(fracs[k])
            cur = float(means[k])
        # A parameter neither of whose moves raised the mean halves its step; the
        # orientations' step halves when the geometry stood still.
        raised = (means[1:] > means[0]).reshape(2, -1).any(axis=0)
        step[idx[~raised]] /= 2
        if k == 0 or not idx.size:
            r_cur /= 2
        if not (free & (step >= floor)).any() and r_cur < r_floor:
            break
        if rounds % 10 == 0:
            log(f"compass round {rounds}: mean overlap fraction {cur:.4f}")
    geom = _from_vector(start, jnp.asarray(x))
    log(f"after {rounds} compass rounds: mean overlap fraction {cur:.4f}")
    euler = np.array(matrix_to_euler(turned(jnp.asarray(rot), u0)))
    return CalibrationResult(start=start, geometry=geom, euler0=euler0, euler=euler,
                             start_fraction=start_fraction, fraction=frac, soft_steps=done,
                             rounds=rounds, seconds=time.perf_counter() - t_start)


@dataclasses.dataclass(frozen=True)
class WholeMapResult:
    """A whole-map calibration's outcome (:func:`calibrate_whole_map`).

    Attributes:
      start, geometry: the geometry before and after.
      start_score, score: :class:`nfjax.simulate.MapScore` of the map at each.
      n_voxels, cell: voxels rendered and their triangles' edge (µm).
      passes, rounds, evaluations: compass passes (each from the first steps), rounds
        in all, and map renderings.
      seconds: wall time.
    """

    start: Geometry
    geometry: Geometry
    start_score: object
    score: object
    n_voxels: int
    cell: float
    passes: int
    rounds: int
    evaluations: int
    seconds: float

    def lines(self) -> list[str]:
        """Human lines: the beam centres, Lsd and tilts before -> after, and the scores."""
        out = _geometry_lines(self.start, self.geometry, "whole map, ")
        a, b = self.start_score, self.score
        out.append(f"whole map of {self.n_voxels} voxels ({self.cell:g} um triangles): "
                   f"intersection over union {a.iou:.4f} -> {b.iou:.4f} (precision "
                   f"{a.precision:.4f} -> {b.precision:.4f}, recall {a.recall:.4f} -> "
                   f"{b.recall:.4f}); {self.passes} compass passes, {self.rounds} rounds, "
                   f"{self.evaluations} renderings, {self.seconds:.1f} s")
        return out


def calibrate_whole_map(params, obs, records: np.ndarray, start: Geometry | None = None,
                        hkls=None, *, cell: float | None = None, max_rounds: int = 100,
                        max_memory=None, log=None) -> WholeMapResult:
    """Refine the detector geometry on a whole reconstruction: every voxel of mic
    ``records (N,11)`` rendered as its grid triangle (edge ``cell``, default
    :func:`nfjax.simulate.grid_cell`) at its fixed orientation, and the geometry moved so
    that the union of the predicted spots matches the observations ``obs`` best
    (intersection over union of the lit pixels, :class:`nfjax.simulate.WholeMap`).

    The per-voxel fraction of :func:`calibrate` cannot see a beam centre that is off by
    part of a pixel along a grain's spot: each voxel's spots stay inside its grain's wide
    observed spot. The whole map can: the pixels no voxel predicts go unexplained. The
    search starts at ``start`` (default the parameter file's geometry, e.g. the result of
    :func:`calibrate`), keeps MIDAS's bounds about the parameter file's geometry, and is
    a compass search like :func:`calibrate`'s second pass, one rendering per trial,
    started again from its first steps for as long as a pass raises the IoU by 1e-4 (up
    to ``max_rounds`` rounds in all): the IoU is a step function of the geometry with small
    plateaus where Lsd and a beam centre are both off. It is a refinement: start it where
    :func:`calibrate` ends. The orientations are held, so the records should come from a
    reconstruction made with a geometry close to the truth (reconstruct, calibrate,
    reconstruct again).
    ``log(line)`` gets a progress line per round.
    """
    from nfjax.crystal import reflections
    from nfjax.geometry import geometry_from_params
    from nfjax.simulate import WholeMap

    t_start = time.perf_counter()
    say = log or (lambda line: None)
    base = geometry_from_params(params)
    start = base if start is None else start
    d = base.n_distances
    tol = _tolerances(params, d)
    if obs.shape != base.shape:
        raise NfjaxError(f"the observations are {obs.shape} (distances, frames, y, z) where "
                         f"{params.source} describes {base.shape}")
    table = reflections(params, hkls)
    wmap = WholeMap(records, table.g, table.theta, obs, start, cell=cell,
                    max_memory=max_memory)
    x0, x = _vector(base), _vector(start)
    evaluations = 0

    def score(xv):
        nonlocal evaluations
        evaluations += 1
        return wmap.score(_from_vector(start, jnp.asarray(xv)))

    first = best = score(x)
    say(f"whole map: {wmap.n_voxels} voxels as {wmap.cell:g} um triangles, "
        f"{first.observed} observed lit pixels; intersection over union {first.iou:.4f} "
        f"at the start ({time.perf_counter() - t_start:.1f} s)")
    first_step, floor = _compass_steps(d)
    step = first_step.copy()
    free = _movable(x0, d, tol, floor)
    rounds = 0
    passes, last = 0, first.iou
    while rounds < max_rounds:
        idx = np.flatnonzero(free & (step >= floor))
        if not idx.size:
            # Converged. The IoU is a step function of the geometry, full of small plateaus
            # where Lsd and a beam centre are both off: start again from the first steps
            # for as long as a pass still raises it by _PASS_GAIN.
            if best.iou - last < _PASS_GAIN:
                break
            passes, last = passes + 1, best.iou
            step = first_step.copy()
            continue
        rounds += 1
        t_round = time.perf_counter()
        xs = _moves(x, idx, step)
        ok = _feasible(xs, x0, d, tol)
        scores = [score(xv) if good else None for xv, good in zip(xs, ok)]
        ious = np.array([-1.0 if s is None else s.iou for s in scores])
        k = int(np.argmax(ious))
        raised = (ious > best.iou).reshape(2, -1).any(axis=0)
        if ious[k] > best.iou:
            x, best = xs[k], scores[k]
        step[idx[~raised]] /= 2             # neither move of a parameter helped: finer
        say(f"whole map, compass pass {passes + 1} round {rounds}: intersection over union "
            f"{best.iou:.4f}, {len(idx)} parameters moving, "
            f"{time.perf_counter() - t_round:.1f} s per round "
            f"({time.perf_counter() - t_start:.1f} s)")
    return WholeMapResult(start=start, geometry=_from_vector(start, jnp.asarray(x)),
                          start_score=first, score=best, n_voxels=wmap.n_voxels,
                          cell=wmap.cell, passes=passes + 1, rounds=rounds,
                          evaluations=evaluations,
                          seconds=time.perf_counter() - t_start)


def calibrated_changes(geom: Geometry) -> dict:
    """The parameter-file changes of a calibrated geometry: every ``Lsd`` and ``BC`` line
    (one per distance) and ``tx``, ``ty``, ``tz``, for
    :func:`nfjax.params.update_param_text`. Values are rounded to 1e-6 (µm, px, deg)."""
    r = lambda v: round(float(v), 6)                       # noqa: E731
    tilts = np.asarray(geom.tilts)
    return {"Lsd": [r(v) for v in np.asarray(geom.lsd)],
            "BC": [(r(y), r(z)) for y, z in zip(np.asarray(geom.ybc), np.asarray(geom.zbc))],
            "tx": r(tilts[0]), "ty": r(tilts[1]), "tz": r(tilts[2])}


# --------------------------------------------------------------------------- CLI
def run_calibrate(args) -> int:
    """``nfjax calibrate PARAMS [--mic MIC [--points N] [--whole-map [--cell E]]] [-o OUT]
    [--spots-info PATH] [--steps N] [--device cpu|gpu]``: calibrate (then, with
    ``--whole-map``, refine on the whole map of MIC) and write the parameter file with the
    fitted geometry (default ``<PARAMS stem>_calibrated<suffix>`` beside it)."""
    import sys

    from nfjax.io.atomic import atomic_write, check_target
    from nfjax.io.mic import read_mic
    from nfjax.observe import load_observations
    from nfjax.parallel import device_scope
    from nfjax.params import read_params, update_param_text

    params = read_params(args.params)
    src = Path(args.params)
    out = Path(args.output) if args.output else src.with_name(
        f"{src.stem}_calibrated{src.suffix}")
    check_target(out)
    whole_map = getattr(args, "whole_map", False)
    cell = getattr(args, "cell", None)
    if whole_map and not args.mic:
        raise NfjaxError("--whole-map renders a reconstruction: give it with --mic MIC")
    if cell is not None and not (whole_map and cell > 0):
        raise NfjaxError(f"--cell {cell}: expected a positive edge length in um, with "
                         "--whole-map")
    mic = read_mic(args.mic) if args.mic else None
    points = calibration_points(params, mic, args.points)
    if whole_map:
        from nfjax.simulate import rendered_records

        map_records = rendered_records(params, mic, args.mic)
    with device_scope(args.device):
        from nfjax.geometry import geometry_from_params

        geom_shape = geometry_from_params(params).shape
        _tolerances(params, geom_shape[0])                    # before reading the images
        spots = Path(args.spots_info) if args.spots_info else params.output_dir / "SpotsInfo.bin"
        obs = load_observations(spots, geom_shape).to_device()
        say = lambda line: print(f"nfjax calibrate: {line}", file=sys.stderr,  # noqa: E731
                                 flush=True)
        result = calibrate(params, obs, points, steps=args.steps, log=say)
        geom, lines = result.geometry, result.lines()
        if whole_map:
            wm = calibrate_whole_map(params, obs, map_records, start=geom, cell=cell,
                                     log=say)
            geom, lines = wm.geometry, lines + wm.lines()
    text = src.read_text()
    new_text = update_param_text(text, calibrated_changes(geom))
    with atomic_write(out, "w") as fh:
        fh.write(new_text)
    for line in lines:
        print(line)
    print(f"calibrated parameters -> {out}")
    return 0
