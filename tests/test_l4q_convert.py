"""Tests of loftq_jax.l4q.convert: converting a BERT classifier's linear layers to L4Q, training only the
trainable tensors, both backward passes, warm-up, LoftQ initialization and export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loftq_jax import InputError, LoftQConfig, data, loftq, packing, training
from loftq_jax.l4q import (
    FrozenWeight,
    L4QConfig,
    L4QExportedLinear,
    L4QLinear,
    QuantParam,
    convert_to_l4q,
    end_warmup,
    export_l4q,
    fake_quant,
    l4q_layers,
    l4q_linear,
    merged_weight,
    reinit_quantizer,
    warmup_linear,
)
from loftq_jax.nn import TRAINABLE, BertClassifier, BertConfig, Linear, LoRAConfig, convert_to_lora
from loftq_jax.nn.layers import Embedding

IDS = jnp.array([[101, 1037, 2158, 2003, 5983, 2833, 1012, 102], [101, 7929, 102, 0, 0, 0, 0, 0]])
MASK = (IDS > 0).astype(jnp.int32)
TINY = BertConfig(
    vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=16
)


@nnx.jit
def logits(model, ids, mask):
    return model(ids, mask, deterministic=True)


def layer_at(model, module: str):
    node = model.bert
    for part in module.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def tiny_classifier(seed: int = 0) -> BertClassifier:
    """A 2-layer BERT classifier with random weights, small enough to compile a train step in a second."""
    model = BertClassifier(TINY, 3, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, module in nnx.iter_modules(model.bert):
        if isinstance(module, Linear):
            module.weight.set_value(jnp.asarray(rng.standard_normal(module.shape).astype(np.float32) * 0.2))
            module.bias.set_value(jnp.asarray(rng.standard_normal(module.shape[0]).astype(np.float32) * 0.1))
        elif isinstance(module, Embedding):
            module.weight.set_value(jnp.asarray(rng.standard_normal(module.weight.shape).astype(np.float32)))
    return model


def tiny_split(count: int, seed: int) -> data.TokenizedSplit:
    """Token sequences of the tiny vocabulary whose label is the marker token 1 + label at position 1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, count).astype(np.int32)
    lengths = rng.integers(3, 13, count).astype(np.int32)
    token_ids = np.zeros((count, 12), np.int32)
    for row, length in enumerate(lengths):
        token_ids[row, :length] = rng.integers(5, TINY.vocab_size, length)
        token_ids[row, 1] = 1 + labels[row]
    return data.TokenizedSplit(token_ids, lengths, labels, pad_id=0, truncated=0)


def perturb(model, seed: int = 0) -> None:
    """Move every L4Q layer away from its initialization: a nonzero LoRA product and a narrower quantizer range.

    The narrower range clips weights at both ends, so that the clipped branch of the quantizer is exercised.
    """
    rng = np.random.default_rng(seed)
    for _, layer in l4q_layers(model):
        layer.a.set_value(jnp.asarray(rng.standard_normal(layer.a.shape).astype(np.float32) * 0.02))
        layer.scale.set_value(layer.scale[...] * 0.8)
        layer.offset.set_value(layer.offset[...] + 0.5 * layer.scale[...])


def reference_quantized(layer: L4QLinear) -> np.ndarray:
    """Return Q(W0 + s·A·B) of a layer, computed in NumPy float64 from the quantizer's definition.

    A weight whose position lies within 1e-4 of a rounding boundary may round either way in float32, so
    those few take the layer's own value. Every other weight must match the reference.
    """
    config = layer.config
    a, b = np.asarray(layer.a[...], np.float64), np.asarray(layer.b[...], np.float64)
    merged = np.asarray(layer.base[...], np.float64) + config.scaling * a @ b
    group = np.arange(merged.shape[1]) // config.group_size
    scale, offset = np.asarray(layer.scale[...], np.float64)[:, group], np.asarray(layer.offset[...], np.float64)[:, group]
    positions = np.clip((merged - offset) / scale, 0, config.max_code)
    reference = np.round(positions) * scale + offset

    ambiguous = np.abs(positions - np.floor(positions) - 0.5) < 1e-4
    library = np.asarray(fake_quant(merged_weight(layer.base[...], layer.a[...], layer.b[...], config.scaling), layer.scale[...], layer.offset[...], config))
    # Positions are spread over the code axis, so about 2e-4 of them lie that close to a boundary.
    assert ambiguous.mean() < 1e-3
    np.testing.assert_allclose(library[~ambiguous], reference[~ambiguous], rtol=0, atol=1e-6)
    return np.where(ambiguous, library, reference).astype(np.float32)


