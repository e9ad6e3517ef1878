"""Grid parity with MIDAS MakeHexGrid, masks, and the fitter's triangles."""
from __future__ import annotations

import importlib.util
import math
import re
import types

import numpy as np
import pytest

from conftest import MIDAS_AU, ROOT, need
from nfjax.errors import InputFileError, NfjaxError
from nfjax.grid import (apply_grid_mask, apply_tomo_mask, grid_from_params, make_hex_grid,
                        triangle_vertices, up_down)
from nfjax.io.gridfile import read_grid, write_grid

PS_AU = ROOT / "nfjax" / "data" / "au" / "ps_au.txt"
HAVE_PARAMS = importlib.util.find_spec("nfjax.params") is not None


def _params(**kw):
    base = dict(grid_size=2.5, edge_length=1.0, rsample=50.0, grid_mask=None, tomo_image=None,
                tomo_pixel_size=None, grid_points=(), source="test-params")
    base.update(kw)
    return types.SimpleNamespace(**base)


# --------------------------------------------------------------------------- MakeHexGrid
def test_au_grid_byte_equal_to_midas(ref_run, tmp_path):
    grid = make_hex_grid(2.5, 1, 50)
    assert grid.shape == (3456, 5)
    out = tmp_path / "grid.txt"
    write_grid(grid, out)
    assert out.read_bytes() == (ref_run / "grid.txt").read_bytes()
    # and the in-memory values are exactly what a reader of MIDAS's file gets
    assert np.array_equal(read_grid(ref_run / "grid.txt"), grid)


def test_first_three_lines_test_vector(tmp_path):
    write_grid(make_hex_grid(2.5, 1, 50), tmp_path / "g.txt")
    lines = (tmp_path / "g.txt").read_text().splitlines()
    assert lines[:4] == [
        "3456",
        "0.577350 0.288675 -28.750000 -50.518149 0.500000",
        "0.288675 0.577350 -27.500000 -51.239836 0.500000",
        "0.577350 0.288675 -26.250000 -50.518149 0.500000",
    ]


@pytest.mark.parametrize("g,r", [(2.5, 50), (1.0, 10), (5.0, 7.3), (0.7, 3.0), (10, 100),
                                 (3.0, 1.0)])
def test_count_closed_form(g, r):
    nr_hex = math.ceil(2 * r / math.sqrt(3) / g)
    grid = make_hex_grid(g, 0, r)
    assert grid.shape == (6 * nr_hex ** 2, 5)
    # lattice rows: y levels are Ht*i -/+ offsets; centroid pitch G/2 along x within a row
    assert np.all(grid[:, 4] == round(g / 2, 6))


def test_edge_length_zero_means_grid_size():
    a = make_hex_grid(4.0, 0, 20, as_written=False)
    b = make_hex_grid(4.0, 4.0, 20, as_written=False)
    assert np.array_equal(a, b)
    # E only changes columns y1, y2, gs: probe edges E*sqrt(3)/6 and E*sqrt(3)/3, gs = E/2
    c = make_hex_grid(4.0, 1.0, 20, as_written=False)
    assert np.array_equal(a[:, 2:4], c[:, 2:4])
    assert set(np.round(c[:, 0], 12)) == {round(math.sqrt(3) / 6, 12), round(math.sqrt(3) / 3, 12)}
    assert np.all(c[:, 4] == 0.5)


def test_as_written_is_the_6_decimal_value():
    raw = make_hex_grid(2.5, 1, 50, as_written=False)
    written = make_hex_grid(2.5, 1, 50)
    expected = np.vectorize(lambda v: float("%f" % v))(raw)
    assert np.array_equal(written, expected)
    assert np.max(np.abs(raw - written)) <= 5e-7


def test_hex_grid_extent():
    # Full hexagon, not clipped to the circle. Rows i = +-1 span -A_last + G/2 .. A_last - G/2
    # in a true hexagon; MIDAS shifts i < 0 rows by +G/2, so the maximum reaches A_last.
    g, r = 2.5, 50
    nr_hex = math.ceil(2 * r / math.sqrt(3) / g)
    grid = make_hex_grid(g, 1, r, as_written=False)
    a_last = g * nr_hex
    assert grid[:, 2].min() == pytest.approx(-a_last + g / 2)
    assert grid[:, 2].max() == pytest.approx(a_last)
    upper = grid[grid[:, 3] > 0]
    assert upper[:, 2].max() == pytest.approx(a_last - g / 2)
    ht = math.sqrt(3) / 2 * g
    assert grid[:, 3].max() == pytest.approx(ht * nr_hex - ht / 3)


