"""The output files of `loftq-jax init`, assembled from the per-weight results in its work folder.

Each file is built in the work folder and then renamed into the output folder, adapter_config.json last.
Every output is streamed: at most one tensor, or one batch of packed weights, is in memory at a time.
"""

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from loftq_jax import architectures
from loftq_jax import checkpoint as checkpoint_lib
from loftq_jax import peft_export
from loftq_jax.loftq import LoftQConfig
from loftq_jax.packed_checkpoint import PackedWeight, PackedWriter, directory_size
from loftq_jax.quantize import QuantizedTensor
from loftq_jax.work_folder import WorkFolder

logger = logging.getLogger(__name__)

REPORT_FILE = "loftq_report.json"
PACKED_DIR = "loftq_packed"
# Weights in other formats are not copied into the output: they would hold the original, unquantized values,
# and transformers might load them in place of the quantized model.safetensors.
_OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")


@dataclasses.dataclass(frozen=True)
class Assembly:
    """Everything that the final outputs are built from."""

    checkpoint: checkpoint_lib.Checkpoint
    model_dir: Path
    out_dir: Path
    work: WorkFolder
    targets: Sequence[Any]  # init_model.Target, in target order
    skipped: list[dict[str, Any]]
    config: LoftQConfig
    arch: Optional[architectures.Architecture]
    requested_targets: Optional[list[str]]
    max_memory: Optional[int]
    backbone: bool
    packed: bool
    execution: dict[str, Any]
    started: float  # time.perf_counter() at the start of the run


def assemble(job: Assembly) -> dict[str, Any]:
    """Write every output file into `job.out_dir`, remove the work folder and return the report."""
    for target in job.targets:
        if not job.work.has_part(target.index):
            raise RuntimeError(
                f"{job.work.part_path(target.index)}: result of {target.name} is missing; with several processes "
                "the output folder must be on a file system that all of them share"
            )
    staging = job.work.fresh_assembly_dir()
    entries = [job.work.read_entry(target.index) for target in job.targets]

    stale = []
    if job.backbone:
        backbone_files = write_backbone(job.checkpoint, job.targets, job.work, staging)
        # transformers prefers model.safetensors over an index, so a stale file of the other layout must go.
        stale = [checkpoint_lib.SINGLE_FILE if job.checkpoint.sharded else checkpoint_lib.INDEX_FILE]
    write_adapters(job.targets, job.work, staging / peft_export.ADAPTER_WEIGHTS_FILE)
    packed_info = write_packed(job, staging / PACKED_DIR) if job.packed else None
    copy_model_files(job.model_dir, staging)

    report = {
        "model": str(job.model_dir),
        "out": str(job.out_dir),
        "architecture": job.arch.model_type if job.arch else None,
        "settings": _report_settings(job),
        "weights": entries,
        "skipped": job.skipped,
        "totals": totals(entries, job.config.rank),
        "packed": packed_info,
        "backbone_files": backbone_files if job.backbone else [],
        "execution": job.execution,
        "seconds": time.perf_counter() - job.started,
    }
    peft_export.write_json(staging / REPORT_FILE, report)
    peft_export.write_json(staging / peft_export.ADAPTER_CONFIG_FILE, _adapter_config(job))

    peft_export.publish(
        staging, job.out_dir, last=[peft_export.ADAPTER_CONFIG_FILE], whole_folders=[PACKED_DIR], remove=stale
    )
    job.work.remove()
    return report


def _report_settings(job: Assembly) -> dict[str, Any]:
    config = job.config
    return {
        "bits": config.bits,
        "codebook": config.codebook,
        "block_size": config.block_size,
        "rank": config.rank,
        "alpha": _alpha(config),
        "scaling": config.scaling,
        "iters": config.steps,
        "svd": config.svd,
        "seed": config.seed,
        "oversample": config.oversample,
        "power_iters": config.power_iters,
        "targets": job.requested_targets,
        "max_memory": job.max_memory,
    }