def plain_reference(plain: BertClassifier, converted: BertClassifier) -> BertClassifier:
    """Set each weight of the unconverted `plain` that `converted` has an L4Q layer for to its Q(W0 + s·A·B)."""
    for name, layer in l4q_layers(converted):
        layer_at(plain, name).weight.set_value(jnp.asarray(reference_quantized(layer)))
    return plain


@pytest.fixture(scope="module")
def minilm_l4q():
    """MiniLM with all 36 encoder linear layers converted (4 bits, groups of 128, r = 4) and perturbed."""
    model = BertClassifier.from_pretrained(num_classes=3, rngs=nnx.Rngs(0))
    names = convert_to_l4q(model, L4QConfig(bits=4, rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    perturb(model)
    return model, names


# ---------------------------------------------------------------------------------------------------
# Conversion of MiniLM


def test_default_targets_match_convert_to_lora(minilm_l4q):
    model, names = minilm_l4q
    lora_model = BertClassifier.from_pretrained(num_classes=3, rngs=nnx.Rngs(0))
    lora_names = convert_to_lora(lora_model, LoRAConfig(rank=4))

    assert names == lora_names
    assert len(names) == 36
    assert names[0] == "encoder.layer.0.attention.output.dense"
    assert all(isinstance(layer, L4QLinear) for _, layer in l4q_layers(model))
    assert [name for name, _ in l4q_layers(model)] == names
    assert type(model.classifier) is Linear
    query = model.bert.encoder.layer[5].attention.self.query
    assert query.config == L4QConfig(bits=4, rank=4, alpha=8.0)
    assert query.custom_backward is True
    assert query.warmup is False
    assert query.scale.shape == (384, 3)


def test_explicit_targets_select_layers():
    model = BertClassifier.from_pretrained(num_classes=3, rngs=nnx.Rngs(0))
    names = convert_to_l4q(model, L4QConfig(rank=2), targets=["query", r"encoder\.layer\.1\.output\.dense"])

    queries = [f"encoder.layer.{i}.attention.self.query" for i in range(6)]
    # nnx.iter_modules order: layer by layer, and attention before output inside a layer.
    assert names == queries[:2] + ["encoder.layer.1.output.dense"] + queries[2:]
    assert isinstance(model.bert.encoder.layer[1].output.dense, L4QLinear)
    assert type(model.bert.encoder.layer[1].attention.output.dense) is Linear
    assert type(model.bert.encoder.layer[0].attention.self.key) is Linear


def test_qlora_init_starts_at_quantized_weight():
    model = BertClassifier.from_pretrained(num_classes=3, rngs=nnx.Rngs(0))
    weight = np.asarray(model.bert.encoder.layer[2].intermediate.dense.weight[...])
    bias = np.asarray(model.bert.encoder.layer[2].intermediate.dense.bias[...])
    convert_to_l4q(model, L4QConfig(bits=2, rank=8), targets=["intermediate.dense"], rngs=nnx.Rngs(3))
    layer = model.bert.encoder.layer[2].intermediate.dense

    np.testing.assert_array_equal(np.asarray(layer.base[...]), weight)
    np.testing.assert_array_equal(np.asarray(layer.bias[...]), bias)
    np.testing.assert_array_equal(np.asarray(layer.a[...]), 0.0)
    assert float(jnp.abs(layer.b[...]).max()) <= 1 / np.sqrt(384)
    # Min-max initialization: each group of 128 inputs spans codes 0 to 3.
    groups = weight.reshape(1536, 3, 128)
    np.testing.assert_allclose(np.asarray(layer.offset[...]), groups.min(axis=-1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(layer.scale[...]), (groups.max(axis=-1) - groups.min(axis=-1)) / 3, rtol=1e-5)


def test_forward_equals_layer_math(minilm_l4q):
    model, names = minilm_l4q
    layer = model.bert.encoder.layer[3].attention.self.value
    x = np.random.default_rng(0).standard_normal((2, 5, 384)).astype(np.float32)
    expected = x @ reference_quantized(layer).T + np.asarray(layer.bias[...])
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), expected, rtol=0, atol=1e-4)

    reference = plain_reference(BertClassifier.from_pretrained(num_classes=3, rngs=nnx.Rngs(0)), model)
    np.testing.assert_allclose(np.asarray(logits(model, IDS, MASK)), np.asarray(logits(reference, IDS, MASK)), rtol=0, atol=1e-5)


def test_export_of_minilm_equals_forward(minilm_l4q):
    model, names = minilm_l4q
    exported = nnx.clone(model)
    sizes = export_l4q(exported)

    assert list(sizes) == names
    # 4-bit codes of a (384, 384) weight and float32 scales and offsets for 3 groups a row.
    assert sizes["encoder.layer.0.attention.self.query"] == 384 * 384 // 2 + 2 * 384 * 3 * 4
    assert sizes["encoder.layer.0.intermediate.dense"] == 1536 * 384 // 2 + 2 * 1536 * 3 * 4
    assert isinstance(exported.bert.encoder.layer[0].attention.self.query, L4QExportedLinear)
    assert not l4q_layers(exported)
    np.testing.assert_allclose(np.asarray(logits(exported, IDS, MASK)), np.asarray(logits(model, IDS, MASK)), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Training a converted classifier


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A tiny classifier converted to 2-bit L4Q and trained for 6 steps, with its state before training."""
    model = tiny_classifier()
    convert_to_l4q(model, L4QConfig(bits=2, group_size=16, rank=4), rngs=nnx.Rngs(1))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState))))
    config = training.TrainConfig(learning_rate=1e-2, batch_size=8, max_steps=6, buckets=(12,), warmup_fraction=0.0)
    result = training.train(model, tiny_split(48, 1), tiny_split(16, 2), config, run_dir=tmp_path_factory.mktemp("run"))
    return model, before, result


def flat_arrays(tree) -> dict[str, np.ndarray]:
    """Return the leaves of a nested dict keyed by their joined path, e.g. 'classifier/weight'."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(getattr(key, "key", key)) for key in path): np.asarray(leaf) for path, leaf in flat}


def test_trainable_filter_selects_l4q_tensors_and_head():
    model = tiny_classifier()
    convert_to_l4q(model, L4QConfig(bits=4, group_size=16, rank=2))
    parts = training.split_model(model, TRAINABLE)
    trainable = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(parts.trainable)}

    layers = [f"bert/encoder/layer/{i}/{name}" for i in range(2) for name in (
        "attention/self/query", "attention/self/key", "attention/self/value", "attention/output/dense",
        "intermediate/dense", "output/dense",
    )]
    expected = {f"{layer}/{field}" for layer in layers for field in ("a", "b", "scale", "offset")}
    assert trainable == expected | {"classifier/weight", "classifier/bias"}
    frozen_types = {type(variable) for _, variable in nnx.to_flat_state(parts.frozen)}
    assert FrozenWeight in frozen_types
    assert QuantParam not in frozen_types


def test_training_changes_only_trainables(trained_tiny):
    model, before, result = trained_tiny
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState))))
    before_flat, after_flat = flat_arrays(before), flat_arrays(after)
    trained_fields = ("/a", "/b", "/scale", "/offset")

    assert result.steps == 6
    assert np.isfinite(result.summary["median_step_s"])
    for path, value in after_flat.items():
        if path.startswith("classifier") or path.endswith(trained_fields):
            assert not np.array_equal(value, before_flat[path]), path
        else:
            np.testing.assert_array_equal(value, before_flat[path], err_msg=path)


