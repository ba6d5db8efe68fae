"""LoftQ initialization of LoRA adapters, and QLoRA as its zero-step case.

LoftQ (Li et al., 2024, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
arXiv 2310.08659, Algorithm 1) starts from A = B = 0 and alternates T steps of
    Q = dequantize(quantize(W - A·B)),    A·B = top-r SVD of (W - Q),
so that Q + A·B approximates W better than the quantized weight alone.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from loftq_jax import quantize as quantize_lib
from loftq_jax import svd as svd_lib
from loftq_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class LoftQConfig:
    """Settings of a LoftQ run; hashable, so jitted functions take it as a static argument."""

    bits: int = 4
    rank: int = 16
    # Alternating steps T; 0 gives QLoRA: Q = q(W) and A·B = 0.
    steps: int = 5
    codebook: str = "nf"
    block_size: int = 64
    # "exact" (LAPACK) or "randomized" (Halko et al.).
    svd: str = "exact"
    # LoRA scaling is alpha / rank; None means alpha = rank. The factors are divided by √(alpha / rank)
    # so that Q + (alpha / rank)·A·B equals the result at scaling 1.
    alpha: Optional[float] = None
    # Randomized SVD only: extra sampled columns, power iterations and the PRNG seed.
    oversample: int = 16
    power_iters: int = 2
    seed: int = 0
    bit_order: str = "big"
    # Also track the relative spectral-norm error after each step (one more SVD of the residual a step).
    spectral: bool = False

    def __post_init__(self):
        self.quant_config  # validates bits, code book, block size and bit order
        for name in ("rank", "steps", "oversample", "power_iters"):
            value = getattr(self, name)
            lowest = 1 if name == "rank" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise InputError(f"invalid {name} {value!r}; expected an integer >= {lowest}")
        if self.svd not in svd_lib.SVD_METHODS:
            raise InputError(f"unknown SVD method {self.svd!r}; expected one of {svd_lib.SVD_METHODS}")
        if self.alpha is not None and not (np.isfinite(self.alpha) and self.alpha > 0):
            raise InputError(f"invalid alpha {self.alpha!r}; expected a finite positive number")

    @property
    def quant_config(self) -> quantize_lib.QuantConfig:
        return quantize_lib.QuantConfig(
            bits=self.bits, codebook=self.codebook, block_size=self.block_size, bit_order=self.bit_order
        )

    @property
    def scaling(self) -> float:
        """The LoRA scaling alpha / rank."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["quantized", "q", "a", "b", "errors", "spectral_errors"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class LoftQResult:
    """Output of `loftq` for one weight W (out x in)."""

    quantized: quantize_lib.QuantizedTensor  # Q as packed codes and scales
    q: jax.Array  # Q dequantized, (out, in)
    a: jax.Array  # (out, rank)
    b: jax.Array  # (rank, in)
    # ||W - Q - s·A·B||_F / ||W||_F: entry 0 is QLoRA (A·B = 0), entry t the error after step t.
    errors: jax.Array  # float32 (steps + 1,)
    spectral_errors: Optional[jax.Array]  # the same in spectral norm, or None unless config.spectral


def spectral_norm(m: jax.Array) -> jax.Array:
    """Return the largest singular value of `m` as √(largest eigenvalue of its smaller Gram matrix).

    A symmetric eigensolver on the min(out, in)-sized Gram matrix costs less than the SVD behind
    `jnp.linalg.norm(m, 2)`. Squaring keeps the largest singular value to float32 relative precision.
    """
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    return jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(gram)[-1], 0.0))


def relative_error(w: jax.Array, approx: jax.Array, ord="fro") -> jax.Array:
    """Return ||w - approx|| / ||w|| in the Frobenius ("fro") or spectral (2) norm; 0 / 0 counts as 0."""
    if ord == 2:
        residual_norm, weight_norm = spectral_norm(w - approx), spectral_norm(w)
    else:
        residual_norm, weight_norm = jnp.linalg.norm(w - approx, ord=ord), jnp.linalg.norm(w, ord=ord)
    return residual_norm / jnp.where(weight_norm == 0, 1.0, weight_norm)


def _errors(w, approx, config: LoftQConfig):
    spectral = relative_error(w, approx, 2) if config.spectral else None
    return relative_error(w, approx), spectral


