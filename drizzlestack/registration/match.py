"""Matching a frame's stars to the reference's, and fitting the frame -> reference model.

1. **Pattern matching** (:func:`find_similarity`): triangles are formed from each of
   the brightest stars and pairs of its nearest bright neighbours; a triangle's shape
   is described by two side ratios, which do not change under shifts, rotations, scale
   changes and reflections. Triangles of the frame and of the reference with nearly
   equal ratios each propose a similarity transform (RANSAC hypotheses); the one that
   brings the most bright frame stars onto reference stars wins. Vertices are labelled
   by the length of the opposite side, so each triangle pair gives three point pairs;
   the sign of the triangle's orientation tells a reflection apart, which is allowed
   only with ``mirror=True``.
2. **Refinement** (:func:`align_stars`): every star is mapped with the current model,
   paired with its mutual nearest neighbour in the reference within a radius that
   shrinks as the fit improves, and the model is refitted by weighted least squares
   (weights from each star's expected centroid error), with outliers clipped; the final
   model is fitted on all surviving pairs. Optionally a smoothed surface spline is
   fitted to what the homography leaves (optical distortion).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from ..geometry import apply_homography
from .models import MIN_POINTS, DistortionCorrection, SurfaceSpline, fit_model
from .stars import FIELDS, FLAG_NOFIT, position_sigma

_F = {name: i for i, name in enumerate(FIELDS)}


# ------------------------------------------------------------------ triangles
@dataclass
class Triangles:
    """Triangles of a point set: vertex indices ordered by the opposite side's length
    (shortest first), shape invariants, orientation."""

    vertices: np.ndarray  # (t, 3) int
    invariants: np.ndarray  # (t, 2): shortest/longest, middle/longest
    orientation: np.ndarray  # (t,) +1 / -1


def triangles(xy: np.ndarray, neighbours: int = 5, min_side: float = 5.0, margin: float = 0.02) -> Triangles:
    """Triangles formed by each point and every pair of its ``neighbours`` nearest points.

    Triangles with a side shorter than ``min_side`` px (centroid noise dominates their
    shape) or with two sides within ``margin`` of each other (their vertex labelling is
    ambiguous) are left out.
    """
    n = len(xy)
    if n < 3:
        return Triangles(np.empty((0, 3), int), np.empty((0, 2)), np.empty(0))
    k = min(neighbours, n - 1)
    _, nb = cKDTree(xy).query(xy, k + 1)
    pairs = np.array(list(itertools.combinations(range(1, k + 1), 2)))
    tri = np.concatenate([np.column_stack([np.arange(n), nb[:, a], nb[:, b]]) for a, b in pairs])
    tri = np.unique(np.sort(tri, axis=1), axis=0)
    p = xy[tri]  # (t, 3, 2)
    sides = np.stack([np.hypot(*(p[:, 1] - p[:, 2]).T), np.hypot(*(p[:, 0] - p[:, 2]).T),
                      np.hypot(*(p[:, 0] - p[:, 1]).T)], axis=1)  # side opposite each vertex
    order = np.argsort(sides, axis=1)
    tri = np.take_along_axis(tri, order, axis=1)
    sides = np.take_along_axis(sides, order, axis=1)
    p = xy[tri]
    d1, d2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    orient = np.sign(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0])
    longest = sides[:, 2]
    good = (sides[:, 0] >= min_side) & (sides[:, 1] - sides[:, 0] > margin * longest) & \
        (sides[:, 2] - sides[:, 1] > margin * longest) & (orient != 0)
    inv = np.column_stack([sides[:, 0] / longest, sides[:, 1] / longest])
    return Triangles(tri[good], inv[good], orient[good])


def _similarities(zs, zd, reflect):
    """Least-squares similarities ``zd ~ alpha * zs + beta`` (complex, per row), with ``zs``
    conjugated where ``reflect``; returns alpha, beta and the max residual."""
    zs = np.where(reflect[:, None], np.conj(zs), zs)
    a = zs - zs.mean(axis=1, keepdims=True)
    b = zd - zd.mean(axis=1, keepdims=True)
    alpha = np.sum(np.conj(a) * b, axis=1) / np.sum(np.abs(a) ** 2, axis=1)
    beta = zd.mean(axis=1) - alpha * zs.mean(axis=1)
    resid = np.max(np.abs(alpha[:, None] * zs + beta[:, None] - zd), axis=1)
    return alpha, beta, resid


def _matrix(alpha, beta, reflect) -> np.ndarray:
    m = np.array([[alpha.real, -alpha.imag, beta.real], [alpha.imag, alpha.real, beta.imag], [0.0, 0.0, 1.0]])
    if reflect:
        m = m @ np.diag([1.0, -1.0, 1.0])  # conj(z): y -> -y before the rotation
    return m


@dataclass
class PatternMatch:
    """Outcome of :func:`find_similarity`."""

    matrix: np.ndarray | None  # frame -> reference similarity, None if nothing found
    inliers: int = 0  # bright frame stars landing on a reference star
    mirrored: bool = False
    hypotheses: int = 0  # hypotheses verified
    required: int = 0  # inliers needed to beat chance (see :func:`required_inliers`)

    @property
    def found(self) -> bool:
        return self.matrix is not None and self.inliers >= self.required


def find_similarity(src, dst, mirror: bool = False, only_mirrored: bool = False, scale_range=(0.8, 1.25),
                    tolerance: float = 3.0, neighbours: int = 5, max_hypotheses: int = 4000,
                    invariant_tolerance: float = 0.01, good_enough: int | None = None) -> PatternMatch:
    """Similarity mapping the point set ``src`` (frame) onto ``dst`` (reference), by
    triangle matching and hypothesis verification.

    Parameters
    ----------
    src, dst : (n, 2), (m, 2) float64
        Positions of the *brightest* stars of each (a few tens to a hundred or two).
    mirror : bool
        Also consider reflections (a frame flipped left-right or up-down).
    only_mirrored : bool
        Consider only reflections (to diagnose a flipped frame).
    scale_range : (float, float)
        Accepted range of the similarity's scale.
    tolerance : float
        Distance (px) within which a mapped frame star counts as landing on a reference star.
    invariant_tolerance : float
        Radius in the space of triangle side ratios within which triangles match.
    good_enough : int, optional
        Stop verifying hypotheses once one brings this many stars in.

    Returns
    -------
    PatternMatch
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    ts, td = triangles(src, neighbours), triangles(dst, neighbours)
    if len(ts.vertices) == 0 or len(td.vertices) == 0:
        return PatternMatch(None)
    kq = 6
    dist, idx = cKDTree(td.invariants).query(ts.invariants, k=kq, distance_upper_bound=invariant_tolerance)
    fi, col = np.nonzero(np.isfinite(dist))
    ri = idx[fi, col]
    if fi.size == 0:
        return PatternMatch(None)
    reflect = ts.orientation[fi] != td.orientation[ri]
    allowed = reflect if only_mirrored else (np.ones_like(reflect) if mirror else ~reflect)
    order = np.argsort(dist[fi, col][allowed], kind="stable")
    fi, ri, reflect = fi[allowed][order], ri[allowed][order], reflect[allowed][order]
    if fi.size == 0:
        return PatternMatch(None)
    zs_all = src[:, 0] + 1j * src[:, 1]
    zd_all = dst[:, 0] + 1j * dst[:, 1]
    alpha, beta, resid = _similarities(zs_all[ts.vertices[fi]], zd_all[td.vertices[ri]], reflect)
    scale = np.abs(alpha)
    size = np.max(np.abs(zd_all[td.vertices[ri]] - zd_all[td.vertices[ri]].mean(axis=1, keepdims=True)), axis=1)
    ok = (scale >= scale_range[0]) & (scale <= scale_range[1]) & (resid < 1.0 + 0.01 * size)
    alpha, beta, reflect = alpha[ok][:max_hypotheses], beta[ok][:max_hypotheses], reflect[ok][:max_hypotheses]
    if alpha.size == 0:
        return PatternMatch(None)
    tree = cKDTree(dst)
    good_enough = good_enough or max(12, int(0.4 * min(len(src), len(dst))))
    best, best_count = -1, 0
    zconj = np.conj(zs_all)
    batch = 256
    tried = 0
    for start in range(0, alpha.size, batch):
        sl = slice(start, start + batch)
        z = np.where(reflect[sl, None], zconj[None, :], zs_all[None, :])
        mapped = alpha[sl, None] * z + beta[sl, None]
        d, j = tree.query(np.column_stack([mapped.real.ravel(), mapped.imag.ravel()]),
                          distance_upper_bound=tolerance)
        hit = np.isfinite(d).reshape(mapped.shape)
        # Count distinct reference stars hit, so one hypothesis cannot score by piling
        # several frame stars onto one reference star.
        j = np.where(hit, j.reshape(mapped.shape), -1)
        js = np.sort(j, axis=1)
        counts = np.sum((js[:, 1:] != js[:, :-1]) & (js[:, 1:] >= 0), axis=1) + (js[:, 0] >= 0)
        tried += counts.size
        k = int(np.argmax(counts))
        if counts[k] > best_count:
            best, best_count = start + k, int(counts[k])
        if best_count >= good_enough:
            break
    required = required_inliers(src, dst, tolerance, tried)
    if best < 0:
        return PatternMatch(None, hypotheses=tried, required=required)
    return PatternMatch(_matrix(alpha[best], beta[best], bool(reflect[best])), best_count, bool(reflect[best]),
                        tried, required)


