"""Mic files (binary, text, AllMatches): byte parity with MIDAS's FitOrientationOMP/ParseMic."""
from __future__ import annotations

import re

import numpy as np
import pytest

from nfjax.data import au_example
from nfjax.errors import InputFileError
from nfjax.grid import make_hex_grid, up_down
from nfjax.io.mic import (MicData, read_allmatches, read_binary_mic, read_mic, read_text_mic,
                          write_allmatches, write_binary_mic, write_text_allmatches,
                          write_text_mic)


# --------------------------------------------------------------------------- binary
def test_binary_mic_reads_and_writes_back_identically(ref_run, tmp_path):
    src = ref_run / "Au_bin_Reconstructed.mic"
    size = src.stat().st_size
    assert size % 88 == 0 and size // 88 == 3456
    mic = read_binary_mic(src)
    assert mic.kind == "binary" and mic.records.shape == (3456, 11)
    assert mic.records.dtype == np.float64
    # independent decode of record 0 and the holes ParseMic drops
    first = np.frombuffer(src.read_bytes()[:88], "<f8")
    assert np.array_equal(mic.records[0], first)
    assert int(np.sum(mic.records[:, 10] == 0)) == 23
    assert int(np.sum(np.all(mic.records == 0, axis=1))) == 23  # holes are all-zero records
    out = tmp_path / "b.mic"
    write_binary_mic(out, mic.records)
    assert out.read_bytes() == src.read_bytes()


def test_binary_mic_rows_are_grid_rows(ref_run):
    mic = read_binary_mic(ref_run / "Au_bin_Reconstructed.mic")
    grid = make_hex_grid(2.5, 1, 50)
    ok = mic.valid
    assert np.array_equal(mic.xy[ok], grid[ok, 2:4])
    assert np.array_equal(mic.up_down[ok], up_down(grid)[ok])
    assert np.all(mic.records[ok, 5] == 1.0)


def test_text_mic_from_binary_byte_equal_to_parsemic(ref_run, tmp_path):
    mic = read_binary_mic(ref_run / "Au_bin_Reconstructed.mic")
    out = tmp_path / "t.mic"
    write_text_mic(out, mic.records, phase_nr=1, num_phases=1, global_position=0.0)
    ref = (ref_run / "Au_txt_Reconstructed.mic").read_bytes()
    assert out.read_bytes() == ref
    # ParseMic dropped the 23 conf == 0 holes: 4 header lines + 3433 rows
    assert ref.count(b"\n") == 4 + 3456 - 23


@pytest.mark.parametrize("name", ["reference-run/Au_txt_Reconstructed.mic", "Au_txt.mic",
                                  "Au_txt_Reconstructed.mic"])
def test_text_mic_round_trip(midas_au, tmp_path, name):
    src = midas_au / name
    mic = read_text_mic(src)
    assert mic.kind == "text" and mic.records.shape[1] == 11
    assert np.all(mic.phase_nr == 1) and mic.num_phases == 1 and mic.global_position == 0.0
    out = tmp_path / "t.mic"
    write_text_mic(out, mic.records, phase_nr=mic.phase_nr, num_phases=mic.num_phases,
                   global_position=mic.global_position, tri_edge_size=mic.tri_edge_size)
    assert out.read_bytes() == src.read_bytes()


def test_text_mic_header_values(midas_au):
    # MIDAS's shipped reconstruction has "%TriEdgeSize 0.000000" (record 0 was a hole)
    mic = read_text_mic(midas_au / "Au_txt_Reconstructed.mic")
    assert mic.tri_edge_size == 0.0
    assert len(mic) == 3120
    truth = read_text_mic(midas_au / "Au_txt.mic")
    assert truth.tri_edge_size == 1.0 and len(truth) == 3456
    assert truth.records[0].tolist() == [11801.0, 7.0, 0.0, -28.75, -50.518149, 1.0, -1.0,
                                         2.452861, 0.948265, 4.229318, 0.25]


