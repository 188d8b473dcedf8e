"""Outlier flags in each frame's own pixels (issue 10), checked against the simulator's
truth mask, against the astropy sigma_clip + STScI drizzle script on the same frames,
and on the real hatp32 frames."""

from __future__ import annotations

import glob
import warnings
from pathlib import Path

import numpy as np
import pytest

import drizzlestack as ds
from drizzlestack.integration.blot import EDGE_REACH, _blot_own, blot_window
from drizzlestack.integration.outliers import FLAG_HIGH, FLAG_LOW, FLAG_RANGE, OutlierParameters, flag_pixels, flag_window
from drizzlestack.registration import frame_mapping
from drizzlestack.simulate import DEFECT_COSMIC_RAY, simulate
from drizzlestack.store import StackStore

import fidelity

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hatp32"


def _field(tmp_path_factory, name, **kw):
    d = tmp_path_factory.mktemp(name)
    params = dict(n_frames=12, shape=(192, 224), fwhm=1.3, n_stars=320, cosmic_rays=40, hot_pixels=15,
                  trail=True, n_saturated=2, max_shift=8.0, hazy_frame=6, seed=11)
    params.update(kw)
    truth = simulate(d / "frames", **params)
    store = d / "s.zarr"
    ds.ingest([str(d / "frames")], store)
    ds.register(store)
    ds.integrate(store)
    return truth, store


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    return _field(tmp_path_factory, "outliers")


@pytest.fixture(scope="module")
def seeing_field(tmp_path_factory):
    return _field(tmp_path_factory, "seeing", seeing=(1.2, 2.4), seed=5)


def _near_saturated(truth, st, radius=6.0):
    """Pixels of each frame within ``radius`` of a saturated star (cosmic rays there are
    kept by design: nothing can tell them from the star's own light)."""
    ny, nx = st.frame_shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    near = np.zeros((st.n_frames, ny, nx), bool)
    sat = np.asarray(truth.stars["saturated"], bool)
    for i in range(st.n_frames):
        fx, fy = truth.reference_to_frame(i, np.asarray(truth.stars["x"])[sat], np.asarray(truth.stars["y"])[sat])
        for x, y in zip(fx, fy):
            near[i] |= np.hypot(xx - x, yy - y) < radius
    return near


def test_cosmic_rays_are_found_and_clean_sky_is_left_alone(field):
    truth, store = field
    st = StackStore.open(store)
    flags = np.asarray(st.group["outliers"][...]) != 0
    mask, excess = truth.defects()
    noise = np.asarray(st.group["noise"][...])
    inside = fidelity.inside_reference(st)
    cr = ((mask & DEFECT_COSMIC_RAY) != 0) & (excess > 10 * noise[:, None, None]) & inside
    on_sky = cr & ~_near_saturated(truth, st)
    assert on_sky.sum() > 200
    assert (flags & on_sky).sum() / on_sky.sum() >= 0.99
    clean = (mask == 0) & inside
    assert (flags & clean).sum() / clean.sum() <= 5e-4
    # Hot pixels and the trail: every one of them inside the field.
    for bit in (2, 4):
        defect = ((mask & bit) != 0) & inside
        assert defect.sum() > 0 and (flags & defect).sum() / defect.sum() >= 0.98


def test_no_star_core_is_flagged_when_seeing_varies_between_frames(seeing_field):
    """Regression (issue 10): cores of undersampled stars in frames sharper or blurrier
    than the rest were flagged as outliers on the registered view."""
    truth, store = seeing_field
    assert np.ptp(truth.fwhm) > 0.9  # seeing 1.2-2.4 px
    st = StackStore.open(store)
    flags = np.asarray(st.group["outliers"][...])
    mask, _ = truth.defects()
    ny, nx = st.frame_shape
    checked = 0
    for i in range(st.n_frames):
        fx, fy = truth.reference_to_frame(i, np.asarray(truth.stars["x"]), np.asarray(truth.stars["y"]))
        ix, iy = np.round(fx).astype(int), np.round(fy).astype(int)
        # Stars well inside the reference field (beyond its edge the model is extrapolated).
        rx, ry = np.asarray(truth.stars["x"]), np.asarray(truth.stars["y"])
        if i != int(st.attrs["reference"]):
            rx, ry = frame_mapping(st, i).forward(fx, fy)
        ok = (ix >= 2) & (ix < nx - 2) & (iy >= 2) & (iy < ny - 2) & (np.asarray(truth.stars["flux"]) > 2000)
        ok &= (rx >= 3) & (rx <= nx - 4) & (ry >= 3) & (ry <= ny - 4)
        for x, y in zip(ix[ok], iy[ok]):
            if (mask[i, y - 2:y + 3, x - 2:x + 3] != 0).any():
                continue  # a defect touching the star: flags there are right
            checked += 1
            assert not (flags[i, y - 1:y + 2, x - 1:x + 2] != 0).any(), f"frame {i}: core of the star at {x}, {y}"
    assert checked > 300


