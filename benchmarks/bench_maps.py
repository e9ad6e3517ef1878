"""Benchmark of ParseMic's pixel maps (``nfjax maps``, :mod:`nfjax.maps`).

A synthetic 1 x 0.87 mm section: 160 000 voxels on a 2.5 µm lattice (TriEdgeSize 2.5), 40
Voronoi grains with 0.1° scatter inside each. Builds the four maps (pixel assignment,
KAM, grain labels, GROD) and writes them, twice (the first call includes JAX's
compilation of the misorientation); prints the work and the times and, with
``--record``, appends a row to RESULTS.md.

    .venv/bin/python benchmarks/bench_maps.py [--side 400] [--record]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def synthetic(side: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(side) * 2.5 - 1.25 * side,
                         np.arange(side) * 2.165 - 1.0825 * side)
    x, y = xs.ravel(), ys.ravel()
    centres = rng.uniform([x.min(), y.min()], [x.max(), y.max()], (40, 2))
    grain = np.argmin((x[:, None] - centres[:, 0]) ** 2 + (y[:, None] - centres[:, 1]) ** 2,
                      axis=1)
    euler = rng.uniform(0, 1, (40, 3)) * [2 * np.pi, np.pi, 2 * np.pi]
    rec = np.zeros((x.size, 11))
    rec[:, 0] = np.arange(x.size)
    rec[:, 3], rec[:, 4], rec[:, 5] = x, y, 2.5
    rec[:, 7:10] = euler[grain] + rng.normal(0, np.radians(0.1), (x.size, 3))
    rec[:, 10] = rng.uniform(0.5, 1.0, x.size)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=400, help="voxels per side (default 400)")
    ap.add_argument("--record", action="store_true", help="append a row to RESULTS.md")
    args = ap.parse_args()

    import jax

    from nfjax.maps import pixel_maps, write_maps

    rec = synthetic(args.side)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):
            t0 = time.perf_counter()
            maps = pixel_maps(rec, 2.5)
            t1 = time.perf_counter()
            paths = write_maps(Path(tmp) / "bench.mic", maps, rec)
            t2 = time.perf_counter()
            times.append((t1 - t0, t2 - t1))
        size = sum(p.stat().st_size for p in paths)
    pixels = maps.x_size * maps.y_size
    assigned = int(np.count_nonzero(maps.owner >= 0))
    print(f"{len(rec)} voxels -> {maps.x_size} x {maps.y_size} = {pixels} pixels of 1 µm "
          f"({assigned} assigned), {maps.n_grains} grains at 5°; files {size / 1e6:.0f} MB")
    for k, (build, write) in enumerate(times):
        print(f"{'first (with compilation)' if k == 0 else 'again'}: maps {build:.2f} s, "
              f"write {write:.2f} s")

    if args.record:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip() or "?"
        machine = (f"{platform.machine()} {os.cpu_count()} cores, "
                   f"{jax.devices()[0].platform}")
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as fh:
            fh.write(f"\n## bench_maps — {datetime.date.today().isoformat()} — {machine}, "
                     f"commit {commit}\n\n"
                     f"ParseMic's pixel maps (.map, .kam, .grainId, .grod) of {len(rec)} "
                     f"voxels (2.5 µm, 40 grains): {maps.x_size} x {maps.y_size} pixels, "
                     f"{maps.n_grains} grains, {size / 1e6:.0f} MB written.\n\n"
                     f"| call | maps | write |\n|---|---|---|\n"
                     f"| first (with compilation) | {times[0][0]:.2f} s | {times[0][1]:.2f} s |\n"
                     f"| again | {times[1][0]:.2f} s | {times[1][1]:.2f} s |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
