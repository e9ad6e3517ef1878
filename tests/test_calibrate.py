"""Detector calibration (nfjax.calibrate): a geometry perturbed from the one the
observations were simulated with is recovered, fixed parameters stay fixed, and the errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nfjax.calibrate import calibrate, calibrated_changes, calibration_points
from nfjax.errors import NfjaxError
from nfjax.params import parse_params, update_param_text

OFFSETS = {"lsd": (30.0, -25.0), "ybc": (0.6, -0.3), "zbc": (-0.4, 0.5),
           "tilts": (0.15, -0.1, 0.1)}


@pytest.fixture(scope="module")
def au_sim():
    """The Au example's observations simulated with its own geometry (rendered voxels),
    and 12 voxels of confidence > 0.9 whose orientations are turned by ~0.1 deg."""
    from nfjax.crystal import hkls_from_params
    from nfjax.data import au_example
    from nfjax.geometry import geometry_from_params
    from nfjax.io.mic import read_mic
    from nfjax.observe import lit_indices
    from nfjax.params import read_params
    from nfjax.simulate import select_rendered, simulate_records

    files = au_example()
    params = read_params(files["params"])
    mic = select_rendered(read_mic(files["mic"]).records, params.min_confidence)
    vol = simulate_records(params, mic, hkls_from_params(params), progress=False)
    rng = np.random.default_rng(0)
    pts = mic[rng.choice(np.flatnonzero(mic[:, 10] > 0.9), size=12, replace=False)].copy()
    pts[:, 7:10] += rng.normal(0.0, math.radians(0.1), (len(pts), 3))
    return dict(files=files, text=open(files["params"]).read(),
                geom=geometry_from_params(params), obs=vol.to_device(), bits=lit_indices(vol),
                points=pts)


def _perturbed(sim, **tolerances):
    g = sim["geom"]
    lsd = [float(v) + d for v, d in zip(g.lsd, OFFSETS["lsd"])]
    bc = [(float(y) + dy, float(z) + dz) for y, z, dy, dz in
          zip(g.ybc, g.zbc, OFFSETS["ybc"], OFFSETS["zbc"])]
    t = [float(v) + d for v, d in zip(g.tilts, OFFSETS["tilts"])]
    text = update_param_text(sim["text"], {"Lsd": lsd, "BC": bc, "tx": t[0], "ty": t[1],
                                           "tz": t[2], **tolerances})
    return parse_params(text, source="perturbed.txt")


def test_recovers_a_perturbed_geometry(au_sim):
    """Lsd 30 and 25 um off, beam centres up to 0.6 px off and tilts 0.1-0.15 deg off come
    back to within 4 um, 0.15 px and 0.1 deg, and the voxels' mean overlap fraction
    (1.0 for every voxel at the true geometry and orientations) rises from 0.12 to > 0.97."""
    params = _perturbed(au_sim, LsdTol=100.0, LsdRelativeTol=100.0, BCTol=(1.0, 1.0),
                        TiltsTol=1.0)
    r = calibrate(params, au_sim["obs"], au_sim["points"], steps=200)
    truth, got = au_sim["geom"], r.geometry
    assert r.start_fraction.mean() < 0.3
    assert r.fraction.mean() > 0.97
    np.testing.assert_allclose(got.lsd, truth.lsd, atol=4.0)
    np.testing.assert_allclose(got.ybc, truth.ybc, atol=0.15)
    np.testing.assert_allclose(got.zbc, truth.zbc, atol=0.15)
    np.testing.assert_allclose(got.tilts, truth.tilts, atol=0.1)
    # The written parameters read back to the fitted geometry (to the 1e-6 rounding).
    text = update_param_text(au_sim["text"], calibrated_changes(got))
    back = parse_params(text, source="calibrated.txt")
    np.testing.assert_allclose(back.lsd, got.lsd, atol=1e-6)
    np.testing.assert_allclose(np.asarray(back.bc), np.stack([got.ybc, got.zbc], 1),
                               atol=1e-6)
    np.testing.assert_allclose([back.tx, back.ty, back.tz], got.tilts, atol=1e-6)
    assert any(line.startswith("12 voxels: mean overlap fraction") for line in r.lines())


def test_absent_tolerances_hold_their_parameters(au_sim):
    """Only LsdTol (the Au file's other tolerances deleted): the beam centres and tilts keep their values bit for bit, the step
    between the two distances stays (LsdRelativeTol absent), and Lsd stays within LsdTol."""
    params = _perturbed(au_sim, LsdTol=10.0, LsdRelativeTol=None, BCTol=None, TiltsTol=None)
    r = calibrate(params, au_sim["obs"], au_sim["points"], steps=20, max_rounds=3)
    s, g = r.start, r.geometry
    np.testing.assert_array_equal(g.ybc, s.ybc)
    np.testing.assert_array_equal(g.zbc, s.zbc)
    np.testing.assert_array_equal(g.tilts, s.tilts)
    assert float(g.lsd[1] - g.lsd[0]) == pytest.approx(float(s.lsd[1] - s.lsd[0]), abs=1e-9)
    assert abs(float(g.lsd[0] - s.lsd[0])) <= 10.0 + 1e-9
    assert float(g.lsd[0]) < float(s.lsd[0])          # toward the truth, 30 um below


def test_cli_writes_the_calibrated_file(au_sim, tmp_path, capsys):
    """nfjax calibrate on GridPoints lines and a sparse observation file: the output file
    is the input with the Lsd/BC/tilt lines rewritten; nothing else changes."""
    from nfjax.cli import main

    params = _perturbed(au_sim, LsdTol=50.0)
    rows = au_sim["points"][:4]
    lines = [update_param_text("", {"GridSize": 2.5}).strip()]
    for row in rows:
        lines.append("GridPoints " + " ".join(repr(float(v)) for v in list(row) + [0.0]))
    text = update_param_text(au_sim["text"], {
        "Lsd": list(params.lsd), "LsdTol": 50.0, "OutputDirectory": str(tmp_path)})
    src = tmp_path / "ps.txt"
    src.write_text(text + "\n".join(lines) + "\n")
    np.savez(tmp_path / "obs.npz", index=au_sim["bits"])
    assert main(["calibrate", str(src), "--spots-info", str(tmp_path / "obs.npz"),
                 "--steps", "10"]) == 0
    out = tmp_path / "ps_calibrated.txt"
    assert f"calibrated parameters -> {out}" in capsys.readouterr().out
    new = parse_params(out.read_text(), source=str(out))
    assert len(new.grid_points) == 4
    assert new.lsd[0] != params.lsd[0] and abs(new.lsd[0] - params.lsd[0]) <= 50.0
    kept = [ln for ln in out.read_text().splitlines() if not ln.startswith(("Lsd ", "BC ",
                                                                             "tx ", "ty ",
                                                                             "tz "))]
    assert kept == [ln for ln in src.read_text().splitlines()
                    if not ln.startswith(("Lsd ", "BC ", "tx ", "ty ", "tz "))]


def test_errors(au_sim, tmp_path):
    from nfjax.io.mic import MicData

    bare = _perturbed(au_sim, LsdTol=None, LsdRelativeTol=0.0, BCTol=None, TiltsTol=None)
    with pytest.raises(NfjaxError, match="LsdTol, LsdRelativeTol, BCTol and TiltsTol are all "
                                         "absent or 0: there is nothing to calibrate"):
        calibrate(bare, au_sim["obs"], au_sim["points"])
    with pytest.raises(NfjaxError, match="no GridPoints lines: give --mic MIC"):
        calibration_points(bare)
    rows = np.zeros((2, 12))
    rows[:, 7:10] = 1.0
    rows[1, 9] = 90.0                                  # degrees

    def with_points():
        return parse_params(au_sim["text"] + "".join(
            "GridPoints " + " ".join(repr(float(v)) for v in row) + "\n" for row in rows),
            source="points.txt")

    with pytest.raises(NfjaxError, match=r"^points.txt: GridPoints line 2: Eul3: expected "
                                         r"radians .* found 90.0: are the Euler angles in "
                                         r"degrees\? \(numpy.radians converts them\)$"):
        calibration_points(with_points())
    rows[1, 9] = 6.5                                   # 2 pi + a refinement's tolerance
    assert calibration_points(with_points())[1, 9] == 6.5
    empty = MicData(records=np.zeros((3, 11)), phase_nr=np.ones(3, int), path="e.mic")
    with pytest.raises(NfjaxError, match="e.mic: no voxel has a nonzero confidence"):
        calibration_points(bare, empty)
    mic = MicData(records=au_sim["points"], phase_nr=np.ones(12, int))
    top = calibration_points(bare, mic, 5)
    assert top.shape == (5, 11) and (np.diff(top[:, 10]) <= 0).all()
    assert top[0, 10] == au_sim["points"][:, 10].max()


def test_whole_map_recovers_the_geometry(au_window):
    """A small solid sample (two grains) seen through a geometry left as the per-voxel pass
    leaves one (beam centres 0.4-0.5 px off along y and 0.05 px along z, Lsd 1 um off):
    the whole-map search with the true orientations held brings every beam centre back to
    within 0.03 px and Lsd to within 0.3 um, and the map's intersection over union from
    < 0.9 to > 0.99 (1 at the simulating geometry)."""
    from nfjax.calibrate import calibrate_whole_map

    w = au_window
    g = w["geom"]
    moved = parse_params(update_param_text(w["text"], {
        "Lsd": [float(v) + 1.0 for v in g.lsd],
        "BC": [(float(g.ybc[0]) + 0.5, float(g.zbc[0]) - 0.05),
               (float(g.ybc[1]) - 0.4, float(g.zbc[1]) + 0.05)],
        "BCTol": (1.0, 1.0), "LsdTol": 10.0, "LsdRelativeTol": 5.0, "TiltsTol": None}),
        source="moved.txt")
    lines = []
    r = calibrate_whole_map(moved, w["vol"].to_device(), w["records"], log=lines.append)
    got = r.geometry
    assert r.start_score.iou < 0.9 and r.score.iou > 0.99
    assert r.n_voxels == len(w["records"]) and r.cell == pytest.approx(2.5)
    np.testing.assert_allclose(got.ybc, g.ybc, atol=0.03)
    np.testing.assert_allclose(got.zbc, g.zbc, atol=0.03)
    np.testing.assert_allclose(got.lsd, g.lsd, atol=0.3)
    np.testing.assert_array_equal(got.tilts, r.start.tilts)          # TiltsTol absent
    assert r.passes > 1 and r.evaluations > r.rounds
    assert lines[0].startswith(f"whole map: {len(w['records'])} voxels as 2.5 um triangles")
    assert any("compass pass 1 round 1:" in ln for ln in lines)
    assert r.lines()[-1].startswith(f"whole map of {len(w['records'])} voxels (2.5 um "
                                    "triangles): intersection over union")


def test_cli_whole_map(au_window, tmp_path, capsys):
    """nfjax calibrate --mic MIC --whole-map: the per-voxel pass on the mic's 2 most
    confident voxels, then the whole map of its voxels, from a beam centre 0.4 px off
    along y; the written beam centres are the truth's and the whole map's lines are
    printed. Bad flag combinations fail before any work with a one-line error."""
    from nfjax.cli import main
    from nfjax.io.mic import write_text_mic
    from nfjax.observe import write_spots_info

    w = au_window
    g = w["geom"]
    rec = w["records"].copy()
    write_text_mic(tmp_path / "map.mic", rec)
    text = update_param_text(w["text"], {
        "BC": [(float(g.ybc[0]) + 0.4, float(g.zbc[0])), (float(g.ybc[1]), float(g.zbc[1]))],
        "BCTol": (1.0, 1.0), "LsdTol": None, "LsdRelativeTol": None, "TiltsTol": None,
        "OutputDirectory": str(tmp_path)})
    src = tmp_path / "ps.txt"
    src.write_text(text)
    write_spots_info(tmp_path / "SpotsInfo.bin", w["vol"])
    for bad, says in ((["--whole-map"], "--whole-map renders a reconstruction: give it "
                                        "with --mic MIC"),
                      (["--mic", str(tmp_path / "map.mic"), "--cell", "2.5"],
                       "--cell 2.5: expected a positive edge length in um, with --whole-map"),
                      (["--mic", str(tmp_path / "map.mic"), "--whole-map", "--cell", "-1"],
                       "--cell -1.0: expected a positive edge length in um, with "
                       "--whole-map")):
        assert main(["calibrate", str(src), *bad]) == 2
        assert capsys.readouterr().err == f"nfjax: error: {says}\n"
    assert not (tmp_path / "ps_calibrated.txt").exists()
    assert main(["calibrate", str(src), "--mic", str(tmp_path / "map.mic"), "--points", "2",
                 "--steps", "0", "--whole-map"]) == 0
    out = capsys.readouterr().out
    assert f"whole map of {len(rec)} voxels (2.5 um triangles)" in out
    new = parse_params((tmp_path / "ps_calibrated.txt").read_text(), source="calibrated")
    np.testing.assert_allclose(np.asarray(new.bc), np.stack([g.ybc, g.zbc], 1), atol=0.02)
