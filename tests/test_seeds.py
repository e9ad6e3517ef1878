"""Seeds from far-field grains (GenSeedOrientationsFF2NFHEDM parity), seed and Grains.csv I/O."""
from __future__ import annotations

import gzip
import importlib.util

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from nfjax.errors import InputFileError
from nfjax.io.grains import read_grains_csv
from nfjax.io.seeds import read_seeds, write_seeds, write_seeds_from_grains

HAVE_ORIENTATION = importlib.util.find_spec("nfjax.orientation") is not None
needs_orientation = pytest.mark.skipif(not HAVE_ORIENTATION,
                                       reason="nfjax.orientation not available yet")


def _shepperd_oracle(m):
    """Float64 scalar transcription of MIDAS OrientMat2Quat (reference §3), one matrix."""
    u = np.asarray(m, dtype=np.float64).ravel().tolist()
    tr = u[0] + u[4] + u[8]
    if tr > 0:
        s = 0.5 / np.sqrt(tr + 1.0)
        q = [0.25 / s, (u[7] - u[5]) * s, (u[2] - u[6]) * s, (u[3] - u[1]) * s]
    elif u[0] > u[4] and u[0] > u[8]:
        s = 2.0 * np.sqrt(1.0 + u[0] - u[4] - u[8])
        q = [(u[7] - u[5]) / s, 0.25 * s, (u[1] + u[3]) / s, (u[2] + u[6]) / s]
    elif u[4] > u[8]:
        s = 2.0 * np.sqrt(1.0 + u[4] - u[0] - u[8])
        q = [(u[2] - u[6]) / s, (u[1] + u[3]) / s, 0.25 * s, (u[5] + u[7]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + u[8] - u[0] - u[4])
        q = [(u[3] - u[1]) / s, (u[2] + u[6]) / s, (u[5] + u[7]) / s, 0.25 * s]
    q = np.array(q)
    if q[0] < 0:
        q = -q
    return q / np.linalg.norm(q)


# --------------------------------------------------------------------------- Grains.csv
def test_read_grains_csv_au(midas_au):
    grains = read_grains_csv(midas_au / "grs.csv")
    assert grains.ids.tolist() == [1, 2, 3, 4]
    assert grains.matrices.shape == (4, 3, 3)
    assert grains.matrices[0, 0].tolist() == [0.514823088807, -0.509315510774, -0.689604885218]
    assert grains.matrices[3, 2, 2] == 0.716226713269
    assert np.all(grains.lattice == [4.08, 4.08, 4.08, 90.0, 90.0, 90.0])
    # grs.csv's header puts x y z after the lattice (its columns 10-12 are dummies)
    assert grains.positions.tolist() == [[-8.75, -20.207259, 0.0], [-22.5, -13.712069, 0.0],
                                         [-38.75, 14.433757, 0.0], [18.75, -50.518149, 0.0]]
    assert np.all(grains.columns_10_12 == 0)
    # orientation matrices are rotations (to the 12 decimals given)
    for m in grains.matrices:
        np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-9)


def test_read_grains_csv_ff_layout(tmp_path):
    rot = Rotation.from_euler("ZXZ", [0.3, 0.7, 1.9]).as_matrix()
    row = ([7] + rot.ravel().tolist() + [10.5, -3.25, 2.0]
           + [3.6, 3.6, 3.6, 90, 90, 90] + [0.1, 0.2, 0.3, 55.0, 0.95])
    p = tmp_path / "Grains.csv"
    p.write_text("%NumGrains 1\n%GrainID O11 O12 O13 O21 O22 O23 O31 O32 O33 X Y Z a b c "
                 "alpha beta gamma DiffPos DiffOme DiffAngle GrainRadius Confidence\n"
                 + " ".join(repr(float(v)) if i else str(v) for i, v in enumerate(row))
                 + "\n\n")
    g = read_grains_csv(p)
    assert g.ids.tolist() == [7]
    assert np.array_equal(g.matrices[0], rot)
    assert g.positions.tolist() == [[10.5, -3.25, 2.0]]
    assert g.lattice.tolist() == [[3.6, 3.6, 3.6, 90, 90, 90]]
    assert g.extra.tolist() == [[0.1, 0.2, 0.3, 55.0, 0.95]]


def test_read_grains_errors(tmp_path):
    p = tmp_path / "g.csv"
    p.write_text("%hdr\n1 2 3\n")
    with pytest.raises(InputFileError, match=r"g.csv:2: expected at least 19 columns.*found 3"):
        read_grains_csv(p)
    p.write_text("%hdr\n" + " ".join(["1"] * 5 + ["nan?"] + ["1"] * 13) + "\n")
    with pytest.raises(InputFileError, match=r"g.csv:2: expected numbers, found 'nan\?'"):
        read_grains_csv(p)
    p.write_text("%only a header\n")
    with pytest.raises(InputFileError, match="no grains"):
        read_grains_csv(p)
    with pytest.raises(InputFileError, match="not found"):
        read_grains_csv(tmp_path / "none.csv")


