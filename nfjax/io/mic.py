"""Mic files: the reconstructed microstructure, in MIDAS's binary and text layouts.

This module owns the conversion between arrays and the files a MIDAS NF fit leaves
(reference §6.4–6.6): the binary ``MicFileBinary`` (11 little-endian float64 per grid row,
88 bytes), its ``.AllMatches`` companion ((7 + 4·SaveNSolutions) float64 per row), and the
text mic and text ``.AllMatches`` that ``ParseMic`` writes (3 ``%`` header lines, a column
header line, then the rows with non-zero confidence as ``%lf\\t`` per column + ``%d``).
Records are always ``(N, 11)`` float64 in the binary column order: OrientationRowNr,
OrientationID, RunTime, X (µm), Y (µm), TriEdgeSize (µm), UpDown, Eul1, Eul2, Eul3 (rad,
Bunge ZXZ), Confidence. It never interprets orientations (see :mod:`nfjax.orientation`)
and writes every file atomically.

Differences from MIDAS, on purpose: ``write_binary_mic`` writes the full file, one record per
grid row, with voxels that have no solution as all-zero records, where MIDAS's fitter
``pwrite``s only the fitted rows into an untruncated file (so stale bytes can survive and the
file can be shorter than N·88). A reader sees the same thing: holes read as zeros.
"""
from __future__ import annotations

import codecs
import dataclasses
import os
from pathlib import Path

import numpy as np

from nfjax.errors import InputFileError
from nfjax.io import TEXT_ENCODING, is_number, read_bytes
from nfjax.io.atomic import atomic_write
from nfjax.io.gridfile import format_f_column

__all__ = [
    "MIC_COLUMNS",
    "RECORD_BYTES",
    "MicData",
    "read_mic",
    "read_text_mic",
    "write_text_mic",
    "read_binary_mic",
    "write_binary_mic",
    "read_allmatches",
    "write_allmatches",
    "write_text_allmatches",
]

MIC_COLUMNS = ("OrientationRowNr", "OrientationID", "RunTime", "X", "Y", "TriEdgeSize",
               "UpDown", "Eul1", "Eul2", "Eul3", "Confidence")
RECORD_BYTES = 8 * len(MIC_COLUMNS)  # 88
_TEXT_HEADER = "%" + "\t".join(MIC_COLUMNS + ("PhaseNr",))
# ParseMic's header of the text .AllMatches: column 1 is NrMatches there, and the solution
# columns are six "..." whatever SaveNSolutions is.
_ALLMATCHES_HEADER = "%" + "\t".join(("OrientationRowNr", "NrMatches") + MIC_COLUMNS[2:]
                                      + ("...",) * 6 + ("PhaseNr",))


@dataclasses.dataclass(frozen=True, eq=False)
class MicData:
    """A mic file in memory.

    Attributes:
      records: ``(N, 11)`` float64 in binary-record column order (see :data:`MIC_COLUMNS`).
        From a binary file every grid row, holes included (all zeros); from a text file only
        the rows ParseMic kept (Confidence != 0).
      phase_nr: ``(N,)`` int PhaseNr per row (binary files carry none: 1).
      tri_edge_size: the ``%TriEdgeSize`` header (binary: field 5 of the first record that is
        not a hole; ParseMic takes record 0's, which is 0 when that voxel is a hole).
      num_phases: ``%NumPhases`` (binary: 1).
      global_position: ``%GlobalPosition`` in µm (binary: 0).
      kind: ``"text"`` or ``"binary"``.
      path: the file it came from (``""`` if built in memory).
    """

    records: np.ndarray
    phase_nr: np.ndarray
    tri_edge_size: float = 0.0
    num_phases: int = 1
    global_position: float = 0.0
    kind: str = "binary"
    path: str = ""

    @property
    def map_edge(self) -> float:
        """The voxel edge (µm) ParseMic's pixel maps use: field 5 of record 0 of a binary
        mic (0 when that record is a hole), the ``%TriEdgeSize`` of a text one."""
        if self.kind == "binary":
            return float(self.records[0, 5]) if self.records.shape[0] else 0.0
        return float(self.tri_edge_size)

    def __len__(self) -> int:
        return int(self.records.shape[0])

    @property
    def xy(self) -> np.ndarray:
        """``(N, 2)`` voxel centroids (µm)."""
        return self.records[:, 3:5]

    @property
    def euler(self) -> np.ndarray:
        """``(N, 3)`` Bunge Euler angles (rad)."""
        return self.records[:, 7:10]

    @property
    def confidence(self) -> np.ndarray:
        """``(N,)`` best FracOverlap."""
        return self.records[:, 10]

    @property
    def up_down(self) -> np.ndarray:
        """``(N,)`` UpDown flag (±1; 0 for holes)."""
        return self.records[:, 6]

    @property
    def valid(self) -> np.ndarray:
        """``(N,)`` bool: rows with a solution (Confidence != 0, ParseMic's rule)."""
        return self.records[:, 10] != 0


