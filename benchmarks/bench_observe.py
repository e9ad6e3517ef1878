"""Benchmark of loading the observation volume (SpotsInfo.bin) onto the device.

The bundled Au example's observations (its ground truth simulated, ``nfjax simulate``):
2 distances x 1440 frames x 2048², 1.5 GB of bit-packed words, almost all zero. Each way
of loading runs in a fresh process (as ``nfjax reconstruct`` / ``fit`` / ``score`` do), so
it pays for memory the process has not touched yet:

* ``before``: how nfjax read it until 2026-11-22 — ``np.zeros`` + one ``readinto`` of the
  whole file, then ``jnp.asarray`` (a second 1.5 GB copy);
* ``dense file``: :func:`nfjax.observe.read_spots_info` + :meth:`ObsVolume.to_device` on
  a file with every byte written (what MIDAS writes);
* ``sparse file``: the same on the file :func:`nfjax.observe.write_spots_info` writes now
  (runs of zero pages left as holes).

Prints the time to load, the peak resident memory of the process once the volume is on
the device (the Python interpreter and JAX alone take about 0.1 GiB), the disk the file
takes, and the lit pixels counted from the loaded words; ``--record`` appends the table
to RESULTS.md.

    .venv/bin/python benchmarks/bench_observe.py [--repeat 3] [--record]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in a child: load the volume the given way, print seconds and peak RSS (KiB).
_CHILD = """
import sys, time
import numpy as np
import jax, jax.numpy as jnp
from nfjax import observe
path, how = sys.argv[1], sys.argv[2]
shape = tuple(int(s) for s in sys.argv[3].split(","))
t0 = time.perf_counter()
if how == "before":
    size = observe.check_spots_info(path, shape)
    words = np.zeros(observe.n_words(shape), dtype=np.uint32)
    with open(path, "rb") as fh:
        fh.readinto(memoryview(words[:size // 4]).cast("B"))
    words = jnp.asarray(words)
else:
    words = observe.read_spots_info(path, shape).to_device().words
words.block_until_ready()
seconds = time.perf_counter() - t0
# VmHWM: this process image's own peak (ru_maxrss would count the parent's at the fork)
peak = next(int(line.split()[1]) for line in open("/proc/self/status")
            if line.startswith("VmHWM:"))
lit = observe.count(observe.ObsVolume(np.asarray(words), shape))
print(seconds, peak, lit)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per way (default 3)")
    ap.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = ap.parse_args()

    import jax
    import numpy as np

    from nfjax import observe
    from nfjax.crystal import hkls_from_params
    from nfjax.data import au_example
    from nfjax.io.mic import read_mic
    from nfjax.params import read_params
    from nfjax.simulate import select_rendered, simulate_records

    files = au_example()
    params = read_params(files["params"])
    records = select_rendered(read_mic(files["mic"]).records, params.min_confidence)
    vol = simulate_records(params, records, hkls_from_params(params), progress=False)
    shape = ",".join(str(s) for s in vol.shape)
    nonzero = int(np.count_nonzero(np.asarray(vol.words)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sparse, dense = Path(tmp) / "sparse.bin", Path(tmp) / "dense.bin"
        t0 = time.perf_counter()
        observe.write_spots_info(sparse, vol)
        write_s = time.perf_counter() - t0
        with open(dense, "wb") as fh:
            for start in range(0, vol.words.shape[0], 1 << 24):
                fh.write(np.asarray(vol.words[start:start + (1 << 24)], dtype="<u4").tobytes())
        del vol
        disk = {p: p.stat().st_blocks * 512 for p in (sparse, dense)}
        print(f"Au volume {shape}: {sparse.stat().st_size / 1e9:.2f} GB, {nonzero} non-zero "
              f"words; written sparse in {write_s:.2f} s ({disk[sparse] / 1e6:.1f} MB on "
              f"disk, the dense file {disk[dense] / 1e6:.0f} MB)")
        for how, path in (("before", dense), ("dense file", dense), ("sparse file", sparse)):
            runs = []
            for _ in range(args.repeat):
                out = subprocess.run([sys.executable, "-c", _CHILD, str(path),
                                      "before" if how == "before" else "now", shape],
                                     capture_output=True, text=True, check=True).stdout.split()
                runs.append((float(out[0]), int(out[1]) / 2**20, int(out[2])))
            seconds = sorted(r[0] for r in runs)
            rss = max(r[1] for r in runs)
            lit = {r[2] for r in runs}
            line = (f"{how:<12} load {seconds[0]:.2f}-{seconds[-1]:.2f} s "
                    f"(median {seconds[len(seconds) // 2]:.2f}), peak RSS {rss:.2f} GiB, "
                    f"lit pixels {sorted(lit)}")
            print(line)
            rows.append((how, seconds, rss, disk[path]))

    if args.record:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip() or "?"
        machine = f"{platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].platform}"
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as fh:
            fh.write(f"\n## bench_observe — {datetime.date.today().isoformat()} — {machine}, "
                     f"commit {commit}\n\n"
                     f"Loading the Au observations ({shape}, 1.51 GB, {nonzero} non-zero "
                     f"words) onto the device, each in a fresh process, {args.repeat} runs; "
                     f"writing the sparse file took {write_s:.2f} s.\n\n"
                     "| way | load (min / median / max) | peak RSS of the process | file on "
                     "disk |\n|---|---|---|---|\n")
            for how, seconds, rss, size in rows:
                fh.write(f"| {how} | {seconds[0]:.2f} / {seconds[len(seconds) // 2]:.2f} / "
                         f"{seconds[-1]:.2f} s | {rss:.2f} GiB | {size / 1e6:.1f} MB |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
