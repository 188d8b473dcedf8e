"""Synthetic dithered, undersampled star fields with known truth.

One sky (stars, galaxies, background) is observed through several frames, each shifted
by a random sub-pixel dither and slightly rotated; every frame gets Poisson and read
noise, cosmic rays, the sensor's fixed hot pixels, and optionally a satellite trail,
saturated stars, a hazy frame and a radial optical distortion. The truth written beside
the frames: the frame -> reference transforms (the reference is frame 0), and the star
catalogue in reference pixels with each star's flux in ADU.

Stars are rendered with exact pixel integration of a circular Gaussian PSF, so the sum
of a star's pixels equals its catalogue flux (up to what falls off the frame, noise and
saturation): tests can check photometry exactly.

Colour (``cfa="RGGB"``, ...): the sky is rendered in three channels (stars and galaxies
of random colours, a coloured background) and each pixel keeps only the channel its
Bayer filter passes, as a one-shot-colour camera does. The truth then gives every
star's flux per channel (``flux_R``, ``flux_G``, ``flux_B``) and the sky per channel.
The frames are written with ``BAYERPAT`` (plus ``XBAYROFF``/``YBAYROFF`` and
``ROWORDER`` when ``cfa_offset`` / ``roworder`` ask for them); the transforms are
always in the coordinates of the array as stored.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from scipy.special import erf

from .constants import FWHM_TO_SIGMA  # noqa: F401  (also importable from here)
from .geometry import apply_homography, similarity

SQRT2 = np.sqrt(2.0)


@dataclass
class SimulationConfig:
    """Parameters of a simulated observation (all lengths in pixels, levels in ADU)."""

    n_frames: int = 12
    shape: tuple[int, int] = (512, 512)  # (ny, nx)
    fwhm: float = 1.5  # below 2 px: undersampled
    seeing: tuple[float, float] | None = None  # per-frame FWHM drawn from this range (overrides fwhm; frame 0 gets fwhm)
    n_stars: int = 400
    flux_min: float = 300.0
    flux_max: float = 2.0e5
    n_saturated: int = 3  # extra very bright stars whose cores saturate
    n_galaxies: int = 8
    sky: float = 200.0
    gain: float = 1.0  # e-/ADU
    read_noise: float = 5.0
    saturation: float = 65535.0
    max_shift: float = 6.0
    max_rotation: float = 0.5  # degrees
    whole_pixel_dither: bool = False  # round the dither shifts to whole pixels (drizzle cannot gain)
    cosmic_rays: int = 30  # per frame
    hot_pixels: int = 20  # fixed in sensor coordinates
    trail: bool = True  # a satellite trail in one frame
    hazy_frame: int | None = None  # index of a frame through haze (transmission 0.55, sky x1.3)
    distortion: float = 0.0  # radial distortion, pixels of displacement at the corners
    seed: int = 1
    dtype: str = "uint16"  # "uint16" (BZERO 32768 like cameras) or "float32"
    cfa: str | None = None  # Bayer pattern (RGGB, BGGR, GRBG, GBRG): a colour camera
    cfa_offset: tuple[int, int] = (0, 0)  # XBAYROFF, YBAYROFF written in the header
    roworder: str = "TOP-DOWN"  # ROWORDER written: "BOTTOM-UP" stores the image's bottom row first
    sky_colour: tuple[float, float, float] = (0.8, 1.0, 0.6)  # sky per channel, times `sky`
    # Colour: the sky's blue image offset from its green one (reference px, x and y), as
    # atmospheric dispersion or lateral colour makes it; red sits at -0.5 times it.
    dispersion: tuple[float, float] = (0.0, 0.0)


@dataclass
class SimulationTruth:
    """Known truth of a simulation."""

    config: SimulationConfig
    files: list[str]
    transforms: np.ndarray  # (n_frames, 3, 3) frame -> reference (frame 0)
    stars: Table  # x, y (reference pixels), flux (ADU, before transmission), saturated
    transmission: np.ndarray  # (n_frames,)
    sky: np.ndarray  # (n_frames,)
    cosmic_rays: list = field(default_factory=list)  # per frame: list of (x, y)
    trail_frame: int | None = None
    hot_pixels: np.ndarray | None = None  # (n, 2) sensor (x, y)
    fwhm: np.ndarray | None = None  # (n_frames,) FWHM of each frame's stars
    galaxies: list = field(default_factory=list)  # (x, y, flux, r_e, q, theta), reference pixels

    def defects(self, directory=None):
        """Truth of the non-photon signal, in each frame's own pixels.

        Returns
        -------
        mask : (n_frames, ny, nx) uint8
            :data:`DEFECT_COSMIC_RAY`, :data:`DEFECT_HOT_PIXEL`, :data:`DEFECT_TRAIL` bits.
        excess : (n_frames, ny, nx) float32
            ADU the defect added to the pixel (before clipping at saturation).
        """
        with np.load(Path(directory or Path(self.files[0]).parent) / "defects.npz") as f:
            return f["mask"], f["excess"]

    @property
    def channel_sky(self) -> np.ndarray:
        """(n_frames, 3) sky level per frame and channel (R, G, B); grey: the same thrice."""
        colour = np.asarray(self.config.sky_colour if self.config.cfa else (1.0, 1.0, 1.0))
        return self.sky[:, None] * colour[None, :]

    def frame_to_reference(self, i: int, x, y):
        """True mapping of frame ``i`` pixel coordinates to reference pixel coordinates,
        including the optical distortion when there is one."""
        u, v = _undistort(self.config, x, y)
        xr, yr = apply_homography(self.transforms[i], u, v)
        return _distort(self.config, xr, yr)

    def reference_to_frame(self, i: int, x, y):
        """Inverse of :meth:`frame_to_reference`."""
        u, v = _undistort(self.config, x, y)
        xf, yf = apply_homography(np.linalg.inv(self.transforms[i]), u, v)
        return _distort(self.config, xf, yf)


def _distortion_k(cfg: SimulationConfig) -> float:
    ny, nx = cfg.shape
    r2 = ((nx - 1) / 2) ** 2 + ((ny - 1) / 2) ** 2
    # displacement at the corner = k * r^3
    return cfg.distortion / r2 ** 1.5 if cfg.distortion else 0.0


def _distort(cfg, x, y):
    """Ideal (undistorted) -> observed sensor coordinates: x_d = c + (x - c) (1 + k r^2)."""
    k = _distortion_k(cfg)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if k == 0:
        return x, y
    cy, cx = (cfg.shape[0] - 1) / 2, (cfg.shape[1] - 1) / 2
    dx, dy = x - cx, y - cy
    f = 1.0 + k * (dx * dx + dy * dy)
    return cx + dx * f, cy + dy * f


def _undistort(cfg, x, y):
    """Inverse of :func:`_distort` by fixed-point iteration (converges: the distortion is small)."""
    k = _distortion_k(cfg)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if k == 0:
        return x, y
    cy, cx = (cfg.shape[0] - 1) / 2, (cfg.shape[1] - 1) / 2
    dx, dy = x - cx, y - cy
    ux, uy = dx.copy(), dy.copy()
    for _ in range(50):
        f = 1.0 + k * (ux * ux + uy * uy)
        ux, uy = dx / f, dy / f
    return cx + ux, cy + uy


_LETTER = {"R": 0, "G": 1, "B": 2}


def sensor_channels(cfg: SimulationConfig) -> np.ndarray:
    """Channel (0 R, 1 G, 2 B) of every pixel of the array as stored, written out from
    the header's meaning (independently of :mod:`drizzlestack.cfa`): pixel ``(x, y)``
    of the image read top-down has the colour of ``cfg.cfa`` at ``(x + XBAYROFF,
    y + YBAYROFF)``; with ``BOTTOM-UP`` stored row ``y`` is image row ``ny - 1 - y``."""
    ny, nx = cfg.shape
    dx, dy = cfg.cfa_offset
    y, x = np.mgrid[0:ny, 0:nx]
    if cfg.roworder.upper() == "BOTTOM-UP":
        y = ny - 1 - y
    p = cfg.cfa.upper()
    cell = np.array([[_LETTER[p[0]], _LETTER[p[1]]], [_LETTER[p[2]], _LETTER[p[3]]]], dtype=np.uint8)
    return cell[(y + dy) % 2, (x + dx) % 2]


def channel_dispersion(channel: int) -> float:
    """The multiple of ``SimulationConfig.dispersion`` by which channel ``channel`` (0 R,
    1 G, 2 B) is displaced: blue by it, green not, red by half of it the other way (the
    order of atmospheric refraction across the visible)."""
    return (-0.5, 0.0, 1.0)[int(channel)]


def render_stars(image: np.ndarray, x, y, flux, fwhm: float, radius: int | None = None) -> None:
    """Add circular Gaussian stars to ``image`` in place, integrated exactly over each pixel.

    The flux in pixel ``(i, j)`` is ``F * [Phi(x+0.5) - Phi(x-0.5)] * [Phi(y+0.5) - Phi(y-0.5)]``
    with ``Phi`` the Gaussian CDF about the star centre, so the pixels sum to ``F``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    if x.size == 0:
        return
    sigma = fwhm * FWHM_TO_SIGMA
    if radius is None:
        radius = int(np.ceil(6 * sigma)) + 1
    ny, nx = image.shape
    offs = np.arange(-radius, radius + 1)
    ix = np.floor(x + 0.5).astype(np.int64)[:, None] + offs  # (n, K) pixel columns
    iy = np.floor(y + 0.5).astype(np.int64)[:, None] + offs

    def profile(pix, centre):
        lo = (pix - 0.5 - centre[:, None]) / (SQRT2 * sigma)
        hi = (pix + 0.5 - centre[:, None]) / (SQRT2 * sigma)
        return 0.5 * (erf(hi) - erf(lo))

    px, py = profile(ix, x), profile(iy, y)
    stamps = flux[:, None, None] * py[:, :, None] * px[:, None, :]  # (n, K, K)
    yy = np.broadcast_to(iy[:, :, None], stamps.shape)
    xx = np.broadcast_to(ix[:, None, :], stamps.shape)
    inside = (xx >= 0) & (xx < nx) & (yy >= 0) & (yy < ny)
    np.add.at(image, (yy[inside], xx[inside]), stamps[inside])