# --------------------------------------------------------------------------- binary
def read_binary_mic(path: str | os.PathLike) -> MicData:
    """Read a binary ``MicFileBinary``: ``(size/88, 11)`` little-endian float64 records."""
    path = Path(path)
    raw = read_bytes(path, "binary mic file")
    size = len(raw)
    if size == 0:
        raise InputFileError(f"{path}: binary mic file is empty (0 bytes); expected "
                             f"{RECORD_BYTES}-byte records")
    if size % RECORD_BYTES:
        raise InputFileError(f"{path}: binary mic size must be a multiple of {RECORD_BYTES} "
                             f"bytes (11 float64 per record), found {size} bytes")
    records = np.frombuffer(raw, dtype="<f8").astype(np.float64).reshape(-1, 11)
    _reject_bad_values(path, records, lambda i: f": record {i} (byte {i * RECORD_BYTES})")
    filled = np.flatnonzero(records.any(axis=1))
    tri_edge = float(records[filled[0], 5]) if filled.size else 0.0
    return MicData(records=records, phase_nr=np.ones(records.shape[0], dtype=np.int64),
                   tri_edge_size=tri_edge, num_phases=1, global_position=0.0,
                   kind="binary", path=str(path))


# Bounds no real record reaches: positions and edges beyond 1 m, Euler angles beyond 1000
# rad. A value past them means the file is not a mic file or is corrupt (random bytes read
# as float64 give such values), and would otherwise overflow in the maps and comparisons.
_MIC_LIMITS = ((slice(3, 6), 1e6, "µm, beyond any sample"),
               (slice(7, 10), 1e3, "rad, beyond any Euler angle"))


# Euler angles are radians: MIDAS writes them in [0, 2 pi) (its Au mics reach 5.68), and a
# refinement adds at most OrientTol (2 deg by default). Past 4 pi (a refinement box of
# 360 deg) the values are degrees.
_EULER_MAX_RAD = 4.0 * np.pi


def check_euler_radians(euler: np.ndarray, where) -> None:
    """InputFileError at the first Euler angle of ``euler (N, 3)`` past 4π, taken for
    degrees; ``where(row)`` names the file and row (e.g. ``"t.mic: record 2"``)."""
    far = np.abs(euler) > _EULER_MAX_RAD
    if far.any():
        row, k = (int(v) for v in np.argwhere(far)[0])
        raise InputFileError(f"{where(row)}: Eul{k + 1}: expected radians (magnitude at most "
                             f"4 pi), found {float(euler[row, k])!r}: are the Euler angles in "
                             "degrees? (numpy.radians converts them)")


