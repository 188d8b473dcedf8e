"""Photometric and astrometric fidelity of a drizzled image against the simulator's
truth, and the peer pipeline it is compared with (astroalign + astropy ``sigma_clip`` +
STScI drizzle). Shared by the rejection tests and ``benchmarks/bench_fidelity.py``."""

from __future__ import annotations

import warnings

import numpy as np


def star_positions(truth, reference: int = 0):
    """Truth star positions in the pixels of the frame chosen as the reference."""
    x, y = (np.asarray(truth.stars[k], np.float64) for k in ("x", "y"))
    return truth.reference_to_frame(reference, x, y) if reference else (x, y)


def bright_isolated_stars(truth, ref_shape, n: int = 60, margin: int = 12, max_peak_fraction: float = 0.5,
                          reference: int = 0):
    """Indices of bright, unsaturated, isolated truth stars well inside the field."""
    x, y = star_positions(truth, reference)
    flux = np.asarray(truth.stars["flux"], np.float64)
    sat = np.asarray(truth.stars["saturated"], bool)
    sigma = truth.config.fwhm / 2.3548200450309493
    peak = flux / (2 * np.pi * sigma ** 2)
    ny, nx = ref_shape
    ok = (~sat & (x > margin) & (x < nx - 1 - margin) & (y > margin) & (y < ny - 1 - margin)
          & (peak < max_peak_fraction * truth.config.saturation) & (flux > 2000))
    keep = []
    for k in np.flatnonzero(ok)[np.argsort(-flux[ok])]:
        d = np.hypot(x - x[k], y - y[k])
        if not ((d < 8) & (d > 0) & (flux > 0.01 * flux[k])).any():
            keep.append(k)
        if len(keep) == n:
            break
    return np.array(keep, int)


def measure(image, scale: float, truth, stars, reference: int = 0) -> dict:
    """Aperture fluxes (relative to the truth, before transmission: the reference frame
    has transmission 1) and windowed centroids of ``stars`` in a drizzled ``image``.

    Returns the flux scale (median ratio), the flux scatter (robust standard deviation
    of the ratios), the astrometric scatter (rms offset from the truth, reference
    pixels, after removing the median offset) and the number of stars measured.
    """
    import sep

    x, y = (v[stars] for v in star_positions(truth, reference))
    # Normalized to the reference frame: its transmission sets the flux scale.
    flux = np.asarray(truth.stars["flux"], np.float64)[stars] * truth.transmission[reference]
    xo, yo = scale * (x + 0.5) - 0.5, scale * (y + 0.5) - 0.5
    img = np.ascontiguousarray(np.nan_to_num(image, nan=0.0), dtype=np.float64)
    r_ap, r0, r1 = 4 * scale, 6 * scale, 9 * scale
    half = int(np.ceil(r1)) + 1
    ratios, dx, dy = [], [], []
    for k in range(len(stars)):
        cx, cy = int(round(xo[k])), int(round(yo[k]))
        if cx - half < 0 or cy - half < 0 or cx + half >= img.shape[1] or cy + half >= img.shape[0]:
            continue
        cut = image[cy - half:cy + half + 1, cx - half:cx + half + 1].astype(np.float64)
        gy, gx = np.mgrid[cy - half:cy + half + 1, cx - half:cx + half + 1]
        r = np.hypot(gx - xo[k], gy - yo[k])
        ap, bg = r <= r_ap, (r >= r0) & (r <= r1)
        if not np.isfinite(cut[ap]).all() or np.isfinite(cut[bg]).sum() < 10:
            continue
        sky = np.nanmedian(cut[bg])
        ratios.append((cut[ap].sum() - sky * ap.sum()) / scale ** 2 / flux[k])
        sub = np.ascontiguousarray(img - sky)
        wx, wy, flag = sep.winpos(sub, np.array([xo[k]]), np.array([yo[k]]),
                                  np.array([truth.config.fwhm * scale / 2.3548]))
        if flag[0] == 0:
            dx.append((wx[0] - xo[k]) / scale)
            dy.append((wy[0] - yo[k]) / scale)
    ratios, dx, dy = np.array(ratios), np.array(dx), np.array(dy)
    mad = 1.4826 * np.median(np.abs(ratios - np.median(ratios)))
    astro = np.sqrt(np.mean((dx - np.median(dx)) ** 2 + (dy - np.median(dy)) ** 2))
    return {"flux_scale": float(np.median(ratios)), "flux_scatter": float(mad),
            "flux_std": float(np.std(ratios)), "astrometric_scatter": float(astro), "stars": int(len(ratios))}


