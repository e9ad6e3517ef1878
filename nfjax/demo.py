"""``nfjax demo``: the bundled MIDAS Au example, end to end, with timings.

Parses the example parameter file, lists its rings, builds the grid and the seeds from the
four far-field grains, predicts their spots, renders the known microstructure into an
observation volume (what a detector would record), and — where the fitting engine is
installed — reconstructs the map seeded from the grains and compares it with the ground
truth. Everything is written under the output folder with MIDAS's file names.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from nfjax.errors import NfjaxError


def _step(label: str, t0: float) -> float:
    t = time.perf_counter()
    print(f"  {label:<58s} {t - t0:6.2f} s")
    return t


def run_demo(out_dir: str | Path = "demo-output", progress: bool | None = None) -> int:
    from nfjax import __version__, observe
    from nfjax.crystal import hkls_from_params, ring_summary, select_rings
    from nfjax.data import au_example
    from nfjax.geometry import geometry_from_params
    from nfjax.grid import grid_from_params
    from nfjax.io.gridfile import write_grid
    from nfjax.io.grains import read_grains_csv
    from nfjax.io.hkls import write_hkls_csv
    from nfjax.io.mic import read_mic
    from nfjax.io.seeds import write_seeds_from_grains
    from nfjax.io.spots import write_spot_files
    from nfjax.params import read_params
    from nfjax.seeds import seeds_from_grains
    from nfjax.simulate import select_rendered, simulate_records
    from nfjax.spots import make_diffraction_spots

    files = au_example()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"nfjax {__version__} demo: the MIDAS Au example ({files['params'].name}: "
          f"2 distances x 1440 frames of 2048^2 px, Au Fm-3m)")
    params = read_params(files["params"])
    t0 = time.perf_counter()
    hkls = hkls_from_params(params)
    write_hkls_csv(hkls, out / "hkls.csv")
    t = _step(f"hkls.csv: {len(hkls)} reflections in {int(hkls.ring.max())} rings", t0)
    for line in ring_summary(hkls)[:3]:
        print(f"      {line}")
    print("      ...")
    grid = grid_from_params(params)
    write_grid(grid, out / "grid.txt")
    t = _step(f"grid.txt: {len(grid)} triangles (GridSize {params.grid_size:g} um)", t)
    grains = read_grains_csv(files["grains"])
    quats = seeds_from_grains(grains)
    write_seeds_from_grains(out / "seeds.csv", quats, grains)
    t = _step(f"seeds.csv: {len(quats)} seed orientations from the far-field grains", t)
    table = select_rings(hkls, params.rings_to_use)
    geom = geometry_from_params(params)
    spots = make_diffraction_spots(quats, table.g, table.theta, geom, progress=progress)
    write_spot_files(out, spots)
    t = _step(f"DiffractionSpots.bin: {int(spots.key[:, 0].sum())} predicted spots", t)
    truth = read_mic(files["mic"])
    rendered = select_rendered(truth.records, params.min_confidence)
    vol = simulate_records(params, rendered, hkls, progress=progress)
    t = _step(f"simulated observations: {observe.count(vol)} lit pixels from "
              f"{len(rendered)} voxels", t)
    try:
        from nfjax.fit import fit_grid  # noqa: F401
    except ImportError:
        print()
        print("The fitting engine (nfjax fit) has not landed yet: the demo stops after "
              "simulating the observations.")
        return 0
    return _reconstruct(params, grid, spots, vol, rendered, truth, hkls, out, t, progress)


def _reconstruct(params, grid, spots, vol, rendered, truth, hkls, out, t, progress) -> int:
    from nfjax.compare import compare_records, format_comparison
    from nfjax.fit import fit_grid
    from nfjax.io.mic import write_binary_mic, write_text_mic

    result = fit_grid(params, grid, spots, vol, hkls=hkls, progress=progress)
    write_binary_mic(out / "Au_bin_Reconstructed.mic", result.records)
    write_text_mic(out / "Au_txt_Reconstructed.mic", result.records)
    t = _step(f"reconstruction: {int((result.records[:, 10] > 0).sum())} voxels fitted", t)
    cmp = compare_records(result.records, rendered, space_group=params.space_group)
    print()
    print(f"accuracy against the ground truth ({len(rendered)} voxels with confidence >= "
          f"{params.min_confidence:g} in {files_truth_name(truth)} were rendered):")
    print(format_comparison(cmp), end="")
    conf = result.records[result.records[:, 10] > 0][cmp.index_a, 10]
    print(f"mean confidence on those voxels: {float(np.mean(conf)):.3f}")
    try:
        from nfjax.plot import plot_mic

        png = plot_mic(out / "Au_txt_Reconstructed.mic", out / "Au_txt_Reconstructed.png",
                       space_group=params.space_group)
        print(f"orientation and confidence maps -> {png}")
    except (ImportError, NfjaxError) as exc:
        print(f"map not written: {exc}")
    print(f"all files in {out}/")
    return 0


def files_truth_name(truth) -> str:
    return Path(str(truth.path)).name if getattr(truth, "path", None) else "the ground truth"
