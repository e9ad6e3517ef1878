"""Forward model against MIDAS's MakeDiffrSpots and simulateNF outputs, closed forms and
independent oracles."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import need
from nfjax import observe
from nfjax.cli import main
from nfjax.crystal import hkls_from_params, select_rings
from nfjax.errors import InputFileError
from nfjax.forward import (displace, footprint_box, footprint_offsets, predict_spots, project,
                           round_half_away, spot_footprint, bit_indices, bragg_v)
from nfjax.geometry import geometry_from_params, tilt_matrix
from nfjax.grid import triangle_vertices
from nfjax.io.mic import read_mic
from nfjax.io.seeds import read_seeds
from nfjax.io.spots import read_spot_files, write_spot_files
from nfjax.orientation import euler_to_matrix_midas
from nfjax.params import read_params
from nfjax.simulate import mic_grid_rows, select_rendered, simulate_mic
from nfjax.spots import make_diffraction_spots, predict_many, seed_matrices


@pytest.fixture(scope="module")
def au(request):
    from conftest import REF_RUN

    need(REF_RUN)
    params = read_params(REF_RUN / "params_used.txt")
    table = select_rings(hkls_from_params(params), params.rings_to_use)
    return params, table, geometry_from_params(params)


def _reference_spots(directory):
    key = np.fromfile(directory / "Key.bin", np.int32).reshape(-1, 2)
    spots = np.fromfile(directory / "DiffractionSpots.bin", np.float64).reshape(-1, 3)
    orient = np.fromfile(directory / "OrientMat.bin", np.float64).reshape(-1, 9)
    return key, spots, orient


def _as_set(rows):
    return rows[np.lexsort((rows[:, 1], rows[:, 0], rows[:, 2]))]


@pytest.mark.parametrize("case", ["seeds4", "spots1000"])
def test_spots_match_makediffrspots(au, ref_run, case):
    params, table, geom = au
    if case == "seeds4":
        directory, seeds = ref_run, ref_run / "seedOrientations.txt"
    else:
        directory, seeds = ref_run / "spots1000", ref_run / "spots1000" / "seeds.csv"
    key, spots, orient = _reference_spots(directory)
    got = make_diffraction_spots(read_seeds(seeds), table.g, table.theta, geom, progress=False)
    assert len(got) == len(key)
    np.testing.assert_array_equal(got.orient, orient)           # same matrix, bit for bit
    np.testing.assert_array_equal(got.key[:, 0], key[:, 0])     # same count per orientation
    assert int(key[:, 0].sum()) == (382 if case == "seeds4" else 98722)
    for i in range(len(key)):
        mine, ref = _as_set(got.of(i)), _as_set(spots[key[i, 1]:key[i, 1] + key[i, 0]])
        np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-6)
    # nfjax also keeps MIDAS's order (its hkls.csv order is MIDAS's): compare unsorted too.
    np.testing.assert_allclose(got.spots, spots, rtol=0, atol=1e-6)


def test_spots_float32_within_1e2_um(au, ref_run):
    params, table, geom = au
    key, spots, orient = _reference_spots(ref_run / "spots1000")
    from nfjax.orientation import quat_to_matrix
    seeds = read_seeds(ref_run / "spots1000" / "seeds.csv")
    np.testing.assert_allclose(np.asarray(quat_to_matrix(jnp.asarray(seeds))).reshape(-1, 9),
                               orient, rtol=0, atol=1e-15)
    orients = seed_matrices(read_seeds(ref_run / "spots1000" / "seeds.csv"))
    yl, zl, om, valid = predict_many(orients, table.g, table.theta, geom, dtype=jnp.float32,
                                     progress=False)
    assert yl.dtype == np.float32
    np.testing.assert_array_equal(valid.sum(axis=1), key[:, 0])
    mine = np.stack([yl[valid], zl[valid], om[valid]], axis=1).astype(np.float64)
    assert np.abs(mine[:, :2] - spots[:, :2]).max() < 1e-2
    assert np.abs(mine[:, 2] - spots[:, 2]).max() < 1e-3


def test_spot_files_round_trip_and_checks(au, ref_run, tmp_path):
    params, table, geom = au
    got = make_diffraction_spots(read_seeds(ref_run / "seedOrientations.txt"), table.g,
                                 table.theta, geom, progress=False)
    write_spot_files(tmp_path, got)
    back = read_spot_files(tmp_path)
    np.testing.assert_array_equal(back.key, got.key)
    np.testing.assert_array_equal(back.spots, got.spots)
    assert (tmp_path / "Key.bin").stat().st_size == 4 * 2 * 4
    # MIDAS's own files read through the same checks.
    ref = read_spot_files(ref_run)
    assert ref.key[:, 0].tolist() == [98, 94, 100, 90]
    # A Key/DiffractionSpots mismatch is a one-line error naming the file.
    (tmp_path / "DiffractionSpots.bin").write_bytes(got.spots[:-1].tobytes())
    with pytest.raises(InputFileError, match="DiffractionSpots.bin: holds 381 spots but"):
        read_spot_files(tmp_path)
    # NaN in the spots or the orientations ran through the fit (exit 0)
    spots = got.spots.copy()
    spots[7, 2] = np.nan
    (tmp_path / "DiffractionSpots.bin").write_bytes(spots.tobytes())
    with pytest.raises(InputFileError, match=r"DiffractionSpots.bin: record 7 is not finite "
                                             r"\(.* nan\); 1 of 382 records$"):
        read_spot_files(tmp_path)
    write_spot_files(tmp_path, got)
    orient = np.asarray(got.orient).copy()
    orient[2, 4] = np.inf
    (tmp_path / "OrientMat.bin").write_bytes(orient.tobytes())
    with pytest.raises(InputFileError, match=r"OrientMat.bin: record 2 is not finite .* inf "):
        read_spot_files(tmp_path)


def test_cli_spots(ref_run, tmp_path, capsys):
    rc = main(["spots", str(ref_run / "params_used.txt"), str(ref_run / "seedOrientations.txt"),
               "-o", str(tmp_path)])
    assert rc == 0
    out, err = capsys.readouterr()
    assert "4 orientations, 382 spots" in out and err == ""
    got = read_spot_files(tmp_path)
    np.testing.assert_allclose(got.spots, read_spot_files(ref_run).spots, atol=1e-6, rtol=0)
    # a geometry that puts no spot on the detector (Lsd of 1 nm) is said, not silent
    text = (ref_run / "params_used.txt").read_text()
    lines = [("Lsd 0.001" if ln.startswith("Lsd ") else ln) for ln in text.splitlines()]
    params = tmp_path / "p.txt"
    params.write_text("\n".join(lines) + "\n")
    assert main(["spots", str(params), str(ref_run / "seedOrientations.txt"),
                 "-o", str(tmp_path / "none")]) == 0
    out, err = capsys.readouterr()
    assert "4 orientations, 0 spots" in out
    assert err == (f"warning: {ref_run / 'seedOrientations.txt'}: no spot falls on the "
                   f"detector with the geometry of {params} (check Lsd, BC, tx/ty/tz, px, "
                   f"NrPixelsY/Z and OmegaRange/BoxSize)\n")


def test_simulate_reproduces_simulatenf_bits(au, midas_au, ref_run):
    params, table, geom = au
    vol, n_rendered, n_total = simulate_mic(params, midas_au / "Au_txt.mic", progress=False)
    assert (n_rendered, n_total) == (1514, 3456)
    ref = np.load(ref_run / "SpotsInfo_lit.npz")["index"]
    got = observe.lit_indices(vol)
    assert got.size == 87646
    np.testing.assert_array_equal(got, np.sort(ref))


def test_simulate_distance_rule_difference_is_counted(au, midas_au, ref_run):
    """simulateNF stops a pixel's distance loop at the first distance where it is off the
    detector; nfjax lights every distance where the pixel is on it (documented difference).
    Count the bits that rule explains on the Au example: none, so both agree exactly."""
    params, table, geom = au
    recs = select_rendered(read_mic(midas_au / "Au_txt.mic").records, params.min_confidence)
    verts = jnp.asarray(triangle_vertices(mic_grid_rows(recs)))
    g, th = jnp.asarray(table.g), jnp.asarray(table.theta)
    v = bragg_v(g, th)
    box = footprint_box(1.0, 1.48)
    rt = tilt_matrix(geom.tilts)

    def one(eul, vv):
        sp = predict_spots(euler_to_matrix_midas(eul), g, th, geom, v=v)
        fp = jax.vmap(lambda a, b, c: spot_footprint(vv, a, b, c, geom, box, rt))(
            sp.yl, sp.zl, sp.omega)
        k = jax.vmap(lambda f: bit_indices(f, geom))(fp)
        base = (sp.valid & fp.frame_ok)[:, None, None] & fp.pix_ok[:, :, None]
        return k, base, fp.in_range

    k, base, inr = (np.asarray(a) for a in jax.jit(jax.vmap(one))(jnp.asarray(recs[:, 7:10]),
                                                                   verts))
    nfjax_rule = np.unique(k[base & inr])
    midas_rule = np.unique(k[base & np.cumprod(inr, axis=-1).astype(bool)])
    explained = np.setdiff1d(nfjax_rule, midas_rule)
    assert explained.size == 0
    np.testing.assert_array_equal(midas_rule, np.sort(np.load(ref_run / "SpotsInfo_lit.npz")["index"]))


@pytest.mark.slow
def test_cli_simulate_writes_full_spotsinfo(ref_run, midas_au, tmp_path, capsys):
    out = tmp_path / "SpotsInfo.bin"
    rc = main(["simulate", str(ref_run / "params_used.txt"), str(midas_au / "Au_txt.mic"),
               "-o", str(out)])
    assert rc == 0
    assert out.stat().st_size == 1_509_949_440
    vol = observe.read_spots_info(out, (2, 1440, 2048, 2048))
    np.testing.assert_array_equal(observe.lit_indices(vol),
                                  np.sort(np.load(ref_run / "SpotsInfo_lit.npz")["index"]))


# ----------------------------------------------------------------------------- closed forms
def _geom_untilted(au):
    import dataclasses

    _, _, geom = au
    return dataclasses.replace(geom, tilts=jnp.zeros(3))


def test_untilted_projection_is_linear(au):
    geom = _geom_untilted(au)
    Y, Z = jnp.array([-300.0, 12.5, 801.0]), jnp.array([150.0, -7.0, 2200.0])
    yp, zp = project(Y, Z, geom)
    np.testing.assert_allclose(yp, Y / 1.48 + 985.415831, rtol=0, atol=1e-9)
    np.testing.assert_allclose(zp, Z / 1.48 + 17.510494, rtol=0, atol=1e-9)


def test_tilted_projection_matches_ray_plane_oracle(au):
    _, _, geom = au
    rng = np.random.default_rng(3)
    Y, Z = rng.uniform(-1000, 1000, 50), rng.uniform(0, 2500, 50)
    yp, zp = project(jnp.asarray(Y), jnp.asarray(Z), geom)
    # Oracle: intersect the line through the tilted source point and the tilted detector
    # point with the plane x = 0, written independently with numpy.
    t = np.deg2rad([0.536238, 0.557035, 0.474936])
    rx = np.array([[1, 0, 0], [0, np.cos(t[0]), -np.sin(t[0])], [0, np.sin(t[0]), np.cos(t[0])]])
    ry = np.array([[np.cos(t[1]), 0, np.sin(t[1])], [0, 1, 0], [-np.sin(t[1]), 0, np.cos(t[1])]])
    rz = np.array([[np.cos(t[2]), -np.sin(t[2]), 0], [np.sin(t[2]), np.cos(t[2]), 0], [0, 0, 1]])
    r = rz @ ry @ rx
    p0 = r @ np.array([-8289.154576, 0, 0])
    for i in range(50):
        p1 = r @ np.array([0, Y[i], Z[i]])
        s = -p0[0] / (p1[0] - p0[0])
        hit = p0 + s * (p1 - p0)
        assert abs(hit[1] / 1.48 + 985.415831 - float(yp[i])) < 1e-9
        assert abs(hit[2] / 1.48 + 17.510494 - float(zp[i])) < 1e-9


def test_displacement_of_origin_is_identity(au):
    Y, Z = displace(jnp.zeros((1, 2)), 100.0, 900.0, 37.0, 8000.0)
    assert float(Y[0]) == 100.0 and float(Z[0]) == 900.0
    # A vertex on the beam axis upstream of the origin (x < 0 at ω = 0) moves the spot
    # outward by the factor t = 1 + |x|/Lsd (closed form).
    Y, Z = displace(jnp.array([[-80.0, 0.0]]), 100.0, 900.0, 0.0, 8000.0)
    np.testing.assert_allclose([float(Y[0]), float(Z[0])], [100 * 1.01, 900 * 1.01], rtol=1e-15)


def test_round_half_away_from_zero():
    x = jnp.array([2.5, -2.5, 0.49999999999999994, 2.4999999999999996, -0.5, 1.5, 3.2, -3.7])
    np.testing.assert_array_equal(round_half_away(x), [3, -3, 0, 2, -1, 2, 3, -4])


def _calcpixels2_oracle(rel):
    """A literal scalar transcription of MIDAS's CalcPixels2 rules (§5.4)."""
    def cround(v):
        return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)

    v = [(cround(a), cround(b)) for a, b in rel]
    ys, zs = [p[0] for p in v], [p[1] for p in v]
    out = set()

    def orient(a, b, p):
        return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])

    edges = [(v[1], v[2]), (v[2], v[0]), (v[0], v[1])]
    for z in range(min(zs), max(zs) + 1):
        for y in range(min(ys), max(ys) + 1):
            p = (y, z)
            o = [orient(a, b, p) for a, b in edges]
            if all(x >= 0 for x in o):
                out.add(p)
                continue
            for (a, b), oo in zip(edges, o):
                e2 = (b[0] - a[0]) ** 2 + (b[1] - a[1]) ** 2
                if e2 > 0 and oo * oo / e2 < 0.9801:
                    out.add(p)
                    break
    return out