def loftq_unchecked(w: jax.Array, config: LoftQConfig, out_dtype=None, *, key: jax.Array | None = None) -> LoftQResult:
    """Run LoftQ on one weight without input checks: pure, jit-able and vmap-able.

    Computes in float32 whatever the input dtype; returns Q, A and B in `out_dtype` (default: w's dtype).
    `key` seeds the randomized SVD's sketches (default: `jax.random.key(config.seed)`); step t uses
    `fold_in(key, t)`. Under vmap, pass one key per weight so that weights do not share sketches.
    """
    out_dtype = w.dtype if out_dtype is None else out_dtype
    w = w.astype(jnp.float32)
    num_out, num_in = w.shape
    quant_config = config.quant_config
    key = jax.random.key(config.seed) if key is None else key

    def factorize(residual, step):
        return svd_lib.low_rank(
            residual,
            config.rank,
            config.svd,
            key=jax.random.fold_in(key, step),
            oversample=config.oversample,
            power_iters=config.power_iters,
        )

    def step_fn(carry, step):
        a, b, _ = carry
        quant_input = w - a @ b
        q = quantize_lib.fake_quant(quant_input, quant_config)
        a, b = factorize(w - q, step)
        return (a, b, quant_input), _errors(w, q + a @ b, config)

    zeros_a = jnp.zeros((num_out, config.rank), jnp.float32)
    zeros_b = jnp.zeros((config.rank, num_in), jnp.float32)
    (a, b, quant_input), step_errors = jax.lax.scan(
        step_fn, (zeros_a, zeros_b, w), jnp.arange(config.steps)
    )

    # The last step's Q is rebuilt from packed codes; fake_quant matches dequantize exactly.
    quantized = quantize_lib.quantize(quant_input, quant_config)
    q = quantize_lib.dequantize(quantized)
    qlora_errors = _errors(w, quantize_lib.fake_quant(w, quant_config), config)
    errors = jnp.concatenate([qlora_errors[0][None], step_errors[0]])
    spectral_errors = None
    if config.spectral:
        spectral_errors = jnp.concatenate([qlora_errors[1][None], step_errors[1]])

    root_scaling = np.float32(np.sqrt(config.scaling))
    return LoftQResult(
        quantized=quantized,
        q=q.astype(out_dtype),
        a=(a / root_scaling).astype(out_dtype),
        b=(b / root_scaling).astype(out_dtype),
        errors=errors,
        spectral_errors=spectral_errors,
    )


_loftq_jit = jax.jit(loftq_unchecked, static_argnames=("config", "out_dtype"))
_loftq_batched_jit = jax.jit(
    jax.vmap(loftq_unchecked, in_axes=(0, None, None)), static_argnames=("config", "out_dtype")
)


def check_weight(w, config: LoftQConfig, name: str = "weight", *, batched: bool = False) -> None:
    """Raise InputError unless `w` is a finite floating-point matrix (or stack of them) for `config`."""
    shape = tuple(np.shape(w))
    dtype = np.dtype(w.dtype) if hasattr(w, "dtype") else np.asarray(w).dtype
    expected_ndim = 3 if batched else 2
    if len(shape) != expected_ndim:
        kind = "a stack (num, out, in) of 2-D weights" if batched else "a 2-D weight (out, in)"
        raise InputError(f"{name}: shape {shape} has {len(shape)} dimensions; expected {kind}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise InputError(
            f"{name}: dtype {dtype} is not floating point; LoftQ takes float32, bfloat16 or float16 "
            "weights, not integer or already packed codes"
        )
    max_rank = min(shape[-2:])
    if config.rank > max_rank:
        raise InputError(f"{name}: rank {config.rank} exceeds min(out, in) = {max_rank} for shape {shape}")
    if isinstance(w, jax.core.Tracer):
        return
    num_finite = int(jnp.isfinite(w).sum()) if isinstance(w, jax.Array) else int(np.isfinite(w).sum())
    if num_finite != int(np.prod(shape)):
        num_bad = int(np.prod(shape)) - num_finite
        raise InputError(f"{name}: {num_bad} of {int(np.prod(shape))} elements are NaN or Inf; LoftQ needs finite weights")


def loftq(
    w: jax.Array, config: LoftQConfig = LoftQConfig(), *, name: str = "weight", out_dtype=None, key: jax.Array | None = None
) -> LoftQResult:
    """Check `w` and run LoftQ on it, compiled once per (shape, dtype, config).

    Args:
      w: weight (out, in) in float32, bfloat16 or float16.
      config: quantizer, rank, steps and SVD settings.
      name: tensor name used in error messages.
      out_dtype: dtype of Q, A and B; defaults to w's dtype.
      key: PRNG key of the randomized SVD; defaults to `jax.random.key(config.seed)`.

    Returns:
      A `LoftQResult` whose `errors` contains the relative Frobenius error after every step.

    Raises:
      InputError: `w` is not a finite floating-point matrix, or `config.rank` exceeds min(out, in).

    References:
      Li et al., 2024, LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models, arXiv 2310.08659.
    """
    check_weight(w, config, name)
    return _loftq_jit(jnp.asarray(w), config, out_dtype, key=key)


def loftq_batched(ws: jax.Array, config: LoftQConfig = LoftQConfig(), *, name: str = "weights", out_dtype=None) -> LoftQResult:
    """Run `loftq` on a stack (num, out, in) of same-shape weights; every result field gains a leading axis."""
    check_weight(ws, config, name, batched=True)
    return _loftq_batched_jit(jnp.asarray(ws), config, out_dtype)
