"""A BERT encoder in Flax NNX that loads Hugging Face `BertModel` checkpoints such as all-MiniLM-L6-v2, with a
sequence-classification head and sentence embeddings by mean pooling.

Call signatures, with B the batch size, L the sequence length and C the number of classes:

    encoder = BertModel.from_pretrained(model_dir)                # model_dir=None: the packaged MiniLM
    hidden_BxLxD = encoder(input_ids_BxL, attention_mask_BxL, *, deterministic=True)
    embeddings_BxD = sentence_embeddings(encoder, input_ids_BxL, attention_mask_BxL)

    model = BertClassifier.from_pretrained(model_dir, num_classes=3, rngs=nnx.Rngs(0))
    logits_BxC = model(input_ids_BxL, attention_mask_BxL, *, deterministic: bool)

The classifier pools by the mean over non-pad tokens, not by the [CLS] token: all-MiniLM-L6-v2 was trained
as a sentence encoder with mean pooling, and its pooler weights were never trained for that use. The head is
dropout (config's `classifier_dropout`, else `hidden_dropout_prob`) and a `Linear` named `classifier`
whose parameters are `nnx.Param`. After `loftq_jax.nn.convert_to_lora`, `TRAINABLE` selects what to train:
the adapters (`nnx.LoRAParam`) and the head.

Module paths equal Hugging Face's module names ("encoder.layer.0.attention.self.query", under "bert." in
`BertClassifier`), so PEFT-style targets name layers the same way in both.
"""

import dataclasses
import functools
import math
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from loftq_jax.checkpoint import Checkpoint, default_model_dir
from loftq_jax.errors import InputError
from loftq_jax.nn import loading
from loftq_jax.nn.layers import Embedding, LayerNorm, Linear

# The parameters to train in a `BertClassifier` after LoRA conversion: adapters and the classification head.
TRAINABLE = nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.PathContains("classifier")))

_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}
# Checkpoints saved from BertModel have no prefix; those saved from BertFor* task models put the encoder
# under "bert.".
_CHECKPOINT_PREFIXES = ("", "bert.")
_EMBEDDING_TENSOR = "embeddings.word_embeddings.weight"


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The sizes and settings of a BERT encoder, named as in Hugging Face's config.json."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    # None: the head uses hidden_dropout_prob, as transformers' BertForSequenceClassification does.
    classifier_dropout: Optional[float] = None

    @classmethod
    def from_dict(cls, config: dict, source: str = loading.CONFIG_FILE) -> "BertConfig":
        """Build the config from a parsed config.json; raise InputError for another architecture."""
        model_type = config.get("model_type")
        if model_type != "bert":
            raise InputError(f"{source}: model_type {model_type!r} is not a BERT model; expected 'bert'")
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise InputError(f"{source}: position_embedding_type {position_type!r} is not supported; expected 'absolute'")

        def get(key, kind, default=None):
            return loading.config_value(config, key, kind, default, source=source)

        result = cls(
            vocab_size=get("vocab_size", int),
            hidden_size=get("hidden_size", int),
            num_hidden_layers=get("num_hidden_layers", int),
            num_attention_heads=get("num_attention_heads", int),
            intermediate_size=get("intermediate_size", int),
            hidden_act=get("hidden_act", str, "gelu"),
            layer_norm_eps=get("layer_norm_eps", float, 1e-12),
            max_position_embeddings=get("max_position_embeddings", int, 512),
            type_vocab_size=get("type_vocab_size", int, 2),
            hidden_dropout_prob=get("hidden_dropout_prob", float, 0.1),
            attention_probs_dropout_prob=get("attention_probs_dropout_prob", float, 0.1),
            classifier_dropout=None if config.get("classifier_dropout") is None else get("classifier_dropout", float),
        )
        if result.hidden_act not in _ACTIVATIONS:
            raise InputError(f"{source}: hidden_act {result.hidden_act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
        if result.hidden_size % result.num_attention_heads:
            raise InputError(
                f"{source}: hidden_size {result.hidden_size} is not a multiple of num_attention_heads "
                f"{result.num_attention_heads}"
            )
        return result


# ---------------------------------------------------------------------------------------------------
# Encoder blocks


def _dropout(rate: float, rngs: Optional[nnx.Rngs]) -> nnx.Dropout:
    return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


class BertEmbeddings(nnx.Module):
    def __init__(self, config: BertConfig, rngs: Optional[nnx.Rngs]):
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.dropout = _dropout(config.hidden_dropout_prob, rngs)

    def __call__(self, ids_BxL, token_types_BxL, deterministic: bool) -> jax.Array:
        positions_L = jnp.arange(ids_BxL.shape[1])
        x_BxLxD = self.word_embeddings(ids_BxL) + self.position_embeddings(positions_L)[None]
        x_BxLxD = x_BxLxD + self.token_type_embeddings(token_types_BxL)
        return self.dropout(self.LayerNorm(x_BxLxD), deterministic=deterministic)


class BertSelfAttention(nnx.Module):
    def __init__(self, config: BertConfig, rngs: Optional[nnx.Rngs]):
        dim = config.hidden_size
        self.query = Linear(dim, dim)
        self.key = Linear(dim, dim)
        self.value = Linear(dim, dim)
        self.dropout = _dropout(config.attention_probs_dropout_prob, rngs)
        self.num_heads = config.num_attention_heads

    def __call__(self, x_BxLxD, mask_BxL, deterministic: bool) -> jax.Array:
        batch, length, dim = x_BxLxD.shape
        head_dim = dim // self.num_heads

        def heads(layer):
            return layer(x_BxLxD, deterministic=deterministic).reshape(batch, length, self.num_heads, head_dim)

        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = heads(self.query), heads(self.key), heads(self.value)
        scores_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK) / math.sqrt(head_dim)
        scores_BxHxLxL = jnp.where(mask_BxL[:, None, None, :] > 0, scores_BxHxLxL, jnp.finfo(scores_BxHxLxL.dtype).min)
        probs_BxHxLxL = self.dropout(jax.nn.softmax(scores_BxHxLxL, axis=-1), deterministic=deterministic)
        context_BxLxHxK = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxLxL, v_BxLxHxK)
        return context_BxLxHxK.reshape(batch, length, dim)


