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
    #: This rank among the ranks on its node, and how many ranks share the node.
    local_rank: int = 0
    local_size: int = 1
    #: Whether every rank on the node was given the same ``CUDA_VISIBLE_DEVICES``.
    same_gpus_on_node: bool = True

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
        if self.mpi is None:
            return value
        self.barrier()           # wait asleep: MPI's broadcast spins while rank 0 works
        return self.mpi.bcast(value, root=0)

    def share(self, value, chunk: int = 1 << 30, root: int = 0):
        """Rank ``root``'s ``value`` (default rank 0's) on every rank (other ranks pass
        anything, e.g. ``None``).

        Any picklable object; its NumPy arrays travel as raw buffers (pickle protocol 5,
        out of band; a read-only array arrives read-only), in pieces of at most ``chunk``
        bytes, so a multi-GB observation volume needs no pickled copy and no message over
        MPI's 2 GiB count limit. Ranks other than 0 thereby never read a file rank 0 has
        just written: on a shared file system seen from another node that can be a stale
        copy (NFS caches attributes)."""
        if self.mpi is None:
            return value
        import pickle

        from mpi4py import MPI

        self.barrier()           # wait asleep: MPI's broadcast spins while rank 0 works
        raws = []
        sender = self.rank == root
        if sender:
            buffers = []
            head = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
            raws = [b.raw() for b in buffers]
            header = (head, [r.nbytes for r in raws])
        head, sizes = self.mpi.bcast(header if sender else None, root=root)
        received = []
        for k, size in enumerate(sizes):
            buf = raws[k] if sender else bytearray(size)
            view = memoryview(buf).cast("B")
            for start in range(0, size, chunk):
                self.mpi.Bcast([view[start:start + chunk], MPI.BYTE], root=root)
            received.append(buf)
        return value if sender else pickle.loads(head, buffers=received)

    def gather_all(self, value) -> list:
        """Every rank's ``value`` in rank order, on every rank (each sent as
        :meth:`share` sends rank 0's: large arrays in pieces, without a pickled copy)."""
        if self.mpi is None:
            return [value]
        return [self.share(value if r == self.rank else None, root=r)
                for r in range(self.size)]

    def allgather_rows(self, rows: np.ndarray) -> np.ndarray:
        """Every rank's ``rows`` concatenated in rank order, on every rank."""
        if self.mpi is None:
            return rows
        return np.concatenate(self.gather_all(rows), axis=0)

    def or_words(self, words: np.ndarray, ranges, chunk: int = 1 << 24) -> None:
        """Bitwise OR of every rank's uint32 ``words`` in the word ``ranges``
        (``[(start, stop), ...]``), in place on every rank, in pieces of at most ``chunk``
        words (64 MiB: MPICH's in-place reduction takes a scratch buffer of a piece's
        size). Ranks that lit disjoint frames of an observation
        volume thereby all hold the whole volume; a word two ranks share at a frame
        boundary gets both ranks' bits."""
        if self.mpi is None:
            return
        from mpi4py import MPI

        if words.dtype != np.uint32 or not words.flags.c_contiguous:
            raise ValueError("or_words needs a contiguous uint32 array")
        self.barrier()
        for start, stop in ranges:
            for s in range(int(start), int(stop), chunk):
                piece = words[s:min(int(stop), s + chunk)]
                self.mpi.Allreduce(MPI.IN_PLACE, [piece, MPI.UINT32_T], op=MPI.BOR)

    def gather(self, value) -> list | None:
        """Every rank's ``value`` (a small Python object) in rank order on rank 0; ``None``
        elsewhere."""
        return [value] if self.mpi is None else self.mpi.gather(value, root=0)

    def barrier(self) -> None:
        """Wait for every rank, sleeping between polls: MPI's blocking barrier spins a core
        at 100 % (MPICH), which on a shared node takes CPU from the rank everyone waits
        for (rank 0 writing files or reading a resumed stage, a rank fitting a larger
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


def launcher_size() -> int:
    """How many processes the launcher started, as its environment says (1 without one):
    ``mpiexec``'s PMI or Open MPI variables, or the task count of a Slurm ``srun`` step (a
    batch script itself has ``SLURM_NTASKS`` but no step task count)."""
    sizes = [1]
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit():
            sizes.append(int(value))
    value = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    if value.isdigit() and "SLURM_PROCID" in os.environ:
        sizes.append(int(value))
    return max(sizes)


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process (so mpi4py can initialise)."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


def world(force: bool | None = None) -> Comm:
    """The MPI world, or a single-process :class:`Comm` without MPI.

    ``force=True`` requires MPI (an error if mpi4py is missing); ``None`` uses MPI only
    when the process was started by a launcher.
    """
    if force is None and os.environ.get("NFJAX_MPI", "").lower() in ("off", "0", "no"):
        force = False                     # each process runs on its own, by request
    started = launcher_size()
    if force is False or (force is None and not launched_by_mpi() and started == 1):
        return Comm()
    why = (f"started as one of {started} processes" if started > 1
           else "started under an MPI launcher")
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise NfjaxError(f"{why} but mpi4py is not installed (each process would redo the "
                         "whole run and write the same files): pip install 'nfjax[mpi]' (or "
                         "mpi4py against the site MPI); NFJAX_MPI=off runs each process on "
                         "its own") from exc
    if started > 1 and MPI.COMM_WORLD.Get_size() == 1:
        raise NfjaxError(f"{why} but MPI sees this one alone, so each would redo the whole "
                         "run and write the same files: mpi4py's MPI is not the launcher's "
                         "(under Slurm, srun --mpi=pmix or pmi2 as the site's MPI needs; "
                         "or mpiexec from the MPI mpi4py was built with); NFJAX_MPI=off runs "
                         "each process on its own")
    global _WORLD
    if _WORLD is None:
        # Once per process: splitting by node is a collective call, which every rank must
        # make the same number of times.
        comm = MPI.COMM_WORLD
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)      # the ranks that share this node
        listed = node.allgather(os.environ.get("CUDA_VISIBLE_DEVICES"))
        _WORLD = Comm(rank=comm.Get_rank(), size=comm.Get_size(), mpi=comm,
                      local_rank=node.Get_rank(), local_size=node.Get_size(),
                      same_gpus_on_node=len(set(listed)) == 1)
        node.Free()
    return _WORLD


_WORLD: Comm | None = None


# --------------------------------------------------------------------------- devices
#: The share of a GPU's memory JAX preallocates by default.
JAX_GPU_FRACTION = 0.75

#: Variables of JAX's GPU allocator; when the user sets any, nfjax leaves memory alone.
_MEMORY_VARS = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION",
                "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR")

_NVIDIA_PROC = "/proc/driver/nvidia/gpus"


def visible_gpus(environ=None, proc: str = _NVIDIA_PROC) -> int | None:
    """How many NVIDIA GPUs this process can see, found without starting CUDA (JAX's GPU
    client, once started, takes memory on every GPU it sees): from ``CUDA_VISIBLE_DEVICES``
    (which CUDA reads up to its first invalid entry), else the driver's list of GPUs;
    ``None`` when neither says (no NVIDIA driver)."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        n = 0
        for entry in listed.split(","):
            entry = entry.strip()
            if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
                break
            n += 1
        return n
    try:
        return len(os.listdir(proc))
    except OSError:
        return None


