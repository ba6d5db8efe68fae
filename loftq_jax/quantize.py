"""Weight quantization: blockwise absmax code books (NF, int) and a per-tensor affine uniform quantizer.

Blockwise quantizers split the row-major flattened weight into blocks of `block_size` elements, divide each
block by its absmax and round every element to the nearest code book value. A weight whose size is not a
multiple of the block size is padded with zeros, which never change a block's absmax, so the partial block's
scale covers only real elements.

The "uniform" quantizer is the per-tensor affine scheme of LoftQ's DeBERTa experiments: clip the weight to
[mean - c·std, mean + c·std] (c = `clip_std`, default 2) intersected with [min, max], then spread 2**bits
evenly spaced levels over that range.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from loftq_jax import codebooks, packing
from loftq_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Settings of one quantizer; hashable, so jitted functions take it as a static argument."""

    bits: int = 4
    # "nf" (normal float) or "int" (symmetric absmax) per block, or "uniform" (affine, per tensor).
    codebook: str = "nf"
    # Elements per absmax block along the row-major flattened weight; unused by "uniform".
    block_size: int = 64
    # Order of codes inside each packed byte; see `loftq_jax.packing`.
    bit_order: str = "big"
    # "uniform" only: clip range in standard deviations around the mean.
    clip_std: float = 2.0

    def __post_init__(self):
        codebooks.check_bits(self.bits, self.codebook)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise InputError(f"invalid block size {self.block_size!r}; expected an integer >= 1")
        if self.bit_order not in packing.BIT_ORDERS:
            raise InputError(f"unknown bit order {self.bit_order!r}; expected one of {packing.BIT_ORDERS}")
        if not self.clip_std > 0:
            raise InputError(f"invalid clip_std {self.clip_std!r}; expected a positive number of standard deviations")

    @property
    def blockwise(self) -> bool:
        return self.codebook in codebooks.BLOCKWISE_CODEBOOKS

    def values(self) -> np.ndarray:
        """Return the code book values in [-1, 1] of a blockwise quantizer."""
        return codebooks.codebook_values(self.codebook, self.bits)

    def num_blocks(self, shape: tuple[int, ...]) -> int:
        """Return how many scales a weight of `shape` needs."""
        if not self.blockwise:
            return 1
        return -(-int(np.prod(shape)) // self.block_size)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scales", "offsets"], meta_fields=["shape", "config"])
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A quantized weight: packed codes plus what `dequantize` needs to rebuild it.

    Blockwise code books store one absmax scale a block and no offsets; dequantized value =
    values[code] * scale. The uniform quantizer stores one step size and one offset (the low end of
    the clip range); dequantized value = offset + code * scale.
    """

    codes: jax.Array  # uint8, packed as `packing.pack_codes` with config.bits and config.bit_order
    scales: jax.Array  # float32 (num_blocks,)
    offsets: Optional[jax.Array]  # float32 (1,) for "uniform", None for blockwise code books
    shape: tuple[int, ...]
    config: QuantConfig

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales and offsets: the packed size of the weight in memory or on disk."""
        leaves = jax.tree_util.tree_leaves(self)
        return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in leaves)


# ---------------------------------------------------------------------------------------------------
# Nearest code search


def nearest_codes(x: jax.Array, values: np.ndarray) -> jax.Array:
    """Return, per element of `x`, the index of the nearest of the sorted `values` as uint8.

    A tie between two values goes to the lower one, as an argmin over distances does. The search compares
    against the midpoints between values, so it never builds an (elements x values) distance tensor.
    """
    midpoints = (values[1:].astype(np.float64) + values[:-1]) / 2
    if len(values) <= 16:
        count = jnp.zeros(x.shape, jnp.uint8)
        for midpoint in midpoints.astype(np.float32):
            count = count + (x > midpoint).astype(jnp.uint8)
        return count
    return _binary_search(x, midpoints.astype(np.float32))


def _binary_search(x: jax.Array, midpoints: np.ndarray) -> jax.Array:
    """Count the midpoints below each element of `x` in log2(len) gather steps."""
    depth = int(np.ceil(np.log2(len(midpoints) + 1)))
    table = np.full(2**depth - 1, np.inf, np.float32)
    table[: len(midpoints)] = midpoints
    step = 2 ** (depth - 1)

    # The first comparison is against one scalar for every element, so it needs no gather.
    index = jnp.where(x > table[step - 1], step, 0).astype(jnp.int32)
    table = jnp.asarray(table)
    while step > 1:
        step //= 2
        index = index + jnp.where(x > table[index + step - 1], step, 0)
    return index.astype(jnp.uint8)