@pytest.mark.parametrize("which", ["field", "seeing_field"])
def test_default_drizzle_is_as_faithful_as_the_sigma_clip_script(which, request):
    pytest.importorskip("drizzle.resample")
    pytest.importorskip("astroalign")
    truth, store = request.getfixturevalue(which)
    ref = int(ds.open_stack(store).attrs["reference"])
    ny, nx = truth.config.shape
    ours = ds.drizzle(store, scale=2.0, pixfrac=0.9, output=None)
    img, wht = ours.drizzle.values, ours.drizzle_weights.values
    m = fidelity.measure(img, 2.0, truth, fidelity.bright_isolated_stars(truth, (ny, nx), reference=ref),
                         reference=ref)
    peer_img, peer_wht = fidelity.peer_pipeline(truth.files, 2.0, 0.9, transforms=truth.transforms)
    p = fidelity.measure(peer_img, 2.0, truth, fidelity.bright_isolated_stars(truth, (ny, nx)))
    assert m["stars"] >= 10
    assert abs(m["flux_scale"] - 1) <= 0.003
    # No worse than the script; a 15 % allowance for the estimate's own noise on 10-20 stars.
    assert m["flux_std"] <= 1.15 * p["flux_std"]
    assert m["astrometric_scatter"] <= 1.15 * p["astrometric_scatter"]
    assert fidelity.background_excess(img, wht, truth, 2.0, reference=ref) < 8
    # ... and the flags are what gets it there: without them cosmic rays leak.
    raw = ds.drizzle(store, scale=2.0, pixfrac=0.9, output=None, rejection=False)
    assert fidelity.background_excess(raw.drizzle.values, raw.drizzle_weights.values, truth, 2.0, reference=ref) > 8


def test_flag_kernel_tolerances():
    """The test of one pixel against the model, term by term."""
    model = np.full((5, 5), 100.0, np.float32)
    data = model.copy()
    data[2, 2] = 100 + 4.5 * 10  # 4.5 sigma with noise 10
    out = np.zeros((5, 5), np.uint8)
    spread = np.zeros((5, 5), np.float32)
    unit = (1.0, 0.0, -np.inf, np.inf)  # identity normalization, no range limits

    def run(data, model, saturation=np.inf, tol=(4.0, 1.2, 0.6, 3.0, 0.7, 0.4), k=(3.0, 3.0), spread=spread,
            norm=unit):
        scale, offset, lo, hi = norm
        flag_pixels(data, np.zeros(data.shape, np.uint8), model[None], spread[None], saturation, np.array([100.0]),
                    np.array([100.0]), 0.0, 1.0, *tol, *k, np.array([scale]), np.array([offset]), lo, hi, out)
        return out

    assert run(data, model)[2, 2] == FLAG_HIGH and out.sum() == FLAG_HIGH
    assert run(data, model, tol=(5.0, 1.2, 0.6, 3.0, 0.7, 0.4)).sum() == 0  # below 5 sigma
    # A steep model (a star) widens the tolerance by the derivative term.
    steep = model.copy()
    steep[2, 3] = 200.0
    assert run(data, steep, tol=(4.0, 1.2, 0.0, 3.0, 0.7, 0.0))[2, 2] == 0
    # Frames that disagree among themselves (spread) widen it by k times the spread.
    assert run(data, model, spread=np.full((5, 5), 5.0, np.float32))[2, 2] == 0
    assert run(data, model, spread=np.full((5, 5), 5.0, np.float32), k=(3.0, 0.5))[2, 2] == FLAG_HIGH
    assert run(data, model, k=(3.0, np.inf)).sum() == 0  # high side switched off
    # Saturated pixels are never flagged; range limits flag the raw pixel itself.
    assert run(data, model, saturation=140.0).sum() == 0
    assert run(data, model, norm=(1.0, 0.0, 120.0, np.inf))[0, 0] == FLAG_RANGE
    # A tail next to a hit is caught by the looser second pass.
    data[2, 3] = 100 + 3.5 * 10
    assert run(data, model)[2, 3] == FLAG_HIGH


