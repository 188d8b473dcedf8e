"""FITS ingest: every supported flavour round-trips exactly; bad input is refused or
skipped with a message naming the file, and never costs frames already in the store."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
from astropy.io import fits

import drizzlestack as ds
from drizzlestack.cli import main as cli_main
from drizzlestack.store import StackStore

SHAPE = (24, 32)
RNG = np.random.default_rng(42)


def _write(path, hdus):
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def flavours(tmp_path):
    """(name, path, expected float32 data, expected saturation) for each supported flavour."""
    out = []
    u8 = RNG.integers(0, 256, SHAPE).astype(np.uint8)
    out.append(("bitpix8", _write(tmp_path / "b8.fits", [fits.PrimaryHDU(u8)]), u8, 255.0))
    i16 = RNG.integers(-32768, 32767, SHAPE).astype(np.int16)
    out.append(("bitpix16", _write(tmp_path / "b16.fits", [fits.PrimaryHDU(i16)]), i16, 32767.0))
    u16 = RNG.integers(0, 65536, SHAPE).astype(np.uint16)  # astropy writes BITPIX 16 + BZERO 32768
    out.append(("uint16-bzero", _write(tmp_path / "u16.fits", [fits.PrimaryHDU(u16)]), u16, 65535.0))
    i32 = RNG.integers(-(2**20), 2**20, SHAPE).astype(np.int32)  # exact in float32
    out.append(("bitpix32", _write(tmp_path / "b32.fits", [fits.PrimaryHDU(i32)]), i32, 2**31 - 1))
    f32 = RNG.normal(100, 10, SHAPE).astype(np.float32)
    out.append(("bitpix-32", _write(tmp_path / "f32.fits", [fits.PrimaryHDU(f32)]), f32, np.inf))
    f64 = RNG.normal(100, 10, SHAPE)
    out.append(("bitpix-64", _write(tmp_path / "f64.fits", [fits.PrimaryHDU(f64)]), f64.astype(np.float32), np.inf))
    # BSCALE/BZERO on 16-bit integers: physical = 0.5 * raw + 1000
    raw = RNG.integers(-1000, 1000, SHAPE).astype(np.int16)
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BSCALE"], hdu.header["BZERO"] = 0.5, 1000.0
    p = tmp_path / "bscale.fits"
    hdu.writeto(p, overwrite=True)
    expected = (0.5 * raw.astype(np.float64) + 1000.0).astype(np.float32)  # the FITS formula, not astropy's reading
    out.append(("bscale", p, expected, 0.5 * 32767 + 1000))
    # gzip
    gz = tmp_path / "u16.fits.gz"
    with open(tmp_path / "u16.fits", "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    out.append(("gzip", gz, u16, 65535.0))
    # tile-compressed, integer (lossless RICE) and float (lossless GZIP, no quantization)
    out.append(("rice-uint16", _write(tmp_path / "rice.fits", [fits.PrimaryHDU(), fits.CompImageHDU(u16, compression_type="RICE_1")]), u16, 65535.0))
    out.append(("gzip-float", _write(tmp_path / "gzf.fits", [fits.PrimaryHDU(), fits.CompImageHDU(f32, compression_type="GZIP_1", quantize_level=0.0)]), f32, np.inf))
    # data in the first image extension, empty primary
    out.append(("extension", _write(tmp_path / "ext.fits", [fits.PrimaryHDU(), fits.ImageHDU(f32, name="SCI")]), f32, np.inf))
    return out


def test_every_fits_flavour_round_trips(tmp_path):
    for name, path, expected, saturation in flavours(tmp_path):
        store = tmp_path / f"{name}.zarr"
        stack = ds.ingest([path], store)
        got = stack.frames[0].values
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.asarray(expected, dtype=np.float32), err_msg=name)
        assert stack.saturation.values[0] == pytest.approx(saturation), name
        assert stack.path.values[0] == str(path.resolve())
        assert stack.status.values[0] == "ok"


def test_exposure_saturation_and_header_are_kept(tmp_path):
    data = RNG.normal(100, 5, SHAPE).astype(np.float32)
    h1 = fits.PrimaryHDU(data)
    h1.header["EXPTIME"] = 30.0
    h1.header["SATURATE"] = 4095
    h1.header["FILTER"] = "Ha"
    _write(tmp_path / "a.fits", [h1])
    h2 = fits.PrimaryHDU(data)
    h2.header["EXPOSURE"] = 12.5
    _write(tmp_path / "b.fits", [h2])
    with pytest.warns(ds.DrizzlestackWarning, match="different exposure times"):
        stack = ds.ingest([tmp_path / "a.fits", tmp_path / "b.fits"], tmp_path / "s.zarr")
    assert list(stack.exptime.values) == [30.0, 12.5]
    assert stack.saturation.values[0] == 4095
    assert np.isinf(stack.saturation.values[1])
    header = fits.Header.fromstring(stack.header.values[0], sep="\n")
    assert header["FILTER"] == "Ha"
    # user override wins over the header
    stack = ds.ingest([tmp_path / "a.fits"], tmp_path / "t.zarr", saturation=4000)
    assert stack.saturation.values[0] == 4000


def test_reingest_is_a_noop_and_new_files_append(tmp_path, small_sim):
    store = tmp_path / "s.zarr"
    ds.ingest(small_sim.files[:3], store)
    before = ds.open_stack(store).frames.values.copy()
    stack = ds.ingest(small_sim.files[:3], store)
    assert stack.sizes["frame"] == 3
    stack = ds.ingest(small_sim.files, store)  # 3 known + 3 new
    assert stack.sizes["frame"] == len(small_sim.files)
    np.testing.assert_array_equal(stack.frames[:3].values, before)
    assert [str(p) for p in stack.path.values] == small_sim.files


def test_an_interrupted_ingest_commits_the_frames_already_written(tmp_path, small_sim, monkeypatch):
    """Frames are committed in batches (each metadata array written once per batch): an
    interruption keeps every frame read before it, with its own metadata, and a second
    ingest adds the rest; skipped files leave no rows behind."""
    import importlib

    _ingest = importlib.import_module("drizzlestack.ingest")  # (the package's ``ingest`` is the function)
    files = small_sim.files
    real = _ingest.read_any
    calls = []

    def read(path, **kw):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(path, **kw)

    monkeypatch.setattr(_ingest, "COMMIT_SECONDS", 3600.0)  # one batch: committed on the way out
    monkeypatch.setattr(_ingest, "read_any", read)
    store = tmp_path / "s.zarr"
    with pytest.raises(KeyboardInterrupt):
        ds.ingest(files, store)
    st = StackStore.open(store)
    assert st.n_frames == 3 and st.paths() == files[:3]
    assert st.group["frames"].shape[0] == 3  # the rows reserved for the rest were trimmed
    monkeypatch.setattr(_ingest, "read_any", real)
    stack = ds.ingest(files, store)
    assert [str(p) for p in stack.path.values] == files
    for i, path in enumerate(files):  # each frame's pixels and header are its own file's
        with fits.open(path) as hdul:
            np.testing.assert_array_equal(stack.frames[i].values, hdul[0].data.astype(np.float32))
            assert float(stack.exptime[i]) == float(hdul[0].header["EXPTIME"])
        assert fits.Header.fromstring(stack.header.values[i], sep="\n")["SIMFRAME"] == i


def test_a_failed_background_write_commits_only_the_frames_before_it(tmp_path, small_sim, monkeypatch):
    """Two frames are written at once: when the third file's pixels cannot be written,
    ingest stops with the error, and the store holds the first two frames only (the
    fourth, written meanwhile, is not committed behind the gap)."""
    from drizzlestack import chunkio

    real, real_init = chunkio.DirectArray.__setitem__, chunkio.DirectArray.__init__

    def init(self, location, name, mode="r"):
        real_init(self, location, name, mode)
        self.test_name = name

    def setitem(self, key, value):
        if self.test_name == "frames" and key == 2:
            raise OSError("No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(chunkio.DirectArray, "__init__", init)
    monkeypatch.setattr(chunkio.DirectArray, "__setitem__", setitem)
    store = tmp_path / "s.zarr"
    with pytest.raises(OSError, match="No space"):
        ds.ingest(small_sim.files, store)
    st = StackStore.open(store)
    assert st.n_frames == 2 and st.paths() == small_sim.files[:2]
    monkeypatch.setattr(chunkio.DirectArray, "__setitem__", real)
    stack = ds.ingest(small_sim.files, store)  # the rest, after the disk was freed
    assert [str(p) for p in stack.path.values] == small_sim.files
    with fits.open(small_sim.files[3]) as hdul:
        np.testing.assert_array_equal(stack.frames[3].values, hdul[0].data.astype(np.float32))


def test_non_finite_pixels_become_nan(tmp_path):
    data = RNG.normal(100, 5, SHAPE).astype(np.float32)
    data[3, 4], data[5, 6], data[7, 8] = np.nan, np.inf, -np.inf
    _write(tmp_path / "nf.fits", [fits.PrimaryHDU(data)])
    frame = ds.ingest([tmp_path / "nf.fits"], tmp_path / "s.zarr").frames[0].values
    assert np.isnan(frame[3, 4]) and np.isnan(frame[5, 6]) and np.isnan(frame[7, 8])
    assert np.isfinite(frame).sum() == frame.size - 3


def _good(tmp_path, name="good.fits", value=None):
    data = RNG.normal(100, 5, SHAPE).astype(np.float32) if value is None else np.full(SHAPE, value, np.float32)
    return _write(tmp_path / name, [fits.PrimaryHDU(data)])


def test_bad_files_are_skipped_with_named_reasons_and_others_go_on(tmp_path):
    good1, good2 = _good(tmp_path, "good1.fits"), _good(tmp_path, "good2.fits")
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(good1.read_bytes()[:4000])
    notfits = tmp_path / "notes.fits"
    notfits.write_text("this is not a FITS file\n" * 200)
    table_only = _write(tmp_path / "table.fits", [fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column(name="a", format="E", array=np.arange(3.0))])])
    cube = _write(tmp_path / "cube.fits", [fits.PrimaryHDU(np.zeros((3,) + SHAPE, np.float32))])
    other_shape = _write(tmp_path / "small.fits", [fits.PrimaryHDU(np.zeros((10, 10), np.float32))])
    missing = tmp_path / "missing.fits"
    store = tmp_path / "s.zarr"
    ds.ingest([good1], store)
    with pytest.warns(ds.DrizzlestackWarning) as record:
        stack = ds.ingest([truncated, notfits, table_only, cube, other_shape, missing, good2], store)
    messages = [str(w.message) for w in record]
    expect = {"truncated.fits": "truncated", "notes.fits": "unreadable", "table.fits": "no image data",
              "cube.fits": "3-D", "small.fits": "differs from the store", "missing.fits": "no such file"}
    for name, reason in expect.items():
        assert any(name in m and reason in m for m in messages), (name, messages)
    assert stack.sizes["frame"] == 2  # good1 kept, good2 appended
    assert [p.split("/")[-1] for p in stack.path.values] == ["good1.fits", "good2.fits"]


def test_cli_exit_status_says_some_were_skipped(tmp_path, capsys):
    good = _good(tmp_path)
    bad = tmp_path / "bad.fits"
    bad.write_text("garbage")
    assert cli_main(["ingest", str(tmp_path / "s.zarr"), str(good), str(bad), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "skipped bad.fits: unreadable" in out
    assert cli_main(["ingest", str(tmp_path / "s.zarr"), str(good), "--no-progress"]) == 0
    assert "1 already in the store" in capsys.readouterr().out


def test_all_nan_and_constant_frames_are_ingested_but_excluded(tmp_path):
    good = _good(tmp_path)
    nan = _good(tmp_path, "nan.fits", value=np.nan)
    const = _good(tmp_path, "const.fits", value=7.0)
    with pytest.warns(ds.DrizzlestackWarning, match="excluded"):
        stack = ds.ingest([good, nan, const], tmp_path / "s.zarr")
    status = list(stack.status.values)
    assert status[0] == "ok"
    assert status[1].startswith("excluded: all pixels are NaN")
    assert status[2] == "excluded: constant frame (every pixel is 7)"


def test_store_path_that_is_not_a_store_is_refused_and_untouched(tmp_path, capsys):
    good = _good(tmp_path)
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"\xff\xd8jpeg")
    with pytest.raises(ds.StoreError, match="photos: .*not a drizzlestack store"):
        ds.ingest([good], target)
    assert sorted(p.name for p in target.iterdir()) == ["holiday.jpg"]
    assert cli_main(["ingest", str(target), str(good)]) == 2
    assert "not a drizzlestack store" in capsys.readouterr().err


def test_a_directory_ingests_its_fits_files_and_nothing_else(tmp_path):
    lights = tmp_path / "lights"
    lights.mkdir()
    frames = {}
    for name, value in (("b.fits", 2.0), ("a.fit", 1.0), ("c.fits.gz", 3.0), ("d.fts", 4.0)):
        data = np.full(SHAPE, value, np.float32)
        data[0, 0] = 0.0  # not a constant frame
        if name.endswith(".gz"):
            raw = tmp_path / "c.fits"
            _write(raw, [fits.PrimaryHDU(data)])
            with open(raw, "rb") as src, gzip.open(lights / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            _write(lights / name, [fits.PrimaryHDU(data)])
        frames[name] = value
    (lights / "notes.txt").write_text("not a frame")
    (lights / "sub").mkdir()
    _write(lights / "sub" / "e.fits", [fits.PrimaryHDU(np.zeros(SHAPE, np.float32))])
    stack = ds.ingest([lights], tmp_path / "s.zarr")
    names = [p.split("/")[-1] for p in stack.path.values]
    assert names == sorted(frames)  # sorted, the text file and the sub-directory left alone
    for i, name in enumerate(names):
        assert stack.frames[i].values[1, 1] == frames[name]


def test_a_glob_pattern_ingests_the_files_it_matches(tmp_path):
    for name in ("light_001.fits", "light_002.fits", "dark_001.fits"):
        _good(tmp_path, name)
    stack = ds.ingest([str(tmp_path / "light_*.fits")], tmp_path / "s.zarr")
    assert [p.split("/")[-1] for p in stack.path.values] == ["light_001.fits", "light_002.fits"]
    # from the command line as well (a pattern the shell did not expand)
    assert cli_main(["ingest", str(tmp_path / "t.zarr"), str(tmp_path / "dark_*.fits"), "--no-progress"]) == 0
    assert [p.split("/")[-1] for p in ds.open_stack(tmp_path / "t.zarr").path.values] == ["dark_001.fits"]


def test_pattern_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(ds.DrizzlestackError, match="matches no file"):
        ds.ingest([str(tmp_path / "*.fits")], tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_real_frames_and_paths_spelled_differently(tmp_path, hatp32_files):
    stack = ds.ingest(hatp32_files[:3], tmp_path / "s.zarr")
    assert stack.sizes == {"frame": 3, "y": 500, "x": 650}
    with fits.open(hatp32_files[0]) as f:
        np.testing.assert_array_equal(stack.frames[0].values, f[0].data.astype(np.float32))
    assert (stack.exptime.values == 60).all()
    # the same files through a different spelling of their paths: still a no-op
    relative = [f.parent / ".." / f.parent.name / f.name for f in hatp32_files[:3]]
    ds.ingest(relative, tmp_path / "s.zarr")
    assert StackStore.open(tmp_path / "s.zarr").n_frames == 3


def test_saturation_of_a_12_bit_camera_in_a_16_bit_container(tmp_path):
    data = RNG.integers(100, 3000, SHAPE).astype(np.int16)
    data[5:7, 5:7] = 4095  # a saturated star core at the 12-bit converter's ceiling
    _write(tmp_path / "adc12.fits", [fits.PrimaryHDU(data)])
    one = data.copy()
    one[5:7, 5:7] = 3001  # a bright but unsaturated pixel pile: not a ceiling
    _write(tmp_path / "plain.fits", [fits.PrimaryHDU(one)])
    stack = ds.ingest([tmp_path / "adc12.fits", tmp_path / "plain.fits"], tmp_path / "s.zarr")
    assert list(stack.saturation.values) == [4095.0, 32767.0]


def test_real_frames_saturate_at_their_converter_ceiling(tmp_path, hatp32_files):
    stack = ds.ingest(hatp32_files[:1], tmp_path / "s.zarr")
    assert stack.saturation.values[0] == 4095.0  # 12-bit camera (data README)


def _frame_with(path, **keywords):
    hdu = fits.PrimaryHDU(RNG.normal(100, 5, SHAPE).astype(np.float32))
    for key, value in keywords.items():
        hdu.header[key] = value
    _write(path, [hdu])
    return path


def test_mixed_filters_are_warned_at_ingest_naming_the_files_and_shown_in_info(tmp_path, capsys):
    red = [_frame_with(tmp_path / f"r{i}.fits", FILTER="R", EXPTIME=60.0) for i in range(3)]
    blue = [_frame_with(tmp_path / f"b{i}.fits", FILTER="B", EXPTIME=60.0) for i in range(2)]
    store = tmp_path / "s.zarr"
    with pytest.warns(ds.DrizzlestackWarning, match="different filters") as caught:
        ds.ingest(red + blue, store)
    message = " ".join(str(w.message) for w in caught)
    assert "FILTER='R': 3 (r0.fits, r1.fits, r2.fits)" in message and "b0.fits, b1.fits" in message
    assert "exposure" not in message  # one exposure time: only the filters are mixed
    assert cli_main(["info", str(store)]) == 0
    assert "warning: frames of different filters" in capsys.readouterr().out
    # the CLI's ingest prints it too, when frames are added
    extra = _frame_with(tmp_path / "v.fits", FILTER="V", EXPTIME=60.0)
    cli_main(["ingest", str(store), str(extra), "--no-progress"])
    assert "FILTER='V': 1 (v.fits)" in capsys.readouterr().out


def test_mixed_exposures_and_instruments_are_warned(tmp_path):
    a = _frame_with(tmp_path / "a.fits", EXPTIME=30.0, INSTRUME="CamA")
    b = _frame_with(tmp_path / "b.fits", EXPTIME=120.0, INSTRUME="CamB")
    with pytest.warns(ds.DrizzlestackWarning) as caught:
        ds.ingest([a, b], tmp_path / "s.zarr")
    messages = [str(w.message) for w in caught]
    assert any("different instruments" in m and "a.fits" in m and "b.fits" in m for m in messages)
    assert any("different exposure times" in m and "30 s: 1 (a.fits)" in m for m in messages)


def test_one_setup_is_not_warned(tmp_path):
    files = [_frame_with(tmp_path / f"f{i}.fits", FILTER="L", EXPTIME=60.0, INSTRUME="Cam") for i in range(3)]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ds.DrizzlestackWarning)
        ds.ingest(files, tmp_path / "s.zarr")
