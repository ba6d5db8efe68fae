"""Initial L4Q parameters: QLoRA-style LoRA factors or a LoftQ run, and min-max quantizer ranges."""

import dataclasses

import jax
import jax.numpy as jnp

from loftq_jax.loftq import LoftQConfig, LoftQResult, loftq
from loftq_jax.errors import InputError
from loftq_jax.l4q import quantizer
from loftq_jax.l4q.config import L4QConfig, check_weight
from loftq_jax.l4q.linear import L4QParams, check_params, merged_weight


def _check_bias(bias, num_out: int, name: str) -> None:
    if bias is not None and tuple(jnp.shape(bias)) != (num_out,):
        raise InputError(f"{name}.bias: shape {tuple(jnp.shape(bias))} does not fit {num_out} outputs; expected ({num_out},)")


def init_params(
    w0, config: L4QConfig = L4QConfig(), *, key: jax.Array, bias=None, name: str = "weight"
) -> L4QParams:
    """Initialize an L4Q layer on the pretrained weight `w0` (out, in) with a zero LoRA product.

    As in LoRA and QLoRA, one factor starts at zero so that W0 + s·A·B = W0: A (out, rank) is zero and
    B (rank, in) is uniform in ±1/sqrt(in). The scales and offsets map each group's min and max of W0 onto
    codes 0 and 2**bits - 1. W0 keeps its dtype; A, B, the scales and the offsets are float32.

    Raises:
      InputError: `w0` is not a finite floating-point matrix, the rank exceeds min(out, in), or the bias
        shape does not fit.
    """
    check_weight(w0, config, name)
    w0 = jnp.asarray(w0)
    num_out, num_in = w0.shape
    _check_bias(bias, num_out, name)

    a_OxR = jnp.zeros((num_out, config.rank), jnp.float32)
    bound = 1.0 / jnp.sqrt(float(num_in))
    b_RxI = jax.random.uniform(key, (config.rank, num_in), jnp.float32, -bound, bound)
    scale_OxG, offset_OxG = quantizer.init_quantizer(w0, config)
    return L4QParams(w0, a_OxR, b_RxI, scale_OxG, offset_OxG, None if bias is None else jnp.asarray(bias))


def init_params_from_loftq(
    w, config: L4QConfig, loftq_config: LoftQConfig, *, bias=None, name: str = "weight"
) -> tuple[L4QParams, LoftQResult]:
    """Initialize an L4Q layer from a LoftQ run on `w`.

    LoftQ's quantized weight Q becomes the frozen base W0 and its factors become A and B, so the merged
    weight Q + s·A·B starts at LoftQ's approximation of `w`. The scales and offsets come from the min and
    max of that merged weight.

    NOTE: LoftQ's Q uses its own code book (NF by default), while L4Q re-quantizes the merged weight with
    its uniform per-group grid. The L4Q forward at step 0 is therefore not LoftQ's Q + s·A·B.

    Returns:
      The parameters and the `LoftQResult` (with its error per step).

    Raises:
      InputError: as `init_params`, or `loftq_config` has another rank or LoRA scaling than `config`.
    """
    check_weight(w, config, name)
    if loftq_config.rank != config.rank or loftq_config.scaling != config.scaling:
        raise InputError(
            f"{name}: LoftQ rank {loftq_config.rank} and scaling {loftq_config.scaling} differ from L4Q rank "
            f"{config.rank} and scaling {config.scaling}; set the same rank and alpha in both configs"
        )
    _check_bias(bias, jnp.shape(w)[0], name)

    result = loftq(w, loftq_config, name=name)
    a_OxR, b_RxI = result.a.astype(jnp.float32), result.b.astype(jnp.float32)
    scale_OxG, offset_OxG = quantizer.init_quantizer(merged_weight(result.q, a_OxR, b_RxI, config.scaling), config)
    params = L4QParams(result.q, a_OxR, b_RxI, scale_OxG, offset_OxG, None if bias is None else jnp.asarray(bias))
    return params, result


def reinit_quantizer(params: L4QParams, config: L4QConfig) -> L4QParams:
    """Return `params` with the scales and offsets refitted to the min and max of W0 + s·A·B.

    Call it when the warm-up (`warmup_linear`) ends, so that the quantizer of the merged form starts from
    the range of the weight it now quantizes. NOTE: L4Q describes its warm-up as LoRA training on Q(W0)
    before the switch to Q(W0 + s·A·B). Refitting the quantizer at the switch is this module's choice.
    """
    check_params(params, config)
    merged_OxI = merged_weight(params.base, params.a, params.b, config.scaling)
    scale_OxG, offset_OxG = quantizer.init_quantizer(merged_OxI, config)
    return dataclasses.replace(
        params, scale=scale_OxG.astype(params.scale.dtype), offset=offset_OxG.astype(params.offset.dtype)
    )
