"""Colour filter arrays (Bayer mosaics): which colour each raw pixel saw.

One-shot-colour cameras and DSLRs put a 2x2 repeating filter over the sensor. A frame
stays a mosaic in the store; everything that needs the colour of a pixel asks this
module, from the frame's ``cfa_pattern``: the 2x2 pattern *of the array as stored*
(pixel ``[0, 0]`` first, row by row), after the header's offsets, row order and
sub-frame origin have been applied once, at ingest (:func:`header_pattern`).

Conventions (the colour-swap bugs of other tools come from leaving one out):

* A pattern names the colours of pixels ``(x, y) = (0, 0), (1, 0), (0, 1), (1, 1)``:
  ``RGGB`` has red at ``[0, 0]`` and blue at ``[1, 1]``.
* ``XBAYROFF`` / ``YBAYROFF`` (odd values) shift the pattern by one column / row: the
  colour of pixel ``(x, y)`` is the header pattern's at ``(x + XBAYROFF, y + YBAYROFF)``.
  A sub-frame origin (``XORGSUBF`` / ``YORGSUBF``: the frame is a window of the sensor
  starting there, and the header pattern describes the whole sensor) adds to them.
* ``ROWORDER = 'BOTTOM-UP'``: the first stored row is the image's bottom row and the
  pattern is given for the image read top-down (Siril's convention), so for the array
  as stored the rows of the pattern swap when the height is **even** and stay when it is
  odd. ``TOP-DOWN`` or no ``ROWORDER``: the pattern applies to the first stored row.
* Channel indices: 0 = R, 1 = G (both greens), 2 = B.
"""

from __future__ import annotations

import warnings

import numba
import numpy as np

from ._warnings import DrizzlestackError, DrizzlestackWarning

#: Bayer patterns drizzlestack handles.
PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")

#: Channel names in output order (the FITS cube's planes).
CHANNELS = ("R", "G", "B")

_INDEX = {"R": 0, "G": 1, "B": 2}

#: Header keywords that may hold the pattern, in the order they are tried.
PATTERN_KEYS = ("BAYERPAT", "COLORTYP")


class PatternError(DrizzlestackError):
    """A CFA pattern drizzlestack cannot use; the message says which and why."""


def parse_pattern(text, source: str = "pattern") -> str:
    """Validate a Bayer pattern name.

    Parameters
    ----------
    text : str
        ``RGGB``, ``BGGR``, ``GRBG`` or ``GBRG`` (case and surrounding blanks ignored).
    source : str
        What the pattern came from (a file and keyword, an option), for the message.

    Returns
    -------
    str
        The pattern in upper case.

    Raises
    ------
    PatternError
        X-Trans (6x6) and anything else that is not one of :data:`PATTERNS`.
    """
    name = str(text).strip().strip("'\"").upper().replace("-", "").replace(" ", "")
    if name in PATTERNS:
        return name
    if "XTRANS" in name or (len(name) == 36 and set(name) <= set("RGB")):
        raise PatternError(f"{source}: X-Trans (6x6) colour filter arrays are not supported yet; "
                           f"only the Bayer patterns {', '.join(PATTERNS)}")
    raise PatternError(f"{source}={text!r}: unknown colour filter pattern; expected one of {', '.join(PATTERNS)}")


def shift_pattern(pattern: str, dx: int = 0, dy: int = 0) -> str:
    """The pattern seen from pixel ``(dx, dy)`` of ``pattern`` (only parities matter)."""
    p = parse_pattern(pattern)
    dx, dy = int(dx) % 2, int(dy) % 2
    grid = [[p[0], p[1]], [p[2], p[3]]]
    return "".join(grid[(y + dy) % 2][(x + dx) % 2] for y in (0, 1) for x in (0, 1))


def flip_rows(pattern: str, height: int) -> str:
    """Pattern of an array of ``height`` rows after flipping it upside down: the new first
    row is the old row ``height - 1``, so the pattern's rows swap only for even heights."""
    return shift_pattern(pattern, 0, int(height) - 1)


def flip_columns(pattern: str, width: int) -> str:
    """Pattern after mirroring an array of ``width`` columns left to right."""
    return shift_pattern(pattern, int(width) - 1, 0)


def _header_int(header, key, name) -> int:
    value = header.get(key, 0)
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise PatternError(f"{name}: {key}={value!r} is not a number") from None
    if not np.isfinite(f) or f != int(f):
        raise PatternError(f"{name}: {key}={value!r} is not an integer")
    return int(f)


