"""Block kernels (gather a tile's samples, run a method, write flags) and the public
flagging functions :func:`rejection_flags` and :func:`reject_stack` (their parameters:
:class:`.parameters.RejectionParameters`)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numba import njit

from drizzlestack._warnings import DrizzlestackError

from .methods import (_reject_averaged, _reject_esd, _reject_linear, _reject_minmax, _reject_percentile,
                      _sigma_lanes, _sigma_scratch, _winsor_scratch, _winsorized_lanes)
from .parameters import RejectionParameters, resolve, saturation_levels
from .sorting import (FLAG_HIGH, FLAG_LOW, FLAG_RANGE, _AVERAGED, _ESD, _INF, _LANES, _LINEAR, _MINMAX, _NONE,
                      _PERCENTILE, _SIGMA, _WINSORIZED, _network_sort)

# ----------------------------------------------------------------------------------------
# Block kernels
# ----------------------------------------------------------------------------------------


@njit(nogil=True, cache=True, error_model="numpy")
def _gather(stack, y, x0, w, saturation, range_low, range_high, U, cnt):
    """Copy the pixels ``x0 .. x0 + w`` of row ``y`` of every frame into the columns of
    ``U`` (frame order), replacing the values that take no part in the statistics
    (invalid, saturated, out of range) by +inf, and count the others per column."""
    n = U.shape[0]
    for l in range(w):
        cnt[l] = 0
    for f in range(n):
        src = stack[f, y]
        dst = U[f]
        sat = saturation[f]
        for l in range(w):
            x = src[x0 + l]
            # x - x == 0 is the branch-free "finite" test (inf - inf and NaN give NaN).
            used = (x - x == 0) & (x < sat) & (x > range_low) & (x < range_high)
            dst[l] = x if used else _INF
            cnt[l] += used


@njit(nogil=True, cache=True, error_model="numpy")
def _write_by_cuts(stack, y, x0, w, saturation, range_low, range_high, cut_lo, cut_hi, mask_only, out):
    """Flags of the pixels ``x0 .. x0 + w`` of row ``y``: from the value thresholds
    (``< cut_lo`` low, ``> cut_hi`` high) for the values that took part in the statistics."""
    n = stack.shape[0]
    code_low = 1 if mask_only else FLAG_LOW
    code_high = 1 if mask_only else FLAG_HIGH
    code_range = 1 if mask_only else FLAG_RANGE
    for f in range(n):
        src = stack[f, y]
        dst = out[f, y]
        sat = saturation[f]
        for l in range(w):
            x = np.float64(src[x0 + l])
            finite = x - x == 0
            saturated = finite & (x >= sat)
            in_range = (x > range_low) & (x < range_high)
            code = code_low if x < cut_lo[l] else (code_high if x > cut_hi[l] else 0)
            code = code if in_range else code_range
            code = 0 if saturated else code
            dst[x0 + l] = code if finite else code_range


@njit(nogil=True, cache=True, error_model="numpy")
def _write_by_rank(stack, y, x0, w, U, status, saturation, mask_only, rank, out):
    """Flags of the pixels ``x0 .. x0 + w`` of row ``y`` from a status per *sorted
    position* (``status[k, l]``): a frame's position is its rank among the column's
    used values, ties broken by frame order, so equal values are told apart exactly."""
    n = U.shape[0]
    code_range = 1 if mask_only else FLAG_RANGE
    for f in range(n):
        uf = U[f]
        for l in range(w):
            rank[l] = 0
        for g in range(n):
            ug = U[g]
            if g < f:
                for l in range(w):
                    rank[l] += ug[l] <= uf[l]
            elif g > f:
                for l in range(w):
                    rank[l] += ug[l] < uf[l]
        src = stack[f, y]
        dst = out[f, y]
        sat = saturation[f]
        for l in range(w):
            if uf[l] < _INF:
                code = status[rank[l], l]
                dst[x0 + l] = (1 if code != 0 else 0) if mask_only else code
            else:
                x = np.float64(src[x0 + l])
                saturated = (x - x == 0) & (x >= sat)
                dst[x0 + l] = 0 if saturated else code_range


@njit(nogil=True, cache=True, error_model="numpy")
def _sorted_segment(stack, y, x0, w, saturation, range_low, range_high, network, U, V, tmp, Vd, cnt):
    """Gather the pixels ``x0 .. x0 + w`` of row ``y`` (``U``, frame order, unused
    values +inf) and sort their samples (``Vd``, float64; ``cnt`` values per column)."""
    _gather(stack, y, x0, w, saturation, range_low, range_high, U, cnt)
    n = U.shape[0]
    for k in range(n):
        for l in range(w):
            V[k, l] = U[k, l]
    _network_sort(V, tmp, w, network)
    for k in range(n):
        for l in range(w):
            Vd[k, l] = V[k, l]


@njit(nogil=True, cache=True, error_model="numpy")
def _flags_kernel_lockstep(stack, method, k_low, k_high, use_low, use_high, range_low, range_high, saturation, max_iterations, mask_only, network, out):
    """Flags of a ``(frame, y, x)`` block for the sigma and winsorized clipping, which
    run on 128 columns in lockstep; see :func:`_flags_kernel_columns` for the layout."""
    n, ny, nx = stack.shape
    L = _LANES
    U = np.empty((n, L), stack.dtype)
    V = np.empty((n, L), stack.dtype)
    tmp = np.empty(L, stack.dtype)
    Vd = np.empty((n, L), np.float64)
    cnt = np.empty(L, np.int64)
    cut_lo = np.empty(L, np.float64)
    cut_hi = np.empty(L, np.float64)
    # both methods' work arrays (a few kB): one variable cannot take either type
    sigma_scratch = _sigma_scratch(n, L)
    winsor_scratch = _winsor_scratch(n, L)
    for y in range(ny):
        for x0 in range(0, nx, L):
            w = min(L, nx - x0)
            _sorted_segment(stack, y, x0, w, saturation, range_low, range_high, network, U, V, tmp, Vd, cnt)
            if method == _SIGMA:
                _sigma_lanes(Vd, U, cnt, w, k_low, k_high, use_low, use_high, max_iterations, cut_lo, cut_hi, sigma_scratch)
            else:
                _winsorized_lanes(Vd, cnt, w, k_low, k_high, use_low, use_high, max_iterations, cut_lo, cut_hi, winsor_scratch)
            _write_by_cuts(stack, y, x0, w, saturation, range_low, range_high, cut_lo, cut_hi, mask_only, out)


@njit(nogil=True, cache=True, error_model="numpy")
def _flags_kernel_columns(
    stack,
    method,
    k_low,
    k_high,
    use_low,
    use_high,
    range_low,
    range_high,
    saturation,
    n_low,
    n_high,
    max_iterations,
    esd_lambda,
    esd_fraction,
    esd_low_relaxation,
    mask_only,
    network,
    out,
):
    """Classify every value of a ``(frame, y, x)`` block into ``out`` (uint8, same shape).

    ``out`` receives the flag bits, or 0/1 when ``mask_only`` (so that it can be viewed
    as a bool array without a copy). Pixels are processed ``_LANES`` at a time along x
    (contiguous in every frame): gathered, sorted by a comparator network, rejected,
    and written back. This kernel runs the methods that work column by column on the
    sorted sample (and ``"none"``); :func:`_flags_kernel_lockstep` the others. They are
    separate so that a run compiles only the one it uses.
    """
    n, ny, nx = stack.shape
    L = _LANES
    U = np.empty((n, L), stack.dtype)
    V = np.empty((n, L), stack.dtype)
    tmp = np.empty(L, stack.dtype)
    Vd = np.empty((n, L), np.float64)
    status = np.zeros((n, L), np.uint8)
    cnt = np.empty(L, np.int64)
    rank = np.empty(L, np.int64)
    cut_lo = np.empty(L, np.float64)
    cut_hi = np.empty(L, np.float64)
    col = np.empty(n, np.float64)
    col_status = np.zeros(n, np.uint8)
    # work arrays of _reject_linear (survivors, their sorted positions, the LAD fit's
    # buffer) and of _reject_esd (prefix sums, the side of each removal)
    lin_values = np.empty(n, np.float64)
    lin_pos = np.empty(n, np.int64)
    lin_tmp = np.empty(n, np.float64)
    esd_p1 = np.empty(n + 1, np.float64)
    esd_p2 = np.empty(n + 1, np.float64)
    esd_side = np.zeros(n, np.uint8)
    by_rank = method == _MINMAX or method == _LINEAR or method == _ESD
    for y in range(ny):
        for x0 in range(0, nx, L):
            w = min(L, nx - x0)
            if method == _NONE:
                for l in range(w):
                    cut_lo[l] = -_INF
                    cut_hi[l] = _INF
                _write_by_cuts(stack, y, x0, w, saturation, range_low, range_high, cut_lo, cut_hi, mask_only, out)
                continue
            _sorted_segment(stack, y, x0, w, saturation, range_low, range_high, network, U, V, tmp, Vd, cnt)
            for l in range(w):
                m = cnt[l]
                for k in range(m):
                    col[k] = Vd[k, l]
                    col_status[k] = 0
                if method == _AVERAGED:
                    _reject_averaged(col, m, col_status, k_low, k_high, use_low, use_high, max_iterations)
                elif method == _PERCENTILE:
                    _reject_percentile(col, m, col_status, k_low, k_high, use_low, use_high)
                elif method == _MINMAX:
                    _reject_minmax(m, col_status, n_low, n_high, use_low, use_high)
                elif method == _LINEAR:
                    _reject_linear(col, m, col_status, k_low, k_high, use_low, use_high, max_iterations, lin_values, lin_pos, lin_tmp)
                elif method == _ESD:
                    _reject_esd(col, m, col_status, use_low, use_high, esd_lambda, esd_fraction, esd_low_relaxation, esd_p1, esd_p2,
                                esd_side)
                if by_rank:
                    for k in range(m):
                        status[k, l] = col_status[k]
                else:
                    # These methods clip by value from both ends: the rejected are the
                    # values below the smallest kept one and above the largest.
                    a = 0
                    while a < m and col_status[a] == FLAG_LOW:
                        a += 1
                    b = m
                    while b > a and col_status[b - 1] == FLAG_HIGH:
                        b -= 1
                    cut_lo[l] = col[a] if a < m else _INF
                    cut_hi[l] = col[b - 1] if b > 0 else -_INF
            if by_rank:
                _write_by_rank(stack, y, x0, w, U, status, saturation, mask_only, rank, out)
            else:
                _write_by_cuts(stack, y, x0, w, saturation, range_low, range_high, cut_lo, cut_hi, mask_only, out)


# ----------------------------------------------------------------------------------------
# Python layer
# ----------------------------------------------------------------------------------------


def _is_dask(array: Any) -> bool:
    return type(array).__module__.split(".")[0] == "dask"


@functools.lru_cache(maxsize=32)
def _sorting_network(n: int) -> np.ndarray:
    """Comparators ``(i, j)``, ``i < j``, of Batcher's odd-even merge sort for ``n`` values.

    Built for the next power of two and pruned of every comparator that touches an
    index ``>= n``: padding with +inf makes those comparators no-ops, so the pruned
    network still sorts ``n`` values. About ``n log2(n)^2 / 4`` comparators.
    """
    size = 1
    while size < n:
        size *= 2
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            j = k % p
            while j + k < size:
                for i in range(k):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
                j += 2 * k
            k //= 2
        p *= 2
    network = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    network.flags.writeable = False
    return network


def _as_float(block: np.ndarray) -> np.ndarray:
    # float32 and float64 go to the kernel as they are, anything else as float64 (as
    # astropy does). Always C-contiguous: a strided view (a Dask block sliced from a
    # NumPy array) would make numba compile the whole kernel once more.
    if block.dtype != np.float32 and block.dtype != np.float64:
        return np.ascontiguousarray(block, dtype=np.float64)
    return np.ascontiguousarray(block)


def _flags_block(block: np.ndarray, params: RejectionParameters, saturation: np.ndarray, esd_lambda: np.ndarray,
                 mask_only: bool) -> np.ndarray:
    """Kernel call on one in-memory ``(frame, y, x)`` block (``saturation`` and
    ``esd_lambda`` from :func:`.parameters.saturation_levels` and
    :meth:`RejectionParameters.esd_critical_values`)."""
    block = _as_float(np.asarray(block))
    out = np.empty(block.shape, dtype=np.uint8)
    if block.size:
        network = _sorting_network(block.shape[0])
        code = params.method_code
        range_low, range_high = params.range_limits
        if code == _SIGMA or code == _WINSORIZED:
            _flags_kernel_lockstep(
                block, code, params.low, params.high, params.reject_low, params.reject_high, range_low, range_high,
                saturation, params.iteration_cap, mask_only, network, out,
            )  # fmt: skip
        else:
            _flags_kernel_columns(
                block, code, params.low, params.high, params.reject_low, params.reject_high, range_low, range_high,
                saturation, params.n_low, params.n_high, params.iteration_cap, esd_lambda, params.esd_outliers,
                params.esd_low_relaxation, mask_only, network, out,
            )  # fmt: skip
    return out.view(np.bool_) if mask_only else out


def _check_stack(stack: Any) -> Any:
    if not _is_dask(stack):
        stack = np.asarray(stack)
    if stack.ndim != 3:
        raise DrizzlestackError(f"stack: expected a (frame, y, x) array, got {stack.ndim} dimensions")
    if stack.dtype.kind not in "fiu":
        raise DrizzlestackError(f"stack: expected real numbers, got dtype {stack.dtype}")
    if _is_dask(stack) and stack.numblocks[0] != 1:
        # Rejection needs every frame of a pixel in one task.
        stack = stack.rechunk({0: -1})
    return stack


def _flags_or_mask(stack, mask_only: bool, params: RejectionParameters, saturation):
    stack = _check_stack(stack)
    n_frames = stack.shape[0]
    sat = saturation_levels(saturation, n_frames)
    lam = params.esd_critical_values(n_frames)
    if _is_dask(stack):
        return stack.map_blocks(
            _flags_block,
            params=params,
            saturation=sat,
            esd_lambda=lam,
            mask_only=mask_only,
            dtype=np.bool_ if mask_only else np.uint8,
            meta=np.empty((0, 0, 0), dtype=np.bool_ if mask_only else np.uint8),
        )
    return _flags_block(stack, params, sat, lam, mask_only)


def rejection_flags(stack, parameters: RejectionParameters | None = None, *, saturation=None, **keywords):
    """Per-frame, per-pixel rejection flags of a stack (the store's ``rejection`` cube).

    Parameters
    ----------
    stack : array_like or dask.array.Array, shape (frame, y, x)
        Registered, normalized frames. NaN and ±inf mean "no data". A Dask array should
        be chunked ``(frame=all, y=tile, x=tile)``; a frame axis in several chunks is
        rechunked into one.
    parameters : RejectionParameters, optional
        The method and its thresholds. Default: ``RejectionParameters()`` (winsorized
        sigma clipping at 3 sigma, the pipeline's default).
    saturation : float or array_like of shape (frame,), optional
        Saturation level, one for all frames or one per frame (in the stack's units,
        i.e. after normalization); NaN means unknown. Values ``>=`` their frame's level
        are kept and excluded from the statistics (see the module documentation).
    **keywords
        Fields of :class:`RejectionParameters` (``method``, ``low``, ``high``,
        ``reject_low``, ``reject_high``, ``range_low``, ``range_high``, ``n_low``,
        ``n_high``, ``max_iterations``, ``esd_significance``, ``esd_outliers``,
        ``esd_low_relaxation``), instead of ``parameters`` or replacing its fields.

    Returns
    -------
    numpy.ndarray or dask.array.Array of uint8, shape (frame, y, x)
        :data:`FLAG_LOW`, :data:`FLAG_HIGH`, :data:`FLAG_RANGE` or 0 (kept); lazy for a
        Dask input.

    Raises
    ------
    DrizzlestackError
        A bad stack, saturation or parameter, named.

    See Also
    --------
    reject_stack : the same decision as a boolean mask.
    combine_stack : the weighted mean of the kept values and the rejection counts.
    """
    return _flags_or_mask(stack, False, resolve(parameters, keywords, "winsorized"), saturation)


def reject_stack(stack, parameters: RejectionParameters | None = None, *, saturation=None, **keywords):
    """Boolean rejection mask of a stack: True where a value is not used.

    Same parameters as :func:`rejection_flags`, but without ``parameters`` the method
    defaults to ``"sigma"``. The mask is ``flags != 0``: rejected low or high, out of
    range, or invalid (NaN/inf).

    Returns
    -------
    numpy.ndarray or dask.array.Array of bool, shape (frame, y, x)
        Lazy for a Dask input.

    Notes
    -----
    With ``method="sigma"`` and no range or saturation limits the mask is exactly
    ``astropy.stats.sigma_clip(stack, axis=0, sigma_lower=low, sigma_upper=high,
    maxiters=max_iterations, cenfunc="median", stdfunc="std").mask``.

    Examples
    --------
    >>> import numpy as np
    >>> from drizzlestack.integration.rejection import reject_stack
    >>> stack = np.ones((5, 1, 1), np.float32) + np.arange(5).reshape(5, 1, 1) * 0.01
    >>> stack[2, 0, 0] = 100.0  # a cosmic ray
    >>> reject_stack(stack, method="sigma", low=2, high=2)[:, 0, 0]
    array([False, False,  True, False, False])
    """
    return _flags_or_mask(stack, True, resolve(parameters, keywords, "sigma"), saturation)
