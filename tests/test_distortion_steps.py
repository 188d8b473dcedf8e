"""Integrate and drizzle after ``register(distortion=True)``: the surface-spline branch
of the registered view and of the drizzle tile, checked against the simulator's true
(distorted) geometry. A homography-only registration of the same frames is the
contrast that shows each check can fail."""

from __future__ import annotations

import shutil

import numpy as np
from astropy.io import fits
import pytest

import drizzlestack as ds
from drizzlestack.geometry import OutputGrid, apply_homography
from drizzlestack.registration import frame_mapping
from drizzlestack.simulate import simulate
from drizzlestack.store import StackStore

SHAPE = (192, 192)
SCALE = 2.0


@pytest.fixture(scope="module")
def distorted(tmp_path_factory):
    """4 frames with a strong radial distortion (15 px at the corners), registered
    with the surface spline (``spline``) and, as a contrast, without (``plain``); both
    integrated."""
    d = tmp_path_factory.mktemp("distorted_steps")
    truth = simulate(d / "frames", n_frames=4, shape=SHAPE, fwhm=1.6, n_stars=500, n_galaxies=0, max_shift=10.0,
                     max_rotation=1.0, distortion=15.0, cosmic_rays=0, hot_pixels=0, trail=False, n_saturated=0,
                     seed=5)
    spline = d / "spline.zarr"
    ds.ingest(truth.files, spline)
    plain = d / "plain.zarr"
    shutil.copytree(spline, plain)
    ds.register(spline, reference=0, distortion=True)
    ds.register(plain, reference=0)
    for store in (spline, plain):
        ds.integrate(store, output=None, tile=64)
    assert not frame_mapping(spline, 1).is_homography
    return truth, spline, plain


def _drizzle_array_with(store, i, to_reference):
    """Frame ``i`` drizzled whole with ds.drizzle_array through ``to_reference`` (a
    function of pixel coordinates): the in-memory reference for one frame."""
    grid = OutputGrid.from_reference(SHAPE, SCALE)
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]].astype(np.float64)
    xo, yo = apply_homography(grid.ref_to_out, *to_reference(xx, yy))
    data = ds.open_stack(store).frames[i].values
    return ds.drizzle_array(data, np.stack([xo, yo], axis=-1), grid.shape, pixfrac=0.9,
                            pixel_scale_ratio=1 / SCALE)[0]


def test_drizzle_after_a_distortion_registration_follows_the_true_geometry(distorted):
    truth, spline, _ = distorted
    kwargs = dict(scale=SCALE, pixfrac=0.9, output=None, tile=64, rejection=False, weights=False,
                  normalization=False)
    for i in (1, 3):
        tiled = ds.drizzle(spline, frames=[i], **kwargs).drizzle.values
        homography_only = ds.drizzle(spline, frames=[i], distortion=False, **kwargs).drizzle.values
        true = _drizzle_array_with(spline, i, lambda x, y: truth.frame_to_reference(i, x, y))
        ok = np.isfinite(tiled) & np.isfinite(true) & np.isfinite(homography_only)
        assert ok.mean() > 0.8
        err_spline = np.sqrt(np.mean((tiled - true)[ok] ** 2))
        err_plain = np.sqrt(np.mean((homography_only - true)[ok] ** 2))
        assert err_spline < 0.3 * err_plain, (i, err_spline, err_plain)
        # The tiled spline branch reproduces the in-memory drizzle through the same
        # mapping. Tolerance: the spline is evaluated directly for a tile's window but
        # from its 8 px lattice for a whole frame (SurfaceSpline.DIRECT_MAX), ~0.005 px.
        same = _drizzle_array_with(spline, i, frame_mapping(spline, i).forward)
        np.testing.assert_allclose(tiled, same, atol=2e-3 * np.nanmax(same), equal_nan=True)


def test_drizzle_of_all_frames_with_rejection_through_the_spline(distorted):
    """The spline branch of the rejection lookup (reference positions from the spline)
    with every frame: stars land where the truth puts them."""
    truth, spline, _ = distorted
    out = ds.drizzle(spline, scale=SCALE, pixfrac=0.9, output=None, tile=64)
    img = out.drizzle.values
    fx, fy, sel = _isolated_bright_stars(truth)
    xo, yo = SCALE * (fx[sel] + 0.5) - 0.5, SCALE * (fy[sel] + 0.5) - 0.5
    errors = _centroid_errors(img, xo, yo, truth.sky[0], r=6) / SCALE
    assert np.isfinite(errors).sum() >= 20
    assert np.nanmax(errors) < 0.08, np.round(np.sort(errors), 3)


