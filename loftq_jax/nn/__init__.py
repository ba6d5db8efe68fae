"""Flax NNX models with LoRA over quantized weights: BERT (MiniLM) and LLaMA-family decoders loaded from
Hugging Face safetensors, LoRA and quantized LoRA layers, and the conversion from LoftQ, QLoRA or
`loftq-jax init` outputs.
"""

from loftq_jax.nn.bert import TRAINABLE, BertClassifier, BertConfig, BertModel, embed_texts, mean_pool, sentence_embeddings
from loftq_jax.nn.layers import Linear, LoRALinear, QuantizedLoRALinear, QuantizedWeight
from loftq_jax.nn.llama import LlamaConfig, LlamaForCausalLM
from loftq_jax.nn.loading import load_tokenizer, tokenize
from loftq_jax.nn.lora import LoRAConfig, convert_to_lora, read_adapter_config, requantize, state_nbytes

__all__ = [
    "TRAINABLE",
    "BertClassifier",
    "BertConfig",
    "BertModel",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LoRAConfig",
    "LoRALinear",
    "Linear",
    "QuantizedLoRALinear",
    "QuantizedWeight",
    "convert_to_lora",
    "embed_texts",
    "load_tokenizer",
    "mean_pool",
    "read_adapter_config",
    "requantize",
    "sentence_embeddings",
    "state_nbytes",
    "tokenize",
]
