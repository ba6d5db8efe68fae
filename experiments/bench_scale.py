"""Benchmark `loftq-jax init` at scale: a 1.1B LLaMA-shaped checkpoint, time against weight size, 7B projection.

Writes results/scale/scale.json and results/scale/README.md, and the scale summary of the top-level README.
Run from the repository root:

    python3 experiments/bench_scale.py

Three measurements, each in its own process so that one does not warm the caches of the next:
1. Per-shape LoftQ timings (4 bits, r = 16, T = 5, randomized SVD): compile alone, then warm calls, for
   square weights from 1024 x 1024 to 8192 x 8192 and for every shape of the LLaMA-2-7B and 1.1B presets.
2. `loftq-jax init` on a generated 1.1B LLaMA-shaped bfloat16 checkpoint: wall time, weights and parameters
   per second, and the peak resident memory of the init process (from the kernel's rusage).
3. A projection for LLaMA-2-7B shapes from the per-shape warm times and one compile per shape, checked
   against the measured 1.1B run by projecting that too.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import load_average, machine_info, write_readme_section  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "results" / "scale"
SQUARE_SIZES = (1024, 2048, 4096, 8192)
BITS, RANK, STEPS = 4, 16, 5
TIMED_PRESETS = ("llama-1.1b", "llama-7b")


# ---------------------------------------------------------------------------------------------------
# Per-shape timings (child process)


def target_shape_counts(preset: str) -> dict[tuple[int, int], int]:
    """Return how many target weights of each (out, in) shape the preset has, under the LLaMA defaults."""
    from loftq_jax import synthetic

    counts: dict[tuple[int, int], int] = {}
    for name, shape in synthetic.tensor_shapes(synthetic.PRESETS[preset]).items():
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if module in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            counts[tuple(shape)] = counts.get(tuple(shape), 0) + 1
    return counts


def time_shape(shape: tuple[int, int], repeats: int) -> dict:
    """Time LoftQ on one random bfloat16 weight of `shape`: compile alone, first call and warm calls."""
    import jax
    import ml_dtypes
    import numpy as np

    from loftq_jax import LoftQConfig, loftq_unchecked

    config = LoftQConfig(bits=BITS, rank=RANK, steps=STEPS, svd="randomized")
    rng = np.random.default_rng(0)
    w = jax.device_put((rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16))
    jitted = jax.jit(loftq_unchecked, static_argnames=("config", "out_dtype"))

    start = time.perf_counter()
    compiled = jitted.lower(w, config).compile()
    compile_s = time.perf_counter() - start

    samples = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(compiled(w))
        samples.append(time.perf_counter() - start)
    warm = sorted(samples[1:])
    return {
        "shape": list(shape),
        "compile_s": compile_s,
        "first_run_s": samples[0],
        "warm_samples_s": samples[1:],
        "warm_median_s": warm[len(warm) // 2],
    }


def run_shapes_child(shapes: list[tuple[int, int]], repeats: int) -> None:
    from loftq_jax import runtime

    runtime.configure()
    for shape in shapes:
        print(json.dumps(time_shape(shape, repeats)), flush=True)


def measure_shapes(shapes: list[tuple[int, int]], repeats: int) -> list[dict]:
    """Run `time_shape` for every shape in one fresh child process; return its results in order."""
    arguments = [str(value) for shape in shapes for value in shape]
    command = [sys.executable, __file__, "--shapes-child", "--repeats", str(repeats), *arguments]
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]


# ---------------------------------------------------------------------------------------------------
# The 1.1B init run


def run_init(preset: str, work_dir: Path, extra_args: list[str]) -> dict:
    """Generate the preset's checkpoint, run `loftq-jax init` on it and return time, rates and peak RSS."""
    from loftq_jax import synthetic

    model_dir, out_dir = work_dir / preset, work_dir / f"{preset}-loftq"
    start = time.perf_counter()
    synthetic.write_checkpoint(model_dir, preset, dtype="bfloat16")
    generate_s = time.perf_counter() - start

    command = [
        sys.executable, "-m", "loftq_jax.cli", "init", str(model_dir), "--out", str(out_dir),
        "--bits", str(BITS), "--rank", str(RANK), "--iters", str(STEPS), "--svd", "randomized", *extra_args,
    ]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall_s = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"loftq-jax init failed with exit status {os.waitstatus_to_exitcode(status)}:\n{log}")

    report = json.loads((out_dir / "loftq_report.json").read_text())
    weights = report["weights"]
    parameters = sum(entry["shape"][0] * entry["shape"][1] for entry in weights)
    return {
        "preset": preset,
        "command": " ".join(command[2:]),
        "generate_s": generate_s,
        "wall_s": wall_s,
        "weights": len(weights),
        "parameters": parameters,
        "weights_per_s": len(weights) / wall_s,
        "parameters_per_s": parameters / wall_s,
        # ru_maxrss is in KiB on Linux.
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "groups": report["execution"]["groups"],
        "compile_s": sum(group["compile_seconds"] for group in report["execution"]["groups"]),
        "packed": report["packed"],
        "input_bytes": sum(path.stat().st_size for path in model_dir.glob("*.safetensors")),
        "output_bytes": {path.name: path.stat().st_size for path in sorted(out_dir.iterdir()) if path.is_file()},
        "log_tail": log.splitlines()[-20:],
    }


