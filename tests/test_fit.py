"""The fitting engine against MIDAS's own outputs on the Au example.

Oracles: MIDAS's screening output (``screen_cpu.csv``), MIDAS's refined binary mic
(``Au_bin_Reconstructed.mic``) and the ground-truth microstructure (``Au_txt.mic``); a
plain-loop transcription of CalcFracOverlap's pixel loop for the sticky-flag difference; a
plain-loop transcription of §7.3's selection rule.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import MIDAS_AU, REF_RUN, need
from nfjax import observe
from nfjax.crystal import select_rings, symmetry_quaternions
from nfjax.errors import InputFileError, NfjaxError
from nfjax.forward import spot_footprint
from nfjax.geometry import Geometry, geometry_from_params, tilt_matrix
from nfjax.grid import triangle_vertices
from nfjax.io.gridfile import read_grid, write_grid
from nfjax.io.mic import read_allmatches, read_binary_mic, read_mic, read_text_mic
from nfjax.io.spots import read_spot_files
from nfjax.orientation import (euler_to_matrix_midas, euler_to_quat, matrix_to_quat,
                               misorientation)
from nfjax.params import read_params
from nfjax.score import hard_spot_counts

SYM = jnp.asarray(symmetry_quaternions(225))


def _miso_deg(a, b):
    return np.degrees(np.asarray(misorientation(euler_to_quat(jnp.asarray(a)),
                                                euler_to_quat(jnp.asarray(b)), SYM)))


@pytest.fixture(scope="module")
def au():
    need(REF_RUN)
    params = read_params(REF_RUN / "params_used.txt")
    geom = geometry_from_params(params)
    obs = observe.from_bit_indices(geom.shape, np.load(REF_RUN / "SpotsInfo_lit.npz")["index"])
    return params, geom, obs, read_spot_files(REF_RUN), read_grid(REF_RUN / "grid.txt")


# --------------------------------------------------------------------------- screening
def test_screening_reproduces_midas_screen_cpu(au):
    """All 3456 × 4 (voxel, seed) pairs: the same 11,501 winners as MIDAS, fractions equal
    to MIDAS's %.6f print. Sticky vs per-pixel out-of-bounds differs on 0 pairs here
    (EdgeLength 1 < px: one-pixel footprints)."""
    from nfjax.fit import screen, screen_counts

    params, geom, obs, table, grid = au
    verts = triangle_vertices(grid)
    w = screen(verts, table, obs, geom, min_frac=params.min_frac_accept, box=1, progress=False)
    ref = np.loadtxt(REF_RUN / "screen_cpu.csv", delimiter=",", skiprows=1)
    assert len(w) == len(ref) == 11501
    np.testing.assert_array_equal(w.voxel, ref[:, 0].astype(int))
    np.testing.assert_array_equal(w.orient, ref[:, 1].astype(int))
    assert np.max(np.abs(w.frac - ref[:, 2])) <= 5.0000001e-7
    np.testing.assert_array_equal(w.count, np.bincount(ref[:, 0].astype(int), minlength=3456))
    spots, mask = table.padded()
    per_pixel = screen_counts(verts, spots, mask, obs, geom, box=1)
    sticky = screen_counts(verts, spots, mask, obs, geom, box=1, sticky=True)
    n_diff = int(np.sum((per_pixel[0] != sticky[0]) | (per_pixel[1] != sticky[1])))
    assert n_diff == 0


def test_sticky_flag_against_midas_pixel_loop(monkeypatch):
    """A footprint that crosses the detector edge: per-pixel (nfjax) and sticky (MIDAS)
    counts equal a literal transcription of CalcFracOverlap's loop over the pixels, in
    each of the orders the score counts pixels in: along a pixel axis (this 144-pixel box
    in the screen and the refinement objective, ``hard_counts``) and in straight-line code
    (boxes of up to 32 pixels in the screen)."""
    import nfjax.score as score
    geom = Geometry(lsd=jnp.array([5000.0, 7000.0]), ybc=jnp.array([10.0, 3.0]),
                    zbc=jnp.array([500.0, 500.5]), tilts=jnp.array([0.2, -0.1, 0.3]),
                    px=jnp.asarray(1.5), wedge=jnp.asarray(0.0), omega_start=180.0,
                    omega_step=-1.0, n_frames=360, nr_pixels_y=64, nr_pixels_z=1024)
    verts = jnp.array([[0.0, -8.0], [-12.0, 6.0], [12.0, 6.0]])
    box = 12
    rng = np.random.default_rng(3)
    rt = tilt_matrix(geom.tilts)
    # Spots whose triangle is on the detector at distance 0 but whose footprint leaves it
    # at distance 1 (beam centre 7 px lower there): found by a scan along y.
    yl, zl, om, fps = [], [], [], []
    for i, y in enumerate(np.arange(-8.0, 6.0, 0.25)):
        z, w = 200.0 + 37.0 * (i % 7), -170.0 + 29.0 * i
        fp = spot_footprint(verts, y, z, w, geom, box, rt)
        edge = np.any(np.asarray(fp.pix_ok) & ~np.all(np.asarray(fp.in_range), axis=1))
        if bool(fp.frame_ok) and bool(fp.verts_in) and edge:
            yl.append(y), zl.append(z), om.append(w), fps.append(fp)
    assert len(fps) >= 3
    yl, zl, om = (np.array(a) for a in (yl, zl, om))
    lit = []
    for fp in fps:
        f = int(fp.frame)
        for L in range(2):
            for y, z in zip(np.asarray(fp.py[:, L]), np.asarray(fp.pz[:, L])):
                if 0 <= y < 64 and 0 <= z < 1024 and rng.random() < 0.6:
                    lit.append(observe.bit_index(geom.shape, L, f, y, z))
    obs = observe.from_bit_indices(geom.shape, np.array(lit, np.int64))
    valid = jnp.ones(len(fps), bool)
    got = {s: hard_spot_counts(verts, jnp.asarray(yl), jnp.asarray(zl), jnp.asarray(om),
                               valid, geom, box, jnp.asarray(obs.words), geom.shape,
                               sticky=s) for s in (False, True)}
    words = np.asarray(obs.words)

    def bit(L, f, y, z):
        k = int(observe.bit_index(geom.shape, L, f, y, z))
        return (words[k >> 5] >> (k & 31)) & 1

    n_differ = 0
    for j, fp in enumerate(fps):
        assert bool(fp.frame_ok) and bool(fp.verts_in)
        for sticky in (False, True):
            total = overlap = 0
            oob = False
            for p in np.flatnonzero(np.asarray(fp.pix_ok)):
                if not sticky:
                    oob = False
                found = True
                for L in range(2):
                    y, z = int(fp.py[p, L]), int(fp.pz[p, L])
                    if not (0 <= y < 64 and 0 <= z < 1024):
                        oob = True
                        continue
                    found = found and bool(bit(L, int(fp.frame), y, z))
                if oob:
                    continue
                total += 1
                overlap += found
            assert int(got[sticky][0][j]) == total
            assert int(got[sticky][1][j]) == overlap
        n_differ += int(got[True][0][j] != got[False][0][j])
    assert n_differ >= 2          # the case is really on the edge for several spots
    assert box * box > score._STRAIGHT_PIXELS
    args = (verts, jnp.asarray(yl), jnp.asarray(zl), jnp.asarray(om), valid, geom, box,
            jnp.asarray(obs.words), geom.shape)
    for s in (False, True):
        summed = score.hard_counts(*args, sticky=s)
        assert [int(a) for a in summed] == [int(np.sum(a)) for a in got[s]]
    monkeypatch.setattr(score, "_STRAIGHT_PIXELS", box * box)
    for s in (False, True):
        straight = hard_spot_counts(*args, sticky=s)
        for a, b in zip(straight, got[s]):
            np.testing.assert_array_equal(a, b)


def test_screen_kernel_counts_as_the_objective_does():
    """The screen's kernel (straight-line pixels for boxes of up to 32 pixels, a pixel axis
    above) gives every (orientation, voxel) pair the counts of the refinement objective's
    ``hard_counts`` (a pixel axis, checked against MIDAS's loop above), for a one-pixel,
    a 3 x 2 and a 7 x 7 box, per-pixel and sticky, with footprints reaching off the
    detector."""
    from nfjax.fit import screen_counts
    from nfjax.score import hard_counts

    geom = Geometry(lsd=jnp.array([5000.0, 7000.0]), ybc=jnp.array([40.0, 35.0]),
                    zbc=jnp.array([60.0, 61.5]), tilts=jnp.array([0.2, -0.1, 0.3]),
                    px=jnp.asarray(1.5), wedge=jnp.asarray(0.0), omega_start=180.0,
                    omega_step=-1.0, n_frames=360, nr_pixels_y=96, nr_pixels_z=128)
    rng = np.random.default_rng(11)
    n_or, n_sp, n_vox = 6, 40, 24
    spots = np.stack([rng.uniform(-60, 90, (n_or, n_sp)), rng.uniform(-100, 110, (n_or, n_sp)),
                      rng.uniform(-179, 179, (n_or, n_sp))], axis=-1)
    mask = rng.random((n_or, n_sp)) < 0.9
    obs = observe.from_bit_indices(geom.shape, rng.choice(observe.n_bits(geom.shape),
                                                          300_000, replace=False))
    words = jnp.asarray(obs.words)
    for edge, box in ((1.0, 1), (3.0, (3, 2)), (6.0, 7)):
        centre = rng.uniform(-20, 20, (n_vox, 1, 2))
        tri = np.array([[0.0, 0.0], [edge, 0.0], [edge / 2, edge * 0.866]])
        verts = centre + tri[None]
        got = {}
        for sticky in (False, True):
            one = lambda v, sp, m: hard_counts(v, sp[:, 0], sp[:, 1], sp[:, 2], m,  # noqa
                                               geom, box, words, geom.shape, sticky=sticky)
            ref = jax.jit(jax.vmap(jax.vmap(one, in_axes=(0, None, None)),
                                   in_axes=(None, 0, 0)))(jnp.asarray(verts),
                                                          jnp.asarray(spots),
                                                          jnp.asarray(mask))
            got[sticky] = screen_counts(verts, spots, mask, obs, geom, box=box, sticky=sticky)
            np.testing.assert_array_equal(got[sticky][0], ref[0])
            np.testing.assert_array_equal(got[sticky][1], ref[1])
            assert 0 < got[sticky][1].sum() < got[sticky][0].sum()
        if box != 1:                       # some footprints cross the detector's edge
            assert np.any(got[True][0] != got[False][0])


# --------------------------------------------------------------------------- refinement
def test_refinement_matches_midas_nelder_mead(au):
    """MIDAS's procedure (Euler box, no restarts) on 100 random voxels: the refined angles
    equal MIDAS's (NLopt) to 0.01° on >= 99 % of the fitted voxels, the chosen seed and the
    winner counts are identical, and the confidence equals MIDAS's on >= 98 %."""
    from nfjax.fit import fit_grid

    params, geom, obs, table, grid = au
    rows = np.sort(np.random.default_rng(7).choice(len(grid), 100, replace=False))
    res = fit_grid(params, grid[rows], table, obs, param="euler", prune_ratio=0.0,
                   restarts=(), progress=False)
    ref = read_binary_mic(REF_RUN / "Au_bin_Reconstructed.mic").records[rows]
    has = ref[:, 10] > 0
    assert has.sum() > 60
    np.testing.assert_array_equal(res.records[:, 1], ref[:, 1])        # winner counts
    np.testing.assert_array_equal(res.records[has, 3:7], ref[has, 3:7])
    assert np.all(res.records[has, 10] > 0) and np.all(res.records[~has, 10] == 0)
    d = _miso_deg(res.records[has, 7:10], ref[has, 7:10])
    assert np.mean(d < 0.01) >= 0.99
    assert np.mean(res.records[has, 0] == ref[has, 0]) >= 0.99
    assert np.mean(np.abs(res.records[has, 10] - ref[has, 10]) < 1e-12) >= 0.98
    assert np.all(res.records[:, 2] == 0)                              # RunTime off


def test_default_refinement_prunes_and_restarts_without_losing(au):
    """The defaults (prune, then one rotation-vector restart round) against MIDAS's
    procedure on 100 random voxels: the pruned winners are exactly those below 0.3 × the
    voxel's best screening fraction and keep their screening result untouched; restarted
    points only ever improve; no voxel's confidence drops below MIDAS's procedure."""
    from nfjax.fit import PRUNE_RATIO, fit_grid, start_euler

    params, geom, obs, table, grid = au
    rows = np.sort(np.random.default_rng(7).choice(len(grid), 100, replace=False))
    midas = fit_grid(params, grid[rows], table, obs, prune_ratio=0.0, restarts=(),
                     progress=False)
    dflt = fit_grid(params, grid[rows], table, obs, progress=False)
    w = dflt.winners
    np.testing.assert_array_equal(w.voxel, midas.winners.voxel)
    sbest = np.zeros(len(rows))
    np.maximum.at(sbest, w.voxel, w.frac)
    pruned = w.frac < PRUNE_RATIO * sbest[w.voxel]
    assert dflt.n_pruned == pruned.sum() > 0 and midas.n_pruned == 0
    assert np.all(dflt.n_evals[pruned] == 0) and np.all(dflt.n_evals[~pruned] > 0)
    np.testing.assert_array_equal(dflt.refined_frac[pruned], w.frac[pruned])
    np.testing.assert_allclose(dflt.refined_euler[pruned],
                               start_euler(table.orient[w.orient[pruned]]), atol=1e-12)
    # Unpruned winners: MIDAS's Nelder-Mead first (same answer), restarts only improve.
    assert np.all(dflt.refined_frac[~pruned] >= midas.refined_frac[~pruned] - 1e-12)
    assert dflt.n_restarted > 0
    assert np.any(dflt.refined_frac[~pruned] > midas.refined_frac[~pruned] + 1e-9)
    assert np.all(dflt.records[:, 10] >= midas.records[:, 10] - 1e-12)


@pytest.fixture(scope="module")
def smooth_au_loop0(tmp_path_factory):
    """The bundled Au example made physically smooth (each grain its mean orientation,
    ``grain_mean_records``) and rendered as a solid sample, on the 5 µm grid of loop 0 of
    the multi-resolution run (tomography outline). Returns the 5 µm parameters, the grid
    rows of the Φ ≈ 6° grain, the observations, the reflections, that grain's orientation
    (quaternion) and its mean Euler angles repeated per row."""
    from nfjax.crystal import hkls_from_params
    from nfjax.data import au_example
    from nfjax.grid import grid_from_params
    from nfjax.simulate import (grain_mean_records, select_rendered, simulate_records,
                                tomo_outline)

    tmp = tmp_path_factory.mktemp("smooth_au")
    files = au_example()
    params = read_params(files["params"])
    rendered = select_rendered(read_mic(files["mic"]).records, params.min_confidence)
    smooth, grains = grain_mean_records(rendered, params)
    assert len(grains) == 2
    solid = smooth.copy()
    solid[:, 5] = 2.5                                     # space-filling triangles
    hkls = hkls_from_params(params)
    obs = simulate_records(params, solid, hkls, progress=False)
    (tmp / "tomo.raw").write_bytes(tomo_outline(rendered, pixel_size=0.25, size=512,
                                                radius=1.5).tobytes())
    p5 = params.replace(grid_size=5.0, tomo_image=str(tmp / "tomo.raw"), tomo_pixel_size=0.25)
    grid = grid_from_params(p5)
    g = int(np.argmax(grains.matrices[:, 2, 2]))          # the grain with Φ ≈ 6°
    q = np.asarray(matrix_to_quat(jnp.asarray(grains.matrices[g])))
    # the loop-0 voxels of that grain: nearest smooth-truth voxel within 3 µm is in it
    d2 = ((grid[:, None, 2:4] - smooth[None, :, 3:5]) ** 2).sum(-1)
    in_grain = grains.voxel_grain[d2.argmin(1)] == grains.ids[g]
    rows = np.flatnonzero((d2.min(1) < 9.0) & in_grain)
    assert len(rows) > 150
    mean_euler = np.repeat(smooth[grains.voxel_grain == grains.ids[g]][:1, 7:10], len(rows), 0)
    assert np.allclose(np.asarray(euler_to_matrix_midas(jnp.asarray(mean_euler[0]))),
                       grains.matrices[g], atol=1e-9)
    return p5, grid[rows], obs, hkls, q, mean_euler


def _turned(q, axis, deg):
    from nfjax.orientation import quat_multiply

    a = np.asarray(axis, float) / np.linalg.norm(axis)
    h = np.radians(deg) / 2
    return np.asarray(quat_multiply(q, np.concatenate([[np.cos(h)], np.sin(h) * a])))


def _twins(q):
    """The four Σ3-twin variants (60° about <111>) of quaternion ``q``."""
    return [_turned(q, a, 60.0) for a in ([1, 1, 1], [-1, 1, 1], [1, -1, 1], [1, 1, -1])]


def test_library_pass_refines_winners_pruning_would_drop(smooth_au_loop0):
    """Why a library pass refines every winner (``refinement_options(seeded=False)``).

    The voxels of the smooth Au sample's Φ ≈ 6° grain on a 5 µm grid (loop 0 of the
    multi-resolution run) against a small "library": seven orientations 0.8° from the
    grain about different axes, and the grain's four Σ3-twin variants. The near seeds
    screen at ~0.05, a twin variant at ~0.3, so pruning at 0.3 × the best drops every near
    seed and the grain is not found at all; refined, the near seeds reach the grain
    (measured: 50 of 194 voxels within 0.5° — enough for the clustering of the next loop —
    against 0 with pruning)."""
    from nfjax.fit import fit_grid, refinement_options
    from nfjax.spots import make_diffraction_spots

    p5, grid, obs, hkls, q, mean_euler = smooth_au_loop0
    near = [_turned(q, a, 0.8) for a in ([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0],
                                         [1, 0, 1], [0, 1, 1], [-1, 1, 1])]
    rings = select_rings(hkls, p5.rings_to_use)
    table = make_diffraction_spots(np.array(near + _twins(q)), rings.g, rings.theta,
                                   geometry_from_params(p5))
    found = {}
    for seeded in (True, False):
        res = fit_grid(p5, grid, table, obs, hkls=hkls, progress=False,
                       **dict(refinement_options(seeded=seeded), near_misses=0))
        found[seeded] = int(np.sum(_miso_deg(res.records[:, 7:10], mean_euler) < 0.5))
        assert res.n_pruned == 0 if not seeded else res.n_pruned > 0
    assert found[False] >= 40, found
    assert found[True] <= 5, found


def test_library_pass_refines_near_misses(smooth_au_loop0):
    """Near misses (``fit_grid(near_misses=16)``, on in library passes): the same voxels
    against the real 1° uniform library's seeds within 1.5° of the grain, plus its four
    Σ3-twin variants. The near seeds screen below MinFracAccept (0.04) on most voxels
    (they pass on 30 of 194), so the twins win nearly everywhere: MIDAS's procedure finds
    none of the grain's voxels. Refining the 16 best near misses of each unresolved voxel
    (best below MinConfidence 0.7: 159 voxels) finds most (measured: 0 → 159 of 194)."""
    from nfjax.fit import NEAR_MISSES, fit_grid, refinement_options
    from nfjax.orientation import misorientation as miso
    from nfjax.seeds import uniform_seeds
    from nfjax.spots import make_diffraction_spots

    p5, grid, obs, hkls, q, mean_euler = smooth_au_loop0
    lib = np.asarray(uniform_seeds(225, 1.0))
    dist = np.degrees(np.asarray(miso(jnp.asarray(q)[None], jnp.asarray(lib),
                                      jnp.asarray(symmetry_quaternions(225)))))
    near = lib[dist < 1.5]
    assert 5 <= len(near) <= 20 and dist.min() > 0.4
    rings = select_rings(hkls, p5.rings_to_use)
    table = make_diffraction_spots(np.concatenate([near, np.array(_twins(q))]), rings.g,
                                   rings.theta, geometry_from_params(p5))
    opts = refinement_options(seeded=False)
    assert opts["near_misses"] == NEAR_MISSES == 16
    midas = fit_grid(p5, grid, table, obs, hkls=hkls, progress=False,
                     **refinement_options(midas=True))
    res = fit_grid(p5, grid, table, obs, hkls=hkls, progress=False, **opts)
    # the near seeds (rows < len(near)) almost never pass screening
    n_pass = np.unique(midas.winners.voxel[midas.winners.orient < len(near)]).size
    assert np.all(res.records[:, 1] == midas.records[:, 1])      # MIDAS's winner count
    found_midas = int(np.sum(_miso_deg(midas.records[:, 7:10], mean_euler) < 0.5))
    found = int(np.sum(_miso_deg(res.records[:, 7:10], mean_euler) < 0.5))
    assert n_pass <= 0.2 * len(grid), n_pass
    assert found_midas == 0
    assert found >= 0.75 * len(grid), found
    assert 0.75 * len(grid) <= res.n_near_voxels <= len(grid)
    assert res.n_near <= NEAR_MISSES * res.n_near_voxels
    assert np.all(res.records[:, 10] >= midas.records[:, 10] - 1e-12)


def test_screen_near_misses_are_exact_and_chunk_independent(au):
    """``screen(near_misses=n)``: per voxel the n best orientations with 0 < frac <
    MinFracAccept, ties to the lower orientation — the same as a brute-force sort of all
    counts, and the same with many orientation chunks as with one."""
    from nfjax.fit import screen, screen_counts

    params, geom, obs, table, grid = au
    verts = triangle_vertices(grid[::37])
    spots, mask = table.padded()
    total, overlap = screen_counts(verts, spots, mask, obs, geom, box=1)
    frac = np.where(total > 0, overlap / np.maximum(total, 1), 0.0)
    thr = 0.9
    for n in (1, 2, 3):
        runs = [screen(verts, table, obs, geom, min_frac=thr, box=1, near_misses=n,
                       progress=False, max_memory=mem) for mem in (None, 1)]
        for w, near in runs:
            ref = []
            for v in range(verts.shape[0]):
                cand = [(-frac[o, v], o) for o in range(frac.shape[0]) if 0 < frac[o, v] < thr]
                ref += [(v, o, -f) for f, o in sorted(cand)[:n]]
            got = list(zip(near.voxel.tolist(), near.orient.tolist(), near.frac.tolist()))
            assert got == ref
            assert np.all(w.frac >= thr)
        assert len(runs[0][1]) > 0


def test_select_solutions_follows_midas_rule():
    """§7.3: best by >= (later wins); saved list skips near-duplicates even when better,
    inserts by descending fraction, new entry before equal ones. With a secondary key the
    same rule runs on (fraction, key) — for the best and the saved order alike — and an
    all-zero key is exactly MIDAS's rule."""
    from nfjax.fit import Winners, select_solutions

    rng = np.random.default_rng(11)
    base = rng.uniform(0, 1, (4, 3)) * [6.28, 3.14, 6.28]
    # voxel 0: 8 winners built around 4 distinct orientations with small offsets.
    pick = np.array([0, 1, 2, 1, 3, 0, 2, 3])
    eul = base[pick] + rng.normal(0, 0.002, (8, 3))
    frac = np.array([0.5, 0.7, 0.9, 0.7, 0.9, 0.9, 0.3, 0.4])
    # voxel 1: 2 winners; voxel 2: none.
    eul = np.vstack([eul, base[[1, 2]]])
    frac = np.concatenate([frac, [0.2, 0.2]])
    w = Winners(voxel=np.array([0] * 8 + [1, 1]), orient=np.arange(10),
                frac=np.zeros(10), count=np.array([8, 2, 0]))

    def oracle(idx, key):
        rank = [(frac[i], key[i]) for i in range(len(frac))]
        b, s = -1, []
        for i in idx:
            if b < 0 or rank[i] >= rank[b]:
                b = i
            if any(_miso_deg(eul[i], eul[j]) < 1.0 for j in s):
                continue
            pos = next((k for k, j in enumerate(s) if rank[j] <= rank[i]), len(s))
            s.insert(pos, i)
            s = s[:3]
        return b, s + [-1] * (3 - len(s))

    plain = select_solutions(w, eul, frac, 3, n_save=3, min_miso_deg=1.0, space_group=225)
    zero = select_solutions(w, eul, frac, 3, n_save=3, min_miso_deg=1.0, space_group=225,
                            key=np.zeros(10))
    # The tie at 0.9 (winners 2, 4, 5 of orientations 2, 3, 0) ranked by key: the earliest
    # wins, and the saved order follows the key.
    key = np.zeros(10)
    key[[2, 4, 5]] = [0.8, 0.5, 0.6]
    keyed = select_solutions(w, eul, frac, 3, n_save=3, min_miso_deg=1.0, space_group=225,
                             key=key)
    for (best, saved), k in ((plain, np.zeros(10)), (zero, np.zeros(10)), (keyed, key)):
        for v, idx in ((0, range(8)), (1, [8, 9])):
            b, s = oracle(idx, k)
            assert best[v] == b
            assert list(saved[v]) == s
        assert best[2] == -1 and list(saved[2]) == [-1, -1, -1]
    assert plain[0][0] == 5 and list(plain[1][0]) == [5, 4, 2]   # tie at 0.9: the later
    assert keyed[0][0] == 2 and list(keyed[1][0]) == [2, 5, 4]   # tie at 0.9: the key


def test_tie_break_takes_the_orientation_lit_under_the_larger_probe(au):
    """Two winners of one voxel at the same best fraction: orientation A's spots are rendered
    with the tie-break probe (1 um triangle enlarged 1.5x about its centroid), B's with the
    1 um probe alone. Re-scored with the enlarged probe, A is exactly 1 (same rasteriser as
    the rendering) and B well below, so A is chosen whichever comes later; equal enlarged
    scores and winners below the best keep MIDAS's rule (the later of equal fractions)."""
    from nfjax.crystal import hkls_from_params, select_rings
    from nfjax.fit import TIE_PROBE, Winners, exact_fracs, select_solutions, tie_scores
    from nfjax.forward import footprint_box
    from nfjax.simulate import render_bits

    params, geom, _, _, grid = au
    tab = select_rings(hkls_from_params(params), params.rings_to_use)
    verts = triangle_vertices(grid[[1000]])                   # E = 1 um < 1.48 um pixels
    edge = float(2 * grid[1000, 4])
    assert edge == pytest.approx(1.0) and TIE_PROBE * edge > float(geom.px)
    cen = verts.mean(axis=1, keepdims=True)
    big = cen + TIE_PROBE * (verts - cen)
    e_a, e_b = np.array([[0.3, 0.5, 0.7]]), np.array([[1.1, 0.9, 0.2]])
    bits = np.union1d(
        render_bits(e_a, big, tab.g, tab.theta, geom, edge_length=TIE_PROBE * edge),
        render_bits(e_b, verts, tab.g, tab.theta, geom, edge_length=edge))
    obs = observe.from_bit_indices(geom.shape, bits)
    box = footprint_box(TIE_PROBE * edge, float(geom.px))
    enlarged = exact_fracs(np.vstack([e_a, e_b]), np.zeros(2, np.int64), big, tab.g,
                           tab.theta, obs, geom, box=box)
    assert enlarged[0] == 1.0 and enlarged[1] < 0.8, enlarged
    assert exact_fracs(e_b, np.zeros(1, np.int64), verts, tab.g, tab.theta, obs, geom,
                       box=1)[0] == 1.0

    def choose(eul, frac):
        frac = np.asarray(frac)
        w = Winners(voxel=np.zeros(len(frac), np.int64), orient=np.arange(len(frac)),
                    frac=frac, count=np.array([len(frac)]))
        key = tie_scores(w.voxel, eul, frac, verts, tab.g, tab.theta, obs, geom,
                         scale=TIE_PROBE, edge=edge)
        best, saved = select_solutions(w, eul, frac, 1, n_save=2, min_miso_deg=1.0,
                                       space_group=225, key=key)
        return int(best[0]), list(saved[0])

    assert choose(np.vstack([e_a, e_b]), [1.0, 1.0]) == (0, [0, 1])
    assert choose(np.vstack([e_b, e_a]), [1.0, 1.0]) == (1, [1, 0])
    assert choose(np.vstack([e_a, e_a]), [1.0, 1.0])[0] == 1                 # equal: later
    assert choose(np.vstack([e_a, e_b]), [0.9, 1.0]) == (1, [1, 0])          # not a tie


@pytest.mark.slow
def test_seeded_au_reconstruction_accuracy(au):
    """Seeded fit of the whole Au grid with the defaults; on the 1514 rendered voxels
    >= 99.5 % within 0.25° of the ground truth (measured 99.54 %, 7 misses; MIDAS 99.21 %)
    and mean confidence >= 0.97 (measured 0.979)."""
    from nfjax.fit import fit_grid

    params, geom, obs, table, grid = au
    res = fit_grid(params, grid, table, obs, progress=False)
    _check_accuracy(res.records, 0.995, 0.97)


def _check_accuracy(records, min_within, min_conf):
    truth = read_mic(MIDAS_AU / "Au_txt.mic").records
    key = {(round(r[3], 3), round(r[4], 3)): r for r in truth if r[10] >= 0.7}
    pairs = [(r, key[(round(r[3], 3), round(r[4], 3))]) for r in records
             if (round(r[3], 3), round(r[4], 3)) in key]
    assert len(pairs) == 1514
    got = np.array([p[0] for p in pairs])
    tru = np.array([p[1] for p in pairs])
    d = _miso_deg(got[:, 7:10], tru[:, 7:10])
    assert np.mean(d < 0.25) >= min_within
    assert np.mean(got[:, 10]) >= min_conf


# --------------------------------------------------------------------------- CLI and files
def _job(tmp_path: Path, n_rows: int = 24, **edits) -> Path:
    """A small fit job in ``tmp_path``: the Au parameters, the first grid rows around the
    sample centre, MIDAS's spot files; observations via --spots-info."""
    need(REF_RUN)
    text = (REF_RUN / "params_used.txt").read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith(("DataDirectory",
                                                                 "OutputDirectory"))]
    lines.append(f"OutputDirectory {tmp_path}")
    for k, v in edits.items():
        lines = [ln for ln in lines if not ln.startswith(k + " ")]
        lines.append(f"{k} {v}")
    (tmp_path / "params.txt").write_text("\n".join(lines) + "\n")
    grid = read_grid(REF_RUN / "grid.txt")
    centre = np.argsort(np.hypot(grid[:, 2], grid[:, 3] - 10))[:n_rows]
    write_grid(grid[np.sort(centre)], tmp_path / "grid.txt")
    for name in ("Key.bin", "DiffractionSpots.bin", "OrientMat.bin"):
        shutil.copy(REF_RUN / name, tmp_path / name)
    return tmp_path / "params.txt"


