"""Tests for nfjax.crystal and nfjax.io.hkls.

Oracles: MIDAS's own GetHKLListNF output for the Au example (tests/data/midas_au/hkls.csv, a
copy of /work/shared/data/midas-au/reference-run/hkls.csv produced by MIDAS v11.0), gemmi
(systematic absences, d-spacings) by brute force, scipy's rotation groups, closed forms.
"""
from __future__ import annotations

import math
import types
from pathlib import Path

import gemmi
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from nfjax.crystal import (
    HklTable,
    generate_hkls,
    hkls_from_params,
    laue_class,
    reciprocal_matrix,
    ring_summary,
    select_rings,
    symmetry_quaternions,
)
from nfjax.errors import InputFileError, NfjaxError, ParamError
from nfjax.io.hkls import HKLS_HEADER, read_hkls_csv, write_hkls_csv

DATA = Path(__file__).resolve().parent / "data"
MIDAS_HKLS = DATA / "midas_au" / "hkls.csv"
PS_AU = Path(__file__).resolve().parents[2] / "shared" / "data" / "midas-au" / "ps_au.txt"

AU = dict(lattice6=(4.08, 4.08, 4.08, 90.0, 90.0, 90.0), space_group=225,
          wavelength=0.172979, lsd_last=10290.724494, max_ring_rad=2800.0)


def _au_params(**overrides):
    values = dict(lattice_parameter=AU["lattice6"], space_group=225, wavelength=0.172979,
                  lsd=(8289.154576, 10290.724494), max_ring_rad=2800.0, source="ps_au.txt")
    values.update(overrides)
    return types.SimpleNamespace(**values)


@pytest.fixture(scope="module")
def au_table() -> HklTable:
    return generate_hkls(**AU)


@pytest.fixture(scope="module")
def midas_rows() -> list[list[str]]:
    lines = MIDAS_HKLS.read_text().splitlines()
    assert lines[0] == HKLS_HEADER
    return [line.split() for line in lines[1:]]


# --------------------------------------------------------------------------- (a) parity
def test_au_matches_midas_file_byte_for_byte(au_table, tmp_path):
    out = tmp_path / "hkls.csv"
    write_hkls_csv(au_table, out)
    assert out.read_bytes() == MIDAS_HKLS.read_bytes()


def test_au_every_value_equals_midas(au_table, midas_rows):
    assert len(au_table) == len(midas_rows) == 258
    ref = np.array([[float(x) for x in row] for row in midas_rows])
    np.testing.assert_array_equal(au_table.hkl, ref[:, 0:3].astype(np.int64))
    np.testing.assert_array_equal(au_table.d, ref[:, 3])
    np.testing.assert_array_equal(au_table.ring, ref[:, 4].astype(np.int64))
    np.testing.assert_array_equal(au_table.g, ref[:, 5:8])  # incl. the ~1e-17 terms
    np.testing.assert_array_equal(au_table.theta, ref[:, 8])
    np.testing.assert_array_equal(au_table.two_theta, ref[:, 9])
    np.testing.assert_array_equal(au_table.radius, ref[:, 10])
    assert au_table.theta[0] == 2.1041859255690492
    assert au_table.g[9].tolist() == [-7.8829541650815517e-17, -3.0015852920278269e-17,
                                      0.49019607843137258]


def test_au_rings_and_multiplicities(au_table):
    expected = [8, 6, 12, 24, 8, 6, 24, 24, 24, 32, 12, 48, 30]
    assert au_table.n_rings == 13
    assert np.bincount(au_table.ring)[1:].tolist() == expected
    # Ring 10 is {333}+{511}, ring 13 is {600}+{442}: compare the |hkl| multisets.
    fams = {r: sorted({tuple(sorted(np.abs(h))[::-1]) for h in au_table.hkl[au_table.ring == r]})
            for r in (1, 10, 13)}
    assert fams == {1: [(1, 1, 1)], 10: [(3, 3, 3), (5, 1, 1)], 13: [(4, 4, 2), (6, 0, 0)]}
    # Closed forms: d = a/sqrt(h²+k²+l²), θ = asin(λ/2d), R = Lsd tan 2θ.
    assert au_table.d[0] == pytest.approx(4.08 / math.sqrt(3), rel=1e-15)
    theta = math.asin(0.172979 / (2 * 4.08 / math.sqrt(3)))
    assert math.radians(au_table.theta[0]) == pytest.approx(theta, rel=1e-14)
    assert au_table.radius[0] == pytest.approx(10290.724494 * math.tan(2 * theta), rel=1e-13)
    d_min = 0.172979 / (2 * math.sin(0.5 * math.atan(2800 / 10290.724494)))
    assert au_table.d.min() >= d_min > 4.08 / math.sqrt(40)  # {620} is the first ring cut


