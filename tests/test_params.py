"""Tests for nfjax.params: MIDAS parameter files parsed, validated, listed, written, edited.

The expected values come from the files themselves (MIDAS's NF_HEDM/Example/ps_au.txt and
the reference run's params_used.txt, as quoted in reference §1.3); the malformed fixtures in
tests/data/params/ each change one line of valid.txt and expect one exact message.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfjax.cli import main
from nfjax.data import au_example
from nfjax.errors import ParamError
from nfjax.params import (KEYS, Params, format_params, parse_params, read_params,
                          update_param_text, write_params)

FIXTURES = Path(__file__).resolve().parent / "data" / "params"
BUNDLED_AU = au_example()["params"]


# --------------------------------------------------------------------------- the Au example
def _check_au_values(p: Params) -> None:
    assert p.n_distances == 2
    assert p.lsd == (8289.154576, 10290.724494)
    assert p.bc == ((985.415831, 17.510494), (985.161497, 24.511210))
    assert (p.tx, p.ty, p.tz) == (0.536238, 0.557035, 0.474936)
    assert p.wedge == 0.0
    assert p.px == 1.48
    assert (p.nr_pixels_y, p.nr_pixels_z) == (2048, 2048)
    assert p.max_ring_rad == 2800.0
    assert p.wavelength == 0.172979
    assert p.lattice_parameter == (4.08, 4.08, 4.08, 90.0, 90.0, 90.0)
    assert p.space_group == 225
    # trailing comments are stripped: "OmegaStart 180                  # Starting omega ..."
    assert p.omega_start == 180.0 and p.omega_step == -0.25
    assert (p.start_nr, p.end_nr) == (0, 1439)
    assert p.n_frames == 1440 == p.nr_files_per_distance
    assert p.omega_ranges == ((-180.0, 180.0),)
    assert p.box_sizes == ((-1200.0, 1200.0, 100.0, 2500.0),)
    assert p.exclude_pole_angle == 6.0
    assert p.grid_size == 2.5          # written "GridSize 2.500000" with a trailing comment
    assert p.edge_length == 1.0 and p.edge_length_effective == 1.0
    assert p.rsample == 50.0
    assert p.grid_mask == (-1000.0, 1000.0, -1000.0, 1000.0)
    assert p.min_frac_accept == 0.04 and p.orient_tol == 2.0
    assert p.save_n_solutions == 3
    assert p.min_confidence == 0.7
    assert p.mic_file_binary == "Au_bin_Reconstructed.mic"
    assert p.mic_file_text == "Au_txt_Reconstructed.mic"
    assert (p.blanket_subtraction, p.med_filt_radius, p.gauss_filt_radius) == (5, 1, 4.0)
    assert (p.log_mask_radius, p.do_log_filter) == (10, 0)
    assert (p.ext_orig, p.ext_reduced, p.wf_images) == ("tif", "bin", 0)
    assert (p.phase_nr, p.num_phases, p.global_position) == (1, 1, 0.0)
    assert p.bc_tol == (2.0, 0.2) and p.num_iterations == 3 and p.lsd_tol == 500.0
    # keys absent from the file: MIDAS defaults, or None where MIDAS leaves them uninitialised
    assert p.raw_start_nr == 0 and p.grid_file_name == "grid.txt" and p.min_miso_n_saves == 1.0
    assert p.grid_refactor is None and p.tomo_image is None and p.rings_to_use == ()
    assert p.denoise == 0 and p.denoise_method is None  # the Denoise* lines are commented out
    assert p.extra == {}


def test_ps_au_values(midas_au):
    p = read_params(midas_au / "ps_au.txt")
    _check_au_values(p)
    assert p.nr_orientations == 243129
    assert p.warnings == ()
    assert p.lines["Lsd"] == (35, 36) and p.lines["OmegaStart"] == (65,)
    assert p.source == str(midas_au / "ps_au.txt")
    assert p.output_dir == midas_au.resolve()  # no OutputDirectory or DataDirectory: the file's folder


def test_params_used_values(ref_run):
    p = read_params(ref_run / "params_used.txt")
    _check_au_values(p)
    # the reference run appended these five lines to ps_au.txt
    assert p.nr_orientations == 4 and p.lines["NrOrientations"] == (207,)
    # Params resolves symlinks in its folder, so compare resolved paths.
    assert p.data_directory == "." and p.output_dir == ref_run.resolve()
    assert p.grains_file == "./grs.csv" and p.resolve(p.grains_file) == ref_run.resolve() / "grs.csv"
    assert p.seed_orientations == "./seedOrientations.txt"
    assert p.precomputed_spots_info == 1
    assert p.warnings == ()


def test_bundled_copy_parses_the_same(midas_au):
    assert read_params(BUNDLED_AU) == read_params(midas_au / "ps_au.txt")


# --------------------------------------------------------------------------- malformed files
ERRORS = [
    ("missing_lsd.txt", ": missing required key 'Lsd'"),
    ("too_few_bc.txt", ": nDistances is 2 but found 1 'BC' line(s) (lines 5)"),
    ("boxsize_count.txt", ": found 2 'OmegaRange' line(s) (lines 15, 16) but 1 'BoxSize' "
                          "line(s) (lines 17); MIDAS pairs each OmegaRange with one BoxSize"),
    ("text_for_number.txt", ":12: OmegaStep: expected a number, found 'fast'"),
    ("negative_px.txt", ":7: px: expected a number > 0, found -1.48"),
    ("empty.txt", ": contains no parameters"),
    ("comments_only.txt", ": contains no parameters"),
    ("binary.bin", ": not a text parameter file (NUL byte on line 1)"),
    ("not_utf8.txt", ": not a text parameter file (bytes that are not UTF-8 on line 1)"),
    ("ndistances_zero.txt", ":2: nDistances: expected an integer >= 1, found 0"),
    ("gridrefactor_loops.txt",
     ":18: GridRefactor: expected an integer for nLoops (value 3 of 3), found '2.5'"),
    ("lattice_five_values.txt", ":9: LatticeParameter: expected 6 numbers (a b c alpha beta "
                                "gamma), found 5 values ('4.08 4.08 4.08 90 90')"),
    ("endnr_before_startnr.txt", ":14: EndNr: expected an integer >= StartNr (10), found 5"),
    ("extra_token.txt", ":7: px: expected a number, found 2 values ('1.48 1.48'); start a "
                        "trailing comment with '#'"),
    ("medfilt_radius.txt", ":18: MedFiltRadius: expected an integer in {0, 1, 2}, found 3"),
    ("omega_step_zero.txt", ":12: OmegaStep: expected a number != 0, found 0"),
    ("omega_range_reversed.txt", ":15: OmegaRange: expected min < max, found '180 -180'"),
    ("gridpoints_short.txt", ":18: GridPoints: expected 12 numbers, found 11 values "
                             "('1 2 3 4 5 6 7 8 9 10 11')"),
]
#: (file, key, line) the message must name, where it has them
NAMED = {"text_for_number.txt": ("OmegaStep", 12), "negative_px.txt": ("px", 7),
         "ndistances_zero.txt": ("nDistances", 2), "gridrefactor_loops.txt": ("GridRefactor", 18),
         "lattice_five_values.txt": ("LatticeParameter", 9), "endnr_before_startnr.txt":
         ("EndNr", 14), "extra_token.txt": ("px", 7), "too_few_bc.txt": ("BC", 5),
         "boxsize_count.txt": ("BoxSize", 17), "missing_lsd.txt": ("Lsd", None)}


@pytest.mark.parametrize("name,suffix", ERRORS, ids=[e[0] for e in ERRORS])
def test_malformed_file_message(name, suffix):
    path = FIXTURES / name
    with pytest.raises(ParamError) as info:
        read_params(path)
    message = str(info.value)
    assert message == f"{path}{suffix}"
    assert "\n" not in message
    if name in NAMED:
        key, line = NAMED[name]
        assert key in message
        if line is not None:
            assert str(line) in message


@pytest.mark.parametrize("name,suffix", ERRORS, ids=[e[0] for e in ERRORS])
def test_cli_params_check_reports_one_line(name, suffix, capsys):
    path = FIXTURES / name
    assert main(["params", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"nfjax: error: {path}{suffix}\n"
    assert "Traceback" not in err


WARNINGS = [
    ("unknown_key.txt", ":18: OmegaStpe: unknown key, ignored (did you mean 'OmegaStep'?)"),
    ("tab_after_key.txt", ":7: px: a tab (not a space) follows the key; MIDAS's C programs "
                          "would not see this line, nfjax reads it"),
    ("repeated_scalar.txt", ":18: px: repeated (also set by px on line 7); the last value is "
                            "used, as in MIDAS"),
    ("leading_whitespace.txt", ":17: GridSize: line starts with whitespace; MIDAS's C "
                               "programs ignore such a line, nfjax reads it"),
]


@pytest.mark.parametrize("name,suffix", WARNINGS, ids=[w[0] for w in WARNINGS])
def test_accepted_with_warning(name, suffix, capsys):
    path = FIXTURES / name
    p = read_params(path)
    assert p.warnings == (f"{path}{suffix}",)
    assert main(["params", "check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == f"warning: {path}{suffix}\n"
    assert "Lsd 8289.154576\n" in out


def test_warning_cases_keep_their_values():
    assert read_params(FIXTURES / "tab_after_key.txt").px == 1.48
    assert read_params(FIXTURES / "repeated_scalar.txt").px == 1.5     # last wins
    assert read_params(FIXTURES / "leading_whitespace.txt").grid_size == 2.5
    unknown = read_params(FIXTURES / "unknown_key.txt")
    assert unknown.extra == {"OmegaStpe": ("-0.25",)} and unknown.omega_step == -0.25


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ParamError, match=f"^{tmp_path / 'nope.txt'}: parameter file not found$"):
        read_params(tmp_path / "nope.txt")
    with pytest.raises(ParamError, match="is a directory"):
        read_params(tmp_path)


def test_cli_params_check_au_example(capsys):
    assert main(["params", "check", str(BUNDLED_AU)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert [x for x in lines if x.startswith("Lsd ")] == ["Lsd 8289.154576", "Lsd 10290.724494"]
    assert "GridSize 2.5" in lines and "SaveNSolutions 3" in lines
    assert "NrPixels 2048" in lines and "SpaceGroup 225" in lines
    # SGNr (read only by MIDAS's ParseMic) is listed when the file sets it, not as a default
    assert not any(x.startswith("SGNr") for x in lines)
    # the listing is itself a valid parameter file with the same values
    assert parse_params(out) == read_params(BUNDLED_AU)


# --------------------------------------------------------------------------- syntax details
BASE = (FIXTURES / "valid.txt").read_text()


def test_syntax_comments_aliases_flags():
    text = BASE.replace("LatticeParameter", "LatticeConstant") + (
        "RhoD 2800 # ring cut\n"
        "NrPixels 2048\nNrPixelsZ 1024\n"
        "RingsToUse 3\nRingsToUse 1\n"
        "Ice9Input 1\n"
        "MicFileText a#b.mic\n"           # '#' inside a token is not a comment
        "GridRefactor 5.0 2.0 3\n")
    p = parse_params(text, source="t.txt")
    assert p.lattice_parameter == (4.08, 4.08, 4.08, 90.0, 90.0, 90.0)
    assert p.get_key("LatticeConstant") == p.lattice_parameter
    assert p.max_ring_rad == 2800.0 == p.get_key("RhoD")
    assert (p.nr_pixels_y, p.nr_pixels_z) == (2048, 1024) and p.get_key("NrPixels") == (2048, 1024)
    assert p.rings_to_use == (3, 1)   # file order
    assert p.ice9_input is True and p.mic_file_text == "a#b.mic"
    assert p.grid_refactor == (5.0, 2.0, 3) and isinstance(p.grid_refactor[2], int)
    assert p.warnings == ()


def test_bare_flag_is_on_with_warning():
    p = parse_params(BASE + "Ice9Input\n", source="t.txt")
    assert p.ice9_input is True
    assert p.warnings == ("t.txt:18: Ice9Input: flag without a value; MIDAS's C programs need "
                          "'Key 1' (key, space, value) to see it, nfjax reads it as on",)


def test_case_suggestion_and_crlf():
    p = parse_params(BASE.replace("\n", "\r\n") + "gridsize 3\r\n", source="t.txt")
    assert p.grid_size == 2.5
    assert p.warnings == ("t.txt:18: gridsize: unknown key, ignored (did you mean 'GridSize'? "
                          "keys are case-sensitive)",)


def test_non_finite_number_rejected():
    with pytest.raises(ParamError, match=r"^t.txt:7: px: expected a number, found 'nan'$"):
        parse_params(BASE.replace("px 1.48", "px nan"), source="t.txt")
    with pytest.raises(ParamError, match=r"^t.txt:7: px: expected a finite number, found '1e999'$"):
        parse_params(BASE.replace("px 1.48", "px 1e999"), source="t.txt")


def test_edge_on_tilts_and_wedge_rejected():
    """ty or tz of ±90° puts the detector edge-on to the beam and a wedge of 90° the rotation
    axis along it: every spot was lost without a word (0 spots, 0 lit pixels, exit 0)."""
    for key, value in (("ty", "90"), ("tz", "-90"), ("Wedge", "1e308"), ("ty", "100000")):
        text = BASE + f"{key} {value}\n"
        line = text.count("\n")
        with pytest.raises(ParamError, match=rf"^t.txt:{line}: {key}: expected a number "
                                             rf"strictly between -90 and 90 degrees, found "):
            parse_params(text, source="t.txt")
    p = parse_params(BASE + "ty 89.5\nWedge -0.5\ntx 180\n", source="t.txt")
    assert (p.ty, p.wedge, p.tx) == (89.5, -0.5, 180.0)


def test_frames_mismatch_warns():
    p = parse_params(BASE + "NrFilesPerDistance 1000\n", source="t.txt")
    assert p.warnings == ("t.txt:18: NrFilesPerDistance is 1000 but EndNr - StartNr + 1 is "
                          "1440; MIDAS needs them equal (frames per distance)",)


def test_missing_required_key_names_a_near_miss():
    cases = [("Lsd 8289.154576\nLsd", "LSD 8289.154576\nLSD",
              "missing required key 'Lsd' (found 'LSD' on line 3: keys are case-sensitive)"),
             ("Wavelength", "wavelength", "missing required key 'Wavelength' (found "
                                          "'wavelength' on line 8: keys are case-sensitive)"),
             ("Wavelength", "Wavelenght", "missing required key 'Wavelength' (found "
                                          "'Wavelenght' on line 8: is it misspelt?)")]
    for old, new, message in cases:
        with pytest.raises(ParamError, match=rf"^t.txt: {re.escape(message)}$"):
            parse_params(BASE.replace(old, new), source="t.txt")


def test_comment_glued_to_a_number():
    p = parse_params(BASE.replace("px 1.48", "px 1.48# pixel size (um)")
                     + "GridRefactor 5 2 3#loops\n", source="t.txt")
    assert p.px == 1.48 and p.grid_refactor == (5.0, 2.0, 3) and p.warnings == ()
    # in a file name a '#' stays part of the name, as MIDAS's %s reads it
    assert parse_params(BASE + "MicFileText a#b.mic\n").mic_file_text == "a#b.mic"
    with pytest.raises(ParamError, match=r"^t.txt:18: MicFileText: expected a name or path "
                       r"\(one token\), found 2 values \('out.mic# text'\); a '#' inside a "
                       r"name is part of it: put a space before a comment$"):
        parse_params(BASE + "MicFileText out.mic# text\n", source="t.txt")
    edited = update_param_text(BASE.replace("px 1.48", "px 1.48# pixel"), {"px": 2})
    assert "px 2   # pixel\n" in edited and parse_params(edited).px == 2.0  # same column


@pytest.mark.parametrize("newline", ["\r", "\r\n", "\n"], ids=["cr", "crlf", "lf"])
def test_any_line_ending(newline):
    text = BASE.replace("\n", newline)
    p = parse_params(text, source="t.txt")
    assert p == parse_params(BASE) and p.lines["px"] == (7,) and p.warnings == ()
    edited = update_param_text(text, {"px": 2.5, "Rsample": 40})
    assert edited == text.replace("px 1.48", "px 2.5") + f"Rsample 40{newline}"
    assert parse_params(edited).px == 2.5


def test_required_keys_optional_for_partial_readers(tmp_path):
    path = tmp_path / "m2g.txt"
    path.write_text("SpaceGroup 194\nMaxAngle 2\nLatticeParameter 2.95 2.95 4.68 90 90 120\n")
    p = read_params(path, required=False)
    assert p.space_group == 194 and p.max_angle == 2.0 and p.lattice_parameter[2] == 4.68
    assert p.n_distances is None and p.lsd == () and p.px is None and p.warnings == ()
    with pytest.raises(ParamError, match="missing required key 'nDistances'"):
        read_params(path)
    path.write_text("SpaceGroup 194\nMaxAngle -2\n")     # keys present are still checked
    with pytest.raises(ParamError, match=r":2: MaxAngle: expected a number > 0, found -2$"):
        read_params(path, required=False)


def _warning_case(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text(BASE + "MaxRingRad 2800\nRsample 10\nOmegaStpe -0.25\n")
    return path, (f"warning: {path}:20: OmegaStpe: unknown key, ignored (did you mean "
                  "'OmegaStep'?)\n")


@pytest.mark.parametrize("command, status", [
    (["params", "check", "{p}"], 0), (["hkls", "{p}", "-o", "{d}/h.csv"], 0),
    (["grid", "{p}", "-o", "{d}/g.txt"], 0), (["spots", "{p}", "{d}/none.csv"], 2),
    (["simulate", "{p}", "{d}/none.mic"], 2), (["fit", "{p}"], 2), (["process", "{p}"], 2),
    (["cluster", "{d}/none.mic", "--params", "{p}"], 2)],
    ids=["params", "hkls", "grid", "spots", "simulate", "fit", "process", "cluster"])
def test_every_command_prints_the_parameter_warnings(tmp_path, capsys, command, status):
    path, warning = _warning_case(tmp_path)
    argv = [a.format(p=path, d=tmp_path) for a in command]
    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.startswith(warning) and err.count("warning:") == 1


def test_broken_stdout_pipe_ends_quietly(tmp_path, monkeypatch, capsys):
    import os
    import sys

    path, _ = _warning_case(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w") as closed_pipe:
        monkeypatch.setattr(sys, "stdout", closed_pipe)
        assert main(["hkls", str(path), "-o", str(tmp_path / "h.csv")]) == 141
        monkeypatch.undo()
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize("exc, expected", [
    (MemoryError("Unable to allocate 13.1 TiB for an array with shape (2, 1440, 200000, "
                 "200000) and data type uint8"),
     "nfjax: error: out of memory: Unable to allocate 13.1 TiB for an array with shape "
     "(2, 1440, 200000, 200000) and data type uint8 (lower --max-memory, or fit a smaller "
     "grid or seed set)"),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB.\n"
                  "BufferAssignment stats: ..."),
     "nfjax: error: out of memory: RESOURCE_EXHAUSTED: Out of memory while trying to "
     "allocate 8.00GiB. (lower --max-memory, or fit a smaller grid or seed set)")],
    ids=["host", "device"])
def test_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys, exc, expected):
    import nfjax.crystal

    path, _ = _warning_case(tmp_path)

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(nfjax.crystal, "hkls_from_params", fail)
    assert main(["hkls", str(path), "-o", str(tmp_path / "h.csv")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == expected
    assert not (tmp_path / "h.csv").exists()
    # Any other RuntimeError is a bug: it keeps its traceback.
    monkeypatch.setattr(nfjax.crystal, "hkls_from_params",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["hkls", str(path), "-o", str(tmp_path / "h.csv")])


def test_empty_parameter_file_name():
    with pytest.raises(ParamError, match="^parameter file name is empty: give the path of a "
                                         "MIDAS parameter file$"):
        read_params("")


def test_detector_size_is_bounded(tmp_path):
    """An extra digit in NrPixels is a parameter error, not a failed 13 TiB allocation (or an
    integer overflow inside a compiled function) in whichever command reads it first."""
    for value in ("200000", "99999999999999999999", "0"):
        path = tmp_path / "p.txt"
        path.write_text(BASE + f"NrPixels {value}\n")
        with pytest.raises(ParamError, match=rf"^{path}:\d+: NrPixels: expected an integer "
                                             rf"between 1 and 65536 pixels, found {value}$"):
            read_params(path)
    path.write_text(BASE + "NrPixels 65536\n")
    assert read_params(path).nr_pixels_y == 65536


@pytest.mark.parametrize("lattice, sg, system", [
    ("4.08 4.0 4.08 90 90 90", 225, "cubic: a = b = c, 90 90 90"),
    ("4.0801 4.0799 4.0803 90.01 89.99 90", 225, None),      # a far-field refined lattice
    ("2.95 2.95 4.68 90 90 90", 194, "hexagonal: a = b, 90 90 120"),
    ("2.95 2.95 4.68 90 90 120", 194, None),
    ("4.99 4.99 17.0 90 90 120", 167, None),                 # trigonal, hexagonal axes
    ("5.5 5.5 5.5 55.3 55.3 55.3", 167, None),               # trigonal, rhombohedral axes
    ("5.5 5.5 5.5 55.3 55.3 60", 167, "trigonal: a = b, 90 90 120, or rhombohedral a = b = "
                                      "c, alpha = beta = gamma"),
    ("3 3 5 90 90 90", 139, None), ("3 3.2 5 90 90 90", 139, "tetragonal: a = b, 90 90 90"),
    ("3 4 5 90 91 90", 62, "orthorhombic: 90 90 90"), ("3 4 5 90 100 90", 14, None),
    ("3 4 5 80 100 70", 2, None)])
def test_lattice_that_does_not_fit_the_space_group_warns(tmp_path, lattice, sg, system):
    path = tmp_path / "p.txt"
    path.write_text(BASE.replace("LatticeParameter 4.08 4.08 4.08 90 90 90",
                                 f"LatticeParameter {lattice}")
                    .replace("SpaceGroup 225", f"SpaceGroup {sg}"))
    warnings = [w for w in read_params(path).warnings if "LatticeParameter" in w]
    if system is None:
        assert warnings == []
    else:
        shown = " ".join(str(float(x)).removesuffix(".0") for x in lattice.split())
        assert warnings == [f"{path}:9: LatticeParameter {shown} does not fit SpaceGroup {sg} "
                            f"({system}); the reflections are computed from the lattice as "
                            "given"]


@pytest.mark.parametrize("keys, warned", [
    ("NrPixelsY 1024\n", "NrPixelsY 1024 without NrPixelsZ: NrPixelsZ is taken as 2048"),
    ("NrPixelsZ 512\n", "NrPixelsZ 512 without NrPixelsY: NrPixelsY is taken as 2048"),
    ("NrPixelsY 1024\nNrPixelsZ 512\n", None),
    ("NrPixels 1024\nNrPixelsZ 512\n", None)])
def test_one_detector_side_without_the_other_warns(tmp_path, keys, warned):
    """MIDAS disagrees with itself when only one side is given (its fitter and simulateNF
    take 2048 for the other, its image processing the same as the given side): nfjax reads
    it as the fitter does and says so."""
    path = tmp_path / "p.txt"
    path.write_text("\n".join(line for line in BASE.splitlines()
                              if not line.startswith("NrPixels")) + "\n" + keys)
    params = read_params(path)
    warnings = [w for w in params.warnings if "without NrPixel" in w]
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warned in warnings[0], warnings
        assert warnings[0].startswith(f"{path}:{len(path.read_text().splitlines())}: ")
        assert 2048 in (params.nr_pixels_y, params.nr_pixels_z)


# --------------------------------------------------------------------------- Params methods
def test_require_and_derived_values(tmp_path):
    p = parse_params(BASE, source=str(tmp_path / "ps.txt"))
    p.require("OmegaStart", "Lsd", "BoxSize")
    with pytest.raises(ParamError) as info:
        p.require("tx", "OmegaStart", "RingsToUse")
    assert str(info.value) == (f"{tmp_path / 'ps.txt'}: missing required keys 'tx', "
                               "'RingsToUse' (optional when parsing, needed by this step)")
    with pytest.raises(ParamError, match=r"missing required key 'Rsample' \(needed for the grid\)"):
        p.require("Rsample", why="for the grid")
    assert p.edge_length_effective == 2.5      # EdgeLength absent: GridSize
    assert p.output_dir == tmp_path
    with_dirs = p.replace(data_directory="raw", output_directory="out")
    assert with_dirs.output_dir == tmp_path / "out"
    assert p.replace(data_directory="/abs/data").output_dir == Path("/abs/data")
    with pytest.raises(KeyError, match="did you mean 'OmegaStep'"):
        p.get_key("OmegaStepp")


def test_replace_validates():
    p = parse_params(BASE, source="t.txt")
    q = p.replace(grid_size=1, lsd=[1000, 2000.5], bc=[(1, 2), (3, 4)])
    assert q.grid_size == 1.0 and isinstance(q.grid_size, float)
    assert q.lsd == (1000.0, 2000.5) and q.bc == ((1.0, 2.0), (3.0, 4.0))
    assert p.grid_size == 2.5  # the original is untouched
    with pytest.raises(ParamError, match=r"^t.txt: px: expected a number > 0, found -1$"):
        p.replace(px=-1)
    with pytest.raises(ParamError, match=r"^t.txt: nDistances is 2 but found 1 'Lsd' line\(s\)$"):
        p.replace(lsd=[1000.0])
    with pytest.raises(ParamError, match=r"^t.txt: missing required key 'Wavelength'$"):
        p.replace(wavelength=None)
    with pytest.raises(ParamError, match="EndNr: expected an integer >= StartNr"):
        p.replace(start_nr=2000)


def test_params_is_frozen_and_hashable():
    p = parse_params(BASE)
    with pytest.raises(Exception):
        p.px = 2.0  # type: ignore[misc]
    assert hash(p) == hash(parse_params(BASE))
    assert isinstance(p.lsd, tuple) and isinstance(p.bc[0], tuple)


def test_every_contract_attribute_exists():
    names = ("source warnings n_distances lsd bc tx ty tz wedge px nr_pixels_y nr_pixels_z "
             "omega_start omega_step start_nr end_nr n_frames omega_ranges box_sizes "
             "exclude_pole_angle max_ring_rad wavelength lattice_parameter space_group "
             "rings_to_use min_frac_accept orient_tol save_n_solutions min_miso_n_saves "
             "grid_size edge_length edge_length_effective rsample grid_mask tomo_image "
             "tomo_pixel_size grid_file_name seed_orientations seed_orientations_all "
             "grains_file min_confidence max_angle grid_refactor mic_file_binary mic_file_text "
             "data_directory output_directory output_dir reduced_file_name orig_file_name "
             "ext_orig ext_reduced raw_start_nr nr_files_per_distance wf_images "
             "blanket_subtraction med_filt_radius gauss_filt_radius log_mask_radius "
             "do_log_filter phase_nr num_phases global_position").split()
    p = read_params(BUNDLED_AU)
    for name in names:
        getattr(p, name)
    assert {"GridRefactor", "LatticeConstant", "RhoD", "NrPixels", "TomoImage",
            "SkipImageBinning", "DenoiseMethod", "WriteLegacyBin"} <= set(KEYS)


# --------------------------------------------------------------------------- writing
def test_write_read_round_trip(tmp_path):
    p = read_params(BUNDLED_AU)
    p = p.replace(tx=0.1 + 0.2, ty=1e-300, tz=-1 / 3, rings_to_use=(2, 1, 4),
                  grid_refactor=(5.0, 2.0, 3), tomo_image="tomo.bin", nr_pixels_z=1024,
                  ice9_input=True)
    out = tmp_path / "sub" / "params.txt"
    write_params(p, out)
    q = read_params(out)
    assert q == p
    assert (q.tx, q.ty, q.tz) == (0.1 + 0.2, 1e-300, -1 / 3)   # repr-exact, not %f
    assert q.warnings == ()
    text = out.read_text()
    assert "\t" not in text and "NrPixelsY 2048\nNrPixelsZ 1024\n" in text
    assert "RingsToUse 2\nRingsToUse 1\nRingsToUse 4\n" in text
    assert not list(out.parent.glob("*.part"))  # atomic: no temporary left behind


def test_listing_is_a_parameter_file():
    """``nfjax params show``'s listing parses back to the same parameters, with the values
    that came from MIDAS's defaults marked."""
    p = read_params(BUNDLED_AU)
    text = format_params(p)
    assert parse_params(text, source="listing") == p
    assert "SimulationBatches 0  # default" in text.splitlines()
    assert not any(line.startswith("Lsd") and "default" in line for line in text.splitlines())