def required_inliers(src, dst, tolerance: float, hypotheses: int, false_alarm: float = 1e-3) -> int:
    """Inliers a hypothesis needs so that, over all ``hypotheses`` tried, a wrong one
    reaches it by chance with probability below ``false_alarm``.

    A wrong hypothesis still brings in its own triangle (3 stars); each other frame star
    lands within ``tolerance`` of some reference star with probability
    ``density * pi * tolerance^2``, so the extra count is Poisson with mean
    ``lam = n_src * density * pi * tolerance^2``.
    """
    area = float(np.prod(np.ptp(dst, axis=0) + 2 * tolerance)) if len(dst) > 1 else 1.0
    lam = len(src) * len(dst) / area * np.pi * tolerance ** 2
    k = 1
    while max(hypotheses, 1) * _poisson_tail(k, lam) >= false_alarm and k < len(src):
        k += 1
    return 3 + k


def _poisson_tail(k: int, lam: float) -> float:
    """P(X >= k) for X ~ Poisson(lam), summed over the upper tail (no cancellation;
    and no scipy.stats import, which costs a second)."""
    if lam <= 0:
        return 0.0 if k > 0 else 1.0
    term = math.exp(-lam + k * math.log(lam) - math.lgamma(k + 1))
    total, j = 0.0, k
    while term > 1e-18 * max(total, 1e-300) and j < k + 10_000:
        total += term
        j += 1
        term *= lam / j
    return min(total, 1.0)