# --------------------------------------------------------------------------- seeds
def test_write_seeds_from_grains_format_with_oracle(midas_au, ref_run, tmp_path):
    """File format parity, independent of nfjax.orientation: numpy Shepperd oracle."""
    grains = read_grains_csv(midas_au / "grs.csv")
    quats = np.array([_shepperd_oracle(m) for m in grains.matrices])
    out = tmp_path / "seeds.txt"
    write_seeds_from_grains(out, quats, grains)
    assert out.read_bytes() == (ref_run / "seedOrientations.txt").read_bytes()
    # the oracle agrees with scipy's rotation -> quaternion up to sign/order convention
    sp = Rotation.from_matrix(grains.matrices).as_quat()[:, [3, 0, 1, 2]]
    sp *= np.sign(sp[:, :1])
    np.testing.assert_allclose(quats, sp, atol=1e-9)


@needs_orientation
def test_seeds_from_grains_byte_equal_to_midas(midas_au, ref_run, tmp_path):
    from nfjax.seeds import seeds_from_grains

    grains = read_grains_csv(midas_au / "grs.csv")
    quats = seeds_from_grains(grains)
    assert isinstance(quats, np.ndarray) and quats.dtype == np.float64 and quats.shape == (4, 4)
    np.testing.assert_allclose(quats, [_shepperd_oracle(m) for m in grains.matrices],
                               rtol=0, atol=1e-15)
    out = tmp_path / "seeds.txt"
    write_seeds_from_grains(out, quats, grains)
    assert out.read_bytes() == (ref_run / "seedOrientations.txt").read_bytes()


@needs_orientation
def test_seeds_from_grains_all_shepperd_branches():
    from nfjax.io.grains import Grains
    from nfjax.seeds import seeds_from_grains

    # rotations by ~180 deg about x, y, z exercise the three trace <= 0 branches
    mats = np.stack([Rotation.from_rotvec(v).as_matrix() for v in
                     ([3.0, 0.1, 0.2], [0.1, 3.0, 0.2], [0.2, 0.1, 3.0], [0.3, -0.2, 0.5])])
    n = len(mats)
    grains = Grains(ids=np.arange(n), matrices=mats, positions=np.zeros((n, 3)),
                    lattice=np.zeros((n, 6)), extra=np.zeros((n, 0)),
                    columns_10_12=np.zeros((n, 3)))
    np.testing.assert_allclose(seeds_from_grains(grains),
                               [_shepperd_oracle(m) for m in mats], atol=1e-15)


@needs_orientation
def test_cli_seeds_from_grains(midas_au, ref_run, tmp_path, capsys):
    from nfjax.cli import main

    out = tmp_path / "seedOrientations.txt"
    assert main(["seeds", "from-grains", str(midas_au / "grs.csv"), "-o", str(out)]) == 0
    assert out.read_bytes() == (ref_run / "seedOrientations.txt").read_bytes()
    assert "4 seed orientations" in capsys.readouterr().out


def test_read_seeds_reference(ref_run):
    q = read_seeds(ref_run / "seedOrientations.txt")
    assert q.shape == (4, 4)
    assert q[0].tolist() == [0.866537, -0.080783, -0.367319, 0.328124]
    assert q[3].tolist() == [0.925586, 0.040143, -0.374533, 0.037471]


