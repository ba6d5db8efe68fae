import numpy as np
import pytest

from loftq_jax import LoftQConfig, dequantize, loftq
from loftq_jax.errors import InputError
from loftq_jax.packed_checkpoint import PackedWeight, directory_size, restore_packed, save_packed


def test_round_trip_is_exact(tmp_path):
    w = np.random.default_rng(0).standard_normal((128, 96)).astype(np.float32)
    weights = {}
    for codebook, bits in (("nf", 4), ("int", 3), ("uniform", 2)):
        result = loftq(w, LoftQConfig(codebook=codebook, bits=bits, rank=4, steps=1))
        weights[f"layers.{codebook}.weight"] = PackedWeight(result.quantized, np.asarray(result.a), np.asarray(result.b), "float32")

    save_packed(tmp_path / "packed", weights)
    restored = restore_packed(tmp_path / "packed")

    assert sorted(restored) == sorted(weights)
    for name, weight in weights.items():
        back = restored[name]
        assert back.quantized.config == weight.quantized.config
        assert back.quantized.shape == (128, 96)
        np.testing.assert_array_equal(back.quantized.codes, weight.quantized.codes)
        np.testing.assert_array_equal(back.quantized.scales, weight.quantized.scales)
        np.testing.assert_array_equal(back.a, weight.a)
        np.testing.assert_array_equal(back.b, weight.b)
        np.testing.assert_array_equal(dequantize(back.quantized), dequantize(weight.quantized))


def test_packed_size_is_near_four_bits(tmp_path):
    w = np.random.default_rng(1).standard_normal((512, 512)).astype(np.float32)
    result = loftq(w, LoftQConfig(rank=1, steps=0))
    save_packed(tmp_path / "packed", {"w": PackedWeight(result.quantized, np.asarray(result.a), np.asarray(result.b), "float32")})
    # NF4 with a float32 scale per 64 elements is 4.5 bits an element; orbax adds metadata files.
    assert directory_size(tmp_path / "packed") < 512 * 512 * 4.5 / 8 + 2 * 512 * 4 + 64 * 1024


def test_restore_rejects_other_folder(tmp_path):
    with pytest.raises(InputError, match="not a packed LoftQ checkpoint"):
        restore_packed(tmp_path)
