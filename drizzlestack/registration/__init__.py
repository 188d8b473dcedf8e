"""Step 2, registration: star detection, pattern matching and frame -> reference models.

``register(store, ...)`` runs the step on a stack store; ``frame_mapping(store, i)``
(from :mod:`drizzlestack.mappings`, below the steps) rebuilds frame ``i``'s
:class:`~drizzlestack.geometry.FrameMapping` (homography plus the optional
surface-spline correction) for the registered view and drizzle.

Modules: :mod:`.stars` (detection and measurement), :mod:`.match` (pattern matching
and refinement), :mod:`.models` (similarity, affine, homography, surface spline),
:mod:`.register` (the step driver).
"""

from ..mappings import frame_mapping
from .register import register

__all__ = ["register", "frame_mapping"]
