"""A decoder-only LLaMA-family language model (LLaMA, Mistral, Qwen2) in Flax NNX that loads Hugging Face
safetensors checkpoints and returns next-token logits.

    model = LlamaForCausalLM.from_pretrained(model_dir)
    logits_BxLxV = model(input_ids_BxL, attention_mask_BxL, *, deterministic=True)

The architecture is pre-RMSNorm blocks with rotary position embeddings (RoPE, base `rope_theta`),
grouped-query attention (`num_key_value_heads` key/value heads), a SwiGLU feed-forward block, Qwen2's
biases on the query, key and value projections, and `tie_word_embeddings`. Attention is causal and skips
padding (attention_mask 0), and for Mistral it also skips keys `sliding_window` or more positions back, as
transformers 4.44 masks it without a cache. Positions default to 0..L-1 in every row, as transformers
numbers them when no position_ids are given, so left-padded rows are shifted: pass `positions_BxL` for them.

Not supported, and rejected with InputError: `rope_scaling`, Qwen2's `use_sliding_window`, activations
other than SiLU. Attention dropout is not applied; LoRA dropout is.

Module paths equal Hugging Face's module names ("model.layers.0.self_attn.q_proj"), so PEFT-style targets
name layers the same way in both.
"""

import dataclasses
import logging
import math
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from loftq_jax.checkpoint import Checkpoint
from loftq_jax.errors import InputError
from loftq_jax.nn import loading
from loftq_jax.nn.layers import Embedding, Linear, RMSNorm

logger = logging.getLogger(__name__)