def _args(params, **kw):
    base = dict(params=str(params), block=0, nblocks=1, device=None, max_memory=None,
                polish=False, record_time=False,
                spots_info=str(REF_RUN / "SpotsInfo_lit.npz"))
    base.update(kw)
    return argparse.Namespace(**base)


def test_run_fit_writes_midas_files_and_blocks_agree(tmp_path):
    from nfjax.fit import run_fit

    params = _job(tmp_path)
    assert run_fit(_args(params)) == 0
    one = read_binary_mic(tmp_path / "Au_bin_Reconstructed.mic").records
    am = read_allmatches(tmp_path / "Au_bin_Reconstructed.mic.AllMatches", 3)
    txt = read_text_mic(tmp_path / "Au_txt_Reconstructed.mic")
    assert one.shape == (24, 11) and am.shape == (24, 19)
    assert np.count_nonzero(one[:, 10]) > 10
    np.testing.assert_array_equal(txt.records, np.round(one[one[:, 10] != 0], 6))
    np.testing.assert_array_equal(am[:, 3:7], one[:, 3:7])
    fitted = one[:, 10] > 0
    np.testing.assert_array_equal(am[fitted, 10], one[fitted, 10])   # slot 0 = the best
    # MIDAS's answer at the same rows.
    grid = read_grid(tmp_path / "grid.txt")
    full = read_grid(REF_RUN / "grid.txt")
    rows = [int(np.flatnonzero((full[:, 2] == g[2]) & (full[:, 3] == g[3]))[0]) for g in grid]
    ref = read_binary_mic(REF_RUN / "Au_bin_Reconstructed.mic").records[rows]
    # (the restart rounds may move a plateau voxel away from MIDAS's NLopt answer)
    assert np.mean(_miso_deg(one[fitted, 7:10], ref[fitted, 7:10]) < 0.25) >= 0.9
    # Two blocks written into the same files give the same bytes as one run.
    for f in tmp_path.glob("Au_*"):
        f.unlink()
    assert run_fit(_args(params, block=1, nblocks=2)) == 0
    half = read_binary_mic(tmp_path / "Au_bin_Reconstructed.mic").records
    assert np.all(half[:12] == 0) and np.array_equal(half[12:], one[12:])
    assert run_fit(_args(params, block=0, nblocks=2)) == 0
    np.testing.assert_array_equal(read_binary_mic(tmp_path / "Au_bin_Reconstructed.mic")
                                  .records, one)