def test_bad_grid_inputs():
    with pytest.raises(NfjaxError, match="GridSize"):
        make_hex_grid(0, 1, 50)
    with pytest.raises(NfjaxError, match="Rsample"):
        make_hex_grid(2.5, 1, -1)


# --------------------------------------------------------------------------- triangles
def test_triangles_match_fitter_rule():
    grid = make_hex_grid(2.5, 1, 50)
    ud = up_down(grid)
    assert np.array_equal(ud, np.where(grid[:, 0] > grid[:, 1], -1.0, 1.0))
    assert set(ud.tolist()) == {-1.0, 1.0}
    v = triangle_vertices(grid)
    assert v.shape == (3456, 3, 2)
    centroid = v.mean(axis=1)
    # the fitter's triangle is centred on (xs, ys), apex up for UD=+1, down for UD=-1
    np.testing.assert_allclose(centroid[ud > 0], grid[ud > 0, 2:4], atol=1e-9)
    np.testing.assert_allclose(centroid[ud < 0], grid[ud < 0, 2:4], atol=1e-9)
    assert np.all((v[:, 0, 1] > v[:, 1, 1]) == (ud > 0))
    # equilateral with edge E = 1 µm (to the 6-decimal rounding of grid.txt)
    edges = np.linalg.norm(v - np.roll(v, 1, axis=1), axis=2)
    np.testing.assert_allclose(edges, 1.0, atol=2e-6)
    exact = triangle_vertices(make_hex_grid(2.5, 1, 50, as_written=False))
    edges_exact = np.linalg.norm(exact - np.roll(exact, 1, axis=1), axis=2)
    np.testing.assert_allclose(edges_exact, 1.0, rtol=1e-12)


def test_grid_matches_midas_known_mic(midas_au):
    """MIDAS's Au_txt.mic lists every grid row: X, Y, TriEdgeSize and UpDown agree."""
    mic = np.loadtxt(midas_au / "Au_txt.mic", comments="%")
    grid = make_hex_grid(2.5, 1, 50)
    assert mic.shape[0] == grid.shape[0]
    assert np.array_equal(mic[:, 3:5], grid[:, 2:4])
    assert np.array_equal(mic[:, 5], 2 * grid[:, 4])
    assert np.array_equal(mic[:, 6], up_down(grid))


# --------------------------------------------------------------------------- masks
def test_grid_mask_inclusive():
    grid = make_hex_grid(2.5, 1, 50)
    x0, y0 = grid[100, 2], grid[100, 3]
    kept = apply_grid_mask(grid, (x0, x0, y0, y0))
    assert np.array_equal(kept, grid[[100]])  # both bounds inclusive
    kept = apply_grid_mask(grid, (-10, 10, -5, 5))
    expected = [row for row in grid.tolist()
                if -10 <= row[2] <= 10 and -5 <= row[3] <= 5]
    assert kept.tolist() == expected
    assert apply_grid_mask(grid, (-1000, 1000, -1000, 1000)).shape == grid.shape


def _tomo_oracle(grid, img, px):
    n = img.shape[0]
    keep = []
    for x, y in grid[:, 2:4].tolist():
        xp = int(x / px + n / 2)  # int() truncates toward zero, like C's (int) cast
        yp = int(y / px + n / 2)
        keep.append(0 <= xp < n and 0 <= yp < n and img[n - 1 - yp][xp] != 0)
    return np.array(keep)


