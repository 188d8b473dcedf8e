"""The rejection's parameters, validated once: :class:`RejectionParameters`, and the
tables derived from them for the kernels (range limits, saturation levels, the ESD
critical values)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from drizzlestack._warnings import DrizzlestackError

from .sorting import METHODS, _METHOD_CODE


def _is_integer(value) -> bool:
    try:
        return int(value) == value
    except (TypeError, ValueError, OverflowError):
        return False


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class RejectionParameters:
    """How :func:`~drizzlestack.integration.rejection.rejection_flags` classifies the
    values of a pixel: the method and its thresholds (see the package documentation for
    what each method does with them).

    Parameters
    ----------
    method : {"none", "minmax", "percentile", "sigma", "winsorized", "averaged", "linear", "esd"}
        Rejection algorithm. Default ``"winsorized"``, the pipeline's default.
    low, high : float
        Rejection thresholds below and above the centre, in the method's units (sigma,
        except ``"percentile"``: fractions of the median; unused by ``"minmax"`` and
        ``"esd"``). Finite, ``>= 0``.
    reject_low, reject_high : bool
        Switch the rejection of low / high values on or off. A side switched off keeps
        its outliers in the statistics too (its bound is infinite).
    range_low, range_high : float, optional
        Range rejection: values ``<= range_low`` or ``>= range_high`` are flagged
        :data:`FLAG_RANGE` and left out of everything (``None``: no limit). Saturated
        values are never range-rejected.
    n_low, n_high : int
        Number of lowest / highest values rejected by ``"minmax"``.
    max_iterations : int, optional
        Cap on the clipping iterations of ``"sigma"`` (astropy's ``maxiters``),
        ``"winsorized"``, ``"averaged"`` and ``"linear"``. Default: until nothing changes.
    esd_significance : float
        Significance level (type I error) of the ESD test, in (0, 1).
    esd_outliers : float
        Largest fraction of a sample that the ESD test may reject, in (0, 1).
    esd_low_relaxation : float
        Low deviations are divided by this in the ESD test, to reject dark values less
        readily than bright ones. Default 1: Rosner's test as published. (PixInsight
        uses 1.5, but with a trimmed-mean centre; about the plain mean, 1.5 leaves a
        single dead pixel among 20 frames undetectable: its own weight in the standard
        deviation caps its statistic near ``(n - 1) / sqrt(n) / 1.5``.)

    Raises
    ------
    DrizzlestackError
        A value out of its domain, with the parameter's name and the reason.

    Examples
    --------
    >>> from drizzlestack.integration.rejection import RejectionParameters
    >>> p = RejectionParameters(method="sigma", low=4, high=3)
    >>> p.low, p.replace(method="none").method
    (4.0, 'none')
    """

    method: str = "winsorized"
    low: float = 3.0
    high: float = 3.0
    reject_low: bool = True
    reject_high: bool = True
    range_low: float | None = None
    range_high: float | None = None
    n_low: int = 1
    n_high: int = 1
    max_iterations: int | None = None
    esd_significance: float = 0.05
    esd_outliers: float = 0.3
    esd_low_relaxation: float = 1.0

    def __post_init__(self):
        if self.method not in _METHOD_CODE:
            raise DrizzlestackError(f"method={self.method!r}: unknown rejection method; choose one of {', '.join(METHODS)}")
        for name in ("low", "high"):
            value = getattr(self, name)
            if not (_is_number(value) and np.isfinite(float(value)) and float(value) >= 0):
                raise DrizzlestackError(f"{name}={value!r}: the threshold must be a finite number >= 0")
        for name in ("n_low", "n_high"):
            value = getattr(self, name)
            if not _is_integer(value) or value < 0:
                raise DrizzlestackError(f"{name}={value!r}: must be an integer >= 0")
        if self.max_iterations is not None and (not _is_integer(self.max_iterations) or self.max_iterations < 1):
            raise DrizzlestackError(f"max_iterations={self.max_iterations!r}: must be None or an integer >= 1")
        for name in ("esd_significance", "esd_outliers"):
            value = getattr(self, name)
            if not (_is_number(value) and 0.0 < float(value) < 1.0):
                raise DrizzlestackError(f"{name}={value!r}: must be in (0, 1)")
        if not (_is_number(self.esd_low_relaxation) and float(self.esd_low_relaxation) > 0.0):
            raise DrizzlestackError(f"esd_low_relaxation={self.esd_low_relaxation!r}: must be > 0")
        for name in ("range_low", "range_high"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and not np.isnan(float(value))):
                raise DrizzlestackError(f"{name}={value!r}: must be a number (None for no limit; NaN is not a limit)")
        # The kernels take plain floats, ints and bools: normalized once, here.
        for name in ("low", "high", "esd_significance", "esd_outliers", "esd_low_relaxation"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("range_low", "range_high"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("n_low", "n_high"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.max_iterations is not None:
            object.__setattr__(self, "max_iterations", int(self.max_iterations))
        object.__setattr__(self, "reject_low", bool(self.reject_low))
        object.__setattr__(self, "reject_high", bool(self.reject_high))

    def replace(self, **changes) -> RejectionParameters:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def method_code(self) -> int:
        """The method as the kernels see it (an index into :data:`METHODS`)."""
        return _METHOD_CODE[self.method]

    @property
    def range_limits(self) -> tuple[float, float]:
        """``(range_low, range_high)`` as floats, ``-inf``/``+inf`` for no limit."""
        return (-np.inf if self.range_low is None else self.range_low,
                np.inf if self.range_high is None else self.range_high)

    @property
    def iteration_cap(self) -> int:
        """``max_iterations`` as the kernels see it: 0 for no cap."""
        return 0 if self.max_iterations is None else self.max_iterations

    def esd_critical_values(self, n_frames: int) -> np.ndarray:
        """Rosner's two-sided critical values ``lam[n, i]`` for samples of
        ``n <= n_frames`` values and the ``i``-th removal (0-based), ``inf`` where
        undefined; a ``(1, 1)`` placeholder unless the method is ``"esd"``."""
        if self.method != "esd":
            return np.full((1, 1), np.inf)
        from scipy.stats import t as student_t

        lam = np.full((n_frames + 1, max(n_frames, 1)), np.inf)
        for n in range(3, n_frames + 1):
            k = min(max(int(self.esd_outliers * n), 1), n - 2)
            i = np.arange(k)
            dof = n - i - 2
            p = 1.0 - self.esd_significance / (2.0 * (n - i))
            t = student_t.ppf(p, dof)
            lam[n, :k] = (n - i - 1) * t / np.sqrt((dof + t * t) * (n - i))
        return lam


def saturation_levels(saturation, n_frames: int) -> np.ndarray:
    """Per-frame saturation levels as the kernels see them: float64 of shape
    ``(n_frames,)``, ``inf`` for none or unknown (NaN).

    Parameters
    ----------
    saturation : float or array_like of shape (frame,) or None
        One level for all frames, one per frame, or ``None`` (no protection).
    n_frames : int
        Number of frames of the stack.
    """
    if saturation is None:
        return np.full(n_frames, np.inf)
    sat = np.asarray(saturation, dtype=np.float64)
    if sat.ndim == 0:
        sat = np.full(n_frames, float(sat))
    elif sat.shape != (n_frames,):
        raise DrizzlestackError(
            f"saturation: expected a scalar or one level per frame ({n_frames}), got shape {sat.shape}"
        )
    # A NaN level means "unknown": such a frame has no saturation protection.
    return np.where(np.isnan(sat), np.inf, sat)


def resolve(parameters, keywords: dict, default_method: str) -> RejectionParameters:
    """The parameters of a call: ``parameters`` (a :class:`RejectionParameters` or
    ``None``) with the fields given as ``keywords`` on top; ``default_method`` when
    neither names a method."""
    if parameters is None:
        return RejectionParameters(**{"method": default_method, **keywords})
    if not isinstance(parameters, RejectionParameters):
        raise DrizzlestackError(f"parameters={parameters!r}: expected a RejectionParameters (or keywords)")
    return parameters.replace(**keywords) if keywords else parameters
