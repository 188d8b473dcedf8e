"""Transforms, pixmaps and footprints, shared by registration, resampling and drizzle.

Conventions (see docs/design.md): pixel coordinates are zero-based ``(x, y)``, integer
values at pixel centres, pixel ``i`` covers ``[i - 0.5, i + 0.5]``. A transform is a
3x3 homography acting on homogeneous column vectors ``[x, y, 1]``; ``transform[frame]``
maps *frame* pixels to *reference* pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def apply_homography(matrix: np.ndarray, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Map points through a 3x3 homography.

    Parameters
    ----------
    matrix : (3, 3) array_like
        Homography acting on ``[x, y, 1]``.
    x, y : array_like
        Coordinates of the points (any matching shapes).

    Returns
    -------
    xt, yt : ndarray
        Mapped coordinates, float64. Points mapped to infinity (w == 0) are NaN.
    """
    m = np.asarray(matrix, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = m[2, 0] * x + m[2, 1] * y + m[2, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        xt = (m[0, 0] * x + m[0, 1] * y + m[0, 2]) / w
        yt = (m[1, 0] * x + m[1, 1] * y + m[1, 2]) / w
    bad = w == 0
    if np.any(bad):
        xt = np.where(bad, np.nan, xt)
        yt = np.where(bad, np.nan, yt)
    return xt, yt


def translation(dx: float, dy: float) -> np.ndarray:
    """Homography of a pure shift by ``(dx, dy)``."""
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def similarity(scale: float, angle_deg: float, dx: float, dy: float, center=(0.0, 0.0)) -> np.ndarray:
    """Homography of a rotation by ``angle_deg`` (counter-clockwise in x/y) and isotropic
    ``scale`` about ``center``, followed by a shift ``(dx, dy)``."""
    a = np.deg2rad(angle_deg)
    c, s = scale * np.cos(a), scale * np.sin(a)
    cx, cy = center
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return translation(cx + dx, cy + dy) @ rot @ translation(-cx, -cy)


@dataclass(frozen=True)
class OutputGrid:
    """The drizzle output grid: ``scale`` times finer than the reference grid over ``roi``.

    ``x_out = scale * (x_ref - x0 + 0.5) - 0.5`` (likewise y), output shape
    ``(round(scale * height), round(scale * width))``.
    """

    scale: float
    x0: float
    y0: float
    width: float
    height: float

    @classmethod
    def from_reference(cls, ref_shape: tuple[int, int], scale: float, roi=None) -> "OutputGrid":
        """Output grid for a reference frame of ``ref_shape = (ny, nx)``; ``roi`` is
        ``(x0, y0, width, height)`` in reference pixels, default the whole frame."""
        if roi is None:
            roi = (0, 0, ref_shape[1], ref_shape[0])
        x0, y0, w, h = (float(v) for v in roi)
        return cls(float(scale), x0, y0, w, h)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(round(self.scale * self.height)), int(round(self.scale * self.width)))

    @property
    def ref_to_out(self) -> np.ndarray:
        """Homography mapping reference pixels to output pixels."""
        s = self.scale
        return np.array(
            [[s, 0.0, s * (0.5 - self.x0) - 0.5], [0.0, s, s * (0.5 - self.y0) - 0.5], [0.0, 0.0, 1.0]]
        )


def pixel_grid(shape: tuple[int, int], y0: int = 0, x0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)`` (float64, each of ``shape``) of a window whose
    first pixel is ``(x0, y0)``."""
    yy, xx = np.mgrid[y0 : y0 + shape[0], x0 : x0 + shape[1]]
    return xx.astype(np.float64), yy.astype(np.float64)


def pixmap(matrix: np.ndarray, shape: tuple[int, int], y0: int = 0, x0: int = 0, distortion=None) -> np.ndarray:
    """Pixmap of a window: for every input pixel centre, its mapped ``(x, y)``.

    Parameters
    ----------
    matrix : (3, 3) array_like
        Input pixels -> output pixels (e.g. ``grid.ref_to_out @ transform[frame]``).
    shape : (ny, nx)
        Window shape.
    y0, x0 : int
        Position of the window's first pixel in the input frame.
    distortion : callable, optional
        ``f(x, y) -> (x, y)`` applied to input coordinates before ``matrix``
        (a distortion correction from frame pixels to undistorted frame pixels).

    Returns
    -------
    (ny, nx, 2) float64 ndarray
        The same convention as STScI's ``drizzle`` package.
    """
    x, y = pixel_grid(shape, y0, x0)
    if distortion is not None:
        x, y = distortion(x, y)
    xt, yt = apply_homography(matrix, x, y)
    return np.stack([xt, yt], axis=-1)


def edge_points(x0: float, y0: float, x1: float, y1: float, n: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Points along the edges of the rectangle ``[x0, x1] x [y0, y1]``, ``n`` per side
    (corners included), for mapping a footprint through a non-affine transform."""
    t = np.linspace(0.0, 1.0, n)
    xs = np.concatenate([x0 + (x1 - x0) * t, np.full(n, x1), x1 - (x1 - x0) * t, np.full(n, x0)])
    ys = np.concatenate([np.full(n, y0), y0 + (y1 - y0) * t, np.full(n, y1), y1 - (y1 - y0) * t])
    return xs, ys


class FrameMapping:
    """Frame pixels -> reference pixels: a homography, optionally followed by a smooth
    correction in reference coordinates (the surface-spline distortion model).

    ``forward(x, y) = correction(H(x, y))`` and ``inverse(x, y) = H^-1(inverse_correction(x, y))``.
    Registration builds these; the registered view and drizzle only call ``forward``
    and ``inverse``, so they never need to know which model was fitted.

    Parameters
    ----------
    matrix : (3, 3) array_like
        Frame -> reference homography.
    correction, inverse_correction : callable, optional
        ``f(x, y) -> (x, y)`` on reference coordinates; both or neither.
    """

    def __init__(self, matrix, correction=None, inverse_correction=None):
        self.matrix = np.asarray(matrix, dtype=np.float64)
        self.inverse_matrix = np.linalg.inv(self.matrix)
        if (correction is None) != (inverse_correction is None):
            raise ValueError("a distortion correction needs its inverse too")
        self.correction = correction
        self.inverse_correction = inverse_correction

    @property
    def is_homography(self) -> bool:
        return self.correction is None

    def forward(self, x, y):
        """Frame -> reference coordinates."""
        xr, yr = apply_homography(self.matrix, x, y)
        if self.correction is not None:
            xr, yr = self.correction(xr, yr)
        return xr, yr

    def inverse(self, x, y):
        """Reference -> frame coordinates."""
        if self.inverse_correction is not None:
            x, y = self.inverse_correction(x, y)
        return apply_homography(self.inverse_matrix, x, y)

    def then(self, matrix) -> "MappedThen":
        """This mapping followed by a homography (e.g. reference -> drizzle output grid)."""
        return MappedThen(self, np.asarray(matrix, dtype=np.float64))


class MappedThen:
    """A :class:`FrameMapping` followed by a homography ``M`` (``forward = M . mapping``)."""

    def __init__(self, mapping: FrameMapping, matrix: np.ndarray):
        self.mapping = mapping
        self.matrix = matrix
        self.inverse_matrix = np.linalg.inv(matrix)

    def forward(self, x, y):
        return apply_homography(self.matrix, *self.mapping.forward(x, y))

    def inverse(self, x, y):
        return self.mapping.inverse(*apply_homography(self.inverse_matrix, x, y))


def input_window(mapping, box, input_shape, pad: float = 1.0, n: int = 9):
    """Window of an input frame whose pixels can land in ``box = (x0, y0, x1, y1)``
    (pixel-edge coordinates of the target grid): points along the box's edges are
    mapped back through ``mapping.inverse``, their bounding box padded by ``pad`` input
    pixels and clipped to ``input_shape``. ``None`` if nothing can land there.

    The edges are sampled (``n`` points a side) rather than only the corners so that
    a non-linear correction that bulges an edge is still covered; ``pad`` should
    include the drop's reach (the kernel's radius in input pixels) plus one pixel.
    """
    xs, ys = edge_points(*box, n=n)
    xt, yt = mapping.inverse(xs, ys)
    if not (np.all(np.isfinite(xt)) and np.all(np.isfinite(yt))):
        return None
    ny, nx = input_shape
    xa = max(int(np.floor(xt.min() - pad + 0.5)), 0)
    xb = min(int(np.ceil(xt.max() + pad + 0.5)), nx)
    ya = max(int(np.floor(yt.min() - pad + 0.5)), 0)
    yb = min(int(np.ceil(yt.max() + pad + 0.5)), ny)
    if xa >= xb or ya >= yb:
        return None
    return slice(ya, yb), slice(xa, xb)
