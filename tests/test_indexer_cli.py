"""`nfjax index` (nfjax.indexer.cli) and the indexer's environment handling."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nfjax.cli import main
from indexer_helpers import GOLD, lattice_match


def test_index_json(ffbidx_data, capsys):
    files = [str(ffbidx_data / "image0_local.txt"), str(ffbidx_data / "test2.txt")]
    assert main(["index", "--json", *files]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    recs = [json.loads(line) for line in lines]
    assert set(recs[0]) == {"file", "cell", "score", "indexed_spots", "n_crystals", "seconds"}
    assert recs[0]["file"] == files[0]
    _, det, mis = lattice_match(np.array(recs[0]["cell"]), GOLD)
    assert round(det) == 1 and mis < 2.0
    assert 0 < recs[0]["score"] < 0.00075
    assert recs[0]["n_crystals"] >= 1 and 20 <= recs[0]["indexed_spots"] <= 297
    assert 0 < recs[0]["seconds"] < 5
    # test2: perfect monoclinic lattice, every spot indexed
    input_cell = np.array([[40, 0, 0], [0, 45, 0], [10.4421, 0, 79.3156]])
    dev, det, _ = lattice_match(np.array(recs[1]["cell"]), input_cell)
    assert dev < 1e-3 and round(det) == 1
    assert recs[1]["indexed_spots"] == 90 and recs[1]["n_crystals"] == 1


def test_index_text_raw(ffbidx_data, capsys):
    assert main(["index", "--method", "raw", str(ffbidx_data / "test0.txt")]) == 0
    out = capsys.readouterr().out
    assert "score -90.9982" in out and "90 of 90 spots indexed" in out
    assert "|a| = 30.000" in out and "|c| = 50.000" in out


def test_index_malformed_file(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("36.9 0 0 0 78.95 0 0 0 78.95\n0.1 0.2\n")
    assert main(["index", str(bad)]) == 2
    assert f"{bad}:2: expected a spot 'x y z', found 2 numbers" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    (b"# cell in \xc5\n30 0 0 0 40 0 0 0 50\n0.1 0.2 0.3\n",
     ":1: not a simple-data text file (bytes that are not UTF-8)"),
    (b"30 0 0 0 40 0 0 0 50 0.1 0.2 0.3\n0.1 0.2 0.3\n",
     ":1: expected 9 cell numbers (ax ay az bx by bz cx cy cz), found 12"),
    (b"30 0 0 0 40 0 0 0 50\n0.1 0.2 0.3 0.4\n", ":2: expected a spot 'x y z', found 4 numbers"),
    (b"30 0 0 0 40 0 0 0 50\n0.1 0.2 0.3\nnan nan nan\n",
     ":3: expected finite numbers, found 'nan nan nan'"),
    (b"30 0 0 0 40 0 0 0 50\n0.1 0.2 0.3\n1e300 0 0\n",
     ":3: expected numbers within float32 range (|x| <= 3.4e38; the indexer computes in "
     "float32), found '1e300 0 0'"),
    (b"3e-9 0 0 0 4e-9 0 0 0 5e-9\n0.1 0.2 0.3\n",
     ": input cell 0 has vector lengths 3e-09, 4e-09, 5e-09, expected 0.0001 to 1e+12 Å: "
     "give the cell in Å and the spots in 1/Å"),
    (b"0 0 0 0 40 0 0 0 50\n0.1 0.2 0.3\n",
     ": input cell 0 is degenerate (vector lengths 0, 40, 50 Å, volume 0 Å³): give "
     "three independent vectors"),
])
def test_index_bad_file_is_one_line(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    assert main(["index", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}{message}" in err and len(err.strip().splitlines()) == 1


def test_index_batch_goes_on_past_a_bad_file(ffbidx_data, tmp_path, capsys):
    """Of many frames, a bad one is reported and skipped; the others are indexed and the
    command ends with status 2 and a count."""
    bad = tmp_path / "bad.txt"
    bad.write_text("30 0 0 0 40 0 0 0 50\n0.1 0.2\n")
    good = ffbidx_data / "test2.txt"
    assert main(["index", "--json", str(bad), str(good)]) == 2
    captured = capsys.readouterr()
    assert [json.loads(line)["file"] for line in captured.out.splitlines()] == [str(good)]
    assert captured.err.splitlines() == [
        f"nfjax: error: {bad}:2: expected a spot 'x y z', found 2 numbers",
        f"nfjax: error: 1 of 2 files could not be indexed (first: {bad})"]


def test_log_level_env():
    code = ("import numpy as np, nfjax\n"
            "from nfjax.indexer import Indexer\n"
            "ix = Indexer(max_output_cells=1, max_spots=20, num_candidate_vectors=2)\n"
            "s = np.ascontiguousarray(np.random.default_rng(0).normal(size=(3, 20)), np.float32)\n"
            "ix.run(s, np.eye(3, dtype=np.float32) * 30, method='raw',"
            " num_halfsphere_points=2048)\n")
    env = dict(os.environ, INDEXER_LOG_LEVEL="info")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "(info) using device" in res.stderr
    assert "(info) indexing_time: " in res.stderr
    env["INDEXER_LOG_LEVEL"] = "error"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "(info)" not in res.stderr


def test_drop_in_import():
    from nfjax.indexer import ffbidx

    assert {"Indexer", "indexer", "index", "release", "runtime_check", "__version__"} <= set(
        dir(ffbidx))
    assert ffbidx.__version__.startswith("1.1.3")
    assert ffbidx.runtime_check() is None
    with ffbidx.Indexer(4, 1, 100, 8) as ix:
        assert ix.initialized and isinstance(ix.handle, int)
    assert not ix.initialized
    with pytest.raises(RuntimeError, match="^invalid handle$"):
        ix.run(np.zeros((3, 10), np.float32), np.eye(3, dtype=np.float32))
