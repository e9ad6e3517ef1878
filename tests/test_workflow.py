"""``nfjax reconstruct``: the Au example from its parameter file, MIDAS's file map, resume
after a kill, stage invalidation, bad input, and MPI equivalence."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import need_mpiexec
from nfjax import observe
from nfjax.cli import main
from nfjax.compare import compare_records
from nfjax.data import au_example
from nfjax.errors import NfjaxError
from nfjax.io.mic import read_mic
from nfjax.maps import MAP_SUFFIXES, read_map_file
from nfjax.params import read_params, update_param_text
from nfjax.workflow import reconstruct

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def spotsinfo(tmp_path_factory):
    """SpotsInfo.bin simulated once from the Au ground truth (nfjax simulate)."""
    from nfjax.crystal import hkls_from_params
    from nfjax.simulate import select_rendered, simulate_records

    files = au_example()
    params = read_params(files["params"])
    recs = select_rendered(read_mic(files["mic"]).records, params.min_confidence)
    vol = simulate_records(params, recs, hkls_from_params(params), progress=False)
    path = tmp_path_factory.mktemp("obs") / "SpotsInfo.bin"
    observe.write_spots_info(path, vol)
    return path


def _setup(directory: Path, spotsinfo: Path, raw: str = "", **changes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    files = au_example()
    shutil.copy(files["grains"], directory / "grs.csv")
    os.symlink(spotsinfo, directory / "SpotsInfo.bin")
    values = {"DataDirectory": ".", "GrainsFile": "grs.csv",
              "SeedOrientations": "seeds.csv"}
    values.update(changes)
    text = update_param_text(files["params"].read_text(), values) + raw
    path = directory / "params.txt"
    path.write_text(text)
    return path


def _small(**extra):
    """A 20 x 20 um window of the grid: fast, and it holds parts of all four grains."""
    return dict(GridMask=(-10.0, 10.0, -10.0, 10.0), **extra)


MIDAS_FILES = ["hkls.csv", "grid.txt", "seeds.csv", "Key.bin", "DiffractionSpots.bin",
               "OrientMat.bin", "Au_bin_Reconstructed.mic", "Au_bin_Reconstructed.mic.AllMatches",
               "Au_txt_Reconstructed.mic", "midas_log/hkls_out.csv", "midas_log/hex_out.csv",
               "midas_log/seed_out.csv", "midas_log/spots_out.csv", "midas_log/fit0_out.csv",
               "midas_log/parse_out.csv", "midas_log/midas_nf_workflow_multires.log"] + [
               f"Au_txt_Reconstructed.mic{s}" for s in MAP_SUFFIXES + (".AllMatches",)]


def test_single_resolution_au_from_parameter_file(tmp_path, spotsinfo):
    params = _setup(tmp_path / "run", spotsinfo)
    final = reconstruct(params, ff_seeds=True, image_processing=False, progress=False)
    out = tmp_path / "run"
    assert final == out / "Au_txt_Reconstructed.mic"
    for name in MIDAS_FILES:
        assert (out / name).exists(), name
    rec = read_mic(out / "Au_bin_Reconstructed.mic").records
    assert rec.shape == (3456, 11)
    # ParseMic's pixel maps of the text mic: the four grains of the sample hold most of
    # the pixels (the rest: low-confidence voxels at the sample's edge that got other
    # orientations).
    _, planes = read_map_file(out / "Au_txt_Reconstructed.mic.map")
    hit = planes[0] != -15
    assert set(np.unique(planes[0][hit])) <= set(rec[:, 10])
    _, grain = read_map_file(out / "Au_txt_Reconstructed.mic.map.grainId")
    sizes = np.sort(np.bincount(grain[0][hit].astype(np.int64)))[::-1]
    assert sizes[:4].sum() >= 0.8 * hit.sum(), sizes[:8]
    assert "parse: " in (out / "midas_log" / "parse_out.csv").read_text()
    # ParseMic's text .AllMatches: a row for each binary .AllMatches row with a solution.
    from nfjax.io.mic import read_allmatches

    n_sol = read_params(out / "params.txt").save_n_solutions
    am = read_allmatches(out / "Au_bin_Reconstructed.mic.AllMatches", n_sol)
    text_am = (out / "Au_txt_Reconstructed.mic.AllMatches").read_text().splitlines()
    assert len(text_am) == 4 + np.count_nonzero(am[:, 10])
    assert text_am[4].split("\t")[:11] == ["%f" % v for v in am[am[:, 10] != 0][0, :11]]
    # The fit stage's log line: the work done and its timings.
    fit_log = (out / "midas_log" / "fit0_out.csv").read_text()
    m = re.search(r"fit: (\d+) of 3456 voxels fitted; (\d+) winners .* tied voxels decided .*"
                  r"refine [0-9.]+ s", fit_log)
    assert m and int(m.group(1)) == np.count_nonzero(rec[:, 10]), fit_log
    truth = read_mic(au_example()["mic"]).records
    rendered = truth[truth[:, 10] >= 0.7]
    cmp = compare_records(rec, rendered)
    assert cmp.n_matched == 1514
    assert cmp.frac_reference[0] >= 0.995         # within 0.25 deg (99.54 %; MIDAS: 99.21 %)
    conf = rec[rec[:, 10] > 0][cmp.index_a, 10]
    assert conf.mean() >= 0.97
    # The logs say how good the map is, not only how many voxels were "fitted".
    good = int(np.count_nonzero(rec[:, 10] >= 0.7))
    quality = (f"3456 voxels, {good} ({100 * good / 3456:.1f} %) at or above MinConfidence "
               f"0.7, mean confidence {rec[rec[:, 10] > 0, 10].mean():.3f}")
    assert f"fit: {quality}\n" in fit_log
    master = (out / "midas_log" / "midas_nf_workflow_multires.log").read_text()
    assert re.search(rf"finished in [0-9.]+ s -> {re.escape(str(final))}; "
                     rf"{re.escape(quality)}\n", master), master[-400:]
    assert "warning" not in master


def test_a_run_that_finds_nothing_says_so(tmp_path, spotsinfo):
    """Seeds that are not the sample's orientations: every voxel gets some orientation
    (MIDAS would call them fitted), none reaches MinConfidence, and the log warns."""
    run = _setup(tmp_path / "run", spotsinfo, **_small())
    (tmp_path / "run" / "seeds.csv").write_text("1,0,0,0\n0.7071068,0.7071068,0,0\n")
    reconstruct(run, image_processing=False, progress=False)
    master = (tmp_path / "run" / "midas_log" / "midas_nf_workflow_multires.log").read_text()
    assert "(0.0 %) at or above MinConfidence 0.7" in master
    assert ("warning: fit: no voxel reached MinConfidence 0.7; the seed orientations may not "
            "contain the sample's") in master


def test_quality_line():
    from nfjax.workflow import quality_line

    rec = np.zeros((4, 11))
    rec[:, 10] = [0.0, 0.5, 0.8, 0.9]
    assert quality_line(rec, 0.7) == ("4 voxels, 2 (50.0 %) at or above MinConfidence 0.7, "
                                      "mean confidence 0.733", 2)
    assert quality_line(rec, None) == ("4 voxels, 3 with an orientation, mean confidence "
                                       "0.733", 3)


def test_midas_log_names():
    from nfjax.workflow import midas_log_name

    assert [midas_log_name(s) for s in ("hkls", "seeds", "seeds2", "grid", "grid1", "spots",
                                        "spots_all", "images", "fit", "fit0", "seeded1",
                                        "unseeded2", "cluster2", "parse", "parse_merged2",
                                        "map")] == [
        "hkls", "seed", "seed", "hex", "hex", "spots", "spots", "image0", "fit0", "fit0",
        "fit0", "fit0", "mic2grains_2", "parse", "parse", "map"]
    assert midas_log_name("seeded1", rank=3) == "fit3"


def test_hexagonal_titanium_end_to_end(tmp_path):
    """A non-cubic material through the whole chain: alpha-Ti (P6_3/mmc) with the Au
    detector, three Voronoi grains (0.05 deg spread) on the Au voxels of a 30 x 30 um
    window, rendered by simulate, reconstructed seeded from the grains, compared and
    clustered with the hexagonal symmetry (measured 349 of 350 voxels within 0.25 deg)."""
    import jax.numpy as jnp

    from nfjax.cluster import cluster_mic
    from nfjax.crystal import hkls_from_params, symmetry_quaternions
    from nfjax.grid import grid_from_params
    from nfjax.io.grains import read_grains_csv
    from nfjax.orientation import euler_to_matrix, matrix_to_quat, misorientation
    from nfjax.simulate import simulate_records, voronoi_microstructure

    out = tmp_path / "ti"
    out.mkdir()
    lattice = (2.9505, 2.9505, 4.6826, 90.0, 90.0, 120.0)
    text = update_param_text(au_example()["params"].read_text(), {
        "SpaceGroup": 194, "LatticeParameter": lattice, "GridMask": (-15.0, 15.0, -15.0, 15.0),
        "DataDirectory": ".", "GrainsFile": "grains.csv", "SeedOrientations": "seeds.csv"})
    (out / "params.txt").write_text(text)
    params = read_params(out / "params.txt")
    assert not [w for w in params.warnings if "LatticeParameter" in w]
    grid = grid_from_params(params)
    on_grid = {(round(x, 3), round(y, 3)) for x, y in grid[:, 2:4]}
    au = read_mic(au_example()["mic"]).records
    rows = au[[(round(r[3], 3), round(r[4], 3)) in on_grid for r in au]]
    eul = np.radians([[20.0, 35.0, 10.0], [115.0, 80.0, 40.0], [250.0, 140.0, 55.0]])
    mats = np.asarray(euler_to_matrix(jnp.asarray(eul)))
    centres = [(-8.0, -8.0), (8.0, -6.0), (0.0, 9.0)]
    with open(out / "grains.csv", "w") as fh:
        fh.write("%NumGrains 3\n%GrainID O11 O12 O13 O21 O22 O23 O31 O32 O33 X Y Z "
                 "a b c alpha beta gamma\n")
        for i, (m, (x, y)) in enumerate(zip(mats, centres), start=1):
            fh.write(f"{i} {' '.join(f'{v:.12f}' for v in m.ravel())} {x:.6f} {y:.6f} "
                     f"0.000000 {' '.join(f'{v:.6f}' for v in lattice)}\n")
    truth, label = voronoi_microstructure(rows, read_grains_csv(out / "grains.csv"),
                                          spread_deg=0.05, seed=1)
    assert len(truth) == 350 and np.bincount(label).tolist() == [102, 105, 143]
    observe.write_spots_info(out / "SpotsInfo.bin", simulate_records(
        params, truth, hkls_from_params(params), progress=False))
    final = reconstruct(out / "params.txt", ff_seeds=True, image_processing=False,
                        progress=False)
    rec = read_mic(out / "Au_bin_Reconstructed.mic").records
    cmp = compare_records(rec, truth, space_group=194)
    assert cmp.n_matched == 350
    assert cmp.frac_reference[0] >= 0.99, cmp.frac_reference      # within 0.25 deg
    # Clustered with the hexagonal symmetry: the three grains, each within 0.1 deg of one
    # true orientation (the voxels' spread is 0.05 deg).
    grains = cluster_mic(read_mic(final), params=params)
    assert len(grains.ids) == 3
    sym = jnp.asarray(symmetry_quaternions(194))
    miso = np.degrees(np.asarray(misorientation(
        matrix_to_quat(jnp.asarray(grains.matrices))[:, None],
        matrix_to_quat(jnp.asarray(mats))[None], sym)))               # (3 found, 3 true)
    assert sorted(np.argmin(miso, axis=1).tolist()) == [0, 1, 2]
    assert np.all(np.min(miso, axis=1) < 0.1), miso


def _final_bytes(out: Path) -> dict[str, bytes]:
    names = ["Au_bin_Reconstructed.mic", "Au_bin_Reconstructed.mic.AllMatches",
             "Au_txt_Reconstructed.mic", "grid.txt", "hkls.csv", "seeds.csv", "Key.bin",
             "DiffractionSpots.bin", "OrientMat.bin"] + [
        f"Au_txt_Reconstructed.mic{s}" for s in MAP_SUFFIXES + (".AllMatches",)]
    return {n: (out / n).read_bytes() for n in names}


def test_resume_after_kill_gives_identical_files(tmp_path, spotsinfo, monkeypatch, caplog):
    import nfjax.fit

    ref = _setup(tmp_path / "ref", spotsinfo, **_small())
    reconstruct(ref, ff_seeds=True, image_processing=False, progress=False)
    run = _setup(tmp_path / "run", spotsinfo, **_small())
    real_fit = nfjax.fit.fit_grid

    def killed(*args, **kwargs):
        raise KeyboardInterrupt      # what a SIGINT during the fit stage raises
    monkeypatch.setattr(nfjax.fit, "fit_grid", killed)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(run, ff_seeds=True, image_processing=False, progress=False)
    out = tmp_path / "run"
    assert not (out / "Au_bin_Reconstructed.mic").exists()     # nothing half-written
    assert not list(out.glob("*.part"))
    # The logs say how the run ended.
    assert (out / "midas_log" / "midas_nf_workflow_multires.log").read_text().splitlines()[
        -1].endswith("stage fit            interrupted")
    assert (out / "midas_log" / "fit0_err.csv").read_text() == "fit interrupted\n"
    monkeypatch.setattr(nfjax.fit, "fit_grid", real_fit)
    import logging
    caplog.set_level(logging.INFO, logger="nfjax.workflow")
    logger = logging.getLogger("nfjax.workflow")
    reconstruct(run, ff_seeds=True, image_processing=False, resume=True, progress=False)
    log = (out / "midas_log" / "midas_nf_workflow_multires.log").read_text()
    for stage in ("hkls", "seeds", "grid", "spots"):
        assert f"stage {stage:<14s} skipped" in log, stage
    # the seconds spent reading the observations are accounted for, between the stages
    assert re.search(rf"observations   {re.escape(str(out))}/SpotsInfo.bin \(\d+\.\d\d GB\) "
                     r"read in \d+\.\d s\n.* stage fit            started", log), log
    assert _final_bytes(out) == _final_bytes(tmp_path / "ref")
    del logger


def _skipped(out: Path) -> set[str]:
    last = (out / "midas_log" / "midas_nf_workflow_multires.log").read_text()
    last = last.split("nfjax reconstruct")[-1]
    return {line.split()[3] for line in last.splitlines()
            if len(line.split()) > 4 and line.split()[2] == "stage"
            and line.split()[4] == "skipped"}


def _ran(out: Path) -> set[str]:
    """Every stage of the last run in the master log, skipped or not."""
    last = (out / "midas_log" / "midas_nf_workflow_multires.log").read_text()
    last = last.split("nfjax reconstruct")[-1]
    return {line.split()[3] for line in last.splitlines()
            if len(line.split()) > 4 and line.split()[2] == "stage"
            and line.split()[4] in ("skipped", "started")}


def test_changed_parameter_invalidates_dependent_stages(tmp_path, spotsinfo):
    params = _setup(tmp_path / "run", spotsinfo, **_small())
    out = tmp_path / "run"
    reconstruct(params, ff_seeds=True, image_processing=False, progress=False)
    reconstruct(params, ff_seeds=True, image_processing=False, resume=True, progress=False)
    assert _skipped(out) == {"hkls", "seeds", "grid", "spots", "fit", "parse"}
    # MinConfidence reaches a fit only through a library pass's near misses: a seeded fit
    # (--ff-seeds) does not rerun.
    params.write_text(update_param_text(params.read_text(), {"MinConfidence": 0.6}))
    reconstruct(params, ff_seeds=True, image_processing=False, resume=True, progress=False)
    assert _skipped(out) == {"hkls", "seeds", "grid", "spots", "fit", "parse"}
    params.write_text(update_param_text(params.read_text(), {"OrientTol": 1.5}))
    reconstruct(params, ff_seeds=True, image_processing=False, resume=True, progress=False)
    assert _skipped(out) == {"hkls", "seeds", "grid", "spots"}       # the fit and its maps
    params.write_text(update_param_text(params.read_text(), {"GridMask": (-8.0, 10.0, -10.0,
                                                                          10.0)}))
    reconstruct(params, ff_seeds=True, image_processing=False, resume=True, progress=False)
    assert _skipped(out) == {"hkls", "seeds", "spots"}               # grid, fit, maps
    # The wavelength moves every Bragg angle: hkls, spots and fit rerun, and the result is
    # the one a fresh run gives.
    params.write_text(update_param_text(params.read_text(), {"Wavelength": 0.1725}))
    reconstruct(params, ff_seeds=True, image_processing=False, resume=True, progress=False)
    assert _skipped(out) == {"seeds", "grid"}
    fresh = _setup(tmp_path / "fresh", spotsinfo)
    fresh.write_text(params.read_text())
    reconstruct(fresh, ff_seeds=True, image_processing=False, progress=False)
    assert _final_bytes(out) == _final_bytes(tmp_path / "fresh")
    # GBAngle reaches only the maps.
    params.write_text(update_param_text(params.read_text(), {"GBAngle": 8.0}))
    reconstruct(params, ff_seeds=True, image_processing=False, resume=True, progress=False)
    assert _skipped(out) == {"hkls", "seeds", "grid", "spots", "fit"}
    # A renamed output reruns the stage that writes it instead of failing on the old path.
    params.write_text(update_param_text(params.read_text(),
                                        {"MicFileBinary": "renamed_bin.mic"}))
    reconstruct(params, ff_seeds=True, image_processing=False, resume=True, progress=False)
    # (the same records: their maps stand)
    assert _skipped(out) == {"hkls", "seeds", "grid", "spots", "parse"}
    assert (out / "renamed_bin.mic").exists()


@pytest.mark.parametrize("changes, message", [
    ({"GridRefactor": (5.0, 2.0, 2)}, "GridRefactor needs SeedOrientationsAll"),
    ({"GridRefactor": (5.0, 2.0, 2), "SeedOrientationsAll": "seeds.csv"},
     "SeedOrientationsAll must differ from SeedOrientations"),
    ({"GrainsFile": "missing_grains.csv"}, "GrainsFile is not a readable file"),
    ({"raw": "GridRefactor 5.0 2.0 2.5\n"}, "GridRefactor: expected an integer"),
    ({"GridRefactor": (5.0, 2.0, 2), "SeedOrientationsAll": "./sub/../seeds.csv"},
     "SeedOrientationsAll must differ from SeedOrientations"),
    ({"OutputDirectory": "seeds.csv"}, "OutputDirectory: expected a directory, found a file"),
    ({"GridRefactor": (5.0, 2.0, 2), "SeedOrientationsAll": "."},
     "SeedOrientationsAll is a directory, expected a file: "),
])
def test_bad_input_fails_before_any_work(tmp_path, spotsinfo, capsys, changes, message):
    out = tmp_path / "run"
    params = _setup(out, spotsinfo, **changes)
    (out / "seeds.csv").write_text("1,0,0,0\n")
    rc = main(["reconstruct", str(params), "--ff-seeds", "--no-image-processing"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "hkls.csv").exists()                 # nothing ran


def _bad(out: Path, spec: str) -> list[str]:
    """Spoil one input of a run set up in ``out``; returns extra CLI arguments."""
    params = out / "params.txt"
    edit = {
        "bad_seeds": {"SeedOrientations": "seeds.csv"},
        "rings": {"RingsToUse": 99},
        "mask": {"GridMask": (100.0, 110.0, 100.0, 110.0)},
        "tomo": {"TomoImage": "tomo.bin", "TomoPixelSize": 1.0},
        "library": {"GridRefactor": (5.0, 2.0, 1), "SeedOrientationsAll": "library.csv"},
        "frames": {"OrigFileName": "au", "extOrig": "tif"},
    }.get(spec, {})
    if edit:
        params.write_text(update_param_text(params.read_text(), edit))
    (out / "seeds.csv").write_text("1,0,0,0\n1,0,0,abc\n" if spec == "bad_seeds"
                                   else "1,0,0,0\n")
    (out / "library.csv").write_text("1,0,0,0\n0,1,0,0,\n0.5,x\n")
    args = ["--no-image-processing"]
    if spec == "grains":
        (out / "grs.csv").write_text((out / "grs.csv").read_text().splitlines()[0] + "\n")
    if spec in ("grains", "mask", "tomo", "memory", "no_spotsinfo", "short_spotsinfo",
                "device"):
        args.append("--ff-seeds")
    if spec == "memory":
        args += ["--max-memory", "abc"]
    if spec in ("no_spotsinfo", "short_spotsinfo"):
        (out / "SpotsInfo.bin").unlink()
        if spec == "short_spotsinfo":
            (out / "SpotsInfo.bin").write_bytes(b"\0" * 1024)
    if spec in ("frames", "no_names"):
        args = ["--ff-seeds"]                       # process images: none are there
    if spec == "device":
        args += ["--device", "gpu"]
    return args


@pytest.mark.parametrize("spec, message", [
    ("bad_seeds", "seeds.csv:2: expected 4 numbers"),
    ("grains", "no grains found"),
    ("rings", ": RingsToUse 99: no such ring"),
    ("mask", "grid is empty after GridMask"),
    ("tomo", "tomo.bin: tomography image (TomoImage) not found"),
    ("memory", "--max-memory: expected a size"),
    ("no_spotsinfo", "SpotsInfo.bin: not found (image processing was skipped"),
    ("short_spotsinfo", "SpotsInfo.bin: expected"),
    ("no_names", "params.txt: OrigFileName: expected a value"),
    ("frames", "au_000000.tif: raw frame not found"),
    ("library", "library.csv:3: expected at least 4"),
    ("device", "--device gpu: no gpu device is available"),
])
def test_bad_inputs_read_later_fail_before_any_work(tmp_path, spotsinfo, capsys, spec,
                                                    message):
    """Inputs that used to be read by their stage (after hkls, seeds, grid and spots had
    written their files) are read or checked up front: one line, nothing written."""
    if spec == "device":
        import jax

        if any(d.platform == "gpu" for d in jax.devices()):
            pytest.skip("a GPU is present: --device gpu is valid here")
    out = tmp_path / "run"
    _setup(out, spotsinfo, **_small())
    args = _bad(out, spec)
    before = sorted(p.name for p in out.iterdir())
    rc = main(["reconstruct", str(out / "params.txt"), *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in out.iterdir()) == before      # nothing written



def test_warnings_shown_when_preflight_fails(tmp_path, capsys):
    """A misspelt key's warning is printed before the preflight error it may explain
    (before, the warnings were only logged once preflight had passed)."""
    params = _setup(tmp_path / "run", tmp_path / "absent.bin", raw="SeedOrientatons s.csv\n",
                    SeedOrientations="no_such_seeds.csv")
    assert main(["reconstruct", str(params)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert "did you mean 'SeedOrientations'" in err[0] and err[0].startswith("warning:"), err
    assert err[1].startswith("nfjax: error:") and "no_such_seeds.csv" in err[1], err


def test_midas_driver_flags_are_accepted(tmp_path, spotsinfo, capsys):
    # A misspelt key is not silently dropped: the parser's warning is shown and logged.
    params = _setup(tmp_path / "run", spotsinfo, raw="Gridrefactor 5 2 1\n", **_small())
    rc = main(["reconstruct", "-paramFN", str(params), "-nCPUs", "8", "-machineName", "local",
               "-ffSeedOrientations", "1", "-doImageProcessing", "0",
               "--panels", "confidence,grains"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "-machineName local ignored" in err
    log = (tmp_path / "run" / "midas_log" / "midas_nf_workflow_multires.log").read_text()
    for text in (err, log):
        assert "warning:" in text and "did you mean 'GridRefactor'" in text, text
    final = tmp_path / "run" / "Au_txt_Reconstructed.mic"
    assert final.exists()
    if importlib.util.find_spec("matplotlib") is not None:
        # --panels reaches the result's PNG: the same image as nfjax plot draws with those
        # panels, GBAngle as the boundary angle and MinConfidence greyed.
        import matplotlib.image as mpimg

        from nfjax.plot import plot_mic

        p = read_params(params)
        again = plot_mic(final, tmp_path / "again.png", p.space_group,
                         min_confidence=p.min_confidence, boundary_deg=p.gb_angle,
                         panels=("confidence", "grains"))
        img = mpimg.imread(str(final) + ".png")
        assert img.shape[1] > 2300                                 # two panels beside the map
        np.testing.assert_array_equal(img, mpimg.imread(again))


def test_bad_panels_fail_before_any_work(tmp_path, spotsinfo):
    params = _setup(tmp_path / "run", spotsinfo, **_small())
    for panels in (("kam", "kam"), ("confidence", "ipf"), ()):
        with pytest.raises(NfjaxError, match=r"^panels: expected one or more of confidence, "):
            reconstruct(params, image_processing=False, progress=False, panels=panels)
    assert not (tmp_path / "run" / "midas_log").exists()
    with pytest.raises(SystemExit):
        main(["reconstruct", str(params), "--panels", "kam,ipf"])


def test_mpiexec_two_ranks_equals_one_process(tmp_path, spotsinfo):
    mpiexec = need_mpiexec()
    one = _setup(tmp_path / "one", spotsinfo, **_small())
    reconstruct(one, ff_seeds=True, image_processing=False, progress=False)
    two = _setup(tmp_path / "two", spotsinfo, **_small())
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "nfjax.cli", "reconstruct",
                           str(two), "--ff-seeds", "--no-image-processing"],
                          capture_output=True, text=True, timeout=900, env=_mpi_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "two" / "midas_log" / "midas_nf_workflow_multires.log").read_text()
    assert "2 rank(s)" in log
    # Each rank's device, and its place among the node's ranks (MPI's shared-memory split).
    assert "(rank 1 of 2 there): cpu device 0" in log and "(rank 2 of 2 there)" in log, log
    a, b = _final_bytes(tmp_path / "one"), _final_bytes(tmp_path / "two")
    for name in a:
        assert a[name] == b[name], name


# About 45 s cold (three ranks, each compiling): kept out of the default run, which must
# stay under 15 minutes on 2 cores; two ranks against one process run by default above.
@pytest.mark.slow
def test_mpiexec_more_ranks_than_voxels(tmp_path, spotsinfo):
    """3 ranks for a 2-voxel grid (as a retry pass of a few voxels can be): the rank with
    no rows fits nothing instead of failing on an empty grid, and the files are those of
    one process."""
    mpiexec = need_mpiexec()
    tiny = dict(GridMask=(-1.0, 1.0, -1.0, 1.0))
    one = _setup(tmp_path / "one", spotsinfo, **tiny)
    reconstruct(one, ff_seeds=True, image_processing=False, progress=False)
    assert (tmp_path / "one" / "grid.txt").read_text().split()[0] == "2"      # 2 voxels
    three = _setup(tmp_path / "three", spotsinfo, **tiny)
    proc = subprocess.run([mpiexec, "-n", "3", sys.executable, "-m", "nfjax.cli", "reconstruct",
                           str(three), "--ff-seeds", "--no-image-processing"],
                          capture_output=True, text=True, timeout=900, env=_mpi_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fit (rank 2): no voxels" in (tmp_path / "three" / "midas_log" /
                                          "fit2_out.csv").read_text()
    a, b = _final_bytes(tmp_path / "one"), _final_bytes(tmp_path / "three")
    for name in a:
        assert a[name] == b[name], name


def _mpi_env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=1")


def test_mpiexec_two_ranks_multi_resolution(tmp_path, spotsinfo, multi_small):
    """The multi-resolution chain under mpiexec -n 2 writes the same files as one process
    (every rank reads files rank 0 writes: the seed backup, Grains.csv.k)."""
    mpiexec = need_mpiexec()
    out = tmp_path / "run"
    params = _multi_small_setup(out, spotsinfo)
    # Rank 1 must never read a file the run wrote (on another node it may see a stale
    # copy): it gets every result from rank 0 over MPI, in the run and in a --resume that
    # skips every stage. Its readers of the run's outputs raise here.
    script = tmp_path / "run_twice.py"
    script.write_text(
        "import sys\n"
        "from nfjax.cli import main\n"
        "from nfjax.parallel import world\n"
        "if world().rank == 1:\n"
        "    import nfjax.io.gridfile, nfjax.io.hkls, nfjax.io.mic, nfjax.io.seeds, "
        "nfjax.io.spots, nfjax.io.grains, nfjax.observe\n"
        "    def refuse(*args, **kwargs):\n"
        "        raise RuntimeError(f'rank 1 read {args[0]}')\n"
        "    for module, name in [(nfjax.io.gridfile, 'read_grid'), "
        "(nfjax.io.hkls, 'read_hkls_csv'), (nfjax.io.mic, 'read_binary_mic'), "
        "(nfjax.io.mic, 'read_allmatches'), (nfjax.io.spots, 'read_spot_files'), "
        "(nfjax.io.grains, 'read_grains_csv'), (nfjax.observe, 'read_spots_info')]:\n"
        "        setattr(module, name, refuse)\n"
        "    import nfjax.workflow\n"
        "    nfjax.workflow.file_fingerprint = refuse   # stage inputs: rank 0 decides\n"
        "    real = nfjax.io.seeds.read_seeds\n"
        "    nfjax.io.seeds.read_seeds = lambda path: (refuse(path) if '.txt.' in str(path) "
        "else real(path))   # the input libraries are read by every rank\n"
        "args = ['reconstruct', sys.argv[1], '--no-image-processing']\n"
        "assert main(args) == 0\n"
        "assert main(args + ['--resume']) == 0\n")
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script), str(params)],
                          capture_output=True, text=True, timeout=900, env=_mpi_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("final reconstruction:") == 2      # rank 0 reports, twice
    log = (out / "midas_log" / "midas_nf_workflow_multires.log").read_text()
    assert log.count("skipped (inputs unchanged, --resume)") >= 15, log
    ref, _ = multi_small
    for name in MULTI_FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_error_on_one_rank_ends_the_mpi_job(tmp_path):
    """A rank that fails with a one-line error aborts the job instead of leaving the other
    ranks waiting in a collective forever."""
    mpiexec = need_mpiexec()
    script = tmp_path / "one_rank_fails.py"
    script.write_text(
        "import sys\n"
        "from nfjax.parallel import world\n"
        "comm = world()\n"
        "if comm.rank == 1:\n"
        "    from nfjax.cli import main\n"
        f"    sys.exit(main(['reconstruct', {str(tmp_path / 'missing.txt')!r}]))\n"
        "comm.barrier()   # rank 0 waits here for a rank that never comes\n"
        "print('rank 0 passed the barrier')\n")
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=300, env=_mpi_env())
    assert proc.returncode != 0
    assert "nfjax: error:" in proc.stderr and "missing.txt" in proc.stderr, proc.stderr[-2000:]
    assert "passed the barrier" not in proc.stdout



def test_error_every_rank_meets_is_printed_once(tmp_path):
    """A preflight error that both ranks meet (a seed file that does not exist) is printed
    once, by rank 0, not once per rank; so is the parameter file's warning."""
    mpiexec = need_mpiexec()
    params = _setup(tmp_path / "run", tmp_path / "absent.bin", raw="EdgeLenght 1\n",
                    SeedOrientations="no_such_seeds.csv")
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "nfjax.cli", "reconstruct",
                           str(params)], capture_output=True, text=True, timeout=300,
                          env=_mpi_env())
    assert proc.returncode != 0
    assert proc.stderr.count("nfjax: error:") == 1, proc.stderr[-2000:]
    assert "no_such_seeds.csv" in proc.stderr and "(rank 1)" not in proc.stderr
    assert proc.stderr.count("EdgeLenght") == 1, proc.stderr[-2000:]


