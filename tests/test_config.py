"""Configuration: the documented defaults load, overrides apply, bad keys and types are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from drizzlestack.config import ConfigError, RunConfig, dump_config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_default_yaml_documents_exactly_the_defaults():
    documented = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert yaml.safe_load(dump_config(RunConfig())) == documented
    assert load_config(CONFIGS / "default.yaml") == RunConfig()


def test_overrides_apply_with_yaml_values():
    cfg = load_config(CONFIGS / "default.yaml", ["scheduler.workers=3", "ingest.inputs=[a.fits, b/]",
                                                  "ingest.saturation=4095", "scheduler.dashboard=:8787"])
    assert cfg.scheduler.workers == 3
    assert cfg.ingest.inputs == ["a.fits", "b/"]
    assert cfg.ingest.saturation == 4095.0
    assert cfg.scheduler.dashboard == ":8787"


@pytest.mark.parametrize(
    "override, message",
    [
        ("ingest.chunck=256", "unknown key ingest.chunck"),
        ("ingest.chunk=big", "ingest.chunk: expected an integer, got 'big'"),
        ("scheduler.progress=maybe", "scheduler.progress: expected true or false"),
        ("nosuchsection.x=1", "unknown key nosuchsection"),
        ("ingest.chunk", "expected KEY=VALUE"),
    ],
)
def test_bad_keys_and_types_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


@pytest.mark.parametrize("name", ["demo.yaml", "dslr-widefield.yaml", "hpc-run.yaml"])
def test_example_configs_load(name):
    """The example run configurations in configs/ use only known keys of the right types."""
    cfg = load_config(CONFIGS / name)
    assert cfg != RunConfig()
    if name == "hpc-run.yaml":
        assert cfg.scheduler.scheduler == "slurm"
        assert (CONFIGS.parent / cfg.scheduler.jobqueue_config).exists()


def test_importing_the_package_and_the_cli_loads_no_heavy_library():
    """Startup: ``import drizzlestack.cli`` (every CLI call) and ``import drizzlestack``
    load none of numpy, dask, xarray, zarr, numba, scipy or astropy (1-4 s of imports
    before they were made lazy); the public functions still load on first use, also
    after their same-named submodules were imported."""
    import subprocess
    import sys

    heavy = ["numpy", "dask", "xarray", "zarr", "numba", "scipy", "astropy"]
    code = ("import sys, drizzlestack, drizzlestack.cli; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = ("import drizzlestack as ds, drizzlestack.ingest, drizzlestack.simulate, drizzlestack.drizzle.driver; "
            "print(all(callable(f) and f.__module__.startswith('drizzlestack.') for f in "
            "(ds.ingest, ds.simulate, ds.drizzle, ds.integrate, ds.register, ds.open_stack)), "
            "type(ds.ingest).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "function"]
