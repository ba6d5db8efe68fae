"""Tests of loftq_jax.nn.lora.convert_to_lora: LoftQ, QLoRA and 16-bit LoRA in memory, `loftq-jax init` outputs,
target selection, rank checks and training only the adapters and the head."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from loftq_jax import InputError, LoftQConfig, QuantConfig, dequantize, loftq, quantize, synthetic
from loftq_jax.checkpoint import Checkpoint
from loftq_jax.init_model import initialize
from loftq_jax.nn import (
    TRAINABLE,
    BertClassifier,
    LlamaForCausalLM,
    Linear,
    LoRAConfig,
    LoRALinear,
    QuantizedLoRALinear,
    QuantizedWeight,
    convert_to_lora,
    requantize,
)

IDS = jnp.array([[5, 17, 33, 2, 9, 100, 7, 1], [3, 3, 250, 8, 0, 0, 0, 0]])
MASK = jnp.array([[1] * 8, [1] * 4 + [0] * 4])
LOFTQ = LoftQConfig(bits=4, rank=4, steps=2, alpha=8.0)


@nnx.jit
def logits(model, ids, mask):
    return model(ids, mask)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("llama"), "tiny-llama", dtype="float32")


def layer_at(model, module: str):
    node = model
    for part in module.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def merged_reference(llama_dir, converted_model, modules):
    """A plain model whose target weights are the converted layers' Q + s·A·B (or W + s·A·B)."""
    reference = LlamaForCausalLM.from_pretrained(llama_dir)
    for module in modules:
        layer = layer_at(converted_model, module)
        base = dequantize(layer.quantized()) if isinstance(layer, QuantizedLoRALinear) else layer.weight[...]
        merged = base.astype(jnp.float32) + layer.scaling * layer.a[...] @ layer.b[...]
        layer_at(reference, module).weight.set_value(merged)
    return reference


# ---------------------------------------------------------------------------------------------------
# In memory


def test_loftq_conversion_equals_merged_weights(llama_dir):
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    original = {name: np.asarray(layer_at(model, name).weight[...]) for name in ("model.layers.1.self_attn.k_proj",)}
    names = convert_to_lora(model, LOFTQ, targets=["k_proj", "down_proj"])

    assert names == [f"model.layers.{i}.{name}" for i in (0, 1) for name in ("mlp.down_proj", "self_attn.k_proj")]
    k_proj = model.model.layers[1].self_attn.k_proj
    assert isinstance(k_proj, QuantizedLoRALinear)
    assert type(model.model.layers[1].self_attn.q_proj) is Linear
    assert k_proj.scaling == 2.0
    # The layer contains exactly what loftq returns for the original weight.
    expected = loftq(original["model.layers.1.self_attn.k_proj"], LOFTQ, out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(k_proj.codes[...]), np.asarray(expected.quantized.codes))
    np.testing.assert_array_equal(np.asarray(k_proj.a[...]), np.asarray(expected.a))

    reference = merged_reference(llama_dir, model, names)
    np.testing.assert_allclose(
        np.asarray(logits(model, IDS, MASK)), np.asarray(logits(reference, IDS, MASK)), atol=1e-5, rtol=0
    )


def test_qlora_conversion_starts_from_quantized_weight(llama_dir):
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    weight = np.asarray(model.model.layers[0].mlp.up_proj.weight[...])
    convert_to_lora(model, LoftQConfig(bits=4, rank=4, steps=0), targets=["up_proj"], rngs=nnx.Rngs(3))

    layer = model.model.layers[0].mlp.up_proj
    assert not np.any(np.asarray(layer.a[...]))
    b = np.asarray(layer.b[...])
    bound = 1 / np.sqrt(64)
    assert np.all(np.abs(b) <= bound)
    assert np.abs(b).max() > 0.9 * bound
    np.testing.assert_array_equal(np.asarray(dequantize(layer.quantized())), np.asarray(dequantize(quantize(jnp.asarray(weight)))))