# ------------------------------------------------------------------ refinement
def mutual_pairs(a: np.ndarray, b: np.ndarray, radius: float, tree_b: cKDTree | None = None):
    """Index pairs ``(i, j)`` such that ``b[j]`` is ``a[i]``'s nearest neighbour within
    ``radius`` and ``a[i]`` is ``b[j]``'s nearest among ``a``."""
    tree_b = tree_b or cKDTree(b)
    finite = np.all(np.isfinite(a), axis=1)
    ia = np.flatnonzero(finite)
    if ia.size == 0 or len(b) == 0:
        return np.empty(0, int), np.empty(0, int)
    d, j = tree_b.query(a[ia], distance_upper_bound=radius)
    hit = np.isfinite(d)
    ia, j, d = ia[hit], j[hit], d[hit]
    if ia.size == 0:
        return ia, j
    # keep, for every b, only the closest a
    order = np.lexsort((d, j))
    first = np.ones(order.size, bool)
    first[1:] = j[order][1:] != j[order][:-1]
    sel = order[first]
    return ia[sel], j[sel]


@dataclass
class Alignment:
    """Frame -> reference registration of one frame (the result of :func:`align_stars`)."""

    matrix: np.ndarray | None = None
    correction: DistortionCorrection | None = None
    n_matches: int = 0
    rms: float = np.nan  # px, unweighted RMS of the final residuals
    status: str = "ok"
    mirrored: bool = False
    pairs: np.ndarray = field(default_factory=lambda: np.empty((0, 2), int))  # (frame star, reference star)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _map(matrix, correction, xy):
    x, y = apply_homography(matrix, xy[:, 0], xy[:, 1])
    if correction is not None:
        x, y = correction.forward(x, y)
    return np.column_stack([x, y])