def test_export_equals_trained_forward(trained_tiny):
    model, _, _ = trained_tiny
    split = tiny_split(6, 3)
    ids, mask = jnp.asarray(split.token_ids_NxL), jnp.asarray((np.arange(12) < split.lengths_N[:, None]).astype(np.int32))
    trained_logits = np.asarray(logits(model, ids, mask))
    exported = nnx.clone(model)
    sizes = export_l4q(exported)

    np.testing.assert_allclose(np.asarray(logits(exported, ids, mask)), trained_logits, rtol=0, atol=1e-5)
    assert not jax.tree_util.tree_leaves(nnx.state(exported, nnx.LoRAParam))
    # 2-bit codes of a (48, 32) weight, and a float32 scale and offset for each of its 2 groups of 16 a row.
    assert sizes["encoder.layer.0.intermediate.dense"] == packing.packed_size(48 * 32, 2) + 2 * 48 * 2 * 4
    layer = exported.bert.encoder.layer[0].intermediate.dense
    assert layer.codes[...].dtype == jnp.uint8
    assert layer.nbytes == sizes["encoder.layer.0.intermediate.dense"]


def test_custom_backward_matches_autodiff():
    models = {}
    for custom in (True, False):
        models[custom] = tiny_classifier()
        convert_to_l4q(models[custom], L4QConfig(bits=3, group_size=16, rank=4), custom_vjp=custom, rngs=nnx.Rngs(1))
        perturb(models[custom])
    assert l4q_layers(models[False])[0][1].custom_backward is False
    split = tiny_split(8, 4)
    batch = data.make_batch(split, data.BatchPlan(12, np.arange(8)), batch_size=8)

    def gradients(model):
        parts = training.split_model(model)

        def loss(trainable):
            merged = nnx.merge(parts.graphdef, trainable, parts.rng_keys, parts.frozen)
            return jnp.mean(merged(batch.input_ids_BxL, batch.attention_mask_BxL, deterministic=True) ** 2)

        return flat_arrays(nnx.to_pure_dict(jax.jit(jax.grad(loss))(parts.trainable)))

    custom, autodiff = gradients(models[True]), gradients(models[False])
    assert custom.keys() == autodiff.keys()
    for path, value in autodiff.items():
        assert float(np.abs(value).max()) > 0, path
        np.testing.assert_allclose(custom[path], value, rtol=1e-4, atol=1e-5 * float(np.abs(value).max()), err_msg=path)


