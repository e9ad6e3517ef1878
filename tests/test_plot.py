"""IPF colouring (closed forms, symmetry invariance) and the mic map PNG (nfjax.plot)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

pytest.importorskip("matplotlib")

from nfjax.plot import (FIGURE_DPI, FIGURE_SIZE_IN, ipf_color, ipf_color_directions,  # noqa: E402
                        ipf_reduce, plot_mic)

S2, S3 = math.sqrt(2.0), math.sqrt(3.0)


def test_cubic_corners_are_red_green_blue():
    d = np.array([[0, 0, 1], [1, 0, 1], [1, 1, 1]], dtype=float)
    np.testing.assert_allclose(ipf_color_directions(d, 225), np.eye(3), atol=1e-12)
    # Equivalent corners: [100], [0-11], [-1-1-1].
    d2 = np.array([[1, 0, 0], [0, -1, 1], [-1, -1, -1]], dtype=float)
    np.testing.assert_allclose(ipf_color_directions(d2, 225), np.eye(3), atol=1e-12)


def test_cubic_interior_matches_closed_form():
    # Inside z >= x >= y >= 0: weights (z - x, sqrt2 (x - y), sqrt3 y) over their maximum.
    rng = np.random.default_rng(3)
    v = np.abs(rng.normal(size=(200, 3)))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    a = np.sort(v, axis=1)
    x, y, z = a[:, 1], a[:, 0], a[:, 2]
    w = np.stack([z - x, S2 * (x - y), S3 * y], axis=1)
    expected = w / w.max(axis=1, keepdims=True)
    np.testing.assert_allclose(ipf_color_directions(v, 225), expected, atol=1e-12)


def test_hexagonal_corners_are_red_green_blue():
    # MIDAS crystal frame (x || a*): a1 = [2-1-10] lies at -30 deg, [10-10] = 2a1 + a2 along x.
    from nfjax.crystal import reciprocal_matrix

    real = np.linalg.inv(reciprocal_matrix([3.0, 3.0, 5.0, 90, 90, 120])).T   # columns a1 a2 a3
    a1, a2, c = real[:, 0], real[:, 1], real[:, 2]
    d = np.stack([c, 3 * a1, 2 * a1 + a2])       # [0001], [2-1-10], [10-10]
    np.testing.assert_allclose(ipf_color_directions(d, 194), np.eye(3), atol=1e-12)


def test_ipf_z_uses_the_crystal_direction_of_sample_z():
    # U = identity: sample z is crystal [001] -> red. U = 45 deg about x... [0 -1 1]/sqrt2 ~ [101].
    mats = np.stack([np.eye(3), Rotation.from_euler("x", 45, degrees=True).as_matrix(),
                     Rotation.from_rotvec(np.array([1, -1, 0]) / S2 * math.acos(1 / S3)).as_matrix()])
    np.testing.assert_allclose(ipf_color(mats, 225), np.eye(3), atol=1e-12)


@pytest.mark.parametrize("sg, group, axis", [
    (225, "O", "Z"), (194, "D6", "Z"), (100, "D4", "Z"), (20, "D2", "Z"), (80, "C4", "Z"),
    (170, "C6", "Z"), (146, "C3", "Z"), (149, "D3", "Z"), (200, "T", "Z"), (10, "C2", "Y"),
    (1, "C1", "Z"),
])
def test_symmetry_equivalent_orientations_get_the_same_colour(sg, group, axis):
    rng = np.random.default_rng(sg)
    u = Rotation.random(300, random_state=sg)
    ops = Rotation.create_group(group, axis=axis)
    pick = ops[rng.integers(0, len(ops), size=300)]
    base = ipf_color(u.as_matrix(), sg)
    moved = ipf_color((u * pick).as_matrix(), sg)     # U·S: the same crystal orientation
    np.testing.assert_allclose(moved, base, atol=1e-6)
    assert (base >= 0).all() and (base <= 1 + 1e-12).all()


@pytest.mark.parametrize("sg", [225, 194, 100, 1])
def test_reduced_directions_are_unit_and_fixed(sg):
    d = Rotation.random(100, random_state=1).apply([0, 0, 1])
    r = ipf_reduce(d, sg)
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(ipf_reduce(r, sg), r, atol=1e-12)
    assert (r[:, 2] >= -1e-12).all()


def test_au_map_png(midas_au, tmp_path):
    import matplotlib.image as mpimg

    from nfjax.io.grains import read_grains_csv
    from nfjax.io.mic import read_mic

    out = plot_mic(midas_au / "Au_txt.mic", tmp_path / "map.png", space_group=225,
                   boundary_deg=None)
    assert out == tmp_path / "map.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(out)
    assert img.shape[:2] == (round(FIGURE_SIZE_IN[1] * FIGURE_DPI),
                             round(FIGURE_SIZE_IN[0] * FIGURE_DPI))
    # The orientation panel is the left 38 % of the figure.
    left = img[:, : int(0.38 * img.shape[1]), :3].reshape(-1, 3)
    truth = read_grains_csv(midas_au / "grs.csv")
    colours = ipf_color(truth.matrices, 225)
    mic = read_mic(midas_au / "Au_txt.mic")
    # Pixels within 0.05 of each ground-truth grain's IPF colour, in the orientation panel.
    counts = (np.abs(left[:, None, :] - colours[None]).max(axis=2) < 0.05).sum(axis=0)
    # Grains 1 and 2 (1863 and 1585 voxels) dominate the map in their voxel proportion;
    # grain 4 (7 voxels, ~50 px each before antialiasing) is visible; grain 3 (1 voxel)
    # is 0.1 away from grain 1's blue.
    assert counts[0] > 50_000 and counts[1] > 40_000
    assert counts[0] / counts[1] == pytest.approx(1863 / 1585, rel=0.15)
    assert counts[3] > 7 * 20
    assert counts[2] > 10
    shown = colours[counts > 140]
    assert len(shown) == 3
    gaps = np.abs(shown[:, None] - shown[None]).max(axis=2) + np.eye(3)
    assert gaps.min() > 0.5          # three clearly distinct dominant colours
    assert len(mic) == 3456


def test_missing_mic_is_a_user_error(tmp_path):
    from nfjax.errors import NfjaxError

    with pytest.raises(NfjaxError):
        plot_mic(tmp_path / "none.mic", tmp_path / "x.png")


def test_cli_plot(midas_au, tmp_path, capsys):
    from nfjax.cli import main

    out = tmp_path / "m.png"
    assert main(["plot", str(midas_au / "Au_txt.mic"), "-o", str(out), "--space-group",
                 "225"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in capsys.readouterr().out


def test_without_matplotlib_the_error_names_the_extra(monkeypatch, tmp_path):
    import sys

    from nfjax.errors import NfjaxError

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(NfjaxError, match=r"pip install 'nfjax\[plot\]'"):
        plot_mic(tmp_path / "a.mic", tmp_path / "a.png")


@pytest.mark.parametrize("flags, message", [
    (["--min-confidence", "5"], "--min-confidence: expected a number between 0 and 1, "
                                "found 5.0"),
    (["--boundaries", "-5"], "--boundaries: expected a misorientation >= 0 degrees (0: no "
                             "lines), found -5.0")])
def test_plot_option_ranges(midas_au, tmp_path, capsys, flags, message):
    from nfjax.cli import main

    out = tmp_path / "m.png"
    assert main(["plot", str(midas_au / "Au_txt.mic"), "-o", str(out), *flags]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"nfjax: error: {message}"
    assert not out.exists()


def test_confidence_mask_and_boundaries(midas_au, tmp_path):
    """--min-confidence greys out the untrusted voxels of the orientation map; boundaries
    add black lines between grains (and none with --boundaries 0)."""
    import matplotlib.image as mpimg

    from nfjax.cli import main

    def panel(*extra):
        out = tmp_path / f"m{len(extra)}.png"
        assert main(["plot", str(midas_au / "Au_txt.mic"), "-o", str(out), *extra]) == 0
        img = mpimg.imread(out)[:, : int(0.38 * 1650), :3].reshape(-1, 3)
        grey = (np.abs(img - 0.6).max(axis=1) < 0.02).sum()
        black = (img.max(axis=1) < 0.15).sum()
        return grey, black

    grey0, black0 = panel("--boundaries", "0")
    grey1, black1 = panel("--min-confidence", "0.7", "--boundaries", "0")
    grey2, black2 = panel("--min-confidence", "0.7")
    # 1942 of 3456 voxels are below 0.7: more than half the map turns grey.
    assert grey0 < 1000 and grey1 > 60_000
    assert black1 == pytest.approx(black0, abs=200)        # text and ticks only
    assert black2 > black1 + 300                           # the boundary lines


def _small_mic(path):
    """A text mic of a 4 x 3 block of voxels, the last row a duplicate of the first at a
    different orientation (two voxels at one position)."""
    from nfjax.io.mic import write_text_mic

    rows = []
    for j in range(3):
        for i in range(4):
            rows.append([len(rows), 1, 0, 2.0 * i + (j % 2), 1.7 * j, 2.0, 1, 0.1, 0.2, 0.3, 0.9])
    rows.append(rows[0][:7] + [1.1, 0.9, 0.5, 0.8])
    write_text_mic(path, np.array(rows))
    return path


def test_duplicate_positions_draw_no_boundary_and_no_warning(tmp_path):
    import warnings

    from nfjax.io.mic import read_mic
    from nfjax.plot import grain_boundaries

    rec = read_mic(_small_mic(tmp_path / "dup.mic")).records
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        segments = grain_boundaries(rec, 2.0, 225, 5.0)
    assert np.isfinite(segments).all()


def test_output_format_follows_the_suffix(tmp_path, capsys):
    from nfjax.cli import main

    mic = _small_mic(tmp_path / "m.mic")
    assert main(["plot", str(mic), "-o", str(tmp_path / "m.jpg")]) == 0
    assert (tmp_path / "m.jpg").read_bytes()[:3] == b"\xff\xd8\xff"       # JPEG
    assert main(["plot", str(mic), "-o", str(tmp_path / "m.svg")]) == 0
    assert b"<svg" in (tmp_path / "m.svg").read_bytes()[:1000]
    capsys.readouterr()
    assert main(["plot", str(mic), "-o", str(tmp_path / "m.xyz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nfjax: error: {tmp_path / 'm.xyz'}: cannot write a '.xyz' image; "
                          "expected a file name ending in one of ")
    assert ".png" in err and err.count("\n") == 1
    assert not (tmp_path / "m.xyz").exists()


# --------------------------------------------------------------------------- map panels
def _two_grain_mic(path, confidence_right=0.8):
    """A text mic of two grains on a 10 x 8 grid of 2.5 um voxels (edge 2 um): x < 0 at
    Euler (0.2, 0.9, 0.5) rad, x > 0 with Euler1 0.3 rad more (17 deg apart); confidence
    0.9 on the left, ``confidence_right`` on the right."""
    from nfjax.io.mic import write_text_mic

    gx, gy = np.meshgrid(np.arange(-5, 5) * 2.5, np.arange(-4, 4) * 2.5)
    x, y = gx.ravel() + 0.25, gy.ravel() + 0.25
    rec = np.zeros((x.size, 11))
    rec[:, 0] = np.arange(x.size)
    rec[:, 3], rec[:, 4], rec[:, 5], rec[:, 6] = x, y, 2.0, 1.0
    rec[:, 7:10] = np.where((x < 0)[:, None], [0.2, 0.9, 0.5], [0.5, 0.9, 0.5])
    rec[:, 10] = np.where(x < 0, 0.9, confidence_right)
    write_text_mic(path, rec)
    return path, x, y


def _panel_axes(fig, start):
    return [ax for ax in fig.axes if ax.get_title().startswith(start)]


def test_pixel_panels_draw_parsemics_maps(tmp_path):
    """The kam, grains and grod panels draw pixel_maps' arrays unchanged, on 1 um pixels
    centred where ParseMic's window puts them: a voxel at x reaches the pixels trunc(x) + j
    for j = -7..7 (edge 2 um + 5), so the leftmost drawn pixel is centred at
    trunc(min x) - 7."""
    from nfjax.io.mic import read_mic
    from nfjax.maps import pixel_maps
    from nfjax.plot import grain_colors, mic_figure

    path, x, y = _two_grain_mic(tmp_path / "two.mic")
    fig = mic_figure(path, 225, panels=("kam", "grains", "grod"))
    maps = pixel_maps(read_mic(path).records, 2.0, space_group=225, gb_angle=5.0)
    hit = maps.owner >= 0
    assert maps.n_grains == 2
    # (a square grid of pitch 2.5 um: drawn with the edge of a tiling of that pitch)
    assert fig.get_suptitle() == "two.mic: 80 voxels, drawn as triangles of edge 4.33 µm"

    (kam_ax,) = _panel_axes(fig, "Kernel average")
    (grain_ax,) = _panel_axes(fig, "2 grains (neighbours within 5°)")
    (grod_ax,) = _panel_axes(fig, "Grain reference")
    for ax, values in ((kam_ax, maps.kam), (grod_ax, maps.grod)):
        im = ax.images[0]
        np.testing.assert_array_equal(np.ma.getmaskarray(im.get_array()), ~hit)
        np.testing.assert_allclose(im.get_array()[hit], np.degrees(values[hit]), rtol=1e-12)
        assert im.get_clim() == (0.0, 5.0)
    assert np.degrees(maps.kam).max() > 5.0            # the boundary saturates the scale
    rgba = grain_ax.images[0].get_array()
    np.testing.assert_array_equal(rgba[..., 3], hit.astype(float))
    np.testing.assert_allclose(rgba[hit][:, :3], grain_colors(maps.grain_id[hit]))

    for ax in (kam_ax, grain_ax, grod_ax):
        x0, x1, y0, y1 = ax.images[0].get_extent()
        assert (x1 - x0, y1 - y0) == (maps.x_size, maps.y_size)     # 1 um pixels
        cols = np.flatnonzero(hit.any(axis=0))
        rows = np.flatnonzero(hit.any(axis=1))
        assert x0 + 0.5 + cols[0] == math.trunc(x.min()) - 7
        assert x0 + 0.5 + cols[-1] == math.trunc(x.max()) + 7
        assert y0 + 0.5 + rows[0] == math.trunc(y.min()) - 7
        assert y0 + 0.5 + rows[-1] == math.trunc(y.max()) + 7


def test_pixel_panels_use_only_trusted_voxels(tmp_path):
    """--min-confidence drops the voxels below it from the pixel maps (not only greys them):
    with the right grain at 0.3, the grains panel at 0.5 has one grain, on the left."""
    from nfjax.errors import NfjaxError
    from nfjax.io.mic import read_mic
    from nfjax.plot import mic_figure

    path, x, _ = _two_grain_mic(tmp_path / "two.mic", confidence_right=0.3)
    fig = mic_figure(path, 225, min_confidence=0.5, panels=("grains",))
    (ax,) = _panel_axes(fig, "1 grain (neighbours within 5°)")
    x0 = ax.images[0].get_extent()[0]
    cols = np.flatnonzero(ax.images[0].get_array()[..., 3].any(axis=0))
    assert x0 + 0.5 + cols[-1] == math.trunc(x[x < 0].max()) + 7
    assert len(_panel_axes(mic_figure(read_mic(path), 225, panels="grains"), "2 grains")) == 1
    with pytest.raises(NfjaxError, match=r"no voxel has a confidence >= 0.95: the KAM"):
        mic_figure(path, 225, min_confidence=0.95, panels=("kam",))


def test_grain_colors_tell_neighbouring_labels_apart():
    from nfjax.plot import grain_colors

    rgb = grain_colors(np.arange(0, 200).reshape(10, 20))
    assert rgb.shape == (10, 20, 3)
    flat = rgb.reshape(-1, 3)
    np.testing.assert_array_equal(flat[0], [0.85, 0.85, 0.85])          # no grain
    assert ((flat >= 0) & (flat <= 1)).all()
    step = np.abs(flat[2:] - flat[1:-1]).max(axis=1)                    # labels k, k+1
    assert step.min() > 0.2


def test_au_grain_panel_png(midas_au, tmp_path, capsys):
    """nfjax plot --panels grains on the Au mic: the one-panel figure keeps its size, and
    the panel shows the two big grains in their colours, in the proportion of their pixels;
    each further panel widens the figure by the same amount."""
    import matplotlib.image as mpimg

    from nfjax.cli import main
    from nfjax.io.mic import read_mic
    from nfjax.maps import pixel_maps
    from nfjax.plot import grain_colors

    mic = midas_au / "Au_txt.mic"
    out = tmp_path / "g.png"
    assert main(["plot", str(mic), "-o", str(out), "--panels", "grains"]) == 0
    assert "orientation map and grains ->" in capsys.readouterr().out
    img = mpimg.imread(out)
    assert img.shape[:2] == (704, 1650)
    right = img[:, int(0.55 * 1650):, :3].reshape(-1, 3)
    maps = pixel_maps(read_mic(mic).records, read_mic(mic).map_edge, gb_angle=5.0)
    sizes = np.bincount(maps.grain_id.ravel())[1:]
    big = np.argsort(sizes)[::-1][:2] + 1
    drawn = [(np.abs(right - c).max(axis=1) < 0.02).sum() for c in grain_colors(big)]
    assert min(drawn) > 20_000
    assert drawn[0] / drawn[1] == pytest.approx(sizes[big[0] - 1] / sizes[big[1] - 1],
                                                rel=0.1)
    widths = []
    for panels in ("confidence", "confidence,kam", "confidence,kam,grod"):
        assert main(["plot", str(mic), "-o", str(out), "--panels", panels]) == 0
        widths.append(mpimg.imread(out).shape[1])
    assert widths[0] == 1650 and widths[1] > 2300
    assert abs((widths[2] - widths[1]) - (widths[1] - widths[0])) <= 1


@pytest.mark.parametrize("value", ["kam,,x", "kam,kam", "KAM", ""])
def test_panels_option_errors(tmp_path, capsys, value):
    from nfjax.cli import main
    from nfjax.errors import NfjaxError

    path, _, _ = _two_grain_mic(tmp_path / "two.mic")
    out = tmp_path / "m.png"
    with pytest.raises(SystemExit) as info:
        main(["plot", str(path), "-o", str(out), "--panels", value])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"nfjax plot: error: argument --panels: expected one or more of confidence, kam, "
        f"grains, grod, separated by commas and each at most once, found {value!r} "
        f"(see nfjax plot --help)")
    assert not out.exists()
    with pytest.raises(NfjaxError, match="--panels: expected one or more"):
        plot_mic(path, out, panels=value.split(","))
