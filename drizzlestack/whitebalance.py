"""White balance of colour (CFA) products: one gain per channel, folded into the
per-channel normalization the drizzle applies anyway (no extra pass over the frames),
and applied to the integration's FITS image as it is streamed out (the store keeps the
unbalanced integration).

A raw mosaic's channels have the sensor's sensitivities through its filters: drizzled
as they are (``white_balance="none"``, the default, as Siril and PixInsight do) a grey
sky comes out green. Two balances are offered:

``camera``
    The camera's as-shot multipliers, recorded at ingest from a raw file (LibRaw's
    ``camera_whitebalance``, header keywords :data:`CAMERA_KEYWORDS`). FITS, TIFF and
    XISF frames have none, and the balance is refused naming them.
``neutral``
    Neutral background: each channel's sky brought to green's, from the integration's
    per-channel ``location`` (sky median) of the reference frame.

Both are **multiplicative** about each channel's black level::

    balanced_c = (v_c - black_c) * g_c + black_G,   g_G = 1

A white balance corrects the channels' sensitivities, which are gains (the camera's
multipliers are gains on black-subtracted raw values): with gains that make one grey
(the sky) grey, every grey is grey, so stars and nebulae get their colours too. An
additive shift would make the sky grey but leave everything above it in the sensor's raw
colours, and would depend on the pedestal. The black level must come off first: a gain
applied on top of a pedestal multiplies the pedestal and tints the dark. The green
channel is the reference and keeps its values exactly as unbalanced (``g_G = 1``, its
black level kept), so a balanced product differs from the unbalanced one only in red
and blue.

Black levels are the per-channel ``black_level`` recorded at ingest (raw files, FITS
``BLKLEV0..2``/``BLKLEVEL``/``PEDESTAL``); a frame without one is taken as calibrated
(black 0). Normalized data are in the reference frame's units, so their black level is
the reference frame's; unnormalized data keep each frame's own.

``neutral`` assumes the sky is grey; a sky coloured by light pollution takes that
colour's inverse into the stars (remove the gradient first, or use ``camera``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import cfa as _cfa
from ._warnings import DrizzlestackError, DrizzlestackWarning

#: ``white_balance`` choices (``none`` is the default)
WHITE_BALANCES = ("none", "camera", "neutral")
#: stored-header keywords of the camera's as-shot multipliers (R, G, B), written at ingest
CAMERA_KEYWORDS = ("CAMWBR", "CAMWBG", "CAMWBB")


def check_white_balance(value) -> str:
    """``value`` if it is one of :data:`WHITE_BALANCES`, else a DrizzlestackError naming
    the parameter."""
    if not isinstance(value, str) or value.strip().lower() not in WHITE_BALANCES:
        raise DrizzlestackError(f"white_balance={value!r}: unknown white balance; choose one of "
                                f"{', '.join(WHITE_BALANCES)}")
    return value.strip().lower()


def camera_multipliers(header_text: str) -> np.ndarray | None:
    """The as-shot multipliers (R, G, B) in a stored header, or ``None`` when it has none
    (a FITS frame, or a raw file whose camera recorded none)."""
    from astropy.io import fits

    try:
        header = fits.Header.fromstring(str(header_text), sep="\n")
    except (ValueError, TypeError):
        return None
    values = [header.get(k) for k in CAMERA_KEYWORDS]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0
               for v in values):
        return None
    return np.asarray(values, dtype=np.float64)


@dataclass
class Balance:
    """Per-channel gains and what they came from."""

    method: str
    gains: np.ndarray  #: (3,) g_R, g_G = 1, g_B

    def fold(self, scale: np.ndarray, offset: np.ndarray, black: np.ndarray):
        """The normalization ``v * scale + offset`` (arrays ``(n, 3)``) followed by the
        balance about the black levels ``black`` ``(n, 3)`` (of the normalized data), as
        one affine map per frame and channel: ``(scale', offset')``."""
        g = self.gains[None, :]
        black = np.where(np.isfinite(black), black, 0.0)
        return scale * g, (offset - black) * g + black[:, 1:2]


def _frame_names(stack, frames) -> str:
    paths = stack["path"].values if "path" in stack else None
    names = [f"{int(i)} ({Path(str(paths[int(i)])).name})" if paths is not None else str(int(i)) for i in frames]
    if len(names) > 8:
        names = names[:8] + [f"and {len(names) - 8} more"]
    return ", ".join(names)


def balance(method: str, stack, indices, reference: int, store="store") -> Balance | None:
    """The gains of white balance ``method`` for the frames ``indices`` of a colour store.

    Parameters
    ----------
    method : str
        One of :data:`WHITE_BALANCES`.
    stack : xarray.Dataset
        The store (:func:`drizzlestack.store.open_stack`).
    indices : sequence of int
        The frames to be balanced (each must have camera multipliers for ``camera``).
    reference : int
        The reference frame: its multipliers (``camera``) or its per-channel sky
        (``neutral``) set the gains, in the units the normalization maps every frame to.
    store : str
        The store's name, for messages.

    Returns
    -------
    Balance or None
        ``None`` for ``none``.

    Raises
    ------
    DrizzlestackError
        A grey store (white balance needs colour), ``camera`` with frames lacking
        multipliers (named), ``neutral`` without a per-channel integration or with a sky
        at or below its black level.
    """
    method = check_white_balance(method)
    if method == "none":
        return None
    patterns = {str(p) for p in np.asarray(stack["cfa_pattern"].values).ravel()} if "cfa_pattern" in stack else {""}
    if patterns == {""}:
        raise DrizzlestackError(f"white_balance={method!r}: {store} holds grey frames; a white balance needs "
                                "colour (Bayer) frames (use white_balance='none')")
    headers = stack["header"].values
    if method == "camera":
        frames = sorted(set(int(i) for i in indices) | {int(reference)})
        mults = {i: camera_multipliers(headers[i]) for i in frames}
        missing = [i for i in frames if mults[i] is None]
        if missing:
            raise DrizzlestackError(
                f"white_balance='camera': frame(s) {_frame_names(stack, missing)} of {store} have no camera "
                "white-balance multipliers (only camera raw files carry them; FITS, TIFF and XISF frames do "
                "not, nor raws ingested before they were recorded); use white_balance='neutral' or 'none'")
        ref = mults[int(reference)]
        differ = [i for i in frames if not np.allclose(mults[i] / mults[i][1], ref / ref[1], rtol=1e-6)]
        if differ:
            warnings.warn(f"white_balance='camera': the as-shot multipliers of frame(s) {_frame_names(stack, differ)}"
                          f" differ from the reference frame {reference}'s; the reference's are used for all "
                          "(a raw's values do not depend on its as-shot balance)", DrizzlestackWarning,
                          stacklevel=3)
        return Balance("camera", ref / ref[1])
    # neutral
    if "location" not in stack or stack["location"].dims != ("frame", "channel"):
        raise DrizzlestackError(f"white_balance='neutral': {store} has no per-channel sky levels; run "
                                f"'drizzlestack integrate {store}' first (it measures each channel's sky)")
    sky = np.asarray(stack["location"].values[int(reference)], dtype=np.float64)
    black = reference_black(stack, reference)
    above = sky - black
    if not (np.all(np.isfinite(above)) and np.all(above > 0)):
        listed = ", ".join(f"{c} {s:g} (black {b:g})" for c, s, b in zip(_cfa.CHANNELS, sky, black))
        raise DrizzlestackError(f"white_balance='neutral': the reference frame {reference}'s sky is not above its "
                                f"black level in every channel ({listed}); a neutral balance needs a sky to "
                                "balance on")
    return Balance("neutral", above[1] / above)


def black_levels(stack, indices) -> np.ndarray:
    """Per-channel black levels ``(len(indices), 3)`` of frames, 0 where unknown."""
    if "black_level" not in stack or stack["black_level"].dims != ("frame", "channel"):
        return np.zeros((len(indices), len(_cfa.CHANNELS)))
    values = np.asarray(stack["black_level"].values, dtype=np.float64)[list(indices)]
    return np.where(np.isfinite(values), values, 0.0)


def reference_black(stack, reference: int) -> np.ndarray:
    """The reference frame's per-channel black levels (the normalized data's), 0 where
    unknown."""
    return black_levels(stack, [int(reference)])[0]
