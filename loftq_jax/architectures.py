"""Model families that `loftq-jax init` supports: default LoRA targets, weight layout, embeddings and tied weights.

The family comes from config.json (`model_type`, else the class names in `architectures`). Target names
follow PEFT's `target_modules`; `ALL_LINEAR` selects every linear layer except the output head, as PEFT does.
"""

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Optional, Sequence

from loftq_jax import checkpoint as checkpoint_lib
from loftq_jax.errors import InputError

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
CONFIG_FILE = "config.json"

# A module whose last name part matches is an embedding table, not a linear layer: BERT's
# word_embeddings, LLaMA's embed_tokens, GPT-2's wte and wpe, T5's shared.
_EMBEDDING_NAME = re.compile(r"embed|^(wte|wpe|shared)$")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Facts about one model family that `loftq-jax init` uses."""

    model_type: str
    # PEFT target_modules names converted when no --target is given, matched inside the repeated blocks only.
    default_targets: tuple[str, ...]
    # transformers' bare model class and the attribute under which task classes (…ForCausalLM) hold it.
    base_class: str
    base_model_prefix: str
    # Module names of the token embedding and of the output head that transformers ties to it.
    input_embedding: str
    output_head: str = "lm_head"
    # Other embedding tables, which are never linear targets.
    other_embeddings: tuple[str, ...] = ()
    # transformers' default of tie_word_embeddings when config.json does not set it.
    tied_by_default: bool = False
    # Linear layers stored (in, out), as transformers' Conv1D does, instead of nn.Linear's (out, in).
    conv1d: bool = False


_DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ARCHITECTURES = {
    "bert": Architecture(
        "bert",
        ("query", "key", "value", "dense"),
        "BertModel",
        "bert",
        input_embedding="embeddings.word_embeddings",
        output_head="cls.predictions.decoder",
        other_embeddings=("embeddings.position_embeddings", "embeddings.token_type_embeddings"),
        tied_by_default=True,
    ),
    "llama": Architecture("llama", _DECODER_TARGETS, "LlamaModel", "model", input_embedding="embed_tokens"),
    "mistral": Architecture("mistral", _DECODER_TARGETS, "MistralModel", "model", input_embedding="embed_tokens"),
    "qwen2": Architecture("qwen2", _DECODER_TARGETS, "Qwen2Model", "model", input_embedding="embed_tokens"),
    "gpt2": Architecture(
        "gpt2",
        ("c_attn", "c_proj", "c_fc"),
        "GPT2Model",
        "transformer",
        input_embedding="wte",
        other_embeddings=("wpe",),
        tied_by_default=True,
        conv1d=True,
    ),
}

# Prefixes of transformers class names ("LlamaForCausalLM") for configs without a known model_type.
_CLASS_PREFIXES = {"Bert": "bert", "Llama": "llama", "Mistral": "mistral", "Qwen2": "qwen2", "GPT2": "gpt2"}


def read_model_config(model_dir: str | Path) -> dict:
    """Return the model folder's config.json as a dict, or {} when there is none."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: invalid JSON ({error}); expected a Hugging Face config.json") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def detect_architecture(model_config: dict) -> Optional[Architecture]:
    """Return the family named by config.json's model_type or architectures, or None if it is unknown."""
    model_type = model_config.get("model_type")
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    class_names = model_config.get("architectures") or []
    for class_name in class_names if isinstance(class_names, list) else []:
        for prefix, family in _CLASS_PREFIXES.items():
            # The family's own classes only: Qwen2MoeForCausalLM is another family than Qwen2ForCausalLM.
            if isinstance(class_name, str) and re.fullmatch(rf"{prefix}(Model|For[A-Z]\w*|[A-Z]\w*Heads?Model)", class_name):
                return ARCHITECTURES[family]
    return None


def adapter_prefix(arch: Optional[Architecture], model_config: dict, checkpoint: checkpoint_lib.Checkpoint) -> str:
    """Return what PEFT's module names need in front of the stored tensor names: "" or e.g. "transformer.".

    A task class such as GPT2LMHeadModel contains the bare model under `base_model_prefix`, and transformers
    adds that prefix when it loads a checkpoint saved from the bare model (the Hugging Face GPT-2 files
    name "h.0.attn.c_attn.weight"). PEFT matches adapter keys against the loaded module names, so the
    adapters need the prefix too.
    """
    class_names = model_config.get("architectures") or []
    model_class = class_names[0] if isinstance(class_names, list) and class_names else None
    if arch is None or not isinstance(model_class, str) or model_class == arch.base_class:
        return ""
    prefix = arch.base_model_prefix + "."
    if any(name.startswith(prefix) for name in checkpoint.tensors):
        return ""
    return prefix


def is_embedding(module: str, arch: Optional[Architecture]) -> bool:
    """Return whether a module is an embedding table: a known one of `arch`, or one named like it."""
    if arch is not None:
        for known in (arch.input_embedding, *arch.other_embeddings):
            if checkpoint_lib.matches_target(module, known):
                return True
    return _EMBEDDING_NAME.search(module.rsplit(".", 1)[-1]) is not None