def _tiff_setup(directory: Path, n_frames: int) -> Path:
    """Raw-like TIFF frames of the Au example (``nfjax simulate --tiff-dir``: Poisson
    background plus the rendered spots) and a parameter file that processes them, on the
    20 x 20 um window; the simulated volume is kept as ``SpotsInfo_sim.bin``."""
    directory.mkdir(parents=True)
    text = update_param_text(au_example()["params"].read_text(), {
        "EndNr": n_frames - 1, "NrFilesPerDistance": n_frames, "OrigFileName": "au_sim",
        "extOrig": "tif", "ReducedFileName": "au_red", "DataDirectory": str(directory),
        "OutputDirectory": str(directory / "out"), "GrainsFile": "grs.csv",
        "SeedOrientations": "seeds.csv", "GridMask": (-10.0, 10.0, -10.0, 10.0),
        # background Poisson(100): subtract 6 sigma after the median, no median filter
        "BlanketSubtraction": 60, "MedFiltRadius": 0, "DoLoGFilter": 0})
    params = directory / "params.txt"
    params.write_text(text)
    shutil.copy(au_example()["grains"], directory / "grs.csv")
    assert main(["simulate", str(params), str(au_example()["mic"]), "-o",
                 str(directory / "SpotsInfo_sim.bin"), "--tiff-dir", str(directory)]) == 0
    return params


