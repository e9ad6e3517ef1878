"""The smooth overlap surrogate: gradients against central finite differences (float64),
jit/vmap composition, and the surrogate's maximum at the true orientation."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, need
from nfjax import observe
from nfjax.crystal import hkls_from_params, select_rings
from nfjax.geometry import geometry_from_params
from nfjax.grid import triangle_vertices
from nfjax.io.mic import read_mic
from nfjax.orientation import euler_to_matrix
from nfjax.params import read_params
from nfjax.score import soft_overlap
from nfjax.simulate import mic_grid_rows, select_rendered


@pytest.fixture(scope="module")
def setup():
    from conftest import MIDAS_AU, REF_RUN

    need(REF_RUN)
    params = read_params(REF_RUN / "params_used.txt")
    table = select_rings(hkls_from_params(params), params.rings_to_use)
    geom = geometry_from_params(params)
    obs = observe.from_bit_indices(geom.shape,
                                   np.load(REF_RUN / "SpotsInfo_lit.npz")["index"]).to_device()
    recs = select_rendered(read_mic(MIDAS_AU / "Au_txt.mic").records, params.min_confidence)
    verts = triangle_vertices(mic_grid_rows(recs))
    return params, jnp.asarray(table.g), jnp.asarray(table.theta), geom, obs, recs, verts


def _fd(f, x, h):
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        out[i] = (float(f(jnp.asarray(x + e))) - float(f(jnp.asarray(x - e)))) / (2 * h)
    return out


@pytest.mark.parametrize("voxel", [100, 900])
def test_gradients_match_finite_differences(setup, voxel):
    _, g, th, geom, obs, recs, verts = setup
    eul0 = jnp.asarray(recs[voxel, 7:10]) + 0.002      # off the optimum: non-zero gradient
    v0 = jnp.asarray(verts[voxel])

    # The observation words are passed as an argument, never closed over: a closed-over
    # array becomes a compile-time constant (1.5 GB here).
    @jax.jit
    def score_w(eul, vv, gm, words):
        return soft_overlap(vv, euler_to_matrix(eul), g, th, gm, words, obs.shape,
                            sigma=1.5, window=7)

    def score(eul, vv, gm):
        return score_w(eul, vv, gm, obs.words)

    grads = jax.jit(jax.grad(score_w, argnums=(0, 1, 2)))(eul0, v0, geom, obs.words)
    checks = [
        ("euler", grads[0], lambda x: score(x, v0, geom), eul0, 1e-6),
        ("verts", grads[1], lambda x: score(eul0, x, geom), v0, 1e-4),
        ("lsd", grads[2].lsd, lambda x: score(eul0, v0, dataclasses.replace(geom, lsd=x)),
         geom.lsd, 1e-3),
        ("ybc", grads[2].ybc, lambda x: score(eul0, v0, dataclasses.replace(geom, ybc=x)),
         geom.ybc, 1e-5),
        ("zbc", grads[2].zbc, lambda x: score(eul0, v0, dataclasses.replace(geom, zbc=x)),
         geom.zbc, 1e-5),
        ("tilts", grads[2].tilts, lambda x: score(eul0, v0, dataclasses.replace(geom, tilts=x)),
         geom.tilts, 1e-6),
        ("px", grads[2].px, lambda x: score(eul0, v0, dataclasses.replace(geom, px=x)),
         geom.px, 1e-7),
    ]
    for name, ad, f, x, h in checks:
        ad = np.asarray(ad)
        fd = _fd(f, x, h)
        assert np.all(np.isfinite(ad)), name
        scale = max(np.abs(fd).max(), 1e-8)
        assert np.abs(ad - fd).max() <= 2e-3 * scale + 1e-9, (name, ad, fd)
    assert np.abs(np.asarray(grads[0])).max() > 1e-3      # the test is not vacuous


def test_a_reflection_on_the_rotation_axis_keeps_gradients_finite(setup):
    """A reflection with Gx = Gy = 0 exactly (a cubic crystal at the identity with a diagonal
    B gives (002)) has no ω solution; it must not turn every gradient into NaN (√ and atan2
    at the origin had infinite derivatives, times its zero weight). The voxel's reflections
    are given pre-rotated into the lab frame with U = I, plus one exact axis row; the
    gradient in U is checked against central differences (float64)."""
    _, g, th, geom, obs, recs, verts = setup
    u0 = np.asarray(euler_to_matrix(jnp.asarray(recs[100, 7:10]) + 0.002))
    g_axis = jnp.asarray(np.vstack([np.asarray(g) @ u0.T, [0.0, 0.0, 0.49]]))
    th_axis = jnp.concatenate([th, th[:1]])
    v0 = jnp.asarray(verts[100])

    # the words as an argument: closed over, they would become a 1.5 GB constant
    @jax.jit
    def score(u, words):
        return soft_overlap(v0, u, g_axis, th_axis, geom, words, obs.shape, sigma=1.5,
                            window=7)

    eye = jnp.eye(3, dtype=g_axis.dtype)
    ad = np.asarray(jax.jit(jax.grad(score))(eye, obs.words))
    assert np.all(np.isfinite(ad)), ad
    fd = _fd(lambda u: score(u, obs.words), np.eye(3), 1e-6)
    assert np.abs(ad).max() > 1e-3                         # not vacuous
    assert np.abs(ad - fd).max() <= 2e-3 * np.abs(fd).max(), (ad, fd)


def test_spot_gradient_with_a_reflection_on_the_rotation_axis(setup):
    """predict_spots alone: the ω of an ordinary reflection, differentiated in the Euler
    angles at the identity, where the other reflection lies on the rotation axis."""
    from nfjax.forward import predict_spots
    geom = setup[3]
    g = jnp.array([[0.0, 0.0, 0.49], [0.35, 0.2, 0.1]])
    theta = jnp.array([2.0, 2.3])

    def omega(e):
        return predict_spots(euler_to_matrix(e), g, theta, geom).omega[2]

    e0 = jnp.zeros(3)
    ad = np.asarray(jax.grad(omega)(e0))
    assert np.all(np.isfinite(ad)), ad
    np.testing.assert_allclose(ad, _fd(omega, np.zeros(3), 1e-6), rtol=1e-6)
    np.testing.assert_allclose(ad, np.asarray(jax.jacfwd(omega)(e0)), rtol=1e-9)


@pytest.mark.parametrize("voxel", [100, 600])
def test_soft_score_has_no_jumps(setup, voxel):
    """Along a 2 mrad line in Phi (401 points, each spot crossing several pixels), the
    central difference of neighbouring scores equals the gradient everywhere, to 1e-4 of
    its largest value. A splat whose neighbourhood follows the spot pixel by pixel jumps
    where the neighbourhood moves unless the splat is zero at its edge: with truncated
    Gaussians the differences were 20-33 % off (jumps of ~1e-4 in the score)."""
    _, g, th, geom, obs, recs, verts = setup
    score = jax.vmap(lambda e, v, w: soft_overlap(v, euler_to_matrix(e), g, th, geom, w,
                                                  obs.shape), in_axes=(0, None, None))
    grad = jax.vmap(jax.grad(lambda e, v, w: soft_overlap(v, euler_to_matrix(e), g, th, geom,
                                                          w, obs.shape)),
                    in_axes=(0, None, None))
    e0 = np.asarray(recs[voxel, 7:10]) + np.radians([0.05, -0.03, 0.04])
    ts = np.linspace(-1e-3, 1e-3, 401)
    eul = np.tile(e0, (len(ts), 1))
    eul[:, 1] += ts
    s = np.asarray(jax.jit(score)(jnp.asarray(eul), jnp.asarray(verts[voxel]), obs.words))
    ad = np.asarray(jax.jit(grad)(jnp.asarray(eul), jnp.asarray(verts[voxel]), obs.words))
    fd = (s[2:] - s[:-2]) / (2 * (ts[1] - ts[0]))
    assert np.abs(ad[:, 1]).max() > 10                       # not a flat stretch
    assert np.abs(fd - ad[1:-1, 1]).max() < 1e-4 * np.abs(ad[:, 1]).max()


def test_soft_score_names_a_bad_argument(setup):
    """Wrong shapes or words are a ValueError naming the argument when the score is
    traced, not an error from inside a JAX primitive or a silently wrong score."""
    _, g, th, geom, obs, recs, verts = setup
    u, v = euler_to_matrix(jnp.asarray(recs[0, 7:10])), jnp.asarray(verts[0])
    cases = [
        ((jnp.zeros(3), u, g, th, geom, obs.words, obs.shape), r"^verts must be one probe "),
        ((jnp.zeros((8, 3, 2)), u, g, th, geom, obs.words, obs.shape), r"use jax.vmap"),
        ((v, u, g.T, th, geom, obs.words, obs.shape), r"^g must be reflections \(R, 3\)"),
        ((v, u, g, th[:5], geom, obs.words, obs.shape), r"^theta must be \(258,\)"),
        ((v, u, g, th, geom, obs.words[:1000], obs.shape), r"^words must be the volume's "),
        ((v, u, g, th, geom, jnp.full(10, 0xFFFFFFFF, jnp.uint32), obs.shape), r"got uint32 "),
        ((v, u, g, th, geom, obs.words.astype(jnp.float32), obs.shape), r"got float32"),
        ((v, u, g, th, geom, obs.words, (3, *obs.shape[1:])), r"^shape must be the "),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            soft_overlap(*args)
    with pytest.raises(ValueError, match=r"^window must be a positive odd number, got 4$"):
        soft_overlap(v, u, g, th, geom, obs.words, obs.shape, window=4)


def test_surrogate_peaks_at_true_orientation_and_vmaps(setup):
    _, g, th, geom, obs, recs, verts = setup
    idx = np.arange(0, len(recs), 151)
    eul = jnp.asarray(recs[idx, 7:10])
    vv = jnp.asarray(verts[idx])
    f = jax.jit(jax.vmap(lambda e, v, w: soft_overlap(v, euler_to_matrix(e), g, th, geom,
                                                      w, obs.shape), in_axes=(0, 0, None)))
    at_truth = np.asarray(f(eul, vv, obs.words))
    off = np.asarray(f(eul + jnp.asarray([0.0, 0.01, 0.0]), vv, obs.words))   # 0.57 deg off
    assert at_truth.shape == (len(idx),)
    assert np.all(at_truth > off)
    assert np.all(at_truth > 0.2) and np.all(off < at_truth * 0.8)


# About 45 s on a cold compilation cache: kept out of the default run, which must stay under
# 15 minutes on 2 cores (the gradient itself is checked against central differences above).
@pytest.mark.slow
def test_recover_lsd_example_script():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "recover_lsd.py"),
                          "--voxels", "48", "--steps", "50"], capture_output=True, text=True,
                         check=True, timeout=600).stdout
    last = out.strip().splitlines()[-1]
    err = float(last.split("error")[1].split("um")[0])
    assert abs(err) < 2.0, out


@pytest.fixture(scope="module")
def small_scan():
    """The Au example shrunk to 256² pixels of 11.84 µm, 1° frames, and the 12 confident
    voxels nearest the centre of its ground truth."""
    from conftest import MIDAS_AU

    need(MIDAS_AU)
    base = read_params(MIDAS_AU / "ps_au.txt")
    base = base.replace(nr_pixels_y=256, nr_pixels_z=256, px=11.84, omega_step=-1.0,
                        bc=tuple((y / 8, z / 8) for y, z in base.bc))
    recs = read_mic(MIDAS_AU / "Au_txt.mic").records
    recs = recs[recs[:, 10] >= 0.7]
    recs = recs[np.argsort(np.hypot(recs[:, 3], recs[:, 4]), kind="stable")[:12]]
    return base, recs


def _truth_scores(params, recs, wedge_scored=None):
    """Mean soft score of the voxels at their true orientations against their own simulated
    scan, the geometry's wedge optionally replaced; and the gradient in the wedge."""
    from nfjax.simulate import simulate_records

    hk = hkls_from_params(params)
    refl = select_rings(hk, params.rings_to_use)
    g, th = jnp.asarray(refl.g), jnp.asarray(refl.theta)
    vol = simulate_records(params, recs, hk, progress=False)
    geom = geometry_from_params(params)
    if wedge_scored is not None:
        geom = dataclasses.replace(geom, wedge=jnp.asarray(wedge_scored, jnp.float64))
    verts = jnp.asarray(triangle_vertices(mic_grid_rows(recs)))

    @jax.jit
    def score(eul, vv, gm, words):
        return soft_overlap(vv, euler_to_matrix(eul), g, th, gm, words, vol.shape)

    words = jnp.asarray(vol.words)
    eul = jnp.asarray(recs[:, 7:10])
    mean = float(np.mean([score(eul[i], verts[i], geom, words) for i in range(len(recs))]))
    return mean, (score, eul[0], verts[0], geom, words)