@pytest.mark.parametrize("nblocks", [0, -3])
def test_run_fit_rejects_nblocks_below_one(tmp_path, nblocks):
    from nfjax.fit import run_fit

    params = _job(tmp_path, n_rows=4)
    with pytest.raises(NfjaxError, match=rf"^--nblocks: expected a positive integer, "
                                         rf"found {nblocks}$"):
        run_fit(_args(params, nblocks=nblocks))
    assert not list(tmp_path.glob("Au_*"))


def test_run_fit_checks_every_output_before_fitting(tmp_path, monkeypatch):
    """An unwritable MicFileText fails before the fit, and MicFileBinary is not touched."""
    from nfjax import fit as fitmod

    (tmp_path / "blocked").write_text("a file where a folder is expected")
    params = _job(tmp_path, n_rows=4, MicFileText=str(tmp_path / "blocked" / "t.mic"))
    monkeypatch.setattr(fitmod, "fit_grid", lambda *a, **k: pytest.fail("fitted"))
    with pytest.raises(NfjaxError, match=rf"^{tmp_path}/blocked/t.mic: cannot write "
                                         rf"\({tmp_path}/blocked is a file, not a folder\)$"):
        fitmod.run_fit(_args(params))
    assert not list(tmp_path.glob("Au_*"))


