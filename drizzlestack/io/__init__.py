"""File formats in and out: FITS, camera raw (rawpy), TIFF and XISF."""

from pathlib import Path

from .fits import Frame, FrameReadError, read_frame as read_fits
from .raw import RAW_SUFFIXES, read_raw
from .tiff import TIFF_SUFFIXES, read_tiff
from .xisf import XISF_SUFFIXES, read_xisf

__all__ = ["Frame", "FrameReadError", "RAW_SUFFIXES", "TIFF_SUFFIXES", "XISF_SUFFIXES", "read_any", "read_fits"]

#: The readers, by file name ending (anything else is read as FITS).
READERS = {**{s: read_raw for s in RAW_SUFFIXES}, **{s: read_tiff for s in TIFF_SUFFIXES},
           **{s: read_xisf for s in XISF_SUFFIXES}}


def read_any(path, saturation=None) -> Frame:
    """Read one light frame, choosing the reader by the file name's ending."""
    reader = READERS.get(Path(str(path)).suffix.lower(), read_fits)
    return reader(path, saturation=saturation)


read_frame = read_fits  # the name other modules imported before the other formats existed
