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


def _block_tasks(array, planes, factor, offset, data_start: int, rows_per_read: int):
    """One HDU's data as tasks ``(array, plane, rows, factor, offset, file position)``:
    whole chunk rows of the array (a band cut through a chunk would decompress it again
    for every band), each with where its bytes go in the file."""
    ny, nx = array.shape[-2:]
    chunks = getattr(array, "chunks", None)
    row_chunk = chunks[-2] if chunks else None
    step = int(row_chunk) if isinstance(row_chunk, (int, np.integer)) else rows_per_read
    tasks = []
    for p in range(planes or 1):
        f = factor[p] if isinstance(factor, (list, tuple, np.ndarray)) else factor
        o = offset[p] if isinstance(offset, (list, tuple, np.ndarray)) else offset
        for y0 in range(0, ny, step):
            rows = slice(y0, min(y0 + step, ny))
            tasks.append((array, None if planes is None else p, rows, f, o, data_start + 4 * nx * (p * ny + y0)))
    return tasks


def _write_block(fd: int, task, rows_per_read: int) -> None:
    """Read one task's rows, convert them to big-endian float32 ``rows_per_read`` rows at
    a time (factor and offset applied in float64) and write them at their position."""
    array, plane, rows, f, o, position = task
    block = np.asarray(array[rows] if plane is None else array[plane, rows])
    for r0 in range(0, block.shape[0], rows_per_read):
        band = block[r0:r0 + rows_per_read]
        band = band * np.float64(f) if f is not None else band
        band = band + np.float64(o) if o is not None else band
        band = np.ascontiguousarray(band, dtype=">f4")
        _pwrite_all(fd, memoryview(band).cast("B"), position)
        position += band.nbytes


def _pwrite_all(fd: int, data, position: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):  # (pwrite may write less than asked)
        done += os.pwrite(fd, view[done:], position + done)


def _hdu_header(k: int, n_images: int, header, array) -> bytes:
    """HDU ``k``'s header (float32 data of the array's shape; the caller's cards
    except those describing another layout or a mosaic), padded to a 2880-byte block."""
    planes = array.shape[0] if len(array.shape) == 3 else None
    ny, nx = array.shape[-2:]
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
    for card in header.copy().cards:
        if card.keyword in ("SIMPLE", "XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3",
                            "EXTEND", "PCOUNT", "GCOUNT", "BZERO", "BSCALE", "END", "BAYERPAT",
                            "XBAYROFF", "YBAYROFF"):
            continue
        if card.keyword in ("HISTORY", "COMMENT", ""):
            full.add_history(card.value) if card.keyword == "HISTORY" else full.append(card)
        else:
            full.append(card, end=True)
    if k == 0 and n_images > 1:
        full.set("EXTEND", True, after=last)
    return full.tostring().encode("ascii")


#: threads converting and writing a FITS product's blocks (each holds one chunk row)
WRITE_THREADS = 2


def write_streamed(path, images, rows_per_read: int = 256) -> None:
    """Write a multi-extension FITS file whose images are read a chunk row at a time.

    The whole image never sits in memory. Every header is made first, so each HDU's
    place in the file is known; the file is then filled by :data:`WRITE_THREADS` threads,
    each reading one chunk row of one image (``array[y0:y1]``: a zarr or dask array, or
    anything sliceable), converting it to big-endian float32 and writing it at its
    place (the data padding is the file's zeros). Written serially, converting and
    writing a drizzle's three images took 1.4-1.7x longer (benchmarks/README.md). The file is written to a
    temporary name and renamed at the end, so a failed write never leaves a truncated
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
    from concurrent.futures import ThreadPoolExecutor

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
        headers, tasks, position = [], [], 0
        for k, (header, array, factor, *more) in enumerate(images):
            text = _hdu_header(k, len(images), header, array)
            headers.append((text, position))
            planes = array.shape[0] if len(array.shape) == 3 else None
            tasks += _block_tasks(array, planes, factor, more[0] if more else None, position + len(text),
                                  rows_per_read)
            nbytes = 4 * int(np.prod(array.shape))
            position += len(text) + nbytes + _pad(nbytes)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.ftruncate(fd, position)  # the data padding: zeros
            for text, at in headers:
                _pwrite_all(fd, text, at)
            with ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="drizzlestack-fits") as pool:
                futures = [pool.submit(_write_block, fd, task, rows_per_read) for task in tasks]
                try:
                    for done in futures:
                        done.result()
                except BaseException:
                    for f in futures:  # a failed block: the rest are not written
                        f.cancel()
                    raise
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