def test_rasteriser_matches_scalar_oracle():
    rng = np.random.default_rng(7)
    box = footprint_box(6.0, 1.48)
    fn = jax.jit(lambda r: footprint_offsets(r, box))
    for _ in range(300):
        rel = rng.uniform(-3, 3, size=(3, 2)) * rng.choice([0.3, 1.0])
        oy, oz, ok = (np.asarray(a) for a in fn(jnp.asarray(rel)))
        got = set(zip(oy[ok].tolist(), oz[ok].tolist()))
        assert got == _calcpixels2_oracle(rel)


def test_single_pixel_rule():
    rel = jnp.array([[0.4, -0.2], [0.6, 0.1], [0.55, 0.5]])     # mean (0.5167, 0.1333)
    oy, oz, ok = footprint_offsets(rel, 1)
    assert (int(oy[0]), int(oz[0]), bool(ok[0])) == (1, 0, True)


def test_predict_spots_names_a_batched_orientation():
    """One (3, 3) orientation per call (vmap for more): a batch is a clear error, not an
    XLA dot_general shape error."""
    from conftest import MIDAS_AU

    need(MIDAS_AU)
    geom = geometry_from_params(read_params(MIDAS_AU / "ps_au.txt"))
    g = jnp.ones((4, 3))
    th = jnp.full((4,), 3.0)
    with pytest.raises(ValueError, match=r"orient must be one \(3, 3\) matrix, got shape "
                                         r"\(2, 3, 3\); use jax.vmap"):
        predict_spots(jnp.stack([jnp.eye(3)] * 2), g, th, geom)
    with pytest.raises(ValueError, match=r"^predict_spots: g must be reflections \(R, 3\), "
                                         r"got shape \(3, 4\)$"):
        predict_spots(jnp.eye(3), g.T, th, geom)
    with pytest.raises(ValueError, match=r"^predict_spots: theta must be \(4,\), one Bragg "
                                         r"angle per reflection of g, got shape \(2,\)$"):
        predict_spots(jnp.eye(3), g, th[:2], geom)


