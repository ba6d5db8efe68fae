"""Bit packing of quantization codes into uint8 arrays.

Codes of `bits` in {2, 3, 4} are packed as a bit stream, 8 codes to `bits` bytes; 8-bit codes are stored
one a byte. With `bit_order="big"` (the default) the first code sits in the most significant bits, which
at 4 bits puts the first element in the high nibble, as bitsandbytes stores NF4. With `bit_order="little"`
the first code sits in the least significant bits, as `numpy.packbits(..., bitorder="little")` orders bits.
"""

import jax.numpy as jnp

from loftq_jax.errors import InputError

BIT_ORDERS = ("big", "little")
_CODES_PER_GROUP = 8


def packed_size(num_codes: int, bits: int) -> int:
    """Return the number of bytes that `num_codes` codes of `bits` pack into."""
    if bits == 8:
        return num_codes
    num_groups = -(-num_codes // _CODES_PER_GROUP)
    return num_groups * bits


def pack_codes(codes: jnp.ndarray, bits: int, bit_order: str = "big") -> jnp.ndarray:
    """Pack a 1-D array of codes in [0, 2**bits) into a 1-D uint8 array of `packed_size` bytes.

    The tail is padded with zero codes up to a multiple of 8 codes.
    """
    _check(bits, bit_order)
    codes = codes.astype(jnp.uint32)
    if bits == 8:
        return codes.astype(jnp.uint8)

    pad = -codes.shape[0] % _CODES_PER_GROUP
    groups_Gx8 = jnp.pad(codes, (0, pad)).reshape(-1, _CODES_PER_GROUP)

    # Each group of 8 codes forms one word of 8 * bits <= 32 bits, split into `bits` bytes.
    positions = jnp.arange(_CODES_PER_GROUP, dtype=jnp.uint32)
    byte_index = jnp.arange(bits, dtype=jnp.uint32)
    if bit_order == "big":
        code_shifts = bits * (_CODES_PER_GROUP - 1 - positions)
        byte_shifts = 8 * (bits - 1 - byte_index)
    else:
        code_shifts = bits * positions
        byte_shifts = 8 * byte_index
    words_G = jnp.sum(groups_Gx8 << code_shifts, axis=1, dtype=jnp.uint32)
    bytes_GxB = (words_G[:, None] >> byte_shifts) & 0xFF
    return bytes_GxB.astype(jnp.uint8).reshape(-1)


def unpack_codes(packed: jnp.ndarray, bits: int, num_codes: int, bit_order: str = "big") -> jnp.ndarray:
    """Invert `pack_codes`: return the first `num_codes` codes as a uint8 array."""
    _check(bits, bit_order)
    if packed.shape[-1] != packed_size(num_codes, bits):
        raise InputError(
            f"packed codes have {packed.shape[-1]} bytes; {num_codes} codes of {bits} bits need "
            f"{packed_size(num_codes, bits)}"
        )
    if bits == 8:
        return packed[:num_codes]

    bytes_GxB = packed.astype(jnp.uint32).reshape(-1, bits)
    positions = jnp.arange(_CODES_PER_GROUP, dtype=jnp.uint32)
    byte_index = jnp.arange(bits, dtype=jnp.uint32)
    if bit_order == "big":
        code_shifts = bits * (_CODES_PER_GROUP - 1 - positions)
        byte_shifts = 8 * (bits - 1 - byte_index)
    else:
        code_shifts = bits * positions
        byte_shifts = 8 * byte_index
    words_G = jnp.sum(bytes_GxB << byte_shifts, axis=1, dtype=jnp.uint32)
    codes_Gx8 = (words_G[:, None] >> code_shifts) & (2**bits - 1)
    return codes_Gx8.astype(jnp.uint8).reshape(-1)[:num_codes]


def _check(bits: int, bit_order: str) -> None:
    if bits not in (2, 3, 4, 8):
        raise InputError(f"cannot pack {bits}-bit codes; expected bits in (2, 3, 4, 8)")
    if bit_order not in BIT_ORDERS:
        raise InputError(f"unknown bit order {bit_order!r}; expected 'big' or 'little'")
