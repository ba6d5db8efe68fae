"""Fine-tuning of Flax NNX classifiers with optax: AdamW on the LoRA adapters and the head, evaluation,
orbax checkpoints that resume with the same data order, metrics as JSON lines, and their plots.

The model is any NNX module called as `model(input_ids_BxL, attention_mask_BxL, *, deterministic)` that
returns logits_BxC. Only the variables that the `trainable` filter selects are differentiated and updated.
"""

import dataclasses
import functools
import json
import logging
import math
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from loftq_jax import data, plots, runtime
from loftq_jax.errors import InputError
from loftq_jax.l4q.layer import QuantParam

logger = logging.getLogger(__name__)

# LoRA adapters (nnx.LoRAParam, a subclass of nnx.Param) and the parameters of the classification head.
# The head's path must contain a part named exactly "classifier".
DEFAULT_TRAINABLE = nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.PathContains("classifier")))

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


# ---------------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of one fine-tuning run. All but the bookkeeping group must match when a run resumes."""

    # Optimizer: AdamW with linear warm-up from 0 and decay to 0 at the last step.
    learning_rate: float = 5e-4  # peak, reached at the end of warm-up
    weight_decay: float = 0.01  # decoupled, and applied only to parameters of 2 or more dimensions
    warmup_fraction: float = 0.1  # of all steps
    decay: Literal["cosine", "linear"] = "cosine"
    clip_norm: float = 1.0  # maximum global norm of the gradient
    # Learning rate of L4Q's quantizer scales and offsets (loftq_jax.l4q.QuantParam) relative to
    # learning_rate. Adam's step size does not depend on the size of the gradient, so LSQ's gradient scaling
    # does not slow these parameters down as it does under SGD.
    quantizer_lr_ratio: float = 1.0

    # Data.
    batch_size: int = 32
    epochs: int = 1
    max_steps: int | None = None  # ends the run before `epochs` are done, and the schedule spans max_steps
    buckets: tuple[int, ...] | None = None  # padded lengths, or None for data.bucket_lengths(max_length)
    seed: int = 0  # of the data order

    # Bookkeeping, free to change between a run and its resume.
    eval_every: int = 0  # steps between evaluations on the dev split, or 0 for one after the last step
    checkpoint_every: int = 100  # steps between checkpoints, and the last step is always saved
    keep_checkpoints: int = 2  # newest checkpoints kept on disk

    def __post_init__(self):
        checks = [
            ("learning_rate", self.learning_rate > 0, "a value > 0"),
            ("weight_decay", self.weight_decay >= 0, "a value >= 0"),
            ("warmup_fraction", 0 <= self.warmup_fraction < 1, "a value in [0, 1)"),
            ("decay", self.decay in ("cosine", "linear"), "'cosine' or 'linear'"),
            ("clip_norm", self.clip_norm > 0, "a value > 0"),
            ("quantizer_lr_ratio", self.quantizer_lr_ratio > 0, "a value > 0"),
            ("batch_size", self.batch_size >= 1, "a value >= 1"),
            ("epochs", self.epochs >= 1, "a value >= 1"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, "None or a value >= 1"),
            ("buckets", self.buckets is None or (len(self.buckets) > 0 and min(self.buckets) >= 1), "None or lengths >= 1"),
            ("eval_every", self.eval_every >= 0, "a value >= 0"),
            ("checkpoint_every", self.checkpoint_every >= 1, "a value >= 1"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, "a value >= 1"),
        ]
        for name, valid, allowed in checks:
            if not valid:
                raise InputError(f"TrainConfig.{name} = {getattr(self, name)!r} is invalid; expected {allowed}")


_BOOKKEEPING_FIELDS = frozenset({"eval_every", "checkpoint_every", "keep_checkpoints"})


def _trajectory_settings(config: TrainConfig) -> dict[str, Any]:
    settings = dataclasses.asdict(config)
    if settings["buckets"] is not None:
        settings["buckets"] = list(settings["buckets"])
    return {key: value for key, value in settings.items() if key not in _BOOKKEEPING_FIELDS}


