"""The ffbidx-compatible Python API: ``Indexer``, ``indexer``/``index``/``release``/
``runtime_check`` and ``crystals``.

Owns validation order and messages (reference §11.6), defaults (§11.3, §11.5), handles, device
choice (``INDEXER_GPU_DEVICE`` → ``jax.devices()[d]``), ``INDEXER_LOG_LEVEL`` logging (logger
``ffbidx``, read once at import) and the host side of a run: padding the spots, calling the
compiled core of :mod:`nfjax.indexer.core`, and writing ffbidx's output layouts. Units: cells
in Å, spots in Å⁻¹, refined ``ifssr`` scores in Å⁻¹, ``ifss``/``ifse`` scores in Miller units.
It never changes the caller's arrays and never recompiles for a new frame of a size it has
already seen (spots are padded to ``max_spots`` for sampling and, above it, to a multiple of
256 for refinement).
"""
from __future__ import annotations

import logging
import numbers
import os
import sys
import time
import warnings
import weakref
from typing import Sequence

import jax
import numpy as np

from nfjax.indexer import core
from nfjax.indexer.layouts import (IndexerRuntimeError, IndexerValueError, as_float, as_uint,
                                   cell_rows, cells_to_ffbidx, check_method, score_vector,
                                   spots_rows)

logger = logging.getLogger("ffbidx")

_LEVELS = {"fatal": logging.CRITICAL, "error": logging.ERROR, "warn": logging.WARNING,
           "info": logging.INFO, "debug": logging.DEBUG}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class _UpstreamFormatter(logging.Formatter):
    """``(info) message`` lines, with upstream's level words."""

    _WORDS = {v: k for k, v in _LEVELS.items()}

    def format(self, record):
        return f"({self._WORDS.get(record.levelno, record.levelname.lower())}) {record.getMessage()}"


def _setup_logging() -> None:
    """Honour ``INDEXER_LOG_LEVEL`` once, like the C++ library at load time.

    Only when the variable is set does the module attach a stderr handler (``(level) msg``
    lines, as upstream's ``std::clog`` output); otherwise the application's logging
    configuration decides. An illegal value warns and keeps ``error`` (upstream aborts).
    """
    value = os.environ.get("INDEXER_LOG_LEVEL")
    if value is None:
        return
    level = _LEVELS.get(value.strip().lower())
    if level is None:
        warnings.warn(f"illegal value for INDEXER_LOG_LEVEL: {value!r} "
                      f"(use one of {', '.join(_LEVELS)}); using error", stacklevel=2)
        level = logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_UpstreamFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


_setup_logging()


def _env_bool(name: str) -> bool:
    value = os.environ.get(name)
    if value is None:
        return False
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise IndexerRuntimeError(f'illegal value for {name}: "{value}" (use one of '
                              + " ".join(f'"{v}"' for v in _TRUE + _FALSE) + ")")


def select_device():
    """The JAX device named by ``INDEXER_GPU_DEVICE`` (an index into ``jax.devices()``),
    else JAX's default device."""
    value = os.environ.get("INDEXER_GPU_DEVICE")
    devices = jax.devices()
    if value is None:
        return devices[0]
    try:
        index = int(value)
    except ValueError:
        raise IndexerRuntimeError(
            f"wrong format for INDEXER_GPU_DEVICE: {value} (should be an integer)") from None
    if not 0 <= index < len(devices):
        raise IndexerRuntimeError(
            f"illegal value for INDEXER_GPU_DEVICE: {value} (should be in [0..{len(devices)}[)")
    return devices[index]