def _alpha(config: LoftQConfig) -> float:
    return float(config.rank) if config.alpha is None else float(config.alpha)


def _adapter_config(job: Assembly) -> dict[str, Any]:
    config = job.config
    # The dequantized backbone sits next to the adapter, so PEFT's AutoPeftModel loads it from there.
    base_model = job.out_dir if job.backbone else job.model_dir
    return peft_export.adapter_config(
        rank=config.rank,
        alpha=_alpha(config),
        target_modules=[target.peft_module for target in job.targets],
        base_model_name_or_path=str(Path(base_model).resolve()),
        loftq_settings={
            "loftq_bits": config.bits,
            "loftq_iter": config.steps,
            "codebook": config.codebook,
            "block_size": config.block_size,
            "svd": config.svd,
        },
        base_model_class=_model_class(job.model_dir),
        fan_in_fan_out=any(target.layout == "conv1d" for target in job.targets),
    )


# ---------------------------------------------------------------------------------------------------
# Backbone


def write_backbone(checkpoint: checkpoint_lib.Checkpoint, targets: Sequence[Any], work: WorkFolder, staging: Path) -> list[str]:
    """Write the backbone with each target replaced by its Q; return the file names written.

    A sharded input (with an index) gives the same shards, tensor for tensor, and a new index. Otherwise
    every input file goes into one model.safetensors.
    """
    index_of = {target.name: target.index for target in targets}
    if checkpoint.sharded:
        shards = {file.name: [name for name, info in checkpoint.tensors.items() if info.file == file] for file in checkpoint.files}
    else:
        shards = {checkpoint_lib.SINGLE_FILE: list(checkpoint.tensors)}

    for file_name, names in shards.items():
        _write_backbone_file(checkpoint, names, index_of, work, staging / file_name)
    if checkpoint.sharded:
        _write_index(checkpoint, shards, staging / checkpoint_lib.INDEX_FILE)
        return [*shards, checkpoint_lib.INDEX_FILE]
    return list(shards)


def _write_backbone_file(checkpoint, names: Sequence[str], index_of: dict[str, int], work: WorkFolder, path: Path) -> None:
    metadata = dict(checkpoint.headers[checkpoint.tensors[names[0]].file][1] or {})
    # transformers refuses to load a safetensors file whose metadata lacks a known "format".
    metadata.setdefault("format", "pt")

    # The sources' file and byte order, stably sorted by dtype width (widest first), so that tensors from
    # several files merged into one keep every tensor aligned to its element size.
    order = sorted(names, key=lambda name: (checkpoint.files.index(checkpoint.tensors[name].file), checkpoint.byte_range(name)[0]))
    order.sort(key=lambda name: -peft_export.dtype_bits(checkpoint.tensors[name].dtype))
    layout = []
    for name in order:
        begin, end = checkpoint.byte_range(name)
        layout.append((name, checkpoint.tensors[name].dtype, checkpoint.tensors[name].shape, end - begin))

    with peft_export.SafetensorsWriter(path, layout, metadata) as writer:
        for name in order:
            info = checkpoint.tensors[name]
            if name in index_of:
                writer.write_array(name, work.read_tensor(index_of[name], "q"))
            else:
                entries, _, data_start = checkpoint.headers[info.file]
                writer.copy_from(name, info.file, data_start, entries[name])


def _write_index(checkpoint, shards: dict[str, list[str]], path: Path) -> None:
    try:
        metadata = dict(json.loads(checkpoint.index_path.read_text()).get("metadata") or {})
    except (AttributeError, TypeError):
        metadata = {}
    total_size = 0
    weight_map = {}
    for file_name, names in shards.items():
        for name in names:
            begin, end = checkpoint.byte_range(name)
            total_size += end - begin
            weight_map[name] = file_name
    metadata["total_size"] = total_size
    peft_export.write_json(path, {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))})


# ---------------------------------------------------------------------------------------------------
# Adapters and packed checkpoint


