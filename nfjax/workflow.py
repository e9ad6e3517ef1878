"""``nfjax reconstruct``: MIDAS's single- and multi-resolution NF workflow.

Owns the orchestration of ``nf_MIDAS_Multiple_Resolutions.py`` (reference §10): which stage
runs when, which files it writes (MIDAS's names, so MIDAS tools can read them), the resume
manifest, logs in ``midas_log/``, and splitting the fit across MPI ranks. The physics is
elsewhere; in-memory objects flow from stage to stage, files are written for compatibility
and for ``--resume`` only.

Stages and their inputs (a stage reruns when the hash of its inputs changes): ``hkls``
(lattice, space group, λ, Lsd, ring cut) → ``seeds`` (GrainsFile or seed file) → ``grid``
(GridSize, EdgeLength, Rsample, masks) → ``spots`` (hkls, seeds, geometry) → ``images``
(image keys, frame files) → ``fit`` (grid, spots, observations, fit keys) → ``parse`` (the
fit's records, SGNr/SpaceGroup, GBAngle, PhaseNr: the rest of ParseMic's output beside the
text mic, its text ``.AllMatches`` and the pixel maps ``.map``, ``.map.kam``,
``.map.grainId``, ``.map.grod``) → ``map`` (the PNG). Multi-resolution runs
``grid0``/``spots_all``/``fit0``/``parse0``, then per loop K ``clusterK``, ``seedsK``,
``gridK``, ``spotsK``, ``seededK``/``parseK`` and ``unseededK``/``parse_allK``; the merge is
recomputed from the two passes, its maps are ``parse_mergedK``. Every fit pass writes its
own binary (``MicFileBinary.0``, ``.seededK``, ``.unseededK``) and every loop its own grid
(``grid.txt.K``), which is what a resumed run reloads; ``MicFileBinary`` and ``grid.txt``
themselves hold the latest result, as in MIDAS, and are rewritten by every loop. A stage's
inputs include the paths it writes, so renaming an output reruns it.

Differences from MIDAS (also in docs/midas-differences.md): the merge keeps, per voxel, the
better of the seeded and unseeded results (MIDAS overwrites unconditionally, so an empty
unseeded record can erase a seeded solution); voxels with confidence 0 are retried by the
unseeded pass (MIDAS drops them from the text mic and never retries them); the unseeded
passes search ``SeedOrientationsAll`` (MIDAS silently reuses loop 0's spot files).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nfjax.errors import NfjaxError, ParamError

MANIFEST = "nfjax_manifest.json"
MASTER_LOG = "midas_nf_workflow_multires.log"
_BIG = 64 << 20   # files above this are fingerprinted by size and mtime, not hashed


# --------------------------------------------------------------------------- hashing
def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes (size and mtime for files over 64 MiB)."""
    path = Path(path)
    st = path.stat()
    if st.st_size > _BIG:
        return f"size={st.st_size};mtime={st.st_mtime_ns}"
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def value_hash(*values: Any) -> str:
    """Stable hash of JSON-able values (tuples become lists)."""
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class Manifest:
    """Finished stages with the hash of their inputs and the fingerprints of their outputs,
    kept in ``<output>/nfjax_manifest.json`` (rewritten atomically after every stage)."""

    def __init__(self, directory: Path, resume: bool):
        self.path = Path(directory) / MANIFEST
        self.resume = resume
        self.stages: dict[str, dict] = {}
        if resume and self.path.exists():
            try:
                self.stages = _manifest_stages(json.loads(self.path.read_text()))
            except ValueError as exc:
                raise NfjaxError(f"{self.path}: not a valid nfjax manifest ({exc}); delete it "
                                 "or run without --resume") from None

    def is_done(self, name: str, inputs: str) -> bool:
        entry = self.stages.get(name)
        if not self.resume or not entry or entry.get("inputs") != inputs:
            return False
        base = self.path.parent
        for rel, fp in entry.get("outputs", {}).items():
            p = base / rel
            if not p.exists() or file_fingerprint(p) != fp:
                return False
        return True

    def record(self, name: str, inputs: str, outputs: list[Path]) -> None:
        from nfjax.io.atomic import atomic_write

        base = self.path.parent
        self.stages[name] = {
            "inputs": inputs,
            "outputs": {os.path.relpath(p, base): file_fingerprint(p) for p in outputs},
        }
        with atomic_write(self.path, "w") as fh:
            json.dump({"version": 1, "stages": self.stages}, fh, indent=1, sort_keys=True)


def _manifest_stages(data) -> dict[str, dict]:
    """The ``stages`` of a manifest's JSON, checked: {name: {"inputs": str, "outputs":
    {path: str}}}; ValueError naming what is wrong otherwise."""
    if not isinstance(data, dict) or "stages" not in data:
        raise ValueError("expected an object with \"stages\", found "
                         f"{type(data).__name__ if not isinstance(data, dict) else 'none'}")
    stages = data["stages"]
    if not isinstance(stages, dict):
        raise ValueError(f"\"stages\": expected an object, found {type(stages).__name__}")
    for name, entry in stages.items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("inputs"), str)
              and isinstance(entry.get("outputs", {}), dict)
              and all(isinstance(v, str) for v in entry.get("outputs", {}).values()))
        if not ok:
            raise ValueError(f"stage {name!r}: expected {{\"inputs\": text, \"outputs\": "
                             f"{{file: fingerprint}}}}, found {json.dumps(entry)[:60]}")
    return stages