MODEL_TYPES = ("llama", "mistral", "qwen2")
# transformers 4.44's MistralConfig uses this window when config.json does not set "sliding_window".
_MISTRAL_DEFAULT_WINDOW = 4096


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The sizes and settings of a LLaMA-family decoder, named as in Hugging Face's config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    # Biases of q_proj, k_proj and v_proj (Qwen2, LLaMA's attention_bias), of o_proj (LLaMA's
    # attention_bias only) and of the feed-forward projections (LLaMA's mlp_bias).
    qkv_bias: bool = False
    output_bias: bool = False
    mlp_bias: bool = False
    # Mistral: a query attends to the keys at most sliding_window - 1 positions back; None means no limit.
    sliding_window: Optional[int] = None

    @classmethod
    def from_dict(cls, config: dict, source: str = loading.CONFIG_FILE) -> "LlamaConfig":
        """Build the config from a parsed config.json; raise InputError for another architecture."""
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise InputError(f"{source}: model_type {model_type!r} is not supported; expected one of {MODEL_TYPES}")
        _check_unsupported(config, model_type, source)

        def get(key, kind, default=None):
            return loading.config_value(config, key, kind, default, source=source)

        hidden, heads = get("hidden_size", int), get("num_attention_heads", int)
        kv_heads = get("num_key_value_heads", int, heads)
        if heads % kv_heads:
            raise InputError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        if "head_dim" not in config and hidden % heads:
            raise InputError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        attention_bias = get("attention_bias", bool, False)
        return cls(
            model_type=model_type,
            vocab_size=get("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", int),
            num_hidden_layers=get("num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=get("head_dim", int, hidden // heads),
            rms_norm_eps=get("rms_norm_eps", float, 1e-6),
            rope_theta=get("rope_theta", float, 10000.0),
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            qkv_bias=model_type == "qwen2" or attention_bias,
            output_bias=model_type == "llama" and attention_bias,
            mlp_bias=model_type == "llama" and get("mlp_bias", bool, False),
            sliding_window=_sliding_window(config, model_type, source),
        )


def _check_unsupported(config: dict, model_type: str, source: str) -> None:
    if config.get("rope_scaling") is not None:
        raise InputError(f"{source}: rope_scaling {config['rope_scaling']!r} is not supported; only plain RoPE is")
    activation = config.get("hidden_act", "silu")
    if activation != "silu":
        raise InputError(f"{source}: hidden_act {activation!r} is not supported; expected 'silu' (SwiGLU)")
    if model_type == "qwen2" and config.get("use_sliding_window"):
        raise InputError(f"{source}: Qwen2's use_sliding_window is not supported; set it to false")


def _sliding_window(config: dict, model_type: str, source: str) -> Optional[int]:
    if model_type != "mistral":
        return None
    if "sliding_window" not in config:
        return _MISTRAL_DEFAULT_WINDOW
    if config["sliding_window"] is None:
        return None
    return loading.config_value(config, "sliding_window", int, source=source)


# ---------------------------------------------------------------------------------------------------
# Rotary position embeddings and attention mask


def rope_cos_sin(positions_BxL: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Return cos and sin (B, L, head_dim) of RoPE (Su et al., 2021, arXiv 2104.09864) in the half-split
    layout of Hugging Face's LLaMA, where dimension i pairs with i + head_dim / 2."""
    inv_freq_K = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_BxLxK = positions_BxL[..., None].astype(jnp.float32) * inv_freq_K
    angles_BxLxD = jnp.concatenate([angles_BxLxK, angles_BxLxK], axis=-1)
    return jnp.cos(angles_BxLxD), jnp.sin(angles_BxLxD)


def apply_rope(x_BxLxHxD: jax.Array, cos_BxLxD: jax.Array, sin_BxLxD: jax.Array) -> jax.Array:
    half = x_BxLxHxD.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxLxHxD[..., half:], x_BxLxHxD[..., :half]], axis=-1)
    return x_BxLxHxD * cos_BxLxD[:, :, None] + rotated * sin_BxLxD[:, :, None]


def attention_mask(padding_BxL: jax.Array, sliding_window: Optional[int]) -> jax.Array:
    """Return the boolean mask (B, 1, 1, L, L) of keys each query may attend to: causal, not padding, and
    for a sliding window fewer than `sliding_window` positions back."""
    length = padding_BxL.shape[1]
    query_Lx1 = jnp.arange(length)[:, None]
    key_1xL = jnp.arange(length)[None, :]
    allowed_LxL = key_1xL <= query_Lx1
    if sliding_window is not None:
        allowed_LxL = allowed_LxL & (key_1xL > query_Lx1 - sliding_window)
    return allowed_LxL[None, None, None] & (padding_BxL[:, None, None, None, :] > 0)


# ---------------------------------------------------------------------------------------------------
# Blocks


class LlamaAttention(nnx.Module):
    def __init__(self, config: LlamaConfig):
        hidden, head_dim = config.hidden_size, config.head_dim
        self.q_proj = Linear(hidden, config.num_attention_heads * head_dim, use_bias=config.qkv_bias)
        self.k_proj = Linear(hidden, config.num_key_value_heads * head_dim, use_bias=config.qkv_bias)
        self.v_proj = Linear(hidden, config.num_key_value_heads * head_dim, use_bias=config.qkv_bias)
        self.o_proj = Linear(config.num_attention_heads * head_dim, hidden, use_bias=config.output_bias)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim

    def __call__(self, x_BxLxD, cos_sin, mask_Bx1x1xLxL, deterministic: bool) -> jax.Array:
        batch, length, _ = x_BxLxD.shape
        groups = self.num_heads // self.num_kv_heads

        def project(layer, num_heads):
            y = layer(x_BxLxD, deterministic=deterministic)
            return y.reshape(batch, length, num_heads, self.head_dim)

        q_BxLxHxK = apply_rope(project(self.q_proj, self.num_heads), *cos_sin)
        k_BxLxNxK = apply_rope(project(self.k_proj, self.num_kv_heads), *cos_sin)
        v_BxLxNxK = project(self.v_proj, self.num_kv_heads)

        # Query head h shares key/value head h // groups, so grouping (N, G) avoids repeating keys and values.
        q_BxLxNxGxK = q_BxLxHxK.reshape(batch, length, self.num_kv_heads, groups, self.head_dim)
        scores = jnp.einsum("bqngk,bsnk->bngqs", q_BxLxNxGxK, k_BxLxNxK) / math.sqrt(self.head_dim)
        scores = jnp.where(mask_Bx1x1xLxL, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_BxLxNxK.dtype)
        context_BxLxNxGxK = jnp.einsum("bngqs,bsnk->bqngk", probs, v_BxLxNxK)
        context_BxLxHK = context_BxLxNxGxK.reshape(batch, length, self.num_heads * self.head_dim)
        return self.o_proj(context_BxLxHK, deterministic=deterministic)


class LlamaMLP(nnx.Module):
    """SwiGLU feed-forward block (Shazeer, 2020, arXiv 2002.05202): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        hidden, intermediate = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(hidden, intermediate, use_bias=config.mlp_bias)
        self.up_proj = Linear(hidden, intermediate, use_bias=config.mlp_bias)
        self.down_proj = Linear(intermediate, hidden, use_bias=config.mlp_bias)

    def __call__(self, x_BxLxD, deterministic: bool) -> jax.Array:
        gate_BxLxF = jax.nn.silu(self.gate_proj(x_BxLxD, deterministic=deterministic))
        up_BxLxF = self.up_proj(x_BxLxD, deterministic=deterministic)
        return self.down_proj(gate_BxLxF * up_BxLxF, deterministic=deterministic)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def __call__(self, x_BxLxD, cos_sin, mask_Bx1x1xLxL, deterministic: bool) -> jax.Array:
        x_BxLxD = x_BxLxD + self.self_attn(self.input_layernorm(x_BxLxD), cos_sin, mask_Bx1x1xLxL, deterministic)
        return x_BxLxD + self.mlp(self.post_attention_layernorm(x_BxLxD), deterministic)


class LlamaModel(nnx.Module):
    def __init__(self, config: LlamaConfig):
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nnx.List([LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ---------------------------------------------------------------------------------------------------
# Language model


class LlamaForCausalLM(nnx.Module):
    """A LLaMA, Mistral or Qwen2 decoder under `model` with an `lm_head` (absent with tied embeddings).

    Built with zero weights; `from_pretrained` builds and loads one from a model folder.
    """

    def __init__(self, config: LlamaConfig):
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, use_bias=False)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "LlamaForCausalLM":
        """Load a Hugging Face LLaMA, Mistral or Qwen2 folder (config.json and safetensors)."""
        source = str(Path(model_dir) / loading.CONFIG_FILE)
        config = LlamaConfig.from_dict(loading.read_config(model_dir), source=source)
        checkpoint = Checkpoint.from_dir(model_dir)
        model = cls(config)
        loading.load_weights(model, checkpoint, model.checkpoint_name)
        if config.tie_word_embeddings and "lm_head.weight" in checkpoint.tensors:
            logger.info("%s: tie_word_embeddings is true, so lm_head.weight is ignored", model_dir)
        return model

    def checkpoint_name(self, path: str) -> Optional[str]:
        """Return the checkpoint tensor or module name of a parameter or module path: the path itself."""
        return path

    def __call__(
        self,
        input_ids_BxL: jax.Array,
        attention_mask_BxL: Optional[jax.Array] = None,
        *,
        positions_BxL: Optional[jax.Array] = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Return next-token logits (B, L, vocab); the mask is 1 for tokens and 0 for padding."""
        batch, length = input_ids_BxL.shape
        if attention_mask_BxL is None:
            attention_mask_BxL = jnp.ones((batch, length), jnp.int32)
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(length), (batch, length))
        cos_sin = rope_cos_sin(positions_BxL, self.config.head_dim, self.config.rope_theta)
        mask_Bx1x1xLxL = attention_mask(attention_mask_BxL, self.config.sliding_window)

        x_BxLxD = self.model.embed_tokens(input_ids_BxL)
        for layer in self.model.layers:
            x_BxLxD = layer(x_BxLxD, cos_sin, mask_Bx1x1xLxL, deterministic)
        x_BxLxD = self.model.norm(x_BxLxD)

        if self.lm_head is not None:
            return self.lm_head(x_BxLxD, deterministic=deterministic)
        embeddings_VxD = self.model.embed_tokens.weight[...]
        logits_NxV = x_BxLxD.reshape(batch * length, -1) @ embeddings_VxD.T
        return logits_NxV.reshape(batch, length, -1)
