"""Settings of an L4Q layer and the input checks shared by its entry points."""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from loftq_jax import packing
from loftq_jax.errors import InputError

MIN_BITS, MAX_BITS = 2, 8


@dataclasses.dataclass(frozen=True)
class L4QConfig:
    """Settings of one L4Q layer; hashable, so jitted functions take it as a static argument."""

    # Bits per weight code. Codes are integers in [0, 2**bits - 1].
    bits: int = 4
    # Weights per (scale, offset) pair along the input axis of each output row. An input size that is
    # not a multiple is padded, so the last group of a row contains fewer real weights.
    group_size: int = 128
    # LoRA rank r. L4Q needs a LoRA branch, so r >= 1.
    rank: int = 16
    # LoRA scaling is alpha / rank. None means alpha = rank (scaling 1), as in LoftQConfig.
    alpha: Optional[float] = None
    # Multiply the scale and offset gradients by LSQ's 1 / sqrt(weights per group * (2**bits - 1)).
    lsq_grad_scale: bool = True
    # Order of codes inside each packed byte of an export; see `loftq_jax.packing`.
    bit_order: str = "big"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise InputError(f"invalid bits {self.bits!r}; L4Q supports integer bits from {MIN_BITS} to {MAX_BITS}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer)) or self.group_size < 1:
            raise InputError(f"invalid group size {self.group_size!r}; expected an integer >= 1")
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise InputError(
                f"invalid rank {self.rank!r}; L4Q trains a LoRA branch, so the rank must be an integer >= 1 "
                "(to quantize without adapters use loftq_jax.quantize)"
            )
        if self.alpha is not None and not (np.isfinite(self.alpha) and self.alpha > 0):
            raise InputError(f"invalid alpha {self.alpha!r}; expected a finite positive number")
        if self.bit_order not in packing.BIT_ORDERS:
            raise InputError(f"unknown bit order {self.bit_order!r}; expected one of {packing.BIT_ORDERS}")

    @property
    def max_code(self) -> int:
        return 2**self.bits - 1

    @property
    def scaling(self) -> float:
        """The LoRA scaling alpha / rank."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def num_groups(self, num_in: int) -> int:
        return -(-num_in // self.group_size)

    def grad_scale(self, num_in: int) -> float:
        """Return the factor on the scale and offset gradients: LSQ's g, or 1 without LSQ scaling."""
        if not self.lsq_grad_scale:
            return 1.0
        weights_per_group = min(self.group_size, num_in)
        return float(1.0 / np.sqrt(weights_per_group * self.max_code))


def check_weight(w, config: L4QConfig, name: str = "weight") -> None:
    """Raise InputError unless `w` is a finite floating-point matrix (out, in) that fits `config.rank`."""
    shape = tuple(np.shape(w))
    if len(shape) != 2:
        raise InputError(f"{name}: shape {shape} has {len(shape)} dimensions; expected a 2-D weight (out, in)")
    dtype = np.dtype(w.dtype) if hasattr(w, "dtype") else np.asarray(w).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise InputError(f"{name}: dtype {dtype} is not floating point; L4Q takes float32, bfloat16 or float16 weights")
    if min(shape) < 1:
        raise InputError(f"{name}: shape {shape} is empty; expected at least one output and one input")
    if config.rank > min(shape):
        raise InputError(f"{name}: rank {config.rank} exceeds min(out, in) = {min(shape)} for shape {shape}")
    if isinstance(w, jax.core.Tracer):
        return
    num_bad = int(np.prod(shape)) - int(np.isfinite(np.asarray(w, np.float32)).sum())
    if num_bad:
        raise InputError(f"{name}: {num_bad} of {int(np.prod(shape))} elements are NaN or Inf; L4Q needs finite weights")