def test_reconstruct_from_tiff_frames(tmp_path):
    """The -doImageProcessing 1 path: reconstruct processes the TIFF frames itself (once;
    under MPI the ranks share the frames) and fits the volume it made. The map equals the
    map fitted from the volume the frames were rendered from, and a 2-rank run writes the
    same files."""
    params = _tiff_setup(tmp_path / "tiff", n_frames=20)
    final = reconstruct(params, ff_seeds=True, progress=False)
    out = tmp_path / "tiff" / "out"
    shape = observe.spots_info_shape(read_params(params))
    truth = observe.lit_indices(observe.read_spots_info(tmp_path / "tiff" / "SpotsInfo_sim.bin",
                                                        shape))
    found = observe.lit_indices(observe.read_spots_info(out / "SpotsInfo.bin", shape))
    assert truth.size > 300
    assert np.intersect1d(truth, found).size >= 0.99 * truth.size
    assert np.setdiff1d(found, truth).size <= 0.01 * found.size
    for dist in (0, 1):
        assert (out / f"au_red_Median_Background_Distance_{dist}.bin").exists()
    # The same fit from the rendered volume itself.
    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copy(tmp_path / "tiff" / "SpotsInfo_sim.bin", ref / "SpotsInfo.bin")
    shutil.copy(au_example()["grains"], ref / "grs.csv")
    ref_params = ref / "params.txt"
    ref_params.write_text(update_param_text(params.read_text(), {
        "OutputDirectory": str(ref), "DataDirectory": str(ref)}))
    expect = read_mic(reconstruct(ref_params, ff_seeds=True, image_processing=False,
                                  progress=False)).records
    got = read_mic(final).records
    assert len(got) == len(expect) > 100
    cmp = compare_records(got, expect, nearest=0.1)
    assert cmp.n_matched == len(expect) and cmp.frac_reference[0] == 1.0   # all < 0.25 deg
    np.testing.assert_allclose(got[:, 10], expect[:, 10], atol=1e-6)
    # Under mpiexec -n 2: the ranks share the image processing and fit from the volume.
    mpiexec = need_mpiexec("The MPI part")
    two = _tiff_setup(tmp_path / "two", n_frames=20)
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "nfjax.cli", "reconstruct",
                           str(two), "--ff-seeds"],
                          capture_output=True, text=True, timeout=600, env=_mpi_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("SpotsInfo.bin", "Au_bin_Reconstructed.mic",
                 "Au_bin_Reconstructed.mic.AllMatches", "Au_txt_Reconstructed.mic",
                 "au_red_Median_Background_Distance_0.bin",
                 "au_red_Median_Background_Distance_1.bin"):
        assert (tmp_path / "two" / "out" / name).read_bytes() == (out / name).read_bytes(), name


