"""Which device each MPI rank takes (nfjax.parallel): the GPU plan is decided before JAX
starts, from the node's rank count and the GPUs the process can see."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import need_mpiexec
from nfjax.parallel import GpuPlan, block_range, plan_gpus, visible_gpus


@pytest.mark.parametrize("listed, expected", [
    ("0,1,2,3", 4),
    ("2", 1),
    ("", 0),                        # CUDA sees no GPU
    ("-1", 0),
    ("1,-1,2", 1),                  # CUDA stops at the first invalid entry
    ("0, 1", 2),
    ("GPU-8d0c4e1a,GPU-77aa01", 2),
    ("MIG-5c3a", 1),
])
def test_visible_gpus_from_cuda_visible_devices(tmp_path, listed, expected):
    driver = tmp_path / "gpus"
    driver.mkdir()
    for k in range(8):                                # the variable wins over the driver
        (driver / f"0000:{k:02x}:00.0").mkdir()
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": listed}, str(driver)) == expected


def test_visible_gpus_from_the_driver(tmp_path):
    driver = tmp_path / "gpus"
    driver.mkdir()
    for k in range(4):
        (driver / f"0000:{k:02x}:00.0").mkdir()
    assert visible_gpus({}, str(driver)) == 4
    assert visible_gpus({}, str(tmp_path / "absent")) is None     # no NVIDIA driver


def test_plan_gpus_one_rank_per_gpu():
    """4 ranks on a node with 4 GPUs: rank k takes GPU k with JAX's default memory."""
    plans = [plan_gpus(k, 4, 4, True, {}) for k in range(4)]
    assert [p.ordinal for p in plans] == [0, 1, 2, 3]
    assert all(p.sharing == 1 and p.mem_fraction is None for p in plans)


def test_plan_gpus_ranks_share_gpus():
    """8 ranks, 4 GPUs: two ranks per GPU, each preallocating half of JAX's 75 %; 5 ranks
    on 2 GPUs: three on GPU 0, so each gets a quarter (0.25), rounded down."""
    plans = [plan_gpus(k, 8, 4, True, {}) for k in range(8)]
    assert [p.ordinal for p in plans] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert {(p.sharing, p.mem_fraction) for p in plans} == {(2, 0.375)}
    assert plan_gpus(4, 5, 2, True, {}) == GpuPlan(ordinal=0, n_gpus=2, sharing=3,
                                                   mem_fraction=0.25)
    one = plan_gpus(1, 2, 1, True, {})    # CUDA_VISIBLE_DEVICES=0 mpiexec -n 2: one GPU
    assert (one.ordinal, one.sharing, one.mem_fraction) == (0, 2, 0.375)


def test_plan_gpus_respects_the_user_and_the_scheduler():
    # The user's own memory setting is kept.
    for var in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION",
                "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR"):
        plan = plan_gpus(3, 8, 4, True, {var: "x"})
        assert (plan.ordinal, plan.mem_fraction) == (3, None)
    # GPUs of their own per rank: different CUDA_VISIBLE_DEVICES on the node's ranks, or
    # Slurm's --gpus-per-task (which may show every rank its GPUs as "0,1").
    assert plan_gpus(1, 4, 2, False, {}) == GpuPlan(n_gpus=2)
    assert plan_gpus(1, 4, 2, True, {"SLURM_GPUS_PER_TASK": "2"}) == GpuPlan(n_gpus=2)
    # One rank on the node, or no GPU: nothing to decide.
    assert plan_gpus(0, 1, 4, True, {}).ordinal is None
    assert plan_gpus(1, 2, 0, True, {}).ordinal is None
    assert plan_gpus(1, 2, None, True, {}).ordinal is None


_BIND = """
import json, os, sys
import jax
from nfjax.parallel import Comm, bind_device
if sys.argv[1] == "started":
    jax.devices()
comm = Comm(rank=5, size=8, local_rank=5, local_size=6)
device, where = bind_device(comm, None if sys.argv[2] == "-" else sys.argv[2])
print(json.dumps({"visible": jax.config.values["jax_cuda_visible_devices"],
                  "platforms": jax.config.values["jax_platforms"],
                  "fraction": os.environ.get("XLA_CLIENT_MEM_FRACTION"),
                  "platform": device.platform, "where": where}))
"""