# --------------------------------------------------------------------------- run settings
def _as_int(value, name: str) -> int:
    """A signed integer argument (``min_spots``): floats and non-numbers are a TypeError."""
    if isinstance(value, (float, np.floating)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: integer argument expected, got {type(value).__name__}")
    return int(value)


def _alias(value, alias, name: str, alias_name: str):
    if value is not None and alias is not None:
        raise TypeError(f"crystals() got both '{name}' and its alias '{alias_name}'")
    value = alias if value is None else value
    if value is None:
        raise TypeError(f"crystals() missing required argument '{name}'")
    return value


# Input cell vector lengths the float32 core can work with: its direction tests compare
# lengths with float32's epsilon in absolute terms (a cell given in metres, ~1e-9, gives NaN
# cells), and squares and volumes of longer vectors overflow.
_CELL_LENGTHS = (1e-4, 1e12)


def _check_input_cells(vecs: np.ndarray, n_cells: int) -> None:
    """Reject input cells that cannot index (an nfjax addition: upstream runs on, and returns
    NaN cells or 0.0 "perfect" scores): a zero-length vector, three vectors that span
    (almost) no volume, or vector lengths outside :data:`_CELL_LENGTHS` (not Å)."""
    for m in range(min(n_cells, len(vecs) // 3)):
        cell = vecs[3 * m:3 * m + 3].astype(np.float64)
        lengths = np.linalg.norm(cell, axis=1)
        shown = ', '.join(f'{v:.4g}' for v in lengths)
        volume = abs(np.linalg.det(cell))
        if not np.all(lengths > 0) or volume <= 1e-6 * np.prod(lengths):
            raise IndexerValueError(
                f"input cell {m} is degenerate (vector lengths {shown} Å, volume "
                f"{volume:.4g} Å³): give three independent vectors")
        lo, hi = _CELL_LENGTHS
        if lengths.min() < lo or lengths.max() > hi:
            raise IndexerValueError(
                f"input cell {m} has vector lengths {shown}, expected {lo:g} to {hi:g} Å: "
                f"give the cell in Å and the spots in 1/Å")


class RunConfig:
    """Validated ``run()`` arguments (§11.6 order); dist1/dist3 ≤ 0 replaced by trimh."""

    def __init__(self, method, length_threshold, triml, trimh, delta, dist1, dist3,
                 vr_min_spots, num_halfsphere_points, num_angle_points, n_output_cells,
                 contraction, max_dist, min_spots, n_iter):
        # Argument conversion first (TypeError), then the value checks in upstream's order.
        self.length_threshold = as_float(length_threshold, "length_threshold")
        self.triml = as_float(triml, "triml")
        self.trimh = as_float(trimh, "trimh")
        self.delta = as_float(delta, "delta")
        dist1 = as_float(dist1, "dist1")
        dist3 = as_float(dist3, "dist3")
        self.vr_min_spots = as_uint(vr_min_spots, "vr_min_spots")
        self.num_halfsphere_points = as_uint(num_halfsphere_points, "num_halfsphere_points")
        self.num_angle_points = as_uint(num_angle_points, "num_angle_points")
        self.n_output_cells = as_uint(n_output_cells, "n_output_cells")
        self.contraction = as_float(contraction, "contraction")
        self.max_dist = as_float(max_dist, "max_dist")
        min_spots = _as_int(min_spots, "min_spots")
        self.n_iter = as_uint(n_iter, "n_iter")
        self.method = check_method(method)
        if not self.length_threshold > 0:  # nfjax addition: 0 or less groups no length
            raise IndexerValueError("length_threshold <= 0")
        if self.triml < 0:
            raise IndexerValueError("lower trim value < 0")
        if self.trimh > 0.5:
            raise IndexerValueError("higher trim value > 0.5")
        if self.triml > self.trimh:
            raise IndexerValueError("lower trim value > higher trim value")
        if self.delta + self.triml <= 0:
            raise IndexerValueError("delta + triml <= 0")
        self.dist1 = self.trimh if dist1 <= 0 else dist1
        self.dist3 = self.trimh if dist3 <= 0 else dist3
        if self.vr_min_spots != 0 and self.vr_min_spots < 4:
            raise IndexerValueError("vr_min_spots value too low")
        if self.contraction <= 0:
            raise IndexerValueError("contraction parameter <= 0")
        if self.max_dist <= 0:
            raise IndexerValueError("max distance parameter <= 0")
        if self.contraction >= 1:
            raise IndexerValueError("contraction parameter >= 1")
        if min_spots < 4 or min_spots > 2**32 - 1:
            raise IndexerValueError("min_spots outside of [4..max_uint]")
        self.min_spots = min_spots

    def device_checks(self, ix: "Indexer") -> int:
        """The library-side checks (RuntimeError); returns Q."""
        n_out = min(self.n_output_cells, ix.max_output_cells)
        if ix.max_input_cells == 0:
            raise IndexerRuntimeError("no given input cells")
        if n_out == 0:
            raise IndexerRuntimeError("no output cells")
        if ix.max_spots == 0:
            raise IndexerRuntimeError("no spots")
        if self.num_halfsphere_points < ix.num_candidate_vectors:
            raise IndexerRuntimeError(
                "fewer halfsphere sample points than required candidate vectors")
        if 0 < self.num_angle_points < ix.max_output_cells:  # Q9: compared with the maximum
            raise IndexerRuntimeError("fewer angle sample points than required candidate cells")
        if self.delta <= 0:
            raise IndexerRuntimeError("nonpositive delta value in runtime configuration")
        if self.triml >= self.trimh:
            raise IndexerRuntimeError("lower trim value bigger than higher trim value")
        if n_out > 1024:
            raise IndexerRuntimeError("fewer threads in a block than output cells")
        return n_out

    def vectors(self):
        fp = np.zeros(7, np.float32)
        fp[[core.F_TRIML, core.F_TRIMH, core.F_DELTA, core.F_DIST1, core.F_DIST3,
            core.F_CONTRACTION, core.F_MAX_DIST]] = (
            self.triml, self.trimh, self.delta, self.dist1, self.dist3, self.contraction,
            self.max_dist)
        ip = np.zeros(3, np.int32)
        ip[[core.I_VR_MIN_SPOTS, core.I_MIN_SPOTS, core.I_N_ITER]] = (
            min(self.vr_min_spots, 2**31 - 1), min(self.min_spots, 2**31 - 1),
            min(self.n_iter, 2**31 - 1))
        return fp, ip

    @property
    def prune_ok(self) -> bool:
        """The count-first shortcut is exact while every score's fraction is in [0, 1):
        ``2^(1/n)(trimh + delta) − delta < 1`` for all n ≥ 1."""
        return 2.0 * self.trimh + self.delta < 1.0


def _bucket(n_spots: int, max_spots: int) -> int:
    """Padded spot-array length: ``max_spots``, or ``n_spots`` rounded up to a multiple of
    256 above it (a handful of compilations, little padding work in refinement)."""
    if n_spots <= max_spots:
        return max(max_spots, 1)
    return -(-n_spots // 256) * 256


# --------------------------------------------------------------------------- handles
# Every live Indexer by handle, held weakly so that ``del indexer`` frees it (ffbidx's
# Python class releases its handle when collected). Indexers made through the low-level
# ``indexer()`` have no Python owner but the handle, so _OWNED keeps them until
# ``release(handle)``, as the C extension keeps its state.
_HANDLES: "weakref.WeakValueDictionary[int, Indexer]" = weakref.WeakValueDictionary()
_OWNED: dict[int, "Indexer"] = {}
_NEXT_HANDLE = [0]


class Indexer:
    """Fast feedback indexer state on one JAX device (ffbidx's ``ffbidx.Indexer``).

    Holds the device, the half-sphere and angle tables as device arrays (built once per
    ``num_halfsphere_points``/angle count) and reuses the compiled core for every frame of the
    same settings; creating a second Indexer is cheap because compilations are shared.
    ``redundant_calculations`` is accepted as an alias of ``redundant_computations`` (older
    ffbidx documents use it; upstream now rejects it).
    """

    def __init__(self, max_output_cells=32, max_input_cells=1, max_spots=300,
                 num_candidate_vectors=32, redundant_computations=True, *,
                 redundant_calculations=None):
        self.max_output_cells = as_uint(max_output_cells, "max_output_cells")
        self.max_input_cells = as_uint(max_input_cells, "max_input_cells")
        self.max_spots = as_uint(max_spots, "max_spots")
        self.num_candidate_vectors = as_uint(num_candidate_vectors, "num_candidate_vectors")
        if redundant_calculations is not None:
            redundant_computations = redundant_calculations
        self.redundant_computations = bool(redundant_computations)
        if self.num_candidate_vectors < 1:
            raise IndexerRuntimeError("nonpositive number of candidate vectors")
        if self.num_candidate_vectors > 1024:
            raise IndexerRuntimeError("fewer threads in a block than candidate vectors")
        self.device = select_device()
        self.debug = _env_bool("INDEXER_GPU_DEBUG")
        self._tables: dict = {}
        self.initialized = False
        self.handle = _NEXT_HANDLE[0]
        if self.handle in _HANDLES:
            raise IndexerRuntimeError(
                "unable to allocate handle: handle counter wraparound occurred")
        _NEXT_HANDLE[0] = (_NEXT_HANDLE[0] + 1) % 2**32
        _HANDLES[self.handle] = self
        self.initialized = True
        self.last_timing: dict = {}
        logger.info("using device %s", self.device)

    # -- lifetime ---------------------------------------------------------------------
    def release(self) -> None:
        if getattr(self, "initialized", False):
            _HANDLES.pop(self.handle, None)
            _OWNED.pop(self.handle, None)
            self._tables = {}
            self.initialized = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- device tables ----------------------------------------------------------------
    def _device_tables(self, n_points: int, n_rot: int):
        key = (n_points, n_rot)
        if key not in self._tables:
            dirs = core.halfsphere_points(n_points)
            pad = (-len(dirs)) % core.DIR_CHUNK
            dirs = np.concatenate([dirs, np.zeros((pad, 3), np.float32)])
            self._tables[key] = (jax.device_put(dirs, self.device),
                                 jax.device_put(core.angle_table(n_rot), self.device))
        return self._tables[key]

    def _prepare(self, input_cells, cfg: RunConfig):
        vecs = cell_rows(input_cells)
        n_cells = min(len(vecs) // 3, self.max_input_cells)
        vecs = vecs[: 3 * n_cells]
        groups = core.length_groups(vecs, cfg.length_threshold, self.redundant_computations)
        n_rot = core.n_angles(cfg.num_halfsphere_points, cfg.num_angle_points)
        dirs, cs = self._device_tables(cfg.num_halfsphere_points, n_rot)
        fp, ip = cfg.vectors()
        shared = [jax.device_put(a, self.device) for a in (
            vecs, groups.lengths, groups.vectors.astype(np.int32),
            groups.vec_group.astype(np.int32), fp, ip)]
        return groups, n_rot, dirs, cs, shared

    def _static(self, groups, n_rot, cfg: RunConfig, prune: bool) -> core.Static:
        return core.Static(n_groups=len(groups.lengths), n_vectors=len(groups.vectors),
                           n_cand=self.num_candidate_vectors,
                           n_out=min(self.max_output_cells, 1024), n_rot=n_rot, prune=prune)

    def _check_live(self):
        if not getattr(self, "initialized", False):
            raise IndexerRuntimeError("invalid handle")

    # -- ffbidx API -------------------------------------------------------------------
    def run(self, spots, input_cells, method="ifssr", length_threshold=1e-9, triml=.001,
            trimh=.3, delta=.1, dist1=.1, dist3=.15, vr_min_spots=6,
            num_halfsphere_points=32 * 1024, num_angle_points=0, n_output_cells=32,
            contraction=.8, max_dist=.00075, min_spots=8, n_iter=32):
        """Index one frame (ffbidx ``Indexer.run``); returns ``(output_cells, scores)``.

        ``spots``: float32 ``(3, K)`` C-order or ``(K, 3)`` F-order, Å⁻¹. ``input_cells``:
        float32 ``(3, 3M)`` C-order or ``(3M, 3)`` F-order, Å. Returns ``output_cells``
        float32 ``(3, 3N)`` C-order (cell i = columns 3i..3i+2, vector j of a cell descends
        from input vector j) and ``scores`` float32 ``(N,)``, N = min(n_output_cells,
        max_output_cells). Raw scores are ascending; refined scores replace them in place.
        """
        cfg = RunConfig(method, length_threshold, triml, trimh, delta, dist1, dist3,
                        vr_min_spots, num_halfsphere_points, num_angle_points, n_output_cells,
                        contraction, max_dist, min_spots, n_iter)
        self._check_live()
        rows = spots_rows(spots)
        _check_input_cells(cell_rows(input_cells), self.max_input_cells)
        n_out = cfg.device_checks(self)
        cells, scores = self._run_rows([rows], input_cells, cfg)[0]
        return cells_to_ffbidx(cells[:n_out]), np.ascontiguousarray(scores[:n_out])

    def run_batch(self, spot_arrays: Sequence[np.ndarray], input_cells, method="ifssr",
                  vectorize: bool | None = None, **kwargs):
        """Index many frames in one call (nfjax extension; not in ffbidx).

        ``spot_arrays``: a sequence of spot arrays, each in a layout ``run()`` accepts;
        ``input_cells`` and every keyword as for :meth:`run`. With ``vectorize`` the frames
        are padded to a common length and indexed by one vmapped, compiled call (the
        accelerator path); without it they go one by one through the single-frame program.
        ``None`` (default) vectorises on GPU/TPU and not on CPU, where the vmapped program
        measured slower than the frame loop (XLA:CPU already uses every core per frame).
        Returns a list of ``(output_cells, scores)`` tuples in ``run()``'s layouts, one per
        frame, equal to what ``run()`` returns for that frame alone.
        """
        params = dict(length_threshold=1e-9, triml=.001, trimh=.3, delta=.1, dist1=.1,
                      dist3=.15, vr_min_spots=6, num_halfsphere_points=32 * 1024,
                      num_angle_points=0, n_output_cells=32, contraction=.8, max_dist=.00075,
                      min_spots=8, n_iter=32)
        unknown = set(kwargs) - set(params)
        if unknown:
            raise TypeError(f"run_batch() got unexpected keyword arguments {sorted(unknown)}")
        params.update(kwargs)
        cfg = RunConfig(method, **params)
        self._check_live()
        if hasattr(spot_arrays, "shape"):       # one array (NumPy or JAX), not a sequence
            raise TypeError(f"run_batch() spot_arrays: expected a sequence of spot arrays, "
                            f"one per frame, found one array of shape "
                            f"{tuple(np.shape(spot_arrays))}; use run() for one frame, or "
                            "run_batch([spots]) for a batch of one")
        rows = [spots_rows(s) for s in spot_arrays]
        _check_input_cells(cell_rows(input_cells), self.max_input_cells)
        n_out = cfg.device_checks(self)
        if not rows:
            return []
        if vectorize is None:
            vectorize = self.device.platform != "cpu"
        if vectorize:
            out = self._run_rows(rows, input_cells, cfg)
        else:
            out = [self._run_rows([r], input_cells, cfg)[0] for r in rows]
        return [(cells_to_ffbidx(c[:n_out]), np.ascontiguousarray(s[:n_out])) for c, s in out]

    def _run_rows(self, rows: list[np.ndarray], input_cells, cfg: RunConfig):
        t0 = time.perf_counter()
        groups, n_rot, dirs, cs, shared = self._prepare(input_cells, cfg)
        kb = _bucket(max(len(r) for r in rows), self.max_spots)
        padded = np.zeros((len(rows), kb, 3), np.float32)
        for i, r in enumerate(rows):
            padded[i, : len(r)] = r
        n_all = np.array([len(r) for r in rows], np.int32)
        n_used = np.minimum(n_all, self.max_spots).astype(np.int32)
        n_dir = np.int32(cfg.num_halfsphere_points)

        single = len(rows) == 1

        def sample(prune: bool, idx):
            st = self._static(groups, n_rot, cfg, prune)
            sp = jax.device_put(padded[idx, : self.max_spots], self.device)
            nu = jax.device_put(n_used[idx], self.device)
            if single:
                return core.sample_frame_jit(st, dirs, n_dir, cs, sp[0], nu[0], *shared)
            return core.sample_batch_jit(st, dirs, n_dir, cs, sp, nu, *shared)

        cells, scores, overflow = sample(cfg.prune_ok, np.arange(len(rows)))
        overflow = np.atleast_1d(np.asarray(overflow))
        redo = np.nonzero(overflow)[0]
        if len(redo):  # too many ties for the count-first shortcut: score every cell
            logger.debug("frames %s: tie overflow, rerunning with every score evaluated", redo)
            cells, scores = np.array(cells).reshape(len(rows), -1, 3, 3), \
                np.array(scores).reshape(len(rows), -1)
            for i in redo:
                st = self._static(groups, n_rot, cfg, False)
                c, s, _ = core.sample_frame_jit(
                    st, dirs, n_dir, cs, jax.device_put(padded[i, : self.max_spots], self.device),
                    jax.device_put(n_used[i], self.device), *shared)
                cells[i], scores[i] = np.asarray(c), np.asarray(s)
            if single:
                cells, scores = cells[0], scores[0]
        if cfg.method != "raw":
            spots_all = jax.device_put(padded if not single else padded[0], self.device)
            n_dev = jax.device_put(n_all if not single else n_all[0], self.device)
            mask = np.arange(kb)[None, :] < n_all[:, None]
            mask = jax.device_put(mask if not single else mask[0], self.device)
            fn = core.refine_frame_jit if single else core.refine_batch_jit
            cells, scores = fn(cells, scores, spots_all, mask, n_dev, shared[4], shared[5],
                               cfg.method)
        cells = np.asarray(cells).reshape(len(rows), -1, 3, 3)
        scores = np.asarray(scores).reshape(len(rows), -1)
        ms = (time.perf_counter() - t0) * 1e3
        self.last_timing = {"indexing_time_ms": ms, "frames": len(rows),
                            "exhaustive_reruns": len(redo)}
        logger.info("indexing_time: %.3fms", ms)
        if self.debug:
            print(f"output cells:\n{cells}\nscores:\n{scores}")
        return list(zip(cells, scores))

    def crystals(self, cells=None, spots=None, scores=None, method="ifssr", threshold=.00075,
                 min_spots=8, *, output_cells=None, output_scores=None):
        """ffbidx ``Indexer.crystals``: see :func:`crystals`.

        ``output_cells``/``output_scores`` are accepted as keyword aliases of ``cells``/
        ``scores``: the ffbidx module document names them so, upstream's code does not.
        """
        cells = _alias(cells, output_cells, "cells", "output_cells")
        scores = _alias(scores, output_scores, "scores", "output_scores")
        if spots is None:
            raise TypeError("crystals() missing required argument 'spots'")
        return crystals(cells, spots, scores, method, threshold, min_spots)


# --------------------------------------------------------------------------- crystals
def covered_spots(cell: np.ndarray, spots: np.ndarray, method: str, threshold) -> np.ndarray:
    """Which ``spots (K,3)`` Å⁻¹ the cell ``(3 vectors, 3)`` Å indexes (§10): the error to
    the induced spot (``ifssr``, Å⁻¹) or to the nearest Miller triple (else) is below
    ``threshold``. Miller indices round half away from zero. A singular cell covers nothing
    (upstream's float32 inverse would give inf/NaN errors, which compare false as well)."""
    b = np.asarray(cell, np.float32).T                          # columns = vectors
    x = spots @ b
    h = np.where(np.abs(x - np.trunc(x)) == 0.5, np.trunc(x) + np.sign(x), np.rint(x))
    if method == "ifssr":
        try:
            e = spots - h @ np.linalg.inv(b).astype(np.float32)
        except np.linalg.LinAlgError:
            return np.zeros(len(spots), bool)
    else:
        e = x - h
    with np.errstate(invalid="ignore", over="ignore"):
        return np.linalg.norm(e.astype(np.float32), axis=1) < threshold


def crystals(cells, spots, scores, method="ifssr", threshold=.00075, min_spots=8):
    """Greedy selection of separate crystals among candidate cells (§10), host NumPy.

    ``cells`` as ``input_cells``; ``spots`` (all of them); ``scores`` (N,) float32 defining
    the visiting order (ascending). A cell's spot is covered when its error is below
    ``threshold``: Å⁻¹ distance to the induced spot for ``ifssr``, Miller-space distance
    otherwise. Returns a uint32 array of cell indices (the first one covers ≥ ``min_spots``
    spots, each later one ≥ ``min_spots`` not yet covered), or None.
    """
    check_method(method)
    vecs = cell_rows(cells, what="cell", name="cells")
    s = spots_rows(spots)
    sc = score_vector(scores, len(vecs) // 3)
    threshold = np.float32(as_float(threshold, "threshold"))
    min_spots = _as_int(min_spots, "min_spots")
    if min_spots < 0:  # upstream wraps to a huge unsigned value: nothing qualifies
        return None
    cell_arr = vecs.reshape(-1, 3, 3)

    def covered(i):
        return covered_spots(cell_arr[i], s, method, threshold)

    order = np.argsort(sc, kind="stable")
    union = covered(order[0])
    if int(union.sum()) < min_spots:
        return None
    result = [int(order[0])]
    for i in order[1:]:
        c = covered(i)
        if int((c & ~union).sum()) >= min_spots:
            union |= c
            result.append(int(i))
    return np.array(result, dtype=np.uint32)


# --------------------------------------------------------------------------- low-level API
def indexer(max_output_cells, max_input_cells, max_spots, num_candidate_vectors,
            redundant_computations=True) -> int:
    """ffbidx_impl.indexer: create an Indexer and return its integer handle; it lives
    until ``release(handle)``."""
    ix = Indexer(max_output_cells, max_input_cells, max_spots, num_candidate_vectors,
                 redundant_computations)
    _OWNED[ix.handle] = ix
    return ix.handle


def _lookup(handle) -> Indexer:
    if isinstance(handle, (float, np.floating)):
        raise TypeError("handle: integer argument expected, got float")
    if int(handle) < 0 or int(handle) > 2**32 - 1:
        raise IndexerValueError("handle out of bounds for an unsigned integer")
    ix = _HANDLES.get(int(handle))
    if ix is None:
        raise IndexerRuntimeError("invalid handle")
    return ix


def index(handle, spots, input_cells, method="ifssr", length_threshold=1e-9, triml=.001,
          trimh=.3, delta=.1, dist1=.1, dist3=.3, vr_min_spots=6, num_halfsphere_points=32768,
          num_angle_points=0, n_output_cells=32, contraction=.8, max_dist=.00075, min_spots=8,
          n_iter=32):
    """ffbidx_impl.index (note ``dist3=0.3`` here, 0.15 in ``Indexer.run``: Q10)."""
    if isinstance(handle, (float, np.floating)):
        raise TypeError("handle: integer argument expected, got float")
    if int(handle) < 0 or int(handle) > 2**32 - 1:
        raise IndexerValueError("handle out of bounds for an unsigned integer")
    cfg_args = (method, length_threshold, triml, trimh, delta, dist1, dist3, vr_min_spots,
                num_halfsphere_points, num_angle_points, n_output_cells, contraction,
                max_dist, min_spots, n_iter)
    RunConfig(*cfg_args)
    return _lookup(handle).run(spots, input_cells, *cfg_args)


def release(handle) -> None:
    """ffbidx_impl.release: ValueError "invalid handle" for an unknown handle."""
    ix = _HANDLES.get(int(handle)) if isinstance(handle, (int, np.integer)) else None
    if ix is None:
        raise IndexerValueError("invalid handle")
    ix.release()


def runtime_check() -> None:
    """ffbidx_impl.runtime_check: run a one-element computation on the selected device;
    RuntimeError when that fails."""
    try:
        dev = select_device()
        val = jax.device_put(np.float32(1.0), dev) + np.float32(1.0)
        if float(val) != 2.0:
            raise IndexerRuntimeError(f"runtime check failed on {dev}")
    except IndexerRuntimeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any backend failure is reported the same way
        raise IndexerRuntimeError(f"runtime check failed: {exc}") from None