class BertSelfOutput(nnx.Module):
    """The attention's output projection, dropout, residual and post-LayerNorm."""

    def __init__(self, config: BertConfig, rngs: Optional[nnx.Rngs]):
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.dropout = _dropout(config.hidden_dropout_prob, rngs)

    def __call__(self, x_BxLxD, residual_BxLxD, deterministic: bool) -> jax.Array:
        x_BxLxD = self.dropout(self.dense(x_BxLxD, deterministic=deterministic), deterministic=deterministic)
        return self.LayerNorm(x_BxLxD + residual_BxLxD)


class BertAttention(nnx.Module):
    def __init__(self, config: BertConfig, rngs: Optional[nnx.Rngs]):
        # Named `self` because Hugging Face's module names ("attention.self.query") are the target names.
        self.self = BertSelfAttention(config, rngs)
        self.output = BertSelfOutput(config, rngs)

    def __call__(self, x_BxLxD, mask_BxL, deterministic: bool) -> jax.Array:
        return self.output(self.self(x_BxLxD, mask_BxL, deterministic), x_BxLxD, deterministic)


class BertIntermediate(nnx.Module):
    def __init__(self, config: BertConfig):
        self.dense = Linear(config.hidden_size, config.intermediate_size)
        self.activation = _ACTIVATIONS[config.hidden_act]

    def __call__(self, x_BxLxD, deterministic: bool) -> jax.Array:
        return self.activation(self.dense(x_BxLxD, deterministic=deterministic))


class BertOutput(nnx.Module):
    """The feed-forward block's down projection, dropout, residual and post-LayerNorm."""

    def __init__(self, config: BertConfig, rngs: Optional[nnx.Rngs]):
        self.dense = Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.dropout = _dropout(config.hidden_dropout_prob, rngs)

    def __call__(self, x_BxLxF, residual_BxLxD, deterministic: bool) -> jax.Array:
        x_BxLxD = self.dropout(self.dense(x_BxLxF, deterministic=deterministic), deterministic=deterministic)
        return self.LayerNorm(x_BxLxD + residual_BxLxD)


