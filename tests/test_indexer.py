"""nfjax.indexer against the reference's acceptance tests (ffbidx-indexer.md §13.1, §13.2).

Independent references: the perfect lattices of test0-2 (closed-form raw score
2^(1/90)·0.101 − 0.1 − 91), the gold cell of the image files with the §2.5 lattice criterion,
the upstream C++ test criteria, brute-force NumPy score tables, and a float64 NumPy
transcription of ifssr (§9.3).
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import jax

from nfjax.errors import NfjaxError
from nfjax.indexer import Indexer, crystals, read_simple_data
from nfjax.indexer import api, core
from nfjax.indexer.ffbidx import ffbidx_impl
from indexer_helpers import GOLD, cell_of, lattice_match, n_within

IMAGES = [f"image{i}_{finder}" for finder in ("local", "peakfinder8", "radial") for i in range(5)]
PERFECT = ["test0", "test1", "test2"]


@pytest.fixture(scope="module")
def ix():
    return Indexer()


@pytest.fixture(scope="module")
def data(request):
    from conftest import FFBIDX, need

    need(FFBIDX)
    return {p.stem: read_simple_data(p) for p in sorted(FFBIDX.glob("*.txt"))}


# --------------------------------------------------------------------------- §13.2 item 1
@pytest.mark.parametrize("name", PERFECT)
def test_perfect_lattice_raw(ix, data, name):
    d = data[name]
    cells, scores = ix.run(d.spots, d.cell, method="raw")
    assert cells.shape == (3, 96) and cells.dtype == np.float32 and cells.flags.c_contiguous
    assert scores.shape == (32,) and scores.dtype == np.float32
    # closed form with Q1: every spot trimmed to triml, all 90 close
    expected = np.float32(2.0 ** (1.0 / 90.0) * 0.101 - 0.1 - 91.0)
    assert abs(scores[0] - expected) < 1e-4
    assert abs(scores[0] - (-90.99822)) < 1e-4
    assert np.all(np.diff(scores) >= 0)
    dev, det, _ = lattice_match(cell_of(cells, 0), d.cell_rows.astype(np.float64))
    assert dev < 1e-3 and round(det) == 1


@pytest.mark.parametrize("method", ["ifss", "ifse", "ifssr"])
@pytest.mark.parametrize("name", PERFECT)
def test_perfect_lattice_refined(ix, data, name, method):
    d = data[name]
    cells, scores = ix.run(d.spots, d.cell, method=method)
    best = int(np.argmin(scores))
    dev, det, _ = lattice_match(cell_of(cells, best), d.cell_rows.astype(np.float64))
    assert dev < 1e-3 and round(det) == 1


# --------------------------------------------------------------------------- §13.2 item 2
@pytest.fixture(scope="module")
def image_results(ix, data):
    out = {}
    for name in IMAGES:
        d = data[name]
        cells, scores = ix.run(d.spots, d.cell)
        out[name] = (cells, scores, ix.crystals(cells, d.spots, scores))
    return out


@pytest.mark.parametrize("name", IMAGES)
def test_image_ifssr_gold(image_results, name):
    cells, scores, found = image_results[name]
    best = int(np.argmin(scores))
    dev, det, mis = lattice_match(cell_of(cells, best), GOLD)
    assert round(det) == 1 and dev < 0.05, (dev, det)
    assert mis < 2.0
    assert scores[best] < 0.00075
    assert found is not None and found.dtype == np.uint32
    assert scores[found[0]] == scores[best]


@pytest.mark.parametrize("finder", ["local", "radial"])
def test_image_spot_criterion(image_results, data, finder):
    # §2.5 item 3: ≥100 local spots within 0.1 (radial finds more spots: same bound)
    for i in range(5):
        name = f"image{i}_{finder}"
        cells, scores, _ = image_results[name]
        best = cell_of(cells, int(np.argmin(scores)))
        assert n_within(best, data[name].spots.T, 0.1) >= 100


# --------------------------------------------------------------------------- §13.1 upstream tests
def test_upstream_index_file_0(data):
    """test_indexer.cpp: C++ defaults (200 spots, 1 cell, non-redundant, dist1 0.2), raw."""
    d = data["image0_local"]
    assert d.spots.shape == (3, 297)           # read_file_0: exactly 297 spots
    with Indexer(1, 1, 200, 32, False) as small:
        cells, scores = small.run(d.spots, d.cell, method="raw", dist1=0.2, dist3=0.15)
    assert scores.shape == (1,) and scores[0] <= -100
    assert n_within(cell_of(cells, 0), d.spots.T, 0.1) >= 100


def test_upstream_capi_index_file_0(data):
    """test_capi.cpp: same config + ifssr 0.8/0.00075/8/32 over all 297 spots."""
    d = data["image0_local"]
    handle = ffbidx_impl.indexer(1, 1, 200, 32, False)
    try:
        cells, scores = ffbidx_impl.index(handle, d.spots, d.cell, "ifssr", dist1=0.2,
                                          dist3=0.15, contraction=.8, max_dist=.00075,
                                          min_spots=8, n_iter=32)
    finally:
        ffbidx_impl.release(handle)
    assert scores[0] <= 0.00075
    assert n_within(cell_of(cells, 0), d.spots.T, 0.02) >= 20


# --------------------------------------------------------------------------- §13.2 item 4
def test_layouts_equivalent(ix, data):
    d = data["image1_local"]
    c1, s1 = ix.run(d.spots, d.cell, method="raw")
    spots_f = np.asfortranarray(d.spots.T)                      # (K, 3) F order
    cell_f = np.asfortranarray(d.cell.T)                        # (3M, 3) F order: rows = vectors
    assert spots_f.shape == (298, 3) and not spots_f.flags.c_contiguous
    c2, s2 = ix.run(spots_f, cell_f, method="raw")
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(s1, s2)


def test_layout_errors(ix, data):
    d = data["image1_local"]
    with pytest.raises(RuntimeError, match=r"^only shape \(3, -1\) CARRAY spot data is supported$"):
        ix.run(np.ascontiguousarray(d.spots.T), d.cell)
    with pytest.raises(RuntimeError, match="^only float32 spot data is supported$"):
        ix.run(d.spots.astype(np.float64), d.cell)
    with pytest.raises(RuntimeError, match="^only float32 input cell data is supported$"):
        ix.run(d.spots, d.cell.astype(np.float64))
    with pytest.raises(RuntimeError, match="^spots array must be 2 dimensional$"):
        ix.run(d.spots.ravel(), d.cell)
    with pytest.raises(RuntimeError, match="^only NPY_ARRAY_CARRAY or NPY_ARRAY_FARRAY spot data"):
        ix.run(np.zeros((3, 20), np.float32)[:, ::2], d.cell)
    with pytest.raises(RuntimeError, match=r"^only shape \(-1, 3\) FARRAY spot data is supported$"):
        ix.run(np.asfortranarray(np.zeros((4, 5), np.float32)), d.cell)
    with pytest.raises(RuntimeError, match="^no spots$"):
        ix.run(np.zeros((3, 0), np.float32), d.cell)
    with pytest.raises(RuntimeError, match="^incomplete CARRAY input cell data$"):
        ix.run(d.spots, np.zeros((3, 4), np.float32))
    with pytest.raises(RuntimeError, match="^incomplete FARRAY input cell data$"):
        ix.run(d.spots, np.asfortranarray(np.zeros((4, 3), np.float32)))
    with pytest.raises(RuntimeError, match=r"^only shape \(3, -1\) CARRAY input cell data"):
        ix.run(d.spots, np.zeros((4, 6), np.float32))
    with pytest.raises(RuntimeError, match="^only NPY_ARRAY_CARRAY or NPY_ARRAY_FARRAY data is"):
        ix.run(d.spots, np.zeros((3, 12), np.float32)[:, ::2])
    with pytest.raises(RuntimeError, match="^no input cells$"):
        ix.run(d.spots, np.zeros((3, 0), np.float32))
    with pytest.raises(TypeError):
        ix.run(d.spots.tolist(), d.cell)
    # the exceptions are also nfjax user errors
    with pytest.raises(NfjaxError):
        ix.run(d.spots.astype(np.float64), d.cell)


def test_three_spot_c_array_is_read_by_columns():
    rows = np.array([[0.1, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 0.3]], np.float32)
    arr = np.ascontiguousarray(rows.T)                          # (3, 3) C: columns = spots
    from nfjax.indexer.layouts import spots_rows

    np.testing.assert_array_equal(spots_rows(arr), rows)
    np.testing.assert_array_equal(spots_rows(np.asfortranarray(rows)), rows)


# --------------------------------------------------------------------------- §13.2 item 5
RUN_VALUE_ERRORS = [
    (dict(method="fast"), "method must be either raw, ifss, ifse, od ifssr"),
    (dict(triml=-0.1), "lower trim value < 0"),
    (dict(trimh=0.6), "higher trim value > 0.5"),
    (dict(triml=0.4, trimh=0.3), "lower trim value > higher trim value"),
    (dict(delta=-0.001), "delta + triml <= 0"),
    (dict(vr_min_spots=3), "vr_min_spots value too low"),
    (dict(num_halfsphere_points=-1), "num_halfsphere_points out of bounds for an unsigned integer"),
    (dict(num_angle_points=2**32), "num_angle_points out of bounds for an unsigned integer"),
    (dict(n_output_cells=-5), "n_output_cells out of bounds for an unsigned integer"),
    (dict(contraction=0.0), "contraction parameter <= 0"),
    (dict(max_dist=0.0), "max distance parameter <= 0"),
    (dict(contraction=1.0), "contraction parameter >= 1"),
    (dict(min_spots=3), "min_spots outside of [4..max_uint]"),
    (dict(n_iter=-1), "n_iter out of bounds for an unsigned integer"),
    # nfjax additions (upstream: StopIteration-like failures or silently changed results)
    (dict(length_threshold=0.0), "length_threshold <= 0"),
    (dict(length_threshold=-1.0), "length_threshold <= 0"),
    (dict(trimh=float("nan")), "trimh is not a number (nan)"),
    (dict(max_dist=float("nan")), "max_dist is not a number (nan)"),
]


@pytest.mark.parametrize("kwargs,message", RUN_VALUE_ERRORS)
def test_run_value_errors(ix, kwargs, message):
    spots = np.zeros((3, 10), np.float32)
    cell = np.eye(3, dtype=np.float32) * 30
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ix.run(spots, cell, **kwargs)


RUN_RUNTIME_ERRORS = [
    (dict(), dict(num_halfsphere_points=16), "fewer halfsphere sample points than required "
                                             "candidate vectors"),
    (dict(), dict(num_angle_points=8), "fewer angle sample points than required candidate cells"),
    (dict(), dict(delta=-0.0005), "nonpositive delta value in runtime configuration"),
    (dict(), dict(triml=0.3, trimh=0.3), "lower trim value bigger than higher trim value"),
    (dict(max_output_cells=0), dict(), "no output cells"),
    (dict(max_input_cells=0), dict(), "no given input cells"),
    (dict(max_spots=0), dict(), "no spots"),
    (dict(max_output_cells=2000), dict(n_output_cells=1500),
     "fewer threads in a block than output cells"),
]


@pytest.mark.parametrize("ctor,kwargs,message", RUN_RUNTIME_ERRORS)
def test_run_runtime_errors(ctor, kwargs, message):
    spots = np.zeros((3, 10), np.float32)
    cell = np.eye(3, dtype=np.float32) * 30
    with Indexer(**ctor) as small, pytest.raises(RuntimeError, match=f"^{message}$"):
        small.run(spots, cell, **kwargs)


def test_constructor_and_handle_errors():
    with pytest.raises(ValueError, match="^max_spots out of bounds for an unsigned integer$"):
        Indexer(max_spots=-1)
    with pytest.raises(RuntimeError, match="^nonpositive number of candidate vectors$"):
        Indexer(num_candidate_vectors=0)
    with pytest.raises(RuntimeError, match="^fewer threads in a block than candidate vectors$"):
        Indexer(num_candidate_vectors=1025)
    with pytest.raises(TypeError):
        Indexer(max_spots=300.0)
    with pytest.raises(TypeError):
        Indexer(redundant_calculation=True)
    assert Indexer(redundant_calculations=False).redundant_computations is False
    handle = ffbidx_impl.indexer(4, 1, 100, 8)
    ffbidx_impl.release(handle)
    with pytest.raises(ValueError, match="^invalid handle$"):
        ffbidx_impl.release(handle)
    with pytest.raises(RuntimeError, match="^invalid handle$"):
        ffbidx_impl.index(handle, np.zeros((3, 10), np.float32), np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="^handle out of bounds for an unsigned integer$"):
        ffbidx_impl.index(-1, np.zeros((3, 10), np.float32), np.eye(3, dtype=np.float32))


def test_del_frees_the_indexer_and_a_bare_handle_lives_until_released(data):
    """``del indexer`` frees it and its device tables (the seed document's promise); a handle
    from the low-level ``indexer()`` has no Python owner and stays valid until released."""
    import gc
    import weakref
    d = data["image1_local"]
    ix = Indexer(max_output_cells=2)
    ix.run(d.spots, d.cell, method="raw", num_halfsphere_points=2000)
    gone, handle = weakref.ref(ix), ix.handle
    del ix
    assert gone() is None and handle not in api._HANDLES
    with pytest.raises(RuntimeError, match="^invalid handle$"):
        ffbidx_impl.index(handle, d.spots, d.cell)
    bare = ffbidx_impl.indexer(2, 1, 300, 32)
    gc.collect()
    cells, _ = ffbidx_impl.index(bare, d.spots, d.cell, "raw", num_halfsphere_points=2000,
                                 n_output_cells=2)
    assert cells.shape == (3, 6) and np.isfinite(cells).all()
    ffbidx_impl.release(bare)
    assert bare not in api._HANDLES and bare not in api._OWNED

def test_crystals_errors(data):
    d = data["image1_local"]
    cells = np.zeros((3, 6), np.float32)
    scores = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="^method must be either raw, ifss, ifse, od ifssr$"):
        crystals(cells, d.spots, scores, method="x")
    with pytest.raises(RuntimeError, match="^cells array must be 2 dimensional$"):
        crystals(cells.ravel(), d.spots, scores)
    with pytest.raises(RuntimeError, match="^only float32 cell data is supported$"):
        crystals(cells.astype(np.float64), d.spots, scores)
    with pytest.raises(RuntimeError, match="^incomplete CARRAY cell data$"):
        crystals(np.zeros((3, 5), np.float32), d.spots, scores)
    with pytest.raises(RuntimeError, match="^no cells$"):
        crystals(np.zeros((3, 0), np.float32), d.spots, scores)
    with pytest.raises(RuntimeError, match="^scores array must be 1 dimensional$"):
        crystals(cells, d.spots, scores[None])
    with pytest.raises(RuntimeError, match="^only float32 score data is supported$"):
        crystals(cells, d.spots, scores.astype(np.float64))
    with pytest.raises(RuntimeError, match="^number of cells and scores must match$"):
        crystals(cells, d.spots, np.zeros(3, np.float32))


def test_environment_device_errors(monkeypatch):
    monkeypatch.setenv("INDEXER_GPU_DEVICE", "gpu0")
    with pytest.raises(RuntimeError, match=r"^wrong format for INDEXER_GPU_DEVICE: gpu0 \(should "
                                           r"be an integer\)$"):
        Indexer()
    n = len(jax.devices())
    monkeypatch.setenv("INDEXER_GPU_DEVICE", str(n))
    with pytest.raises(RuntimeError, match=rf"^illegal value for INDEXER_GPU_DEVICE: {n} "
                                           rf"\(should be in \[0..{n}\[\)$"):
        Indexer()
    monkeypatch.setenv("INDEXER_GPU_DEVICE", "0")
    assert Indexer().device == jax.devices()[0]
    monkeypatch.setenv("INDEXER_GPU_DEBUG", "maybe")
    with pytest.raises(RuntimeError, match='^illegal value for INDEXER_GPU_DEBUG: "maybe"'):
        Indexer()


# --------------------------------------------------------------------------- §13.2 item 6
def test_truncation(data):
    d = data["image0_peakfinder8"]                              # 863 spots > max_spots=300
    with Indexer() as big:
        raw_all, s_all = big.run(d.spots, d.cell, method="raw")
        first = np.ascontiguousarray(d.spots[:, :300])
        raw_300, s_300 = big.run(first, d.cell, method="raw")
        np.testing.assert_array_equal(raw_all, raw_300)
        np.testing.assert_array_equal(s_all, s_300)
        # refinement sees all 863 spots: the refined cells/scores differ
        _, r_all = big.run(d.spots, d.cell)
        _, r_300 = big.run(first, d.cell)
        assert not np.array_equal(r_all, r_300)
    with Indexer(max_output_cells=4) as few:
        cells, scores = few.run(d.spots, d.cell, method="raw", n_output_cells=10)
        assert cells.shape == (3, 12) and scores.shape == (4,)
        cells, scores = few.run(d.spots, d.cell, method="raw", n_output_cells=2)
        assert cells.shape == (3, 6) and scores.shape == (2,)


# --------------------------------------------------------------------------- §13.2 item 7
def test_halfsphere_points():
    pts = core.halfsphere_points(32768)
    assert pts.dtype == np.float32 and pts.shape == (32768, 3)
    np.testing.assert_allclose(pts[0], [0.0, 0.0, 1.0], atol=1e-7)
    assert pts[-1, 2] == 0.0
    np.testing.assert_allclose(np.linalg.norm(pts, axis=1), 1.0, atol=1e-6)
    step = np.arctan2(pts[2, 1], pts[2, 0]) - np.arctan2(pts[1, 1], pts[1, 0])
    assert abs(step - (3.0 - np.sqrt(5.0))) < 1e-5
    assert abs(step - 0.763932) < 1e-6
    np.testing.assert_allclose(np.diff(pts[:, 2]), -1.0 / 32767, atol=1e-6)


def test_angle_counts():
    assert core.n_angles(32768, 0) == 1024
    assert core.n_angles(168100, 0) == 2048                   # first N where 2.5√N+1023 ≥ 2048
    assert core.n_angles(168099, 0) == 1024
    assert core.n_angles(32768, 100) == 1024
    assert core.n_angles(32768, 1025) == 2048


def test_length_groups():
    image = np.array([[36.9, 0, 0], [4.83429e-15, 78.95, 0], [4.83429e-15, 4.83429e-15, 78.95]],
                     np.float32)
    g = core.length_groups(image, 1e-9, True)
    np.testing.assert_array_equal(g.lengths, np.array([78.95, 36.9], np.float32))
    assert g.vectors.tolist() == [0, 1, 2] and g.vec_group.tolist() == [1, 0, 0]
    g = core.length_groups(image, 1e-9, False)
    assert g.vectors.tolist() == [1] and g.vec_group.tolist() == [0]
    assert len(g.lengths) == 1
    # merging by an absolute threshold keeps the largest length as representative
    g = core.length_groups(np.diag([30.0, 30.5, 50.0]).astype(np.float32), 1.0, True)
    np.testing.assert_array_equal(g.lengths, np.array([50.0, 30.5], np.float32))
    assert g.vec_group.tolist() == [1, 1, 0]


def _score1_numpy(dirs, spots, length, triml=0.001, trimh=0.3, delta=0.1, dist1=0.1):
    """Brute-force float64 score1 (§5.2) for every direction."""
    x = length * (dirs.astype(np.float64) @ spots.T.astype(np.float64))
    d = np.abs(x - np.rint(x))
    close = (d < dist1).sum(axis=1)
    g = 2.0 ** (np.log2(np.clip(d, triml, trimh) + delta).mean(axis=1))
    return g - delta - (close + 1)


def test_stage1_candidates_equal_bruteforce(data):
    d = data["image0_local"]
    spots = d.spots.T[:300]
    n = spots.shape[0]
    n_dir = 4096
    dirs = core.halfsphere_points(n_dir)
    lengths = np.array([78.95, 36.9], np.float32)
    fp = np.array([.001, .3, .1, .1, .15, .8, .00075], np.float32)
    for prune in (True, False):
        idx, scores, overflow = jax.jit(core.stage1, static_argnums=(6, 7, 8))(
            dirs, spots, np.ones(n, bool), np.float32(n), lengths, fp, n_dir, 32, prune)
        assert not bool(overflow)
        for g, length in enumerate(lengths):
            ref = _score1_numpy(dirs, spots, float(length))
            order = np.argsort(ref, kind="stable")
            cutoff = ref[order[31]]
            got = np.asarray(idx[g])
            # the selected set equals the brute-force top 32 (ties at the cutoff aside)
            assert np.all(ref[got] <= cutoff + 1e-5)
            assert set(order[ref[order] < cutoff - 1e-5]) <= set(got.tolist())
            np.testing.assert_allclose(np.asarray(scores[g]), ref[got], atol=2e-5)


# --------------------------------------------------------------------------- refinement oracle
def _ifssr_numpy(cell_rows, raw_score, spots, contraction=.8, max_dist=.00075, min_spots=8,
                 n_iter=32):
    """Float64 transcription of §9.3 (final residuals for the score, Q6 fixed)."""
    b = cell_rows.T.astype(np.float64)
    s = spots.astype(np.float64)
    t = (raw_score - np.floor(raw_score)) / np.min(np.linalg.norm(b, axis=0))

    def resid(b):
        x = s @ b
        h = np.where(np.abs(x - np.trunc(x)) == 0.5, np.trunc(x) + np.sign(x), np.rint(x))
        return h, np.linalg.norm(h @ np.linalg.inv(b) - s, axis=1)

    for _ in range(1, n_iter):
        if not t > max_dist:
            break
        h, e = resid(b)
        sel = e < t
        if sel.sum() < min_spots:
            break
        t *= contraction
        b = np.linalg.lstsq(s[sel], h[sel], rcond=None)[0]
    _, e = resid(b)
    return b.T, np.sort(e)[min_spots - 1]


def test_ifssr_matches_float64_oracle(ix, data):
    for name in ("image0_local", "image2_radial", "image3_peakfinder8"):
        d = data[name]
        raw_cells, raw_scores = ix.run(d.spots, d.cell, method="raw")
        cells, scores = ix.run(d.spots, d.cell, method="ifssr")
        for i in range(0, 32, 5):
            ref_cell, ref_score = _ifssr_numpy(cell_of(raw_cells, i), float(raw_scores[i]),
                                               d.spots.T)
            assert abs(scores[i] - ref_score) < 2e-5, (name, i, scores[i], ref_score)
            np.testing.assert_allclose(cell_of(cells, i), ref_cell, atol=0.05)


# --------------------------------------------------------------------------- crystals
def test_crystals_two_lattices():
    """Two perfect lattices; candidate list = [A, A again, B, junk]: crystals picks A then B."""
    rng = np.random.default_rng(3)
    a = np.diag([30.0, 40.0, 50.0])
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    b = np.diag([35.0, 45.0, 60.0]) @ q.T
    hkl = np.array([(h, k, l) for h in range(1, 5) for k in range(1, 4) for l in range(1, 4)],
                   float)
    spots = np.concatenate([hkl @ np.linalg.inv(a).T, hkl[:20] @ np.linalg.inv(b).T])
    spots = np.ascontiguousarray(spots.T.astype(np.float32))
    junk = np.diag([17.0, 19.0, 23.0]) @ q
    cand = np.concatenate([a, a, b, junk]).astype(np.float32)   # rows = vectors
    cells = np.ascontiguousarray(cand.T)
    scores = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    got = crystals(cells, spots, scores, method="ifssr", threshold=1e-4, min_spots=8)
    assert got.tolist() == [0, 2] and got.dtype == np.uint32
    # Miller-space distances: same answer with a Miller threshold
    assert crystals(cells, spots, scores, method="raw", threshold=1e-3).tolist() == [0, 2]
    assert crystals(cells, spots, scores, method="ifssr", threshold=1e-4, min_spots=37) is None
    assert crystals(cells, spots, scores, min_spots=-1) is None
    # the best-scored cell must itself cover min_spots spots, else nothing is returned
    junk_first = np.array([0.1, 0.2, 0.3, 0.05], np.float32)
    assert crystals(cells, spots, junk_first, method="ifssr", threshold=1e-4) is None


# --------------------------------------------------------------------------- beyond ffbidx
def test_no_recompilation(ix, data):
    """A second frame (same spot bucket) runs without any XLA compilation."""
    compiles = []

    def listener(event, duration, **kw):
        if "compile" in event:
            compiles.append(event)

    d0, d1 = data["image3_local"], data["image4_local"]
    ix.run(d0.spots, d0.cell)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        cells, scores = ix.run(d1.spots, d1.cell)
        ix.crystals(cells, d1.spots, scores)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_run_batch_equals_run(ix, data):
    names = ["image0_local", "image1_radial", "image2_peakfinder8"]
    frames = [data[n].spots for n in names]
    cell = data[names[0]].cell
    out = ix.run_batch(frames, cell, vectorize=True)            # padded + vmapped
    assert len(out) == 3
    loop = ix.run_batch(frames, cell, vectorize=False)
    for (c1, s1), (c2, s2) in zip(out, loop):
        np.testing.assert_allclose(s1, s2, atol=1e-6)
        np.testing.assert_allclose(c1, c2, atol=1e-3)
    for name, (cells, scores) in zip(names, out):
        ref_cells, ref_scores = ix.run(data[name].spots, cell)
        best = int(np.argmin(scores))
        assert int(np.argmin(ref_scores)) == best
        np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
        np.testing.assert_allclose(cells, ref_cells, atol=1e-3)
        _, det, mis = lattice_match(cell_of(cells, best), GOLD)
        assert round(det) == 1 and mis < 2.0


def test_hot_path_is_float32(data):
    """The sampling and refinement jaxprs hold no 64-bit floats although x64 is on."""
    assert jax.config.jax_enable_x64
    d = data["image0_local"]
    small = Indexer()
    cfg = api.RunConfig("ifssr", 1e-9, .001, .3, .1, .1, .15, 6, 32768, 0, 32, .8, .00075, 8, 32)
    groups, n_rot, dirs, cs, shared = small._prepare(d.cell, cfg)
    st = small._static(groups, n_rot, cfg, True)
    spots = np.zeros((300, 3), np.float32)
    spots[:297] = d.spots.T
    jaxpr = jax.make_jaxpr(core.sample_frame, static_argnums=0)(
        st, dirs, np.int32(32768), cs, spots, np.int32(297), *shared)
    cells = np.zeros((32, 3, 3), np.float32)
    jaxpr2 = jax.make_jaxpr(core.refine_cells, static_argnums=7)(
        cells, np.zeros(32, np.float32), spots, np.ones(300, bool), np.int32(297), shared[4],
        shared[5], "ifssr")
    text = str(jaxpr) + str(jaxpr2)
    assert "f64" not in text
    assert "f32" in text


def test_count_first_shortcut_is_exact(data):
    """run()'s pruned selection (counts first, full scores only for the tied best; exhaustive
    rerun when the ties overflow the slots, as on perfect lattices) equals scoring every
    direction and every cell (prune=False)."""
    small = Indexer()
    cfg = api.RunConfig("raw", 1e-9, .001, .3, .1, .1, .15, 6, 32768, 0, 32, .8, .00075, 8, 32)
    for name, expect_overflow in (("image2_local", False), ("test1", True)):
        d = data[name]
        groups, n_rot, dirs, cs, shared = small._prepare(d.cell, cfg)
        spots = np.zeros((300, 3), np.float32)
        k = min(300, d.spots.shape[1])
        spots[:k] = d.spots.T[:k]
        st = small._static(groups, n_rot, cfg, True)
        _, _, overflow = core.sample_frame_jit(st, dirs, np.int32(32768), cs, spots,
                                               np.int32(k), *shared)
        assert bool(overflow) == expect_overflow
        st = small._static(groups, n_rot, cfg, False)
        ref_cells, ref_scores, _ = core.sample_frame_jit(st, dirs, np.int32(32768), cs, spots,
                                                         np.int32(k), *shared)
        cells, scores = small.run(d.spots, d.cell, method="raw")
        assert small.last_timing["exhaustive_reruns"] == int(expect_overflow)
        np.testing.assert_allclose(scores, np.asarray(ref_scores), atol=2e-5)
        dev, det, _ = lattice_match(cell_of(cells, 0), np.asarray(ref_cells[0], np.float64))
        assert dev < 1e-3 and round(det) == 1


def test_argument_types_are_checked_before_values(ix):
    """As upstream's argument parsing: every conversion (TypeError) before any value check;
    ``min_spots`` rejects strings and floats like the other integer arguments."""
    spots = np.zeros((3, 10), np.float32)
    cell = np.eye(3, dtype=np.float32) * 30
    with pytest.raises(TypeError, match="n_iter: integer argument expected"):
        ix.run(spots, cell, triml=-1, n_iter=1.5)
    for bad in ("8", 8.0):
        with pytest.raises(TypeError, match="min_spots: integer argument expected"):
            ix.run(spots, cell, min_spots=bad)
        with pytest.raises(TypeError, match="min_spots: integer argument expected"):
            ix.crystals(np.zeros((3, 3), np.float32), spots, np.zeros(1, np.float32),
                        min_spots=bad)


def test_non_finite_or_degenerate_inputs_are_errors(ix, data):
    """One NaN spot used to turn every score of the frame into NaN (and refinement off); a
    NaN cell raised a bare StopIteration; a degenerate cell returned 0.0 "perfect" scores."""
    d = data["test0"]
    for value in (np.nan, np.inf):
        spots = d.spots.copy()
        spots[1, 5] = value
        with pytest.raises(ValueError, match=r"^spot 5 is not finite \(.*\); 1 of 90 "):
            ix.run(spots, d.cell)
        with pytest.raises(ValueError, match="^spot 5 is not finite"):
            ix.crystals(np.ascontiguousarray(np.tile(d.cell, 1)), spots,
                        np.zeros(1, np.float32))
    cell = d.cell.copy()
    cell[2, 1] = np.nan
    with pytest.raises(ValueError, match="^input cell vector 1 is not finite"):
        ix.run(d.spots, cell)
    same = np.ascontiguousarray(np.array([[30, 30, 0], [0, 0, 0], [0, 0, 50]], np.float32))
    zero = np.zeros((3, 3), np.float32)
    for bad in (same, zero):
        with pytest.raises(ValueError, match="^input cell 0 is degenerate"):
            ix.run(d.spots, bad)
        with pytest.raises(ValueError, match="^input cell 0 is degenerate"):
            ix.run_batch([d.spots], bad)
    # lengths the float32 core cannot work with: a cell in metres gave NaN cells, one of
    # 1e20 Å a bare StopIteration
    for scale, shown in ((1e-10, "3e-09, 4e-09, 5e-09"), (1e19, r"3e\+20, 4e\+20, 5e\+20")):
        with pytest.raises(ValueError, match=rf"^input cell 0 has vector lengths {shown}, "
                                             r"expected 0.0001 to 1e\+12 Å"):
            ix.run(d.spots, np.ascontiguousarray(d.cell * np.float32(scale)))
    # one frame's array where a batch (a sequence of arrays) is expected: said so, not
    # "spots array must be 2 dimensional" about its first row
    with pytest.raises(TypeError, match=r"^run_batch\(\) spot_arrays: expected a sequence of "
                                        r"spot arrays, one per frame, found one array of "
                                        rf"shape {re.escape(str(d.spots.shape))}; use run\(\)"):
        ix.run_batch(d.spots, d.cell)


def test_a_cell_too_small_for_the_spots_gives_finite_cells(ix, data):
    """With a 6 x 8 x 10 Å cell for test0's 30 x 40 x 50 Å spots every Miller index is 0:
    vector refinement's least squares gave the zero vector, normalised to NaN, and every
    output cell was NaN (``crystals`` then refused ``run``'s own output). A zero solution now
    keeps the vector, as a singular one does."""
    d = data["test0"]
    small = np.ascontiguousarray(d.cell * np.float32(0.2))
    cells, scores = ix.run(d.spots, small, method="raw")
    assert np.isfinite(cells).all() and np.isfinite(scores).all()
    cells, scores = ix.run(d.spots, small)
    assert np.isfinite(cells).all()
    ix.crystals(cells, d.spots, scores)          # accepted: no NaN cell


def test_crystals_singular_cell_covers_nothing(ix, data):
    """``ifssr`` coverage inverts the cell: a singular one covers no spot (was a NumPy
    LinAlgError); a good cell next to it is still found."""
    d = data["test0"]
    cells = np.ascontiguousarray(np.concatenate([np.zeros((3, 3), np.float32), d.cell], axis=1))
    scores = np.array([1.0, 0.0], np.float32)       # the good cell is visited first
    assert ix.crystals(np.zeros((3, 3), np.float32), d.spots, np.zeros(1, np.float32)) is None
    np.testing.assert_array_equal(ix.crystals(cells, d.spots, scores), [1])


def test_crystals_accepts_the_module_documents_keyword_names(ix, data):
    """The ffbidx module document calls them ``output_cells``/``output_scores``."""
    d = data["image0_local"]
    cells, scores = ix.run(d.spots, d.cell)
    ref = ix.crystals(cells, d.spots, scores)
    assert ref is not None and len(ref) >= 1
    got = ix.crystals(output_cells=cells, spots=d.spots, output_scores=scores)
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(TypeError, match="both 'cells' and its alias 'output_cells'"):
        ix.crystals(cells, d.spots, scores, output_cells=cells)
    with pytest.raises(TypeError, match="missing required argument 'scores'"):
        ix.crystals(cells, d.spots)


def test_kth_norm_ranks_nan_last():
    """The bit-pattern bisection read the default NaN (0xffc00000, sign bit set) as a
    negative number, so a NaN residual ranked below every distance and gave score 0.0."""
    nan = np.array([0xFFC00000], np.uint32).view(np.float32)[0]
    nrm = np.array([[0.5, 0.3, nan, 0.1], [nan, nan, nan, nan]], np.float32)
    got = np.asarray(core._kth_norm(jax.numpy.asarray(nrm), np.int32(2)))
    assert got[0] == np.float32(0.3)
    assert np.isinf(got[1])
