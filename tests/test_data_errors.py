"""Bad inputs to the latent writer and loader give clear errors, never a hang and never a half-written file.

Files are damaged the way they get damaged in practice: cut short, overwritten in place, replaced
by a file with other fields, emptied, or truncated under a loader that already opened them.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from speed_fast.data import LatentFileError, LatentLoader, LoaderWorkerError, read_latent_meta, write_latents
from speed_fast.data.beton import MIN_PAGE_SIZE as _FFCV_MIN_PAGE
from speed_fast.data.latents import sidecar_path

N = 50
SHAPE = (4, 3, 5)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("good") / "good.beton")
    write_latents(path, torch.randn((N,) + SHAPE), np.arange(N) % 5)
    return path


@pytest.fixture
def copy(good, tmp_path):
    """A private copy of the good file (and sidecar) to damage."""
    path = str(tmp_path / "c.beton")
    shutil.copy(good, path)
    shutil.copy(sidecar_path(good), sidecar_path(path))
    return path


def edit_sidecar(path, **changes):
    with open(sidecar_path(path)) as f:
        meta = json.load(f)
    meta.update(changes)
    with open(sidecar_path(path), "w") as f:
        json.dump(meta, f)


def overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_truncated_file(copy):
    with open(copy, "r+b") as f:
        f.truncate(os.path.getsize(copy) - 100)
    with pytest.raises(LatentFileError, match="truncated"):
        read_latent_meta(copy)
    with pytest.raises(LatentFileError, match="truncated"):
        LatentLoader(copy, 8)


def test_corrupted_header_and_tables(copy):
    size = os.path.getsize(copy)
    original = open(copy, "rb").read()
    overwrite(copy, 0, b"\x07\x00")  # FFCV format version
    with pytest.raises(LatentFileError, match="format version 7"):
        read_latent_meta(copy)
    overwrite(copy, 0, original[:2])
    overwrite(copy, 16, np.uint64(12345).tobytes())  # allocation table pointer
    with pytest.raises(LatentFileError, match="allocation table"):
        read_latent_meta(copy)
    overwrite(copy, 16, original[16:24])
    overwrite(copy, size - 16, np.uint64(size * 4).tobytes())  # the last record's pointer in the table
    with pytest.raises(LatentFileError, match="corrupted"):
        read_latent_meta(copy)
    overwrite(copy, size - 16, original[size - 16: size - 8])
    assert read_latent_meta(copy, verify=True)["num_samples"] == N


def test_corrupted_data_is_caught_by_verify(copy):
    overwrite(copy, _FFCV_MIN_PAGE + 10, b"\xff\xff")  # inside record 0: FFCV's first data page
    read_latent_meta(copy)  # structure is intact
    with pytest.raises(LatentFileError, match="CRC32"):
        read_latent_meta(copy, verify=True)


def test_wrong_shape_or_dtype_field(copy):
    edit_sidecar(copy, shape=[4, 5, 3])
    with pytest.raises(LatentFileError, match=r"has shape \[4, 3, 5\], sidecar says \[4, 5, 3\]"):
        read_latent_meta(copy)
    edit_sidecar(copy, shape=list(SHAPE), store_dtype="float32")
    with pytest.raises(LatentFileError, match="has dtype int16, expected float32"):
        read_latent_meta(copy)
    edit_sidecar(copy, store_dtype="int8")
    with pytest.raises(LatentFileError, match="store_dtype 'int8'"):
        read_latent_meta(copy)


def test_foreign_ffcv_file_is_refused(tmp_path, copy):
    from ffcv.fields import FloatField, NDArrayField
    from ffcv.writer import DatasetWriter

    class Data:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return np.zeros(SHAPE, dtype=np.float32), float(i)

    path = str(tmp_path / "foreign.beton")
    DatasetWriter(path, {"image": NDArrayField(np.dtype("float32"), SHAPE), "y": FloatField()},
                  num_workers=1).from_indexed_dataset(Data())
    with pytest.raises(LatentFileError, match="sidecar .* is missing"):
        read_latent_meta(path)
    shutil.copy(sidecar_path(copy), sidecar_path(path))
    edit_sidecar(path, file_bytes=os.path.getsize(path), num_samples=4, num_records=4)
    with pytest.raises(LatentFileError, match=r"fields are \['image', 'y'\]"):
        read_latent_meta(path)
    with open(sidecar_path(path), "w") as f:
        f.write("{not json")
    with pytest.raises(LatentFileError, match="not valid JSON"):
        read_latent_meta(path)


def test_empty_dataset(tmp_path, copy):
    with pytest.raises(ValueError, match="empty"):
        write_latents(tmp_path / "e.beton", np.zeros((0,) + SHAPE, np.float32), np.zeros(0, np.int64))
    assert not os.path.exists(tmp_path / "e.beton")
    edit_sidecar(copy, num_samples=0, num_records=0)
    with pytest.raises(LatentFileError, match="empty"):
        read_latent_meta(copy)
    with pytest.raises(LatentFileError, match="no such latent file"):
        read_latent_meta(tmp_path / "absent.beton")


def test_bad_writer_inputs_leave_no_file(tmp_path, good):
    x = np.random.default_rng(0).standard_normal((30,) + SHAPE).astype(np.float32)
    y = np.zeros(30, dtype=np.int64)
    out = tmp_path / "w.beton"
    x_nan = x.copy()
    x_nan[23, 1, 2, 3] = np.nan  # found while writing the third chunk: the file is half written by then
    with pytest.raises(ValueError, match=r"latents\[23\] holds a NaN"):
        write_latents(out, x_nan, y, chunk=10)
    with pytest.raises(ValueError, match=r"labels must have shape \[N\] = \[30\]"):
        write_latents(out, x, y[:29])
    with pytest.raises(ValueError, match=r"labels\[4\] = -1"):
        write_latents(out, x, np.where(np.arange(30) == 4, -1, 0))
    with pytest.raises(ValueError, match=r"labels\[0\] = 2 but only 2 class_names"):
        write_latents(out, x, y + 2, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"shape \[N, C, H, W\]"):
        write_latents(out, x[:, 0], y)
    with pytest.raises(ValueError, match=r"shape \[N, 2, C, H, W\]"):
        write_latents(out, x, y, flip_copies=True)
    with pytest.raises(ValueError, match="floating-point"):
        write_latents(out, x.astype(np.int32), y)
    with pytest.raises(ValueError, match="store_dtype"):
        write_latents(out, x, y, store_dtype="int8")
    assert os.listdir(tmp_path) == []  # no output, no temporary file
    # A failed rewrite keeps the previous file intact.
    before = open(good, "rb").read()
    with pytest.raises(ValueError):
        write_latents(good, x_nan, y, chunk=10)
    assert open(good, "rb").read() == before
    read_latent_meta(good, verify=True)


def test_bad_loader_arguments(good):
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size\) = \[0, 2\), got 2"):
        LatentLoader(good, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        LatentLoader(good, 0)
    with pytest.raises(ValueError, match="no batch of batch_size=30"):
        LatentLoader(good, 30, world_size=2)
    with pytest.raises(ValueError, match="num_workers must be <="):
        LatentLoader(good, 8, num_workers=10_000)
    with pytest.raises(ValueError, match="timeout_s"):
        LatentLoader(good, 8, timeout_s=0)


@pytest.mark.timeout(120)
def test_resume_state_must_match_the_order(good):
    ld = LatentLoader(good, 8, seed=1, num_workers=1)
    state = ld.state_dict()
    with pytest.raises(ValueError, match="seed=2 but this loader has seed=1"):
        ld.load_state_dict(dict(state, seed=2))
    with pytest.raises(ValueError, match="world_size=4"):
        ld.load_state_dict(dict(state, world_size=4))
    with pytest.raises(ValueError, match=r"start_batch must be in \[0, 6\]"):
        ld.set_epoch(0, start_batch=7)
    ld.load_state_dict({"epoch": 2, "batch": 6})  # the end of epoch 2 is the start of epoch 3
    assert (ld.epoch, ld.batch) == (3, 0)


@pytest.mark.timeout(120)  # the point: an error, not a hang
def test_worker_exception_is_raised_not_hung(copy):
    ld = LatentLoader(copy, 8, num_workers=2, timeout_s=60)
    # The file shrinks after the loader validated it: records now end past the end of the file,
    # the compiled decoder raises inside FFCV's producer thread.
    with open(copy, "r+b") as f:
        f.truncate(_FFCV_MIN_PAGE + 100)  # FFCV's first data page starts at one page size
    with pytest.raises(LoaderWorkerError, match="truncated or changed after it was opened") as info:
        for _ in ld:
            pass
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.timeout(120)
def test_stalled_loader_times_out(good):
    # timeout_s shorter than numba compiling the pipeline for the first batch: a real stall.
    ld = LatentLoader(good, 8, num_workers=1, timeout_s=0.001)
    with pytest.raises(TimeoutError, match="no batch from the FFCV loader"):
        next(iter(ld))