def test_text_mic_tri_edge_from_record0_and_hole(tmp_path):
    rec = np.zeros((3, 11))
    rec[1] = [5, 2, 0.5, 1.25, -2.5, 1.0, 1, 0.1, 0.2, 0.3, 0.75]
    rec[2] = [6, 1, 0.25, 2.5, -2.5, 1.0, -1, 1.1, 1.2, 1.3, 0.5]
    write_text_mic(tmp_path / "m.mic", rec, phase_nr=[1, 2, 3], num_phases=3,
                   global_position=-7.5)
    lines = (tmp_path / "m.mic").read_text().splitlines()
    assert lines[:3] == ["%TriEdgeSize 0.000000", "%NumPhases 3", "%GlobalPosition -7.500000"]
    assert lines[4] == ("5.000000\t2.000000\t0.500000\t1.250000\t-2.500000\t1.000000\t"
                        "1.000000\t0.100000\t0.200000\t0.300000\t0.750000\t2")
    assert len(lines) == 6 and lines[5].endswith("\t3")
    back = read_mic(tmp_path / "m.mic")
    assert back.kind == "text" and back.phase_nr.tolist() == [2, 3]
    assert np.array_equal(back.records, rec[1:])
    assert back.global_position == -7.5 and back.num_phases == 3


def test_text_allmatches_as_parsemic(tmp_path):
    """ParseMic's text .AllMatches (reference §6.6): the text mic's three lines, its own
    column header with six '...' whatever SaveNSolutions is, and the rows whose column 10
    (the best confidence) is not 0, each (7 + 4n) x %lf then PhaseNr."""
    rows = np.zeros((3, 15))                 # SaveNSolutions 2
    rows[0] = [0, 3, 0, 1.25, -2.5, 2.0, 1, 0.1, 0.2, 0.3, 0.9, 0.4, 0.5, 0.6, 0.8]
    rows[2] = [0, 1, 0, 2.5, -2.5, 2.0, -1, 1.1, 1.2, 1.3, 0.5, 0, 0, 0, 0]
    write_text_allmatches(tmp_path / "m.mic.AllMatches", rows, tri_edge_size=2.0,
                          phase_nr=4, num_phases=2, global_position=1.5)
    lines = (tmp_path / "m.mic.AllMatches").read_text().splitlines()
    assert lines == [
        "%TriEdgeSize 2.000000", "%NumPhases 2", "%GlobalPosition 1.500000",
        "%OrientationRowNr\tNrMatches\tRunTime\tX\tY\tTriEdgeSize\tUpDown\tEul1\tEul2\t"
        "Eul3\tConfidence\t...\t...\t...\t...\t...\t...\tPhaseNr",
        "0.000000\t3.000000\t0.000000\t1.250000\t-2.500000\t2.000000\t1.000000\t"
        "0.100000\t0.200000\t0.300000\t0.900000\t0.400000\t0.500000\t0.600000\t"
        "0.800000\t4",
        "0.000000\t1.000000\t0.000000\t2.500000\t-2.500000\t2.000000\t-1.000000\t"
        "1.100000\t1.200000\t1.300000\t0.500000\t0.000000\t0.000000\t0.000000\t"
        "0.000000\t4"]
    with pytest.raises(ValueError, match="7 \\+ 4n columns"):
        write_text_allmatches(tmp_path / "bad", np.zeros((2, 12)), tri_edge_size=1.0)


# --------------------------------------------------------------------------- AllMatches
def test_allmatches_round_trip(ref_run, tmp_path):
    src = ref_run / "Au_bin_Reconstructed.mic.AllMatches"
    assert src.stat().st_size == 3456 * 19 * 8  # SaveNSolutions 3 -> 7 + 12 doubles
    am = read_allmatches(src, 3)
    assert am.shape == (3456, 19)
    mic = read_binary_mic(ref_run / "Au_bin_Reconstructed.mic")
    ok = mic.valid
    # columns 3..6 are x, y, 2gs, UD as in the mic; the best solution fills slot 0
    assert np.array_equal(am[ok, 3:7], mic.records[ok, 3:7])
    assert np.array_equal(am[ok, 1], mic.records[ok, 1])
    out = tmp_path / "a.AllMatches"
    write_allmatches(out, am)
    assert out.read_bytes() == src.read_bytes()
    with pytest.raises(InputFileError, match="multiple of 120 bytes"):
        read_allmatches(src, 2)  # 525312 is not a multiple of 8*(7+8)


