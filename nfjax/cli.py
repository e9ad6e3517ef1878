"""The ``nfjax`` command line.

Each subcommand is a thin handler: parse arguments, call the library, print a short
report. User errors (:class:`nfjax.errors.NfjaxError`, unreadable files) are printed as one
line on stderr with exit status 2; no traceback. ``NFJAX_DEBUG=1`` shows tracebacks. Every
command that reads a parameter file prints its warnings on stderr. A closed stdout pipe
ends the command quietly with status 141, as it would a C tool. SIGTERM (``kill``,
``timeout``, a batch scheduler's time limit) is handled as Ctrl-C is: temporary files are
removed and the command exits with status 143.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

from nfjax import __version__
from nfjax.errors import NfjaxError


def _read_params(path, **options):
    """Read a parameter file and print its warnings on stderr: every command that reads one
    goes through here, so no command drops them. Under MPI only rank 0 prints them (every
    rank reads the same file)."""
    from nfjax.parallel import print_warnings
    from nfjax.params import read_params

    params = read_params(path, **options)
    print_warnings(params.warnings)
    return params


# --------------------------------------------------------------------------- params
def _cmd_params_check(args: argparse.Namespace) -> int:
    from nfjax.params import format_params

    params = _read_params(args.file)
    print(format_params(params), end="")
    return 0


# --------------------------------------------------------------------------- hkls
def _cmd_hkls(args: argparse.Namespace) -> int:
    from nfjax.crystal import hkls_from_params, ring_summary
    from nfjax.io.hkls import write_hkls_csv

    params = _read_params(args.file)
    table = hkls_from_params(params)
    write_hkls_csv(table, args.output)
    print(f"{len(table.d)} reflections in {int(table.ring.max()) if len(table.d) else 0} rings "
          f"-> {args.output}")
    for ring in ring_summary(table):
        print(ring)
    return 0


# --------------------------------------------------------------------------- grid
def _cmd_grid(args: argparse.Namespace) -> int:
    from nfjax.grid import grid_from_params
    from nfjax.io.gridfile import write_grid

    params = _read_params(args.file)
    grid = grid_from_params(params)
    write_grid(grid, args.output)
    print(f"{grid.shape[0]} grid points (GridSize {params.grid_size:g} um, "
          f"EdgeLength {params.edge_length_effective:g} um, Rsample {params.rsample:g} um) "
          f"-> {args.output}")
    return 0


# --------------------------------------------------------------------------- seeds
def _cmd_seeds_from_grains(args: argparse.Namespace) -> int:
    from nfjax.io.grains import read_grains_csv
    from nfjax.io.seeds import write_seeds_from_grains
    from nfjax.seeds import seeds_from_grains

    grains = read_grains_csv(args.grains)
    quats = seeds_from_grains(grains)
    write_seeds_from_grains(args.output, quats, grains)
    print(f"{quats.shape[0]} seed orientations from {args.grains} -> {args.output}")
    return 0


def _cmd_seeds_uniform(args: argparse.Namespace) -> int:
    from nfjax.io.seeds import write_seeds
    from nfjax.seeds import uniform_seeds

    quats = uniform_seeds(args.space_group, args.resolution, seed=args.seed)
    write_seeds(args.output, quats)
    print(f"{quats.shape[0]} orientations in the fundamental zone of space group "
          f"{args.space_group} (~{args.resolution:g} deg spacing) -> {args.output}")
    return 0


# --------------------------------------------------------------------------- cluster
def _cmd_cluster(args: argparse.Namespace) -> int:
    from nfjax.cluster import cluster_mic, neighbour_reach, write_grains_csv
    from nfjax.io.mic import read_mic

    # Mic2GrainsList reads only a few keys: the detector keys may be absent.
    params = _read_params(args.params, required=False) if args.params else None
    mic = read_mic(args.mic)
    grains = cluster_mic(mic, params=params, max_angle=args.max_angle,
                         min_confidence=args.min_confidence, space_group=args.space_group,
                         neighbours=args.neighbours, lattice=args.lattice)
    write_grains_csv(args.output, grains)
    print(f"{len(grains.ids)} grains from {args.mic} -> {args.output}")
    if not any(grains.lattice_parameter):
        where = (f"{args.params} has no LatticeParameter" if args.params
                 else "no --params file")
        print(f"note: {where}: the lattice columns of {args.output} are 0, as MIDAS writes "
              "them; give --lattice A B C ALPHA BETA GAMMA for a Grains.csv that other "
              "programs read the lattice from", file=sys.stderr)
    if args.neighbours and len(grains.ids) > 1:
        reach = neighbour_reach(mic)
        if reach <= 3:
            print(f"note: --neighbours links voxels closer than 2 x TriEdgeSize "
                  f"({2 * float(mic.tri_edge_size):g} um), which reaches {reach:g} neighbours "
                  "per voxel here (a probe smaller than the grid spacing): grains break apart "
                  "at every missing voxel; cluster without --neighbours", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- plot
def _cmd_plot(args: argparse.Namespace) -> int:
    from nfjax.plot import plot_mic

    out = plot_mic(args.mic, args.output, space_group=args.space_group,
                   min_confidence=args.min_confidence, boundary_deg=args.boundaries,
                   panels=args.panels)
    print(f"orientation map and {', '.join(args.panels)} -> {out}")
    return 0


# --------------------------------------------------------------------------- maps
def _cmd_maps(args: argparse.Namespace) -> int:
    from nfjax.io.atomic import check_target
    from nfjax.io.mic import read_mic
    from nfjax.maps import map_paths, map_symmetry, pixel_maps, write_maps

    params = _read_params(args.params, required=False) if args.params else None
    mic = read_mic(args.mic)
    base = args.output or args.mic
    if str(base).endswith(("/", os.sep)) or Path(base).is_dir():
        raise NfjaxError(f"-o {base}: expected the maps' base name (it writes BASE.map, "
                         f"BASE.map.kam, ...), found a folder")
    for path in map_paths(base):
        check_target(path)
    sg = args.space_group or map_symmetry(params)
    gb = args.gb_angle if args.gb_angle is not None else (params.gb_angle if params else 5.0)
    phase = args.phase_nr if args.phase_nr is not None else (
        (params.phase_nr if params else None) or (int(mic.phase_nr[0]) if len(mic) else 1))
    maps = pixel_maps(mic.records, mic.map_edge, space_group=sg, gb_angle=gb)
    if maps is None:
        raise NfjaxError(f"{args.mic}: no voxel has a nonzero confidence: there is nothing "
                         "to map")
    paths = write_maps(base, maps, mic.records, phase_nr=phase)
    print(f"{maps.summary()} -> " + ", ".join(str(p) for p in paths))
    return 0


# --------------------------------------------------------------------------- compare
def _cmd_compare(args: argparse.Namespace) -> int:
    from nfjax.compare import compare_mics, format_comparison

    result = compare_mics(args.a, args.b, space_group=args.space_group, nearest=args.nearest,
                          min_confidence=args.min_confidence)
    print(format_comparison(result), end="")
    return 0


# --------------------------------------------------------------------------- spots
def _warn_if_nothing_on_the_detector(params, n_lit: int, what: str) -> None:
    """A geometry that puts no spot on the detector gives empty outputs, not an error: say
    so, naming the keys to check."""
    if n_lit == 0:
        print(f"warning: {what}: no spot falls on the detector with the geometry of "
              f"{params.source} (check Lsd, BC, tx/ty/tz, px, NrPixelsY/Z and OmegaRange/"
              f"BoxSize)", file=sys.stderr)


def _cmd_spots(args: argparse.Namespace) -> int:
    from nfjax.crystal import reflections
    from nfjax.geometry import geometry_from_params
    from nfjax.io.atomic import check_target
    from nfjax.io.seeds import read_seeds
    from nfjax.io.spots import write_spot_files
    from nfjax.spots import make_diffraction_spots

    params = _read_params(args.params)
    seeds_path = args.seeds
    if seeds_path is None:
        params.require("SeedOrientations")
        seeds_path = params.resolve(params.seed_orientations)
    quats = read_seeds(seeds_path)
    out_dir = Path(args.output) if args.output else params.output_dir
    check_target(out_dir / "Key.bin")               # before the work, not after it
    table = reflections(params)
    spots = make_diffraction_spots(quats, table.g, table.theta, geometry_from_params(params),
                                   max_memory=args.max_memory)
    write_spot_files(out_dir, spots)
    counts = spots.key[:, 0]
    print(f"{len(spots)} orientations, {int(counts.sum())} spots "
          f"({counts.mean():.1f} per orientation) -> {out_dir}/Key.bin, DiffractionSpots.bin, "
          f"OrientMat.bin")
    _warn_if_nothing_on_the_detector(params, int(counts.sum()), f"{seeds_path}")
    return 0


# --------------------------------------------------------------------------- simulate
def _cmd_simulate(args: argparse.Namespace) -> int:
    from nfjax import observe
    from nfjax.io.atomic import check_target
    from nfjax.simulate import (TIFF_BACKGROUND, TIFF_NOISE_FLOOR, remove_frames,
                                simulate_mic, write_tiff_frames)

    params = _read_params(args.params)
    out = check_target(Path(args.output) if args.output
                       else params.output_dir / "SpotsInfo.bin")   # before the work
    if args.tiff_dir:
        from nfjax.images import frame_path

        # The frames are named as `nfjax process` will look for them (OrigFileName, extOrig);
        # every one is checked, so that no frame fails after others are written.
        for d in range(params.n_distances):
            for f in range(params.n_frames):
                check_target(Path(args.tiff_dir) / frame_path(params, d, f).name)
    vol, n_rendered, n_total = simulate_mic(params, args.mic, max_memory=args.max_memory)
    paths = []
    if args.tiff_dir:   # first: a failure part way removes its frames, and no SpotsInfo.bin
        paths = write_tiff_frames(params, vol, args.tiff_dir, seed=args.seed)
    try:
        observe.write_spots_info(out, vol)
    except BaseException:
        remove_frames(paths, f"written to {args.tiff_dir} (the volume they belong with "
                             f"could not be written)")
        raise
    shape = "x".join(str(s) for s in vol.shape)
    n_lit = observe.count(vol)
    print(f"rendered {n_rendered} of {n_total} voxels: {n_lit} lit pixels in a "
          f"{shape} volume -> {out}")
    if n_rendered:
        _warn_if_nothing_on_the_detector(params, n_lit, f"{args.mic}")
    if args.tiff_dir:
        print(f"wrote {len(paths)} TIFF frames -> {args.tiff_dir}")
        if (params.blanket_subtraction or 0) < TIFF_NOISE_FLOOR:
            print(f"note: the frames' background is Poisson noise of mean "
                  f"{TIFF_BACKGROUND:g} (sigma {TIFF_BACKGROUND ** 0.5:g} counts); "
                  f"BlanketSubtraction {params.blanket_subtraction or 0} in {params.source} "
                  f"will light much of it: process them with BlanketSubtraction "
                  f"{TIFF_NOISE_FLOOR} or more", file=sys.stderr)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from nfjax.geometry import geometry_from_params
    from nfjax.observe import load_observations
    from nfjax.parallel import device_scope
    from nfjax.simulate import score_mic

    params = _read_params(args.params)
    if args.cell is not None and not args.cell > 0:
        raise NfjaxError(f"--cell {args.cell}: expected a positive edge length in um")
    spots = Path(args.spots_info) if args.spots_info else params.output_dir / "SpotsInfo.bin"
    with device_scope(args.device):
        obs = load_observations(spots, geometry_from_params(params).shape).to_device()
        s, n, total, cell = score_mic(params, args.mic, obs, cell=args.cell,
                                      max_memory=args.max_memory)
    print(f"{args.mic}: {n} of {total} voxels as {cell:g} um triangles against {spots}: "
          f"{s.predicted} predicted, {s.observed} observed, {s.both} both lit pixels; "
          f"precision {s.precision:.4f}, recall {s.recall:.4f}, intersection over union "
          f"{s.iou:.4f}")
    _warn_if_nothing_on_the_detector(params, s.predicted, f"{args.mic}")
    return 0


# --------------------------------------------------------------------------- reconstruct
def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from nfjax.parallel import world
    from nfjax.workflow import reconstruct

    params = args.params or args.paramFN
    if not params:
        raise NfjaxError("reconstruct: give the parameter file (PARAMS or -paramFN FILE)")
    if args.params and args.paramFN and args.params != args.paramFN:
        raise NfjaxError(f"reconstruct: two parameter files given ({args.params} and "
                         f"-paramFN {args.paramFN})")
    for flag in ("ffSeedOrientations", "doImageProcessing"):
        value = getattr(args, flag)
        if value is not None and value not in (0, 1):
            raise NfjaxError(f"-{flag}: expected 0 or 1, found {value}")
    comm = world()
    note = (lambda text: print(text, file=sys.stderr)) if comm.is_root else (lambda text: None)
    if args.machineName:
        note(f"note: -machineName {args.machineName} ignored: MPI (mpiexec) decides where "
             "ranks run")
    if args.nCPUs is not None or args.nNodes is not None:
        note("note: -nCPUs/-nNodes ignored: JAX uses all cores of its device; run under "
             "mpiexec -n R to split the grid over R ranks")
    ff = args.ff_seeds or args.ffSeedOrientations == 1
    images = not args.no_image_processing and args.doImageProcessing != 0
    final = reconstruct(params, ff_seeds=ff, image_processing=images, resume=args.resume,
                        max_memory=args.max_memory, device=args.device,
                        midas_refinement=args.midas_refinement, comm=comm,
                        panels=args.panels)
    if comm.is_root:
        print(f"final reconstruction: {final}")
    return 0


# --------------------------------------------------------------------------- fit
def _cmd_calibrate(args: argparse.Namespace) -> int:
    from nfjax.calibrate import run_calibrate

    return run_calibrate(args)


def _cmd_fit(args: argparse.Namespace) -> int:
    from nfjax.fit import run_fit

    if args.block is not None and args.nblocks is None:
        raise NfjaxError(f"--block {args.block}: give --nblocks too (the number of blocks "
                         "the grid is split into)")
    if args.block is None and args.nblocks is not None and args.nblocks > 1:
        raise NfjaxError(f"--nblocks {args.nblocks}: give --block too (which block, "
                         f"0..{args.nblocks - 1}, this process fits)")
    return run_fit(args, _read_params(args.params))


# --------------------------------------------------------------------------- index
def _cmd_index(args: argparse.Namespace) -> int:
    from nfjax.indexer.cli import run_index

    return run_index(args)


# --------------------------------------------------------------------------- process
def _cmd_process(args: argparse.Namespace) -> int:
    from nfjax.images import run_process
    from nfjax.parallel import world

    world()   # under mpiexec, before the parameter file: its errors are printed once
    return run_process(args, _read_params(args.params))


# --------------------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from nfjax.demo import run_demo

    return run_demo(args.output)


# --------------------------------------------------------------------------- parser
def _checked(convert, ok, expected: str):
    """An argparse type: ``convert(text)`` when it parses and ``ok`` holds for it, else the
    one-line "expected ..., found ..." error."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}")
        return value
    return parse


