"""Tests of the PEFT adapter layout, the streaming safetensors writer and the staged output folder."""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from loftq_jax import peft_export
from loftq_jax.errors import InputError

# The keys that PEFT 0.12's LoraConfig.to_dict() writes to adapter_config.json. PEFT before 0.13 raises
# TypeError on any other top-level key, so the file must contain exactly these.
PEFT_0_12_LORA_KEYS = {
    "alpha_pattern",
    "auto_mapping",
    "base_model_name_or_path",
    "bias",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "layer_replication",
    "layers_pattern",
    "layers_to_transform",
    "loftq_config",
    "lora_alpha",
    "lora_dropout",
    "megatron_config",
    "megatron_core",
    "modules_to_save",
    "peft_type",
    "r",
    "rank_pattern",
    "revision",
    "target_modules",
    "task_type",
    "use_dora",
    "use_rslora",
}


# ---------------------------------------------------------------------------------------------------
# PEFT layout


def test_lora_keys_follow_peft_layout():
    key_a, key_b = peft_export.lora_keys("encoder.layer.0.attention.self.query")
    assert key_a == "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
    assert key_b == "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"


def test_lora_tensors_swap_factors():
    rng = np.random.default_rng(0)
    a_OxR = rng.standard_normal((6, 2)).astype(np.float32)
    b_RxI = rng.standard_normal((2, 5)).astype(np.float32)
    tensors = peft_export.lora_tensors("mlp.fc", a_OxR, b_RxI)
    lora_a = tensors["base_model.model.mlp.fc.lora_A.weight"]
    lora_b = tensors["base_model.model.mlp.fc.lora_B.weight"]
    assert lora_a.shape == (2, 5)
    assert lora_b.shape == (6, 2)
    # PEFT's update is lora_B @ lora_A, which must equal our A @ B.
    np.testing.assert_array_equal(lora_b @ lora_a, a_OxR @ b_RxI)


def test_lora_tensors_transpose_for_fan_in_fan_out():
    rng = np.random.default_rng(0)
    # A Conv1D weight stored (in 5, out 6) and our factors of it in that layout.
    a_IxR = rng.standard_normal((5, 2)).astype(np.float32)
    b_RxO = rng.standard_normal((2, 6)).astype(np.float32)
    tensors = peft_export.lora_tensors("h.0.attn.c_attn", a_IxR, b_RxO, fan_in_fan_out=True)
    lora_a = tensors["base_model.model.h.0.attn.c_attn.lora_A.weight"]
    lora_b = tensors["base_model.model.h.0.attn.c_attn.lora_B.weight"]
    # PEFT's lora_A is (r, in) and lora_B (out, r) for Conv1D too; it adds (lora_B @ lora_A).T to the weight.
    assert lora_a.shape == (2, 5)
    assert lora_b.shape == (6, 2)
    np.testing.assert_allclose((lora_b @ lora_a).T, a_IxR @ b_RxO, rtol=1e-6)


def test_lora_tensors_reject_mismatched_rank():
    with pytest.raises(ValueError, match="mlp.fc"):
        peft_export.lora_tensors("mlp.fc", np.zeros((6, 2)), np.zeros((3, 5)))


