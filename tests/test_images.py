"""Image processing: filters against scipy, the lower temporal median against numpy, MIDAS file
naming, bad-input errors, and a synthetic frames -> SpotsInfo round trip."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import tifffile

from conftest import need_mpiexec
from nfjax import errors, images, observe
from nfjax.chunking import format_bytes, parse_memory
from nfjax.cli import main as cli_main
from nfjax.errors import InputFileError, ParamError


# ----------------------------------------------------------------------------- filters
def _scipy_median_midas_border(img, r):
    out = ndi.median_filter(img, size=2 * r + 1, mode="nearest")
    out[:r], out[-r:], out[:, :r], out[:, -r:] = img[:r], img[-r:], img[:, :r], img[:, -r:]
    return out


@pytest.mark.parametrize("radius", [1, 2])
def test_median_matches_scipy_exactly(radius):
    rng = np.random.default_rng(radius)
    frames = rng.integers(0, 40, size=(3, 37, 53)).astype(np.int32)  # many ties
    frames[1] = rng.integers(0, 65535, size=(37, 53))
    got = np.asarray(images.median_filter(frames, radius))
    for b in range(3):
        np.testing.assert_array_equal(got[b], _scipy_median_midas_border(frames[b], radius))
    # any other radius is a plain copy (MIDAS)
    np.testing.assert_array_equal(np.asarray(images.median_filter(frames, 0)), frames)


def test_gaussian_and_log_match_scipy():
    rng = np.random.default_rng(7)
    img = rng.random((41, 58)) * 1000.0
    for sigma in (1.0, 1.7):
        ref = ndi.gaussian_filter(img, sigma)
        got = np.asarray(images.gaussian_filter(img, sigma))
        assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))
        ref = ndi.gaussian_laplace(img, sigma)
        got = np.asarray(images.gaussian_laplace(img, sigma))
        assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))


@pytest.mark.parametrize("radius,sigma", [(4, 1.0), (6, 2.0)])
def test_log_response_float_and_integer(radius, sigma):
    rng = np.random.default_rng(radius)
    img = rng.integers(0, 65535, size=(2, 30, 44))
    r = radius
    # float kernel: MIDAS's formula sampled; oracle = scipy correlate with the dense kernel
    k = images.log_kernel_float(radius, sigma)
    d = np.arange(-r, r + 1)
    r2 = d[:, None] ** 2 + d[None, :] ** 2
    closed = -1 / (np.pi * sigma**4) * (1 - r2 / (2 * sigma**2)) * np.exp(-r2 / (2 * sigma**2))
    np.testing.assert_allclose(k, closed, rtol=1e-15)
    got = np.asarray(images.log_response(img, radius, sigma, integer=False))
    for b in range(2):
        ref = ndi.correlate(img[b].astype(np.float64), k, mode="constant")
        inner = (slice(r, -r), slice(r, -r))
        assert np.max(np.abs(got[b][inner] - ref[inner])) <= 1e-4 * np.max(np.abs(ref[inner]))
        assert not got[b][:r].any() and not got[b][:, -r:].any()  # border L = 0
    # integer kernel: exact int64 against scipy in int64
    ki = images.log_kernel_int(radius, sigma)
    np.testing.assert_array_equal(ki, np.trunc(79720 * closed).astype(np.int64))
    got = np.asarray(images.log_response(img, radius, sigma, integer=True))
    assert got.dtype == np.int64
    for b in range(2):
        ref = ndi.correlate(img[b].astype(np.int64), ki, mode="constant")
        np.testing.assert_array_equal(got[b][r:-r, r:-r], ref[r:-r, r:-r])
        assert not got[b][:r].any() and not got[b][-r:].any()


def test_log_kernel_int_sigma1_values():
    # hand values of (int)(79720 * -1/pi * (1 - r2/2) * exp(-r2/2)) for sigma = 1
    k = images.log_kernel_int(4, 1.0)
    assert k[4, 4] == int(-79720 / np.pi) == -25375
    assert k[4, 5] == int(-79720 / np.pi * 0.5 * np.exp(-0.5)) == -7695
    assert k[4, 6] == 3434 and k[0, 0] == 0


def test_zero_crossing_edges_match_flat_index_loop():
    rng = np.random.default_rng(3)
    nz, ny = 9, 11
    L = rng.integers(-5, 5, size=(nz, ny))
    img = rng.integers(0, 2, size=(nz, ny))
    got = np.asarray(images.zero_crossing_edges(L, img))
    flat_l, flat_i = L.ravel(), img.ravel()
    expect = np.zeros(nz * ny, bool)
    for i in range(ny + 1, nz * ny - (ny + 1)):  # MIDAS's loop, wrapping at row ends
        if flat_i[i] == 0:
            continue
        for off in (1, -1, ny, -ny, ny + 1, ny - 1, -ny + 1, -ny - 1):
            if (flat_l[i] < 0) != (flat_l[i + off] < 0):
                expect[i] = True
    np.testing.assert_array_equal(got.ravel(), expect)


def test_lit_mask_semantics_against_scipy_oracle():
    # lit = nonzero & OR over passes of (L < 0 | edge), L from scipy's exact int64 correlate
    rng = np.random.default_rng(11)
    img = np.zeros((40, 50), np.int64)
    for _ in range(12):
        r, c = rng.integers(5, 35), rng.integers(5, 45)
        img[r - 2:r + 3, c - 1:c + 2] += rng.integers(1, 500)
    img[rng.random(img.shape) < 0.05] += 3  # dim isolated pixels
    passes = ((5, 1.5), (4, 1.0))
    expect = np.zeros(img.shape, bool)
    for radius, sigma in passes:
        L = ndi.correlate(img, images.log_kernel_int(radius, sigma), mode="constant")
        L[:radius], L[-radius:], L[:, :radius], L[:, -radius:] = 0, 0, 0, 0
        edges = np.zeros(img.size, bool)
        fl, fi = L.ravel(), img.ravel()
        ny = img.shape[1]
        for i in range(ny + 1, img.size - ny - 1):
            if fi[i] and any((fl[i] < 0) != (fl[i + o] < 0)
                             for o in (1, -1, ny, -ny, ny + 1, ny - 1, 1 - ny, -1 - ny)):
                edges[i] = True
        expect |= (L < 0) | edges.reshape(img.shape)
    expect &= img != 0
    got = np.asarray(images.lit_mask(img, do_log_filter=1, log_passes=passes))
    np.testing.assert_array_equal(got, expect)
    assert 0 < expect.sum() < (img != 0).sum()  # the LoG rule drops some non-zero pixels
    np.testing.assert_array_equal(np.asarray(images.lit_mask(img, do_log_filter=0)), img != 0)


def test_pack_frames_flip_and_bit_order():
    lit = np.zeros((2, 4, 8), bool)  # (B, NZ rows, NY columns)
    lit[0, 3, 7] = True   # last row/column -> y = 0, z = 0 -> bit 0
    lit[1, 0, 0] = True   # first row/column -> y = 7, z = 3 -> bit 7*4+3 = 31
    lit[1, 2, 6] = True   # row 2, col 6 -> y = 1, z = 1 -> bit 5
    words = np.asarray(images.pack_frames(lit))
    assert words.tolist() == [[1], [(1 << 31) | (1 << 5)]]


# ----------------------------------------------------------------------------- temporal median
@pytest.mark.parametrize("n", [1, 6, 7, 40])
def test_temporal_median_is_numpy_lower_median(n):
    rng = np.random.default_rng(n)
    stack = rng.integers(0, 300, size=(n, 13, 17)).astype(np.uint16)
    expect = np.sort(stack, axis=0)[(n - 1) // 2]
    got = images.temporal_median(iter(stack), n, (13, 17))
    np.testing.assert_array_equal(got, expect)
    # banded: a budget of ~3 rows forces 5 bands, each a fresh pass over the frames
    calls = []

    def bands(r0, r1):
        calls.append((r0, r1))
        return (stack[j, r0:r1] for j in range(n))

    got = images.temporal_median(bands, n, (13, 17), max_memory=2 * n * 17 * 3)
    np.testing.assert_array_equal(got, expect)
    assert calls[0] == (0, 3) and len(calls) == 5 and calls[-1] == (12, 13)


# ----------------------------------------------------------------------------- synthetic data
NZ, NY, NF = 96, 128, 15  # rows, columns (non-square to catch axis swaps), frames


def _disc(r2):
    d = np.arange(-4, 5)
    return np.argwhere(d[:, None] ** 2 + d[None, :] ** 2 <= r2) - 4


def make_dataset(root, n_distances=2, seed=0, raw_start=3, wf=2, spots_per_frame=6):
    """Poisson frames with bright disc spots, MIDAS-named TIFFs; returns (params, truth, stacks).

    truth: flat SpotsInfo bit indices of every drawn spot pixel (flipped as MIDAS does).
    The discs (r^2 <= 5 or 10: 21 or 37 pixels) are fixed points of the 3x3 median, so an
    ideal processor recovers exactly the drawn pixels.
    """
    rng = np.random.default_rng(seed)
    raw = root / "raw"
    raw.mkdir()
    bg = rng.uniform(50, 150, size=(NZ, NY))
    truth, stacks = [], []
    for L in range(n_distances):
        stack = np.empty((NF, NZ, NY), np.uint16)
        for f in range(NF):
            lam = bg.copy()
            mask = np.zeros((NZ, NY), bool)
            placed = 0
            while placed < spots_per_frame:
                shape = _disc(rng.choice([5, 10]))
                rz, cy = rng.integers(8, NZ - 8), rng.integers(8, NY - 8)
                pix = shape + [rz, cy]
                region = mask[rz - 6:rz + 7, cy - 6:cy + 7]
                if region.any():  # keep spots apart (>= 2 px gap)
                    continue
                mask[pix[:, 0], pix[:, 1]] = True
                lam[pix[:, 0], pix[:, 1]] += rng.uniform(300, 1500)
                placed += 1
            stack[f] = np.minimum(rng.poisson(lam), 65535).astype(np.uint16)
            rows, cols = np.nonzero(mask)
            truth.append(observe.bit_index((n_distances, NF, NY, NZ), L, f,
                                           NY - 1 - cols, NZ - 1 - rows))
            nr = L * NF + raw_start + L * wf + f
            tifffile.imwrite(raw / f"scan_{nr:06d}.tif", stack[f])
        stacks.append(stack)
    params = types.SimpleNamespace(
        n_distances=n_distances, nr_pixels_y=NY, nr_pixels_z=NZ, start_nr=0, end_nr=NF - 1,
        n_frames=NF, nr_files_per_distance=NF, raw_start_nr=raw_start, wf_images=wf,
        data_directory=str(raw), output_dir=root / "out", orig_file_name="scan",
        reduced_file_name="red", ext_orig="tif", ext_reduced="bin", blanket_subtraction=80,
        med_filt_radius=1, gauss_filt_radius=1.5, log_mask_radius=5, do_log_filter=0,
        source=str(root / "params.txt"))
    return params, np.sort(np.concatenate(truth)), stacks


def test_frame_path_naming(tmp_path):
    p = types.SimpleNamespace(nr_files_per_distance=1440, raw_start_nr=7, wf_images=3,
                              data_directory=str(tmp_path), orig_file_name="Au", ext_orig="tif",
                              start_nr=0, end_nr=1439)
    # FileNr = L*1440 + 7 + L*3 + j
    assert images.frame_path(p, 0, 0) == tmp_path / "Au_000007.tif"
    assert images.frame_path(p, 1, 5) == tmp_path / "Au_001455.tif"
    p.output_dir = tmp_path / "o"
    p.reduced_file_name, p.ext_reduced = "red", "bin"
    assert images.median_image_path(p, 1) == tmp_path / "o" / "red_Median_Background_Distance_1.bin"


@pytest.mark.parametrize("do_log", [0, 1])
def test_synthetic_round_trip(tmp_path, do_log):
    params, truth, stacks = make_dataset(tmp_path)
    params.do_log_filter = do_log
    medians = {}
    vol = images.process_all(params, progress=False,
                             median_dir_writer=lambda L, m: medians.setdefault(L, m))
    assert vol.shape == (2, NF, NY, NZ)
    for L, stack in enumerate(stacks):
        np.testing.assert_array_equal(medians[L], np.sort(stack, axis=0)[(NF - 1) // 2])
    lit = observe.lit_indices(vol)
    hits = np.intersect1d(lit, truth).size
    recall, false = hits / truth.size, (lit.size - hits) / truth.size
    assert recall >= 0.99 and false <= 0.01, (recall, false)
    if not do_log:
        np.testing.assert_array_equal(lit, truth)  # this data is clean enough to be exact


def test_band_reading_and_compressed_tiffs_agree(tmp_path):
    params, truth, _ = make_dataset(tmp_path, n_distances=1, seed=5)
    ref = images.process_all(params, progress=False)
    # a budget far below the stack forces the banded median (re-reading row bands from disk)
    small = images.process_all(params, progress=False, max_memory=200_000)
    np.testing.assert_array_equal(small.words, ref.words)
    # zlib-compressed frames go through tifffile's decoder instead of direct row reads
    for p in images.frame_paths(params, 0):
        tifffile.imwrite(p, tifffile.imread(p), compression="zlib")
    comp = images.process_all(params, progress=False, max_memory=200_000)
    np.testing.assert_array_equal(comp.words, ref.words)
    # strips of 5 rows: the bands decode only the strips they need
    for p in images.frame_paths(params, 0):
        tifffile.imwrite(p, tifffile.imread(p), compression="zlib", rowsperstrip=5)
    strips = images.process_all(params, progress=False, max_memory=200_000)
    np.testing.assert_array_equal(strips.words, ref.words)
    median, one = images.process_distance(params, 0, progress=False)
    assert one.shape == (1, NF, NY, NZ)
    np.testing.assert_array_equal(one.words, ref.words)
    np.testing.assert_array_equal(observe.lit_indices(one), truth)


def _single_strip(params):
    for p in images.frame_paths(params, 0):
        tifffile.imwrite(p, tifffile.imread(p), compression="zlib", rowsperstrip=NZ)


def _forget_spill_warnings() -> None:
    """Let the once-per-process notes and warnings about frames decoded whole be said
    again (a tiny budget's own warning stays said)."""
    errors._said.intersection_update({"below-budget"})


def _count_decodes(monkeypatch) -> list:
    reads = []
    whole = images._FrameFile.read
    monkeypatch.setattr(images._FrameFile, "read",
                        lambda self: reads.append(self.path) or whole(self))
    return reads


def test_frames_decoded_whole_are_decoded_once_into_a_temporary_copy(tmp_path, capsys,
                                                                     monkeypatch):
    """Frames compressed in one strip, read by the median in several row bands: each frame
    is decoded once, its rows kept in a temporary file in the scratch folder (one note says
    so, once per process); the later bands and the spot pass read the copy, the volume is
    the one of the stack held in memory, and no file is left behind."""
    errors._said.add("below-budget")            # a tiny budget on purpose
    params, truth, _ = make_dataset(tmp_path, n_distances=1, seed=2)
    ref = images.process_all(params, progress=False)
    _single_strip(params)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    _forget_spill_warnings()
    reads = _count_decodes(monkeypatch)
    made = []
    create = images._FrameSpill.create.__func__
    monkeypatch.setattr(images._FrameSpill, "create", classmethod(
        lambda cls, *a, **k: made.append(create(cls, *a, **k)) or made[-1]))
    vol = images.process_all(params, progress=False, max_memory=200_000, scratch=scratch)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(
        f"note: {images.frame_path(params, 0, 0)}: compressed in one strip"), err
    assert f"temporary file in {scratch} ({format_bytes(2 * NF * NY * NZ)}, deleted" in err
    n_bands = int(err.split("median's ")[1].split()[0])
    assert n_bands > 1 and len(reads) == NF                      # once, not bands + 1
    spill = made[0][0]
    assert spill.fd is None and list(scratch.iterdir()) == []
    np.testing.assert_array_equal(vol.words, ref.words)
    np.testing.assert_array_equal(observe.lit_indices(vol), truth)
    images.process_all(params, progress=False, max_memory=200_000, scratch=scratch)
    assert capsys.readouterr().err == ""                          # once per process


def test_frames_decoded_whole_without_room_warn_once_with_the_budget_that_avoids_it(
        tmp_path, capsys, monkeypatch):
    """With no room for the temporary copy, every frame is decoded for each row band: one
    warning names the first frame, the number of bands, why there is no copy, and a
    --max-memory with which every frame is decoded once; with that budget each frame is
    read once, no warning, and the same volume."""
    errors._said.add("below-budget")            # a tiny budget on purpose
    params, truth, _ = make_dataset(tmp_path, n_distances=1, seed=2)
    _single_strip(params)
    monkeypatch.setattr(images, "_SPILL_MARGIN", 1 << 62)      # no disk has this to spare
    _forget_spill_warnings()
    reads = _count_decodes(monkeypatch)
    banded = images.process_all(params, progress=False, max_memory=200_000, scratch=tmp_path)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(
        f"warning: {images.frame_path(params, 0, 0)}: compressed in one strip"), err
    assert f"(slow: {tmp_path} has " in err and "free, a temporary copy" in err, err
    n_bands = int(err.split("median's ")[1].split()[0])
    assert n_bands > 1 and len(reads) == NF * (n_bands + 1)      # bands, then the spot pass
    suggested = parse_memory(err.split("--max-memory ")[1].split()[0])
    images.process_all(params, progress=False, max_memory=200_000)
    assert capsys.readouterr().err == ""                          # once per process
    # The exact budget that keeps the stack (twice the stack beside the volume), which the
    # suggestion rounds up: one byte less still reads bands and warns.
    need = NF * NY * NZ // 8 + 4 * NF * NY * NZ
    assert need <= suggested < need + (1 << 20)
    _forget_spill_warnings()
    images.process_all(params, progress=False, max_memory=need - 1)
    assert "compressed in one strip" in capsys.readouterr().err
    reads.clear()
    once = images.process_all(params, progress=False, max_memory=need)
    assert capsys.readouterr().err == "" and len(reads) == NF
    np.testing.assert_array_equal(once.words, banded.words)
    np.testing.assert_array_equal(observe.lit_indices(once), truth)


def test_a_temporary_copy_that_cannot_be_written_is_dropped(tmp_path, capsys, monkeypatch):
    """A write to the temporary copy that fails (a full disk) drops it with a warning
    naming it: the remaining bands and the spot pass decode the frames again, and the
    volume is unchanged."""
    errors._said.add("below-budget")            # a tiny budget on purpose
    params, _, _ = make_dataset(tmp_path, n_distances=1, seed=4)
    ref = images.process_all(params, progress=False)
    _single_strip(params)
    writes = []
    pwrite = os.pwrite

    def full_disk(fd, data, offset):
        writes.append(offset)
        if len(writes) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return pwrite(fd, data, offset)

    monkeypatch.setattr(images.os, "pwrite", full_disk)
    _forget_spill_warnings()
    reads = _count_decodes(monkeypatch)
    vol = images.process_all(params, progress=False, max_memory=200_000, scratch=tmp_path)
    err = capsys.readouterr().err
    assert err.count("writing the temporary copy of the decoded frames failed (No space "
                     "left") == 1, err
    assert len(writes) == 4 and len(reads) > 2 * NF
    np.testing.assert_array_equal(vol.words, ref.words)
    assert not any(p.name.startswith(".nfjax-frames-") for p in tmp_path.iterdir())
    # a second distance that fails too: the warning is not repeated
    images.process_all(params, progress=False, max_memory=200_000, scratch=tmp_path)
    assert "writing the temporary copy" not in capsys.readouterr().err


def test_no_temporary_copy_in_memory_or_without_room_for_every_rank(tmp_path, capsys,
                                                                    monkeypatch):
    """The copy never goes to a folder held in memory (a tmpfs /tmp) and needs room for
    every rank's share; the note (rank 0) and the warning (any rank, naming it) are told
    once each, independently."""
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda1 / ext4 rw 0 0\nnone /scratch\\040x tmpfs rw 0 0\n"
                      "tmpfs /scratch/disk/x ramfs rw 0 0\n/dev/sdb /scratch/disk ext4 rw 0 0\n")
    kind = images._in_memory_folder
    assert kind(Path("/scratch x/a"), str(mounts)) == "tmpfs"
    assert kind(Path("/scratch/disk/y"), str(mounts)) is None
    assert kind(Path("/scratch/disk/x/z"), str(mounts)) == "ramfs"
    assert kind(Path("/scratchy"), str(mounts)) is None
    assert kind(Path("/srv"), str(tmp_path / "none")) is None      # no mount table

    _forget_spill_warnings()
    args = (Path("f.tif"), tmp_path, 10, 8, 16, 3, 1 << 20)
    monkeypatch.setattr(images, "_in_memory_folder", lambda folder: "tmpfs")
    assert images._spill_or_warn(*args, None) is None
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: f.tif: compressed in one strip") and \
        f"(slow: {tmp_path} is held in memory (tmpfs));" in err, err
    monkeypatch.setattr(images, "_in_memory_folder", lambda folder: None)
    _forget_spill_warnings()
    share = 2 * 10 * 8 * 16
    free = images._SPILL_MARGIN + 3 * share - 1           # room for 2 shares, not 3
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(free=free))
    rank = lambda r, n: types.SimpleNamespace(rank=r, size=n)   # noqa: E731
    spill = images._spill_or_warn(*args, rank(0, 2))             # the note, from rank 0
    assert spill is not None and "note: f.tif:" in capsys.readouterr().err
    spill.close()
    spill = images._spill_or_warn(*args, rank(1, 2))             # no second note
    assert spill is not None and capsys.readouterr().err == ""
    spill.close()
    assert images._spill_or_warn(*args, rank(1, 3)) is None      # three shares: no room
    err = capsys.readouterr().err
    assert err.startswith("warning: rank 1: f.tif: compressed") and "free, a temporary " \
        f"copy of the frames needs {format_bytes(3 * share)} and 1 GB to spare" in err, err
    assert list(tmp_path.glob(".nfjax-frames-*")) == []


