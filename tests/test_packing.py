import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loftq_jax import packing
from loftq_jax.errors import InputError


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    bit_order=st.sampled_from(["big", "little"]),
    num_codes=st.integers(1, 100),
    seed=st.integers(0, 2**31),
)
def test_pack_unpack_round_trip(bits, bit_order, num_codes, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, num_codes).astype(np.uint8)
    packed = packing.pack_codes(jnp.asarray(codes), bits, bit_order)
    assert packed.dtype == jnp.uint8
    assert packed.shape == (packing.packed_size(num_codes, bits),)
    np.testing.assert_array_equal(packing.unpack_codes(packed, bits, num_codes, bit_order), codes)


def test_big_order_puts_first_code_in_high_nibble():
    packed = packing.pack_codes(jnp.array([1, 2, 3, 4, 5, 6, 7, 8], jnp.uint8), 4, "big")
    np.testing.assert_array_equal(packed, [0x12, 0x34, 0x56, 0x78])


def test_little_order_puts_first_code_in_low_nibble():
    packed = packing.pack_codes(jnp.array([1, 2, 3, 4, 5, 6, 7, 8], jnp.uint8), 4, "little")
    np.testing.assert_array_equal(packed, [0x21, 0x43, 0x65, 0x87])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_big_order_is_msb_first_bit_stream(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, 16).astype(np.uint8)
    packed = np.asarray(packing.pack_codes(jnp.asarray(codes), bits, "big"))
    stream = np.unpackbits(packed, bitorder="big")
    code_bits = np.unpackbits(codes[:, None], axis=1, bitorder="big")[:, 8 - bits :].reshape(-1)
    np.testing.assert_array_equal(stream, code_bits)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_little_order_is_lsb_first_bit_stream(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, 16).astype(np.uint8)
    packed = np.asarray(packing.pack_codes(jnp.asarray(codes), bits, "little"))
    stream = np.unpackbits(packed, bitorder="little")
    code_bits = np.unpackbits(codes[:, None], axis=1, bitorder="little")[:, :bits].reshape(-1)
    np.testing.assert_array_equal(stream, code_bits)


@pytest.mark.parametrize(("bits", "num_codes", "expected"), [(2, 9, 4), (3, 8, 3), (3, 9, 6), (4, 7, 4), (8, 5, 5)])
def test_packed_size(bits, num_codes, expected):
    assert packing.packed_size(num_codes, bits) == expected


def test_unpack_rejects_wrong_length():
    with pytest.raises(InputError, match="have 3 bytes"):
        packing.unpack_codes(jnp.zeros(3, jnp.uint8), 4, 8)


def test_pack_rejects_unknown_order():
    with pytest.raises(InputError, match="unknown bit order 'middle'"):
        packing.pack_codes(jnp.zeros(8, jnp.uint8), 4, "middle")
