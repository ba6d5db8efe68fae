"""Tests of model families: detection from config.json, default and all-linear targets, tied weights."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from loftq_jax import architectures, checkpoint, synthetic
from loftq_jax.errors import InputError


def _model(tmp_path, preset, **config_changes):
    """A tiny synthetic checkpoint in float32 and its config.json, changed by `config_changes`."""
    folder = synthetic.write_checkpoint(tmp_path / preset, preset, dtype="float32")
    config = json.loads((folder / "config.json").read_text()) | config_changes
    (folder / "config.json").write_text(json.dumps(config))
    return checkpoint.Checkpoint.from_dir(folder), config


def _names(infos):
    return [info.name for info in infos]


@pytest.mark.parametrize(
    "config, family",
    [
        ({"model_type": "llama"}, "llama"),
        ({"model_type": "qwen2"}, "qwen2"),
        ({"model_type": "bert", "architectures": ["BertModel"]}, "bert"),
        ({"architectures": ["MistralForCausalLM"]}, "mistral"),
        ({"architectures": ["GPT2LMHeadModel"]}, "gpt2"),
        ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, None),
        ({"architectures": ["Qwen2MoeForCausalLM"]}, None),
        ({}, None),
    ],
)
def test_detect_architecture(config, family):
    detected = architectures.detect_architecture(config)
    assert (detected.model_type if detected else None) == family


def test_read_model_config_rejects_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="config.json: invalid JSON"):
        architectures.read_model_config(tmp_path)
    assert architectures.read_model_config(tmp_path / "absent") == {}


def test_llama_default_targets(tmp_path):
    model, config = _model(tmp_path, "tiny-llama")
    arch = architectures.detect_architecture(config)
    chosen = _names(architectures.select_targets(model, arch, None))
    assert len(chosen) == 2 * 7
    assert sorted({name.split(".")[-2] for name in chosen}) == sorted(architectures.ARCHITECTURES["llama"].default_targets)
    assert "lm_head.weight" not in chosen


def test_gpt2_default_targets_are_conv1d(tmp_path):
    model, config = _model(tmp_path, "tiny-gpt2")
    arch = architectures.detect_architecture(config)
    chosen = _names(architectures.select_targets(model, arch, None))
    assert chosen == [
        f"h.{layer}.{module}.weight"
        for layer in range(2)
        for module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert arch.conv1d


def test_bert_defaults_leave_out_pooler(tmp_path):
    tensors = {
        "encoder.layer.0.attention.self.query.weight": np.ones((8, 8), np.float32),
        "encoder.layer.0.output.dense.weight": np.ones((8, 8), np.float32),
        "encoder.layer.0.output.LayerNorm.weight": np.ones(8, np.float32),
        "pooler.dense.weight": np.ones((8, 8), np.float32),
        "embeddings.word_embeddings.weight": np.ones((20, 8), np.float32),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = checkpoint.Checkpoint.from_dir(tmp_path)
    arch = architectures.ARCHITECTURES["bert"]
    assert _names(architectures.select_targets(model, arch, None)) == [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.output.dense.weight",
    ]
    # All linear layers, as in PEFT, include the pooler but no embedding.
    assert _names(architectures.select_targets(model, arch, ["all-linear"])) == [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.output.dense.weight",
        "pooler.dense.weight",
    ]


@pytest.mark.parametrize("preset, expected_count", [("tiny-llama", 14), ("tiny-gpt2", 8)])
def test_all_linear_leaves_out_embeddings_and_head(tmp_path, preset, expected_count):
    model, config = _model(tmp_path, preset)
    arch = architectures.detect_architecture(config)
    chosen = _names(architectures.select_targets(model, arch, ["all-linear"]))
    assert len(chosen) == expected_count
    for name in ("lm_head.weight", "model.embed_tokens.weight", "wte.weight", "wpe.weight"):
        assert name not in chosen


def test_all_linear_alone_only(tmp_path):
    model, config = _model(tmp_path, "tiny-llama")
    with pytest.raises(InputError, match="all-linear cannot be combined with other names"):
        architectures.select_targets(model, architectures.detect_architecture(config), ["all-linear", "q_proj"])


@pytest.mark.parametrize(
    "module, expected",
    [
        ("model.embed_tokens", True),
        ("embeddings.word_embeddings", True),
        ("transformer.wte", True),
        ("wpe", True),
        ("shared", True),
        ("model.layers.0.self_attn.q_proj", False),
        ("lm_head", False),
        ("h.0.mlp.c_fc", False),
    ],
)
def test_is_embedding(module, expected):
    assert architectures.is_embedding(module, None) is expected


def test_absent_head_tied_by_config(tmp_path):
    model, config = _model(tmp_path, "tiny-qwen2")
    assert config["tie_word_embeddings"] is True
    tied = architectures.find_tied_weights(model, architectures.detect_architecture(config), config)
    assert tied == [
        architectures.TiedWeights(
            ("model.embed_tokens.weight",), ("lm_head.weight",), "tie_word_embeddings is true and lm_head.weight is not stored"
        )
    ]
    with pytest.raises(InputError, match=r"model.embed_tokens.weight is tied to lm_head.weight \(tie_word_embeddings is true"):
        architectures.check_tied_targets(tied, ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"])
    architectures.check_tied_targets(tied, ["model.layers.0.self_attn.q_proj.weight"])


def test_gpt2_tied_by_default(tmp_path):
    model, config = _model(tmp_path, "tiny-gpt2")
    del config["tie_word_embeddings"]
    tied = architectures.find_tied_weights(model, architectures.detect_architecture(config), config)
    assert [(group.stored, group.absent) for group in tied] == [(("wte.weight",), ("lm_head.weight",))]
    assert "true by default" in tied[0].reason


def test_separate_head_not_tied(tmp_path):
    model, config = _model(tmp_path, "tiny-llama")
    assert architectures.find_tied_weights(model, architectures.detect_architecture(config), config) == []


def test_identical_head_copy_tied(tmp_path):
    folder = synthetic.write_checkpoint(tmp_path / "llama", "tiny-llama", dtype="float32")
    model = checkpoint.Checkpoint.from_dir(folder)
    tensors = {name: model.load(name) for name in model.names}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, str(folder / "model.safetensors"))
    model = checkpoint.Checkpoint.from_dir(folder)
    config = {"model_type": "llama", "tie_word_embeddings": False}

    tied = architectures.find_tied_weights(model, architectures.ARCHITECTURES["llama"], config)
    assert [group.stored for group in tied] == [("model.embed_tokens.weight", "lm_head.weight")]
    with pytest.raises(InputError, match="lm_head.weight is tied to model.embed_tokens.weight"):
        architectures.check_tied_targets(tied, ["lm_head.weight"])


@pytest.mark.parametrize(
    "model_class, expected",
    [("GPT2LMHeadModel", "transformer."), ("GPT2Model", ""), (None, "")],
)
def test_adapter_prefix_for_gpt2_files(tmp_path, model_class, expected):
    model, config = _model(tmp_path, "tiny-gpt2")
    config["architectures"] = [model_class] if model_class else []
    assert architectures.adapter_prefix(architectures.ARCHITECTURES["gpt2"], config, model) == expected


def test_adapter_prefix_not_added_twice(tmp_path):
    model, config = _model(tmp_path, "tiny-llama")
    assert config["architectures"] == ["LlamaForCausalLM"]
    # The LLaMA files already name model.layers.N, the module names of LlamaForCausalLM.
    assert architectures.adapter_prefix(architectures.ARCHITECTURES["llama"], config, model) == ""
