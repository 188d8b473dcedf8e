"""The advisor (``drizzlestack advise``): sampling, dither, dry-pixel predictions against
real drizzles, the noise-correlation ratio against drizzled noise, real frames."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest

import drizzlestack as ds
from drizzlestack import DrizzlestackWarning
from drizzlestack.cli import main as cli_main
from drizzlestack.simulate import simulate

advise_module = sys.modules["drizzlestack.advise"]  # ``drizzlestack.advise`` is the function

SHAPE = (160, 160)


def _registered_sim(tmp_path_factory, name, **options):
    d = tmp_path_factory.mktemp(name)
    truth = simulate(d / "frames", shape=SHAPE, n_stars=150, n_galaxies=1, trail=False, **options)
    store = d / "stack.zarr"
    ds.ingest(truth.files, store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DrizzlestackWarning)
        ds.register(store)
    return truth, store


@pytest.fixture(scope="module")
def undersampled(tmp_path_factory):
    """12 frames, FWHM 1.5 px, random sub-pixel dithers and small rotations."""
    return _registered_sim(tmp_path_factory, "under", n_frames=12, fwhm=1.5, seed=3)


@pytest.fixture(scope="module")
def few_frames(tmp_path_factory):
    """5 undersampled frames: small drops leave dry pixels."""
    return _registered_sim(tmp_path_factory, "few", n_frames=5, fwhm=1.5, seed=5)


def _interior(weights, scale, margin=10):
    """Output pixels at least ``margin`` reference pixels from the edges (every frame
    covers them: the simulator dithers by at most 6 px)."""
    m = int(round(margin * scale))
    return weights[m:-m, m:-m]


def _drizzled_weights(store, scale, pixfrac):
    return ds.drizzle(store, scale=scale, pixfrac=pixfrac, output=None, rejection=False,
                      tile=1024)["drizzle_weights"].values


def test_well_sampled_field_gets_no_drizzle(tmp_path_factory):
    _, store = _registered_sim(tmp_path_factory, "well", n_frames=8, fwhm=3.5, seed=4)
    a = ds.advise(store)
    assert a["drizzle_helps"] is False
    assert 3.2 < a["fwhm"] < 3.8  # the simulator's 3.5 px, measured by the registration's fits
    assert a["undersampled"] is False
    assert any("well sampled" in r for r in a["reasons"])


def test_whole_pixel_dithers_without_rotation_get_no_drizzle(tmp_path_factory):
    _, store = _registered_sim(tmp_path_factory, "whole", n_frames=8, fwhm=1.5, seed=6, whole_pixel_dither=True,
                               max_rotation=0.0)
    a = ds.advise(store)
    assert a["undersampled"] is True  # drizzle is refused for the dither alone
    assert a["drizzle_helps"] is False
    assert a["dither"]["clustered"] is True
    assert any("Whole-pixel dithering" in r for r in a["reasons"])
    # the same field read by `drizzlestack drizzle`: it warns that drizzle cannot gain
    with pytest.warns(DrizzlestackWarning, match="whole-pixel or no dithering"):
        advise_module.warn_drizzle_settings(store, 2.0, 0.9)


def test_undersampled_dithered_field_recommendation_matches_its_drizzle(undersampled):
    truth, store = undersampled
    a = ds.advise(store)
    assert a["drizzle_helps"] is True
    assert abs(a["fwhm"] - truth.config.fwhm) < 0.1
    assert a["predicted_dry_fraction"] <= 0.01
    w = _interior(_drizzled_weights(store, a["scale"], a["pixfrac"]), a["scale"])
    dry = float((w <= 0).mean())
    assert dry <= 2 * a["predicted_dry_fraction"] + 0.002
    assert a["predicted_dry_fraction"] <= 2 * dry + 0.002
    # the weight map's uniformity is what bounds the pixfrac here: check it too
    wet = w[w > 0]
    measured_rms = wet.std() / np.median(wet)
    assert a["predicted_weight_rms"] == pytest.approx(measured_rms, rel=0.3)
    assert a["predicted_weight_rms"] <= advise_module.MAX_WEIGHT_RMS
    # the rule: the next smaller pixfrac breaks a limit (or none is left to try)
    smaller = [p for p in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9) if p < a["pixfrac"] - 1e-9]
    if smaller:
        p = max(smaller)
        pred = advise_module.predict_weights(*_geometry(store), a["scale"], [p])[p]
        assert pred["dry_fraction"] > 0.01 or pred["weight_rms"] > advise_module.MAX_WEIGHT_RMS


def _geometry(store):
    stack, _indices, mappings, weights = advise_module._registered(store, None, True)
    return mappings, weights, tuple(stack.attrs["frame_shape"])


@pytest.mark.parametrize("scale, pixfrac", [(3.0, 0.3), (3.0, 0.5), (2.0, 0.3), (2.0, 0.6)])
def test_predictions_match_real_drizzles(few_frames, scale, pixfrac):
    _, store = few_frames
    pred = advise_module.predict_weights(*_geometry(store), scale, [pixfrac])[pixfrac]
    w = _interior(_drizzled_weights(store, scale, pixfrac), scale)
    dry = float((w <= 0).mean())
    assert dry <= 2 * pred["dry_fraction"] + 0.002
    assert pred["dry_fraction"] <= 2 * dry + 0.002
    wet = w[w > 0]
    assert pred["weight_rms"] == pytest.approx(wet.std() / np.median(wet), rel=0.3)


def test_small_drops_on_few_frames_are_predicted_dry(few_frames):
    """The case the dry-pixel warning exists for (and a non-zero prediction checked
    against a real drizzle in test_predictions_match_real_drizzles)."""
    _, store = few_frames
    pred = advise_module.predict_weights(*_geometry(store), 3.0, [0.3])[0.3]
    assert pred["dry_fraction"] > 0.02
    with pytest.warns(DrizzlestackWarning, match="dry"):
        advise_module.warn_drizzle_settings(store, 3.0, 0.3)
    a = ds.advise(store)
    assert a["predicted_dry_fraction"] <= 0.01
    table = {(p["scale"], p["pixfrac"]) for p in a["predictions"]}
    assert {(s, p) for s in (2.0, 3.0) for p in (0.6, 0.7, 0.8, 0.9, 1.0)} <= table


def test_good_settings_do_not_warn(undersampled):
    _, store = undersampled
    with warnings.catch_warnings():
        warnings.simplefilter("error", DrizzlestackWarning)
        advise_module.warn_drizzle_settings(store, 2.0, 0.9)


def test_noise_correlation_ratio_matches_drizzled_white_noise():
    """F&H 2002's R against pure noise drizzled from 8 frames at random sub-pixel phases
    (a dithered stack; one frame's R depends on its phase): R^2 = variance of block sums
    / (pixels per block x per-pixel variance), and the per-pixel noise the advisor
    reports, scale / R times the noise of one input pixel over sqrt(frames)."""
    from drizzlestack.drizzle.array import accumulate, finalize

    rng = np.random.default_rng(2)
    n, frames, b = 160, 8, 12
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    for scale, pixfrac in ((2.0, 0.6), (2.0, 1.0), (3.0, 0.8), (3.0, 0.5)):
        shape = (int(scale * n),) * 2
        wv, w = np.zeros(shape), np.zeros(shape)
        for _ in range(frames):
            dx, dy = rng.uniform(size=2)
            pixmap = np.stack([scale * (xx + dx + 0.5) - 0.5, scale * (yy + dy + 0.5) - 0.5], axis=-1)
            accumulate(rng.normal(size=(n, n)), pixmap, None, wv, w, pixfrac=pixfrac)
        img = finalize(wv, w)
        m = int(scale * 10)
        h = (shape[0] - 2 * m) // b * b
        core = img[m:m + h, m:m + h]
        assert np.isfinite(core).all()
        blocks = core.reshape(h // b, b, h // b, b).sum(axis=(1, 3))
        measured = np.sqrt(blocks.var() / (b * b * core.var()))
        r = advise_module.noise_correlation_ratio(scale, pixfrac)
        assert r == pytest.approx(measured, rel=0.12), (scale, pixfrac)
        assert core.std() * np.sqrt(frames) == pytest.approx(scale / r, rel=0.12), (scale, pixfrac)


def test_advise_json_cli(undersampled, capsys):
    _, store = undersampled
    assert cli_main(["advise", str(store), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("drizzle_helps", "scale", "pixfrac", "predicted_dry_fraction", "fwhm", "reasons"):
        assert key in out
    assert isinstance(out["reasons"], list) and all(isinstance(r, str) for r in out["reasons"])
    assert out["drizzle_helps"] is True
    assert cli_main(["advise", str(store)]) == 0
    assert "drizzle helps: yes" in capsys.readouterr().out


def test_advise_refuses_an_unregistered_store(tmp_path, small_sim):
    store = tmp_path / "s.zarr"
    ds.ingest(small_sim.files[:2], store)
    with pytest.raises(ds.DrizzlestackError, match="not registered"):
        ds.advise(store)


def test_report_shows_the_advice_next_to_the_dither(undersampled, tmp_path):
    _, store = undersampled
    page = ds.write_report(store, tmp_path / "report").read_text()
    dither = page.index("dither.png")
    advice = page.index("Advice: drizzle helps")
    assert 0 < advice - dither < 5000
    assert "Recommended: scale" in page


# ====================================================================== real frames
@pytest.fixture(scope="module")
def hatp32_store(tmp_path_factory):
    from conftest import SHARED_DATA

    files = sorted((SHARED_DATA / "hatp32").glob("*.fits.gz"))
    if len(files) < 40:
        pytest.skip("real frames not available (../shared/data/hatp32)")
    store = tmp_path_factory.mktemp("hatp32") / "stack.zarr"
    ds.ingest([files[i] for i in range(0, 40, 4)], store)  # 10 frames over the whole drift
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DrizzlestackWarning)
        ds.register(store)
    return store


def test_real_frames_get_a_sensible_answer(hatp32_store):
    a = ds.advise(hatp32_store)
    print(advise_module.format_advice(a))
    # about 2 px: at the border between under- and critically sampled
    assert 1.5 < a["fwhm"] < 2.6
    if a["fwhm"] < advise_module.UNDERSAMPLED_FWHM:
        assert a["drizzle_helps"] is True
        assert any("close to critical sampling" in r for r in a["reasons"])
    else:
        assert a["drizzle_helps"] is False
        assert any("borderline" in r for r in a["reasons"])
    # natural drift and rotation: a real sub-pixel dither, not clustered
    assert a["dither"]["clustered"] is False
    assert a["dither"]["occupancy"]["2"] >= 0.75
    assert a["predicted_dry_fraction"] <= 0.01
    assert a["scale"] == 2.0


def test_drizzle_command_warns_before_leaving_dry_pixels(few_frames, tmp_path):
    _, store = few_frames
    with pytest.warns(DrizzlestackWarning, match="dry"):
        assert cli_main(["drizzle", str(store), "--scale", "3", "--pixfrac", "0.3", "--tile", "256",
                         "-o", str(tmp_path / "d.fits"), "--no-progress"]) == 0
