"""``Key.bin``, ``DiffractionSpots.bin`` and ``OrientMat.bin`` (MIDAS MakeDiffrSpots output).

Raw little-endian, header-less (reference §6.2): ``Key.bin`` int32 ``[N][2]`` = (spot count,
offset), ``DiffractionSpots.bin`` float64 ``[T][3]`` = (yl µm, zl µm, ω deg),
``OrientMat.bin`` float64 ``[N][9]``. Written atomically as a set (a failed write leaves the
previous three files, never a mix); read with consistency checks (MIDAS checks none of them).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nfjax.errors import InputFileError
from nfjax.io.atomic import atomic_write_many
from nfjax.spots import SpotTable

NAMES = ("Key.bin", "DiffractionSpots.bin", "OrientMat.bin")


def write_spot_files(directory: str | os.PathLike, table: SpotTable) -> list[Path]:
    """Write the three files into ``directory``; returns their paths."""
    directory = Path(directory)
    arrays = (np.ascontiguousarray(table.key, "<i4"),
              np.ascontiguousarray(table.spots, "<f8"),
              np.ascontiguousarray(table.orient, "<f8"))
    paths = [directory / name for name in NAMES]
    with atomic_write_many(paths, "wb") as handles:
        for fh, arr in zip(handles, arrays):
            fh.write(arr.tobytes())
    return paths


def _read(path: Path, dtype: str, width: int) -> np.ndarray:
    if not path.is_file():
        raise InputFileError(f"{path}: file not found")
    size = path.stat().st_size
    item = np.dtype(dtype).itemsize * width
    if size % item:
        raise InputFileError(f"{path}: size {size} bytes is not a multiple of {item} "
                             f"({width} x {np.dtype(dtype).name} per record)")
    return np.fromfile(path, dtype=dtype).reshape(-1, width)


def read_spot_files(directory: str | os.PathLike) -> SpotTable:
    """Read and cross-check the three files in ``directory``."""
    directory = Path(directory)
    key = _read(directory / NAMES[0], "<i4", 2).astype(np.int32)
    spots = _read(directory / NAMES[1], "<f8", 3)
    orient = _read(directory / NAMES[2], "<f8", 9)
    if orient.shape[0] != key.shape[0]:
        raise InputFileError(f"{directory / NAMES[2]}: {orient.shape[0]} orientations but "
                             f"{NAMES[0]} lists {key.shape[0]}")
    counts = key[:, 0].astype(np.int64)
    offsets = key[:, 1].astype(np.int64)
    expected = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if (counts < 0).any() or not np.array_equal(offsets, expected):
        bad = int(np.argmax((counts < 0) | (offsets != expected)))
        raise InputFileError(f"{directory / NAMES[0]}: record {bad} has count {counts[bad]} "
                             f"and offset {offsets[bad]}, expected offset {expected[bad]}")
    total = int(counts.sum())
    if total != spots.shape[0]:
        raise InputFileError(f"{directory / NAMES[1]}: holds {spots.shape[0]} spots but "
                             f"{NAMES[0]} counts {total}")
    for name, values in ((NAMES[1], spots), (NAMES[2], orient)):
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            raise InputFileError(f"{directory / name}: record {i} is not finite "
                                 f"({' '.join(f'{v:g}' for v in values[i])}); "
                                 f"{int(bad.sum())} of {len(values)} records")
    return SpotTable(key=key, spots=spots, orient=orient)
