"""Light frames from XISF files (PixInsight's format), read by our own small reader.

(The ``xisf`` package on PyPI is GPL-3; drizzlestack is BSD, so it is not used.)
What is read: the first ``Image`` element of a monolithic XISF 1.0 file, one channel
(grey or a CFA mosaic), sample formats UInt8/16/32 and Float32/64, either byte order,
data attached (``attachment:POS:SIZE``) or inline/embedded in base64, uncompressed or
``zlib`` (with or without byte shuffling, ``zlib+sh``); ``lz4``/``lz4hc``/``zstd`` when
the ``lz4`` / ``zstandard`` modules are installed. Its ``FITSKeyword`` children become
the frame's header, its ``ColorFilterArray`` element (a 2x2 pattern) sets ``BAYERPAT``.
XISF's pixel origin is the top-left corner and rows are stored top-down, so the
pattern applies to the first stored row.
"""

from __future__ import annotations

import base64
import struct
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
from astropy.io import fits

from .fits import EXPOSURE_KEYS, SATURATION_KEYS, Frame, FrameReadError, _header_float

XISF_SUFFIXES = (".xisf",)
SIGNATURE = b"XISF0100"

_FORMATS = {"UInt8": "u1", "UInt16": "u2", "UInt32": "u4", "Float32": "f4", "Float64": "f8"}


def _decompress(blob: bytes, spec: str | None, name: str) -> bytes:
    if not spec:
        return blob
    parts = spec.split(":")
    codec = parts[0].lower()
    shuffle = codec.endswith("+sh")
    codec = codec.removesuffix("+sh")
    if codec == "zlib":
        out = zlib.decompress(blob)
    elif codec in ("lz4", "lz4hc"):
        try:
            import lz4.block
        except ImportError:
            raise FrameReadError(f"{name}: {codec}-compressed XISF needs the 'lz4' module (pip install lz4)") from None
        out = lz4.block.decompress(blob, uncompressed_size=int(parts[1]))
    elif codec == "zstd":
        try:
            import zstandard
        except ImportError:
            raise FrameReadError(f"{name}: zstd-compressed XISF needs the 'zstandard' module") from None
        out = zstandard.ZstdDecompressor().decompress(blob, max_output_size=int(parts[1]))
    else:
        raise FrameReadError(f"{name}: unsupported XISF compression {spec!r}")
    if len(parts) > 1 and len(out) != int(parts[1]):
        raise FrameReadError(f"{name}: XISF block decompressed to {len(out)} bytes, header says {parts[1]}")
    if shuffle:
        item = int(parts[2]) if len(parts) > 2 else 1
        n = len(out) // item
        body = np.frombuffer(out, dtype=np.uint8, count=n * item).reshape(item, n).T.tobytes()
        out = body + out[n * item:]
    return out