def test_soft_score_applies_the_wedge(small_scan):
    """The surrogate bins ω as the hard score does, wedge correction included: at Wedge 3°
    the true orientations score as at Wedge 0, scoring them with the wedge left out loses
    most of it (it used to be left out always), and the wedge gradient matches central
    differences."""
    base, recs = small_scan
    params = base.replace(end_nr=359, nr_files_per_distance=360)
    flat, _ = _truth_scores(params, recs)
    tilted, (score, e0, v0, geom, words) = _truth_scores(params.replace(wedge=3.0), recs)
    ignored, _ = _truth_scores(params.replace(wedge=3.0), recs, wedge_scored=0.0)
    assert flat > 0
    assert tilted > 0.7 * flat, (tilted, flat)
    assert ignored < 0.25 * tilted, (ignored, tilted)
    ad = float(jax.grad(score, argnums=2)(e0, v0, geom, words).wedge)
    h = 1e-5                  # the frame window moves in steps: a larger h straddles one
    fd = (float(score(e0, v0, dataclasses.replace(geom, wedge=geom.wedge + h), words))
          - float(score(e0, v0, dataclasses.replace(geom, wedge=geom.wedge - h), words))) / (2 * h)
    assert ad != 0 and abs(ad - fd) <= 1e-4 * abs(fd), (ad, fd)


def test_soft_score_counts_only_spots_in_the_scan(small_scan):
    """Spots whose frame is outside the scan do not dilute the surrogate (the hard score
    skips them too): a 40° partial scan scores the truth like the full 360° one; counting
    them, it scored about a tenth of that."""
    base, recs = small_scan
    full, _ = _truth_scores(base.replace(end_nr=359, nr_files_per_distance=360), recs)
    part, _ = _truth_scores(base.replace(end_nr=39, nr_files_per_distance=40), recs)
    assert full > 0
    assert 0.5 * full < part < 2.0 * full, (part, full)