def header_pattern(header, height: int, override: str | None = None, name: str = "frame") -> str:
    """The Bayer pattern of the array as stored, from a FITS-like header.

    Parameters
    ----------
    header : mapping
        ``BAYERPAT`` (or ``COLORTYP``), ``XBAYROFF``, ``YBAYROFF``, ``ROWORDER``,
        ``XORGSUBF``, ``YORGSUBF`` are read; all optional.
    height : int
        Rows of the stored array (a bottom-up flip depends on its parity).
    override : str, optional
        A pattern declared by the user: replaces the header's pattern (the offsets,
        row order and sub-frame origin still apply, as they describe the file).
    name : str
        File name for messages.

    Returns
    -------
    str
        One of :data:`PATTERNS`, or ``""`` when neither the header nor ``override``
        declares a pattern (a grey frame).

    Raises
    ------
    PatternError
        Unknown or X-Trans pattern, non-integer offsets, an unknown ``ROWORDER``.
    """
    if override:
        pattern = parse_pattern(override, f"{name}: cfa")
    else:
        pattern = ""
        for key in PATTERN_KEYS:
            value = header.get(key)
            if value is None or not str(value).strip():
                continue
            text = str(value).strip().upper()
            if key == "COLORTYP" and text in ("MONO", "GREY", "GRAY", "RGB", "BW", "LUM"):
                continue  # a COLORTYP that describes a grey or already-debayered frame
            pattern = parse_pattern(value, f"{name}: {key}")
            break
        if not pattern:
            return ""
    dx = _header_int(header, "XBAYROFF", name) + _header_int(header, "XORGSUBF", name)
    dy = _header_int(header, "YBAYROFF", name) + _header_int(header, "YORGSUBF", name)
    pattern = shift_pattern(pattern, dx, dy)
    order = str(header.get("ROWORDER", "TOP-DOWN")).strip().upper()
    if order == "BOTTOM-UP":
        pattern = flip_rows(pattern, height)
    elif order not in ("TOP-DOWN", ""):
        raise PatternError(f"{name}: ROWORDER={header.get('ROWORDER')!r}: expected 'TOP-DOWN' or 'BOTTOM-UP'")
    return pattern


def channel_index(pattern: str, shape, y0: int = 0, x0: int = 0) -> np.ndarray:
    """Channel (0 = R, 1 = G, 2 = B) of every pixel of a window of a mosaic.

    Parameters
    ----------
    pattern : str
        The mosaic's pattern (of the array as stored, as in the store's ``cfa_pattern``).
    shape : (int, int)
        ``(ny, nx)`` of the window.
    y0, x0 : int
        Where the window starts in the array (only their parities matter).

    Returns
    -------
    (ny, nx) uint8 ndarray
    """
    p = shift_pattern(pattern, x0, y0)
    cell = np.array([[_INDEX[p[0]], _INDEX[p[1]]], [_INDEX[p[2]], _INDEX[p[3]]]], dtype=np.uint8)
    ny, nx = (int(v) for v in shape)
    return np.tile(cell, ((ny + 1) // 2, (nx + 1) // 2))[:ny, :nx].copy()


def channel_mask(pattern: str, shape, channel: int, y0: int = 0, x0: int = 0) -> np.ndarray:
    """Boolean mask of the pixels of ``channel`` (0, 1, 2) in a window of the mosaic."""
    return channel_index(pattern, shape, y0, x0) == int(channel)


# Normalized-convolution kernels: with the channel's pixels as the mask they give
# bilinear interpolation (the mean of the 2 or 4 nearest samples of that colour) in the
# interior, and the mean of whatever samples exist at the edges and next to NaN.
_KERNEL_RB = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])
_KERNEL_G = np.array([[0.0, 1.0, 0.0], [1.0, 4.0, 1.0], [0.0, 1.0, 0.0]])


