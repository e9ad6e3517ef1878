"""Observation volume: bit layout, round trips, lookup, and the MIDAS Au SpotsInfo fixture."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from nfjax import observe
from nfjax.errors import InputFileError


def unpack_oracle(words: np.ndarray, shape) -> np.ndarray:
    """Independent oracle: numpy unpackbits of the little-endian word bytes (reference §6.1)."""
    bits = np.unpackbits(np.asarray(words, dtype="<u4").view(np.uint8), bitorder="little")
    return bits[: observe.n_bits(shape)].reshape(shape).astype(bool)


def test_hand_computed_words(tmp_path):
    shape = (1, 1, 2, 32)  # 64 bits, 2 words
    vol = observe.from_bit_indices(shape, [0, 31, 32, 33, 33])
    assert vol.words.tolist() == [0x80000001, 0x3]
    path = tmp_path / "SpotsInfo.bin"
    observe.write_spots_info(path, vol)
    assert path.read_bytes() == bytes([0x01, 0, 0, 0x80, 0x03, 0, 0, 0])
    back = observe.read_spots_info(path, shape)
    assert back.words.tolist() == [0x80000001, 0x3]
    assert observe.count(back) == 4
    assert observe.lit_indices(back).tolist() == [0, 31, 32, 33]


def test_bit_index_formula():
    shape = (2, 3, 5, 7)
    k = observe.bit_index(shape, 1, 2, 4, 6)
    assert int(k) == ((1 * 3 + 2) * 5 + 4) * 7 + 6 == 2 * 3 * 5 * 7 - 1
    kj = observe.bit_index(shape, jnp.asarray(1), 2, 4, 6)
    assert int(kj) == int(k)
    # int64 math: the Au volume's last bit is past 2**31
    big = (2, 1440, 2048, 2048)
    assert int(observe.bit_index(big, 1, 1439, 2047, 2047)) == 2 * 1440 * 2048 * 2048 - 1


@pytest.mark.parametrize("shape", [(2, 3, 8, 32), (1, 2, 5, 7), (3, 1, 3, 33)])
def test_random_volume_roundtrip_and_lookup(tmp_path, shape):
    rng = np.random.default_rng(sum(shape))
    dense = rng.random(shape) < 0.2
    k = np.flatnonzero(dense.ravel())
    # duplicates and random order must not matter
    vol = observe.from_bit_indices(shape, rng.permutation(np.r_[k, k[: len(k) // 3]]))
    np.testing.assert_array_equal(unpack_oracle(vol.words, shape), dense)
    assert observe.count(vol) == int(dense.sum())
    np.testing.assert_array_equal(observe.lit_indices(vol), k)

    L, f, y, z = observe.unravel(shape, k)
    np.testing.assert_array_equal(observe.from_lit(shape, L, f, y, z).words, vol.words)

    # lookup on every pixel plus out-of-range probes, against the unpackbits oracle
    grids = np.meshgrid(*[np.arange(-1, s + 1) for s in shape], indexing="ij")
    got = np.asarray(jax.jit(observe.lookup, static_argnums=1)(
        jnp.asarray(vol.words), shape, *[jnp.asarray(g) for g in grids]))
    expect = np.zeros(got.shape, dtype=bool)
    expect[1:-1, 1:-1, 1:-1, 1:-1] = dense
    np.testing.assert_array_equal(got, expect)

    # file round trip; ceil words when n_bits is not a multiple of 32
    path = tmp_path / "s.bin"
    observe.write_spots_info(path, vol)
    assert path.stat().st_size == 4 * observe.n_words(shape)
    back = observe.read_spots_info(path, shape)
    np.testing.assert_array_equal(back.words, vol.words)
    np.testing.assert_array_equal(observe.read_spots_info(path, shape, mmap=True).words, vol.words)


def test_floor_sized_file_accepted(tmp_path):
    shape = (1, 1, 5, 7)  # 35 bits: MIDAS writes 1 word, simulateNF 2
    vol = observe.from_bit_indices(shape, [0, 5, 31, 34])
    path = tmp_path / "floor.bin"
    path.write_bytes(np.asarray(vol.words[:1], dtype="<u4").tobytes())
    back = observe.read_spots_info(path, shape)
    assert observe.lit_indices(back).tolist() == [0, 5, 31]


def test_wrong_size_is_one_line_error(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(b"\0" * 12)
    with pytest.raises(InputFileError) as err:
        observe.read_spots_info(path, (1, 2, 4, 32))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "32" in msg and "found 12 bytes" in msg
    with pytest.raises(InputFileError):
        observe.read_spots_info(tmp_path / "missing.bin", (1, 2, 4, 32))


def test_out_of_range_build_rejected():
    with pytest.raises(ValueError):
        observe.from_bit_indices((1, 1, 2, 32), [64])
    with pytest.raises(ValueError):
        observe.from_lit((1, 1, 2, 32), 0, 0, 2, 0)


def test_pytree_through_jit_and_vmap():
    shape = (2, 2, 4, 32)
    vol = observe.from_lit(shape, [0, 1], [1, 0], [3, 2], [31, 0]).to_device()

    @jax.jit
    def probe(v, f, y, z):
        return observe.lookup_all_distances(v.words, v.shape, f, y, z)

    got = probe(vol, jnp.array([1, 0]), jnp.array([[3, 3], [2, 2]]), jnp.array([[31, 31], [0, 0]]))
    np.testing.assert_array_equal(np.asarray(got), [[True, False], [False, True]])
    leaves, treedef = jax.tree_util.tree_flatten(vol)
    assert len(leaves) == 1 and jax.tree_util.tree_unflatten(treedef, leaves).shape == shape
    vm = jax.vmap(lambda y: vol.lookup(0, 1, y, 31))(jnp.arange(4))
    np.testing.assert_array_equal(np.asarray(vm), [False, False, False, True])
    assert observe.count(vol) == 2


def test_au_reference_volume(ref_run):
    k = np.load(ref_run / "SpotsInfo_lit.npz")["index"]
    shape = (2, 1440, 2048, 2048)
    vol = observe.from_bit_indices(shape, k)
    assert vol.words.nbytes == 1_509_949_440
    assert observe.count(vol) == 87_646
    lit = observe.lit_indices(vol)
    np.testing.assert_array_equal(lit, np.sort(k))
    L, f, y, z = observe.unravel(shape, k)
    # The reference README quotes 44,588 / 43,058 bits per distance; the npz itself holds
    # 43,567 / 44,079 (k < 1440*2048**2 for distance 0). The file is the fixture.
    assert int((L == 0).sum()) + int((L == 1).sum()) == 87_646

    words = jnp.asarray(vol.words)
    look = jax.jit(observe.lookup, static_argnums=1)
    assert bool(jnp.all(look(words, shape, L, f, y, z)))
    rng = np.random.default_rng(0)
    probes = [rng.integers(0, s, 20000) for s in shape]
    # also probe the 8 neighbours-in-z of lit pixels, where misses would show an off-by-one
    probes = [np.r_[p, c] for p, c in zip(probes, (L, f, y, np.clip(z + 1, 0, 2047)))]
    kp = observe.bit_index(shape, *probes)
    expect = np.isin(kp, k)
    got = np.asarray(look(words, shape, *[jnp.asarray(p) for p in probes]))
    np.testing.assert_array_equal(got, expect)
    assert expect.sum() > 1000  # the z+1 neighbours are often lit: the probe is not trivial


def _holes_supported(directory) -> bool:
    """Whether files in ``directory`` can have holes (most local file systems)."""
    probe = directory / "hole-probe"
    with open(probe, "wb") as fh:
        fh.truncate(64 << 20)
    blocks = os.stat(probe).st_blocks
    probe.unlink()
    return blocks * 512 < (1 << 20)


def test_au_reference_full_file_roundtrip(ref_run, tmp_path):
    k = np.load(ref_run / "SpotsInfo_lit.npz")["index"]
    shape = (2, 1440, 2048, 2048)
    path = tmp_path / "SpotsInfo.bin"
    vol = observe.from_bit_indices(shape, k)
    observe.write_spots_info(path, vol)
    assert path.stat().st_size == 1_509_949_440
    if _holes_supported(tmp_path):
        # Written sparse: the pages of zero words are holes, not 1.5 GB of disk.
        assert path.stat().st_blocks * 512 < 40 << 20
    back = observe.read_spots_info(path, shape, mmap=True)
    np.testing.assert_array_equal(observe.lit_indices(back), np.sort(k))
    np.testing.assert_array_equal(observe.lit_indices(observe.read_spots_info(path, shape)),
                                  np.sort(k))


def _pages_words(shape, rng):
    """Bit indices of a volume several read buffers (16 MiB) long: words at page (1024
    words) and buffer edges, the first and the last bit, and a random scatter."""
    nb = observe.n_bits(shape)
    edges = np.array([0, 1023, 1024, 1025, 2047, (1 << 22) - 1, 1 << 22, (1 << 22) + 1])
    k = np.r_[edges * 32 + rng.integers(0, 32, edges.size), nb - 1,
              rng.integers(0, nb, 300)]
    return k[k < nb]


@pytest.mark.parametrize("shape", [(1, 25, 2048, 2048), (1, 3, 1999, 4077)])
def test_sparse_files_and_page_reads_keep_every_word(tmp_path, shape):
    """The sparse writer and the page-skipping reader against plain bytes: a volume of
    several read buffers (and, second case, a word count that is no whole number of
    pages), written sparse and dense, read back whole, the MIDAS floor-sized file too."""
    vol = observe.from_bit_indices(shape, _pages_words(shape, np.random.default_rng(3)))
    plain = np.asarray(vol.words, dtype="<u4").tobytes()
    sparse, dense = tmp_path / "sparse.bin", tmp_path / "dense.bin"
    observe.write_spots_info(sparse, vol)
    dense.write_bytes(plain)
    assert sparse.read_bytes() == plain
    if _holes_supported(tmp_path):
        # Only the pages that hold a lit word take disk space.
        pages = np.unique(np.flatnonzero(vol.words) // observe.PAGE_WORDS).size
        assert sparse.stat().st_blocks * 512 <= 4096 * pages + (64 << 10) < len(plain)
    for path in (sparse, dense):
        np.testing.assert_array_equal(observe.read_spots_info(path, shape).words, vol.words)
    floor_w, ceil_w = observe.file_words(shape)
    if floor_w != ceil_w:
        floor = tmp_path / "floor.bin"
        floor.write_bytes(plain[:4 * floor_w])
        back = observe.read_spots_info(floor, shape).words
        np.testing.assert_array_equal(back[:floor_w], vol.words[:floor_w])
        assert back[-1] == 0


def test_reading_a_sparse_volume_leaves_its_zero_pages_alone(tmp_path):
    """A 512 MiB volume with a few lit pixels is read without writing its zero pages: the
    process's resident memory grows by far less than the volume (Linux only), and on the
    CPU backend the device array shares the host words instead of copying them."""
    statm = Path("/proc/self/statm")
    if not statm.exists():
        pytest.skip("needs /proc/self/statm (Linux) to measure resident memory")
    shape = (1, 128, 2048, 2048 * 4)     # 2**32 bits, 512 MiB
    path = tmp_path / "big.bin"
    vol = observe.from_bit_indices(shape, _pages_words(shape, np.random.default_rng(5)))
    observe.write_spots_info(path, vol)
    expect = vol.words[vol.words != 0]
    del vol
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        return int(statm.read_text().split()[1]) * page

    before = resident()
    back = observe.read_spots_info(path, shape)
    on_device = observe.device_words(back.words)
    grown = resident() - before
    assert grown < 64 << 20, f"reading grew resident memory by {grown >> 20} MiB"
    if jax.default_backend() == "cpu":
        assert on_device.unsafe_buffer_pointer() == back.words.ctypes.data
    np.testing.assert_array_equal(back.words[back.words != 0], expect)