# ---------------------------------------------------------------------------------------------------------
# Optimizer


def make_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Return the learning rate per step: linear warm-up from 0, then cosine or linear decay to 0."""
    warmup_steps = int(config.warmup_fraction * total_steps)
    if config.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup_steps, decay_steps=total_steps
        )
    decay = optax.linear_schedule(config.learning_rate, 0.0, total_steps - warmup_steps)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, config.learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def _is_variable(node) -> bool:
    return isinstance(node, nnx.Variable)


def _is_quantizer(leaf) -> bool:
    return isinstance(leaf, QuantParam)


def _decay_mask(params):
    # Only matrices are decayed. Pulling biases and LayerNorm scales (1-D) toward 0 shifts and shrinks
    # activations instead of limiting the size of a linear map, and pulling L4Q's quantizer scales and
    # offsets (matrices) toward 0 shrinks and shifts the quantization grid.
    def decayed(leaf) -> bool:
        value = leaf.get_value() if _is_variable(leaf) else leaf
        return jnp.ndim(value) >= 2 and not _is_quantizer(leaf)

    return jax.tree.map(decayed, params, is_leaf=_is_variable)


def _quantizer_mask(params):
    return jax.tree.map(_is_quantizer, params, is_leaf=_is_variable)


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """Return global-norm clipping followed by AdamW (Loshchilov and Hutter, arXiv 1711.05101) on the schedule.

    L4Q's quantizer parameters take steps `config.quantizer_lr_ratio` times the size of the others.
    """
    transforms = [
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(make_schedule(config, total_steps), weight_decay=config.weight_decay, mask=_decay_mask),
    ]
    if config.quantizer_lr_ratio != 1.0:
        transforms.append(optax.masked(optax.scale(config.quantizer_lr_ratio), _quantizer_mask))
    return optax.chain(*transforms)


# ---------------------------------------------------------------------------------------------------------
# Splitting the model


@dataclasses.dataclass(frozen=True)
class SplitModel:
    """A model split into the parts that the train step treats differently."""

    graphdef: nnx.GraphDef
    trainable: nnx.State  # differentiated and updated
    rng_keys: nnx.State  # nnx.RngKey variables, folded with the step number before each step
    frozen: nnx.State  # everything else, passed to the step but never differentiated


def split_model(model: nnx.Module, trainable: nnx.filterlib.Filter = DEFAULT_TRAINABLE) -> SplitModel:
    """Split `model` into trainable variables, RNG keys and frozen variables, checking the trainable part."""
    graphdef, trainable_state, rng_keys, frozen = nnx.split(model, trainable, nnx.RngKey, ...)
    flat = list(nnx.to_flat_state(trainable_state))
    if not flat:
        raise InputError(f"the trainable filter {trainable!r} selects no variable of {type(model).__name__}")
    not_float = [
        "/".join(map(str, path))
        for path, variable in flat
        if not jnp.issubdtype(jnp.asarray(variable.get_value()).dtype, jnp.floating)
    ]
    if not_float:
        raise InputError(
            f"the trainable filter {trainable!r} selects non-float variables {', '.join(not_float)}; "
            f"only floating-point parameters can be trained"
        )
    return SplitModel(graphdef, trainable_state, rng_keys, frozen)


def _fold_keys(rng_keys: nnx.State, step: jax.Array) -> nnx.State:
    # Deriving the dropout keys from the model's initial keys and the step, instead of carrying the keys
    # forward, makes step s draw the same masks in an uninterrupted and in a resumed run.
    return jax.tree.map(lambda key: _as_rbg_key(jax.random.fold_in(key, step)), rng_keys)


def _as_rbg_key(key: jax.Array) -> jax.Array:
    """Return an "rbg" key derived from `key`, so that dropout masks come from XLA's RngBitGenerator.

    Threefry bit generation for dropout took half of a MiniLM training step on the CPU (0.75 s against
    1.63 s a step at batch 32 x 64, measured with jax 0.10.2 on 2 cores).
    """
    if str(jax.random.key_impl(key)) == "rbg":
        return key
    bits = jax.random.key_data(jax.random.fold_in(key, 0)).reshape(-1)
    bits = jnp.concatenate([bits, jax.random.key_data(jax.random.fold_in(key, 1)).reshape(-1)])
    return jax.random.wrap_key_data(bits[:4], impl="rbg")


def count_parameters(state: nnx.State) -> tuple[int, int]:
    """Return the number of elements and of bytes in the arrays of `state`."""
    leaves = [leaf for leaf in jax.tree.leaves(state) if hasattr(leaf, "nbytes")]
    return sum(int(leaf.size) for leaf in leaves), sum(int(leaf.nbytes) for leaf in leaves)


# ---------------------------------------------------------------------------------------------------------
# Steps


def _weighted_cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array, weights_B: jax.Array) -> jax.Array:
    losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC.astype(jnp.float32), labels_B)
    return jnp.sum(losses_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1.0)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation) -> Callable:
    """Return the jitted step (trainable, opt_state, frozen, rng_keys, batch, step) -> (trainable, opt_state, metrics).

    It compiles once per batch shape, so once per bucket length when every batch has `batch_size` rows.
    """
    # NOTE: the step returns only the trainable variables. Any other variable that the forward pass
    # changes (BatchNorm statistics, an nnx.Cache) is discarded, which is right for BERT, which has none.

    def loss_fn(trainable, frozen, rng_keys, batch: data.Batch):
        # Fresh Variables (copy=True) belong to this trace, so the RNG counters that dropout increments can
        # be written; merging the caller's Variables would raise a TraceContextError under `value_and_grad`.
        model = nnx.merge(graphdef, trainable, rng_keys, frozen, copy=True)
        logits_BxC = model(batch.input_ids_BxL, batch.attention_mask_BxL, deterministic=False)
        return _weighted_cross_entropy(logits_BxC, batch.labels_B, batch.weights_B), logits_BxC

    def train_step(trainable, opt_state, frozen, rng_keys, batch: data.Batch, step):
        rng_keys = _fold_keys(rng_keys, step)
        (loss, logits_BxC), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, rng_keys, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)

        correct = jnp.sum((jnp.argmax(logits_BxC, axis=-1) == batch.labels_B) * batch.weights_B)
        metrics = {"loss": loss, "correct": correct, "examples": jnp.sum(batch.weights_B), "grad_norm": optax.tree.norm(grads)}
        return trainable, opt_state, metrics

    return jax.jit(train_step)


def _step_config(config: TrainConfig) -> TrainConfig:
    # Bookkeeping fields do not change the step, so they are reset to keep them out of the cache key.
    return dataclasses.replace(config, eval_every=0, checkpoint_every=1, keep_checkpoints=1)


@functools.lru_cache(maxsize=4)
def _cached_train_step(graphdef: nnx.GraphDef, config: TrainConfig, total_steps: int) -> Callable:
    # Runs of the same architecture and settings in one process (QLoRA against LoftQ, or a resume) share
    # one jitted step and so its compilations, which take much longer than a step on the CPU.
    return make_train_step(graphdef, make_optimizer(config, total_steps))


@functools.partial(jax.jit, static_argnums=0)
def eval_step(graphdef: nnx.GraphDef, states: tuple[nnx.State, ...], batch: data.Batch):
    """Return the per-example cross-entropy and predicted class of a batch, with dropout off."""
    model = nnx.merge(graphdef, *states)
    logits_BxC = model(batch.input_ids_BxL, batch.attention_mask_BxL, deterministic=True)
    losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC.astype(jnp.float32), batch.labels_B)
    return losses_B, jnp.argmax(logits_BxC, axis=-1)


# ---------------------------------------------------------------------------------------------------------
# Evaluation


def macro_f1(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Return the unweighted mean of per-class F1 over the classes present in labels or predictions.

    This matches scikit-learn's `f1_score(average="macro")` without a `labels` argument. A class that is
    predicted but never true, or true but never predicted, counts with F1 = 0.
    """
    classes = np.union1d(labels, predictions)
    if len(classes) == 0:
        return 0.0
    scores = []
    for label in classes:
        true_positives = np.sum((predictions == label) & (labels == label))
        false_positives = np.sum((predictions == label) & (labels != label))
        false_negatives = np.sum((predictions != label) & (labels == label))
        scores.append(2 * true_positives / (2 * true_positives + false_positives + false_negatives))
    return float(np.mean(scores))