def _render_galaxy(image, xc, yc, flux, r_e, q, theta, frame_to_sensor):
    """Exponential-disc galaxy, 4x4 sub-sampled (not exact; galaxies are scenery)."""
    ny, nx = image.shape
    half = int(np.ceil(5 * r_e)) + 2
    xs, ys = frame_to_sensor(np.array([xc]), np.array([yc]))
    cxp, cyp = int(round(xs[0])), int(round(ys[0]))
    x0, x1 = max(cxp - half, 0), min(cxp + half + 1, nx)
    y0, y1 = max(cyp - half, 0), min(cyp + half + 1, ny)
    if x0 >= x1 or y0 >= y1:
        return
    sub = (np.arange(4) + 0.5) / 4 - 0.5
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    sx = np.broadcast_to(xx[..., None, None] + sub[None, None, None, :], xx.shape + (4, 4)).ravel()
    sy = np.broadcast_to(yy[..., None, None] + sub[None, None, :, None], xx.shape + (4, 4)).ravel()
    dx, dy = sx - xs[0], sy - ys[0]
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * dx + s * dy, (-s * dx + c * dy) / q
    r = np.hypot(u, v)
    prof = np.exp(-1.678 * r / r_e).reshape(y1 - y0, x1 - x0, 16).mean(axis=-1)
    norm = 2 * np.pi * q * (r_e / 1.678) ** 2
    image[y0:y1, x0:x1] += flux * prof / norm


