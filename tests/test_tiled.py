"""The rules the tiled steps share (drizzlestack/tiled.py), checked through every step
that uses them: one "is it registered" refusal, one frame selection, one ROI rule (clip
to the reference frame with a warning), one tile ledger."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

import drizzlestack as ds
from drizzlestack import DrizzlestackError, DrizzlestackWarning, StoreError
from drizzlestack.integration import registered_view
from drizzlestack.parallel import scheduler
from drizzlestack.store import StackStore, record_tile
from drizzlestack.tiled import clip_roi, run_tiles, select_frames, start_or_resume
from conftest import register_with_truth

#: the integration options of these tests: the simulated frames have few stars, so no
#: photometric scale (the default would warn)
INTEGRATE = dict(rejection="sigma", tile=32, scale_estimator="biweight")


@pytest.fixture(scope="module")
def registered(tmp_path_factory, sat_sim):
    """8 frames of 96 x 112 px registered with the true transforms."""
    store = tmp_path_factory.mktemp("tiled") / "s.zarr"
    ds.ingest(sat_sim.files, store)
    register_with_truth(store, sat_sim)
    return store


def _refusals(store) -> dict:
    """What each step that needs a registration raises on ``store``."""
    calls = {
        "integrate": lambda: ds.integrate(store),
        "drizzle": lambda: ds.drizzle(store, output=None),
        "registered_view": lambda: registered_view(store),
        "advise": lambda: ds.advise(store),
    }
    raised = {}
    for name, call in calls.items():
        with pytest.raises(Exception) as err:
            call()
        raised[name] = err
    return raised


# ------------------------------------------------------------------- registration
def test_an_unregistered_store_is_refused_with_one_error_by_every_tiled_step(tmp_path, small_sim):
    store = tmp_path / "s.zarr"
    ds.ingest(small_sim.files[:3], store)
    path = StackStore.open(store).path
    expected = f"{path}: the frames are not registered; run 'drizzlestack register {path}' first"
    for name, err in _refusals(store).items():
        assert err.type is StoreError, (name, err.type)
        assert str(err.value) == expected, name


def test_an_unfinished_registration_is_refused_with_one_error_by_every_tiled_step(tmp_path, small_sim):
    store = tmp_path / "s.zarr"
    ds.ingest(small_sim.files[:3], store)
    st = register_with_truth(store, small_sim)
    st.begin_step("register", {"truth": True, "again": True})  # a rerun that never finished
    expected = (f"{st.path}: the frames are not registered (the registration did not complete); "
                f"run 'drizzlestack register {st.path}' first")
    for name, err in _refusals(store).items():
        assert err.type is StoreError, (name, err.type)
        assert str(err.value) == expected, name


# ------------------------------------------------------------------------- frames
def test_a_frame_outside_the_store_is_refused_alike_by_integrate_and_drizzle(registered):
    expected = "frames: index 99 out of range (the store has 8 frames: 0..7)"
    for call in (lambda: ds.integrate(registered, frames=[0, 99], **INTEGRATE),
                 lambda: ds.drizzle(registered, frames=[0, 99], output=None)):
        with pytest.raises(DrizzlestackError) as err:
            call()
        assert str(err.value) == expected


def test_frame_selection_names_why_each_frame_is_left_out(tmp_path, small_sim):
    store = tmp_path / "s.zarr"
    ds.ingest(small_sim.files[:4], store)
    st = register_with_truth(store, small_sim)
    st.set_frame_values("status", 1, "excluded: hazy")
    transform = np.asarray(st.group["transform"][...])
    transform[2] = np.nan
    st.write_variable("transform", transform, ("frame", "transform_row", "transform_col"))
    st = StackStore.open(store)
    assert select_frames(st) == ([0, 3], {1: "excluded: hazy", 2: "unregistered: no transform"})
    assert select_frames(st, [3, 1]) == ([3], {1: "excluded: hazy"})
    from drizzlestack.integration.resample import usable_frames

    assert usable_frames(st) == [0, 3]
    with pytest.raises(DrizzlestackError, match=r"frames: frame 2 has no registration \(ok\)"):
        select_frames(st, [0, 2], refuse_unregistered=True)
    with pytest.warns(DrizzlestackWarning, match="frame 1 excluded from the drizzle: excluded: hazy"):
        assert select_frames(st, [0, 1], step="drizzle")[0] == [0]
    with pytest.raises(DrizzlestackError, match="every frame is excluded, nothing to drizzle .*1: excluded: hazy"):
        with pytest.warns(DrizzlestackWarning):
            select_frames(st, [1], step="drizzle")


# ---------------------------------------------------------------------------- ROI
def _clipped(message: str) -> tuple[float, ...]:
    """The clipped ROI a warning names, as numbers."""
    found = re.search(r"clipped to \(([^)]*)\)", message)
    assert found, message
    return tuple(float(v) for v in found.group(1).split(","))


def test_a_roi_partly_outside_is_clipped_alike_by_integrate_and_drizzle(registered):
    """One rule for both steps: clipped to the 112 x 96 px reference frame with a warning
    naming the requested and the clipped ROI, and equal to that window of the full run."""
    request = (90, -6, 30, 40)  # inside: x 90..112, y 0..34
    full = ds.integrate(registered, **INTEGRATE).integration.values
    with pytest.warns(DrizzlestackWarning, match=r"roi=\(90, -6, 30, 40\) extends beyond the reference frame "
                                                 r"\(112 x 96 px\); clipped to \(90, 0, 22, 34\)") as w_int:
        trial = ds.integrate(registered, roi=request, **INTEGRATE)
    np.testing.assert_allclose(trial.roi_integration.values, full[0:34, 90:112], rtol=1e-6)

    kwargs = dict(scale=2.0, pixfrac=0.9, tile=64, output=None)
    full_d = ds.drizzle(registered, **kwargs).drizzle.values
    with pytest.warns(DrizzlestackWarning, match=r"roi=\(90.0, -6.0, 30.0, 40.0\) extends beyond the reference "
                                                 r"frame \(112 x 96 px\); clipped to") as w_drz:
        part = ds.drizzle(registered, roi=request, **kwargs).drizzle.values
    assert part.shape == (68, 44)
    np.testing.assert_allclose(part, full_d[0:68, 180:224], rtol=1e-6, equal_nan=True)
    assert _clipped(str(w_int[0].message)) == _clipped(str(w_drz[0].message)) == (90, 0, 22, 34)


@pytest.mark.parametrize("roi, message", [
    ((0, 0, 10), r"expected \(x0, y0, width, height\)"),
    (("a", 0, 10, 10), r"expected \(x0, y0, width, height\)"),
    ((0, 0, float("nan"), 10), "finite numbers"),
    ((0, 0, 0, 10), "width and height must be positive"),
    ((0, 0, 10, -3), "width and height must be positive"),
    ((112, 0, 10, 10), r"wholly outside the reference frame \(112 x 96 px\)"),
    ((-20, 0, 20, 10), r"wholly outside the reference frame \(112 x 96 px\)"),
])
def test_a_malformed_or_wholly_outside_roi_is_refused_by_both_steps(registered, tmp_path, roi, message):
    out = tmp_path / "x.fits"
    for call in (lambda: ds.integrate(registered, roi=roi, output=out, **INTEGRATE),
                 lambda: ds.drizzle(registered, roi=roi, output=out)):
        with pytest.raises(DrizzlestackError, match=r"roi=.*" + message):
            call()
    assert not out.exists()


def test_integrate_alone_requires_whole_pixels(registered):
    with pytest.raises(DrizzlestackError, match="use whole pixels"):
        ds.integrate(registered, roi=(10.5, 0, 20, 20), **INTEGRATE)
    # drizzle's grid is finer than the reference: fractions are fine, and clipped alike
    with pytest.warns(DrizzlestackWarning, match=r"clipped to \(100.5, 0.0, 11.5, 20.0\)"):
        assert clip_roi((100.5, 0, 20, 20), (96, 112)) == (100.5, 0.0, 11.5, 20.0)
    assert clip_roi((1, 2, 3, 4), (96, 112), whole_pixels=True) == (1, 2, 3, 4)
    assert clip_roi(None, (96, 112)) is None


# ------------------------------------------------------------------------ ledgers
def test_a_resumed_ledger_runs_only_the_tiles_still_to_do(tmp_path):
    st = StackStore.create(tmp_path / "s.zarr", (8, 12))
    params, inputs = {"p": 1}, {"n_frames": 0}
    st.begin_step("demo", params, inputs)
    created = []

    def create():
        created.append(1)
        st.create_variable("demo_out", (8, 12), ("y", "x"), (4, 4), "float32", 0.0)

    def ledger(**kw):
        return start_or_resume(st, "demo", params, inputs, tiles=(2, 3), width=2, tile=4, products=["demo_out"],
                               create=create, what="demo", **kw)

    done = ledger()
    assert created == [1] and done.shape == (2, 3, 2) and np.isnan(done).all()
    record_tile(st.location, "demo", 0, 1, [1.0, 2.0])  # finished before an interruption
    record_tile(st.location, "demo", 1, 2, [3.0, 4.0])
    with pytest.warns(DrizzlestackWarning, match=r"resuming an interrupted demo \(2 of 6 tiles already done\)"):
        done = ledger()
    assert created == [1]  # the products are kept

    calls = []

    def task(plan, iy, ix):
        calls.append((int(iy), int(ix)))
        values = [10.0 * iy + ix, -1.0]
        record_tile(plan.location, "demo", iy, ix, values)
        return values

    with scheduler(scheduler="synchronous"):
        rows = run_tiles(task, SimpleNamespace(done=done, location=st.location), (2, 3), 2)
    assert sorted(calls) == [(0, 0), (0, 2), (1, 0), (1, 1)]
    assert rows.shape == (2, 3, 2)
    assert rows[0, 1].tolist() == [1.0, 2.0] and rows[1, 2].tolist() == [3.0, 4.0]
    assert rows[1, 1].tolist() == [11.0, -1.0]
    # A run known to start afresh deletes the old products and ledger first.
    done = ledger(resumable=False)
    assert created == [1, 1] and np.isnan(done).all()
