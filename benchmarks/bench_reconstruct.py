"""Benchmark of ``nfjax reconstruct`` on the bundled Au example, end to end.

(a) Single resolution, as MIDAS's NF benchmark runs it: simulate the observations from the
    ground truth (``nfjax simulate``), then ``nfjax reconstruct --ff-seeds
    --no-image-processing`` (hkls, seeds from grs.csv, grid, spots, fit, text mic, map).
    MIDAS C end to end: 27–30 s on 2 threads of this machine class.
(b) Multi-resolution (``--multi``): ``GridRefactor 5.0 2.0 2`` with a uniform cubic seed
    library (``nfjax seeds uniform``, ``--resolution`` degrees) for the unseeded passes,
    the grid limited by ``GridMask`` to the rendered region (``--mask`` µm half-width).

Prints the work done and the time per stage; ``--record`` appends a row to RESULTS.md.

    .venv/bin/python benchmarks/bench_reconstruct.py [--multi] [--record]
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


def _accuracy(mic: Path) -> tuple[float, float, int]:
    from nfjax.compare import compare_records
    from nfjax.data import au_example
    from nfjax.io.mic import read_mic

    truth = read_mic(au_example()["mic"]).records
    rendered = truth[truth[:, 10] >= 0.7]
    rec = read_mic(mic).records
    cmp = compare_records(rec, rendered)
    return cmp.frac_reference[0], cmp.frac_reference[1], cmp.n_matched


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--multi", action="store_true", help="also run the multi-resolution job")
    ap.add_argument("--resolution", type=float, default=2.0,
                    help="uniform seed spacing for the unseeded passes (deg)")
    ap.add_argument("--mask", type=float, default=40.0, help="GridMask half-width (um)")
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
        if args.multi:
            from nfjax.io.seeds import write_seeds
            from nfjax.seeds import uniform_seeds

            m = Path(tmp) / "multi"
            m.mkdir()
            os.symlink(d / "SpotsInfo.bin", m / "SpotsInfo.bin")
            lib = uniform_seeds(225, args.resolution)
            write_seeds(m / "seeds_all.csv", lib)
            h = args.mask
            params = _prepare(m, SeedOrientations="seeds_all.csv",
                              SeedOrientationsAll="seeds_all.csv",
                              GridRefactor=(5.0, 2.0, 2), GridMask=(-h, h, -h, h),
                              MicFileText="MyMic")
            # SeedOrientations is rewritten per loop (seeds.txt.k); loop 0 reads the library.
            text = params.read_text().replace("SeedOrientations seeds_all.csv",
                                              "SeedOrientations seeds.txt", 1)
            params.write_text(text)
            shutil.copy(m / "seeds_all.csv", m / "seeds.txt")
            t2 = time.perf_counter()
            final = reconstruct(params, image_processing=False, progress=False)
            t_multi = time.perf_counter() - t2
            a25, a50, n = _accuracy(final)
            print(f"(b) multi resolution GridRefactor 5 2 2, {len(lib)} uniform seeds "
                  f"({args.resolution} deg), GridMask +-{h} um: {t_multi:.1f} s; final "
                  f"{final.name}: {100 * a50:.2f}% of {n} rendered voxels < 0.5 deg")
            rows.append((f"Au multi-resolution 5/2/2, {len(lib)} seeds, mask +-{h} um",
                         f"{t_multi:.1f} s", f"{100 * a50:.2f}% < 0.5 deg", "-"))

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
