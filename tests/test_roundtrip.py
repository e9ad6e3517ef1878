"""End to end through files: ``nfjax simulate --tiff-dir`` renders raw-like frames of the Au
example, ``nfjax process`` turns them back into an observation volume, and the lit pixels
must come back (≥ 99 % recall, ≤ 1 % false lit pixels)."""
from __future__ import annotations

import numpy as np
import pytest

from nfjax import observe
from nfjax.cli import main
from nfjax.data import au_example
from nfjax.params import read_params, update_param_text


def _params(tmp_path, n_frames: int):
    text = au_example()["params"].read_text()
    text = update_param_text(text, {
        "EndNr": n_frames - 1, "NrFilesPerDistance": n_frames,
        "OrigFileName": "au_sim", "extOrig": "tif", "ReducedFileName": "au_red",
        "DataDirectory": str(tmp_path), "OutputDirectory": str(tmp_path),
        # The rendered background is Poisson(100) (sigma 10): subtract 6 sigma after the
        # median, and do not median-filter (each Au spot pixel is one voxel's footprint).
        "BlanketSubtraction": 60, "MedFiltRadius": 0, "DoLoGFilter": 0,
    })
    path = tmp_path / "params.txt"
    path.write_text(text)
    return path


def _round_trip(tmp_path, n_frames: int):
    params_path = _params(tmp_path, n_frames)
    sim = tmp_path / "SpotsInfo_sim.bin"
    assert main(["simulate", str(params_path), str(au_example()["mic"]), "-o", str(sim),
                 "--tiff-dir", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("au_sim_*.tif"))) == 2 * n_frames
    proc = tmp_path / "SpotsInfo.bin"
    assert main(["process", str(params_path), "-o", str(proc)]) == 0
    shape = observe.spots_info_shape(read_params(params_path))
    truth = observe.lit_indices(observe.read_spots_info(sim, shape))
    found = observe.lit_indices(observe.read_spots_info(proc, shape))
    recall = np.intersect1d(truth, found).size / truth.size
    false = np.setdiff1d(found, truth).size / found.size
    return truth.size, recall, false, params_path, sim, proc


def test_simulate_tiff_then_process_recovers_lit_pixels(tmp_path):
    n_truth, recall, false, *_ = _round_trip(tmp_path, n_frames=8)
    assert n_truth > 150                      # 2 degrees of rotation, both distances
    assert recall >= 0.99, recall
    assert false <= 0.01, false


@pytest.mark.slow
def test_round_trip_many_frames_then_reconstruct(tmp_path):
    """120 frames (30 deg): pixels come back, and a seeded fit from the processed volume
    gives the same map as a fit from the simulated volume."""
    from nfjax.crystal import hkls_from_params, select_rings
    from nfjax.fit import fit_grid
    from nfjax.geometry import geometry_from_params
    from nfjax.grid import grid_from_params
    from nfjax.io.grains import read_grains_csv
    from nfjax.orientation import euler_to_quat, misorientation
    from nfjax.crystal import symmetry_quaternions
    from nfjax.seeds import seeds_from_grains
    from nfjax.spots import make_diffraction_spots

    n_truth, recall, false, params_path, sim, proc = _round_trip(tmp_path, n_frames=120)
    assert n_truth > 5000
    assert recall >= 0.99 and false <= 0.01, (recall, false)
    params = read_params(params_path).replace(grid_mask=(-20.0, 20.0, -20.0, 20.0))
    shape = observe.spots_info_shape(params)
    refl = select_rings(hkls_from_params(params), params.rings_to_use)
    quats = seeds_from_grains(read_grains_csv(au_example()["grains"]))
    spots = make_diffraction_spots(quats, refl.g, refl.theta, geometry_from_params(params),
                                   progress=False)
    grid = grid_from_params(params)
    ideal = fit_grid(params, grid, spots, observe.read_spots_info(sim, shape),
                     progress=False).records
    got = fit_grid(params, grid, spots, observe.read_spots_info(proc, shape),
                   progress=False).records
    sure = ideal[:, 10] >= 0.5
    assert sure.sum() > 50
    miso = np.degrees(np.asarray(misorientation(euler_to_quat(got[sure, 7:10]),
                                                euler_to_quat(ideal[sure, 7:10]),
                                                symmetry_quaternions(225))))
    assert np.mean(miso < 0.25) >= 0.99, np.mean(miso < 0.25)
    assert abs(float(np.mean(got[sure, 10] - ideal[sure, 10]))) < 0.02