@pytest.mark.parametrize("flags, message", [
    (["--block", "1"], "--block 1: give --nblocks too (the number of blocks the grid is "
                       "split into)"),
    (["--nblocks", "2"], "--nblocks 2: give --block too (which block, 0..1, this process "
                         "fits)")])
def test_fit_block_flags_come_in_pairs(tmp_path, capsys, flags, message):
    from nfjax.cli import main

    params = _job(tmp_path, n_rows=4)
    assert main(["fit", str(params)] + flags) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"nfjax: error: {message}"
    assert not list(tmp_path.glob("Au_*"))


def test_run_fit_refuses_spot_files_and_hkls_from_other_inputs(tmp_path):
    """The spot files and hkls.csv in the output folder take priority, as in MIDAS; ones
    left from another seed set or other crystal keys are an error, not a silent fit."""
    from nfjax import fit as fitmod
    from nfjax.io.spots import read_spot_files

    need(REF_RUN)
    shutil.copy(REF_RUN / "seedOrientations.txt", tmp_path / "seeds.csv")
    params = _job(tmp_path, n_rows=4, SeedOrientations="seeds.csv")
    p = read_params(params)
    table = fitmod._load_spot_table(p, tmp_path, None, None, None, False)   # the seeds' own
    assert len(table) == len(read_spot_files(REF_RUN)) == 4
    (tmp_path / "seeds.csv").write_text("1,0,0,0\n" + (REF_RUN / "seedOrientations.txt")
                                        .read_text().split("\n", 1)[1])
    with pytest.raises(InputFileError, match=rf"^{tmp_path}/OrientMat.bin: its 4 orientations "
                                             rf"are not those of SeedOrientations {tmp_path}/"
                                             r"seeds.csv \(4 seeds\): the spot files are from "
                                             "another seed set; delete Key.bin"):
        fitmod.run_fit(_args(params))
    (tmp_path / "seeds.csv").write_text("1,0,0,0\n")
    with pytest.raises(InputFileError, match=r"\(1 seeds\)"):
        fitmod.run_fit(_args(params))
    shutil.copy(REF_RUN / "seedOrientations.txt", tmp_path / "seeds.csv")
    shutil.copy(REF_RUN / "hkls.csv", tmp_path / "hkls.csv")
    params = _job(tmp_path, n_rows=4, SeedOrientations="seeds.csv",
                  LatticeParameter="4.2 4.2 4.2 90 90 90")
    with pytest.raises(InputFileError, match=rf"^{tmp_path}/hkls.csv: not the reflections of "
                                             rf"{params} \(258 rows, the parameters give "):
        fitmod.run_fit(_args(params))
    assert not list(tmp_path.glob("Au_*"))


