"""The one place for chunking: chunk sizes from a memory budget, and chunked mapping."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import nfjax  # noqa: F401
from nfjax.chunking import bucket, chunk_size, map_chunked, parse_memory
from nfjax.errors import NfjaxError


def test_parse_memory_units_and_errors():
    assert parse_memory("8GB") == 8 << 30
    assert parse_memory("512M") == 512 << 20
    assert parse_memory("1.5GiB") == 3 << 29
    assert parse_memory(1234) == 1234 and parse_memory(None) is None
    with pytest.raises(NfjaxError, match=r"--max-memory: expected a size .* found '8 parsecs'"):
        parse_memory("8 parsecs")
    with pytest.raises(NfjaxError, match="expected a positive size"):
        parse_memory("0MB")


def test_chunk_size_budget_multiple_maximum():
    # 1 MiB budget, 1000 bytes per item -> 1048 items, rounded down to a multiple of 8.
    assert chunk_size(10**6, 1000, "1MiB", multiple=8) == 1048
    assert chunk_size(10**6, 1000, "1MiB", maximum=100) == 100
    # never more than needed, rounded up to the bucket ladder
    assert chunk_size(37, 1000, "1MiB") == 64
    assert chunk_size(1000, 1000, "1MiB") == 1024
    assert chunk_size(1000, 1000, "1000KB") == 1024           # the budget still bounds it
    assert chunk_size(1000, 1000, "900KB") == 921
    assert chunk_size(10, 10**9, "1MiB") == 1                 # at least one item
    assert chunk_size(10, 10**9, "1MiB", multiple=8) == 8


def test_bucket_ladder():
    """Sizes that follow the data are padded to a fixed ladder, so nearby sizes share one
    compiled program: powers of two up to 64, then eight steps per octave."""
    assert [bucket(n) for n in (0, 1, 2, 3, 5, 17, 33, 64)] == [1, 1, 2, 4, 8, 32, 64, 64]
    assert [bucket(n) for n in (65, 72, 73, 129, 132, 1000, 4097)] == [
        72, 72, 80, 144, 144, 1024, 4608]
    sizes = np.arange(1, 20000)
    up = np.array([bucket(n) for n in sizes])
    assert np.all(up >= sizes) and np.all(np.diff(up) >= 0)
    assert np.all(up[sizes > 64] <= 1.125 * sizes[sizes > 64])      # at most 12.5 % padding
    # 7 sizes up to 64, 8 in each octave to 16384, and 18432, 20480
    assert len(np.unique(up)) == 7 + 8 * 8 + 2


def test_budget_below_one_unit_warns_once(capsys, monkeypatch):
    import nfjax.errors as errors

    monkeypatch.setattr(errors, "_said", set())
    assert chunk_size(10, 3 << 20, "1MiB") == 1                  # one unit of 3 MB
    err = capsys.readouterr().err
    assert err.strip() == ("warning: --max-memory 1 MB is below the smallest chunk of this "
                           "work (3 MB): it runs one unit at a time, above the budget; give "
                           "at least that")
    assert chunk_size(10, 3 << 20, "1MiB") == 1
    assert chunk_size(10, 1000, "1MiB") == 16                    # within the budget
    assert capsys.readouterr().err == ""                          # said once


def test_a_unit_larger_than_the_free_memory_is_an_error():
    """One item that alone needs more than the device has free is refused, naming what an
    item is, instead of running into the allocator's abort or the OOM killer; a budget
    merely below one item still runs with a warning (above)."""
    from nfjax.chunking import device_free_bytes
    free = device_free_bytes()
    with pytest.raises(NfjaxError, match=r"^one voxel of the test needs .* of memory at a "
                                         r"time, more than the .* free on "):
        chunk_size(10, 2 * free, what="one voxel of the test")
    with pytest.raises(NfjaxError, match=r"^one item of this work needs "):
        chunk_size(10, free // 4 + 1, "1KB", multiple=8)
    assert chunk_size(1, free // 3, None) == 1       # above the half-free budget: runs


def test_chunk_size_cpu_waves():
    """On the CPU backend a lockstep pool holds at most n/cpu_waves items (≥ minimum)."""
    assert jax.devices()[0].platform == "cpu"
    assert chunk_size(3068, 1, "1GiB", maximum=1024, multiple=8, cpu_waves=8,
                      minimum=64) == 384
    assert chunk_size(100, 1, "1GiB", maximum=1024, multiple=8, cpu_waves=8,
                      minimum=64) == 64
    assert chunk_size(10**6, 1, "1GiB", maximum=1024, multiple=8, cpu_waves=8) == 1024


def test_map_chunked_pads_and_trims():
    calls = []

    def fn(a, b):
        calls.append(a.shape[0])
        return a * 2 + b

    a = np.arange(10.0)
    parts = map_chunked(fn, [a, np.ones(10)], 4, progress=False)
    assert calls == [4, 4, 4]                              # the tail is padded to 4
    np.testing.assert_array_equal(np.concatenate(parts), a * 2 + 1)


def test_log_progress_lines_for_batch_jobs():
    """Without a terminal, long work prints a plain line every interval with done/total,
    rate and ETA, and a closing line; work that ends within the interval prints nothing."""
    import io

    from nfjax.chunking import LogProgress

    now = [0.0]
    out = io.StringIO()
    with LogProgress(1000, "screen", "pair", interval=60, clock=lambda: now[0],
                     file=out) as bar:
        for _ in range(4):
            now[0] += 30.0
            bar.update(100)          # 100 pairs per 30 s
    assert out.getvalue().splitlines() == [
        "screen: 200/1.00k pairs (20 %), 3.33 pairs/s, ETA 04:00",
        "screen: 400/1.00k pairs (40 %), 3.33 pairs/s, ETA 03:00",
        "screen: 400/1.00k pairs (40 %), 3.33 pairs/s, done in 02:00"]
    quiet = io.StringIO()
    with LogProgress(10, "spots", "frame", interval=60, clock=lambda: now[0],
                     file=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""


def test_progress_bar_choice(monkeypatch):
    from nfjax.chunking import LogProgress, progress_bar

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    for var in ("NFJAX_PROGRESS", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK",
                "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(progress_bar(10, "fit", "voxel"), LogProgress)       # a batch log
    assert progress_bar(10, "fit", "voxel", False).disable                 # asked: none
    assert not progress_bar(10, "fit", "voxel", True).disable              # asked: a bar
    monkeypatch.setenv("NFJAX_PROGRESS", "0")
    assert progress_bar(10, "fit", "voxel").disable
    monkeypatch.setenv("NFJAX_PROGRESS", "1")
    assert not progress_bar(10, "fit", "voxel").disable
    monkeypatch.delenv("NFJAX_PROGRESS")
    monkeypatch.setenv("PMI_RANK", "3")                                    # MPI rank 3
    assert progress_bar(10, "fit", "voxel").disable


def test_default_device_follows_jax_default_device():
    """The memory budget and the CPU rule look at the device JAX computes on: a rank bound
    to its device after JAX started (jax_default_device) is not measured on device 0."""
    script = """
import jax
from nfjax.chunking import default_device
first, second = jax.devices()
assert default_device() is first
jax.config.update("jax_default_device", second)
assert default_device() is second
jax.config.update("jax_default_device", "cpu")
assert default_device() is first
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu",
                               "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
