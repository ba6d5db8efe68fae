"""Code books: the sorted values in [-1, 1] that a quantizer rounds normalized weights to.

Normal-float (NF) code books follow the LoftQ reference construction (Li et al., 2024, "LoftQ:
LoRA-Fine-Tuning-Aware Quantization for Large Language Models", arXiv 2310.08659): quantiles of the
standard normal distribution, asymmetric (one more positive value than negative), scaled to [-1, 1].
"""

import functools

import numpy as np
from scipy.stats import norm

from loftq_jax.errors import InputError

# The 16 NF4 values of bitsandbytes (bitsandbytes/functional.py, `get_4bit_type("nf4")`), used as they
# are so that NF4 codes and dequantized weights match bitsandbytes bit for bit.
NF4_BITSANDBYTES = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

NF_OFFSET = 0.9677083
SUPPORTED_BITS = (2, 3, 4, 8)
BLOCKWISE_CODEBOOKS = ("nf", "int")
CODEBOOKS = ("nf", "int", "uniform")


def check_bits(bits: int, codebook: str) -> None:
    """Raise InputError unless `codebook` is known and supports `bits`."""
    if codebook not in CODEBOOKS:
        raise InputError(f"unknown code book {codebook!r}; expected one of {', '.join(CODEBOOKS)}")
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in SUPPORTED_BITS:
        raise InputError(
            f"unsupported bits {bits!r} for code book {codebook!r}; expected one of {SUPPORTED_BITS}"
        )


@functools.cache
def nf_codebook(bits: int) -> np.ndarray:
    """Return the 2**bits normal-float values, sorted, with min -1, max 1 and an exact 0.

    For 4 bits this is bitsandbytes' NF4 table; other widths use the same quantile construction:
    2**(bits-1) positive quantiles of N(0, 1) between 0.5 and `NF_OFFSET`, 2**(bits-1) - 1 negative
    ones, and zero, all divided by the largest.
    """
    check_bits(bits, "nf")
    if bits == 4:
        return NF4_BITSANDBYTES.copy()
    levels = 2**bits
    positive = norm.ppf(np.linspace(NF_OFFSET, 0.5, levels // 2 + 1)[:-1])
    negative = -norm.ppf(np.linspace(NF_OFFSET, 0.5, levels // 2)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    return (values / values.max()).astype(np.float32)


@functools.cache
def int_codebook(bits: int) -> np.ndarray:
    """Return the 2**bits - 1 values k / (2**(bits-1) - 1), k in [-(2**(bits-1) - 1), 2**(bits-1) - 1].

    Scaled by a block's absmax this is symmetric absmax int-k quantization: round(w / s) * s with
    s = absmax / (2**(bits-1) - 1). One code of the 2**bits stays unused so that zero is exact.
    """
    check_bits(bits, "int")
    top = 2 ** (bits - 1) - 1
    return (np.arange(-top, top + 1) / top).astype(np.float32)


def codebook_values(codebook: str, bits: int) -> np.ndarray:
    """Return the values of a blockwise code book ("nf" or "int") at `bits`."""
    check_bits(bits, codebook)
    if codebook == "nf":
        return nf_codebook(bits)
    if codebook == "int":
        return int_codebook(bits)
    raise InputError(f"code book {codebook!r} has no value table; it quantizes with a per-tensor affine map")
