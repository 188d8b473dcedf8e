"""Pixel rejection across the frame axis (drizzlestack.integration.rejection).

Checked against astropy's ``sigma_clip`` (exact mask equality), against plain reference
implementations (ESD, winsorization), and on synthetic stacks with planted defects whose
positions are known: cosmic rays, dead pixels, a satellite trail, saturated star cores.
"""

from __future__ import annotations

import itertools
import warnings

import dask.array as da
import numpy as np
import pytest
from astropy.stats import sigma_clip
from scipy.stats import t as student_t

from drizzlestack._warnings import DrizzlestackError
from drizzlestack.integration.rejection import flags as rej_flags
from drizzlestack.integration.rejection import sorting as rej_sorting
from drizzlestack.integration.rejection import (
    FLAG_HIGH,
    FLAG_LOW,
    FLAG_RANGE,
    METHODS,
    combine_flagged,
    combine_stack,
    reject_stack,
    rejection_flags,
)

from conftest import raise_if_dask_computes

SATURATION = 1000.0


def astropy_mask(stack, low, high, maxiters=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Input data contains invalid values"
        return sigma_clip(
            stack, axis=0, sigma_lower=low, sigma_upper=high, maxiters=maxiters, cenfunc="median", stdfunc="std"
        ).mask


def noisy_stack(rng, n=20, shape=(40, 70), outliers=0.03, nans=0.02):
    """Gaussian frames with bright and dark outliers, NaNs and a few infinities."""
    stack = rng.normal(100.0, 5.0, (n, *shape)).astype(np.float32)
    stack[rng.random(stack.shape) < outliers] += np.float32(400.0)
    stack[rng.random(stack.shape) < outliers / 2] -= np.float32(300.0)
    stack[rng.random(stack.shape) < nans] = np.nan
    stack[0, 0, :3] = [np.inf, -np.inf, np.nan]
    return stack


class Planted:
    """A synthetic stack of 20 frames with known defects (positions are (frame, y, x))."""

    def __init__(self, seed=1, n=20, shape=(48, 80)):
        rng = np.random.default_rng(seed)
        ny, nx = shape
        yy, xx = np.mgrid[0:ny, 0:nx]
        sky = 100.0
        star = 700.0 * np.exp(-((xx - 20.0) ** 2 + (yy - 30.0) ** 2) / (2 * 2.0**2))
        # A bright star whose core saturates in every frame, its wings in some.
        bright = 5000.0 * np.exp(-((xx - 55.0) ** 2 + (yy - 20.0) ** 2) / (2 * 2.5**2))
        clean = sky + star + bright
        stack = np.empty((n, ny, nx), np.float32)
        for f in range(n):
            gain = rng.uniform(0.85, 1.15)  # seeing / transparency: wings saturate in some frames
            noise = rng.normal(0.0, np.sqrt(np.maximum(sky + star, 1.0)))
            stack[f] = np.minimum(sky + star + gain * bright + noise, SATURATION)
        self.clean = clean
        self.saturated = stack >= SATURATION
        self.core = self.saturated.all(axis=0)  # saturated in every frame
        free = ~self.saturated
        self.cosmic = np.zeros(stack.shape, bool)
        self.dead = np.zeros(stack.shape, bool)
        self.trail = np.zeros(stack.shape, bool)
        # Cosmic rays: bright single-frame hits, at most one per pixel, off the stars.
        off_star = (star < 5) & (bright < 5)
        idx = np.flatnonzero(off_star)
        for p in rng.choice(idx, 60, replace=False):
            y, x = divmod(int(p), nx)
            f = rng.integers(n)
            stack[f, y, x] += rng.uniform(300, 800)
            self.cosmic[f, y, x] = True
        # Dead pixels: zero in one frame (columns away from the cosmic rays).
        for p in rng.choice(idx, 40, replace=False):
            y, x = divmod(int(p), nx)
            if self.cosmic[:, y, x].any():
                continue
            f = rng.integers(n)
            stack[f, y, x] = 0.0
            self.dead[f, y, x] = True
        # A satellite trail across frame 7 (a bright line, 1 px wide).
        for x in range(nx):
            y = int(round(5 + 0.4 * x))
            if 0 <= y < ny and off_star[y, x] and not (self.cosmic[:, y, x].any() or self.dead[:, y, x].any()):
                stack[7, y, x] += 250.0
                self.trail[7, y, x] = True
        assert not (self.saturated & (self.cosmic | self.dead | self.trail)).any()
        self.stack = stack
        self.free = free & ~(self.cosmic | self.dead | self.trail)

    def check(self, flags, min_recall=1.0, max_false=0.02, trail_recall=0.9):
        """Planted defects flagged on the right side; little else rejected."""
        assert flags.dtype == np.uint8 and flags.shape == self.stack.shape
        assert np.mean(flags[self.cosmic] == FLAG_HIGH) >= min_recall
        assert np.mean(flags[self.dead] == FLAG_LOW) >= min_recall
        assert np.mean(flags[self.trail] == FLAG_HIGH) >= trail_recall
        assert not flags[self.saturated].any(), "a saturated value was flagged"
        assert np.mean(flags[self.free] != 0) <= max_false


@pytest.fixture(scope="module")
def planted():
    return Planted()


# --------------------------------------------------------------------------------------
# Equivalence with astropy
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [20, 15])
def test_sigma_matches_astropy_with_outliers_and_nans(n):
    rng = np.random.default_rng(n)
    stack = noisy_stack(rng, n=n)
    for low, high in [(3.0, 3.0), (2.0, 2.5), (1.5, 1.0), (0.7, 0.4)]:
        ours = reject_stack(stack, method="sigma", low=low, high=high)
        assert ours.dtype == np.bool_
        np.testing.assert_array_equal(ours, astropy_mask(stack, low, high), err_msg=f"low={low} high={high}")


