"""The stack store: laziness, refusal of foreign paths, crash safety, step bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import drizzlestack as ds
from drizzlestack.store import StackStore, open_stack
from conftest import raise_if_dask_computes


def _store_with_frames(path, n=3, shape=(40, 50), chunk=16):
    st = StackStore.create(path, shape, chunk=chunk)
    rng = np.random.default_rng(0)
    frames = [rng.normal(size=shape).astype(np.float32) for _ in range(n)]
    for i, f in enumerate(frames):
        st.append_frame(f, path=f"/data/f{i}.fits", exptime=10.0 + i, header="X", status="ok", saturation=1e4)
    return st, frames


def test_open_stack_is_lazy_and_slicing_reads_only_the_slice(tmp_path, monkeypatch):
    st, frames = _store_with_frames(tmp_path / "s.zarr", n=4)
    with raise_if_dask_computes(0):
        stack = ds.open_stack(st.path)
        window = stack.frames.isel(frame=2, y=slice(3, 9), x=slice(17, 30))
        mean = stack.frames.mean("frame")  # building a graph must not compute
    reads = []
    original = zarr.Array.__getitem__

    def counting_getitem(self, selection):
        reads.append((self.path, selection))
        return original(self, selection)

    monkeypatch.setattr(zarr.Array, "__getitem__", counting_getitem)
    with raise_if_dask_computes(1) as counter:
        values = window.values
    assert counter.total == 1
    np.testing.assert_array_equal(values, frames[2][3:9, 17:30])
    # The window lies in one 16x16 chunk of one frame: one read, not the stack.
    frame_reads = [r for r in reads if r[0].endswith("frames")]
    assert len(frame_reads) == 1, frame_reads
    np.testing.assert_allclose(mean.values, np.mean(frames, axis=0), rtol=1e-6)


def test_frames_chunked_one_frame_per_chunk(tmp_path):
    st, _ = _store_with_frames(tmp_path / "s.zarr", n=2, shape=(40, 50), chunk=16)
    stack = open_stack(st.path)
    assert stack.frames.data.chunksize == (1, 16, 16)
    assert stack.frames.dtype == np.float32


def test_refuses_a_path_that_is_not_a_store(tmp_path):
    plain = tmp_path / "mydata"
    plain.mkdir()
    (plain / "keep.txt").write_text("precious")
    with pytest.raises(ds.StoreError, match="mydata.*not a drizzlestack store"):
        StackStore.create(plain, (10, 10))
    with pytest.raises(ds.StoreError, match="not a drizzlestack store"):
        StackStore.open(plain)
    assert (plain / "keep.txt").read_text() == "precious"
    other = zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3)
    other.attrs["hello"] = 1
    with pytest.raises(ds.StoreError, match="marker"):
        open_stack(tmp_path / "other.zarr")
    afile = tmp_path / "afile.zarr"
    afile.write_text("x")
    with pytest.raises(ds.StoreError, match="is a file"):
        open_stack(afile)


def test_interrupted_append_is_trimmed_and_slot_reused(tmp_path):
    st, frames = _store_with_frames(tmp_path / "s.zarr", n=2)
    # Simulate a crash after the pixels of a third frame were written but before commit.
    st.group["frames"].resize((3, 40, 50))
    st.group["frames"][2] = 99.0
    st.group["path"].resize((3,))
    st.group["path"][2] = "/half/written.fits"
    reopened = StackStore.open(st.path)
    assert reopened.n_frames == 2
    assert open_stack(st.path).sizes["frame"] == 2
    assert reopened.paths() == ["/data/f0.fits", "/data/f1.fits"]
    new = np.full((40, 50), 5.0, np.float32)
    assert reopened.append_frame(new, path="/data/new.fits", status="ok") == 2
    stack = open_stack(st.path)
    np.testing.assert_array_equal(stack.frames[2].values, new)
    np.testing.assert_array_equal(stack.frames[0].values, frames[0])
    assert list(stack.path.values) == ["/data/f0.fits", "/data/f1.fits", "/data/new.fits"]


def test_step_bookkeeping_detects_changed_parameters(tmp_path):
    st, _ = _store_with_frames(tmp_path / "s.zarr")
    st.begin_step("register", {"model": "homography"}, inputs={"frames": 3})
    assert not st.is_current("register", {"model": "homography"}, inputs={"frames": 3})  # incomplete
    st.end_step("register", registered=3)
    assert st.is_current("register", {"model": "homography"}, inputs={"frames": 3})
    assert not st.is_current("register", {"model": "affine"}, inputs={"frames": 3})
    assert not st.is_current("register", {"model": "homography"}, inputs={"frames": 4})
    again = StackStore.open(st.path)
    assert again.step("register")["summary"] == {"registered": 3}


def test_append_refuses_wrong_shape(tmp_path):
    st, _ = _store_with_frames(tmp_path / "s.zarr", n=1)
    with pytest.raises(ds.StoreError, match="differs"):
        st.append_frame(np.zeros((10, 10), np.float32))
    assert StackStore.open(st.path).n_frames == 1


def test_step_parameters_compare_numbers_by_value(tmp_path):
    """``scale=2`` from the API and ``2.0`` from a YAML file must not make a step rerun."""
    from drizzlestack.store import params_digest

    assert params_digest({"scale": 2, "roi": [0, 0, 8, 8]}) == params_digest({"scale": 2.0, "roi": [0.0, 0, 8.0, 8]})
    assert params_digest({"scale": 2}) != params_digest({"scale": 3})
    assert params_digest({"rejection": True}) != params_digest({"rejection": 1})


def test_two_stores_with_the_same_folder_name_do_not_share_dask_keys(tmp_path):
    # Regression: keys were built from the folder's *name*, so two "stack.zarr" in
    # different folders collided and (b.frames - a.frames).max() computed as 0.0.
    stores = []
    for sub, value in (("one", 1.0), ("five", 5.0)):
        st = StackStore.create(tmp_path / sub / "stack.zarr", (20, 30), chunk=16)
        for _ in range(2):
            st.append_frame(np.full((20, 30), value, np.float32), path=f"{sub}.fits", status="ok")
        stores.append(open_stack(st.path))
    a, b = stores
    assert float((b.frames - a.frames).max().compute()) == 4.0
    assert a.frames.data.name != b.frames.data.name


def test_a_rewritten_store_gets_new_dask_keys(tmp_path):
    st = StackStore.create(tmp_path / "stack.zarr", (20, 30), chunk=16)
    st.append_frame(np.ones((20, 30), np.float32), path="a.fits", status="ok")
    before = open_stack(st.path)
    st.begin_step("ingest", {"force": True})
    st.write_variable("weight", np.array([2.0]), ("frame",))
    after = open_stack(st.path)
    assert before.frames.data.name != after.frames.data.name


def test_a_remembered_array_handle_follows_a_rewritten_or_resized_array(tmp_path):
    """chunkio.open_array keeps opened arrays while their metadata is unchanged: a variable
    created afresh (another shape, other values) or resized must never be read stale."""
    from drizzlestack.chunkio import DirectArray, open_array

    st = StackStore.create(tmp_path / "s.zarr", (8, 8))
    st.create_variable("v", (4, 4), ("y", "x"), (4, 4), "float32", 1.0)
    assert DirectArray(st.location, "v")[...].tolist() == np.ones((4, 4)).tolist()
    assert open_array(st.location, "v") is open_array(st.location, "v")  # remembered
    st.delete_variables("v")
    st.create_variable("v", (6, 5), ("y", "x"), (3, 5), "float32", 2.0)
    again = DirectArray(st.location, "v")
    assert again.shape == (6, 5) and np.all(again[...] == 2.0)
    st.group["v"].resize((8, 5))
    assert DirectArray(st.location, "v").shape == (8, 5)


def test_frame_rows_read_any_band_of_a_frame(tmp_path):
    """Registration reads its frame a band at a time (issue 12): any row range, across
    chunk rows and partial edge chunks, in any order and into a given buffer, is the
    frame's own rows."""
    st, frames = _store_with_frames(tmp_path / "s.zarr", n=2, shape=(45, 37), chunk=16)
    rows = st.frame_rows(1)
    assert rows.shape == (45, 37)
    for y0, y1 in [(0, 45), (3, 17), (15, 33), (40, 45), (0, 1), (31, 32), (2, 44), (16, 32)]:
        np.testing.assert_array_equal(rows.rows(y0, y1), frames[1][y0:y1])
    out = np.full((20, 37), np.nan, np.float32)
    assert rows.rows(20, 40, out) is out
    np.testing.assert_array_equal(out, frames[1][20:40])