def _bind(started: str, platform: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("JAX_PLATFORMS", "XLA_CLIENT_MEM_FRACTION")}
    environ.update(env)
    proc = subprocess.run([sys.executable, "-c", _BIND, started, platform],
                          capture_output=True, text=True, timeout=120, env=environ)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bind_device_limits_the_rank_before_jax_starts():
    """Rank 5 of the 6 on a node with 4 GPUs, in a fresh process: JAX is limited to GPU 1,
    and each of the two ranks on that GPU preallocates 0.375 of it. (This machine has no
    GPU, so the rank runs on the CPU; the settings are what a GPU node's JAX reads.)"""
    got = _bind("fresh", "-", CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert (got["visible"], got["fraction"]) == ("1", "0.375")
    assert got["platform"] == "cpu"
    # The log says the rank is on the CPU although GPUs were named.
    assert "although NVIDIA GPUs are present" in got["where"], got


def test_bind_device_leaves_a_started_jax_alone():
    """Once JAX has started, its devices are fixed: nothing is changed, and the rank takes
    device local_rank % n of those it sees."""
    got = _bind("started", "-", CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert (got["visible"], got["fraction"]) == ("all", None)
    assert got["platform"] == "cpu"


def test_bind_device_cpu_starts_jax_without_gpus():
    """--device cpu starts JAX with the CPU platform only, so it takes no GPU memory."""
    got = _bind("fresh", "cpu", CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert (got["platforms"], got["visible"], got["platform"]) == ("cpu", "all", "cpu")
    assert got["where"] == "cpu device 0"


def test_bind_device_keeps_jaxs_own_error():
    """Without --device, a JAX that cannot start says why itself (it used to be reworded
    as "--device None: no None device")."""
    environ = dict(os.environ, JAX_PLATFORMS="no_such_platform")
    proc = subprocess.run([sys.executable, "-c", "from nfjax.parallel import Comm, bind_device\n"
                           "bind_device(Comm(local_rank=1, local_size=2), None)"],
                          capture_output=True, text=True, timeout=120, env=environ)
    assert proc.returncode != 0
    assert "no_such_platform" in proc.stderr and "--device None" not in proc.stderr, (
        proc.stderr[-2000:])


def test_block_range_covers_every_row_once():
    for n_rows in (0, 1, 7, 100, 101):
        for n_blocks in (1, 2, 3, 8):
            rows = [r for b in range(n_blocks) for r in range(*block_range(n_rows, b, n_blocks))]
            assert rows == list(range(n_rows))


def test_share_sends_rank_0s_objects_in_pieces(tmp_path):
    """Comm.share under mpiexec -n 2: NumPy arrays (C-ordered, strided, read-only) and
    plain values arrive intact (writable unless read-only on rank 0), the arrays in
    pieces of the given size. Comm.or_words and Comm.allgather_rows (image processing's
    exchanges) in the same run."""
    mpiexec = need_mpiexec()
    script = tmp_path / "share.py"
    script.write_text("""
import numpy as np
from nfjax.parallel import world
comm = world()
def make():
    rng = np.random.default_rng(1)
    return {"a": rng.random((1000, 11)), "b": np.arange(10_001, dtype=np.uint32),
            "c": "text", "d": np.arange(12.0)[::2], "e": np.frombuffer(b"abcdefgh", np.uint8),
            "f": None}
got = comm.share(make() if comm.rank == 0 else None, chunk=4096)
want = make()
for key in "abde":
    assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key
assert got["c"] == "text" and got["f"] is None
if comm.rank == 1:
    got["a"][0, 0] = 5.0
# or_words: each rank's bits in every word of the ranges (pieces of 64 words), the
# words outside them left as they were; allgather_rows: rank order, on every rank
words = np.zeros(1000, np.uint32)
words[comm.rank::3] |= np.uint32(1 << comm.rank)
words[990:] = 100 + comm.rank
comm.or_words(words, [(0, 500), (500, 990)], chunk=64)
k = np.arange(990)
want = np.where(k % 3 == 0, 1, 0) + np.where(k % 3 == 1, 2, 0)
assert np.array_equal(words[:990], want) and (words[990:] == 100 + comm.rank).all()
rows = comm.allgather_rows(np.full((comm.rank + 1, 3), comm.rank, np.uint16))
assert rows.dtype == np.uint16 and rows.tolist() == [[0] * 3, [1] * 3, [1] * 3]
open(f"ok{comm.rank}", "w").close()
""")
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


_WORLD_SCRIPT = """
import sys
if sys.argv[1] == "no-mpi4py":
    sys.modules["mpi4py"] = None          # import mpi4py fails, as on a plain install
from nfjax.errors import NfjaxError
from nfjax.parallel import world
try:
    comm = world()
except NfjaxError as exc:
    print("error:", exc)
else:
    print("size", comm.size)
"""


def _world(case: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("PMI_", "PMIX_", "OMPI_", "MV2_", "MPI_", "HYDRA_",
                                    "SLURM_"))}
    environ.update(env, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _WORLD_SCRIPT, case], capture_output=True,
                          text=True, timeout=120, env=environ)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_processes_that_mpi_does_not_join_are_refused():
    """srun without PMI (or mpiexec of another MPI than mpi4py's) starts N processes that
    MPI sees as N single ones: each would redo the whole run and write the same files.
    That is an error before any work; a batch script's own process is not."""
    pytest.importorskip("mpi4py", reason="needs mpi4py (pip install .[mpi])")
    srun = dict(SLURM_STEP_NUM_TASKS="4", SLURM_PROCID="2", SLURM_NTASKS="4")
    out = _world("mpi4py", **srun)
    assert out.startswith("error: started as one of 4 processes but MPI sees this one alone"), out
    assert "srun --mpi=pmix" in out
    out = _world("mpi4py", OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="1")
    assert out.startswith("error: started as one of 2 processes but MPI sees"), out
    out = _world("no-mpi4py", **srun)
    assert out.startswith("error: started as one of 4 processes but mpi4py is not "
                          "installed"), out
    # The batch script itself (no srun step) and a plain process run as one process.
    assert _world("no-mpi4py", SLURM_NTASKS="4", SLURM_PROCID="0") == "size 1"
    assert _world("no-mpi4py") == "size 1"
    assert _world("mpi4py", SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0") == "size 1"
    # NFJAX_MPI=off: a task farm (srun starting independent runs) runs each on its own.
    assert _world("no-mpi4py", NFJAX_MPI="off", **srun) == "size 1"
    assert "NFJAX_MPI=off" in _world("mpi4py", **srun)


_SPOTS_SCRIPT = """
import numpy as np

from nfjax.crystal import hkls_from_params, select_rings
from nfjax.data import au_example
from nfjax.geometry import geometry_from_params
from nfjax.params import read_params
from nfjax.parallel import world
from nfjax.seeds import uniform_seeds
from nfjax.spots import _chunk, make_diffraction_spots

comm = world()
params = read_params(au_example()["params"])
table = select_rings(hkls_from_params(params), params.rings_to_use)
geom = geometry_from_params(params)
quats = uniform_seeds(225, 4.0)
budget = 37 * 2 * len(table.g) * 8 * 40          # 37 orientations a chunk
assert _chunk(len(quats), table.g, budget) == 37 and len(quats) > 4 * 37
split = make_diffraction_spots(quats, table.g, table.theta, geom, max_memory=budget,
                               progress=False, comm=comm)
one = comm.share(make_diffraction_spots(quats, table.g, table.theta, geom, progress=False)
                 if comm.rank == 0 else None)
for name in ("key", "spots", "orient"):
    a, b = getattr(split, name), getattr(one, name)
    assert a.dtype == b.dtype and np.array_equal(a, b), name
assert comm.gather_all(("rank", comm.rank)) == [("rank", r) for r in range(comm.size)]
open(f"ok{comm.rank}", "w").close()
"""


def test_ranks_share_the_spot_prediction(tmp_path):
    """make_diffraction_spots under mpiexec -n 3: each rank predicts whole chunks of the
    orientations (here chunks of 37 of a 4 deg cubic library, so the split is uneven and
    the last chunk partial) and every rank ends with the table one process computes with
    its default chunks, bit for bit."""
    mpiexec = need_mpiexec()
    script = tmp_path / "spots.py"
    script.write_text(_SPOTS_SCRIPT)
    proc = subprocess.run([mpiexec, "-n", "3", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all((tmp_path / f"ok{r}").exists() for r in range(3))