def _robust_sigma(res: np.ndarray) -> float:
    """Per-axis scatter of 2-D residuals from their median norm (Rayleigh: median = 1.1774 s)."""
    return float(np.median(np.hypot(res[:, 0], res[:, 1])) / 1.1774) if len(res) else np.inf


def align_stars(src_table: np.ndarray, dst_table: np.ndarray, model: str = "homography", mirror: bool = False,
                distortion: bool = False, min_matches: int = 6, frame_shape=None, scale_range=(0.8, 1.25),
                n_bright=(50, 120, 250), smoothing: float | str = "auto", sigma_floor: float = 0.01,
                max_controls: int = 400) -> Alignment:
    """Register a frame's star table to the reference's.

    Parameters
    ----------
    src_table, dst_table : (n, 7) float64
        Star tables (columns :data:`~drizzlestack.registration.stars.FIELDS`, brightest
        first) of the frame and of the reference.
    model : {"homography", "affine", "similarity"}
        Frame -> reference model.
    mirror : bool
        Accept a reflected frame.
    distortion : bool
        Fit a surface-spline correction on top of the model.
    min_matches : int
        Fewest matched stars for a registration to count.
    frame_shape : (ny, nx), optional
        Frame size; sets the domain of the spline's fast evaluation grid.
    scale_range : (float, float)
        Accepted frame -> reference scale.
    n_bright : sequence of int
        Numbers of brightest stars tried in turn for pattern matching (a frame that
        overlaps the reference little may need more).
    smoothing : float or "auto"
        Surface-spline smoothing (see :meth:`~drizzlestack.registration.models.SurfaceSpline.fit`).
    sigma_floor : float
        Systematic per-star position error (px) added in quadrature to the
        photon-noise estimate when weighting, so bright stars do not dominate.
    max_controls : int
        Most control points for the spline (the best measured matches).

    Returns
    -------
    Alignment
        ``status`` is ``"ok"`` or ``"unregistered: <why>"``.
    """
    need = max(int(min_matches), MIN_POINTS.get(model, 4), 3)
    if len(src_table) < need:
        return Alignment(status=f"unregistered: {len(src_table)} star(s) detected ({need} needed)")
    if len(dst_table) < need:
        return Alignment(status=f"unregistered: reference has only {len(dst_table)} star(s)")
    src_xy, dst_xy = src_table[:, :2], dst_table[:, :2]
    usable_src = (src_table[:, _F["flags"]].astype(int) & FLAG_NOFIT) == 0
    fwhm = np.nanmedian(np.r_[src_table[:, _F["fwhm"]], dst_table[:, _F["fwhm"]]])
    tolerance = float(max(3.0, 2.0 * fwhm))

    # 1. pattern matching on the brightest stars, with more stars if that fails
    pm = PatternMatch(None)
    for nb in n_bright:
        pm = find_similarity(src_xy[:nb], dst_xy[: int(1.5 * nb)], mirror=mirror, scale_range=scale_range,
                             tolerance=tolerance)
        if pm.found or nb >= min(len(src_xy), len(dst_xy)):
            break
    if not pm.found:
        found = 0 if pm.matrix is None else pm.inliers
        return _failure(f"no star pattern in common with the reference (best candidate {found} star(s), "
                        f"{max(pm.required, need)} needed); another field?", src_xy, dst_xy, mirror, n_bright[0],
                        scale_range, tolerance)

    # 2. refinement on all stars
    sig_src, sig_dst = position_sigma(src_table), position_sigma(dst_table)
    sig_src = np.where(usable_src, sig_src, np.inf)
    tree = cKDTree(dst_xy)
    if frame_shape is not None:
        ny, nx = frame_shape
    else:
        nx, ny = np.nanmax(src_xy, axis=0) + 1
    corners = np.array([[-0.5, -0.5], [nx - 0.5, -0.5], [nx - 0.5, ny - 0.5], [-0.5, ny - 0.5]])
    state = _Refine(src_xy, dst_xy, sig_src, sig_dst, sigma_floor, tree, need, pm.mirrored)
    matrix, correction = pm.matrix, None
    radius = tolerance
    ii = jj = np.empty(0, int)
    # 2a. the model alone, from the similarity; the first two rounds fit a similarity or
    # an affine transform, which a few wrong pairs at a wide radius cannot bend much.
    for iteration in range(10):
        kind = model if iteration >= 2 else ("similarity" if model == "similarity" else "affine")
        step = state.round(matrix, None, radius, kind)
        if step is None:
            break
        matrix, _corr, ii, jj, s_rob = step
        new_radius = float(np.clip(5.0 * s_rob, 0.5, radius))
        if iteration >= 3 and new_radius >= 0.95 * radius:
            break
        radius = new_radius
    # 2b. the surface spline on what the model leaves, re-pairing with the full mapping;
    # the smoothing is chosen once (cross-validation) and then kept.
    if distortion and ii.size >= max(20, need):
        lam = smoothing
        for iteration in range(2):
            step = state.round(matrix, correction, radius, model,
                               spline=dict(smoothing=lam, max_controls=max_controls, corners=corners))
            if step is None:
                break
            matrix, correction, ii, jj, s_rob = step
            lam = correction.forward_spline.smoothing
            radius = float(np.clip(5.0 * s_rob, 0.5, radius))
        if correction is not None:
            correction = _with_inverse(correction)

    if ii.size < need:
        return Alignment(status=f"unregistered: {ii.size} star(s) matched ({need} needed)")
    res = dst_xy[jj] - _map(matrix, correction, src_xy[ii])
    rms = float(np.sqrt(np.mean(np.sum(res ** 2, axis=1))))
    # A solution must beat chance: pairs that random star positions would give within
    # the final radius (dense fields, or a wrong pattern that refinement "grew").
    overlap = _in_box(_map(matrix, correction, src_xy), dst_xy)
    area = float(np.prod(np.ptp(dst_xy, axis=0) + 1.0))
    expected = overlap * len(dst_xy) / area * np.pi * radius ** 2
    if ii.size < expected + 5.0 * np.sqrt(expected) + need:
        return _failure(f"{ii.size} matches are not above chance ({expected:.0f} expected at random); "
                        "another field?", src_xy, dst_xy, mirror, n_bright[0], scale_range, tolerance)
    det = np.linalg.det(matrix[:2, :2])
    scale = np.sqrt(abs(det))
    if not scale_range[0] <= scale <= scale_range[1]:
        return Alignment(status=f"unregistered: fitted scale {scale:.3f} outside {scale_range}")
    if det < 0 and not mirror:
        return Alignment(status="unregistered: frame is mirrored (flipped) relative to the reference; "
                                "register with mirror=True to accept it", mirrored=True)
    return Alignment(matrix, correction, int(ii.size), rms, "ok", bool(det < 0), np.column_stack([ii, jj]))


