"""ParseMic's pixel maps (nfjax.maps) against a loop-by-loop transcription of ParseMic's
rules, closed-form misorientations, and the file layouts."""
from __future__ import annotations

import math
import subprocess
import sys
from collections import deque

import jax.numpy as jnp
import numpy as np
import pytest

from nfjax.crystal import symmetry_quaternions
from nfjax.errors import NfjaxError
from nfjax.io.mic import read_mic, write_binary_mic, write_text_mic
from nfjax.maps import (MAP_SUFFIXES, map_paths, map_symmetry, pixel_maps, read_map_file,
                        write_maps)
from nfjax.orientation import euler_to_quat, misorientation


def _pair_matrix(records: np.ndarray, space_group: int = 225) -> np.ndarray:
    """All pairwise MIDAS misorientations (rad), one value per unordered pair (the lower
    row first), as nfjax.maps documents."""
    q = euler_to_quat(jnp.asarray(records[:, 7:10]))
    m = np.asarray(misorientation(q[:, None, :], q[None, :, :],
                                  jnp.asarray(symmetry_quaternions(space_group))))
    return np.triu(m) + np.triu(m, 1).T


def _oracle(records: np.ndarray, edge: float, mis: np.ndarray, gb_deg: float):
    """ParseMic's loops, one pixel at a time (reference §6.6)."""
    n = len(records)
    valid = [i for i in range(n) if records[i, 10] != 0]
    xs = [records[i, 3] for i in valid]
    ys = [records[i, 4] for i in valid]
    min_x, max_x = min(xs) - (edge + 25), max(xs) + (edge + 25)
    min_y, max_y = min(ys) - (edge + 25), max(ys) + (edge + 25)
    nx = int(math.ceil(max_x) - math.floor(min_x) + 1)
    ny = int(math.ceil(max_y) - math.floor(min_y) + 1)
    owner = [-1] * (nx * ny)
    length = [0.0] * (nx * ny)
    start = int(-(edge + 5))            # C converts the double to an integer: truncation
    for i in valid:
        x, y = records[i, 3], records[i, 4]
        int_x, int_y = int(x), int(y)
        j = start
        while j <= edge + 5:
            pos_x = int(-min_x + (int_x + j))
            k = start
            while k <= edge + 5:
                pos_y = int(-min_y + (int_y + k))
                pos = pos_y * nx + pos_x
                d = math.sqrt((x - int_x + j) * (x - int_x + j)
                              + (y - int_y + k) * (y - int_y + k))
                if owner[pos] == -1 or d < length[pos]:
                    owner[pos] = i
                    length[pos] = d
                k += 1
            j += 1

    def neighbours(p):
        py, px = divmod(p, nx)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if (dy or dx) and 0 <= py + dy < ny and 0 <= px + dx < nx:
                    q = (py + dy) * nx + px + dx
                    if owner[q] != -1:
                        yield q

    kam = [0.0] * (nx * ny)
    for p in range(nx * ny):
        if owner[p] != -1:
            vals = [mis[owner[p], owner[q]] for q in neighbours(p)]
            kam[p] = sum(vals) / len(vals) if vals else 0.0
    grain = [0] * (nx * ny)
    label = 0
    limit = math.radians(gb_deg)
    for seed in range(nx * ny):
        if owner[seed] == -1 or grain[seed]:
            continue
        label += 1
        grain[seed] = label
        todo = deque([seed])
        while todo:
            p = todo.popleft()
            for q in neighbours(p):
                if not grain[q] and mis[owner[p], owner[q]] <= limit:
                    grain[q] = label
                    todo.append(q)
    best = {}
    for p in range(nx * ny):
        if owner[p] != -1:
            c = records[owner[p], 10]
            if grain[p] not in best or c > best[grain[p]][0]:
                best[grain[p]] = (c, owner[p])
    grod = [mis[owner[p], best[grain[p]][1]] if owner[p] != -1 else 0.0
            for p in range(nx * ny)]
    shape = (ny, nx)
    return dict(x_size=nx, y_size=ny, min_x=min_x, min_y=min_y,
                owner=np.array(owner).reshape(shape), distance=np.array(length).reshape(shape),
                kam=np.array(kam).reshape(shape), grain_id=np.array(grain).reshape(shape),
                grod=np.array(grod).reshape(shape), n_grains=label)