def test_direct_reads_into_a_given_buffer_are_the_arrays_values(tmp_path):
    """``DirectArray.read(key, out=)`` (registration's band reader decodes into its own
    buffers): any window, with an integer axis, across chunks and edge chunks, equals
    zarr's own read and lands in ``out`` itself, strided or not."""
    from drizzlestack.chunkio import DirectArray

    st, frames = _store_with_frames(tmp_path / "s.zarr", n=3, shape=(45, 37), chunk=16)
    arr = DirectArray(st.location, "frames")
    assert arr.direct
    for key in [(1, slice(0, 45), slice(None)), (2, slice(5, 33), slice(7, 30)), (0, slice(40, 45), slice(30, 37))]:
        want = np.asarray(st.group["frames"][key])
        out = np.full(want.shape, np.nan, np.float32)
        assert arr.read(key, out=out) is out
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(arr[key], want)
    wide = np.zeros((45, 40), np.float32)  # a strided buffer is filled in place too
    arr.read((1, slice(0, 45), slice(None)), out=wide[:, :37])
    np.testing.assert_array_equal(wide[:, :37], frames[1])
    assert not wide[:, 37:].any()


def test_a_frame_whose_pixels_fail_to_write_in_the_background_is_never_committed(tmp_path, monkeypatch):
    """Ingest writes a frame's pixels in a thread while it reads the next file: the frame
    becomes visible only when its pixels are on disk and it is committed, and a failed
    write commits nothing (the frames before it still are)."""
    from concurrent.futures import ThreadPoolExecutor

    from drizzlestack import chunkio

    st, frames = _store_with_frames(tmp_path / "s.zarr", n=2)
    new = np.full((40, 50), 7.0, np.float32)
    with ThreadPoolExecutor(1) as pool:
        finish = st.append_frame_later(new, pool, path="/data/late.fits", status="ok")
        assert StackStore.open(st.path).n_frames == 2  # not committed before finish()
        assert finish() == 2
        assert StackStore.open(st.path).n_frames == 2  # on disk, not committed yet
    assert st.commit_frames() == 1
    stack = open_stack(st.path)
    np.testing.assert_array_equal(stack.frames[2].values, new)
    assert list(stack.path.values)[-1] == "/data/late.fits"

    def disk_full(self, key, value):
        raise OSError("No space left on device")

    monkeypatch.setattr(chunkio.DirectArray, "__setitem__", disk_full)
    with ThreadPoolExecutor(1) as pool:
        finish = st.append_frame_later(new + 1, pool, path="/data/lost.fits", status="ok")
        with pytest.raises(OSError, match="No space"):
            finish()
    assert st.commit_frames() == 0
    reopened = StackStore.open(st.path)
    assert reopened.n_frames == 3
    assert reopened.paths() == ["/data/f0.fits", "/data/f1.fits", "/data/late.fits"]
    np.testing.assert_array_equal(open_stack(st.path).frames[0].values, frames[0])
