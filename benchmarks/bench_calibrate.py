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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--solid", action="store_true",
                    help="render each voxel as its whole grid triangle (solid spots)")
    ap.add_argument("--sensitivity", action="store_true",
                    help="per-voxel fraction vs whole-map overlap under beam-centre moves")
    ap.add_argument("--record", action="store_true", help="append a row to RESULTS.md")
    args = ap.parse_args()
    if args.sensitivity:
        return sensitivity(args.record)

    import jax

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
    text = update_param_text(open(files["params"]).read(), {
        "Lsd": [float(g.lsd[0]) + 30.0, float(g.lsd[1]) - 25.0],
        "BC": [(float(g.ybc[0]) + 0.6, float(g.zbc[0]) - 0.4),
               (float(g.ybc[1]) - 0.3, float(g.zbc[1]) + 0.5)],
        "tx": float(g.tilts[0]) + 0.15, "ty": float(g.tilts[1]) - 0.1,
        "tz": float(g.tilts[2]) + 0.1,
        "LsdTol": 100.0, "LsdRelativeTol": 100.0, "BCTol": (1.0, 1.0), "TiltsTol": 1.0})
    perturbed = parse_params(text, source="perturbed")
    rng = np.random.default_rng(0)
    pts = mic[rng.choice(np.flatnonzero(mic[:, 10] > 0.9), size=args.voxels,
                         replace=False)].copy()
    pts[:, 7:10] += rng.normal(0.0, math.radians(0.1), (len(pts), 3))
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
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip() or "?"
        machine = f"{platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].platform}"
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as fh:
            fh.write(f"\n## bench_calibrate — {datetime.date.today().isoformat()} — {machine}, "
                     f"commit {commit}\n\nAu example, geometry perturbed (Lsd +30/-25 µm, "
                     f"BC up to 0.6 px, tilts 0.1-0.15°), wall time with compilation: {line}."
                     f" MIDAS's FitOrientationParametersMultiPoint has no timing here to "
                     f"compare with.\n")
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
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip() or "?"
        machine = f"{platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].platform}"
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as fh:
            fh.write(f"\n## bench_calibrate --sensitivity — {datetime.date.today().isoformat()}"
                     f" — {machine}, commit {commit}\n\n```\n" + "\n".join(lines)
                     + f"\n```\n\n{wall:.1f} s.\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