# --------------------------------------------------------------------------- auto + errors
def test_read_mic_autodetect(ref_run):
    assert read_mic(ref_run / "Au_bin_Reconstructed.mic").kind == "binary"
    assert read_mic(ref_run / "Au_txt_Reconstructed.mic").kind == "text"


def test_read_mic_headerless_text(tmp_path):
    p = tmp_path / "h.mic"
    p.write_text("0.000000\t1.000000\t0.0\t1.5\t2.5\t1.0\t1.0\t0.1\t0.2\t0.3\t0.9\t1\n")
    mic = read_mic(p)
    assert mic.kind == "text" and mic.records[0, 10] == 0.9 and mic.tri_edge_size == 1.0


def test_mic_errors(tmp_path):
    bad = tmp_path / "bad.mic"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(InputFileError, match=r"bad.mic: .*multiple of 88 bytes.*found 100") as e:
        read_binary_mic(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(InputFileError, match="multiple of 88"):
        read_mic(bad)
    empty = tmp_path / "empty.mic"
    empty.write_bytes(b"")
    with pytest.raises(InputFileError, match="empty"):
        read_mic(empty)
    with pytest.raises(InputFileError, match="not found"):
        read_mic(tmp_path / "missing.mic")
    txt = tmp_path / "t.mic"
    txt.write_text("%TriEdgeSize 1.0\n%NumPhases 1\n%GlobalPosition 0\n%hdr\n"
                   + "\t".join(["1.0"] * 11) + "\t1\n" + "\t".join(["1.0"] * 10) + "\n")
    with pytest.raises(InputFileError, match=r"t.mic:6: expected 12 columns .*found 10"):
        read_text_mic(txt)
    txt.write_text("%TriEdgeSize 1.0\n" + "\t".join(["1.0"] * 5 + ["abc"] + ["1"] * 6) + "\n")
    with pytest.raises(InputFileError, match=rf"^{txt}:2: column 6 \(TriEdgeSize\): expected "
                                             r"a number, found 'abc'$"):
        read_text_mic(txt)
    txt.write_text("%TriEdgeSize one\n")
    with pytest.raises(InputFileError, match=r"t.mic:1: expected a number after %TriEdgeSize"):
        read_text_mic(txt)


def test_micdata_is_frozen():
    mic = MicData(records=np.zeros((1, 11)), phase_nr=np.ones(1, int))
    with pytest.raises(Exception):
        mic.kind = "text"
    with pytest.raises(ValueError):
        write_binary_mic("/nonexistent/never.mic", np.zeros((2, 10)))


# --------------------------------------------------------------------------- audit fixes
_ROW = "\t".join(["1.000000", "1.000000", "0.0", "1.5", "2.5", "2.0", "1.0", "0.1", "0.2",
                  "0.3", "0.9"]) + "\t1\n"


@pytest.mark.parametrize("prefix", [b"\xef\xbb\xbf", b"\n", b"\xef\xbb\xbf\n"],
                         ids=["bom", "blank-line", "bom-blank-line"])
def test_text_mic_with_bom_or_leading_blank_line_is_text(tmp_path, prefix):
    body = ("%TriEdgeSize 2.000000\n" + _ROW).encode()
    # pad with rows until the size is a multiple of 88: it must still read as text
    while (len(prefix) + len(body)) % 88:
        body += b" "
    path = tmp_path / "m.mic"
    path.write_bytes(prefix + body)
    mic = read_mic(path)
    assert mic.kind == "text" and mic.records.shape == (1, 11)
    assert mic.tri_edge_size == 2.0 and mic.records[0, 10] == 0.9


def test_binary_tri_edge_skips_a_leading_hole(tmp_path):
    rec = np.zeros((3, 11))
    rec[1] = [5, 2, 0.0, 1.25, -2.5, 2.5, 1, 0.1, 0.2, 0.3, 0.75]
    rec[2] = [6, 1, 0.0, 2.5, -2.5, 2.5, -1, 1.1, 1.2, 1.3, 0.5]
    write_binary_mic(tmp_path / "b.mic", rec)
    assert read_mic(tmp_path / "b.mic").tri_edge_size == 2.5
    write_binary_mic(tmp_path / "holes.mic", np.zeros((2, 11)))
    assert read_mic(tmp_path / "holes.mic").tri_edge_size == 0.0


@pytest.mark.parametrize("column, name", [(3, "X"), (4, "Y"), (8, "Eul2"), (10, "Confidence")])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_mic_values_are_refused(tmp_path, column, name, value):
    rec = np.zeros((3, 11))
    rec[:, 5], rec[:, 10] = 1.0, 0.5
    rec[2, column] = value
    write_binary_mic(tmp_path / "b.mic", rec)
    with pytest.raises(InputFileError, match=rf"^{tmp_path}/b.mic: record 2 \(byte 176\): "
                       rf"{name} must be a finite number, found {value!r}$"):
        read_mic(tmp_path / "b.mic")
    write_text_mic(tmp_path / "t.mic", rec)
    with pytest.raises(InputFileError, match=rf"^{tmp_path}/t.mic:7: {name} must be a finite "
                       rf"number, found {value!r}$"):
        read_mic(tmp_path / "t.mic")


@pytest.mark.parametrize("column, name, value, limit", [
    (3, "X", 1e300, "1e+06"), (4, "Y", -2e6, "1e+06"), (5, "TriEdgeSize", 1.5e6, "1e+06"),
    (9, "Eul3", -1e30, "1000")])
def test_implausible_mic_values_are_refused(tmp_path, column, name, value, limit):
    """A position or edge beyond 1 m, an Euler angle beyond 1000 rad: a corrupt or non-mic
    file (random bytes read as float64), refused on reading with the record and column,
    instead of overflowing later (a map crashed on one voxel at X = 1e300)."""
    rec = np.zeros((3, 11))
    rec[:, 5], rec[:, 10] = 1.0, 0.5
    rec[1, 3:5] = 9.9e5, -9.9e5                  # within the limits: fine
    rec[1, 7:10] = 12.5                           # below 4 pi: a refined angle, fine
    write_binary_mic(tmp_path / "ok.mic", rec)
    assert read_mic(tmp_path / "ok.mic").records[1, 3] == 9.9e5
    rec[2, column] = value
    write_binary_mic(tmp_path / "b.mic", rec)
    with pytest.raises(InputFileError, match=rf"^{tmp_path}/b.mic: record 2 \(byte 176\): "
                       rf"{name}: expected a magnitude below {re.escape(limit)} .*, found "
                       rf"{re.escape(repr(value))}: not a mic file, or corrupt$"):
        read_mic(tmp_path / "b.mic")
    write_text_mic(tmp_path / "t.mic", rec)
    with pytest.raises(InputFileError, match=rf"^{tmp_path}/t.mic:7: {name}: expected"):
        read_mic(tmp_path / "t.mic")


@pytest.mark.parametrize("value", [5.0, -1.0, 1.0000001])
def test_confidence_outside_zero_one_is_refused(tmp_path, value):
    """Confidence is a fraction of spot pixels found lit: 5 or -1 were clustered, plotted,
    mapped and rendered (MinConfidence passed them) without a word."""
    rec = np.zeros((3, 11))
    rec[:, 5], rec[:, 10] = 1.0, 0.5
    rec[0, 10] = 1.0                              # the bounds themselves are fine
    rec[2, 10] = value
    write_binary_mic(tmp_path / "b.mic", rec)
    with pytest.raises(InputFileError, match=rf"^{tmp_path}/b.mic: record 2 \(byte 176\): "
                       rf"Confidence: expected a fraction between 0 and 1, found "
                       rf"{re.escape(repr(value))}$"):
        read_mic(tmp_path / "b.mic")
    rec[2, 10] = 0.0
    write_binary_mic(tmp_path / "ok.mic", rec)
    assert read_mic(tmp_path / "ok.mic").records[0, 10] == 1.0


def test_euler_angles_in_degrees_are_refused(tmp_path):
    """A mic written with Euler angles in degrees (a hand-made ground truth) would render
    and compare silently wrong: an angle past 4 pi is refused on reading with the record
    and column. MIDAS's own mics stay below 2 pi + OrientTol (the Au example's reach
    5.68 rad) and read as before."""
    assert np.abs(read_mic(au_example()["mic"]).records[:, 7:10]).max() < 2 * np.pi
    rec = np.zeros((3, 11))
    rec[:, 5], rec[:, 10] = 1.0, 0.5
    rec[:, 7:10] = np.radians([[45.0, 30.0, 300.0]])
    rec[1, 7:10] = [12.56, -12.56, 0.0]                # just below 4 pi: still read
    write_binary_mic(tmp_path / "ok.mic", rec)
    assert read_mic(tmp_path / "ok.mic").records[1, 7] == 12.56
    rec[2, 7:10] = [45.0, 30.0, 300.0]                 # degrees
    write_binary_mic(tmp_path / "deg.mic", rec)
    with pytest.raises(InputFileError, match=rf"^{tmp_path}/deg.mic: record 2 \(byte 176\): "
                       r"Eul1: expected radians \(magnitude at most 4 pi\), found 45.0: are "
                       r"the Euler angles in degrees\? \(numpy.radians converts them\)$"):
        read_mic(tmp_path / "deg.mic")
    rec[2, 7:10] = [0.5, 0.5, -300.0]
    write_text_mic(tmp_path / "deg.txt", rec)
    with pytest.raises(InputFileError, match=rf"^{tmp_path}/deg.txt:7: Eul3: expected radians"):
        read_mic(tmp_path / "deg.txt")


def test_atomic_write_names_the_target_and_leaves_nothing(tmp_path):
    from nfjax.errors import NfjaxError
    from nfjax.io.atomic import atomic_write, check_target

    (tmp_path / "ro").mkdir()
    with pytest.raises(NfjaxError, match=rf"^{tmp_path}/ro: cannot write \(is a directory\)$"):
        with atomic_write(tmp_path / "ro") as fh:
            fh.write("x")
    (tmp_path / "f").write_text("")
    with pytest.raises(NfjaxError, match=rf"^{tmp_path}/f/x.txt: cannot write "
                                         rf"\({tmp_path}/f is a file, not a folder\)$"):
        with atomic_write(tmp_path / "f" / "x.txt") as fh:
            fh.write("x")
    with pytest.raises(NfjaxError, match="^output path is empty: give a file name$"):
        with atomic_write("") as fh:
            fh.write("x")
    assert not list(tmp_path.rglob("*.part"))
    # the same checks, without writing anything, for commands that check outputs first
    assert check_target(tmp_path / "new" / "x.bin") == tmp_path / "new" / "x.bin"
    with pytest.raises(NfjaxError, match=rf"^{tmp_path}/f/x.txt: cannot write "
                                         rf"\({tmp_path}/f is a file, not a folder\)$"):
        check_target(tmp_path / "f" / "x.txt")
    with pytest.raises(NfjaxError, match=r"ro: cannot write \(is a directory\)$"):
        check_target(tmp_path / "ro")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "ro"]


