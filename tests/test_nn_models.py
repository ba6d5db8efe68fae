"""Tests of loftq_jax.nn's BERT and LLaMA-family models: loading, masks, the classifier head and invalid input."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from loftq_jax import InputError, synthetic
from loftq_jax.nn import TRAINABLE, BertClassifier, BertModel, LlamaForCausalLM, mean_pool

TINY_BERT = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "vocab_size": 50,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 32,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 16,
    "type_vocab_size": 2,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}


def bert_tensors(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors under Hugging Face BertModel's names, with a pooler the encoder does not use."""
    rng = np.random.default_rng(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    shapes = {
        "embeddings.word_embeddings.weight": (config["vocab_size"], hidden),
        "embeddings.position_embeddings.weight": (config["max_position_embeddings"], hidden),
        "embeddings.token_type_embeddings.weight": (config["type_vocab_size"], hidden),
        "embeddings.LayerNorm.weight": (hidden,),
        "embeddings.LayerNorm.bias": (hidden,),
        "pooler.dense.weight": (hidden, hidden),
        "pooler.dense.bias": (hidden,),
    }
    for layer in range(config["num_hidden_layers"]):
        prefix = f"encoder.layer.{layer}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[prefix + name + ".weight"] = (hidden, hidden)
            shapes[prefix + name + ".bias"] = (hidden,)
        shapes[prefix + "intermediate.dense.weight"] = (inter, hidden)
        shapes[prefix + "intermediate.dense.bias"] = (inter,)
        shapes[prefix + "output.dense.weight"] = (hidden, inter)
        shapes[prefix + "output.dense.bias"] = (hidden,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[prefix + norm + ".weight"] = (hidden,)
            shapes[prefix + norm + ".bias"] = (hidden,)
    tensors = {name: rng.normal(0, 0.2, shape).astype(np.float32) for name, shape in shapes.items()}
    tensors["embeddings.position_ids"] = np.arange(config["max_position_embeddings"], dtype=np.int64)[None]
    return tensors


def write_bert(folder: Path, config: dict = TINY_BERT, *, prefix: str = "", seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {prefix + name: value for name, value in bert_tensors(config, seed).items()}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def edit_config(folder: Path, **changes) -> Path:
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return folder


IDS = jnp.array([[2, 7, 9, 4, 11, 3], [2, 5, 3, 0, 0, 0]])
MASK = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])


# Compiled forward passes: on CPU, one compilation costs less than running the ops one by one.
@nnx.jit(static_argnames="deterministic")
def run(model, ids, mask=None, positions=None, deterministic=True):
    if positions is not None:
        return model(ids, mask, positions_BxL=positions, deterministic=deterministic)
    return model(ids, mask, deterministic=deterministic)


# ---------------------------------------------------------------------------------------------------
# BERT


def test_bert_prefixed_checkpoint_loads_same(tmp_path):
    plain = BertModel.from_pretrained(write_bert(tmp_path / "plain"))
    prefixed = BertModel.from_pretrained(write_bert(tmp_path / "prefixed", prefix="bert."))

    np.testing.assert_array_equal(np.asarray(run(plain, IDS, MASK)), np.asarray(run(prefixed, IDS, MASK)))
    assert prefixed.checkpoint_name("encoder.layer.0.attention.self.query") == "bert.encoder.layer.0.attention.self.query"
    weight = np.asarray(plain.encoder.layer[1].output.dense.weight[...])
    np.testing.assert_array_equal(weight, bert_tensors(TINY_BERT)["encoder.layer.1.output.dense.weight"])


def test_bert_padding_leaves_tokens_unchanged(tmp_path):
    model = BertModel.from_pretrained(write_bert(tmp_path / "bert"))
    short = np.asarray(run(model, IDS[1:, :3], MASK[1:, :3]))
    padded = np.asarray(run(model, IDS[1:], MASK[1:]))
    np.testing.assert_allclose(padded[:, :3], short, atol=1e-5)

    pooled = np.asarray(mean_pool(jnp.asarray(padded), MASK[1:]))
    np.testing.assert_allclose(pooled, short.mean(axis=1), atol=1e-5)


def test_bert_classifier_head(tmp_path):
    folder = write_bert(tmp_path / "bert", prefix="bert.")
    model = BertClassifier.from_pretrained(folder, num_classes=3, rngs=nnx.Rngs(0))

    logits = run(model, IDS, MASK)
    assert logits.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(run(model, IDS, MASK)))
    assert not np.allclose(np.asarray(run(model, IDS, MASK, deterministic=False)), np.asarray(logits))

    # Before LoRA conversion the trainable filter selects the head alone, as nnx.Param.
    trainable = dict(nnx.to_flat_state(nnx.state(model, TRAINABLE)))
    assert set(trainable) == {("classifier", "weight"), ("classifier", "bias")}
    assert all(type(variable) is nnx.Param for variable in trainable.values())
    assert 0.005 < float(jnp.std(model.classifier.weight[...])) < 0.05
    encoder_params = dict(nnx.to_flat_state(nnx.state(BertModel.from_pretrained(folder), nnx.Param)))
    loaded_params = dict(nnx.to_flat_state(nnx.state(model.bert, nnx.Param)))
    assert set(loaded_params) == set(encoder_params)
    for path, variable in encoder_params.items():
        np.testing.assert_array_equal(np.asarray(loaded_params[path][...]), np.asarray(variable[...]))


