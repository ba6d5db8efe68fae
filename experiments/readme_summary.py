"""Rewrite the speed summary of the top-level README.md from the benchmark results under results/bench/.

The benchmark scripts call `update_readme()` after writing their JSON, so the README's figures always come
from the committed results. Run it alone to regenerate the summary: `python3 experiments/readme_summary.py`.
"""

import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "results" / "bench"


def _load(name: str) -> dict | None:
    path = BENCH_DIR / name
    return json.loads(path.read_text()) if path.exists() else None


def _quantize_rows(results: dict) -> list[str]:
    rows = []
    configured = results["quantizers"]
    default = results.get("quantizers_default_malloc")
    ratio = f"{configured['fake_quant_over_numpy_throughput']:.2f}x"
    if default:
        ratio += f" ({default['fake_quant_over_numpy_throughput']:.2f}x with glibc's default allocator settings)"
    rows.append(f"| NF4 `fake_quant` throughput relative to NumPy `w * s`, same run | {ratio} |")
    for run in results["loftq"]:
        config = run["config"]
        rows.append(
            f"| LoftQ, {config['bits']} bits, r = {config['rank']}, T = {config['steps']}, {config['svd']} SVD, "
            f"warm call | {run['warm_median_s']:.2f} s (error {run['relative_error']:.4f}) |"
        )
    return rows


def _peft_rows(results: dict) -> list[str]:
    rows = []
    for comparison in results["comparison"]:
        rows.append(
            f"| LoftQ against PEFT {results['peft']['versions']['peft']} on the CPU, T = {comparison['steps']}, "
            f"{comparison['svd']} SVD | {comparison['speedup_paired_median']:.1f}x PEFT's speed, error "
            f"{comparison['error_difference'] * 100:+.2f}% |"
        )
    return rows


def _train_step_rows(results: dict) -> list[str]:
    settings = results["settings"]
    rate_peft = results["samples_per_s"]["peft"]
    rows = []
    for name, label in (("lora_fp32", "float32 base"), ("qlora_nf4", "NF4 base")):
        if name in results["samples_per_s"]:
            rate = results["samples_per_s"][name]
            rows.append(
                f"| LoRA training step on MiniLM, {label}, batch {settings['batch_size']} x {settings['length']} "
                f"| {rate:.1f} samples / s ({rate / rate_peft:.2f}x transformers + PEFT's {rate_peft:.1f}) |"
            )
    return rows


def render(quantize: dict | None, peft: dict | None, train_step: dict | None = None) -> str:
    """Return the summary: a table of the headline figures and the commands that measured them."""
    if quantize is None and peft is None and train_step is None:
        return "No benchmark results yet: run `python3 experiments/bench_quantize.py`.\n"

    machine = (quantize or peft or train_step)["machine"]
    lines = [
        f"Measured on {machine['cores_usable']} cores of an {machine['cpu'].get('model name')} without a GPU; "
        "the weight benchmarks use one 4096 x 4096 float32 weight. Full pages, with every sample and the load "
        "average of each run: `results/bench/README.md`.",
        "",
        "| measurement | result |",
        "|---|---|",
    ]
    if quantize is not None:
        lines += _quantize_rows(quantize)
    if peft is not None:
        lines += _peft_rows(peft)
    if train_step is not None:
        lines += _train_step_rows(train_step)
    runs = []
    if quantize is not None:
        runs.append(f"`python3 experiments/bench_quantize.py` ({quantize['machine']['date_utc']})")
    if peft is not None:
        runs.append(
            f"`python3 experiments/bench_peft_loftq.py` ({peft['machine']['date_utc']})"
        )
    if train_step is not None:
        runs.append(f"`python3 experiments/bench_train_step.py` ({train_step['machine']['date_utc']})")
    lines += ["", "Measured by " + ", ".join(runs) + ". The PyTorch side of the comparisons runs in the "
              "environment that `bash experiments/setup_peft_bench.sh` creates."]
    return "\n".join(lines) + "\n"


def replace_block(readme: Path, name: str, text: str) -> None:
    """Replace the text between `<!-- begin NAME -->` and `<!-- end NAME -->` in `readme` with `text`."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    content = readme.read_text()
    if begin not in content or end not in content:
        raise SystemExit(f"{readme}: the markers {begin} and {end} are missing")
    head, _, rest = content.partition(begin)
    _, _, tail = rest.partition(end)
    readme.write_text(f"{head}{begin}\n{text.rstrip()}\n{end}{tail}")


def update_readme(readme: Path = REPO_ROOT / "README.md") -> None:
    """Rewrite the speed summary of `readme` from the JSON files under results/bench/."""
    replace_block(readme, "speed summary", render(_load("quantize.json"), _load("peft_loftq.json"), _load("train_step.json")))


if __name__ == "__main__":
    update_readme()