@pytest.mark.parametrize("maxiters", [1, 2])
def test_sigma_matches_astropy_with_maxiters(maxiters):
    stack = noisy_stack(np.random.default_rng(3))
    ours = reject_stack(stack, method="sigma", low=1.5, high=1.5, max_iterations=maxiters)
    np.testing.assert_array_equal(ours, astropy_mask(stack, 1.5, 1.5, maxiters=maxiters))


def test_sigma_matches_astropy_on_quantized_data_with_ties():
    """Small integers: many values sit exactly on a clipping bound, and the sums of the
    two implementations could round differently there; the replica must take over."""
    rng = np.random.default_rng(11)
    stack = rng.integers(0, 5, (12, 50, 64)).astype(np.float32)
    stack[rng.random(stack.shape) < 0.05] = 40.0
    stack[:, 0, :] = 7.0  # constant pixels: std 0, nothing clipped
    stack[:6, 1, :] = np.nan
    for low, high in [(1.0, 1.0), (2.0, 2.0), (0.5, 1.5)]:
        np.testing.assert_array_equal(
            reject_stack(stack, method="sigma", low=low, high=high), astropy_mask(stack, low, high)
        )


def test_astropy_replica_gives_bit_identical_bounds():
    """The fallback replica reproduces astropy's bounds exactly, including the order
    in which its selection permutes the buffer (it decides the summation order)."""
    rng = np.random.default_rng(5)
    for n in (4, 5, 20, 21):
        cols = rng.normal(100, 3, (n, 3000)).astype(np.float32)
        cols[rng.random(cols.shape) < 0.05] = 500
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, lo, hi = sigma_clip(
                cols, axis=0, sigma_lower=2.0, sigma_upper=2.5, maxiters=None,
                cenfunc="median", stdfunc="std", return_bounds=True,
            )  # fmt: skip
        for j in range(0, cols.shape[1], 7):
            buf = cols[:, j].astype(np.float64)
            ours = rej_sorting._astropy_sigma_bounds(buf, n, 2.0, 2.5, True, True, 0)
            assert ours == (lo[j], hi[j])


