"""Flax NNX layers: a frozen linear layer, LoRA over a 16-bit or float32 base, and LoRA over a packed quantized base.

Every layer stores its weight as W (out x in), as Hugging Face checkpoints do, and the adapters as the
project's A (out x r) and B (r x in), so that the layer computes y = x·(W + s·A·B)ᵀ + bias with the LoRA
scaling s = alpha / r (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv 2106.09685). A and B are `nnx.LoRAParam`, so an optimizer selects them by type.
"""

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loftq_jax.errors import InputError
from loftq_jax.quantize import QuantizedTensor, dequantize

# Standard deviation of freshly initialized heads, BERT's and LLaMA's `initializer_range`.
INIT_STD = 0.02


class QuantizedWeight(nnx.Variable):
    """Frozen state of a quantized base weight: packed uint8 codes, absmax scales or affine offsets.

    It is not an `nnx.Param`, so filters on `nnx.Param` or `nnx.LoRAParam` leave it out of gradients and
    optimizer states. The uint8 codes could not be differentiated anyway.
    """


# ---------------------------------------------------------------------------------------------------
# Plain layers of a pretrained backbone


class Linear(nnx.Module):
    """A dense layer y = x·Wᵀ + bias with W (out x in), the layout of PyTorch and Hugging Face checkpoints.

    With `rngs` the weight is drawn from N(0, 0.02²) and the bias is zero, as BERT initializes new heads.
    Without `rngs` both are zeros, placeholders that `loftq_jax.nn.loading.load_weights` overwrites.
    """

    def __init__(self, num_in: int, num_out: int, *, use_bias: bool = True, rngs: Optional[nnx.Rngs] = None):
        if rngs is None:
            weight_OxI = jnp.zeros((num_out, num_in), jnp.float32)
        else:
            weight_OxI = INIT_STD * jax.random.normal(rngs.params(), (num_out, num_in), jnp.float32)
        self.weight = nnx.Param(weight_OxI)
        self.bias = nnx.Param(jnp.zeros((num_out,), jnp.float32)) if use_bias else None

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's (out, in)."""
        return tuple(self.weight.shape)

    def __call__(self, x_NxI: jax.Array, *, deterministic: bool = True) -> jax.Array:
        del deterministic  # accepted so that LoRA layers can replace this one without call changes
        return _dense(x_NxI, self.weight[...], _value(self.bias))


class Embedding(nnx.Module):
    """A lookup table (num, dim) stored under Hugging Face's name `weight`."""

    def __init__(self, num: int, dim: int):
        self.weight = nnx.Param(jnp.zeros((num, dim), jnp.float32))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)


class LayerNorm(nnx.Module):
    """Layer normalization over the last axis with Hugging Face's parameter names `weight` and `bias`."""

    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        normalized = (x - mean) * jax.lax.rsqrt(variance + self.eps)
        return normalized * self.weight[...] + self.bias[...]


class RMSNorm(nnx.Module):
    """Root-mean-square normalization (Zhang and Sennrich, 2019, arXiv 1910.07467), LLaMA's norm."""

    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        normalized = x.astype(jnp.float32) * jax.lax.rsqrt(variance + self.eps)
        return self.weight[...] * normalized.astype(x.dtype)


# ---------------------------------------------------------------------------------------------------
# LoRA layers


