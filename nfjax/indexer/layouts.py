"""Argument checking for the ffbidx-compatible API: array layouts, numbers, exceptions.

Owns the exact acceptance rules and messages of ffbidx's Python extension (reference
``ffbidx-indexer.md`` §2.1, §11.3, §11.6): float32 NumPy arrays holding all x, then all y, then
all z coordinates, as a C-contiguous ``(3, K)`` or a Fortran-contiguous ``(K, 3)`` array. It
converts accepted arrays to plain ``(K, 3)`` row-per-vector float32 copies and never copies or
converts a rejected one. Exceptions keep ffbidx's types (ValueError, RuntimeError, TypeError)
so code written for ``import ffbidx`` still catches them, and are also :class:`NfjaxError`s so
the nfjax CLI reports them as one-line user errors.
"""
from __future__ import annotations

import numbers

import numpy as np

from nfjax.errors import NfjaxError

UINT_MAX = 2**32 - 1
METHODS = ("raw", "ifss", "ifse", "ifssr")


class IndexerValueError(NfjaxError, ValueError):
    """ffbidx's ValueError (bad parameter value)."""


class IndexerRuntimeError(NfjaxError, RuntimeError):
    """ffbidx's RuntimeError (bad array layout, impossible configuration, device trouble)."""


def check_method(method) -> str:
    if method not in METHODS:
        raise IndexerValueError("method must be either raw, ifss, ifse, od ifssr")
    return method


def as_uint(value, name: str) -> int:
    """An integer argument: floats are a TypeError (as CPython's argument parsing), values
    outside [0, 2³²−1] a ValueError with ffbidx's message."""
    if isinstance(value, (float, np.floating)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: integer argument expected, got {type(value).__name__}")
    value = int(value)
    if value < 0 or value > UINT_MAX:
        raise IndexerValueError(f"{name} out of bounds for an unsigned integer")
    return value


def as_float(value, name: str) -> float:
    """A float argument: any real number (Python ints included); NaN is a ValueError (an
    nfjax addition: upstream compares NaN silently and returns changed results)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}: must be real number, not {type(value).__name__}")
    value = float(value)
    if value != value:
        raise IndexerValueError(f"{name} is not a number (nan)")
    return value


def _check_finite(rows: np.ndarray, what: str) -> np.ndarray:
    """Reject NaN/inf coordinates (an nfjax addition: upstream lets one non-finite spot turn
    every score of the frame into NaN)."""
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise IndexerValueError(f"{what} {i} is not finite ({' '.join(map(str, rows[i]))}); "
                                f"{int(bad.sum())} of {len(rows)} non-finite")
    return rows


def _ndarray(arr, name: str) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be numpy.ndarray, not {type(arr).__name__}")
    return arr


def _is_carray(arr: np.ndarray) -> bool:
    return bool(arr.flags.c_contiguous and arr.flags.aligned)


def _is_farray(arr: np.ndarray) -> bool:
    return bool(arr.flags.f_contiguous and arr.flags.aligned)


def spots_rows(spots, name: str = "spots") -> np.ndarray:
    """Validate a spot array; return (K, 3) float32 rows = spots (Å⁻¹)."""
    arr = _ndarray(spots, name)
    if arr.ndim != 2:
        raise IndexerRuntimeError("spots array must be 2 dimensional")
    if arr.dtype != np.float32:
        raise IndexerRuntimeError("only float32 spot data is supported")
    if _is_carray(arr):
        if arr.shape[0] != 3:
            raise IndexerRuntimeError("only shape (3, -1) CARRAY spot data is supported")
        rows = arr.T
    elif _is_farray(arr):
        if arr.shape[1] != 3:
            raise IndexerRuntimeError("only shape (-1, 3) FARRAY spot data is supported")
        rows = arr
    else:
        raise IndexerRuntimeError("only NPY_ARRAY_CARRAY or NPY_ARRAY_FARRAY spot data is supported")
    if rows.shape[0] == 0:
        raise IndexerRuntimeError("no spots")
    return _check_finite(np.ascontiguousarray(rows, dtype=np.float32), "spot")


def cell_rows(cells, what: str = "input cell", name: str = "input_cells") -> np.ndarray:
    """Validate a cell array; return (3M, 3) float32 rows = cell vectors (Å).

    ``what`` is ``"input cell"`` for ``run()`` and ``"cell"`` for ``crystals()`` (the two
    upstream message families differ only in that word and in the generic-layout message).
    """
    arr = _ndarray(cells, name)
    if arr.ndim != 2:
        raise IndexerRuntimeError(f"{what}s array must be 2 dimensional")
    if arr.dtype != np.float32:
        raise IndexerRuntimeError(f"only float32 {what} data is supported")
    if _is_carray(arr):
        if arr.shape[0] != 3:
            raise IndexerRuntimeError(f"only shape (3, -1) CARRAY {what} data is supported")
        if arr.shape[1] % 3 != 0:
            raise IndexerRuntimeError(f"incomplete CARRAY {what} data")
        rows = arr.T
    elif _is_farray(arr):
        if arr.shape[1] != 3:
            raise IndexerRuntimeError(f"only shape (-1, 3) FARRAY {what} data is supported")
        if arr.shape[0] % 3 != 0:
            raise IndexerRuntimeError(f"incomplete FARRAY {what} data")
        rows = arr
    else:
        generic = "data" if what == "input cell" else "cell data"
        raise IndexerRuntimeError(f"only NPY_ARRAY_CARRAY or NPY_ARRAY_FARRAY {generic} is supported")
    if rows.shape[0] == 0:
        raise IndexerRuntimeError(f"no {what}s")
    return _check_finite(np.ascontiguousarray(rows, dtype=np.float32), f"{what} vector")


def score_vector(scores, n_cells: int) -> np.ndarray:
    arr = _ndarray(scores, "scores")
    if arr.ndim != 1:
        raise IndexerRuntimeError("scores array must be 1 dimensional")
    if arr.dtype != np.float32:
        raise IndexerRuntimeError("only float32 score data is supported")
    if not (_is_carray(arr) or _is_farray(arr)):
        raise IndexerRuntimeError("only CARRAY or FARRAY score data is supported")
    if arr.shape[0] != n_cells:
        raise IndexerRuntimeError("number of cells and scores must match")
    return np.asarray(arr, dtype=np.float32)


def cells_to_ffbidx(cells: np.ndarray) -> np.ndarray:
    """(N, 3 vectors, 3) → ffbidx's (3, 3N) C-ordered output (cell i = columns 3i..3i+2)."""
    cells = np.asarray(cells, dtype=np.float32)
    return np.ascontiguousarray(cells.reshape(-1, 3).T)