# ---------------------------------------------------------------------------------------------------
# Projection


def project(counts: dict[tuple[int, int], int], timings: dict[tuple[int, int], dict]) -> dict:
    """Project init time as one compile per distinct shape plus count x warm time per weight."""
    rows = []
    for shape, count in sorted(counts.items()):
        timing = timings[shape]
        rows.append({
            "shape": list(shape),
            "count": count,
            "compile_s": timing["compile_s"],
            "warm_s": timing["warm_median_s"],
            "total_s": timing["compile_s"] + count * timing["warm_median_s"],
        })  # fmt: skip
    total = sum(row["total_s"] for row in rows)
    compile_total = sum(row["compile_s"] for row in rows)
    return {"rows": rows, "total_s": total, "compile_share": compile_total / total}


# ---------------------------------------------------------------------------------------------------
# Report


def _minutes(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def render_markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        "## Scale",
        "",
        f"`python3 experiments/bench_scale.py` on {machine['date_utc']}: {machine['cpu'].get('model name')}, "
        f"{machine['cores_usable']} cores, {machine['memory_gib']} GiB, jax {machine['jax']}, "
        f"loftq_jax {machine['loftq_jax_git']}. Load average before / after: "
        f"{results['load_average_before']} / {results['load_average_after']}. "
        f"LoftQ settings everywhere: {BITS} bits NF, block 64, r = {RANK}, T = {STEPS}, randomized SVD.",
        "",
        "### Time against weight size",
        "",
        "One bfloat16 weight, computed in float32; the compile share is that of a group of one weight.",
        "",
        "| shape | parameters | compile | warm call | parameters / s | compile share |",
        "|---|---|---|---|---|---|",
    ]
    for timing in results["square"]:
        out_features, in_features = timing["shape"]
        parameters = out_features * in_features
        share = timing["compile_s"] / (timing["compile_s"] + timing["warm_median_s"])
        lines.append(
            f"| {out_features} x {in_features} | {parameters / 1e6:.1f} M | {timing['compile_s']:.2f} s "
            f"| {timing['warm_median_s']:.2f} s | {parameters / timing['warm_median_s'] / 1e6:.1f} M | {share:.0%} |"
        )

    init = results.get("init")
    if init:
        lines += [
            "",
            f"### `loftq-jax init` on a generated {init['preset']} checkpoint (bfloat16)",
            "",
            f"`{init['command']}`: {init['weights']} target weights, {init['parameters'] / 1e9:.2f} B target "
            f"parameters, {_minutes(init['wall_s'])} wall time, {init['weights_per_s']:.2f} weights / s, "
            f"{init['parameters_per_s'] / 1e6:.1f} M parameters / s, **peak RSS "
            f"{init['peak_rss_bytes'] / 2**30:.2f} GiB** for a {init['input_bytes'] / 2**30:.2f} GiB checkpoint. "
            f"Compilation took {init['compile_s']:.1f} s of it ({init['compile_s'] / init['wall_s']:.1%}), one compile "
            f"for each of {len(init['groups'])} shapes. The packed checkpoint takes "
            f"{init['packed']['fraction_of_16bit']:.3f} of the 16-bit size of the converted weights. "
            f"The projection below, made the same way as the 7B one, gives {_minutes(results['projection_1_1b']['total_s'])}.",
            "",
            "Output files: "
            + ", ".join(f"`{name}` {size / 2**20:.0f} MiB" for name, size in init["output_bytes"].items())
            + ".",
        ]

    projection = results["projection_7b"]
    lines += [
        "",
        "### Projection for LLaMA-2-7B shapes",
        "",
        "| shape | weights | compile | warm call | total |",
        "|---|---|---|---|---|",
    ]
    for row in projection["rows"]:
        lines.append(
            f"| {row['shape'][0]} x {row['shape'][1]} | {row['count']} | {row['compile_s']:.2f} s "
            f"| {row['warm_s']:.2f} s | {_minutes(row['total_s'])} |"
        )
    lines += [
        "",
        f"Projected LoftQ time for the 224 target weights: **{_minutes(projection['total_s'])}**, "
        f"{projection['compile_share']:.1%} of it compilation. Reading, writing and hashing the checkpoint "
        "are not in the projection; the 1.1B run above shows their share.",
    ]
    return "\n".join(lines) + "\n"