def test_a_failed_write_removes_the_folders_it_made(tmp_path):
    """A write into folders that did not exist, failing (a full disk, an error in the
    writer): the folders it made are removed too, not only the temporary; a folder that
    was there, or that holds something else by then, stays."""
    import errno

    from nfjax.errors import NfjaxError
    from nfjax.io.atomic import atomic_write, atomic_write_many

    (tmp_path / "kept").mkdir()
    with pytest.raises(NfjaxError, match=r"cannot write \(no space left on device\)$"):
        with atomic_write(tmp_path / "kept" / "a" / "b" / "x.bin", "wb"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["kept"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_write_many([tmp_path / "s" / "1", tmp_path / "s" / "2"]):
            (tmp_path / "s" / "other").write_text("not ours")
            raise KeyboardInterrupt
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["other"]
    with atomic_write(tmp_path / "n" / "m" / "ok.txt") as fh:       # success keeps them
        fh.write("x")
    assert (tmp_path / "n" / "m" / "ok.txt").read_text() == "x"


def test_atomic_write_goes_through_links_and_into_devices(tmp_path):
    """A symbolic link is written through (the link stays, its file is replaced); a device
    or FIFO is written in place, never replaced by a regular file."""
    import os
    import stat
    import threading

    from nfjax.io.atomic import atomic_write

    (tmp_path / "target.csv").write_text("old")
    (tmp_path / "link.csv").symlink_to("target.csv")
    with atomic_write(tmp_path / "link.csv") as fh:
        fh.write("new")
    assert (tmp_path / "link.csv").is_symlink()
    assert (tmp_path / "target.csv").read_text() == "new"
    (tmp_path / "dangling").symlink_to("sub/made.txt")
    with atomic_write(tmp_path / "dangling") as fh:
        fh.write("d")
    assert (tmp_path / "sub" / "made.txt").read_text() == "d"
    with atomic_write(os.devnull) as fh:
        fh.write("x" * 1000)
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    with atomic_write(fifo) as fh:
        fh.write("through the pipe")
    reader.join(10)
    assert got == ["through the pipe"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert not list(tmp_path.rglob("*.part"))
    # /dev/stdout is a link to a link to a pipe here: opened, not resolved to a path.
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "from nfjax.io.atomic import atomic_write\n"
                          "with atomic_write('/dev/stdout') as fh:\n    fh.write('piped')"],
                         capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout) == (0, "piped"), out.stderr


def test_atomic_write_names_the_file_when_the_disk_is_full(tmp_path):
    import errno
    import os

    from nfjax.errors import NfjaxError
    from nfjax.io.atomic import atomic_write, atomic_write_many

    # What a full disk raises from the caller's own write: an OSError with no file name.
    with pytest.raises(NfjaxError, match=rf"^{tmp_path}/a.bin: cannot write \(no space left "
                                         r"on device\)$"):
        with atomic_write(tmp_path / "a.bin", "wb"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(NfjaxError, match=rf"^{tmp_path}/{{a,b}}: cannot write \(disk quota "
                                         r"exceeded\)$"):
        with atomic_write_many([tmp_path / "a", tmp_path / "b"]):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    # Other errors inside the block are the caller's and pass unchanged.
    with pytest.raises(FileNotFoundError):
        with atomic_write(tmp_path / "c"):
            open(tmp_path / "missing")
    assert not list(tmp_path.iterdir())
    if os.path.exists("/dev/full"):
        with pytest.raises(NfjaxError, match=r"^/dev/full: cannot write \(no space left on "
                                             r"device\)$"):
            with atomic_write("/dev/full") as fh:
                fh.write("x" * 100)


def test_unwritable_output_folder_is_refused_before_writing(tmp_path, monkeypatch):
    import os

    from nfjax.errors import NfjaxError
    from nfjax.io import atomic

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):   # root: the permission bits do not stop it
            real = os.access
            monkeypatch.setattr(atomic.os, "access",
                                lambda p, m: False if str(p) == str(ro) else real(p, m))
        for target in (ro / "out.mic", ro / "new" / "deeper" / "out.mic"):
            with pytest.raises(NfjaxError, match=rf"^{target}: cannot write \(permission "
                                                 rf"denied: {ro} is not writable\)$"):
                atomic.check_target(target)
        assert not list(ro.iterdir())
    finally:
        ro.chmod(0o755)


def _run_script(tmp_path, name: str, text: str, *args: str):
    """Write a Python script into ``tmp_path`` and run it in a fresh interpreter."""
    import subprocess
    import sys

    script = tmp_path / name
    script.write_text(text)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True,
                          text=True, timeout=120)