@pytest.mark.parametrize("options", [
    dict(compression="zlib", rowsperstrip=16), dict(compression="zlib", rowsperstrip=1),
    dict(compression="zlib", rowsperstrip=7, predictor=True),
    dict(compression="zlib", rowsperstrip=9, byteorder=">"),
    dict(compression="zlib"), dict(compression="zlib", tile=(16, 16)), {}])
def test_row_bands_of_stripped_and_tiled_frames(tmp_path, options):
    """Row bands of a compressed frame decode only their strips (the banded median's
    path); every layout gives the frame's own rows, across strip boundaries."""
    frame = np.random.default_rng(3).integers(0, 60000, size=(100, 64)).astype(np.uint16)
    path = tmp_path / "f.tif"
    tifffile.imwrite(path, frame, **options)
    reader = images._FrameFile(path, (100, 64))
    for r0, r1 in [(0, 1), (0, 100), (5, 37), (16, 32), (99, 100), (15, 17), (0, 99)]:
        np.testing.assert_array_equal(reader.rows(r0, r1), frame[r0:r1])
    if options.get("rowsperstrip"):
        assert reader.rows_per_strip == options["rowsperstrip"]    # not decoded whole


def test_unaligned_frame_size(tmp_path):
    # NY*NZ not a multiple of 32: bits set one by one must give the same lit set
    global NZ, NY
    old = (NZ, NY)
    NZ, NY = 45, 51
    try:
        params, truth, _ = make_dataset(tmp_path, n_distances=2, seed=9, spots_per_frame=2)
        vol = images.process_all(params, progress=False)
        np.testing.assert_array_equal(observe.lit_indices(vol), truth)
        assert vol.words.size == -(-2 * NF * NY * NZ // 32)
    finally:
        NZ, NY = old


# ----------------------------------------------------------------------------- CLI and errors
PARAM_TEXT = """nDistances 2
Lsd 1000
Lsd 2000
BC 10 10
BC 10 10
px 1.48
Wavelength 0.17
LatticeParameter 4.08 4.08 4.08 90 90 90
NrPixelsY {ny}
NrPixelsZ {nz}
StartNr 0
EndNr {end}
NrFilesPerDistance {nf}
RawStartNr 3
WFImages 2
DataDirectory raw
OutputDirectory out
OrigFileName scan
ReducedFileName red
extOrig tif
extReduced bin
BlanketSubtraction 80
MedFiltRadius 1
DoLoGFilter 0
"""


def _write_params(root, end=NF - 1, nf=NF):
    path = root / "params.txt"
    path.write_text(PARAM_TEXT.format(ny=NY, nz=NZ, end=end, nf=nf))
    return path


def test_cli_process_writes_spotsinfo_and_medians(tmp_path, capsys):
    params, truth, stacks = make_dataset(tmp_path)
    pfile = _write_params(tmp_path)
    assert cli_main(["process", str(pfile)]) == 0
    out = tmp_path / "out"
    spots = out / "SpotsInfo.bin"
    assert spots.stat().st_size == 2 * NF * NY * NZ // 8
    vol = observe.read_spots_info(spots, (2, NF, NY, NZ))
    np.testing.assert_array_equal(observe.lit_indices(vol), truth)
    for L in range(2):
        med = np.fromfile(out / f"red_Median_Background_Distance_{L}.bin", dtype="<u2")
        np.testing.assert_array_equal(med.reshape(NZ, NY),
                                      np.sort(stacks[L], axis=0)[(NF - 1) // 2])
    printed = capsys.readouterr()
    assert "frames/s" in printed.out and "warning" not in printed.err
    # a tight --max-memory takes the banded-median path and writes the same bytes
    banded = tmp_path / "banded.bin"
    assert cli_main(["process", str(pfile), "--max-memory", "300KB", "-o", str(banded)]) == 0
    assert banded.read_bytes() == spots.read_bytes()

    # --distance 2 re-processes distance 2 only and keeps distance 1's bits
    per = NF * NY * NZ
    frame = images.frame_path(params, 1, 0)
    tifffile.imwrite(frame, np.zeros((NZ, NY), np.uint16))  # now nothing is lit there
    capsys.readouterr()
    assert cli_main(["process", str(pfile), "--distance", "2", "-o", str(spots)]) == 0
    assert "warning" not in capsys.readouterr().err   # distance 1 kept from the file
    lit = observe.lit_indices(observe.read_spots_info(spots, (2, NF, NY, NZ)))
    np.testing.assert_array_equal(lit[lit < per], truth[truth < per])
    keep = (truth >= per) & (truth >= per + NY * NZ)  # frame 0 of distance 2 cleared
    np.testing.assert_array_equal(lit[lit >= per], truth[keep])


# nfjax process where ranks other than 0 see no file at -o (another node's stale view of a
# shared file system): they must not decide from it whether to keep distances of the file.
_STALE_VIEW = """
import pathlib
import sys

from nfjax.cli import main
from nfjax.parallel import world

if world().rank:
    seen = pathlib.Path.exists
    hidden = pathlib.Path(sys.argv[sys.argv.index("-o") + 1]).resolve()
    pathlib.Path.exists = lambda self: False if self.resolve() == hidden else seen(self)
sys.exit(main(["process", *sys.argv[1:]]))
"""


def _mpi_process(mpiexec, ranks, pfile, *options, script=None, rc=0, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", NFJAX_PROGRESS="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    command = [script] if script else ["-m", "nfjax.cli", "process"]
    proc = subprocess.run([mpiexec, "-n", str(ranks), sys.executable, *command, str(pfile),
                           *options], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == rc, proc.stderr[-2000:]
    return proc


def test_process_under_mpiexec_writes_what_one_process_writes(tmp_path, capsys):
    """Under mpiexec the ranks share every distance: each takes a block of detector rows
    for the median and a block of frames for the spots (MIDAS splits its image processing
    over nodes too). SpotsInfo.bin and the median images are byte for byte those of one
    process. The frame is 45 x 51 pixels, not a multiple of 32, so two ranks' frames meet
    inside a word; in the second run (2 frames per distance, 3 ranks) a rank has no frame,
    and --distance 2 keeps distance 1 of an existing file that rank 0 alone reads (the
    other ranks do not see it). A missing frame is one error line, not one per rank."""
    mpiexec = need_mpiexec("nfjax process under MPI")
    global NZ, NY
    old = (NZ, NY)
    NZ, NY = 45, 51
    try:
        params, truth, _ = make_dataset(tmp_path, n_distances=2, seed=4, spots_per_frame=2)
        pfile = _write_params(tmp_path)
    finally:
        NZ, NY = old
    out = tmp_path / "out"
    medians = [out / f"red_Median_Background_Distance_{L}.bin" for L in range(2)]
    assert cli_main(["process", str(pfile), "-o", str(tmp_path / "one.bin")]) == 0
    one_medians = [m.read_bytes() for m in medians]
    for m in medians:
        m.unlink()
    proc = _mpi_process(mpiexec, 3, pfile, "-o", str(tmp_path / "three.bin"))
    assert (tmp_path / "three.bin").read_bytes() == (tmp_path / "one.bin").read_bytes()
    assert [m.read_bytes() for m in medians] == one_medians
    assert proc.stdout.count("wrote ") == 1 and "3 ranks" in proc.stdout, proc.stdout
    lit = observe.lit_indices(observe.read_spots_info(tmp_path / "three.bin",
                                                      (2, NF, 51, 45)))
    np.testing.assert_array_equal(lit, truth)

    # 2 frames per distance on 3 ranks; distance 2 into an existing file.
    pfile.write_text(pfile.read_text().replace(f"EndNr {NF - 1}", "EndNr 1")
                     .replace(f"NrFilesPerDistance {NF}", "NrFilesPerDistance 2"))
    assert cli_main(["process", str(pfile), "-o", str(tmp_path / "base.bin")]) == 0
    base = (tmp_path / "base.bin").read_bytes()
    # a changed frame of distance 2, so that the second pass differs from the first
    frame = images.frame_path(types.SimpleNamespace(**{**vars(params), "nr_files_per_distance": 2,
                                                       "end_nr": 1}), 1, 1)
    tifffile.imwrite(frame, np.zeros((45, 51), np.uint16))
    for name in ("one2.bin", "three2.bin"):
        (tmp_path / name).write_bytes(base)
    assert cli_main(["process", str(pfile), "--distance", "2", "-o",
                     str(tmp_path / "one2.bin")]) == 0
    one_medians = [m.read_bytes() for m in medians]
    medians[1].unlink()
    stale = tmp_path / "stale_view.py"
    stale.write_text(_STALE_VIEW)
    # (when ranks decided on their own, rank 0 waited in a broadcast, the others in the
    # median's exchange, for ever)
    _mpi_process(mpiexec, 3, pfile, "--distance", "2", "-o", str(tmp_path / "three2.bin"),
                 script=str(stale), timeout=240)
    assert (tmp_path / "three2.bin").read_bytes() == (tmp_path / "one2.bin").read_bytes()
    assert (tmp_path / "one2.bin").read_bytes() != base
    assert [m.read_bytes() for m in medians] == one_medians

    # An error every rank meets (a missing frame) is printed once, before any work.
    frame.unlink()
    proc = _mpi_process(mpiexec, 3, pfile, "-o", str(tmp_path / "never.bin"), rc=2)
    assert proc.stderr.count("nfjax: error:") == 1 and "raw frame not found" in proc.stderr, \
        proc.stderr[-2000:]
    assert not (tmp_path / "never.bin").exists()


_MPI_EDGE_SCRIPT = """
import sys
import types
from pathlib import Path
from pathlib import Path

import numpy as np
import tifffile

from nfjax import images
from nfjax.parallel import world

comm = world()
root = Path(sys.argv[1])
cases = [dict(nz=2, ny=50, nf=4, strip=None, mem=None),    # fewer rows than ranks
         dict(nz=37, ny=29, nf=7, strip=4, mem=30_000),    # strips, many row bands a rank
         dict(nz=40, ny=48, nf=2, strip=None, mem=2_000),  # fewer frames than ranks
         dict(nz=33, ny=31, nf=9, strip=33, mem=20_000)]   # one compressed strip
for k, c in enumerate(cases):
    d = root / f"c{k}"
    if comm.rank == 0:
        d.mkdir(parents=True)
        rng = np.random.default_rng(k)
        for f in range(2 * c["nf"]):
            img = rng.poisson(100, size=(c["nz"], c["ny"])).astype(np.uint16)
            for _ in range(3):      # 4 x 4 spots: they survive the median filter
                z0, y0 = rng.integers(0, max(1, c["nz"] - 4)), rng.integers(0, c["ny"] - 4)
                img[z0:z0 + 4, y0:y0 + 4] += 2000
            opts = dict(compression="zlib", rowsperstrip=c["strip"]) if c["strip"] else {}
            tifffile.imwrite(d / f"s_{f:06d}.tif", img, **opts)
    comm.barrier()
    p = types.SimpleNamespace(
        n_distances=2, nr_pixels_y=c["ny"], nr_pixels_z=c["nz"], start_nr=0,
        end_nr=c["nf"] - 1, n_frames=c["nf"], nr_files_per_distance=c["nf"], raw_start_nr=0,
        wf_images=0, data_directory=str(d), output_dir=d, orig_file_name="s",
        reduced_file_name="r", ext_orig="tif", ext_reduced="bin", blanket_subtraction=30,
        med_filt_radius=1, gauss_filt_radius=1.0, log_mask_radius=4, do_log_filter=k % 2,
        source="x")
    medians = {}
    vol = images.process_all(p, max_memory=c["mem"], progress=False, comm=comm,
                             median_dir_writer=medians.__setitem__)
    one = None
    if comm.rank == 0:
        one_medians = {}
        words = images.process_all(p, max_memory=c["mem"], progress=False,
                                   median_dir_writer=one_medians.__setitem__).words
        one = (words, one_medians)
    words, one_medians = comm.share(one)
    assert np.bitwise_count(words).sum() > 100 and np.array_equal(vol.words, words), k
    assert all(np.array_equal(medians[L], one_medians[L]) for L in range(2)), (k, comm.rank)
    print(f"case {k} rank {comm.rank}: ok, {int(np.bitwise_count(words).sum())} lit")
"""


def test_process_all_under_mpiexec_edge_cases(tmp_path):
    """process_all under mpiexec -n 3 equals one process (volume words and medians) where
    the split is uneven: fewer detector rows than ranks, compressed strips read in many row
    bands per rank, fewer frames than ranks under a tiny budget, single-strip compressed
    frames; with and without the LoG."""
    mpiexec = need_mpiexec("process_all under MPI")
    script = tmp_path / "edge.py"
    script.write_text(_MPI_EDGE_SCRIPT)
    proc = subprocess.run([mpiexec, "-n", "3", sys.executable, str(script), str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count(": ok") == 12, proc.stdout


def test_some_distances_into_a_new_file_warns(tmp_path, capsys):
    make_dataset(tmp_path)
    pfile = _write_params(tmp_path)
    assert cli_main(["process", str(pfile), "--distance", "2"]) == 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "distance(s) 1 were not processed and are empty" in err \
        and "a fit needs every distance" in err, err
    vol = observe.read_spots_info(tmp_path / "out" / "SpotsInfo.bin", (2, NF, NY, NZ))
    assert observe.lit_indices(vol).min() >= NF * NY * NZ   # distance 1 is all zero


def test_implausible_lit_fraction_warns(tmp_path, capsys):
    # No blanket and no median filter: about half of the Poisson background is above the
    # temporal median, so far more than 2% of the pixels come out lit.
    make_dataset(tmp_path, n_distances=2)
    pfile = _write_params(tmp_path)
    pfile.write_text(pfile.read_text().replace("BlanketSubtraction 80", "BlanketSubtraction 0")
                     .replace("MedFiltRadius 1", "MedFiltRadius 0"))
    assert cli_main(["process", str(pfile)]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    for L, line in enumerate(lines, start=1):
        assert line.startswith(f"warning: distance {L}: ") and "% of all pixels are lit" in line
        assert f"BlanketSubtraction (0), MedFiltRadius (0), DoLoGFilter (0) in {pfile}" in line
        assert float(line.split(": ")[2].split("%")[0]) > 20
    # the threshold, and the LoG keys when the LoG decides what is lit
    p = types.SimpleNamespace(blanket_subtraction=30, med_filt_radius=2, do_log_filter=1,
                              log_mask_radius=6, gauss_filt_radius=1.5, source="p.txt")
    assert images.lit_fraction_warning(p, 0, 20, 1000) is None
    assert images.lit_fraction_warning(p, 1, 21, 1000) == (
        "distance 2: 2.1% of all pixels are lit (more than 2% suggests background lit as "
        "spots); check BlanketSubtraction (30), MedFiltRadius (2), DoLoGFilter (1), "
        "LoGMaskRadius (6), GaussFiltRadius (1.5) in p.txt")


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} \
        if folder.is_dir() else None


def _expect_error(tmp_path, capsys, fragment, *options):
    out = tmp_path / "out"
    before = _files(out)
    assert cli_main(["process", str(tmp_path / "params.txt"), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and fragment in err, err
    # nothing written: SpotsInfo.bin and the median images as they were, no temporaries
    assert _files(out) == before
    return err


def test_missing_frame_file(tmp_path, capsys):
    params, _, _ = make_dataset(tmp_path)
    _write_params(tmp_path)
    victim = images.frame_path(params, 1, 4)  # distance 2: distance 1 must not be written
    victim.unlink()
    err = _expect_error(tmp_path, capsys, str(victim))
    assert "not found (1 of 30 frames missing)" in err


def test_frame_that_is_a_folder(tmp_path, capsys):
    params, _, _ = make_dataset(tmp_path)
    _write_params(tmp_path)
    victim = images.frame_path(params, 1, 4)
    victim.unlink()
    victim.mkdir()
    _expect_error(tmp_path, capsys, f"{victim}: expected a raw frame (TIFF file), found a "
                                    "directory")


def _claim_compression(path, code: int) -> None:
    """Rewrite the Compression tag (259) of a little-endian classic TIFF's first page."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"II*\0"
    ifd = int.from_bytes(data[4:8], "little")
    for k in range(int.from_bytes(data[ifd:ifd + 2], "little")):
        entry = ifd + 2 + 12 * k
        if int.from_bytes(data[entry:entry + 2], "little") == 259:
            data[entry + 8:entry + 10] = code.to_bytes(2, "little")
            path.write_bytes(bytes(data))
            return
    raise AssertionError("no Compression tag")


@pytest.mark.parametrize("bad", ["shape", "dtype", "truncated", "garbage", "pages", "codec",
                                 "header"])
def test_bad_frame_files(tmp_path, capsys, caplog, bad):
    params, _, _ = make_dataset(tmp_path, n_distances=2)
    _write_params(tmp_path)
    victim = images.frame_path(params, 1, 3)  # distance 2: distance 1 must not be written
    if bad == "shape":
        tifffile.imwrite(victim, np.zeros((NZ, NY + 1), np.uint16))
        frag = f"expected a frame of {NZ} rows x {NY} columns"
    elif bad == "dtype":
        tifffile.imwrite(victim, np.zeros((NZ, NY), np.float32))
        frag = "expected uint16 pixels, found float32"
    elif bad == "truncated":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) - 5000])
        frag = str(victim)
    elif bad == "pages":
        tifffile.imwrite(victim, np.zeros((3, NZ, NY), np.uint16), photometric="minisblack")
        frag = "expected one page (one frame per file), found 3 pages"
    elif bad == "codec":
        # LZW (as Pillow writes it) needs imagecodecs: refused before any work, not while
        # the frames are read.
        if 5 in tifffile.TIFF.DECOMPRESSORS:
            pytest.skip("imagecodecs is installed: LZW frames are readable")
        _claim_compression(victim, 5)
        frag = "LZW-compressed TIFF: decoding it needs the imagecodecs package"
    elif bad == "header":
        # a damaged first IFD: tifffile logged a line per bad tag (16) before nfjax's one
        tifffile.imwrite(victim, np.zeros((NZ, NY), np.uint16), compression="zlib")
        data = bytearray(victim.read_bytes())
        for i in range(20, 200):
            data[i] ^= 0x55
        victim.write_bytes(bytes(data))
        frag = str(victim)
    else:
        victim.write_bytes(b"this is not a tiff file at all")
        frag = "not a readable TIFF"
    caplog.set_level("DEBUG")
    err = _expect_error(tmp_path, capsys, frag)
    assert str(victim) in err
    with pytest.raises(InputFileError):
        images.read_frame(victim, (NZ, NY))
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("tifffile")]


def test_bad_output_paths_fail_before_processing(tmp_path, capsys):
    make_dataset(tmp_path, n_distances=2)
    _write_params(tmp_path)
    (tmp_path / "taken").mkdir()
    _expect_error(tmp_path, capsys, f"{tmp_path / 'taken'}: cannot write (is a directory)",
                  "-o", str(tmp_path / "taken"))
    # OutputDirectory is a plain file: the median images cannot go there, even with -o
    (tmp_path / "out").write_text("not a folder")
    err = _expect_error(tmp_path, capsys, f"({tmp_path / 'out'} is a file, not a folder)",
                        "-o", str(tmp_path / "spots.bin"))
    assert "Median_Background_Distance_0.bin" in err
    assert not (tmp_path / "spots.bin").exists()
    assert (tmp_path / "out").read_text() == "not a folder"


def test_failure_while_processing_writes_no_median(tmp_path, capsys):
    # A compressed frame whose header is fine but whose data is corrupt fails only when it
    # is decoded, in distance 2: distance 1's median must not be written on its own.
    params, _, _ = make_dataset(tmp_path, n_distances=2)
    _write_params(tmp_path)
    victim = images.frame_path(params, 1, 6)
    tifffile.imwrite(victim, tifffile.imread(victim), compression="zlib")
    with tifffile.TiffFile(victim) as tif:
        start = tif.pages[0].dataoffsets[0] + tif.pages[0].databytecounts[0] // 2
    data = bytearray(victim.read_bytes())
    data[start:start + 64] = b"\xff" * 64
    victim.write_bytes(bytes(data))
    _expect_error(tmp_path, capsys, f"{victim}: not a readable TIFF")


def test_end_before_start_and_file_count(tmp_path, capsys):
    make_dataset(tmp_path, n_distances=2)
    _write_params(tmp_path, end=-2, nf=NF)
    assert cli_main(["process", str(tmp_path / "params.txt")]) == 2
    assert "EndNr" in capsys.readouterr().err
    p = types.SimpleNamespace(start_nr=5, end_nr=3, nr_files_per_distance=None, source="x.txt")
    with pytest.raises(ParamError, match="EndNr"):
        images.frame_paths(types.SimpleNamespace(orig_file_name="a", ext_orig="tif", **vars(p)), 0)
    p = types.SimpleNamespace(start_nr=0, end_nr=9, nr_files_per_distance=8, source="x.txt",
                              orig_file_name="a", ext_orig="tif")
    with pytest.raises(ParamError, match="NrFilesPerDistance"):
        images.frame_paths(p, 0)


def test_bad_distance_option(tmp_path, capsys):
    make_dataset(tmp_path, n_distances=2)
    pfile = _write_params(tmp_path)
    assert cli_main(["process", str(pfile), "--distance", "3"]) == 2
    assert "--distance 3: expected 1..2" in capsys.readouterr().err


def test_a_budget_below_one_unit_of_processing_warns_once(tmp_path, capsys):
    """--max-memory below the volume plus one frame's filter temporaries (8 of them: a
    batch gets an eighth) or one detector row of every frame (3: the median gets a third):
    the once-per-process warning gives that figure; at that figure, no warning. The work
    is the same either way."""
    params, truth, _ = make_dataset(tmp_path, n_distances=1, seed=7)
    volume = NF * NY * NZ // 8
    need = volume + max(3 * 2 * NF * NY, 8 * NY * NZ * 16)   # DoLoGFilter 0
    small = images.process_all(params, progress=False, max_memory=need - 1)
    err = capsys.readouterr().err
    assert err == (f"warning: --max-memory {format_bytes(need - 1)} is below the smallest "
                   f"chunk of this work ({format_bytes(need)}): it runs one unit at a time, "
                   "above the budget; give at least that\n"), err
    errors._said.discard("below-budget")
    enough = images.process_all(params, progress=False, max_memory=need)
    assert capsys.readouterr().err == ""
    np.testing.assert_array_equal(small.words, enough.words)


def test_simulated_frames_interrupted_part_way_are_removed(tmp_path, capsys, monkeypatch):
    """``write_tiff_frames`` (``nfjax simulate --tiff-dir``) interrupted after 3 frames
    removes them and says so: an incomplete stack would pass for a scan. Other files in
    the folder stay."""
    from nfjax.simulate import write_tiff_frames

    params, _, _ = make_dataset(tmp_path, n_distances=1, seed=1)
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    calls = []
    imwrite = tifffile.imwrite

    def stop_at_4(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return imwrite(*a, **k)

    monkeypatch.setattr(tifffile, "imwrite", stop_at_4)
    with pytest.raises(KeyboardInterrupt):
        write_tiff_frames(params, observe.empty((1, NF, NY, NZ)), folder, progress=False)
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
    assert capsys.readouterr().err == (f"removed the 3 frame(s) of {NF} written to {folder} "
                                       "before the failure (an incomplete stack)\n")
    monkeypatch.undo()
    paths = write_tiff_frames(params, observe.empty((1, NF, NY, NZ)), folder, progress=False)
    assert len(paths) == NF and all(p.exists() for p in paths)
