"""Seed-orientation files: CSV quaternions, one orientation per line (reference §6.3).

The first four comma-separated fields of a line are the quaternion (w, x, y, z); further
fields (GenSeedOrientationsFF2NFHEDM appends the lattice and the grain ID) are ignored when
reading. Two writers: the 4-column ``%.7f`` cache format and GenSeed's
``%f,…,%f,%d`` format. Quaternions are stored as read, not normalised: MIDAS builds its
matrices from the raw 6–7 decimal values, and so must every caller that wants parity.
This module never generates or reduces orientations (see :mod:`nfjax.seeds`).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from nfjax.errors import InputFileError
from nfjax.io import TEXT_ENCODING
from nfjax.io.atomic import atomic_write
from nfjax.io.gridfile import format_f_column

__all__ = ["read_seeds", "write_seeds", "write_seeds_from_grains"]


def _read_text(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding=TEXT_ENCODING) as fh:
                return fh.read()
        return path.read_text(encoding=TEXT_ENCODING)
    except FileNotFoundError:
        raise InputFileError(f"{path}: seed orientation file not found") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a directory, expected a seed orientation file") \
            from None
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError):
        raise InputFileError(f"{path}: not a text seed file (expected lines 'w,x,y,z')") from None


# Seed files carry 6-7 decimals, so their lengths are 1 to ~1e-6. Anything farther is not
# a rotation (MIDAS turns it into a non-orthogonal "orientation" matrix, all zeros into
# the identity): a wrong file or a wrong column order.
UNIT_TOLERANCE = 0.01


def read_seeds(path: str | os.PathLike) -> np.ndarray:
    """Read a seed file: ``(N, 4)`` float64 quaternions (w, x, y, z), not normalised.

    Lines are ``w,x,y,z[,more fields]``; ``.gz`` files are read transparently. Blank lines
    are skipped — MIDAS's MakeDiffrSpots turns a trailing blank line into a copy of the
    previous seed (reference §12 item 30), which is never what the user meant.
    Malformed lines, and quaternions whose length is not 1 within ``UNIT_TOLERANCE``,
    raise :class:`InputFileError` naming the file and line.
    """
    path = Path(path)
    text = _read_text(path)
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise InputFileError(f"{path}: no seed orientations found (empty file)")
    try:
        # Fast path for big libraries (numpy's C parser, correctly rounded); any irregular
        # line drops to the checking pass below, which names it.
        fast = np.loadtxt(lines, dtype=np.float64, delimiter=",", usecols=(0, 1, 2, 3),
                          ndmin=2, comments=None)
        if (fast.shape[0] > 0 and np.all(np.isfinite(fast))
                and np.all(np.abs(np.linalg.norm(fast, axis=1) - 1) <= UNIT_TOLERANCE)):
            return fast
    except (ValueError, IndexError):
        pass
    quats: list[list[float]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) < 4:
            raise InputFileError(f"{path}:{lineno}: expected at least 4 comma-separated "
                                 f"values w,x,y,z, found {len(fields)}: {line.strip()!r}")
        try:
            q = [float(v) for v in fields[:4]]
        except ValueError:
            raise InputFileError(f"{path}:{lineno}: expected 4 numbers w,x,y,z, found "
                                 f"{','.join(fields[:4]).strip()!r}") from None
        if not all(np.isfinite(q)):
            raise InputFileError(f"{path}:{lineno}: quaternion must be finite, found {q}")
        norm = float(np.linalg.norm(q))
        if abs(norm - 1) > UNIT_TOLERANCE:
            raise InputFileError(f"{path}:{lineno}: expected a unit quaternion w,x,y,z, found "
                                 f"{','.join(f.strip() for f in fields[:4])} (length "
                                 f"{norm:.6g}); is this a seed orientation file?")
        quats.append(q)
    if not quats:
        raise InputFileError(f"{path}: no seed orientations found (empty file)")
    return np.array(quats, dtype=np.float64)


def _check_quats(quats) -> np.ndarray:
    q = np.asarray(quats, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != 4:
        raise ValueError(f"quaternions must have shape (N, 4), not {q.shape}")
    return q


def write_seeds(path: str | os.PathLike, quats) -> None:
    """Write ``(N, 4)`` quaternions as the seed cache CSV: ``%.7f`` × 4, comma-separated."""
    q = _check_quats(quats)
    with atomic_write(path, "w", newline="\n") as fh:
        for row in q.tolist():
            fh.write("%.7f,%.7f,%.7f,%.7f\n" % tuple(row))


def write_seeds_from_grains(path: str | os.PathLike, quats, grains) -> None:
    """Write one seed per grain in GenSeedOrientationsFF2NFHEDM's format.

    Each line: ``%f,%f,%f,%f,%f,%f,%f,%f,%f,%f,%d`` = q0..q3, a b c α β γ, grain ID.
    ``quats`` is ``(N, 4)``, ``grains`` a :class:`nfjax.io.grains.Grains` with N grains.
    """
    q = _check_quats(quats)
    lattice = np.asarray(grains.lattice, dtype=np.float64)
    ids = np.asarray(grains.ids)
    if lattice.shape != (q.shape[0], 6) or ids.shape != (q.shape[0],):
        raise ValueError(f"{q.shape[0]} quaternions but grains has lattice {lattice.shape} "
                         f"and ids {ids.shape}")
    table = np.concatenate([q, lattice], axis=1)
    cols = [format_f_column(table[:, k]) for k in range(10)]
    cols.append([str(int(i)) for i in ids.tolist()])
    with atomic_write(path, "w", newline="\n") as fh:
        for row in zip(*cols):
            fh.write(",".join(row) + "\n")