# --------------------------------------------------------------------------------------
# Every method on planted defects
# --------------------------------------------------------------------------------------

METHOD_PARAMS = {
    "sigma": dict(low=3.0, high=3.0),
    "winsorized": dict(low=4.0, high=3.0),
    "averaged": dict(low=4.0, high=3.0),
    "linear": dict(low=5.0, high=3.0),
    "esd": dict(),
    "percentile": dict(low=0.5, high=0.5),
    "minmax": dict(n_low=1, n_high=1),
}


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_method_finds_planted_defects(planted, method):
    flags = rejection_flags(planted.stack, method=method, saturation=SATURATION, **METHOD_PARAMS[method])
    if method == "minmax":
        # Exactly one low and one high per pixel where at least three values are free.
        free = (~planted.saturated).sum(axis=0)
        assert np.all((flags == FLAG_LOW).sum(axis=0)[free >= 3] == 1)
        assert np.all((flags == FLAG_HIGH).sum(axis=0)[free >= 3] == 1)
        planted.check(flags, max_false=2 / 20)
    else:
        planted.check(flags)


def test_none_rejects_only_invalid(planted):
    stack = planted.stack.copy()
    stack[3, 4, 5] = np.nan
    flags = rejection_flags(stack, method="none")
    assert flags[3, 4, 5] == FLAG_RANGE
    assert np.count_nonzero(flags) == 1


def test_saturated_cores_are_kept_and_stay_saturated(planted):
    """Saturated values are never flagged (not even by range_high at the saturation
    level), and where every frame is saturated the integration is the saturation
    level: no black, no hollow star cores."""
    assert planted.core.sum() >= 5
    for method in ("winsorized", "sigma", "esd", "minmax"):
        flags = rejection_flags(
            planted.stack, method=method, saturation=SATURATION, range_high=SATURATION, **METHOD_PARAMS[method]
        )
        assert not flags[planted.saturated].any(), method
        image, _, _ = combine_stack(planted.stack, flags)
        np.testing.assert_array_equal(image[planted.core], np.float32(SATURATION))
        # Not hollow: along the row through the bright star, the integration rises to
        # the core and falls after it.
        row = image[20, 45:66].astype(np.float64)
        peak = int(np.argmax(row))
        assert np.all(np.diff(row[: peak + 1]) >= 0) and np.all(np.diff(row[peak:]) <= 0), method


def test_saturated_values_are_excluded_from_the_statistics():
    """A pixel saturated in 3 of 10 frames: the saturated values are kept, and the other
    7 alone decide the rejection (a low outlier among them is still found)."""
    stack = np.full((10, 1, 1), 800.0, np.float32)
    stack[:, 0, 0] += np.linspace(-5, 5, 10, dtype=np.float32)
    stack[[2, 5, 8], 0, 0] = 1000.0
    stack[0, 0, 0] = 300.0
    flags = rejection_flags(stack, method="sigma", low=2.0, high=2.0, saturation=1000.0)[:, 0, 0]
    assert flags[[2, 5, 8]].tolist() == [0, 0, 0]
    assert flags[0] == FLAG_LOW
    # Without the protection the saturated values are clipped as the brightest ones.
    plain = rejection_flags(stack, method="sigma", low=1.0, high=1.0)[:, 0, 0]
    assert (plain[[2, 5, 8]] == FLAG_HIGH).all()


def test_per_frame_saturation_levels():
    stack = np.full((6, 2, 2), 100.0, np.float32) + np.arange(6, dtype=np.float32)[:, None, None]
    stack[1] = 500.0  # saturated in frame 1 only (level 500), an outlier otherwise
    levels = np.array([np.nan, 500, 1e9, 1e9, 1e9, 1e9])
    flags = rejection_flags(stack, method="winsorized", low=3.0, high=3.0, saturation=levels)
    assert not flags[1].any()
    flags = rejection_flags(stack, method="winsorized", low=3.0, high=3.0)
    assert (flags[1] == FLAG_HIGH).all()


