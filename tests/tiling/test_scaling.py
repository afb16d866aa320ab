"""Backscatter scaling to dB."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from fusarbatch.tiling.scaling import output_units, to_db


def test_power_hand_values():
    x = np.array([1.0, 0.1, 0.01, 2.0, 1e-4], dtype=np.float32)
    out = to_db(x, "power")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, -10.0, -20.0, 3.0103, -40.0], atol=1e-4)


def test_amplitude_hand_values():
    x = np.array([1.0, 0.1, 10.0, 2.0], dtype=np.float32)
    np.testing.assert_allclose(to_db(x, "amplitude"), [0.0, -20.0, 20.0, 6.0206], atol=1e-4)


def test_amplitude_is_power_of_squared_amplitude():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.01, 3.0, 1000).astype(np.float32)
    np.testing.assert_allclose(to_db(a, "amplitude"), to_db(a.astype(np.float64) ** 2, "power"), atol=1e-4)


def test_integer_amplitude_dn():
    x = np.array([0, 1, 100, 1000], dtype=np.uint16)
    out = to_db(x, "amplitude")
    assert np.isnan(out[0])
    np.testing.assert_allclose(out[1:], [0.0, 40.0, 60.0], atol=1e-4)


@pytest.mark.parametrize("scale", ["power", "amplitude"])
def test_zeros_negatives_nan_inf_become_nan(scale):
    x = np.array([0.0, -1.0, -0.0, np.nan, np.inf, -np.inf, 1.0], dtype=np.float32)
    out = to_db(x, scale)
    assert np.isnan(out[:6]).all()
    assert out[6] == 0.0


def test_db_kept_including_negatives_but_not_inf():
    x = np.array([-15.5, 0.0, 3.25, -40.0, np.inf, np.nan], dtype=np.float32)
    out = to_db(x, "db")
    assert out[:4].tolist() == [-15.5, 0.0, 3.25, -40.0]
    assert np.isnan(out[4:]).all()


def test_dn_kept_as_is():
    x = np.array([0, 17, 255], dtype=np.uint8)
    out = to_db(x, "dn")
    assert out.dtype == np.float32 and out.tolist() == [0.0, 17.0, 255.0]
    assert output_units("dn") == "dn"
    assert output_units("power") == output_units("db") == "dB"


def test_input_not_modified_by_default():
    x = np.array([0.5, np.inf, 2.0], dtype=np.float32)
    to_db(x, "power")
    to_db(x, "db")
    assert np.isinf(x[1]) and x[0] == 0.5


def test_dask_is_lazy_and_equal_to_numpy():
    rng = np.random.default_rng(0)
    x = rng.gamma(4.4, 0.05, size=(2, 300, 200)).astype(np.float32)
    x[0, :10] = 0.0
    lazy = to_db(da.from_array(x, chunks=(2, 64, 64)), "power")
    assert isinstance(lazy, da.Array) and lazy.chunks == da.from_array(x, chunks=(2, 64, 64)).chunks
    np.testing.assert_array_equal(lazy.compute(), to_db(x, "power"))


def test_unknown_scale_raises():
    with pytest.raises(ValueError, match="unknown backscatter scale"):
        to_db(np.ones(3), "linear")
