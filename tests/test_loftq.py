import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from loftq_jax import LoftQConfig, fake_quant, loftq, loftq_batched, relative_error
from loftq_jax.errors import InputError
from loftq_jax.quantize import QuantConfig, dequantize


def numpy_loftq(w: np.ndarray, config: LoftQConfig):
    """LoftQ in NumPy float64 with an argmin quantizer: an independent reference for the exact-SVD path."""
    quant = QuantConfig(bits=config.bits, codebook=config.codebook, block_size=config.block_size)
    values = quant.values().astype(np.float64)

    def quantize_dequantize(x):
        blocks = x.reshape(-1, quant.block_size)
        scales = np.abs(blocks).max(axis=1, keepdims=True)
        codes = np.argmin(np.abs((blocks / scales)[..., None] - values), axis=-1)
        return (values[codes] * scales).reshape(x.shape)

    w = w.astype(np.float64)
    low_rank = np.zeros_like(w)
    errors = [np.linalg.norm(w - quantize_dequantize(w)) / np.linalg.norm(w)]
    for _ in range(config.steps):
        q = quantize_dequantize(w - low_rank)
        u, s, vh = np.linalg.svd(w - q, full_matrices=False)
        low_rank = (u[:, : config.rank] * s[: config.rank]) @ vh[: config.rank]
        errors.append(np.linalg.norm(w - q - low_rank) / np.linalg.norm(w))
    return q, low_rank, np.array(errors)


@pytest.mark.parametrize("bits", [2, 4])
def test_exact_svd_matches_numpy_reference(bits):
    w = np.random.default_rng(bits).standard_normal((48, 32)).astype(np.float32) * 0.05
    config = LoftQConfig(bits=bits, rank=6, steps=4)
    expected_q, expected_low_rank, expected_errors = numpy_loftq(w, config)

    result = loftq(w, config)

    np.testing.assert_allclose(result.errors, expected_errors, rtol=1e-5)
    assert np.linalg.norm(result.q - expected_q) / np.linalg.norm(expected_q) < 1e-5
    low_rank = np.asarray(result.a @ result.b, np.float64)
    assert np.linalg.norm(low_rank - expected_low_rank) / np.linalg.norm(expected_low_rank) < 1e-5


def test_result_shapes_and_packed_q():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((40, 24)).astype(np.float32))
    result = loftq(w, LoftQConfig(rank=5, steps=3))
    assert result.q.shape == (40, 24)
    assert result.a.shape == (40, 5)
    assert result.b.shape == (5, 24)
    assert result.errors.shape == (4,)
    assert result.spectral_errors is None
    np.testing.assert_array_equal(dequantize(result.quantized), result.q)


def test_reported_error_matches_outputs():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32))
    result = loftq(w, LoftQConfig(bits=2, rank=4, steps=3, spectral=True))
    approx = result.q + result.a @ result.b
    assert float(result.errors[-1]) == pytest.approx(float(relative_error(w, approx)), rel=1e-5)
    assert float(result.spectral_errors[-1]) == pytest.approx(float(relative_error(w, approx, 2)), rel=1e-4)


def test_zero_steps_is_qlora():
    w = jnp.asarray(np.random.default_rng(2).standard_normal((32, 32)).astype(np.float32))
    result = loftq(w, LoftQConfig(rank=4, steps=0))
    np.testing.assert_array_equal(result.q, fake_quant(w))
    np.testing.assert_array_equal(result.a, 0.0)
    np.testing.assert_array_equal(result.b, 0.0)
    assert result.errors.shape == (1,)
    assert float(result.errors[0]) == pytest.approx(float(jnp.linalg.norm(w - fake_quant(w)) / jnp.linalg.norm(w)))


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_full_rank_leaves_no_error(svd):
    w = jnp.asarray(np.random.default_rng(3).standard_normal((24, 16)).astype(np.float32))
    result = loftq(w, LoftQConfig(bits=2, rank=16, steps=2, svd=svd))
    assert float(result.errors[-1]) < 1e-5


def test_alpha_scaling_preserves_product():
    w = jnp.asarray(np.random.default_rng(4).standard_normal((32, 48)).astype(np.float32))
    plain = loftq(w, LoftQConfig(rank=8, steps=2))
    scaled = loftq(w, LoftQConfig(rank=8, steps=2, alpha=32))
    np.testing.assert_allclose(4 * scaled.a @ scaled.b, plain.a @ plain.b, atol=1e-5)
    np.testing.assert_allclose(scaled.a, plain.a / 2, rtol=1e-6)