def test_sigterm_removes_temporaries_and_exits_143(tmp_path):
    """SIGTERM (kill, timeout, a scheduler's time limit) unwinds as Ctrl-C does: the
    command's temporary output is removed, the target is untouched, the status is 143."""
    text = (
        "import os, signal, sys, time\n"
        "import nfjax.io.hkls as h\n"
        "from nfjax.io.atomic import atomic_write\n"
        "from nfjax import cli\n"
        "def slow(table, path):\n"
        "    with atomic_write(path) as fh:\n"
        "        fh.write('partial')\n"
        "        fh.flush()\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(30)\n"
        "        fh.write('never')\n"
        "h.write_hkls_csv = slow\n"
        "sys.exit(cli.main(sys.argv[1:]))\n")
    out = tmp_path / "out" / "hkls.csv"
    out.parent.mkdir()
    out.write_text("previous")
    params = au_params_copy(tmp_path)
    proc = _run_script(tmp_path, "term.py", text, "hkls", str(params), "-o", str(out))
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "nfjax: terminated (SIGTERM)"
    assert sorted(p.name for p in out.parent.iterdir()) == ["hkls.csv"]
    assert out.read_text() == "previous"


def test_sigterm_in_a_callback_is_not_lost(tmp_path):
    """A SIGTERM whose handler runs inside a ``__del__`` or a garbage-collection callback
    (JAX registers one) raised Terminated there, where Python prints "Exception ignored"
    and drops it: the command ran to the end and exited 0. It is delivered again outside
    the callback."""
    proc = _run_script(
        tmp_path, "term_del.py",
        "import os, signal, sys, time\n"
        "from nfjax import cli\n"
        "class Bomb:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(0.05)           # the handler runs here, inside __del__\n"
        "def work(args):\n"
        "    b = Bomb()\n"
        "    del b\n"
        "    time.sleep(5)\n"
        "    print('ran to the end')\n"
        "    return 0\n"
        "cli._cmd_hkls = work\n"
        "sys.exit(cli.main(['hkls', 'x']))\n")
    assert proc.returncode == 143, (proc.stdout, proc.stderr)
    assert "ran to the end" not in proc.stdout
    assert "Exception ignored" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "nfjax: terminated (SIGTERM)"


