"""Output files of `loftq-jax init`: LoRA adapters in Hugging Face PEFT's layout, a streaming safetensors
writer, and an output folder that appears only once every file in it is complete.
"""

import contextlib
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from loftq_jax.errors import InputError

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
# PeftModel wraps the base model twice (PeftModel.base_model is a LoraModel whose .model is the original),
# so every adapter key starts with this prefix followed by the module's name in the original model.
PEFT_KEY_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------------
# PEFT LoRA layout


def lora_keys(module: str) -> tuple[str, str]:
    """Return the keys of a module's lora_A (r x in) and lora_B (out x r) weights in a PEFT adapter file."""
    return f"{PEFT_KEY_PREFIX}{module}.lora_A.weight", f"{PEFT_KEY_PREFIX}{module}.lora_B.weight"


def lora_tensors(module: str, a: np.ndarray, b: np.ndarray, *, fan_in_fan_out: bool = False) -> dict[str, np.ndarray]:
    """Return a module's adapters under PEFT's keys, given our factors with W ≈ Q + scaling·a·b.

    PEFT computes x·lora_Aᵀ·lora_Bᵀ, so its update is lora_B·lora_A. For nn.Linear, W is (out, in): our
    a (out x r) is its lora_B and our b (r x in) its lora_A. With `fan_in_fan_out`, W is stored (in, out) as
    transformers' Conv1D does and PEFT adds (lora_B·lora_A)ᵀ = lora_Aᵀ·lora_Bᵀ to it, so our a (in x r) is
    lora_Aᵀ and our b (r x out) is lora_Bᵀ.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"{module}: adapter shapes {a.shape} and {b.shape} are not (rows, r) and (r, columns)")
    key_a, key_b = lora_keys(module)
    if fan_in_fan_out:
        return {key_a: np.ascontiguousarray(a.T), key_b: np.ascontiguousarray(b.T)}
    return {key_a: np.ascontiguousarray(b), key_b: np.ascontiguousarray(a)}


def adapter_config(
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    base_model_name_or_path: str,
    loftq_settings: dict[str, Any],
    base_model_class: Optional[str] = None,
    fan_in_fan_out: bool = False,
) -> dict[str, Any]:
    """Return the contents of adapter_config.json for a plain LoRA adapter (no DoRA, no rsLoRA).

    The keys are those that PEFT 0.12's LoraConfig saves. PEFT before 0.13 passes every key of the file to
    LoraConfig and raises TypeError on one it does not know, so our own settings go inside `loftq_config`,
    a free-form dict that PEFT reads only when init_lora_weights is "loftq". init_lora_weights is true
    because the adapters are already initialized: PeftModel.from_pretrained overwrites PEFT's default
    initialization with the saved weights, and "loftq" would make PEFT quantize the backbone again.

    With task_type null, PEFT's AutoPeftModel loads the base model with the transformers class named in
    auto_mapping, so `base_model_class` should be the first of config.json's "architectures".
    `fan_in_fan_out` marks weights stored (in, out), as GPT-2's Conv1D layers are; PEFT 0.12 sets it per
    module anyway (true for Conv1D, false for nn.Linear) and warns when the file says otherwise.
    """
    if rank < 1:
        raise ValueError(f"invalid rank {rank}; expected an integer >= 1")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"invalid alpha {alpha!r}; expected a finite positive number")
    return {
        "alpha_pattern": {},
        "auto_mapping": (
            {"base_model_class": base_model_class, "parent_library": "transformers"} if base_model_class else None
        ),
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": bool(fan_in_fan_out),
        "inference_mode": False,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": dict(loftq_settings),
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "lora_dropout": 0.0,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(target_modules),
        "task_type": None,
        "use_dora": False,
        "use_rslora": False,
    }


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON with a trailing newline, atomically."""
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, allow_nan=False)
            handle.write("\n")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`; once the block ends, flush it to disk and rename it to `path`.

    A reader, or a later run after a crash or kill, therefore finds either the whole file or none. If the
    block raises, the temporary file is removed.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# Safetensors files, read and written one tensor at a time
#
# A safetensors file is an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
# its dtype, shape and [begin, end) byte offsets into the data that follows, then the data. Offsets must be
# contiguous and cover the data exactly, so the header can be written first only when every tensor's byte
# size is known beforehand. That is the case here because Q keeps the dtype and shape of the weight it replaces.


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str] | None, int]:
    """Return a safetensors file's tensor entries, its `__metadata__` (or None) and the offset of its data.

    This checks only the framing. Open the file with `Checkpoint` first, which validates the header and the
    file size with the safetensors library.
    """
    file_size = os.path.getsize(path)
    with open(path, "rb") as handle:
        length_bytes = handle.read(8)
        if len(length_bytes) != 8:
            raise InputError(f"{path}: not a valid safetensors file (shorter than its 8-byte header length)")
        (header_length,) = struct.unpack("<Q", length_bytes)
        if 8 + header_length > file_size:
            raise InputError(f"{path}: not a valid safetensors file (header of {header_length} bytes is truncated)")
        header_bytes = handle.read(header_length)
    try:
        header = json.loads(header_bytes)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not a valid safetensors file (header is not JSON: {error})") from None
    metadata = header.pop("__metadata__", None)
    return header, metadata, 8 + header_length


class SafetensorsWriter:
    """A safetensors file written tensor by tensor in the order of `layout`, so that at most one tensor
    needs to be in memory.

    `layout` lists (name, safetensors dtype such as "F32" or "BF16", shape, byte size). Each write raises
    ValueError unless it is the next tensor of the layout and has exactly its byte size, and `close` raises
    ValueError unless every tensor was written. The file is written under a temporary name and renamed to
    `path` by a successful `close`, so a file at `path` is always complete.
    """

    def __init__(self, path: Path, layout: Sequence[tuple[str, str, Sequence[int], int]], metadata: dict[str, str] | None):
        self.path = Path(path)
        self._layout = list(layout)
        self._next = 0
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for name, dtype, shape, nbytes in self._layout:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes

        # Pad the header with spaces so that the data starts 8-byte aligned, as the safetensors library does.
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)
        self._temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._handle = open(self._temporary, "wb")
        self._handle.write(struct.pack("<Q", len(header_bytes)))
        self._handle.write(header_bytes)

    def write_array(self, name: str, array: np.ndarray) -> None:
        """Write the next tensor from a NumPy array whose bytes are already in the layout's dtype."""
        nbytes = self._expect(name)
        data = np.ascontiguousarray(array)
        if data.nbytes != nbytes:
            raise ValueError(f"{self.path}: tensor {name!r} has {data.nbytes} bytes; expected {nbytes} from the layout")
        # A uint8 view, because the buffer protocol rejects ml_dtypes types such as bfloat16.
        self._handle.write(data.reshape(-1).view(np.uint8).data)
        self._next += 1

    def copy_from(self, name: str, source: Path, data_start: int, entry: dict) -> None:
        """Write the next tensor by copying its raw bytes from a safetensors file, in 64 MiB chunks.

        `data_start` and `entry` come from `read_safetensors_header(source)`. Copying bytes keeps the tensor
        bit for bit, whatever its dtype, and keeps at most one chunk in memory.
        """
        nbytes = self._expect(name)
        begin, end = entry["data_offsets"]
        if end - begin != nbytes:
            raise ValueError(f"{source}: tensor {name!r} has {end - begin} bytes; expected {nbytes} from the layout")
        with open(source, "rb") as handle:
            handle.seek(data_start + begin)
            remaining = nbytes
            while remaining:
                chunk = handle.read(min(remaining, 64 << 20))
                if not chunk:
                    raise InputError(f"{source}: file ends inside the data of tensor {name!r}; is it truncated?")
                self._handle.write(chunk)
                remaining -= len(chunk)
        self._next += 1

    def close(self) -> None:
        try:
            if self._next != len(self._layout):
                missing = [entry[0] for entry in self._layout[self._next :]]
                raise ValueError(f"{self.path}: {len(missing)} tensors never written, first {missing[0]!r}")
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            os.replace(self._temporary, self.path)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the file and remove it unless `close` already completed it."""
        self._handle.close()
        self._temporary.unlink(missing_ok=True)

    def _expect(self, name: str) -> int:
        """Return the byte size of tensor `name`, which must be the next one in the layout."""
        if self._next >= len(self._layout) or self._layout[self._next][0] != name:
            expected = self._layout[self._next][0] if self._next < len(self._layout) else "no more tensors"
            raise ValueError(f"{self.path}: tensor {name!r} written out of order; expected {expected!r}")
        return self._layout[self._next][3]

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


_DTYPE_BITS = re.compile(r"(\d+)")


def dtype_bits(dtype: str) -> int:
    """Return the width in bits of a safetensors dtype name ("BF16" -> 16, "F8_E4M3" -> 8, "BOOL" -> 8)."""
    match = _DTYPE_BITS.search(dtype)
    return int(match.group(1)) if match else 8


# ---------------------------------------------------------------------------------------------------
# Output folder that appears complete or not at all


def check_output_dir(out_dir: Path, *, overwrite: bool, resume: bool = False, protected: Sequence[Path] = ()) -> None:
    """Raise InputError unless `out_dir` may receive output: absent, empty, or non-empty with `overwrite` or `resume`.

    `out_dir` must also not be, or lie inside, any folder of `protected` (such as the input model).
    """
    out_dir = Path(out_dir)
    resolved = out_dir.resolve()
    for folder in protected:
        folder = Path(folder).resolve()
        if resolved == folder or folder in resolved.parents:
            raise InputError(
                f"{out_dir}: output folder must not be the input folder {folder} or inside it; choose another --out"
            )
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (overwrite or resume):
        raise InputError(
            f"{out_dir}: output folder is not empty; pass --overwrite to replace the files that loftq-jax init "
            "writes there (other files are kept), --resume to continue an interrupted run there, or choose another --out"
        )


@contextlib.contextmanager
def staged_output(out_dir: Path, *, last: Sequence[str] = ()) -> Iterator[Path]:
    """Yield an empty staging folder next to `out_dir`, and move its files into `out_dir` when the block ends.

    When `out_dir` does not exist, the staging folder is renamed to it in one step. Otherwise see `publish`.
    If the block raises, the staging folder is removed and `out_dir` is left as it was. The staging folder
    is a sibling so that every rename stays on one file system.
    """
    # Resolved, so that "." or a symbolic link still gets a staging folder beside the real output folder.
    out_dir = Path(out_dir).resolve()
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
        # mkdtemp makes the folder private (0700); the published folder should get the usual permissions.
        staging.chmod(0o777 & ~current_umask())
    except OSError as error:
        raise InputError(f"{out_dir}: cannot create the output folder ({error.strerror})") from None

    try:
        yield staging
        if not out_dir.exists():
            try:
                os.rename(staging, out_dir)
                return
            except OSError:
                # Another process created out_dir after the check; merge file by file below.
                out_dir.mkdir(exist_ok=True)
        publish(staging, out_dir, last=last)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def current_umask() -> int:
    """Return the process's file mode creation mask (os.umask can only read it by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(
    staging: Path, out_dir: Path, *, last: Sequence[str] = (), whole_folders: Sequence[str] = (), remove: Sequence[str] = ()
) -> None:
    """Move the files of `staging` into the existing folder `out_dir`, each with one rename.

    Each file replaces a file of the same name and every other file of `out_dir` is kept. The files named
    in `last` are removed from `out_dir` first and moved in at the end, so that a folder whose `last` files
    exist is complete. The folders named in `whole_folders` replace their namesakes as a whole, so that no
    file of an earlier version stays inside them. The names in `remove` are deleted from `out_dir`.
    """
    for name in last:
        (out_dir / name).unlink(missing_ok=True)
    for name in remove:
        _remove_path(out_dir / name)
    for name in whole_folders:
        if (staging / name).is_dir():
            _replace_folder(staging / name, out_dir / name)

    deferred = []
    for source in sorted(staging.rglob("*")):
        relative = source.relative_to(staging)
        target = out_dir / relative
        if source.is_dir():
            target.mkdir(exist_ok=True)
        elif str(relative) in last:
            deferred.append((source, target))
        else:
            os.replace(source, target)
    for source, target in deferred:
        os.replace(source, target)


def _replace_folder(source: Path, target: Path) -> None:
    """Rename the folder `source` to `target`, moving an existing `target` aside and deleting it after."""
    aside = target.with_name(f".{target.name}.{os.getpid()}.old")
    if target.exists():
        os.replace(target, aside)
    os.replace(source, target)
    _remove_path(aside)


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
