"""The observation volume: which detector pixels are lit, bit-packed as MIDAS's SpotsInfo.bin.

This module owns the boolean volume ``[n_distances, n_frames, NY, NZ]`` (distance L and
frame f 0-based, y/z the *flipped* detector indices of reference §0.1, §8.3) and its one
storage format: uint32 words, bit ``k = ((L*n_frames + f)*NY + y)*NZ + z`` in word
``k >> 5`` at bit ``k & 31`` (LSB first), little-endian (reference §6.1). Files are read and
written byte-exactly in that layout. The volume is never expanded to one byte (or one bool)
per pixel — 2 x 1440 x 2048² pixels are 1.5 GB packed and 12 GB as bytes — so every helper
here works on words: building goes through sorted word indices, unpacking touches only the
non-zero words, and :func:`lookup` reads single bits on the device. Word arrays are
``numpy`` on the host and ``jax`` on the device; :class:`ObsVolume` is a pytree so it passes
through ``jax.jit`` with its shape static.
"""
from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import stat
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nfjax.errors import InputFileError
from nfjax.io.atomic import atomic_write

__all__ = [
    "ObsVolume",
    "n_bits",
    "n_words",
    "bit_index",
    "empty",
    "from_bit_indices",
    "from_lit",
    "lit_indices",
    "count",
    "lookup",
    "lookup_all_distances",
    "bits_set",
    "read_spots_info",
    "load_observations",
    "write_spots_info",
    "spots_info_shape",
    "file_words",
]

# Words processed per step when scanning a large volume on the host (64 MiB of uint32).
_CHUNK_WORDS = 1 << 24
# Words of one 4 KiB memory page: the unit in which a volume's zero words are left alone.
PAGE_WORDS = 1024
_PAGE = 4 * PAGE_WORDS


def zero_words(n: int) -> np.ndarray:
    """``n`` zero uint32 words on the host, page-aligned.

    The observation volume is almost all zero words (the Au example: 27,565 non-zero words
    of 377 million). A large ``np.zeros`` comes from the system as pages that are mapped
    only when first written, so the readers and builders here write only the non-zero
    pages and the rest costs neither time nor memory (a volume of 1 MiB or more is its own
    anonymous memory map, without transparent huge pages). The alignment lets
    ``jax.device_put`` hand the same buffer to the CPU backend instead of copying it
    (:func:`device_words`).
    """
    n = int(n)
    if n < 256 * PAGE_WORDS:                   # below 1 MiB: nothing to gain
        return np.zeros(n, dtype=np.uint32)
    block = mmap.mmap(-1, 4 * n)               # anonymous: zero, page-aligned, lazily mapped
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        # One lit word would otherwise bring in a 2 MiB huge page where transparent huge
        # pages are on (the Au example: a few hundred MB instead of about 20).
        block.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(block, dtype=np.uint32)


def device_words(words, device=None):
    """The words as a jax array (on ``device`` if given). On the CPU backend the page-aligned
    host words of :func:`zero_words` are shared, not copied (1.5 GB for the Au example);
    they must not be changed afterwards."""
    if isinstance(words, jax.Array) and device is None:
        return words
    if not isinstance(words, jax.Array):
        words = np.ascontiguousarray(words, dtype=np.uint32)
    return jax.device_put(words, device)