def _multi_small_setup(out: Path, spotsinfo: Path) -> Path:
    """The multi-resolution chain on a corner of the sample (GridRefactor 5 2 2), with both
    grains and some empty space (retried unseeded). The library is a coarse uniform set
    plus each grain orientation turned by 0.3 deg about a random axis, so loop 0 finds the
    grains without the 175k-seed screen of the slow test."""
    from scipy.spatial.transform import Rotation

    from nfjax.io.grains import read_grains_csv
    from nfjax.io.seeds import write_seeds
    from nfjax.seeds import seeds_from_grains, uniform_seeds

    params = _setup(out, spotsinfo, SeedOrientations="seeds.txt",
                    SeedOrientationsAll="seeds_all.txt", GridRefactor=(5.0, 2.0, 2),
                    MicFileText="MyMic", GridMask=(20.0, 40.0, 0.0, 20.0))
    grains = seeds_from_grains(read_grains_csv(au_example()["grains"]))      # (w, x, y, z)
    rng = np.random.default_rng(7)
    axes = rng.normal(size=(len(grains), 3))
    turn = Rotation.from_rotvec(np.radians(0.3) * axes / np.linalg.norm(axes, axis=1)[:, None])
    near = (turn * Rotation.from_quat(grains[:, [1, 2, 3, 0]])).as_quat()[:, [3, 0, 1, 2]]
    near *= np.where(near[:, :1] < 0, -1.0, 1.0)
    lib = np.concatenate([uniform_seeds(225, 10.0), near])
    write_seeds(out / "seeds_all.txt", lib)
    write_seeds(out / "seeds.txt", lib)
    return params