def array_hash(a) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def geometry_key(params) -> str:
    """Hash of everything :func:`nfjax.geometry.geometry_from_params` reads (the forward
    model's detector, scan and wavelength)."""
    from nfjax.geometry import geometry_from_params

    g = geometry_from_params(params)
    values = {f.name: getattr(g, f.name) for f in dataclasses.fields(g)}
    return value_hash({k: np.asarray(v).tolist() if hasattr(v, "shape") else v
                       for k, v in values.items()})


# --------------------------------------------------------------------------- context
@dataclasses.dataclass
class Run:
    params: Any
    out: Path
    manifest: Manifest
    log: logging.Logger
    comm: Any
    max_memory: Any = None
    progress: bool | None = None
    image_processing: bool = True
    ff_seeds: bool = False
    midas_refinement: bool = False
    panels: tuple = ("confidence",)
    timings: dict = dataclasses.field(default_factory=dict)

    def stage(self, name: str, inputs: str, outputs: list[Path], compute: Callable[[], Any],
              load: Callable[[], Any], shared: Callable[[Any], Any] | None = None):
        """Run ``compute`` (which writes ``outputs``) unless the manifest says the stage is
        done with the same inputs, in which case ``load`` re-reads its outputs.

        Under MPI rank 0 alone reads the manifest and decides, so every rank takes the same
        branch, and no rank leaves a stage before rank 0 has written its outputs. Rank 0
        alone reads files the run wrote (``load``, and the results ``compute`` gathers);
        the other ranks receive them over MPI (:meth:`Comm.share`), only the part
        ``shared`` picks when given (rank 0 keeps the whole loaded value)."""
        # Where a stage writes is one of its inputs: renaming an output (MicFileBinary,
        # SeedOrientations, ...) reruns the stage instead of reloading a path that is gone.
        inputs = value_hash(inputs, sorted(os.path.relpath(p, self.out) for p in outputs))
        done = self.comm.bcast(self.manifest.is_done(name, inputs) if self.comm.is_root
                               else None)
        if done:
            self.log.info("stage %-14s skipped (inputs unchanged, --resume)", name)
            value = load() if self.comm.is_root else None
            part = self.comm.share(shared(value) if shared and self.comm.is_root else value)
            return value if self.comm.is_root else part
        t0 = time.perf_counter()
        self.log.info("stage %-14s started", name)
        try:
            value = compute()
        except BaseException as exc:
            # The CLI prints the error; the master log and the stage's error log keep it
            # too, so a log read later says how the run ended.
            what = ("interrupted" if isinstance(exc, KeyboardInterrupt)
                    else "failed: " + (" ".join(str(exc).split()) or type(exc).__name__))
            if self.comm.is_root:
                _stage_log(self.out, name, f"{name} {what}\n", err=True)
                _to_file(self.log, f"stage {name:<14} {what}")
            raise
        if self.comm.is_root:
            self.manifest.record(name, inputs, outputs)
        self.comm.barrier()
        dt = time.perf_counter() - t0
        self.timings[name] = dt
        if self.comm.is_root:
            _stage_log(self.out, name, f"{name} finished in {dt:.2f} s\n")
        self.log.info("stage %-14s finished in %.2f s", name, dt)
        return value


def midas_log_name(stage: str, rank: int = 0) -> str:
    """The MIDAS log a stage's lines go to (the manual's ``midas_log/`` map): ``hkls``, ``seed``,
    ``hex`` (grids), ``spots``, ``image0``, ``fit{rank}`` (every fit pass; MIDAS numbers
    these by block, nfjax's blocks are the MPI ranks), ``parse`` (ParseMic's companions of
    every text mic) and ``mic2grains_{k}`` (the clustering that seeds loop k). Each line
    starts with nfjax's stage name."""
    for prefix, log in (("hkls", "hkls"), ("seeds", "seed"), ("grid", "hex"),
                        ("spots", "spots"), ("images", "image0"), ("parse", "parse")):
        if stage.startswith(prefix):
            return log
    if stage.startswith("cluster"):
        return f"mic2grains_{stage[len('cluster'):]}"
    if stage.startswith(("fit", "seeded", "unseeded")):
        return f"fit{rank}"
    return stage


def _stage_log(out: Path, name: str, text: str, err: bool = False, rank: int = 0) -> None:
    """Append ``text`` to the stage's MIDAS log ``midas_log/<log>_out.csv`` (``_err.csv``
    with ``err``; :func:`midas_log_name`); both files exist after every stage, as MIDAS
    leaves them. Best effort: a log that cannot be written (a full disk) does not hide the
    stage's own error."""
    logdir = out / "midas_log"
    log = midas_log_name(name, rank)
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        with open(logdir / f"{log}_{'err' if err else 'out'}.csv", "a") as fh:
            fh.write(text)
        (logdir / f"{log}_err.csv").touch()
    except OSError:
        if not err:
            raise