@dataclasses.dataclass(frozen=True)
class ObsVolume:
    """Bit-packed boolean volume ``[n_distances, n_frames, NY, NZ]``.

    ``words``: 1-D uint32 array (numpy or jax) of length ``ceil(prod(shape) / 32)``; bit k
    as in the module docstring. ``shape``: ``(n_distances, n_frames, NY, NZ)`` plain ints,
    static under ``jit``.
    """

    words: object
    shape: tuple

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 4 or any(s <= 0 for s in shape):
            raise ValueError(f"ObsVolume shape must be 4 positive ints, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        words = self.words
        # Tracers and placeholders (e.g. inside tree_util transformations) skip the checks.
        if isinstance(words, (np.ndarray, jax.Array)) and not isinstance(words, jax.core.Tracer):
            if words.ndim != 1 or words.shape[0] != n_words(shape):
                raise ValueError(
                    f"ObsVolume words must be 1-D of length {n_words(shape)} for shape {shape}, "
                    f"got {words.shape}")
            if words.dtype != np.uint32:
                raise ValueError(f"ObsVolume words must be uint32, got {words.dtype}")

    @property
    def n_bits(self) -> int:
        return n_bits(self.shape)

    def to_device(self, device=None) -> "ObsVolume":
        """The same volume with ``words`` as a jax array (on ``device`` if given)."""
        return ObsVolume(device_words(self.words, device), self.shape)

    def to_host(self) -> "ObsVolume":
        """The same volume with ``words`` as a numpy array."""
        return ObsVolume(np.asarray(self.words), self.shape)

    def lookup(self, L, f, y, z):
        """``lookup(self.words, self.shape, L, f, y, z)``."""
        return lookup(self.words, self.shape, L, f, y, z)


jax.tree_util.register_pytree_node(
    ObsVolume,
    lambda v: ((v.words,), v.shape),
    lambda shape, children: ObsVolume(children[0], shape),
)


def n_bits(shape) -> int:
    """Number of pixels (bits) of a volume of ``shape`` (python int, no overflow)."""
    out = 1
    for s in shape:
        out *= int(s)
    return out


def n_words(shape) -> int:
    """Number of uint32 words that hold every bit of ``shape``: ``ceil(n_bits / 32)``."""
    return (n_bits(shape) + 31) // 32


def file_words(shape) -> tuple[int, int]:
    """The two word counts a SpotsInfo.bin of ``shape`` may have: (MIDAS floor, simulateNF ceil)."""
    return n_bits(shape) // 32, n_words(shape)


def _is_jax(*arrays) -> bool:
    return any(isinstance(a, jax.Array) for a in arrays)


def bit_index(shape, L, f, y, z):
    """Flat bit index ``((L*n_frames + f)*NY + y)*NZ + z`` as int64.

    Works on numpy or jax arrays (jax needs x64 for volumes of 2**31 bits or more; importing
    nfjax turns it on). No range check: see :func:`lookup` for the masked version.
    """
    _, nf, ny, nz = (int(s) for s in shape)
    if _is_jax(L, f, y, z):
        i64 = jnp.int64
        L, f, y, z = (jnp.asarray(a).astype(i64) for a in (L, f, y, z))
    else:
        L, f, y, z = (np.asarray(a, dtype=np.int64) for a in (L, f, y, z))
    return ((L * nf + f) * ny + y) * nz + z


def empty(shape, *, device: bool = False) -> ObsVolume:
    """An all-false volume (host numpy words, or jax words if ``device``)."""
    words = zero_words(n_words(shape))
    vol = ObsVolume(words, tuple(shape))
    return vol.to_device() if device else vol


def words_from_bit_indices(nwords: int, k) -> np.ndarray:
    """uint32 words of length ``nwords`` with the bits ``k`` (int, any order, duplicates ok) set.

    Sort + unique + one segmented sum per word: after ``unique`` the bits that land in one
    word are distinct, so their sum equals their OR. Memory ~ 3 x 8 bytes per index.
    """
    k = np.unique(np.asarray(k, dtype=np.int64).ravel())
    words = zero_words(nwords)
    if k.size == 0:
        return words
    if k[0] < 0 or k[-1] >= 32 * nwords:
        raise ValueError(f"bit index out of range [0, {32 * nwords}): min {k[0]}, max {k[-1]}")
    w = k >> 5
    bits = np.left_shift(np.uint32(1), (k & 31).astype(np.uint32))
    starts = np.flatnonzero(np.r_[True, w[1:] != w[:-1]])
    words[w[starts]] = np.add.reduceat(bits, starts, dtype=np.uint32)
    return words


def from_bit_indices(shape, k) -> ObsVolume:
    """Volume with the flat bit indices ``k`` set (duplicates allowed; host words).

    Raises ValueError for an index outside ``[0, n_bits)``.
    """
    shape = tuple(int(s) for s in shape)
    k = np.asarray(k, dtype=np.int64).ravel()
    if k.size and (k.min() < 0 or k.max() >= n_bits(shape)):
        raise ValueError(
            f"bit index out of range [0, {n_bits(shape)}) for shape {shape}: "
            f"min {k.min()}, max {k.max()}")
    return ObsVolume(words_from_bit_indices(n_words(shape), k), shape)


def from_lit(shape, L, f, y, z) -> ObsVolume:
    """Volume with the pixels (L, f, y, z) set (broadcast int arrays; ValueError if outside)."""
    shape = tuple(int(s) for s in shape)
    L, f, y, z = np.broadcast_arrays(*(np.asarray(a, dtype=np.int64) for a in (L, f, y, z)))
    for name, a, s in zip("Lfyz", (L, f, y, z), shape):
        if a.size and (a.min() < 0 or a.max() >= s):
            raise ValueError(f"{name} index out of range [0, {s}): min {a.min()}, max {a.max()}")
    return from_bit_indices(shape, bit_index(shape, L, f, y, z))


def _unpack_nonzero(words: np.ndarray, base_word: int) -> np.ndarray:
    """Sorted int64 bit indices of the set bits of numpy uint32 ``words``, plus base_word*32."""
    nz = np.flatnonzero(words)
    if nz.size == 0:
        return np.zeros(0, dtype=np.int64)
    w = words[nz]
    shifts = np.arange(32, dtype=np.uint32)
    bits = ((w[:, None] >> shifts[None, :]) & np.uint32(1)).astype(bool)
    rows, cols = np.nonzero(bits)  # row-major, so already sorted by (word, bit)
    return (nz[rows].astype(np.int64) + base_word) * 32 + cols.astype(np.int64)


def lit_indices(vol: ObsVolume) -> np.ndarray:
    """Sorted int64 flat bit indices of every set bit (host; scans the words chunk by chunk).

    Padding bits past ``n_bits`` in the last word are ignored.
    """
    words = vol.words
    out = []
    for start in range(0, words.shape[0], _CHUNK_WORDS):
        chunk = np.asarray(words[start:start + _CHUNK_WORDS])
        out.append(_unpack_nonzero(chunk, start))
    k = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    return k[k < vol.n_bits]


def unravel(shape, k):
    """(L, f, y, z) int64 arrays of flat bit indices ``k`` (inverse of :func:`bit_index`)."""
    return np.unravel_index(np.asarray(k, dtype=np.int64), tuple(int(s) for s in shape))


def count(vol: ObsVolume) -> int:
    """Number of set bits (popcount; padding bits past ``n_bits`` excluded)."""
    words = vol.words
    nb = vol.n_bits
    tail_bits = nb - 32 * (nb // 32)
    if isinstance(words, jax.Array):
        total = int(jnp.sum(jax.lax.population_count(words).astype(jnp.int64)))
        last = int(words[-1]) if tail_bits else 0
    else:
        total = 0
        for start in range(0, words.shape[0], _CHUNK_WORDS):
            total += int(np.bitwise_count(words[start:start + _CHUNK_WORDS]).sum(dtype=np.int64))
        last = int(words[-1]) if tail_bits else 0
    if tail_bits:
        total -= bin(last >> tail_bits).count("1")
    return total


def lookup(words, shape, L, f, y, z):
    """Is pixel (L, f, y, z) lit?  Pure jnp; jit-, vmap- and grad-safe (no gradient flows).

    words: 1-D uint32 (jax or numpy); shape: static 4-tuple; L, f, y, z: int arrays that
    broadcast together. Returns a bool array of the broadcast shape. Indices outside the
    volume return False (they are masked, never clipped onto another pixel's bit).

    When NZ is a multiple of 32 (every real detector) the word index is computed as
    ``((L*n_frames + f)*NY + y)*(NZ/32) + z//32`` in int32 if the word count allows, which
    avoids 64-bit integer math on the accelerator; otherwise int64 (needs x64).
    """
    nd, nf, ny, nz = (int(s) for s in shape)
    L, f, y, z = (jnp.asarray(a) for a in (L, f, y, z))
    inside = ((L >= 0) & (L < nd) & (f >= 0) & (f < nf)
              & (y >= 0) & (y < ny) & (z >= 0) & (z < nz))
    nw = n_words(shape)
    if nz % 32 == 0:
        it = jnp.int32 if nw < 2**31 - 1 else jnp.int64
        Li, fi, yi, zi = (jnp.where(inside, a, 0).astype(it) for a in (L, f, y, z))
        word = ((Li * nf + fi) * ny + yi) * (nz // 32) + (zi >> 5)
        bit = (zi & 31).astype(jnp.uint32)
    else:
        Li, fi, yi, zi = (jnp.where(inside, a, 0).astype(jnp.int64) for a in (L, f, y, z))
        return inside & bits_set(words, ((Li * nf + fi) * ny + yi) * nz + zi)
    w = jnp.asarray(words)[word]
    return inside & (((w >> bit) & jnp.uint32(1)) != 0)


def bits_set(words, k):
    """Are the flat bit indices ``k`` (int array, each in ``[0, n_bits)``) set?  Pure jnp;
    the layout of the module notes (word ``k >> 5``, bit ``k & 31``)."""
    k = jnp.asarray(k)
    w = jnp.asarray(words)[k >> 5]
    return ((w >> (k & 31).astype(jnp.uint32)) & jnp.uint32(1)) != 0


def lookup_all_distances(words, shape, f, y, z):
    """Lit flags at every distance: ``y``, ``z`` have a trailing axis of size n_distances.

    f: int array (...) (frame, shared by the distances); y, z: int arrays (..., n_distances)
    (pixel at distance L in column L). Returns bool (..., n_distances). Pure jnp.
    """
    nd = int(shape[0])
    L = jnp.arange(nd, dtype=jnp.int32)
    f = jnp.asarray(f)[..., None]
    return lookup(words, shape, L, f, y, z)


def spots_info_shape(params) -> tuple[int, int, int, int]:
    """``(n_distances, n_frames, NY, NZ)`` of a parameter set (n_frames = EndNr - StartNr + 1)."""
    return (int(params.n_distances), int(params.n_frames),
            int(params.nr_pixels_y), int(params.nr_pixels_z))


def check_spots_info(path, shape, missing: str = "SpotsInfo file not found") -> int:
    """Size in bytes of the SpotsInfo.bin ``path`` if it can hold a volume of ``shape``
    (MIDAS's floor or simulateNF's ceil word count, see :func:`read_spots_info`);
    InputFileError naming the file otherwise (``missing``: the message when it is absent).
    """
    path = Path(path)
    shape = tuple(int(s) for s in shape)
    floor_w, ceil_w = file_words(shape)
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise InputFileError(f"{path}: {missing}") from None
    if path.is_dir():
        raise InputFileError(f"{path}: expected a SpotsInfo.bin file, found a directory")
    if size not in (4 * floor_w, 4 * ceil_w):
        expected = f"{4 * floor_w}" if floor_w == ceil_w else f"{4 * floor_w} or {4 * ceil_w}"
        raise InputFileError(
            f"{path}: expected {expected} bytes for a SpotsInfo volume of shape "
            f"(distances, frames, NY, NZ) = {shape}, found {size} bytes")
    return size


def read_spots_info(path, shape, *, mmap: bool = False) -> ObsVolume:
    """Read a SpotsInfo.bin of ``shape`` into host words.

    MIDAS's ProcessImagesCombined writes ``floor(n_bits/32)`` words, simulateNF
    ``ceil(n_bits/32)``; both are accepted (a floor file is padded with one zero word in
    memory; with ``mmap`` the padding forces a copy). Any other size raises InputFileError
    naming the file and the expected and found byte counts.
    """
    path = Path(path)
    shape = tuple(int(s) for s in shape)
    size = check_spots_info(path, shape)
    ceil_w = file_words(shape)[1]
    if mmap and size == 4 * ceil_w:
        words = np.memmap(path, dtype="<u4", mode="r", shape=(ceil_w,))
    else:
        words = zero_words(ceil_w)
        _read_nonzero_pages(path, words, size)
    if words.dtype.byteorder == ">":  # pragma: no cover - big-endian hosts only
        words = words.astype(np.uint32)
    return ObsVolume(np.asarray(words, dtype=np.uint32) if not mmap else words.view(np.uint32),
                     shape)


def _data_extents(fd: int, size: int):
    """(start, stop) byte ranges of the file that may hold data: the whole file, or, where
    the system reports holes (a sparse SpotsInfo.bin, :func:`write_spots_info`), only the
    ranges between them."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:      # only a hole from here to the end
                return
            yield pos, size                   # no hole reporting here: read it all
            return
        except AttributeError:                # pragma: no cover - systems without SEEK_DATA
            yield pos, size
            return
        stop = os.lseek(fd, start, os.SEEK_HOLE)
        start -= start % _PAGE
        yield start, min(stop, size)
        pos = stop


def _read_nonzero_pages(path: Path, words: np.ndarray, size: int) -> None:
    """Read the first ``size`` bytes of ``path`` into the zero ``words``, writing only the
    pages that hold a non-zero word (16 MiB at a time through one buffer): the volume's
    zero pages are never touched, so the 1.5 GB Au volume loads in 0.3 s (0.03 s from a
    sparse file) and little memory. InputFileError if the file ends early."""
    buf = np.empty(1 << 22, dtype=np.uint32)
    raw = memoryview(buf).cast("B")
    with open(path, "rb", buffering=0) as fh:
        for start, stop in list(_data_extents(fh.fileno(), size)):
            pos = fh.seek(start)
            while pos < stop:
                n = fh.readinto(raw[:min(len(raw), stop - pos)])
                if not n:
                    raise InputFileError(f"{path}: expected {size} bytes, the file ended at "
                                         f"{pos} (changed while it was read?)")
                _copy_nonzero_pages(words, pos // 4, buf[:n // 4])
                pos += n


def _copy_nonzero_pages(words: np.ndarray, at: int, block: np.ndarray) -> None:
    """``words[at:at + len(block)] = block``, leaving the pages of ``words`` that ``block``
    has no non-zero word for untouched (``words`` is zero there; ``at`` is page-aligned)."""
    whole = len(block) // PAGE_WORDS * PAGE_WORDS
    pages = block[:whole].reshape(-1, PAGE_WORDS)
    keep = np.flatnonzero(pages.any(axis=1))
    if keep.size:
        words[at:at + whole].reshape(-1, PAGE_WORDS)[keep] = pages[keep]
    if whole < len(block):
        words[at + whole:at + len(block)] = block[whole:]


def load_observations(path, shape) -> ObsVolume:
    """The observations of a job, host words: a SpotsInfo.bin (MIDAS layout,
    :func:`read_spots_info`) or a sparse ``.npz`` holding the lit bit indices as
    ``index`` (as the reference fixtures store them)."""
    path = Path(path)
    if path.suffix == ".npz":
        try:
            k = np.load(path)["index"]
        except (OSError, KeyError, ValueError) as exc:
            raise InputFileError(f"{path}: expected an .npz with an 'index' array of lit "
                                 f"bit indices ({exc})") from None
        try:
            return from_bit_indices(shape, k)
        except ValueError as exc:
            raise InputFileError(f"{path}: {exc}") from None
    return read_spots_info(path, shape)


def write_spots_info(path, vol: ObsVolume) -> None:
    """Write ``vol`` as SpotsInfo.bin, atomically, byte-exact layout.

    Length: ``n_bits/32`` words when n_bits is a multiple of 32 (identical to MIDAS's
    ProcessImagesCombined and simulateNF). Otherwise ``ceil(n_bits/32)`` words as simulateNF
    writes them, so no bit is lost (MIDAS's ProcessImagesCombined would write one word
    fewer and drop the tail bits); :func:`read_spots_info` accepts both.

    The file is written sparse where the system allows it (a regular file): runs of zero
    pages are skipped, not written, so the Au example's 1.5 GB volume takes about 11 MB of
    disk. Every reader sees the same bytes.
    """
    words = vol.words
    with atomic_write(path, "wb") as fh:
        sparse = stat.S_ISREG(os.fstat(fh.fileno()).st_mode)
        for start in range(0, words.shape[0], _CHUNK_WORDS):
            chunk = np.ascontiguousarray(np.asarray(words[start:start + _CHUNK_WORDS]),
                                         dtype="<u4")
            if not sparse:
                fh.write(memoryview(chunk).cast("B"))
                continue
            for first, stop in _nonzero_runs(chunk):
                fh.seek(4 * (start + first))
                fh.write(memoryview(chunk[first:stop]).cast("B"))
        if sparse:
            fh.truncate(4 * words.shape[0])


def _nonzero_runs(chunk: np.ndarray):
    """(first, stop) word ranges of ``chunk`` covering its pages that hold a non-zero word,
    consecutive such pages merged into one range."""
    whole = len(chunk) // PAGE_WORDS * PAGE_WORDS
    lit = chunk[:whole].reshape(-1, PAGE_WORDS).any(axis=1)
    if whole < len(chunk):
        lit = np.r_[lit, chunk[whole:].any()]
    edges = np.flatnonzero(np.diff(np.r_[False, lit, False].astype(np.int8)))
    for a, b in zip(edges[::2], edges[1::2]):
        yield int(a) * PAGE_WORDS, min(int(b) * PAGE_WORDS, len(chunk))