@dataclasses.dataclass(frozen=True)
class EvalMetrics:
    """Loss, accuracy and macro-F1 of a model on one split."""

    loss: float  # mean cross-entropy
    accuracy: float
    macro_f1: float
    examples: int


def _evaluate_states(
    graphdef: nnx.GraphDef, states: tuple[nnx.State, ...], split: data.TokenizedSplit, *, batch_size: int, buckets: Sequence[int]
) -> EvalMetrics:
    if len(split) == 0:
        raise InputError("cannot evaluate on an empty split")
    plans = data.plan_batches(split.lengths_N, batch_size=batch_size, buckets=buckets, seed=0, epoch=0, shuffle=False)
    losses, predictions, labels = [], [], []
    for plan in plans:
        batch = data.make_batch(split, plan, batch_size=batch_size)
        losses_B, predictions_B = jax.device_get(eval_step(graphdef, states, batch))
        count = len(plan.indices)
        losses.append(losses_B[:count])
        predictions.append(predictions_B[:count])
        labels.append(batch.labels_B[:count])

    losses, predictions, labels = np.concatenate(losses), np.concatenate(predictions), np.concatenate(labels)
    return EvalMetrics(
        loss=float(np.mean(losses)),
        accuracy=float(np.mean(predictions == labels)),
        macro_f1=macro_f1(labels, predictions),
        examples=len(labels),
    )