def test_bad_outlier_parameters_are_refused(field):
    _, store = field
    with pytest.raises(ds.DrizzlestackError, match="outliers: unknown option 'sn'"):
        ds.integrate(store, outliers={"sn": 3})
    with pytest.raises(ds.DrizzlestackError, match="outliers.snr_grow=-1.0: must be a number >= 0"):
        OutlierParameters(snr=3.0, snr_grow=-1.0)
    with pytest.raises(ds.DrizzlestackError, match="outliers.signal='lots': must be a number"):
        OutlierParameters.from_dict({"signal": "lots"})


def test_fewer_than_three_frames_drizzle_without_flags(field, tmp_path):
    truth, _ = field
    store = tmp_path / "two.zarr"
    ds.ingest(truth.files[:2], store)
    ds.register(store)
    with pytest.warns(ds.DrizzlestackWarning, match="rejection needs at least 3"):
        ds.integrate(store)
    assert "outliers" not in ds.open_stack(store)
    ds.drizzle(store, output=None)  # no warning about missing flags: there are none to have


@pytest.mark.skipif(not DATA.is_dir(), reason="real frames not available (../shared/data/hatp32)")
def test_real_frames_flag_few_samples_and_leave_star_fluxes_alone(tmp_path):
    files = sorted(glob.glob(str(DATA / "*.fits*")))[:16]
    store = tmp_path / "hatp32.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ds.DrizzlestackWarning)
        ds.ingest(files, store)
        ds.register(store)
        ds.integrate(store)
    st = StackStore.open(store)
    used = [i for i, w in enumerate(st.group["weight"][...]) if w > 0]
    frac = np.asarray(st.group["outlier_fraction"][...])[used]
    # Issue 10's target is 0.5 %; these frames reach 0.7-1.5 %: the camera's warm pixels
    # (+6 ADU over a 1.5 ADU noise) and the dark strip along the bottom rows of some
    # frames are flagged, rightly, but more than the target allows (left open).
    print("outlier fractions", frac)
    assert np.nanmax(frac) <= 0.02, frac
    with_flags = ds.drizzle(store, scale=2.0, pixfrac=0.9, output=None)
    # Interior output pixels that lose two or more frames to the flags.
    cov_on = with_flags.drizzle_coverage.values.astype(int)
    without = ds.drizzle(store, scale=2.0, pixfrac=0.9, output=None, rejection=False)
    cov_off = without.drizzle_coverage.values.astype(int)
    interior = cov_off >= max(3, int(0.8 * cov_off.max()))
    lost = cov_off - cov_on
    print("interior pixels losing >= 2 frames", (lost[interior] >= 2).mean())
    assert (lost[interior] >= 2).mean() <= 0.05
    # Bright unsaturated stars: fluxes with the flags against without.
    ref = int(st.attrs["reference"])
    table = np.asarray(st.group["stars"][ref])
    from drizzlestack.registration.stars import FIELDS

    cols = {name: table[:, k] for k, name in enumerate(FIELDS)}
    ok = np.isfinite(cols["x"]) & (cols["peak"] < 3000) & (cols["flux"] > 0)
    ok &= (np.nan_to_num(cols["flags"]).astype(int) & 7) == 0
    order = np.flatnonzero(ok)[np.argsort(-cols["flux"][ok])][:80]
    xo, yo = 2 * (cols["x"][order] + 0.5) - 0.5, 2 * (cols["y"][order] + 0.5) - 0.5
    a = fidelity.aperture_fluxes(with_flags.drizzle.values, xo, yo, 8.0, 12.0, 18.0)
    b = fidelity.aperture_fluxes(without.drizzle.values, xo, yo, 8.0, 12.0, 18.0)
    good = np.isfinite(a) & np.isfinite(b) & (b > 0)
    ratio = a[good] / b[good]
    print("bright-star flux ratio with/without flags", np.median(ratio), np.median(np.abs(ratio - np.median(ratio))))
    assert good.sum() >= 30
    assert abs(np.median(ratio) - 1) <= 0.003
    assert 1.4826 * np.median(np.abs(ratio - np.median(ratio))) <= 0.003