def _reject_bad_values(path: Path, table: np.ndarray, where) -> None:
    """InputFileError at the first NaN or infinity of ``table``, or the first position,
    edge or Euler angle past :data:`_MIC_LIMITS` (a corrupt file); ``where(row)`` places
    it."""
    bad = ~np.isfinite(table)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        name = (MIC_COLUMNS + ("PhaseNr",))[col]
        raise InputFileError(f"{path}{where(row)}: {name} must be a finite number, found "
                             f"{float(table[row, col])!r}")
    for cols, limit, unit in _MIC_LIMITS:
        far = np.abs(table[:, cols]) > limit
        if far.any():
            row, k = (int(v) for v in np.argwhere(far)[0])
            col = cols.start + k
            raise InputFileError(f"{path}{where(row)}: {MIC_COLUMNS[col]}: expected a "
                                 f"magnitude below {limit:g} ({unit}), found "
                                 f"{float(table[row, col])!r}: not a mic file, or corrupt")
    check_euler_radians(table[:, 7:10], lambda row: f"{path}{where(row)}")
    if table.shape[1] > 10:
        # the fraction of predicted spot pixels found lit: clustering, maps and MinConfidence
        # all read it as one
        conf = table[:, 10]
        off = (conf < 0) | (conf > 1)
        if off.any():
            row = int(np.argmax(off))
            raise InputFileError(f"{path}{where(row)}: Confidence: expected a fraction "
                                 f"between 0 and 1, found {float(conf[row])!r}")


def _as_records(records, width: int | None = 11) -> np.ndarray:
    if isinstance(records, MicData):
        records = records.records
    arr = np.asarray(records, dtype=np.float64)
    if arr.ndim != 2 or (width is not None and arr.shape[1] != width):
        want = f"(N, {width})" if width is not None else "(N, 7+4n)"
        raise ValueError(f"records must have shape {want}, not {arr.shape}")
    return arr


def _allmatches_rows(rows) -> np.ndarray:
    """``rows`` as a float64 array of ``7 + 4n`` columns (n >= 1), else ValueError."""
    arr = _as_records(rows, width=None)
    if arr.shape[1] < 11 or (arr.shape[1] - 7) % 4:
        raise ValueError(f"AllMatches rows must have 7 + 4n columns (n >= 1), not {arr.shape[1]}")
    return arr


def write_binary_mic(path: str | os.PathLike, records) -> None:
    """Write ``(N, 11)`` records as a binary mic: 88 bytes per row, little-endian float64.

    Every row is written (holes as the zero records they are in ``records``).
    """
    arr = _as_records(records)
    with atomic_write(path, "wb") as fh:
        fh.write(np.ascontiguousarray(arr, dtype="<f8").tobytes())


def allmatches_path(bin_path: str | os.PathLike) -> Path:
    """The ``.AllMatches`` companion of a binary mic: ``<bin_path>.AllMatches``."""
    return Path(str(bin_path) + ".AllMatches")


def read_allmatches(path: str | os.PathLike, n_solutions: int) -> np.ndarray:
    """Read ``<MicFileBinary>.AllMatches``: ``(N, 7 + 4·n_solutions)`` float64.

    Columns: blockNr, nWinners, 0, x, y, 2gs, UD, then n × (Eul1, Eul2, Eul3, frac).
    ``n_solutions`` is the fitter's ``SaveNSolutions``.
    """
    n_solutions = int(n_solutions)
    if n_solutions < 1:
        raise InputFileError(f"SaveNSolutions must be >= 1 to read {path}, found {n_solutions}")
    width = 7 + 4 * n_solutions
    path = Path(path)
    raw = read_bytes(path, "AllMatches file")
    size = len(raw)
    if size % (8 * width):
        raise InputFileError(
            f"{path}: AllMatches size must be a multiple of {8 * width} bytes "
            f"((7 + 4*{n_solutions}) float64 per row for SaveNSolutions {n_solutions}), "
            f"found {size} bytes")
    return np.frombuffer(raw, dtype="<f8").astype(np.float64).reshape(-1, width)


def write_allmatches(path: str | os.PathLike, records) -> None:
    """Write ``(N, 7 + 4n)`` AllMatches rows as little-endian float64."""
    arr = _allmatches_rows(records)
    with atomic_write(path, "wb") as fh:
        fh.write(np.ascontiguousarray(arr, dtype="<f8").tobytes())


