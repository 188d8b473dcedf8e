"""File formats in and out (FITS now; XISF, TIFF and camera raw later)."""

from .fits import FrameReadError, read_frame

__all__ = ["FrameReadError", "read_frame"]