def test_a_store_integrated_before_own_pixel_flags_drizzles_without_them_and_says_so(field, tmp_path):
    """The old reference-grid flags hit star cores: they are never used for drizzle."""
    import shutil

    _, store = field
    old = tmp_path / "old.zarr"
    shutil.copytree(store, old)
    st = StackStore.open(old)
    st.delete_variables("outliers")
    with pytest.warns(ds.DrizzlestackWarning, match="predates them.*drizzling without rejection"):
        out = ds.drizzle(old, scale=2.0, pixfrac=0.9, output=None, force=True)
    plain = ds.drizzle(store, scale=2.0, pixfrac=0.9, output=None, rejection=False, force=True)
    np.testing.assert_array_equal(out.drizzle.values, plain.drizzle.values)


def test_report_shows_the_most_flagged_frames_outliers(field, tmp_path):
    truth, store = field
    ds.drizzle(store, scale=2.0, pixfrac=0.9, output=None)
    from drizzlestack.report import write_report
    import matplotlib.image as mimage

    html = write_report(store, tmp_path / "report").read_text()
    fractions = ds.open_stack(store).outlier_fraction.values
    worst = int(np.nanargmax(fractions))
    assert f"Outliers of frame {worst}" in html
    assert worst == truth.trail_frame  # the trail makes its frame the most flagged
    rgb = mimage.imread(tmp_path / "report" / "outliers.png")[..., :3]
    red = (rgb[..., 0] > 0.9) & (rgb[..., 1] < 0.2) & (rgb[..., 2] < 0.2)
    flags = ds.open_stack(store).outliers.values[worst]
    hit = (flags != 0) & (flags != 4)
    # Every flagged pixel is painted where it is (the frame is small: no block maxima;
    # y up, so the PNG's first row is the frame's last), nothing else is.
    assert hit.sum() > 100
    np.testing.assert_array_equal(red[::-1], hit)


def test_colour_derivative_term_compares_a_pixel_with_its_own_colour_only():
    """Regression (colour integration): the derivative term compared a pixel's model with
    its neighbours' models of *their* colours, so the sky's colour (here 100 ADU between
    the channels) counted as a gradient and hid a 6-sigma cosmic ray."""
    chan = (np.indices((5, 5)).sum(axis=0) % 2).astype(np.uint8)  # a two-colour checkerboard
    model = np.stack([np.full((5, 5), 100.0, np.float32), np.full((5, 5), 200.0, np.float32)])
    data = np.take_along_axis(model, chan[None].astype(np.intp), 0)[0].copy()
    data[2, 2] += 60.0  # 6 sigma with noise 10
    out = np.zeros((5, 5), np.uint8)
    tested = flag_pixels(data, chan, model, np.zeros_like(model), np.inf, np.array([100.0, 200.0]),
                         np.array([100.0, 100.0]), 0.0, 1.0, 4.0, 1.2, 0.6, 3.0, 0.7, 0.4, 3.0, 3.0,
                         np.ones(2), np.zeros(2), -np.inf, np.inf, out)
    assert out[2, 2] == FLAG_HIGH and out.sum() == FLAG_HIGH and tested == 25