def _isolated_bright_stars(truth):
    cat = truth.stars
    fx, fy = truth.reference_to_frame(0, np.asarray(cat["x"]), np.asarray(cat["y"]))
    flux = np.asarray(cat["flux"])
    d = np.hypot(fx[:, None] - fx[None], fy[:, None] - fy[None])
    np.fill_diagonal(d, np.inf)
    isolated = np.array([np.all(d[k][flux > 0.02 * flux[k]] > 6) for k in range(len(fx))])
    return fx, fy, (flux > 5e3) & isolated


def _centroid_errors(img, xs, ys, sky, r=3):
    out = []
    for xc, yc in zip(xs, ys):
        ix, iy = int(round(xc)), int(round(yc))
        if not (r + 2 <= ix < img.shape[1] - r - 2 and r + 2 <= iy < img.shape[0] - r - 2):
            out.append(np.nan)
            continue
        b = img[iy - r:iy + r + 1, ix - r:ix + r + 1] - sky
        yy, xx = np.mgrid[iy - r:iy + r + 1, ix - r:ix + r + 1]
        out.append(np.hypot((b * xx).sum() / b.sum() - xc, (b * yy).sum() / b.sum() - yc))
    return np.array(out)


def test_integration_after_a_distortion_registration_puts_stars_at_their_true_positions(distorted):
    truth, spline, plain = distorted
    fx, fy, sel = _isolated_bright_stars(truth)
    errors = {name: _centroid_errors(ds.open_stack(store).integration.values, fx[sel], fy[sel], truth.sky[0])
              for name, store in (("spline", spline), ("plain", plain))}
    assert np.isfinite(errors["spline"]).sum() >= 20
    assert np.nanmax(errors["spline"]) < 0.08, np.round(np.sort(errors["spline"]), 3)
    assert np.nanpercentile(errors["plain"], 90) > 0.08  # the homography alone misplaces them


@pytest.fixture(scope="module")
def default_drizzle(distorted):
    """The drizzle with every option on (numpy copies: the store's drizzle changes)."""
    out = ds.drizzle(distorted[1], scale=SCALE, pixfrac=0.9, tile=64, output=None)
    return {v: out[v].values.copy() for v in ("drizzle", "drizzle_coverage")}


@pytest.mark.parametrize("flag, param", [("--no-rejection", "rejection"), ("--no-weights", "weights"),
                                         ("--no-normalization", "normalization"),
                                         ("--no-distortion", "distortion"), ("--no-coverage", "coverage")])
def test_cli_drizzle_no_flags_turn_off_what_they_name(distorted, default_drizzle, tmp_path, flag, param):
    """Each ``--no-*`` flag of ``drizzlestack drizzle`` reaches the step (stored
    parameters, the others left on) and changes the result from the default one (so
    each option really does something in this store)."""
    from drizzlestack.cli import main

    _, spline, _ = distorted
    out = tmp_path / "d.fits"
    assert main(["drizzle", str(spline), "--scale", str(SCALE), "--pixfrac", "0.9", "--tile", "64", flag,
                 "-o", str(out), "--scheduler", "synchronous", "--no-progress"]) == 0
    params = StackStore.open(spline).step("drizzle")["params"]
    assert params[param] is False
    assert all(params[p] is True for p in ("rejection", "weights", "normalization", "distortion", "coverage")
               if p != param)
    stored = ds.open_stack(spline)
    with fits.open(out) as hdul:
        np.testing.assert_array_equal(hdul[0].data, stored.drizzle.values)
        assert ("COVERAGE" in hdul) == (param != "coverage")
    if param == "coverage":
        assert stored.drizzle_coverage.values.max() == 0 and default_drizzle["drizzle_coverage"].max() > 0
    else:
        assert not np.allclose(stored.drizzle.values, default_drizzle["drizzle"], equal_nan=True)
