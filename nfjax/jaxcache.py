"""JAX's persistent compilation cache for the nfjax command line.

nfjax builds its compiled kernels per call (the geometry is baked in as constants), so
without a cache every command, and every pass of a multi-resolution run, compiles the same
programs again: a 10-voxel ``fit_grid`` spends 8 of its 8.3 s compiling. With the cache a
repeated compile is a disk read (1.1 s for that fit). The key is the compiled program
itself (shapes, constants, JAX and XLA versions), so a changed input or a new JAX compiles
afresh; results are the same either way.

Where: ``$NFJAX_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/nfjax/jax`` (``~/.cache/nfjax/jax``),
kept under 2 GiB (the oldest entries go first). ``NFJAX_CACHE_DIR=off`` turns it off;
a cache directory already configured for JAX (``JAX_COMPILATION_CACHE_DIR``) is left alone.
Library users opt in with :func:`enable`.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

MAX_BYTES = 2 * 1024**3
# Compiles shorter than this are not worth a file: reading one back costs about as much.
MIN_COMPILE_SECONDS = 0.1
_OFF = ("", "0", "off", "no", "false")


def default_dir() -> Path | None:
    """The cache directory nfjax uses, or None when ``NFJAX_CACHE_DIR`` turns it off."""
    value = os.environ.get("NFJAX_CACHE_DIR")
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nfjax" / "jax"


def _prune(directory: Path, limit: int) -> None:
    """Keep the cache under ``limit`` bytes: over it, delete the least recently modified
    entries down to three quarters of it. Used when the ``filelock`` package (not an nfjax
    dependency) is missing: JAX's own size limit and its locking need it. Without the lock,
    a process may read an entry another one is still writing; JAX then warns and compiles
    instead, with the same result."""
    try:
        entries = [(e.stat().st_mtime, e.stat().st_size, e.path) for e in os.scandir(directory)
                   if e.is_file()]
    except OSError:
        return
    total = sum(size for _, size, _ in entries)
    if total <= limit:
        return
    for _, size, name in sorted(entries):
        try:
            os.unlink(name)
        except OSError:
            continue
        total -= size
        if total <= 0.75 * limit:
            break


def enable(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache in ``path`` (default :func:`default_dir`).

    Returns the directory in use, or None when the cache is off or the directory cannot be
    created or written (nfjax then simply compiles, as without a cache).
    """
    import jax

    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    directory = Path(path) if path is not None else default_dir()
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(directory, os.W_OK | os.X_OK):
        return None
    from jax.experimental.compilation_cache import compilation_cache

    if importlib.util.find_spec("filelock") is not None:
        # JAX then locks the cache and evicts the least recently used entries itself.
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    else:
        _prune(directory, MAX_BYTES)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    # JAX decides once, at its first compile, whether a cache is in use: make it decide
    # again, in case something compiled before this call.
    compilation_cache.reset_cache()
    return directory
