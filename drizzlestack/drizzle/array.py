"""In-memory drizzle: :func:`drizzle_array`, and the :func:`accumulate` /
:func:`finalize` pair that the tiled driver uses to add many frames (or windows of
frames) into one output tile and divide once at the end.

The numba kernels are in :mod:`drizzlestack.drizzle.kernels`; this module validates
inputs, picks the kernel and documents the mathematics.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from .._warnings import DrizzlestackWarning
from ..lanczos import lanczos_table
from . import kernels as _k

__all__ = [
    "KERNELS",
    "accumulate",
    "drizzle_array",
    "estimate_pixel_scale_ratio",
    "finalize",
    "kernel_radius",
]

#: Names of the drizzle kernels, as accepted by ``kernel=``.
KERNELS = ("square", "point", "turbo", "gaussian", "lanczos2", "lanczos3")

# Kernels whose footprint is set by pixel_scale_ratio rather than by the pixmap.
_SCALED_KERNELS = ("turbo", "gaussian", "lanczos2", "lanczos3")

#: A kernel that would reach further than this (output pixels) from a drop's centre
#: is refused: it means an absurd ``pixel_scale_ratio``, and would make every drop
#: loop over a huge part of the output.
MAX_KERNEL_RADIUS = 1024.0

# The channel index and shift of grey data: never read by the kernels (nplanes = 1).
_NO_CHANNEL = np.zeros((1, 1), dtype=np.uint8)
_NO_SHIFT = np.zeros((1, 2))


def _as_channel_shift(channel_shift, nplanes) -> np.ndarray:
    """``channel_shift`` as a ``(nplanes, 2)`` float64 array (zeros for ``None``)."""
    if channel_shift is None:
        return np.zeros((nplanes, 2)) if nplanes > 1 else _NO_SHIFT
    if nplanes < 2:
        raise ValueError("channel_shift: only with channel= (colour accumulators)")
    shift = np.ascontiguousarray(channel_shift, dtype=np.float64)
    if shift.shape != (nplanes, 2) or not np.all(np.isfinite(shift)):
        raise ValueError(f"channel_shift: expected finite (x, y) output-pixel shifts for each of the {nplanes} "
                         f"channels, shape ({nplanes}, 2), got {np.shape(channel_shift)}")
    return shift


def _check_kernel(kernel: str) -> str:
    if not isinstance(kernel, str) or kernel.lower() not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: must be one of {', '.join(KERNELS)}")
    return kernel.lower()


def _check_pixfrac(pixfrac) -> float:
    pixfrac = float(pixfrac)
    if not (0.0 < pixfrac <= 1.0):
        raise ValueError(f"pixfrac={pixfrac}: must be in (0, 1]")
    return pixfrac


def _check_psr(pixel_scale_ratio):
    if pixel_scale_ratio is None:
        return None
    psr = float(pixel_scale_ratio)
    if not (math.isfinite(psr) and psr > 0.0):
        raise ValueError(f"pixel_scale_ratio={pixel_scale_ratio}: must be a positive number or None")
    return psr


def _as_data(data, name="data") -> np.ndarray:
    # Always float64: one compiled signature per kernel (a cold numba compile of the
    # square kernel takes ~15 s), and converting a window costs little next to
    # drizzling it.
    data = np.asarray(data)
    if data.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {data.shape}")
    return np.ascontiguousarray(data, dtype=np.float64)


def _as_pixmap(pixmap, shape) -> np.ndarray:
    pixmap = np.ascontiguousarray(pixmap, dtype=np.float64)
    if pixmap.shape != (shape[0], shape[1], 2):
        raise ValueError(
            f"pixmap: expected shape {(shape[0], shape[1], 2)} (data shape + (2,)), got {pixmap.shape}"
        )
    return pixmap


def _as_weights(weights, shape):
    if weights is None:
        return np.ones((1, 1)), False
    weights = _as_data(weights, "weights")
    if weights.shape != tuple(shape):
        raise ValueError(f"weights: shape {weights.shape} differs from data shape {tuple(shape)}")
    return weights, True


def _local_scales(pixmap: np.ndarray, max_samples: int = 64) -> np.ndarray:
    """``sqrt|det J|`` of the pixmap (output pixels per input pixel) on a sparse grid
    of at most ``max_samples**2`` points, by forward differences; NaN where undefined."""
    ny, nx = pixmap.shape[:2]
    if ny < 2 or nx < 2:
        return np.empty(0)
    jj = np.unique(np.linspace(0, ny - 2, min(ny - 1, max_samples)).astype(np.intp))
    ii = np.unique(np.linspace(0, nx - 2, min(nx - 1, max_samples)).astype(np.intp))
    p00 = pixmap[np.ix_(jj, ii)]
    p10 = pixmap[np.ix_(jj, ii + 1)]
    p01 = pixmap[np.ix_(jj + 1, ii)]
    with np.errstate(invalid="ignore", over="ignore"):
        a = p10 - p00
        b = p01 - p00
        det = a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]
        return np.sqrt(np.abs(det)).ravel()


def estimate_pixel_scale_ratio(pixmap, out_shape=None) -> float:
    """Estimate ``pixel_scale_ratio`` (the size of an output pixel in input pixels,
    ``1 / scale``) from a pixmap, as STScI drizzle does.

    STScI's ``compute_pscale_ratio`` takes the input pixel ``(i, j) = (int(cx),
    int(cy))`` (clipped to ``[0, n - 2]``) at the centroid ``(cx, cy)`` of the part of
    the input that lands in the output, and the local Jacobian there by forward
    differences of the pixmap. We do the same, with the centroid of the input pixel
    centres that land inside the output (which is the same point when the whole input
    lands inside), and return ``1 / sqrt|det J|``.

    .. note::
       STScI ``drizzle`` 3.0.0 returns ``sqrt|det J|`` there, the reciprocal of its own
       documented (and used) meaning, so its ``pixel_scale_ratio=None`` makes turbo,
       gaussian and lanczos drops ``scale**2`` times too small in area at
       ``scale != 1``. We return the documented quantity.

    Parameters
    ----------
    pixmap : (ny, nx, 2) array_like
        Output ``(x, y)`` of every input pixel centre; ``ny, nx >= 2``.
    out_shape : (int, int), optional
        Output shape; default: every input pixel counts as landing inside.

    Returns
    -------
    float
        The estimated ratio. If the Jacobian at the centroid is not defined (NaN
        pixmap there), the median over a sparse grid of valid pixels is used.

    Raises
    ------
    ValueError
        If no input pixel lands in the output or no local scale can be computed.
    """
    pixmap = np.asarray(pixmap, dtype=np.float64)
    if pixmap.ndim != 3 or pixmap.shape[2] != 2 or min(pixmap.shape[:2]) < 2:
        raise ValueError(f"pixmap: expected shape (ny >= 2, nx >= 2, 2), got {pixmap.shape}")
    ny, nx = pixmap.shape[:2]
    x = pixmap[..., 0]
    y = pixmap[..., 1]
    with np.errstate(invalid="ignore"):
        if out_shape is None:
            inside = np.isfinite(x) & np.isfinite(y)
        else:
            h, w = out_shape
            inside = (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)
    jy, ix = np.nonzero(inside)
    if ix.size == 0:
        raise ValueError("cannot estimate pixel_scale_ratio: no input pixel lands in the output")
    i = min(max(int(ix.mean()), 0), nx - 2)
    j = min(max(int(jy.mean()), 0), ny - 2)
    p = pixmap[j, i]
    a = pixmap[j, i + 1] - p
    b = pixmap[j + 1, i] - p
    s = math.sqrt(abs(a[0] * b[1] - a[1] * b[0]))
    if not (math.isfinite(s) and s > 0.0):
        scales = _local_scales(pixmap)
        scales = scales[np.isfinite(scales) & (scales > 0)]
        if scales.size == 0:
            raise ValueError("cannot estimate pixel_scale_ratio: the pixmap has no valid 2x2 cell")
        s = float(np.median(scales))
    return 1.0 / s


def kernel_radius(kernel: str, pixfrac: float = 1.0, pixel_scale_ratio: float = 1.0) -> float:
    """How far (in output pixels, along x or y) from a drop's mapped centre the kernel
    can deposit weight, for a locally undistorted pixmap of the given scale: a tiled
    driver pads its input windows by this (converted to input pixels) plus one pixel.

    ``square``: half the diagonal of the drop, ``pixfrac / psr / sqrt(2)`` (covers
    any rotation); ``turbo``: ``pixfrac / psr / 2``; ``point``: 0; ``gaussian``:
    ``max(2.5 pixfrac / 2.3548, 1.2) / psr``; ``lanczos``: ``order / psr``. Add 0.5
    for the extent of the receiving output pixel.
    """
    kernel = _check_kernel(kernel)
    pixfrac = _check_pixfrac(pixfrac)
    psr = _check_psr(pixel_scale_ratio)
    if kernel == "square":
        return pixfrac / psr / math.sqrt(2.0)
    if kernel == "turbo":
        return 0.5 * pixfrac / psr
    if kernel == "point":
        return 0.0
    if kernel == "gaussian":
        return max(_k.GAUSS_NSIG * pixfrac / _k.GAUSS_FWHM, _k.GAUSS_MIN_REACH) / psr
    return (2.0 if kernel == "lanczos2" else 3.0) / psr


def _as_channel(channel, shape, nplanes) -> np.ndarray:
    channel = np.ascontiguousarray(channel)
    if channel.shape != tuple(shape) or channel.dtype.kind not in "iu":
        raise ValueError(f"channel: expected an integer array of the data's shape {tuple(shape)}, "
                         f"got {channel.dtype} {channel.shape}")
    if channel.size and int(channel.max()) >= nplanes:
        raise ValueError(f"channel: values must be below the accumulators' {nplanes} planes")
    return channel.astype(np.uint8, copy=False)


def _planes(acc_wv, acc_w, coverage, channel, data_shape):
    """Colour accumulators ``(P, H, W)`` as the kernels' ``(P * H, W)`` views, with the
    validated channel index; grey ones unchanged (``channel`` must then be None)."""
    if isinstance(acc_w, np.ndarray) and acc_w.ndim == 3:
        if channel is None:
            raise ValueError("acc_w: 3-D (channel, H, W) accumulators need channel= (the plane of every input pixel)")
        nplanes = acc_w.shape[0]
        flat = []
        for name, acc in (("acc_w", acc_w), ("acc_wv", acc_wv), ("coverage", coverage)):
            if acc is None:
                flat.append(None)
                continue
            if not (isinstance(acc, np.ndarray) and acc.shape == acc_w.shape and acc.flags.c_contiguous):
                raise ValueError(f"{name}: must be a C-contiguous array of acc_w's shape {acc_w.shape}")
            flat.append(acc.reshape(nplanes * acc.shape[1], acc.shape[2]))
        return flat[1], flat[0], flat[2], _as_channel(channel, data_shape, nplanes), nplanes, acc_w.shape[1:]
    if channel is not None:
        raise ValueError("channel: given, but the accumulators are 2-D; colour needs (channel, H, W) accumulators")
    return acc_wv, acc_w, coverage, None, 1, getattr(acc_w, "shape", None)


def _check_accumulator(name, acc, shape=None) -> np.ndarray:
    if not (isinstance(acc, np.ndarray) and acc.dtype == np.float64 and acc.ndim == 2
            and acc.flags.c_contiguous and acc.flags.writeable):
        raise ValueError(f"{name}: must be a writeable C-contiguous 2-D float64 numpy array")
    if shape is not None and acc.shape != shape:
        raise ValueError(f"{name}: shape {acc.shape} differs from acc_w shape {shape}")
    return acc


class _Plan:
    """Validated inputs and per-kernel constants of one drizzle call."""

    def __init__(self, data, pixmap, weights, kernel, pixfrac, pixel_scale_ratio, out_shape):
        self.kernel = _check_kernel(kernel)
        self.pixfrac = _check_pixfrac(pixfrac)
        psr = _check_psr(pixel_scale_ratio)
        self.data = _as_data(data)
        self.pixmap = _as_pixmap(pixmap, self.data.shape)
        self.weights, self.use_weights = _as_weights(weights, self.data.shape)
        self.empty = self.data.size == 0
        if self.kernel in _SCALED_KERNELS and psr is None and not self.empty:
            psr = estimate_pixel_scale_ratio(self.pixmap, out_shape)
        self.psr = psr
        if self.kernel in _SCALED_KERNELS and not self.empty:
            reach = kernel_radius(self.kernel, self.pixfrac, psr)
            if reach > MAX_KERNEL_RADIUS:
                raise ValueError(
                    f"pixel_scale_ratio={psr:g}: the {self.kernel} kernel would reach "
                    f"{reach:.0f} output pixels (limit {MAX_KERNEL_RADIUS:.0f}); "
                    "pixel_scale_ratio is the output pixel size in input pixels, 1/scale"
                )
        self.max_extent = 0.0
        if self.kernel == "square" and not self.empty:
            if min(self.data.shape) < 2:
                raise ValueError(
                    "data: the square kernel needs at least 2x2 input pixels to find drop "
                    f"corners, got shape {self.data.shape}"
                )
            # Guard against absurd pixmaps: a drop more than 16 times the typical drop
            # size (and more than 64 output pixels) is skipped rather than looped over.
            # A given pixel_scale_ratio states the typical size (1 / psr output pixels);
            # the driver gives it, and sampling the pixmap cost ~3 % of its drizzle.
            if psr is not None:
                typical = 1.0 / psr
            else:
                scales = _local_scales(self.pixmap)
                scales = scales[np.isfinite(scales)]
                typical = float(np.median(scales)) if scales.size else 1.0
            self.max_extent = max(64.0, 16.0 * typical)
        if self.kernel.startswith("lanczos") and self.pixfrac != 1.0:
            warnings.warn(
                f"kernel={self.kernel!r} ignores pixfrac={self.pixfrac:g} (as STScI drizzle does)",
                DrizzlestackWarning,
                stacklevel=3,
            )

    def run(self, acc_wv, acc_w, touched, use_touched, chan=None, nplanes=1, shift=None) -> int:
        """Add the drops into the accumulators; the number of input pixels used.

        Colour: ``acc_*`` are ``(nplanes * H, W)``, ``chan`` the plane of every input
        pixel and ``shift`` each plane's ``(nplanes, 2)`` output-pixel shift (see
        :mod:`drizzlestack.drizzle.kernels`)."""
        k = self.kernel
        args = (self.data, self.pixmap, self.weights, self.use_weights)
        if chan is None:
            chan, nplanes = _NO_CHANNEL, 1
        if shift is None:
            shift = _as_channel_shift(None, int(nplanes))
        tail = (acc_wv, acc_w, touched, use_touched, chan, int(nplanes), shift)
        if k == "square":
            return _k.square_kernel(*args, self.pixfrac, self.max_extent, *tail)
        if k == "point":
            return _k.point_kernel(*args, *tail)
        if k == "turbo":
            return _k.turbo_kernel(*args, self.pixfrac, self.psr, *tail)
        if k == "gaussian":
            return _k.gaussian_kernel(*args, self.pixfrac, self.psr, *tail)
        order = 2 if k == "lanczos2" else 3
        return _k.lanczos_kernel(*args, order, self.psr, lanczos_table(order), *tail)


def accumulate(data, pixmap, weights, acc_wv, acc_w, kernel: str = "square",
               pixfrac: float = 1.0, pixel_scale_ratio: float | None = None, *,
               coverage=None, channel=None, channel_shift=None) -> int:
    """Drizzle one input window and **add** it into caller-owned float64 accumulators.

    ``acc_wv += sum over drops of w_i * a_io * d_i`` and ``acc_w += sum of w_i * a_io``
    where ``a_io`` is the kernel's share of drop ``i`` that falls in output pixel
    ``o`` (see :func:`drizzle_array` for the maths). Call it once per frame (or per
    input window), then :func:`finalize` once. Accumulating in float64 and dividing at
    the end gives the same result as STScI's running mean, without its float32 drift.

    Parameters
    ----------
    data : (ny, nx) array_like
        Input pixel values (float32 is used as is, anything else as float64). NaN or
        inf values contribute nothing.
    pixmap : (ny, nx, 2) array_like of float64
        Output ``(x, y)`` of the centre of every input pixel of the window, in the
        coordinates of the accumulators (output pixel ``k`` covers
        ``[k - 0.5, k + 0.5]``). NaN or beyond ``+-1e9``: the pixel is skipped (for
        the square kernel so are its 8 neighbours, whose corners interpolate it).
    weights : (ny, nx) array_like or None
        Input pixel weights (frame weight x rejection x validity); ``None`` means 1.
        Pixels whose weight is not ``> 0`` (including NaN) contribute nothing.
    acc_wv, acc_w : (H, W) float64 ndarray
        Accumulators of weight x value and of weight, C-contiguous, modified in place.
    kernel : str
        One of :data:`KERNELS`.
    pixfrac : float
        Linear drop shrink factor, ``0 < pixfrac <= 1`` (ignored by lanczos, as in
        STScI drizzle).
    pixel_scale_ratio : float or None
        Size of an output pixel in input pixels (``1 / scale``); sets the footprint of
        turbo, gaussian and lanczos. ``None``: :func:`estimate_pixel_scale_ratio` on
        this window. A tiled driver should pass one value per frame, so that every
        tile uses the same footprint. Unused by square and point.
    coverage : (H, W) integer ndarray, optional
        Incremented by one in every output pixel that received a non-zero weight from
        this call: calling once per frame gives the number of frames covering each
        pixel.
    channel : (ny, nx) integer ndarray, optional
        Colour (CFA) drizzle: the channel of every input pixel (0 R, 1 G, 2 B, see
        :func:`drizzlestack.cfa.channel_index`); the accumulators (and ``coverage``)
        are then ``(n_channels, H, W)`` and each pixel drops only into its own plane,
        in the same single pass over the window as grey data.
    channel_shift : (n_channels, 2) array_like, optional
        With ``channel``: an ``(x, y)`` shift in output pixels added to every drop of
        each channel (its centre and corners), e.g. to align the channels of a sky
        displaced by atmospheric dispersion (:mod:`drizzlestack.channel_alignment`).

    Returns
    -------
    int
        Number of input pixels that deposited weight in the accumulators.

    Notes
    -----
    For the square kernel, the corners of a drop are interpolated from the pixmap
    of its neighbours, and extrapolated at the window's edge (as STScI drizzle does at
    the frame's edge). A tiled driver therefore gets exactly the whole-frame result as
    long as its window extends at least one input pixel beyond the pixels whose drops
    reach the tile, which any window padded by the kernel's reach does.
    """
    acc_wv, acc_w, coverage, chan, nplanes, plane_shape = _planes(acc_wv, acc_w, coverage, channel,
                                                                 np.shape(data))
    acc_w = _check_accumulator("acc_w", acc_w)
    acc_wv = _check_accumulator("acc_wv", acc_wv, acc_w.shape)
    plan = _Plan(data, pixmap, weights, kernel, pixfrac, pixel_scale_ratio, plane_shape)
    if coverage is not None:
        if not (isinstance(coverage, np.ndarray) and coverage.shape == acc_w.shape
                and coverage.dtype.kind in "iu"):
            raise ValueError("coverage: must be an integer numpy array of the accumulators' shape")
        touched = np.zeros(acc_w.shape, dtype=np.uint8)
    else:
        touched = np.zeros((1, 1), dtype=np.uint8)
    if plan.empty or acc_w.size == 0:
        return 0
    shift = _as_channel_shift(channel_shift, nplanes)
    n = plan.run(acc_wv, acc_w, touched, coverage is not None, chan, nplanes, shift)
    if coverage is not None:
        _k.add_touched(coverage, touched)
    return int(n)


def finalize(acc_wv, acc_w, out=None, weights_out=None) -> np.ndarray:
    """The drizzled image from the accumulators: ``acc_wv / acc_w`` where
    ``acc_w != 0``, NaN where no drop contributed.

    Parameters
    ----------
    acc_wv, acc_w : (H, W) float64 ndarray
        Accumulators filled by :func:`accumulate` (colour: ``(n_channels, H, W)``).
    out : ndarray of acc_w's shape, optional
        Where to write the image: float64 (may be ``acc_wv`` itself: in place, no new
        memory) or, with ``weights_out``, float32.
    weights_out : ndarray of acc_w's shape, optional
        Also write ``acc_w`` cast to this array's float dtype, in the same pass (the
        tiled driver's float32 products: the values of finalizing in float64 and casting
        afterwards, one pass instead of three). Needs ``out``, not ``acc_wv`` itself.

    Returns
    -------
    ndarray
        The image (``out`` if given). The weights image is ``acc_w`` itself.
    """
    if weights_out is not None:
        shape = np.shape(acc_w)
        flat_w, flat_wv = (a.reshape(-1, a.shape[-1]) if isinstance(a, np.ndarray) and a.ndim == 3 else a
                           for a in (acc_w, acc_wv))  # colour planes: one pass for all
        flat_w = _check_accumulator("acc_w", flat_w)
        flat_wv = _check_accumulator("acc_wv", flat_wv, flat_w.shape)
        for name, arr in (("out", out), ("weights_out", weights_out)):
            if not (isinstance(arr, np.ndarray) and arr.shape == shape and arr.dtype.kind == "f"
                    and arr.flags.c_contiguous and arr.flags.writeable):
                raise ValueError(f"{name}: must be a writeable C-contiguous float array of acc_w's shape {shape}")
        if np.shares_memory(out, acc_wv) or np.shares_memory(weights_out, acc_w):
            raise ValueError("out, weights_out: must not share memory with the accumulators")
        _k.finalize_pair_kernel(flat_wv, flat_w, out.reshape(flat_w.shape), weights_out.reshape(flat_w.shape))
        return out
    if isinstance(acc_w, np.ndarray) and acc_w.ndim == 3:  # colour planes: one division for all
        if out is None:
            out = np.empty(acc_w.shape, dtype=np.float64)
        shape2 = (acc_w.shape[0] * acc_w.shape[1], acc_w.shape[2])
        finalize(acc_wv.reshape(shape2), acc_w.reshape(shape2), out=out.reshape(shape2))
        return out
    acc_w = _check_accumulator("acc_w", acc_w)
    acc_wv = _check_accumulator("acc_wv", acc_wv, acc_w.shape)
    if out is None:
        out = np.empty(acc_w.shape, dtype=np.float64)
    else:
        out = _check_accumulator("out", out, acc_w.shape)
    _k.finalize_kernel(acc_wv, acc_w, out)
    return out


def drizzle_array(data, pixmap, out_shape, kernel: str = "square", pixfrac: float = 1.0,
                  weights=None, pixel_scale_ratio: float | None = None, out=None, channel=None,
                  n_channels: int = 3, channel_shift=None):
    r"""Drizzle one image onto an output grid, in memory.

    Each input pixel is shrunk by ``pixfrac`` (the *drop*), mapped onto the output
    grid through ``pixmap`` and shared among the output pixels it overlaps (Fruchter &
    Hook 2002, PASP 114, 144). The result is identical to STScI ``drizzle``'s
    ``Drizzle.add_image(..., in_units="cps", iscale=1)`` (``out_img``, ``out_wht``) up
    to float32 rounding (relative differences ~4e-7) for ``square``, ``point``,
    ``turbo`` and ``gaussian``; see Notes for lanczos and the other differences.

    Parameters
    ----------
    data : (ny, nx) array_like
        Input pixel values (surface brightness, e.g. calibrated counts per pixel).
        NaN / inf values contribute nothing and never spread.
    pixmap : (ny, nx, 2) array_like of float64
        Output ``(x, y)`` of the centre of every input pixel (the STScI convention;
        output pixel ``k`` covers ``[k - 0.5, k + 0.5]``). Non-finite or absurd
        (beyond ``+-1e9``) entries: the pixel is skipped.
    out_shape : (int, int)
        Output shape ``(H, W)``.
    kernel : {"square", "point", "turbo", "gaussian", "lanczos2", "lanczos3"}
        How a drop is distributed (see Notes).
    pixfrac : float
        Linear shrink of the drop, ``0 < pixfrac <= 1``.
    weights : (ny, nx) array_like, optional
        Input weights ``w_i`` (default 1). Pixels with weight ``<= 0`` or NaN
        contribute nothing.
    pixel_scale_ratio : float, optional
        Output pixel size in input pixels (``1 / scale``), as in STScI drizzle; it
        sets the footprint of turbo, gaussian and lanczos. ``None``: estimated from the
        pixmap (:func:`estimate_pixel_scale_ratio`).
    out : (image, weights) pair of (H, W) float arrays, optional
        Arrays to write the result into (overwritten); float64 ones are used directly
        as accumulators, so no extra memory is needed. Not with ``channel``.
    channel : (ny, nx) integer array, optional
        Colour (CFA) drizzle: the channel (0 R, 1 G, 2 B) of every input pixel, e.g.
        :func:`drizzlestack.cfa.channel_index`; each pixel drops only into its own
        channel and the results are ``(n_channels, H, W)``.
    n_channels : int
        Number of output channels with ``channel``.
    channel_shift : (n_channels, 2) array_like, optional
        With ``channel``: each channel's ``(x, y)`` shift in output pixels (see
        :func:`accumulate`).

    Returns
    -------
    image : (H, W) ndarray
        Weighted mean of the contributing input values; NaN where nothing contributed
        (``weights == 0``). float64 unless ``out`` says otherwise.
    weights : (H, W) ndarray
        Total weight of each output pixel, :math:`W_o` below (STScI's ``out_wht``).

    Notes
    -----
    **Drop.** With ``h = pixfrac / 2``, the drop of input pixel :math:`(i, j)` is the
    quadrilateral whose corners are the pixmap, interpolated bilinearly between pixel
    centres, at :math:`(i \mp h, j \pm h)`, i.e. the pixel shrunk by ``pixfrac`` about
    its centre and mapped to the output (extrapolated past the frame's edge), exactly as
    STScI's square kernel. Its area is :math:`A_i` (output pixels).

    **Overlap weights** (F&H eq. 3-4). A drop gives output pixel :math:`o` the weight
    :math:`w_{io} = w_i\, a_{io}` with

    * ``square``: :math:`a_{io} = |{\rm drop}_i \cap {\rm pixel}_o| / A_i`, the exact
      overlap area as a fraction of the drop (the pixfrac and Jacobian corrections of
      F&H are this division);
    * ``turbo``: the same for an axis-aligned square of side ``pixfrac / psr`` centred
      on the mapped centre (fast, approximate under rotation);
    * ``point``: :math:`a_{io} = 1` for the pixel containing the mapped centre;
    * ``gaussian``: :math:`a_{io} = (e/\pi) \exp(-e\, r^2)`, :math:`e = 2.3548^2
      psr^2 / (2\, pixfrac^2)`, a Gaussian of FWHM ``pixfrac`` input pixels with unit
      integral, cut at :math:`\max(2.5\sigma, 1.2)` input pixels along each axis;
    * ``lanczos2/3``: :math:`a_{io} = L(\Delta x\, psr) L(\Delta y\, psr)`,
      :math:`L(t) = {\rm sinc}(t)\,{\rm sinc}(t / n)` for :math:`|t| < n`; ``pixfrac``
      is ignored.

    square, turbo and point conserve flux: :math:`\sum_o a_{io} = 1` for a drop inside
    the output, so :math:`\sum_o W_o I_o = \sum_i w_i d_i`. gaussian and lanczos do not
    (as in STScI drizzle).

    **Image** (F&H eq. 5, surface brightness preserved):

    .. math::
        W_o = \sum_i w_{io}, \qquad
        I_o = \frac{\sum_i w_{io}\, d_i}{W_o} \quad (W_o \ne 0),

    accumulated in float64 (:func:`accumulate`) and divided once (:func:`finalize`);
    :math:`I_o` is NaN where :math:`W_o = 0`.

    **Differences from STScI drizzle 3.0.0.** (1) Every drop that overlaps the output
    is used; STScI skips input pixels outside a polygon it estimates, which can drop
    pixels whose drop straddles the output's edge. (2) A point on a pixel boundary goes
    to the upper pixel everywhere (STScI rounds half away from zero, which differs at
    negative half-integers only). (3) NaN data and non-positive weights contribute
    nothing (STScI spreads NaN). (4) ``pixel_scale_ratio=None`` gives ``1 / scale``
    (STScI 3.0.0 estimates ``scale``, see :func:`estimate_pixel_scale_ratio`).
    (5) lanczos uses the exact kernel (STScI: nearest sample of a table at 0.003 input
    pixels, an error up to ~2e-3 per axis), so the weights agree to ~5e-3 of the largest
    weight only. (6) Drops with collinear corners (zero area) are skipped. (7) STScI
    3.0.0 loses input pixels under strong shear or with NaN inside the pixmap (its
    bounding polygon fails); we do not.

    Examples
    --------
    >>> import numpy as np
    >>> from drizzlestack.drizzle import drizzle_array
    >>> y, x = np.indices((4, 4), dtype=float)
    >>> pixmap = np.dstack([2 * x + 0.5, 2 * y + 0.5])   # scale 2
    >>> img, wht = drizzle_array(np.ones((4, 4)), pixmap, (8, 8), pixfrac=1.0)
    >>> float(np.nansum(img * wht))
    16.0
    """
    try:
        H, W = (int(v) for v in out_shape)
    except (TypeError, ValueError):
        raise ValueError(f"out_shape={out_shape!r}: expected (H, W)") from None
    if H <= 0 or W <= 0:
        raise ValueError(f"out_shape={out_shape!r}: both sizes must be positive")
    shape = (H, W)
    if channel_shift is not None and channel is None:
        raise ValueError("channel_shift: only with channel= (colour drizzle)")
    if channel is not None:
        if out is not None:
            raise ValueError("out: not supported with channel= (colour results are (n_channels, H, W))")
        acc_wv = np.zeros((int(n_channels), H, W))
        acc_w = np.zeros((int(n_channels), H, W))
        accumulate(data, pixmap, weights, acc_wv, acc_w, kernel=kernel, pixfrac=pixfrac,
                   pixel_scale_ratio=pixel_scale_ratio, channel=channel, channel_shift=channel_shift)
        return finalize(acc_wv, acc_w, out=acc_wv), acc_w
    direct = False
    if out is not None:
        try:
            img_out, wht_out = out
        except (TypeError, ValueError):
            raise ValueError("out: expected a pair (image, weights) of arrays") from None
        for name, arr in (("out[0]", img_out), ("out[1]", wht_out)):
            if not (isinstance(arr, np.ndarray) and arr.shape == shape and arr.dtype.kind == "f"):
                raise ValueError(f"{name}: must be a float numpy array of shape {shape}")
        direct = all(a.dtype == np.float64 and a.flags.c_contiguous and a.flags.writeable
                     for a in (img_out, wht_out))
    plan = _Plan(data, pixmap, weights, kernel, pixfrac, pixel_scale_ratio, shape)
    if direct:
        acc_wv, acc_w = img_out, wht_out
        acc_wv.fill(0.0)
        acc_w.fill(0.0)
    else:
        acc_wv = np.zeros(shape)
        acc_w = np.zeros(shape)
    if not plan.empty:
        plan.run(acc_wv, acc_w, np.zeros((1, 1), dtype=np.uint8), False)
    image = finalize(acc_wv, acc_w, out=acc_wv)
    if out is not None and not direct:
        img_out[...] = image
        wht_out[...] = acc_w
        return img_out, wht_out
    return image, acc_w