def test_round_trip_keeps_unknown_keys(tmp_path):
    p = parse_params(BASE + "SumFrames 2\nMyOwnKey a b  c\n", source="t.txt")
    assert p.extra == {"SumFrames": ("2",), "MyOwnKey": ("a b  c",)}
    assert len(p.warnings) == 1  # SumFrames is a known MIDAS Python-package key: no warning
    write_params(p, tmp_path / "x.txt")
    assert read_params(tmp_path / "x.txt").extra == p.extra


@settings(max_examples=60, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False),
       st.floats(min_value=1e-300, max_value=1e300),
       st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=4, max_size=4))
def test_round_trip_any_float(tmp_path_factory, value, positive, box):
    box = sorted(box)
    if box[0] == box[1] or box[2] == box[3]:
        return
    p = parse_params(BASE).replace(omega_start=value, px=positive,
                                   box_sizes=[(box[0], box[1], box[2], box[3])])
    path = tmp_path_factory.mktemp("rt") / "p.txt"
    write_params(p, path)
    q = read_params(path)
    assert q == p and q.omega_start == value and q.px == positive
    assert math.copysign(1, q.omega_start) == math.copysign(1, value)


# --------------------------------------------------------------------------- editing text
def test_update_param_text_grid_size_keeps_comments():
    text = BUNDLED_AU.read_text()
    new = update_param_text(text, {"GridSize": 1.25})
    old_lines, new_lines = text.splitlines(), new.splitlines()
    assert len(old_lines) == len(new_lines)
    changed = [(a, b) for a, b in zip(old_lines, new_lines) if a != b]
    assert changed == [(
        "GridSize 2.500000                # Voxel grid spacing (microns)",
        "GridSize 1.25                    # Voxel grid spacing (microns)")]
    assert parse_params(new).grid_size == 1.25


