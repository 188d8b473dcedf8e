"""Camera raw frames (CR2, CR3, NEF, ARW, RAF-Bayer, DNG, ...) through rawpy / LibRaw.

rawpy is an optional extra (``pip install drizzlestack[raw]``). What is kept is the
visible raw mosaic, never a demosaiced image: its values as the camera wrote them
(black levels are recorded, not subtracted: the normalization removes offsets), the
per-channel black levels, the white level as the saturation level and the Bayer
pattern, from LibRaw's colour index of each pixel with the second green mapped to G,
and the camera's as-shot white-balance multipliers (recorded, not applied:
:mod:`drizzlestack.whitebalance`).
Exposure and ISO come from LibRaw or, for TIFF-based raws (DNG, CR2, NEF, ARW), from
the file's EXIF tags.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from ..cfa import PATTERNS, PatternError
from .fits import Frame, FrameReadError

#: File name endings read as camera raw.
RAW_SUFFIXES = (".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf",
                ".rw2", ".pef", ".srw", ".3fr", ".erf", ".kdc", ".mrw", ".x3f", ".iiq", ".rwl")


def _rawpy(name: str):
    try:
        import rawpy
    except ImportError:
        raise FrameReadError(f"{name}: camera raw files need rawpy (LibRaw): install the 'raw' extra, "
                             "pip install 'drizzlestack[raw]'") from None
    return rawpy


def _exif(path) -> tuple[float, float]:
    """Exposure (s) and ISO from the EXIF tags of a TIFF-based raw, NaN when absent."""
    exptime = iso = np.nan
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            for page in tif.pages[:1]:
                tags = {t.code: t.value for t in page.tags.values()}
                exif = tags.get(34665)
                if isinstance(exif, dict):
                    tags.update({{"ExposureTime": 33434, "ISOSpeedRatings": 34855}.get(k, k): v
                                 for k, v in exif.items()})
                value = tags.get(33434)
                if isinstance(value, tuple) and len(value) == 2 and value[1]:
                    exptime = value[0] / value[1]
                elif isinstance(value, (int, float)):
                    exptime = float(value)
                value = tags.get(34855)
                if isinstance(value, tuple) and value:
                    value = value[0]
                if isinstance(value, (int, float)):
                    iso = float(value)
    except Exception:  # not a TIFF container (CR3, RAF): LibRaw's values stand
        pass
    return exptime, iso


def raw_pattern(raw_colors: np.ndarray, color_desc: bytes, name: str) -> str:
    """Bayer pattern of a raw mosaic from LibRaw's colour index of its first 2x2 pixels."""
    desc = color_desc.decode("ascii", "replace") if isinstance(color_desc, bytes) else str(color_desc)
    cell = raw_colors[:2, :2]
    if cell.shape != (2, 2):
        raise FrameReadError(f"{name}: raw mosaic smaller than 2x2 pixels")
    pattern = "".join(desc[int(c)] if int(c) < len(desc) else "?" for c in cell.ravel())
    if pattern not in PATTERNS:
        raise PatternError(f"{name}: colour filter {desc!r} gives the 2x2 cell {pattern!r}, not a Bayer "
                           f"pattern ({', '.join(PATTERNS)}); X-Trans and CMYG sensors are not supported")
    return pattern