def evaluate(
    model: nnx.Module, split: data.TokenizedSplit, *, batch_size: int = 64, buckets: Sequence[int] | None = None
) -> EvalMetrics:
    """Evaluate `model` on every example of `split` with dropout off, in length-bucketed batches."""
    buckets = buckets if buckets is not None else data.bucket_lengths(split.max_length)
    graphdef, state = nnx.split(model)
    return _evaluate_states(graphdef, (state,), split, batch_size=batch_size, buckets=buckets)


# ---------------------------------------------------------------------------------------------------------
# Metrics file and plots


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read the records of a metrics JSON-lines file, skipping a last line cut off by a killed run."""
    path = Path(path)
    records = []
    lines = path.read_text().splitlines() if path.is_file() else []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise InputError(f"{path}, line {number}: invalid JSON in a metrics file") from None
            logger.warning("%s, line %d: skipped an incomplete last record", path, number)
    return records


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line, flushed so that a killed run keeps it."""
    with path.open("a") as file:
        file.write(json.dumps(record) + "\n")


def _rewind_metrics(path: Path, step: int) -> None:
    # A run killed after its last checkpoint logged steps that the resumed run trains again. Dropping them
    # leaves one record per step. Summaries are dropped too, because the resumed run writes its own.
    kept = [record for record in read_metrics(path) if record["kind"] != "summary" and record["step"] <= step]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def _weighted_moving_average(values: np.ndarray, weights: np.ndarray, window: int) -> np.ndarray:
    # Weighted by the examples of each batch, because the last batch of a bucket can hold a single example.
    kernel = np.ones(window)
    return np.convolve(values * weights, kernel, mode="valid") / np.convolve(weights, kernel, mode="valid")


