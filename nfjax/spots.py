"""Predicted spots of a seed-orientation list (MIDAS ``MakeDiffrSpots``).

Owns the batch step between seeds and screening: seed quaternions → orientation matrices
(from the raw, un-normalised quaternion, as MIDAS) → :func:`nfjax.forward.predict_spots`
for every orientation (chunked, jitted once) → the spot table in MIDAS's
``Key.bin``/``DiffractionSpots.bin``/``OrientMat.bin`` order, or padded per orientation for
the accelerator. Positions in µm at the first distance, ω in degrees. No file I/O here
(see :mod:`nfjax.io.spots`).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from nfjax.chunking import chunk_size, map_chunked
from nfjax.forward import spot_angles, spot_positions
from nfjax.geometry import Geometry


@dataclass(frozen=True)
class SpotTable:
    """Spots of N orientations, MIDAS layout.

    ``key (N,2)`` int32: (number of spots, offset of the first spot); ``spots (T,3)``
    float64: (yl µm, zl µm, ω deg); ``orient (N,9)`` float64 row-major U.
    """

    key: np.ndarray
    spots: np.ndarray
    orient: np.ndarray

    def __len__(self) -> int:
        return int(self.key.shape[0])

    def of(self, i: int) -> np.ndarray:
        """Spots ``(n_i, 3)`` of orientation ``i``."""
        n, off = self.key[i]
        return self.spots[off:off + n]

    def padded(self, width: int | None = None, fill: float = 0.0):
        """``(N, W, 3)`` spots and ``(N, W)`` mask, W = ``width`` or the largest count."""
        counts = self.key[:, 0].astype(np.int64)
        width = int(counts.max(initial=0)) if width is None else int(width)
        if counts.max(initial=0) > width:
            raise ValueError(f"padded width {width} < largest spot count {counts.max()}")
        n = len(self)
        out = np.full((n, width, 3), fill, np.float64)
        mask = np.arange(width)[None, :] < counts[:, None]
        rows = np.repeat(np.arange(n), counts)
        cols = np.arange(counts.sum()) - np.repeat(self.key[:, 1].astype(np.int64), counts)
        out[rows, cols] = self.spots
        return out, mask


def _compact(valid: np.ndarray, *fields: np.ndarray):
    """Keep valid slots, preserving order: per-row counts and the flat kept values."""
    counts = valid.sum(axis=1).astype(np.int32)
    return counts, [f[valid] for f in fields]


def seed_matrices(quats: np.ndarray) -> np.ndarray:
    """Orientation matrices ``(N,3,3)`` float64 from raw seed quaternions (w,x,y,z), not
    normalised — MIDAS's ``OrientMat.bin`` rows, bit for bit.

    Evaluated with numpy on the host: XLA's CPU backend may contract multiply-adds into
    FMAs, which changes the last bit, and MIDAS's x86-64 build does not. The formula is
    :func:`nfjax.orientation.quat_to_matrix`'s, which the tests compare against.
    """
    q = np.asarray(quats, np.float64)[:, :4]
    w, x, y, z = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    m = np.empty((q.shape[0], 3, 3), np.float64)
    m[:, 0, 0] = 1.0 - 2.0 * (y * y + z * z)
    m[:, 0, 1] = 2.0 * (x * y - w * z)
    m[:, 0, 2] = 2.0 * (x * z + w * y)
    m[:, 1, 0] = 2.0 * (x * y + w * z)
    m[:, 1, 1] = 1.0 - 2.0 * (x * x + z * z)
    m[:, 1, 2] = 2.0 * (y * z - w * x)
    m[:, 2, 0] = 2.0 * (x * z - w * y)
    m[:, 2, 1] = 2.0 * (y * z + w * x)
    m[:, 2, 2] = 1.0 - 2.0 * (x * x + y * y)
    return m


def _chunk(n_orients: int, g: np.ndarray, max_memory=None) -> int:
    """Orientations per chunk of :func:`_predict_chunks`."""
    n_slots = 2 * int(np.shape(g)[0])
    return chunk_size(n_orients, bytes_per_item=n_slots * 8 * 40, max_memory=max_memory,
                      maximum=8192)


def _predict_chunks(orients: np.ndarray, g: np.ndarray, theta: np.ndarray, geom: Geometry, *,
                    v=None, max_memory=None, progress=None, dtype=jnp.float64, collect=None,
                    chunk: int | None = None):
    """:func:`predict_many` chunk by chunk: the list of ``collect((yl, zl, omega, valid),
    n_valid)`` of each chunk (default: the chunk's arrays, trimmed). ``chunk``: the
    orientations per chunk (default :func:`_chunk`)."""
    g_j = jnp.asarray(g, dtype)
    th_j = jnp.asarray(theta, dtype)
    v_j = None if v is None else jnp.asarray(v, dtype)
    geom_d = geom.astype(dtype)

    # predict_spots in its two halves, compiled separately: one executable would recompute
    # the ω/η chain in each output's loop (see forward.spot_angles).
    angles = jax.jit(jax.vmap(lambda m: spot_angles(m, g_j, th_j, v_j)))

    @jax.jit
    @jax.vmap
    def positions(omega, eta, ok):
        yl, zl, valid = spot_positions(omega, eta, ok, th_j, geom_d)
        return yl.reshape(-1), zl.reshape(-1), omega.reshape(-1), valid.reshape(-1)

    def run(u):
        return positions(*angles(u))

    chunk = chunk or _chunk(len(orients), g, max_memory)
    return map_chunked(run, [np.asarray(orients, np.float64).astype(dtype)], chunk,
                       desc="predict spots", unit="orient", progress=progress, collect=collect)


def predict_many(orients: np.ndarray, g: np.ndarray, theta: np.ndarray, geom: Geometry, *,
                 v: np.ndarray | None = None, max_memory=None, progress=None,
                 dtype=jnp.float64):
    """Spots of many orientations, ``(N, 2R)`` arrays ``yl, zl, omega, valid`` (numpy).

    ``v`` as in :func:`predict_spots` (``None`` → MakeDiffrSpots' |U·g| convention).
    """
    parts = _predict_chunks(orients, g, theta, geom, v=v, max_memory=max_memory,
                            progress=progress, dtype=dtype)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))


def make_diffraction_spots(quats: np.ndarray, g: np.ndarray, theta: np.ndarray,
                           geom: Geometry, *, max_memory=None, progress=None,
                           comm=None) -> SpotTable:
    """MakeDiffrSpots: the spot table of seed quaternions ``quats (N,4+)``.

    ``g (R,3)``, ``theta (R,)`` are the ring-selected reflections in file order.
    ``comm`` (:class:`nfjax.parallel.Comm`) with several ranks: the ranks share the
    orientations, whole chunks of rank 0's chunk size each (so every chunk is computed as
    one process computes it), and every rank returns the whole table.
    """
    orients = seed_matrices(quats)
    first, last, chunk = 0, len(orients), None
    if comm is not None and comm.size > 1:
        from nfjax.parallel import block_range

        chunk = comm.bcast(_chunk(len(orients), g, max_memory) if comm.is_root else None)
        c0, c1 = block_range(-(-len(orients) // chunk), comm.rank, comm.size)
        first, last = c0 * chunk, min(len(orients), c1 * chunk)
        if not comm.is_root:
            progress = False

    def compact(out, k):
        # Each chunk keeps only its valid slots (about a fifth of the 2R): the full
        # (N, 2R) arrays of a 1° cubic library would take 7 GB.
        yl, zl, om, valid = (np.asarray(a)[:k] for a in jax.device_get(out))
        counts, (y, z, w) = _compact(valid, yl, zl, om)
        return counts, np.stack([y, z, w], axis=1)

    parts = _predict_chunks(orients[first:last], g, theta, geom, max_memory=max_memory,
                            progress=progress, collect=compact, chunk=chunk)
    if chunk:                       # every rank's chunks, in order, on every rank
        parts = [p for mine in comm.gather_all(parts) for p in mine]
    counts = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
    spots = (np.concatenate([p[1] for p in parts]) if parts
             else np.zeros((0, 3), np.float64))
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)[:-1]])
    if offsets.size and offsets[-1] + counts[-1] > np.iinfo(np.int32).max:
        raise ValueError("more than 2^31 predicted spots: Key.bin offsets would overflow")
    key = np.stack([counts, offsets.astype(np.int32)], axis=1).astype(np.int32)
    return SpotTable(key=key, spots=spots, orient=orients.reshape(-1, 9))
