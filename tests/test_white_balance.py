"""White balance of colour drizzles (drizzlestack.whitebalance): ``none`` leaves today's
drizzle alone, ``neutral`` brings every channel's sky to green's from the integration's
per-channel sky, ``camera`` applies a raw file's as-shot multipliers, both as gains about
the black levels folded into the per-channel normalization."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

import drizzlestack as ds
from drizzlestack.simulate import simulate
from drizzlestack.store import StackStore

from test_cfa import write_dng
from test_colour_drizzle import SCALE, _isolated, _measure, store_with_true_registration

FIELD = dict(n_frames=10, shape=(96, 112), fwhm=2.0, n_stars=45, flux_min=2e4, flux_max=2e5, n_galaxies=0,
             n_saturated=0, cosmic_rays=0, hot_pixels=0, trail=False, max_shift=4.0, max_rotation=0.3, seed=9,
             dtype="float32")


def _drizzle(store, output, **kw):
    with pytest.warns(ds.DrizzlestackWarning, match="dry fraction"):
        # (the true transforms are written in: no star catalogue to align the channels on)
        result = ds.drizzle(store, scale=SCALE, pixfrac=0.8, output=output, tile=64, align_channels=False, **kw)
    return result["drizzle"].values.copy()  # the store's variable is overwritten by the next drizzle


@pytest.fixture(scope="module")
def neutral_field(tmp_path_factory):
    d = tmp_path_factory.mktemp("wb_neutral")
    truth = simulate(d / "frames", cfa="RGGB", **FIELD)
    store = store_with_true_registration(truth, d / "stack.zarr")
    ds.integrate(store, align_channels=False)  # (true transforms written in: no star catalogue)
    none = _drizzle(store, d / "none.fits")
    finished = StackStore.open(store).step("drizzle")["finished"]
    neutral = _drizzle(store, d / "neutral.fits", white_balance="neutral")
    return truth, store, none, neutral, finished, d


def test_neutral_brings_each_channel_sky_to_greens(neutral_field):
    truth, store, none, neutral, _, d = neutral_field
    with fits.open(d / "neutral.fits") as h:
        header = h[0].header
        gains = np.array([header["WBR"], header["WBG"], header["WBB"]])
        assert header["WBALANCE"] == "neutral"
    # the simulator's sky colour is (0.8, 1.0, 0.6) of green's: the gains undo it
    sky = truth.channel_sky[0]
    np.testing.assert_allclose(gains, sky[1] / sky, rtol=0.01)
    # the sky: output pixels away from the edges and more than 6 px from every star
    yy, xx = np.mgrid[0:none.shape[1], 0:none.shape[2]]
    xr, yr = (xx + 0.5) / SCALE - 0.5, (yy + 0.5) / SCALE - 0.5
    far = np.ones(xx.shape, bool)
    for x, y in zip(truth.stars["x"], truth.stars["y"]):
        far &= np.hypot(xr - x, yr - y) > 6
    far &= (xr > 8) & (xr < truth.config.shape[1] - 9) & (yr > 8) & (yr < truth.config.shape[0] - 9)
    before = np.array([np.nanmedian(p[far]) for p in none])
    after = np.array([np.nanmedian(p[far]) for p in neutral])
    # error of a median of N samples of noise sigma: 1.25 sigma / sqrt(N); red and blue
    # have a quarter of the samples, N = their raw samples under the sky pixels
    n = far.sum() / SCALE**2 / 4 * truth.config.n_frames
    noise = 1.25 * np.sqrt(sky[1] / truth.config.gain + truth.config.read_noise ** 2) / np.sqrt(n)
    print("sky before", before, "after", after, "noise", noise, "pixels", far.sum())
    assert np.all(np.abs(after - after[1]) < 4 * noise), after
    assert np.all(np.abs(before[[0, 2]] - before[1]) > 100 * noise)  # the check can fail: unbalanced


def test_neutral_is_a_gain_per_channel_and_leaves_green_alone(neutral_field):
    """No black level in the simulation: balanced = gain x unbalanced, pixel by pixel;
    green (the reference) bit-identical."""
    _, _, none, neutral, _, d = neutral_field
    with fits.open(d / "neutral.fits") as h:
        gains = [h[0].header[f"WB{c}"] for c in "RGB"]
    assert np.array_equal(neutral[1], none[1], equal_nan=True)
    for c in (0, 2):
        np.testing.assert_allclose(neutral[c], gains[c] * none[c], rtol=2e-6, equal_nan=True)


def test_neutral_keeps_star_colours_up_to_the_gains(neutral_field):
    truth, store, none, neutral, _, d = neutral_field
    with fits.open(d / "neutral.fits") as h:
        gains = np.array([h[0].header[f"WB{c}"] for c in "RGB"])
    sky_none = truth.channel_sky[0]
    sky_neutral = sky_none * gains
    for c, name in ((0, "R"), (2, "B")):
        true = [truth.stars[f"flux_{name}"][k] / truth.stars["flux_G"][k] for k in _isolated(truth)]
        raw = [_measure(none[c], truth, sky_none[c], k)[0] / _measure(none[1], truth, sky_none[1], k)[0]
               for k in _isolated(truth)]
        bal = [_measure(neutral[c], truth, sky_neutral[c], k)[0] / _measure(neutral[1], truth, sky_neutral[1], k)[0]
               for k in _isolated(truth)]
        true, raw, bal = map(np.asarray, (true, raw, bal))
        assert len(true) >= 8
        # unbalanced: the truth's colours; balanced: the same times the gain
        assert np.all(np.abs(raw / true - 1) < 0.03), name
        assert np.all(np.abs(bal / (gains[c] * true) - 1) < 0.03), name


def test_none_keeps_the_unbalanced_drizzle_and_a_changed_balance_reruns(neutral_field):
    truth, store, none, neutral, finished, d = neutral_field
    st = StackStore.open(store)
    # neutral reran the drizzle and recorded its balance; 'none' is not in the
    # parameters, so every drizzle made before the option stays current
    assert st.step("drizzle")["params"]["white_balance"] == "neutral"
    before = st.step("drizzle")["digest"]
    with pytest.warns(ds.DrizzlestackWarning, match="dry fraction"):
        again = ds.drizzle(store, scale=SCALE, pixfrac=0.8, output=d / "none.fits", tile=64, overwrite=True,
                           white_balance="none", align_channels=False)["drizzle"].values
    rec = StackStore.open(store).step("drizzle")
    # rerun: another parameter digest (the stamps have whole seconds: both runs can share one)
    assert "white_balance" not in rec["params"] and rec["digest"] != before and rec.get("complete")
    assert np.array_equal(again, none, equal_nan=True)
    with fits.open(d / "none.fits") as h:
        assert h[0].header["WBALANCE"] == "none" and "WBR" not in h[0].header


def test_camera_balance_is_refused_for_fits_frames_naming_them(neutral_field):
    truth, store, *_ = neutral_field
    with pytest.raises(ds.DrizzlestackError, match=r"white_balance='camera'.*frame\(s\) 0 \(.*\.fits\), 1"):
        ds.drizzle(store, scale=SCALE, output=None, white_balance="camera")


def test_white_balance_on_a_grey_store_is_refused_naming_the_parameter(small_sim, tmp_path):
    from conftest import register_with_truth

    store = tmp_path / "grey.zarr"
    ds.ingest(small_sim.files[:3], store)
    register_with_truth(store, small_sim)
    for method in ("neutral", "camera"):
        with pytest.raises(ds.DrizzlestackError, match=f"white_balance='{method}'.*grey"):
            ds.drizzle(store, output=None, white_balance=method)
    with pytest.raises(ds.DrizzlestackError, match="white_balance='auto': unknown"):
        ds.drizzle(store, output=None, white_balance="auto")


def test_neutral_needs_the_integration(tmp_path):
    truth = simulate(tmp_path / "frames", n_frames=3, shape=(32, 40), n_stars=0, n_galaxies=0, n_saturated=0,
                     cosmic_rays=0, hot_pixels=0, trail=False, seed=2, cfa="GBRG", dtype="float32")
    store = store_with_true_registration(truth, tmp_path / "stack.zarr")
    with pytest.raises(ds.DrizzlestackError, match="white_balance='neutral'.*integrate"):
        ds.drizzle(store, output=None, white_balance="neutral")


# ------------------------------------------------------------------ camera raw
BLACK = {"R": 60.0, "G": 64.0, "B": 70.0}
NEUTRAL = (0.5, 1.0, 0.625)  # AsShotNeutral: multipliers 2, 1, 1.6


def test_camera_balance_uses_the_raw_files_multipliers_exactly(tmp_path):
    rawpy = pytest.importorskip("rawpy")
    truth = simulate(tmp_path / "frames", n_frames=6, shape=(64, 72), n_stars=20, flux_min=2e3, flux_max=2e4,
                     n_galaxies=0, n_saturated=0, cosmic_rays=0, hot_pixels=0, trail=False, max_shift=3.0,
                     max_rotation=0.3, seed=6, cfa="RGGB", sky=1000.0, dtype="float32")
    pattern = "RGGB"
    dngs = []
    for i, f in enumerate(truth.files):
        with fits.open(f) as h:
            data = h[0].data.astype(np.float64)
        black_map = np.vectorize(BLACK.get)(np.array(list(pattern)).reshape(2, 2))
        mosaic = data + np.tile(black_map, (data.shape[0] // 2, data.shape[1] // 2))
        dngs.append(write_dng(tmp_path / f"f{i}.dng", np.clip(np.round(mosaic), 0, 4095), pattern,
                              black=tuple(int(BLACK[c]) for c in pattern), as_shot_neutral=NEUTRAL))
    with rawpy.imread(str(dngs[0])) as raw:
        mul = [float(v) for v in raw.camera_whitebalance]  # by colour index R, G, B, G2
    gains = np.array([mul[0], mul[1], mul[2]]) / mul[1]
    assert gains == pytest.approx([2.0, 1.0, 1.6], rel=1e-6)  # the file holds what was written

    truth.files = dngs
    store = store_with_true_registration(truth, tmp_path / "raw.zarr")
    assert ds.open_stack(store).black_level.values[0].tolist() == [BLACK[c] for c in "RGB"]
    none = _drizzle(store, tmp_path / "none.fits")
    camera = _drizzle(store, tmp_path / "camera.fits", white_balance="camera")
    with fits.open(tmp_path / "camera.fits") as h:
        header = h[0].header
        assert header["WBALANCE"] == "camera"
        assert [header[f"WB{c}"] for c in "RGB"] == gains.tolist()  # exactly the file's multipliers
    # no integration: each frame in its own units, balanced about its own black levels
    assert np.array_equal(camera[1], none[1], equal_nan=True)
    for c, name in ((0, "R"), (2, "B")):
        expected = (none[c] - BLACK[name]) * gains[c] + BLACK["G"]
        np.testing.assert_allclose(camera[c], expected, rtol=2e-6, atol=1e-3, equal_nan=True)


def test_raw_ingest_records_the_multipliers_only_when_the_camera_did(tmp_path):
    pytest.importorskip("rawpy")
    from drizzlestack.io import read_any
    from drizzlestack.whitebalance import camera_multipliers

    data = np.full((24, 26), 500, np.uint16)
    with_wb = read_any(write_dng(tmp_path / "a.dng", data, "GBRG", as_shot_neutral=NEUTRAL))
    without = read_any(write_dng(tmp_path / "b.dng", data, "GBRG"))
    np.testing.assert_allclose(camera_multipliers(with_wb.header.tostring(sep="\n")), [2.0, 1.0, 1.6], rtol=1e-6)
    assert camera_multipliers(without.header.tostring(sep="\n")) is None
    assert "CAMWBR" not in without.header


def test_cli_and_config_take_the_white_balance(neutral_field, capsys):
    from drizzlestack.cli import main as cli_main
    from drizzlestack.config import load_config

    _, store, _, neutral, _, d = neutral_field
    with pytest.warns(ds.DrizzlestackWarning, match="dry fraction"):
        assert cli_main(["drizzle", str(store), "--scale", "2", "--pixfrac", "0.8", "--tile", "64",
                         "--white-balance", "neutral", "--no-align-channels", "-o", str(d / "cli.fits"),
                         "--no-progress"]) == 0
    with fits.open(d / "cli.fits") as h:
        assert h[0].header["WBALANCE"] == "neutral"
        np.testing.assert_array_equal(h[0].data, neutral.astype(np.float32))
    with pytest.raises(SystemExit):
        cli_main(["drizzle", str(store), "--white-balance", "auto"])
    assert "invalid choice: 'auto'" in capsys.readouterr().err
    cfg = load_config(None, ["drizzle.white_balance=camera"])
    assert cfg.drizzle.white_balance == "camera"
    assert cfg.drizzle.align_channels is True
    assert load_config(None, ["drizzle.align_channels=false"]).drizzle.align_channels is False


# --------------------------------------------------------------- the integration FITS
def test_the_integration_fits_takes_the_white_balance_and_the_store_keeps_its_raw_colours(neutral_field, tmp_path):
    truth, store, _, _, _, d = neutral_field
    before = StackStore.open(store).step("integrate")
    stack = ds.integrate(store, output=tmp_path / "neutral.fits", white_balance="neutral", align_channels=False)
    raw = stack["integration"].values
    with fits.open(tmp_path / "neutral.fits") as h:
        header, image = h[0].header, h[0].data.astype(np.float64)
    with fits.open(d / "neutral.fits") as h:  # the neutral drizzle's gains
        drizzle_gains = [h[0].header[f"WB{c}"] for c in "RGB"]
    assert header["WBALANCE"] == "neutral"
    gains = [header[f"WB{c}"] for c in "RGB"]
    assert gains == drizzle_gains
    sky = truth.channel_sky[0]
    np.testing.assert_allclose(gains, sky[1] / sky, rtol=0.01)
    # no black level in the simulation: balanced = gain x the store's integration; green as it is
    np.testing.assert_array_equal(image[1], raw[1].astype(np.float32))
    for c in (0, 2):
        np.testing.assert_allclose(image[c], gains[c] * raw[c], rtol=2e-6, equal_nan=True)
    # the FITS alone was rewritten: the store's integration is the same run, unbalanced
    assert StackStore.open(store).step("integrate")["finished"] == before["finished"]
    unbalanced = ds.integrate(store, output=tmp_path / "none.fits", align_channels=False)
    with fits.open(tmp_path / "none.fits") as h:
        assert h[0].header["WBALANCE"] == "none"
        np.testing.assert_array_equal(h[0].data, unbalanced["integration"].values.astype(np.float32))


def test_integrate_refuses_an_impossible_white_balance_before_any_work(neutral_field, small_sim, tmp_path):
    from conftest import register_with_truth

    _, store, _, _, _, _ = neutral_field
    before = StackStore.open(store).step("integrate")
    with pytest.raises(ds.DrizzlestackError, match=r"white_balance='camera'.*frame\(s\) 0 \(.*\.fits\)"):
        ds.integrate(store, output=tmp_path / "x.fits", white_balance="camera", force=True, align_channels=False)
    assert StackStore.open(store).step("integrate") == before
    assert not (tmp_path / "x.fits").exists()
    grey = tmp_path / "grey.zarr"
    ds.ingest(small_sim.files[:3], grey)
    register_with_truth(grey, small_sim)
    with pytest.raises(ds.DrizzlestackError, match="white_balance='neutral'.*grey"):
        ds.integrate(grey, white_balance="neutral")
    assert "integrate" not in StackStore.open(grey).attrs.get("steps", {})