def test_lora_16_bit_starts_at_base(llama_dir):
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    names = convert_to_lora(model, LoRAConfig(rank=4, alpha=16, base_dtype="bfloat16"), dropout=0.1, rngs=nnx.Rngs(0))

    # Default targets: the 7 linear layers of each of the 2 blocks, not lm_head.
    assert len(names) == 14
    assert "lm_head" not in names
    layer = model.model.layers[1].mlp.gate_proj
    assert isinstance(layer, LoRALinear)
    assert layer.weight[...].dtype == jnp.bfloat16
    assert layer.scaling == 4.0

    reference = merged_reference(llama_dir, model, names)
    np.testing.assert_allclose(
        np.asarray(logits(model, IDS, MASK)), np.asarray(logits(reference, IDS, MASK)), atol=1e-5, rtol=0
    )


def test_rank_above_layer_size_rejected(llama_dir):
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    message = r"model.layers.0.self_attn.k_proj: rank 40 exceeds min\(out, in\) = 32 for shape \(32, 64\)"
    with pytest.raises(InputError, match=message):
        convert_to_lora(model, LoRAConfig(rank=40), targets=["q_proj", "k_proj"])
    with pytest.raises(InputError, match=message):
        convert_to_lora(model, LoftQConfig(rank=40), targets=["k_proj"])
    # Nothing was converted, not even the q_proj layers that allow rank 40.
    assert all(type(module) is not LoRALinear for _, module in nnx.iter_modules(model))


