"""MPI costs and gains: what a waiting rank costs the rank it waits for on a shared node,
and (``--spots``) the spot prediction shared by the ranks.

Under ``mpiexec -n R nfjax reconstruct`` the ranks wait for rank 0 while it writes files
or reads a resumed stage, and for the slowest rank before each gather. MPICH's blocking
``MPI_Barrier`` spins a core at 100 % while it waits; ``nfjax.parallel.Comm.barrier``
polls a non-blocking barrier and sleeps in between. This runs 2 ranks on this machine:
rank 0 does a fixed NumPy workload (20 × tanh(A·Aᵀ), A 1500²) while rank 1 waits, once in
MPI's barrier and once in nfjax's, and prints rank 0's time for each against the same
work in a lone process.

    .venv/bin/python benchmarks/bench_mpi.py [--repeat 3] [--record]

``--spots``: the spot table of a uniform cubic library (``--resolution`` degrees, default
1.0: 591k orientations, the multi-resolution run's loop 0) for the Au example, in one
process and under ``mpiexec -n RANKS`` (default 2), where the ranks predict whole chunks
each and exchange them; wall time of the call (compile included), and the check that the
tables are the same.

    .venv/bin/python benchmarks/bench_mpi.py --spots [--resolution 1.0] [--ranks 2] [--record]
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


def spots_child(resolution: float) -> None:
    """Predict the library's spots (shared by the ranks under MPI); rank 0 prints the wall
    time, the table's size and a digest of it."""
    import hashlib

    from nfjax.crystal import hkls_from_params, select_rings
    from nfjax.data import au_example
    from nfjax.geometry import geometry_from_params
    from nfjax.parallel import world
    from nfjax.params import read_params
    from nfjax.seeds import uniform_seeds
    from nfjax.spots import make_diffraction_spots

    comm = world()
    params = read_params(au_example()["params"])
    table = select_rings(hkls_from_params(params), params.rings_to_use)
    quats = uniform_seeds(225, resolution)
    comm.barrier()
    t0 = time.perf_counter()
    spots = make_diffraction_spots(quats, table.g, table.theta, geometry_from_params(params),
                                   progress=False, comm=comm)
    dt = time.perf_counter() - t0
    if comm.is_root:
        digest = hashlib.sha256(spots.key.tobytes() + spots.spots.tobytes()).hexdigest()[:16]
        print(f"{dt:.3f} {len(quats)} {len(spots.spots)} {digest}")


def spots(args, mpiexec: str, env: dict) -> str:
    runs = {}
    for ranks in (1, args.ranks):
        cmd = [sys.executable, __file__, "--spots-child", str(args.resolution)]
        if ranks > 1:
            cmd = [mpiexec, "-n", str(ranks), *cmd]
        outs = [subprocess.run(cmd, capture_output=True, text=True, check=True,
                               env=env).stdout.split() for _ in range(args.repeat)]
        runs[ranks] = (min(float(o[0]) for o in outs), outs[0][1:])
    (t1, (n, spots1, d1)), (tr, (_, _, dr)) = runs[1], runs[args.ranks]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    return "\n".join([
        f"## bench_mpi --spots — {time.strftime('%Y-%m-%d')} — commit {commit} — "
        f"{platform.machine()} {os.cpu_count()} cores, cpu",
        "",
        f"Spot table of a {args.resolution:g}° uniform cubic library ({n} orientations, "
        f"{spots1} spots) for the Au example, wall time of make_diffraction_spots with "
        f"compilation (best of {args.repeat}); the tables' digests "
        f"{'agree' if d1 == dr else 'DIFFER'} ({d1}).",
        "",
        "| processes | wall | vs one |",
        "|---|---|---|",
        f"| 1 | {t1:.1f} s | 1.00 |",
        f"| mpiexec -n {args.ranks} | {tr:.1f} s | {tr / t1:.2f} |",
        "",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    ap.add_argument("--spots", action="store_true", help="time the shared spot prediction")
    ap.add_argument("--resolution", type=float, default=1.0)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--child", choices=["mpi", "nfjax"], help=argparse.SUPPRESS)
    ap.add_argument("--spots-child", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return 0
    if args.spots_child is not None:
        spots_child(args.spots_child)
        return 0
    mpiexec = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    if mpiexec is None:
        print("bench_mpi: no mpiexec (pip install '.[mpi]')", file=sys.stderr)
        return 2
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if args.spots:
        text = spots(args, mpiexec, env)
        print(text)
        if args.record:
            with open(ROOT / "benchmarks" / "RESULTS.md", "a") as fh:
                fh.write("\n" + text)
        return 0
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
