"""Stores on object storage (fsspec URLs): the whole pipeline against an S3-compatible
server on localhost (moto), compared with the same run on a local store; URLs are never
local folders; clear errors for protocols whose package is missing."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import drizzlestack as ds
from drizzlestack import cli
from drizzlestack.drizzle import driver
from drizzlestack.parallel import scheduler
from drizzlestack.store import StackStore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """An S3-compatible server on localhost (moto) with an empty bucket ``bucket``;
    yields the s3fs file system. The endpoint and credentials are in the environment,
    where every worker finds them."""
    pytest.importorskip("s3fs", reason="object storage tests need s3fs (pip install 'drizzlestack[test]')")
    moto_server = pytest.importorskip("moto.server", reason="object storage tests need moto[server]")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import fsspec

        fsspec.filesystem("s3").clear_instance_cache()  # no instance made before the endpoint was set
        fs = fsspec.filesystem("s3")
        fs.mkdir("bucket")
        try:
            yield fs
        finally:
            server.stop()


def _no_local_folder_named_after_a_url(*roots):
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                assert not name.endswith(":") and "s3:" not in name and "memory:" not in name, \
                    f"{Path(dirpath) / name}: a local file named after a URL"


def test_s3_store_is_not_written_to_a_local_folder_named_after_the_url(s3, small_sim, tmp_path, monkeypatch):
    # Path("s3://bucket/stack.zarr") is the folder "s3:/bucket/stack.zarr": ingest once
    # "succeeded" writing there, and nothing reached the bucket.
    monkeypatch.chdir(tmp_path)
    url = "s3://bucket/regression.zarr"
    assert cli.main(["ingest", url, *small_sim.files[:2], "--no-progress"]) == 0
    assert not (tmp_path / "s3:").exists()
    _no_local_folder_named_after_a_url(tmp_path)
    assert s3.exists("bucket/regression.zarr/zarr.json")
    assert s3.exists("bucket/regression.zarr/frames/zarr.json")
    st = StackStore.open(url, mode="r")
    assert st.is_remote and st.location == url and st.n_frames == 2
    np.testing.assert_array_equal(st.frame(1), fits.getdata(small_sim.files[1]).astype(np.float32))


def _config(path: Path, store: str, inputs, drizzle_output: str, integrate_output: str) -> Path:
    import yaml

    cfg = {"store": store, "scheduler": {"scheduler": "threads", "workers": 2, "progress": False},
           "ingest": {"inputs": [str(p) for p in inputs], "chunk": 128},
           # Few, large tiles: every object-store request costs tens of milliseconds.
           "integrate": {"tile": 128, "output": integrate_output},
           "drizzle": {"scale": 2.0, "pixfrac": 0.8, "tile": 128, "output": drizzle_output}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_whole_pipeline_on_s3_equals_the_local_run(s3, small_sim, tmp_path, monkeypatch, capsys):
    local_dir, remote_dir = tmp_path / "local", tmp_path / "remote"
    local_dir.mkdir()
    remote_dir.mkdir()
    url = "s3://bucket/stack.zarr"
    local_cfg = _config(local_dir / "run.yaml", "stack.zarr", small_sim.files, "drizzle.fits", "integration.fits")
    # The documented rule: FITS outputs go where --output says, a local path (relative
    # to the config file, as for a local store) or a URL on the same or another bucket.
    remote_cfg = _config(remote_dir / "run.yaml", url, small_sim.files, "s3://bucket/out/drizzle.fits",
                         "integration.fits")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", str(local_cfg)]) == 0
    assert cli.main(["run", str(remote_cfg)]) == 0
    assert "frames used: 6 of 6" in capsys.readouterr().out

    # The store is in the bucket, and nothing local is named after the URL.
    keys = s3.find("bucket/stack.zarr")
    assert "bucket/stack.zarr/zarr.json" in keys
    for var in ("frames", "transform", "integration", "rejection", "drizzle", "drizzle_tiles", "integrate_tiles"):
        assert any(k.startswith(f"bucket/stack.zarr/{var}/c/") for k in keys), var
    assert not (remote_dir / "stack.zarr").exists()
    _no_local_folder_named_after_a_url(tmp_path)

    # Same products as the local run, through open_stack on both.
    a, b = ds.open_stack(local_dir / "stack.zarr"), ds.open_stack(url)
    for var in ("transform", "weight", "integration", "rejection", "drizzle", "drizzle_weights",
                "drizzle_coverage"):
        np.testing.assert_array_equal(b[var].values, a[var].values, err_msg=var)
    assert float(np.nanmax(np.abs(b.drizzle.values))) > 0  # not two empty images

    # FITS: the drizzle was uploaded to the bucket, the integration is a local file next
    # to the config; both equal the local run's.
    with s3.open("bucket/out/drizzle.fits", "rb") as fh, fits.open(fh) as remote, \
            fits.open(local_dir / "drizzle.fits") as local:
        assert [h.name for h in remote] == [h.name for h in local] == ["PRIMARY", "WEIGHTS", "COVERAGE"]
        for r, loc in zip(remote, local):
            np.testing.assert_array_equal(r.data, loc.data)
    np.testing.assert_array_equal(fits.getdata(remote_dir / "integration.fits"),
                                  fits.getdata(local_dir / "integration.fits"))
    # The report of a remote store goes next to the config (the working directory from
    # the command line).
    assert (remote_dir / "report" / "report.html").exists()

    # info and report on the URL.
    assert cli.main(["info", url]) == 0
    out = capsys.readouterr().out
    assert f"store      {url}" in out and "6 frame(s) ok" in out
    assert cli.main(["report", url]) == 0
    assert (tmp_path / "report" / "report.html").exists()
    assert url in (tmp_path / "report" / "report.html").read_text()

    # A second run changes nothing and redoes nothing (the step records are in the bucket).
    before = s3.info("bucket/stack.zarr/drizzle/zarr.json")["ETag"]
    assert cli.main(["run", str(remote_cfg)]) == 0
    assert s3.info("bucket/stack.zarr/drizzle/zarr.json")["ETag"] == before


def test_interrupted_drizzle_on_s3_resumes_from_the_ledger_in_the_bucket(s3, sat_sim, tmp_path, monkeypatch):
    from conftest import register_with_truth

    url, local = "s3://bucket/resume.zarr", tmp_path / "local.zarr"
    for store in (url, local):
        ds.ingest(sat_sim.files, store)
        register_with_truth(store, sat_sim)
    kwargs = dict(scale=2.0, pixfrac=0.8, tile=128, output=None)  # 4 tiles of 128 px
    original, calls = driver.drizzle_tile, {"n": 0, "fail_after": 2}

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] > calls["fail_after"]:
            raise RuntimeError("interrupted")
        return original(*args, **kw)

    with scheduler(scheduler="synchronous"):
        expected = ds.drizzle(local, **kwargs).drizzle.values
        monkeypatch.setattr(driver, "drizzle_tile", failing)
        with pytest.raises(RuntimeError, match="interrupted"):
            ds.drizzle(url, **kwargs)
        ledger = StackStore.open(url, mode="r").group["drizzle_tiles"][...]
        assert int(np.all(np.isfinite(ledger), axis=-1).sum()) == 2
        calls.update(n=0, fail_after=10**6)
        with pytest.warns(ds.DrizzlestackWarning, match="resuming an interrupted drizzle .2 of 4 tiles"):
            resumed = ds.drizzle(url, **kwargs).drizzle.values
    assert calls["n"] == 2  # the finished tiles were not redone
    np.testing.assert_array_equal(resumed, expected)


def test_two_stores_of_one_name_in_two_buckets_do_not_share_dask_keys(small_sim):
    # memory:// is an fsspec file system without a server: the same code path as s3://.
    a_url, b_url = "memory://bucket-a/stack.zarr", "memory://bucket-b/stack.zarr"
    ds.ingest(small_sim.files[:1], a_url)
    st = StackStore.create(b_url, StackStore.open(a_url).frame_shape, chunk=512)
    st.append_frame(StackStore.open(a_url).frame(0) + 5, path="x")
    a, b = ds.open_stack(a_url), ds.open_stack(b_url)
    assert a.frames.data.name != b.frames.data.name
    assert float((b.frames - a.frames).max()) == pytest.approx(5.0)


@pytest.mark.parametrize("command", ["ingest", "info"])
def test_url_of_a_protocol_whose_package_is_missing_names_the_package(command, small_sim, tmp_path, monkeypatch,
                                                                       capsys):
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed: gs:// is not a missing protocol here")
    monkeypatch.chdir(tmp_path)
    args = [command, "gs://bucket/stack.zarr"] + ([small_sim.files[0], "--no-progress"] if command == "ingest" else [])
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "gs://bucket/stack.zarr: the gs:// protocol needs the package 'gcsfs'" in err
    assert "pip install gcsfs" in err
    assert list(tmp_path.iterdir()) == []  # nothing written locally


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(ds.StoreError, match=r"nosuchfs://b/s.zarr: unknown protocol nosuchfs://"):
        ds.open_stack("nosuchfs://b/s.zarr")


def test_fits_output_url_that_exists_is_refused_without_overwrite(small_sim):
    import fsspec

    from drizzlestack.io.fits import check_output_path

    fs = fsspec.filesystem("memory")
    fs.pipe("/out/exists.fits", b"x")
    with pytest.raises(ds.DrizzlestackError, match="file exists; pass overwrite=True"):
        check_output_path("memory://out/exists.fits", overwrite=False)
    assert check_output_path("memory://out/exists.fits", overwrite=True) == "memory://out/exists.fits"