def _failure(why, src_xy, dst_xy, mirror, nb, scale_range, tolerance) -> Alignment:
    """The failed alignment's status; a frame that matches only when mirrored says so."""
    if not mirror:
        flipped = find_similarity(src_xy[:nb], dst_xy[: int(1.5 * nb)], only_mirrored=True,
                                  scale_range=scale_range, tolerance=tolerance)
        if flipped.found:
            return Alignment(status="unregistered: frame is mirrored (flipped) relative to the reference; "
                                    "register with mirror=True to accept it", mirrored=True)
    return Alignment(status=f"unregistered: {why}")


def _in_box(xy, ref_xy) -> int:
    lo, hi = np.nanmin(ref_xy, axis=0), np.nanmax(ref_xy, axis=0)
    inside = np.all((xy >= lo) & (xy <= hi), axis=1)
    return int(inside.sum())


class _Refine:
    """One refinement round: pair stars through the current mapping, fit, clip, refit."""

    def __init__(self, src, dst, sig_src, sig_dst, floor, tree, need, mirrored):
        self.src, self.dst, self.tree, self.need, self.mirrored = src, dst, tree, need, mirrored
        self.sig_src, self.sig_dst, self.floor = sig_src, sig_dst, floor

    def round(self, matrix, correction, radius, kind, spline=None):
        pred = _map(matrix, correction, self.src)
        pred[~np.isfinite(self.sig_src)] = np.nan
        ii, jj = mutual_pairs(pred, self.dst, radius, self.tree)
        if ii.size < self.need:
            return None
        sig_pair = np.sqrt(self.sig_src[ii] ** 2 + self.sig_dst[jj] ** 2)
        w = 1.0 / (sig_pair ** 2 + self.floor ** 2)
        keep = np.ones(ii.size, bool)
        # fit, clip outliers, refit (a spline fit costs far more than the model's, and
        # two passes are enough once the pairs come from a converged model)
        for _clip in range(2 if spline is not None else 4):
            m = fit_model(kind, self.src[ii[keep]], self.dst[jj[keep]], w[keep], mirror=self.mirrored)
            corr = None
            if spline is not None:
                corr = _fit_forward(m, self.src[ii[keep]], self.dst[jj[keep]], w[keep], **spline)
            res = self.dst[jj] - _map(m, corr, self.src[ii])
            s_rob = _robust_sigma(res[keep])
            new_keep = np.hypot(res[:, 0], res[:, 1]) <= 4.0 * np.maximum(s_rob, sig_pair)
            if new_keep.sum() < self.need or np.array_equal(new_keep, keep):
                break
            keep = new_keep
            if spline is not None:
                spline = dict(spline, smoothing=corr.forward_spline.smoothing)
        return m, corr, ii[keep], jj[keep], s_rob