#: bits of the defect truth mask (:meth:`SimulationTruth.defects`)
DEFECT_COSMIC_RAY = 1
DEFECT_HOT_PIXEL = 2
DEFECT_TRAIL = 4


def _trail(image, rng, level):
    ny, nx = image.shape
    x0, x1 = 0.0, nx - 1.0
    y0, y1 = rng.uniform(0.1, 0.9) * ny, rng.uniform(0.1, 0.9) * ny
    t = np.linspace(0, 1, 4 * nx)
    xs, ys = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
    for w, amp in ((0, 1.0), (1, 0.4), (-1, 0.4)):
        ix = np.round(xs).astype(int)
        iy = np.round(ys).astype(int) + w
        ok = (iy >= 0) & (iy < ny)
        image[iy[ok], ix[ok]] = np.maximum(image[iy[ok], ix[ok]], 0) + amp * level / 4


def simulate(directory, config: SimulationConfig | None = None, **overrides) -> SimulationTruth:
    """Write a simulated dithered observation to ``directory``.

    Parameters
    ----------
    directory : path-like
        Created if needed. Receives ``frame_000.fits`` ..., ``truth.json`` (config,
        transforms, transmissions, skies, cosmic-ray positions) and ``stars.ecsv``.
    config : SimulationConfig, optional
        Defaults to :class:`SimulationConfig`; keyword ``overrides`` replace fields.

    Returns
    -------
    SimulationTruth
    """
    cfg = config or SimulationConfig()
    if overrides:
        cfg = SimulationConfig(**{**asdict(cfg), **overrides})
    cfg.shape = tuple(int(v) for v in cfg.shape)
    cfg.cfa_offset = tuple(int(v) for v in cfg.cfa_offset)
    cfg.sky_colour = tuple(float(v) for v in cfg.sky_colour)
    cfg.dispersion = tuple(float(v) for v in cfg.dispersion)
    if cfg.cfa:
        from .cfa import parse_pattern

        cfg.cfa = parse_pattern(cfg.cfa, "cfa")
    rng = np.random.default_rng(cfg.seed)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    ny, nx = cfg.shape

    # The sky in reference pixels (frame 0). Stars extend a margin beyond the frame so
    # that dithered frames have stars at their edges too.
    margin = cfg.max_shift + 2
    n = cfg.n_stars
    # Power-law flux distribution (many faint, few bright), as in real fields.
    u = rng.uniform(size=n)
    alpha = 1.5
    lo, hi = cfg.flux_min ** (1 - alpha), cfg.flux_max ** (1 - alpha)
    flux = (lo + u * (hi - lo)) ** (1 / (1 - alpha))
    sx = rng.uniform(-margin, nx - 1 + margin, n)
    sy = rng.uniform(-margin, ny - 1 + margin, n)
    # Very bright stars that saturate, away from the edges.
    sigma = cfg.fwhm * FWHM_TO_SIGMA
    peak_fraction = erf(0.5 / (SQRT2 * sigma)) ** 2  # central pixel of a centred star
    sat_flux = 3.0 * cfg.saturation / peak_fraction
    bx = rng.uniform(0.15, 0.85, cfg.n_saturated) * nx
    by = rng.uniform(0.15, 0.85, cfg.n_saturated) * ny
    bflux = sat_flux * rng.uniform(1.0, 2.0, cfg.n_saturated)
    sx, sy, flux = np.r_[sx, bx], np.r_[sy, by], np.r_[flux, bflux]
    saturated_flag = np.r_[np.zeros(n, bool), np.ones(cfg.n_saturated, bool)]
    stars = Table({"x": sx, "y": sy, "flux": flux, "saturated": saturated_flag})
    stars.meta["fwhm"] = cfg.fwhm
    colour = np.ones((len(sx), 3))
    if cfg.cfa:
        # Star colours from red (R/G ~ 1.6) to blue (B/G ~ 1.4); G carries the catalogue flux.
        colour[:, 0] = rng.uniform(0.4, 1.6, len(sx))
        colour[:, 2] = rng.uniform(0.4, 1.4, len(sx))
        for c, name in enumerate("RGB"):
            stars[f"flux_{name}"] = flux * colour[:, c]

    galaxies = [
        (rng.uniform(0.1, 0.9) * nx, rng.uniform(0.1, 0.9) * ny, rng.uniform(2e3, 2e4),
         rng.uniform(1.5, 5.0), rng.uniform(0.3, 1.0), rng.uniform(0, np.pi))
        for _ in range(cfg.n_galaxies)
    ]
    galaxy_colour = rng.uniform(0.5, 1.5, (cfg.n_galaxies, 3)) if cfg.cfa else np.ones((cfg.n_galaxies, 3))
    channels = sensor_channels(cfg) if cfg.cfa else None
    hot = np.column_stack([rng.integers(0, nx, cfg.hot_pixels), rng.integers(0, ny, cfg.hot_pixels)])
    hot_level = rng.uniform(2e3, 2e4, cfg.hot_pixels)

    transforms = np.empty((cfg.n_frames, 3, 3))
    transmission = np.ones(cfg.n_frames)
    skies = np.full(cfg.n_frames, cfg.sky)
    if cfg.hazy_frame is not None:
        transmission[cfg.hazy_frame] = 0.55
        skies[cfg.hazy_frame] = cfg.sky * 1.3
    trail_frame = int(rng.integers(1, cfg.n_frames)) if (cfg.trail and cfg.n_frames > 1) else None
    centre = ((nx - 1) / 2, (ny - 1) / 2)
    if cfg.seeing is not None:
        lo_fwhm, hi_fwhm = (float(v) for v in cfg.seeing)
        # Spread evenly over the range (in a random order): every run spans all of it.
        fwhms = np.r_[cfg.fwhm, rng.permutation(np.linspace(lo_fwhm, hi_fwhm, max(cfg.n_frames - 1, 1)))]
        fwhms = fwhms[:cfg.n_frames]
    else:
        fwhms = np.full(cfg.n_frames, float(cfg.fwhm))
    truth = SimulationTruth(cfg, [], transforms, stars, transmission, skies, [], trail_frame, hot, fwhms,
                            [tuple(float(v) for v in g) for g in galaxies])
    defect_mask = np.zeros((cfg.n_frames,) + cfg.shape, np.uint8)
    defect_excess = np.zeros((cfg.n_frames,) + cfg.shape, np.float32)

    files = []
    for i in range(cfg.n_frames):
        if i == 0:
            transforms[i] = np.eye(3)
        else:
            angle = rng.uniform(-cfg.max_rotation, cfg.max_rotation)
            shift = rng.uniform(-cfg.max_shift, cfg.max_shift, 2)
            if cfg.whole_pixel_dither:
                shift = np.round(shift)
            transforms[i] = similarity(1.0, angle, *shift, center=centre)
        planes = []
        for c in range(3 if cfg.cfa else 1):
            # Colour: each channel's sky where dispersion puts it (truth.stars: green's).
            ddx, ddy = (np.asarray(cfg.dispersion) * channel_dispersion(c)) if cfg.cfa else (0.0, 0.0)
            fx, fy = truth.reference_to_frame(i, sx + ddx, sy + ddy)
            keep = (fx > -10) & (fx < nx + 10) & (fy > -10) & (fy < ny + 10)

            def ref_to_sensor(x, y, i=i, ddx=ddx, ddy=ddy):
                return truth.reference_to_frame(i, x + ddx, y + ddy)

            sky_c = skies[i] * (cfg.sky_colour[c] if cfg.cfa else 1.0)
            plane = np.full(cfg.shape, sky_c, dtype=np.float64)
            render_stars(plane, fx[keep], fy[keep], flux[keep] * colour[keep, c] * transmission[i], fwhms[i])
            for g, (gx, gy, gf, re_, q, th) in enumerate(galaxies):
                _render_galaxy(plane, gx, gy, gf * galaxy_colour[g, c] * transmission[i], re_, q, th, ref_to_sensor)
            planes.append(plane)
        if cfg.cfa:
            # Each pixel keeps only the colour its filter passes (the mosaic).
            image = np.take_along_axis(np.stack(planes), channels[None].astype(np.intp), axis=0)[0]
        else:
            image = planes[0]
        # Noise: Poisson in electrons, Gaussian read noise.
        electrons = rng.poisson(np.clip(image, 0, None) * cfg.gain).astype(np.float64)
        image = electrons / cfg.gain + rng.normal(0.0, cfg.read_noise, cfg.shape)
        # Sensor defects and transients, after the noise (they are not photons).
        photons = image.copy()
        image[hot[:, 1], hot[:, 0]] += hot_level
        defect_mask[i, hot[:, 1], hot[:, 0]] |= DEFECT_HOT_PIXEL
        crs = []
        for _ in range(cfg.cosmic_rays):
            cx, cy = int(rng.integers(1, nx - 1)), int(rng.integers(1, ny - 1))
            level = rng.uniform(2e3, 3e4)
            image[cy, cx] += level
            defect_mask[i, cy, cx] |= DEFECT_COSMIC_RAY
            if rng.uniform() < 0.5:  # a tail into the next pixel
                image[cy, cx + 1] += 0.5 * level
                defect_mask[i, cy, cx + 1] |= DEFECT_COSMIC_RAY
            crs.append((cx, cy))
        truth.cosmic_rays.append(crs)
        if i == trail_frame:
            before = image.copy()
            _trail(image, rng, 8e3)
            defect_mask[i][image != before] |= DEFECT_TRAIL
        defect_excess[i] = image - photons
        image = np.clip(image, 0, cfg.saturation)
        hdr = fits.Header()
        hdr["EXPTIME"] = (60.0, "exposure time [s]")
        hdr["GAIN"] = cfg.gain
        hdr["RDNOISE"] = cfg.read_noise
        hdr["OBJECT"] = "drizzlestack simulated field"
        hdr["SIMFRAME"] = i
        if cfg.cfa:
            hdr["BAYERPAT"] = (cfg.cfa.upper(), "Bayer pattern of the image read top-down")
            hdr["XBAYROFF"] = int(cfg.cfa_offset[0])
            hdr["YBAYROFF"] = int(cfg.cfa_offset[1])
            hdr["ROWORDER"] = cfg.roworder.upper()
        name = out / f"frame_{i:03d}.fits"
        if cfg.dtype == "uint16":
            hdu = fits.PrimaryHDU(np.round(image).astype(np.uint16), header=hdr)  # astropy writes BZERO 32768
        else:
            hdu = fits.PrimaryHDU(image.astype(np.float32), header=hdr)
            hdu.header["SATURATE"] = cfg.saturation
        hdu.writeto(name, overwrite=True)
        files.append(str(name.resolve()))
    truth.files = files

    meta = {
        "config": asdict(cfg),
        "files": files,
        "transforms": transforms.tolist(),
        "transmission": transmission.tolist(),
        "sky": skies.tolist(),
        "cosmic_rays": truth.cosmic_rays,
        "trail_frame": trail_frame,
        "hot_pixels": hot.tolist(),
        "fwhm": fwhms.tolist(),
        "galaxies": truth.galaxies,
    }
    np.savez_compressed(out / "defects.npz", mask=defect_mask, excess=defect_excess)
    (out / "truth.json").write_text(json.dumps(meta, indent=1))
    stars.write(out / "stars.ecsv", overwrite=True)
    return truth


def load_truth(directory) -> SimulationTruth:
    """Read the truth written by :func:`simulate`."""
    d = Path(directory)
    meta = json.loads((d / "truth.json").read_text())
    cfg = SimulationConfig(**meta["config"])
    cfg.shape = tuple(cfg.shape)
    cfg.cfa_offset = tuple(cfg.cfa_offset)
    cfg.sky_colour = tuple(cfg.sky_colour)
    cfg.dispersion = tuple(cfg.dispersion)
    return SimulationTruth(cfg, meta["files"], np.array(meta["transforms"]), Table.read(d / "stars.ecsv"),
                           np.array(meta["transmission"]), np.array(meta["sky"]),
                           [[tuple(c) for c in f] for f in meta["cosmic_rays"]], meta["trail_frame"],
                           np.array(meta["hot_pixels"]),
                           np.array(meta.get("fwhm", [cfg.fwhm] * cfg.n_frames), dtype=np.float64),
                           [tuple(g) for g in meta.get("galaxies", [])])
