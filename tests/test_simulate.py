"""Synthetic microstructures (nfjax.simulate.voronoi_microstructure) and the grain-boundary
segments drawn on maps (nfjax.plot.grain_boundaries), against brute-force oracles."""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp
import pytest

from conftest import MIDAS_AU, need
from nfjax.crystal import symmetry_quaternions
from nfjax.io.grains import read_grains_csv
from nfjax.io.mic import read_mic
from nfjax.orientation import euler_to_matrix_midas, euler_to_quat, matrix_to_quat, misorientation
from nfjax.simulate import voronoi_microstructure


@pytest.fixture(scope="module")
def au_sample():
    need(MIDAS_AU)
    rec = read_mic(MIDAS_AU / "Au_txt.mic").records
    return rec[rec[:, 10] >= 0.7], read_grains_csv(MIDAS_AU / "grs.csv")


def test_voronoi_cells_and_orientations(au_sample):
    rec, grains = au_sample
    exact, label = voronoi_microstructure(rec, grains, spread_deg=0.0)
    # Labels: the nearest grain centre, by a plain loop.
    for i in range(0, len(rec), 37):
        d = [np.hypot(rec[i, 3] - p[0], rec[i, 4] - p[1]) for p in grains.positions]
        assert label[i] == int(np.argmin(d))
    assert sorted(np.bincount(label, minlength=4)) == [80, 269, 291, 874]
    np.testing.assert_allclose(np.asarray(euler_to_matrix_midas(jnp.asarray(exact[:, 7:10]))),
                               grains.matrices[label], atol=1e-12)
    np.testing.assert_array_equal(exact[:, :7], rec[:, :7])
    assert np.all(exact[:, 10] == 1.0)
    # With a spread: misorientation to the grain is |N(0, 0.05 deg)|.
    spread, label2 = voronoi_microstructure(rec, grains, spread_deg=0.05, seed=3)
    np.testing.assert_array_equal(label2, label)
    sym = jnp.asarray(symmetry_quaternions(225))
    ang = np.degrees(np.asarray(misorientation(
        euler_to_quat(jnp.asarray(spread[:, 7:10])),
        matrix_to_quat(jnp.asarray(grains.matrices[label])), sym)))
    assert ang.mean() == pytest.approx(0.05 * np.sqrt(2 / np.pi), rel=0.1)
    assert ang.max() < 0.3


def test_grain_boundaries_are_the_edges_between_grains(au_sample):
    from nfjax.plot import grain_boundaries

    rec, grains = au_sample
    micro, label = voronoi_microstructure(rec, grains, spread_deg=0.05, seed=1)
    edge = 2.5
    seg = grain_boundaries(micro, edge, 225, 5.0)
    # Oracle: every pair of edge-sharing triangles (centroids edge/sqrt3 apart) in
    # different grains; the grains are > 5 deg apart, the spread within one is < 0.3 deg.
    xy = rec[:, 3:5]
    d = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
    i, j = np.nonzero(np.triu(np.abs(d - edge / np.sqrt(3)) < 0.05, 1))
    cross = label[i] != label[j]
    assert cross.sum() > 50
    want = np.sort(0.5 * (xy[i[cross]] + xy[j[cross]]), axis=0)
    got = np.sort(seg.mean(axis=1), axis=0)
    np.testing.assert_allclose(got, want, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(seg[:, 1] - seg[:, 0], axis=1), edge)
    assert len(grain_boundaries(micro, edge, 225, 90.0)) == 0


def test_empty_inputs_are_errors(au_sample):
    from nfjax.errors import NfjaxError

    rec, grains = au_sample
    with pytest.raises(NfjaxError, match="the mic has no voxel"):
        voronoi_microstructure(rec[:0], grains)


def test_simulate_mic_without_voxels_says_so(tmp_path):
    import types

    from nfjax.errors import NfjaxError
    from nfjax.simulate import simulate_mic

    empty = tmp_path / "empty.mic"
    empty.write_text("%TriEdgeSize 1.000000\n%NumPhases 1\n%GlobalPosition 0.000000\n")
    with pytest.raises(NfjaxError, match=rf"^{empty}: expected voxel rows, found none"):
        simulate_mic(types.SimpleNamespace(min_confidence=0.7), empty)


def test_grid_cell_is_the_triangle_edge():
    """The bundled Au mic's voxels sit on a 2.5 um grid although its TriEdgeSize column
    says 1 (the probe); holes in the map do not change the answer."""
    from nfjax.data import au_example
    from nfjax.errors import NfjaxError
    from nfjax.simulate import grid_cell

    rec = read_mic(au_example()["mic"]).records
    assert np.all(rec[:, 5] == 1.0)
    assert grid_cell(rec) == pytest.approx(2.5, abs=1e-9)
    holes = rec[np.random.default_rng(1).random(len(rec)) > 0.3]
    assert grid_cell(holes) == pytest.approx(2.5, abs=1e-9)
    half = rec.copy()
    half[:, 3:5] /= 2
    assert grid_cell(half) == pytest.approx(1.25, abs=1e-9)
    with pytest.raises(NfjaxError, match="no two voxels share a row"):
        grid_cell(rec[:1])


