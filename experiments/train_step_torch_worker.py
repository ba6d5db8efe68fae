"""Time LoRA training steps of MiniLM with transformers + PEFT; the reference side of bench_train_step.py.

Runs in the PEFT environment made by experiments/setup_peft_bench.sh, never in loftq-jax's own, and prints one
JSON object. The settings arrive as JSON on the command line so both sides are configured from one place.
"""

import json
import sys
import time


def main() -> None:
    settings = json.loads(sys.argv[1])

    import numpy as np
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(settings["threads"])
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(settings["model_dir"], num_labels=settings["num_classes"])
    config.hidden_dropout_prob = settings["dropout"]
    config.attention_probs_dropout_prob = settings["dropout"]
    model = transformers.BertForSequenceClassification.from_pretrained(settings["model_dir"], config=config)
    lora = LoraConfig(
        r=settings["rank"],
        lora_alpha=settings["alpha"],
        lora_dropout=settings["lora_dropout"],
        target_modules=settings["peft_target_regex"],
        modules_to_save=["classifier"],
    )
    model = get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)

    rng = np.random.default_rng(0)
    batch, length = settings["batch_size"], settings["length"]
    input_ids = torch.from_numpy(rng.integers(1000, config.vocab_size, (batch, length)))
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    labels = torch.from_numpy(rng.integers(0, settings["num_classes"], batch))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        return loss.detach().item()

    for _ in range(settings["warmup_steps"]):
        step()
    samples = []
    for _ in range(settings["timed_steps"]):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": __import__("peft").__version__},
        "threads": torch.get_num_threads(),
        "trainable_parameters": trainable,
        "step_samples_s": samples,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