def _rotated_about_z(euler: np.ndarray, deg: float) -> np.ndarray:
    """Bunge angles of Rz(deg)·U: phi1 + deg."""
    out = np.array(euler, dtype=np.float64)
    out[..., 0] += math.radians(deg)
    return out


def _synthetic(seed: int = 3) -> np.ndarray:
    """~70 voxels on a jittered grid around the origin (negative and positive positions),
    three orientations (B 3 deg from A, C 30 deg from A) with scatter, holes, and one
    voxel duplicated at the same position (a tie the earlier record keeps)."""
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.arange(-4, 5) * 3.1, np.arange(-4, 4) * 2.7)
    x = gx.ravel() + rng.uniform(-0.6, 0.6, gx.size) - 0.3
    y = gy.ravel() + rng.uniform(-0.6, 0.6, gy.size) + 0.2
    a = np.array([0.4, 0.7, 1.1])
    eul = np.where((x < 0)[:, None], a, _rotated_about_z(a, 3.0))
    eul = np.where((y > 5)[:, None], _rotated_about_z(a, 30.0), eul)
    eul = eul + rng.normal(0, 0.003, eul.shape)
    rec = np.zeros((x.size, 11))
    rec[:, 0] = np.arange(x.size)
    rec[:, 3], rec[:, 4], rec[:, 5] = x, y, 1.3
    rec[:, 7:10] = eul
    rec[:, 10] = rng.uniform(0.3, 1.0, x.size)
    rec[[5, 17, 40], 10] = 0.0                       # holes
    dup = rec[20].copy()
    dup[7:10] = _rotated_about_z(dup[7:10], 40.0)
    return np.vstack([rec, dup])