# --------------------------------------------------------------------------- text
def _write_text_table(path, arr: np.ndarray, phase_nr, header: str, *, num_phases: int,
                      global_position: float, tri_edge_size: float) -> None:
    """ParseMic's text layout: three ``%`` lines, ``header``, then each row with column 10
    != 0 as ``%lf\\t`` per column and PhaseNr ``%d``."""
    phases = np.broadcast_to(np.asarray(phase_nr, dtype=np.int64), (arr.shape[0],))
    keep = arr[:, 10] != 0
    kept = arr[keep]
    kept_phase = phases[keep]
    head = ("%%TriEdgeSize %f\n%%NumPhases %d\n%%GlobalPosition %f\n%s\n"
            % (tri_edge_size, int(num_phases), float(global_position), header))
    cols = [format_f_column(kept[:, k]) for k in range(arr.shape[1])]
    cols.append([str(int(p)) for p in kept_phase.tolist()])
    with atomic_write(path, "w", newline="\n") as fh:
        fh.write(head)
        if kept.shape[0]:
            fh.write("\n".join("\t".join(row) for row in zip(*cols)))
            fh.write("\n")


def write_text_mic(path: str | os.PathLike, records, *, phase_nr=1, num_phases: int = 1,
                   global_position: float = 0.0, tri_edge_size: float | None = None) -> None:
    """Write a text mic exactly as MIDAS ``ParseMic`` does.

    ``records`` is ``(N, 11)`` (binary column order, grid order). Only rows with
    Confidence != 0 are written, each as 11 × ``%lf\\t`` then PhaseNr ``%d``.
    ``%TriEdgeSize`` is field 5 of record 0 (0.000000 if record 0 is a hole), as ParseMic
    does, unless ``tri_edge_size`` is given. ``phase_nr`` is one int or an ``(N,)`` array.
    """
    arr = _as_records(records)
    if tri_edge_size is None:
        tri_edge_size = float(arr[0, 5]) if arr.shape[0] else 0.0
    _write_text_table(path, arr, phase_nr, _TEXT_HEADER, num_phases=num_phases,
                      global_position=global_position, tri_edge_size=tri_edge_size)


def write_text_allmatches(path: str | os.PathLike, rows, *, tri_edge_size: float,
                          phase_nr=1, num_phases: int = 1,
                          global_position: float = 0.0) -> None:
    """Write ParseMic's text ``<MicFileText>.AllMatches``: the text mic's three ``%`` lines
    (``tri_edge_size`` is the binary mic's record-0 field 5, as in the text mic), its
    column header with six ``...`` for the solution columns (whatever SaveNSolutions is),
    then each ``(7 + 4n)``-column row whose column 10 (the best confidence) is not 0, as
    ``%lf\\t`` per column and PhaseNr ``%d``."""
    arr = _allmatches_rows(rows)
    _write_text_table(path, arr, phase_nr, _ALLMATCHES_HEADER, num_phases=num_phases,
                      global_position=global_position, tri_edge_size=tri_edge_size)


def _header_value(path: Path, lineno: int, line: str, key: str, kind: type):
    fields = line.split()
    if len(fields) < 2:
        raise InputFileError(f"{path}:{lineno}: expected '%{key} <value>', found {line!r}")
    try:
        return kind(fields[1])
    except ValueError:
        raise InputFileError(f"{path}:{lineno}: expected a number after %{key}, "
                             f"found {fields[1]!r}") from None