def test_bit_indices_refuse_32_bit_mode_for_a_large_volume():
    """With NFJAX_NO_X64 the int64 bit indices became int32 and overflowed for a real-size
    volume (silently wrong bits when they landed in range): now a one-line error."""
    import subprocess
    import sys
    from conftest import MIDAS_AU, ROOT

    need(MIDAS_AU)
    code = ("import os, sys; import nfjax, jax; assert not jax.config.jax_enable_x64\n"
            "from nfjax.cli import main; sys.exit(main(['simulate', sys.argv[1], sys.argv[2],"
            " '-o', os.devnull]))")
    out = subprocess.run([sys.executable, "-c", code, str(MIDAS_AU / "ps_au.txt"),
                          str(MIDAS_AU / "Au_txt.mic")], capture_output=True, text=True,
                         cwd=ROOT, env={**__import__("os").environ, "NFJAX_NO_X64": "1"})
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]       # (JAX warns about float64 before it)
    assert last.startswith("nfjax: error: the observation volume has 12079595520 bits, too "
                           "many for 32-bit indices: run with JAX's 64-bit mode"), last


@pytest.mark.parametrize("tilts", [(0.54, 0.56, 0.47), (3.0, -2.5, 4.0)])
def test_rectangular_box_takes_the_same_pixels(tilts):
    """fit_box's (by, bz) raster box is smaller than the square footprint_box but takes
    exactly the pixels the square box takes, in the same order, for probe triangles of
    several edges anywhere within r_max of the axis and spots anywhere out to tan 2θ_max —
    on the Au example's detector and on one tilted by several degrees."""
    from nfjax.data import au_example
    from nfjax.forward import box_pixels, fit_box, spot_footprint

    p = read_params(au_example()["params"])
    geom = dataclasses.replace(geometry_from_params(p), tilts=jnp.asarray(tilts, jnp.float64))
    rt = tilt_matrix(geom.tilts)
    lsd0 = float(geom.lsd[0])
    rng = np.random.default_rng(11)
    n = 3000
    two_theta = np.radians(rng.uniform(3.0, 24.0, n))
    eta = rng.uniform(-np.pi, np.pi, n)
    yl, zl = -np.sin(eta) * lsd0 * np.tan(two_theta), np.cos(eta) * lsd0 * np.tan(two_theta)
    omega = rng.uniform(-180.0, 180.0, n)
    for edge in (2.0, 5.0, 9.0):
        grid = np.zeros((n, 5))
        grid[:, 2:4] = rng.uniform(-350.0, 350.0, (n, 2))
        grid[:, 1] = rng.integers(0, 2, n)                  # up and down triangles
        grid[:, 4] = edge / 2
        verts = triangle_vertices(grid)
        theta = np.degrees(two_theta) / 2
        square = footprint_box(edge, float(geom.px))
        rect = fit_box(edge, verts, theta, geom)
        assert box_pixels(rect) < box_pixels(square), (rect, square)

        def pixels(box):
            fp = jax.jit(jax.vmap(lambda v, y, z, w: spot_footprint(v, y, z, w, geom, box, rt)))(
                jnp.asarray(verts), jnp.asarray(yl), jnp.asarray(zl), jnp.asarray(omega))
            ok = np.asarray(fp.pix_ok)
            py, pz = np.asarray(fp.py)[..., 0], np.asarray(fp.pz)[..., 0]
            return [list(zip(py[i][ok[i]], pz[i][ok[i]])) for i in range(n)]

        big, small = pixels(square), pixels(rect)
        assert sum(len(b) for b in big) > n
        assert small == big, edge


