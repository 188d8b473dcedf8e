"""Step 3, integration: per-frame statistics, normalization and weights, the registered
view, pixel rejection and the integrated image (see :func:`integrate`).

Modules: :mod:`.stats` (location, scale, noise, photometry), :mod:`.measure` (the
per-frame pass), :mod:`.normalize` (normalization and weights), :mod:`.resample` (the
registered view), :mod:`.rejection` (rejection methods and the combine,
:func:`~.rejection.reject_stack`), :mod:`.outliers` (flags in each frame's own pixels)
and :mod:`.integrate` (the step driver).
"""

from .integrate import integrate
from .resample import registered_view

__all__ = ["integrate", "registered_view"]
