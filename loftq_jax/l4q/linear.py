"""The L4Q linear layer as pure functions: y = x @ Q(W0 + s·A·B)ᵀ + bias.

`l4q_linear` has a hand-written backward (jax.custom_vjp) that saves only the layer inputs and rebuilds
the merged and quantized weight when the gradient arrives. `l4q_linear_autodiff` is the same forward
under plain autodiff, for comparison. `warmup_linear` is the LoRA-on-Q(W0) form used before the switch.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from loftq_jax.errors import InputError
from loftq_jax.l4q import quantizer
from loftq_jax.l4q.config import L4QConfig


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["base", "a", "b", "scale", "offset", "bias"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class L4QParams:
    """The tensors of one L4Q layer. Only `a`, `b`, `scale` and `offset` are trained."""

    base: jax.Array  # frozen pretrained weight W0, (out, in), any float dtype
    a: jax.Array  # LoRA factor A, (out, rank); PEFT's lora_B
    b: jax.Array  # LoRA factor B, (rank, in); PEFT's lora_A
    scale: jax.Array  # quantizer step size per group, (out, groups)
    offset: jax.Array  # quantizer offset (the value of code 0) per group, (out, groups)
    bias: Optional[jax.Array] = None  # frozen bias, (out,), or None


def check_params(params: L4QParams, config: L4QConfig, name: str = "layer") -> None:
    """Raise InputError unless the shapes of `params` fit each other and `config`."""
    if params.a is None or params.b is None:
        raise InputError(
            f"{name}: no LoRA branch because A or B is None. L4Q trains A (out, rank) and B (rank, in); "
            "to quantize a weight without adapters use loftq_jax.quantize"
        )
    num_out, num_in = np.shape(params.base)
    num_groups = config.num_groups(num_in)
    expected = {
        "a": (num_out, config.rank),
        "b": (config.rank, num_in),
        "scale": (num_out, num_groups),
        "offset": (num_out, num_groups),
    }
    if params.bias is not None:
        expected["bias"] = (num_out,)
    for field, shape in expected.items():
        actual = tuple(np.shape(getattr(params, field)))
        if actual != shape:
            raise InputError(
                f"{name}.{field}: shape {actual} does not fit weight shape {(num_out, num_in)}, rank {config.rank} "
                f"and group size {config.group_size}; expected {shape}"
            )


def compute_dtype(*arrays) -> jnp.dtype:
    """Return the dtype the layer computes in: the inputs' common dtype, at least float32."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def merged_weight(base_OxI, a_OxR, b_RxI, scaling: float) -> jax.Array:
    """Return W0 + scaling·A·B in the compute dtype."""
    dtype = compute_dtype(base_OxI, a_OxR, b_RxI)
    return base_OxI.astype(dtype) + scaling * (a_OxR.astype(dtype) @ b_RxI.astype(dtype))


def _flatten(x, num_in: int, name: str) -> jax.Array:
    if x.ndim < 1 or x.shape[-1] != num_in:
        raise InputError(f"{name}: input shape {tuple(x.shape)} does not end in the layer's input size {num_in}")
    return x.reshape(-1, num_in)


def _add_frozen_bias(y_NxO, bias_O, leading_shape) -> jax.Array:
    if bias_O is not None:
        y_NxO = y_NxO + jax.lax.stop_gradient(bias_O).astype(y_NxO.dtype)
    return y_NxO.reshape(*leading_shape, y_NxO.shape[-1])


# ---------------------------------------------------------------------------------------------------
# Hand-written backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _l4q_matmul(x_NxI, base_OxI, a_OxR, b_RxI, scale_OxG, offset_OxG, config: L4QConfig):
    return _l4q_matmul_fwd(x_NxI, base_OxI, a_OxR, b_RxI, scale_OxG, offset_OxG, config)[0]


def _quantized_weight(base_OxI, a_OxR, b_RxI, scale_OxG, offset_OxG, config: L4QConfig):
    merged_OxI = merged_weight(base_OxI, a_OxR, b_RxI, config.scaling)
    v_OxGxS, codes_OxGxS = quantizer.group_positions(merged_OxI, scale_OxG, offset_OxG, config)
    wq_OxI = quantizer.dequantize_groups(codes_OxGxS, scale_OxG, offset_OxG, merged_OxI.shape[1])
    return wq_OxI, v_OxGxS, codes_OxGxS


def _l4q_matmul_fwd(x_NxI, base_OxI, a_OxR, b_RxI, scale_OxG, offset_OxG, config: L4QConfig):
    wq_OxI, _, _ = _quantized_weight(base_OxI, a_OxR, b_RxI, scale_OxG, offset_OxG, config)
    y_NxO = (x_NxI.astype(wq_OxI.dtype) @ wq_OxI.T).astype(x_NxI.dtype)
    # The residuals are the inputs themselves: x and the parameters. Nothing of size (out, in) is new,
    # because W0 is a parameter that stays in memory anyway.
    return y_NxO, (x_NxI, base_OxI, a_OxR, b_RxI, scale_OxG, offset_OxG)


