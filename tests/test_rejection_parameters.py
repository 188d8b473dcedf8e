"""The rejection's parameters as one frozen, validated value (RejectionParameters)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from drizzlestack._warnings import DrizzlestackError
from drizzlestack.integration.rejection import RejectionParameters, reject_stack, rejection_flags


@pytest.fixture(scope="module")
def stack():
    rng = np.random.default_rng(11)
    s = rng.normal(100.0, 5.0, (15, 4, 40)).astype(np.float32)
    s[rng.random(s.shape) < 0.05] += 60.0
    s[rng.random(s.shape) < 0.05] -= 60.0
    return s


@pytest.mark.parametrize("method, fields", [
    ("winsorized", dict(low=2.5, high=2.0, max_iterations=3)),
    ("minmax", dict(n_low=2, n_high=3, reject_low=False)),
    ("esd", dict(esd_significance=0.1, esd_outliers=0.4, esd_low_relaxation=1.5)),
    ("percentile", dict(low=0.05, high=0.04, range_low=60.0, range_high=150.0)),
])
def test_a_parameters_object_gives_the_flags_of_the_same_keywords(stack, method, fields):
    by_keywords = rejection_flags(stack, method=method, saturation=130.0, **fields)
    params = RejectionParameters(method=method, **fields)
    np.testing.assert_array_equal(rejection_flags(stack, params, saturation=130.0), by_keywords)
    # keywords on top of an object replace its fields
    other = RejectionParameters(method="none")
    np.testing.assert_array_equal(rejection_flags(stack, other, saturation=130.0, method=method, **fields), by_keywords)
    assert (by_keywords != 0).any() and (by_keywords == 0).any()  # a comparison that could fail


def test_the_defaults_are_the_functions_defaults(stack):
    assert RejectionParameters().method == "winsorized"
    np.testing.assert_array_equal(rejection_flags(stack), rejection_flags(stack, RejectionParameters()))
    # reject_stack without an object keeps its own default method, sigma clipping
    np.testing.assert_array_equal(reject_stack(stack), rejection_flags(stack, method="sigma") != 0)


def test_parameters_are_frozen_and_replace_validates():
    p = RejectionParameters(method="sigma", low=4, high=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.low = 1.0
    assert (p.low, p.high) == (4.0, 3.0) and isinstance(p.low, float)
    assert p.replace(method="none").method == "none" and p.method == "sigma"
    with pytest.raises(DrizzlestackError, match="high"):
        p.replace(high=-2.0)
    assert p == RejectionParameters(method="sigma", low=4.0, high=3.0)  # a value: compares by fields


@pytest.mark.parametrize("fields, match", [
    (dict(method="kappa"), "method='kappa'"),
    (dict(low="three"), "low='three'"),
    (dict(high=np.inf), "high=inf"),
    (dict(n_high=-1), "n_high=-1"),
    (dict(n_low="2"), "n_low='2'"),
    (dict(max_iterations=2.5), "max_iterations=2.5"),
    (dict(esd_outliers=0.0), "esd_outliers=0.0"),
    (dict(esd_significance="a"), "esd_significance='a'"),
    (dict(esd_low_relaxation=0.0), "esd_low_relaxation=0.0"),
    (dict(range_high=np.nan), "range_high=nan"),
    (dict(range_low="x"), "range_low='x'"),
])
def test_a_bad_field_is_named_with_its_value(fields, match):
    with pytest.raises(DrizzlestackError, match=match):
        RejectionParameters(**fields)


def test_parameters_must_be_a_parameters_object(stack):
    with pytest.raises(DrizzlestackError, match="parameters"):
        rejection_flags(stack, "sigma")


def test_kernel_views_of_the_fields():
    p = RejectionParameters(method="esd", range_high=10.0)
    assert p.range_limits == (-np.inf, 10.0)
    assert p.iteration_cap == 0 and p.replace(max_iterations=4).iteration_cap == 4
    lam = p.esd_critical_values(8)
    assert lam.shape == (9, 8) and np.isinf(lam[:3]).all() and np.isfinite(lam[8, :2]).all()
    assert RejectionParameters(method="sigma").esd_critical_values(8).shape == (1, 1)
