"""The tiled drizzle driver: tile invariance, agreement with drizzle_array, ROI cost,
saturation, NaN, FITS output and WCS, and refusal of bad parameters."""

from __future__ import annotations


import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

import drizzlestack as ds
from drizzlestack.geometry import OutputGrid, pixmap as full_pixmap
from drizzlestack.chunkio import DirectArray
from drizzlestack.store import StackStore
from conftest import register_with_truth


@pytest.fixture(scope="module")
def registered(tmp_path_factory, sat_sim):
    store = tmp_path_factory.mktemp("drz") / "s.zarr"
    ds.ingest(sat_sim.files, store)
    register_with_truth(store, sat_sim)
    return store


def _reference_drizzle(store, scale, pixfrac, kernel, roi=None):
    """Each frame drizzled whole with ds.drizzle_array on its full pixmap, combined by
    weighted mean: what the tiled driver must reproduce."""
    stack = ds.open_stack(store)
    ny, nx = stack.sizes["y"], stack.sizes["x"]
    grid = OutputGrid.from_reference((ny, nx), scale, roi)
    acc_wv, acc_w = np.zeros(grid.shape), np.zeros(grid.shape)
    for i in range(stack.sizes["frame"]):
        m = grid.ref_to_out @ stack.transform.values[i]
        pm = full_pixmap(m, (ny, nx))
        img, wht = ds.drizzle_array(stack.frames[i].values, pm, grid.shape, kernel=kernel, pixfrac=pixfrac,
                                    pixel_scale_ratio=1.0 / scale)
        acc_wv += np.nan_to_num(img) * wht
        acc_w += wht
    with np.errstate(invalid="ignore"):
        return np.where(acc_w > 0, acc_wv / acc_w, np.nan), acc_w