def test_run_fit_midas_refinement_flag(tmp_path):
    """``nfjax fit --midas-refinement`` writes what MIDAS's procedure in memory gives."""
    from nfjax.cli import build_parser
    from nfjax.fit import fit_grid, run_fit

    params = _job(tmp_path, n_rows=12)
    assert build_parser().parse_args(["fit", str(params), "--midas-refinement"]).midas_refinement
    assert run_fit(_args(params, midas_refinement=True)) == 0
    got = read_binary_mic(tmp_path / "Au_bin_Reconstructed.mic").records
    p = read_params(params)
    geom = geometry_from_params(p)
    obs = observe.from_bit_indices(geom.shape, np.load(REF_RUN / "SpotsInfo_lit.npz")["index"])
    want = fit_grid(p, read_grid(tmp_path / "grid.txt"), read_spot_files(tmp_path), obs,
                    prune_ratio=0.0, restarts=(), progress=False)
    assert want.n_pruned == 0 and want.n_restarted == 0
    np.testing.assert_array_equal(got, want.records)


def test_run_fit_bad_inputs(tmp_path, monkeypatch):
    from nfjax import fit as fitmod

    params = _job(tmp_path, n_rows=4)
    # SpotsInfo.bin of the wrong size.
    bad = tmp_path / "SpotsInfo.bin"
    bad.write_bytes(b"\0" * 1000)
    with pytest.raises(InputFileError, match=r"SpotsInfo.bin: expected 1509949440 bytes.*"
                                             r"found 1000 bytes"):
        fitmod.run_fit(_args(params, spots_info=None))
    # A folder given as the observations.
    with pytest.raises(InputFileError, match=rf"^{tmp_path}: expected a SpotsInfo.bin file, "
                                             r"found a directory$"):
        fitmod.run_fit(_args(params, spots_info=str(tmp_path)))
    # Key.bin / DiffractionSpots.bin mismatch.
    (tmp_path / "DiffractionSpots.bin").write_bytes(
        (REF_RUN / "DiffractionSpots.bin").read_bytes()[:-24])
    with pytest.raises(InputFileError, match="DiffractionSpots.bin: holds 381 spots but "
                                             "Key.bin counts 382"):
        fitmod.run_fit(_args(params))
    # No spot files: the seeds are read, and a malformed line is named.
    for name in ("Key.bin", "DiffractionSpots.bin", "OrientMat.bin"):
        (tmp_path / name).unlink()
    seeds = tmp_path / "seeds.csv"
    seeds.write_text("1,0,0,0\n0.5,abc,0.1,0.2\n")
    params = _job(tmp_path, n_rows=4, SeedOrientations=str(seeds))
    for name in ("Key.bin", "DiffractionSpots.bin", "OrientMat.bin"):
        (tmp_path / name).unlink()
    with pytest.raises(InputFileError, match=r"seeds.csv:2: expected 4 numbers"):
        fitmod.run_fit(_args(params))
    # Empty grid.
    params = _job(tmp_path, n_rows=4)
    (tmp_path / "grid.txt").write_text("0\n")
    with pytest.raises(NfjaxError, match="grid.*empty"):
        fitmod.run_fit(_args(params))
    # A run interrupted in the middle leaves no mic file behind.
    params = _job(tmp_path, n_rows=4)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fitmod, "refine", boom)
    with pytest.raises(KeyboardInterrupt):
        fitmod.run_fit(_args(params))
    assert not list(tmp_path.glob("Au_*"))


