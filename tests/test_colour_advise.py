"""The advisor on colour (Bayer) stores: each channel's samples are their own lattice, so
red and blue (a quarter of the pixels) run drier than green (half); the dry fractions
are predicted per channel with the drizzle's own kernels and channel index, checked
against the dry fractions real colour drizzles report, and the recommendation is judged
on the worst channel."""

from __future__ import annotations

import sys
import warnings

import pytest

import drizzlestack as ds
import drizzlestack.advise  # noqa: F401  (loads the module: ``drizzlestack.advise`` is the function)
from drizzlestack import DrizzlestackWarning
from drizzlestack.simulate import simulate
from drizzlestack.store import StackStore

from test_colour_drizzle import store_with_true_registration

advise_module = sys.modules["drizzlestack.advise"]


@pytest.fixture(scope="module")
def eight_frames(tmp_path_factory):
    """8 colour frames (GRBG, bottom-up rows), the simulator's true registration."""
    d = tmp_path_factory.mktemp("colour_advise")
    truth = simulate(d / "frames", n_frames=8, shape=(96, 112), n_stars=0, n_galaxies=0, n_saturated=0,
                     cosmic_rays=0, hot_pixels=0, trail=False, max_shift=4.0, max_rotation=0.3, seed=3,
                     cfa="GRBG", roworder="BOTTOM-UP", dtype="float32")
    return store_with_true_registration(truth, d / "stack.zarr")


def _geometry(store):
    stack, indices, mappings, weights = advise_module._registered(store, None, True)
    pattern, channel_weights = advise_module._colour(stack, indices)
    return mappings, weights, tuple(int(v) for v in stack.attrs["frame_shape"]), pattern, channel_weights


@pytest.mark.parametrize("scale, pixfrac", [(2.0, 0.7), (3.0, 0.6), (1.5, 0.5)])
def test_per_channel_dry_fractions_match_real_colour_drizzles(eight_frames, scale, pixfrac):
    mappings, weights, shape, pattern, cw = _geometry(eight_frames)
    assert pattern == "BGGR"  # GRBG read top-down: bottom-up rows of an even height swap the rows
    pred = advise_module.predict_weights(mappings, weights, shape, scale, [pixfrac], cfa_pattern=pattern,
                                         channel_weights=cw)[pixfrac]
    with pytest.warns(DrizzlestackWarning, match="dry fraction") as caught:
        ds.drizzle(eight_frames, scale=scale, pixfrac=pixfrac, output=None, tile=64, force=True,
                   align_channels=False)  # (the advisor predicts unshifted drops; true transforms: no stars)
    real = StackStore.open(eight_frames).step("drizzle")["summary"]["dry_fraction_rgb"]
    message = next(str(w.message) for w in caught if "dry fraction" in str(w.message))
    for c in "RGB":
        assert f"{c} {100 * real[c]:.1f} %" in message  # what the drizzle warned
    # The drizzle counts its whole output, edges where fewer frames overlap included; the
    # advisor's sample boxes lie between 8 % and 92 % of the field: compare the same part.
    w = ds.open_stack(eight_frames)["drizzle_weights"].values
    m = int(round(10 * scale))  # 10 reference px: beyond the dither (4 px) and the boxes' margin
    inner = {c: float((w[k, m:-m, m:-m] <= 0).mean()) for k, c in enumerate("RGB")}
    print(scale, pixfrac, "predicted", pred["dry_fraction_rgb"], "drizzle", real, "interior", inner)
    for c in "RGB":
        assert abs(pred["dry_fraction_rgb"][c] - inner[c]) <= 0.2 * max(inner[c], pred["dry_fraction_rgb"][c]) + 0.003
        assert pred["dry_fraction_rgb"][c] <= real[c] + 0.003  # the interior is never drier than the whole
    assert pred["dry_fraction"] == max(pred["dry_fraction_rgb"].values())
    # red and blue have a quarter of the samples: drier than green, and than all the
    # samples counted together (the prediction before it went per channel)
    together = advise_module.predict_weights(mappings, weights, shape, scale, [pixfrac])[pixfrac]
    assert max(real["R"], real["B"]) > max(real["G"], together["dry_fraction"]) + 0.01


def test_drizzle_warning_names_the_worst_channel(eight_frames):
    expected = r"worst colour channel \(predicted dry fraction per channel: R \d+\.\d%, G 0\.0%, B \d+\.\d%"
    with pytest.warns(DrizzlestackWarning, match=expected):
        advise_module.warn_drizzle_settings(eight_frames, 2.0, 0.7)


@pytest.fixture(scope="module")
def colour_stars(tmp_path_factory):
    """24 undersampled colour frames (FWHM 1.6 px), registered by drizzlestack: enough for
    an even weight map at small drops, where red and blue run dry first."""
    d = tmp_path_factory.mktemp("colour_advise_stars")
    truth = simulate(d / "frames", n_frames=24, shape=(128, 144), fwhm=1.6, n_stars=120, n_galaxies=0,
                     n_saturated=0, cosmic_rays=0, hot_pixels=0, trail=False, max_shift=4.0, max_rotation=0.3,
                     seed=11, cfa="RGGB", dtype="float32")
    ds.ingest(truth.files, d / "stack.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DrizzlestackWarning)
        ds.register(d / "stack.zarr")
    return d / "stack.zarr"


def test_recommendation_is_judged_on_the_worst_channel(colour_stars):
    a = ds.advise(colour_stars)
    print(advise_module.format_advice(a))
    assert a["cfa_pattern"] == "RGGB" and a["drizzle_helps"]
    rgb = a["predicted_dry_fraction_rgb"]
    assert a["predicted_dry_fraction"] == max(rgb.values()) <= advise_module.MAX_DRY_FRACTION
    assert a["predicted_weight_rms"] <= advise_module.MAX_WEIGHT_RMS
    # the rule: the next smaller pixfrac breaks a limit -- here only red's or blue's dry
    # fraction: its weight map is even enough, green has no dry pixel, and all the samples
    # counted together (the advisor before it went per channel) would have passed it
    mappings, weights, shape, pattern, cw = _geometry(colour_stars)
    smaller = [p for p in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9) if p < a["pixfrac"] - 1e-9]
    assert smaller  # 24 frames: a drop well below 1 still fills every channel
    p = max(smaller)
    pred = advise_module.predict_weights(mappings, weights, shape, a["scale"], [p], cfa_pattern=pattern,
                                         channel_weights=cw)[p]
    print(p, pred)
    limit = advise_module.MAX_DRY_FRACTION
    assert pred["weight_rms"] <= advise_module.MAX_WEIGHT_RMS
    assert max(pred["dry_fraction_rgb"]["R"], pred["dry_fraction_rgb"]["B"]) > limit >= pred["dry_fraction_rgb"]["G"]
    together = advise_module.predict_weights(mappings, weights, shape, a["scale"], [p])[p]
    assert together["dry_fraction"] <= limit and together["weight_rms"] == pytest.approx(pred["weight_rms"])
    text = advise_module.format_advice(a)
    assert "dry R/G/B[%]" in text and "worst channel" in text
    row = next(r for r in a["predictions"] if (r["scale"], r["pixfrac"]) == (a["scale"], a["pixfrac"]))
    assert row["dry_fraction_rgb"] == rgb
