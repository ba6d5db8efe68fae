"""Tests of loftq_jax.nn.layers: LoRA over quantized and unquantized bases, memory, gradients, compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loftq_jax import InputError, QuantConfig, dequantize, quantize
from loftq_jax.nn import LoRALinear, QuantizedLoRALinear, QuantizedWeight, state_nbytes

NUM_OUT, NUM_IN, RANK = 48, 40, 4


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(5, (NUM_OUT, NUM_IN)) * 0.02).astype(np.float32)
    a = rng.normal(0, 0.1, (NUM_OUT, RANK)).astype(np.float32)
    b = rng.normal(0, 0.1, (RANK, NUM_IN)).astype(np.float32)
    bias = rng.normal(0, 0.1, (NUM_OUT,)).astype(np.float32)
    x = rng.normal(0, 1, (2, 3, NUM_IN)).astype(np.float32)
    return w, a, b, bias, x


def _expected(x, q, a, b, bias, scaling):
    """x·(Q + s·A·B)ᵀ + bias in float64."""
    merged = np.asarray(q, np.float64) + scaling * (a.astype(np.float64) @ b.astype(np.float64))
    return x.astype(np.float64) @ merged.T + bias


@pytest.mark.parametrize(
    "config",
    [QuantConfig(bits=4), QuantConfig(bits=2, block_size=32), QuantConfig(bits=8, codebook="int"), QuantConfig(bits=4, codebook="uniform")],
    ids=["nf4", "nf2", "int8", "uniform4"],
)
def test_quantized_forward_matches_formula(config):
    w, a, b, bias, x = _arrays()
    quantized = quantize(jnp.asarray(w), config)
    layer = QuantizedLoRALinear(quantized, a, b, bias, scaling=2.0)

    y = np.asarray(layer(jnp.asarray(x)))
    expected = _expected(x, dequantize(quantized), a, b, bias, 2.0)
    assert y.shape == (2, 3, NUM_OUT)
    np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)


def test_lora_linear_keeps_16_bit_base():
    w, a, b, bias, x = _arrays()
    w16 = jnp.asarray(w, jnp.bfloat16)
    layer = LoRALinear(w16, a, b, bias, scaling=0.5)

    assert layer.weight[...].dtype == jnp.bfloat16
    y = np.asarray(layer(jnp.asarray(x)))
    expected = _expected(x, np.asarray(w16, np.float32), a, b, bias, 0.5)
    np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)


def test_quantized_base_costs_packed_size():
    num_out, num_in, rank = 256, 384, 8
    w = np.random.default_rng(1).normal(0, 0.02, (num_out, num_in)).astype(np.float32)
    quantized = quantize(jnp.asarray(w), QuantConfig(bits=4, block_size=64))
    layer = QuantizedLoRALinear(quantized, np.zeros((num_out, rank), np.float32), np.zeros((rank, num_in), np.float32))

    packed_bytes = num_out * num_in // 2 + 4 * (num_out * num_in // 64)
    assert quantized.nbytes == packed_bytes
    assert state_nbytes(layer, QuantizedWeight) == packed_bytes
    assert state_nbytes(layer) == packed_bytes + 4 * rank * (num_out + num_in)
    assert state_nbytes(layer) < 4 * num_out * num_in / 5

    # Dropout adds only its random stream's key and counter.
    a, b = np.zeros((num_out, rank), np.float32), np.zeros((rank, num_in), np.float32)
    with_dropout = QuantizedLoRALinear(quantized, a, b, dropout=0.1, rngs=nnx.Rngs(0))
    rng_bytes = state_nbytes(with_dropout, nnx.RngState)
    assert 0 < rng_bytes <= 16
    assert state_nbytes(with_dropout) == packed_bytes + 4 * rank * (num_out + num_in) + rng_bytes


def test_gradients_reach_only_lora_params():
    w, a, b, bias, x = _arrays()
    layer = QuantizedLoRALinear(quantize(jnp.asarray(w)), a, b, bias, scaling=2.0)
    x = jnp.asarray(x)

    def loss(module):
        return jnp.sum(module(x) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
    flat = dict(nnx.to_flat_state(grads))
    assert set(flat) == {("a",), ("b",)}
    assert all(type(variable) is nnx.LoRAParam for variable in flat.values())

    # The same gradients from the explicit formula, differentiated in A and B only.
    q = dequantize(layer.quantized())

    def reference(a_OxR, b_RxI):
        y = x @ (q + 2.0 * a_OxR @ b_RxI).T + bias
        return jnp.sum(y**2)

    grad_a, grad_b = jax.grad(reference, argnums=(0, 1))(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(flat[("a",)][...]), np.asarray(grad_a), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(flat[("b",)][...]), np.asarray(grad_b), rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(grad_a).max()) > 0


def test_split_separates_frozen_state():
    w, a, b, bias, _ = _arrays()
    layer = QuantizedLoRALinear(quantize(jnp.asarray(w)), a, b, bias)

    _, lora_state, rest = nnx.split(layer, nnx.LoRAParam, ...)
    lora_types = {type(variable) for _, variable in nnx.to_flat_state(lora_state)}
    rest_types = {path: type(variable) for path, variable in nnx.to_flat_state(rest)}
    assert lora_types == {nnx.LoRAParam}
    assert rest_types == {("codes",): QuantizedWeight, ("scales",): QuantizedWeight, ("bias",): nnx.Param}
    # Filtering on nnx.Param, the type of trainable weights, never picks up the uint8 codes.
    param_dtypes = {variable[...].dtype for _, variable in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
    assert param_dtypes == {jnp.dtype(jnp.float32)}


def test_forward_compiles_once(count_compiles):
    w, a, b, bias, x = _arrays()
    layer = QuantizedLoRALinear(quantize(jnp.asarray(w)), a, b, bias)
    graphdef, state = nnx.split(layer)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    with count_compiles("forward") as counter:
        first = forward(state, jnp.asarray(x))
        second = forward(state, jnp.asarray(x) + 1.0)
    assert counter.count == 1
    assert not np.allclose(np.asarray(first), np.asarray(second))


def test_nnx_jit_compiles_once(count_compiles):
    w, a, b, bias, x = _arrays()
    layer = LoRALinear(w, a, b, bias, dropout=0.1, rngs=nnx.Rngs(0))

    @nnx.jit
    def train_forward(module, x):
        return module(x, deterministic=False)

    with count_compiles("train_forward") as counter:
        first = train_forward(layer, jnp.asarray(x))
        second = train_forward(layer, jnp.asarray(x))
    assert counter.count == 1
    # The dropout stream advanced between the calls, so the masks differ.
    assert not np.allclose(np.asarray(first), np.asarray(second))


def test_dropout_applies_to_adapter_input_only():
    w, a, b, bias, x = _arrays()
    zero_a = np.zeros_like(a)
    layer = LoRALinear(w, zero_a, b, bias, dropout=0.5, rngs=nnx.Rngs(0))

    # With A = 0 the adapter adds nothing, so dropout, which acts only on the adapter's input, changes nothing.
    expected = _expected(x, w, zero_a, b, bias, 1.0)
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x), deterministic=False)), expected, atol=1e-5)

    layer = LoRALinear(w, a, b, bias, dropout=0.5, rngs=nnx.Rngs(0))
    deterministic = np.asarray(layer(jnp.asarray(x), deterministic=True))
    np.testing.assert_allclose(deterministic, _expected(x, w, a, b, bias, 1.0), atol=1e-5)
    assert not np.allclose(np.asarray(layer(jnp.asarray(x), deterministic=False)), deterministic)


def test_rank_above_min_dimension_rejected():
    w = np.zeros((8, 6), np.float32)
    with pytest.raises(InputError, match=r"encoder.layer.0.query: rank 7 exceeds min\(out, in\) = 6"):
        LoRALinear(w, np.zeros((8, 7)), np.zeros((7, 6)), name="encoder.layer.0.query")


def test_adapter_shapes_checked():
    quantized = quantize(jnp.zeros((8, 6)))
    with pytest.raises(InputError, match=r"q_proj: adapters A \(8, 2\) and B \(2, 5\) do not fit weight \(8, 6\)"):
        QuantizedLoRALinear(quantized, np.zeros((8, 2)), np.zeros((2, 5)), name="q_proj")
    with pytest.raises(InputError, match="must be 2-D"):
        LoRALinear(np.zeros((8, 6)), np.zeros((8,)), np.zeros((2, 6)))


def test_dropout_settings_checked():
    w, a, b, _, _ = _arrays()
    with pytest.raises(InputError, match=r"invalid LoRA dropout 1.0"):
        LoRALinear(w, a, b, dropout=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(InputError, match="needs rngs"):
        LoRALinear(w, a, b, dropout=0.1)
