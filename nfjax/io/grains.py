"""``Grains.csv``: far-field grain lists, read the way MIDAS's NF programs read them.

A Grains.csv (FF-HEDM output, or ``Mic2GrainsList`` output) is whitespace-separated text;
lines starting with ``%`` are headers. Per row: column 0 grain ID, 1–9 the orientation
matrix U row-major (sample frame ← crystal frame), 10–12 the grain position x y z (µm),
13–18 the lattice a b c (Å) α β γ (deg), further columns (FF fit statistics) kept raw.
``GenSeedOrientationsFF2NFHEDM`` reads exactly ID, the matrix, skips 3 tokens and reads the
lattice (reference §3, §9.3). This module only parses; it never converts orientations.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np

from nfjax.errors import InputFileError
from nfjax.io import TEXT_ENCODING, is_number

__all__ = ["Grains", "read_grains_csv"]

_MIN_COLUMNS = 19  # ID + 9 matrix + 3 position + 6 lattice
_ID_LIMIT = 2 ** 31    # MIDAS reads grain IDs into a C int
# An orientation matrix must be a rotation to this tolerance (det and U·Uᵀ); FF output holds
# 6+ decimals, so anything further off is a wrong column or a placeholder (all zeros).
_ROTATION_TOL = 0.01


@dataclasses.dataclass(frozen=True, eq=False)
class Grains:
    """Grains read from a Grains.csv.

    Attributes:
      ids: ``(N,)`` int grain IDs.
      matrices: ``(N, 3, 3)`` float64 orientation matrices U (row-major in the file).
      positions: ``(N, 3)`` float64 grain centres x y z (µm).
      lattice: ``(N, 6)`` float64 a b c (Å) α β γ (deg).
      extra: ``(N, k)`` float64 columns 19 onward, cut to the shortest row (k may be 0).
      columns_10_12: ``(N, 3)`` the raw columns 10–12 (the position in the FF layout).
      path: the file read.
    """

    ids: np.ndarray
    matrices: np.ndarray
    positions: np.ndarray
    lattice: np.ndarray
    extra: np.ndarray
    columns_10_12: np.ndarray
    path: str = ""

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _check_lattices(path: Path, lattice: np.ndarray, linenos: list[int]) -> None:
    """InputFileError at the first row whose lattice (columns 14-19) is not a cell: lengths
    a b c > 0 Å and angles strictly between 0 and 180 degrees. All zeros is allowed: it is
    what Mic2GrainsList (``nfjax cluster``) writes without a LatticeParameter, and the seeds
    made from it are fitted with the parameter file's lattice."""
    ok = (lattice[:, :3] > 0).all(axis=1) & ((lattice[:, 3:] > 0) & (lattice[:, 3:] < 180)).all(
        axis=1)
    ok |= (lattice == 0).all(axis=1)
    if not ok.all():
        i = int(np.argmin(ok))
        found = " ".join(f"{v:g}" for v in lattice[i])
        raise InputFileError(f"{path}:{linenos[i]}: lattice (columns 14-19): expected a b c "
                             f"> 0 (Å) and angles strictly between 0 and 180 degrees (or all "
                             f"0), found {found}")


def _positions_after_lattice(header_lines: list[str]) -> bool:
    """True when the file's own header puts x y z after the lattice (MIDAS's NF example).

    The Au example's ``grs.csv`` declares ``%GrainID OrientMat(9) dummies LatC(6) x y z
    dummies``: its columns 10–12 are zeros and the positions are columns 19–21. Every other
    Grains.csv (FF output, Mic2GrainsList) has x y z in columns 10–12.
    """
    for line in header_lines:
        tokens = line.lstrip("%").split()
        if "LatC(6)" in tokens:
            after = tokens[tokens.index("LatC(6)") + 1:]
            before = tokens[:tokens.index("LatC(6)")]
            if after[:3] == ["x", "y", "z"] and "x" not in before:
                return True
    return False


def read_grains_csv(path: str | os.PathLike) -> Grains:
    """Parse a Grains.csv into a :class:`Grains`.

    Blank lines are skipped (GenSeedOrientationsFF2NFHEDM would repeat the previous grain).
    A row needs at least 19 numbers, the first 19 finite, an integer grain ID and a
    rotation matrix; errors name the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding=TEXT_ENCODING)
    except FileNotFoundError:
        raise InputFileError(f"{path}: grains file not found") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a directory, expected a grains file") from None
    except UnicodeDecodeError:
        raise InputFileError(f"{path}: not a text Grains.csv (undecodable bytes)") from None
    headers: list[str] = []
    rows: list[list[float]] = []
    linenos: list[int] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("%"):
            headers.append(stripped)
            continue
        fields = stripped.replace(",", " ").split()
        if len(fields) < _MIN_COLUMNS:
            raise InputFileError(
                f"{path}:{lineno}: expected at least {_MIN_COLUMNS} columns (GrainID, 9 "
                f"matrix elements, x y z, 6 lattice parameters), found {len(fields)}")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            bad = next(v for v in fields if not is_number(v))
            raise InputFileError(f"{path}:{lineno}: expected numbers, found {bad!r}") from None
        # Columns past the lattice (FF fit statistics) are kept raw and may hold nan.
        bad = next((k for k, v in enumerate(values[:_MIN_COLUMNS]) if not math.isfinite(v)),
                   None)
        if bad is not None:
            raise InputFileError(f"{path}:{lineno}: expected finite numbers, found "
                                 f"{fields[bad]!r} in column {bad + 1}")
        if values[0] != int(values[0]) or abs(values[0]) >= _ID_LIMIT:
            raise InputFileError(f"{path}:{lineno}: grain ID must be an integer of magnitude "
                                 f"below 2^31 (a C int, as MIDAS reads it), found {fields[0]!r}")
        rows.append(values)
        linenos.append(lineno)
    if not rows:
        raise InputFileError(f"{path}: no grains found (only header or blank lines)")
    width = min(len(r) for r in rows)
    table = np.array([r[:width] for r in rows], dtype=np.float64)
    _check_rotations(path, table[:, 1:10].reshape(-1, 3, 3), linenos)
    _check_lattices(path, table[:, 13:19], linenos)
    pos_cols = slice(19, 22) if _positions_after_lattice(headers) else slice(10, 13)
    if pos_cols.start == 19 and width < 22:
        pos_cols = slice(10, 13)
    return Grains(
        ids=table[:, 0].astype(np.int64),
        matrices=table[:, 1:10].reshape(-1, 3, 3).copy(),
        positions=table[:, pos_cols].copy(),
        lattice=table[:, 13:19].copy(),
        extra=table[:, 19:].copy(),
        columns_10_12=table[:, 10:13].copy(),
        path=str(path),
    )


def _check_rotations(path: Path, mats: np.ndarray, linenos: list[int]) -> None:
    """InputFileError at the first matrix that is not a rotation (det 1, U·Uᵀ = I)."""
    det = np.linalg.det(mats)
    off = np.abs(mats @ mats.transpose(0, 2, 1) - np.eye(3)).max(axis=(1, 2))
    bad = (np.abs(det - 1.0) > _ROTATION_TOL) | (off > _ROTATION_TOL)
    if bad.any():
        k = int(np.argmax(bad))
        raise InputFileError(
            f"{path}:{linenos[k]}: columns 2-10 must be an orientation matrix (a rotation: "
            f"det 1, U·Uᵀ = I), found det {det[k]:.4g} and U·Uᵀ off I by up to {off[k]:.4g}")