def test_adapter_config_has_peft_keys_and_values():
    config = peft_export.adapter_config(
        rank=8,
        alpha=16.0,
        target_modules=["a.q", "a.v"],
        base_model_name_or_path="/models/out",
        loftq_settings={"loftq_bits": 4, "loftq_iter": 5, "codebook": "nf"},
    )
    assert set(config) == PEFT_0_12_LORA_KEYS
    assert config["peft_type"] == "LORA"
    assert config["r"] == 8
    assert config["lora_alpha"] == 16
    assert isinstance(config["lora_alpha"], int)
    assert config["target_modules"] == ["a.q", "a.v"]
    assert config["base_model_name_or_path"] == "/models/out"
    assert config["init_lora_weights"] is True
    assert config["lora_dropout"] == 0.0
    assert config["bias"] == "none"
    assert config["fan_in_fan_out"] is False
    assert config["use_rslora"] is False
    assert config["use_dora"] is False
    assert config["task_type"] is None
    assert config["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 5, "codebook": "nf"}
    assert config["auto_mapping"] is None
    json.dumps(config, allow_nan=False)


def test_adapter_config_auto_mapping_names_model_class():
    config = peft_export.adapter_config(
        rank=4, alpha=4, target_modules=["q"], base_model_name_or_path="m", loftq_settings={}, base_model_class="BertModel"
    )
    assert config["auto_mapping"] == {"base_model_class": "BertModel", "parent_library": "transformers"}


def test_adapter_config_fan_in_fan_out():
    config = peft_export.adapter_config(
        rank=4, alpha=4, target_modules=["c_attn"], base_model_name_or_path="m", loftq_settings={}, fan_in_fan_out=True
    )
    assert config["fan_in_fan_out"] is True
    assert set(config) == PEFT_0_12_LORA_KEYS


def test_adapter_config_keeps_fractional_alpha():
    config = peft_export.adapter_config(
        rank=4, alpha=6.5, target_modules=["q"], base_model_name_or_path="m", loftq_settings={}
    )
    assert config["lora_alpha"] == 6.5


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf"), float("nan")])
def test_adapter_config_rejects_invalid_alpha(alpha):
    with pytest.raises(ValueError, match="invalid alpha"):
        peft_export.adapter_config(rank=4, alpha=alpha, target_modules=["q"], base_model_name_or_path="m", loftq_settings={})


# ---------------------------------------------------------------------------------------------------
# Safetensors reading and writing


def _sample_tensors():
    rng = np.random.default_rng(1)
    return {
        "w32": rng.standard_normal((3, 5)).astype(np.float32),
        "wbf16": rng.standard_normal((4, 3)).astype(ml_dtypes.bfloat16),
        "ids": np.arange(7, dtype=np.int64).reshape(1, 7),
        "flag": np.array([True, False, True]),
        "h": rng.standard_normal(5).astype(np.float16),
    }


def test_read_header_matches_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = _sample_tensors()
    save_file(tensors, str(path), metadata={"format": "pt"})
    header, metadata, data_start = peft_export.read_safetensors_header(path)
    assert metadata == {"format": "pt"}
    assert set(header) == set(tensors)
    raw = path.read_bytes()
    for name, array in tensors.items():
        begin, end = header[name]["data_offsets"]
        assert raw[data_start + begin : data_start + end] == array.tobytes(), name
        assert header[name]["shape"] == list(array.shape)


def test_read_header_rejects_truncated_header(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": np.ones((2, 2), np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(InputError, match="truncated"):
        peft_export.read_safetensors_header(path)


def test_writer_round_trips_every_dtype(tmp_path):
    source = tmp_path / "source.safetensors"
    tensors = _sample_tensors()
    save_file(tensors, str(source))
    header, _, data_start = peft_export.read_safetensors_header(source)
    layout = [
        (name, header[name]["dtype"], header[name]["shape"], header[name]["data_offsets"][1] - header[name]["data_offsets"][0])
        for name in ["w32", "wbf16", "ids", "flag", "h"]
    ]

    path = tmp_path / "out.safetensors"
    with peft_export.SafetensorsWriter(path, layout, {"format": "pt"}) as writer:
        writer.write_array("w32", tensors["w32"])
        writer.write_array("wbf16", tensors["wbf16"])
        writer.copy_from("ids", source, data_start, header["ids"])
        writer.write_array("flag", tensors["flag"])
        writer.copy_from("h", source, data_start, header["h"])

    (header_length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert header_length % 8 == 0
    with safe_open(str(path), "numpy") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert set(handle.keys()) == set(tensors)
        for name, array in tensors.items():
            loaded = handle.get_tensor(name)
            assert loaded.dtype == array.dtype, name
            assert loaded.tobytes() == array.tobytes(), name


def test_writer_rejects_out_of_order_tensor(tmp_path):
    layout = [("a", "F32", (2,), 8), ("b", "F32", (2,), 8)]
    with pytest.raises(ValueError, match="out of order; expected 'a'"):
        with peft_export.SafetensorsWriter(tmp_path / "x.safetensors", layout, None) as writer:
            writer.write_array("b", np.zeros(2, np.float32))
    # A failed write leaves neither the file nor its temporary.
    assert list(tmp_path.iterdir()) == []


def test_writer_file_appears_only_when_complete(tmp_path):
    layout = [("a", "F32", (2,), 8), ("b", "F32", (2,), 8)]
    path = tmp_path / "x.safetensors"
    with peft_export.SafetensorsWriter(path, layout, None) as writer:
        writer.write_array("a", np.zeros(2, np.float32))
        assert not path.exists()
        writer.write_array("b", np.ones(2, np.float32))
    assert [entry.name for entry in tmp_path.iterdir()] == ["x.safetensors"]
    with safe_open(str(path), "numpy") as handle:
        np.testing.assert_array_equal(handle.get_tensor("b"), np.ones(2, np.float32))


def test_writer_rejects_wrong_byte_size(tmp_path):
    layout = [("a", "F32", (2,), 8)]
    with pytest.raises(ValueError, match="has 12 bytes; expected 8 from the layout"):
        with peft_export.SafetensorsWriter(tmp_path / "x.safetensors", layout, None) as writer:
            writer.write_array("a", np.zeros(3, np.float32))


def test_writer_rejects_missing_tensor(tmp_path):
    layout = [("a", "F32", (2,), 8), ("b", "F32", (2,), 8)]
    with pytest.raises(ValueError, match="1 tensors never written, first 'b'"):
        with peft_export.SafetensorsWriter(tmp_path / "x.safetensors", layout, None) as writer:
            writer.write_array("a", np.zeros(2, np.float32))


@pytest.mark.parametrize("dtype, bits", [("F32", 32), ("BF16", 16), ("F8_E4M3", 8), ("I64", 64), ("BOOL", 8)])
def test_dtype_bits(dtype, bits):
    assert peft_export.dtype_bits(dtype) == bits


# ---------------------------------------------------------------------------------------------------
# Output folder


def test_check_output_dir_accepts_absent_and_empty(tmp_path):
    peft_export.check_output_dir(tmp_path / "new", overwrite=False)
    (tmp_path / "empty").mkdir()
    peft_export.check_output_dir(tmp_path / "empty", overwrite=False)


def test_check_output_dir_rejects_non_empty_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="not empty; pass --overwrite"):
        peft_export.check_output_dir(tmp_path / "out", overwrite=False)
    peft_export.check_output_dir(tmp_path / "out", overwrite=True)


def test_check_output_dir_accepts_non_empty_with_resume(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".loftq-parts").mkdir()
    peft_export.check_output_dir(tmp_path / "out", overwrite=False, resume=True)


def test_atomic_path_replaces_only_on_success(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with peft_export.atomic_path(path) as temporary:
            temporary.write_text("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [entry.name for entry in tmp_path.iterdir()] == ["a.json"]

    with peft_export.atomic_path(path) as temporary:
        assert temporary.parent == tmp_path
        temporary.write_text("new")
        assert path.read_text() == "old"
    assert path.read_text() == "new"
    assert [entry.name for entry in tmp_path.iterdir()] == ["a.json"]


def test_publish_replaces_whole_folders_and_removes_names(tmp_path):
    staging, out = tmp_path / "staging", tmp_path / "out"
    (staging / "packed" / "arrays").mkdir(parents=True)
    (staging / "packed" / "arrays" / "new.bin").write_text("new")
    (staging / "adapter_config.json").write_text("new")
    (out / "packed" / "arrays").mkdir(parents=True)
    (out / "packed" / "arrays" / "old.bin").write_text("old")
    (out / "model.safetensors").write_text("stale")
    (out / "notes.txt").write_text("keep")

    peft_export.publish(staging, out, last=["adapter_config.json"], whole_folders=["packed"], remove=["model.safetensors"])
    assert sorted(path.name for path in (out / "packed" / "arrays").iterdir()) == ["new.bin"]
    assert sorted(path.name for path in out.iterdir()) == ["adapter_config.json", "notes.txt", "packed"]
    assert (out / "adapter_config.json").read_text() == "new"


def test_check_output_dir_rejects_file(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(InputError, match="not a folder"):
        peft_export.check_output_dir(tmp_path / "out", overwrite=True)


def test_check_output_dir_rejects_input_folder(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for out in (model, model / "sub"):
        with pytest.raises(InputError, match="must not be the input folder"):
            peft_export.check_output_dir(out, overwrite=True, protected=[model])


def _siblings(path):
    return sorted(entry.name for entry in path.parent.iterdir())


def test_staged_output_creates_folder_at_end(tmp_path):
    out = tmp_path / "out"
    with peft_export.staged_output(out) as staging:
        assert staging.parent == tmp_path
        (staging / "a.txt").write_text("a")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.txt").write_text("b")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "a"
    assert (out / "sub" / "b.txt").read_text() == "b"
    assert _siblings(out) == ["out"]


def test_staged_output_folder_gets_umask_permissions(tmp_path):
    out = tmp_path / "out"
    with peft_export.staged_output(out) as staging:
        (staging / "a.txt").write_text("a")
    assert out.stat().st_mode & 0o777 == 0o777 & ~peft_export.current_umask()


def test_staged_output_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with peft_export.staged_output(out) as staging:
            (staging / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert _siblings(out) == []


def test_staged_output_error_keeps_existing_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with peft_export.staged_output(out, last=["adapter_config.json"]) as staging:
            (staging / "adapter_config.json").write_text("new")
            raise RuntimeError("boom")
    assert (out / "adapter_config.json").read_text() == "old"
    assert _siblings(out) == ["out"]


def test_staged_output_merges_into_existing_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    (out / "model.safetensors").write_text("old")
    (out / "adapter_config.json").write_text("old")

    moved = []
    real_replace = os.replace

    def recording_replace(source, target):
        moved.append(os.path.basename(target))
        real_replace(source, target)

    monkeypatch.setattr(peft_export.os, "replace", recording_replace)
    with peft_export.staged_output(out, last=["adapter_config.json"]) as staging:
        for name in ("adapter_config.json", "model.safetensors", "z.json"):
            (staging / name).write_text("new")

    assert (out / "notes.txt").read_text() == "keep"
    for name in ("adapter_config.json", "model.safetensors", "z.json"):
        assert (out / name).read_text() == "new", name
    assert moved[-1] == "adapter_config.json"
    assert _siblings(out) == ["out"]
