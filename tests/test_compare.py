"""nfjax.compare: MIDAS's NF benchmark comparison, on the bundled Au example and small mics."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import nfjax  # noqa: F401  (x64)
from nfjax.cli import main
from nfjax.compare import compare_mics, format_comparison
from nfjax.errors import NfjaxError

HEADER = ("%TriEdgeSize 1.000000\n%NumPhases 1\n%GlobalPosition 0.000000\n"
          "%OrientationRowNr\tOrientationID\tRunTime\tX\tY\tTriEdgeSize\tUpDown\t"
          "Eul1\tEul2\tEul3\tConfidence\tPhaseNr\n")


def _write_text_mic(path, rows):
    """rows: (x, y, eul1, eul2, eul3, confidence); written in ParseMic's %lf layout."""
    with open(path, "w") as fh:
        fh.write(HEADER)
        for x, y, e1, e2, e3, conf in rows:
            vals = [0.0, 1.0, 0.0, x, y, 1.0, 1.0, e1, e2, e3, conf]
            fh.write("\t".join(f"{v:f}" for v in vals) + "\t1\n")
    return path


def test_au_benchmark_numbers(midas_au):
    # The MIDAS Au benchmark: reconstructed map (A) against the ground truth (B).
    # Stated result: 3120 of 3456 voxels matched (90.3%), 88.7% of matched and 80.1% of
    # all ground-truth voxels within 0.25 deg, median 0.0625 deg.
    a = midas_au / "Au_txt_Reconstructed.mic"
    b = midas_au / "Au_txt.mic"
    r = compare_mics(a, b, space_group=225)
    assert r.n_reference == 3456
    assert r.n_a == 3120
    assert r.n_matched == 3120
    assert round(100 * r.coverage, 1) == 90.3
    assert r.thresholds_deg[0] == 0.25
    assert round(100 * r.frac_matched[0], 1) == 88.7
    assert round(100 * r.frac_reference[0], 1) == 80.1
    assert r.median_deg == pytest.approx(0.0625, abs=1e-4)
    assert r.positions.shape == (3120, 2) and r.misorientation_deg.shape == (3120,)

    # Per voxel against scipy with the exact cubic group (MIDAS's 5-decimal operators
    # limit agreement to ~1e-5 rad).
    rows_a = np.loadtxt(a, comments="%")
    rows_b = np.loadtxt(b, comments="%")
    ra = Rotation.from_euler("ZXZ", rows_a[r.index_a, 7:10])
    rb = Rotation.from_euler("ZXZ", rows_b[r.index_b, 7:10])
    d = ra.inv() * rb
    oracle = np.degrees(np.min([(d * g).magnitude() for g in Rotation.create_group("O")],
                               axis=0))
    np.testing.assert_allclose(r.misorientation_deg, oracle, rtol=0, atol=1e-3)
    np.testing.assert_allclose(r.positions, rows_b[r.index_b, 3:5], rtol=0, atol=0)
    np.testing.assert_allclose(np.round(rows_a[r.index_a, 3:5], 4),
                               np.round(rows_b[r.index_b, 3:5], 4), rtol=0, atol=0)


