"""The command line: --version, simulate, info, drizzle --roi and its flags, and the exit
status of an interrupted (Ctrl-C) run, each checked against what it must produce (files,
store contents, the API's result), not against the command's own echo."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import drizzlestack as ds
from drizzlestack.cli import main
from drizzlestack.store import StackStore
from conftest import ROOT, register_with_truth


@pytest.fixture(scope="module")
def registered(tmp_path_factory, small_sim):
    store = tmp_path_factory.mktemp("cli") / "s.zarr"
    ds.ingest(small_sim.files, store)
    register_with_truth(store, small_sim)
    return store


def test_version_is_the_packages(capsys):
    if sys.version_info >= (3, 11):
        import tomllib

        declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
        assert ds.__version__ == declared
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"drizzlestack {ds.__version__}"


def test_simulate_writes_the_frames_the_api_would(tmp_path, capsys):
    args = dict(n_frames=3, shape=(48, 64), fwhm=1.8, n_stars=25, seed=4)
    assert main(["simulate", str(tmp_path / "cli"), "--frames", "3", "--height", "48", "--width", "64",
                 "--fwhm", "1.8", "--stars", "25", "--seed", "4"]) == 0
    api = ds.simulate(tmp_path / "api", **args)
    files = sorted((tmp_path / "cli").glob("*.fits"))
    assert [f.name for f in files] == [Path(f).name for f in api.files]
    for cli_file, api_file in zip(files, api.files):
        data = fits.getdata(cli_file)
        assert data.shape == (48, 64)
        np.testing.assert_array_equal(data, fits.getdata(api_file))
    assert (tmp_path / "cli" / "truth.json").is_file() and (tmp_path / "cli" / "stars.ecsv").is_file()


def test_info_lists_every_frame_with_its_status(registered, small_sim, capsys, tmp_path):
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(registered, store)
    StackStore.open(store).set_frame_values("status", 4, "unregistered: 3 stars matched")
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "frames     6 of 160 x 128 px" in out
    lines = out.splitlines()
    header = next(k for k, line in enumerate(lines) if line.startswith("#  "))
    rows = lines[header + 1:header + 7]
    assert [int(r.split()[0]) for r in rows] == list(range(6))
    for i, row in enumerate(rows):
        assert Path(small_sim.files[i]).name in row
        assert row.rstrip().endswith("unregistered: 3 stars matched" if i == 4 else "ok")


def test_drizzle_roi_from_the_cli_is_the_window_of_the_full_drizzle(registered, tmp_path):
    out = tmp_path / "roi.fits"
    assert main(["drizzle", str(registered), "--scale", "2", "--tile", "64", "--roi", "30", "20", "60", "40",
                 "-o", str(out), "--scheduler", "synchronous", "--no-progress"]) == 0
    full = ds.drizzle(registered, scale=2.0, tile=64, output=None).drizzle.values
    with fits.open(out) as hdul:
        h = hdul[0].header
        assert (h["DRIZROIX"], h["DRIZROIY"], h["DRIZROIW"], h["DRIZROIH"]) == (30, 20, 60, 40)
        np.testing.assert_allclose(hdul[0].data, full[40:120, 60:180], rtol=1e-6, equal_nan=True)


def test_ctrl_c_exits_130_and_the_same_command_resumes(registered, monkeypatch, capsys, tmp_path):
    """A KeyboardInterrupt raised in the middle of the drizzle (the tenth tile), as
    Ctrl-C does: exit status 130, a message saying how to resume, and the rerun does
    only the missing tiles."""
    from drizzlestack.drizzle import driver

    original = driver.drizzle_tile
    calls = {"n": 0}

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(driver, "drizzle_tile", interrupted)
    out = tmp_path / "d.fits"
    args = ["drizzle", str(registered), "--scale", "2", "--pixfrac", "0.7", "--tile", "32", "-o", str(out),
            "--scheduler", "synchronous", "--no-progress"]
    assert main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setattr(driver, "drizzle_tile", original)
    with pytest.warns(ds.DrizzlestackWarning, match=r"resuming an interrupted drizzle \(9 of 80 tiles"):
        assert main(args) == 0
    assert out.exists()


def test_the_console_command_freezes_the_heap_only_after_its_work(monkeypatch, tmp_path, capsys):
    # the interpreter's shutdown collections cost 0.6-0.9 s of every run: the console
    # command freezes the heap once done; main() (tests, notebooks) never does
    import gc

    from drizzlestack import cli

    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    assert cli.main(["info", str(tmp_path / "missing.zarr")]) == 2
    assert calls == []
    assert cli.console(["info", str(tmp_path / "missing.zarr")]) == 2
    assert calls == ["freeze"]
    assert "missing.zarr" in capsys.readouterr().err


def test_python_dash_m_runs_the_console_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "drizzlestack.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "drizzlestack" in (out.stdout + out.stderr)