def test_reciprocal_matrix_cubic_and_general():
    b = reciprocal_matrix(AU["lattice6"])
    # 2·B00 is the g1 of the 2 0 0 row MIDAS printed, 0.49019607843137258
    assert b[0, 0] == b[1, 1] == b[2, 2] == 0.24509803921568629
    assert b[0, 0] == pytest.approx(1 / 4.08, rel=1e-15)
    # MIDAS's degree trig leaves cos(90°) = 6.1e-17 in, and hkls.csv prints it.
    assert b[0, 1] == -3.9414770825407759e-17
    assert b[1, 2] == -1.5007926460139134e-17
    lat = (5.1, 7.3, 8.2, 80.0, 103.5, 95.0)
    cell = gemmi.UnitCell(*lat)
    frac = np.array(cell.frac.mat)  # rows = reciprocal vectors a*, b*, c* in gemmi's frame
    metric_ref = frac @ frac.T
    bm = reciprocal_matrix(lat)
    np.testing.assert_allclose(bm.T @ bm, metric_ref, rtol=1e-12, atol=1e-15)


def test_hkls_from_params_uses_last_lsd(au_table):
    t = hkls_from_params(_au_params())
    np.testing.assert_array_equal(t.radius, au_table.radius)
    first = hkls_from_params(_au_params(lsd=(10290.724494, 8289.154576)))
    assert first.radius[0] == pytest.approx(8289.154576 * math.tan(math.radians(
        au_table.two_theta[0])), rel=1e-14)


def test_hkls_from_params_through_read_params(au_table):
    params_mod = pytest.importorskip("nfjax.params")
    if not PS_AU.exists():
        pytest.skip(f"reference data not available: {PS_AU}")
    t = hkls_from_params(params_mod.read_params(PS_AU))
    np.testing.assert_array_equal(t.g, au_table.g)
    np.testing.assert_array_equal(t.hkl, au_table.hkl)


@pytest.mark.parametrize("attr,key", [("wavelength", "Wavelength"),
                                      ("max_ring_rad", "MaxRingRad"),
                                      ("lattice_parameter", "LatticeParameter"),
                                      ("space_group", "SpaceGroup"), ("lsd", "Lsd")])
def test_hkls_from_params_missing_key(attr, key):
    with pytest.raises(ParamError) as err:
        hkls_from_params(_au_params(**{attr: None}))
    assert str(err.value) == f"ps_au.txt: missing key '{key}' (needed to build hkls.csv)"


def test_hkls_from_params_no_reflection_names_the_file():
    with pytest.raises(ParamError, match=r"^ps_au.txt: no reflection of space group 225 with "
                                         r"lattice .* reaches MaxRingRad 10.0 µm at Lsd"):
        hkls_from_params(_au_params(max_ring_rad=10.0))


# --------------------------------------------------------------------------- (b) gemmi
def _gemmi_reference(lat, sg, d_min):
    cell = gemmi.UnitCell(*lat)
    ops = gemmi.find_spacegroup_by_number(sg).operations()
    n = int(max(lat[:3]) / d_min) + 2
    rng = np.arange(-n, n + 1)
    hkl = np.stack(np.meshgrid(rng, rng, rng, indexing="ij"), -1).reshape(-1, 3)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    d = np.array([cell.calculate_d(h.tolist()) for h in hkl])
    keep = d >= d_min
    # no reflection may sit on the cut, or the oracle would be ambiguous
    assert np.all(np.abs(d / d_min - 1) > 1e-9)
    hkl, d = hkl[keep], d[keep]
    present = ~np.asarray(ops.systematic_absences(hkl.astype(np.int32)), dtype=bool)
    return {tuple(h): dd for h, dd in zip(hkl[present].tolist(), d[present])}


