"""Write the reference outputs that tests/test_nn_parity.py compares loftq_jax.nn's models against.

Run from the repository root with the project's Python:

    python3 tests/golden/make_golden.py [--bench-python .bench-venv/bin/python]

The script writes tiny LLaMA, Qwen2 and Mistral checkpoints with `loftq_jax.synthetic.write_checkpoint`
into a temporary folder, then runs itself with `--reference` under the Python of a separate environment
that has torch and transformers 4.44.2 (neither is a loftq-jax dependency). That run computes, in float32
with eager attention:
- minilm.npz: all-MiniLM-L6-v2's token ids, attention mask and mean-pooled last hidden states of SENTENCES,
  tokenized by transformers' BertTokenizerFast (max length 256, padded to the longest);
- decoders.npz: each tiny decoder's logits for DECODER_IDS under DECODER_MASK.
decoders.json records how each checkpoint was written (preset, seed, dtype, config.json overrides) and the
SHA-256 of its model.safetensors, so that a test can regenerate it and check that it is the same file.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

GOLDEN_DIR = Path(__file__).resolve().parent
REPO_DIR = GOLDEN_DIR.parent.parent

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome!",
    "Quantized weights lose precision, and low-rank adapters recover part of it.",
    "ok",
]

# Overrides exercise settings the synthetic presets leave at their defaults: Qwen2's large RoPE base and a
# Mistral sliding window shorter than the sequence.
DECODERS = {
    "tiny-llama": {},
    "tiny-qwen2": {"rope_theta": 1000000.0},
    "tiny-mistral": {"sliding_window": 5},
}
SEED = 0
DTYPE = "float32"
# Two rows of 8 tokens; the second is right-padded after 5 tokens.
DECODER_IDS = np.random.default_rng(1).integers(0, 256, size=(2, 8)).astype(np.int64)
DECODER_MASK = np.array([[1] * 8, [1] * 5 + [0] * 3], np.int64)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_decoder(out_dir: Path, preset: str, overrides: dict) -> Path:
    """Write a tiny synthetic checkpoint and apply the config.json overrides."""
    from loftq_jax import synthetic

    synthetic.write_checkpoint(out_dir, preset, dtype=DTYPE, seed=SEED)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text()) | overrides
    config_path.write_text(json.dumps(config, indent=2))
    return out_dir


# ---------------------------------------------------------------------------------------------------
# Reference outputs, run under the torch + transformers environment


def reference(work_dir: Path) -> None:
    import torch
    import transformers

    request = json.loads((work_dir / "request.json").read_text())
    torch.set_grad_enabled(False)

    tokenizer = transformers.AutoTokenizer.from_pretrained(request["minilm_dir"])
    batch = tokenizer(request["sentences"], padding=True, truncation=True, max_length=256, return_tensors="pt")
    encoder = transformers.BertModel.from_pretrained(request["minilm_dir"], attn_implementation="eager").eval()
    hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    np.savez(
        work_dir / "minilm.npz",
        input_ids=batch["input_ids"].numpy().astype(np.int32),
        attention_mask=batch["attention_mask"].numpy().astype(np.int32),
        mean_pooled=pooled.numpy().astype(np.float32),
    )

    logits = {}
    ids = torch.tensor(request["decoder_ids"])
    decoder_mask = torch.tensor(request["decoder_mask"])
    for preset, folder in request["decoders"].items():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, torch_dtype=torch.float32, attn_implementation="eager"
        ).eval()
        logits[preset] = model(input_ids=ids, attention_mask=decoder_mask).logits.numpy().astype(np.float32)
    np.savez(work_dir / "decoders.npz", **logits)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    (work_dir / "versions.json").write_text(json.dumps(versions))


# ---------------------------------------------------------------------------------------------------
# Driver, run under the project's Python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-python", type=Path, default=REPO_DIR / ".bench-venv" / "bin" / "python")
    parser.add_argument("--reference", type=Path, metavar="WORK_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference is not None:
        reference(args.reference)
        return

    from loftq_jax.checkpoint import default_model_dir

    with tempfile.TemporaryDirectory() as temp:
        work_dir = Path(temp)
        decoders, records = {}, {}
        for preset, overrides in DECODERS.items():
            folder = write_decoder(work_dir / preset, preset, overrides)
            decoders[preset] = str(folder)
            records[preset] = {
                "preset": preset,
                "seed": SEED,
                "dtype": DTYPE,
                "config_overrides": overrides,
                "model_sha256": sha256(folder / "model.safetensors"),
            }
        request = {
            "minilm_dir": str(default_model_dir()),
            "sentences": SENTENCES,
            "decoders": decoders,
            "decoder_ids": DECODER_IDS.tolist(),
            "decoder_mask": DECODER_MASK.tolist(),
        }
        (work_dir / "request.json").write_text(json.dumps(request))
        # The reference environment has no JAX, so it must not import loftq_jax; it only reads the folders.
        env = dict(os.environ, PYTHONPATH="")
        subprocess.run([str(args.bench_python), __file__, "--reference", str(work_dir)], check=True, env=env)

        versions = json.loads((work_dir / "versions.json").read_text())
        with np.load(work_dir / "minilm.npz") as minilm:
            np.savez(GOLDEN_DIR / "minilm.npz", sentences=np.array(SENTENCES), **minilm)
        with np.load(work_dir / "decoders.npz") as logits:
            np.savez(GOLDEN_DIR / "decoders.npz", input_ids=DECODER_IDS, attention_mask=DECODER_MASK, **logits)
        golden = {"reference": versions, "decoders": records}
        (GOLDEN_DIR / "decoders.json").write_text(json.dumps(golden, indent=2) + "\n")
    print(f"wrote minilm.npz, decoders.npz and decoders.json to {GOLDEN_DIR}")


if __name__ == "__main__":
    main()