@pytest.mark.parametrize("kernel", ["square", "turbo", "point", "gaussian", "lanczos3"])
def test_tiled_result_is_independent_of_tile_size_and_equals_drizzle_array(registered, kernel):
    pixfrac = 1.0 if kernel.startswith("lanczos") else 0.8
    one = ds.drizzle(registered, scale=2.0, pixfrac=pixfrac, kernel=kernel, tile=4096, output=None)
    image1, weights1 = one.drizzle.values, one.drizzle_weights.values
    for tile in (16, 40):
        tiled = ds.drizzle(registered, scale=2.0, pixfrac=pixfrac, kernel=kernel, tile=tile, output=None)
        np.testing.assert_allclose(tiled.drizzle.values, image1, rtol=1e-6, atol=1e-3, equal_nan=True)
        np.testing.assert_allclose(tiled.drizzle_weights.values, weights1, rtol=1e-6, atol=1e-9)
    ref_image, ref_weights = _reference_drizzle(registered, 2.0, pixfrac, kernel)
    np.testing.assert_allclose(weights1, ref_weights, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(image1, ref_image, rtol=1e-5, atol=1e-2, equal_nan=True)


def test_flux_is_conserved_through_the_driver(registered):
    out = ds.drizzle(registered, scale=3.0, pixfrac=0.7, kernel="square", tile=64, output=None)
    stack = ds.open_stack(registered)
    # Sum of image x weights (with drop area 1/scale^2 output px per unit weight) equals
    # the sum of input x weight for drops wholly inside the output: compare on the
    # reference frame alone, whose drops all land inside.
    one = ds.drizzle(registered, scale=3.0, pixfrac=0.7, kernel="square", tile=64, output=None, frames=[0])
    img, wht = one.drizzle.values.astype(np.float64), one.drizzle_weights.values.astype(np.float64)
    total_in = np.nansum(stack.frames[0].values.astype(np.float64))
    assert np.nansum(img * wht) == pytest.approx(total_in, rel=1e-5)
    assert np.isfinite(out.drizzle.values).mean() > 0.95


def test_roi_equals_the_window_of_the_full_output_and_reads_a_fraction(registered, monkeypatch):
    full = ds.drizzle(registered, scale=2.0, pixfrac=0.9, tile=32, output=None).drizzle.values
    reads = {"n": 0}
    original = DirectArray.__getitem__

    def counting(self, sel):
        out = original(self, sel)
        if str(self.array.store_path).rstrip("/").endswith("frames"):
            reads["n"] += np.asarray(out).size
        return out

    monkeypatch.setattr(DirectArray, "__getitem__", counting)
    ds.drizzle(registered, scale=2.0, pixfrac=0.9, tile=32, output=None, force=True)
    full_reads = reads["n"]
    reads["n"] = 0
    roi = ds.drizzle(registered, scale=2.0, pixfrac=0.9, tile=32, roi=(28, 24, 28, 24), output=None,
                     force=True).drizzle.values
    roi_reads = reads["n"]
    np.testing.assert_allclose(roi, full[48:96, 56:112], rtol=1e-6, equal_nan=True)
    # an ROI of 1/16 of the field reads only the input windows that reach it
    assert roi_reads < full_reads / 4, (roi_reads, full_reads)


def test_saturated_star_cores_keep_a_saturated_value(registered, sat_sim):
    out = ds.drizzle(registered, scale=2.0, pixfrac=0.9, tile=64, output=None)
    img = out.drizzle.values
    grid = OutputGrid.from_reference((96, 112), 2.0)
    sat = sat_sim.config.saturation
    bright = sat_sim.stars[sat_sim.stars["saturated"]]
    checked = 0
    for star in bright:
        xo = 2.0 * (star["x"] + 0.5) - 0.5
        yo = 2.0 * (star["y"] + 0.5) - 0.5
        ix, iy = int(round(xo)), int(round(yo))
        if not (4 <= ix < img.shape[1] - 4 and 4 <= iy < img.shape[0] - 4):
            continue
        core = img[iy - 1:iy + 2, ix - 1:ix + 2]
        ring = np.r_[img[iy - 4, ix - 4:ix + 5], img[iy + 4, ix - 4:ix + 5], img[iy - 4:iy + 5, ix - 4], img[iy - 4:iy + 5, ix + 4]]
        assert np.all(np.isfinite(core)), "hollow (NaN) core"
        assert core.max() >= 0.9 * sat, "black core"
        assert core.max() > ring.max(), "core is not the peak"
        checked += 1
    assert checked >= 2
    assert grid.shape == img.shape


def test_saturated_pixels_are_never_rejected(registered, sat_sim):
    """Flag every pixel as rejected: only the saturated ones may still contribute."""
    st = StackStore.open(registered)
    n, ny, nx = st.n_frames, *st.frame_shape
    st.write_variable("outliers", np.full((n, ny, nx), 2, np.uint8), ("frame", "y", "x"), chunks=(1, ny, nx))
    try:
        out = ds.drizzle(registered, scale=2.0, pixfrac=0.9, tile=64, output=None)
        img = out.drizzle.values
        finite = img[np.isfinite(img)]
        assert finite.size > 0
        assert finite.min() >= 0.5 * sat_sim.config.saturation  # only saturated drops landed
        off = ds.drizzle(registered, scale=2.0, pixfrac=0.9, tile=64, output=None, rejection=False)
        assert np.isfinite(off.drizzle.values).mean() > 0.95
    finally:
        st.delete_variables("outliers")


def test_nan_input_gets_zero_weight_and_never_spreads(tmp_path, small_sim):
    store = tmp_path / "s.zarr"
    ds.ingest(small_sim.files, store)
    register_with_truth(store, small_sim)
    st = StackStore.open(store)
    frames = st.group["frames"]
    data = frames[1]
    data[40:80, 50:100] = np.nan
    frames[1] = data
    out = ds.drizzle(store, scale=2.0, pixfrac=0.9, tile=64, output=None)
    img, cov = out.drizzle.values, out.drizzle_coverage.values
    assert np.isnan(img).mean() < 0.05  # the other frames fill the hole
    inner = (slice(2 * 45, 2 * 75), slice(2 * 55, 2 * 95))
    assert np.all(np.isfinite(img[inner]))
    assert cov[inner].max() <= st.n_frames - 1  # frame 1 contributed nothing there


def test_fits_output_headers_weights_and_wcs(tmp_path, small_sim):
    # give the reference frame a celestial WCS
    files = []
    for i, f in enumerate(small_sim.files):
        with fits.open(f) as hdul:
            h = hdul[0].header
            if i == 0:
                h.update({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRPIX1": 80.5, "CRPIX2": 64.5,
                          "CRVAL1": 150.0, "CRVAL2": 30.0, "CD1_1": -2.0e-4, "CD1_2": 0.0, "CD2_1": 0.0,
                          "CD2_2": 2.0e-4})
            p = tmp_path / f"w{i}.fits"
            fits.PrimaryHDU(hdul[0].data, header=h).writeto(p)
            files.append(p)
    store = tmp_path / "s.zarr"
    ds.ingest(files, store)
    register_with_truth(store, small_sim)
    path = tmp_path / "out.fits"
    roi = (20, 10, 100, 90)
    out = ds.drizzle(store, scale=2.5, pixfrac=0.8, kernel="turbo", roi=roi, output=path, tile=64)
    with fits.open(path) as hdul:
        hdul.verify("exception")
        assert [h.name for h in hdul] == ["PRIMARY", "WEIGHTS", "COVERAGE"]
        h = hdul[0].header
        assert (h["DRIZSCAL"], h["DRIZPIXF"], h["DRIZKERN"], h["NDRIZIM"]) == (2.5, 0.8, "turbo", 6)
        assert (h["DRIZROIX"], h["DRIZROIY"], h["DRIZROIW"], h["DRIZROIH"]) == roi
        assert h["EXPTIME"] == pytest.approx(60.0 * 6)
        assert "drizzlestack" in h["CREATOR"]
        assert any("pixfrac=0.8" in str(c) for c in h["HISTORY"])
        image = hdul[0].data
        assert image.shape == (225, 250) and image.dtype.newbyteorder("=") == np.float32
        np.testing.assert_array_equal(image, out.drizzle.values)
        w = hdul["WEIGHTS"].data
        assert np.nanmax(w) == pytest.approx(1.0)
        np.testing.assert_allclose(w * hdul["WEIGHTS"].header["WGTNORM"], out.drizzle_weights.values, rtol=1e-6)
        assert np.all(w[np.isnan(image)] == 0)  # uncovered: NaN image, zero weight
        np.testing.assert_array_equal(hdul["COVERAGE"].data, out.drizzle_coverage.values)
        # The output WCS puts a reference pixel where the reference WCS puts it.
        ref_wcs = WCS(fits.getheader(files[0]))
        out_wcs = WCS(h)
        xr_, yr_ = 73.0, 41.0
        xo, yo = 2.5 * (xr_ - roi[0] + 0.5) - 0.5, 2.5 * (yr_ - roi[1] + 0.5) - 0.5
        a = ref_wcs.pixel_to_world_values(xr_, yr_)
        b = out_wcs.pixel_to_world_values(xo, yo)
        np.testing.assert_allclose(b, a, atol=1e-9)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kernel": "cubic"}, "kernel='cubic': unknown kernel"),
        ({"pixfrac": 0.0}, r"pixfrac=0.0: must be in \(0, 1\]"),
        ({"pixfrac": 1.5}, r"pixfrac=1.5: must be in \(0, 1\]"),
        ({"scale": -2}, "scale=-2: must be a positive number"),
        ({"roi": (500, 500, 10, 10)}, "wholly outside the reference frame"),
        ({"frames": [99]}, "frames: index 99 out of range"),
    ],
)
def test_bad_parameters_are_refused_naming_the_parameter(registered, tmp_path, kwargs, message):
    with pytest.raises(ds.DrizzlestackError, match=message):
        ds.drizzle(registered, output=tmp_path / "x.fits", **kwargs)
    assert not (tmp_path / "x.fits").exists()


