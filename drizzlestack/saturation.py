"""Where a frame's counts stop being linear: the one rule for an analogue-to-digital
converter's ceiling, used by ingest (for frames whose header gives no level) and by star
detection (for frames handed to it with only the integer type's maximum)."""

from __future__ import annotations

import numpy as np

#: a ceiling is a pile-up of at least this many pixels at the frame's maximum
ADC_MIN_COUNT = 3
#: ... within this many ADU below ``2**k - 1`` for some converter depth k
ADC_MARGIN = 16.0
ADC_BITS = range(8, 17)


def adc_ceiling(data: np.ndarray, type_max: float, min_count: int = ADC_MIN_COUNT) -> float:
    """Saturation level of data whose header does not give one.

    Cameras often write a 12- or 14-bit converter's output in a 16-bit container, so
    the type's maximum (32767 or 65535) is not where stars saturate: a pile-up of at
    least ``min_count`` pixels at a maximum within 16 ADU of ``2**k - 1`` (k = 8..16)
    is the converter's ceiling. Otherwise ``type_max`` (which may be ``inf``: no level
    known). A bright star's few brightest pixels at some other value are not a ceiling.

    Parameters
    ----------
    data : ndarray
        The frame (NaN = no data). Not copied: the only temporary is one boolean mask.
    type_max : float
        The level to return when no ceiling is found.
    min_count : int
        Fewest pixels at the maximum that make a pile-up.

    Returns
    -------
    float
        The ceiling, or ``type_max``.
    """
    with np.errstate(invalid="ignore"):
        top = float(np.nanmax(data)) if np.size(data) and not np.all(np.isnan(data)) else float("nan")
    count = int(np.count_nonzero(data == top)) if np.isfinite(top) else 0
    return ceiling_from_top(top, count, type_max, min_count)


def ceiling_from_top(top: float, count: int, type_max: float, min_count: int = ADC_MIN_COUNT) -> float:
    """:func:`adc_ceiling` from the frame's maximum ``top`` (NaN: no data) and the number
    of pixels at it, ``count`` (for frames read a band at a time)."""
    if not np.isfinite(top) or top >= type_max or count < min_count:
        return type_max
    for k in ADC_BITS:
        if 0 <= (2.0**k - 1) - top <= ADC_MARGIN:
            return top
    return type_max
