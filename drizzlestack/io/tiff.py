"""Light frames from TIFF files (through tifffile): 2-D grey or Bayer mosaics.

A TIFF carries no standard Bayer keyword: a mosaic is declared with the ingest option
``cfa=`` (CLI ``--cfa``), unless the file has the TIFF/EP ``CFAPattern`` tags.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from .fits import Frame, FrameReadError

TIFF_SUFFIXES = (".tif", ".tiff")

_CFA_CODES = {0: "R", 1: "G", 2: "B"}


def read_tiff(path, saturation: float | None = None) -> Frame:
    """Read one 2-D frame from a TIFF file.

    Integer data saturates at the type's maximum unless ``saturation`` says otherwise;
    a ``CFAPattern`` tag (33422, with a 2x2 ``CFARepeatPatternDim``) sets ``BAYERPAT``.
    """
    import tifffile

    path = str(Path(path).resolve())
    name = Path(path).name
    if not Path(path).exists():
        raise FrameReadError(f"{name}: no such file ({path})")
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            raw = page.asarray()
            tags = {t.code: t.value for t in page.tags.values()}
    except Exception as exc:
        raise FrameReadError(f"{name}: unreadable TIFF file ({type(exc).__name__}: {exc})") from None
    while raw.ndim > 2 and raw.shape[0] == 1:
        raw = raw[0]
    if raw.ndim != 2:
        raise FrameReadError(f"{name}: TIFF image has shape {raw.shape}; only 2-D (grey or mosaic) frames "
                             "can be ingested (an RGB TIFF is already debayered)")
    header = fits.Header()
    dims, codes = tags.get(33421), tags.get(33422)
    if dims is not None and codes is not None:
        if tuple(dims) != (2, 2):
            raise FrameReadError(f"{name}: CFA repeat pattern {tuple(dims)} is not 2x2 (X-Trans is not supported)")
        header["BAYERPAT"] = "".join(_CFA_CODES.get(int(c), "?") for c in codes)
    if saturation is None:
        saturation = float(np.iinfo(raw.dtype).max) if raw.dtype.kind in "iu" else float("inf")
    data = np.array(raw, dtype=np.float32)
    data[~np.isfinite(data)] = np.nan
    return Frame(path=path, data=data, header=header, exptime=np.nan, saturation=float(saturation), hdu_index=0)