class BertLayer(nnx.Module):
    def __init__(self, config: BertConfig, rngs: Optional[nnx.Rngs]):
        self.attention = BertAttention(config, rngs)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config, rngs)

    def __call__(self, x_BxLxD, mask_BxL, deterministic: bool) -> jax.Array:
        x_BxLxD = self.attention(x_BxLxD, mask_BxL, deterministic)
        return self.output(self.intermediate(x_BxLxD, deterministic), x_BxLxD, deterministic)


class BertEncoder(nnx.Module):
    def __init__(self, config: BertConfig, rngs: Optional[nnx.Rngs]):
        self.layer = nnx.List([BertLayer(config, rngs) for _ in range(config.num_hidden_layers)])

    def __call__(self, x_BxLxD, mask_BxL, deterministic: bool) -> jax.Array:
        for layer in self.layer:
            x_BxLxD = layer(x_BxLxD, mask_BxL, deterministic)
        return x_BxLxD


# ---------------------------------------------------------------------------------------------------
# Models


class BertModel(nnx.Module):
    """BERT's embeddings and encoder, returning the last hidden states (no pooler).

    Built with zero weights; `from_pretrained` builds and loads one from a model folder. Dropout layers need
    `rngs` (with a "dropout" or "default" stream) only when called with deterministic=False.
    """

    def __init__(self, config: BertConfig, *, rngs: Optional[nnx.Rngs] = None):
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs)
        self.encoder = BertEncoder(config, rngs)
        self.checkpoint_prefix = ""

    @classmethod
    def from_pretrained(cls, model_dir: Optional[str | Path] = None, *, rngs: Optional[nnx.Rngs] = None) -> "BertModel":
        """Load a Hugging Face BERT folder (config.json and safetensors); None loads all-MiniLM-L6-v2."""
        model_dir = default_model_dir() if model_dir is None else Path(model_dir)
        config = BertConfig.from_dict(loading.read_config(model_dir), source=str(Path(model_dir) / loading.CONFIG_FILE))
        checkpoint = Checkpoint.from_dir(model_dir)
        model = cls(config, rngs=rngs)
        model.checkpoint_prefix = _checkpoint_prefix(checkpoint)
        loading.load_weights(model, checkpoint, model.checkpoint_name)
        return model

    def checkpoint_name(self, path: str) -> Optional[str]:
        """Return the checkpoint tensor or module name of a parameter or module path of this model."""
        return self.checkpoint_prefix + path

    def __call__(
        self,
        input_ids_BxL: jax.Array,
        attention_mask_BxL: Optional[jax.Array] = None,
        *,
        token_type_ids_BxL: Optional[jax.Array] = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Return the last hidden states (B, L, hidden); the mask is 1 for tokens and 0 for padding."""
        if input_ids_BxL.shape[1] > self.config.max_position_embeddings:
            raise InputError(
                f"sequence length {input_ids_BxL.shape[1]} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}; truncate the input"
            )
        if attention_mask_BxL is None:
            attention_mask_BxL = jnp.ones_like(input_ids_BxL)
        if token_type_ids_BxL is None:
            token_type_ids_BxL = jnp.zeros_like(input_ids_BxL)
        x_BxLxD = self.embeddings(input_ids_BxL, token_type_ids_BxL, deterministic)
        return self.encoder(x_BxLxD, attention_mask_BxL, deterministic)


class BertClassifier(nnx.Module):
    """A `BertModel` under `bert`, mean pooling over non-pad tokens, dropout and a linear `classifier` head.

    The head is drawn from N(0, 0.02²) with `rngs.params()`; the same `rngs` feeds the dropout layers.
    """

    def __init__(self, config: BertConfig, num_classes: int, *, rngs: nnx.Rngs):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise InputError(f"invalid num_classes {num_classes!r}; expected an integer >= 1")
        self.bert = BertModel(config, rngs=rngs)
        rate = config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = _dropout(rate, rngs)
        self.classifier = Linear(config.hidden_size, num_classes, rngs=rngs)

    @classmethod
    def from_pretrained(
        cls, model_dir: Optional[str | Path] = None, *, num_classes: int, rngs: nnx.Rngs
    ) -> "BertClassifier":
        """Load the encoder from a Hugging Face BERT folder and add a new head of `num_classes` outputs."""
        model_dir = default_model_dir() if model_dir is None else Path(model_dir)
        config = BertConfig.from_dict(loading.read_config(model_dir), source=str(Path(model_dir) / loading.CONFIG_FILE))
        checkpoint = Checkpoint.from_dir(model_dir)
        model = cls(config, num_classes, rngs=rngs)
        model.bert.checkpoint_prefix = _checkpoint_prefix(checkpoint)
        loading.load_weights(model, checkpoint, model.checkpoint_name)
        return model

    def checkpoint_name(self, path: str) -> Optional[str]:
        """Return the checkpoint name of a path under `bert`, or None for the head, which no checkpoint contains."""
        if not path.startswith("bert."):
            return None
        return self.bert.checkpoint_name(path.removeprefix("bert."))

    def __call__(
        self,
        input_ids_BxL: jax.Array,
        attention_mask_BxL: jax.Array,
        *,
        token_type_ids_BxL: Optional[jax.Array] = None,
        deterministic: bool,
    ) -> jax.Array:
        """Return the class logits (B, num_classes)."""
        hidden_BxLxD = self.bert(
            input_ids_BxL, attention_mask_BxL, token_type_ids_BxL=token_type_ids_BxL, deterministic=deterministic
        )
        pooled_BxD = self.dropout(mean_pool(hidden_BxLxD, attention_mask_BxL), deterministic=deterministic)
        return self.classifier(pooled_BxD)


def _checkpoint_prefix(checkpoint: Checkpoint) -> str:
    for prefix in _CHECKPOINT_PREFIXES:
        if prefix + _EMBEDDING_TENSOR in checkpoint.tensors:
            return prefix
    examples = ", ".join(checkpoint.names[:4])
    raise InputError(
        f"{checkpoint.files[0]}: tensor {_EMBEDDING_TENSOR!r} not found, with or without the prefix 'bert.', "
        f"so this is not a BERT checkpoint. Its tensors include {examples}"
    )


# ---------------------------------------------------------------------------------------------------
# Sentence embeddings


def mean_pool(hidden_BxLxD: jax.Array, attention_mask_BxL: jax.Array) -> jax.Array:
    """Return the mean of the hidden states over non-pad tokens, as all-MiniLM-L6-v2's model card computes it.

    A row without tokens gives zeros, because the divisor is clipped at 1e-9 as in the model card's code.
    """
    mask_BxLx1 = attention_mask_BxL[..., None].astype(hidden_BxLxD.dtype)
    total_BxD = jnp.sum(hidden_BxLxD * mask_BxLx1, axis=1)
    return total_BxD / jnp.maximum(jnp.sum(mask_BxLx1, axis=1), 1e-9)


@nnx.jit(static_argnames="normalize")
def sentence_embeddings(
    encoder: BertModel, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array, *, normalize: bool = True
) -> jax.Array:
    """Return sentence embeddings (B, hidden): mean pooling over non-pad tokens, then L2 normalization.

    all-MiniLM-L6-v2's sentence-transformers pipeline (modules.json) is Transformer, Pooling (mean) and
    Normalize, so its embeddings are unit vectors. Pass normalize=False for the mean alone.
    """
    hidden_BxLxD = encoder(input_ids_BxL, attention_mask_BxL, deterministic=True)
    pooled_BxD = mean_pool(hidden_BxLxD, attention_mask_BxL)
    if not normalize:
        return pooled_BxD
    # The model card normalizes with torch.nn.functional.normalize, which divides by max(norm, 1e-12).
    return pooled_BxD / jnp.maximum(jnp.linalg.norm(pooled_BxD, axis=-1, keepdims=True), 1e-12)


def embed_texts(encoder: BertModel, tokenizer, texts: list[str], *, normalize: bool = True) -> jax.Array:
    """Tokenize `texts` with a tokenizer from `loading.load_tokenizer` and return their sentence embeddings."""
    ids_BxL, mask_BxL = loading.tokenize(tokenizer, texts)
    return sentence_embeddings(encoder, jnp.asarray(ids_BxL), jnp.asarray(mask_BxL), normalize=normalize)
