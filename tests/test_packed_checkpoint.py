import numpy as np
import pytest

from loftq_jax import LoftQConfig, dequantize, loftq
from loftq_jax.errors import InputError
from loftq_jax.packed_checkpoint import (
    PackedWeight,
    PackedWriter,
    directory_size,
    packed_abstract_tree,
    restore_packed,
    save_packed,
)


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


def _weight(seed, shape=(64, 32), layout="linear"):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    result = loftq(w, LoftQConfig(rank=2, steps=1))
    return PackedWeight(result.quantized, np.asarray(result.a), np.asarray(result.b), "F32", layout)


def test_batches_restore_whole_and_by_name(tmp_path):
    first = {"layers.0.q.weight": _weight(0), "layers.0.k.weight": _weight(1)}
    second = {"h.0.attn.c_attn.weight": _weight(2, (32, 96), "conv1d")}
    writer = PackedWriter(tmp_path / "packed")
    writer.add_batch(first)
    writer.add_batch(second)
    # Without its sidecar the folder is not yet a packed checkpoint.
    with pytest.raises(InputError, match="loftq_settings.json is missing"):
        restore_packed(tmp_path / "packed")
    writer.close()

    assert sorted(path.name for path in (tmp_path / "packed" / "arrays").iterdir()) == ["batch-00000", "batch-00001"]
    abstract = packed_abstract_tree(tmp_path / "packed")
    assert abstract["h.0.attn.c_attn.weight"]["codes"].shape == (32 * 96 // 2,)
    assert abstract["h.0.attn.c_attn.weight"]["a"].shape == (32, 2)
    assert abstract["layers.0.q.weight"]["scales"].dtype == np.float32

    restored = restore_packed(tmp_path / "packed")
    for name, weight in {**first, **second}.items():
        np.testing.assert_array_equal(restored[name].quantized.codes, weight.quantized.codes)
        np.testing.assert_array_equal(restored[name].b, weight.b)
        assert restored[name].layout == weight.layout
    only = restore_packed(tmp_path / "packed", names=["h.0.attn.c_attn.weight"])
    assert list(only) == ["h.0.attn.c_attn.weight"]
    assert only["h.0.attn.c_attn.weight"].quantized.shape == (32, 96)
    with pytest.raises(InputError, match="no weight 'nope'"):
        restore_packed(tmp_path / "packed", names=["nope"])


def test_writer_rejects_repeated_name_and_unknown_layout(tmp_path):
    writer = PackedWriter(tmp_path / "packed")
    writer.add_batch({"w": _weight(0)})
    with pytest.raises(ValueError, match="'w' is already in an earlier batch"):
        writer.add_batch({"w": _weight(1)})
    with pytest.raises(ValueError, match="unknown layout 'transposed'"):
        writer.add_batch({"v": _weight(1, layout="transposed")})