@pytest.fixture(scope="module")
def multi_small(tmp_path_factory, spotsinfo):
    """One uninterrupted single-process multi-resolution run of :func:`_multi_small_setup`,
    read-only for the tests. Under pytest-xdist the workers share it: the first to need it
    runs it (about 30 s) under a lock, the others wait for it and read its files."""
    import fcntl

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    root = tmp_path_factory.getbasetemp()
    root = root.parent if worker else root          # the run's folder, common to the workers
    out = root / "multi_small" / "run"
    done = root / "multi_small" / "done"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(root / "multi_small.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            final = reconstruct(_multi_small_setup(out, spotsinfo), image_processing=False,
                                progress=False)
            done.write_text(final.name)
    return out, out / done.read_text()


# Every file a multi-resolution run writes (beside the logs and the map).
MULTI_FILES = ["MyMic.0", "MyMic.1", "MyMic.2", "MyMic_merged.1", "MyMic_merged.2",
               "MyMic_all_solutions.1", "MyMic_all_solutions.2", "Grains.csv.1",
               "Grains.csv.2", "seeds.txt.1", "seeds.txt.2", "seeds_all.txt_Backup",
               "grid.txt", "hkls.csv", "Au_bin_Reconstructed.mic",
               "Au_bin_Reconstructed.mic.AllMatches", "Au_bin_Reconstructed.mic.0",
               "Au_bin_Reconstructed.mic.0.AllMatches", "Au_bin_Reconstructed.mic.seeded2",
               "Au_bin_Reconstructed.mic.unseeded2.AllMatches"] + [
               f"{mic}{s}" for mic in ("MyMic.0", "MyMic.2", "MyMic_all_solutions.2",
                                       "MyMic_merged.2")
               for s in MAP_SUFFIXES + (".AllMatches",)]