# --------------------------------------------------------------------------------------
# Switches, ranges, invalid values, counts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sigma", "winsorized", "averaged", "linear", "esd", "percentile", "minmax"])
def test_low_and_high_switches(planted, method):
    params = METHOD_PARAMS[method]
    no_low = rejection_flags(planted.stack, method=method, reject_low=False, **params)
    no_high = rejection_flags(planted.stack, method=method, reject_high=False, **params)
    assert not (no_low == FLAG_LOW).any() and (no_low == FLAG_HIGH).any()
    assert not (no_high == FLAG_HIGH).any() and (no_high == FLAG_LOW).any()
    assert np.all(no_high[planted.dead] == FLAG_LOW)


def test_range_and_invalid_values_are_flagged_and_ignored():
    rng = np.random.default_rng(2)
    stack = rng.normal(100, 5, (9, 6, 70)).astype(np.float32)
    stack[0, 0, 0] = np.nan
    stack[1, 0, 0] = np.inf
    stack[2, 0, 0] = -np.inf
    stack[3, 1, 1] = 10.0  # <= range_low
    stack[4, 1, 2] = 50.0  # == range_low: rejected
    stack[5, 2, 3] = 300.0  # >= range_high
    flags = rejection_flags(stack, method="winsorized", range_low=50.0, range_high=300.0)
    for f, y, x in [(0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 1, 1), (4, 1, 2), (5, 2, 3)]:
        assert flags[f, y, x] == FLAG_RANGE
    assert (flags == FLAG_RANGE).sum() == 6
    # The range-rejected values take no part in the statistics: the result elsewhere in
    # those pixels is that of the stack without them.
    nan_stack = stack.copy()
    nan_stack[flags == FLAG_RANGE] = np.nan
    np.testing.assert_array_equal(flags, rejection_flags(nan_stack, method="winsorized"))


@pytest.mark.parametrize("method", METHODS)
def test_counts_add_up(planted, method):
    stack = planted.stack.copy()
    stack[:, 0, 0] = np.nan  # a pixel without data
    stack[:18, 1, 1] = np.nan  # and one with two values
    flags = rejection_flags(stack, method=method, saturation=SATURATION, **METHOD_PARAMS.get(method, {}))
    assert set(np.unique(flags)) <= {0, FLAG_LOW, FLAG_HIGH, FLAG_RANGE}
    weights = np.linspace(0.5, 1.5, stack.shape[0])
    image, n_low, n_high = combine_stack(stack, flags, weights)
    assert n_low.dtype == np.uint16 and n_high.dtype == np.uint16 and image.dtype == np.float32
    np.testing.assert_array_equal(n_low, (flags == FLAG_LOW).sum(axis=0))
    np.testing.assert_array_equal(n_high, (flags == FLAG_HIGH).sum(axis=0))
    kept = (flags == 0).sum(axis=0)
    ranged = (flags == FLAG_RANGE).sum(axis=0)
    np.testing.assert_array_equal(kept + n_low + n_high + ranged, stack.shape[0])
    assert np.isnan(image[0, 0]) and np.isfinite(image[1:, 1:]).all()


def test_reject_stack_is_flags_nonzero(planted):
    for method in ("sigma", "esd"):
        np.testing.assert_array_equal(
            reject_stack(planted.stack, method=method), rejection_flags(planted.stack, method=method) != 0
        )


# --------------------------------------------------------------------------------------
# Combine
# --------------------------------------------------------------------------------------


