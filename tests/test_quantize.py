import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from loftq_jax import packing
from loftq_jax.errors import InputError
from loftq_jax.quantize import QuantConfig, dequantize, fake_quant, nearest_codes, quantize

BLOCKWISE = [(codebook, bits) for codebook in ("nf", "int") for bits in (2, 3, 4, 8)]


def reference_blockwise(w: np.ndarray, config: QuantConfig) -> tuple[np.ndarray, np.ndarray]:
    """Quantize with an explicit argmin over all code book values, as the LoftQ reference code does."""
    values = config.values()
    flat = w.astype(np.float32).reshape(-1)
    blocks = np.pad(flat, (0, -flat.size % config.block_size)).reshape(-1, config.block_size)
    scales = np.abs(blocks).max(axis=1, keepdims=True)
    normalized = blocks / np.where(scales == 0, 1, scales)
    codes = np.argmin(np.abs(normalized[..., None] - values), axis=-1)
    dequantized = (values[codes] * scales).reshape(-1)[: flat.size].reshape(w.shape)
    return codes.reshape(-1)[: flat.size], dequantized


def near_tie(w: np.ndarray, config: QuantConfig) -> np.ndarray:
    """Mark elements within float32 rounding of a midpoint between two code book values."""
    values = config.values()
    midpoints = (values[1:] + values[:-1]) / 2
    flat = w.reshape(-1)
    blocks = np.pad(flat, (0, -flat.size % config.block_size)).reshape(-1, config.block_size)
    scales = np.abs(blocks).max(axis=1, keepdims=True)
    normalized = (blocks / np.where(scales == 0, 1, scales)).reshape(-1)[: flat.size]
    return np.min(np.abs(normalized[:, None] - midpoints), axis=1) < 1e-6


@pytest.mark.parametrize(("codebook", "bits"), BLOCKWISE)
@pytest.mark.parametrize("shape", [(96, 64), (7, 13)])
def test_blockwise_matches_argmin_reference(codebook, bits, shape):
    w = np.random.default_rng(bits).standard_normal(shape).astype(np.float32)
    config = QuantConfig(bits=bits, codebook=codebook)
    expected_codes, expected = reference_blockwise(w, config)

    quantized = quantize(jnp.asarray(w), config)
    codes = packing.unpack_codes(quantized.codes, bits, w.size, config.bit_order)
    tie = near_tie(w, config)

    assert tie.mean() < 0.01
    np.testing.assert_array_equal(np.asarray(codes)[~tie], expected_codes[~tie])
    np.testing.assert_allclose(np.asarray(dequantize(quantized)).reshape(-1)[~tie], expected.reshape(-1)[~tie], rtol=1e-6)


def test_nearest_codes_ties_go_to_lower_value():
    values = np.array([-1.0, 0.0, 0.5, 1.0], np.float32)
    codes = nearest_codes(jnp.array([-0.5, 0.25, 0.75, -2.0, 2.0]), values)
    np.testing.assert_array_equal(codes, [0, 1, 2, 0, 3])