def test_bert_rejects_other_architecture(tmp_path):
    llama_dir = synthetic.write_checkpoint(tmp_path / "llama", "tiny-llama", dtype="float32")
    with pytest.raises(InputError, match="model_type 'llama' is not a BERT model"):
        BertModel.from_pretrained(llama_dir)

    folder = write_bert(tmp_path / "bert")
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({"roberta." + name: value for name, value in tensors.items()}, str(folder / "model.safetensors"))
    with pytest.raises(InputError, match="tensor .embeddings.word_embeddings.weight. not found.*not a BERT checkpoint"):
        BertModel.from_pretrained(folder)


def test_bert_rejects_missing_and_misshapen_tensors(tmp_path):
    folder = write_bert(tmp_path / "bert")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["encoder.layer.1.attention.self.key.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(InputError, match="tensor 'encoder.layer.1.attention.self.key.bias' not found"):
        BertModel.from_pretrained(folder)

    folder = edit_config(write_bert(tmp_path / "wide"), intermediate_size=48)
    with pytest.raises(InputError, match=r"encoder.layer.0.intermediate.dense.bias: shape \(32,\) .* \(48,\) expected"):
        BertModel.from_pretrained(folder)


def test_bert_rejects_invalid_settings(tmp_path):
    folder = write_bert(tmp_path / "bert")
    with pytest.raises(InputError, match="sequence length 17 exceeds max_position_embeddings 16"):
        BertModel.from_pretrained(folder)(jnp.ones((1, 17), jnp.int32))
    with pytest.raises(InputError, match="invalid num_classes 0"):
        BertClassifier.from_pretrained(folder, num_classes=0, rngs=nnx.Rngs(0))
    with pytest.raises(InputError, match="hidden_act 'swish' is not supported"):
        BertModel.from_pretrained(edit_config(folder, hidden_act="swish"))
    with pytest.raises(InputError, match="config.json not found"):
        BertModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------
# LLaMA family


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("llama"), "tiny-llama", dtype="float32")


def test_llama_right_padding_matches_unpadded(llama_dir):
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    ids = jnp.array([[5, 17, 33, 2, 9, 100]])
    full = np.asarray(run(model, ids))
    padded_ids = jnp.concatenate([ids, jnp.zeros((1, 3), jnp.int32)], axis=1)
    padded = np.asarray(run(model, padded_ids, jnp.array([[1] * 6 + [0] * 3])))
    np.testing.assert_allclose(padded[:, :6], full, atol=1e-5)


def test_llama_left_padding_with_positions(llama_dir):
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    ids = jnp.array([[5, 17, 33, 2]])
    full = np.asarray(run(model, ids))
    left_ids = jnp.array([[0, 0, 5, 17, 33, 2]])
    positions = jnp.array([[0, 0, 0, 1, 2, 3]])
    left = np.asarray(run(model, left_ids, jnp.array([[0, 0, 1, 1, 1, 1]]), positions))
    np.testing.assert_allclose(left[:, 2:], full, atol=1e-5)
    assert np.isfinite(left).all()


def test_tied_embeddings_have_no_head(tmp_path):
    qwen = LlamaForCausalLM.from_pretrained(synthetic.write_checkpoint(tmp_path / "qwen2", "tiny-qwen2", dtype="float32"))
    assert qwen.lm_head is None
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None
    assert qwen.model.layers[0].self_attn.o_proj.bias is None
    paths = {path for path, _ in nnx.to_flat_state(nnx.state(qwen))}
    assert ("model", "embed_tokens", "weight") in paths
    assert not any(path[0] == "lm_head" for path in paths)


def test_llama_rejects_other_architecture(tmp_path):
    gpt2_dir = synthetic.write_checkpoint(tmp_path / "gpt2", "tiny-gpt2", dtype="float32")
    with pytest.raises(InputError, match=r"model_type 'gpt2' is not supported; expected one of \('llama', 'mistral', 'qwen2'\)"):
        LlamaForCausalLM.from_pretrained(gpt2_dir)
    with pytest.raises(InputError, match="model_type 'bert' is not supported"):
        LlamaForCausalLM.from_pretrained(write_bert(tmp_path / "bert"))


def test_llama_rejects_missing_and_misshapen_tensors(tmp_path):
    folder = synthetic.write_checkpoint(tmp_path / "llama", "tiny-llama", dtype="bfloat16")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(InputError, match="tensor 'model.layers.1.mlp.up_proj.weight' not found"):
        LlamaForCausalLM.from_pretrained(folder)

    folder = edit_config(synthetic.write_checkpoint(tmp_path / "gqa", "tiny-llama"), num_key_value_heads=4)
    with pytest.raises(InputError, match=r"model.layers.0.self_attn.k_proj.weight: shape \(32, 64\) .* \(64, 64\) expected"):
        LlamaForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize(
    "preset, changes, message",
    [
        ("tiny-llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling .* is not supported"),
        ("tiny-llama", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ("tiny-llama", {"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
        ("tiny-llama", {"hidden_size": "64"}, "hidden_size = '64' is not of type int"),
        ("tiny-qwen2", {"use_sliding_window": True}, "use_sliding_window is not supported"),
        ("tiny-mistral", {"sliding_window": 0}, "sliding_window = 0 must be >= 1"),
    ],
)
def test_llama_rejects_invalid_config(tmp_path, preset, changes, message):
    folder = edit_config(synthetic.write_checkpoint(tmp_path / preset, preset, dtype="float32"), **changes)
    with pytest.raises(InputError, match=message):
        LlamaForCausalLM.from_pretrained(folder)
