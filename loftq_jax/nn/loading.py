"""Filling NNX models from Hugging Face model folders: config.json, safetensors weights and the tokenizer."""

import logging
from pathlib import Path
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from loftq_jax import architectures
from loftq_jax.checkpoint import Checkpoint
from loftq_jax.errors import InputError

logger = logging.getLogger(__name__)

CONFIG_FILE = architectures.CONFIG_FILE
TOKENIZER_FILE = "tokenizer.json"

# Maps a parameter's path in the model ("encoder.layer.0.attention.self.query.weight") to its tensor name in
# the checkpoint, or to None for parameters the checkpoint does not contain (a new classification head).
NameMap = Callable[[str], Optional[str]]


def read_config(model_dir: str | Path) -> dict:
    """Return the parsed config.json of a Hugging Face model folder, which must have one."""
    if not (Path(model_dir) / CONFIG_FILE).is_file():
        raise InputError(f"{model_dir}: {CONFIG_FILE} not found; expected a Hugging Face model folder")
    return architectures.read_model_config(model_dir)


def config_value(config: dict, key: str, kind: type, default=None, *, source: str = CONFIG_FILE):
    """Return config[key] checked to be of `kind`, or `default` when the key is absent or null.

    An int must be >= 1 and not a bool, and a float may be given as an int. A missing key without a default
    raises InputError, as does a value of the wrong type.
    """
    if key not in config or config[key] is None:
        if default is None:
            raise InputError(f"{source}: missing required key {key!r}")
        return default
    value = config[key]
    valid = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is bool:
        valid = isinstance(value, bool)
    if not valid:
        raise InputError(f"{source}: {key} = {value!r} is not of type {kind.__name__}")
    if kind is int and value < 1:
        raise InputError(f"{source}: {key} = {value} must be >= 1")
    return kind(value)


def path_name(path: tuple) -> str:
    """Join an NNX path such as ('encoder', 'layer', 0, 'weight') into 'encoder.layer.0.weight'."""
    return ".".join(str(part) for part in path)


def load_weights(model: nnx.Module, checkpoint: Checkpoint, name_map: NameMap) -> None:
    """Overwrite every `nnx.Param` of `model` that `name_map` names with its checkpoint tensor, in float32.

    Raises InputError, before anything is changed, when a named tensor is missing or has another shape
    than the model built from config.json expects. Tensors the model does not use (BERT's pooler,
    `position_ids` buffers) are ignored and logged.
    """
    plan = []
    for path, variable in nnx.iter_graph(model):
        if not isinstance(variable, nnx.Param):
            continue
        tensor_name = name_map(path_name(path))
        if tensor_name is None:
            continue
        info = checkpoint.tensors.get(tensor_name)
        if info is None:
            files = ", ".join(str(file) for file in checkpoint.files)
            raise InputError(f"tensor {tensor_name!r} not found in {files}; the model's config.json needs it")
        if tuple(info.shape) != tuple(variable.shape):
            raise InputError(
                f"{tensor_name}: shape {tuple(info.shape)} in {info.file.name} does not match "
                f"{tuple(variable.shape)} expected from config.json"
            )
        plan.append((variable, tensor_name))

    for variable, tensor_name in plan:
        variable.set_value(jnp.asarray(np.asarray(checkpoint.load(tensor_name), np.float32)))

    unused = sorted(set(checkpoint.tensors) - {tensor_name for _, tensor_name in plan})
    if unused:
        logger.info("ignored %d checkpoint tensors the model does not use: %s", len(unused), ", ".join(unused[:8]))


def load_tokenizer(model_dir: str | Path, *, max_length: int = 256, pad_length: Optional[int] = None):
    """Return the `tokenizers.Tokenizer` of a model folder's tokenizer.json, truncating at `max_length`.

    Batches are padded to their longest sequence, or to `pad_length` tokens when it is given, because fixed
    shapes avoid one compilation per length under `jax.jit`. The pad token is taken from tokenizer.json's
    own padding settings, else "[PAD]". The default max_length of 256 is where all-MiniLM-L6-v2's model
    card (README.md of its folder) states that input is truncated.
    """
    from tokenizers import Tokenizer

    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise InputError(f"{model_dir}: {TOKENIZER_FILE} not found; a fast tokenizer file is needed")
    tokenizer = Tokenizer.from_file(str(path))
    padding = tokenizer.padding or {}
    pad_token = padding.get("pad_token", "[PAD]")
    pad_id = padding.get("pad_id", tokenizer.token_to_id(pad_token))
    if pad_id is None:
        raise InputError(f"{path}: no padding settings and no {pad_token!r} token; cannot pad batches")
    if pad_length is not None and pad_length < max_length:
        raise InputError(f"pad_length {pad_length} is shorter than max_length {max_length}")
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, length=pad_length)
    return tokenizer


def tokenize(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch of texts and return input_ids_BxL and attention_mask_BxL as int32 arrays."""
    encodings = tokenizer.encode_batch(list(texts))
    ids_BxL = np.array([encoding.ids for encoding in encodings], np.int32)
    mask_BxL = np.array([encoding.attention_mask for encoding in encodings], np.int32)
    return ids_BxL, mask_BxL