def test_an_interrupted_command_line_skips_the_teardown(tmp_path):
    """``nfjax`` stopped by SIGTERM exits 143 without the interpreter's teardown, which
    crashed with SIGSEGV (status 139) in about a third of the runs stopped while XLA was
    compiling; in-process callers (``main([...])``) still get the status back."""
    proc = _run_script(
        tmp_path, "term_exit.py",
        "import atexit, os, signal, sys, time\n"
        "from nfjax import cli\n"
        "def work(args):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "    return 0\n"
        "cli._cmd_hkls = work\n"
        "atexit.register(print, 'teardown ran')\n"
        "print('in process:', cli.main(['hkls', 'x']), flush=True)\n"
        "sys.argv = ['nfjax', 'hkls', 'x']\n"
        "sys.exit(cli.main())\n")
    assert proc.returncode == 143, (proc.stdout, proc.stderr)
    assert proc.stdout == "in process: 143\n"
    assert proc.stderr.splitlines() == ["nfjax: terminated (SIGTERM)"] * 2


def au_params_copy(tmp_path):
    """The bundled Au parameter file, copied out of the package."""
    import shutil

    from nfjax.data import au_example

    dst = tmp_path / "ps_au.txt"
    shutil.copy(au_example()["params"], dst)
    return dst


