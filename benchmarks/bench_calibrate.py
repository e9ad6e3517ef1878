#!/usr/bin/env python
"""Calibration of a perturbed detector geometry on the Au example (``nfjax.calibrate``).

Simulates the Au example's observations with its own geometry (``--solid``: each voxel
rendered as its whole 2.5 µm grid triangle, so a grain's spots are solid as a real
sample's; otherwise as the example mic's 1 µm probes, dotted spots), moves Lsd by +30/-25 µm,
the beam centres by up to 0.6 px and the tilts by 0.1-0.15°, turns the orientations of
``--voxels`` confident voxels by ~0.1°, and calibrates. Prints the errors left, the mean
overlap fraction and the wall time (with compilation); with ``--record`` appends a row to
RESULTS.md.

    python benchmarks/bench_calibrate.py [--voxels 16] [--steps 300] [--solid] [--record]
    python benchmarks/bench_calibrate.py --sensitivity
    python benchmarks/bench_calibrate.py --whole-map [--voxels 32]

``--whole-map`` runs the loop a beamline run would: on solid spots, the per-voxel
calibration from the perturbed geometry, a seeded reconstruction with its geometry (the
2.5 µm grid, as ``bench_reconstruct.py --ceiling``), the whole-map calibration on that
reconstruction (``nfjax.calibrate.calibrate_whole_map``), and a reconstruction again; it
prints the errors left after each calibration, each reconstruction's misses (of the 1514
rendered voxels, beyond 0.5°) and the reconstruction at the true geometry's for reference.

``--sensitivity`` calibrates nothing: on solid spots, with every voxel at its true
orientation, it moves the first distance's beam centre in y and in z and prints what the
two kinds of objective see. One is the mean per-voxel overlap fraction (what ``nfjax
calibrate`` and MIDAS score) with 1 µm and 2.5 µm probes. The other is the whole map:
every voxel rendered, and the predicted lit pixels set against the observed ones
(precision, recall, intersection over union).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _perturbation(g) -> dict:
    """The parameter changes of the perturbed geometry (from the true ``g``) and the
    tolerances that let the calibration move back."""
    return {"Lsd": [float(g.lsd[0]) + 30.0, float(g.lsd[1]) - 25.0],
            "BC": [(float(g.ybc[0]) + 0.6, float(g.zbc[0]) - 0.4),
                   (float(g.ybc[1]) - 0.3, float(g.zbc[1]) + 0.5)],
            "tx": float(g.tilts[0]) + 0.15, "ty": float(g.tilts[1]) - 0.1,
            "tz": float(g.tilts[2]) + 0.1,
            "LsdTol": 100.0, "LsdRelativeTol": 100.0, "BCTol": (1.0, 1.0), "TiltsTol": 1.0}


def _points(mic: np.ndarray, n: int) -> np.ndarray:
    """``n`` voxels of confidence > 0.9 with their orientations turned by ~0.1 deg."""
    rng = np.random.default_rng(0)
    pts = mic[rng.choice(np.flatnonzero(mic[:, 10] > 0.9), size=n, replace=False)].copy()
    pts[:, 7:10] += rng.normal(0.0, math.radians(0.1), (len(pts), 3))
    return pts


def _record(heading: str, body: str) -> None:
    """Append a section ``heading — date — machine, commit`` with ``body`` to RESULTS.md."""
    import jax

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "?"
    machine = f"{platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].platform}"
    with open(ROOT / "benchmarks" / "RESULTS.md", "a") as fh:
        fh.write(f"\n## {heading} — {datetime.date.today().isoformat()} — {machine}, "
                 f"commit {commit}\n\n{body}\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--solid", action="store_true",
                    help="render each voxel as its whole grid triangle (solid spots)")
    ap.add_argument("--sensitivity", action="store_true",
                    help="per-voxel fraction vs whole-map overlap under beam-centre moves")
    ap.add_argument("--whole-map", action="store_true",
                    help="per-voxel calibration, reconstruction, whole-map calibration, "
                         "reconstruction (solid spots)")
    ap.add_argument("--record", action="store_true", help="append a row to RESULTS.md")
    args = ap.parse_args()
    if args.sensitivity:
        return sensitivity(args.record)
    if args.whole_map:
        return whole_map(args.voxels, args.steps, args.record)

    from nfjax.calibrate import calibrate
    from nfjax.crystal import hkls_from_params
    from nfjax.data import au_example
    from nfjax.geometry import geometry_from_params
    from nfjax.io.mic import read_mic
    from nfjax.params import parse_params, read_params, update_param_text
    from nfjax.simulate import select_rendered, simulate_records

    files = au_example()
    params = read_params(files["params"])
    mic = select_rendered(read_mic(files["mic"]).records, params.min_confidence)
    rendered = mic.copy()
    if args.solid:
        rendered[:, 5] = float(params.grid_size)            # space-filling triangles
    obs = simulate_records(params, rendered, hkls_from_params(params),
                           progress=False).to_device()
    g = geometry_from_params(params)
    text = update_param_text(open(files["params"]).read(), _perturbation(g))
    perturbed = parse_params(text, source="perturbed")
    pts = _points(mic, args.voxels)
    t0 = time.perf_counter()
    r = calibrate(perturbed, obs, pts, steps=args.steps, log=print)
    wall = time.perf_counter() - t0
    got = r.geometry
    err = dict(lsd=np.abs(np.asarray(got.lsd - g.lsd)).max(),
               bc=max(np.abs(np.asarray(got.ybc - g.ybc)).max(),
                      np.abs(np.asarray(got.zbc - g.zbc)).max()),
               tilt=np.abs(np.asarray(got.tilts - g.tilts)).max())
    spots = ("solid spots (voxels rendered as their 2.5 µm triangles)" if args.solid
             else "dotted spots (voxels rendered as the mic's 1 µm probes)")
    line = (f"{spots}, {args.voxels} voxels, {r.soft_steps} gradient steps + {r.rounds} compass rounds: "
            f"{wall:.1f} s; mean fraction {r.start_fraction.mean():.3f} -> "
            f"{r.fraction.mean():.3f}; errors left: Lsd {err['lsd']:.2f} µm (from 30), BC "
            f"{err['bc']:.3f} px (from 0.6), tilts {err['tilt']:.4f}° (from 0.15)")
    print(line)
    if args.record:
        _record("bench_calibrate", f"Au example, geometry perturbed (Lsd +30/-25 µm, BC up to "
                f"0.6 px, tilts 0.1-0.15°), wall time with compilation: {line}. MIDAS's "
                f"FitOrientationParametersMultiPoint has no timing here to compare with.")
    return 0


def sensitivity(record: bool) -> int:
    import dataclasses

    import jax
    import jax.numpy as jnp

    from nfjax.crystal import hkls_from_params, select_rings
    from nfjax.data import au_example
    from nfjax.forward import footprint_box
    from nfjax.geometry import geometry_from_params
    from nfjax.grid import triangle_vertices
    from nfjax.io.mic import read_mic
    from nfjax.observe import lit_indices
    from nfjax.orientation import euler_to_matrix_midas
    from nfjax.params import parse_params, read_params, update_param_text
    from nfjax.score import hard_overlap
    from nfjax.simulate import mic_grid_rows, select_rendered, simulate_records

    files = au_example()
    text = files["params"].read_text()
    params = read_params(files["params"])
    hkls = hkls_from_params(params)
    mic = select_rendered(read_mic(files["mic"]).records, params.min_confidence)
    solid = mic.copy()
    solid[:, 5] = float(params.grid_size)
    vol = simulate_records(params, solid, hkls, progress=False)
    observed = np.asarray(lit_indices(vol))
    obs = vol.to_device()
    g = geometry_from_params(params)
    table = select_rings(hkls, params.rings_to_use)
    gv, theta = jnp.asarray(table.g), jnp.asarray(table.theta)
    mats = euler_to_matrix_midas(jnp.asarray(mic[:, 7:10]))
    offsets = (-0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5)
    lines = []

    def say(line):
        print(line)
        lines.append(line)

    say(f"{len(mic)} voxels at their true orientations, {observed.size} observed lit "
        f"pixels (solid spots); the first distance's beam centre moved by (px):")
    say("objective                          " + " ".join(f"{o:+7.2f}" for o in offsets))
    t0 = time.perf_counter()
    for axis in ("y", "z"):
        for edge in (float(params.edge_length_effective), float(params.grid_size)):
            rows = mic.copy()
            rows[:, 5] = edge
            verts = jnp.asarray(triangle_vertices(mic_grid_rows(rows)))
            box = footprint_box(edge, float(g.px))
            mean = jax.jit(lambda geom: jnp.mean(jax.vmap(
                lambda v, u: hard_overlap(v, u, gv, theta, geom, obs.words, obs.shape,
                                          box=box))(verts, mats)))
            vals = []
            for o in offsets:
                d = jnp.array([o] + [0.0] * (g.n_distances - 1))
                geom = dataclasses.replace(g, **({"ybc": g.ybc + d} if axis == "y"
                                                 else {"zbc": g.zbc + d}))
                vals.append(float(mean(geom)))
            say(f"BC {axis}: per-voxel fraction, {edge:<3g} um "
                  + " ".join(f"{v:7.4f}" for v in vals))
        prec, rec, iou = [], [], []
        for o in offsets:
            bc = [[float(y), float(z)] for y, z in zip(g.ybc, g.zbc)]
            bc[0][0 if axis == "y" else 1] += o
            moved = parse_params(update_param_text(text, {"BC": [tuple(b) for b in bc]}),
                                 source="moved")
            predicted = np.asarray(lit_indices(simulate_records(moved, solid, hkls,
                                                                progress=False)))
            both = np.intersect1d(predicted, observed, assume_unique=True).size
            prec.append(both / predicted.size)
            rec.append(both / observed.size)
            iou.append(both / (predicted.size + observed.size - both))
        for name, vals in (("precision", prec), ("recall", rec), ("IoU", iou)):
            say(f"BC {axis}: whole map, {name:<15}" + " ".join(f"{v:7.4f}" for v in vals))
    wall = time.perf_counter() - t0
    print(f"{wall:.1f} s")
    if record:
        _record("bench_calibrate --sensitivity",
                "```\n" + "\n".join(lines) + f"\n```\n\n{wall:.1f} s.")
    return 0


def _errors(got, truth) -> str:
    """The geometry errors left, per distance: Lsd (µm), BC y and z (px); tilts (deg)."""
    f = lambda a: "/".join(f"{v:+.3f}" for v in np.asarray(a))    # noqa: E731
    return (f"Lsd {f(got.lsd - truth.lsd)} µm, BC y {f(got.ybc - truth.ybc)} px, BC z "
            f"{f(got.zbc - truth.zbc)} px, tilts {f(got.tilts - truth.tilts)}°")


def whole_map(n_voxels: int, steps: int, record: bool) -> int:
    import tempfile

    from bench_reconstruct import _misses, _prepare, _rendered, _solid_observations
    from nfjax.calibrate import calibrate, calibrate_whole_map, calibrated_changes
    from nfjax.geometry import geometry_from_params
    from nfjax.io.mic import read_mic
    from nfjax.observe import load_observations
    from nfjax.params import parse_params, read_params, update_param_text
    from nfjax.simulate import select_rendered
    from nfjax.workflow import reconstruct

    lines = []

    def say(line):
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        path = _prepare(d, TomoImage="tomo.raw", TomoPixelSize=0.25, MicFileText="MyMic")
        rendered = _rendered()
        _solid_observations(d, rendered)
        params = read_params(path)
        g = geometry_from_params(params)
        text = update_param_text(path.read_text(), _perturbation(g))
        obs = load_observations(d / "SpotsInfo.bin", g.shape).to_device()
        pts = _points(rendered, n_voxels)

        def rebuild(name, geom):
            out = d / name
            out.write_text(update_param_text(text, calibrated_changes(geom)))
            t = time.perf_counter()
            mic = reconstruct(out, ff_seeds=True, image_processing=False, progress=False)
            a50, miss = _misses(mic, rendered)
            return mic, time.perf_counter() - t, a50, miss

        t0 = time.perf_counter()
        r = calibrate(parse_params(text, source="perturbed"), obs, pts, steps=steps)
        t_voxel = time.perf_counter() - t0
        say(f"per-voxel calibration ({n_voxels} voxels, {t_voxel:.1f} s): "
            f"{_errors(r.geometry, g)}")
        mic, t_rec, a50, miss = rebuild("params_voxel.txt", r.geometry)
        say(f"reconstruction with it ({t_rec:.1f} s): {100 * a50:.2f}% within 0.5° "
            f"({miss} misses)")
        records = select_rendered(read_mic(mic).records, params.min_confidence)
        t0 = time.perf_counter()
        wm = calibrate_whole_map(parse_params(text, source="perturbed"), obs, records,
                                 start=r.geometry, log=print)
        t_map = time.perf_counter() - t0
        say(f"whole-map calibration on that reconstruction ({wm.n_voxels} voxels, "
            f"{wm.passes} passes, {wm.rounds} rounds, {wm.evaluations} renderings, "
            f"{t_map:.1f} s; IoU {wm.start_score.iou:.4f} -> {wm.score.iou:.4f}): "
            f"{_errors(wm.geometry, g)}")
        _, t_rec, a50, miss = rebuild("params_map.txt", wm.geometry)
        say(f"reconstruction with it ({t_rec:.1f} s): {100 * a50:.2f}% within 0.5° "
            f"({miss} misses)")
        _, t_rec, a50, miss = rebuild("params_true.txt", g)
        say(f"reconstruction at the true geometry ({t_rec:.1f} s): {100 * a50:.2f}% "
            f"within 0.5° ({miss} misses)")
    if record:
        _record("bench_calibrate --whole-map", "Solid Au observations, geometry perturbed (Lsd "
                "+30/-25 µm, BC up to 0.6 px, tilts 0.1-0.15°); times with compilation.\n\n"
                + "\n".join(f"- {line}" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
