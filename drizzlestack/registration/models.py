"""Geometric models fitted to matched stars: similarity, affine, projective homography,
and a smoothed thin-plate (surface) spline for optical distortion.

All fits are weighted least squares of the positions in the *reference* frame
(``dst``) predicted from the frame positions (``src``): the quantity drizzle cares
about. Coordinates are normalised (centred, scaled to unit size) before fitting so the
normal equations stay well conditioned for frames of any size.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.linalg

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
    a = np.column_stack([s, np.ones(len(s))])
    aw = a * w[:, None]
    # normal equations: 3x3 after normalisation, well conditioned (and no LAPACK SVD)
    coef = np.linalg.solve(aw.T @ a, aw.T @ d)
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
    # The null vector of the DLT system from its 9x9 normal matrix: after Hartley's
    # normalisation it is well conditioned, and the Gauss-Newton polish below removes
    # what squaring the condition number costs. (An SVD of the 2n x 9 system is ~10x
    # slower and this runs inside the refinement loop.)
    _, vecs = np.linalg.eigh(rows.T @ rows)
    h = vecs[:, 0] / vecs[-1, 0]
    # Gauss-Newton on h[0:8] with h[8] = 1 (a frame -> reference map never sends a
    # point near the frame to infinity, so this parametrisation is safe).
    sw2 = np.concatenate([np.sqrt(w), np.sqrt(w)])
    for _ in range(iterations):
        den = h[6] * x + h[7] * y + 1.0
        pu = (h[0] * x + h[1] * y + h[2]) / den
        pv = (h[3] * x + h[4] * y + h[5]) / den
        j = np.zeros((2 * n, 8))
        j[:n, 0], j[:n, 1], j[:n, 2] = x / den, y / den, 1.0 / den
        j[n:, 3], j[n:, 4], j[n:, 5] = x / den, y / den, 1.0 / den
        j[:n, 6], j[:n, 7] = -pu * x / den, -pu * y / den
        j[n:, 6], j[n:, 7] = -pv * x / den, -pv * y / den
        r = np.concatenate([u - pu, v - pv]) * sw2
        j *= sw2[:, None]
        step = np.linalg.solve(j.T @ j, j.T @ r)
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
@numba.njit(nogil=True, cache=True)
def _keys_interpolate(nodes, ix, iy, tx, ty, out):
    """Cubic convolution (Keys 1981, a = -1/2) of ``nodes (ny, nx, 2)`` at node cells
    ``(ix, iy)`` and fractions ``(tx, ty)``; writes ``out (n, 2)``."""
    wx = np.empty(4)
    wy = np.empty(4)
    for p in range(ix.size):
        t = tx[p]
        t2 = t * t
        t3 = t2 * t
        wx[0] = 0.5 * (-t3 + 2.0 * t2 - t)
        wx[1] = 0.5 * (3.0 * t3 - 5.0 * t2 + 2.0)
        wx[2] = 0.5 * (-3.0 * t3 + 4.0 * t2 + t)
        wx[3] = 0.5 * (t3 - t2)
        t = ty[p]
        t2 = t * t
        t3 = t2 * t
        wy[0] = 0.5 * (-t3 + 2.0 * t2 - t)
        wy[1] = 0.5 * (3.0 * t3 - 5.0 * t2 + 2.0)
        wy[2] = 0.5 * (-3.0 * t3 + 4.0 * t2 + t)
        wy[3] = 0.5 * (t3 - t2)
        ax = 0.0
        ay = 0.0
        r0 = iy[p] - 1
        c0 = ix[p] - 1
        for m in range(4):
            for k in range(4):
                wk = wy[m] * wx[k]
                ax += wk * nodes[r0 + m, c0 + k, 0]
                ay += wk * nodes[r0 + m, c0 + k, 1]
        out[p, 0] = ax
        out[p, 1] = ay


@numba.njit(nogil=True, cache=True)
def _tps_evaluate(qx, qy, cq, coeffs, affine, out):
    """``out[p] = a0 + a1 qx + a2 qy + sum_i c_i phi(|q_p - q_i|)`` (both components),
    without the ``n_points x n_controls`` temporaries of the numpy expression."""
    for p in range(qx.size):
        ax = affine[0, 0] + affine[1, 0] * qx[p] + affine[2, 0] * qy[p]
        ay = affine[0, 1] + affine[1, 1] * qx[p] + affine[2, 1] * qy[p]
        for i in range(cq.shape[0]):
            dx = qx[p] - cq[i, 0]
            dy = qy[p] - cq[i, 1]
            r2 = dx * dx + dy * dy
            if r2 > 0.0:
                k = 0.5 * r2 * np.log(r2)
                ax += coeffs[i, 0] * k
                ay += coeffs[i, 1] * k
        out[p, 0] = ax
        out[p, 1] = ay


def _tps_kernel(r2):
    """Thin-plate radial function ``r^2 log r`` written on ``r^2`` (0 at r = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        k = 0.5 * r2 * np.log(r2)
    return np.where(r2 > 0, k, 0.0)


#: cross-validation works on at most this many control points (its cost is cubic)
GCV_POINTS = 200


def _gcv_smoothing(kt, pt, dt, max_points: int) -> float:
    """Smoothing minimising the generalised cross-validation score of the weighted
    problem (``kt = D K D``, ``pt = D P``, ``dt = D d``).

    With more than ``max_points`` points, a fixed random subset of ``m`` points is
    used and its optimum scaled by ``n / m``: the data term grows with the number of
    points while the bending energy does not, so at equal fidelity per point the
    optimal weight of the bending energy scales with ``n``.
    """
    n = len(kt)
    if n > max_points:
        sel = np.sort(np.random.default_rng(0).choice(n, max_points, replace=False))
        return _gcv_smoothing(kt[np.ix_(sel, sel)], pt[sel], dt[sel], max_points) * n / max_points
    qm, _ = np.linalg.qr(pt, mode="complete")
    q2 = qm[:, 3:]
    mu, v = np.linalg.eigh(q2.T @ kt @ q2)
    mu = np.maximum(mu, 0.0)
    b = q2 @ v
    e = b.T @ dt
    best = (np.inf, 1.0)
    for lam in np.logspace(-3, 6, 37):
        resid = lam * (b @ (e / (mu + lam)[:, None]))
        trace = np.sum(lam / (mu + lam))
        gcv = n * np.sum(resid ** 2) / max(trace, 1e-12) ** 2
        if gcv < best[0]:
            best = (gcv, lam)
    return float(best[1])


class SurfaceSpline:
    """A smoothed thin-plate spline displacement field ``(x, y) -> (dx, dy)``.

    ``f(p) = a0 + a1 x + a2 y + sum_i c_i phi(|p - p_i|)``, ``phi(r) = r^2 log r``, on
    coordinates normalised by ``centre`` and ``length`` (so the smoothing does not depend on
    the frame size). The fit minimises
    ``sum_i w_i |d_i - f(p_i)|^2 + smoothing * bending energy``.

    Large point sets (pixel grids for drizzle) are evaluated by cubic convolution
    (Keys 1981) from the spline's values on a lattice of nodes every ``grid_step`` px,
    anchored at pixel (0, 0) and computed lazily in blocks that are kept: the direct
    sum costs ``n_points x n_controls`` kernel evaluations (seconds per frame), the
    lattice a few per point. The interpolation is local (4 x 4 nodes), so a point gets
    the same value whatever else is evaluated with it; it differs from the direct sum
    by well under 1e-3 px for the smooth fields a smoothed spline gives (see the tests).

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
        Region (pixels) the spline is meant for (the frame's footprint); kept as
        metadata.
    """

    #: point sets up to this size are evaluated directly
    DIRECT_MAX = 4096
    #: lattice spacing (px) and block size (nodes) of the fast evaluation
    grid_step = 8.0
    block = 16

    def __init__(self, points, coeffs, affine, centre, length, domain=None):
        self.points = np.asarray(points, np.float64)
        self.coeffs = np.asarray(coeffs, np.float64)
        self.affine = np.asarray(affine, np.float64)
        self.centre = np.asarray(centre, np.float64)
        self.length = float(length)
        self.domain = None if domain is None else tuple(float(v) for v in domain)
        self._q = (self.points - self.centre) / self.length
        self._blocks: dict = {}
        self.smoothing = None  # the fitted lambda, when known
        self.weights = None

    # -- fitting
    @classmethod
    def fit(cls, points, displacements, weights=None, smoothing: float | str = "auto", centre=None, length=None,
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
        smoothing : float or "auto"
            Bending-energy weight ``lambda`` (coordinates normalised by ``length``,
            weights in 1/px^2): larger is smoother, 0 interpolates. ``"auto"`` picks it
            by generalised cross-validation (Craven & Wahba 1979) on a logarithmic grid,
            which needs no absolute calibration of the weights.
        centre, length : optional
            Normalisation; default the points' bounding-box centre and size.

        Notes
        -----
        With ``D = diag(sqrt(w))`` the weighted problem is the unweighted one for
        ``D K D``, ``D P``, ``D d``. Writing ``Q2`` for an orthonormal basis of the
        complement of ``D P`` and ``Q2^T D K D Q2 = V diag(mu) V^T``, the kernel
        coefficients are ``D Q2 V (mu + lambda)^-1 V^T Q2^T D d`` and the trace of the
        residual operator is ``sum lambda / (mu + lambda)``: one eigendecomposition
        serves every ``lambda`` of the grid (see :func:`_gcv_smoothing`).
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
        sw = np.sqrt(w)
        kt = _tps_kernel(r2) * sw[:, None] * sw[None, :]
        pt = np.column_stack([np.ones(n), q]) * sw[:, None]
        dt = d * sw[:, None]
        if isinstance(smoothing, str):
            if smoothing != "auto":
                raise ValueError(f"smoothing={smoothing!r}: expected a number or 'auto'")
            smoothing = _gcv_smoothing(kt, pt, dt, GCV_POINTS)
        lam = float(smoothing)
        # (D K D + lambda I) c~ + D P a = D d,  (D P)^T c~ = 0
        a_mat = np.zeros((n + 3, n + 3))
        a_mat[:n, :n] = kt
        a_mat[np.arange(n), np.arange(n)] += lam
        a_mat[:n, n:] = pt
        a_mat[n:, :n] = pt.T
        rhs = np.zeros((n + 3, 2))
        rhs[:n] = dt
        try:  # symmetric indefinite (saddle-point) system
            sol = scipy.linalg.solve(a_mat, rhs, assume_a="sym", check_finite=False)
        except (np.linalg.LinAlgError, ValueError):
            sol = np.linalg.lstsq(a_mat, rhs, rcond=None)[0]
        ct, a = sol[:n], sol[n:]
        spline = cls(p, ct * sw[:, None], a, centre, length, domain)
        spline.smoothing = lam
        return spline

    # -- evaluation
    def _direct(self, x, y):
        qx = (np.ravel(np.asarray(x, np.float64)) - self.centre[0]) / self.length
        qy = (np.ravel(np.asarray(y, np.float64)) - self.centre[1]) / self.length
        out = np.empty((qx.size, 2))
        _tps_evaluate(qx, qy, np.ascontiguousarray(self._q), np.ascontiguousarray(self.coeffs),
                      np.ascontiguousarray(self.affine), out)
        return out

    def _lattice(self, bx0, bx1, by0, by1):
        """Node values ``(ny, nx, 2)`` for node blocks ``[bx0, bx1] x [by0, by1]``."""
        bsz, h = self.block, self.grid_step
        keys = [(by, bx) for by in range(by0, by1 + 1) for bx in range(bx0, bx1 + 1)]
        missing = [k for k in keys if k not in self._blocks]
        if missing:  # one direct evaluation for all missing blocks (per-call overhead adds up)
            off = np.arange(bsz)
            xs = np.concatenate([np.tile((bx * bsz + off) * h, bsz) for _by, bx in missing])
            ys = np.concatenate([np.repeat((by * bsz + off) * h, bsz) for by, _bx in missing])
            vals = self._direct(xs, ys).reshape(len(missing), bsz, bsz, 2)
            for key, v in zip(missing, vals):
                self._blocks[key] = v
        rows = [np.concatenate([self._blocks[(by, bx)] for bx in range(bx0, bx1 + 1)], axis=1)
                for by in range(by0, by1 + 1)]
        return np.concatenate(rows, axis=0)

    def _interpolate(self, x, y):
        h, bsz = self.grid_step, self.block
        gx, gy = x / h, y / h
        ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
        tx, ty = gx - ix, gy - iy
        bx0, bx1 = (int(ix.min()) - 1) // bsz, (int(ix.max()) + 2) // bsz
        by0, by1 = (int(iy.min()) - 1) // bsz, (int(iy.max()) + 2) // bsz
        nodes = self._lattice(bx0, bx1, by0, by1)
        out = np.empty((x.size, 2))
        _keys_interpolate(nodes, ix - bx0 * bsz, iy - by0 * bsz, tx, ty, out)
        return out

    def displacement(self, x, y, exact: bool = False):
        """Displacement ``(dx, dy)`` at points ``(x, y)`` (arrays of any matching shape).

        ``exact=True`` forces the direct sum (used while fitting).
        """
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        shape = np.broadcast(x, y).shape
        x, y = np.broadcast_to(x, shape).ravel(), np.broadcast_to(y, shape).ravel()
        out = np.full((x.size, 2), np.nan)
        finite = np.isfinite(x) & np.isfinite(y)
        if finite.any():
            if exact or finite.sum() <= self.DIRECT_MAX:
                out[finite] = self._direct(x[finite], y[finite])
            else:
                out[finite] = self._interpolate(x[finite], y[finite])
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