def _assert_like_oracle(maps, ref):
    assert (maps.x_size, maps.y_size, maps.n_grains) == (ref["x_size"], ref["y_size"],
                                                         ref["n_grains"])
    assert (maps.min_x, maps.min_y) == (ref["min_x"], ref["min_y"])
    np.testing.assert_array_equal(maps.owner, ref["owner"])
    np.testing.assert_array_equal(maps.distance, ref["distance"])
    np.testing.assert_array_equal(maps.grain_id, ref["grain_id"])
    # Misorientations computed in batches of other shapes differ in the last bits, which
    # 2 acos(w) magnifies near w = 1 (by 1/sin(angle/2): ~1e-12 rad at 1e-4 rad).
    np.testing.assert_allclose(maps.kam, ref["kam"], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(maps.grod, ref["grod"], rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("gb, sg", [(5.0, 225), (2.0, 225), (35.0, 225), (5.0, 194),
                                    (25.0, 194)])
def test_pixel_maps_follow_parsemic_rules(gb, sg):
    rec = _synthetic()
    mis = _pair_matrix(rec, sg)
    maps = pixel_maps(rec, 1.3, gb_angle=gb, space_group=sg)
    ref = _oracle(rec, 1.3, mis, gb)
    _assert_like_oracle(maps, ref)
    assert maps.space_group == sg
    # The duplicated voxel (same position, later record) never owns a pixel.
    assert not np.any(maps.owner == len(rec) - 1) and np.any(maps.owner == 20)
    assert not np.isin(maps.owner, [5, 17, 40]).any()
    # At 5 deg the 3 deg boundary is inside a grain, the 30 deg one is not.
    if gb == 5.0:
        assert maps.grain_id[maps.owner == 0][0] == maps.grain_id[maps.owner == 8][0]


def test_pixel_maps_on_the_au_ground_truth():
    """A 24 x 24 um corner of MIDAS's Au example microstructure (Σ3 boundaries and scatter
    within the grains), against the same transcription."""
    from nfjax.data import au_example

    truth = read_mic(au_example()["mic"])
    rec = truth.records
    box = rec[(rec[:, 3] > 10) & (rec[:, 3] < 34) & (rec[:, 4] > -12) & (rec[:, 4] < 12)]
    mis = _pair_matrix(box)
    maps = pixel_maps(box, truth.tri_edge_size)
    ref = _oracle(box, truth.tri_edge_size, mis, 5.0)
    _assert_like_oracle(maps, ref)
    assert maps.n_grains >= 2
    assert np.degrees(maps.kam.max()) > 20            # a grain boundary runs through it


def _two_grains(confidence_right: float = 0.8):
    """Two grains of one orientation each on a 10 x 8 grid of 2.5 um voxels: the left
    (x < 0) and the right, 10 deg apart about the sample z; confidence 0.9 on the left,
    ``confidence_right`` on the right. Returns the records and the voxels' x."""
    gx, gy = np.meshgrid(np.arange(-5, 5) * 2.5, np.arange(-4, 4) * 2.5)
    x, y = gx.ravel() + 0.25, gy.ravel() + 0.25
    base = np.array([0.2, 0.9, 0.5])
    rec = np.zeros((x.size, 11))
    rec[:, 3], rec[:, 4], rec[:, 5] = x, y, 2.0
    rec[:, 7:10] = np.where((x < 0)[:, None], base, _rotated_about_z(base, 10.0))
    rec[:, 10] = np.where(x < 0, 0.9, confidence_right)
    return rec, x


def test_closed_form_kam_and_grod():
    """Two grains 10 deg apart about the sample z axis, each of one orientation: KAM is
    10 deg x the share of neighbours across the boundary, GROD 10 deg on the grain without
    the reference pixel when GBAngle joins them, 0 (to rounding) when it does not."""
    rec, x = _two_grains()
    rec[0, 10] = 0.95                                   # the reference: left grain
    ten = math.radians(10.0)
    joined = pixel_maps(rec, 2.0, gb_angle=12.0)
    right = joined.owner >= 0
    right[right] = x[joined.owner[right]] > 0
    assigned = joined.owner >= 0
    assert joined.n_grains == 1
    np.testing.assert_allclose(joined.grod[right], ten, atol=1e-7)
    np.testing.assert_allclose(joined.grod[assigned & ~right], 0.0, atol=1e-7)
    # KAM: count each pixel's assigned neighbours on the other side directly.
    side = np.where(assigned, right.astype(int), -1)
    pad = np.pad(side, 1, constant_values=-1)
    across = np.zeros(side.shape)
    total = np.zeros(side.shape)
    h, w = side.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                nb = pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                total += nb >= 0
                across += (nb >= 0) & (nb != side)
    expect = np.where(assigned & (total > 0), ten * across / np.maximum(total, 1), 0.0)
    np.testing.assert_allclose(joined.kam, expect, atol=1e-7)
    assert np.count_nonzero(across[assigned]) > 20
    split = pixel_maps(rec, 2.0, gb_angle=8.0)
    assert split.n_grains == 2
    np.testing.assert_array_equal(split.kam, joined.kam)
    np.testing.assert_allclose(split.grod[assigned], 0.0, atol=1e-7)
    # Raster order: the first pixel (bottom-left) is in the left grain.
    assert split.grain_id[assigned & ~right][0] == 1 and split.grain_id[right][0] == 2


def test_window_bounds_and_mirrored_distance():
    """ParseMic's window runs from trunc(-(edge + 5)) to edge + 5 and its distance is to the
    voxel mirrored about (trunc(x), trunc(y)): one voxel at (3.25, -2.75), edge 1.5."""
    rec = np.zeros((1, 11))
    rec[0, 3], rec[0, 4], rec[0, 5], rec[0, 10] = 3.25, -2.75, 1.5, 0.5
    maps = pixel_maps(rec, 1.5)
    assert maps.min_x == 3.25 - 26.5 and maps.min_y == -2.75 - 26.5
    assert (maps.x_size, maps.y_size) == (math.ceil(3.25 + 26.5) - math.floor(3.25 - 26.5) + 1,
                                          math.ceil(-2.75 + 26.5) - math.floor(-2.75 - 26.5) + 1)
    assert np.count_nonzero(maps.owner == 0) == 13 * 13       # j, k in -6..6
    ys, xs = np.nonzero(maps.owner == 0)
    # pixel posX = trunc(-minX + (trunc(x) + j)) for j = -6: trunc(23.25 + 3 - 6) = 20
    assert xs.min() == 20 and ys.min() == math.trunc(-maps.min_y + (-2 - 6))
    # distance at j = k = 0 (the pixel of trunc(x), trunc(y)): |(x - trunc x, y - trunc y)|
    px, py = math.trunc(-maps.min_x + 3), math.trunc(-maps.min_y - 2)
    assert maps.distance[py, px] == math.hypot(0.25, -0.75)
    # at j = 1, k = 0 ParseMic adds j where the true offset subtracts it: 0.25 + 1
    assert maps.distance[py, px + 1] == math.hypot(1.25, -0.75)
    assert maps.kam[py, px] == 0.0 or maps.kam[py, px] < 1e-7   # only itself around


def test_files_have_parsemic_layout(tmp_path):
    rec = _synthetic()
    maps = pixel_maps(rec, 1.3)
    paths = write_maps(tmp_path / "m.mic", maps, rec, phase_nr=2)
    assert paths == map_paths(tmp_path / "m.mic") == [tmp_path / f"m.mic{s}"
                                                       for s in MAP_SUFFIXES]
    size = maps.x_size * maps.y_size
    raw = np.fromfile(paths[0], dtype="<f8")
    assert raw.size == 4 + 7 * size
    np.testing.assert_array_equal(raw[:4], [maps.x_size, maps.y_size, maps.min_x, maps.min_y])
    planes = raw[4:].reshape(7, maps.y_size, maps.x_size)
    hit = maps.owner >= 0
    assert np.all(planes[:, ~hit] == -15.0)
    np.testing.assert_array_equal(planes[0][hit], rec[maps.owner[hit], 10])
    np.testing.assert_array_equal(planes[1][hit], rec[maps.owner[hit], 7])
    np.testing.assert_array_equal(planes[4][hit], rec[maps.owner[hit], 0])
    assert np.all(planes[5][hit] == 2.0)
    np.testing.assert_array_equal(planes[6][hit], maps.distance[hit])
    for path, plane in zip(paths[1:], (maps.kam, maps.grain_id, maps.grod)):
        head, body = read_map_file(path)
        np.testing.assert_array_equal(head, raw[:4])
        np.testing.assert_array_equal(body[0], plane)
        assert np.all(body[0][~hit] == 0)
    (tmp_path / "short.map").write_bytes(raw[:4 + size + 3].tobytes())
    with pytest.raises(NfjaxError, match=rf"short.map: {size + 3} values after the header "
                                         rf"are not whole planes of {maps.x_size} x "
                                         rf"{maps.y_size}"):
        read_map_file(tmp_path / "short.map")


def test_no_voxel_no_maps_and_bad_values():
    rec = _synthetic()
    rec[:, 10] = 0.0
    assert pixel_maps(rec, 1.3) is None
    with pytest.raises(NfjaxError, match="GBAngle"):
        pixel_maps(_synthetic(), 1.3, gb_angle=0.0)
    with pytest.raises(NfjaxError, match="expected \\(N, 11\\) mic records"):
        pixel_maps(np.zeros((3, 4)), 1.3)


def test_map_symmetry_prefers_sgnr():
    from nfjax.params import parse_params

    base = "LatticeParameter 2.95 2.95 4.68 90 90 120\nSpaceGroup 194\n"
    assert map_symmetry(parse_params(base, required=False)) == 194
    assert map_symmetry(parse_params(base + "SGNr 191\n", required=False)) == 191
    assert map_symmetry(None) == 225


def test_maps_cli_on_text_and_binary_mic(tmp_path):
    rec = _synthetic()
    rec[0, 5] = 1.3
    write_binary_mic(tmp_path / "a.bin", rec)
    write_text_mic(tmp_path / "a.mic", rec)
    cli = [sys.executable, "-m", "nfjax", "maps"]
    for name in ("a.bin", "a.mic"):
        run = subprocess.run(cli + [str(tmp_path / name), "--gb-angle", "35"],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert "grain(s) at GBAngle 35 deg (space group 225)" in run.stdout
    ref = pixel_maps(rec, 1.3, gb_angle=35.0)
    for suffix in MAP_SUFFIXES:
        head_bin, from_bin = read_map_file(tmp_path / f"a.bin{suffix}")
        head_text, from_text = read_map_file(tmp_path / f"a.mic{suffix}")
        # the text mic holds 6 decimals (%lf)
        np.testing.assert_allclose(head_bin, head_text, atol=1e-6)
        np.testing.assert_allclose(from_bin, from_text, atol=2e-6)
    np.testing.assert_array_equal(read_map_file(tmp_path / "a.mic.map.grainId")[1][0],
                                  ref.grain_id)
    run = subprocess.run(cli + [str(tmp_path / "a.mic"), "-o", str(tmp_path / "out" / "b")],
                         capture_output=True, text=True)
    assert run.returncode == 0 and (tmp_path / "out" / "b.map.grod").exists(), run.stderr
    empty = rec.copy()
    empty[:, 10] = 0
    write_binary_mic(tmp_path / "empty.bin", empty)
    run = subprocess.run(cli + [str(tmp_path / "empty.bin")], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip() == (f"nfjax: error: {tmp_path / 'empty.bin'}: no voxel has a "
                                  "nonzero confidence: there is nothing to map")
    assert not (tmp_path / "empty.bin.map").exists()


def test_maps_output_that_is_a_folder_is_refused(tmp_path, capsys):
    """``-o w/`` wrote the hidden files w/.map, w/.map.kam, ...; ``-o w`` with w a folder
    wrote w.map beside it. -o is the maps' base name: a folder is an error."""
    from nfjax.cli import main

    write_text_mic(tmp_path / "a.mic", _synthetic())
    (tmp_path / "w").mkdir()
    for out in (f"{tmp_path / 'w'}/", str(tmp_path / "w"), f"{tmp_path / 'new'}/"):
        assert main(["maps", str(tmp_path / "a.mic"), "-o", out]) == 2
        assert capsys.readouterr().err == (
            f"nfjax: error: -o {out}: expected the maps' base name (it writes BASE.map, "
            f"BASE.map.kam, ...), found a folder\n")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.mic", "w"]


def test_grain_boundary_at_exactly_gbangle_joins(monkeypatch):
    """ParseMic joins a neighbour whose misorientation is <= GBAngle: with the limit equal
    to the pair's misorientation to the last bit the grains join, one float below they do
    not."""
    import nfjax.maps

    rec, x = _two_grains()
    m = pixel_maps(rec, 2.0, gb_angle=12.0)
    right = (m.owner >= 0) & (x[np.maximum(m.owner, 0)] > 0)
    angle = float(m.grod[right][0])          # the one left-right misorientation, as used
    assert angle == pytest.approx(math.radians(10.0), abs=1e-7)
    limits = {1.0: angle, 2.0: float(np.nextafter(angle, -np.inf))}
    monkeypatch.setattr(nfjax.maps, "_gb_limit", lambda gb: limits[gb])
    assert pixel_maps(rec, 2.0, gb_angle=1.0).n_grains == 1
    assert pixel_maps(rec, 2.0, gb_angle=2.0).n_grains == 2


def test_grod_reference_is_the_first_most_confident_pixel():
    """Equal confidences everywhere: the grain's reference is its first pixel in raster
    order (the bottom-left corner, in the left grain), so the right grain carries the
    10 deg."""
    rec, x = _two_grains(confidence_right=0.9)
    m = pixel_maps(rec, 2.0, gb_angle=12.0)
    hit = m.owner >= 0
    right = hit & (x[np.maximum(m.owner, 0)] > 0)
    assert x[m.owner[hit][0]] < 0
    np.testing.assert_allclose(m.grod[right], math.radians(10.0), atol=1e-7)
    np.testing.assert_allclose(m.grod[hit & ~right], 0.0, atol=1e-7)


def test_components_match_breadth_first_search():
    """The union-find labelling against a plain BFS on random graphs (long chains and
    isolated nodes included): every node gets the smallest index of its component."""
    from nfjax.maps import _components

    rng = np.random.default_rng(7)
    for trial in range(30):
        n = int(rng.integers(2, 400))
        m = int(rng.integers(0, 2 * n))
        u = rng.integers(0, n, m)
        v = rng.integers(0, n, m)
        if trial % 3 == 0:                       # a shuffled chain: many hooking rounds
            order = rng.permutation(n)
            u, v = order[:-1], order[1:]
        assigned = rng.random(n) < 0.9
        keep = assigned[u] & assigned[v]
        u, v = u[keep], v[keep]
        got = _components(n, assigned, u.astype(np.int64), v.astype(np.int64))
        adj = [[] for _ in range(n)]
        for a, b in zip(u.tolist(), v.tolist()):
            adj[a].append(b)
            adj[b].append(a)
        want = np.full(n, -1)
        for s in range(n):
            if assigned[s] and want[s] < 0:
                want[s] = s
                todo = deque([s])
                while todo:
                    p = todo.popleft()
                    for q in adj[p]:
                        if want[q] < 0:
                            want[q] = s
                            todo.append(q)
        np.testing.assert_array_equal(got, want)


def test_bad_positions_headers_and_sizes(tmp_path, monkeypatch):
    rec = _synthetic()
    rec[3, 4] = np.nan
    with pytest.raises(NfjaxError, match=r"mic record 3: expected a finite X and Y \(µm\), "
                                         r"found .*, nan"):
        pixel_maps(rec, 1.3)
    for header in ([np.inf, 1, 0, 0, 0], [1e200, 1e200, 0, 0], [2.5, 2, 0, 0, 0, 0, 0, 0, 0]):
        (tmp_path / "bad.map").write_bytes(np.array(header, "<f8").tobytes())
        with pytest.raises(NfjaxError, match="the header's map size must be two whole "
                                             "numbers >= 1 that fit the"):
            read_map_file(tmp_path / "bad.map")
    import nfjax.maps

    monkeypatch.setattr(nfjax.maps, "host_available_bytes", lambda: 1 << 20)
    far = _synthetic()
    far[0, 3] = 9e5
    with pytest.raises(NfjaxError, match=r"the maps would be \d+ x \d+ pixels of 1 µm with a "
                                         r"13 x 13 pixel window per voxel \(edge 1.3 µm\), "
                                         r"about .* of memory where 1 MB is available: the "
                                         r"voxels span x .*\.\.900000"):
        pixel_maps(far, 1.3)


def test_crystal_symmetry_of_the_maps():
    """The right grain is the left one turned 90 deg about its crystal x axis: the same
    orientation for a cubic crystal (one grain, KAM ~0), 90 deg apart for a hexagonal one
    (two grains, 90 deg GROD on the grain without the reference)."""
    from nfjax.orientation import euler_to_matrix, matrix_to_euler

    rec, x = _two_grains()
    u = np.asarray(euler_to_matrix(jnp.asarray(rec[0, 7:10])))
    rx = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])
    rec[x > 0, 7:10] = np.asarray(matrix_to_euler(jnp.asarray(u @ rx)))
    cubic = pixel_maps(rec, 2.0, space_group=225, gb_angle=5.0)
    hexagonal = pixel_maps(rec, 2.0, space_group=194, gb_angle=5.0)
    assert cubic.n_grains == 1 and np.degrees(cubic.kam.max()) < 1e-3
    assert hexagonal.n_grains == 2
    joined = pixel_maps(rec, 2.0, space_group=194, gb_angle=95.0)
    right = (joined.owner >= 0) & (x[np.maximum(joined.owner, 0)] > 0)
    np.testing.assert_allclose(np.degrees(joined.grod[right]), 90.0, atol=1e-6)
