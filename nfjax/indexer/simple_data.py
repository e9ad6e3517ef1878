"""Reader for ffbidx's "simple data" spot files (reference ``ffbidx-indexer.md`` §2.4).

Owns the text format only: ``#`` comment lines and blank lines are skipped, the first data
line holds the input cell ``ax ay az bx by bz cx cy cz`` (real space, Å), every further line
one spot ``x y z`` (reciprocal space, Å⁻¹). Returns float32 arrays already in the layouts
ffbidx's ``run()`` accepts. It never guesses: a malformed line is an :class:`InputFileError`
naming the file and line.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nfjax.errors import InputFileError
from nfjax.io import TEXT_ENCODING


class SimpleData(NamedTuple):
    """``cell`` (3, 3) float32 C-order, columns = vectors a, b, c (ffbidx's input layout);
    ``spots`` (3, K) float32 C-order, columns = spots; ``path`` the file read."""

    cell: np.ndarray
    spots: np.ndarray
    path: Path

    @property
    def cell_rows(self) -> np.ndarray:
        """(3, 3) float32 with the vectors a, b, c as rows."""
        return np.ascontiguousarray(self.cell.T)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def read_simple_data(path) -> SimpleData:
    """Read one simple-data file into ffbidx layouts (see :class:`SimpleData`)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read simple-data file ({exc.strerror})") from None
    try:
        text = raw.decode(TEXT_ENCODING)
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise InputFileError(f"{path}:{line}: not a simple-data text file (bytes that are "
                             f"not UTF-8)") from None
    cell = None
    spots: list[list[float]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split()
        try:
            values = [float(f) for f in fields]
        except ValueError:
            raise InputFileError(f"{path}:{lineno}: expected numbers, found {line.strip()!r}") \
                from None
        if not all(math.isfinite(v) for v in values):
            raise InputFileError(f"{path}:{lineno}: expected finite numbers, found "
                                 f"{line.strip()!r}")
        if any(abs(v) > _FLOAT32_MAX for v in values):
            raise InputFileError(f"{path}:{lineno}: expected numbers within float32 range "
                                 f"(|x| <= 3.4e38; the indexer computes in float32), found "
                                 f"{line.strip()!r}")
        if cell is None:
            if len(values) != 9:
                raise InputFileError(f"{path}:{lineno}: expected 9 cell numbers "
                                     f"(ax ay az bx by bz cx cy cz), found {len(values)}")
            cell = values
        else:
            if len(values) != 3:
                raise InputFileError(f"{path}:{lineno}: expected a spot 'x y z', "
                                     f"found {len(values)} numbers")
            spots.append(values)
    if cell is None:
        raise InputFileError(f"{path}: no input cell line found (empty file?)")
    if not spots:
        raise InputFileError(f"{path}: expected spot lines after the cell line, found none")
    rows = np.array(cell, dtype=np.float32).reshape(3, 3)
    return SimpleData(cell=np.ascontiguousarray(rows.T),
                      spots=np.ascontiguousarray(np.array(spots, dtype=np.float32).T),
                      path=path)