_space_group = _checked(int, lambda v: 1 <= v <= 230, "a space group number 1..230")
_degrees = _checked(float, lambda v: 0 < v < float("inf"), "a number of degrees > 0")
_count = _checked(int, lambda v: v >= 0, "an integer >= 0")   # a random seed, PhaseNr
_positive = _checked(int, lambda v: v >= 1, "an integer >= 1")


def _panels(text: str):
    """``nfjax plot --panels``: names from :data:`nfjax.plot.PANELS` (imported when used)."""
    from nfjax.plot import PANELS_EXPECTED, panels_ok

    return _checked(lambda t: tuple(t.split(",")), panels_ok, PANELS_EXPECTED)(text)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (the house rule for user errors) that
    points to ``--help`` instead of printing the usage block; exit status 2 as before."""

    def error(self, message: str):
        from nfjax.parallel import print_error

        print_error(f"{self.prog}: error: {message} (see {self.prog} --help)")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="nfjax",
        description="GPU-first JAX near-field HEDM reconstruction (MIDAS-compatible).",
    )
    parser.add_argument("--version", action="version", version=f"nfjax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p_params = sub.add_parser("params", help="inspect MIDAS parameter files")
    params_sub = p_params.add_subparsers(dest="params_command", metavar="ACTION")
    params_sub.required = True
    p_check = params_sub.add_parser(
        "check", help="parse and validate a parameter file; print the normalised values")
    p_check.add_argument("file", help="MIDAS parameter file")
    p_check.set_defaults(func=_cmd_params_check)

    p_hkls = sub.add_parser("hkls", help="write hkls.csv (MIDAS GetHKLListNF)")
    p_hkls.add_argument("file", help="MIDAS parameter file")
    p_hkls.add_argument("-o", "--output", default="hkls.csv", help="output (default hkls.csv)")
    p_hkls.set_defaults(func=_cmd_hkls)

    p_grid = sub.add_parser("grid", help="write grid.txt (MIDAS MakeHexGrid + masks)")
    p_grid.add_argument("file", help="MIDAS parameter file")
    p_grid.add_argument("-o", "--output", default="grid.txt", help="output (default grid.txt)")
    p_grid.set_defaults(func=_cmd_grid)

    p_seeds = sub.add_parser("seeds", help="seed orientation files")
    seeds_sub = p_seeds.add_subparsers(dest="seeds_command", metavar="ACTION")
    seeds_sub.required = True
    p_fg = seeds_sub.add_parser(
        "from-grains", help="one seed per far-field grain (MIDAS GenSeedOrientationsFF2NFHEDM)")
    p_fg.add_argument("grains", help="far-field Grains.csv")
    p_fg.add_argument("-o", "--output", default="seeds.csv", help="output (default seeds.csv)")
    p_fg.set_defaults(func=_cmd_seeds_from_grains)

    p_uni = seeds_sub.add_parser(
        "uniform", help="near-uniform orientations in the fundamental zone")
    p_uni.add_argument("--space-group", type=_space_group, required=True,
                       help="space group number")
    p_uni.add_argument("--resolution", type=float, default=1.5,
                       help="approximate spacing in degrees (default 1.5)")
    p_uni.add_argument("--seed", type=_count, default=0, help="random seed (default 0)")
    p_uni.add_argument("-o", "--output", default="seeds.csv", help="output (default seeds.csv)")
    p_uni.set_defaults(func=_cmd_seeds_uniform)

    p_cl = sub.add_parser("cluster", help="group a mic into grains (MIDAS Mic2GrainsList)")
    p_cl.add_argument("mic", help="mic file (text or binary)")
    p_cl.add_argument("-o", "--output", default="Grains.csv", help="output (default Grains.csv)")
    p_cl.add_argument("--params", default=None,
                      help="parameter file for SpaceGroup, LatticeParameter, MaxAngle, MinConfidence")
    p_cl.add_argument("--max-angle", type=float, default=None, help="degrees (default 1.0)")
    p_cl.add_argument("--min-confidence", type=float, default=None,
                      help="minimum voxel confidence (default 0.04)")
    p_cl.add_argument("--space-group", type=_space_group, default=None, help="default 225")
    p_cl.add_argument("--lattice", type=float, nargs=6, default=None,
                      metavar=("A", "B", "C", "ALPHA", "BETA", "GAMMA"),
                      help="lattice columns of the output, Å and degrees (default: "
                           "LatticeParameter of --params, else 0 as MIDAS)")
    p_cl.add_argument("--neighbours", action="store_true",
                      help="grow grains through spatial neighbours (Mic2GrainsList mode 1)")
    p_cl.set_defaults(func=_cmd_cluster)

    p_plot = sub.add_parser("plot", help="IPF orientation map and confidence map as PNG")
    p_plot.add_argument("mic", help="mic file (text or binary)")
    p_plot.add_argument("-o", "--output", default="map.png",
                        help="output image (default map.png; the suffix picks the format, "
                             "e.g. .png, .jpg, .svg, .pdf)")
    p_plot.add_argument("--space-group", type=_space_group, default=225, help="default 225")
    p_plot.add_argument("--min-confidence", type=float, default=0.0,
                        help="draw voxels below this confidence grey in the orientation map "
                             "(default 0: none)")
    p_plot.add_argument("--boundaries", type=float, default=5.0, metavar="DEG",
                        help="draw boundaries between neighbours misoriented by more than "
                             "DEG (default 5; 0: none); also the grains' boundary angle")
    p_plot.add_argument("--panels", type=_panels, default=("confidence",), metavar="LIST",
                        help="maps beside the orientation map, comma-separated: confidence, "
                             "kam, grains, grod (the last three: ParseMic's pixel maps of "
                             "the voxels at or above --min-confidence; default confidence)")
    p_plot.set_defaults(func=_cmd_plot)

    p_maps = sub.add_parser(
        "maps", help="ParseMic's 1 um pixel maps of a mic: .map, .map.kam, .map.grainId, .map.grod")
    p_maps.add_argument("mic", help="mic file (text or binary)")
    p_maps.add_argument("-o", "--output", default=None, metavar="BASE",
                        help="write BASE.map, BASE.map.kam, BASE.map.grainId, BASE.map.grod "
                             "(default: beside the mic, as ParseMic)")
    p_maps.add_argument("--params", default=None,
                        help="parameter file for SGNr/SpaceGroup, GBAngle and PhaseNr")
    p_maps.add_argument("--space-group", type=_space_group, default=None,
                        help="crystal symmetry of the misorientations (default: SGNr, else "
                             "SpaceGroup of --params, else 225)")
    p_maps.add_argument("--gb-angle", type=_degrees, default=None, metavar="DEG",
                        help="grain boundary misorientation for .map.grainId (default: GBAngle "
                             "of --params, else 5)")
    p_maps.add_argument("--phase-nr", type=_count, default=None,
                        help="PhaseNr plane of .map (default: --params, else the mic's)")
    p_maps.set_defaults(func=_cmd_maps)

    p_cmp = sub.add_parser(
        "compare", help="per-voxel misorientation between two mic files matched by position")
    p_cmp.add_argument("a", help="mic file to evaluate (text or binary)")
    p_cmp.add_argument("b", help="reference mic file (text or binary), e.g. ground truth")
    p_cmp.add_argument("--space-group", type=_space_group, default=225,
                       help="space group for crystal symmetry (default 225)")
    p_cmp.add_argument("--nearest", type=float, default=None, metavar="UM",
                       help="pair each reference voxel with the nearest voxel of A within UM "
                            "micrometres (maps on different grids, e.g. a multi-resolution "
                            "result against a ground truth), instead of by equal position")
    p_cmp.add_argument("--min-confidence", type=float, default=None, metavar="C",
                       help="count only the reference voxels with Confidence >= C (e.g. the "
                            "MinConfidence that nfjax simulate rendered the ground truth with)")
    p_cmp.set_defaults(func=_cmd_compare)

    p_spots = sub.add_parser(
        "spots", help="predicted spots of seed orientations (MIDAS MakeDiffrSpots)")
    p_spots.add_argument("params", help="MIDAS parameter file")
    p_spots.add_argument("seeds", nargs="?", default=None,
                         help="seed CSV (default: the SeedOrientations key)")
    p_spots.add_argument("-o", "--output", default=None,
                         help="output folder (default: OutputDirectory or DataDirectory)")
    p_spots.add_argument("--max-memory", default=None, help="memory budget, e.g. 8GB")
    p_spots.set_defaults(func=_cmd_spots)

    p_sim = sub.add_parser(
        "simulate", help="render a mic file into SpotsInfo.bin (MIDAS simulateNF)")
    p_sim.add_argument("params", help="MIDAS parameter file")
    p_sim.add_argument("mic", help="mic file (text or binary) to render")
    p_sim.add_argument("-o", "--output", default=None,
                       help="SpotsInfo.bin path (default <OutputDirectory>/SpotsInfo.bin)")
    p_sim.add_argument("--tiff-dir", default=None,
                       help="also write raw-like TIFF frames (MIDAS naming) into this folder")
    p_sim.add_argument("--seed", type=_count, default=0, help="noise seed for --tiff-dir")
    p_sim.add_argument("--max-memory", default=None, help="memory budget, e.g. 8GB")
    p_sim.set_defaults(func=_cmd_simulate)

    p_score = sub.add_parser(
        "score", help="how well a mic explains the observations: every voxel rendered as its "
                      "grid triangle, lit pixels counted against SpotsInfo.bin")
    p_score.add_argument("params", help="MIDAS parameter file (the geometry)")
    p_score.add_argument("mic", help="mic file (text or binary); voxels below MinConfidence "
                                     "are left out, as simulate does")
    p_score.add_argument("--spots-info", default=None,
                         help="SpotsInfo.bin or .npz (default <OutputDirectory>/SpotsInfo.bin)")
    p_score.add_argument("--cell", type=float, default=None,
                         help="the map's triangle edge in um (default: from the voxel "
                              "positions)")
    p_score.add_argument("--max-memory", default=None, help="memory budget, e.g. 8GB")
    p_score.add_argument("--device", choices=["cpu", "gpu"], default=None,
                         help="JAX device (default: the first available)")
    p_score.set_defaults(func=_cmd_score)

    p_rec = sub.add_parser(
        "reconstruct", help="the whole NF workflow (nf_MIDAS_Multiple_Resolutions.py)")
    p_rec.add_argument("params", nargs="?", default=None, help="MIDAS parameter file")
    p_rec.add_argument("--ff-seeds", action="store_true",
                       help="seed orientations from the far-field GrainsFile")
    p_rec.add_argument("--no-image-processing", action="store_true",
                       help="reuse the existing SpotsInfo.bin")
    p_rec.add_argument("--resume", action="store_true",
                       help="skip stages whose inputs are unchanged since the last run")
    p_rec.add_argument("--max-memory", default=None, help="memory budget, e.g. 8GB")
    p_rec.add_argument("--midas-refinement", action="store_true",
                       help="MIDAS's refinement exactly (no pruning, near misses, restarts "
                            "or tie-break), see nfjax fit")
    p_rec.add_argument("--device", choices=["cpu", "gpu"], default=None,
                       help="JAX platform (default: the first available)")
    p_rec.add_argument("--panels", type=_panels, default=("confidence",), metavar="LIST",
                       help="maps beside the orientation map in each result's PNG, as for "
                            "nfjax plot (default: confidence; e.g. confidence,kam,grains)")
    midas = p_rec.add_argument_group("MIDAS driver flags (accepted for existing scripts)")
    midas.add_argument("-paramFN", default=None, help="parameter file")
    midas.add_argument("-ffSeedOrientations", type=int, default=None, help="0|1")
    midas.add_argument("-doImageProcessing", type=int, default=None, help="0|1")
    midas.add_argument("-nCPUs", type=int, default=None, help="ignored")
    midas.add_argument("-nNodes", type=int, default=None, help="ignored (use mpiexec)")
    midas.add_argument("-machineName", default=None, help="ignored (MPI decides placement)")
    p_rec.set_defaults(func=_cmd_reconstruct)

    p_fit = sub.add_parser(
        "fit", help="screen and refine orientations on a grid (MIDAS FitOrientationOMP)")
    p_fit.add_argument("params", help="MIDAS parameter file")
    p_fit.add_argument("--block", type=int, default=None,
                       help="block number (0-based); needs --nblocks")
    p_fit.add_argument("--nblocks", type=int, default=None,
                       help="number of blocks the grid is split into (default 1)")
    p_fit.add_argument("--device", choices=["cpu", "gpu"], default=None,
                       help="JAX device (default: the first available)")
    p_fit.add_argument("--max-memory", default=None, help="device memory budget, e.g. 8GB")
    p_fit.add_argument("--polish", action="store_true",
                       help="optax polish on the smooth surrogate after Nelder-Mead")
    p_fit.add_argument("--midas-refinement", action="store_true",
                       help="MIDAS's refinement exactly: every screening winner refined, no "
                            "pruning, near misses or restarts, ties to the later winner "
                            "(slower, less accurate; for comparisons)")
    p_fit.add_argument("--seeded", action="store_true",
                       help="the seed orientations are grains' (FF Grains.csv or a clustered "
                            "mic), not a library: skip refining winners below 0.3x their "
                            "voxel's best screening fraction, and the near misses of voxels "
                            "below MinConfidence (faster; unsafe for a library)")
    p_fit.add_argument("--record-time", action="store_true",
                       help="write wall seconds into the RunTime column (default 0)")
    p_fit.add_argument("--spots-info", default=None,
                       help="SpotsInfo.bin path (default <OutputDirectory>/SpotsInfo.bin)")
    p_fit.set_defaults(func=_cmd_fit)

    p_cal = sub.add_parser(
        "calibrate", help="fit the detector geometry (tilts, Lsd, BC) to voxels of known "
                          "orientation (MIDAS FitOrientationParametersMultiPoint)")
    p_cal.add_argument("params", help="MIDAS parameter file (LsdTol, LsdRelativeTol, BCTol, "
                                      "TiltsTol bound the fit; OrientTol the orientations)")
    p_cal.add_argument("--mic", default=None,
                       help="calibrate on this reconstruction's most confident voxels "
                            "(default: the parameter file's GridPoints lines)")
    p_cal.add_argument("--points", type=_positive, default=32,
                       help="with --mic: how many voxels (default 32)")
    p_cal.add_argument("-o", "--output", default=None,
                       help="calibrated parameter file (default <PARAMS stem>_calibrated"
                            "<suffix> beside PARAMS)")
    p_cal.add_argument("--spots-info", default=None,
                       help="SpotsInfo.bin path (default <OutputDirectory>/SpotsInfo.bin)")
    p_cal.add_argument("--steps", type=_count, default=300,
                       help="gradient steps before the compass search (default 300)")
    p_cal.add_argument("--whole-map", action="store_true",
                       help="with --mic: then refine the geometry on the whole map, every "
                            "voxel rendered at its orientation against the observations "
                            "(sees the beam centre along a grain's spot, which the per-voxel "
                            "fraction does not)")
    p_cal.add_argument("--cell", type=float, default=None,
                       help="with --whole-map: the map's triangle edge in um (default: "
                            "from the voxel positions)")
    p_cal.add_argument("--device", choices=["cpu", "gpu"], default=None,
                       help="JAX device (default: the first available)")
    p_cal.set_defaults(func=_cmd_calibrate)

    p_index = sub.add_parser(
        "index", help="index serial-crystallography spot files (fast feedback indexer)")
    p_index.add_argument("files", nargs="+", metavar="FILE", help="simple-data spot files")
    p_index.add_argument("--method", default="ifssr", choices=["raw", "ifss", "ifse", "ifssr"],
                         help="refinement method (default ifssr)")
    p_index.add_argument("--json", action="store_true", help="one JSON object per file per line")
    p_index.set_defaults(func=_cmd_index)

    p_proc = sub.add_parser(
        "process", help="raw TIFF frames -> SpotsInfo.bin (MIDAS ProcessImagesCombined)")
    p_proc.add_argument("params", help="MIDAS parameter file")
    p_proc.add_argument("--distance", type=int, action="append", metavar="L",
                        help="process only distance L (1-based; repeatable; default all)")
    p_proc.add_argument("--max-memory", default=None,
                        help="host/device memory budget, e.g. 4GB (default: automatic)")
    p_proc.add_argument("-o", "--output", default=None,
                        help="SpotsInfo.bin path (default <OutputDirectory>/SpotsInfo.bin)")
    p_proc.set_defaults(func=_cmd_process)

    p_demo = sub.add_parser("demo", help="run the bundled Au example end to end")
    p_demo.add_argument("-o", "--output", default="demo-output",
                        help="output folder (default demo-output)")
    p_demo.set_defaults(func=_cmd_demo)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM received: unwinds like Ctrl-C, so every writer removes its temporary."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _redeliver_interrupts(hook):
    """A ``sys.unraisablehook`` that sends a swallowed interrupt again.

    A signal handler's exception raised while Python runs a ``__del__`` or a garbage
    collection callback (JAX registers one) is printed as "Exception ignored" and dropped,
    and the command would run on to the end. The signal is sent again a moment later from
    another thread, so that its handler runs outside that callback (and the hook, where
    it would be dropped too).
    """
    def again(signum):
        threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()

    def handle(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, Terminated):
            again(signal.SIGTERM)
        elif isinstance(exc, KeyboardInterrupt) \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            again(signal.SIGINT)
        else:
            hook(unraisable)
    return handle


@contextlib.contextmanager
def _sigterm_unwinds():
    """Turn SIGTERM into :class:`Terminated` for the duration of a command (main thread
    only; Python's default would kill the process without cleaning up), and make sure an
    interrupt that lands in a callback is not lost (:func:`_redeliver_interrupts`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    hook = sys.unraisablehook
    sys.unraisablehook = _redeliver_interrupts(hook)
    try:
        yield
    finally:
        sys.unraisablehook = hook
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    with _sigterm_unwinds():
        status = _main(argv)
    if argv is None and status in (130, 143):
        # The process's own command line, interrupted: every temporary is gone by now. Skip
        # the interpreter's teardown, which crashed (SIGSEGV, status 139) in about a third
        # of the runs stopped while XLA was compiling.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _main(argv: list[str] | None) -> int:
    from nfjax.parallel import abort_other_ranks, print_error

    from nfjax import jaxcache

    parser = build_parser()
    args = parser.parse_args(argv)
    jaxcache.enable()  # compiled kernels are reused across commands and passes
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in Python's exit handler
        return status
    except BrokenPipeError:
        # The reader of stdout went away (`nfjax hkls p.txt | head -1`): stop quietly with
        # the status a C tool killed by SIGPIPE has, and send what is still buffered to
        # devnull so Python does not complain about it at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except NfjaxError as exc:
        if os.environ.get("NFJAX_DEBUG"):
            raise
        print_error(f"nfjax: error: {exc}")
        abort_other_ranks(2)
        return 2
    except OSError as exc:
        if os.environ.get("NFJAX_DEBUG"):
            raise
        name = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        what = ("is a directory, expected a file" if isinstance(exc, IsADirectoryError)
                else exc.strerror or exc)
        print_error(f"nfjax: error: {name}{what}")
        abort_other_ranks(2)
        return 2
    except Terminated:
        print("nfjax: terminated (SIGTERM)", file=sys.stderr)
        abort_other_ranks(143)
        return 143
    except KeyboardInterrupt:
        print("nfjax: interrupted", file=sys.stderr)
        abort_other_ranks(130)
        return 130
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if (isinstance(exc, MemoryError) or "RESOURCE_EXHAUSTED" in first) \
                and not os.environ.get("NFJAX_DEBUG"):
            # Host (NumPy) or device (XLA) memory: a size problem the user can act on.
            print_error(f"nfjax: error: out of memory: {first} (lower --max-memory, or fit a "
                        "smaller grid or seed set)")
            abort_other_ranks(2)
            return 2
        # An unexpected error: under MPI print it and end the other ranks rather than
        # leave them hanging in a collective.
        abort_other_ranks(1, traceback=True)
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