def read_raw(path, saturation: float | None = None) -> Frame:
    """Read the visible raw mosaic of a camera raw file.

    Parameters
    ----------
    path : str or path-like
        Any format LibRaw reads with a 2x2 Bayer filter.
    saturation : float, optional
        Overrides the file's white level.

    Returns
    -------
    Frame
        ``data`` the raw values as float32; ``header`` a FITS header carrying
        ``BAYERPAT``, ``EXPTIME``, ``ISOSPEED``, ``BLKLEV0..2`` (R, G, B), ``SATURATE`` and,
        when the camera recorded them, its as-shot white-balance multipliers ``CAMWBR``,
        ``CAMWBG``, ``CAMWBB`` (used by ``drizzle(white_balance="camera")``);
        ``cfa_pattern``, ``black`` (per channel R, G, B) and ``saturation``.

    Raises
    ------
    FrameReadError
        rawpy missing (names the extra), unreadable or unsupported file, X-Trans.
    """
    path = str(Path(path).resolve())
    name = Path(path).name
    rawpy = _rawpy(name)
    if not Path(path).exists():
        raise FrameReadError(f"{name}: no such file ({path})")
    try:
        with rawpy.imread(path) as raw:
            if raw.raw_pattern is None or np.asarray(raw.raw_pattern).shape != (2, 2):
                shape = None if raw.raw_pattern is None else np.asarray(raw.raw_pattern).shape
                raise PatternError(f"{name}: colour filter repeat {shape} is not a 2x2 Bayer pattern "
                                   "(X-Trans and Foveon sensors are not supported yet)")
            data = np.array(raw.raw_image_visible, dtype=np.float32)
            colors = np.array(raw.raw_colors_visible[:2, :2])
            desc = raw.color_desc
            # LibRaw indexes black levels by colour index (R, G, B, second G).
            black4 = [float(v) for v in raw.black_level_per_channel]
            white = float(raw.white_level)
            # As-shot white balance, by colour index like the black levels; LibRaw gives
            # zeros (or a lone G) when the camera recorded none.
            wb4 = [float(v) for v in (getattr(raw, "camera_whitebalance", None) or ())]
            other = getattr(raw, "other", None)
            lib_exp = float(getattr(other, "shutter", 0.0) or 0.0) if other is not None else 0.0
            lib_iso = float(getattr(other, "iso_speed", 0.0) or 0.0) if other is not None else 0.0
    except (FrameReadError, PatternError):
        raise
    except Exception as exc:  # LibRawFileUnsupportedError, LibRawIOError, ...
        raise FrameReadError(f"{name}: LibRaw cannot read this file ({type(exc).__name__}: {exc})") from None
    pattern = raw_pattern(colors, desc, name)
    exptime, iso = _exif(path)
    if lib_exp > 0:
        exptime = lib_exp
    if lib_iso > 0:
        iso = lib_iso
    d = desc.decode("ascii") if isinstance(desc, bytes) else str(desc)
    black = []
    for colour in "RGB":
        idx = [k for k, c in enumerate(d[:len(black4)]) if c == colour]
        black.append(float(np.mean([black4[k] for k in idx])) if idx else 0.0)
    header = fits.Header()
    header["BAYERPAT"] = (pattern, "Bayer pattern of the stored array")
    header["EXPTIME"] = (float(exptime) if np.isfinite(exptime) else 0.0, "exposure [s]")
    if np.isfinite(iso):
        header["ISOSPEED"] = (iso, "ISO")
    for k, b in enumerate(black):
        header[f"BLKLEV{k}"] = (b, f"black level of channel {'RGB'[k]} [ADU]")
    mults = []
    for colour in "RGB":
        idx = [k for k, c in enumerate(d[:len(wb4)]) if c == colour and wb4[k] > 0]
        mults.append(float(np.mean([wb4[k] for k in idx])) if idx else 0.0)
    if all(m > 0 for m in mults):
        from ..whitebalance import CAMERA_KEYWORDS

        for key, colour, m in zip(CAMERA_KEYWORDS, "RGB", mults):
            header[key] = (m, f"camera as-shot white balance multiplier, {colour}")
    sat = float(saturation) if saturation is not None else white
    header["SATURATE"] = (sat, "white level [ADU]")
    header["RAWFILE"] = name[:68]
    return Frame(path=path, data=data, header=header, exptime=float(exptime) if np.isfinite(exptime) else np.nan,
                 saturation=sat, hdu_index=0, cfa_pattern=pattern, black=tuple(black))