# ---------------------------------------------------------------------------------------------------
# Warm-up and LoftQ initialization


def test_warmup_then_end_warmup():
    model = tiny_classifier()
    names = convert_to_l4q(model, L4QConfig(bits=4, group_size=16, rank=4), warmup=True, rngs=nnx.Rngs(1))
    perturb(model)
    layer = model.bert.encoder.layer[1].attention.self.key
    x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 32)).astype(np.float32))
    assert all(layer.warmup for _, layer in l4q_layers(model))
    np.testing.assert_array_equal(layer(x), warmup_linear(x, layer.params, layer.config))
    warm_params = layer.params

    assert end_warmup(model) == len(names)
    assert end_warmup(model) == 0

    refitted = reinit_quantizer(warm_params, layer.config)
    np.testing.assert_array_equal(layer.scale[...], refitted.scale)
    np.testing.assert_array_equal(layer(x), l4q_linear(x, refitted, layer.config))


def test_loftq_init_uses_loftq_factors():
    model = tiny_classifier()
    weight = np.asarray(model.bert.encoder.layer[0].attention.self.value.weight[...])
    loftq_config = LoftQConfig(bits=4, rank=4, steps=2, block_size=16, alpha=8.0)
    convert_to_l4q(model, L4QConfig(bits=4, group_size=16, rank=4, alpha=8.0), targets=["value"], init=loftq_config)
    layer = model.bert.encoder.layer[0].attention.self.value

    expected = loftq(weight, loftq_config)
    np.testing.assert_array_equal(np.asarray(layer.base[...]), np.asarray(expected.q))
    np.testing.assert_array_equal(np.asarray(layer.a[...]), np.asarray(expected.a))
    np.testing.assert_array_equal(np.asarray(layer.b[...]), np.asarray(expected.b))
    merged = np.asarray(expected.q) + 2.0 * np.asarray(expected.a) @ np.asarray(expected.b)
    assert np.linalg.norm(weight - merged) < np.linalg.norm(weight - np.asarray(expected.q))


# ---------------------------------------------------------------------------------------------------
# Invalid input


def test_invalid_arguments_rejected():
    model = tiny_classifier()
    with pytest.raises(InputError, match="invalid config"):
        convert_to_l4q(model, LoRAConfig(rank=2))
    with pytest.raises(InputError, match="invalid init 'lora'; expected 'qlora' or a LoftQConfig"):
        convert_to_l4q(model, L4QConfig(rank=2), init="lora")
    with pytest.raises(InputError, match="LoftQ rank 4 and scaling 1.0 differ from L4Q rank 2 and scaling 1.0"):
        convert_to_l4q(model, L4QConfig(rank=2), init=LoftQConfig(rank=4))
    with pytest.raises(InputError, match=r"no linear layer matches targets \['pooler'\]; the model's linear layers are encoder.layer.N"):
        convert_to_l4q(model, L4QConfig(rank=2), targets=["pooler"])
    with pytest.raises(InputError, match="has no L4QLinear layer to export"):
        export_l4q(model)


def test_rank_above_layer_size_leaves_model_unchanged():
    model = tiny_classifier()
    message = r"encoder.layer.0.attention.output.dense: rank 40 exceeds min\(out, in\) = 32 for shape \(32, 32\)"
    with pytest.raises(InputError, match=message):
        convert_to_l4q(model, L4QConfig(rank=40))
    assert not l4q_layers(model)