def test_combine_is_the_weighted_mean_of_kept_values():
    rng = np.random.default_rng(4)
    stack = rng.normal(10, 1, (5, 3, 4)).astype(np.float32)
    flags = np.zeros(stack.shape, np.uint8)
    flags[0, 0, 0] = FLAG_HIGH
    flags[1, 0, 0] = FLAG_LOW
    flags[2, 1, 1] = FLAG_RANGE
    weights = np.array([1.0, 2.0, 0.0, 0.5, 3.0])  # frame 2 excluded by its weight
    image, n_low, n_high = combine_stack(stack, flags, weights)
    w = np.where(flags == 0, weights[:, None, None], 0.0)
    expected = (w * stack).sum(axis=0) / w.sum(axis=0)
    np.testing.assert_allclose(image, expected, rtol=1e-6)
    assert n_low[0, 0] == 1 and n_high[0, 0] == 1 and n_low.sum() == 1 and n_high.sum() == 1


def test_combine_never_returns_zero_for_a_fully_rejected_pixel():
    stack = np.array([3.0, 5.0, 4.0, np.nan], np.float32).reshape(4, 1, 1)
    flags = np.array([FLAG_LOW, FLAG_HIGH, FLAG_HIGH, FLAG_RANGE], np.uint8).reshape(4, 1, 1)
    image, n_low, n_high = combine_stack(stack, flags)
    assert image[0, 0] == 4.0  # the median of the in-range values
    assert (n_low[0, 0], n_high[0, 0]) == (1, 2)


def test_the_final_pass_kernel_is_flags_overrides_and_combine_to_the_bit():
    """The integration's final pass normalizes, flags (method none), applies the
    saturated and own-pixel overrides and combines in one kernel: the same bits as the
    composition of the public steps, on samples with NaN, saturation, ranges, every
    own-pixel flag, a zero weight and pixels with every sample rejected."""
    rng = np.random.default_rng(11)
    n, ny, nx = 7, 23, 37
    raw = rng.normal(100, 10, (n, ny, nx)).astype(np.float32)
    raw[rng.random(raw.shape) < 0.05] = np.nan
    raw[:, 3, 4] = 900.0  # saturated in every frame
    raw[rng.random(raw.shape) < 0.02] = 2000.0
    saturated = rng.random(raw.shape) < 0.03
    projected = rng.choice(np.array([0, 1, 2, 4, 8, 9, 10], np.uint8), raw.shape, p=[.7, .05, .05, .05, .05, .05, .05])
    projected[:, 5, 6] = 2  # every sample of a pixel rejected: the median fallback
    scale = rng.uniform(0.9, 1.1, n).astype(np.float32)
    offset = rng.uniform(-5, 5, n).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, n)
    weights[2] = 0.0
    saturation = np.full(n, 850.0)
    for range_low, range_high in ((-np.inf, np.inf), (80.0, 1500.0)):
        values = raw.copy()
        image, n_low, n_high, wsum, flags, counts, spread = combine_flagged(
            values, saturated, projected, weights, saturation, range_low, range_high, scale=scale, offset=offset)
        assert spread is None
        ref = raw * scale[:, None, None]
        ref += offset[:, None, None]
        np.testing.assert_array_equal(values, ref)  # normalized in place
        ref_flags = rejection_flags(ref, method="none", saturation=saturation, range_low=range_low,
                                    range_high=range_high)
        ref_flags[saturated] = 0
        ref_flags[(projected & 1) != 0] = FLAG_LOW
        ref_flags[(projected & 10) != 0] = FLAG_HIGH
        ref_image, ref_low, ref_high = combine_stack(ref, ref_flags, weights)
        finite = np.isfinite(ref)
        ref_wsum = np.zeros((ny, nx), np.float32)
        for k in range(n):
            ref_wsum += np.float32(weights[k]) * ((ref_flags[k] == 0) & finite[k])
        np.testing.assert_array_equal(flags, ref_flags)
        np.testing.assert_array_equal(image.astype(np.float32), ref_image)
        np.testing.assert_array_equal(n_low, ref_low)
        np.testing.assert_array_equal(n_high, ref_high)
        np.testing.assert_array_equal(wsum, ref_wsum)
        np.testing.assert_array_equal(counts, [((ref_flags & FLAG_LOW) != 0).sum(axis=(1, 2)),
                                               ((ref_flags & FLAG_HIGH) != 0).sum(axis=(1, 2)),
                                               finite.sum(axis=(1, 2))])
        assert np.isfinite(image[5, 6]) and n_high[5, 6] == n
        assert (flags == FLAG_RANGE).any() and (flags == FLAG_LOW).any()


