"""Numba kernels of drizzle: each one adds the drops of one input window into
float64 accumulators ``acc_wv`` (sum of weight x value) and ``acc_w`` (sum of weight).

Plain arrays in and out, ``@njit(nogil=True, cache=True, error_model="numpy")``, no
Python objects, no ``parallel=True`` (the drivers run many kernels at once on Dask
threads). Validation, dispatch and the maths write-up live in
:mod:`drizzlestack.drizzle.array`. Every kernel takes data and weights as float64 (one
compiled signature each: a cold compile of the square kernel takes 15-30 s).

Conventions shared by every kernel (docs/design.md):

* ``pixmap[j, i] = (x, y)``: output position of the centre of input pixel ``(i, j)``;
  output pixel ``k`` covers ``[k - 0.5, k + 0.5]``, so a point ``x`` is in pixel
  ``floor(x + 0.5)`` (half-up rounding: unlike C's ``round`` it does not depend on
  where the origin is, so a tile and the whole image agree).
* An input pixel contributes nothing when its value is not finite, its weight is not
  ``> 0`` (NaN included), or its mapped position/corners are not finite or are beyond
  ``+-MAX_COORD`` (a guard against ``1e30``-style pixmap values).
* The weight a drop deposits in an output pixel is ``w * overlap / drop_area``
  (``square``, ``turbo``), ``w`` (``point``) or ``w * kernel(distance)``
  (``gaussian``, ``lanczos``), exactly what STScI ``drizzle`` accumulates in ``out_wht``.
* Colour (CFA) drizzle in one pass: the accumulators hold ``nplanes`` planes of
  ``H = rows / nplanes`` rows one above the other (a ``(nplanes, H, W)`` array seen as
  ``(nplanes * H, W)``), and ``chan[j, i]`` says into which plane input pixel ``(i, j)``
  drops: its overlaps are computed on the ``H x W`` grid as for grey data and
  deposited ``chan * H`` rows further down. Each raw sample reaches only its own
  colour, with its own weight. ``shift[p]`` (``(nplanes, 2)``, output pixels) moves
  every drop of plane ``p``, centre and corners (channel alignment). Grey data:
  ``nplanes = 1``, ``chan`` a dummy ``(1, 1)`` array and ``shift`` a dummy ``(1, 2)``
  one, never read.
* ``touched`` (uint8, same shape as the accumulators) is set to 1 where this call
  deposited a non-zero weight, when ``use_touched`` is true; the caller turns it into
  a coverage count.

Every kernel returns the number of input pixels that deposited weight in the output.

All kernels use ``error_model="numpy"``: a division by zero gives inf / NaN instead of
raising (it only happens in batch lanes of drops that are skipped anyway), and it keeps
loops with a division vectorizable.

The kernels live in three modules by role, re-exported here (callers import this one):
:mod:`.kernels_square` (the square kernel and its batched overlap machinery),
:mod:`.kernels_centred` (point, turbo, gaussian, lanczos: drops placed by their mapped
centre; their Lanczos table is :mod:`drizzlestack.lanczos`, shared with the registered
view) and :mod:`.kernels_common` (the coordinate guard, finalize, coverage and the
homography pixmap).
"""

from .kernels_centred import (
    GAUSS_FWHM,
    GAUSS_MIN_REACH,
    GAUSS_NSIG,
    gaussian_kernel,
    lanczos_kernel,
    point_kernel,
    turbo_kernel,
)
from .kernels_common import MAX_COORD, add_touched, finalize_kernel, finalize_pair_kernel, homography_grid
from .kernels_square import SQUARE_BATCH, SQUARE_MAX_WINDOW, drop_corners, pixmap_row, square_kernel

__all__ = [
    "GAUSS_FWHM",
    "GAUSS_MIN_REACH",
    "GAUSS_NSIG",
    "MAX_COORD",
    "SQUARE_BATCH",
    "SQUARE_MAX_WINDOW",
    "add_touched",
    "drop_corners",
    "finalize_kernel",
    "finalize_pair_kernel",
    "gaussian_kernel",
    "homography_grid",
    "lanczos_kernel",
    "pixmap_row",
    "point_kernel",
    "square_kernel",
    "turbo_kernel",
]
