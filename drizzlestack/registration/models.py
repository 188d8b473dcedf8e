"""Geometric models fitted to matched stars: similarity, affine, projective homography,
and a smoothed thin-plate (surface) spline for optical distortion.

All fits are weighted least squares of the positions in the *reference* frame
(``dst``) predicted from the frame positions (``src``): the quantity drizzle cares
about. Coordinates are normalised (centred, scaled to unit size) before fitting so the
normal equations stay well conditioned for frames of any size.
"""

from __future__ import annotations

import numpy as np

from ..geometry import apply_homography

MODELS = ("similarity", "affine", "homography")
#: minimum number of point pairs that determine each model
MIN_POINTS = {"similarity": 2, "affine": 3, "homography": 4}


def _normaliser(xy: np.ndarray) -> np.ndarray:
    """Similarity that moves ``xy``'s centroid to 0 and its RMS radius to sqrt(2) (Hartley)."""
    c = xy.mean(axis=0)
    r = np.sqrt(np.mean(np.sum((xy - c) ** 2, axis=1)))
    s = np.sqrt(2.0) / r if r > 0 else 1.0
    return np.array([[s, 0.0, -s * c[0]], [0.0, s, -s * c[1]], [0.0, 0.0, 1.0]])


def _apply(m, xy):
    x, y = apply_homography(m, xy[:, 0], xy[:, 1])
    return np.column_stack([x, y])


def _weights(w, n):
    return np.ones(n) if w is None else np.asarray(w, dtype=np.float64)


def fit_similarity(src, dst, weights=None, mirror: bool = False) -> np.ndarray:
    """Weighted least-squares similarity (rotation, isotropic scale, shift) ``src -> dst``.

    With ``mirror=True`` the fit is of a reflection (determinant < 0) instead:
    ``src`` is reflected in x first. Closed form (Umeyama 1991).
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    w = _weights(weights, len(src))
    flip = np.diag([-1.0, 1.0, 1.0]) if mirror else np.eye(3)
    s = _apply(flip, src)
    ws = w.sum()
    cs, cd = (w[:, None] * s).sum(0) / ws, (w[:, None] * dst).sum(0) / ws
    a, b = s - cs, dst - cd
    # For z = a_x + i a_y, the best complex factor is sum(w conj(a) b) / sum(w |a|^2).
    num_re = np.sum(w * (a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1]))
    num_im = np.sum(w * (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]))
    den = np.sum(w * (a ** 2).sum(1))
    if den <= 0:
        raise np.linalg.LinAlgError("degenerate point set (all points coincide)")
    p, q = num_re / den, num_im / den
    m = np.array([[p, -q, 0.0], [q, p, 0.0], [0.0, 0.0, 1.0]])
    m[:2, 2] = cd - m[:2, :2] @ cs
    return m @ flip


def fit_affine(src, dst, weights=None) -> np.ndarray:
    """Weighted least-squares affine transform ``src -> dst``."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    w = _weights(weights, len(src))
    ns, nd = _normaliser(src), _normaliser(dst)
    s, d = _apply(ns, src), _apply(nd, dst)
    a = np.column_stack([s, np.ones(len(s))]) * np.sqrt(w)[:, None]
    coef, *_ = np.linalg.lstsq(a, d * np.sqrt(w)[:, None], rcond=None)
    m = np.eye(3)
    m[:2, :] = coef.T
    return np.linalg.inv(nd) @ m @ ns