def read_text_mic(path: str | os.PathLike) -> MicData:
    """Read a ParseMic text mic (``%`` header lines, then 11 numbers + PhaseNr per row).

    Header values ``%TriEdgeSize``, ``%NumPhases``, ``%GlobalPosition`` are read when
    present (defaults: field 5 of the first row, 1, 0). Errors name the file and line.
    """
    path = Path(path)
    raw = read_bytes(path, "text mic file")
    try:
        text = raw.decode(TEXT_ENCODING)
    except UnicodeDecodeError:
        raise InputFileError(f"{path}: not a text mic file (bytes that are not UTF-8); "
                             "for a binary mic use read_binary_mic") from None
    tri_edge = None
    num_phases = 1
    global_position = 0.0
    data_lines: list[tuple[int, str]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("%"):
            if stripped.startswith("%TriEdgeSize"):
                tri_edge = _header_value(path, lineno, stripped, "TriEdgeSize", float)
            elif stripped.startswith("%NumPhases"):
                num_phases = _header_value(path, lineno, stripped, "NumPhases", int)
            elif stripped.startswith("%GlobalPosition"):
                global_position = _header_value(path, lineno, stripped, "GlobalPosition",
                                                float)
            continue
        data_lines.append((lineno, line))

    table = None
    if data_lines:
        try:
            # Fast path; anything irregular is re-parsed line by line for a precise error.
            fast = np.loadtxt([ln for _, ln in data_lines], dtype=np.float64, ndmin=2,
                              comments=None)
            if fast.shape[1] == 12:
                table = fast
        except ValueError:
            table = None
        if table is None:
            rows = []
            for lineno, line in data_lines:
                fields = line.split()
                if len(fields) != 12:
                    raise InputFileError(
                        f"{path}:{lineno}: expected 12 columns ({' '.join(MIC_COLUMNS)} "
                        f"PhaseNr), found {len(fields)}")
                try:
                    rows.append([float(v) for v in fields])
                except ValueError:
                    col = next(i for i, v in enumerate(fields) if not is_number(v))
                    name = (MIC_COLUMNS + ("PhaseNr",))[col]
                    raise InputFileError(f"{path}:{lineno}: column {col + 1} ({name}): "
                                         f"expected a number, found {fields[col]!r}") from None
            table = np.array(rows, dtype=np.float64)
    else:
        table = np.zeros((0, 12), dtype=np.float64)
    _reject_bad_values(path, table, lambda i: f":{data_lines[i][0]}")
    phase = table[:, 11]
    if not np.all(phase == np.round(phase)):
        bad = int(np.argmax(phase != np.round(phase)))
        raise InputFileError(f"{path}:{data_lines[bad][0]}: PhaseNr must be an integer, "
                             f"found {phase[bad]!r}")
    records = np.ascontiguousarray(table[:, :11])
    if tri_edge is None:
        tri_edge = float(records[0, 5]) if records.shape[0] else 0.0
    return MicData(records=records, phase_nr=phase.astype(np.int64), tri_edge_size=tri_edge,
                   num_phases=int(num_phases), global_position=float(global_position),
                   kind="text", path=str(path))


# --------------------------------------------------------------------------- auto
_HEAD_BYTES = 512


def _looks_like_text(head: bytes) -> bool:
    """True when ``head`` (after an optional byte-order mark) is UTF-8 made of printable
    characters and whitespace. A binary record starts with float64s, whose bytes almost
    always include control bytes (0.0, 1.0 and every small integer hold NULs)."""
    head = head.removeprefix(codecs.BOM_UTF8)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason != "unexpected end of data":
            return False
        text = head[:exc.start].decode("utf-8")  # the head cut a character in two
    return all(c.isprintable() or c.isspace() for c in text)


def read_mic(path: str | os.PathLike) -> MicData:
    """Read a mic file, text or binary, telling them apart by content.

    Text if the first 512 bytes (a byte-order mark skipped) are UTF-8 made only of
    printable characters and whitespace, so a headerless text mic, one that opens with a
    blank line or one saved with a byte-order mark is text whatever its size; binary
    otherwise.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD_BYTES)
    except FileNotFoundError:
        raise InputFileError(f"{path}: mic file not found") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a directory, expected a mic file") from None
    if not head:
        raise InputFileError(f"{path}: mic file is empty (0 bytes)")
    if _looks_like_text(head):
        return read_text_mic(path)
    return read_binary_mic(path)