def write_adapters(targets: Sequence[Any], work: WorkFolder, path: Path) -> None:
    """Write adapter_model.safetensors in PEFT's layout, one module's lora_A and lora_B after the other."""
    layout = []
    for target in targets:
        rows, columns = target.info.shape
        num_out, num_in = (rows, columns) if target.layout == "linear" else (columns, rows)
        rank = work.read_tensor(target.index, "b").shape[0]
        key_a, key_b = peft_export.lora_keys(target.peft_module)
        layout.append((key_a, "F32", (rank, num_in), 4 * rank * num_in))
        layout.append((key_b, "F32", (num_out, rank), 4 * num_out * rank))

    with peft_export.SafetensorsWriter(path, layout, {"format": "pt"}) as writer:
        for target in targets:
            a, b = work.read_tensor(target.index, "a"), work.read_tensor(target.index, "b")
            tensors = peft_export.lora_tensors(target.peft_module, a, b, fan_in_fan_out=target.layout == "conv1d")
            for key, value in tensors.items():
                writer.write_array(key, value)


def write_packed(job: Assembly, path: Path) -> dict[str, Any]:
    """Write the packed orbax checkpoint in batches; return its size next to the 16-bit size of the weights."""
    # A quarter of the budget per batch, because orbax may hold copies of a batch while it writes.
    batch_budget = max(1, (job.max_memory or 2**30) // 4)
    writer = PackedWriter(path)
    batch: dict[str, PackedWeight] = {}
    batch_bytes = codes_and_scales = adapter_bytes = parameters = 0
    for target in job.targets:
        weight = _packed_weight(target, job.work, job.config)
        size = weight.quantized.nbytes + weight.a.nbytes + weight.b.nbytes
        if batch and batch_bytes + size > batch_budget:
            writer.add_batch(batch)
            batch, batch_bytes = {}, 0
        batch[target.name] = weight
        batch_bytes += size
        codes_and_scales += weight.quantized.nbytes
        adapter_bytes += weight.a.nbytes + weight.b.nbytes
        parameters += math.prod(target.info.shape)
    if batch:
        writer.add_batch(batch)
    writer.close()

    size_on_disk = directory_size(path)
    return {
        "folder": PACKED_DIR,
        "bytes": size_on_disk,
        "bytes_16bit": 2 * parameters,
        "fraction_of_16bit": size_on_disk / (2 * parameters),
        "codes_and_scales_bytes": codes_and_scales,
        "adapter_bytes": adapter_bytes,
    }


def _packed_weight(target, work: WorkFolder, config: LoftQConfig) -> PackedWeight:
    arrays = work.read_tensors(target.index)
    quantized = QuantizedTensor(
        codes=arrays["codes"],
        scales=arrays["scales"],
        offsets=arrays.get("offsets"),
        shape=tuple(target.info.shape),
        config=config.quant_config,
    )
    return PackedWeight(quantized, arrays["a"], arrays["b"], target.info.dtype, target.layout)


# ---------------------------------------------------------------------------------------------------
# Other files and the report


def copy_model_files(model_dir: Path, staging: Path) -> None:
    """Copy the model folder's files other than weights (config, tokenizer, README) into `staging`.

    Hidden files and folders (.git, .cache) are left out, and so are safetensors files and indexes, which
    the backbone replaces. Symbolic links, as in the Hugging Face cache, are copied as the files they point to.
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


def _model_class(model_dir: Path) -> Optional[str]:
    """Return the first class of config.json's "architectures" ("BertModel"), or None if there is none."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    try:
        architectures_list = json.loads(path.read_text()).get("architectures")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        logger.warning("%s: cannot read the model class (%s); adapter_config.json gets no auto_mapping", path, error)
        return None
    if isinstance(architectures_list, list) and architectures_list and isinstance(architectures_list[0], str):
        return architectures_list[0]
    return None


def totals(entries: Sequence[dict[str, Any]], rank: int) -> dict[str, Any]:
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