def _round_to_values(x: jax.Array, values: np.ndarray) -> jax.Array:
    """Return the nearest code book value of each element of `x`, without materializing codes."""
    if len(values) > 16:
        return jnp.asarray(values)[nearest_codes(x, values)]
    # A chain of selects, one per midpoint, gives values[code] exactly, as `dequantize` does.
    midpoints = ((values[1:].astype(np.float64) + values[:-1]) / 2).astype(np.float32)
    rounded = jnp.full(x.shape, values[0], jnp.float32)
    for midpoint, value in zip(midpoints, values[1:]):
        rounded = jnp.where(x > midpoint, value, rounded)
    return rounded


# ---------------------------------------------------------------------------------------------------
# Blockwise absmax


def _to_blocks(w: jax.Array, block_size: int) -> jax.Array:
    flat = w.reshape(-1).astype(jnp.float32)
    pad = -flat.shape[0] % block_size
    return jnp.pad(flat, (0, pad)).reshape(-1, block_size)


def _from_blocks(blocks_NxB: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return blocks_NxB.reshape(-1)[: int(np.prod(shape))].reshape(shape)


def _absmax(blocks_NxB: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return each block's absmax, and the same with zeros replaced by 1 so that division is safe."""
    scales_N = jnp.max(jnp.abs(blocks_NxB), axis=1)
    return scales_N, jnp.where(scales_N == 0, 1.0, scales_N)


# ---------------------------------------------------------------------------------------------------
# Per-tensor affine ("uniform")


def _affine_range(w: jax.Array, config: QuantConfig) -> tuple[jax.Array, jax.Array]:
    """Return the clip range's low end and the step between the 2**bits levels."""
    w = w.astype(jnp.float32)
    mean, std = jnp.mean(w), jnp.std(w)
    low = jnp.maximum(jnp.min(w), mean - config.clip_std * std)
    high = jnp.minimum(jnp.max(w), mean + config.clip_std * std)
    step = (high - low) / (2**config.bits - 1)
    return low, jnp.where(step == 0, 1.0, step)


def _affine_codes(w: jax.Array, low: jax.Array, step: jax.Array, bits: int) -> jax.Array:
    return jnp.clip(jnp.round((w.astype(jnp.float32) - low) / step), 0, 2**bits - 1)


# ---------------------------------------------------------------------------------------------------
# Public entry points


@functools.partial(jax.jit, static_argnames="config")
def quantize(w: jax.Array, config: QuantConfig = QuantConfig()) -> QuantizedTensor:
    """Quantize `w` and pack its codes into uint8."""
    if config.blockwise:
        blocks_NxB = _to_blocks(w, config.block_size)
        scales_N, safe_scales_N = _absmax(blocks_NxB)
        codes = nearest_codes(blocks_NxB / safe_scales_N[:, None], config.values())
        codes = codes.reshape(-1)[: int(np.prod(w.shape))]
        offsets = None
    else:
        low, step = _affine_range(w, config)
        codes = _affine_codes(w, low, step, config.bits).reshape(-1)
        scales_N, offsets = step[None], low[None]
    packed = packing.pack_codes(codes, config.bits, config.bit_order)
    return QuantizedTensor(packed, scales_N.astype(jnp.float32), offsets, tuple(w.shape), config)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(qt: QuantizedTensor, dtype=jnp.float32) -> jax.Array:
    """Rebuild the quantized weight from its packed codes, in `dtype`."""
    config, num_codes = qt.config, int(np.prod(qt.shape))
    codes = packing.unpack_codes(qt.codes, config.bits, num_codes, config.bit_order)
    if not config.blockwise:
        w = qt.offsets[0] + codes.astype(jnp.float32) * qt.scales[0]
        return w.reshape(qt.shape).astype(dtype)

    values = jnp.asarray(config.values())[codes]
    pad = -num_codes % config.block_size
    blocks_NxB = jnp.pad(values, (0, pad)).reshape(-1, config.block_size)
    return _from_blocks(blocks_NxB * qt.scales[:, None], qt.shape).astype(dtype)


@functools.partial(jax.jit, static_argnames="config")
def fake_quant(w: jax.Array, config: QuantConfig = QuantConfig()) -> jax.Array:
    """Return dequantize(quantize(w)) in float32, fused into one pass without packing."""
    if not config.blockwise:
        low, step = _affine_range(w, config)
        return low + _affine_codes(w, low, step, config.bits) * step

    blocks_NxB = _to_blocks(w, config.block_size)
    scales_N, safe_scales_N = _absmax(blocks_NxB)
    rounded_NxB = _round_to_values(blocks_NxB / safe_scales_N[:, None], config.values())
    return _from_blocks(rounded_NxB * scales_N[:, None], w.shape)
