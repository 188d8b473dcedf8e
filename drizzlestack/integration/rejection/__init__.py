"""Pixel rejection across the frame axis, and the weighted combine of what survives.

Every function here works on a *stack*: an array ``(frame, y, x)`` of registered,
normalized frames. Each pixel position is treated on its own: its ``n`` values, one per
frame, are classified as kept, rejected low, rejected high, or invalid. The functions are
blockwise by construction, so a Dask array chunked ``(frame=all, y=tile, x=tile)`` is
processed tile by tile with memory ≈ tile × frames.

Flags (the store's ``rejection`` variable, uint8)
-------------------------------------------------
=====  ===================================================================
bit    meaning
=====  ===================================================================
``1``  rejected low by the statistical method (:data:`FLAG_LOW`)
``2``  rejected high by the statistical method (:data:`FLAG_HIGH`)
``4``  range-rejected or invalid: NaN/±inf, ``<= range_low`` or
       ``>= range_high`` (:data:`FLAG_RANGE`)
=====  ===================================================================
A pixel carries at most one bit; ``0`` means it is used by the combine and by drizzle.

Saturation
----------
A saturated pixel (value ``>= saturation[frame]``) is a *lower bound* on the true value,
not an outlier. Rejecting it is what makes star cores come out black (every frame
saturated, everything rejected, nothing left) or hollow (the saturated frames rejected,
only the fainter unsaturated frames of the same pixel averaged, so the centre of the
star is fainter than its shoulders). So, when ``saturation`` is given:

* saturated pixels are never flagged, neither by the statistical methods nor by
  ``range_high``: they are always kept (flag ``0``) and enter the combine and drizzle
  with their frame weight;
* they are left out of the statistics (median, sigma, fits) of their pixel, because a
  censored value says nothing about the noise; the statistics, and so the low/high
  rejection, use the unsaturated values only;
* therefore, where every frame is saturated the combine returns the (weighted mean)
  saturated value, and where some are, it averages saturated and unsaturated values,
  which keeps the profile monotonic towards the centre.

The price: a cosmic-ray hit that itself reaches the saturation level is kept. Leave
``saturation=None`` (the default) for data where that matters more than star cores.

Methods
-------
``low``/``high`` are thresholds in units of the method's dispersion (sigma) except for
``"percentile"`` (fractions of the median) and ``"esd"`` (which uses a significance level
instead); ``reject_low``/``reject_high`` switch each side off. Values below refer to the
*sample* of a pixel: its valid, unsaturated values.

``"none"``
    Only range/invalid rejection.
``"minmax"``
    Rejects the ``n_low`` lowest and ``n_high`` highest values; at least one value is
    always kept (the counts are lowered, high side last, when the sample is too small).
``"percentile"``
    Rejects ``x`` with ``(median - x) / |median| > low`` or ``(x - median) / |median| >
    high`` (PixInsight's percentile clipping; ``low``/``high`` are fractions, e.g. 0.2
    and 0.1). Nothing is rejected where the median is 0.
``"sigma"``
    Iterative sigma clipping with exactly the semantics of
    ``astropy.stats.sigma_clip(stack, axis=0, sigma_lower=low, sigma_upper=high,
    maxiters=max_iterations, cenfunc="median", stdfunc="std")``: bounds
    ``median ∓ k·std`` with the population standard deviation (``ddof=0``), values
    strictly outside are clipped, values equal to a bound kept, iterate until nothing
    changes or nothing is left, and finally flag every value of the sample outside the
    last bounds. The returned mask equals astropy's, bit for bit (see *Notes*).
``"winsorized"``
    Winsorized sigma clipping (as PixInsight's ImageIntegration; the pipeline's
    default). The sample is winsorized (clamped) to ``median ± 1.5·sigma`` and
    ``sigma = 1.134 · std(ddof=1)`` of the winsorized sample, iterated from the
    interquartile-range sigma until sigma changes by less than 0.05 %; values beyond
    ``median - low·sigma`` / ``median + high·sigma`` are rejected, and the whole repeats
    on the survivors while at least 3 remain. Centring on the median keeps the
    iteration stable with a quarter of the sample made of outliers (a clamped-mean
    centre drifts away there and would reject nothing; see :func:`_winsorize`). Where
    there is no spread, or the winsorization does not converge (heavily quantized
    samples, whose winsorized sigma collapses towards 0), nothing more is rejected.
``"averaged"``
    Averaged sigma clipping (IRAF's ``avsigclip``, as in PixInsight): a Poisson noise
    model ``sigma² = k · median`` whose factor ``k = Σ(x - m)² / m / (n' - 1)`` is fitted
    once on the whole sample (``m`` its median) less its lowest and highest values
    (``n'`` values; with 5 or more, as IRAF does, so that one outlier does not inflate
    it); the clipping then iterates with ``sigma = sqrt(k · median)`` about the median
    of the survivors. It needs a positive signal: nothing is rejected where the median
    is ``<= 0``.
``"linear"``
    Linear fit clipping (PixInsight): a straight line is fitted to the sorted sample
    against rank by least absolute deviation; ``sigma = 2 · mean |residual|``; values
    with residuals below ``-low·sigma`` or above ``high·sigma`` are rejected; refit on
    the survivors. Needs 5 values to start, stops below 3.
``"esd"``
    Generalized extreme studentized deviate test (Rosner 1983): up to
    ``floor(esd_outliers · n)`` (at least 1, at most ``n - 2``) candidates are removed one
    at a time, each the value farthest from the mean of the remaining ones in units of
    their sample standard deviation (low deviations divided by ``esd_low_relaxation``);
    the number of outliers is the largest ``i`` whose statistic exceeds Rosner's
    two-sided critical value at significance ``esd_significance``. ``low``/``high`` are
    not used.

Notes
-----
*How it runs.* Pixels are taken 128 at a time along x, where every frame row is
contiguous: their samples are sorted together by a comparator network (the same
compare-exchange sequence for every pixel, i.e. vector min/max, no branches), and the
sigma and winsorized clipping iterate them in lockstep with vectorized masked sums;
the other methods run per pixel on the sorted sample.

*Equality with astropy.* Astropy's fast path (``astropy/stats/src/compute_bounds.c``)
takes medians with Wirth's selection algorithm, which permutes the buffer, and then sums
the mean and the variance in that permuted order. We clip on a sorted sample instead
(the median is read off directly, and clipping only ever removes values from the two
ends), so our sums run in another order and may differ from astropy's in the last bits.
Our bounds are therefore checked at every iteration: if any value of the sample lies
within a generous bound on that rounding difference (``32 (n + 8) eps`` relative) from a
clipping bound, the pixel is recomputed with a replica of astropy's algorithm, same
buffer order, same selection algorithm, same operations, which gives astropy's bounds
bit for bit. Either way the decisions are the same as astropy's.

Modules: :mod:`.sorting` (constants, sorted-sample kernels, the astropy replica),
:mod:`.methods` (one kernel per method), :mod:`.parameters` (the method and its
thresholds, validated once: :class:`RejectionParameters`), :mod:`.flags` (block kernels,
:func:`rejection_flags`, :func:`reject_stack`) and :mod:`.combine` (the weighted mean of
what survives, :func:`combine_stack`).
"""

from .combine import combine_flagged, combine_stack
from .flags import reject_stack, rejection_flags
from .parameters import RejectionParameters
from .sorting import FLAG_HIGH, FLAG_LOW, FLAG_RANGE, METHODS

__all__ = ["FLAG_LOW", "FLAG_HIGH", "FLAG_RANGE", "METHODS", "RejectionParameters", "reject_stack", "rejection_flags",
           "combine_stack", "combine_flagged"]