def test_au_benchmark_cli(midas_au, capsys):
    a = str(midas_au / "Au_txt_Reconstructed.mic")
    b = str(midas_au / "Au_txt.mic")
    assert main(["compare", a, b]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "reference B: 3456 voxels; A: 3120 voxels; matched 3120 (90.3% of B)"
    assert lines[1] == "misorientation (deg, space group 225): median 0.0625"
    assert lines[2] == "  < 0.25: 88.7% of matched, 80.1% of B"
    assert len(lines) == 2 + 5


def test_min_confidence_restricts_the_reference(midas_au, capsys):
    """--min-confidence C counts only the reference voxels with Confidence >= C: of the
    Au ground truth, the 1514 voxels simulate renders (MinConfidence 0.7)."""
    a = midas_au / "Au_txt_Reconstructed.mic"
    b = midas_au / "Au_txt.mic"
    rows_b = np.loadtxt(b, comments="%")
    r = compare_mics(a, b, min_confidence=0.7)
    assert r.n_reference == int(np.sum(rows_b[:, 10] >= 0.7)) == 1514
    full = compare_mics(a, b)
    # the same pairs, restricted to confident reference voxels
    conf_b = {tuple(np.round(xy, 4)) for xy in rows_b[rows_b[:, 10] >= 0.7][:, 3:5]}
    kept = [i for i, xy in enumerate(full.positions) if tuple(np.round(xy, 4)) in conf_b]
    np.testing.assert_array_equal(np.sort(r.misorientation_deg),
                                  np.sort(full.misorientation_deg[kept]))
    assert main(["compare", str(a), str(b), "--min-confidence", "0.7"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("reference B: 1514 voxels;")
    assert main(["compare", str(a), str(b), "--min-confidence", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == ("nfjax: error: --min-confidence: expected a "
                                               "number between 0 and 1, found 1.5")


def test_positions_that_differ_are_unmatched(tmp_path):
    e = (0.3, 0.9, 1.7)
    ref = _write_text_mic(tmp_path / "b.mic", [
        (0.0, 0.0, *e, 0.9), (1.25, 0.0, *e, 0.8), (2.5, 2.165064, *e, 0.7),
        (3.75, 0.0, *e, 0.6)])
    d = math.radians(1.5)
    # phi1 + d rotates U about the sample z: U' = Rz(d) U, misorientation d (d small).
    got = _write_text_mic(tmp_path / "a.mic", [
        (0.0, 0.0, e[0] + d, e[1], e[2], 0.5),           # matched, 1.5 deg
        (1.25, 0.001, *e, 0.5),                          # 1e-3 away: unmatched
        (2.5, 2.1650641, *e, 0.5),                       # same after rounding: matched, 0
        (7.5, 0.0, *e, 0.5)])                            # not in the reference
    r = compare_mics(got, ref, space_group=225)
    assert (r.n_reference, r.n_a, r.n_matched) == (4, 4, 2)
    assert r.coverage == 0.5
    np.testing.assert_array_equal(r.index_a, [0, 2])
    np.testing.assert_array_equal(r.index_b, [0, 2])
    np.testing.assert_allclose(r.misorientation_deg, [1.5, 0.0], rtol=0, atol=1e-3)
    assert r.frac_matched == (0.5, 0.5, 0.5, 1.0, 1.0)
    assert r.frac_reference == (0.25, 0.25, 0.25, 0.5, 0.5)
    assert r.median_deg == pytest.approx(0.75, abs=1e-3)
    text = format_comparison(r)
    assert text.splitlines()[0] == "reference B: 4 voxels; A: 4 voxels; matched 2 (50.0% of B)"
    assert "  < 2: 100.0% of matched, 50.0% of B" in text


def test_nearest_pairs_maps_on_different_grids(tmp_path, capsys):
    """--nearest: each reference voxel takes the closest evaluated voxel within the
    distance; one evaluated voxel may serve two reference voxels; farther ones stay out."""
    e = (0.3, 0.9, 1.7)
    d = math.radians(0.4)
    ref = _write_text_mic(tmp_path / "b.mic", [
        (0.0, 0.0, *e, 0.9), (2.5, 0.0, *e, 0.9), (2.9, 0.3, *e, 0.9), (9.0, 9.0, *e, 0.9)])
    got = _write_text_mic(tmp_path / "a.mic", [
        (0.3, 0.1, e[0] + d, e[1], e[2], 0.5),           # nearest to ref 0 (0.32 um)
        (2.7, 0.1, *e, 0.5),                             # nearest to refs 1 and 2
        (0.0, 0.8, *e, 0.5)])                            # 0.8 um from ref 0: not nearest
    r = compare_mics(got, ref, nearest=1.0)
    assert (r.n_reference, r.n_matched) == (4, 3)        # ref 3 is 8.9 um from anything
    np.testing.assert_array_equal(r.index_b, [0, 1, 2])
    np.testing.assert_array_equal(r.index_a, [0, 1, 1])
    np.testing.assert_allclose(r.misorientation_deg, [0.4, 0.0, 0.0], atol=1e-3)
    assert compare_mics(got, ref).n_matched == 0          # by position: nothing in common
    empty = _write_text_mic(tmp_path / "e.mic", [(0.0, 0.0, *e, 0.0)])   # no confident voxel
    assert compare_mics(empty, ref, nearest=1.0).n_matched == 0
    assert main(["compare", str(got), str(ref), "--nearest", "0.3"]) == 0
    assert "matched 2 (50.0% of B)" in capsys.readouterr().out
    # 0 would match nothing (the bound is strict), a negative or nan distance everything
    # or nothing: each is a one-line error.
    for bad in ("0", "-1", "nan", "inf"):
        assert main(["compare", str(got), str(ref), "--nearest", bad]) == 2
        err = capsys.readouterr().err
        assert "--nearest: expected a positive distance" in err
        assert len(err.strip().splitlines()) == 1


def test_binary_holes_are_ignored_and_nothing_matched(tmp_path):
    rec = np.zeros((3, 11))
    rec[0, [3, 4, 7, 8, 9, 10]] = [5.0, 5.0, 0.1, 0.2, 0.3, 0.9]   # a voxel
    rec[2, [3, 4, 7, 8, 9, 10]] = [6.0, 5.0, 0.1, 0.2, 0.3, 0.4]   # row 1 is a hole
    binary = tmp_path / "a.bin"
    rec.astype("<f8").tofile(binary)
    ref = _write_text_mic(tmp_path / "b.mic", [(0.0, 0.0, 0.1, 0.2, 0.3, 1.0)])
    r = compare_mics(binary, ref)
    assert (r.n_a, r.n_reference, r.n_matched) == (2, 1, 0)   # the hole at (0, 0) is no voxel
    assert math.isnan(r.median_deg)
    assert "nothing to compare" in format_comparison(r)
    # and the other way round: the binary map as reference, text map at one of its voxels
    got = _write_text_mic(tmp_path / "c.mic", [(6.0, 5.0, 0.1, 0.2, 0.3, 1.0)])
    r2 = compare_mics(got, binary)
    assert (r2.n_reference, r2.n_matched) == (2, 1)
    np.testing.assert_allclose(r2.misorientation_deg, [0.0], atol=1e-6)


def test_missing_file_is_one_line_error(tmp_path, midas_au, capsys):
    missing = tmp_path / "nope.mic"
    with pytest.raises(NfjaxError) as info:
        compare_mics(missing, midas_au / "Au_txt.mic")
    msg = str(info.value)
    assert "\n" not in msg and str(missing) in msg and "not found" in msg
    assert main(["compare", str(missing), str(midas_au / "Au_txt.mic")]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(missing) in err
