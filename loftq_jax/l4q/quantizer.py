"""The learned per-group uniform asymmetric quantizer of L4Q, with LSQ / LSQ+ gradients.

Each group of `group_size` weights along the input axis of an output row has a step size (scale) s and an
offset o, the value of code 0. The quantizer computes v = (w - o) / s, codes = round(clip(v, 0, Qmax)) with
Qmax = 2**bits - 1, and dequantizes to codes * s + o. Gradients follow LSQ (Esser et al., 2020, "Learned
Step Size Quantization", arXiv 1902.08153) with the learned offset of LSQ+ (Bhalgat et al., 2020,
arXiv 2004.09576): rounding is a straight-through estimator, so with inside = 0 <= v <= Qmax

    dQ/dw = 1 inside, 0 outside;   dQ/ds = codes - v inside, codes outside;   dQ/do = 0 inside, 1 outside,

and the scale and offset gradients are multiplied by LSQ's g = 1 / sqrt(weights per group * Qmax).

NOTE: Two details are unchecked against the full text of L4Q (arXiv 2402.04902): whether it keeps LSQ's
gradient scale, and whether it counts codes from the group minimum (as here) or over a signed range
-2**(bits-1) .. 2**(bits-1) - 1. The two conventions give the same forward but different scale gradients
at clipped weights.
"""

import functools

import jax
import jax.numpy as jnp

from loftq_jax.l4q.config import L4QConfig

# ---------------------------------------------------------------------------------------------------
# Groups along the input axis


def to_groups(w_OxI: jax.Array, group_size: int, pad_mode: str = "constant") -> jax.Array:
    """Split each row into groups of `group_size`, padding the input axis up to a multiple of it."""
    num_out, num_in = w_OxI.shape
    pad = -num_in % group_size
    w_OxI = jnp.pad(w_OxI, ((0, 0), (0, pad)), mode=pad_mode)
    return w_OxI.reshape(num_out, -1, group_size)


def from_groups(w_OxGxS: jax.Array, num_in: int) -> jax.Array:
    """Invert `to_groups`: drop the padding of the last group."""
    num_out = w_OxGxS.shape[0]
    return w_OxGxS.reshape(num_out, -1)[:, :num_in]


# ---------------------------------------------------------------------------------------------------
# Initialization, codes and dequantization


def init_quantizer(w_OxI: jax.Array, config: L4QConfig) -> tuple[jax.Array, jax.Array]:
    """Return scale_OxG and offset_OxG that map each group's [min, max] onto codes 0 .. 2**bits - 1.

    The padding of a partial last group repeats the row's last weight, so it never widens the range.
    A constant group gets scale 1, which still reproduces it exactly (every weight lands on code 0).
    """
    dtype = jnp.promote_types(w_OxI.dtype, jnp.float32)
    groups_OxGxS = to_groups(w_OxI.astype(dtype), config.group_size, pad_mode="edge")
    low_OxG = jnp.min(groups_OxGxS, axis=-1)
    high_OxG = jnp.max(groups_OxGxS, axis=-1)
    scale_OxG = (high_OxG - low_OxG) / config.max_code
    return jnp.where(scale_OxG > 0, scale_OxG, 1.0), low_OxG


def group_positions(w_OxI, scale_OxG, offset_OxG, config: L4QConfig) -> tuple[jax.Array, jax.Array]:
    """Return each weight's position v = (w - offset) / scale on the code axis, and its rounded code.

    Both are (out, groups, group_size) and include the zero padding of a partial last group.
    """
    groups_OxGxS = to_groups(w_OxI, config.group_size)
    v_OxGxS = (groups_OxGxS - offset_OxG[..., None]) / scale_OxG[..., None]
    codes_OxGxS = jnp.round(jnp.clip(v_OxGxS, 0, config.max_code))
    return v_OxGxS, codes_OxGxS


def dequantize_groups(codes_OxGxS, scale_OxG, offset_OxG, num_in: int) -> jax.Array:
    return from_groups(codes_OxGxS * scale_OxG[..., None] + offset_OxG[..., None], num_in)


def quantize_codes(w_OxI, scale_OxG, offset_OxG, config: L4QConfig) -> jax.Array:
    """Return the integer codes (out, in) of `w_OxI` as uint8."""
    _, codes_OxGxS = group_positions(w_OxI, scale_OxG, offset_OxG, config)
    return from_groups(codes_OxGxS, w_OxI.shape[1]).astype(jnp.uint8)