def plot_metrics(records: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write loss.png and accuracy.png: training curves (moving average over 5% of the steps) and dev metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = [record for record in records if record["kind"] == "train"]
    dev = [record for record in records if record["kind"] == "eval" and record["split"] == "dev"]
    window = max(1, round(len(train) / 20))
    steps = np.array([record["step"] for record in train])
    examples = np.array([record["examples"] for record in train], dtype=np.float64)

    paths = []
    for metric, dev_keys in (("loss", ("loss",)), ("accuracy", ("accuracy", "macro_f1"))):
        figure = plots.new_figure(6, 4)
        axes = figure.subplots()
        if train:
            values = _weighted_moving_average(np.array([record[metric] for record in train]), examples, window)
            axes.plot(steps[window - 1 :], values, label=f"train (moving average of {window} steps)", color="tab:blue")
        for key, color in zip(dev_keys, ("tab:orange", "tab:green")):
            if dev:
                axes.plot([r["step"] for r in dev], [r[key] for r in dev], "o-", label=f"dev {key}", color=color)
        axes.set_xlabel("step")
        axes.set_ylabel(metric)
        axes.legend()
        paths.append(plots.save_figure(figure, out_dir / f"{metric}.png"))
    return paths


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def _open_checkpoints(directory: Path, config: TrainConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
    # Naming the handlers up front lets `item_metadata` read the stored shapes before a restore.
    handlers = {"state": ocp.StandardCheckpointHandler(), "progress": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory.absolute(), options=options, item_handlers=handlers)


def _key_name(key) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _shapes_by_path(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(key) for key in path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in flat}


def _check_stored_shapes(manager, step: int, trainable) -> None:
    # Orbax reports a mismatch only midway through a restore and leaves its reads pending. Comparing the
    # metadata first fails cleanly and names the variables.
    stored = _shapes_by_path(manager.item_metadata(step)["state"]["trainable"])
    expected = _shapes_by_path(trainable)
    mismatches = [
        f"{path}: stored {stored.get(path)}, model {expected.get(path)}"
        for path in sorted(stored.keys() | expected.keys())
        if stored.get(path) != expected.get(path)
    ]
    if mismatches:
        raise InputError(
            f"{manager.directory}/{step}: checkpoint does not match this model's trainable variables "
            f"({'; '.join(mismatches[:3])}{', ...' if len(mismatches) > 3 else ''}); "
            f"use another run folder for another model"
        )


def _save_checkpoint(manager, step: int, trainable, opt_state, progress: dict[str, Any]) -> None:
    state = {"trainable": trainable, "opt_state": opt_state}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)))


def _restore_checkpoint(manager, step: int, trainable, opt_state, config: TrainConfig):
    progress = manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))["progress"]
    saved = progress["config"]
    expected = _trajectory_settings(config)
    differing = sorted(key for key in expected.keys() | saved.keys() if saved.get(key) != expected.get(key))
    if differing:
        details = ", ".join(f"{key}: {saved.get(key)!r} saved, {expected.get(key)!r} now" for key in differing)
        raise InputError(
            f"{manager.directory}: checkpoint was written with other settings ({details}); "
            f"use the same TrainConfig or another run folder"
        )

    _check_stored_shapes(manager, step, trainable)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"trainable": trainable, "opt_state": opt_state})
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    return restored["trainable"], restored["opt_state"], progress


# ---------------------------------------------------------------------------------------------------------
# Training loop


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """Outcome of `train`: final dev metrics, timing and memory."""

    steps: int
    resumed_from: int | None  # step of the checkpoint the run started from
    dev: EvalMetrics
    summary: dict[str, Any]  # also written as the last record of metrics.jsonl


def steps_per_epoch(split: data.TokenizedSplit, config: TrainConfig) -> int:
    """Return the number of batches in one epoch, the same for every epoch."""
    buckets = config.buckets if config.buckets is not None else data.bucket_lengths(split.max_length)
    plans = data.plan_batches(split.lengths_N, batch_size=config.batch_size, buckets=buckets, seed=config.seed, epoch=0)
    return len(plans)


def total_steps(split: data.TokenizedSplit, config: TrainConfig) -> int:
    """Return the number of optimizer steps of a run: all epochs, or max_steps if fewer."""
    steps = config.epochs * steps_per_epoch(split, config)
    return min(steps, config.max_steps) if config.max_steps is not None else steps


def _peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _eval_record(step: int, split_name: str, metrics: EvalMetrics) -> dict[str, Any]:
    return {"kind": "eval", "split": split_name, "step": step, **dataclasses.asdict(metrics)}