def test_spot_files_are_replaced_together_or_not_at_all(tmp_path, monkeypatch):
    import errno

    from nfjax.errors import NfjaxError
    from nfjax.io import atomic
    from nfjax.io.spots import NAMES, read_spot_files, write_spot_files
    from nfjax.spots import SpotTable

    def table(n):
        return SpotTable(key=np.array([[n, 0]], np.int32), spots=np.full((n, 3), float(n)),
                         orient=np.eye(3).reshape(1, 9))

    write_spot_files(tmp_path, table(2))
    old = {name: (tmp_path / name).read_bytes() for name in NAMES}
    real_fsync, calls = atomic.os.fsync, []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 3:  # the third file
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)
    with pytest.raises(NfjaxError, match=rf"^{tmp_path}/OrientMat.bin: cannot write \(no space "
                                         r"left on device\)$"):
        write_spot_files(tmp_path, table(5))
    assert {name: (tmp_path / name).read_bytes() for name in NAMES} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(NAMES)   # no temporaries
    monkeypatch.undo()
    write_spot_files(tmp_path, table(5))
    assert len(read_spot_files(tmp_path).spots) == 5


def test_simulate_tiff_dir_is_checked_before_the_work(tmp_path, capsys, monkeypatch):
    """``simulate --tiff-dir`` names its frames as ``process`` reads them, so it needs
    OrigFileName, and an unusable folder fails before SpotsInfo.bin is written."""
    import nfjax.simulate
    from nfjax.cli import main

    params = au_params_copy(tmp_path)
    mic = tmp_path / "none.mic"           # never read: the checks come first
    monkeypatch.setattr(nfjax.simulate, "simulate_mic", lambda *a, **k: pytest.fail("ran"))
    assert main(["simulate", str(params), str(mic), "-o", str(tmp_path / "s.bin"),
                 "--tiff-dir", str(tmp_path / "frames")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"nfjax: error: {params}: OrigFileName: expected a value (raw frame file names), "
        "found none")
    params.write_text(params.read_text() + "OrigFileName au\n")
    (tmp_path / "frames").write_text("a file")
    assert main(["simulate", str(params), str(mic), "-o", str(tmp_path / "s.bin"),
                 "--tiff-dir", str(tmp_path / "frames")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"nfjax: error: {tmp_path}/frames/au_000000.tif: cannot write ({tmp_path}/frames is a "
        "file, not a folder)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "ps_au.txt"]
    # any frame, not only the first: the 6th was written over after 5 frames and
    # SpotsInfo.bin, then the command failed and left SpotsInfo.bin behind
    from nfjax.images import frame_path
    from nfjax.params import read_params
    name = frame_path(read_params(params), 1, 5).name                # distance 2, frame 5
    (tmp_path / "frames").unlink()
    (tmp_path / "frames" / name).mkdir(parents=True)
    assert main(["simulate", str(params), str(mic), "-o", str(tmp_path / "s.bin"),
                 "--tiff-dir", str(tmp_path / "frames")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"nfjax: error: {tmp_path}/frames/{name}: cannot write (is a directory)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "ps_au.txt"]


def test_simulate_tiff_frames_go_when_spotsinfo_fails(tmp_path, capsys, monkeypatch):
    """The frames are written first; if SpotsInfo.bin then cannot be written, they are
    removed: the two outputs belong together."""
    import nfjax.observe
    import nfjax.simulate
    from nfjax.cli import main

    params = au_params_copy(tmp_path)
    params.write_text(params.read_text() + "OrigFileName au\n")
    vol = nfjax.observe.ObsVolume.__new__(nfjax.observe.ObsVolume)
    monkeypatch.setattr(nfjax.simulate, "simulate_mic", lambda *a, **k: (vol, 1, 1))
    written = []

    def frames(p, v, directory, seed=0):
        for name in ("au_000000.tif", "au_000001.tif"):
            path = tmp_path / "frames" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
            written.append(path)
        return list(written)

    def fail(path, v):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(nfjax.simulate, "write_tiff_frames", frames)
    monkeypatch.setattr(nfjax.observe, "write_spots_info", fail)
    assert main(["simulate", str(params), str(tmp_path / "x.mic"), "-o",
                 str(tmp_path / "s.bin"), "--tiff-dir", str(tmp_path / "frames")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-2] == (f"removed the 2 frame(s) written to {tmp_path / 'frames'} (the volume "
                       "they belong with could not be written)")
    assert err[-1] == f"nfjax: error: {tmp_path / 's.bin'}: No space left on device"
    assert written and not any(p.exists() for p in written)


def test_nothing_is_written_inside_the_package(tmp_path, capsys):
    """The bundled example's parameter file names no output folder, so a stage run on it
    used to write beside it, into the installed package (the repository, for an editable
    install). Refused before any work, by simulate, spots and reconstruct alike."""
    from nfjax.cli import main
    from nfjax.data import au_example
    from nfjax.io.atomic import PACKAGE_DIR, refuse_package_folder
    from nfjax.errors import NfjaxError

    files = au_example()
    before = sorted(p.name for p in files["params"].parent.iterdir())
    assert main(["simulate", str(files["params"]), str(files["mic"])]) == 2
    seeds = tmp_path / "seeds.csv"
    seeds.write_text("1,0,0,0\n")
    assert main(["spots", str(files["params"]), str(seeds)]) == 2
    params = tmp_path / "p.txt"
    params.write_text(files["params"].read_text() + f"\nOutputDirectory {PACKAGE_DIR}\n"
                      f"GrainsFile {files['grains']}\nSeedOrientations seeds.csv\n")
    assert main(["reconstruct", str(params), "--ff-seeds", "--no-image-processing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3
    assert all("refusing to write" in line and "inside the nfjax package" in line
               for line in err), err
    assert sorted(p.name for p in files["params"].parent.iterdir()) == before
    refuse_package_folder(tmp_path / "x.bin")                  # elsewhere: fine
    with pytest.raises(NfjaxError, match="inside the nfjax package"):
        refuse_package_folder(PACKAGE_DIR / "sub" / "x.bin")
