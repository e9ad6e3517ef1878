"""The one place that splits large batches into device-sized chunks.

Owns memory budgets (parsing ``--max-memory 8GB``, reading free device/host memory), the
chunk-size rule, and :func:`map_chunked`, which runs a jitted per-chunk function over a
batch axis with a fixed chunk shape (the last chunk is padded, so there is exactly one
compilation) and a progress bar with rate and ETA. Nothing else in nfjax picks chunk sizes.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np

from nfjax.errors import NfjaxError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20,
          "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30,
          "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_memory(text: str | int | None, what: str = "--max-memory") -> int | None:
    """``"8GB"``, ``"512M"``, ``"1.5GiB"`` or a byte count → bytes (binary units)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise NfjaxError(f"{what}: expected a size such as 8GB or 512MB, found {text!r}")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise NfjaxError(f"{what}: expected a positive size, found {text!r}")
    return int(value)


def host_available_bytes() -> int:
    """Available host memory (``MemAvailable``), or 4 GiB when it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def default_device():
    """The device JAX computes on by default: ``jax_default_device`` when set (an MPI rank
    bound to its GPU after JAX had started, :func:`nfjax.parallel.bind_device`), else the
    first device."""
    chosen = jax.config.values.get("jax_default_device")
    if chosen is None:
        return jax.devices()[0]
    return jax.devices(chosen)[0] if isinstance(chosen, str) else chosen


def device_free_bytes(device=None) -> int:
    """Free memory of ``device`` (default: JAX's default device).

    Accelerators report their allocator statistics; on the CPU the device memory is host
    memory, so the host's available memory is used.
    """
    device = device or default_device()
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without statistics
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return host_available_bytes()


def bucket(n: int) -> int:
    """``n`` rounded up to the next size of a fixed ladder: powers of two up to 64, then
    eight sizes per octave (72, 80, ..., 128, 144, ...: at most 12.5 % more than ``n``).

    Every compiled kernel is specialised to its array shapes, so work whose size follows
    the data (the winners of a pass, the voxels of a grid) would otherwise compile again
    for each new size: 1.5-3 s per kernel on a CPU, 26 compilations in one small
    multi-resolution run. Padded to the ladder, nearby sizes share one program (within a
    run, and across runs through the compilation cache)."""
    n = int(n)
    if n <= 1:
        return 1
    if n <= 64:
        return 1 << (n - 1).bit_length()
    step = 1 << ((n - 1).bit_length() - 4)
    return -(-n // step) * step


def chunk_size(n_items: int, bytes_per_item: int, max_memory: int | str | None = None,
               *, device=None, fraction: float = 0.5, multiple: int = 1,
               maximum: int | None = None, cpu_waves: int = 1, minimum: int = 1,
               what: str = "one item of this work") -> int:
    """Items per chunk so that ``chunk · bytes_per_item`` fits the budget.

    The budget is ``max_memory`` if given, else ``fraction`` of the free device memory.
    The result is at least 1 (at least ``multiple``), a multiple of ``multiple``, at most
    ``maximum`` and never larger than ``n_items`` rounded up to :func:`bucket` (the padded
    tail then lets nearby sizes share a compiled program). On the CPU backend it is
    also at most ``n_items / cpu_waves`` (bucketed, but not below ``minimum``): for lockstep pools,
    where an idle slot costs as much as a busy one on a CPU but nothing extra on a GPU.
    The smallest chunk needing more than the device has free is an :class:`NfjaxError`
    naming ``what`` an item is (it would be killed or abort the process instead).
    """
    budget = parse_memory(max_memory)
    if budget is None:
        budget = int(device_free_bytes(device) * fraction)
    smallest = int(bytes_per_item) * max(1, multiple)
    if smallest > budget:
        free = device_free_bytes(device)
        if smallest > free:
            from nfjax.errors import NfjaxError

            raise NfjaxError(f"{what} needs {format_bytes(smallest)} of memory at a time, "
                             f"more than the {format_bytes(free)} free on "
                             f"{device or default_device()}")
    n = max(1, budget // max(1, int(bytes_per_item)))
    if maximum is not None:
        n = min(n, maximum)
    n = min(n, bucket(n_items))
    if cpu_waves > 1 and (device or default_device()).platform == "cpu":
        n = min(n, max(minimum, bucket(-(-n_items // cpu_waves))))
    if multiple > 1:
        n = max(multiple, (n // multiple) * multiple)
    if max_memory is not None and n * bytes_per_item > budget:
        warn_below_budget(budget, n * bytes_per_item)
    return int(n)


def warn_below_budget(budget: int, smallest: int) -> None:
    """Say once per process that ``--max-memory`` is below the smallest chunk of some work,
    which then runs one unit at a time above the budget (slowly)."""
    from nfjax.errors import warn_once

    warn_once("below-budget", f"warning: --max-memory {format_bytes(budget)} is below the "
              f"smallest chunk of this work ({format_bytes(smallest)}): it runs one unit at "
              "a time, above the budget; give at least that")


def format_bytes(n: int) -> str:
    """A byte count for messages: '1.5 GB', '200 MB', '12 B'."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def progress_bar(total: int, desc: str, unit: str, enabled: bool | None = None):
    """Progress with rate and ETA on stderr: a tqdm bar on a terminal (or ``enabled``
    True, or ``NFJAX_PROGRESS=1``); elsewhere (a batch job's log) a plain line every
    ``NFJAX_PROGRESS_INTERVAL`` seconds (default 60; none for work that ends sooner), from
    MPI rank 0 only; nothing with ``enabled`` False or ``NFJAX_PROGRESS=0``."""
    from tqdm import tqdm

    setting = os.environ.get("NFJAX_PROGRESS", "")
    if enabled is None and setting != "0" and not (sys.stderr.isatty() or setting == "1"):
        from nfjax.parallel import launcher_rank

        if launcher_rank() != 0:
            enabled = False
        else:
            interval = float(os.environ.get("NFJAX_PROGRESS_INTERVAL", "") or 60.0)
            return LogProgress(total, desc, unit, interval)
    if enabled is None:
        enabled = setting != "0"
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, unit_scale=True, mininterval=0.5)


