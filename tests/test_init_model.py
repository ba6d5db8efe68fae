"""Tests of `loftq-jax init`, run through the command line on small synthetic models and on MiniLM."""

import json
import logging
import math
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from loftq_jax import LoftQConfig, checkpoint, cli, dequantize, fake_quant, init_model, QuantConfig, synthetic
from loftq_jax.execution import LoftQRunner
from loftq_jax.packed_checkpoint import directory_size, packed_abstract_tree, restore_packed

QUERY = "encoder.layer.0.attention.self.query"
DENSE = "encoder.layer.0.output.dense"
OUTPUTS = ("model.safetensors", "adapter_model.safetensors", "adapter_config.json", "loftq_report.json")


@pytest.fixture(scope="module", autouse=True)
def _private_cache_home(private_cache_home):
    yield


def _model_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """A BERT-like checkpoint: two block linear weights (targets by default) and tensors that stay as they are."""
    rng = np.random.default_rng(seed)
    return {
        f"{QUERY}.weight": rng.standard_normal((64, 48)).astype(np.float32),
        f"{QUERY}.bias": rng.standard_normal(64).astype(np.float32),
        f"{DENSE}.weight": (0.02 * rng.standard_normal((48, 64))).astype(np.float32),
        "encoder.layer.0.output.LayerNorm.weight": np.ones(48, np.float32),
        "embeddings.word_embeddings.weight": rng.standard_normal((100, 48)).astype(np.float32),
        "embeddings.position_ids": np.arange(16, dtype=np.int64).reshape(1, 16),
        "pooler.dense.weight": rng.standard_normal((48, 48)).astype(ml_dtypes.bfloat16),
    }


def _make_model(folder, tensors=None, *, extra_files=True):
    folder.mkdir(parents=True)
    save_file(_model_tensors() if tensors is None else tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 48}))
    if extra_files:
        (folder / "tokenizer.json").write_text('{"version": "1.0"}')
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
        (folder / "pytorch_model.bin").write_bytes(b"original weights")
    return folder


def _run(capsys, *args):
    """Run `loftq-jax ARGS` and return its exit code and stderr."""
    capsys.readouterr()
    code = cli.main([str(arg) for arg in args])
    return code, capsys.readouterr().err


