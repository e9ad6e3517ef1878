"""The nfjax command's own behaviour: usage errors on one line, ``python -m nfjax``."""
from __future__ import annotations

import subprocess
import sys

import pytest

from nfjax import __version__
from nfjax.cli import main


@pytest.mark.parametrize("argv, prog, says", [
    (["process", "p.txt", "--distance=abc"], "nfjax process",
     "argument --distance: invalid int value: 'abc'"),
    (["cluster", "m.mic", "--lattice", "4", "4"], "nfjax cluster",
     "argument --lattice: expected 6 arguments"),
    (["reconstruct", "-paramFN", "p.txt", "-doImageProcessing", "abc"], "nfjax reconstruct",
     "argument -doImageProcessing: invalid int value: 'abc'"),
    (["seeds", "uniform"], "nfjax seeds uniform",
     "the following arguments are required: --space-group"),
    (["seeds", "uniform", "--space-group", "0"], "nfjax seeds uniform",
     "argument --space-group: expected a space group number 1..230, found '0'"),
    (["plot", "m.mic", "--space-group", "cubic"], "nfjax plot",
     "argument --space-group: expected a space group number 1..230, found 'cubic'"),
    (["simulate", "p.txt", "m.mic", "--seed", "-1"], "nfjax simulate",
     "argument --seed: expected an integer >= 0, found '-1'"),
    (["bogus"], "nfjax", "argument COMMAND: invalid choice: 'bogus' (choose from 'params', "
     "'hkls', 'grid', 'seeds', 'cluster', 'plot', 'maps', 'compare', 'spots', "
     "'simulate', 'score', 'reconstruct', 'fit', 'calibrate', 'index', 'process', 'demo')"),
    (["calibrate", "p.txt", "--points", "0"], "nfjax calibrate",
     "argument --points: expected an integer >= 1, found '0'"),
])
def test_usage_errors_are_one_line(argv, prog, says, capsys):
    """A bad option is the house's one-line error (what, where, and where to look), with
    argparse's exit status 2 and nothing on stdout, not argparse's usage block."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"{prog}: error: {says} (see {prog} --help)\n", err


def test_python_dash_m_nfjax_runs_the_command():
    proc = subprocess.run([sys.executable, "-m", "nfjax", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"nfjax {__version__}", proc


@pytest.mark.parametrize("argv, says", [
    (["seeds", "from-grains", "{d}"], "{d}: is a directory, expected a grains file"),
    (["plot", "{d}"], "{d}: is a directory, expected a mic file"),
])
def test_a_directory_given_for_a_file_says_so(tmp_path, capsys, argv, says):
    rc = main([a.format(d=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"nfjax: error: {says.format(d=tmp_path)}\n", err
