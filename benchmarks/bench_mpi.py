"""What a waiting MPI rank costs the rank it waits for, on a shared node.

Under ``mpiexec -n R nfjax reconstruct`` the ranks wait for rank 0 while it processes the
images and writes files, and for the slowest rank before each gather. MPICH's blocking
``MPI_Barrier`` spins a core at 100 % while it waits; ``nfjax.parallel.Comm.barrier``
polls a non-blocking barrier and sleeps in between. This runs 2 ranks on this machine:
rank 0 does a fixed NumPy workload (20 × tanh(A·Aᵀ), A 1500²) while rank 1 waits, once in
MPI's barrier and once in nfjax's, and prints rank 0's time for each against the same
work in a lone process.

    .venv/bin/python benchmarks/bench_mpi.py [--repeat 3] [--record]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def work() -> float:
    import numpy as np

    a = np.random.default_rng(0).normal(size=(1500, 1500))
    t0 = time.perf_counter()
    for _ in range(20):
        a = np.tanh(a @ a.T / 1500)
    return time.perf_counter() - t0


def child(mode: str) -> None:
    from nfjax.parallel import world

    comm = world(force=True)
    dt = work() if comm.rank == 0 else 0.0
    if mode == "mpi":
        comm.mpi.Barrier()
    else:
        comm.barrier()
    if comm.rank == 0:
        print(f"{dt:.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    ap.add_argument("--child", choices=["mpi", "nfjax"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return 0
    mpiexec = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    if mpiexec is None:
        print("bench_mpi: no mpiexec (pip install '.[mpi]')", file=sys.stderr)
        return 2
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    times: dict[str, list[float]] = {"alone": [], "mpi": [], "nfjax": []}
    for _ in range(args.repeat):
        times["alone"].append(work())
        for mode in ("mpi", "nfjax"):
            out = subprocess.run([mpiexec, "-n", "2", sys.executable, __file__, "--child", mode],
                                 capture_output=True, text=True, check=True, env=env)
            times[mode].append(float(out.stdout.split()[-1]))
    best = {k: min(v) for k, v in times.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    lines = [
        f"## bench_mpi — {time.strftime('%Y-%m-%d')} — commit {commit} — "
        f"{platform.machine()} {os.cpu_count()} cores, cpu",
        "",
        "Rank 0's fixed NumPy workload (20 × tanh(A·Aᵀ), A 1500²) while rank 1 of 2 waits "
        f"(best of {args.repeat}):",
        "",
        "| rank 1 waits in | rank 0 time | vs alone |",
        "|---|---|---|",
        f"| (no second rank) | {best['alone']:.2f} s | 1.00 |",
        f"| MPI_Barrier (MPICH, spinning) | {best['mpi']:.2f} s | "
        f"{best['mpi'] / best['alone']:.2f} |",
        f"| nfjax Comm.barrier (Ibarrier + sleep) | {best['nfjax']:.2f} s | "
        f"{best['nfjax'] / best['alone']:.2f} |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.record:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as fh:
            fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
