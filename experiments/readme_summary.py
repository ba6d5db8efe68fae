"""Rewrite the speed summary of the top-level README.md from the benchmark results under results/bench/.

The benchmark scripts call `update_readme()` after writing their JSON, so the README's figures always come
from the committed results. Run it alone to regenerate the summary: `python3 experiments/readme_summary.py`.
"""

import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "results" / "bench"
BEGIN, END = "<!-- begin speed summary -->", "<!-- end speed summary -->"


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
            f"{comparison['svd']} SVD | {comparison['speedup_paired_median']:.1f}x faster, error "
            f"{comparison['error_difference'] * 100:+.2f}% |"
        )
    return rows


def render(quantize: dict | None, peft: dict | None) -> str:
    """Return the summary: a table of the headline figures and the commands that measured them."""
    if quantize is None and peft is None:
        return "No benchmark results yet: run `python3 experiments/bench_quantize.py`.\n"

    machine = (quantize or peft)["machine"]
    shape = (quantize or peft)["weight"]["shape"]
    lines = [
        f"One {shape[0]} x {shape[1]} float32 weight on {machine['cores_usable']} cores of an "
        f"{machine['cpu'].get('model name')} without a GPU. Full pages, with every sample and the load "
        "average of each run: `results/bench/README.md`.",
        "",
        "| measurement | result |",
        "|---|---|",
    ]
    if quantize is not None:
        lines += _quantize_rows(quantize)
    if peft is not None:
        lines += _peft_rows(peft)
    runs = []
    if quantize is not None:
        runs.append(f"`python3 experiments/bench_quantize.py` ({quantize['machine']['date_utc']})")
    if peft is not None:
        runs.append(
            f"`python3 experiments/bench_peft_loftq.py` ({peft['machine']['date_utc']}), "
            "after `bash experiments/setup_peft_bench.sh`"
        )
    lines += ["", "Measured by " + " and ".join(runs) + "."]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path = REPO_ROOT / "README.md") -> None:
    """Replace the text between the speed summary markers of `readme` with a fresh `render()`."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: the markers {BEGIN} and {END} are missing")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    summary = render(_load("quantize.json"), _load("peft_loftq.json"))
    readme.write_text(f"{head}{BEGIN}\n{summary}{END}{tail}")


if __name__ == "__main__":
    update_readme()