class LoRALinear(nnx.Module):
    """LoRA over a frozen unquantized base weight ("16-bit LoRA"): y = x·Wᵀ + s·(dropout(x)·Bᵀ)·Aᵀ + bias.

    W keeps the dtype it is given (bfloat16, float16 or float32) and is cast to the activations' dtype in
    the forward pass; W and the bias are `nnx.Param`, and A and B are `nnx.LoRAParam`.

    Example::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> layer = LoRALinear(jnp.ones((4, 3)), jnp.zeros((4, 2)), jnp.ones((2, 3)), scaling=2.0)
      >>> layer(jnp.ones((5, 3))).shape
      (5, 4)
      >>> sorted(path for path, _ in nnx.to_flat_state(nnx.state(layer, nnx.LoRAParam)))
      [('a',), ('b',)]
    """

    def __init__(
        self,
        weight_OxI: jax.Array,
        a_OxR: jax.Array,
        b_RxI: jax.Array,
        bias_O: Optional[jax.Array] = None,
        *,
        scaling: float = 1.0,
        dropout: float = 0.0,
        rngs: Optional[nnx.Rngs] = None,
        name: str = "LoRALinear",
    ):
        shape = tuple(np.shape(weight_OxI))
        check_adapters(name, shape, a_OxR, b_RxI)
        self.weight = nnx.Param(jnp.asarray(weight_OxI))
        self.bias = None if bias_O is None else nnx.Param(jnp.asarray(bias_O))
        self.a = nnx.LoRAParam(jnp.asarray(a_OxR, jnp.float32))
        self.b = nnx.LoRAParam(jnp.asarray(b_RxI, jnp.float32))
        self.scaling = float(scaling)
        self.dropout = _lora_dropout(dropout, rngs, name)

    @property
    def shape(self) -> tuple[int, int]:
        """The base weight's (out, in)."""
        return tuple(self.weight.shape)

    def __call__(self, x_NxI: jax.Array, *, deterministic: bool = True) -> jax.Array:
        y = _dense(x_NxI, self.weight[...], _value(self.bias))
        return y + _lora_update(self, x_NxI, deterministic)


class QuantizedLoRALinear(nnx.Module):
    """LoRA over a frozen quantized base (QLoRA, LoftQ): y = x·Qᵀ + s·(dropout(x)·Bᵀ)·Aᵀ + bias.

    The base is held as packed codes and scales (`QuantizedWeight` state), so it costs its packed size in
    memory; Q = dequantize(codes, scales) is rebuilt inside every forward pass, which under `jax.jit` is a
    temporary of the compiled step. The quantizer settings and the weight shape are static attributes.

    References:
      Dettmers et al., 2023, QLoRA: Efficient Finetuning of Quantized LLMs, arXiv 2305.14314.
      Li et al., 2024, LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models, arXiv 2310.08659.
    """

    def __init__(
        self,
        quantized: QuantizedTensor,
        a_OxR: jax.Array,
        b_RxI: jax.Array,
        bias_O: Optional[jax.Array] = None,
        *,
        scaling: float = 1.0,
        dropout: float = 0.0,
        rngs: Optional[nnx.Rngs] = None,
        name: str = "QuantizedLoRALinear",
    ):
        if len(quantized.shape) != 2:
            raise InputError(f"{name}: quantized weight has shape {quantized.shape}; expected a 2-D weight (out, in)")
        check_adapters(name, quantized.shape, a_OxR, b_RxI)
        self.codes = QuantizedWeight(jnp.asarray(quantized.codes))
        self.scales = QuantizedWeight(jnp.asarray(quantized.scales))
        self.offsets = None if quantized.offsets is None else QuantizedWeight(jnp.asarray(quantized.offsets))
        self.weight_shape = tuple(quantized.shape)
        self.quant_config = quantized.config
        self.bias = None if bias_O is None else nnx.Param(jnp.asarray(bias_O))
        self.a = nnx.LoRAParam(jnp.asarray(a_OxR, jnp.float32))
        self.b = nnx.LoRAParam(jnp.asarray(b_RxI, jnp.float32))
        self.scaling = float(scaling)
        self.dropout = _lora_dropout(dropout, rngs, name)

    @property
    def shape(self) -> tuple[int, int]:
        """The base weight's (out, in)."""
        return self.weight_shape

    def quantized(self) -> QuantizedTensor:
        """Return the base as a `QuantizedTensor` of the current codes and scales."""
        return QuantizedTensor(
            codes=self.codes[...],
            scales=self.scales[...],
            offsets=_value(self.offsets),
            shape=self.weight_shape,
            config=self.quant_config,
        )

    def __call__(self, x_NxI: jax.Array, *, deterministic: bool = True) -> jax.Array:
        q_OxI = dequantize(self.quantized(), x_NxI.dtype)
        y = _dense(x_NxI, q_OxI, _value(self.bias))
        return y + _lora_update(self, x_NxI, deterministic)