def background_excess(image, weights, truth, scale: float, reference: int = 0) -> float:
    """Largest excess of a background pixel over the image's background, in units of
    the background's robust sigma, away from every truth star, galaxy and the edges."""
    from scipy import ndimage

    x, y = star_positions(truth, reference)
    ny, nx = image.shape
    mask = np.zeros(image.shape, bool)
    xo, yo = np.round(scale * (x + 0.5) - 0.5).astype(int), np.round(scale * (y + 0.5) - 0.5).astype(int)
    inside = (xo >= 0) & (xo < nx) & (yo >= 0) & (yo < ny)
    mask[yo[inside], xo[inside]] = True
    mask = ndimage.binary_dilation(mask, iterations=int(6 * scale))
    gy, gx = np.mgrid[0:ny, 0:nx]
    for g in truth.galaxies:
        gxr, gyr = truth.reference_to_frame(reference, np.array([g[0]]), np.array([g[1]])) if reference \
            else (np.array([g[0]]), np.array([g[1]]))
        cx, cy = scale * (gxr[0] + 0.5) - 0.5, scale * (gyr[0] + 0.5) - 0.5
        mask |= np.hypot(gx - cx, gy - cy) < scale * (6 * g[3] + 6)
    good = ~mask & np.isfinite(image) & (weights > 0.5 * np.nanmax(weights))
    edge = int(10 * scale)
    good[:edge], good[-edge:], good[:, :edge], good[:, -edge:] = False, False, False, False
    values = image[good]
    med = np.median(values)
    sig = 1.4826 * np.median(np.abs(values - med))
    # Galaxies (extended, a few per field) are masked by a smooth background: compare
    # each pixel with its local median instead of the global one.
    local = ndimage.median_filter(np.nan_to_num(image, nan=med), size=int(9 * scale) | 1)
    return float(np.max((image - local)[good]) / sig)


def script_pixmap_and_weights(matrix, rejected, scale: float, grid=None):
    """The script's step between clipping and drizzle: the frame's pixmap onto the
    output grid (frame -> reference ``matrix``, then ``scale``) and its weights, zero
    where the nearest reference pixel was clipped (``rejected``, on the reference grid).
    ``grid``: the ``np.indices`` of the frame, computed once for all frames."""
    ny, nx = rejected.shape
    yy, xx = np.indices((ny, nx), dtype=np.float64) if grid is None else grid
    m = matrix
    w = m[2, 0] * xx + m[2, 1] * yy + m[2, 2]
    xr = (m[0, 0] * xx + m[0, 1] * yy + m[0, 2]) / w
    yr = (m[1, 0] * xx + m[1, 1] * yy + m[1, 2]) / w
    ix, iy = np.rint(xr).astype(np.intp), np.rint(yr).astype(np.intp)
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    weight = np.ones((ny, nx), np.float32)
    hit = np.zeros((ny, nx), bool)
    hit[inside] = rejected[iy[inside], ix[inside]]
    weight[hit] = 0.0
    pixmap = np.dstack([scale * (xr + 0.5) - 0.5, scale * (yr + 0.5) - 0.5])
    return pixmap, weight