def test_roi_partly_outside_is_clipped_to_the_window_of_the_full_drizzle(registered):
    full = ds.drizzle(registered, scale=2.0, pixfrac=0.9, output=None, tile=64).drizzle.values
    with pytest.warns(ds.DrizzlestackWarning, match=r"clipped to \(0.0, 80.0, 30.0, 16.0\)"):
        out = ds.drizzle(registered, roi=(-10, 80, 40, 40), scale=2.0, pixfrac=0.9, output=None, tile=64)
    # the frame is 112 x 96 px: x in [0, 30), y in [80, 96) at scale 2
    np.testing.assert_allclose(out.drizzle.values, full[160:192, 0:60], rtol=1e-6, equal_nan=True)


def test_an_explicitly_requested_frame_whose_status_is_not_ok_is_left_out_with_a_warning(registered):
    st = StackStore.open(registered)
    kwargs = dict(scale=2.0, pixfrac=0.9, output=None, tile=64)
    st.set_frame_values("status", 2, "excluded: hazy")
    try:
        with pytest.warns(ds.DrizzlestackWarning, match="frame 2 excluded from the drizzle: excluded: hazy"):
            asked = ds.drizzle(registered, frames=[0, 1, 2, 3], **kwargs)
        assert StackStore.open(registered).step("drizzle")["params"]["frames"] == [0, 1, 3]
        asked = asked.drizzle.values
        without = ds.drizzle(registered, frames=[0, 1, 3], force=True, **kwargs).drizzle.values
    finally:
        st.set_frame_values("status", 2, "ok")
    np.testing.assert_array_equal(asked, without)