def _l4q_matmul_bwd(config: L4QConfig, residuals, dy_NxO):
    # Without the barrier XLA would merge this rebuild of the quantized weight with the forward's
    # identical one (common subexpression elimination) and keep the forward's alive until now. Passing
    # the cotangent through it too makes the rebuild wait for the backward, as jax.checkpoint does.
    # NOTE: XLA's CPU backend (jax 0.10.2) drops the barrier: the compiled temp memory of a stack of
    # layers still grows with depth, as it does for jax.checkpoint. The effect on GPU is unmeasured.
    dy_NxO, residuals = jax.lax.optimization_barrier((dy_NxO, residuals))
    x_NxI, base_OxI, a_OxR, b_RxI, scale_OxG, offset_OxG = residuals
    wq_OxI, v_OxGxS, codes_OxGxS = _quantized_weight(base_OxI, a_OxR, b_RxI, scale_OxG, offset_OxG, config)
    dtype = wq_OxI.dtype
    dy_NxO = dy_NxO.astype(dtype)

    dx_NxI = dy_NxO @ wq_OxI
    # The weight gradient lives only inside this function: it is reduced to the gradients of A, B, the
    # scales and the offsets before returning, and W0 gets none.
    dwq_OxI = dy_NxO.T @ x_NxI.astype(dtype)
    dmerged_OxI, dscale_OxG, doffset_OxG = quantizer.quantizer_vjp(v_OxGxS, codes_OxGxS, dwq_OxI, config)
    da_OxR = config.scaling * (dmerged_OxI @ b_RxI.astype(dtype).T)
    db_RxI = config.scaling * (a_OxR.astype(dtype).T @ dmerged_OxI)
    return (
        dx_NxI.astype(x_NxI.dtype),
        None,
        da_OxR.astype(a_OxR.dtype),
        db_RxI.astype(b_RxI.dtype),
        dscale_OxG.astype(scale_OxG.dtype),
        doffset_OxG.astype(offset_OxG.dtype),
    )


_l4q_matmul.defvjp(_l4q_matmul_fwd, _l4q_matmul_bwd)


def l4q_linear(x, params: L4QParams, config: L4QConfig) -> jax.Array:
    """Apply an L4Q layer with the memory-saving backward: y = x @ Q(W0 + s·A·B)ᵀ + bias.

    The backward saves only x and the parameters, rebuilds the quantized weight, forms the gradient of
    the merged weight and reduces it to the gradients of A, B, the scales and the offsets. W0 and the
    bias get zero gradients: they are frozen.

    Args:
      x: activations (..., in); the leading axes are flattened for the matmul and restored.
      params: the layer's tensors, shapes as `check_params` expects.
      config: bits, group size, rank, LoRA scaling and the LSQ gradient scale.

    Returns:
      y (..., out) in x's dtype.

    References:
      Jeon, Kim and Kim, 2025, L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large Language
      Models, ACL 2025, arXiv 2402.04902.
    """
    check_params(params, config, "l4q_linear")
    x_NxI = _flatten(x, params.base.shape[1], "l4q_linear")
    y_NxO = _l4q_matmul(x_NxI, params.base, params.a, params.b, params.scale, params.offset, config)
    return _add_frozen_bias(y_NxO, params.bias, x.shape[:-1])


# ---------------------------------------------------------------------------------------------------
# Plain autodiff, for comparison


def l4q_linear_autodiff(x, params: L4QParams, config: L4QConfig) -> jax.Array:
    """Apply the same layer as `l4q_linear`, differentiated by plain JAX autodiff.

    Autodiff saves several (out, in)-sized intermediates of the merge and the quantizer (positions,
    clip masks, the quantized weight) for every layer until its backward runs. `l4q_linear` saves none. W0 and the bias are frozen
    here too (stop_gradient).
    """
    check_params(params, config, "l4q_linear_autodiff")
    x_NxI = _flatten(x, params.base.shape[1], "l4q_linear_autodiff")
    base_OxI = jax.lax.stop_gradient(params.base)
    merged_OxI = merged_weight(base_OxI, params.a, params.b, config.scaling)
    wq_OxI = quantizer.fake_quant_ste(merged_OxI, params.scale, params.offset, config)
    y_NxO = (x_NxI.astype(wq_OxI.dtype) @ wq_OxI.T).astype(x.dtype)
    return _add_frozen_bias(y_NxO, params.bias, x.shape[:-1])


# ---------------------------------------------------------------------------------------------------
# Warm-up: LoRA on the frozen quantized W0


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _frozen_quantized_matmul(x_NxI, base_OxI, scale_OxG, offset_OxG, config: L4QConfig):
    # jax.checkpoint makes the backward rebuild Q(W0) instead of saving it for dx.
    wq_OxI = quantizer.fake_quant(base_OxI.astype(scale_OxG.dtype), scale_OxG, offset_OxG, config)
    return x_NxI.astype(wq_OxI.dtype) @ wq_OxI.T


def warmup_linear(x, params: L4QParams, config: L4QConfig) -> jax.Array:
    """Apply the warm-up form y = x @ Q(W0)ᵀ + s·(x @ Bᵀ) @ Aᵀ + bias, which trains only A and B.

    L4Q trains LoRA on the quantized W0 for a short warm-up before switching to the merged form
    Q(W0 + s·A·B) of `l4q_linear`. The scales and offsets stay frozen here, and Q(W0) is rebuilt in the
    backward rather than saved. Call `reinit_quantizer` at the switch to fit the quantizer to the
    merged weight.
    """
    check_params(params, config, "warmup_linear")
    x_NxI = _flatten(x, params.base.shape[1], "warmup_linear")
    frozen = jax.lax.stop_gradient((params.base, params.scale, params.offset))
    y_NxO = _frozen_quantized_matmul(x_NxI, *frozen, config)
    dtype = y_NxO.dtype
    lora_NxO = (x_NxI.astype(dtype) @ params.b.astype(dtype).T) @ params.a.astype(dtype).T
    y_NxO = (y_NxO + config.scaling * lora_NxO).astype(x.dtype)
    return _add_frozen_bias(y_NxO, params.bias, x.shape[:-1])