def test_the_model_pass_kernel_combines_the_rejections_flags_and_their_spread_to_the_bit():
    """With the rejection's own flags (the integration's model pass): the saturated
    override, the combine, the weight sum and the kept samples' spread are those of
    the public steps and of the spread's definition, to the bit."""
    rng = np.random.default_rng(12)
    n, ny, nx = 9, 19, 41
    values = rng.normal(100, 10, (n, ny, nx)).astype(np.float32)
    values[rng.random(values.shape) < 0.05] = np.nan
    values[rng.random(values.shape) < 0.03] = 400.0
    values[:4, 2, 3] = 1000.0  # saturated
    values[:, 7, 8] = np.nan  # no data
    values[1:, 9, 10] = np.nan  # one sample: no spread
    saturated = rng.random(values.shape) < 0.02
    weights = rng.uniform(0.5, 2.0, n)
    saturation = np.full(n, 950.0)
    given = rejection_flags(values, method="winsorized", low=3, high=3, saturation=saturation)
    image, n_low, n_high, wsum, flags, counts, spread = combine_flagged(
        values.copy(), saturated, None, weights, saturation, flags=given.copy(), spread=True)
    ref = given.copy()
    ref[saturated] = 0
    ref_image, ref_low, ref_high = combine_stack(values, ref, weights)
    np.testing.assert_array_equal(flags, ref)
    np.testing.assert_array_equal(image.astype(np.float32), ref_image)
    np.testing.assert_array_equal(n_low, ref_low)
    np.testing.assert_array_equal(n_high, ref_high)
    keep = (ref == 0) & np.isfinite(values)
    ref_wsum = np.zeros((ny, nx), np.float32)
    for k in range(n):
        ref_wsum += np.float32(weights[k]) * keep[k]
    np.testing.assert_array_equal(wsum, ref_wsum)
    kept = np.where(keep, values, np.nan).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref_spread = np.nanstd(kept, axis=0, ddof=1)
    ref_spread[keep.sum(axis=0) < 2] = np.nan
    np.testing.assert_allclose(spread, ref_spread, rtol=1e-5)  # the definition (sums in another order)
    assert np.isnan(spread[9, 10]) and np.isnan(image[7, 8]) and (flags[:4, 2, 3] == 0).all()
    assert (n_high > 0).any() and counts[1].sum() == (ref == FLAG_HIGH).sum()


# --------------------------------------------------------------------------------------
# NumPy and Dask
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sigma", "winsorized", "esd", "minmax", "linear"])
def test_numpy_and_dask_give_the_same_result(planted, method):
    params = dict(saturation=SATURATION, **METHOD_PARAMS[method])
    stack = planted.stack
    # Odd tiles, and a frame axis in two chunks (rechunked into one).
    lazy = da.from_array(stack, chunks=(11, 17, 23))
    with raise_if_dask_computes():
        flags_lazy = rejection_flags(lazy, method=method, **params)
        mask_lazy = reject_stack(lazy, method=method, **params)
        image_lazy, low_lazy, high_lazy = combine_stack(lazy, flags_lazy, np.arange(1.0, 21.0))
    assert isinstance(flags_lazy, da.Array) and flags_lazy.chunks[0] == (20,)
    assert image_lazy.chunks == ((17, 17, 14), (23, 23, 23, 11))
    flags = rejection_flags(stack, method=method, **params)
    np.testing.assert_array_equal(flags_lazy.compute(), flags)
    np.testing.assert_array_equal(mask_lazy.compute(), flags != 0)
    image, low, high = combine_stack(stack, flags, np.arange(1.0, 21.0))
    np.testing.assert_array_equal(image_lazy.compute(), image)
    np.testing.assert_array_equal(low_lazy.compute(), low)
    np.testing.assert_array_equal(high_lazy.compute(), high)


