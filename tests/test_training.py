import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from loftq_jax import data, training
from loftq_jax.errors import InputError
from loftq_jax.l4q import L4QConfig, L4QLinear

VOCAB = 48
CLASSES = 3
MAX_LENGTH = 16
BUCKETS = (8, 16)


class LoRADense(nnx.Module):
    """A frozen kernel plus a trainable low-rank update, the way the quantized LoRA layers split them."""

    def __init__(self, features: int, rank: int, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (features, features)) / np.sqrt(features))
        self.lora_a = nnx.LoRAParam(jax.random.normal(rngs.params(), (features, rank)) / np.sqrt(features))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, features)))

    def __call__(self, x_BxD):
        return x_BxD @ self.kernel + (x_BxD @ self.lora_a) @ self.lora_b


class TinyClassifier(nnx.Module):
    """Embedding, masked mean pooling, a LoRA layer, dropout and a "classifier" head."""

    def __init__(self, seed: int = 0, features: int = 16):
        rngs = nnx.Rngs(params=seed, dropout=seed + 1)
        self.embed = nnx.Embed(VOCAB, features, rngs=rngs)
        self.dense = LoRADense(features, 4, rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.classifier = nnx.Linear(features, CLASSES, rngs=rngs)

    def __call__(self, input_ids_BxL, attention_mask_BxL, *, deterministic: bool):
        h_BxLxD = self.embed(input_ids_BxL)
        mask_BxLx1 = attention_mask_BxL[..., None].astype(h_BxLxD.dtype)
        pooled_BxD = (h_BxLxD * mask_BxLx1).sum(1) / jnp.maximum(mask_BxLx1.sum(1), 1.0)
        hidden_BxD = jnp.tanh(self.dense(pooled_BxD))
        return self.classifier(self.dropout(hidden_BxD, deterministic=deterministic))


def synthetic_split(count: int, seed: int) -> data.TokenizedSplit:
    """Token sequences whose label is the marker token (1 + label) repeated among random filler tokens."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count).astype(np.int32)
    lengths = rng.integers(3, MAX_LENGTH + 1, count).astype(np.int32)
    token_ids = np.zeros((count, MAX_LENGTH), dtype=np.int32)
    for row, (label, length) in enumerate(zip(labels, lengths)):
        tokens = rng.integers(10, VOCAB, length)
        markers = rng.random(length) < 0.4
        markers[0] = True
        tokens[markers] = 1 + label
        token_ids[row, :length] = tokens
    return data.TokenizedSplit(token_ids, lengths, labels, pad_id=0, truncated=0)


@pytest.fixture(scope="module")
def splits():
    return synthetic_split(72, seed=1), synthetic_split(40, seed=2)


CONFIG = training.TrainConfig(
    learning_rate=0.05, batch_size=8, epochs=3, buckets=BUCKETS, eval_every=10, checkpoint_every=5, warmup_fraction=0.1
)


def leaves(state) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state)]


def train_records(path) -> list[dict]:
    records = training.read_metrics(path)
    return [{key: value for key, value in r.items() if key not in ("step_s", "first_at_length")} for r in records if r["kind"] == "train"]


# ---------------------------------------------------------------------------------------------------------
# Splitting and the optimizer


def test_default_filter_selects_lora_and_head():
    parts = training.split_model(TinyClassifier())
    trainable_paths = sorted("/".join(map(str, path)) for path, _ in nnx.to_flat_state(parts.trainable))
    frozen_paths = sorted("/".join(map(str, path)) for path, _ in nnx.to_flat_state(parts.frozen))

    assert trainable_paths == ["classifier/bias", "classifier/kernel", "dense/lora_a", "dense/lora_b"]
    assert "dense/kernel" in frozen_paths
    assert "embed/embedding" in frozen_paths
    assert [type(v).__name__ for _, v in nnx.to_flat_state(parts.rng_keys)] == ["RngKey"]


def test_filter_selecting_nothing_is_rejected():
    with pytest.raises(InputError, match="selects no variable"):
        training.split_model(TinyClassifier(), nnx.PathContains("missing"))


def test_filter_selecting_integers_is_rejected():
    with pytest.raises(InputError, match="non-float variables dropout/rngs/count"):
        training.split_model(TinyClassifier(), nnx.Any(nnx.LoRAParam, nnx.RngCount))


def test_cosine_schedule_warms_up_and_decays():
    config = training.TrainConfig(learning_rate=1.0, warmup_fraction=0.2, decay="cosine")
    schedule = training.make_schedule(config, 10)
    values = [float(schedule(step)) for step in range(11)]

    assert values[0] == 0.0
    assert values[1] == pytest.approx(0.5)
    assert values[2] == pytest.approx(1.0)
    assert values[6] == pytest.approx(0.5)  # halfway through the 8 decay steps
    assert values[10] == pytest.approx(0.0, abs=1e-7)


def test_linear_schedule_decays_to_zero():
    config = training.TrainConfig(learning_rate=2.0, warmup_fraction=0.2, decay="linear")
    schedule = training.make_schedule(config, 10)

    assert [round(float(schedule(step)), 6) for step in range(11)] == [0.0, 1.0, 2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25, 0.0]


def test_optimizer_clips_global_norm():
    config = training.TrainConfig(clip_norm=0.5, weight_decay=0.0)
    tx = training.make_optimizer(config, 100)
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    grads = {"w": jnp.full((3, 4), 10.0), "b": jnp.full(4, 10.0)}
    _, opt_state = tx.update(grads, tx.init(params), params)

    adam_state = opt_state[1][0]
    # After one step, Adam's second moment is (1 - b2) * g², so it recovers the clipped gradient.
    clipped = jax.tree.map(lambda nu: jnp.sqrt(nu / (1 - 0.999)), adam_state.nu)
    assert float(optax.tree.norm(clipped)) == pytest.approx(0.5, rel=1e-4)


def test_weight_decay_skips_vectors():
    config = training.TrainConfig(learning_rate=1.0, warmup_fraction=0.0, weight_decay=0.1, decay="linear")
    tx = training.make_optimizer(config, 10)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)

    np.testing.assert_allclose(updates["w"], -0.1 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], np.zeros(2))


def _l4q_state():
    layer = L4QLinear.from_weight(0.02 * jnp.ones((4, 8)), L4QConfig(bits=4, group_size=4, rank=2), rngs=nnx.Rngs(0))
    return nnx.state(layer, nnx.LoRAParam)


def test_quantizer_steps_scaled_by_ratio():
    config = training.TrainConfig(learning_rate=1.0, warmup_fraction=0.0, weight_decay=0.0, decay="linear", quantizer_lr_ratio=0.1)
    tx = training.make_optimizer(config, 10)
    params = _l4q_state()
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)

    # Adam's first step is -lr * sign(g) for every element, whatever the size of g.
    np.testing.assert_allclose(updates["a"][...], -np.ones_like(updates["a"][...]), rtol=1e-4)
    np.testing.assert_allclose(updates["scale"][...], -0.1 * np.ones_like(updates["scale"][...]), rtol=1e-4)
    np.testing.assert_allclose(updates["offset"][...], -0.1 * np.ones_like(updates["offset"][...]), rtol=1e-4)


def test_weight_decay_skips_quantizer():
    config = training.TrainConfig(learning_rate=1.0, warmup_fraction=0.0, weight_decay=0.1, decay="linear")
    tx = training.make_optimizer(config, 10)
    params = _l4q_state()
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)

    np.testing.assert_allclose(updates["a"][...], -0.1 * params["a"][...], rtol=1e-6)
    np.testing.assert_array_equal(updates["scale"][...], np.zeros_like(params["scale"][...]))
    np.testing.assert_array_equal(updates["offset"][...], np.zeros_like(params["offset"][...]))


def test_invalid_config_names_field():
    with pytest.raises(InputError, match=r"TrainConfig.decay = 'step' is invalid; expected 'cosine' or 'linear'"):
        training.TrainConfig(decay="step")
    with pytest.raises(InputError, match="TrainConfig.warmup_fraction"):
        training.TrainConfig(warmup_fraction=1.0)
    with pytest.raises(InputError, match=r"TrainConfig.quantizer_lr_ratio = 0.0 is invalid; expected a value > 0"):
        training.TrainConfig(quantizer_lr_ratio=0.0)


# ---------------------------------------------------------------------------------------------------------
# Metrics


def test_macro_f1_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 0, 1, 1, 2, 2])
    # F1 per class: 0 -> 2*2/(4+0+1) = 0.8; 1 -> 2*1/(2+1+1) = 0.5; 2 -> 2*1/(2+1+0) = 2/3.
    assert training.macro_f1(labels, predictions) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_macro_f1_counts_predicted_only_class():
    assert training.macro_f1(np.array([0, 0]), np.array([0, 1])) == pytest.approx((2 / 3 + 0.0) / 2)


def test_evaluate_counts_every_example(splits):
    _, dev = splits
    metrics = training.evaluate(TinyClassifier(), dev, batch_size=16, buckets=BUCKETS)

    assert metrics.examples == len(dev)
    assert 0.0 <= metrics.accuracy <= 1.0
    # The untrained head is near uniform: the loss is close to ln 3.
    assert metrics.loss == pytest.approx(np.log(3), abs=0.3)


def test_evaluate_ignores_padding_rows(splits):
    _, dev = splits
    model = TinyClassifier()
    # One example per batch and 39 padding rows: the padding copies must not change the result.
    single = training.evaluate(model, dev, batch_size=1, buckets=BUCKETS)
    padded = training.evaluate(model, dev, batch_size=40, buckets=BUCKETS)

    assert padded.examples == len(dev)
    assert single.examples == len(dev)
    assert padded.accuracy == single.accuracy
    assert padded.loss == pytest.approx(single.loss, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Training


def test_training_learns_and_freezes_base(splits, tmp_path):
    train_split, dev_split = splits
    model = TinyClassifier()
    # Copies to NumPy, because the states of nnx.split share their Variables with the model.
    frozen_before = leaves(training.split_model(model).frozen)
    lora_b_before = np.asarray(model.dense.lora_b.get_value())
    result = training.train(model, train_split, dev_split, CONFIG, run_dir=tmp_path)

    assert result.steps == 27  # 3 epochs of 9 batches
    assert result.dev.accuracy >= 0.9
    for before, after in zip(frozen_before, leaves(training.split_model(model).frozen)):
        np.testing.assert_array_equal(after, before)
    assert np.abs(np.asarray(model.dense.lora_b.get_value()) - lora_b_before).max() > 1e-3


def test_metrics_file_and_summary(splits, tmp_path):
    train_split, dev_split = splits
    result = training.train(TinyClassifier(), train_split, dev_split, dataclasses.replace(CONFIG, epochs=1), run_dir=tmp_path)
    records = training.read_metrics(tmp_path / training.METRICS_FILE)

    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(1, 10))
    assert {r["length"] for r in records if r["kind"] == "train"} <= set(BUCKETS)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [9]  # eval_every 10 > 9 steps: only the final one
    summary = records[-1]
    assert summary == result.summary
    assert summary["kind"] == "summary"
    assert summary["trainable_parameters"] == 16 * 4 + 4 * 16 + 16 * 3 + 3
    assert summary["total_parameters"] == summary["trainable_parameters"] + VOCAB * 16 + 16 * 16
    assert summary["weight_bytes"] == 4 * summary["total_parameters"]
    assert summary["peak_rss_bytes"] > 50 * 2**20
    assert summary["timed_steps"] + summary["untimed_steps"] == 9
    assert summary["median_step_s"] > 0


def test_train_step_compiles_once_per_bucket(splits, count_compiles):
    train_split, dev_split = splits
    with count_compiles("train_step") as counter:
        # A learning rate of its own, so that no other test has compiled this step yet.
        config = dataclasses.replace(CONFIG, epochs=2, learning_rate=0.0123)
        training.train(TinyClassifier(), train_split, dev_split, config)
        training.train(TinyClassifier(seed=5), train_split, dev_split, config)
    assert counter.count == len(BUCKETS)


class Killed(Exception):
    pass


def kill_after(step: int):
    def on_step(record):
        if record["step"] == step:
            raise Killed

    return on_step


def test_resumed_run_matches_uninterrupted_run(splits, tmp_path):
    train_split, dev_split = splits
    whole_model = TinyClassifier()
    whole = training.train(whole_model, train_split, dev_split, CONFIG, run_dir=tmp_path / "whole")

    # Killed at step 12 in the second epoch; the newest checkpoint is step 10, so steps 11 and 12 run twice.
    with pytest.raises(Killed):
        training.train(TinyClassifier(), train_split, dev_split, CONFIG, run_dir=tmp_path / "killed", on_step=kill_after(12))
    resumed_model = TinyClassifier()
    resumed = training.train(resumed_model, train_split, dev_split, CONFIG, run_dir=tmp_path / "killed")

    assert resumed.resumed_from == 10
    assert resumed.steps == whole.steps == 27
    # Same compiled steps on the same inputs on the CPU: the results are bitwise equal, not just close.
    for expected, actual in zip(leaves(nnx.state(whole_model, nnx.Param)), leaves(nnx.state(resumed_model, nnx.Param))):
        np.testing.assert_array_equal(actual, expected)
    assert resumed.dev == whole.dev
    assert train_records(tmp_path / "killed" / training.METRICS_FILE) == train_records(tmp_path / "whole" / training.METRICS_FILE)


def test_resume_rejects_other_settings(splits, tmp_path):
    train_split, dev_split = splits
    config = dataclasses.replace(CONFIG, epochs=1)
    training.train(TinyClassifier(), train_split, dev_split, config, run_dir=tmp_path)

    with pytest.raises(InputError, match=r"other settings \(learning_rate: 0.05 saved, 0.01 now\)"):
        training.train(TinyClassifier(), train_split, dev_split, dataclasses.replace(config, learning_rate=0.01), run_dir=tmp_path)


def test_resume_rejects_other_model(splits, tmp_path):
    train_split, dev_split = splits
    config = dataclasses.replace(CONFIG, epochs=1)
    training.train(TinyClassifier(), train_split, dev_split, config, run_dir=tmp_path)

    message = r"does not match this model's trainable variables \(classifier/kernel/value: stored \(\(16, 3\), 'float32'\), model \(\(8, 3\), 'float32'\)"
    with pytest.raises(InputError, match=message):
        training.train(TinyClassifier(features=8), train_split, dev_split, config, run_dir=tmp_path)


def test_resume_of_finished_run_trains_nothing(splits, tmp_path):
    train_split, dev_split = splits
    config = dataclasses.replace(CONFIG, epochs=1)
    first = training.train(TinyClassifier(), train_split, dev_split, config, run_dir=tmp_path)
    again = training.train(TinyClassifier(), train_split, dev_split, config, run_dir=tmp_path)
    records = training.read_metrics(tmp_path / training.METRICS_FILE)

    assert again.resumed_from == 9
    assert again.dev == first.dev
    assert [r["step"] for r in records if r["kind"] == "eval"] == [9]
    assert [r["kind"] for r in records].count("summary") == 1


def test_nan_loss_stops_training(splits):
    train_split, dev_split = splits
    model = TinyClassifier()
    model.dense.kernel.set_value(jnp.full((16, 16), jnp.nan))

    with pytest.raises(FloatingPointError, match="step 0: training loss is nan"):
        training.train(model, train_split, dev_split, CONFIG)


def test_metrics_reader_skips_cut_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "train", "step": 1}) + "\n" + '{"kind": "tr')

    assert training.read_metrics(path) == [{"kind": "train", "step": 1}]


def test_plots_are_written(tmp_path):
    records = [{"kind": "train", "step": s, "loss": 1.0 / s, "accuracy": 1 - 1.0 / s, "examples": 8} for s in range(1, 30)]
    records += [{"kind": "eval", "split": "dev", "step": s, "loss": 0.5, "accuracy": 0.8, "macro_f1": 0.7} for s in (10, 20)]
    paths = training.plot_metrics(records, tmp_path)

    assert [path.name for path in paths] == ["loss.png", "accuracy.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