@pytest.mark.slow
def test_unseeded48_best_orientation_matches_midas():
    """48 voxels × 243,129 orientations: the best orientation agrees with MIDAS's within
    0.25° wherever MIDAS's confidence >= 0.5."""
    from nfjax.crystal import hkls_from_params, select_rings
    from nfjax.fit import fit_grid
    from nfjax.io.seeds import read_seeds
    from nfjax.spots import make_diffraction_spots

    u = need(REF_RUN / "unseeded48")
    params = read_params(u / "params_used.txt")
    geom = geometry_from_params(params)
    obs = observe.from_bit_indices(geom.shape, np.load(REF_RUN / "SpotsInfo_lit.npz")["index"])
    hk = select_rings(hkls_from_params(params), params.rings_to_use)
    spots = make_diffraction_spots(read_seeds(u / "seeds_random243129.csv.gz"), hk.g,
                                   hk.theta, geom, progress=False)
    grid = read_grid(u / "grid.txt")
    res = fit_grid(params, grid, spots, obs, progress=False)
    ref = read_binary_mic(u / "Au_bin_Reconstructed.mic").records
    if ref.shape[0] != grid.shape[0]:          # MIDAS may leave the file short (holes)
        ref = np.vstack([ref, np.zeros((grid.shape[0] - ref.shape[0], 11))])
    sure = ref[:, 10] >= 0.5
    assert sure.sum() >= 10
    d = _miso_deg(res.records[sure, 7:10], ref[sure, 7:10])
    assert np.all(d < 0.25), d