def test_an_unchanged_drizzle_is_not_redone_unless_forced(registered, monkeypatch):
    """One convention for every step: ``force=False`` by default returns what the store
    holds when parameters and inputs are unchanged."""
    from drizzlestack.drizzle import driver

    kwargs = dict(scale=2.0, pixfrac=0.6, output=None, tile=64)
    first = ds.drizzle(registered, **kwargs).drizzle.values
    calls = {"n": 0}
    original = driver.drizzle_tile

    def counting(*args):
        calls["n"] += 1
        return original(*args)

    monkeypatch.setattr(driver, "drizzle_tile", counting)
    again = ds.drizzle(registered, **kwargs).drizzle.values
    assert calls["n"] == 0
    np.testing.assert_array_equal(again, first)
    ds.drizzle(registered, force=True, **kwargs)
    assert calls["n"] == 12  # 4 x 3 tiles of 64 px over 224 x 192 output px


def test_a_tile_on_its_threads_reused_buffers_equals_a_tile_on_fresh_ones(registered, monkeypatch):
    """Tiles reuse their thread's accumulators (driver.TileBuffers): a tile after a
    larger and a smaller one (an edge tile) must be the tile drizzled from scratch."""
    import dataclasses

    from drizzlestack.drizzle import driver

    plans = []
    original = driver.run_tiles

    def grab(task, plan, tiles, width):
        plans.append(plan)
        return original(task, plan, tiles, width)

    monkeypatch.setattr(driver, "run_tiles", grab)
    ds.drizzle(registered, scale=2.0, pixfrac=0.8, output=None, tile=64, force=True)
    plan = plans[0]
    ny, nx = plan.grid.shape

    def fresh(y0, y1, x0, x1):
        return driver.drizzle_tile(dataclasses.replace(plan, buffers=driver.TileBuffers()), y0, y1, x0, x1)

    boxes = [(0, 64, 0, 64), (ny - 30, ny, nx - 20, nx), (10, 90, 50, 150), (0, 64, 0, 64)]
    for box in boxes:
        got = [None if a is None else a.copy() for a in driver.drizzle_tile(plan, *box)]
        expect = fresh(*box)
        assert got[0].dtype == got[1].dtype == np.float32
        for a, b in zip(got, expect):
            assert a.shape == b.shape and a.tobytes() == b.tobytes()
    assert np.isfinite(got[0]).any() and got[2].max() > 1


def test_drizzle_is_both_the_step_and_the_package():
    """``ds.drizzle(...)`` runs the step and ``import drizzlestack.drizzle.kernels``
    works: a function bound to the package's name used to shadow the sub-package."""
    import importlib
    import inspect

    from drizzlestack.drizzle import driver

    kernels = importlib.import_module("drizzlestack.drizzle.kernels")
    import drizzlestack.drizzle.kernels as K  # noqa: E402 - the statement that used to fail

    assert K is kernels and callable(K.homography_grid)
    assert callable(ds.drizzle)
    assert inspect.signature(ds.drizzle) == inspect.signature(driver.drizzle)
    assert "force" in inspect.signature(ds.drizzle).parameters


def test_output_file_exists_or_cannot_be_written(registered, tmp_path):
    existing = tmp_path / "exists.fits"
    existing.write_bytes(b"keep me")
    with pytest.raises(ds.DrizzlestackError, match="exists.fits: file exists"):
        ds.drizzle(registered, output=existing)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(ds.DrizzlestackError, match="does not exist"):
        ds.drizzle(registered, output=tmp_path / "nodir" / "x.fits")
    ds.drizzle(registered, output=existing, overwrite=True, tile=64)
    assert fits.getheader(existing)["DRIZSCAL"] == 2.0


def test_unregistered_store_and_all_frames_excluded_are_refused(tmp_path, small_sim):
    store = tmp_path / "s.zarr"
    ds.ingest(small_sim.files[:3], store)
    with pytest.raises(ds.DrizzlestackError, match="run 'drizzlestack register"):
        ds.drizzle(store, output=None)
    st = register_with_truth(store, small_sim)
    for i in range(3):
        st.set_frame_values("status", i, "unregistered: 2 stars matched")
    with pytest.raises(ds.DrizzlestackError, match="every frame is excluded.*0: unregistered: 2 stars matched"):
        ds.drizzle(store, output=None)


def test_windows_clipped_to_one_pixel_at_the_frame_edge(registered):
    """At scale 4 with small tiles, the last tile column's input window is one pixel wide
    once clipped to the frame; it is widened inwards and the result is unchanged."""
    roi = (100, 0, 12, 16)  # up to the frame's right edge (112 px wide)
    small = ds.drizzle(registered, scale=4.0, pixfrac=0.9, tile=16, roi=roi, output=None).drizzle.values
    whole = ds.drizzle(registered, scale=4.0, pixfrac=0.9, tile=1024, roi=roi, output=None).drizzle.values
    assert np.isfinite(small[:, -4:]).all()
    np.testing.assert_allclose(small, whole, rtol=1e-6, atol=1e-3, equal_nan=True)
