"""Typed run configuration: YAML files plus ``--set section.key=value`` overrides.

Each pipeline step has a section whose fields are the keyword arguments of its API
function, so the config, the CLI and the Python API never drift apart. Unknown keys
and wrong types are refused with a message naming the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ._warnings import DrizzlestackError
from .parallel import SchedulerOptions


class ConfigError(DrizzlestackError):
    """A configuration key is unknown or has the wrong type."""


@dataclass
class IngestConfig:
    inputs: list[str] = field(default_factory=list)  # FITS files, directories or glob patterns
    chunk: int = 512  # spatial chunk of the frames array (pixels)
    saturation: float | None = None  # ADU; default: header SATURATE, else the integer type's maximum
    cfa: str | None = None  # Bayer pattern (RGGB, ...) to declare, "grey", or None: from the files


@dataclass
class RegisterConfig:
    reference: str | int = "auto"  # "auto", a frame index or a file name
    model: str = "homography"  # similarity | affine | homography
    distortion: bool = False  # add a smoothed thin-plate spline for optical distortion
    mirror: bool = False  # accept frames flipped left-right
    min_matches: int = 6  # fewer matched stars: the frame is excluded
    threshold: float = 5.0  # detection threshold (sigma above background)
    max_stars: int = 2000  # brightest stars kept per frame
    scale_range: tuple[float, float] = (0.8, 1.25)  # accepted scale between a frame and the reference
    smoothing: float | str = "auto"  # spline smoothing


@dataclass
class OutliersConfig:
    """Tolerances of the outlier test in each frame's own pixels (integration/outliers.py)."""

    snr: float = 4.0  # noise multiples a raw pixel may stand off the blotted model
    derivative: float = 1.2  # multiples of the model's local gradient (registration, pixel phase)
    signal: float = 0.6  # fraction of the model above the sky (seeing, transparency)
    snr_grow: float = 3.0  # the same three around first hits (cosmic-ray tails, trail edges)
    derivative_grow: float = 0.7
    signal_grow: float = 0.4
    hot_fraction: float = 0.3  # a sensor pixel flagged in this fraction of frames is hot in all


@dataclass
class IntegrateConfig:
    rejection: str = "winsorized"  # none | minmax | percentile | sigma | winsorized | averaged | linear | esd
    low: float = 4.0  # low rejection threshold (sigma)
    high: float = 3.0  # high rejection threshold (sigma)
    reject_low: bool = True
    reject_high: bool = True
    range_low: float | None = None  # reject values at or below (ADU)
    range_high: float | None = None  # reject values at or above (ADU)
    normalization: str = "additive+scaling"  # none | additive | multiplicative | additive+scaling | multiplicative+scaling
    scale_estimator: str = "auto"  # auto | photometry | biweight | mad
    weights: str = "noise"  # none | exposure | noise | keyword
    weight_keyword: str | None = None  # FITS keyword when weights = keyword
    roi: list[float] | None = None  # [x0, y0, width, height] for quick trials
    tile: int = 512  # spatial tile of the registered view (pixels)
    task_memory: str = "256MiB"  # memory budget of one tile task: tiles shrink as frames are added
    output: str | None = "integration.fits"  # FITS file of the integration (null: store only)
    white_balance: str = "none"  # colour frames, the FITS image only: none | camera | neutral
    align_channels: bool = True  # colour frames: the image's red and blue onto green (measured on the stars)
    outliers: OutliersConfig = field(default_factory=OutliersConfig)


@dataclass
class DrizzleConfig:
    scale: float = 2.0  # output pixels per reference pixel
    pixfrac: float = 0.9  # drop size in input pixels, (0, 1]
    kernel: str = "square"  # square | point | turbo | gaussian | lanczos2 | lanczos3
    roi: list[float] | None = None  # [x0, y0, width, height] in reference pixels
    tile: int = 1024  # output tile size (pixels): one task per tile
    rejection: bool = True  # use the integration's per-pixel rejection flags
    weights: bool = True  # use the integration's frame weights
    normalization: bool = True  # use the integration's normalization
    distortion: bool = True  # use the registration's distortion model, if any
    coverage: bool = True  # write the COVERAGE extension
    white_balance: str = "none"  # colour frames: none | camera | neutral
    align_channels: bool = True  # colour frames: shift red and blue onto green (measured on the stars)
    output: str | None = "drizzle.fits"  # FITS file (null: store only)


@dataclass
class RunConfig:
    """The whole configuration of a run (see ``configs/default.yaml``)."""

    store: str = "stack.zarr"
    scheduler: SchedulerOptions = field(default_factory=SchedulerOptions)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    integrate: IntegrateConfig = field(default_factory=IntegrateConfig)
    drizzle: DrizzleConfig = field(default_factory=DrizzleConfig)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check/convert ``value`` to the annotated type ``tp``; ConfigError names ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp) or (typing.Any,)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        inner = args if args and args[-1] is not Ellipsis else [args[0]] * len(value)
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, inner)))
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    return value


def _build(cls, data, prefix: str = ""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _to_dict(obj):
    return dataclasses.asdict(obj)


def _parse_value(text: str):
    """A ``--set`` value is YAML: ``3``, ``0.9``, ``true``, ``[1, 2]``, ``null`` or a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(path=None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults) and apply ``section.key=value`` overrides.

    Raises
    ------
    ConfigError
        Unknown key, wrong type, or a malformed override.
    """
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. drizzle.scale=3")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {part} is not a section")
        node[parts[-1]] = _parse_value(text)
    return _build(RunConfig, data)


def dump_config(cfg: RunConfig) -> str:
    """The configuration as YAML (recorded in outputs so runs can be reproduced)."""
    return yaml.safe_dump(_to_dict(cfg), sort_keys=False)
