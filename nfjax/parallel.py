"""Splitting grid blocks across MPI ranks.

Owns the block arithmetic (contiguous, every grid row in exactly one block — MIDAS's
FitOrientationOMP gives blocks > 0 the previous row's data and never fits the last row)
and the MPI plumbing: under ``mpiexec -n R`` each rank fits its block on its own device and
rank 0 gathers the records in grid order and writes the files. mpi4py is imported only
when the process was started by an MPI launcher, so a plain install runs without MPI.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from nfjax.errors import NfjaxError

# Variables set by the common launchers (MPICH/Hydra, Open MPI, Slurm's PMI, Intel MPI).
_LAUNCHER_VARS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
                  "PMIX_RANK", "MV2_COMM_WORLD_SIZE", "HYDRA_CONTROL_FD")


def block_range(n_rows: int, block: int, n_blocks: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of block ``block`` of ``n_blocks`` contiguous blocks.

    Blocks differ in size by at most one row and cover ``0..n_rows-1`` exactly once.
    """
    if n_blocks < 1:
        raise NfjaxError(f"--nblocks: expected a positive integer, found {n_blocks}")
    if not 0 <= block < n_blocks:
        raise NfjaxError(f"--block: expected 0..{n_blocks - 1}, found {block}")
    base, extra = divmod(int(n_rows), int(n_blocks))
    start = block * base + min(block, extra)
    return start, start + base + (1 if block < extra else 0)


@dataclass(frozen=True)
class Comm:
    """The MPI world as nfjax uses it: ``rank``, ``size`` and the mpi4py communicator
    (``None`` when running without MPI)."""

    rank: int = 0
    size: int = 1
    mpi: object = None

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def gather_rows(self, rows: np.ndarray) -> np.ndarray | None:
        """Concatenate every rank's ``rows`` (in rank order) on rank 0; ``None`` elsewhere.

        Ranks that finish their block first wait in :meth:`barrier` (asleep), not in the
        gather itself."""
        if self.mpi is None:
            return rows
        self.barrier()
        parts = self.mpi.gather(np.ascontiguousarray(rows), root=0)
        return np.concatenate(parts, axis=0) if self.rank == 0 else None

    def bcast(self, value):
        return value if self.mpi is None else self.mpi.bcast(value, root=0)

    def barrier(self) -> None:
        """Wait for every rank, sleeping between polls: MPI's blocking barrier spins a core
        at 100 % (MPICH), which on a shared node takes CPU from the rank everyone waits
        for (rank 0 processing the images or writing files, a rank fitting a larger
        block)."""
        if self.mpi is None:
            return
        request = self.mpi.Ibarrier()
        pause = 1e-4
        while not request.Test():
            time.sleep(pause)
            pause = min(2 * pause, 0.01)


def _live_world():
    """The MPI world if this process imported mpi4py and runs with more than one rank."""
    import sys

    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return None
    return mpi.COMM_WORLD if mpi.COMM_WORLD.Get_size() > 1 else None


def abort_other_ranks(code: int, traceback: bool = False) -> None:
    """After this rank failed, end the whole MPI job.

    A rank that returns with an error leaves the others waiting forever in the next
    gather or barrier; ``MPI_Abort`` ends them all (after printing the current exception's
    traceback when ``traceback``). Does nothing without MPI or with one rank.
    """
    import sys
    import time

    world = _live_world()
    if world is None:
        return
    if traceback:
        import traceback as tb

        tb.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    # The launcher forwards a rank's output asynchronously, and MPI_Abort tears the job
    # down at once: without a pause the error line just printed was sometimes lost
    # (1 run in 6 of the one-rank-fails test under load, before this pause).
    time.sleep(ABORT_GRACE_S)
    world.Abort(code)


#: Seconds a failing rank leaves the launcher to forward its output before the abort.
ABORT_GRACE_S = 0.5


#: Seconds a rank other than 0 waits before printing its error (see :func:`print_error`).
ERROR_DELAY_S = 3.0


def print_error(message: str) -> None:
    """Print a one-line error to stderr once per MPI job, not once per rank.

    An error every rank meets (a bad parameter file, a missing input, found by each rank's
    preflight) is printed by rank 0, whose :func:`abort_other_ranks` then ends the others
    while they wait :data:`ERROR_DELAY_S` before printing. An error only one rank meets is
    still printed after that wait, prefixed with the rank. Without MPI it prints at once.
    """
    import sys
    import time

    world = _live_world()
    if world is not None and world.Get_rank() != 0:
        sys.stdout.flush()
        time.sleep(ERROR_DELAY_S)
        message = f"(rank {world.Get_rank()}) {message}"
    print(message, file=sys.stderr)


def print_warnings(warnings) -> None:
    """Print a parameter file's warnings (``warning: …`` lines) on stderr, by rank 0 only
    under MPI: every rank reads the same file."""
    import sys

    if launcher_rank() == 0:
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)


def launcher_rank() -> int:
    """This process's rank as the MPI launcher's environment gives it (0 without one): for
    messages printed before MPI is initialised, such as the parameter file's warnings."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process (so mpi4py can initialise)."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


def world(force: bool | None = None) -> Comm:
    """The MPI world, or a single-process :class:`Comm` without MPI.

    ``force=True`` requires MPI (an error if mpi4py is missing); ``None`` uses MPI only
    when the process was started by a launcher.
    """
    if force is False or (force is None and not launched_by_mpi()):
        return Comm()
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise NfjaxError("started under an MPI launcher but mpi4py is not installed: "
                         "pip install 'nfjax[mpi]' (or mpi4py against the site MPI)") from exc
    comm = MPI.COMM_WORLD
    return Comm(rank=comm.Get_rank(), size=comm.Get_size(), mpi=comm)


def local_device(comm: Comm | None = None, platform: str | None = None):
    """The JAX device this rank should use: ranks on one node take its devices in turn.
    A ``platform`` JAX cannot give (``gpu`` on a CPU-only install) is a one-line error."""
    import jax

    try:
        devices = jax.devices(platform) if platform else jax.devices()
    except RuntimeError:
        raise NfjaxError(f"--device {platform}: no {platform} device is available to JAX "
                         f"(found {', '.join(sorted({d.platform for d in jax.devices()}))})"
                         ) from None
    return devices[(comm.rank if comm is not None else 0) % len(devices)]
