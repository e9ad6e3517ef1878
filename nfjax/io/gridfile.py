"""``grid.txt``: the reconstruction grid as MIDAS writes and reads it.

Layout (reference §4.1): a first line ``%d`` with the row count N, then N lines
``%f %f %f %f %f`` = columns ``y1 y2 xs ys gs`` in µm. This module only converts between
that text and an ``(N, 5)`` float64 array; it never builds or filters grids
(:mod:`nfjax.grid` does) and writes atomically, so a failed write never leaves half a grid.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nfjax.errors import InputFileError
from nfjax.io import TEXT_ENCODING
from nfjax.io.atomic import atomic_write

__all__ = ["write_grid", "read_grid", "format_f_column"]


def format_f_column(values: np.ndarray) -> list[str]:
    """Format a float64 column with C's ``%f`` (6 decimals), one string per value.

    Grids and mic files repeat few distinct values per column, so only the unique values are
    formatted (Python's ``%f`` rounds like glibc's ``printf``: exact value, half to even).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return []
    uniq, inverse = np.unique(values, return_inverse=True)
    text = np.array(["%f" % v for v in uniq.tolist()], dtype=object)
    return text[inverse.ravel()].tolist()


def write_grid(grid: np.ndarray, path: str | os.PathLike) -> None:
    """Write an ``(N, 5)`` grid as MIDAS's ``grid.txt`` (count line, then ``%f`` × 5 rows)."""
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 2 or grid.shape[1] != 5:
        raise ValueError(f"grid must have shape (N, 5) (y1 y2 xs ys gs), not {grid.shape}")
    cols = [format_f_column(grid[:, k]) for k in range(5)]
    with atomic_write(path, "w", newline="\n") as fh:
        fh.write(f"{grid.shape[0]}\n")
        if grid.shape[0]:
            fh.write("\n".join(" ".join(row) for row in zip(*cols)))
            fh.write("\n")


# Grid values are µm within the sample: a metre is beyond any; NaN, inf or 1e300 would run
# through the fit and be written into the mic, which every reader then refuses.
_GRID_LIMIT = 1e6


def read_grid(path: str | os.PathLike) -> np.ndarray:
    """Read a MIDAS ``grid.txt`` into an ``(N, 5)`` float64 array (µm).

    The count line must match the number of data rows, every row must hold 5 numbers.
    Errors name the file and the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding=TEXT_ENCODING)
    except FileNotFoundError:
        raise InputFileError(f"{path}: grid file not found") from None
    except UnicodeDecodeError:
        raise InputFileError(f"{path}: not a text grid file (expected a count line and "
                             "'y1 y2 xs ys gs' rows)") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise InputFileError(f"{path}:1: expected the number of grid points, found "
                             f"{'an empty file' if not lines else 'an empty line'}")
    head = lines[0].split()
    try:
        count = int(head[0])
    except ValueError:
        raise InputFileError(f"{path}:1: expected the number of grid points (an integer), "
                             f"found {lines[0].strip()!r}") from None
    if count < 0:
        raise InputFileError(f"{path}:1: grid point count must be >= 0, found {count}")
    body = lines[1:]
    try:
        if count == 0:
            raise ValueError("no rows: use the checking pass")
        # Fast path (numpy's C parser, correctly rounded like strtod); any irregularity
        # falls through to the line-by-line pass below, which names the bad line.
        fast = np.loadtxt(body, dtype=np.float64, ndmin=2, comments=None)
        if fast.shape[1] == 5 and fast.shape[0] == count \
                and np.all(np.abs(fast) <= _GRID_LIMIT):      # False for NaN too
            return fast
    except ValueError:
        pass
    rows: list[list[float]] = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            raise InputFileError(f"{path}:{lineno}: expected 5 columns (y1 y2 xs ys gs), "
                                 f"found {len(fields)}: {line.strip()!r}")
        try:
            rows.append([float(v) for v in fields])
        except ValueError:
            raise InputFileError(f"{path}:{lineno}: expected 5 numbers (y1 y2 xs ys gs), "
                                 f"found {line.strip()!r}") from None
        if not all(abs(v) <= _GRID_LIMIT for v in rows[-1]):
            raise InputFileError(f"{path}:{lineno}: expected finite numbers within "
                                 f"±{_GRID_LIMIT:g} um (y1 y2 xs ys gs), found "
                                 f"{line.strip()!r}")
    if len(rows) != count:
        raise InputFileError(f"{path}:1: the count line says {count} grid points but the "
                             f"file has {len(rows)} rows")
    return np.array(rows, dtype=np.float64).reshape(-1, 5)