def _normalized_convolution(data: np.ndarray, mask: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    from scipy.ndimage import convolve

    valid = mask & np.isfinite(data)
    num = convolve(np.where(valid, data, 0.0).astype(np.float64), kernel, mode="constant", cval=0.0)
    den = convolve(valid.astype(np.float64), kernel, mode="constant", cval=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[den == 0] = np.nan
    return out


def channel_estimate(data, pattern: str, channel: int, y0: int = 0, x0: int = 0) -> np.ndarray:
    """Bilinear estimate of one colour at every pixel of a mosaic (float64).

    The channel's own pixels keep their values; every other pixel gets the mean of the
    nearest samples of that colour (2 or 4, fewer at edges and next to NaN; NaN when
    none). This is for statistics and for the registered view used by rejection, where
    each sample must be compared with its own colour; drizzle never uses it.

    Parameters
    ----------
    data : (ny, nx) array_like
        A window of a mosaic.
    pattern : str
        The mosaic's pattern.
    channel : int
        0 = R, 1 = G, 2 = B.
    y0, x0 : int
        Where the window starts in the array.
    """
    data = np.asarray(data, dtype=np.float64)
    mask = channel_mask(pattern, data.shape, channel, y0, x0)
    est = _normalized_convolution(data, mask, _KERNEL_G if int(channel) == 1 else _KERNEL_RB)
    own = mask & np.isfinite(data)
    est[own] = data[own]
    return est


def luminance(data, pattern: str, y0: int = 0, x0: int = 0, box: int = 5) -> np.ndarray:
    """Full-resolution luminance proxy of a mosaic for star detection and registration.

    As Siril does, green pixels keep their value and every red and blue pixel of the sky
    is replaced by the mean of its green neighbours. On a star (where both that colour
    and green stand out of their sky by 3 sigma, averaged over a ``box`` x ``box``
    neighbourhood) a red or blue pixel keeps its own sample instead, scaled to green by
    the local colour ratio (smooth-hue transition): the star's own samples at that pixel
    carry its position, which the green mean blurs. On simulated FWHM 1.3 px stars this
    halves the centroid scatter of the green-only proxy (benchmarks/README.md).

    Returned as float32, the frames' type. Positions stay in the mosaic's own pixel
    coordinates.
    """
    data = np.asarray(data, dtype=np.float64)
    idx = channel_index(pattern, data.shape, y0, x0)
    est = [channel_estimate(data, pattern, c, y0, x0) for c in range(3)]
    out = est[1].copy()
    kernel = np.ones((box, box))
    smooth = [_normalized_convolution(e, np.isfinite(e), kernel) for e in est]
    level = {}
    for c in range(3):
        own = data[(idx == c) & np.isfinite(data)]
        if own.size < 16:
            return out.astype(np.float32)
        med = float(np.median(own))
        level[c] = (med, 1.4826 * float(np.median(np.abs(own - med))))
    g_med, g_sig = level[1]
    g_star = smooth[1] - g_med > 3.0 * g_sig / box
    for c in (0, 2):
        med, sig = level[c]
        with np.errstate(invalid="ignore", divide="ignore"):
            use = ((idx == c) & np.isfinite(data) & g_star & (smooth[c] - med > 3.0 * sig / box)
                   & (smooth[c] > 0) & (smooth[1] > 0))
            out[use] = data[use] * (smooth[1][use] / smooth[c][use])
    return out.astype(np.float32)


@numba.njit(nogil=True, cache=True)
def _channel_planes(data, idx, sky, threshold, saturation, box, out):
    """Kernel of :func:`channel_planes`: ``out[c]`` is colour ``c`` at every pixel."""
    h, w = data.shape
    half = box // 2
    near_saturated = np.zeros((h, w), np.bool_)
    # 1. The bilinear estimate of every colour at every pixel, from its nearest own pixels
    #    (weights (2-|dy|)(2-|dx|) for red and blue, the cross for green).
    b = np.empty(3)
    bw = np.empty(3)
    for y in range(h):
        for x in range(w):
            for c in range(3):
                b[c] = 0.0
                bw[c] = 0.0
            for dy in range(-1, 2):
                yy = y + dy
                if yy < 0 or yy >= h:
                    continue
                for dx in range(-1, 2):
                    xx = x + dx
                    if xx < 0 or xx >= w:
                        continue
                    v = data[yy, xx]
                    if not np.isfinite(v):
                        continue
                    c = idx[yy, xx]
                    if c == 1:
                        wt = 4.0 if (dy == 0 and dx == 0) else (1.0 if dy == 0 or dx == 0 else 0.0)
                    else:
                        wt = (2.0 - abs(dy)) * (2.0 - abs(dx))
                    b[c] += wt * v
                    bw[c] += wt
                    if v >= saturation:
                        near_saturated[y, x] = True
            for c in range(3):
                out[c, y, x] = b[c] / bw[c] if bw[c] > 0 else np.nan
    # 2. Box sums of each bilinear plane above its sky (integral images): the local colour
    #    ratio. Both planes are interpolated over the whole box, so where a star falls
    #    between one colour's samples hardly matters (a ratio of the raw samples' box means
    #    was ~44 % high at undersampled cores, this ~2 %).
    isum = np.zeros((3, h + 1, w + 1))
    icnt = np.zeros((3, h + 1, w + 1))
    for y in range(h):
        for x in range(w):
            for c in range(3):
                isum[c, y + 1, x + 1] = isum[c, y, x + 1] + isum[c, y + 1, x] - isum[c, y, x]
                icnt[c, y + 1, x + 1] = icnt[c, y, x + 1] + icnt[c, y + 1, x] - icnt[c, y, x]
                e = out[c, y, x]
                if np.isfinite(e):
                    isum[c, y + 1, x + 1] += e - sky[c]
                    icnt[c, y + 1, x + 1] += 1.0
    above = np.empty(3)
    for y in range(h):
        ya, yb = max(y - half, 0), min(y + half + 1, h)
        for x in range(w):
            xa, xb = max(x - half, 0), min(x + half + 1, w)
            for c in range(3):
                n = icnt[c, yb, xb] - icnt[c, ya, xb] - icnt[c, yb, xa] + icnt[c, ya, xa]
                sm = isum[c, yb, xb] - isum[c, ya, xb] - isum[c, yb, xa] + isum[c, ya, xa]
                above[c] = sm / n if n > 0 else np.nan
            own = idx[y, x]
            v = data[y, x]
            for t in range(3):
                if t == own and np.isfinite(v):
                    out[t, y, x] = v
                    continue
                est = out[t, y, x]
                # 3. On a star (both colours 3 sigma / box above their sky in the box): the
                #    pixel's own sample scaled by the colour ratio.
                if np.isfinite(v) and above[t] > threshold[t] and above[own] > threshold[own]:
                    est = sky[t] + (v - sky[own]) * (above[t] / above[own])
                if near_saturated[y, x] and np.isfinite(est) and est < saturation:
                    est = saturation  # a lower bound, as the saturated sample it used
                out[t, y, x] = est


def channel_planes(data, pattern: str, y0: int = 0, x0: int = 0, sky=None, noise=None,
                   saturation: float = np.inf, box: int = 5, sharp: bool = True) -> np.ndarray:
    """Each colour at every pixel of a mosaic, sharp on stars: the registered view of a
    colour store is made of these, and the outlier test compares every raw sample with a
    model made of them.

    A colour's own pixels keep their values. On the sky, every other pixel gets the
    bilinear mean of the nearest samples of that colour (as :func:`channel_estimate`). On
    a star (where both colours stand out of their sky by 3 sigma / ``box``, averaged over
    a ``box`` x ``box`` neighbourhood), a pixel of another colour ``c'`` keeps its own
    sample, scaled into ``c`` by the local colour ratio above the sky::

        est = sky_c + (v - sky_c') * S_c / S_c'

    with ``S`` the box sums of the bilinear planes above their sky. A star's light has
    the same profile in every colour, so its samples of any colour carry its shape, where
    the bilinear mean of samples 2 px apart flattens an undersampled core (about 43 % low
    within 1 px of the centre of FWHM 1.3-2 px stars). The ratio is taken between the
    interpolated planes, both spread over the whole box, so that where the star falls
    between one colour's samples hardly matters: on FWHM 2 px stars at random sub-pixel
    positions the estimate near the core is then 2 % high on average (7 % mean error);
    a ratio of the raw samples' own box means was 44 % high, and made the colour
    integration's stars 20-29 % too bright (``tests/test_cfa.py``,
    ``tests/test_colour_integration.py``).

    Parameters
    ----------
    data : (h, w) array_like
        A window of a mosaic; NaN pixels are no data.
    pattern : str
        The mosaic's pattern.
    y0, x0 : int
        Where the window starts in the array.
    sky, noise : (3,) array_like, optional
        Each colour's background level and pixel noise (default: the window's median
        and normalized MAD of that colour's pixels).
    saturation : float
        An estimate that used a sample at or above this level is raised to it: a star
        core is a lower bound wherever it is seen from.
    box : int
        Side of the neighbourhood of the star test and the colour ratio.
    sharp : bool
        ``False``: the bilinear estimate everywhere, stars included (own samples kept,
        the saturation rule applied), which conserves each colour's flux: the colour
        ratio, measured between planes of different interpolation kernels, puts the
        estimated pixels of a FWHM 2 px star ~7-10 % high in green (its aperture flux
        +4 %, FWHM 3 px +2 %; red and blue within 1 %; ``benchmarks/README.md``). The
        model the outliers are tested against wants the sharp shape; the integration
        image wants the flux.

    Returns
    -------
    (3, h, w) float32
    """
    data = np.ascontiguousarray(data, dtype=np.float32)
    idx = channel_index(pattern, data.shape, y0, x0)
    if sky is None or noise is None:
        sky, noise = np.full(3, np.inf), np.full(3, np.inf)  # no star test in a window too small to tell
        for c in range(3):
            own = data[(idx == c) & np.isfinite(data)]
            if own.size >= 16:
                sky[c] = float(np.median(own))
                noise[c] = 1.4826 * float(np.median(np.abs(own - sky[c])))
    sky = np.asarray(sky, np.float64)
    threshold = 3.0 * np.asarray(noise, np.float64) / box
    if not sharp:
        threshold = np.full(3, np.inf)  # no pixel passes the star test: bilinear everywhere
    out = np.empty((3,) + data.shape, np.float32)
    _channel_planes(data, idx, sky, threshold, float(saturation), int(box), out)
    return out


def phase_medians(data) -> np.ndarray:
    """Medians of the four 2x2 phases of a frame, ``[[p00, p01], [p10, p11]]``."""
    data = np.asarray(data, dtype=np.float32)
    out = np.empty((2, 2))
    for dy in (0, 1):
        for dx in (0, 1):
            sub = data[dy::2, dx::2]
            sub = sub[np.isfinite(sub)]
            out[dy, dx] = np.median(sub) if sub.size else np.nan
    return out


def mosaic_score(data, max_pixels: int = 512 * 512) -> float:
    """How strongly a frame repeats with a 2x2 period, in units of the pixel noise.

    The spread of the four 2x2 phases' medians divided by the noise (MAD of differences
    between same-phase neighbours two pixels apart). Grey frames score ~0.01 (the
    medians agree to noise / sqrt(pixels)); a Bayer mosaic's sky differs between colours
    by a good fraction of the noise or more, which scores well above 0.5.
    A central window of ``max_pixels`` is plenty: 512^2 pixels put a grey frame's phase
    medians within ~1 % of the noise of each other (a whole 1024 x 768 frame made this
    check a third of a small stack's ingest).
    """
    data = np.asarray(data, dtype=np.float32)
    side = int(np.sqrt(max_pixels)) // 2 * 2
    ny, nx = data.shape
    # A central window starting on even pixels (a strided subsample would fold the phases).
    cy, cx = max(0, (ny - side) // 4 * 2), max(0, (nx - side) // 4 * 2)
    data = data[cy:cy + side, cx:cx + side]
    if min(data.shape) < 6:
        return 0.0
    med = phase_medians(data)
    spread = float(np.nanmax(med) - np.nanmin(med))
    diff = (data[:, 2:] - data[:, :-2]).ravel()
    diff = diff[np.isfinite(diff)]
    if diff.size == 0:
        return 0.0
    noise = 1.4826 * float(np.median(np.abs(diff - np.median(diff)))) / np.sqrt(2.0)
    if not noise > 0:
        return float("inf") if spread > 0 else 0.0
    # Small frames: the phase medians scatter by ~1.25 noise / sqrt(n) on their own; a
    # spread within 6 times that says nothing (the score is then reported as 0).
    n_phase = max(1, data.size // 4)
    if spread < 6 * 1.25 * noise / np.sqrt(n_phase):
        return 0.0
    return spread / noise


#: :func:`mosaic_score` above which a frame is taken for an undeclared mosaic.
MOSAIC_THRESHOLD = 0.5


def mosaic_message(data, name: str, option: str = "--cfa PATTERN (cfa='RGGB', ...)") -> str | None:
    """The warning for a frame ingested as grey that looks like an undeclared Bayer
    mosaic (``None``: it does not). It names the option that declares the pattern (and
    the one that ingests the frame as grey on purpose), so a checkerboard is never
    drizzled silently. No warnings machinery: safe in any thread."""
    score = mosaic_score(data)
    if score > MOSAIC_THRESHOLD:
        return (f"{name}: looks like an undeclared colour (Bayer) mosaic: the four 2x2 pixel phases differ by "
                f"{score:.1f} x the noise; declare its pattern with {option}, or pass --grey (cfa='grey') "
                "to ingest it as grey on purpose")
    return None


def warn_if_mosaic(data, name: str, option: str = "--cfa PATTERN (cfa='RGGB', ...)") -> bool:
    """Warn (:func:`mosaic_message`) when a frame ingested as grey looks like an
    undeclared Bayer mosaic; returns whether it warned."""
    message = mosaic_message(data, name, option)
    if message is not None:
        warnings.warn(message, DrizzlestackWarning, stacklevel=3)
    return message is not None