def peer_pipeline(files, scale: float, pixfrac: float, transforms=None):
    """astroalign registration, astropy ``sigma_clip`` (3 sigma, 5 iterations) of the
    registered stack, each frame's pixel zero-weighted where its nearest reference
    pixel was clipped, STScI drizzle (square kernel). Returns (image, weights).

    ``transforms`` (frame -> frame 0, e.g. the simulator's truth) replace astroalign:
    the script then registers perfectly, a stricter comparison for drizzlestack (and
    astroalign gives up on small fields)."""
    import astroalign as aa
    from astropy.io import fits
    from astropy.stats import sigma_clip
    from drizzle.resample import Drizzle

    frames = [fits.getdata(f).astype(np.float32) for f in files]
    ref = frames[0]
    ny, nx = ref.shape
    n = len(frames)
    stack = np.empty((n, ny, nx), np.float32)
    stack[0] = ref
    given = transforms
    transforms = [np.eye(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(1, n):
            if given is not None:
                from skimage.transform import ProjectiveTransform

                tf = ProjectiveTransform(np.asarray(given[i], np.float64))
            else:
                tf, _ = aa.find_transform(frames[i], ref)
            transforms.append(np.asarray(tf.params, np.float64))
            reg, footprint = aa.apply_transform(tf, frames[i], ref)
            stack[i] = reg
            stack[i][footprint] = np.nan
    clipped = sigma_clip(stack, axis=0, sigma=3, maxiters=5, cenfunc="median", stdfunc="std")
    rejected = np.ma.getmaskarray(clipped) & np.isfinite(stack)
    driz = Drizzle(kernel="square", out_shape=(int(round(scale * ny)), int(round(scale * nx))), disable_ctx=True)
    grid = np.indices((ny, nx), dtype=np.float64)
    for i in range(n):
        pixmap, weight = script_pixmap_and_weights(transforms[i], rejected[i], scale, grid)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            driz.add_image(frames[i], exptime=1.0, pixmap=pixmap, weight_map=weight, pixfrac=pixfrac,
                           in_units="cps", iscale=1.0, pixel_scale_ratio=1.0 / scale)
    return driz.out_img, driz.out_wht


def aperture_fluxes(image, xs, ys, r_in, r_bg0, r_bg1):
    """Aperture sums minus the median of a sky annulus (NaN where cut by an edge or by
    missing data)."""
    out = np.full(len(xs), np.nan)
    half = int(np.ceil(r_bg1)) + 1
    ny, nx = image.shape
    for k, (x, y) in enumerate(zip(xs, ys)):
        cx, cy = int(round(x)), int(round(y))
        if cx - half < 0 or cy - half < 0 or cx + half >= nx or cy + half >= ny:
            continue
        cut = image[cy - half:cy + half + 1, cx - half:cx + half + 1].astype(np.float64)
        gy, gx = np.mgrid[cy - half:cy + half + 1, cx - half:cx + half + 1]
        r = np.hypot(gx - x, gy - y)
        ap, bg = r <= r_in, (r >= r_bg0) & (r <= r_bg1)
        if not np.isfinite(cut[ap]).all() or np.isfinite(cut[bg]).sum() < 10:
            continue
        out[k] = cut[ap].sum() - np.nanmedian(cut[bg]) * ap.sum()
    return out


def nyquist_ratio(image, scale: float = 2.0) -> float:
    """Power at the input grid's Nyquist frequencies (a 2-pixel grid: ``0.5 / scale``
    cycles per output pixel, along x, y and the diagonal) over the mean power of the
    floor around them (the rest of the band 0.8 to 1.6 times that frequency, where
    drizzle's smoothing of the noise is about the same), of an image whose NaN are
    replaced by the mean of their neighbours (a global fill would paint the
    partial-sampling lattice of a few frames as a grid) or its median. A Bayer grid left
    in the image is a spike there. Means, not a maximum over bins: the power of noise in
    one bin scatters by 100 %."""
    from drizzlestack import cfa

    image = np.asarray(image, dtype=np.float64)
    img = np.where(np.isfinite(image), image,
                   cfa._normalized_convolution(image, np.isfinite(image), np.ones((3, 3))))
    img = np.where(np.isfinite(img), img, np.nanmedian(image))
    img = img - img.mean()
    power = np.abs(np.fft.fft2(img)) ** 2
    fy = np.fft.fftfreq(img.shape[0])[:, None]
    fx = np.fft.fftfreq(img.shape[1])[None, :]
    f0 = 0.5 / scale
    near = np.zeros(power.shape, bool)
    for ax, ay in ((f0, 0.0), (0.0, f0), (f0, f0)):
        near |= np.hypot(np.abs(fx) - ax, np.abs(fy) - ay) < 0.012
    band = (np.hypot(np.abs(fx), np.abs(fy)) > 0.8 * f0) & (np.maximum(np.abs(fx), np.abs(fy)) < 1.6 * f0)
    return float(power[near].mean() / power[band & ~near].mean())


def inside_reference(st, margin: float = 0.0):
    """Which pixels of each frame land inside the reference field, ``margin`` reference
    pixels in from its edges (only those can be tested against the model)."""
    from drizzlestack.registration import frame_mapping

    ny, nx = st.frame_shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    inside = np.zeros((st.n_frames, ny, nx), bool)
    lo = margin - 0.5
    for i in range(st.n_frames):
        xr, yr = frame_mapping(st, i).forward(xx, yy)
        inside[i] = (xr >= lo) & (xr <= nx - 1 - lo) & (yr >= lo) & (yr <= ny - 1 - lo)
    return inside


def channel_offsets(planes, xy, fwhm, scale: float = 2.0, stamp: int = 15):
    """R - G and B - G offsets (reference px) of a drizzled colour image, from
    pixel-integrated Gaussian fits to each plane around the stars at ``xy`` (output px,
    e.g. detected on green): ``{0: (offset (2,), error (2,), n), 2: ...}``, the
    inverse-variance mean after a 5-sigma clip. Dry (NaN) pixels are left out of the
    fits."""
    from drizzlestack.channel_alignment import _robust_weighted_mean
    from drizzlestack.registration.psffit import fit_gaussians

    half = stamp // 2
    ny, nx = planes[0].shape
    xy = np.asarray(xy, np.float64)
    ix, iy = np.floor(xy[:, 0] + 0.5).astype(int), np.floor(xy[:, 1] + 0.5).astype(int)
    ok = (ix - half >= 0) & (iy - half >= 0) & (ix + half < nx) & (iy + half < ny)
    ix, iy, xy = ix[ok], iy[ok], xy[ok]
    offs = np.arange(stamp) - half
    px, py = (ix[:, None] + offs).astype(float), (iy[:, None] + offs).astype(float)
    pos, var = [], []
    for plane in planes:
        st = np.asarray(plane, np.float64)[py.astype(int)[:, :, None], px.astype(int)[:, None, :]]
        valid = np.isfinite(st)
        ring = valid.copy()
        ring[:, 2:-2, 2:-2] = False
        sky = np.array([np.median(a[r]) if r.any() else np.nan for a, r in zip(st, ring)])
        sub = np.where(valid, st - sky[:, None, None], 0.0)
        init = np.column_stack([xy[:, 0], xy[:, 1], np.maximum(sub.sum(axis=(1, 2)), 1.0),
                                np.full(len(xy), fwhm * scale / 2.3548), np.zeros(len(xy))])
        p, cov, good = fit_gaussians(sub, valid & np.isfinite(sky)[:, None, None], px, py, init)
        good &= np.all(np.abs(p[:, :2] - xy) < 3, axis=1)
        pos.append(np.where(good[:, None], p[:, :2], np.nan))
        var.append(np.stack([cov[:, 0, 0], cov[:, 1, 1]], axis=1))
    out = {}
    for c in (0, 2):
        d = (pos[c] - pos[1]) / scale
        v = (var[c] + var[1]) / scale ** 2
        use = np.all(np.isfinite(d) & np.isfinite(v) & (v > 0), axis=1)
        res = [_robust_weighted_mean(d[use, a], v[use, a]) for a in range(2)]
        out[c] = (np.array([r[0] for r in res]), np.array([r[1] for r in res]), int(use.sum()))
    return out