def test_second_pass_grows_only_around_first_pass_hits():
    """The grow pass, against a direct reading of its rule on a random field (hits, tails,
    chains of tails, saturated, out-of-range and NaN pixels, frame edges): a pixel is
    flagged high in the second pass when it passed the first, exceeds the looser
    tolerance, and touches (8-neighbourhood) a first-pass hit, high or low; pixels grown
    in the second pass never grow it further."""
    rng = np.random.default_rng(3)
    h, w = 60, 70
    model = np.full((h, w), 100.0, np.float32)
    model[rng.random((h, w)) < 0.02] = np.nan  # no model: not tested (a flat model: no derivative term)
    excess = rng.choice([0.0, 35.0, 45.0, -45.0], size=(h, w), p=[0.6, 0.3, 0.07, 0.03])
    data = (100.0 + excess).astype(np.float32)  # sigma 10: hits beyond 40, tails beyond 30
    special = rng.random((h, w))
    data[special < 0.01] = np.nan
    data[(special >= 0.01) & (special < 0.02)] = 250.0  # saturated: never flagged, not a hit
    data[(special >= 0.02) & (special < 0.03)] = 10.0  # at or below range_low: FLAG_RANGE, not a hit
    out = np.zeros((h, w), np.uint8)

    def run(k_high):
        return flag_pixels(data, np.zeros((h, w), np.uint8), model[None], np.zeros((1, h, w), np.float32), 200.0,
                           np.array([100.0]), np.array([100.0]), 0.0, 1.0, 4.0, 1.2, 0.6, 3.0, 0.7, 0.4, 3.0,
                           k_high, np.ones(1), np.zeros(1), 20.0, np.inf, out)

    for k_high in (3.0, np.inf):
        tested = run(k_high)
        ok = np.isfinite(data) & (data < 200.0) & (data > 20.0) & np.isfinite(model)
        diff = data.astype(np.float64) - 100.0
        first = np.zeros((h, w), np.uint8)
        first[ok & (diff > 40) & np.isfinite(k_high)] = FLAG_HIGH
        first[ok & (diff < -40)] = FLAG_LOW
        first[np.isfinite(data) & (data < 200.0) & (data <= 20.0)] = FLAG_RANGE
        hits = np.pad((first & 3) != 0, 1)
        near = np.zeros((h, w), bool)
        for dy in range(3):
            for dx in range(3):
                near |= hits[dy:dy + h, dx:dx + w]
        grown = ok & (first == 0) & near & (diff > 30) & np.isfinite(k_high)
        expected = first.copy()
        expected[grown] = FLAG_HIGH
        np.testing.assert_array_equal(out, expected)
        assert tested == int((np.isfinite(data) & np.isfinite(model)).sum())
        if np.isfinite(k_high):  # the field exercises the rule: tails grown, and tails left alone
            assert grown.sum() > 200 and (ok & (first == 0) & ~near & (diff > 30)).sum() > 200
            assert (grown & ~np.pad(near, 1)[1:-1, 1:-1]).sum() == 0


def _blot_reference(model, spread, wy0, wx0, mny, mnx, x, y, scale, offset):
    """Bilinear blot written directly from blot_window's docstring, in numpy."""
    inside = (x >= -0.5 - EDGE_REACH) & (x <= mnx - 0.5 + EDGE_REACH) & (y >= -0.5 - EDGE_REACH) & \
             (y <= mny - 0.5 + EDGE_REACH)
    h, w = model.shape
    x = np.clip(x, 0.0, mnx - 1.0) - wx0
    y = np.clip(y, 0.0, mny - 1.0) - wy0
    iu, iv = np.floor(x).astype(int), np.floor(y).astype(int)
    fu, fv = x - iu, y - iv
    acc = np.zeros(x.shape)
    wsum = np.zeros(x.shape)
    for dv, wv in ((0, 1.0 - fv), (1, fv)):
        for du, wu in ((0, 1.0 - fu), (1, fu)):
            val = model[np.clip(iv + dv, 0, h - 1), np.clip(iu + du, 0, w - 1)].astype(np.float64)
            good = np.isfinite(val)
            acc += np.where(good, wv * wu * np.where(good, val, 0.0), 0.0)
            wsum += np.where(good, wv * wu, 0.0)
    nv = np.clip(np.floor(y + 0.5).astype(int), 0, h - 1)
    nu = np.clip(np.floor(x + 0.5).astype(int), 0, w - 1)
    valid = inside & (wsum > 0) & np.isfinite(model[nv, nu])
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.where(valid, (acc / wsum - offset) / scale, np.nan)
        s = np.where(valid, spread[nv, nu] / scale, np.nan)
    return b, s