def test_seed_cache_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(50, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    write_seeds(tmp_path / "s.csv", q)
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == ",".join("%.7f" % v for v in q[0])
    back = read_seeds(tmp_path / "s.csv")
    np.testing.assert_allclose(back, q, atol=5e-8)
    with gzip.open(tmp_path / "s.csv.gz", "wt") as fh:
        fh.write((tmp_path / "s.csv").read_text())
    assert np.array_equal(read_seeds(tmp_path / "s.csv.gz"), back)


def test_read_seeds_refuses_what_is_not_a_rotation(tmp_path):
    """All zeros (MIDAS: the identity) and a length-5 quaternion (MIDAS: a non-orthogonal
    matrix) are errors naming the line; the 6-7 decimals of real seed files pass."""
    p = tmp_path / "s.csv"
    for line, length in (("0,0,0,0", "0"), ("1,2,2,4", "5")):
        p.write_text(f"1,0,0,0\n\n{line}\n")
        with pytest.raises(InputFileError, match=rf"^{p}:3: expected a unit quaternion "
                                                 rf"w,x,y,z, found {line} \(length {length}\); "
                                                 r"is this a seed orientation file\?$"):
            read_seeds(p)
    p.write_text("0.866537,-0.080783,-0.367319,0.328124\n0.995,0,0,0\n")
    assert read_seeds(p).shape == (2, 4)


def test_read_seeds_blank_lines_and_errors(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("1,0,0,0\n0.5,0.5,0.5,0.5,extra,9\n\n")
    # the trailing blank line is skipped (MIDAS would repeat the previous seed)
    assert read_seeds(p).tolist() == [[1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]]
    p.write_text("1,0,0,0\n1,0,0\n")
    with pytest.raises(InputFileError, match=r"s.csv:2: expected at least 4 comma-separated"):
        read_seeds(p)
    p.write_text("w,x,y,z\n1,0,0,0\n")
    with pytest.raises(InputFileError, match=r"s.csv:1: expected 4 numbers") as e:
        read_seeds(p)
    assert "\n" not in str(e.value)
    p.write_text("")
    with pytest.raises(InputFileError, match="no seed orientations"):
        read_seeds(p)
    with pytest.raises(InputFileError, match="not found"):
        read_seeds(tmp_path / "none.csv")


# --------------------------------------------------------------------------- audit fixes
def _grain_line(gid="7", matrix=None):
    mat = np.eye(3) if matrix is None else np.asarray(matrix, dtype=float)
    return " ".join([gid] + [repr(float(v)) for v in mat.ravel()]
                    + ["0", "0", "0", "3.6", "3.6", "3.6", "90", "90", "90"]) + "\n"


@pytest.mark.parametrize("line, message", [
    (_grain_line("nan"), "expected finite numbers, found 'nan' in column 1"),
    (_grain_line("inf"), "expected finite numbers, found 'inf' in column 1"),
    (_grain_line("1e30"), "grain ID must be an integer of magnitude below 2^31 (a C int, as "
                          "MIDAS reads it), found '1e30'"),
    (_grain_line().replace("1.0", "nan", 1), "expected finite numbers, found 'nan' in column 2"),
    (_grain_line(matrix=np.zeros((3, 3))), "columns 2-10 must be an orientation matrix (a "
     "rotation: det 1, U·Uᵀ = I), found det 0 and U·Uᵀ off I by up to 1"),
    (_grain_line(matrix=2 * np.eye(3)), "columns 2-10 must be an orientation matrix (a "
     "rotation: det 1, U·Uᵀ = I), found det 8 and U·Uᵀ off I by up to 3"),
    (_grain_line(matrix=-np.eye(3)), "columns 2-10 must be an orientation matrix (a "
     "rotation: det 1, U·Uᵀ = I), found det -1 and U·Uᵀ off I by up to 0"),
    (_grain_line().replace("3.6 3.6", "-3.6 3.6", 1), "lattice (columns 14-19): expected a "
     "b c > 0 (Å) and angles strictly between 0 and 180 degrees (or all 0), found -3.6 3.6 "
     "3.6 90 90 90"),
    (_grain_line().replace(" 90\n", " 180\n"), "lattice (columns 14-19): expected a b c > 0 "
     "(Å) and angles strictly between 0 and 180 degrees (or all 0), found 3.6 3.6 3.6 90 90 "
     "180"),
], ids=["id-nan", "id-inf", "id-huge", "matrix-nan", "matrix-zero", "matrix-scaled",
        "matrix-improper", "lattice-negative", "lattice-flat"])
def test_read_grains_refuses_non_finite_values_and_non_rotations(tmp_path, line, message):
    p = tmp_path / "g.csv"
    p.write_text("%hdr\n" + _grain_line("1") + line)
    with pytest.raises(InputFileError) as info:
        read_grains_csv(p)
    assert str(info.value) == f"{p}:3: {message}"


def test_read_grains_takes_mic2grainslist_zero_lattice(tmp_path):
    """Mic2GrainsList (``nfjax cluster``) writes a zero lattice without LatticeParameter;
    such a Grains.csv still makes seeds (the fit takes the parameter file's lattice)."""
    p = tmp_path / "g.csv"
    p.write_text("%hdr\n" + _grain_line("1").replace("3.6 3.6 3.6 90 90 90", "0 0 0 0 0 0"))
    assert read_grains_csv(p).lattice.tolist() == [[0.0] * 6]


def test_text_readers_skip_a_byte_order_mark(tmp_path, capsys):
    from nfjax.cli import main

    grains = tmp_path / "g.csv"
    grains.write_bytes(b"\xef\xbb\xbf" + _grain_line("1").encode())
    assert read_grains_csv(grains).ids.tolist() == [1]
    assert main(["seeds", "from-grains", str(grains), "-o", str(tmp_path / "s.csv")]) == 0
    seeds = tmp_path / "bom.csv"
    seeds.write_bytes(b"\xef\xbb\xbf1,0,0,0\n0.5,0.5,0.5,0.5\n")
    assert read_seeds(seeds).tolist() == [[1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]]
    with gzip.open(tmp_path / "bom.csv.gz", "wb") as fh:
        fh.write(seeds.read_bytes())
    assert read_seeds(tmp_path / "bom.csv.gz").shape == (2, 4)