def _load(path) -> dict[str, np.ndarray]:
    with safe_open(str(path), "numpy") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _rebuilt_error(out, module, weight):
    """Return ||W - (Q + lora_alpha / r · lora_B · lora_A)||_F / ||W||_F from the files in `out`."""
    config = json.loads((out / "adapter_config.json").read_text())
    adapters = _load(out / "adapter_model.safetensors")
    q = _load(out / "model.safetensors")[f"{module}.weight"].astype(np.float64)
    lora_a = adapters[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
    lora_b = adapters[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
    rebuilt = q + config["lora_alpha"] / config["r"] * lora_b @ lora_a
    weight = weight.astype(np.float64)
    return np.linalg.norm(weight - rebuilt) / np.linalg.norm(weight)


def _assert_no_output(out):
    """Check that a failed run left no output file and no staging folder."""
    if out.exists():
        assert not [name for name in OUTPUTS if (out / name).exists()]
    assert not [entry.name for entry in out.parent.iterdir() if entry.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One conversion of the synthetic model with rank 4 and 2 LoftQ steps, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("converted")
    model = _make_model(root / "model")
    out = root / "out"
    assert cli.main(["init", str(model), "--out", str(out), "--rank", "4", "--iters", "2"]) == 0
    return model, out


# ---------------------------------------------------------------------------------------------------
# Output files


def test_round_trip_error_matches_report(converted):
    _, out = converted
    report = json.loads((out / "loftq_report.json").read_text())
    tensors = _model_tensors()
    assert [entry["module"] for entry in report["weights"]] == [QUERY, DENSE]
    for entry in report["weights"]:
        error = _rebuilt_error(out, entry["module"], tensors[entry["name"]])
        assert error == pytest.approx(entry["error"], abs=1e-5), entry["name"]
        assert entry["error"] == pytest.approx(entry["step_errors"][-1], abs=1e-5), entry["name"]
        assert len(entry["step_errors"]) == 2
        assert entry["error"] < entry["qlora_error"], entry["name"]


def test_report_records_settings_and_totals(converted):
    _, out = converted
    report = json.loads((out / "loftq_report.json").read_text())
    settings = report["settings"]
    assert (settings["bits"], settings["rank"], settings["iters"], settings["alpha"]) == (4, 4, 2, 4.0)
    assert (settings["codebook"], settings["block_size"], settings["svd"]) == ("nf", 64, "exact")
    assert [entry["shape"] for entry in report["weights"]] == [[64, 48], [48, 64]]
    totals = report["totals"]
    assert totals["weights"] == 2
    assert totals["parameters"] == 2 * 64 * 48
    assert totals["adapter_parameters"] == 2 * 4 * (64 + 48)
    assert totals["mean_error"] == pytest.approx(np.mean([entry["error"] for entry in report["weights"]]))
    assert totals["mean_qlora_error"] == pytest.approx(np.mean([entry["qlora_error"] for entry in report["weights"]]))
    assert len(totals["mean_step_errors"]) == 2
    assert report["seconds"] > 0


def test_quantized_weight_is_on_code_book(converted):
    _, out = converted
    q = _load(out / "model.safetensors")[f"{QUERY}.weight"]
    values = QuantConfig().values()
    blocks = q.reshape(-1, 64)
    scales = np.abs(blocks).max(axis=1, keepdims=True)
    normalized = blocks / scales
    # Every dequantized value is a code book value times its block's absmax.
    distance = np.abs(normalized[..., None] - values).min(axis=-1)
    assert distance.max() < 1e-6


def test_non_targets_are_byte_identical(converted):
    model, out = converted
    source, written = _load(model / "model.safetensors"), _load(out / "model.safetensors")
    assert set(written) == set(source)
    for name in source:
        if name in (f"{QUERY}.weight", f"{DENSE}.weight"):
            assert written[name].dtype == source[name].dtype
            assert written[name].tobytes() != source[name].tobytes(), name
        else:
            assert written[name].dtype == source[name].dtype, name
            assert written[name].tobytes() == source[name].tobytes(), name
    with safe_open(str(out / "model.safetensors"), "numpy") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_model_files_copied(converted):
    model, out = converted
    assert (out / "config.json").read_bytes() == (model / "config.json").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    assert (out / "1_Pooling" / "config.json").read_bytes() == (model / "1_Pooling" / "config.json").read_bytes()
    # Weights in another format would hold the unquantized values.
    assert not (out / "pytorch_model.bin").exists()


def test_adapter_keys_follow_peft_layout(converted):
    _, out = converted
    adapters = _load(out / "adapter_model.safetensors")
    expected = {f"base_model.model.{module}.lora_{ab}.weight" for module in (QUERY, DENSE) for ab in "AB"}
    assert set(adapters) == expected
    assert adapters[f"base_model.model.{QUERY}.lora_A.weight"].shape == (4, 48)
    assert adapters[f"base_model.model.{QUERY}.lora_B.weight"].shape == (64, 4)
    assert adapters[f"base_model.model.{DENSE}.lora_A.weight"].shape == (4, 64)
    assert adapters[f"base_model.model.{DENSE}.lora_B.weight"].shape == (48, 4)
    assert all(array.dtype == np.float32 for array in adapters.values())


def test_adapter_config_describes_adapters(converted):
    _, out = converted
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == 4
    assert config["lora_alpha"] == 4
    assert config["target_modules"] == [QUERY, DENSE]
    assert config["base_model_name_or_path"] == str(out.resolve())
    assert config["init_lora_weights"] is True
    assert config["lora_dropout"] == 0.0
    # The synthetic config.json names no architecture, so PEFT's AutoPeftModel has no class to load.
    assert config["auto_mapping"] is None
    assert config["loftq_config"] == {
        "loftq_bits": 4,
        "loftq_iter": 2,
        "codebook": "nf",
        "block_size": 64,
        "svd": "exact",
    }


def test_alpha_scales_factors_not_product(converted, tmp_path, capsys):
    model, out_default = converted
    out = tmp_path / "alpha16"
    code, err = _run(capsys, "init", model, "--out", out, "--rank", 4, "--iters", 2, "--alpha", 16)
    assert code == 0, err
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 16

    default, scaled = _load(out_default / "adapter_model.safetensors"), _load(out / "adapter_model.safetensors")
    for module in (QUERY, DENSE):
        key_a, key_b = f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight"
        # Scaling 16 / 4 = 4 divides each factor by √4.
        np.testing.assert_allclose(scaled[key_a], default[key_a] / 2, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(scaled[key_b], default[key_b] / 2, rtol=1e-4, atol=1e-6)
        product_default = default[key_b] @ default[key_a]
        product_scaled = 16 / 4 * scaled[key_b] @ scaled[key_a]
        np.testing.assert_allclose(product_scaled, product_default, rtol=1e-4, atol=1e-6)
    assert _load(out / "model.safetensors")[f"{QUERY}.weight"].tobytes() == (
        _load(out_default / "model.safetensors")[f"{QUERY}.weight"].tobytes()
    )


def test_qlora_adapters_start_at_zero_product(tmp_path, capsys):
    model = _make_model(tmp_path / "model", extra_files=False)
    out = tmp_path / "out"
    code, err = _run(capsys, "init", model, "--out", out, "--rank", 4, "--iters", 0, "--target", QUERY)
    assert code == 0, err

    adapters = _load(out / "adapter_model.safetensors")
    lora_a = adapters[f"base_model.model.{QUERY}.lora_A.weight"]
    lora_b = adapters[f"base_model.model.{QUERY}.lora_B.weight"]
    assert not lora_b.any()
    # lora_A is PEFT's default random initialization, so that lora_B gets a gradient.
    assert np.abs(lora_a).min() > 0
    assert np.abs(lora_a).max() <= 1 / math.sqrt(48)

    weight = _model_tensors()[f"{QUERY}.weight"]
    q = _load(out / "model.safetensors")[f"{QUERY}.weight"]
    np.testing.assert_array_equal(q, np.asarray(fake_quant(weight, QuantConfig())))
    entry = json.loads((out / "loftq_report.json").read_text())["weights"][0]
    assert entry["step_errors"] == []
    assert entry["error"] == pytest.approx(entry["qlora_error"], abs=1e-6)
    assert _rebuilt_error(out, QUERY, weight) == pytest.approx(entry["error"], abs=1e-5)


def test_bfloat16_weight_stays_bfloat16(tmp_path, capsys):
    tensors = _model_tensors()
    tensors[f"{QUERY}.weight"] = tensors[f"{QUERY}.weight"].astype(ml_dtypes.bfloat16)
    model = _make_model(tmp_path / "model", tensors, extra_files=False)
    out = tmp_path / "out"
    code, err = _run(capsys, "init", model, "--out", out, "--rank", 4, "--iters", 2, "--target", QUERY)
    assert code == 0, err

    q = _load(out / "model.safetensors")[f"{QUERY}.weight"]
    assert q.dtype == ml_dtypes.bfloat16
    entry = json.loads((out / "loftq_report.json").read_text())["weights"][0]
    assert entry["dtype"] == "BF16"
    # The report measures the stored, bfloat16-rounded Q.
    error = _rebuilt_error(out, QUERY, tensors[f"{QUERY}.weight"].astype(np.float32))
    assert error == pytest.approx(entry["error"], abs=1e-5)


def test_non_2d_target_skipped_with_notice(tmp_path, capsys, caplog):
    model = _make_model(tmp_path / "model", extra_files=False)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="loftq_jax.init_model"):
        code, err = _run(capsys, "init", model, "--out", out, "--rank", 4, "--iters", 1, "--target", "LayerNorm", QUERY)
    assert code == 0, err
    notice = "skipped 1 tensors matched by --target that are not 2-D (out, in): encoder.layer.0.output.LayerNorm.weight (48,)"
    assert notice in caplog.messages
    report = json.loads((out / "loftq_report.json").read_text())
    assert [entry["module"] for entry in report["weights"]] == [QUERY]
    assert [entry["name"] for entry in report["skipped"]] == ["encoder.layer.0.output.LayerNorm.weight"]
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == [QUERY]
    # One progress line per converted weight, since stderr is not a terminal under pytest.
    assert [m for m in caplog.messages if m.startswith("[1/1] ")]


def test_regex_target(tmp_path, capsys):
    model = _make_model(tmp_path / "model", extra_files=False)
    out = tmp_path / "out"
    code, err = _run(capsys, "init", model, "--out", out, "--rank", 4, "--iters", 1, "--target", r".*\.output\.dense")
    assert code == 0, err
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == [DENSE]


def _sharded_model(folder, tensors=None):
    """The BERT-like tensors in two shards with an index, and a config.json without a model type."""
    tensors = _model_tensors() if tensors is None else tensors
    folder.mkdir()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for shard, shard_names in shards.items():
        save_file({name: tensors[name] for name in shard_names}, str(folder / shard), metadata={"format": "pt"})
    index = {"metadata": {"note": "kept"}, "weight_map": {name: shard for shard, shard_names in shards.items() for name in shard_names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text("{}")
    return folder, shards


def test_sharded_model_keeps_its_shards(tmp_path, capsys, caplog):
    tensors = _model_tensors()
    model, shards = _sharded_model(tmp_path / "model", tensors)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="loftq_jax.init_model"):
        code, err = _run(capsys, "init", model, "--out", out, "--rank", 4, "--iters", 1)
    assert code == 0, err
    # config.json names no model type, so the default is every 2-D weight of the transformer blocks.
    assert "config.json names no known model_type; converting every 2-D weight of the transformer blocks" in caplog.messages

    expected = ["config.json", "model.safetensors.index.json", *shards, *OUTPUTS[1:], "loftq_packed"]
    assert sorted(path.name for path in out.iterdir()) == sorted(expected)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {name: shard for shard, names in shards.items() for name in names}
    assert index["metadata"] == {"note": "kept", "total_size": sum(array.nbytes for array in tensors.values())}
    for shard, names in shards.items():
        written = _load(out / shard)
        assert sorted(written) == sorted(names), shard
    written = {name: array for shard in shards for name, array in _load(out / shard).items()}
    assert written["pooler.dense.weight"].tobytes() == tensors["pooler.dense.weight"].tobytes()
    assert written["embeddings.position_ids"].tobytes() == tensors["embeddings.position_ids"].tobytes()
    report = json.loads((out / "loftq_report.json").read_text())
    assert report["backbone_files"] == [*shards, "model.safetensors.index.json"]
    for entry in report["weights"]:
        assert written[entry["name"]].tobytes() != tensors[entry["name"]].tobytes(), entry["name"]


# ---------------------------------------------------------------------------------------------------
# Architectures, packed checkpoint and PEFT read-back


def _rebuilt_from_peft_files(out, entry, weight):
    """Return ||W - (Q + lora_alpha / r · ΔW)||_F / ||W||_F with ΔW = lora_B·lora_A, transposed under fan_in_fan_out.

    W and Q are in the layout the checkpoint stores; PEFT transposes ΔW for weights stored (in, out).
    """
    config = json.loads((out / "adapter_config.json").read_text())
    adapters = _load(out / "adapter_model.safetensors")
    q = checkpoint.Checkpoint.from_dir(out).load(entry["name"]).astype(np.float64)
    key = f"base_model.model.{entry['peft_module']}"
    delta = adapters[f"{key}.lora_B.weight"].astype(np.float64) @ adapters[f"{key}.lora_A.weight"].astype(np.float64)
    if config["fan_in_fan_out"]:
        delta = delta.T
    rebuilt = q + config["lora_alpha"] / config["r"] * delta
    weight = weight.astype(np.float64)
    return np.linalg.norm(weight - rebuilt) / np.linalg.norm(weight)


def test_gpt2_conv1d_adapters_rebuild_reported_error(tmp_path, capsys):
    model = synthetic.write_checkpoint(tmp_path / "gpt2", "tiny-gpt2", dtype="float32", max_shard_bytes=200_000)
    out = tmp_path / "out"
    code, err = _run(capsys, "init", model, "--out", out, "--rank", 4, "--iters", 2, "--alpha", 8, "--target", "c_attn")
    assert code == 0, err

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    # The files name h.0.attn.c_attn, and GPT2LMHeadModel names that module transformer.h.0.attn.c_attn.
    assert config["target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    adapters = _load(out / "adapter_model.safetensors")
    # Conv1D stores c_attn as (in 64, out 192); lora_A is (r, in) and lora_B (out, r) all the same.
    assert adapters["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 64)
    assert adapters["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (192, 4)

    source = checkpoint.Checkpoint.from_dir(model)
    report = json.loads((out / "loftq_report.json").read_text())
    assert report["architecture"] == "gpt2"
    for entry in report["weights"]:
        assert entry["layout"] == "conv1d"
        assert entry["shape"] == [64, 192]
        assert entry["error"] < entry["qlora_error"], entry["name"]
        error = _rebuilt_from_peft_files(out, entry, source.load(entry["name"]))
        assert error == pytest.approx(entry["error"], abs=1e-5), entry["name"]


@pytest.fixture(scope="module")
def llama_converted(tmp_path_factory):
    """tiny-llama in bfloat16 and three shards, q_proj and o_proj converted at rank 4 with alpha 16."""
    root = tmp_path_factory.mktemp("llama")
    model = synthetic.write_checkpoint(root / "model", "tiny-llama", dtype="bfloat16", max_shard_bytes=100_000)
    out = root / "out"
    args = ["init", str(model), "--out", str(out), "--rank", "4", "--iters", "2", "--alpha", "16"]
    assert cli.main([*args, "--target", "q_proj", "o_proj", "--no-compilation-cache"]) == 0
    return model, out


def test_llama_adapters_rebuild_reported_error(llama_converted):
    model, out = llama_converted
    source = checkpoint.Checkpoint.from_dir(model)
    report = json.loads((out / "loftq_report.json").read_text())
    assert len(report["weights"]) == 4
    for entry in report["weights"]:
        assert entry["peft_module"] == entry["module"]
        assert entry["layout"] == "linear"
        error = _rebuilt_from_peft_files(out, entry, source.load(entry["name"]).astype(np.float32))
        assert error == pytest.approx(entry["error"], abs=1e-5), entry["name"]


def test_packed_checkpoint_matches_other_outputs(llama_converted):
    _, out = llama_converted
    report = json.loads((out / "loftq_report.json").read_text())
    names = [entry["name"] for entry in report["weights"]]
    abstract = packed_abstract_tree(out / "loftq_packed")
    assert sorted(abstract) == sorted(names)
    assert abstract[names[0]]["codes"].shape == (64 * 64 // 2,)
    assert abstract[names[0]]["codes"].dtype == np.uint8

    packed = restore_packed(out / "loftq_packed")
    backbone = checkpoint.Checkpoint.from_dir(out)
    adapters = _load(out / "adapter_model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())
    for entry in report["weights"]:
        weight = packed[entry["name"]]
        assert weight.dtype == "BF16"
        assert weight.quantized.config == QuantConfig(bits=4, codebook="nf", block_size=64)
        # The backbone stores the dequantized codes rounded to bfloat16.
        q = np.asarray(dequantize(weight.quantized)).astype(ml_dtypes.bfloat16)
        assert q.tobytes() == backbone.load(entry["name"]).tobytes(), entry["name"]
        key = f"base_model.model.{entry['peft_module']}"
        np.testing.assert_array_equal(weight.a, adapters[f"{key}.lora_B.weight"])
        np.testing.assert_array_equal(weight.b, adapters[f"{key}.lora_A.weight"])
    assert config["r"] == 4

    sizes = report["packed"]
    assert sizes["bytes"] == directory_size(out / "loftq_packed")
    assert sizes["bytes_16bit"] == 2 * 4 * 64 * 64
    assert sizes["codes_and_scales_bytes"] == 4 * (64 * 64 // 2 + 64 * 64 // 64 * 4)
    assert sizes["adapter_bytes"] == 4 * 2 * (64 * 4 * 4)


def test_packed_size_near_nf4_bits(tmp_path, capsys):
    rng = np.random.default_rng(3)
    tensors = {f"encoder.layer.{i}.output.dense.weight": (0.02 * rng.standard_normal((512, 512))).astype(np.float32) for i in range(2)}
    model = _make_model(tmp_path / "model", tensors, extra_files=False)
    out = tmp_path / "out"
    code, err = _run(capsys, "init", model, "--out", out, "--rank", 4, "--iters", 0)
    assert code == 0, err

    sizes = json.loads((out / "loftq_report.json").read_text())["packed"]
    assert sizes["bytes_16bit"] == 2 * 2 * 512 * 512
    # NF4 codes and a float32 absmax scale per 64 weights are 4.5 bits a weight.
    assert sizes["codes_and_scales_bytes"] == sizes["bytes_16bit"] * 4.5 / 16
    # On disk: codes, scales and adapters, plus orbax's metadata files (tens of KiB). orbax compresses the
    # arrays, which shrinks QLoRA's all-zero lora_B to almost nothing and the codes by a few percent.
    assert sizes["bytes"] > 0.85 * sizes["codes_and_scales_bytes"]
    assert sizes["bytes"] < sizes["codes_and_scales_bytes"] + sizes["adapter_bytes"] + 96 * 1024
    assert sizes["fraction_of_16bit"] == pytest.approx(sizes["bytes"] / sizes["bytes_16bit"])
    assert 0.85 * 4.5 / 16 < sizes["fraction_of_16bit"] < 0.35


def test_tied_head_rejected_as_target(tmp_path, capsys):
    # A LLaMA checkpoint that stores its tied output head as a second copy of the embedding.
    model = synthetic.write_checkpoint(tmp_path / "model", "tiny-llama", dtype="float32")
    tensors = _load(model / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})

    out = tmp_path / "out"
    code, err = _run(capsys, "init", model, "--out", out, "--target", "lm_head", "--rank", 4)
    assert code == 2
    assert (
        "lm_head.weight is tied to model.embed_tokens.weight (both are stored with identical bytes): they share one "
        "tensor, so it cannot be a LoRA target" in err
    )
    assert not out.exists()


def test_unselected_outputs_not_written(tmp_path, capsys):
    model = _make_model(tmp_path / "model", extra_files=False)
    out = tmp_path / "out"
    code, err = _run(capsys, "init", model, "--out", out, "--rank", 4, "--iters", 1, "--no-backbone", "--no-packed")
    assert code == 0, err
    assert sorted(path.name for path in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "config.json", "loftq_report.json"]
    config = json.loads((out / "adapter_config.json").read_text())
    # Without a backbone, PEFT loads the original model and quantizes nothing.
    assert config["base_model_name_or_path"] == str(model.resolve())
    report = json.loads((out / "loftq_report.json").read_text())
    assert report["packed"] is None
    assert report["backbone_files"] == []


def test_one_compile_per_shape(tmp_path, count_compiles):
    model = synthetic.write_checkpoint(tmp_path / "model", "tiny-llama", dtype="float32")
    # A rank no other test uses, so that no runner cached by an earlier conversion has compiled these shapes.
    config = LoftQConfig(rank=3, steps=1)
    # Room for two 64x64 weights at a time: their group of four runs as two chunks.
    budget = 2 * LoftQRunner(config).bytes_per_weight((64, 64), np.float32) + 1
    with count_compiles("loftq_chunk") as counter:
        report = init_model.initialize(
            model, tmp_path / "out", config, targets=["q_proj", "o_proj", "k_proj", "v_proj"], max_memory=budget
        )
    groups = {tuple(group["shape"]): group for group in report["execution"]["groups"]}
    assert sorted(groups) == [(32, 64), (64, 64)]
    assert groups[(64, 64)]["chunks"] == 2
    assert groups[(64, 64)]["chunk_length"] == 2
    assert groups[(32, 64)]["chunks"] >= 1
    # Every chunk of a group is padded to its chunk length, so the group compiles once.
    assert counter.count == 2


# ---------------------------------------------------------------------------------------------------
# Interrupted runs


def _weight_files(out):
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.safetensors"))}


def _entries_without_timing(out):
    report = json.loads((out / "loftq_report.json").read_text())
    return [{key: value for key, value in entry.items() if key != "seconds"} for entry in report["weights"]]


def test_interrupted_run_resumes_to_same_files(tmp_path, capsys, caplog, monkeypatch):
    model = _make_model(tmp_path / "model", extra_files=False)
    options = ["--rank", 4, "--iters", 2, "--no-compilation-cache"]
    reference = tmp_path / "reference"
    code, err = _run(capsys, "init", model, "--out", reference, *options)
    assert code == 0, err

    # Ctrl-C after the first chunk (one weight) has been saved.
    real_run_chunk = init_model._run_chunk
    calls = []

    def interrupt_second_chunk(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(args)
        return real_run_chunk(*args, **kwargs)

    monkeypatch.setattr(init_model, "_run_chunk", interrupt_second_chunk)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="loftq_jax.init_model"):
        code, err = _run(capsys, "init", model, "--out", out, *options)
    monkeypatch.undo()
    assert code == 130
    assert "interrupted; run the same command with --resume to continue from the finished weights" in caplog.messages
    assert sorted(path.name for path in out.iterdir()) == [".loftq-parts"]
    assert len(list((out / ".loftq-parts" / "parts").iterdir())) == 1

    code, err = _run(capsys, "init", model, "--out", out, *options)
    assert code == 2
    assert "output folder is not empty; pass --overwrite" in err
    code, err = _run(capsys, "init", model, "--out", out, *options, "--resume", "--rank", 2)
    assert code == 2
    assert "cannot resume, because --rank is 2 here but was 4 in the interrupted run" in err
    code, err = _run(capsys, "init", model, "--out", out, *options, "--resume", "--no-packed")
    assert code == 2
    assert "--no-packed (false when given) is false here but was true" in err

    code, err = _run(capsys, "init", model, "--out", out, *options, "--resume")
    assert code == 0, err
    assert _weight_files(out) == _weight_files(reference)
    assert _entries_without_timing(out) == _entries_without_timing(reference)
    assert json.loads((out / "loftq_report.json").read_text())["execution"]["resumed_weights"] == 1
    assert not (out / ".loftq-parts").exists()
    resumed, uninterrupted = restore_packed(out / "loftq_packed"), restore_packed(reference / "loftq_packed")
    for name, weight in uninterrupted.items():
        np.testing.assert_array_equal(resumed[name].quantized.codes, weight.quantized.codes)
        np.testing.assert_array_equal(resumed[name].a, weight.a)

    code, err = _run(capsys, "init", model, "--out", out, *options, "--resume")
    assert code == 2
    assert "contains a finished conversion and no interrupted run to resume; pass --overwrite" in err


def test_overwrite_discards_interrupted_run(tmp_path, capsys, monkeypatch):
    model = _make_model(tmp_path / "model", extra_files=False)
    out = tmp_path / "out"
    monkeypatch.setattr(init_model, "_run_chunk", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _ = _run(capsys, "init", model, "--out", out, "--rank", 4, "--iters", 1)
    monkeypatch.undo()
    assert code == 130
    assert (out / ".loftq-parts" / "settings.json").is_file()

    code, err = _run(capsys, "init", model, "--out", out, "--rank", 2, "--iters", 1, "--overwrite")
    assert code == 0, err
    assert not (out / ".loftq-parts").exists()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert json.loads((out / "loftq_report.json").read_text())["execution"]["resumed_weights"] == 0


# ---------------------------------------------------------------------------------------------------
# Output folder


def test_non_empty_out_needs_overwrite(converted, tmp_path, capsys):
    model, _ = converted
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    (out / "adapter_config.json").write_text("old")

    code, err = _run(capsys, "init", model, "--out", out, "--rank", 4, "--iters", 2)
    assert code == 2
    assert f"loftq-jax init: error: {out}: output folder is not empty; pass --overwrite" in err
    assert (out / "adapter_config.json").read_text() == "old"

    code, err = _run(capsys, "init", model, "--out", out, "--rank", 4, "--iters", 2, "--overwrite")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "keep"
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["out"]


def test_out_inside_model_rejected(tmp_path, capsys):
    model = _make_model(tmp_path / "model", extra_files=False)
    code, err = _run(capsys, "init", model, "--out", model / "out")
    assert code == 2
    assert "must not be the input folder" in err
    assert not (model / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Invalid input: exit code 2, a message naming what is wrong, no traceback and no output


def _nan_model(folder):
    tensors = _model_tensors()
    # The second target is invalid, so the first one is already converted and written when the run fails.
    tensors[f"{DENSE}.weight"][3, 5] = np.nan
    return _make_model(folder, tensors, extra_files=False)


def _inf_model(folder):
    tensors = _model_tensors()
    tensors[f"{DENSE}.weight"][0, 0] = -np.inf
    return _make_model(folder, tensors, extra_files=False)


def _int8_model(folder):
    tensors = _model_tensors()
    tensors[f"{DENSE}.weight"] = np.ones((48, 64), np.int8)
    return _make_model(folder, tensors, extra_files=False)


def _int_2d_weight_model(folder):
    tensors = _model_tensors()
    tensors["embeddings.token_ids.weight"] = np.zeros((8, 8), np.int64)
    return _make_model(folder, tensors, extra_files=False)


def _no_safetensors_model(folder):
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    return folder


def _truncated_model(folder):
    _make_model(folder, extra_files=False)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return folder


def _corrupt_header_model(folder):
    _make_model(folder, extra_files=False)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:24] = b"\x00garbage{{{{]]]]"[:16]
    path.write_bytes(bytes(data))
    return folder


def _missing_shard_model(folder):
    _sharded_model(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    return folder


def _index_lists_absent_tensor_model(folder):
    _sharded_model(folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["encoder.layer.0.extra.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    return folder


def _valid_model(folder):
    return _make_model(folder, extra_files=False)


INVALID_CASES = [
    ("nan", _nan_model, [], [f"model.safetensors: {DENSE}.weight: 1 of 3072 elements are NaN or Inf"]),
    ("inf", _inf_model, [], [f"{DENSE}.weight", "NaN or Inf"]),
    ("rank_zero", _valid_model, ["--rank", "0"], ["invalid rank 0", "expected an integer >= 1"]),
    ("rank_too_high", _valid_model, ["--rank", "49"], [f"{QUERY}.weight", "rank 49 exceeds min(out, in) = 48"]),
    ("bits_5", _valid_model, ["--bits", "5"], ["unsupported bits 5", "(2, 3, 4, 8)"]),
    ("block_size_zero", _valid_model, ["--block-size", "0"], ["invalid block size 0", ">= 1"]),
    ("iters_negative", _valid_model, ["--iters", "-1"], ["invalid --iters -1", ">= 0"]),
    ("alpha_negative", _valid_model, ["--alpha", "-2"], ["invalid alpha -2.0", "positive"]),
    ("alpha_infinite", _valid_model, ["--alpha", "inf"], ["invalid --alpha inf", "finite"]),
    ("int8_weight", _int8_model, [], [f"{DENSE}.weight", "dtype I8 is not floating point"]),
    ("int_target", _int_2d_weight_model, ["--target", "token_ids"], ["embeddings.token_ids.weight", "dtype I64"]),
    ("no_match", _valid_model, ["--target", "nope"], ["no 2-D weight matches --target nope", f"include {QUERY}, {DENSE}"]),
    ("only_1d_match", _valid_model, ["--target", "LayerNorm"], ["no 2-D weight matches --target LayerNorm"]),
    ("bad_regex", _valid_model, ["--target", "(query"], ["invalid target '(query'"]),
    ("no_safetensors", _no_safetensors_model, [], ["no safetensors file found"]),
    ("truncated", _truncated_model, [], ["model.safetensors: not a valid safetensors file", "truncated"]),
    ("corrupt_header", _corrupt_header_model, [], ["model.safetensors: not a valid safetensors file"]),
    ("missing_shard", _missing_shard_model, [], ["names shard model-00002-of-00002.safetensors, which is missing"]),
    (
        "index_lists_absent_tensor",
        _index_lists_absent_tensor_model,
        [],
        [
            "model.safetensors.index.json: lists tensor 'encoder.layer.0.extra.weight' in "
            "model-00001-of-00002.safetensors, but model-00001-of-00002.safetensors does not contain it"
        ],
    ),
    ("embedding_target", _valid_model, ["--target", "word_embeddings"], ["embeddings.word_embeddings is an embedding table"]),
    ("all_linear_mixed", _valid_model, ["--target", "all-linear", "query"], ["all-linear cannot be combined"]),
    ("max_memory_unit", _valid_model, ["--max-memory", "2 parsecs"], ["invalid memory size '2 parsecs'"]),
    ("max_memory_small", _valid_model, ["--max-memory", "1KB"], ["--max-memory 1000 B is too small for one", "MiB or more"]),
    ("missing_folder", lambda folder: folder, [], ["model folder not found"]),
]


@pytest.mark.parametrize("make, options, expected", [case[1:] for case in INVALID_CASES], ids=[case[0] for case in INVALID_CASES])
def test_invalid_input_exits_2_without_output(tmp_path, capsys, make, options, expected):
    model = make(tmp_path / "model")
    out = tmp_path / "out"
    code, err = _run(capsys, "init", model, "--out", out, "--rank", 4, "--iters", 1, *options)
    assert code == 2
    assert err.startswith("loftq-jax init: error: ")
    for text in expected:
        assert text in err
    assert "Traceback" not in err
    _assert_no_output(out)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------
# The real MiniLM checkpoint


def test_default_minilm_model(tmp_path, capsys):
    out = tmp_path / "minilm"
    targets = ["layer.0.attention.self.query", "layer.0.intermediate.dense"]
    code, err = _run(capsys, "init", "default", "--out", out, "--bits", 4, "--rank", 16, "--iters", 1, "--target", *targets)
    assert code == 0, err

    model_dir = checkpoint.default_model_dir()
    report = json.loads((out / "loftq_report.json").read_text())
    modules = ["encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense"]
    assert [entry["module"] for entry in report["weights"]] == modules
    assert [entry["shape"] for entry in report["weights"]] == [[384, 384], [1536, 384]]
    assert (out / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()
    assert (out / "vocab.txt").read_bytes() == (model_dir / "vocab.txt").read_bytes()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == modules
    assert config["auto_mapping"] == {"base_model_class": "BertModel", "parent_library": "transformers"}

    source = checkpoint.Checkpoint.from_dir(model_dir)
    for entry in report["weights"]:
        # NF4 at block 64 leaves roughly 9% relative error on these weights; one LoftQ step lowers it.
        assert 0.05 < entry["qlora_error"] < 0.15, entry["name"]
        assert entry["error"] < entry["qlora_error"], entry["name"]
        error = _rebuilt_error(out, entry["module"], source.load(entry["name"]))
        assert error == pytest.approx(entry["error"], abs=1e-5), entry["name"]

    written = safe_open(str(out / "model.safetensors"), "numpy")
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.key.weight"):
        assert written.get_tensor(name).tobytes() == source.load(name).tobytes(), name