def test_merge_block_keeps_other_blocks_and_warns_on_a_foreign_file(tmp_path, capsys):
    """A block's rows go in at their place; a file of the grid's length keeps its other
    rows; one of another length is not kept (zeros), with a warning when this is one block
    of several (a whole-grid fit replaces any file silently, as it should)."""
    from nfjax.fit import _merge_block

    path = tmp_path / "m.bin"
    rows = np.full((2, 3), 7.0)
    other = np.arange(15, dtype="<f8").reshape(5, 3)
    other.tofile(path)
    merged = _merge_block(path, rows, 1, 5)
    assert np.array_equal(merged[[0, 3, 4]], other[[0, 3, 4]]) and np.all(merged[1:3] == 7)
    assert capsys.readouterr().err == ""
    np.arange(12, dtype="<f8").tofile(path)                  # 4 records: another grid
    merged = _merge_block(path, rows, 1, 5)
    assert np.all(merged[[0, 3, 4]] == 0) and np.all(merged[1:3] == 7)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {path}: 96 bytes, not the 5 x 3 float64 records of "
                          "this grid (120 bytes)") and err.count("\n") == 1, err
    assert np.all(_merge_block(path, np.ones((5, 3)), 0, 5) == 1)   # the whole grid
    assert capsys.readouterr().err == ""