def _fit_forward(matrix, src, dst, w, smoothing, max_controls, corners) -> DistortionCorrection:
    """Forward surface spline for what ``matrix`` leaves of ``src -> dst`` (inverse added
    by :func:`_with_inverse` once the fit has settled)."""
    p = np.column_stack(apply_homography(matrix, src[:, 0], src[:, 1]))
    d = dst - p
    if len(p) > max_controls:
        sel = np.argsort(-w, kind="stable")[:max_controls]
        p, d, w = p[sel], d[sel], w[sel]
    fx, fy = apply_homography(matrix, corners[:, 0], corners[:, 1])
    margin = 16.0
    domain = (fx.min() - margin, fy.min() - margin, fx.max() + margin, fy.max() + margin)
    centre = np.array([0.5 * (domain[0] + domain[2]), 0.5 * (domain[1] + domain[3])])
    length = max(domain[2] - domain[0], domain[3] - domain[1])
    fwd = SurfaceSpline.fit(p, d, w, smoothing, centre, length, domain)
    fwd.weights = w
    return DistortionCorrection(fwd, None)


def _with_inverse(correction: DistortionCorrection) -> DistortionCorrection:
    """Add the inverse spline, fitted at the corrected control points ``q = p + f(p)``
    to ``-f(p)``: it describes the same field as the forward spline (not the stars'
    noise again), and the fixed-point polish makes it exact."""
    fwd = correction.forward_spline
    p = fwd.points
    q = p + np.column_stack(fwd.displacement(p[:, 0], p[:, 1]))
    inv = SurfaceSpline.fit(q, p - q, fwd.weights, fwd.smoothing, fwd.centre, fwd.length, fwd.domain)
    return DistortionCorrection(fwd, inv)
