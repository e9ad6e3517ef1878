"""Benchmark of ``nfjax reconstruct`` on the bundled Au example, end to end.

(a) Single resolution, as MIDAS's NF benchmark runs it: simulate the observations from the
    ground truth (``nfjax simulate``), then ``nfjax reconstruct --ff-seeds
    --no-image-processing`` (hkls, seeds from grs.csv, grid, spots, fit, text mic, map).
    MIDAS C end to end: 27–30 s on 2 threads of this machine class.
(b) Multi-resolution (``--multi``): ``GridRefactor 5.0 2.0 2``, the configuration of the
    slow test ``test_multi_resolution_au``: observations of the ground truth rendered as a
    solid sample (TriEdgeSize 2.5), a uniform cubic library of ``--resolution`` degrees
    for loop 0 (default 1.0: 591k) and of ``--retry-resolution`` degrees for the retries
    of loops 1–2 (default 2.0: 74k), the grid limited by a tomography outline of the
    sample. Loop 0 screens 238M pairs: about 3 min on 2 CPU cores. ``--smooth``: the same
    on the physically smooth sample of (c) (each grain its mean orientation), where a 1°
    library's seeds near the Φ ≈ 6° grain all screen below MinFracAccept (what the near
    misses of library passes are for).
(c) The ceiling of the same data (``--ceiling``, about 4 min): single resolution on the
    solid observations of (b), seeded with the four true grains (grs.csv) on the 2.5 µm
    grid, whose voxels sit exactly on the ground-truth voxels: nfjax's refinement, MIDAS's
    (``--midas-refinement``) and nfjax's with a space-filling probe (EdgeLength = GridSize);
    and on the 1.25 µm grid of (b)'s last loop. It measures what a per-voxel fit can reach on these observations, with no library or
    multi-resolution error, against (b)'s accuracy. Then the same for a physically smooth
    sample: every rendered voxel given its grain's mean orientation, rendered the same way
    and fitted seeded with those means (the orientations exactly right), and the boundary
    oracle: the first row of voxels along the grain boundary scored with both grains'
    exact orientations under probes of several sizes (what the hard fraction can tell
    apart at all).

Prints the work done and the time per stage; ``--record`` appends a row to RESULTS.md.

    .venv/bin/python benchmarks/bench_reconstruct.py [--multi [--smooth]] [--ceiling] [--record]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _prepare(directory: Path, **changes) -> Path:
    from nfjax.data import au_example
    from nfjax.params import update_param_text

    files = au_example()
    shutil.copy(files["grains"], directory / "grs.csv")
    values = {"DataDirectory": ".", "GrainsFile": "grs.csv", "SeedOrientations": "seeds.csv"}
    values.update(changes)
    path = directory / "params.txt"
    path.write_text(update_param_text(files["params"].read_text(), values))
    return path


def _rendered() -> np.ndarray:
    """The Au ground-truth voxels that are rendered (MIDAS's MinConfidence rule)."""
    from nfjax.data import au_example
    from nfjax.io.mic import read_mic
    from nfjax.params import read_params
    from nfjax.simulate import select_rendered

    files = au_example()
    return select_rendered(read_mic(files["mic"]).records,
                           read_params(files["params"]).min_confidence)


def _smooth_truth(rendered: np.ndarray, directory: Path):
    """The rendered ground truth with every grain given its mean orientation (a physically
    smooth sample, ``nfjax.simulate.grain_mean_records``); writes those means as
    ``grains_mean.csv`` (a GrainsFile for ``--ff-seeds``) into ``directory``. Returns the
    records and the grains."""
    from nfjax.cluster import write_grains_csv
    from nfjax.data import au_example
    from nfjax.params import read_params
    from nfjax.simulate import grain_mean_records

    smooth, grains = grain_mean_records(rendered, read_params(au_example()["params"]))
    write_grains_csv(directory / "grains_mean.csv", grains)
    return smooth, grains


def _solid_observations(directory: Path, records: np.ndarray) -> None:
    """SpotsInfo.bin and tomo.raw of mic ``records`` (the rendered Au voxels) rendered as a
    solid sample (each 2.5 µm voxel's whole triangle) into ``directory``."""
    from nfjax import observe
    from nfjax.crystal import hkls_from_params
    from nfjax.data import au_example
    from nfjax.params import read_params
    from nfjax.simulate import simulate_records, tomo_outline

    solid = records.copy()
    solid[:, 5] = 2.5                                   # TriEdgeSize = GridSize
    p_au = read_params(au_example()["params"])
    observe.write_spots_info(directory / "SpotsInfo.bin", simulate_records(
        p_au, solid, hkls_from_params(p_au), progress=False))
    (directory / "tomo.raw").write_bytes(tomo_outline(records, pixel_size=0.25, size=512,
                                                      radius=1.5).tobytes())


def _boundary_oracle(run_dir: Path, smooth: np.ndarray, grains,
                     edges=(1.0, 1.5, 2.0, 2.5, 3.0, 4.0)) -> str:
    """On the smooth-truth observations: the voxels of the first row along the grain
    boundary (a voxel of the other grain at the 1.44 µm neighbour spacing), each scored
    with both grains' exact mean orientations for probes of several edges (µm) about its
    centroid. Returns how often the hard fraction prefers the right grain, ties or
    prefers the wrong one: what the per-voxel score can tell apart with perfect
    orientations."""
    import jax.numpy as jnp

    from nfjax.crystal import hkls_from_params, select_rings, symmetry_quaternions
    from nfjax.fit import exact_fracs
    from nfjax.observe import load_observations
    from nfjax.forward import footprint_box
    from nfjax.geometry import geometry_from_params
    from nfjax.grid import triangle_vertices
    from nfjax.io.gridfile import read_grid
    from nfjax.orientation import euler_to_matrix_midas, matrix_to_quat, misorientation
    from nfjax.params import read_params

    params = read_params(run_dir / "params.txt")
    geom = geometry_from_params(params)
    obs = load_observations(run_dir / "SpotsInfo.bin", geom.shape)
    table = select_rings(hkls_from_params(params), params.rings_to_use)
    grid = read_grid(run_dir / "grid.txt")
    verts = triangle_vertices(grid)
    grain = grains.voxel_grain - 1                        # 0-based
    if np.any(grain < 0):
        raise SystemExit(f"boundary oracle: {np.sum(grain < 0)} rendered voxels joined no "
                         "grain; the oracle needs every voxel in a grain")
    means = np.stack([smooth[grain == k][0, 7:10] for k in range(len(grains))])
    xy = smooth[:, 3:5]
    dist = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    dist[grain[:, None] == grain[None]] = np.inf
    first = np.flatnonzero(dist.min(axis=1) < 1.5)
    row = ((xy[first, None] - grid[None, :, 2:4]) ** 2).sum(-1).argmin(axis=1)
    centre = verts.mean(axis=1, keepdims=True)
    edge0 = float(2 * grid[0, 4])
    parts = []
    for e in edges:
        big = centre + (e / edge0) * (verts - centre)
        box = footprint_box(e, float(params.px))
        f = np.stack([exact_fracs(np.repeat(means[k:k + 1], first.size, 0), row, big,
                                  table.g, table.theta, obs, geom, box=box)
                      for k in range(len(means))], axis=1)
        right = f[np.arange(first.size), grain[first]]
        f[np.arange(first.size), grain[first]] = -1.0
        wrong = f.max(axis=1)
        parts.append(f"E {e:g}: {(right > wrong).sum()}/{(right == wrong).sum()}/"
                     f"{(right < wrong).sum()}")
    q = matrix_to_quat(euler_to_matrix_midas(jnp.asarray(means)))
    twin = float(np.degrees(misorientation(q[0], q[1], jnp.asarray(
        symmetry_quaternions(int(params.space_group)))))) if len(means) == 2 else float("nan")
    return (f"boundary oracle (smooth truth, exact grain orientations, {len(means)} grains "
            f"{twin:.2f} deg apart): of the {first.size} voxels in the first row along the "
            f"boundary, right grain better / tied / wrong grain better with a probe of edge "
            f"E um: " + ", ".join(parts))


def _flip_test(records: np.ndarray, grain: np.ndarray, label: str) -> str:
    """Do the observations tell the twins apart at all? Each voxel of the first row along a
    grain boundary (a voxel of another grain within 1.5 µm) is given the orientation of its
    nearest voxel of the other grain, and its solid 2.5 µm render is compared with its own:
    the pixels it alone lit that would go dark, and the pixels it would light that are dark.
    A flip that changes neither is invisible to any method; one that changes some pixels is
    visible in the observations, whether or not a per-voxel score sees it."""
    import jax.numpy as jnp

    from nfjax.crystal import hkls_from_params, select_rings
    from nfjax.data import au_example
    from nfjax.forward import footprint_box
    from nfjax.geometry import geometry_from_params
    from nfjax.grid import triangle_vertices
    from nfjax.params import read_params
    from nfjax.simulate import _voxel_hits_fn, mic_grid_rows

    p = read_params(au_example()["params"])
    geom = geometry_from_params(p).astype(jnp.float64)
    table = select_rings(hkls_from_params(p), p.rings_to_use)
    solid = records.copy()
    solid[:, 5] = 2.5
    verts = triangle_vertices(mic_grid_rows(solid))
    fn = _voxel_hits_fn(jnp.asarray(table.g), jnp.asarray(table.theta), geom,
                        footprint_box(2.5, float(p.px)))

    def bit_sets(eulers, rows):
        out = []
        for s in range(0, len(rows), 256):
            bits, lit = (np.asarray(a) for a in fn(jnp.asarray(eulers[s:s + 256]),
                                                    jnp.asarray(verts[rows[s:s + 256]])))
            out += [np.unique(b[m]) for b, m in zip(bits, lit)]
        return out

    xy = records[:, 3:5]
    dist = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    dist[grain[:, None] == grain[None]] = np.inf
    first = np.flatnonzero(dist.min(axis=1) < 1.5)
    own = bit_sets(records[:, 7:10], np.arange(len(records)))
    lit, count = np.unique(np.concatenate(own), return_counts=True)
    alone = set(lit[count == 1].tolist())
    lit = set(lit.tolist())
    flipped = bit_sets(records[dist.argmin(axis=1)[first], 7:10], first)
    dark = np.array([sum(b in alone for b in own[v].tolist()) for v in first])
    new = np.array([sum(b not in lit for b in f.tolist()) for f in flipped])
    return (f"flip test ({label}): of the {first.size} first-row boundary voxels given the "
            f"other grain's orientation, {int(np.sum((dark == 0) & (new == 0)))} change no "
            f"observed pixel; {int(np.sum(dark > 0))} darken pixels only they lit (median "
            f"{int(np.median(dark))}), {int(np.sum(new > 0))} light dark pixels (median "
            f"{int(np.median(new))})")


def _misses(mic: Path, rendered: np.ndarray) -> tuple[float, int]:
    """Fraction of the rendered ground-truth voxels within 0.5° of the nearest voxel of
    ``mic`` (within 1 µm), and the number of misses."""
    from nfjax.compare import compare_records
    from nfjax.io.mic import read_mic

    cmp = compare_records(read_mic(mic).records, rendered, nearest=1.0)
    a50 = cmp.frac_reference[1]
    return a50, int(round((1.0 - a50) * len(rendered)))


def _accuracy(mic: Path) -> tuple[float, float, int]:
    from nfjax.compare import compare_records
    from nfjax.io.mic import read_mic

    rendered = _rendered()
    rec = read_mic(mic).records
    cmp = compare_records(rec, rendered)
    return cmp.frac_reference[0], cmp.frac_reference[1], cmp.n_matched


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--multi", action="store_true", help="also run the multi-resolution job")
    ap.add_argument("--resolution", type=float, default=1.0,
                    help="uniform seed spacing of the loop-0 library (deg)")
    ap.add_argument("--retry-resolution", type=float, default=2.0,
                    help="uniform seed spacing of SeedOrientationsAll (deg)")
    ap.add_argument("--smooth", action="store_true",
                    help="run --multi on the physically smooth sample (each grain its mean "
                         "orientation) instead of the ground truth as rendered")
    ap.add_argument("--ceiling", action="store_true",
                    help="also run the seeded single-resolution fits on the solid observations")
    ap.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    args = ap.parse_args()

    import jax

    import nfjax
    from nfjax.cli import main as cli
    from nfjax.workflow import reconstruct

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "single"
        d.mkdir()
        params = _prepare(d)
        t0 = time.perf_counter()
        cli(["simulate", str(params), str(nfjax.data.au_example()["mic"]), "-o",
             str(d / "SpotsInfo.bin")])
        t_sim = time.perf_counter() - t0
        t1 = time.perf_counter()
        final = reconstruct(params, ff_seeds=True, image_processing=False, progress=False)
        t_rec = time.perf_counter() - t1
        a25, a50, n = _accuracy(final)
        print(f"(a) single resolution: simulate {t_sim:.1f} s + reconstruct {t_rec:.1f} s = "
              f"{t_sim + t_rec:.1f} s end to end; 3456 voxels x 4 seeds; "
              f"{100 * a25:.2f}% of {n} rendered voxels < 0.25 deg (MIDAS C: 27-30 s)")
        rows.append(("Au single resolution end to end (simulate + reconstruct)",
                     f"{t_sim + t_rec:.1f} s ({t_sim:.1f} + {t_rec:.1f})",
                     f"{100 * a25:.2f}% < 0.25 deg", "MIDAS C 27-30 s"))
        if args.multi or args.ceiling:
            solid_dir = Path(tmp) / "solid"
            solid_dir.mkdir()
            rendered = _rendered()
            _solid_observations(solid_dir, rendered)
        if args.ceiling or (args.multi and args.smooth):
            smooth_dir = Path(tmp) / "smooth"
            smooth_dir.mkdir()
            smooth, grains = _smooth_truth(rendered, smooth_dir)
            _solid_observations(smooth_dir, smooth)
        if args.ceiling:
            mean_seeds = smooth_dir / "grains_mean.csv"
            grid25 = "2.5 um grid on the ground-truth voxels"
            variants = [(f"{grid25}, nfjax refinement", solid_dir, None, {}, False),
                        (f"{grid25}, MIDAS refinement", solid_dir, None, {}, True),
                        (f"{grid25}, nfjax refinement, EdgeLength 2.5", solid_dir, None,
                         {"EdgeLength": 2.5}, False),
                        ("GridSize 1.25 (the multi-resolution run's last grid), nfjax "
                         "refinement", solid_dir, None, {"GridSize": 1.25}, False),
                        (f"smooth truth (grain means) seeded with the grain means, {grid25}",
                         smooth_dir, mean_seeds, {}, False),
                        (f"smooth truth seeded with the grain means, {grid25}, "
                         f"EdgeLength 2.5", smooth_dir, mean_seeds, {"EdgeLength": 2.5}, False),
                        ("smooth truth seeded with the grain means, GridSize 1.25 (the "
                         "multi-resolution run's last grid)", smooth_dir, mean_seeds,
                         {"GridSize": 1.25}, False)]
            for k, (label, obs_dir, seeds, extra, midas) in enumerate(variants):
                c = Path(tmp) / f"ceiling{k}"
                c.mkdir()
                for name in ("SpotsInfo.bin", "tomo.raw"):
                    os.symlink(obs_dir / name, c / name)
                params = _prepare(c, TomoImage="tomo.raw", TomoPixelSize=0.25,
                                  MicFileText="MyMic", **extra)
                if seeds is not None:
                    shutil.copy(seeds, c / "grs.csv")
                t0 = time.perf_counter()
                final = reconstruct(params, ff_seeds=True, image_processing=False,
                                    progress=False, midas_refinement=midas)
                t_c = time.perf_counter() - t0
                a50, miss = _misses(final, rendered)
                print(f"(c) ceiling, solid observations, {label}: {t_c:.1f} s; "
                      f"{100 * a50:.2f}% of "
                      f"{len(rendered)} rendered voxels < 0.5 deg ({miss} misses)")
                rows.append((f"ceiling: solid Au observations, seeded, {label}",
                             f"{t_c:.1f} s",
                             f"{100 * a50:.2f}% < 0.5 deg ({miss} misses)", "-"))
                if seeds is not None and not extra:      # the smooth 2.5 um run
                    line = _boundary_oracle(c, smooth, grains)
                    print(f"(c) {line}")
                    rows.append((line, "-", "-", "-"))
        if args.ceiling:
            for records, label in ((rendered, "ground truth as rendered"),
                                   (smooth, "smooth truth")):
                line = _flip_test(records, grains.voxel_grain - 1, label)
                print(f"(c) {line}")
                rows.append((line, "-", "-", "-"))
        if args.multi:
            from nfjax.io.grains import read_grains_csv
            from nfjax.io.seeds import write_seeds
            from nfjax.seeds import uniform_seeds

            m = Path(tmp) / "multi"
            m.mkdir()
            obs_dir, truth = (smooth_dir, smooth) if args.smooth else (solid_dir, rendered)
            sample = "smooth Au (grain means)" if args.smooth else "Au"
            for name in ("SpotsInfo.bin", "tomo.raw"):
                shutil.copy(obs_dir / name, m / name)
            lib0 = uniform_seeds(225, args.resolution)
            write_seeds(m / "seeds.txt", lib0)
            write_seeds(m / "seeds_all.txt", uniform_seeds(225, args.retry_resolution))
            params = _prepare(m, SeedOrientations="seeds.txt",
                              SeedOrientationsAll="seeds_all.txt",
                              GridRefactor=(5.0, 2.0, 2), TomoImage="tomo.raw",
                              TomoPixelSize=0.25, MicFileText="MyMic")
            t2 = time.perf_counter()
            final = reconstruct(params, image_processing=False, progress=True)
            t_multi = time.perf_counter() - t2
            a50, miss = _misses(final, truth)
            n_grains = len(read_grains_csv(m / "Grains.csv.1"))
            print(f"(b) {sample} multi resolution GridRefactor 5 2 2, loop-0 library "
                  f"{len(lib0)} ({args.resolution} deg), retries {args.retry_resolution} deg, "
                  f"tomography outline: {t_multi:.1f} s; {n_grains} grains after loop 0; final "
                  f"{final.name}: {100 * a50:.2f}% of {len(truth)} rendered voxels < 0.5 deg, "
                  f"nearest voxel ({miss} misses)")
            rows.append((f"{sample} multi-resolution 5/2/2, loop 0 {len(lib0)} seeds, retries "
                         f"{args.retry_resolution} deg, tomo outline; {n_grains} grains in "
                         f"Grains.csv.1", f"{t_multi:.1f} s",
                         f"{100 * a50:.2f}% < 0.5 deg ({miss} misses)", "-"))

    if args.record:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
        machine = (f"{platform.machine()} {os.cpu_count()} cores, "
                   f"{jax.devices()[0].platform}")
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as fh:
            fh.write(f"\n## bench_reconstruct — {datetime.date.today()} — commit {commit} — "
                     f"{machine}\n\n| job | wall | accuracy | anchor |\n|---|---|---|---|\n")
            for r in rows:
                fh.write("| " + " | ".join(r) + " |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