def dequantize_codes(codes_OxI, scale_OxG, offset_OxG, config: L4QConfig) -> jax.Array:
    """Rebuild the quantized weight codes * scale + offset from integer codes (out, in)."""
    codes_OxGxS = to_groups(codes_OxI.astype(scale_OxG.dtype), config.group_size)
    return dequantize_groups(codes_OxGxS, scale_OxG, offset_OxG, codes_OxI.shape[1])


def fake_quant(w_OxI, scale_OxG, offset_OxG, config: L4QConfig) -> jax.Array:
    """Return dequantize(quantize(w)). Its gradients are zero almost everywhere: train through `fake_quant_ste`."""
    _, codes_OxGxS = group_positions(w_OxI, scale_OxG, offset_OxG, config)
    return dequantize_groups(codes_OxGxS, scale_OxG, offset_OxG, w_OxI.shape[1])


# ---------------------------------------------------------------------------------------------------
# Gradients: plain autodiff through a straight-through estimator


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x: jax.Array, factor: float) -> jax.Array:
    """Return `x` unchanged, with its gradient multiplied by `factor` (LSQ's gradient scale)."""
    return x


def _scale_gradient_fwd(x, factor):
    return x, None


def _scale_gradient_bwd(factor, _, g):
    return (g * factor,)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def fake_quant_ste(w_OxI, scale_OxG, offset_OxG, config: L4QConfig) -> jax.Array:
    """Return the same values as `fake_quant`, built so that plain autodiff gives the LSQ+ gradients.

    `jnp.where` instead of `jnp.clip` keeps the clip boundaries v = 0 and v = Qmax inside the range, as
    the hand-written backward does. `jnp.clip` passes half the gradient there (jax 0.10.2), and min-max
    initialization puts each group's min at v = 0 and its max at v = Qmax up to rounding.
    """
    num_in = w_OxI.shape[1]
    factor = config.grad_scale(num_in)
    scale_OxG = scale_gradient(scale_OxG, factor)
    offset_OxG = scale_gradient(offset_OxG, factor)

    groups_OxGxS = to_groups(w_OxI, config.group_size)
    v_OxGxS = (groups_OxGxS - offset_OxG[..., None]) / scale_OxG[..., None]
    clipped = jnp.where(v_OxGxS < 0, 0.0, jnp.where(v_OxGxS > config.max_code, float(config.max_code), v_OxGxS))
    # Rounding passes its gradient straight through. Both r - v and v + (r - v) are exact in floating
    # point when |r - v| <= 1/2, so the value equals round(clipped) bit for bit.
    rounded = clipped + jax.lax.stop_gradient(jnp.round(clipped) - clipped)
    return dequantize_groups(rounded, scale_OxG, offset_OxG, num_in)


# ---------------------------------------------------------------------------------------------------
# Gradients: the hand-written backward


def quantizer_vjp(v_OxGxS, codes_OxGxS, dwq_OxI, config: L4QConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Map the gradient of the quantized weight to those of the weight, the scales and the offsets.

    Args:
      v_OxGxS, codes_OxGxS: the output of `group_positions` for the weight.
      dwq_OxI: gradient of the loss with respect to the quantized weight.
      config: the quantizer settings.

    Returns:
      (dw_OxI, dscale_OxG, doffset_OxG) with the LSQ+ straight-through rules of the module docstring.
    """
    num_in = dwq_OxI.shape[1]
    factor = config.grad_scale(num_in)
    dwq_OxGxS = to_groups(dwq_OxI, config.group_size)
    inside = (v_OxGxS >= 0) & (v_OxGxS <= config.max_code)

    dw_OxI = from_groups(jnp.where(inside, dwq_OxGxS, 0.0), num_in)
    dq_dscale = jnp.where(inside, codes_OxGxS - v_OxGxS, codes_OxGxS)
    dscale_OxG = factor * jnp.sum(dwq_OxGxS * dq_dscale, axis=-1)
    doffset_OxG = factor * jnp.sum(jnp.where(inside, 0.0, dwq_OxGxS), axis=-1)
    return dw_OxI, dscale_OxG, doffset_OxG
