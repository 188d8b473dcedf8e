"""Reading light frames from FITS: every BITPIX, BZERO/BSCALE, gzip, tile compression."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

from .._warnings import DrizzlestackError
from ..saturation import adc_ceiling


class FrameReadError(DrizzlestackError):
    """A file that cannot be ingested; the message names the file and the reason."""


@dataclass
class Frame:
    """One light frame as read from disk."""

    path: str
    data: np.ndarray  # float32 (ny, nx), non-finite -> NaN
    header: fits.Header
    exptime: float
    saturation: float
    hdu_index: int
    cfa_pattern: str = ""  # Bayer pattern of the array as read, when the reader knows it (raw)
    black: tuple = ()  # per-channel (R, G, B) black levels, when the file gives them


EXPOSURE_KEYS = ("EXPTIME", "EXPOSURE", "EXP_TIME", "ITIME")
SATURATION_KEYS = ("SATURATE", "SATLEVEL", "SATURATN")


def _image_hdu(hdul: fits.HDUList) -> int | None:
    """Index of the first HDU holding image data: the primary, else the first image extension
    (tile-compressed images live in a binary-table extension that astropy presents as an image)."""
    for i, hdu in enumerate(hdul):
        if isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
            if hdu.header.get("NAXIS", 0) > 0 or isinstance(hdu, fits.CompImageHDU):
                return i
    return None


def _type_maximum(hdu) -> float:
    """Largest value the stored integer type can hold, after BZERO/BSCALE (the saturation
    level when the header gives none). Float data has no such level: +inf.

    BITPIX 8 is unsigned (0..255); the others are signed, so BITPIX 16 with BZERO 32768
    (the unsigned-16 convention of cameras) gives 65535. For tile-compressed HDUs astropy
    presents the image header, whose BITPIX is the image's.
    """
    bitpix = int(hdu.header.get("BITPIX", -32))
    if bitpix < 0:
        return float("inf")
    raw_max = {8: 255, 16: 2**15 - 1, 32: 2**31 - 1, 64: 2**63 - 1}[bitpix]
    return float(hdu.header.get("BSCALE", 1.0)) * raw_max + float(hdu.header.get("BZERO", 0.0))


def _header_float(header, keys) -> float | None:
    for key in keys:
        value = header.get(key)
        if value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if np.isfinite(value):
            return value
    return None


def read_frame(path, saturation: float | None = None) -> Frame:
    """Read one light frame from a FITS file.

    Parameters
    ----------
    path : str or path-like
        ``.fits``/``.fit``/``.fts``, optionally gzipped, plain or tile-compressed; the
        image is taken from the primary HDU or, if that is empty, the first image extension.
    saturation : float, optional
        Saturation level to use instead of the header's ``SATURATE`` (or the integer
        type's maximum).

    Returns
    -------
    Frame

    Raises
    ------
    FrameReadError
        Unreadable or truncated file, no image data, data that is not 2-D.
    """
    path = str(Path(path).resolve())
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            # astropy only *warns* about truncated files and pads them: that is an error here.
            warnings.simplefilter("error", AstropyUserWarning)
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
                index = _image_hdu(hdul)
                if index is None:
                    raise FrameReadError(f"{name}: no image data in any HDU")
                hdu = hdul[index]
                # Before touching .data: astropy rewrites BITPIX/BSCALE/BZERO once it scales.
                type_max = _type_maximum(hdu)
                header = hdu.header.copy()
                raw = hdu.data
                if raw is None:
                    raise FrameReadError(f"{name}: HDU {index} holds no image data")
    except FrameReadError:
        raise
    except FileNotFoundError:
        raise FrameReadError(f"{name}: no such file ({path})") from None
    except (OSError, EOFError, ValueError, TypeError, AstropyUserWarning, IndexError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FrameReadError(f"{name}: unreadable or truncated FITS file ({reason})") from None

    # Degenerate leading axes (NAXIS3 = 1) are common and harmless.
    while raw.ndim > 2 and raw.shape[0] == 1:
        raw = raw[0]
    if raw.ndim != 2:
        raise FrameReadError(
            f"{name}: image data is {raw.ndim}-D with shape {raw.shape}; only 2-D frames can be ingested"
            + (" (colour cubes must be split into planes first)" if raw.ndim == 3 else "")
        )
    data = np.asarray(raw, dtype=np.float32)
    if not data.flags.writeable or data is raw:
        data = data.copy()
    data[~np.isfinite(data)] = np.nan

    exptime = _header_float(header, EXPOSURE_KEYS)
    if saturation is None:
        saturation = _header_float(header, SATURATION_KEYS)
    if saturation is None:
        saturation = adc_ceiling(data, type_max) if np.isfinite(type_max) else type_max
    return Frame(path=path, data=data, header=header, exptime=np.nan if exptime is None else exptime,
                 saturation=float(saturation), hdu_index=index)


# ----------------------------------------------------------------------------- writing
BLOCK = 2880


def check_output_path(output, overwrite: bool) -> Path | None:
    """Refuse an output file before any work starts: it exists (unless ``overwrite``),
    it is a directory, its directory is missing, or it cannot be written.

    Returns the path, or ``None`` when ``output`` is ``None`` (no file wanted).
    """
    if output is None:
        return None
    from ..location import filesystem, is_url

    if is_url(str(output)):
        # An fsspec URL (s3://bucket/drizzle.fits): an object store has no folders to
        # check, only the object itself.
        fs, key = filesystem(str(output))
        if fs.isdir(key):
            raise DrizzlestackError(f"output={output}: is a directory; give a FITS file name")
        if fs.exists(key) and not overwrite:
            raise DrizzlestackError(f"output={output}: file exists; pass overwrite=True (--overwrite) to replace it")
        return str(output)
    path = Path(output)
    if path.is_dir():
        raise DrizzlestackError(f"output={output}: is a directory; give a FITS file name")
    if path.exists() and not overwrite:
        raise DrizzlestackError(f"output={output}: file exists; pass overwrite=True (--overwrite) to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise DrizzlestackError(f"output={output}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise DrizzlestackError(f"output={output}: not writable")
    return path


def output_exists(output) -> bool:
    """Whether the output file (a local path or an fsspec URL) exists."""
    from ..location import exists, is_url

    return exists(str(output)) if is_url(str(output)) else Path(output).exists()


def _pad(n: int) -> int:
    return (-n) % BLOCK


def _bands(array, planes, factor, offset, rows_per_read):
    """The data of one HDU in file order, as big-endian float32 bands of at most
    ``rows_per_read`` rows (factor and offset applied in float64)."""
    ny = array.shape[-2]
    # Whole chunk rows are read (a band cut through a chunk would decompress it again
    # for every band), then converted and written rows_per_read at a time.
    chunks = getattr(array, "chunks", None)
    row_chunk = chunks[-2] if chunks else None
    step = int(row_chunk) if isinstance(row_chunk, (int, np.integer)) else rows_per_read
    for p in range(planes or 1):
        f = factor[p] if isinstance(factor, (list, tuple, np.ndarray)) else factor
        o = offset[p] if isinstance(offset, (list, tuple, np.ndarray)) else offset
        for y0 in range(0, ny, step):
            rows = slice(y0, min(y0 + step, ny))
            block = np.asarray(array[rows] if planes is None else array[p, rows])
            for r0 in range(0, block.shape[0], rows_per_read):
                band = block[r0:r0 + rows_per_read]
                band = band * np.float64(f) if f is not None else band
                band = band + np.float64(o) if o is not None else band
                yield np.ascontiguousarray(band, dtype=">f4")


def write_streamed(path, images, rows_per_read: int = 256) -> None:
    """Write a multi-extension FITS file whose images are read a band of rows at a time.

    The whole image never sits in memory: each HDU's header is written, then its data
    (big-endian float32) band by band from ``array[y0:y1]`` (a zarr or dask array, or
    anything sliceable), then the padding to a 2880-byte block. The file is written to
    a temporary name and renamed at the end, so a failed write never leaves a truncated
    file under the final name.

    An fsspec URL (``s3://bucket/drizzle.fits``) is written to a local temporary file
    first (in ``TMPDIR``) and uploaded whole, so the object appears only complete.

    Parameters
    ----------
    path : path-like or str
        Output file, or an fsspec URL.
    images : list of (astropy.io.fits.Header, array, factor[, offset])
        One per HDU, the first becoming the primary HDU. An array is ``(ny, nx)`` or a
        cube ``(n, ny, nx)`` (``NAXIS3 = n``, written plane after plane, e.g. colour
        channels). ``factor`` multiplies the data as it is written (e.g. to normalize a
        weights image): a number, one per plane of a cube, or ``None`` for none;
        ``offset`` (the same forms) is added after it (e.g. a white balance).
    rows_per_read : int
        Rows converted and written at a time.
    """
    from ..location import filesystem, is_url

    if is_url(str(path)):
        import tempfile

        fs, key = filesystem(str(path))
        with tempfile.TemporaryDirectory(prefix="drizzlestack-") as tmpdir:
            local = Path(tmpdir) / key.rstrip("/").rsplit("/", 1)[-1]
            write_streamed(local, images, rows_per_read)
            fs.put_file(str(local), key)
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as fh:
            for k, (header, array, factor, *more) in enumerate(images):
                offset = more[0] if more else None
                planes = array.shape[0] if len(array.shape) == 3 else None
                ny, nx = array.shape[-2:]
                hdr = header.copy()
                hdu = fits.PrimaryHDU() if k == 0 else fits.ImageHDU()
                full = hdu.header
                full["BITPIX"] = -32
                full["NAXIS"] = 2 if planes is None else 3
                full.set("NAXIS1", nx, after="NAXIS")
                full.set("NAXIS2", ny, after="NAXIS1")
                last = "NAXIS2"
                if planes is not None:
                    full.set("NAXIS3", planes, after="NAXIS2")
                    last = "NAXIS3"
                for card in hdr.cards:
                    if card.keyword in ("SIMPLE", "XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3",
                                        "EXTEND", "PCOUNT", "GCOUNT", "BZERO", "BSCALE", "END", "BAYERPAT",
                                        "XBAYROFF", "YBAYROFF"):
                        continue
                    if card.keyword in ("HISTORY", "COMMENT", ""):
                        full.add_history(card.value) if card.keyword == "HISTORY" else full.append(card)
                    else:
                        full.append(card, end=True)
                if k == 0 and len(images) > 1:
                    full.set("EXTEND", True, after=last)
                text = full.tostring().encode("ascii")
                fh.write(text)
                written = 0
                for band in _bands(array, planes, factor, offset, rows_per_read):
                    fh.write(band.data)  # (the array's own buffer: no bytes copy)
                    written += band.nbytes
                fh.write(b"\0" * _pad(written))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