def test_blot_window_matches_a_direct_bilinear_interpolation():
    """The blot (clamp-free path inside the window, general path at its edges and next to
    missing model pixels), against numpy; the position-array path gives the same bits as
    the homography path."""
    rng = np.random.default_rng(5)
    mny, mnx = 90, 80  # the whole model array; the window starts at (wy0, wx0)
    full = (100.0 + 50.0 * rng.random((mny, mnx))).astype(np.float32)
    full[rng.random((mny, mnx)) < 0.05] = np.nan
    full[:, 0] = np.nan  # a missing edge column
    spread_full = (5.0 * rng.random((mny, mnx))).astype(np.float32)
    wy0, wx0 = 10, 5
    model, spread = full[wy0:, wx0:], spread_full[wy0:, wx0:]
    angle = np.radians(0.7)
    matrix = np.array([[np.cos(angle), -np.sin(angle), -3.3], [np.sin(angle), np.cos(angle), 8.6],
                       [1e-5, -2e-5, 1.0]])
    y0, x0, ty, tx = 12, 4, 80, 79  # frame pixels, some mapping beyond the model's edges
    fx, fy = np.meshgrid(np.arange(x0, x0 + tx, dtype=np.float64), np.arange(y0, y0 + ty, dtype=np.float64))
    wz = matrix[2, 0] * fx + matrix[2, 1] * fy + matrix[2, 2]
    xr = (matrix[0, 0] * fx + matrix[0, 1] * fy + matrix[0, 2]) / wz
    yr = (matrix[1, 0] * fx + matrix[1, 1] * fy + matrix[1, 2]) / wz
    scale, offset = np.array([1.3]), np.array([-20.0])
    outs = []
    for use_matrix, xs, ys in ((True, np.empty((0, 0)), np.empty((0, 0))), (False, xr, yr)):
        b = np.empty((1, ty, tx), np.float32)
        s = np.empty((1, ty, tx), np.float32)
        blot_window(model[None], spread[None], wy0, wx0, mny, mnx, matrix, y0, x0, xs, ys, use_matrix,
                    EDGE_REACH, scale, offset, b, s)
        outs.append((b[0], s[0]))
    rb, rs = _blot_reference(model, spread, wy0, wx0, mny, mnx, xr, yr, scale[0], offset[0])
    b, s = outs[0]
    np.testing.assert_array_equal(np.isnan(b), np.isnan(rb))
    assert 0.1 < np.isnan(b).mean() < 0.5  # the test reaches beyond the model and around holes
    np.testing.assert_allclose(b, rb, rtol=2e-7, equal_nan=True)
    np.testing.assert_allclose(s, rs, rtol=2e-7, equal_nan=True)
    for a, c in zip(outs[0], outs[1]):
        np.testing.assert_array_equal(a.view(np.uint32), c.view(np.uint32))


