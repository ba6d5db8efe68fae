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

from loftq_jax import checkpoint, cli, fake_quant, QuantConfig

QUERY = "encoder.layer.0.attention.self.query"
DENSE = "encoder.layer.0.output.dense"
OUTPUTS = ("model.safetensors", "adapter_model.safetensors", "adapter_config.json", "loftq_report.json")


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


def test_sharded_model_becomes_one_file(tmp_path, capsys):
    tensors = _model_tensors()
    model = tmp_path / "model"
    model.mkdir()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for shard, shard_names in shards.items():
        save_file({name: tensors[name] for name in shard_names}, str(model / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {name: shard for shard, shard_names in shards.items() for name in shard_names}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    (model / "config.json").write_text("{}")

    out = tmp_path / "out"
    code, err = _run(capsys, "init", model, "--out", out, "--rank", 4, "--iters", 1)
    assert code == 0, err
    assert sorted(path.name for path in out.iterdir()) == sorted(["config.json", *OUTPUTS])
    written = _load(out / "model.safetensors")
    assert set(written) == set(tensors)
    assert written["pooler.dense.weight"].tobytes() == tensors["pooler.dense.weight"].tobytes()
    assert written["embeddings.position_ids"].tobytes() == tensors["embeddings.position_ids"].tobytes()


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


def _valid_model(folder):
    return _make_model(folder, extra_files=False)


INVALID_CASES = [
    ("nan", _nan_model, [], [f"{DENSE}.weight", "1 of 3072 elements are NaN or Inf"]),
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
