"""Benchmark one LoRA training step on MiniLM: loftq_jax (Flax NNX + optax) against transformers + PEFT.

Writes results/bench/train_step.json, the "Training step" section of results/bench/README.md and the speed
summary of the top-level README. Needs the PEFT environment: `bash experiments/setup_peft_bench.sh`. Run from
the repository root:

    python3 experiments/bench_train_step.py

Both sides train the same model (all-MiniLM-L6-v2 with a 3-class head) with LoRA r = 16, alpha 16 on every
linear layer of the encoder, dropout 0.1, AdamW and gradient clipping, on one fixed random batch of 32
sequences of 64 tokens, in float32 on the same cores. Each side runs in its own process, one after the other.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import load_average, machine_info, write_results  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = REPO_ROOT / ".bench-venv"
DEFAULT_OUT_DIR = REPO_ROOT / "results" / "bench"
TORCH_WORKER = Path(__file__).resolve().parent / "train_step_torch_worker.py"

# The six linear layers of each encoder block, as PEFT's regular expression over module names.
PEFT_TARGET_REGEX = r".*encoder\.layer\.\d+\..*(query|key|value|dense)"
# loftq_jax settings: 16-bit LoRA is the like-for-like comparison; the quantized bases show the cost of
# dequantizing inside the step.
SETTINGS = {
    "lora_fp32": {"kind": "lora"},
    "qlora_nf4": {"kind": "quantized", "bits": 4},
    "qlora_nf2": {"kind": "quantized", "bits": 2},
}


def base_settings(args: argparse.Namespace) -> dict:
    from loftq_jax.checkpoint import default_model_dir

    return {
        "model_dir": str(default_model_dir()),
        "num_classes": 3,
        "rank": 16,
        "alpha": 16,
        "dropout": 0.1,
        "lora_dropout": 0.1,
        "peft_target_regex": PEFT_TARGET_REGEX,
        "batch_size": args.batch_size,
        "length": args.length,
        "threads": len(os.sched_getaffinity(0)),
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.timed_steps,
    }


# ---------------------------------------------------------------------------------------------------
# loftq_jax side (child process)


def run_jax_child(settings: dict, name: str) -> dict:
    """Time `settings["timed_steps"]` jitted training steps of one loftq_jax setting."""
    from loftq_jax import runtime

    runtime.configure()
    import jax
    import numpy as np
    from flax import nnx

    from loftq_jax import LoftQConfig, data, nn, training

    model = nn.BertClassifier.from_pretrained(settings["model_dir"], num_classes=settings["num_classes"], rngs=nnx.Rngs(0))
    setting = SETTINGS[name]
    if setting["kind"] == "lora":
        init = nn.LoRAConfig(rank=settings["rank"], alpha=settings["alpha"])
    else:
        init = LoftQConfig(bits=setting["bits"], rank=settings["rank"], steps=0, alpha=settings["alpha"])
    nn.convert_to_lora(model, init, dropout=settings["lora_dropout"], rngs=nnx.Rngs(1))

    config = training.TrainConfig(learning_rate=1e-4, batch_size=settings["batch_size"], clip_norm=1.0)
    split = training.split_model(model, nn.TRAINABLE)
    tx = training.make_optimizer(config, total_steps=1000)
    step_fn = training.make_train_step(split.graphdef, tx)

    rng = np.random.default_rng(0)
    batch_size, length = settings["batch_size"], settings["length"]
    batch = data.Batch(
        input_ids_BxL=jax.numpy.asarray(rng.integers(1000, 30000, (batch_size, length)), jax.numpy.int32),
        attention_mask_BxL=jax.numpy.ones((batch_size, length), jax.numpy.int32),
        labels_B=jax.numpy.asarray(rng.integers(0, settings["num_classes"], batch_size), jax.numpy.int32),
        weights_B=jax.numpy.ones((batch_size,), jax.numpy.float32),
    )
    trainable, opt_state = split.trainable, tx.init(split.trainable)

    start = time.perf_counter()
    trainable, opt_state, metrics = step_fn(trainable, opt_state, split.frozen, split.rng_keys, batch, 0)
    jax.block_until_ready(metrics)
    first_step_s = time.perf_counter() - start

    for step in range(1, settings["warmup_steps"]):
        trainable, opt_state, metrics = step_fn(trainable, opt_state, split.frozen, split.rng_keys, batch, step)
    jax.block_until_ready(metrics)
    samples = []
    for step in range(settings["timed_steps"]):
        start = time.perf_counter()
        trainable, opt_state, metrics = step_fn(trainable, opt_state, split.frozen, split.rng_keys, batch, 1000 + step)
        jax.block_until_ready(metrics)
        samples.append(time.perf_counter() - start)

    return {
        "first_step_s": first_step_s,
        "step_samples_s": samples,
        "trainable_parameters": training.count_parameters(split.trainable)[0],
        "frozen_bytes": training.count_parameters(split.frozen)[1],
    }


# ---------------------------------------------------------------------------------------------------
# Parent


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def run_child(command: list[str]) -> dict:
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def render_markdown(results: dict) -> str:
    settings = results["settings"]
    machine = results["machine"]
    torch_side = results["torch"]
    lines = [
        "## Training step: loftq_jax against transformers + PEFT",
        "",
        f"`python3 experiments/bench_train_step.py` on {machine['date_utc']}, {machine['cores_usable']} cores. "
        f"Load average before / after: {results['load_average_before']} / {results['load_average_after']}. "
        f"all-MiniLM-L6-v2 with a 3-class head, LoRA r = {settings['rank']}, alpha {settings['alpha']} on every "
        f"encoder linear layer, dropout {settings['dropout']}, AdamW with clipping, batch {settings['batch_size']} "
        f"x {settings['length']} tokens, float32, median of {settings['timed_steps']} steps after "
        f"{settings['warmup_steps']} warm-up steps. PEFT {torch_side['versions']['peft']}, transformers "
        f"{torch_side['versions']['transformers']}, torch {torch_side['versions']['torch']} on "
        f"{torch_side['threads']} threads.",
        "",
        "| implementation | base weights | step | samples / s | relative to PEFT |",
        "|---|---|---|---|---|",
    ]
    peft_rate = results["samples_per_s"]["peft"]
    lines.append(f"| transformers + PEFT | float32 | {results['median_step_s']['peft']:.3f} s | {peft_rate:.1f} | 1.00x |")
    labels = {"lora_fp32": "float32", "qlora_nf4": "NF4, packed", "qlora_nf2": "NF2, packed"}
    for name, label in labels.items():
        if name not in results["jax"]:
            continue
        rate = results["samples_per_s"][name]
        lines.append(
            f"| loftq_jax | {label} | {results['median_step_s'][name]:.3f} s | {rate:.1f} | {rate / peft_rate:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps after the first")
    parser.add_argument("--timed-steps", type=int, default=20, help="timed steps")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="loftq_jax settings to time")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the PEFT environment")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where train_step.json and README.md go")
    parser.add_argument("--jax-child", help=argparse.SUPPRESS)
    parser.add_argument("--settings-json", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.jax_child:
        print(json.dumps(run_jax_child(json.loads(args.settings_json), args.jax_child)))
        return

    venv_python = args.venv / "bin" / "python"
    if not venv_python.exists():
        raise SystemExit(f"{venv_python} not found; create the PEFT environment with: bash experiments/setup_peft_bench.sh")

    settings = base_settings(args)
    results = {"machine": machine_info(), "load_average_before": load_average(), "settings": settings, "jax": {}}
    print("transformers + PEFT ...", flush=True)
    results["torch"] = run_child([str(venv_python), str(TORCH_WORKER), json.dumps(settings)])
    for name in args.settings:
        print(f"loftq_jax {name} ...", flush=True)
        command = [sys.executable, __file__, "--jax-child", name, "--settings-json", json.dumps(settings)]
        results["jax"][name] = run_child(command)
    results["load_average_after"] = load_average()

    steps = {"peft": results["torch"]["step_samples_s"]} | {name: r["step_samples_s"] for name, r in results["jax"].items()}
    results["median_step_s"] = {name: _median(samples) for name, samples in steps.items()}
    results["samples_per_s"] = {name: settings["batch_size"] / step for name, step in results["median_step_s"].items()}
    for name, rate in results["samples_per_s"].items():
        print(f"  {name}: {rate:.1f} samples/s", flush=True)

    write_results(args.out_dir, "train_step", results, render_markdown(results))


if __name__ == "__main__":
    main()