@pytest.mark.parametrize("colour", [False, True])
def test_flag_window_gives_the_flags_of_blotting_every_channel_first(colour):
    """flag_window blots each pixel's own colour and, only where the test reads them, the
    spread and the other colours' models: its flags are those of blot_window (every
    channel, model and spread, at every pixel) followed by flag_pixels, bit for bit, for
    the homography and the position-array paths, around holes and beyond the model's
    edges, with and without a gain, with negative spreads (no spread shortcut)."""
    rng = np.random.default_rng(8)
    n_chan = 3 if colour else 1
    mny, mnx = 90, 80
    full = (200 + 300 * rng.random((n_chan, mny, mnx)) ** 8).astype(np.float32)  # a few steep spots
    full[rng.random((n_chan, mny, mnx)) < 0.03] = np.nan
    spread_full = (4.0 * rng.random((n_chan, mny, mnx))).astype(np.float32)
    spread_full[:, 30:34] = np.nan
    wy0, wx0 = 10, 5
    model, spread = full[:, wy0:, wx0:], spread_full[:, wy0:, wx0:]
    angle = np.radians(0.7)
    matrix = np.array([[np.cos(angle), -np.sin(angle), -3.3], [np.sin(angle), np.cos(angle), 8.6],
                       [1e-5, -2e-5, 1.0]])
    y0, x0, ty, tx = 12, 4, 80, 79
    fx, fy = np.meshgrid(np.arange(x0, x0 + tx, dtype=np.float64), np.arange(y0, y0 + ty, dtype=np.float64))
    wz = matrix[2, 0] * fx + matrix[2, 1] * fy + matrix[2, 2]
    xr = (matrix[0, 0] * fx + matrix[0, 1] * fy + matrix[0, 2]) / wz
    yr = (matrix[1, 0] * fx + matrix[1, 1] * fy + matrix[1, 2]) / wz
    chan = np.zeros((ty, tx), np.uint8)
    if colour:
        chan[::2, 1::2] = 1
        chan[1::2, ::2] = 1
        chan[1::2, 1::2] = 2
    scale, offset = np.array([1.3, 1.1, 0.9])[:n_chan], np.array([-20.0, -5.0, 3.0])[:n_chan]
    blotted = np.empty((n_chan, ty, tx), np.float32)
    blotted_spread = np.empty_like(blotted)
    empty = np.empty((0, 0))
    blot_window(model, spread, wy0, wx0, mny, mnx, matrix, y0, x0, empty, empty, True, EDGE_REACH, scale, offset,
                blotted, blotted_spread)
    own = np.take_along_axis(blotted, chan[None].astype(np.intp), 0)[0]
    for use_matrix, xs, ys in ((True, empty, empty), (False, xr, yr)):  # the blot of each pixel's own colour
        lazy = np.empty((ty, tx), np.float32)
        _blot_own(model, chan, (wy0, wx0, mny, mnx, matrix, y0, x0, xs, ys, use_matrix, EDGE_REACH), scale, offset,
                  lazy)
        np.testing.assert_array_equal(np.isnan(lazy), np.isnan(own))
        np.testing.assert_array_equal(np.nan_to_num(lazy).view(np.uint32), np.nan_to_num(own).view(np.uint32))
    data = np.where(np.isfinite(own), own, 300.0) + rng.normal(0, 10, (ty, tx))
    hits = rng.random((ty, tx)) < 0.03
    data[hits] += rng.choice([-1, 1], hits.sum()) * rng.uniform(20, 150, hits.sum())
    data = data.astype(np.float32)
    data[5, 5] = np.nan
    data[60, 60] = 5000.0  # saturated
    sky, noise = np.array([200.0, 210.0, 190.0])[:n_chan], np.array([100.0, 90.0, 110.0])[:n_chan]
    reach = 2 if colour else 1
    checked = 0
    for gain, tol, k in [(0.0, (4.0, 1.2, 0.6, 3.0, 0.7, 0.4), (3.0, 3.0)),
                         (0.5, (3.0, 0.5, 0.1, 2.0, 0.3, 0.05), (np.inf, 1.0)),
                         (0.0, (3.0, 0.5, 0.1, 2.0, 0.3, 0.05), (1.0, np.inf))]:
        for negative in (False, True):
            sp, sp_blotted = spread, blotted_spread
            if negative:  # a spread below 0 could lower the tolerance: every pixel's spread is read
                sp = -spread
                sp_blotted = np.empty_like(blotted)
                blot_window(model, sp, wy0, wx0, mny, mnx, matrix, y0, x0, empty, empty, True, EDGE_REACH, scale,
                            offset, np.empty_like(blotted), sp_blotted)
            args = (4000.0, sky, noise, gain, 1.25, *tol, *k, scale, offset, 60.0 / 1.3 - 20, 3000.0)
            expected = np.zeros((ty, tx), np.uint8)
            n_expected = flag_pixels(data, chan, blotted, sp_blotted, *args, expected, reach)
            assert (expected == FLAG_HIGH).sum() > (4 if k[1] < np.inf else -1)
            assert (expected == FLAG_LOW).sum() > (4 if k[0] < np.inf else -1)
            for use_matrix, xs, ys in ((True, empty, empty), (False, xr, yr)):
                out = np.zeros((ty, tx), np.uint8)
                geo = (wy0, wx0, mny, mnx, matrix, y0, x0, xs, ys, use_matrix, EDGE_REACH)
                tested = flag_window(data, chan, model, sp, not negative, geo, *args, out, reach)
                np.testing.assert_array_equal(out & 31, expected)
                np.testing.assert_array_equal((out & 32) != 0, data < 4000.0)  # may be flagged hot
                assert tested == n_expected
                checked += 1
    assert checked == 12 and 0.05 < np.isnan(own).mean() < 0.5