def test_tomo_mask_half_planes(tmp_path):
    grid = make_hex_grid(2.5, 1, 50)
    n, px = 64, 2.0  # image covers +-64 µm, the whole grid
    top = np.zeros((n, n), np.uint8)
    top[: n // 2, :] = 7  # upper image rows = positive y (the image is stored y-flipped)
    (tmp_path / "top.raw").write_bytes(top.tobytes())
    kept = apply_tomo_mask(grid, tmp_path / "top.raw", px)
    assert np.array_equal(kept, grid[grid[:, 3] >= 0])
    assert kept.shape[0] == 1728
    right = np.zeros((n, n), np.uint8)
    right[:, n // 2:] = 1
    (tmp_path / "right.raw").write_bytes(right.tobytes())
    assert np.array_equal(apply_tomo_mask(grid, tmp_path / "right.raw", px),
                          grid[grid[:, 2] >= 0])


def test_tomo_mask_random_image(tmp_path):
    grid = make_hex_grid(2.5, 1, 50)
    rng = np.random.default_rng(3)
    n, px = 45, 2.1  # odd n, image smaller than the grid: points off the image are dropped
    img = (rng.random((n, n)) > 0.5).astype(np.uint8) * 255
    (tmp_path / "tomo.bin").write_bytes(img.tobytes())
    expected = _tomo_oracle(grid, img, px)
    kept = apply_tomo_mask(grid, tmp_path / "tomo.bin", px)
    assert np.array_equal(kept, grid[expected])
    assert 0 < kept.shape[0] < grid.shape[0]


def test_tomo_errors(tmp_path):
    grid = make_hex_grid(2.5, 1, 50)
    with pytest.raises(InputFileError, match="not found"):
        apply_tomo_mask(grid, tmp_path / "missing.raw", 1.0)
    (tmp_path / "empty.raw").write_bytes(b"")
    with pytest.raises(InputFileError, match="empty"):
        apply_tomo_mask(grid, tmp_path / "empty.raw", 1.0)
    (tmp_path / "odd.raw").write_bytes(b"\x01" * 10)
    with pytest.raises(InputFileError, match="10 bytes"):
        apply_tomo_mask(grid, tmp_path / "odd.raw", 1.0)


def test_grid_from_params_masks(tmp_path):
    full = make_hex_grid(2.5, 1, 50)
    assert np.array_equal(grid_from_params(_params()), full)
    assert np.array_equal(grid_from_params(_params(edge_length=0.0)), make_hex_grid(2.5, 0, 50))
    masked = grid_from_params(_params(grid_mask=(-10.0, 10.0, -5.0, 5.0)))
    assert np.array_equal(masked, apply_grid_mask(full, (-10, 10, -5, 5)))
    # GridPoints are calibration inputs, not a grid filter
    pts = ((0.0,) * 12,)
    assert np.array_equal(grid_from_params(_params(grid_points=pts)), full)
    with pytest.raises(NfjaxError, match="empty after GridMask"):
        grid_from_params(_params(grid_mask=(500.0, 600.0, 500.0, 600.0)))
    # TomoImage takes precedence over GridMask
    n = 64
    img = np.zeros((n, n), np.uint8)
    img[: n // 2] = 1
    (tmp_path / "t.raw").write_bytes(img.tobytes())
    tomo = grid_from_params(_params(tomo_image=str(tmp_path / "t.raw"), tomo_pixel_size=2.0,
                                    grid_mask=(-10.0, 10.0, -5.0, 5.0)))
    assert np.array_equal(tomo, full[full[:, 3] >= 0])
    with pytest.raises(NfjaxError, match="TomoPixelSize"):
        grid_from_params(_params(tomo_image=str(tmp_path / "t.raw")))


# --------------------------------------------------------------------------- grid file
def test_grid_file_errors(tmp_path):
    p = tmp_path / "g.txt"
    p.write_text("3\n1 2 3 4 5\n1 2 3 4 5\n")
    with pytest.raises(InputFileError, match=r"g.txt:1: .*says 3 .* has 2 rows"):
        read_grid(p)
    p.write_text("1\n1 2 x 4 5\n")
    with pytest.raises(InputFileError, match=r"g.txt:2: expected 5 numbers"):
        read_grid(p)
    p.write_text("1\n1 2 3 4\n")
    with pytest.raises(InputFileError, match=r"g.txt:2: expected 5 columns .* found 4"):
        read_grid(p)
    # NaN, inf or absurd coordinates ran through the fit into the mic (exit 0), which every
    # reader then refused
    for bad in ("nan", "inf", "-1e300"):
        p.write_text(f"2\n1 2 3 4 5\n1 2 {bad} 4 5\n")
        with pytest.raises(InputFileError, match=re.escape(
                f"g.txt:3: expected finite numbers within ±1e+06 um (y1 y2 xs ys gs), found "
                f"'1 2 {bad} 4 5'")):
            read_grid(p)
    p.write_text("abc\n")
    with pytest.raises(InputFileError, match=r"g.txt:1: expected the number"):
        read_grid(p)
    with pytest.raises(InputFileError, match="not found") as info:
        read_grid(tmp_path / "nope.txt")
    assert "\n" not in str(info.value)


def test_grid_file_with_byte_order_mark(tmp_path):
    grid = make_hex_grid(3.0, 1.5, 6)
    write_grid(grid, tmp_path / "g.txt")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "g.txt").read_bytes())
    assert np.array_equal(read_grid(tmp_path / "bom.txt"), grid)


def test_grid_too_large_is_refused_before_it_is_built():
    with pytest.raises(NfjaxError, match=r"^test-params: Rsample 50000 µm with GridSize 1 µm "
                       r"would make 20000674176 grid rows \(at most 50 million are built\); "
                       r"raise GridSize or lower Rsample$"):
        grid_from_params(_params(grid_size=1.0, edge_length=0.0, rsample=50000.0))


def test_grid_round_trip(tmp_path):
    grid = make_hex_grid(3.0, 1.5, 12)
    write_grid(grid, tmp_path / "g.txt")
    assert np.array_equal(read_grid(tmp_path / "g.txt"), grid)
    write_grid(grid[:0], tmp_path / "e.txt")
    assert (tmp_path / "e.txt").read_text() == "0\n"
    assert read_grid(tmp_path / "e.txt").shape == (0, 5)


# --------------------------------------------------------------------------- CLI
@pytest.mark.skipif(not HAVE_PARAMS, reason="nfjax.params not available yet")
def test_cli_grid_matches_midas(ref_run, tmp_path, capsys):
    from nfjax.cli import main

    out = tmp_path / "grid.txt"
    assert main(["grid", str(need(PS_AU)), "-o", str(out)]) == 0
    assert out.read_bytes() == (ref_run / "grid.txt").read_bytes()
    assert "3456 grid points" in capsys.readouterr().out


@pytest.mark.skipif(not HAVE_PARAMS, reason="nfjax.params not available yet")
def test_grid_from_read_params(ref_run):
    from nfjax.params import read_params

    params = read_params(need(MIDAS_AU / "ps_au.txt"))
    assert np.array_equal(grid_from_params(params), read_grid(ref_run / "grid.txt"))


def test_tomo_outline_masks_the_grid_to_the_sample(tmp_path):
    """simulate.tomo_outline written as a TomoImage keeps exactly the grid points within
    the radius of a sample voxel (away from pixel edges the pixel rule is exact)."""
    from nfjax.simulate import tomo_outline

    grid = make_hex_grid(2.5, 1.0, 20.0)
    sample = np.zeros((3, 11))
    sample[:, 3:5] = [[-8.0, 3.0], [5.0, -6.0], [6.0, 6.5]]
    img = tomo_outline(sample, pixel_size=0.25, size=256, radius=4.0)
    (tmp_path / "tomo.raw").write_bytes(img.tobytes())
    kept = apply_tomo_mask(grid, tmp_path / "tomo.raw", 0.25)
    d = np.min(np.hypot(grid[:, 2:3] - sample[None, :, 3], grid[:, 3:4] - sample[None, :, 4]),
               axis=1)
    clear = np.abs(d - 4.0) > 0.4                         # farther than a pixel from the edge
    inside = {tuple(r) for r in np.round(kept[:, 2:4], 6)}
    expect = {tuple(r) for r in np.round(grid[clear & (d < 4.0)][:, 2:4], 6)}
    assert expect and expect <= inside
    outside = {tuple(r) for r in np.round(grid[clear & (d > 4.0)][:, 2:4], 6)}
    assert not (outside & inside)
    assert img.dtype == np.uint8 and img.shape == (256, 256)
