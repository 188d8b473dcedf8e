"""Drizzle: numba kernels, the in-memory :func:`drizzle_array`, the
:func:`accumulate` / :func:`finalize` pair used by the tiled driver, and the tiled
step itself (:func:`drizzlestack.drizzle.driver.drizzle`).

``drizzlestack.drizzle`` is both this package and the step: calling the package,
``ds.drizzle(store, scale=2.0, ...)``, runs :func:`.driver.drizzle`. A plain function
bound to the same name would shadow the package, and ``import
drizzlestack.drizzle.kernels`` would then fail (Python resolves the dotted name through
the package attribute).
"""

import sys
import types

from .array import (
    KERNELS,
    accumulate,
    drizzle_array,
    estimate_pixel_scale_ratio,
    finalize,
    kernel_radius,
)

__all__ = [
    "KERNELS",
    "accumulate",
    "drizzle_array",
    "estimate_pixel_scale_ratio",
    "finalize",
    "kernel_radius",
]


class _CallablePackage(types.ModuleType):
    """The package's module type: calling it runs the drizzle step."""

    def __call__(self, *args, **kwargs):
        from .driver import drizzle

        return drizzle(*args, **kwargs)

    @property
    def __wrapped__(self):  # inspect.signature(ds.drizzle) shows the step's parameters
        from .driver import drizzle

        return drizzle


sys.modules[__name__].__class__ = _CallablePackage