def _to_file(log: logging.Logger, text: str) -> None:
    """``text`` into the master log file only (the console shows the CLI's error line)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, text, (), None)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            with contextlib.suppress(Exception):
                handler.handle(record)


def _logger(out: Path, root: bool) -> logging.Logger:
    log = logging.getLogger("nfjax.workflow")
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.propagate = False
    if root:
        (out / "midas_log").mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(out / "midas_log" / MASTER_LOG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(fh)
        sh = logging.StreamHandler()
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)
    else:
        log.addHandler(logging.NullHandler())
    return log


# --------------------------------------------------------------------------- validation
def validate(params, ff_seeds: bool) -> None:
    """Every check that can fail before any work starts (one-line errors)."""
    src = params.source
    if params.grid_refactor is not None:
        if not params.seed_orientations_all:
            raise ParamError(f"{src}: GridRefactor needs SeedOrientationsAll (the orientation "
                             "library for the unseeded passes)")
        if params.seed_orientations and (
                params.resolve(params.seed_orientations_all).resolve()
                == params.resolve(params.seed_orientations).resolve()):
            raise ParamError(f"{src}: SeedOrientationsAll must differ from SeedOrientations "
                             f"(both are {params.seed_orientations}): each multi-resolution "
                             "loop rewrites SeedOrientations")
        library = params.resolve(params.seed_orientations_all)
        if not library.is_file():
            raise ParamError(f"{src}: SeedOrientationsAll {_not_a_file(library)}")
    if ff_seeds:
        params.require("GrainsFile", why="by --ff-seeds")
        path = params.resolve(params.grains_file)
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ParamError(f"{src}: GrainsFile is not a readable file: {path}")
    elif params.grid_refactor is None:
        params.require("SeedOrientations", why="for the orientations to search")
        if not params.resolve(params.seed_orientations).is_file():
            raise ParamError(f"{src}: SeedOrientations "
                             f"{_not_a_file(params.resolve(params.seed_orientations))} (make "
                             "one with 'nfjax seeds uniform' or use --ff-seeds)")
    elif not params.seed_orientations or not params.resolve(params.seed_orientations).is_file():
        if not params.resolve(params.seed_orientations_all).is_file():
            raise ParamError(f"{src}: loop 0 needs SeedOrientations or SeedOrientationsAll")
    params.require("MinFracAccept", "OrientTol", "GridSize", "Rsample", "MicFileBinary",
                   "MicFileText", why="by nfjax reconstruct")


def _not_a_file(path: Path) -> str:
    """'file not found: PATH', or what is there instead of a file."""
    if path.is_dir():
        return f"is a directory, expected a file: {path}"
    return f"file not found: {path}"


def _loop_params(params, k: int):
    """The parameters of multi-resolution loop ``k``: GridSize ``G0 / scale**k`` as MIDAS
    writes it (6 decimals)."""
    g0, scale, _ = params.grid_refactor
    return params.replace(grid_size=float(f"{g0 / scale ** k:.6f}"))


@dataclasses.dataclass
class Inputs:
    """What :func:`preflight` read: the loop-0 seeds (``None`` with ``--ff-seeds``: they
    come from the GrainsFile) and the unseeded library of a multi-resolution run."""

    quats: np.ndarray | None
    quats_all: np.ndarray | None


def _seed_source(params) -> str:
    """The seed file of the first pass: SeedOrientations, or SeedOrientationsAll when a
    multi-resolution run has no SeedOrientations file yet."""
    if params.seed_orientations and params.resolve(params.seed_orientations).is_file():
        return params.seed_orientations
    return params.seed_orientations_all


def preflight(params, ff_seeds: bool, image_processing: bool = True,
              max_memory=None) -> Inputs:
    """:func:`validate`, then read or check every input the run will need, so that a bad
    one is a one-line error before anything is written: the memory budget, RingsToUse
    against the reflection list, the first grid (GridMask / TomoImage), the seed and grain
    files, and the observations (SpotsInfo.bin's size, or every raw frame's TIFF header)."""
    from nfjax import observe
    from nfjax.chunking import parse_memory
    from nfjax.crystal import reflections
    from nfjax.grid import grid_from_params
    from nfjax.io.atomic import check_target, refuse_package_folder
    from nfjax.io.grains import read_grains_csv
    from nfjax.io.mic import allmatches_path
    from nfjax.io.seeds import read_seeds

    validate(params, ff_seeds)
    src = params.source
    if params.output_dir.exists() and not params.output_dir.is_dir():
        raise ParamError(f"{src}: OutputDirectory: expected a directory, found a file: "
                         f"{params.output_dir}")
    refuse_package_folder(params.output_dir, "results")
    # The outputs the run writes last (after the fit) must be writable now.
    out = params.output_dir
    for path in (out / MANIFEST, out / params.mic_file_binary,
                 allmatches_path(out / params.mic_file_binary), out / params.mic_file_text):
        check_target(path)
    parse_memory(max_memory)
    reflections(params)          # names the parameter file itself, and a bad ring's line
    grid_from_params(params if params.grid_refactor is None else _loop_params(params, 0))
    quats = quats_all = None
    if ff_seeds:
        read_grains_csv(params.resolve(params.grains_file))   # raises if it holds no grains
    else:
        quats = read_seeds(params.resolve(_seed_source(params)))
    if params.grid_refactor is not None:
        quats_all = read_seeds(params.resolve(params.seed_orientations_all))
    if not image_processing:
        observe.check_spots_info(params.output_dir / "SpotsInfo.bin",
                                 observe.spots_info_shape(params),
                                 missing="not found (image processing was skipped with "
                                 "--no-image-processing / -doImageProcessing 0)")
    else:
        from nfjax.images import check_frames

        check_frames(params, hint="use --no-image-processing to reuse SpotsInfo.bin")
    return Inputs(quats, quats_all)


# --------------------------------------------------------------------------- stages
def _hkls(run: Run):
    from nfjax.crystal import hkls_from_params
    from nfjax.io.hkls import read_hkls_csv, write_hkls_csv

    p = run.params
    path = run.out / "hkls.csv"
    inputs = value_hash(p.lattice_parameter, p.space_group, p.wavelength, p.lsd,
                        p.max_ring_rad)

    def compute():
        table = hkls_from_params(p)
        if run.comm.is_root:
            write_hkls_csv(table, path)
        return table

    return run.stage("hkls", inputs, [path], compute, lambda: read_hkls_csv(path))


def _seeds_from_grains_stage(run: Run, name: str, grains_path: Path, out_path: Path):
    from nfjax.grid import round_as_written
    from nfjax.io.grains import read_grains_csv
    from nfjax.io.seeds import read_seeds, write_seeds_from_grains
    from nfjax.seeds import seeds_from_grains

    def compute():
        quats = None
        if run.comm.is_root:          # Grains.csv.k is rank 0's file: the others are sent it
            grains = read_grains_csv(grains_path)
            quats = seeds_from_grains(grains)
            write_seeds_from_grains(out_path, quats, grains)
            # Continue with the values as written (6 decimals, like MIDAS, which only ever
            # sees the file), so all ranks and a resumed run search the same seeds.
            quats = round_as_written(quats[:, :4])
        return run.comm.share(quats)

    # Only rank 0 decides whether a stage is done (Run.stage), so only it reads the file.
    inputs = value_hash(file_fingerprint(grains_path)) if run.comm.is_root else ""
    return run.stage(name, inputs, [out_path], compute, lambda: read_seeds(out_path))


def _grid(run: Run, name: str, params, path: Path, shared: Path | None = None):
    """The grid stage, written to ``path``. A multi-resolution loop also writes it to
    ``shared`` (MIDAS's ``grid.txt``, which every loop overwrites) but records and reloads
    only its own ``path``, so a resumed run does not redo every loop's grid."""
    from nfjax.grid import grid_from_params
    from nfjax.io.gridfile import read_grid, write_grid

    tomo = params.resolve(params.tomo_image) if params.tomo_image else None
    inputs = value_hash(params.grid_size, params.edge_length_effective, params.rsample,
                        params.grid_mask, params.tomo_pixel_size,
                        file_fingerprint(tomo) if tomo and tomo.exists() else None)

    def publish(grid):
        if run.comm.is_root and shared is not None:
            write_grid(grid, shared)
        return grid

    def compute():
        grid = grid_from_params(params)
        if run.comm.is_root:
            write_grid(grid, path)
        return publish(grid)

    return run.stage(name, inputs, [path], compute, lambda: publish(read_grid(path)))


def _spots(run: Run, name: str, hkls, quats, out_dir: Path):
    from nfjax.crystal import reflections
    from nfjax.geometry import geometry_from_params
    from nfjax.io.spots import NAMES, read_spot_files, write_spot_files
    from nfjax.spots import make_diffraction_spots

    p = run.params
    table = reflections(p, hkls)
    geom = geometry_from_params(p)
    paths = [out_dir / n for n in NAMES]
    inputs = value_hash(array_hash(quats), array_hash(table.g), array_hash(table.theta),
                        geometry_key(p))

    def compute():
        # Under MPI the ranks share the orientations (every rank gets the whole table).
        spots = make_diffraction_spots(quats, table.g, table.theta, geom,
                                       max_memory=run.max_memory, progress=run.progress,
                                       comm=run.comm)
        if run.comm.is_root:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_spot_files(out_dir, spots)
        return spots

    return run.stage(name, inputs, paths, compute, lambda: read_spot_files(out_dir))


def _observations(run: Run):
    """The observation volume on the device, once for every fit stage of the run (a GPU's
    copy is made once, not per stage; on the CPU the host words are shared)."""
    from nfjax import observe

    p = run.params
    path = run.out / "SpotsInfo.bin"
    shape = observe.spots_info_shape(p)
    if not run.image_processing:      # preflight checked that it is there
        # Seconds for a large volume (1.5 GB for the Au example): say what the wait is.
        t0 = time.perf_counter()
        vol = run.comm.share(observe.read_spots_info(path, shape)
                             if run.comm.is_root else None).to_device()
        run.log.info("observations   %s (%.2f GB) read in %.1f s", path,
                     vol.words.size * 4 / 1e9, time.perf_counter() - t0)
        return vol
    from nfjax.images import (frame_paths, lit_per_distance, lit_warnings, median_image_path,
                              process_all, write_median_image)

    frames = [f for L in range(p.n_distances) for f in frame_paths(p, L)]
    inputs = value_hash(p.blanket_subtraction, p.med_filt_radius, p.gauss_filt_radius,
                        p.log_mask_radius, p.do_log_filter, shape,
                        [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in frames])
    medians = [median_image_path(p, L) for L in range(p.n_distances)]

    def compute():
        # Under MPI the ranks share every distance's work and all end with the volume;
        # rank 0 writes the files.
        root = run.comm.is_root
        kept = {}   # the median images are written after SpotsInfo.bin, as nfjax process
        vol = process_all(p, None, run.max_memory, progress=run.progress, comm=run.comm,
                          scratch=path.parent, median_dir_writer=kept.__setitem__)
        if root:
            observe.write_spots_info(path, vol)
            for L, median in kept.items():
                write_median_image(median_image_path(p, L), median)
            # The same warnings nfjax process prints.
            for warning in lit_warnings(p, vol.shape, lit_per_distance(vol)):
                run.log.info("warning: %s", warning)
        return vol

    return run.stage("images", inputs, [path, *medians], compute,
                     lambda: observe.read_spots_info(path, shape)).to_device()


def _fit(run: Run, name: str, params, grid, spots, obs, hkls, bin_path: Path,
         text_path: Path, *, seeded: bool, parse: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Fit ``grid`` (all ranks share the rows), write the binary/AllMatches/text mic, then
    ParseMic's text AllMatches and pixel maps (stage ``parse``). ``seeded``: the
    orientations are grains' (FF or clustered), not a library (see
    :func:`nfjax.fit.refinement_options`). Returns the records (every rank) and the
    ``.AllMatches`` rows (rank 0; ``None`` elsewhere)."""
    from nfjax.fit import fit_grid, refinement_options, unresolved_below
    from nfjax.io.mic import (allmatches_path, read_allmatches, read_binary_mic,
                              write_allmatches, write_binary_mic, write_text_mic)
    from nfjax.parallel import block_range

    n_sol = max(1, int(params.save_n_solutions or 1))
    am_path = allmatches_path(bin_path)
    options = refinement_options(run.midas_refinement, seeded=seeded)
    # Only rank 0 decides whether the stage is done (Run.stage): only it reads SpotsInfo.bin.
    inputs = "" if not run.comm.is_root else value_hash(
        array_hash(grid), array_hash(spots.key), array_hash(spots.spots),
        array_hash(spots.orient),
        file_fingerprint(run.out / "SpotsInfo.bin") if (run.out / "SpotsInfo.bin").exists()
        else value_hash(int(obs.words.shape[0])),
        # the refinement predicts spots itself, from the hkls and the geometry
        array_hash(hkls.g), array_hash(hkls.theta), params.rings_to_use, geometry_key(params),
        params.min_frac_accept, params.orient_tol, n_sol, params.min_miso_n_saves,
        params.space_group,
        # MinConfidence matters to a fit only through the near misses (library passes)
        unresolved_below(params) if "near_misses" in options else None,
        params.phase_nr, params.num_phases, params.global_position,
        "midas-refinement" if run.midas_refinement else "default-refinement",
        "seeded" if seeded else "library")

    def compute():
        start, stop = block_range(len(grid), run.comm.rank, run.comm.size)
        where = f" (rank {run.comm.rank}, rows {start}..{stop - 1})" if run.comm.size > 1 else ""
        if stop > start or run.comm.size == 1:
            result = fit_grid(params, grid[start:stop], spots, obs, hkls=hkls,
                              max_memory=run.max_memory, progress=run.progress, **options)
            summary = result.summary()
            block, block_am = np.asarray(result.records), np.asarray(result.allmatches)
        else:   # more ranks than voxels (a retry pass of a few voxels): nothing to fit here
            summary, where = "no voxels", f" (rank {run.comm.rank})"
            block, block_am = np.zeros((0, 11)), np.zeros((0, 7 + 4 * n_sol))
        run.log.info("stage %-14s %s%s", name, summary, where)
        _stage_log(run.out, name, f"{name}{where}: {summary}\n", rank=run.comm.rank)
        records = run.comm.gather_rows(block)
        allm = run.comm.gather_rows(block_am)
        if run.comm.is_root:
            write_binary_mic(bin_path, records)
            write_allmatches(am_path, allm)
            write_text_mic(text_path, records, phase_nr=params.phase_nr or 1,
                           num_phases=params.num_phases or 1,
                           global_position=params.global_position or 0.0)
            # The whole grid (every rank's rows), and how good it is: "fitted" alone does
            # not tell a map that found the grains from one that did not.
            _report_quality(run, name, records, params)
        return run.comm.share(records), allm

    def load():
        return read_binary_mic(bin_path).records, read_allmatches(am_path, n_sol)

    # A resumed stage: the other ranks need the records, not the AllMatches (rank 0 writes).
    records, allm = run.stage(name, inputs, [bin_path, am_path, text_path], compute, load,
                              shared=lambda value: (value[0], None))
    _parse(run, parse, text_path, records, allm, params)
    return records, allm


def quality_line(records: np.ndarray, min_confidence: float | None) -> tuple[str, int]:
    """``("N voxels, K at or above MinConfidence C, mean confidence m", K)`` of a map's
    binary records (K counts every voxel with a nonzero confidence when C is unset)."""
    conf = np.asarray(records)[:, 10]
    fitted = conf[conf > 0]
    mean = f"{fitted.mean():.3f}" if fitted.size else "-"
    if min_confidence is None:
        return (f"{len(conf)} voxels, {fitted.size} with an orientation, mean confidence "
                f"{mean}"), int(fitted.size)
    good = int(np.count_nonzero(conf >= float(min_confidence)))
    pct = 100.0 * good / max(len(conf), 1)
    return (f"{len(conf)} voxels, {good} ({pct:.1f} %) at or above MinConfidence "
            f"{float(min_confidence):g}, mean confidence {mean}"), good


def _report_quality(run: Run, name: str, records: np.ndarray, params) -> None:
    """Log a fit's whole-grid quality, and warn when no voxel reached MinConfidence."""
    line, good = quality_line(records, params.min_confidence)
    run.log.info("stage %-14s %s", name, line)
    _stage_log(run.out, name, f"{name}: {line}\n")
    if good == 0 and len(records):
        what = ("MinConfidence " + f"{float(params.min_confidence):g}"
                if params.min_confidence is not None else "a nonzero confidence")
        run.log.warning("warning: %s: no voxel reached %s; the seed orientations may not "
                        "contain the sample's (a library too coarse for OrientTol, the wrong "
                        "SpaceGroup or lattice), or the geometry or observations are off",
                        name, what)


def _parse(run: Run, name: str, mic_path: Path, records: np.ndarray,
           allmatches: np.ndarray | None, params) -> None:
    """The stage that writes the rest of what MIDAS's ParseMic writes beside a text mic:
    the text ``<mic>.AllMatches`` of the binary ``.AllMatches`` rows and the pixel maps
    (``.map``, ``.map.kam``, ``.map.grainId``, ``.map.grod``; :mod:`nfjax.maps`). MIDAS
    runs ParseMic after every fit, so every text mic of a run has them. ``allmatches`` is
    needed on rank 0 only."""
    from nfjax.io.mic import write_text_allmatches
    from nfjax.maps import map_paths, map_symmetry, pixel_maps, write_maps

    sg, gb, phase = map_symmetry(params), float(params.gb_angle), int(params.phase_nr or 1)
    edge = float(records[0, 5]) if len(records) else 0.0
    found = bool(np.any(records[:, 10] != 0))
    text_am = Path(str(mic_path) + ".AllMatches")
    paths = map_paths(mic_path)
    header = dict(tri_edge_size=edge, phase_nr=phase, num_phases=params.num_phases or 1,
                  global_position=params.global_position or 0.0)

    def compute():
        if not run.comm.is_root:
            return
        write_text_allmatches(text_am, allmatches, **header)
        if not found:
            for stale in paths:
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
            run.log.info("stage %-14s no voxel has an orientation: no maps of %s", name,
                         mic_path.name)
            return
        maps = pixel_maps(records, edge, space_group=sg, gb_angle=gb)
        write_maps(mic_path, maps, records, phase_nr=phase)
        line = (f"{maps.summary()} -> {mic_path.name}.map, .map.kam, .map.grainId, "
                ".map.grod, .AllMatches")
        run.log.info("stage %-14s %s", name, line)
        _stage_log(run.out, name, f"{name}: {line}\n")

    inputs = "" if not run.comm.is_root else value_hash(
        array_hash(records), array_hash(allmatches), sg, gb, sorted(header.items()))
    run.stage(name, inputs, [text_am] + (paths if found else []), compute, lambda: None)


def _map(run: Run, name: str, mic_path: Path) -> None:
    if not run.comm.is_root:
        return
    try:
        from nfjax.plot import plot_mic

        png = Path(str(mic_path) + ".png")
        plot_mic(mic_path, png, space_group=run.params.space_group,
                 min_confidence=float(run.params.min_confidence or 0.0),
                 boundary_deg=float(run.params.gb_angle), panels=run.panels)
        run.log.info("map %s", png)
    except (NfjaxError, ImportError) as exc:   # e.g. no matplotlib: the map is optional
        run.log.info("map skipped: %s", exc)


# --------------------------------------------------------------------------- modes
def _single(run: Run, hkls, quats) -> tuple[Path, np.ndarray]:
    """The single-resolution run: its text mic and its records."""
    p = run.params
    grid = _grid(run, "grid", p, run.out / (p.grid_file_name or "grid.txt"))
    spots = _spots(run, "spots", hkls, quats, run.out)
    obs = _observations(run)
    bin_path = run.out / p.mic_file_binary
    text_path = run.out / p.mic_file_text
    records, _ = _fit(run, "fit", p, grid, spots, obs, hkls, bin_path, text_path,
                      seeded=run.ff_seeds, parse="parse")
    _map(run, "map", text_path)
    return text_path, records


_SUFFIX = re.compile(r"(_all_solutions|_merged)?(\.\d+)+$")


def _merge(seeded: np.ndarray, unseeded: np.ndarray, rows: np.ndarray,
           better: np.ndarray) -> np.ndarray:
    """``seeded`` with its rows ``rows[better]`` replaced by ``unseeded[better]`` (records
    or the matching ``.AllMatches`` rows)."""
    merged = seeded.copy()
    merged[rows[better]] = unseeded[better]
    return merged


def _publish(run: Run, records: np.ndarray, allmatches: np.ndarray | None) -> None:
    """Write the current result under MIDAS's ``MicFileBinary`` (+ ``.AllMatches``), which
    every loop overwrites (rank 0); the stages' own binaries keep their per-pass names, so
    a resumed run reloads each pass from its own files."""
    from nfjax.io.mic import allmatches_path, write_allmatches, write_binary_mic

    if run.comm.is_root:
        bin_path = run.out / run.params.mic_file_binary
        write_binary_mic(bin_path, records)
        write_allmatches(allmatches_path(bin_path), allmatches)


def _multi(run: Run, hkls, quats0, quats_all) -> tuple[Path, np.ndarray]:
    from nfjax.cluster import cluster_mic, cluster_settings, write_grains_csv
    from nfjax.fit import unresolved_below
    from nfjax.io.atomic import atomic_write
    from nfjax.io.mic import MicData, write_text_mic

    p = run.params
    n_loops = p.grid_refactor[2]
    base = _SUFFIX.sub("", p.mic_file_text)
    sbase = _SUFFIX.sub("", Path(p.seed_orientations).name if p.seed_orientations
                        else "seeds.txt")
    all_path = p.resolve(p.seed_orientations_all)
    backup = run.out / (Path(p.seed_orientations_all).name + "_Backup")
    if run.comm.is_root:
        with open(all_path, "rb") as src, atomic_write(backup, "wb") as dst:
            shutil.copyfileobj(src, dst)
    run.comm.barrier()
    obs = _observations(run)
    # Loop 0: unseeded at the start size.
    p0 = _loop_params(p, 0)
    grid_path = run.out / (p.grid_file_name or "grid.txt")
    grid = _grid(run, "grid0", p0, Path(f"{grid_path}.0"), grid_path)
    spots_all = _spots(run, "spots_all", hkls, quats0, run.out)
    current = run.out / f"{base}.0"
    bin0 = run.out / f"{p.mic_file_binary}.0"
    records, allmatches = _fit(run, "fit0", p0, grid, spots_all, obs, hkls, bin0, current,
                               seeded=run.ff_seeds, parse="parse0")
    _publish(run, records, allmatches)
    if not np.array_equal(quats0, quats_all):
        spots_all = _spots(run, "spots_library", hkls, quats_all, run.out / "library")
    min_conf = unresolved_below(p)
    for k in range(1, int(n_loops) + 1):
        pk = _loop_params(p, k)
        grains_path = run.out / f"Grains.csv.{k}"

        def cluster(records=records, grains_path=grains_path, k=k, source=current.name):
            mic = MicData(records=records, phase_nr=np.ones(len(records), np.int64),
                          tri_edge_size=float(np.max(records[:, 5], initial=0.0)),
                          path=source)
            grains = cluster_mic(mic, params=p)
            if len(grains.ids) == 0:
                best = float(np.max(records[:, 10], initial=0.0))
                raise NfjaxError(
                    f"loop {k}: no voxel of {source} reaches the clustering threshold "
                    f"(MinConfidence/MinFracAccept; best confidence {best:.3f}): nothing to "
                    "seed the next loop from — use a denser SeedOrientations library")
            if run.comm.is_root:
                write_grains_csv(grains_path, grains)
            sizes = ", ".join(str(int(n)) for n in grains.n_voxels[:10])
            run.log.info("stage %-14s %d grain(s) in %s (voxels each: %s%s)", f"cluster{k}",
                         len(grains), source, sizes, ", ..." if len(grains) > 10 else "")
            return grains

        sg, angle, thr, lattice = cluster_settings(p)
        run.stage(f"cluster{k}", value_hash(array_hash(records), sg, angle, thr,
                                            lattice.tolist()),
                  [grains_path], cluster, lambda: None)
        seeds_k = _seeds_from_grains_stage(run, f"seeds{k}", grains_path,
                                           run.out / f"{sbase}.{k}")
        grid = _grid(run, f"grid{k}", pk, Path(f"{grid_path}.{k}"), grid_path)
        spots_k = _spots(run, f"spots{k}", hkls, seeds_k, run.out / f"seeded{k}")
        seeded_bin = run.out / f"{p.mic_file_binary}.seeded{k}"
        seeded, allmatches = _fit(run, f"seeded{k}", pk, grid, spots_k, obs, hkls,
                                  seeded_bin, run.out / f"{base}.{k}", seeded=True,
                                  parse=f"parse{k}")
        bad = np.flatnonzero(seeded[:, 10] < min_conf)
        merged_path = run.out / f"{base}_merged.{k}"
        if bad.size:
            unseeded_bin = run.out / f"{p.mic_file_binary}.unseeded{k}"
            unseeded, unseeded_am = _fit(run, f"unseeded{k}", pk, grid[bad], spots_all, obs,
                                         hkls, unseeded_bin,
                                         run.out / f"{base}_all_solutions.{k}", seeded=False,
                                         parse=f"parse_all{k}")
            better = unseeded[:, 10] > seeded[bad, 10]
            n_better = int(np.count_nonzero(better))
            records = _merge(seeded, unseeded, bad, better)
            if run.comm.is_root:
                allmatches = _merge(allmatches, unseeded_am, bad, better)
        else:
            records = seeded
            n_better = 0
        _publish(run, records, allmatches)
        if run.comm.is_root:
            write_text_mic(merged_path, records, phase_nr=p.phase_nr or 1,
                           num_phases=p.num_phases or 1,
                           global_position=p.global_position or 0.0)
        _parse(run, f"parse_merged{k}", merged_path, records, allmatches, p)
        run.log.info("loop %d: GridSize %.6f, %d voxels, %d below MinConfidence %.2f retried "
                     "unseeded; the retry was better for %d of them (kept), the seeded result "
                     "stays for the rest -> %s: %s", k, pk.grid_size, len(grid), bad.size,
                     min_conf, n_better, merged_path.name,
                     quality_line(records, p.min_confidence)[0])
        current = merged_path
    _map(run, "map", current)
    return current, records


# --------------------------------------------------------------------------- entry
def reconstruct(params_path, *, ff_seeds: bool = False, image_processing: bool = True,
                resume: bool = False, max_memory=None, device: str | None = None,
                progress: bool | None = None, comm=None, midas_refinement: bool = False,
                panels=("confidence",)) -> Path:
    """Run the whole workflow; returns the final text mic path (on every rank).

    ``panels``: the maps drawn beside the orientation map in each text mic's PNG
    (:data:`nfjax.plot.PANELS`; ``nfjax reconstruct --panels``).

    Under MPI an exception on one rank leaves the others waiting in the next collective;
    a script that calls this under ``mpiexec`` should end the job on error as the CLI does
    (:func:`nfjax.parallel.abort_other_ranks`), or run under ``python -m mpi4py``."""
    from nfjax.params import read_params
    from nfjax.parallel import bind_device, print_warnings, world
    from nfjax.plot import PANELS_EXPECTED, panels_ok

    panels = (panels,) if isinstance(panels, str) else tuple(panels)
    if not panels_ok(panels):
        raise NfjaxError(f"panels: expected {PANELS_EXPECTED}, found {','.join(panels)!r}")
    params = read_params(params_path)
    comm = comm or world()
    placement = None
    if device or comm.size > 1:
        # Before anything starts JAX: a rank limited to one GPU must be so from the start.
        import jax

        chosen, placement = bind_device(comm, device)
        jax.config.update("jax_default_device", chosen)
    try:
        inputs = preflight(params, ff_seeds, image_processing, max_memory)
    except NfjaxError:
        # The parameter file's warnings (a misspelt key) may explain the error: show them
        # before it, as the log would have after a good preflight.
        print_warnings(params.warnings)
        raise
    out = params.output_dir
    out.mkdir(parents=True, exist_ok=True)
    run = Run(params=params, out=out, manifest=Manifest(out, resume and comm.is_root),
              log=_logger(out, comm.is_root), comm=comm, max_memory=max_memory, progress=progress,
              image_processing=image_processing, ff_seeds=ff_seeds,
              midas_refinement=midas_refinement, panels=panels)
    run.log.info("nfjax reconstruct %s (output %s, %d rank(s))", params.source, out, comm.size)
    if placement is not None:
        import socket

        host = f"{socket.gethostname()} (rank {comm.local_rank + 1} of {comm.local_size} there)"
        for rank, line in enumerate(comm.gather(f"{host}: {placement}") or []):
            run.log.info("rank %d on %s", rank, line)
    for warning in params.warnings:
        run.log.info("warning: %s", warning)
    t0 = time.perf_counter()
    hkls = _hkls(run)
    if ff_seeds:
        seeds_path = out / Path(params.seed_orientations or "seeds.csv").name
        quats = _seeds_from_grains_stage(run, "seeds", params.resolve(params.grains_file),
                                         seeds_path)
    else:
        quats = inputs.quats
    if params.grid_refactor is None:
        final, records = _single(run, hkls, quats)
    else:
        final, records = _multi(run, hkls, quats, inputs.quats_all)
    # The final records are MicFileBinary's (every row, zeros where empty), in both modes.
    summary = quality_line(records, params.min_confidence)[0]
    run.log.info("finished in %.1f s -> %s; %s", time.perf_counter() - t0, final, summary)
    return final
