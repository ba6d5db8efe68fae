"""Synthetic checkpoints with real architectures' tensor names, shapes and config.json, and random weights.

The weights are Student-t samples (5 degrees of freedom, so a few outliers as in trained models) scaled to
a standard deviation of 0.02, the usual initializer range of these architectures. They exercise the
checkpoint readers, writers and timing at real sizes; their quantization errors are not those of trained
weights.
"""

import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from loftq_jax.errors import InputError

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


@dataclasses.dataclass(frozen=True)
class ArchitectureShape:
    """The sizes that fix every tensor shape of a decoder-only model."""

    model_type: str  # "llama", "mistral", "qwen2" or "gpt2"
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    vocab: int
    tie_embeddings: bool = False


PRESETS = {
    "tiny-llama": ArchitectureShape("llama", 2, 64, 176, 4, 2, 256),
    "tiny-qwen2": ArchitectureShape("qwen2", 2, 64, 176, 4, 2, 256, tie_embeddings=True),
    "tiny-mistral": ArchitectureShape("mistral", 2, 64, 176, 4, 2, 256),
    "tiny-gpt2": ArchitectureShape("gpt2", 2, 64, 256, 4, 4, 256, tie_embeddings=True),
    # TinyLlama-1.1B's sizes.
    "llama-1.1b": ArchitectureShape("llama", 22, 2048, 5632, 32, 4, 32000),
    # LLaMA-2-7B's sizes.
    "llama-7b": ArchitectureShape("llama", 32, 4096, 11008, 32, 32, 32000),
}


def tensor_shapes(arch: ArchitectureShape) -> dict[str, tuple[int, ...]]:
    """Return every tensor name and shape of the architecture, in Hugging Face's naming and layout."""
    if arch.model_type == "gpt2":
        return _gpt2_shapes(arch)
    if arch.model_type not in ("llama", "mistral", "qwen2"):
        raise InputError(f"unknown model_type {arch.model_type!r}; expected llama, mistral, qwen2 or gpt2")

    head_dim = arch.hidden // arch.num_heads
    kv_width = arch.num_kv_heads * head_dim
    shapes = {"model.embed_tokens.weight": (arch.vocab, arch.hidden)}
    for layer in range(arch.num_layers):
        prefix = f"model.layers.{layer}"
        shapes[f"{prefix}.input_layernorm.weight"] = (arch.hidden,)
        for name, shape in (("q", (arch.hidden, arch.hidden)), ("k", (kv_width, arch.hidden)), ("v", (kv_width, arch.hidden))):
            shapes[f"{prefix}.self_attn.{name}_proj.weight"] = shape
            if arch.model_type == "qwen2":
                shapes[f"{prefix}.self_attn.{name}_proj.bias"] = shape[:1]
        shapes[f"{prefix}.self_attn.o_proj.weight"] = (arch.hidden, arch.hidden)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (arch.hidden,)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (arch.intermediate, arch.hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (arch.intermediate, arch.hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (arch.hidden, arch.intermediate)
    shapes["model.norm.weight"] = (arch.hidden,)
    if not arch.tie_embeddings:
        shapes["lm_head.weight"] = (arch.vocab, arch.hidden)
    return shapes


def _gpt2_shapes(arch: ArchitectureShape) -> dict[str, tuple[int, ...]]:
    # GPT-2 stores its linear layers as Conv1D, with weights laid out (in, out).
    shapes = {"wte.weight": (arch.vocab, arch.hidden), "wpe.weight": (1024, arch.hidden)}
    for layer in range(arch.num_layers):
        prefix = f"h.{layer}"
        shapes[f"{prefix}.ln_1.weight"] = (arch.hidden,)
        shapes[f"{prefix}.ln_1.bias"] = (arch.hidden,)
        shapes[f"{prefix}.attn.c_attn.weight"] = (arch.hidden, 3 * arch.hidden)
        shapes[f"{prefix}.attn.c_attn.bias"] = (3 * arch.hidden,)
        shapes[f"{prefix}.attn.c_proj.weight"] = (arch.hidden, arch.hidden)
        shapes[f"{prefix}.attn.c_proj.bias"] = (arch.hidden,)
        shapes[f"{prefix}.ln_2.weight"] = (arch.hidden,)
        shapes[f"{prefix}.ln_2.bias"] = (arch.hidden,)
        shapes[f"{prefix}.mlp.c_fc.weight"] = (arch.hidden, arch.intermediate)
        shapes[f"{prefix}.mlp.c_fc.bias"] = (arch.intermediate,)
        shapes[f"{prefix}.mlp.c_proj.weight"] = (arch.intermediate, arch.hidden)
        shapes[f"{prefix}.mlp.c_proj.bias"] = (arch.hidden,)
    shapes["ln_f.weight"] = (arch.hidden,)
    shapes["ln_f.bias"] = (arch.hidden,)
    return shapes


def config_json(arch: ArchitectureShape) -> dict:
    """Return a config.json in the Hugging Face transformers format of the architecture."""
    if arch.model_type == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_layer": arch.num_layers,
            "n_embd": arch.hidden,
            "n_head": arch.num_heads,
            "n_inner": arch.intermediate,
            "n_positions": 1024,
            "vocab_size": arch.vocab,
            "tie_word_embeddings": True,
        }
    class_names = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    return {
        "architectures": [class_names[arch.model_type]],
        "model_type": arch.model_type,
        "num_hidden_layers": arch.num_layers,
        "hidden_size": arch.hidden,
        "intermediate_size": arch.intermediate,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "vocab_size": arch.vocab,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": arch.tie_embeddings,
    }


def random_tensor(rng: np.random.Generator, shape: tuple[int, ...], name: str, dtype) -> np.ndarray:
    """Return a weight-like random tensor; norm weights are ones and biases small."""
    if len(shape) == 1:
        values = np.ones(shape, np.float32) if "norm" in name or "ln_" in name else rng.normal(0, 0.02, shape)
    else:
        values = rng.standard_t(5, size=shape).astype(np.float32) * np.float32(0.02 / np.sqrt(5 / 3))
    return np.asarray(values, np.float32).astype(dtype)


def write_checkpoint(
    out_dir: str | Path,
    arch: ArchitectureShape | str,
    *,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 2**30,
    seed: int = 0,
) -> Path:
    """Write config.json and safetensors files (sharded with an index past `max_shard_bytes`) to `out_dir`."""
    if isinstance(arch, str):
        if arch not in PRESETS:
            raise InputError(f"unknown preset {arch!r}; expected one of {', '.join(PRESETS)}")
        arch = PRESETS[arch]
    if dtype not in DTYPES:
        raise InputError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np_dtype = DTYPES[dtype]
    itemsize = np.dtype(np_dtype).itemsize

    # Cut the tensor list into shards first, so that each shard is generated, written and freed alone.
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    shard_bytes = 0
    for name, shape in tensor_shapes(arch).items():
        size = int(np.prod(shape)) * itemsize
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, shape))
        shard_bytes += size

    weight_map = {}
    total_size = 0
    for index, shard in enumerate(shards):
        file_name = "model.safetensors" if len(shards) == 1 else f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(rng, shape, name, np_dtype) for name, shape in shard}
        save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
        total_size += sum(tensor.nbytes for tensor in tensors.values())
        weight_map.update({name: file_name for name in tensors})
        del tensors

    if len(shards) > 1:
        index_json = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    config = config_json(arch) | {"torch_dtype": dtype}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