def test_loftq_beats_qlora_on_every_minilm_weight(minilm_weights):
    for name, w in minilm_weights.items():
        errors = loftq(w, LoftQConfig(bits=2, rank=16, steps=1), name=name).errors
        assert float(errors[1]) < float(errors[0]), name


def test_bfloat16_in_bfloat16_out():
    w = np.random.default_rng(5).standard_normal((32, 64)).astype(ml_dtypes.bfloat16)
    result = loftq(w, LoftQConfig(rank=4, steps=2))
    assert result.q.dtype == jnp.bfloat16
    assert result.a.dtype == jnp.bfloat16
    assert result.errors.dtype == jnp.float32
    as_float32 = loftq(w, LoftQConfig(rank=4, steps=2), out_dtype=jnp.float32)
    assert as_float32.a.dtype == jnp.float32
    np.testing.assert_allclose(result.errors, loftq(w.astype(np.float32), LoftQConfig(rank=4, steps=2)).errors, rtol=1e-6)


def test_batched_equals_one_at_a_time():
    stack = np.random.default_rng(6).standard_normal((3, 40, 24)).astype(np.float32)
    config = LoftQConfig(rank=4, steps=2, svd="randomized")
    batched = loftq_batched(stack, config)
    for index, w in enumerate(stack):
        single = loftq(w, config)
        np.testing.assert_allclose(batched.errors[index], single.errors, rtol=1e-5)
        np.testing.assert_allclose(batched.q[index], single.q, atol=1e-6)
        np.testing.assert_array_equal(batched.quantized.codes[index], single.quantized.codes)


def test_vmap_of_jit_over_stack():
    stack = jnp.asarray(np.random.default_rng(7).standard_normal((2, 16, 16)).astype(np.float32))
    config = LoftQConfig(rank=2, steps=1)
    result = jax.vmap(lambda w: loftq(w, config))(stack)
    assert result.errors.shape == (2, 2)


def test_second_call_does_not_recompile(count_compiles):
    config = LoftQConfig(rank=3, steps=2)
    rng = np.random.default_rng(8)
    with count_compiles("loftq_unchecked") as counter:
        loftq(rng.standard_normal((20, 12)).astype(np.float32), config)
        loftq(rng.standard_normal((20, 12)).astype(np.float32), config)
        assert counter.count == 1
        loftq(rng.standard_normal((12, 20)).astype(np.float32), config)
        assert counter.count == 2


@pytest.mark.parametrize(
    ("weight", "config", "message"),
    [
        (np.full((8, 8), np.nan, np.float32), LoftQConfig(rank=2), "layer.weight: 64 of 64 elements are NaN or Inf"),
        (np.array([[1.0, np.inf], [0.0, 1.0]], np.float32), LoftQConfig(rank=1), "1 of 4 elements are NaN or Inf"),
        (np.ones((8, 4), np.float32), LoftQConfig(rank=5), "layer.weight: rank 5 exceeds min\\(out, in\\) = 4"),
        (np.ones((8, 8), np.uint8), LoftQConfig(rank=2), "dtype uint8 is not floating point"),
        (np.ones((8, 8), np.int32), LoftQConfig(rank=2), "dtype int32 is not floating point"),
        (np.ones(8, np.float32), LoftQConfig(rank=2), "shape \\(8,\\) has 1 dimensions"),
        (np.ones((2, 8, 8), np.float32), LoftQConfig(rank=2), "shape \\(2, 8, 8\\) has 3 dimensions"),
    ],
)
def test_invalid_weight_rejected(weight, config, message):
    with pytest.raises(InputError, match=message):
        loftq(weight, config, name="layer.weight")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "invalid rank 0"),
        ({"steps": -1}, "invalid steps -1"),
        ({"bits": 5}, "unsupported bits 5"),
        ({"block_size": 0}, "invalid block size 0"),
        ({"svd": "lanczos"}, "unknown SVD method 'lanczos'"),
        ({"alpha": -1.0}, "invalid alpha -1.0"),
    ],
)
def test_invalid_config_rejected(kwargs, message):
    with pytest.raises(InputError, match=message):
        LoftQConfig(**kwargs)


@pytest.mark.parametrize("shape", [(60, 20), (20, 60), (1, 5)])
def test_spectral_norm_matches_numpy(shape):
    from loftq_jax.loftq import spectral_norm

    m = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
    assert float(spectral_norm(jnp.asarray(m))) == pytest.approx(np.linalg.norm(m.astype(np.float64), 2), rel=1e-5)