def test_whole_map_counts_are_the_rendered_pixels(au_window):
    """WholeMap.score against an independent count: render_bits (every spot rendered,
    numpy's unique) intersected with the observed bits, at the simulating geometry
    (everything matches) and with the beam centre and Lsd moved; chunked or not, and
    at the bit-index level (predicted, observed and both pixels)."""
    import dataclasses

    from nfjax.observe import lit_indices
    from nfjax.simulate import WholeMap, mic_grid_rows, render_bits
    from nfjax.grid import triangle_vertices

    w = au_window
    geom, rec, table = w["geom"], w["records"], w["table"]
    observed = lit_indices(w["vol"])
    obs = w["vol"].to_device()
    whole = WholeMap(rec, table.g, table.theta, obs, geom)
    chunked = WholeMap(rec, table.g, table.theta, obs, geom, max_memory=2_000_000)
    assert whole.cell == pytest.approx(2.5) and chunked._chunk < len(rec) <= whole._chunk
    s = whole.score(geom)
    assert (s.predicted, s.observed, s.both) == (observed.size,) * 3 and s.iou == 1.0
    solid = rec.copy()
    solid[:, 5] = 2.5
    verts = triangle_vertices(mic_grid_rows(solid))
    moved = dataclasses.replace(geom, ybc=geom.ybc + jnp.array([0.4, -0.3]),
                                lsd=geom.lsd + jnp.array([3.0, 3.0]))
    bits = render_bits(solid[:, 7:10], verts, table.g, table.theta, moved, edge_length=2.5,
                       progress=False)
    both = np.intersect1d(bits, observed).size
    assert 0 < both < bits.size
    for wm in (whole, chunked):
        s = wm.score(moved)
        assert (s.predicted, s.observed, s.both) == (bits.size, observed.size, both)
        assert s.iou == pytest.approx(both / (bits.size + observed.size - both))


def test_cli_score(au_window, tmp_path, capsys):
    """nfjax score: the window's mic against its own solid observations explains every lit
    pixel; with every voxel turned (phi1 + 0.1 deg) the printed counts are those of an
    independent render (render_bits, every spot) intersected with the observed bits."""
    from nfjax.cli import main
    from nfjax.grid import triangle_vertices
    from nfjax.io.mic import write_text_mic
    from nfjax.observe import lit_indices, write_spots_info
    from nfjax.params import update_param_text
    from nfjax.simulate import mic_grid_rows, render_bits

    w = au_window
    src = tmp_path / "ps.txt"
    src.write_text(update_param_text(w["text"], {"OutputDirectory": str(tmp_path)}))
    write_spots_info(tmp_path / "SpotsInfo.bin", w["vol"])
    observed = lit_indices(w["vol"])
    n = len(w["records"])
    write_text_mic(tmp_path / "map.mic", w["records"])
    assert main(["score", str(src), str(tmp_path / "map.mic")]) == 0
    k = observed.size
    assert capsys.readouterr().out == (
        f"{tmp_path / 'map.mic'}: {n} of {n} voxels as 2.5 um triangles against "
        f"{tmp_path / 'SpotsInfo.bin'}: {k} predicted, {k} observed, {k} both lit pixels; "
        f"precision 1.0000, recall 1.0000, intersection over union 1.0000\n")
    turned = w["records"].copy()
    turned[:, 7] += np.radians(0.1)
    write_text_mic(tmp_path / "turned.mic", turned)
    solid = read_mic(tmp_path / "turned.mic").records     # as the command reads it (%lf)
    solid[:, 5] = 2.5
    bits = render_bits(solid[:, 7:10], triangle_vertices(mic_grid_rows(solid)), w["table"].g,
                       w["table"].theta, w["geom"], edge_length=2.5, progress=False)
    both = np.intersect1d(bits, observed).size
    assert both < 0.9 * k
    assert main(["score", str(src), str(tmp_path / "turned.mic"), "--cell", "2.5"]) == 0
    out = capsys.readouterr().out
    assert f": {bits.size} predicted, {k} observed, {both} both lit pixels; " in out
    assert out.endswith(f"intersection over union {both / (bits.size + k - both):.4f}\n")
    assert main(["score", str(src), str(tmp_path / "map.mic"), "--cell", "0"]) == 2
    assert capsys.readouterr().err == ("nfjax: error: --cell 0.0: expected a positive edge "
                                       "length in um\n")
    # a mic whose grid edge cannot be inferred is named
    write_text_mic(tmp_path / "one.mic", w["records"][:1])
    assert main(["score", str(src), str(tmp_path / "one.mic")]) == 2
    assert capsys.readouterr().err == (
        f"nfjax: error: {tmp_path / 'one.mic'}: cannot tell the grid's edge length from the "
        f"mic: no two voxels share a row (give it: --cell E on the command line, cell= in "
        f"Python)\n")
    # a cell wider than the detector (2048 pixels of 1.48 um) was rendered: 1e9 aborted the
    # process inside XLA, 1e5 was killed for memory
    assert main(["score", str(src), str(tmp_path / "map.mic"), "--cell", "1e5"]) == 2
    assert capsys.readouterr().err == (
        "nfjax: error: a grid cell of 100000 um is wider than the detector (2048 pixels of "
        "1.48 um): expected the grid's triangle edge in um\n")
