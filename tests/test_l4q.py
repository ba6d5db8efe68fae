import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from loftq_jax import packing
from loftq_jax.errors import InputError
from loftq_jax.l4q import (
    TRAINABLE,
    FrozenWeight,
    L4QConfig,
    L4QLinear,
    L4QParams,
    QuantParam,
    dequantize_export,
    export_params,
    exported_linear,
    fake_quant,
    fake_quant_ste,
    init_params,
    init_params_from_loftq,
    init_quantizer,
    l4q_linear,
    l4q_linear_autodiff,
    merged_weight,
    quantize_codes,
    reinit_quantizer,
    warmup_linear,
)
from loftq_jax.loftq import LoftQConfig

TRAINED_FIELDS = ("a", "b", "scale", "offset")


def normal(seed: int, shape, scale: float = 1.0, dtype=np.float32) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype) * scale)


_init_quantizer = jax.jit(init_quantizer, static_argnums=1)


def random_params(config: L4QConfig, num_out: int, num_in: int, *, seed: int = 0, dtype=np.float32, bias=True) -> L4QParams:
    """Return a layer away from initialization: a nonzero LoRA product and a quantizer that clips some weights."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((num_out, num_in)).astype(dtype) * 0.05
    a = rng.standard_normal((num_out, config.rank)).astype(dtype) * 0.1
    b = rng.standard_normal((config.rank, num_in)).astype(dtype) * 0.1
    scale, offset = (np.asarray(t) for t in _init_quantizer(jnp.asarray(base + config.scaling * a @ b), config))
    # A narrower range than min-max clips weights at both ends.
    scale, offset = 0.8 * scale, offset + 0.5 * scale
    bias_values = rng.standard_normal(num_out).astype(dtype) if bias else None
    arrays = (base, a, b, scale.astype(dtype), offset.astype(dtype), bias_values)
    return L4QParams(*(None if t is None else jnp.asarray(t) for t in arrays))


def reference_positions(params: L4QParams, config: L4QConfig) -> np.ndarray:
    """Return the position v = (w - offset) / scale of every merged weight, computed in NumPy."""
    merged = np.asarray(merged_weight(params.base, params.a, params.b, config.scaling))
    column_group = np.arange(merged.shape[1]) // config.group_size
    return (merged - np.asarray(params.offset)[:, column_group]) / np.asarray(params.scale)[:, column_group]


def move_off_clip_boundaries(params: L4QParams, config: L4QConfig, margin: float) -> L4QParams:
    """Shift frozen base weights whose position lies within `margin` of 0 or Qmax by 2 * margin steps."""
    v = reference_positions(params, config)
    near = (np.abs(v) < margin) | (np.abs(v - config.max_code) < margin)
    column_group = np.arange(v.shape[1]) // config.group_size
    shift = 2 * margin * np.asarray(params.scale)[:, column_group] * np.where(v < config.max_code / 2, 1, -1)
    return dataclasses.replace(params, base=params.base + jnp.asarray(np.where(near, shift, 0.0)))


def trained_grads(fn, params: L4QParams, config: L4QConfig, x, cotangent):
    """Return the gradients of sum(fn(x) * cotangent) with respect to x and the trained fields."""

    def loss(x, trained):
        return jnp.sum(fn(x, dataclasses.replace(params, **trained), config) * cotangent)

    trained = {name: getattr(params, name) for name in TRAINED_FIELDS}
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, trained)


# ---------------------------------------------------------------------------------------------------
# Quantizer


def test_init_quantizer_maps_range_to_end_codes():
    config = L4QConfig(bits=3, group_size=4, rank=1)
    w = np.random.default_rng(0).standard_normal((5, 10)).astype(np.float32)
    scale, offset = init_quantizer(jnp.asarray(w), config)

    # With 10 inputs in groups of 4, the last group contains only the real columns 8 and 9.
    groups = [w[:, 0:4], w[:, 4:8], w[:, 8:10]]
    expected_low = np.stack([g.min(axis=1) for g in groups], axis=1)
    expected_high = np.stack([g.max(axis=1) for g in groups], axis=1)
    assert scale.shape == (5, 3)
    np.testing.assert_allclose(offset, expected_low, rtol=1e-6)
    np.testing.assert_allclose(scale, (expected_high - expected_low) / 7, rtol=1e-6)

    codes = np.asarray(quantize_codes(jnp.asarray(w), scale, offset, config))
    for group, columns in enumerate([slice(0, 4), slice(4, 8), slice(8, 10)]):
        assert (codes[:, columns].min(axis=1) == 0).all()
        assert (codes[:, columns].max(axis=1) == 7).all()
    error = np.abs(np.asarray(fake_quant(jnp.asarray(w), scale, offset, config)) - w)
    column_group = np.arange(10) // 4
    assert (error <= np.asarray(scale)[:, column_group] / 2 + 1e-6).all()


def test_init_quantizer_constant_group_is_exact():
    config = L4QConfig(bits=4, group_size=4, rank=1)
    w = jnp.full((2, 8), 0.25)
    scale, offset = init_quantizer(w, config)
    np.testing.assert_array_equal(scale, np.ones((2, 2)))
    np.testing.assert_array_equal(fake_quant(w, scale, offset, config), w)


def test_fake_quant_ste_equals_fake_quant():
    config = L4QConfig(bits=4, group_size=8, rank=2)
    params = random_params(config, 12, 20)
    merged = merged_weight(params.base, params.a, params.b, config.scaling)
    np.testing.assert_array_equal(
        fake_quant_ste(merged, params.scale, params.offset, config), fake_quant(merged, params.scale, params.offset, config)
    )


def test_ste_passes_gradient_inside_range():
    config = L4QConfig(bits=2, group_size=8, rank=2)
    params = random_params(config, 12, 16)
    merged = merged_weight(params.base, params.a, params.b, config.scaling)
    v = reference_positions(params, config)
    inside = (v >= 0) & (v <= config.max_code)
    upstream = normal(5, merged.shape)

    grad_w = jax.grad(lambda w: jnp.sum(fake_quant_ste(w, params.scale, params.offset, config) * upstream))(merged)

    assert 0 < inside.sum() < inside.size
    # Inside, autodiff multiplies by scale · (1 / scale), which may differ from 1 in the last bit.
    np.testing.assert_allclose(np.asarray(grad_w)[inside], np.asarray(upstream)[inside], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad_w)[~inside], 0.0)


def test_custom_backward_masks_clipped_weights():
    # With rank = in and B = I, W0 + s·A·B = W0 + s·A, so dA / s is the merged weight's gradient.
    config = L4QConfig(bits=2, group_size=4, rank=8, alpha=16.0)
    params = dataclasses.replace(random_params(config, 6, 8), b=jnp.eye(8))
    scale, offset = init_quantizer(merged_weight(params.base, params.a, params.b, config.scaling), config)
    params = dataclasses.replace(params, scale=0.7 * scale, offset=offset + 0.3 * scale)
    x = normal(1, (5, 8))
    dy = normal(2, (5, 6))

    _, grads = trained_grads(l4q_linear, params, config, x, dy)

    v = reference_positions(params, config)
    inside = (v >= 0) & (v <= config.max_code)
    dwq = np.asarray(dy).T @ np.asarray(x)
    grad_merged = np.asarray(grads["a"]) / config.scaling
    assert 0 < inside.sum() < inside.size
    np.testing.assert_allclose(grad_merged[inside], dwq[inside], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(grad_merged[~inside], 0.0)


def test_lsq_gradient_scale():
    config = L4QConfig(bits=4, group_size=8, rank=2)
    unscaled = dataclasses.replace(config, lsq_grad_scale=False)
    assert config.grad_scale(20) == pytest.approx(1 / np.sqrt(8 * 15))
    assert config.grad_scale(5) == pytest.approx(1 / np.sqrt(5 * 15))
    assert unscaled.grad_scale(20) == 1.0

    params = random_params(config, 6, 20)
    x = normal(1, (4, 20))
    dy = normal(2, (4, 6))
    _, scaled_grads = trained_grads(l4q_linear, params, config, x, dy)
    _, plain_grads = trained_grads(l4q_linear, params, unscaled, x, dy)
    for name in ("scale", "offset"):
        np.testing.assert_allclose(scaled_grads[name], plain_grads[name] / np.sqrt(8 * 15), rtol=1e-6)
    for name in ("a", "b"):
        np.testing.assert_array_equal(scaled_grads[name], plain_grads[name])


# ---------------------------------------------------------------------------------------------------
# Gradients against finite differences and plain autodiff


def ste_surrogate_loss(params: L4QParams, config: L4QConfig, x, frozen_rounding):
    """Return the loss with rounding replaced by a constant shift, written independently of the library.

    round(v) = clip(v) + frozen_rounding at the base point, so the surrogate equals the true loss there.
    Its exact derivative is what the straight-through estimator claims for the true loss.
    """
    merged = params.base + config.scaling * params.a @ params.b
    column_group = np.arange(merged.shape[1]) // config.group_size
    scale, offset = params.scale[:, column_group], params.offset[:, column_group]
    clipped = jnp.clip((merged - offset) / scale, 0, config.max_code)
    weight = (clipped + frozen_rounding) * scale + offset
    return jnp.sum(jnp.sin(x @ weight.T + params.bias))


def test_gradients_match_surrogate_finite_differences():
    # Q(W0 + s·A·B) is piecewise constant in A and B, so its true derivative is zero almost everywhere,
    # and its derivative in the scales jumps at rounding boundaries. The straight-through estimator is
    # the exact derivative of a surrogate in which rounding is a constant shift, so finite differences
    # of that surrogate check the backward. Clipping still bends the surrogate. The base point therefore
    # keeps every weight at least 0.05 steps from positions 0 and Qmax, far beyond what a step of h moves it.
    with jax.enable_x64(True):
        config = L4QConfig(bits=3, group_size=4, rank=2, alpha=4.0, lsq_grad_scale=False)
        params = move_off_clip_boundaries(random_params(config, 5, 10, dtype=np.float64), config, margin=0.05)
        x = normal(3, (7, 10), dtype=np.float64)
        v = reference_positions(params, config)
        clipped = np.clip(v, 0, config.max_code)
        frozen_rounding = jnp.asarray(np.round(clipped) - clipped)
        assert np.min(np.minimum(np.abs(v), np.abs(v - config.max_code))) >= 0.05
        assert ((v < 0) | (v > config.max_code)).any()

        true_loss = jnp.sum(jnp.sin(l4q_linear(x, params, config)))
        assert float(ste_surrogate_loss(params, config, x, frozen_rounding)) == pytest.approx(float(true_loss), rel=1e-12)

        trained = {name: getattr(params, name) for name in TRAINED_FIELDS}
        grads = jax.jit(jax.grad(lambda t: jnp.sum(jnp.sin(l4q_linear(x, dataclasses.replace(params, **t), config)))))(trained)
        h = 1e-6
        for name in TRAINED_FIELDS:
            value = getattr(params, name)
            # One central difference per element: the steps are the rows of h times the identity.
            steps = h * jnp.eye(value.size, dtype=value.dtype).reshape(value.size, *value.shape)

            def surrogate_at(step, name=name, value=value):
                return ste_surrogate_loss(dataclasses.replace(params, **{name: value + step}), config, x, frozen_rounding)

            differences = jax.jit(jax.vmap(lambda step: surrogate_at(step) - surrogate_at(-step)))(steps)
            numeric = (differences / (2 * h)).reshape(value.shape)
            np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_custom_backward_matches_autodiff(bits):
    config = L4QConfig(bits=bits, group_size=16, rank=4)
    params = random_params(config, 24, 40)
    x = normal(1, (2, 3, 40))
    dy = normal(2, (2, 3, 24))

    np.testing.assert_array_equal(l4q_linear(x, params, config), l4q_linear_autodiff(x, params, config))
    dx_custom, custom = trained_grads(l4q_linear, params, config, x, dy)
    dx_autodiff, autodiff = trained_grads(l4q_linear_autodiff, params, config, x, dy)

    np.testing.assert_allclose(dx_custom, dx_autodiff, rtol=1e-5, atol=1e-6)
    for name in TRAINED_FIELDS:
        tolerance = 1e-5 * float(np.abs(autodiff[name]).max())
        assert float(np.abs(autodiff[name]).max()) > 0, name
        np.testing.assert_allclose(custom[name], autodiff[name], rtol=1e-4, atol=tolerance, err_msg=name)


def test_custom_backward_matches_autodiff_at_init():
    # Min-max initialization puts each group's min at v = 0 and its max at v = Qmax, up to rounding.
    config = L4QConfig(bits=4, group_size=8, rank=2)
    w0 = normal(0, (16, 24), 0.05)
    params = init_params(w0, config, key=jax.random.key(1))
    params = dataclasses.replace(params, a=normal(2, params.a.shape, 1e-3))
    x = normal(3, (6, 24))
    dy = normal(4, (6, 16))

    _, custom = trained_grads(l4q_linear, params, config, x, dy)
    _, autodiff = trained_grads(l4q_linear_autodiff, params, config, x, dy)
    for name in TRAINED_FIELDS:
        tolerance = 1e-5 * float(np.abs(autodiff[name]).max())
        np.testing.assert_allclose(custom[name], autodiff[name], rtol=1e-4, atol=tolerance, err_msg=name)


def test_frozen_base_and_bias_get_zero_gradient():
    config = L4QConfig(bits=4, group_size=8, rank=2)
    params = random_params(config, 8, 16)
    x = normal(1, (3, 16))
    for fn in (l4q_linear, l4q_linear_autodiff, warmup_linear):
        grads = jax.jit(jax.grad(lambda p: jnp.sum(fn(x, p, config) ** 2)))(params)
        np.testing.assert_array_equal(grads.base, 0.0)
        np.testing.assert_array_equal(grads.bias, 0.0)


# ---------------------------------------------------------------------------------------------------
# Memory: what the backward saves


def residual_leaves(fn, params: L4QParams, config: L4QConfig, x) -> list:
    """Return the arrays that jax.vjp keeps for the backward of fn with respect to x and the trained fields."""

    def apply(x, a, b, scale, offset):
        return fn(x, dataclasses.replace(params, a=a, b=b, scale=scale, offset=offset), config)

    _, vjp_fn = jax.vjp(apply, x, params.a, params.b, params.scale, params.offset)
    return jax.tree_util.tree_leaves(vjp_fn)


def test_custom_backward_saves_no_merged_weight():
    config = L4QConfig(bits=4, group_size=8, rank=4)
    params = random_params(config, 48, 40)
    x = normal(1, (5, 40))
    weight_size = 48 * 40

    custom = residual_leaves(l4q_linear, params, config, x)
    weight_sized = [leaf for leaf in custom if leaf.size >= weight_size]
    assert len(weight_sized) == 1
    np.testing.assert_array_equal(weight_sized[0], params.base)
    saved_bytes = sum(leaf.nbytes for leaf in custom)
    inputs_bytes = sum(leaf.nbytes for leaf in (x, params.base, params.a, params.b, params.scale, params.offset))
    assert saved_bytes <= inputs_bytes

    # The same check catches plain autodiff, which saves (out, in)-sized intermediates besides W0.
    autodiff = residual_leaves(l4q_linear_autodiff, params, config, x)
    assert sum(leaf.size >= weight_size for leaf in autodiff) >= 3


def test_warmup_saves_no_quantized_base():
    config = L4QConfig(bits=4, group_size=8, rank=4)
    params = random_params(config, 48, 40)
    x = normal(1, (5, 40))
    leaves = residual_leaves(warmup_linear, params, config, x)
    weight_sized = [leaf for leaf in leaves if leaf.size >= 48 * 40]
    assert len(weight_sized) == 1
    np.testing.assert_array_equal(weight_sized[0], params.base)


# ---------------------------------------------------------------------------------------------------
# Initialization and warm-up


def test_init_params_starts_at_quantized_base():
    config = L4QConfig(bits=4, group_size=8, rank=3, alpha=6.0)
    w0 = normal(0, (10, 20), 0.05)
    bias = jnp.arange(10, dtype=jnp.float32)
    params = init_params(w0, config, key=jax.random.key(1), bias=bias)
    x = normal(2, (4, 20))

    np.testing.assert_array_equal(params.a, 0.0)
    assert float(jnp.abs(params.b).max()) > 0
    assert float(jnp.abs(params.b).max()) <= 1 / np.sqrt(20)
    expected = x @ fake_quant(w0, params.scale, params.offset, config).T + bias
    np.testing.assert_allclose(l4q_linear(x, params, config), expected, rtol=1e-6, atol=1e-6)


def test_warmup_trains_only_lora():
    config = L4QConfig(bits=3, group_size=8, rank=2)
    params = random_params(config, 8, 16)
    x = normal(1, (5, 16))
    quantized_base = fake_quant(params.base, params.scale, params.offset, config)
    lora = config.scaling * x @ params.b.T @ params.a.T
    np.testing.assert_allclose(warmup_linear(x, params, config), x @ quantized_base.T + lora + params.bias, rtol=1e-5, atol=1e-6)

    grads = jax.grad(lambda p: jnp.sum(warmup_linear(x, p, config) ** 2))(params)
    np.testing.assert_array_equal(grads.scale, 0.0)
    np.testing.assert_array_equal(grads.offset, 0.0)
    assert float(jnp.abs(grads.a).max()) > 0
    assert float(jnp.abs(grads.b).max()) > 0


def test_warmup_equals_merged_at_zero_product():
    config = L4QConfig(bits=4, group_size=8, rank=2)
    params = init_params(normal(0, (8, 16)), config, key=jax.random.key(1))
    x = normal(2, (3, 16))
    np.testing.assert_allclose(warmup_linear(x, params, config), l4q_linear(x, params, config), rtol=1e-6, atol=1e-6)


def test_reinit_quantizer_fits_merged_weight():
    config = L4QConfig(bits=4, group_size=8, rank=2)
    params = random_params(config, 8, 16)
    refitted = reinit_quantizer(params, config)
    expected_scale, expected_offset = init_quantizer(merged_weight(params.base, params.a, params.b, config.scaling), config)
    np.testing.assert_array_equal(refitted.scale, expected_scale)
    np.testing.assert_array_equal(refitted.offset, expected_offset)
    np.testing.assert_array_equal(refitted.a, params.a)


def test_loftq_init_starts_at_approximation():
    w = np.random.default_rng(0).standard_normal((32, 48)).astype(np.float32) * 0.05
    config = L4QConfig(bits=4, group_size=16, rank=4, alpha=8.0)
    loftq_config = LoftQConfig(bits=4, rank=4, steps=2, block_size=16, alpha=8.0)
    params, result = init_params_from_loftq(w, config, loftq_config)

    merged = merged_weight(params.base, params.a, params.b, config.scaling)
    np.testing.assert_array_equal(params.base, result.q)
    relative_error = np.linalg.norm(w - np.asarray(merged)) / np.linalg.norm(w)
    assert relative_error == pytest.approx(float(result.errors[-1]), rel=1e-3)
    assert float(result.errors[-1]) < float(result.errors[0])
    expected_scale, expected_offset = init_quantizer(merged, config)
    np.testing.assert_array_equal(params.scale, expected_scale)
    np.testing.assert_array_equal(params.offset, expected_offset)


def test_loftq_init_rejects_other_rank():
    w = np.ones((8, 8), np.float32)
    with pytest.raises(InputError, match="LoftQ rank 2 and scaling 1.0 differ from L4Q rank 4"):
        init_params_from_loftq(w, L4QConfig(rank=4), LoftQConfig(rank=2))


# ---------------------------------------------------------------------------------------------------
# Flax NNX layer


def test_layer_variable_types_select_trainables():
    config = L4QConfig(bits=4, group_size=8, rank=2)
    layer = L4QLinear.from_weight(jnp.ones((8, 16)), config, rngs=nnx.Rngs(0), bias=jnp.zeros(8))

    assert set(nnx.state(layer, TRAINABLE).keys()) == {"a", "b", "scale", "offset"}
    assert set(nnx.state(layer, QuantParam).keys()) == {"scale", "offset"}
    assert set(nnx.state(layer, nnx.All(TRAINABLE, nnx.Not(QuantParam))).keys()) == {"a", "b"}
    assert set(nnx.state(layer, FrozenWeight).keys()) == {"base", "bias"}
    assert set(nnx.state(layer, nnx.Param).keys()) == {"a", "b", "scale", "offset"}


def test_layer_flattens_batch_and_length():
    config = L4QConfig(bits=4, group_size=8, rank=2)
    params = random_params(config, 8, 16)
    layer = L4QLinear(params, config)
    x = normal(1, (2, 5, 16))

    y = layer(x)
    assert y.shape == (2, 5, 8)
    np.testing.assert_array_equal(y.reshape(10, 8), l4q_linear(x.reshape(10, 16), params, config))


def train_layer(layer: L4QLinear, x, target, steps: int) -> list[float]:
    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=TRAINABLE)

    @nnx.jit
    def step(layer, optimizer):
        def loss_fn(layer):
            return jnp.mean((layer(x) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))(layer)
        optimizer.update(layer, grads)
        return loss

    return [float(step(layer, optimizer)) for _ in range(steps)]


def test_layer_training_updates_only_trainables():
    config = L4QConfig(bits=4, group_size=8, rank=2)
    w0 = normal(0, (8, 16), 0.1)
    layer = L4QLinear.from_weight(w0, config, rngs=nnx.Rngs(0), bias=jnp.ones(8))
    before = layer.params
    x = normal(1, (4, 6, 16))
    target = normal(2, (4, 6, 8))

    losses = train_layer(layer, x, target, steps=10)

    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(layer.base[...], before.base)
    np.testing.assert_array_equal(layer.bias[...], before.bias)
    for name in TRAINED_FIELDS:
        assert not np.array_equal(getattr(layer.params, name), getattr(before, name)), name


def test_layer_end_warmup_refits_quantizer():
    config = L4QConfig(bits=4, group_size=8, rank=2)
    layer = L4QLinear.from_weight(normal(0, (8, 16)), config, rngs=nnx.Rngs(0), warmup=True)
    x = normal(1, (3, 16))
    target = normal(2, (3, 8))
    train_layer(layer, x, target, steps=3)
    warm_params = layer.params
    np.testing.assert_allclose(layer(x), warmup_linear(x, warm_params, config), rtol=1e-6)

    layer.end_warmup()

    assert layer.warmup is False
    refitted = reinit_quantizer(warm_params, config)
    np.testing.assert_array_equal(layer.scale[...], refitted.scale)
    np.testing.assert_array_equal(layer.offset[...], refitted.offset)
    np.testing.assert_array_equal(layer(x), l4q_linear(x, refitted, config))


# ---------------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_export_equals_trained_forward(bits):
    config = L4QConfig(bits=bits, group_size=8, rank=2)
    layer = L4QLinear.from_weight(normal(0, (12, 20), 0.1), config, rngs=nnx.Rngs(0), bias=jnp.ones(12))
    x = normal(1, (2, 7, 20))
    train_layer(layer, x, normal(2, (2, 7, 12)), steps=5)

    exported = layer.export()

    np.testing.assert_allclose(exported_linear(x, exported), layer(x), rtol=0, atol=1e-5)
    merged = merged_weight(layer.base[...], layer.a[...], layer.b[...], config.scaling)
    codes = quantize_codes(merged, layer.scale[...], layer.offset[...], config)
    storage_bits = bits if bits in (2, 3, 4, 8) else 8
    np.testing.assert_array_equal(packing.unpack_codes(exported.codes, storage_bits, 240, "big"), codes.reshape(-1))
    assert exported.codes.dtype == jnp.uint8
    assert exported.codes.shape == (packing.packed_size(240, storage_bits),)
    assert exported.nbytes == packing.packed_size(240, storage_bits) + 2 * 12 * 3 * 4

    assert exported.weight_16.dtype == jnp.bfloat16
    weight = dequantize_export(exported)
    np.testing.assert_allclose(exported.weight_16.astype(jnp.float32), weight, rtol=2**-8, atol=0)
    # bfloat16 rounds each weight by at most 2**-8 of its magnitude.
    bound = float(jnp.max(jnp.abs(x) @ jnp.abs(weight).T)) * 2**-8
    np.testing.assert_allclose(exported_linear(x, exported, use_weight_16=True), layer(x), rtol=0, atol=bound)


def test_export_little_bit_order_and_float16():
    config = L4QConfig(bits=4, group_size=8, rank=2, bit_order="little")
    params = random_params(config, 6, 16)
    exported = export_params(params, config, jnp.float16)
    x = normal(1, (3, 16))
    assert exported.weight_16.dtype == jnp.float16
    np.testing.assert_allclose(exported_linear(x, exported), l4q_linear(x, params, config), rtol=0, atol=1e-5)
    big = export_params(params, dataclasses.replace(config, bit_order="big"))
    assert not np.array_equal(exported.codes, big.codes)


def test_export_does_not_recompile(count_compiles):
    config = L4QConfig(bits=4, group_size=8, rank=2)
    with count_compiles("export_params") as counter:
        export_params(random_params(config, 10, 24, seed=1), config)
        export_params(random_params(config, 10, 24, seed=2), config)
        assert counter.count == 1
        export_params(random_params(config, 14, 24, seed=3), config)
        assert counter.count == 2


# ---------------------------------------------------------------------------------------------------
# Invalid input


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"bits": 1}, "invalid bits 1; L4Q supports integer bits from 2 to 8"),
        ({"bits": 9}, "invalid bits 9"),
        ({"bits": 4.0}, "invalid bits 4.0"),
        ({"bits": True}, "invalid bits True"),
        ({"group_size": 0}, "invalid group size 0"),
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"alpha": -1.0}, "invalid alpha -1.0"),
        ({"bit_order": "middle"}, "unknown bit order 'middle'"),
    ],
)
def test_config_rejects_invalid_settings(settings, message):
    with pytest.raises(InputError, match=message):
        L4QConfig(**settings)


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (np.ones(8, np.float32), r"layer.weight: shape \(8,\) has 1 dimensions"),
        (np.ones((8, 8), np.int32), "dtype int32 is not floating point"),
        (np.full((8, 8), np.nan, np.float32), "layer.weight: 64 of 64 elements are NaN or Inf"),
        (np.ones((8, 2), np.float32), r"rank 4 exceeds min\(out, in\) = 2"),
    ],
)
def test_init_rejects_invalid_weight(weight, message):
    with pytest.raises(InputError, match=message):
        init_params(weight, L4QConfig(rank=4), key=jax.random.key(0), name="layer.weight")


def test_init_rejects_bias_of_wrong_shape():
    with pytest.raises(InputError, match=r"q.bias: shape \(7,\) does not fit 8 outputs"):
        init_params(np.ones((8, 8), np.float32), L4QConfig(rank=2), key=jax.random.key(0), bias=np.ones(7), name="q")


def test_layer_without_lora_branch_is_rejected():
    config = L4QConfig(bits=4, group_size=8, rank=2)
    params = dataclasses.replace(random_params(config, 8, 16), a=None)
    with pytest.raises(InputError, match="no LoRA branch"):
        L4QLinear(params, config)


def test_params_of_wrong_shape_are_rejected():
    config = L4QConfig(bits=4, group_size=8, rank=2)
    params = random_params(config, 8, 16)
    with pytest.raises(InputError, match=r"layer.scale: shape \(8, 2\) does not fit .* group size 4; expected \(8, 4\)"):
        L4QLinear(params, dataclasses.replace(config, group_size=4))
    with pytest.raises(InputError, match=r"layer.a: shape \(8, 2\) does not fit .* rank 3"):
        L4QLinear(params, dataclasses.replace(config, rank=3))


def test_input_of_wrong_size_is_rejected():
    config = L4QConfig(bits=4, group_size=8, rank=2)
    params = random_params(config, 8, 16)
    for fn in (l4q_linear, l4q_linear_autodiff, warmup_linear):
        with pytest.raises(InputError, match=r"input shape \(3, 12\) does not end in the layer's input size 16"):
            fn(jnp.ones((3, 12)), params, config)
