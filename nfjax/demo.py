"""``nfjax demo``: the bundled MIDAS Au example, end to end, with timings.

Parses the example parameter file, lists its rings, builds the grid and the seeds from the
four far-field grains, predicts their spots, builds a four-grain ground truth (the sample
voxels of MIDAS's Au map cut into Voronoi cells about the far-field grain centres, with a
0.05° intragranular spread: MIDAS's own map holds only two of the four grains), renders it
into an observation volume (what a detector would record), reconstructs the map seeded from
the grains, compares it with the ground truth and draws the orientation and confidence
maps. Everything is written under the output folder with MIDAS's file names.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from nfjax.errors import NfjaxError


#: Intragranular spread of the demo's synthetic grains (deg) and its ground-truth file.
SPREAD_DEG = 0.05
TRUTH_NAME = "Au_4grains_truth.mic"


def _step(label: str, t0: float) -> float:
    t = time.perf_counter()
    print(f"  {label:<58s} {t - t0:6.2f} s")
    return t


def run_demo(out_dir: str | Path = "demo-output", progress: bool | None = None) -> int:
    from nfjax import __version__, observe
    from nfjax.crystal import hkls_from_params, reflections, ring_summary
    from nfjax.data import au_example
    from nfjax.geometry import geometry_from_params
    from nfjax.grid import grid_from_params
    from nfjax.io.gridfile import write_grid
    from nfjax.io.grains import read_grains_csv
    from nfjax.io.hkls import write_hkls_csv
    from nfjax.io.mic import read_mic, write_text_mic
    from nfjax.io.seeds import write_seeds_from_grains
    from nfjax.io.spots import write_spot_files
    from nfjax.params import read_params
    from nfjax.seeds import seeds_from_grains
    from nfjax.simulate import select_rendered, simulate_records, voronoi_microstructure
    from nfjax.spots import make_diffraction_spots

    from nfjax.io.atomic import check_target

    files = au_example()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NfjaxError(f"{out}: expected an output folder for the demo, found a file")
    check_target(out / "hkls.csv")           # a writable place, not the package folder
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NfjaxError(f"{out}: cannot create the output folder "
                         f"({(exc.strerror or str(exc)).lower()})") from None
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
    table = reflections(params, hkls)
    geom = geometry_from_params(params)
    spots = make_diffraction_spots(quats, table.g, table.theta, geom, progress=progress)
    write_spot_files(out, spots)
    t = _step(f"DiffractionSpots.bin: {int(spots.key[:, 0].sum())} predicted spots", t)
    # Ground truth: the sample voxels of MIDAS's Au map (confidence >= MinConfidence) cut
    # into Voronoi cells about the four far-field grain centres, each voxel turned by a
    # small random rotation. (MIDAS's own Au map holds only two of the four grains.)
    sample = select_rendered(read_mic(files["mic"]).records, params.min_confidence)
    rendered, label = voronoi_microstructure(sample, grains, spread_deg=SPREAD_DEG, seed=0)
    write_text_mic(out / TRUTH_NAME, rendered)
    sizes = " / ".join(str(int(n)) for n in np.bincount(label, minlength=len(grains.ids)))
    t = _step(f"{TRUTH_NAME}: {len(grains.ids)} grains ({sizes} voxels)", t)
    vol = simulate_records(params, rendered, hkls, progress=progress)
    t = _step(f"simulated observations: {observe.count(vol)} lit pixels from "
              f"{len(rendered)} voxels", t)
    return _reconstruct(params, grid, spots, vol, rendered, hkls, out, t, progress)


def _reconstruct(params, grid, spots, vol, rendered, hkls, out, t, progress) -> int:
    from nfjax.compare import compare_records, format_comparison
    from nfjax.fit import fit_grid
    from nfjax.io.mic import write_binary_mic, write_text_mic

    result = fit_grid(params, grid, spots, vol, hkls=hkls, progress=progress)
    write_binary_mic(out / "Au_bin_Reconstructed.mic", result.records)
    write_text_mic(out / "Au_txt_Reconstructed.mic", result.records)
    t = _step(f"reconstruction: {int((result.records[:, 10] > 0).sum())} voxels fitted", t)
    cmp = compare_records(result.records, rendered, space_group=params.space_group)
    print()
    print(f"accuracy against the ground truth ({len(rendered)} rendered voxels of "
          f"{TRUTH_NAME}):")
    print(format_comparison(cmp), end="")
    conf = result.records[result.records[:, 10] > 0][cmp.index_a, 10]
    print(f"mean confidence on those voxels: {float(np.mean(conf)):.3f}")
    try:
        from nfjax.plot import plot_mic

        png = plot_mic(out / "Au_txt_Reconstructed.mic", out / "Au_txt_Reconstructed.png",
                       space_group=params.space_group,
                       min_confidence=float(params.min_confidence or 0.0))
        print(f"orientation and confidence maps -> {png}")
    except (ImportError, NfjaxError) as exc:
        print(f"map not written: {exc}")
    print(f"all files in {out}/")
    return 0