def fit_homography(src, dst, weights=None, iterations: int = 10) -> np.ndarray:
    """Weighted least-squares projective homography ``src -> dst``.

    A normalised direct linear transform gives the start; Gauss-Newton then minimises
    the weighted squared distances in ``dst`` (the geometric error, which the DLT's
    algebraic error only approximates).
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    w = _weights(weights, len(src))
    ns, nd = _normaliser(src), _normaliser(dst)
    s, d = _apply(ns, src), _apply(nd, dst)
    n = len(s)
    x, y = s[:, 0], s[:, 1]
    u, v = d[:, 0], d[:, 1]
    zero, one = np.zeros(n), np.ones(n)
    rows = np.concatenate([
        np.column_stack([x, y, one, zero, zero, zero, -u * x, -u * y, -u]),
        np.column_stack([zero, zero, zero, x, y, one, -v * x, -v * y, -v]),
    ]) * np.sqrt(np.concatenate([w, w]))[:, None]
    _, _, vt = np.linalg.svd(rows, full_matrices=False)
    h = vt[-1] / vt[-1, -1]
    # Gauss-Newton on h[0:8] with h[8] = 1 (a frame -> reference map never sends a
    # point near the frame to infinity, so this parametrisation is safe).
    sw = np.sqrt(w)
    for _ in range(iterations):
        den = h[6] * x + h[7] * y + 1.0
        pu = (h[0] * x + h[1] * y + h[2]) / den
        pv = (h[3] * x + h[4] * y + h[5]) / den
        j = np.zeros((2 * n, 8))
        j[:n, 0], j[:n, 1], j[:n, 2] = x / den, y / den, 1.0 / den
        j[n:, 3], j[n:, 4], j[n:, 5] = x / den, y / den, 1.0 / den
        j[:n, 6], j[:n, 7] = -pu * x / den, -pu * y / den
        j[n:, 6], j[n:, 7] = -pv * x / den, -pv * y / den
        r = np.concatenate([u - pu, v - pv])
        sw2 = np.concatenate([sw, sw])
        step, *_ = np.linalg.lstsq(j * sw2[:, None], r * sw2, rcond=None)
        h[:8] += step
        if np.max(np.abs(step)) < 1e-13:
            break
    m = h.reshape(3, 3)
    m = np.linalg.inv(nd) @ m @ ns
    return m / m[2, 2]


def fit_model(model: str, src, dst, weights=None, mirror: bool = False) -> np.ndarray:
    """Fit ``model`` (``"similarity"``, ``"affine"`` or ``"homography"``) mapping ``src`` to
    ``dst``; returns the 3x3 matrix. ``mirror`` only matters for the similarity (the
    other models fit a reflection by themselves)."""
    if model == "similarity":
        return fit_similarity(src, dst, weights, mirror=mirror)
    if model == "affine":
        return fit_affine(src, dst, weights)
    if model == "homography":
        return fit_homography(src, dst, weights)
    raise ValueError(f"model={model!r}: expected one of {', '.join(MODELS)}")


def residuals(matrix, src, dst) -> np.ndarray:
    """``(n, 2)`` residuals ``dst - matrix(src)``."""
    return np.asarray(dst, np.float64) - _apply(matrix, np.asarray(src, np.float64))


# ----------------------------------------------------------------- surface spline
def _tps_kernel(r2):
    """Thin-plate radial function ``r^2 log r`` written on ``r^2`` (0 at r = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        k = 0.5 * r2 * np.log(r2)
    return np.where(r2 > 0, k, 0.0)


class SurfaceSpline:
    """A smoothed thin-plate spline displacement field ``(x, y) -> (dx, dy)``.

    ``f(p) = a0 + a1 x + a2 y + sum_i c_i phi(|p - p_i|)``, ``phi(r) = r^2 log r``, on
    coordinates normalised by ``centre`` and ``length`` (so the smoothing does not depend on
    the frame size). The fit minimises
    ``sum_i w_i |d_i - f(p_i)|^2 + smoothing * bending energy``.

    Large point sets (pixel grids for drizzle) are evaluated through a bicubic
    interpolation of the spline sampled every ``grid_step`` px over ``domain``: the
    direct sum costs ``n_points x n_controls`` kernel evaluations (seconds per frame),
    the interpolation is well below 1e-3 px from it for the smooth fields a smoothed
    spline gives.

    Parameters
    ----------
    points : (n, 2) float64
        Control points (pixels).
    coeffs : (n, 2) float64
        Kernel coefficients ``c_i`` for dx and dy.
    affine : (3, 2) float64
        Polynomial part ``a0, a1, a2`` for dx and dy.
    centre, length : (2,) float64, float
        Normalisation ``q = (p - centre) / length``.
    domain : (x0, y0, x1, y1), optional
        Box (pixels) over which large evaluations may use the interpolation grid.
    """

    DIRECT_MAX = 20000
    grid_step = 8.0

    def __init__(self, points, coeffs, affine, centre, length, domain=None):
        self.points = np.asarray(points, np.float64)
        self.coeffs = np.asarray(coeffs, np.float64)
        self.affine = np.asarray(affine, np.float64)
        self.centre = np.asarray(centre, np.float64)
        self.length = float(length)
        self.domain = None if domain is None else tuple(float(v) for v in domain)
        self._q = (self.points - self.centre) / self.length
        self._grid = None

    # -- fitting
    @classmethod
    def fit(cls, points, displacements, weights=None, smoothing: float = 1.0, centre=None, length=None,
            domain=None) -> "SurfaceSpline":
        """Fit a smoothed thin-plate spline to displacements at control points.

        Parameters
        ----------
        points : (n, 2)
            Control points (pixels).
        displacements : (n, 2)
            Displacement to reproduce at each point (pixels).
        weights : (n,), optional
            Inverse variances of the displacements (1/px^2); default 1.
        smoothing : float
            Bending-energy weight ``lambda``, in units where the weights are
            inverse variances in pixels: larger is smoother. 0 interpolates.
        centre, length : optional
            Normalisation; default the points' bounding-box centre and size.
        """
        p = np.asarray(points, np.float64)
        d = np.asarray(displacements, np.float64)
        n = len(p)
        w = _weights(weights, n)
        if centre is None:
            centre = 0.5 * (p.min(0) + p.max(0))
        if length is None:
            length = max(float(np.max(p.max(0) - p.min(0))), 1.0)
        q = (p - np.asarray(centre)) / length
        r2 = np.sum((q[:, None, :] - q[None, :, :]) ** 2, axis=-1)
        k = _tps_kernel(r2)
        # Smoothing spline normal form: (K + lambda W^-1) c + P a = d, P^T c = 0.
        k[np.diag_indices(n)] += smoothing / w
        pm = np.column_stack([np.ones(n), q])
        a = np.zeros((n + 3, n + 3))
        a[:n, :n] = k
        a[:n, n:] = pm
        a[n:, :n] = pm.T
        rhs = np.zeros((n + 3, 2))
        rhs[:n] = d
        try:
            sol = np.linalg.solve(a, rhs)
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
        return cls(p, sol[:n], sol[n:], centre, length, domain)

    # -- evaluation
    def _direct(self, x, y):
        qx = (np.ravel(x) - self.centre[0]) / self.length
        qy = (np.ravel(y) - self.centre[1]) / self.length
        out = np.empty((qx.size, 2))
        step = max(1, 2_000_000 // max(len(self._q), 1))  # bounded temporary memory
        for s in range(0, qx.size, step):
            ex, ey = qx[s:s + step], qy[s:s + step]
            r2 = (ex[:, None] - self._q[None, :, 0]) ** 2 + (ey[:, None] - self._q[None, :, 1]) ** 2
            out[s:s + step] = _tps_kernel(r2) @ self.coeffs
            out[s:s + step] += self.affine[0] + ex[:, None] * self.affine[1] + ey[:, None] * self.affine[2]
        return out

    def _grid_interpolators(self):
        if self._grid is None:
            from scipy.interpolate import RectBivariateSpline

            x0, y0, x1, y1 = self.domain
            gx = np.arange(x0, x1 + self.grid_step, self.grid_step)
            gy = np.arange(y0, y1 + self.grid_step, self.grid_step)
            xx, yy = np.meshgrid(gx, gy)
            vals = self._direct(xx, yy).reshape(gy.size, gx.size, 2)
            self._grid = (gx[0], gx[-1], gy[0], gy[-1],
                          RectBivariateSpline(gy, gx, vals[..., 0], kx=3, ky=3, s=0),
                          RectBivariateSpline(gy, gx, vals[..., 1], kx=3, ky=3, s=0))
        return self._grid

    def displacement(self, x, y):
        """Displacement ``(dx, dy)`` at points ``(x, y)`` (arrays of any matching shape)."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        shape = np.broadcast(x, y).shape
        x, y = np.broadcast_to(x, shape).ravel(), np.broadcast_to(y, shape).ravel()
        out = np.full((x.size, 2), np.nan)
        finite = np.isfinite(x) & np.isfinite(y)
        if self.domain is not None and finite.sum() > self.DIRECT_MAX:
            gx0, gx1, gy0, gy1, sx, sy = self._grid_interpolators()
            ingrid = finite & (x >= gx0) & (x <= gx1) & (y >= gy0) & (y <= gy1)
            if ingrid.any():
                out[ingrid, 0] = sx.ev(y[ingrid], x[ingrid])
                out[ingrid, 1] = sy.ev(y[ingrid], x[ingrid])
            rest = finite & ~ingrid
        else:
            rest = finite
        if rest.any():
            out[rest] = self._direct(x[rest], y[rest])
        return out[:, 0].reshape(shape), out[:, 1].reshape(shape)

    def __call__(self, x, y):
        """Corrected coordinates ``(x + dx, y + dy)``."""
        dx, dy = self.displacement(x, y)
        return np.asarray(x, np.float64) + dx, np.asarray(y, np.float64) + dy


class DistortionCorrection:
    """Forward and inverse surface-spline correction in reference coordinates.

    ``forward(p) = p + f(p)`` with ``f`` a :class:`SurfaceSpline` fitted at the
    homography-mapped star positions; ``inverse(q)`` starts from a second spline
    ``g`` fitted the other way (``q + g(q)``) and polishes it with fixed-point steps
    ``u <- q - f(u)`` so that ``forward(inverse(q)) == q`` to ~1e-6 px. The iteration
    converges because a distortion's gradient is far below 1.
    """

    def __init__(self, forward: SurfaceSpline, inverse: SurfaceSpline, polish: int = 3):
        self.forward_spline = forward
        self.inverse_spline = inverse
        self.polish = polish

    def forward(self, x, y):
        return self.forward_spline(x, y)

    def inverse(self, x, y):
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        ux, uy = self.inverse_spline(x, y)
        for _ in range(self.polish):
            dx, dy = self.forward_spline.displacement(ux, uy)
            ux, uy = x - dx, y - dy
        return ux, uy
