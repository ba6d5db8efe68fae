"""Export of a trained L4Q layer: the merged weight quantized once, with no adapter left.

The codes are packed with `loftq_jax.packing.pack_codes`, the byte format of `QuantizedTensor`: a
row-major bit stream of the (out, in) codes. `packing` stores only 2-, 3-, 4- and 8-bit codes, so 5- to
7-bit codes are stored one a byte, as 8-bit codes.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from loftq_jax import packing
from loftq_jax.l4q import quantizer
from loftq_jax.l4q.config import L4QConfig
from loftq_jax.l4q.linear import L4QParams, check_params, merged_weight


def storage_bits(bits: int) -> int:
    """Return the code width that `packing` stores `bits`-bit codes at."""
    return bits if bits in (2, 3, 4, 8) else 8


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales", "offsets", "bias", "weight_16"],
    meta_fields=["shape", "config"],
)
@dataclasses.dataclass(frozen=True)
class L4QExport:
    """A quantized L4Q layer: weight = codes * scale + offset per group, plus its frozen bias."""

    codes: jax.Array  # uint8, the (out, in) codes packed at storage_bits(config.bits) in config.bit_order
    scales: jax.Array  # float32 (out, groups)
    offsets: jax.Array  # float32 (out, groups)
    bias: Optional[jax.Array]  # (out,) or None
    weight_16: jax.Array  # the dequantized weight (out, in) in bfloat16 or float16
    shape: tuple[int, int]
    config: L4QConfig

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales and offsets: the packed size of the weight."""
        return sum(int(np.prod(t.shape)) * t.dtype.itemsize for t in (self.codes, self.scales, self.offsets))


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def export_params(params: L4QParams, config: L4QConfig, dtype=jnp.bfloat16) -> L4QExport:
    """Quantize the trained merged weight W0 + s·A·B once and pack its codes.

    Args:
      params: the trained layer.
      config: the layer's settings; also fixes the packing bit order.
      dtype: dtype of `weight_16`, bfloat16 or float16.

    Returns:
      An `L4QExport` whose `dequantize_export` output is the weight the trained forward multiplies by.
    """
    check_params(params, config)
    merged_OxI = merged_weight(params.base, params.a, params.b, config.scaling)
    scale_OxG, offset_OxG = params.scale.astype(jnp.float32), params.offset.astype(jnp.float32)
    codes_OxI = quantizer.quantize_codes(merged_OxI, params.scale, params.offset, config)
    packed = packing.pack_codes(codes_OxI.reshape(-1), storage_bits(config.bits), config.bit_order)
    weight_OxI = quantizer.dequantize_codes(codes_OxI, scale_OxG, offset_OxG, config)
    return L4QExport(packed, scale_OxG, offset_OxG, params.bias, weight_OxI.astype(dtype), merged_OxI.shape, config)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize_export(export: L4QExport, dtype=jnp.float32) -> jax.Array:
    """Rebuild the weight (out, in) from the packed codes, scales and offsets, in `dtype`."""
    num_codes = int(np.prod(export.shape))
    config = export.config
    codes = packing.unpack_codes(export.codes, storage_bits(config.bits), num_codes, config.bit_order)
    weight_OxI = quantizer.dequantize_codes(codes.reshape(export.shape), export.scales, export.offsets, config)
    return weight_OxI.astype(dtype)


def exported_linear(x, export: L4QExport, *, use_weight_16: bool = False) -> jax.Array:
    """Apply the exported layer, y = x @ Wᵀ + bias, to x (..., in).

    With `use_weight_16` the 16-bit `weight_16` is used. Otherwise the weight is rebuilt in float32 from
    the codes, which gives the weight that the trained forward multiplies by.
    """
    weight_OxI = export.weight_16 if use_weight_16 else dequantize_export(export)
    y = x.astype(jnp.float32) @ weight_OxI.astype(jnp.float32).T
    if export.bias is not None:
        y = y + export.bias.astype(jnp.float32)
    return y.astype(x.dtype)