def test_multi_resolution_small_window(multi_small):
    """The whole multi-resolution chain on a 20 x 20 um window (GridRefactor 5 2 2): loop 0
    unseeded, clustering, seeded passes, the unseeded retry of the voxels below
    MinConfidence, the keep-the-better merge and the manual's file map."""
    from nfjax.io.grains import read_grains_csv
    from nfjax.io.mic import read_allmatches, read_binary_mic

    out, final = multi_small
    assert final == out / "MyMic_merged.2"
    for name in MULTI_FILES + ["midas_log/midas_nf_workflow_multires.log"]:
        assert (out / name).exists(), name
    grains1 = read_grains_csv(out / "Grains.csv.1")
    assert len(grains1.ids) >= 2
    # Loop k clusters the previous loop's final (merged) map, as MIDAS's driver does.
    assert "from MyMic.0\n" in (out / "Grains.csv.1").read_text()
    assert "from MyMic_merged.1\n" in (out / "Grains.csv.2").read_text()
    # Merge: a retried voxel keeps the better of its seeded and unseeded records, and the
    # .AllMatches rows follow the records.
    seeded = read_binary_mic(out / "Au_bin_Reconstructed.mic.seeded2").records
    merged_bin = read_binary_mic(out / "Au_bin_Reconstructed.mic").records
    bad = np.flatnonzero(seeded[:, 10] < 0.7)
    good = np.setdiff1d(np.arange(len(seeded)), bad)
    np.testing.assert_array_equal(merged_bin[good], seeded[good])
    assert bad.size
    unseeded = read_binary_mic(out / "Au_bin_Reconstructed.mic.unseeded2").records
    assert len(unseeded) == bad.size
    np.testing.assert_array_equal(merged_bin[bad, 10],
                                  np.maximum(seeded[bad, 10], unseeded[:, 10]))
    n_sol = read_params(out / "params.txt").save_n_solutions
    am = {name: read_allmatches(out / f"Au_bin_Reconstructed.mic{name}.AllMatches", n_sol)
          for name in ("", ".seeded2", ".unseeded2")}
    from_unseeded = unseeded[:, 10] > seeded[bad, 10]
    assert from_unseeded.any() and not from_unseeded.all()
    np.testing.assert_array_equal(am[""][good], am[".seeded2"][good])
    np.testing.assert_array_equal(am[""][bad[from_unseeded]], am[".unseeded2"][from_unseeded])
    np.testing.assert_array_equal(am[""][bad[~from_unseeded]],
                                  am[".seeded2"][bad[~from_unseeded]])
    np.testing.assert_array_equal(am[""][:, 10], merged_bin[:, 10])    # best solution
    # Loop 0's own binary is kept under its pass name; MyMic.0 is its text.
    loop0 = read_binary_mic(out / "Au_bin_Reconstructed.mic.0").records
    np.testing.assert_allclose(read_mic(out / "MyMic.0").records[:, 7:11],
                               loop0[loop0[:, 10] != 0][:, 7:11], atol=1e-6)
    # Accuracy: every rendered ground-truth voxel in the window against the nearest voxel
    # of the 1.25 um map.
    truth = read_mic(au_example()["mic"]).records
    win = truth[(truth[:, 10] >= 0.7) & (truth[:, 3] >= 21.0) & (truth[:, 3] <= 39.0)
                & (truth[:, 4] >= 1.0) & (truth[:, 4] <= 19.0)]
    cmp = compare_records(read_mic(final).records, win, nearest=1.0)
    assert cmp.n_matched == len(win) > 20
    assert cmp.frac_reference[1] >= 0.97, cmp.frac_reference     # within 0.5 deg


