"""Drizzle: numba kernels, the in-memory :func:`drizzle_array`, and the
:func:`accumulate` / :func:`finalize` pair used by the tiled driver."""

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