def read_xisf(path, saturation: float | None = None) -> Frame:
    """Read the first image of an XISF file as a 2-D frame.

    Raises
    ------
    FrameReadError
        Not an XISF file, truncated, several channels (a colour image: already
        debayered), an unsupported sample format, layout or compression.
    """
    path = str(Path(path).resolve())
    name = Path(path).name
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            if len(head) < 16 or head[:8] != SIGNATURE:
                raise FrameReadError(f"{name}: not a monolithic XISF 1.0 file (no XISF0100 signature)")
            (length,) = struct.unpack("<I", head[8:12])
            xml = fh.read(length)
            if len(xml) < length:
                raise FrameReadError(f"{name}: truncated XISF header")
            root = ET.fromstring(xml.split(b"\0")[0])
            image = root.find("{*}Image")
            if image is None:
                image = root.find("Image")
            if image is None:
                raise FrameReadError(f"{name}: XISF file holds no Image element")
            geometry = [int(v) for v in image.get("geometry", "").split(":")]
            if len(geometry) != 3 or geometry[2] != 1:
                raise FrameReadError(f"{name}: XISF image geometry {image.get('geometry')!r}: only one-channel "
                                     "(grey or CFA mosaic) 2-D images can be ingested")
            fmt = _FORMATS.get(image.get("sampleFormat", ""))
            if fmt is None:
                raise FrameReadError(f"{name}: XISF sample format {image.get('sampleFormat')!r} is not supported")
            if image.get("pixelStorage", "Planar") != "Planar" and geometry[2] != 1:
                raise FrameReadError(f"{name}: XISF pixel storage {image.get('pixelStorage')!r} is not supported")
            location = image.get("location", "").split(":")
            if location[0] == "attachment":
                fh.seek(int(location[1]))
                blob = fh.read(int(location[2]))
                if len(blob) < int(location[2]):
                    raise FrameReadError(f"{name}: truncated XISF data block")
            elif location[0] in ("inline", "embedded"):
                text = image.text if location[0] == "inline" else (image.find("{*}Data").text or "")
                blob = base64.b64decode(text or "") if location[-1] == "base64" else bytes.fromhex(text or "")
            else:
                raise FrameReadError(f"{name}: XISF data location {image.get('location')!r} is not supported")
    except FrameReadError:
        raise
    except FileNotFoundError:
        raise FrameReadError(f"{name}: no such file ({path})") from None
    except (OSError, ValueError, ET.ParseError, zlib.error, struct.error, IndexError) as exc:
        raise FrameReadError(f"{name}: unreadable XISF file ({type(exc).__name__}: {exc})") from None
    try:
        raw = _decompress(blob, image.get("compression"), name)
    except zlib.error as exc:
        raise FrameReadError(f"{name}: corrupt zlib block in XISF file ({exc})") from None
    nx, ny = geometry[0], geometry[1]
    order = ">" if image.get("byteOrder", "little") == "big" else "<"
    dtype = np.dtype(order + fmt)
    if len(raw) != nx * ny * dtype.itemsize:
        raise FrameReadError(f"{name}: XISF data block has {len(raw)} bytes, {nx} x {ny} {fmt} needs "
                             f"{nx * ny * dtype.itemsize}")
    values = np.frombuffer(raw, dtype=dtype).reshape(ny, nx)
    header = fits.Header()
    for kw in image.iter():
        tag = kw.tag.split("}")[-1]
        if tag == "FITSKeyword" and kw.get("name"):
            key, value = kw.get("name"), kw.get("value", "").strip()
            if key in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "BZERO", "BSCALE", "END"):
                continue
            try:
                header[key] = (_fits_value(value), kw.get("comment", ""))
            except (ValueError, KeyError):
                continue
        elif tag == "ColorFilterArray":
            if (kw.get("width"), kw.get("height")) != ("2", "2"):
                raise FrameReadError(f"{name}: XISF colour filter array {kw.get('width')}x{kw.get('height')} "
                                     f"({kw.get('pattern')!r}) is not a 2x2 Bayer pattern (X-Trans is not supported)")
            header["BAYERPAT"] = kw.get("pattern", "")
            header.remove("XBAYROFF", ignore_missing=True)  # the element describes the image itself
            header.remove("YBAYROFF", ignore_missing=True)
            header.remove("ROWORDER", ignore_missing=True)
    data = np.array(values, dtype=np.float32)
    data[~np.isfinite(data)] = np.nan
    exptime = _header_float(header, EXPOSURE_KEYS)
    if saturation is None:
        saturation = _header_float(header, SATURATION_KEYS)
    if saturation is None:
        saturation = float(np.iinfo(dtype).max) if dtype.kind == "u" else float("inf")
    return Frame(path=path, data=data, header=header, exptime=np.nan if exptime is None else exptime,
                 saturation=float(saturation), hdu_index=0)


def _fits_value(text: str):
    if text.startswith("'"):
        return text.strip("'").rstrip()
    if text in ("T", "F"):
        return text == "T"
    try:
        return int(text)
    except ValueError:
        return float(text)
