"""``hkls.csv``: MIDAS's reflection-list file (reference §2.2), read and written byte-exactly.

Layout: the header ``h k l D-spacing RingNr g1 g2 g3 Theta 2Theta Radius`` and one
space-separated line per reflection, printed with
``%.0f %.0f %.0f %.17g %.0f %.17g %.17g %.17g %.17g %.17g %.17g`` (d in Å, g in Å⁻¹ without
2π, θ and 2θ in degrees, Radius in µm). Python's ``%`` formatting of floats follows C's
printf, so the text equals MIDAS's for equal doubles. This module only converts between
the file and :class:`nfjax.crystal.HklTable`; it computes nothing.
"""
from __future__ import annotations

import math

import os
from pathlib import Path

import numpy as np

from nfjax.crystal import HklTable
from nfjax.errors import InputFileError
from nfjax.io import TEXT_ENCODING
from nfjax.io.atomic import atomic_write

__all__ = ["HKLS_HEADER", "write_hkls_csv", "read_hkls_csv", "format_hkls_csv"]

HKLS_HEADER = "h k l D-spacing RingNr g1 g2 g3 Theta 2Theta Radius"
_ROW_FORMAT = "%.0f %.0f %.0f %.17g %.0f %.17g %.17g %.17g %.17g %.17g %.17g\n"


def format_hkls_csv(table: HklTable) -> str:
    """The full text of ``hkls.csv`` for ``table`` (header line included)."""
    parts = [HKLS_HEADER + "\n"]
    for i in range(len(table)):
        parts.append(_ROW_FORMAT % (
            float(table.hkl[i, 0]), float(table.hkl[i, 1]), float(table.hkl[i, 2]),
            float(table.d[i]), float(table.ring[i]),
            float(table.g[i, 0]), float(table.g[i, 1]), float(table.g[i, 2]),
            float(table.theta[i]), float(table.two_theta[i]), float(table.radius[i])))
    return "".join(parts)


def write_hkls_csv(table: HklTable, path: str | os.PathLike) -> None:
    """Write ``table`` to ``path`` in MIDAS's ``hkls.csv`` format, atomically."""
    text = format_hkls_csv(table)
    with atomic_write(path, "w", encoding="ascii", newline="\n") as fh:
        fh.write(text)


def _as_integer(path: Path, lineno: int, column: str, token: str) -> int:
    try:
        value = float(token)
    except ValueError:
        raise InputFileError(
            f"{path}:{lineno}: column {column} must be a number, found {token!r}") from None
    if not value.is_integer():
        raise InputFileError(
            f"{path}:{lineno}: column {column} must be an integer, found {token!r}")
    return int(value)


def read_hkls_csv(path: str | os.PathLike) -> HklTable:
    """Read a MIDAS ``hkls.csv``.

    The first line is the header (any line that does not start with a number is accepted
    there); every further non-blank line must hold the 11 numeric columns.

    Raises:
        InputFileError: missing file, or a malformed line (named by file and line number).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding=TEXT_ENCODING, errors="replace").splitlines()
    except FileNotFoundError:
        raise InputFileError(f"{path}: hkls file not found") from None
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read hkls file ({exc.strerror})") from None
    columns = HKLS_HEADER.split()
    hkl, ring, floats = [], [], []
    for lineno, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens:
            continue
        if lineno == 1:
            try:
                float(tokens[0])
            except ValueError:
                continue  # the header
        if len(tokens) != 11:
            raise InputFileError(
                f"{path}:{lineno}: expected 11 columns ({' '.join(columns)}), "
                f"found {len(tokens)}")
        hkl.append([_as_integer(path, lineno, columns[j], tokens[j]) for j in range(3)])
        ring.append(_as_integer(path, lineno, "RingNr", tokens[4]))
        row = []
        for j in (3, 5, 6, 7, 8, 9, 10):
            try:
                row.append(float(tokens[j]))
            except ValueError:
                raise InputFileError(
                    f"{path}:{lineno}: column {columns[j]} must be a number, "
                    f"found {tokens[j]!r}") from None
            if not math.isfinite(row[-1]):
                raise InputFileError(f"{path}:{lineno}: column {columns[j]} must be a "
                                     f"finite number, found {tokens[j]!r}")
        floats.append(row)
    if not floats:
        raise InputFileError(f"{path}: no reflections (expected lines of 11 numbers)")
    f = np.array(floats, dtype=np.float64)
    return HklTable(
        hkl=np.array(hkl, dtype=np.int64), d=f[:, 0], ring=np.array(ring, dtype=np.int64),
        g=f[:, 1:4], theta=f[:, 4], two_theta=f[:, 5], radius=f[:, 6])
