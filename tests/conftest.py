"""Shared test fixtures: paths to the reference data and the bundled fixtures."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

import nfjax  # noqa: F401  (turns on x64 before any test builds arrays)

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "tests" / "data"
SHARED = Path(os.environ.get("NFJAX_SHARED_DATA", ROOT.parent / "shared" / "data"))
MIDAS_AU = SHARED / "midas-au"
REF_RUN = MIDAS_AU / "reference-run"
FFBIDX = SHARED / "ffbidx-simple"

# JAX's persistent compilation cache (nfjax.jaxcache), in the checkout rather than the
# user's home: the CLI commands the tests run turn it on, so the library tests share it too.
# Cached programs are the ones a fresh compile makes; NFJAX_CACHE_DIR=off runs without.
os.environ.setdefault("NFJAX_CACHE_DIR", str(ROOT / ".pytest_cache" / "nfjax-jax"))
from nfjax import jaxcache  # noqa: E402

jaxcache.enable()


def need_mpiexec(why: str = "MPI test") -> str:
    """The ``mpiexec`` next to the Python executable (the venv's PyPI MPICH) or on PATH;
    skips the test without mpi4py or an ``mpiexec``."""
    pytest.importorskip("mpi4py", reason=f"{why} needs the mpi extra (pip install .[mpi])")
    candidate = Path(sys.executable).parent / "mpiexec"
    found = str(candidate) if candidate.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec on PATH or next to the Python executable")
    return found


def need(path: Path) -> Path:
    """Return ``path`` or skip the test with a clear reason if the shared data is absent."""
    if not path.exists():
        pytest.skip(f"reference data not available: {path} (set NFJAX_SHARED_DATA)")
    return path


@pytest.fixture
def ref_run() -> Path:
    return need(REF_RUN)


@pytest.fixture
def midas_au() -> Path:
    return need(MIDAS_AU)


@pytest.fixture
def ffbidx_data() -> Path:
    return need(FFBIDX)


@pytest.fixture(scope="session")
def au_window():
    """A small solid sample: the 104 bundled Au voxels within 8 um of the centre (two
    grains), rendered as their 2.5 um grid triangles."""
    import numpy as np

    from nfjax.crystal import hkls_from_params, select_rings
    from nfjax.data import au_example
    from nfjax.geometry import geometry_from_params
    from nfjax.io.mic import read_mic
    from nfjax.params import read_params
    from nfjax.simulate import select_rendered, simulate_records

    files = au_example()
    params = read_params(files["params"])
    mic = select_rendered(read_mic(files["mic"]).records, params.min_confidence)
    win = mic[(np.abs(mic[:, 3]) < 8) & (np.abs(mic[:, 4]) < 8)]
    solid = win.copy()
    solid[:, 5] = 2.5
    hkls = hkls_from_params(params)
    vol = simulate_records(params, solid, hkls, progress=False)
    return dict(params=params, records=win, vol=vol, geom=geometry_from_params(params),
                table=select_rings(hkls, params.rings_to_use),
                text=files["params"].read_text())


@pytest.fixture(autouse=True)
def _once_per_process_messages_start_untold(monkeypatch):
    """Warnings told once per process (a budget below the smallest chunk, frames decoded
    whole) start untold in every test, so that what a test sees does not depend on which
    tests ran before it in the same worker."""
    from nfjax import errors

    monkeypatch.setattr(errors, "_said", set())