def test_candidate_reflections_in_32_bit_mode_without_warnings():
    """The README's float32 route (NFJAX_NO_X64=1, geometry_from_params(dtype=float32))
    runs candidate_reflections without JAX's 'float64 truncated to float32' warnings
    (three came from inside nfjax), and finds the reflections the 64-bit mode finds."""
    import subprocess
    import sys
    from conftest import ROOT

    code = ("import warnings, sys, numpy as np\n"
            "warnings.simplefilter('error')\n"
            "import jax.numpy as jnp, nfjax\n"
            "from nfjax.data import au_example\n"
            "from nfjax.params import read_params\n"
            "from nfjax.crystal import hkls_from_params, select_rings\n"
            "from nfjax.geometry import geometry_from_params\n"
            "from nfjax.fit import candidate_reflections\n"
            "p = read_params(au_example()['params'])\n"
            "r = select_rings(hkls_from_params(p), p.rings_to_use)\n"
            "dt = jnp.float32 if sys.argv[1] == '32' else jnp.float64\n"
            "idx, mask = candidate_reflections(np.array([[0.1, 0.2, 0.3], [1.0, 0.5, 2.0]]),"
            " r.g, r.theta, geometry_from_params(p, dtype=dt), np.radians(1.0))\n"
            "print(sorted(np.asarray(idx)[np.asarray(mask)].tolist()))\n")
    found = {}
    for bits, env in (("32", {"NFJAX_NO_X64": "1"}), ("64", {})):
        out = subprocess.run([sys.executable, "-c", code, bits], capture_output=True,
                             text=True, cwd=ROOT, timeout=300,
                             env={**__import__("os").environ, **env})
        assert out.returncode == 0, out.stderr[-2000:]
        found[bits] = out.stdout
    assert found["32"] == found["64"] and len(found["32"]) > 10
