import numpy as np
import pytest
from scipy.stats import norm

from loftq_jax import codebooks
from loftq_jax.errors import InputError


def test_nf4_is_bitsandbytes_table():
    np.testing.assert_array_equal(codebooks.nf_codebook(4), codebooks.NF4_BITSANDBYTES)


def test_nf4_quantile_construction_matches_table():
    positive = norm.ppf(np.linspace(codebooks.NF_OFFSET, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(codebooks.NF_OFFSET, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    np.testing.assert_allclose(values / values.max(), codebooks.NF4_BITSANDBYTES, atol=2e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nf_codebook_shape_and_range(bits):
    values = codebooks.nf_codebook(bits)
    assert values.shape == (2**bits,)
    assert values.dtype == np.float32
    assert values[0] == -1.0
    assert values[-1] == 1.0
    assert np.all(np.diff(values) > 0)
    assert np.count_nonzero(values == 0) == 1
    # Asymmetric: one more positive value than negative ones.
    assert np.count_nonzero(values > 0) == 2 ** (bits - 1)


def test_nf2_values():
    expected_third = norm.ppf((codebooks.NF_OFFSET + 0.5) / 2) / norm.ppf(codebooks.NF_OFFSET)
    np.testing.assert_allclose(codebooks.nf_codebook(2), [-1.0, 0.0, expected_third, 1.0], rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_codebook_is_symmetric_grid(bits):
    values = codebooks.int_codebook(bits)
    top = 2 ** (bits - 1) - 1
    assert values.shape == (2 * top + 1,)
    np.testing.assert_allclose(values, np.arange(-top, top + 1) / top)
    np.testing.assert_array_equal(values, -values[::-1])


@pytest.mark.parametrize("bits", [0, 1, 5, 16, True, 4.0, "4"])
def test_unsupported_bits_rejected(bits):
    with pytest.raises(InputError, match="unsupported bits"):
        codebooks.check_bits(bits, "nf")


def test_unknown_codebook_rejected():
    with pytest.raises(InputError, match="unknown code book 'fp4'"):
        codebooks.check_bits(4, "fp4")


def test_uniform_has_no_value_table():
    with pytest.raises(InputError, match="affine"):
        codebooks.codebook_values("uniform", 4)