def _whole_run_estimate(results: dict) -> list[str]:
    """Return a table row estimating a whole 7B init: the projection times the 1.1B run's measured/projected ratio.

    The ratio carries over the time of reading and writing the checkpoint, which the projection leaves out.
    """
    init = results.get("init")
    if not init:
        return []
    ratio = init["wall_s"] / results["projection_1_1b"]["total_s"]
    estimate = results["projection_7b"]["total_s"] * ratio
    return [
        f"| Estimated `loftq-jax init` of a LLaMA-2-7B-shaped checkpoint, reading and writing included "
        f"| {_minutes(estimate)} (projection x {ratio:.2f}, the 1.1B run's measured / projected time) |"
    ]


def render_summary(results: dict) -> str:
    """Return the scale summary for the top-level README: the 1.1B run and the 7B projection."""
    projection = results["projection_7b"]
    lines = ["| measurement | result |", "|---|---|"]
    init = results.get("init")
    if init:
        lines.append(
            f"| `loftq-jax init` on a generated {init['preset']} checkpoint, bfloat16, {init['weights']} weights "
            f"| {_minutes(init['wall_s'])}, {init['parameters_per_s'] / 1e6:.1f} M parameters / s, "
            f"peak RSS {init['peak_rss_bytes'] / 2**30:.2f} GiB |"
        )
    largest = results["square"][-1]
    lines += [
        f"| LoftQ on one {largest['shape'][0]} x {largest['shape'][1]} weight, warm | {largest['warm_median_s']:.1f} s |",
        f"| Projected LoftQ time for LLaMA-2-7B's 224 target weights | {_minutes(projection['total_s'])} "
        f"({projection['compile_share']:.1%} compilation) |",
        *_whole_run_estimate(results),
        "",
        "LLaMA-2-7B projection, one compile per shape plus the count times the warm time of one weight:",
        "",
        "| shape | weights | compile | warm call | total |",
        "|---|---|---|---|---|",
        *(
            f"| {row['shape'][0]} x {row['shape'][1]} | {row['count']} | {row['compile_s']:.2f} s "
            f"| {row['warm_s']:.2f} s | {_minutes(row['total_s'])} |"
            for row in projection["rows"]
        ),
        "",
        f"{BITS} bits NF, r = {RANK}, T = {STEPS}, randomized SVD, on {results['machine']['cores_usable']} cores. "
        f"Measured by `python3 experiments/bench_scale.py` ({results['machine']['date_utc']}); the full page, "
        "with time against weight size from 1024 x 1024 to 8192 x 8192, is `results/scale/README.md`.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="warm calls per shape after the first")
    parser.add_argument("--skip-init", action="store_true", help="skip the 1.1B init run")
    parser.add_argument("--init-args", default="", help="extra arguments for loftq-jax init, in one string")
    parser.add_argument("--work-dir", type=Path, help="where the generated checkpoint goes (default: a temporary folder)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where scale.json and README.md go")
    parser.add_argument("--render-only", action="store_true", help="rewrite the pages from the existing scale.json")
    parser.add_argument("--shapes-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("dims", nargs="*", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.shapes_child:
        run_shapes_child(list(zip(args.dims[::2], args.dims[1::2])), args.repeats)
        return

    if args.render_only:
        write_pages(json.loads((args.out_dir / "scale.json").read_text()), args.out_dir)
        return

    results = {"machine": machine_info(), "load_average_before": load_average()}
    counts = {preset: target_shape_counts(preset) for preset in TIMED_PRESETS}
    shapes = sorted({(size, size) for size in SQUARE_SIZES} | {shape for c in counts.values() for shape in c})

    print(f"timing LoftQ on {len(shapes)} shapes ...", flush=True)
    timings = {tuple(t["shape"]): t for t in measure_shapes(shapes, args.repeats)}
    results["shapes"] = list(timings.values())
    results["square"] = [timings[(size, size)] for size in SQUARE_SIZES]
    results["projection_7b"] = project(counts["llama-7b"], timings)
    results["projection_1_1b"] = project(counts["llama-1.1b"], timings)
    print(f"  7B projection: {results['projection_7b']['total_s'] / 60:.1f} min", flush=True)

    if not args.skip_init:
        print("loftq-jax init on a generated llama-1.1b checkpoint ...", flush=True)
        with tempfile.TemporaryDirectory(dir=args.work_dir) as work_dir:
            results["init"] = run_init("llama-1.1b", Path(work_dir), args.init_args.split())
        print(f"  {results['init']['wall_s']:.0f} s, peak RSS {results['init']['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    results["load_average_after"] = load_average()
    results["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    write_pages(results, args.out_dir)


def write_pages(results: dict, out_dir: Path) -> None:
    """Write the scale section of out_dir/README.md and, for the default folder, the top-level README's summary."""
    readme = write_readme_section(out_dir, "scale", render_markdown(results))
    if out_dir.resolve() == DEFAULT_OUT_DIR.resolve():
        from readme_summary import replace_block

        replace_block(REPO_ROOT / "README.md", "scale summary", render_summary(results))
    print(f"wrote {readme}")


if __name__ == "__main__":
    main()