def test_run_fit_checks_max_memory_before_loading(tmp_path, monkeypatch):
    from nfjax import fit as fitmod

    params = _job(tmp_path, n_rows=4)
    monkeypatch.setattr(fitmod.observe, "load_observations",
                        lambda *a: pytest.fail("loaded"))
    with pytest.raises(NfjaxError, match=r"^--max-memory: expected"):
        fitmod.run_fit(_args(params, max_memory="abc"))


def test_polish_never_lowers_a_voxel_and_moves_some(tmp_path):
    """``nfjax fit --polish``: an optax pass on the soft score after Nelder-Mead keeps a
    polished orientation only where the hard fraction is strictly higher, so no voxel's
    confidence drops, and on the Au rows some rise (the soft score's gradient leads
    somewhere better than the simplex stopped)."""
    from nfjax.fit import run_fit

    params = _job(tmp_path, n_rows=24)
    assert run_fit(_args(params)) == 0
    plain = read_binary_mic(tmp_path / "Au_bin_Reconstructed.mic").records
    assert run_fit(_args(params, polish=True)) == 0
    polished = read_binary_mic(tmp_path / "Au_bin_Reconstructed.mic").records
    assert np.all(polished[:, 10] >= plain[:, 10])
    moved = np.any(polished[:, 7:10] != plain[:, 7:10], axis=1)
    assert np.array_equal(moved, polished[:, 10] > plain[:, 10])   # moved only if better
    assert moved.any(), "no voxel improved: the test would not see a broken polish"
