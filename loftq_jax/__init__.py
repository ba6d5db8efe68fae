"""loftq-jax: LoftQ and QLoRA initialization of LoRA adapters for quantized models, in JAX."""

from loftq_jax.errors import InputError
from loftq_jax.loftq import LoftQConfig, LoftQResult, loftq, loftq_batched, loftq_unchecked, relative_error
from loftq_jax.packing import pack_codes, unpack_codes
from loftq_jax.quantize import QuantConfig, QuantizedTensor, dequantize, fake_quant, quantize

__all__ = [
    "InputError",
    "LoftQConfig",
    "LoftQResult",
    "QuantConfig",
    "QuantizedTensor",
    "dequantize",
    "fake_quant",
    "loftq",
    "loftq_batched",
    "loftq_unchecked",
    "pack_codes",
    "quantize",
    "relative_error",
    "unpack_codes",
]
