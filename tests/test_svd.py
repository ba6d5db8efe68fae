import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loftq_jax import svd
from loftq_jax.errors import InputError
from loftq_jax.quantize import QuantConfig, fake_quant


def tail_error(m, a, b):
    return float(jnp.linalg.norm(m - a @ b))


def test_exact_factors_give_eckart_young_error():
    m = np.random.default_rng(0).standard_normal((40, 30)).astype(np.float32)
    a, b = svd.exact_low_rank(jnp.asarray(m), 5)
    s = np.linalg.svd(m.astype(np.float64), compute_uv=False)
    assert a.shape == (40, 5)
    assert b.shape == (5, 30)
    assert tail_error(m, a, b) == pytest.approx(np.sqrt(np.sum(s[5:] ** 2)), rel=1e-5)


def test_factors_split_singular_values_evenly():
    m = jnp.asarray(np.random.default_rng(1).standard_normal((20, 12)).astype(np.float32))
    a, b = svd.exact_low_rank(m, 4)
    s = np.linalg.svd(np.asarray(m), compute_uv=False)[:4]
    # A = U·√S and B = √S·Vᴴ, so AᵀA = BBᵀ = diag(S).
    np.testing.assert_allclose(a.T @ a, np.diag(s), atol=1e-4)
    np.testing.assert_allclose(b @ b.T, np.diag(s), atol=1e-4)


def test_full_rank_reconstructs_matrix():
    m = jnp.asarray(np.random.default_rng(2).standard_normal((16, 24)).astype(np.float32))
    for method in svd.SVD_METHODS:
        a, b = svd.low_rank(m, 16, method)
        np.testing.assert_allclose(a @ b, m, atol=1e-4)


def test_randomized_is_deterministic_for_a_key():
    m = jnp.asarray(np.random.default_rng(3).standard_normal((64, 48)).astype(np.float32))
    first = svd.randomized_low_rank(m, 8, key=jax.random.key(7))
    second = svd.randomized_low_rank(m, 8, key=jax.random.key(7))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_randomized_within_one_percent_on_minilm(minilm_weights):
    exact_fn = jax.jit(svd.exact_low_rank, static_argnums=1)
    randomized_fn = jax.jit(lambda m: svd.randomized_low_rank(m, 16, key=jax.random.key(0)))
    worst = 0.0
    for w in minilm_weights.values():
        w = jnp.asarray(w)
        # The weight itself, and the quantization residuals that LoftQ factorizes.
        for m in (w, w - fake_quant(w, QuantConfig(bits=4)), w - fake_quant(w, QuantConfig(bits=2))):
            exact = tail_error(m, *exact_fn(m, 16))
            randomized = tail_error(m, *randomized_fn(m))
            worst = max(worst, randomized / exact - 1)
    assert worst < 0.01


def test_unknown_method_rejected():
    with pytest.raises(InputError, match="unknown SVD method 'lanczos'"):
        svd.low_rank(jnp.ones((4, 4)), 2, "lanczos")


def test_split_fixes_sign_of_each_pair():
    rng = np.random.default_rng(3)
    u, s, vh = np.linalg.svd(rng.standard_normal((12, 8)).astype(np.float32), full_matrices=False)
    flip = np.array([1, -1, -1, 1, 1, -1, 1, 1], np.float32)

    a, b = svd.split_singular_values(jnp.asarray(u), jnp.asarray(s), jnp.asarray(vh))
    a_flipped, b_flipped = svd.split_singular_values(jnp.asarray(u * flip), jnp.asarray(s), jnp.asarray(flip[:, None] * vh))

    np.testing.assert_array_equal(a, a_flipped)
    np.testing.assert_array_equal(b, b_flipped)
    peaks = np.take_along_axis(np.asarray(a), np.argmax(np.abs(np.asarray(a)), axis=0)[None, :], axis=0)
    assert np.all(peaks > 0)
    np.testing.assert_allclose(np.asarray(a) @ np.asarray(b), (u * s) @ vh, atol=1e-5)