class LogProgress:
    """tqdm's ``update``/``close`` for a log file: one plain line (done of total, rate,
    ETA) each time ``interval`` seconds have passed since the last, and a closing line if
    any was printed."""

    def __init__(self, total: int, desc: str, unit: str, interval: float = 60.0,
                 clock: Callable[[], float] | None = None, file=None):
        import time

        self.total, self.desc, self.unit, self.interval = int(total), desc, unit, interval
        self.clock = clock or time.monotonic
        self.file = file or sys.stderr
        self.n = 0
        self.start = self.last = self.clock()
        self.printed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def _line(self, now: float, done: bool = False) -> None:
        from tqdm import tqdm

        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        size = lambda x: tqdm.format_sizeof(x, divisor=1000).strip()   # noqa: E731
        text = f"{self.desc}: {size(self.n)}/{size(self.total)} {self.unit}s"
        if self.total:
            text += f" ({100.0 * self.n / self.total:.0f} %)"
        text += f", {size(rate)} {self.unit}s/s"
        if done:
            text += f", done in {tqdm.format_interval(elapsed)}"
        elif rate > 0 and self.total:
            text += f", ETA {tqdm.format_interval((self.total - self.n) / rate)}"
        print(text, file=self.file, flush=True)
        self.printed = True

    def close(self) -> None:
        if self.printed:
            self.printed = False
            self._line(self.clock(), done=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pad_to(x: np.ndarray | jax.Array, n: int):
    """Pad axis 0 of ``x`` to length ``n`` by repeating its last row (valid data, so the
    padded rows compute harmlessly and are dropped afterwards)."""
    extra = n - x.shape[0]
    if extra <= 0:
        return x
    tail = np.repeat(np.asarray(x[-1:]), extra, axis=0)
    return np.concatenate([np.asarray(x), tail], axis=0)


def map_chunked(fn: Callable[..., Any], arrays: Sequence[Any], chunk: int, *,
                desc: str = "", unit: str = "it", progress: bool | None = None,
                collect: Callable[[Any, int], Any] | None = None,
                units_per_item: int = 1) -> list:
    """Apply ``fn(*chunk_arrays)`` to consecutive chunks of axis 0 of ``arrays``.

    Every call sees exactly ``chunk`` rows (the tail is padded), so a jitted ``fn`` compiles
    once. ``collect(output, n_valid)`` turns each chunk's output into what is kept (default:
    ``jax.device_get`` of the output trimmed to the valid rows); the list of kept values is
    returned in order. ``units_per_item`` scales the progress counter (e.g. pairs/voxel).
    """
    n = int(np.shape(arrays[0])[0])
    out = []
    if n == 0:
        return out
    if collect is None:
        def collect(o, k):
            return jax.tree_util.tree_map(lambda a: np.asarray(a)[:k], jax.device_get(o))
    with progress_bar(n * units_per_item, desc, unit, progress) as bar:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            parts = [_pad_to(a[start:stop], chunk) for a in arrays]
            out.append(collect(fn(*parts), stop - start))
            bar.update((stop - start) * units_per_item)
    return out