def is_output_head(module: str, arch: Optional[Architecture]) -> bool:
    """Return whether a module is the output head (lm_head, or the family's own) that all-linear leaves out."""
    head = arch.output_head if arch is not None else "lm_head"
    return checkpoint_lib.matches_target(module, head) or module == "lm_head"


# ---------------------------------------------------------------------------------------------------
# Target selection


def select_targets(
    checkpoint: checkpoint_lib.Checkpoint, arch: Optional[Architecture], targets: Optional[Sequence[str]]
) -> list[checkpoint_lib.TensorInfo]:
    """Return the tensors that `targets` names, the family's defaults without targets, or all linear layers.

    Without targets and without a known family this is every 2-D weight inside a repeated transformer block.
    Matched tensors that are not 2-D are returned too, so that callers can report skipping them.
    """
    if targets and ALL_LINEAR in targets:
        if len(targets) > 1:
            raise InputError(f"--target {ALL_LINEAR} cannot be combined with other names; pass it alone")
        return [
            info
            for info in checkpoint.tensors.values()
            if info.name.endswith(".weight")
            and len(info.shape) == 2
            and not is_embedding(checkpoint_lib.module_name(info.name), arch)
            and not is_output_head(checkpoint_lib.module_name(info.name), arch)
        ]
    if targets:
        return checkpoint_lib.select_targets(checkpoint, targets)
    if arch is None:
        return checkpoint_lib.select_targets(checkpoint)
    return checkpoint_lib.select_targets(checkpoint, arch.default_targets, within_blocks=True)


def default_targets_text(arch: Optional[Architecture]) -> str:
    """Describe the default targets of a family for messages."""
    if arch is None:
        return "the default targets (2-D weights of transformer blocks)"
    return f"the default targets of {arch.model_type} ({', '.join(arch.default_targets)})"


# ---------------------------------------------------------------------------------------------------
# Tied weights


@dataclasses.dataclass(frozen=True)
class TiedWeights:
    """Tensor names that share one tensor in the model: `stored` lists those present in the files."""

    stored: tuple[str, ...]
    absent: tuple[str, ...]
    reason: str


def find_tied_weights(
    checkpoint: checkpoint_lib.Checkpoint, arch: Optional[Architecture], model_config: dict
) -> list[TiedWeights]:
    """Return the token embedding and output head when they share one tensor.

    In safetensors files a tie shows in one of two ways: the head is absent and config.json sets
    tie_word_embeddings (or leaves it at the family's default of true), or both names are stored with
    identical bytes.
    """
    embedding = _find_module_weight(checkpoint, arch.input_embedding if arch else None, default="embed_tokens")
    head = _find_module_weight(checkpoint, arch.output_head if arch else None, default="lm_head")
    if embedding is None:
        return []

    tie_setting = model_config.get("tie_word_embeddings", arch.tied_by_default if arch else False)
    if head is None:
        if not tie_setting:
            return []
        head_name = (arch.output_head if arch else "lm_head") + ".weight"
        reason = f"tie_word_embeddings is {'true' if 'tie_word_embeddings' in model_config else 'true by default'}"
        return [TiedWeights((embedding.name,), (head_name,), f"{reason} and {head_name} is not stored")]

    if embedding.shape == head.shape and embedding.dtype == head.dtype and _same_bytes(checkpoint, embedding, head):
        return [TiedWeights((embedding.name, head.name), (), "both are stored with identical bytes")]
    return []


def check_tied_targets(tied: Sequence[TiedWeights], target_names: Sequence[str]) -> None:
    """Raise InputError when a target shares its tensor with another weight.

    A LoRA adapter belongs to one module, but quantizing the shared tensor would replace the other
    module's weight too. transformers re-ties an output head to the embedding on loading, so a quantized
    head alone would be dropped, and a quantized embedding would change the head.
    """
    requested = set(target_names)
    for group in tied:
        hit = [name for name in group.stored if name in requested]
        if not hit:
            continue
        others = [name for name in (*group.stored, *group.absent) if name != hit[0]]
        raise InputError(
            f"{hit[0]} is tied to {', '.join(others)} ({group.reason}): they share one tensor, so it cannot "
            "be a LoRA target; leave it out of --target"
        )


def _find_module_weight(
    checkpoint: checkpoint_lib.Checkpoint, module: Optional[str], *, default: str
) -> Optional[checkpoint_lib.TensorInfo]:
    """Return the `.weight` tensor of the first module that equals or ends with `module` (or `default`)."""
    requested = module or default
    for info in checkpoint.tensors.values():
        if info.name.endswith(".weight") and checkpoint_lib.matches_target(checkpoint_lib.module_name(info.name), requested):
            return info
    return None


def _same_bytes(
    checkpoint: checkpoint_lib.Checkpoint, first: checkpoint_lib.TensorInfo, second: checkpoint_lib.TensorInfo
) -> bool:
    """Compare two same-size tensors' stored bytes, one piece at a time."""
    pieces = zip(checkpoint.iter_bytes(first.name), checkpoint.iter_bytes(second.name))
    return all(piece_first == piece_second for piece_first, piece_second in pieces)
