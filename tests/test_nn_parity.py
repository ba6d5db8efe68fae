"""Parity of loftq_jax.nn's models with transformers 4.44.2 (float32, eager attention), on the outputs that
tests/golden/make_golden.py saved: MiniLM sentence embeddings and tiny LLaMA, Qwen2 and Mistral logits."""

import hashlib
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loftq_jax import synthetic
from loftq_jax.checkpoint import default_model_dir
from loftq_jax.nn import BertModel, LlamaForCausalLM, embed_texts, load_tokenizer, sentence_embeddings, tokenize

GOLDEN_DIR = Path(__file__).parent / "golden"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def minilm():
    return BertModel.from_pretrained()


@pytest.fixture(scope="module")
def minilm_golden():
    with np.load(GOLDEN_DIR / "minilm.npz") as golden:
        return dict(golden)


def test_tokenizer_matches_transformers(minilm_golden):
    tokenizer = load_tokenizer(default_model_dir())
    ids, mask = tokenize(tokenizer, [str(text) for text in minilm_golden["sentences"]])
    np.testing.assert_array_equal(ids, minilm_golden["input_ids"])
    np.testing.assert_array_equal(mask, minilm_golden["attention_mask"])


def test_minilm_mean_pooling_matches_transformers(minilm, minilm_golden):
    ids, mask = jnp.asarray(minilm_golden["input_ids"]), jnp.asarray(minilm_golden["attention_mask"])
    pooled = np.asarray(sentence_embeddings(minilm, ids, mask, normalize=False))
    assert pooled.shape == (5, 384)
    np.testing.assert_allclose(pooled, minilm_golden["mean_pooled"], atol=TOLERANCE, rtol=0)

    normalized = np.asarray(sentence_embeddings(minilm, ids, mask))
    reference = minilm_golden["mean_pooled"] / np.linalg.norm(minilm_golden["mean_pooled"], axis=1, keepdims=True)
    np.testing.assert_allclose(normalized, reference, atol=TOLERANCE, rtol=0)


def test_minilm_cosine_of_known_pair(minilm):
    tokenizer = load_tokenizer(default_model_dir())
    embeddings = np.asarray(embed_texts(minilm, tokenizer, ["A man is eating food.", "A man is eating a piece of bread."]))
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)
    assert float(embeddings[0] @ embeddings[1]) == pytest.approx(0.755, abs=5e-4)


def _write_decoder(out_dir: Path, record: dict) -> Path:
    synthetic.write_checkpoint(out_dir, record["preset"], dtype=record["dtype"], seed=record["seed"])
    config_path = out_dir / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | record["config_overrides"]))
    return out_dir


DECODER_RECORDS = json.loads((GOLDEN_DIR / "decoders.json").read_text())["decoders"]


@pytest.mark.parametrize("preset", sorted(DECODER_RECORDS))
def test_decoder_logits_match_transformers(preset, tmp_path):
    record = DECODER_RECORDS[preset]
    folder = _write_decoder(tmp_path / preset, record)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert digest == record["model_sha256"], "synthetic.write_checkpoint no longer writes the golden checkpoint"

    with np.load(GOLDEN_DIR / "decoders.npz") as golden:
        ids, mask, expected = golden["input_ids"], golden["attention_mask"], golden[preset]
    model = LlamaForCausalLM.from_pretrained(folder)
    logits = np.asarray(nnx.jit(lambda model, ids, mask: model(ids, mask))(model, jnp.asarray(ids), jnp.asarray(mask)))

    assert logits.shape == (2, 8, 256)
    # Logits at padded query positions are meaningless; transformers and this model agree on them anyway.
    tokens = mask.astype(bool)
    np.testing.assert_allclose(logits[tokens], expected[tokens], atol=TOLERANCE, rtol=0)


def test_golden_mistral_window_takes_effect():
    # tiny-mistral has tiny-llama's weights and a sliding window of 5, so only positions 5 and later differ.
    with np.load(GOLDEN_DIR / "decoders.npz") as golden:
        difference = np.abs(golden["tiny-mistral"][0] - golden["tiny-llama"][0]).max(axis=-1)
    assert np.all(difference[:5] == 0)
    assert np.all(difference[5:] > 1e-2)