# --------------------------------------------------------------------------------------
# Against plain reference implementations
# --------------------------------------------------------------------------------------


def reference_esd(x, alpha, fraction, relax):
    """Rosner's generalized ESD, written out plainly (sorted-order removal)."""
    x = np.sort(x)
    n = len(x)
    k = min(max(int(fraction * n), 1), n - 2)
    work = list(x)
    sides, stats = [], []
    for i in range(k):
        arr = np.array(work)
        m, s = arr.mean(), arr.std(ddof=1)
        hi_stat, lo_stat = (arr[-1] - m) / s, (m - arr[0]) / (relax * s)
        if hi_stat >= lo_stat:
            stats.append(hi_stat), sides.append("high"), work.pop()
        else:
            stats.append(lo_stat), sides.append("low"), work.pop(0)
    n_out = 0
    for i in range(k):
        p = 1 - alpha / (2 * (n - i))
        t = student_t.ppf(p, n - i - 2)
        lam = (n - i - 1) * t / np.sqrt((n - i - 2 + t * t) * (n - i))
        if stats[i] > lam:
            n_out = i + 1
    return sides[:n_out].count("low"), sides[:n_out].count("high")


def test_esd_matches_reference():
    rng = np.random.default_rng(8)
    stack = rng.normal(50, 2, (25, 4, 64)).astype(np.float32)
    stack[rng.random(stack.shape) < 0.06] += 12.0
    stack[rng.random(stack.shape) < 0.03] -= 12.0
    flags = rejection_flags(stack, method="esd", esd_significance=0.05, esd_outliers=0.3, esd_low_relaxation=1.5)
    for y, x in itertools.product(range(4), range(64)):
        n_low, n_high = reference_esd(stack[:, y, x].astype(np.float64), 0.05, 0.3, 1.5)
        assert ((flags[:, y, x] == FLAG_LOW).sum(), (flags[:, y, x] == FLAG_HIGH).sum()) == (n_low, n_high)


def reference_winsorized(x, low, high):
    """Winsorized sigma clipping by plain iteration of the winsorization about the
    median (PixInsight's loop), iterated to its limit (the kernel solves for it)."""
    x = np.sort(x)
    a, b = 0, len(x)
    while b - a >= 3:
        v = x[a:b]
        centre = np.median(v)
        sigma = (np.quantile(v, 0.75) - np.quantile(v, 0.25)) / 1.3489795003921634
        for _ in range(100_000):
            w = np.clip(v, centre - 1.5 * sigma, centre + 1.5 * sigma)
            previous = sigma
            sigma = 1.134 * w.std(ddof=1)
            if abs(sigma - previous) <= 1e-13 * previous:
                break
        lo = a + np.count_nonzero(v < centre - low * sigma)
        hi = b - np.count_nonzero(v > centre + high * sigma)
        if (lo, hi) == (a, b):
            break
        a, b = lo, hi
    return a, len(x) - b


def test_winsorized_matches_reference_iteration():
    rng = np.random.default_rng(9)
    stack = rng.normal(200, 10, (16, 3, 64)).astype(np.float32)
    stack[rng.random(stack.shape) < 0.05] += 150.0
    stack[rng.random(stack.shape) < 0.03] -= 120.0
    flags = rejection_flags(stack, method="winsorized", low=3.0, high=2.5)
    for y, x in itertools.product(range(3), range(64)):
        n_low, n_high = reference_winsorized(stack[:, y, x].astype(np.float64), 3.0, 2.5)
        assert ((flags[:, y, x] == FLAG_LOW).sum(), (flags[:, y, x] == FLAG_HIGH).sum()) == (n_low, n_high)