class _Run:
    """The mutable state of one `train` call: parameters, optimizer state, position, timings and files."""

    def __init__(self, model, train_split, dev_split, config: TrainConfig, run_dir: Path | None, trainable):
        self.config = config
        self.train_split, self.dev_split = train_split, dev_split
        self.epoch_steps = steps_per_epoch(train_split, config)
        self.last_step = total_steps(train_split, config)
        self.parts = split_model(model, trainable)
        self.tx = make_optimizer(config, self.last_step)
        self.schedule = make_schedule(config, self.last_step)
        self.train_step = _cached_train_step(self.parts.graphdef, _step_config(config), self.last_step)

        self.params, self.opt_state = self.parts.trainable, self.tx.init(self.parts.trainable)
        self.step, self.resumed_from = 0, None
        self.step_times: list[float] = []
        self.lengths_seen: set[int] = set()
        self.dev_metrics: dict[int, EvalMetrics] = {}
        self.logged_eval_steps: set[int] = set()

        self.metrics_path, self.manager = None, None
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.metrics_path = run_dir / METRICS_FILE
            self.manager = _open_checkpoints(run_dir / CHECKPOINT_DIR, config)

    def log(self, record: dict[str, Any]) -> None:
        if self.metrics_path is not None:
            append_metrics(self.metrics_path, record)

    def resume(self) -> None:
        """Load the newest checkpoint, if any, and drop the metrics logged after it."""
        if self.manager is None:
            return
        if self.manager.latest_step() is None:
            # A run killed before its first checkpoint starts again from step 0, so the steps it logged go.
            if self.metrics_path.exists():
                _rewind_metrics(self.metrics_path, 0)
            return
        self.resumed_from = self.manager.latest_step()
        self.params, self.opt_state, progress = _restore_checkpoint(
            self.manager, self.resumed_from, self.params, self.opt_state, self.config
        )
        self.step = progress["step"]
        _rewind_metrics(self.metrics_path, self.step)
        self.logged_eval_steps = {r["step"] for r in read_metrics(self.metrics_path) if r["kind"] == "eval"}
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            self.manager.directory, self.step, progress["epoch"], progress["batch"],
        )

    def run_step(self, plan: data.BatchPlan, epoch: int) -> dict[str, Any]:
        """Train on one batch and return its record."""
        batch = data.make_batch(self.train_split, plan, batch_size=self.config.batch_size)
        began = time.perf_counter()
        self.params, self.opt_state, metrics = self.train_step(
            self.params, self.opt_state, self.parts.frozen, self.parts.rng_keys, batch, self.step
        )
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - began

        # The first step at each bucket length may include XLA compilation, so it is left out of the timings.
        first_at_length = plan.length not in self.lengths_seen
        self.lengths_seen.add(plan.length)
        if not first_at_length:
            self.step_times.append(elapsed)
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(f"step {self.step}: training loss is {metrics['loss']}; lower the learning rate")

        record = {
            "kind": "train",
            "step": self.step + 1,  # steps completed
            "epoch": epoch,
            "loss": float(metrics["loss"]),
            "accuracy": float(metrics["correct"] / metrics["examples"]),
            "examples": int(metrics["examples"]),
            "grad_norm": float(metrics["grad_norm"]),  # before clipping
            "learning_rate": float(self.schedule(self.step)),
            "length": plan.length,
            "step_s": elapsed,
            "first_at_length": first_at_length,
        }
        self.step += 1
        self.log(record)
        return record

    def evaluate_dev(self) -> EvalMetrics:
        """Evaluate on the dev split at the current step, logging the result once per step."""
        if self.step not in self.dev_metrics:
            states = (self.params, self.parts.rng_keys, self.parts.frozen)
            self.dev_metrics[self.step] = _evaluate_states(
                self.parts.graphdef, states, self.dev_split, batch_size=self.config.batch_size, buckets=self.config.buckets
            )
        metrics = self.dev_metrics[self.step]
        if self.step not in self.logged_eval_steps:
            self.log(_eval_record(self.step, "dev", metrics))
            self.logged_eval_steps.add(self.step)
            logger.info(
                "step %d: dev loss %.4f, accuracy %.4f, macro-F1 %.4f", self.step, metrics.loss, metrics.accuracy, metrics.macro_f1
            )
        return metrics

    def save(self, epoch: int) -> None:
        progress = {
            "step": self.step,
            "epoch": epoch,
            "batch": self.step - epoch * self.epoch_steps,  # batches of `epoch` already trained on
            "config": _trajectory_settings(self.config),
        }
        _save_checkpoint(self.manager, self.step, self.params, self.opt_state, progress)

    def close(self) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()

    def summary(self, model: nnx.Module) -> dict[str, Any]:
        """Return the closing record: step timings of this call, peak memory and parameter sizes."""
        trainable_count, trainable_bytes = count_parameters(self.params)
        total_count, total_bytes = count_parameters(nnx.state(model, nnx.Not(nnx.RngState)))
        times = self.step_times
        median = statistics.median(times) if times else None
        return {
            "kind": "summary",
            "step": self.step,
            "timed_steps": len(times),  # steps run by this call, less the first at each bucket length
            "untimed_steps": len(self.lengths_seen),
            "median_step_s": median,
            "mean_step_s": statistics.fmean(times) if times else None,
            "examples_per_s": self.config.batch_size / median if times else None,
            "peak_rss_bytes": _peak_rss_bytes(),  # of the whole process since it started
            "trainable_parameters": trainable_count,
            "trainable_bytes": trainable_bytes,
            "total_parameters": total_count,
            "weight_bytes": total_bytes,  # every model array except the RNG state
        }