def test_update_param_text_all_occurrences_multi_and_append():
    text = BASE + "GridSize 9  # a later duplicate (MIDAS's updater would leave it)\n"
    new = update_param_text(text, {"GridSize": 0.5, "Lsd": [7000.0, 8000.0],
                                   "BoxSize": [(-1, 1, 2, 3)], "Rsample": 40,
                                   "GridMask": (-5, 5, -6, 6), "SpaceGroup": None})
    p = parse_params(new)
    assert p.grid_size == 0.5 and p.warnings[0].endswith("the last value is used, as in MIDAS")
    assert "GridSize 0.5  # a later duplicate" in new
    assert new.count("GridSize 0.5") == 2
    assert p.lsd == (7000.0, 8000.0) and p.lines["Lsd"] == (3, 4)
    assert p.box_sizes == ((-1.0, 1.0, 2.0, 3.0),)
    assert p.rsample == 40.0 and p.grid_mask == (-5.0, 5.0, -6.0, 6.0)
    assert "SpaceGroup" not in new and p.space_group == 225
    assert new.endswith("Rsample 40\nGridMask -5 5 -6 6\n")


def test_update_param_text_validates_and_keeps_alias():
    text = BASE.replace("LatticeParameter", "LatticeConstant")
    new = update_param_text(text, {"LatticeParameter": (4, 4, 4, 90, 90, 120)})
    assert "LatticeConstant 4 4 4 90 90 120\n" in new and "LatticeParameter" not in new
    with pytest.raises(ParamError, match="GridSize: expected a number > 0, found -1"):
        update_param_text(text, {"GridSize": -1})
    with pytest.raises(ParamError, match="nDistances: expected an integer, found 1.5"):
        update_param_text(text, {"nDistances": 1.5})