def test_multi_resolution_resume_after_kill(tmp_path, spotsinfo, multi_small, monkeypatch):
    """Killed in loop 2's seeded fit, a multi-resolution run resumed with --resume reloads
    loop 0 and loop 1 (every fit pass keeps its own binary, although MicFileBinary and
    grid.txt are rewritten by every loop) and ends byte-identical to an uninterrupted run."""
    import nfjax.fit

    out = tmp_path / "run"
    params = _multi_small_setup(out, spotsinfo)
    real_fit = nfjax.fit.fit_grid
    calls = []

    def killed_at_fourth(*args, **kwargs):     # fit0, seeded1, unseeded1, seeded2
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt            # what a SIGINT during the fit stage raises
        return real_fit(*args, **kwargs)
    monkeypatch.setattr(nfjax.fit, "fit_grid", killed_at_fourth)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(params, image_processing=False, progress=False)
    assert (out / "MyMic_merged.1").exists() and not (out / "MyMic.2").exists()
    assert not list(out.glob("*.part"))
    monkeypatch.setattr(nfjax.fit, "fit_grid", real_fit)
    reconstruct(params, image_processing=False, resume=True, progress=False)
    skipped = _skipped(out)
    assert {"hkls", "spots_all", "fit0", "cluster1", "seeds1", "spots1", "seeded1",
            "unseeded1"} <= skipped, skipped
    assert not {"seeded2", "unseeded2"} & skipped
    ref, _ = multi_small
    for name in MULTI_FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    # Resumed again with nothing changed: no stage runs, not even a grid (each loop's grid
    # is kept in grid.txt.K; grid.txt holds the last one, as in MIDAS).
    reconstruct(params, image_processing=False, resume=True, progress=False)
    stages = {"hkls", "grid0", "spots_all", "fit0", "parse0", "spots_library"} | {
        f"{s}{k}" for k in (1, 2) for s in ("cluster", "seeds", "grid", "spots", "seeded",
                                            "unseeded", "parse", "parse_all", "parse_merged")}
    assert _skipped(out) == stages & _ran(out)
    assert (out / "grid.txt").read_bytes() == (out / "grid.txt.2").read_bytes()
    # A clustering setting reruns the clustering of both loops (and what it feeds), not
    # loop 0.
    params.write_text(update_param_text(params.read_text(), {"MaxAngle": 10.0}))
    reconstruct(params, image_processing=False, resume=True, progress=False)
    skipped = _skipped(out)
    assert "fit0" in skipped and not {"cluster1", "cluster2"} & skipped, skipped
    assert "%MaxAngle 10.0000" in (out / "Grains.csv.1").read_text()


@pytest.mark.slow
@pytest.mark.timeout(5400)
def test_multi_resolution_au(tmp_path):
    """GridRefactor 5.0 2.0 2 on the Au example with uniform cubic libraries for the
    unseeded passes: MyMic_merged.2 at GridSize 1.25, >= 98 % of rendered ground-truth
    voxels within 0.5 deg (measured 98.22 %; the issue asks 99 %, see
    :func:`check_multi_resolution_au`), and every intermediate file of the manual's file
    map.

    Set-up, and why (measured on 8 loop-0 voxels of each grain, docs/midas-differences.md):
    * observations rendered from the ground truth with space-filling 2.5 um triangles (a
      solid sample). Rendered with the mic's 1 um probes, the spots are dotted, and loop 0's
      5 um grid points, which fall between the 2.5 um voxels, score 0.25-0.35 even at the
      true orientation;
    * loop 0 screens a 1.0 deg library (591k orientations): with one-pixel footprints the
      hard score has no slope farther than ~0.6 deg from a grain orientation; at 1.25 deg
      (nearest seed 0.89 deg from grain 1) grain 1 is never found;
    * the retries of loops 1-2 (voxels below MinConfidence: grain boundaries and the rim)
      search a 2 deg library (SeedOrientationsAll, 74k);
    * a tomography outline (TomoImage) limits the grid to the sample, as at a beamline.
    Loop 0's screen (238M pairs) takes about 3 min on 2 CPU cores (1.3M pairs/s); the whole
    test about 5 min."""
    from nfjax.crystal import hkls_from_params
    from nfjax.io.seeds import write_seeds
    from nfjax.seeds import uniform_seeds
    from nfjax.simulate import simulate_records, tomo_outline

    out = tmp_path / "run"
    out.mkdir(parents=True)
    truth = read_mic(au_example()["mic"]).records
    rendered = truth[truth[:, 10] >= 0.7]
    solid = rendered.copy()
    solid[:, 5] = 2.5                                   # TriEdgeSize = GridSize
    spotsinfo = tmp_path / "SpotsInfo.bin"
    observe.write_spots_info(spotsinfo, simulate_records(
        read_params(au_example()["params"]), solid,
        hkls_from_params(read_params(au_example()["params"])), progress=False))
    (out / "tomo.raw").write_bytes(tomo_outline(rendered, pixel_size=0.25, size=512,
                                                radius=1.5).tobytes())
    params = _setup(out, spotsinfo, SeedOrientations="seeds.txt",
                    SeedOrientationsAll="seeds_all.txt", GridRefactor=(5.0, 2.0, 2),
                    TomoImage="tomo.raw", TomoPixelSize=0.25, MicFileText="MyMic")
    write_seeds(out / "seeds.txt", uniform_seeds(225, 1.0))
    write_seeds(out / "seeds_all.txt", uniform_seeds(225, 2.0))
    final = reconstruct(params, image_processing=False, progress=True)
    assert final == out / "MyMic_merged.2"
    n_multi = check_multi_resolution_au(out, rendered)
    # The reference for what these observations allow: a single-resolution fit seeded with
    # the four true grains on the 2.5 um grid, whose voxels sit exactly on the rendered
    # ground-truth voxels (measured 98.15 %, 28 misses). The multi-resolution run, which
    # starts from a uniform library, must reach it within 3 voxels.
    ceiling = tmp_path / "ceiling"
    ceiling.mkdir()
    shutil.copy(out / "tomo.raw", ceiling / "tomo.raw")
    seeded = reconstruct(_setup(ceiling, spotsinfo, TomoImage="tomo.raw",
                                TomoPixelSize=0.25, MicFileText="MyMic"),
                         ff_seeds=True, image_processing=False, progress=False)
    n_ceiling = compare_records(read_mic(seeded).records, rendered, nearest=1.0)
    assert n_multi.frac_reference[1] >= n_ceiling.frac_reference[1] - 3 / len(rendered), (
        n_multi.frac_reference, n_ceiling.frac_reference)