ORACLE_CASES = [
    (194, (3.21, 3.21, 5.21, 90, 90, 120)),       # hexagonal P6_3/mmc (c-glide, 2_1 screw)
    (141, (6.6, 6.6, 5.9, 90, 90, 90)),           # tetragonal I4_1/amd origin 1 (d-glide)
    (139, (3.9, 3.9, 12.1, 90, 90, 90)),          # tetragonal I4/mmm
    (14, (5.1, 7.3, 8.2, 90, 103.5, 90)),         # monoclinic P2_1/c, b-unique
    (19, (4.1, 5.6, 7.2, 90, 90, 90)),            # orthorhombic P2_12_12_1
    (167, (4.76, 4.76, 12.99, 90, 90, 120)),      # trigonal R-3c, hexagonal axes
    (2, (5.0, 6.0, 7.0, 80, 95, 105)),            # triclinic
    (227, (5.43, 5.43, 5.43, 90, 90, 90)),        # Fd-3m origin 1: inversion off origin
    (186, (3.2, 3.2, 5.2, 90, 90, 120)),          # P6_3mc: non-centrosymmetric, mirrors
]


@pytest.mark.parametrize("sg,lat", ORACLE_CASES)
def test_reflection_set_matches_gemmi(sg, lat):
    lsd, max_r = 10290.72, 2200.0
    table = generate_hkls(lat, sg, 0.172979, lsd, max_r)
    d_min = 0.172979 / (2 * math.sin(0.5 * math.atan(max_r / lsd)))
    ref = _gemmi_reference(lat, sg, d_min)
    got = {tuple(h): d for h, d in zip(table.hkl.tolist(), table.d)}
    assert len(got) == len(table)  # no duplicate rows
    assert set(got) == set(ref)
    assert max(abs(got[h] - ref[h]) for h in ref) < 1e-10
    # ring numbering: d never increases, rings open exactly where d drops by ≥ 1e-4 Å
    assert np.all(np.diff(table.d) <= 0)
    steps = np.diff(table.ring)
    assert set(steps.tolist()) <= {0, 1} and table.ring[0] == 1


def test_large_cell_goes_beyond_midas_index_cap():
    # MIDAS stops at |h| ≤ 10; nfjax enumerates what d_min needs (here |h| up to 12).
    lat = (25.0, 25.0, 25.0, 90, 90, 90)
    lsd, wl = 10000.0, 0.172979
    max_r = lsd * math.tan(2 * math.asin(wl / (2 * 2.0)))  # d_min = 2.0 Å
    table = generate_hkls(lat, 221, wl, lsd, max_r)
    assert int(np.abs(table.hkl).max()) == 12
    assert (12, 0, 0) in set(map(tuple, table.hkl.tolist()))
    assert set(map(tuple, table.hkl.tolist())) == set(_gemmi_reference(lat, 221, 2.0 * (
        1 + 1e-13)))


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("sg", [0, 231, 2.5, "abc", True])
def test_invalid_space_group(sg):
    with pytest.raises(NfjaxError, match="space group must be an integer 1..230"):
        laue_class(sg)
    with pytest.raises(NfjaxError, match="space group"):
        generate_hkls(AU["lattice6"], sg, 0.17, 10000, 2800)


@pytest.mark.parametrize("lat,msg", [((4.08, 4.08, 4.08, 90, 90), "6 numbers"),
                                     ((4.08, -1, 4.08, 90, 90, 90), "lengths"),
                                     ((4, 4, 4, 90, 90, 180), "angles"),
                                     ((4, 4, 4, 120, 120, 120), "positive volume")])
def test_invalid_lattice(lat, msg):
    with pytest.raises(NfjaxError, match=msg):
        generate_hkls(lat, 225, 0.17, 10000, 2800)


def test_invalid_scalars_and_limits():
    with pytest.raises(NfjaxError, match="Wavelength must be a number > 0"):
        generate_hkls(AU["lattice6"], 225, 0.0, 10000, 2800)
    with pytest.raises(NfjaxError, match="no reflection"):
        generate_hkls(AU["lattice6"], 225, 0.172979, 10000, 1.0)
    with pytest.raises(NfjaxError, match="lower MaxRingRad"):
        generate_hkls((60, 60, 60, 90, 90, 90), 225, 0.172979, 1000, 2800)