def train(
    model: nnx.Module,
    train_split: data.TokenizedSplit,
    dev_split: data.TokenizedSplit,
    config: TrainConfig = TrainConfig(),
    *,
    run_dir: str | Path | None = None,
    trainable: nnx.filterlib.Filter = DEFAULT_TRAINABLE,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fine-tune the `trainable` variables of `model` in place and evaluate it on the dev split.

    With `run_dir`, the run appends to `run_dir/metrics.jsonl` and keeps orbax checkpoints of the trainable
    variables, the optimizer state and the data position in `run_dir/checkpoints`. A run started on a
    folder that has a checkpoint resumes from its newest one and visits the remaining batches in the order
    an uninterrupted run would. `on_step` receives each step's record, e.g. to drive a progress bar; an
    exception it raises stops the run like a kill does.
    """
    buckets = config.buckets if config.buckets is not None else data.bucket_lengths(train_split.max_length)
    config = dataclasses.replace(config, buckets=tuple(buckets))
    run = _Run(model, train_split, dev_split, config, Path(run_dir) if run_dir is not None else None, trainable)
    run.resume()
    logger.info(
        "training %d parameters for %d steps (%d an epoch) in buckets %s",
        count_parameters(run.params)[0], run.last_step, run.epoch_steps, config.buckets,
    )

    try:
        while run.step < run.last_step:
            epoch, start = divmod(run.step, run.epoch_steps)
            plans = data.plan_batches(
                train_split.lengths_N, batch_size=config.batch_size, buckets=config.buckets, seed=config.seed, epoch=epoch
            )
            for plan in plans[start : start + run.last_step - run.step]:
                runtime.raise_if_interrupted()
                record = run.run_step(plan, epoch)
                if config.eval_every and run.step % config.eval_every == 0:
                    run.evaluate_dev()
                if run.manager is not None and (run.step % config.checkpoint_every == 0 or run.step == run.last_step):
                    run.save(epoch)
                if on_step is not None:
                    on_step({**record, "total_steps": run.last_step})
    finally:
        run.close()

    nnx.update(model, run.params)
    dev = run.evaluate_dev()
    summary = run.summary(model)
    run.log(summary)
    logger.info(
        "finished at step %d: dev accuracy %.4f, macro-F1 %.4f, median step %.4g s",
        run.step, dev.accuracy, dev.macro_f1, summary["median_step_s"] or math.nan,
    )
    return TrainResult(steps=run.step, resumed_from=run.resumed_from, dev=dev, summary=summary)