def test_targets_must_match_a_layer(llama_dir):
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    with pytest.raises(InputError, match=r"no linear layer matches targets \['query'\]; the model's linear layers are lm_head, model.layers.N.mlp.down_proj, .*model.layers.N.self_attn.v_proj$"):
        convert_to_lora(model, LoRAConfig(rank=2), targets=["query"])
    with pytest.raises(InputError, match="invalid init"):
        convert_to_lora(model, {"rank": 2})

    names = convert_to_lora(model, LoRAConfig(rank=2), targets=[r"model\.layers\.1\.self_attn\.[qv]_proj", "lm_head"])
    assert names == ["lm_head", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


# ---------------------------------------------------------------------------------------------------
# From `loftq-jax init` outputs


@pytest.fixture(scope="module")
def init_dir(llama_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("init") / "out"
    initialize(llama_dir, out_dir, LOFTQ, targets=["k_proj", "down_proj"])
    return out_dir


def test_init_outputs_give_loftq_codes(llama_dir, init_dir):
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    names = convert_to_lora(model, init_dir)
    in_memory = LlamaForCausalLM.from_pretrained(llama_dir)
    convert_to_lora(in_memory, LOFTQ, targets=["k_proj", "down_proj"])

    assert sorted(names) == sorted(f"model.layers.{i}.{name}" for i in (0, 1) for name in ("self_attn.k_proj", "mlp.down_proj"))
    adapters = load_file(str(init_dir / "adapter_model.safetensors"))
    source = Checkpoint.from_dir(llama_dir)
    for name in names:
        layer, expected = layer_at(model, name), loftq(source.load(f"{name}.weight"), LOFTQ, out_dtype=jnp.float32)
        np.testing.assert_array_equal(np.asarray(layer.codes[...]), np.asarray(expected.quantized.codes), err_msg=name)
        np.testing.assert_array_equal(np.asarray(layer.scales[...]), np.asarray(expected.quantized.scales), err_msg=name)
        np.testing.assert_array_equal(np.asarray(layer.a[...]), adapters[f"base_model.model.{name}.lora_B.weight"])
        np.testing.assert_array_equal(np.asarray(layer.b[...]), adapters[f"base_model.model.{name}.lora_A.weight"])
        assert layer.scaling == 2.0

    np.testing.assert_array_equal(np.asarray(logits(model, IDS, MASK)), np.asarray(logits(in_memory, IDS, MASK)))


def test_init_outputs_with_wrong_quantizer_rejected(llama_dir, init_dir, tmp_path):
    edited = shutil.copytree(init_dir, tmp_path / "edited")
    config = json.loads((edited / "adapter_config.json").read_text())
    config["loftq_config"]["loftq_bits"] = 2
    (edited / "adapter_config.json").write_text(json.dumps(config))

    model = LlamaForCausalLM.from_pretrained(llama_dir)
    with pytest.raises(InputError, match=r"model.layers.0.mlp.down_proj.weight: re-quantizing the stored Q with bits=2"):
        convert_to_lora(model, edited)
    with pytest.raises(InputError, match=r"no adapters for target layers model.layers.0.self_attn.q_proj"):
        convert_to_lora(model, init_dir, targets=["q_proj"])
    with pytest.raises(InputError, match="adapter_config.json not found"):
        convert_to_lora(model, tmp_path)


@pytest.mark.parametrize(
    "config, stored_dtype",
    [
        (QuantConfig(bits=4), np.float32),
        (QuantConfig(bits=2, block_size=32), np.float32),
        (QuantConfig(bits=8, codebook="int"), np.float32),
        (QuantConfig(bits=4, codebook="uniform"), np.float32),
        (QuantConfig(bits=4), ml_dtypes.bfloat16),
    ],
    ids=["nf4", "nf2", "int8", "uniform4", "nf4-bf16"],
)
def test_requantize_gives_same_codes(tmp_path, config, stored_dtype):
    w = (np.random.default_rng(2).standard_t(5, (40, 72)) * 0.02).astype(np.float32)
    quantized = quantize(jnp.asarray(w), config)
    q = np.asarray(dequantize(quantized))
    save_file({"layer.weight": q.astype(stored_dtype)}, str(tmp_path / "model.safetensors"))

    again = requantize(Checkpoint.from_dir(tmp_path), "layer.weight", config)
    np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(quantized.codes))
    if stored_dtype == np.float32:
        np.testing.assert_array_equal(np.asarray(again.scales), np.asarray(quantized.scales))
    else:
        np.testing.assert_allclose(np.asarray(again.scales), np.asarray(quantized.scales), rtol=2**-8)


# ---------------------------------------------------------------------------------------------------
# Training a converted MiniLM classifier


def test_converted_classifier_trains_lora_and_head(count_compiles):
    model = BertClassifier.from_pretrained(num_classes=3, rngs=nnx.Rngs(0))
    names = convert_to_lora(model, LoftQConfig(bits=4, rank=4, steps=1), targets=[r"encoder\.layer\.0\.attention\.self\.(query|value)"])
    assert names == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]
    query = model.bert.encoder.layer[0].attention.self.query
    codes_before = np.asarray(query.codes[...])
    a_before = np.asarray(query.a[...])
    embeddings_before = np.asarray(model.bert.embeddings.word_embeddings.weight[...])

    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=TRAINABLE)
    ids = jnp.array([[101, 1037, 2158, 2003, 5983, 2833, 1012, 102], [101, 7929, 102, 0, 0, 0, 0, 0]])
    mask = (ids > 0).astype(jnp.int32)
    labels = jnp.array([0, 2])

    @nnx.jit
    def train_step(model, optimizer, ids, mask, labels):
        def loss_fn(model):
            logits = model(ids, mask, deterministic=False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))(model)
        optimizer.update(model, grads)
        return loss, grads

    with count_compiles("train_step") as counter:
        first_loss, grads = train_step(model, optimizer, ids, mask, labels)
        second_loss, _ = train_step(model, optimizer, ids, mask, labels)
    assert counter.count == 1

    flat = dict(nnx.to_flat_state(grads))
    lora_paths = {("bert", "encoder", "layer", 0, "attention", "self", name, factor) for name in ("query", "value") for factor in "ab"}
    assert set(flat) == lora_paths | {("classifier", "weight"), ("classifier", "bias")}
    assert all(float(jnp.abs(variable[...]).max()) > 0 for variable in flat.values())
    assert float(second_loss) < float(first_loss)

    np.testing.assert_array_equal(np.asarray(query.codes[...]), codes_before)
    np.testing.assert_array_equal(np.asarray(model.bert.embeddings.word_embeddings.weight[...]), embeddings_before)
    assert not np.array_equal(np.asarray(query.a[...]), a_before)
    assert not any(isinstance(variable, QuantizedWeight) for _, variable in nnx.to_flat_state(nnx.state(model, TRAINABLE)))