# --------------------------------------------------------------------------- (c) symmetry
CLASS_CASES = [
    (1, "triclinic", 1), (2, "triclinic", 1), (3, "monoclinic", 2), (15, "monoclinic", 2),
    (16, "orthorhombic", 4), (74, "orthorhombic", 4), (75, "tetragonal_low", 4),
    (88, "tetragonal_low", 4), (89, "tetragonal_high", 8), (142, "tetragonal_high", 8),
    (143, "trigonal_low", 3), (148, "trigonal_low", 3), (149, "trigonal_type2", 6),
    (150, "trigonal_type1", 6), (162, "trigonal_type2", 6), (164, "trigonal_type1", 6),
    (167, "trigonal_type1", 6), (168, "hexagonal_low", 6), (176, "hexagonal_low", 6),
    (177, "hexagonal_high", 12), (194, "hexagonal_high", 12), (195, "cubic_low", 12),
    (206, "cubic_low", 12), (207, "cubic_high", 24), (225, "cubic_high", 24),
    (230, "cubic_high", 24),
]


@pytest.mark.parametrize("sg,name,n", CLASS_CASES)
def test_laue_class_and_sizes(sg, name, n):
    assert laue_class(sg) == name
    q = symmetry_quaternions(sg)
    assert q.shape == (n, 4) and q.dtype == np.float64
    assert q[0].tolist() == [1.0, 0.0, 0.0, 0.0]


def _qmul(q, r):
    w1, x1, y1, z1 = q
    w2, x2, y2, z2 = r
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def _contains(qs, q, tol=1e-4):
    return any(np.abs(p - q).max() < tol or np.abs(p + q).max() < tol for p in qs)


@pytest.mark.parametrize("sg", [1, 3, 16, 75, 89, 143, 149, 150, 168, 177, 195, 207])
def test_symmetry_sets_are_groups(sg):
    q = symmetry_quaternions(sg)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=2e-5)
    for a in q:
        for b in q:
            assert _contains(q, _qmul(a, b))
    # five-decimal constants, literally
    assert set(np.round(np.abs(q).ravel(), 6).tolist()) <= {0.0, 0.5, 0.70711, 0.86603, 1.0}


def _scipy_group(name, axis="Z", turn_deg=0.0):
    g = Rotation.create_group(name, axis=axis)
    if turn_deg:
        turn = Rotation.from_euler("z", turn_deg, degrees=True)
        g = turn * g * turn.inv()
    xyzw = g.as_quat()
    return np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)


@pytest.mark.parametrize("sg,group", [
    (3, ("C2", "Y")), (16, ("D2", "Z")), (75, ("C4", "Z")), (89, ("D4", "Z")),
    (143, ("C3", "Z")), (168, ("C6", "Z")), (177, ("D6", "Z")), (195, ("T", "Z")),
    (207, ("O", "Z")), (149, ("D3", "Z")), (150, ("D3", "Z", 90.0)),
])
def test_symmetry_sets_match_scipy(sg, group):
    ref = _scipy_group(*group)
    q = symmetry_quaternions(sg)
    assert len(ref) == len(q)
    for r in ref:
        assert _contains(q, r)


# --------------------------------------------------------------------------- (d) rings
def test_select_rings_order_and_duplicates(au_table):
    sel = select_rings(au_table, [3, 1, 3])
    r3 = np.nonzero(au_table.ring == 3)[0]
    r1 = np.nonzero(au_table.ring == 1)[0]
    expect = np.concatenate([r3, r1, r3])
    assert len(sel) == 12 + 8 + 12
    np.testing.assert_array_equal(sel.hkl, au_table.hkl[expect])
    np.testing.assert_array_equal(sel.g, au_table.g[expect])
    np.testing.assert_array_equal(sel.ring, [3] * 12 + [1] * 8 + [3] * 12)
    assert select_rings(au_table, []) is au_table
    assert select_rings(au_table, ()) is au_table


def test_select_rings_unknown_ring(au_table):
    with pytest.raises(NfjaxError) as err:
        select_rings(au_table, [1, 14])
    assert str(err.value) == "RingsToUse 14: no such ring in the reflection list (rings 1..13)"