def check_multi_resolution_au(out: Path, rendered: np.ndarray):
    """The assertions of :func:`test_multi_resolution_au` on its output folder ``out``;
    returns the comparison of ``MyMic_merged.2`` with the rendered ground truth.

    Measured (commit 84480b4, 2 CPU cores; 275 s end to end at b9485a3): 1487 of 1514 rendered
    voxels (98.22 %) within 0.5°; the issue's target is 99 % and is not met. All 27 misses
    are Σ3-twin errors at the boundary between grains 0 and 1: with one-pixel footprints
    (EdgeLength 1 µm, 1.48 µm pixels) a 1.25 µm voxel within about a pixel of the boundary
    scores 1.0 for both grains. The fitter's tie-break (a 1.5× larger probe for tied
    winners, ``fit.tie_scores``) took the misses from 44 (97.09 %, MIDAS's rule: the later
    of equal fractions) to 27; see docs/midas-differences.md, "Refinement defaults".
    The same observations fitted with the four true grains as seeds, on a grid that puts
    every voxel on a ground-truth voxel, give 98.15 % (28 misses, the same twin ties):
    the run is at what these observations allow (``bench_reconstruct.py --ceiling``).
    """
    log = (out / "midas_log" / "midas_nf_workflow_multires.log").read_text()
    retried = {int(k): int(n) for k, n in re.findall(
        r"loop (\d+): GridSize [0-9.]+, \d+ voxels, (\d+) below MinConfidence", log)}
    assert sorted(retried) == [1, 2]
    names = ["MyMic.0", "MyMic.1", "MyMic.2", "MyMic_merged.1", "MyMic_merged.2",
             "Grains.csv.1", "Grains.csv.2", "seeds.txt.1", "seeds.txt.2",
             "seeds_all.txt_Backup", "grid.txt", "hkls.csv", "midas_log"]
    for name in names:
        assert (out / name).exists(), name
    # The unseeded retry (and its file) exists only for a loop with voxels to retry, as in
    # MIDAS ("if no bad: ... continue").
    for k, n_bad in retried.items():
        assert (out / f"MyMic_all_solutions.{k}").exists() == (n_bad > 0), (k, n_bad)
    merged = read_mic(out / "MyMic_merged.2")
    assert merged.tri_edge_size == pytest.approx(1.0)
    grid_lines = (out / "grid.txt").read_text().splitlines()
    x = np.array([float(line.split()[2]) for line in grid_lines[1:]])
    assert np.min(np.diff(np.unique(np.round(x, 6)))) == pytest.approx(0.625)   # G/2, G=1.25
    # Each rendered ground-truth voxel (2.5 um grid) against the nearest voxel of the final
    # 1.25 um map.
    cmp = compare_records(merged.records, rendered, nearest=1.0)
    assert cmp.n_matched == len(rendered) == 1514
    assert cmp.frac_reference[1] >= 0.98, cmp.frac_reference       # within 0.5 deg
    return cmp


def test_demo_prints_accuracy_and_draws_the_four_grains(tmp_path, capsys):
    """``nfjax demo`` (what ``make demo`` runs) on the bundled files: it prints the accuracy
    against its ground truth and writes a map where each of the four grains shows in its
    own IPF colour, in proportion to its voxels (874 / 269 / 291 / 80)."""
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    from nfjax.io.grains import read_grains_csv
    from nfjax.plot import ipf_color

    assert main(["demo", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Au_4grains_truth.mic: 4 grains (874 / 269 / 291 / 80 voxels)" in out
    m = re.search(r"< 0.25: ([0-9.]+)% of matched, ([0-9.]+)% of B", out)
    assert m and float(m.group(2)) >= 99.5, out
    img = mpimg.imread(tmp_path / "Au_txt_Reconstructed.png")
    left = img[:, : int(0.38 * img.shape[1]), :3].reshape(-1, 3)
    colours = ipf_color(read_grains_csv(au_example()["grains"]).matrices, 225)
    counts = (np.abs(left[:, None, :] - colours[None]).max(axis=2) < 0.04).sum(axis=0)
    voxels = np.array([874, 269, 291, 80])
    assert np.all(counts > 20 * voxels), counts
    share = counts / counts.sum()
    np.testing.assert_allclose(share, voxels / voxels.sum(), atol=0.05)


@pytest.mark.parametrize("text, why", [
    ("{garbage", "Expecting property name"),
    ("[]", 'expected an object with "stages", found list'),
    ("null", 'expected an object with "stages", found NoneType'),
    ('{"version": 99}', 'expected an object with "stages", found none'),
    ('{"stages": []}', '"stages": expected an object, found list'),
    ('{"stages": {"fit": 3}}', "stage 'fit': expected"),
    ('{"stages": {"fit": {"inputs": "a", "outputs": {"x": 1}}}}', "stage 'fit': expected"),
])
def test_a_malformed_manifest_is_a_one_line_error(tmp_path, text, why):
    """--resume on a manifest that is not JSON, or JSON of another shape: a one-line error
    naming the file and what is wrong, not a TypeError from deep in the run."""
    from nfjax.errors import NfjaxError
    from nfjax.workflow import MANIFEST, Manifest

    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(NfjaxError) as info:
        Manifest(tmp_path, resume=True)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / MANIFEST}: not a valid nfjax manifest (") and \
        why in msg and "\n" not in msg, msg
    good = '{"version": 1, "stages": {"fit": {"inputs": "a", "outputs": {"x": "b"}}}}'
    (tmp_path / MANIFEST).write_text(good)
    assert Manifest(tmp_path, resume=True).stages == {"fit": {"inputs": "a",
                                                              "outputs": {"x": "b"}}}