@pytest.mark.parametrize("codebook", ["nf", "int", "uniform"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quant_equals_dequantize_of_quantize(codebook, bits):
    w = jnp.asarray(np.random.default_rng(1).standard_normal((64, 40)).astype(np.float32))
    config = QuantConfig(bits=bits, codebook=codebook)
    np.testing.assert_array_equal(fake_quant(w, config), dequantize(quantize(w, config)))


@pytest.mark.parametrize("shape", [(5, 7), (1, 1), (3, 64), (130,)])
def test_partial_block_keeps_shape_and_scale(shape):
    w = np.random.default_rng(2).standard_normal(shape).astype(np.float32) + 3
    config = QuantConfig(bits=4, block_size=64)
    quantized = quantize(jnp.asarray(w), config)
    flat = w.reshape(-1)

    assert quantized.shape == shape
    assert dequantize(quantized).shape == shape
    assert quantized.scales.shape == (-(-flat.size // 64),)
    assert float(quantized.scales[-1]) == pytest.approx(np.abs(flat[(flat.size - 1) // 64 * 64 :]).max())


def test_single_element_blocks_are_exact():
    w = jnp.asarray(np.random.default_rng(3).standard_normal((6, 5)).astype(np.float32))
    np.testing.assert_array_equal(fake_quant(w, QuantConfig(bits=2, block_size=1)), w)


@pytest.mark.parametrize("codebook", ["nf", "int", "uniform"])
def test_zero_block_dequantizes_to_zero(codebook):
    w = np.zeros((4, 64), np.float32)
    w[0] = np.linspace(-1, 1, 64)
    config = QuantConfig(bits=4, codebook=codebook)
    out = np.asarray(dequantize(quantize(jnp.asarray(w), config)))
    assert np.all(np.isfinite(out))
    if codebook != "uniform":
        np.testing.assert_array_equal(out[1:], 0.0)


def test_all_zero_weight_is_exact():
    for codebook in ("nf", "int", "uniform"):
        out = fake_quant(jnp.zeros((8, 16)), QuantConfig(codebook=codebook))
        np.testing.assert_array_equal(out, 0.0)


def test_packed_sizes_and_nbytes():
    w = jnp.ones((64, 64))
    for bits, code_bytes in [(2, 1024), (3, 1536), (4, 2048), (8, 4096)]:
        quantized = quantize(w, QuantConfig(bits=bits))
        assert quantized.codes.dtype == jnp.uint8
        assert quantized.codes.shape == (code_bytes,)
        assert quantized.nbytes == code_bytes + 64 * 4


def test_bitsandbytes_nibble_order():
    config = QuantConfig(bits=4, block_size=4, bit_order="big")
    w = jnp.array([[-1.0, 1.0, 0.0, 1.0]])
    # Codes 0, 15, 7, 15: the first element in the high nibble, as bitsandbytes packs NF4.
    np.testing.assert_array_equal(quantize(w, config).codes[:2], [0x0F, 0x7F])
    little = quantize(w, QuantConfig(bits=4, block_size=4, bit_order="little"))
    np.testing.assert_array_equal(little.codes[:2], [0xF0, 0xF7])


def test_int_codebook_is_rounding_to_grid():
    w = np.random.default_rng(4).standard_normal((32, 64)).astype(np.float32)
    blocks = w.reshape(-1, 64)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 7
    expected = (np.round(blocks / step) * step).reshape(w.shape)
    np.testing.assert_allclose(fake_quant(jnp.asarray(w), QuantConfig(bits=4, codebook="int")), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uniform_affine_levels_and_clip(bits):
    w = np.random.default_rng(5).standard_normal((128, 96)).astype(np.float32) * 0.1 + 0.3
    config = QuantConfig(bits=bits, codebook="uniform")
    out = np.asarray(fake_quant(jnp.asarray(w), config))
    low = max(w.min(), w.mean() - 2 * w.std())
    high = min(w.max(), w.mean() + 2 * w.std())

    assert len(np.unique(out)) <= 2**bits
    assert out.min() == pytest.approx(low, abs=1e-6)
    assert out.max() == pytest.approx(high, abs=1e-5)
    inside = (w >= low) & (w <= high)
    assert np.abs(out - w)[inside].max() <= (high - low) / (2**bits - 1) / 2 + 1e-6


def test_uniform_constant_weight_is_exact():
    w = jnp.full((4, 4), 0.25)
    np.testing.assert_array_equal(fake_quant(w, QuantConfig(codebook="uniform")), w)


def test_bfloat16_input_quantizes_in_float32():
    w = np.random.default_rng(6).standard_normal((16, 64)).astype(ml_dtypes.bfloat16)
    out = fake_quant(jnp.asarray(w))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, fake_quant(jnp.asarray(w.astype(np.float32))))
    assert dequantize(quantize(jnp.asarray(w)), jnp.bfloat16).dtype == jnp.bfloat16


def test_eight_bit_quantize_has_no_distance_tensor():
    weight = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
    weight_bytes = 4096 * 4096 * 4
    for config in (QuantConfig(bits=8), QuantConfig(bits=8, codebook="int")):
        temp_bytes = quantize.lower(weight, config).compile().memory_analysis().temp_size_in_bytes
        # An (elements x 256) float32 distance tensor alone would be 256 times the weight.
        assert temp_bytes <= 2 * weight_bytes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 5}, "unsupported bits 5"),
        ({"block_size": 0}, "invalid block size 0"),
        ({"block_size": 2.5}, "invalid block size 2.5"),
        ({"codebook": "fp4"}, "unknown code book 'fp4'"),
        ({"bit_order": "middle"}, "unknown bit order 'middle'"),
        ({"clip_std": 0.0}, "invalid clip_std"),
    ],
)
def test_config_rejects_invalid_settings(kwargs, message):
    with pytest.raises(InputError, match=message):
        QuantConfig(**kwargs)


def test_quantized_tensor_is_a_pytree():
    quantized = quantize(jnp.ones((8, 8)))
    leaves, treedef = jax.tree_util.tree_flatten(quantized)
    assert len(leaves) == 2
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    np.testing.assert_array_equal(dequantize(rebuilt), dequantize(quantized))