def test_reflections_name_the_line_of_a_missing_ring(tmp_path):
    """``reflections(params)``: RingsToUse selected from the parameter file's own table; a
    ring it lacks is named with the file and that ring's line (the message had neither:
    'RingsToUse 999: no such ring ...')."""
    from nfjax.crystal import reflections
    from nfjax.data import au_example
    from nfjax.params import read_params

    text = open(au_example()["params"]).read()
    path = tmp_path / "p.txt"
    path.write_text(text + "RingsToUse 1\nRingsToUse 999\nRingsToUse 3\n")
    params = read_params(path)
    line = len(text.splitlines()) + 2
    with pytest.raises(ParamError) as err:
        reflections(params)
    assert str(err.value) == (f"{path}:{line}: RingsToUse 999: no such ring in the reflection "
                              f"list (rings 1..{int(hkls_from_params(params).ring.max())})")
    path.write_text(text + "RingsToUse 3\nRingsToUse 1\n")
    got = reflections(read_params(path))
    full = hkls_from_params(read_params(path))
    np.testing.assert_array_equal(got.g, select_rings(full, [3, 1]).g)


def test_ring_summary(au_table):
    lines = ring_summary(au_table)
    assert len(lines) == 13
    assert lines[0] == ("ring  1  {1 1 1}  d=2.35559 A  theta=2.10419 deg  R=757.2 um  "
                        "8 reflections")
    assert lines[9].startswith("ring 10  {5 1 1}+{3 3 3}  d=0.78520 A")
    assert lines[9].endswith("32 reflections")
    assert lines[12].startswith("ring 13  {4 4 2}+{6 0 0}")
    # a table read back from a file has no family column; the label falls back to a member
    assert ring_summary(read_hkls_csv(MIDAS_HKLS))[1].startswith("ring  2  {2 0 0}  d=2.04000")


# --------------------------------------------------------------------------- io
def test_read_hkls_round_trip(au_table, tmp_path):
    table = read_hkls_csv(MIDAS_HKLS)
    assert len(table) == 258 and table.family is None
    for name in ("hkl", "d", "ring", "g", "theta", "two_theta", "radius"):
        np.testing.assert_array_equal(getattr(table, name), getattr(au_table, name))
    out = tmp_path / "again.csv"
    write_hkls_csv(table, out)
    assert out.read_bytes() == MIDAS_HKLS.read_bytes()
    assert not list(tmp_path.glob(".*.part"))  # atomic writer left nothing behind


@pytest.mark.parametrize("row,msg", [
    ("1 1 1 2.35 1 0.2 0.2 0.2 2.1 4.2", "expected 11 columns"),
    ("1 1 x 2.35 1 0.2 0.2 0.2 2.1 4.2 757", "column l must be a number, found 'x'"),
    ("1 1 1.5 2.35 1 0.2 0.2 0.2 2.1 4.2 757", "column l must be an integer, found '1.5'"),
    ("1 1 1 2.35 1 0.2 nan? 0.2 2.1 4.2 757", "column g2 must be a number"),
    ("1 1 1 2.35 1 0.2 nan 0.2 2.1 4.2 757", "column g2 must be a finite number, found 'nan'"),
    ("1 1 1 2.35 1 0.2 0.2 0.2 inf 4.2 757", "column Theta must be a finite number, found "
                                             "'inf'"),
])
def test_read_hkls_malformed(tmp_path, row, msg):
    path = tmp_path / "bad.csv"
    path.write_text(HKLS_HEADER + "\n1 1 1 2.35 1 0.2 0.2 0.2 2.1 4.2 757\n" + row + "\n")
    with pytest.raises(InputFileError) as err:
        read_hkls_csv(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert msg in str(err.value)


def test_read_hkls_skips_a_byte_order_mark(tmp_path):
    # Without a header line the first reflection must not be taken for one.
    row = "1 1 1 2.35 1 0.2 0.2 0.2 2.1 4.2 757\n"
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (row + row.replace("757", "758")).encode())
    assert read_hkls_csv(path).radius.tolist() == [757.0, 758.0]


def test_read_hkls_missing_and_empty(tmp_path):
    with pytest.raises(InputFileError, match="hkls file not found"):
        read_hkls_csv(tmp_path / "nope.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text(HKLS_HEADER + "\n")
    with pytest.raises(InputFileError, match="no reflections"):
        read_hkls_csv(empty)


def test_table_is_immutable(au_table):
    with pytest.raises(ValueError):
        au_table.d[0] = 1.0
    with pytest.raises(ValueError, match="shape"):
        HklTable(hkl=np.zeros((2, 3)), d=np.zeros(3), ring=np.zeros(3), g=np.zeros((3, 3)),
                 theta=np.zeros(3), two_theta=np.zeros(3), radius=np.zeros(3))