@dataclass(frozen=True)
class GpuPlan:
    """Which GPU of its node a rank takes before JAX starts: ``ordinal`` (among the GPUs
    the rank sees; ``None``: leave JAX's choice), how many ranks share that GPU at most,
    and the memory fraction each preallocates (``None``: JAX's default or the user's)."""

    ordinal: int | None = None
    n_gpus: int | None = None
    sharing: int = 1
    mem_fraction: float | None = None


def plan_gpus(local_rank: int, local_size: int, n_gpus: int | None, same_list: bool = True,
              environ=None) -> GpuPlan:
    """The GPU for rank ``local_rank`` of the ``local_size`` ranks on a node that sees
    ``n_gpus`` GPUs: ranks take the GPUs in turn (JAX's own rule for multi-process jobs).
    When ranks must share a GPU, each preallocates an equal part of JAX's 75 % instead of
    75 % each, which would leave the later ranks without memory (JAX then starts them on
    the CPU). Ranks the scheduler gave GPUs of their own are left alone: ``same_list``
    false (the node's ranks were given different ``CUDA_VISIBLE_DEVICES``) or Slurm's
    ``--gpus-per-task`` (``SLURM_GPUS_PER_TASK``)."""
    environ = os.environ if environ is None else environ
    if (local_size <= 1 or not n_gpus or not same_list
            or environ.get("SLURM_GPUS_PER_TASK")):
        return GpuPlan(n_gpus=n_gpus)
    sharing = -(-local_size // n_gpus)
    fraction = None
    if sharing > 1 and not any(var in environ for var in _MEMORY_VARS):
        fraction = int(JAX_GPU_FRACTION / sharing * 1000) / 1000
    return GpuPlan(ordinal=local_rank % n_gpus, n_gpus=n_gpus, sharing=sharing,
                   mem_fraction=fraction)


def _jax_started() -> bool:
    """Whether JAX has started: created its backends (after which the visible devices are
    fixed) or loaded its GPU plugin (which reads the memory fraction). ``False`` when this
    JAX cannot say: the settings made then are harmless if it had started."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized()
                    or getattr(xla_bridge, "_plugins_registered", False))
    except (ImportError, AttributeError):
        return False


def bind_device(comm: Comm | None = None, platform: str | None = None):
    """The JAX device this rank uses, and a line describing it for the log.

    * ``platform="cpu"``: JAX is started with the CPU only, so it takes no GPU memory.
    * Several ranks on a node (MPI): before JAX starts, each rank is limited to one GPU,
      the ranks of the node taking its GPUs in turn (``GpuPlan``); ranks sharing a GPU
      split its memory. If JAX has already started, the rank takes device
      ``local_rank % n`` of those it sees.
    * A ``platform`` JAX cannot give (``gpu`` on a CPU-only install) is a one-line error.
    """
    import jax

    comm = comm or Comm()
    plan = GpuPlan()
    if not _jax_started():
        if platform == "cpu":
            jax.config.update("jax_platforms", "cpu")
        elif comm.local_size > 1 and jax.config.values["jax_cuda_visible_devices"] == "all":
            plan = plan_gpus(comm.local_rank, comm.local_size, visible_gpus(),
                             comm.same_gpus_on_node)
            if plan.ordinal is not None:
                jax.config.update("jax_cuda_visible_devices", str(plan.ordinal))
            if plan.mem_fraction is not None:
                os.environ["XLA_CLIENT_MEM_FRACTION"] = f"{plan.mem_fraction:.3f}"
    if not platform:
        devices = jax.devices()
    else:
        try:
            devices = jax.devices(platform)
        except RuntimeError:
            found = ", ".join(sorted({d.platform for d in jax.devices()}))
            raise NfjaxError(f"--device {platform}: no {platform} device is available to "
                             f"JAX (found {found})") from None
    device = devices[comm.local_rank % len(devices)]
    where = f"{device.platform} device {device.id}"
    if plan.ordinal is not None and device.platform != "cpu":
        where = f"{device.platform} {plan.ordinal} of the node's {plan.n_gpus}"
        if plan.sharing > 1:
            share = (f", {plan.mem_fraction:.3f} of its memory" if plan.mem_fraction
                     else "")
            where += f" (shared by up to {plan.sharing} ranks{share})"
    elif (device.platform == "cpu" and platform is None and visible_gpus()
          and not jax.config.values["jax_platforms"]):
        where += (" although NVIDIA GPUs are present: JAX did not start its CUDA backend "
                  "(a CPU-only jaxlib? pip install 'nfjax[cuda12]')")
    return device, where


def device_scope(platform: str | None):
    """A context that makes :func:`bind_device`'s device for ``platform`` (``"cpu"``,
    ``"gpu"``) JAX's default device; with ``None``, a context that changes nothing (JAX's
    first available device)."""
    import contextlib

    if platform is None:
        return contextlib.nullcontext()
    import jax

    return jax.default_device(bind_device(None, platform)[0])