@pytest.mark.parametrize("column, expected_high", [
    ([195, 213, 210, 206, 7174, 198, 211, 192, 679, 186, 14489, 206], [4, 8, 10]),  # 3 of 12: a hot pixel
    ([215, 183, 221, 12288, 213, 2204, 4627, 199], [3, 5, 6]),                        # 3 of 8
    ([200, 199, 8461, 192], [2]),                                                      # 1 of 4
])
def test_winsorized_rejects_a_quarter_of_outliers(column, expected_high):
    """Regression: a clamped-mean centre drifted without converging on these samples
    (from a simulated field with hot pixels and cosmic rays) and nothing was rejected."""
    stack = np.array(column, np.float32)[:, None, None]
    flags = rejection_flags(stack, method="winsorized", low=4.0, high=3.0)[:, 0, 0]
    assert list(np.flatnonzero(flags == FLAG_HIGH)) == expected_high
    assert not (flags == FLAG_LOW).any()


def test_winsorized_rejects_nothing_on_flat_or_quantized_samples():
    stack = np.full((12, 2, 3), 7.0, np.float32)
    stack[:4, 1, :] = 8.0  # a quantized sample: its winsorized sigma collapses
    assert not rejection_flags(stack, method="winsorized").any()


def test_sorting_network_sorts():
    for n in range(1, 13):  # 0-1 principle: sorting every 0/1 input proves the network
        network = rej_flags._sorting_network(n)
        inputs = np.array(list(itertools.product([0.0, 1.0], repeat=n))).T.copy()
        for start in range(0, inputs.shape[1], 64):
            block = np.ascontiguousarray(inputs[:, start : start + 64])
            expected = np.sort(block, axis=0)
            rej_sorting._network_sort(block, np.empty(64), block.shape[1], network)
            np.testing.assert_array_equal(block, expected)
    rng = np.random.default_rng(0)
    for n in (33, 70, 129):
        block = rng.normal(size=(n, 64))
        expected = np.sort(block, axis=0)
        rej_sorting._network_sort(block, np.empty(64), 64, rej_flags._sorting_network(n))
        np.testing.assert_array_equal(block, expected)


def test_many_frames_and_ragged_width():
    """70 frames (a non-power-of-two network) and a width that is not a multiple of the
    128-pixel lanes."""
    rng = np.random.default_rng(12)
    stack = noisy_stack(rng, n=70, shape=(3, 291))
    np.testing.assert_array_equal(reject_stack(stack, method="sigma", low=2.5, high=2.5), astropy_mask(stack, 2.5, 2.5))


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="kappa"), "method"),
        (dict(low=-1.0), "low"),
        (dict(high=np.nan), "high"),
        (dict(n_low=1.5), "n_low"),
        (dict(max_iterations=0), "max_iterations"),
        (dict(esd_significance=1.0), "esd_significance"),
        (dict(saturation=np.ones(3)), "saturation"),
        (dict(range_low=np.nan), "range_low"),
    ],
)
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(DrizzlestackError, match=match):
        rejection_flags(np.zeros((4, 2, 2), np.float32), **kwargs)


def test_bad_shapes_are_named():
    with pytest.raises(DrizzlestackError, match="stack"):
        reject_stack(np.zeros((4, 2), np.float32))
    with pytest.raises(DrizzlestackError, match="weights"):
        combine_stack(np.zeros((4, 2, 2), np.float32), np.zeros((4, 2, 2), np.uint8), np.ones(3))
    with pytest.raises(DrizzlestackError, match="flags"):
        combine_stack(np.zeros((4, 2, 2), np.float32), np.zeros((4, 2, 3), np.uint8))