# ---------------------------------------------------------------------------------------------------
# Shared steps


def check_adapters(name: str, shape: tuple[int, ...], a_OxR, b_RxI) -> None:
    """Raise InputError unless A is (out, r) and B is (r, in) for a weight of `shape` with r <= min(out, in)."""
    num_out, num_in = shape
    a_shape, b_shape = tuple(np.shape(a_OxR)), tuple(np.shape(b_RxI))
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise InputError(f"{name}: adapters A {a_shape} and B {b_shape} must be 2-D, (out, r) and (r, in)")
    rank = a_shape[1]
    if rank > min(num_out, num_in):
        raise InputError(f"{name}: rank {rank} exceeds min(out, in) = {min(num_out, num_in)} for shape {shape}")
    if a_shape != (num_out, rank) or b_shape != (rank, num_in):
        raise InputError(
            f"{name}: adapters A {a_shape} and B {b_shape} do not fit weight {shape}; expected "
            f"A ({num_out}, r) and B (r, {num_in})"
        )


def _lora_dropout(rate: float, rngs: Optional[nnx.Rngs], name: str) -> nnx.Dropout:
    if not 0.0 <= rate < 1.0:
        raise InputError(f"{name}: invalid LoRA dropout {rate!r}; expected a probability in [0, 1)")
    if rate > 0 and rngs is None:
        raise InputError(f"{name}: LoRA dropout {rate} needs rngs with a 'dropout' stream, e.g. nnx.Rngs(0)")
    return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


def _value(variable: Optional[nnx.Variable]) -> Optional[jax.Array]:
    return None if variable is None else variable[...]


def _flatten(x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """Reshape (..., in) to 2-D, because on CPU the backward pass of LoRA's matmuls runs slower on 3-D
    activations than on the same data flattened to (batch·length, in)."""
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def _dense(x: jax.Array, weight_OxI: jax.Array, bias_O: Optional[jax.Array]) -> jax.Array:
    x_NxI, batch_shape = _flatten(x)
    y_NxO = x_NxI @ weight_OxI.astype(x.dtype).T
    if bias_O is not None:
        y_NxO = y_NxO + bias_O.astype(x.dtype)
    return y_NxO.reshape(*batch_shape, weight_OxI.shape[0])


def _lora_update(layer, x: jax.Array, deterministic: bool) -> jax.Array:
    """Return s·(dropout(x)·Bᵀ)·Aᵀ, multiplied right to left so that no (out x in) product is formed."""
    x_NxI, batch_shape = _flatten(x)
    x_NxI = layer.dropout(x_NxI, deterministic=deterministic)
    a_OxR, b_RxI = layer.a[...].astype(x.dtype), layer.b[...].astype(x.dtype)
    update_NxO = (x_NxI @ b_RxI.T) @ a_OxR.T * layer.scaling
    return update_NxO.reshape(*batch_shape, a_OxR.shape[0])


def kaiming_uniform_b(key: jax.Array, rank: int, num_in: int) -> jax.Array:
    """Return B (r x in) uniform in ±1/√in, PEFT's default initialization of lora_A (kaiming_uniform_, a=√5).

    With A = 0 the product A·B is zero, so the layer starts as its base, but A still gets a gradient; with
    A = B = 0 neither factor would.
    """
    bound = 1.0 / math.sqrt(num_in)
    return jax.random.uniform(key, (rank, num_in), jnp.float32, -bound, bound)
