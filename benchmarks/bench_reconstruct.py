"""Benchmark of ``nfjax reconstruct`` on the bundled Au example, end to end.

(a) Single resolution, as MIDAS's NF benchmark runs it: simulate the observations from the
    ground truth (``nfjax simulate``), then ``nfjax reconstruct --ff-seeds
    --no-image-processing`` (hkls, seeds from grs.csv, grid, spots, fit, text mic, map).
    MIDAS C end to end: 27–30 s on 2 threads of this machine class.
(b) Multi-resolution (``--multi``): ``GridRefactor 5.0 2.0 2``, the configuration of the
    slow test ``test_multi_resolution_au``: observations of the ground truth rendered as a
    solid sample (TriEdgeSize 2.5), a uniform cubic library of ``--resolution`` degrees
    for loop 0 (default 1.0: 591k) and of ``--retry-resolution`` degrees for the retries
    of loops 1–2 (default 2.0: 74k), the grid limited by a tomography outline of the
    sample. Loop 0 screens 238M pairs: about 20 min on 2 CPU cores.
(c) The ceiling of the same data (``--ceiling``, about 1.5 min): single resolution on the
    solid observations of (b), seeded with the four true grains (grs.csv) on the 2.5 µm
    grid, whose voxels sit exactly on the ground-truth voxels: nfjax's refinement, MIDAS's
    (``--midas-refinement``) and nfjax's with a space-filling probe (EdgeLength = GridSize).
    It measures what a per-voxel fit can reach on these observations, with no library or
    multi-resolution error, against (b)'s accuracy.

Prints the work done and the time per stage; ``--record`` appends a row to RESULTS.md.

    .venv/bin/python benchmarks/bench_reconstruct.py [--multi] [--ceiling] [--record]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _prepare(directory: Path, **changes) -> Path:
    from nfjax.data import au_example
    from nfjax.params import update_param_text

    files = au_example()
    shutil.copy(files["grains"], directory / "grs.csv")
    values = {"DataDirectory": ".", "GrainsFile": "grs.csv", "SeedOrientations": "seeds.csv"}
    values.update(changes)
    path = directory / "params.txt"
    path.write_text(update_param_text(files["params"].read_text(), values))
    return path


def _rendered() -> np.ndarray:
    """The Au ground-truth voxels that are rendered (MIDAS's MinConfidence rule)."""
    from nfjax.data import au_example
    from nfjax.io.mic import read_mic
    from nfjax.params import read_params
    from nfjax.simulate import select_rendered

    files = au_example()
    return select_rendered(read_mic(files["mic"]).records,
                           read_params(files["params"]).min_confidence)


def _solid_observations(directory: Path) -> np.ndarray:
    """SpotsInfo.bin and tomo.raw of the Au ground truth rendered as a solid sample (each
    2.5 µm voxel's whole triangle) into ``directory``; returns the rendered records."""
    from nfjax import observe
    from nfjax.crystal import hkls_from_params
    from nfjax.data import au_example
    from nfjax.params import read_params
    from nfjax.simulate import simulate_records, tomo_outline

    files = au_example()
    rendered = _rendered()
    solid = rendered.copy()
    solid[:, 5] = 2.5                                   # TriEdgeSize = GridSize
    p_au = read_params(files["params"])
    observe.write_spots_info(directory / "SpotsInfo.bin", simulate_records(
        p_au, solid, hkls_from_params(p_au), progress=False))
    (directory / "tomo.raw").write_bytes(tomo_outline(rendered, pixel_size=0.25, size=512,
                                                      radius=1.5).tobytes())
    return rendered


def _misses(mic: Path, rendered: np.ndarray) -> tuple[float, int]:
    """Fraction of the rendered ground-truth voxels within 0.5° of the nearest voxel of
    ``mic`` (within 1 µm), and the number of misses."""
    from nfjax.compare import compare_records
    from nfjax.io.mic import read_mic

    cmp = compare_records(read_mic(mic).records, rendered, nearest=1.0)
    a50 = cmp.frac_reference[1]
    return a50, int(round((1.0 - a50) * len(rendered)))


def _accuracy(mic: Path) -> tuple[float, float, int]:
    from nfjax.compare import compare_records
    from nfjax.io.mic import read_mic

    rendered = _rendered()
    rec = read_mic(mic).records
    cmp = compare_records(rec, rendered)
    return cmp.frac_reference[0], cmp.frac_reference[1], cmp.n_matched


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--multi", action="store_true", help="also run the multi-resolution job")
    ap.add_argument("--resolution", type=float, default=1.0,
                    help="uniform seed spacing of the loop-0 library (deg)")
    ap.add_argument("--retry-resolution", type=float, default=2.0,
                    help="uniform seed spacing of SeedOrientationsAll (deg)")
    ap.add_argument("--ceiling", action="store_true",
                    help="also run the seeded single-resolution fits on the solid observations")
    ap.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    args = ap.parse_args()

    import jax

    import nfjax
    from nfjax.cli import main as cli
    from nfjax.workflow import reconstruct

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "single"
        d.mkdir()
        params = _prepare(d)
        t0 = time.perf_counter()
        cli(["simulate", str(params), str(nfjax.data.au_example()["mic"]), "-o",
             str(d / "SpotsInfo.bin")])
        t_sim = time.perf_counter() - t0
        t1 = time.perf_counter()
        final = reconstruct(params, ff_seeds=True, image_processing=False, progress=False)
        t_rec = time.perf_counter() - t1
        a25, a50, n = _accuracy(final)
        print(f"(a) single resolution: simulate {t_sim:.1f} s + reconstruct {t_rec:.1f} s = "
              f"{t_sim + t_rec:.1f} s end to end; 3456 voxels x 4 seeds; "
              f"{100 * a25:.2f}% of {n} rendered voxels < 0.25 deg (MIDAS C: 27-30 s)")
        rows.append(("Au single resolution end to end (simulate + reconstruct)",
                     f"{t_sim + t_rec:.1f} s ({t_sim:.1f} + {t_rec:.1f})",
                     f"{100 * a25:.2f}% < 0.25 deg", "MIDAS C 27-30 s"))
        if args.multi or args.ceiling:
            solid_dir = Path(tmp) / "solid"
            solid_dir.mkdir()
            rendered = _solid_observations(solid_dir)
        if args.ceiling:
            variants = [("nfjax refinement", {}, False),
                        ("MIDAS refinement", {}, True),
                        ("nfjax refinement, EdgeLength 2.5", {"EdgeLength": 2.5}, False)]
            for k, (label, extra, midas) in enumerate(variants):
                c = Path(tmp) / f"ceiling{k}"
                c.mkdir()
                for name in ("SpotsInfo.bin", "tomo.raw"):
                    os.symlink(solid_dir / name, c / name)
                params = _prepare(c, TomoImage="tomo.raw", TomoPixelSize=0.25,
                                  MicFileText="MyMic", **extra)
                t0 = time.perf_counter()
                final = reconstruct(params, ff_seeds=True, image_processing=False,
                                    progress=False, midas_refinement=midas)
                t_c = time.perf_counter() - t0
                a50, miss = _misses(final, rendered)
                print(f"(c) ceiling, solid observations, 4 true grains, 2.5 um grid on the "
                      f"ground-truth voxels, {label}: {t_c:.1f} s; {100 * a50:.2f}% of "
                      f"{len(rendered)} rendered voxels < 0.5 deg ({miss} misses)")
                rows.append((f"ceiling: solid Au observations, seeded with the 4 true grains "
                             f"on the ground-truth grid, {label}", f"{t_c:.1f} s",
                             f"{100 * a50:.2f}% < 0.5 deg ({miss} misses)", "-"))
        if args.multi:
            from nfjax.io.seeds import write_seeds
            from nfjax.seeds import uniform_seeds

            m = Path(tmp) / "multi"
            m.mkdir()
            for name in ("SpotsInfo.bin", "tomo.raw"):
                shutil.copy(solid_dir / name, m / name)
            lib0 = uniform_seeds(225, args.resolution)
            write_seeds(m / "seeds.txt", lib0)
            write_seeds(m / "seeds_all.txt", uniform_seeds(225, args.retry_resolution))
            params = _prepare(m, SeedOrientations="seeds.txt",
                              SeedOrientationsAll="seeds_all.txt",
                              GridRefactor=(5.0, 2.0, 2), TomoImage="tomo.raw",
                              TomoPixelSize=0.25, MicFileText="MyMic")
            t2 = time.perf_counter()
            final = reconstruct(params, image_processing=False, progress=True)
            t_multi = time.perf_counter() - t2
            a50, miss = _misses(final, rendered)
            print(f"(b) multi resolution GridRefactor 5 2 2, loop-0 library {len(lib0)} "
                  f"({args.resolution} deg), retries {args.retry_resolution} deg, tomography "
                  f"outline: {t_multi:.1f} s; final {final.name}: {100 * a50:.2f}% of "
                  f"{len(rendered)} rendered voxels < 0.5 deg, nearest voxel ({miss} misses)")
            rows.append((f"Au multi-resolution 5/2/2, loop 0 {len(lib0)} seeds, retries "
                         f"{args.retry_resolution} deg, tomo outline", f"{t_multi:.1f} s",
                         f"{100 * a50:.2f}% < 0.5 deg ({miss} misses)", "-"))

    if args.record:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
        machine = (f"{platform.machine()} {os.cpu_count()} cores, "
                   f"{jax.devices()[0].platform}")
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as fh:
            fh.write(f"\n## bench_reconstruct — {datetime.date.today()} — commit {commit} — "
                     f"{machine}\n\n| job | wall | accuracy | anchor |\n|---|---|---|---|\n")
            for r in rows:
                fh.write("| " + " | ".join(r) + " |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