def _flags_from_the_rule(data, chan, model, spread, saturation, sky, noise2, inv_gain, factor, tol, k,
                         scale, offset, lo, hi):
    """Both passes of :func:`flag_pixels` written from its documented rule, every term at every pixel."""
    snr, der, sig, snr_g, der_g, sig_g = tol
    h, w = data.shape
    yy, xx = np.mgrid[:h, :w]
    b = model[chan, yy, xx].astype(np.float64)
    d = np.zeros((h, w))
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = np.clip(yy + dy, 0, h - 1), np.clip(xx + dx, 0, w - 1)
        inside = (yy + dy >= 0) & (yy + dy < h) & (xx + dx >= 0) & (xx + dx < w)
        nb = model[chan, ny, nx].astype(np.float64)
        d = np.where(inside & np.isfinite(nb), np.maximum(d, np.abs(b - nb)), d)
    above = np.maximum(b - sky[chan], 0.0)
    sigma = np.sqrt((noise2[chan] + above * inv_gain) * factor)
    sp = np.nan_to_num(spread[chan, yy, xx].astype(np.float64), nan=0.0)
    v = data.astype(np.float64)
    diff = (data - model[chan, yy, xx]).astype(np.float64)
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(v) & (v < saturation)
        vn = v * scale[chan] + offset[chan]
        ranged = usable & ((vn <= lo) | (vn >= hi))
        testable = usable & ~ranged & np.isfinite(b)
        kk = np.where(diff > 0, k[1], k[0])
        hit = testable & (np.abs(diff) > snr * sigma + der * d + sig * above + kk * sp)
    out = np.zeros((h, w), np.uint8)
    out[ranged] = FLAG_RANGE
    out[hit & (diff > 0)] = FLAG_HIGH
    out[hit & (diff < 0)] = FLAG_LOW
    if hit.any() and k[1] < np.inf:
        near = np.zeros((h + 2, w + 2), bool)
        for dy in range(3):
            for dx in range(3):
                near[dy:dy + h, dx:dx + w] |= hit
        grow_tol = (snr_g * sigma + der_g * d + sig_g * above).astype(np.float32)
        grown = near[1:-1, 1:-1] & testable & ~hit & (diff > grow_tol)
        out[grown] = FLAG_HIGH
    return out


@pytest.mark.parametrize("gain", [0.0, 0.5])
def test_flag_kernel_shortcut_keeps_the_documented_flags(gain):
    """flag_pixels skips most terms for pixels within snr * sigma of the model and computes the
    second pass's tolerances only at the neighbours of hits: the flags stay those of the full rule."""
    rng = np.random.default_rng(3)
    h, w = 96, 80
    chan = np.zeros((h, w), np.uint8)
    chan[::2, 1::2] = 1
    chan[1::2, ::2] = 1
    chan[1::2, 1::2] = 2
    model = (200 + 300 * rng.random((3, h, w)) ** 8).astype(np.float32)  # a few steep spots
    model[1, 10:14, 20:30] = np.nan
    spread = (rng.random((3, h, w)) * 4).astype(np.float32)
    spread[2, 40:50, :] = np.nan
    yy, xx = np.mgrid[:h, :w]
    data = (model[chan, yy, xx] + rng.normal(0, 10, (h, w))).astype(np.float32)
    hits = rng.random((h, w)) < 0.02
    data[hits] += rng.choice([-1, 1], hits.sum()) * rng.uniform(20, 150, hits.sum()).astype(np.float32)
    data[5, 5] = np.nan
    data[60, 60] = 5000.0  # saturated
    args = (data, chan, model, spread, 4000.0, np.array([200.0, 210.0, 190.0]), np.array([100.0, 90.0, 110.0]),
            gain, 1.25)
    norm = (np.array([1.0, 1.1, 0.9]), np.array([0.0, -5.0, 3.0]), 60.0, 3000.0)
    for tol, k in [((4.0, 1.2, 0.6, 3.0, 0.7, 0.4), (3.0, 3.0)), ((3.0, 0.5, 0.1, 2.0, 0.3, 0.05), (np.inf, 1.0)),
                   ((3.0, 0.5, 0.1, 2.0, 0.3, 0.05), (1.0, np.inf))]:
        out = np.zeros((h, w), np.uint8)
        flag_pixels(*args, *tol, *k, *norm, out)
        expected = _flags_from_the_rule(*args, tol, k, *norm)
        assert (expected == FLAG_HIGH).sum() > (4 if k[1] < np.inf else -1)
        assert (expected == FLAG_LOW).sum() > (4 if k[0] < np.inf else -1)
        np.testing.assert_array_equal(out, expected)
