"""Compare loftq_jax's LoftQ with PEFT 0.12's CPU LoftQ (`loftq_init`) on one (4096, 4096) float32 weight.

Both get the same weight (saved once as .npy), 4 bits, NF code book, block 64, rank 16, and the same number
of alternating steps T. Both errors ||W - Q - lora_B lora_A||_F / ||W||_F are computed by the same float64
NumPy code from the returned arrays. Writes results/bench/peft_loftq.json and the "LoftQ against PEFT"
section of results/bench/README.md. Run from the repository root, after creating the PEFT environment once:

    bash experiments/setup_peft_bench.sh
    python3 experiments/bench_peft_loftq.py

PEFT runs in a separate process of that environment's Python (torch CPU, `--torch-threads` threads), which
takes one JSON request a line on stdin. The parent alternates PEFT calls with loftq_jax calls, so a change in
load from other processes slows both alike, and reports the speed-up as the median over these pairs. This
file is also the worker's entry point (`--peft-worker`), so the worker part imports only the standard
library, NumPy and torch.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = REPO_ROOT / ".bench-venv"
DEFAULT_OUT_DIR = REPO_ROOT / "results" / "bench"
BITS, RANK, BLOCK_SIZE = 4, 16, 64

# PEFT 0.12's loftq_init raises unless `importlib.util.find_spec("bitsandbytes")` finds a module, and when
# `bitsandbytes.nn` has `Linear4bit` it sends 4-bit quantization to bitsandbytes on CUDA. This stub is an
# empty package whose `nn` lacks `Linear4bit`, so PEFT's `is_bnb_4bit_available()` is False and loftq_init
# quantizes with PEFT's own NFQuantizer on the CPU. The stub computes nothing, and only the worker process
# has it on its PYTHONPATH.
BITSANDBYTES_STUB = '''"""Stub so that PEFT 0.12's loftq_init runs its own CPU quantizer; see experiments/bench_peft_loftq.py."""
import types

nn = types.ModuleType("bitsandbytes.nn")
'''


def _median(values: list[float]) -> float:
    return float(np.median(values))


# ---------------------------------------------------------------------------------------------------
# PEFT worker: runs in the PEFT environment, never imports jax or loftq_jax


def run_peft_worker(args: argparse.Namespace) -> None:
    """Serve timing requests for PEFT's LoftQ, one JSON object a line on stdin, one reply a line on stdout.

    Requests: {"op": "info"}, {"op": "nf4"} (NF4 quantize + dequantize of the weight), {"op": "svd"} (a full
    SVD of the weight, the size of the residual that each step decomposes), {"op": "loftq_init", "steps": T}
    (also saves Q, lora_A and lora_B as peft_T{T}_*.npy in the work directory) and {"op": "exit"}.
    """
    import torch

    torch.set_num_threads(args.torch_threads)
    import peft
    import transformers
    from peft.import_utils import is_bnb_4bit_available, is_bnb_available
    from peft.utils.loftq_utils import NFQuantizer, _low_rank_decomposition, loftq_init

    if not is_bnb_available() or is_bnb_4bit_available():
        raise RuntimeError(
            f"bitsandbytes stub not in effect (is_bnb_available={is_bnb_available()}, "
            f"is_bnb_4bit_available={is_bnb_4bit_available()}), so PEFT would not use its CPU NFQuantizer; "
            "check that the real bitsandbytes is not installed in this environment"
        )

    work_dir = Path(args.work_dir)
    weight = torch.from_numpy(np.load(work_dir / "weight.npy"))
    quantizer = NFQuantizer(num_bits=BITS, device="cpu", method="normal", block_size=BLOCK_SIZE)

    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        if request["op"] == "info":
            reply = {
                "versions": {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__},
                "torch_threads": torch.get_num_threads(),
                "torch_mkl": torch.backends.mkl.is_available(),
                "is_bnb_available": is_bnb_available(),
                "is_bnb_4bit_available": is_bnb_4bit_available(),
                "nf4_codebook": quantizer.norm_lookup_table.tolist(),
            }
        elif request["op"] == "nf4":
            packed, max_abs, shape = quantizer.quantize_block(weight)
            quantizer.dequantize_block(packed, max_abs, shape)
            reply = {"seconds": time.perf_counter() - start}
        elif request["op"] == "svd":
            _low_rank_decomposition(weight, reduced_rank=RANK)
            reply = {"seconds": time.perf_counter() - start}
        elif request["op"] == "loftq_init":
            steps = request["steps"]
            q, lora_a, lora_b = loftq_init(weight, num_bits=BITS, reduced_rank=RANK, num_iter=steps)
            reply = {"seconds": time.perf_counter() - start}
            for name, tensor in (("q", q), ("lora_A", lora_a), ("lora_B", lora_b)):
                np.save(work_dir / f"peft_T{steps}_{name}.npy", tensor.numpy())
        elif request["op"] == "exit":
            return
        else:
            raise ValueError(f"unknown request {request!r}; expected op info, nf4, svd, loftq_init or exit")
        print(json.dumps(reply), flush=True)


# ---------------------------------------------------------------------------------------------------
# Parent process: weight, PEFT worker, loftq_jax, report


class PeftWorker:
    """The PEFT worker process, started in `venv_python` with the bitsandbytes stub on its PYTHONPATH."""

    def __init__(self, venv_python: Path, work_dir: Path, torch_threads: int):
        stub_dir = work_dir / "stub"
        (stub_dir / "bitsandbytes").mkdir(parents=True, exist_ok=True)
        (stub_dir / "bitsandbytes" / "__init__.py").write_text(BITSANDBYTES_STUB)

        env = dict(os.environ)
        env["PYTHONPATH"] = str(stub_dir)
        threads = str(torch_threads)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
        command = [
            str(venv_python), str(Path(__file__).resolve()), "--peft-worker",
            "--work-dir", str(work_dir), "--torch-threads", threads,
        ]  # fmt: skip
        # The working directory is outside the repository, so that the worker cannot import loftq_jax.
        self.process = subprocess.Popen(command, env=env, cwd=work_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def request(self, op: str, **fields) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise RuntimeError(f"PEFT worker exited with status {code} on request {op!r}; its error is printed above")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.process.stdin.close()
        self.process.wait(timeout=60)


def _prepare_ours(w_jax, svd: str, steps: int) -> dict:
    """Compile LoftQ for one setting and time its first call; return the run record with an empty sample list."""
    import jax

    from bench_quantize import time_first_call
    from loftq_jax import LoftQConfig, loftq, loftq_unchecked

    config = LoftQConfig(bits=BITS, rank=RANK, steps=steps, svd=svd, codebook="nf", block_size=BLOCK_SIZE)

    # Compile time alone, from a separate jit of the same function lowered ahead of time.
    start = time.perf_counter()
    jax.jit(loftq_unchecked, static_argnames=("config", "out_dtype")).lower(w_jax, config).compile()
    compile_s = time.perf_counter() - start

    first_call_s, result = time_first_call(lambda: loftq(w_jax, config))
    return {
        "svd": svd,
        "steps": steps,
        "compile_s": compile_s,
        "first_call_s": first_call_s,
        "samples_s": [],
        "call": lambda: loftq(w_jax, config),
        "result": result,
    }


def _time_ours(run: dict, repeats: int) -> float:
    """Append `repeats` warm calls to the run's samples; return their median."""
    from bench_quantize import time_calls

    samples, outputs = time_calls({"loftq": run["call"]}, repeats)
    run["samples_s"] += samples["loftq"]
    run["result"] = outputs["loftq"]
    return _median(samples["loftq"])


def run_interleaved(worker: PeftWorker, w: np.ndarray, args: argparse.Namespace) -> tuple[dict, list[dict], list[dict]]:
    """Alternate PEFT's loftq_init with loftq_jax at each T; return PEFT's runs, ours, and the paired times."""
    import jax

    from bench_quantize import relative_error_f64

    w_jax = jax.device_put(w)
    ours = {}
    for steps in args.steps:
        print(f"loftq_jax: compile and first call, T={steps} ...", flush=True)
        ours[("randomized", steps)] = _prepare_ours(w_jax, "randomized", steps)
        if steps in args.exact_steps:
            ours[("exact", steps)] = _prepare_ours(w_jax, "exact", steps)

    peft_runs, pairs = {}, []
    for steps in args.steps:
        peft_runs[str(steps)] = {"samples_s": []}
        for round_index in range(args.peft_repeats):
            peft_seconds = worker.request("loftq_init", steps=steps)["seconds"]
            peft_runs[str(steps)]["samples_s"].append(peft_seconds)
            message = f"T={steps} round {round_index + 1}: PEFT {peft_seconds:.1f} s"
            for svd in ("randomized", "exact"):
                run = ours.get((svd, steps))
                if run is None:
                    continue
                seconds = _time_ours(run, args.repeats if svd == "randomized" else 1)
                pairs.append({"svd": svd, "steps": steps, "peft_s": peft_seconds, "ours_s": seconds})
                message += f", loftq_jax {svd} {seconds:.2f} s"
            print(message, flush=True)
        peft_runs[str(steps)]["median_s"] = _median(peft_runs[str(steps)]["samples_s"])

    runs = []
    for run in ours.values():
        result = run.pop("result")
        run.pop("call")
        q, a, b = (np.asarray(x, np.float64) for x in (result.q, result.a, result.b))
        run["median_s"] = _median(run["samples_s"])
        run["relative_error"] = relative_error_f64(w, q, a @ b)
        runs.append(run)
    return peft_runs, runs, pairs


def compare(peft_runs: dict, ours: list[dict], pairs: list[dict]) -> list[dict]:
    """Pair each of our runs with PEFT's at the same T: speed-ups and the relative difference in error."""
    rows = []
    for run in ours:
        reference = peft_runs[str(run["steps"])]
        ratios = [pair["peft_s"] / pair["ours_s"] for pair in pairs if (pair["svd"], pair["steps"]) == (run["svd"], run["steps"])]
        rows.append(
            {
                "svd": run["svd"],
                "steps": run["steps"],
                # Median over the alternating rounds of PEFT time / our time in that round.
                "speedup_paired_median": _median(ratios),
                "speedup_of_medians": reference["median_s"] / run["median_s"],
                "speedup_first_call": reference["median_s"] / run["first_call_s"],
                # (ours - PEFT) / PEFT, so a negative value means that our error is lower.
                "error_difference": run["relative_error"] / reference["relative_error"] - 1,
            }
        )
    return rows


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def _render_setup(results: dict) -> list[str]:
    machine, peft, weight = results["machine"], results["peft"], results["weight"]
    return [
        f"`python3 experiments/bench_peft_loftq.py` on {machine['date_utc']}, one machine and one weight "
        f"({weight['shape'][0]} x {weight['shape'][1]} float32, {weight['source']}): "
        f"{BITS} bits, NF code book, block {BLOCK_SIZE}, rank {RANK}.",
        "",
        f"- PEFT {peft['versions']['peft']} `loftq_init` with torch {peft['versions']['torch']} on "
        f"{peft['torch_threads']} threads. It quantizes with its own CPU NFQuantizer because bitsandbytes is "
        "replaced by an empty stub (see the script), and takes a full `torch.linalg.svd` each step.",
        f"- loftq_jax {machine['loftq_jax_git']} with jax {machine['jax']} on {machine['cores_usable']} cores, "
        f"OPENBLAS_CORETYPE={machine['env']['OPENBLAS_CORETYPE']}.",
        f"- Load average (1, 5, 15 min) before / after: {results['load_average_before']} / "
        f"{results['load_average_after']}.",
        "",
        "Error = ||W - Q - lora_B lora_A||_F / ||W||_F, computed in float64 from each implementation's output. "
        "PEFT and loftq_jax calls alternate, round by round. Time is the median of warm per-weight calls, and "
        "speed-up is the median over rounds of PEFT's time over loftq_jax's in the same round. loftq_jax's "
        "first call also compiles, and a model's other weights of the same shape reuse that compilation.",
    ]


def _render_table(results: dict) -> list[str]:
    peft = results["peft"]
    lines = [
        "| implementation | SVD | T | time (calls) | first call | relative error | speed-up vs PEFT (first call) | error vs PEFT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for steps, run in peft["loftq_init"].items():
        lines.append(
            f"| PEFT {peft['versions']['peft']} | exact | {steps} | {_seconds(run['median_s'])} ({len(run['samples_s'])}) "
            f"| - | {run['relative_error']:.5f} | 1 | - |"
        )

    comparisons = {(row["svd"], row["steps"]): row for row in results["comparison"]}
    for run in results["ours"]:
        row = comparisons[(run["svd"], run["steps"])]
        lines.append(
            f"| loftq_jax | {run['svd']} | {run['steps']} | {_seconds(run['median_s'])} ({len(run['samples_s'])}) "
            f"| {_seconds(run['first_call_s'])} | {run['relative_error']:.5f} "
            f"| {row['speedup_paired_median']:.1f}x ({row['speedup_first_call']:.1f}x) "
            f"| {100 * row['error_difference']:+.2f}% |"
        )
    return lines


def render_markdown(results: dict) -> str:
    peft = results["peft"]
    lines = ["## LoftQ against PEFT 0.12", ""] + _render_setup(results)
    lines += [""] + _render_table(results)
    lines += [
        "",
        f"Parts of one step, timed alone on the weight: PEFT's NF4 quantize + dequantize "
        f"{_seconds(_median(peft['nf4_quantize_dequantize_s']))}, `torch.linalg.svd` "
        f"{_seconds(_median(peft['svd_s']))}, `jnp.linalg.svd` {_seconds(results['ours_svd_s'])}. "
        f"PEFT's NF4 code book differs from loftq_jax's by at most {results['codebook_max_difference']:.2g}.",
    ]
    return "\n".join(lines) + "\n"


def _time_jax_svd(w: np.ndarray) -> float:
    """Return the seconds of one full `jnp.linalg.svd` of `w`, the call that loftq_jax's exact SVD makes."""
    import jax
    import jax.numpy as jnp

    svd = jax.jit(lambda m: jnp.linalg.svd(m, full_matrices=False))
    w_jax = jax.device_put(w)
    svd.lower(w_jax).compile()
    start = time.perf_counter()
    jax.block_until_ready(svd(w_jax))
    return time.perf_counter() - start


def run_parent(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_quantize import load_average, machine_info, make_weight, relative_error_f64, write_results
    from loftq_jax import QuantConfig, runtime

    allocator_configured = runtime.configure_allocator()
    blas_threads = runtime.limit_blas_threads()

    venv_python = args.venv / "bin" / "python"
    if not venv_python.exists():
        raise SystemExit(f"{venv_python} not found; create the PEFT environment with: bash experiments/setup_peft_bench.sh")

    w = make_weight((args.size, args.size), args.seed)
    results = {"machine": machine_info(), "load_average_before": load_average()}
    results["weight"] = {"shape": list(w.shape), "source": f"i.i.d. normal, std 0.02, numpy default_rng seed {args.seed}"}
    results["settings"] = {"bits": BITS, "rank": RANK, "block_size": BLOCK_SIZE, "steps": args.steps, "exact_steps": args.exact_steps}
    results["allocator_configured"] = allocator_configured
    results["blas_threads"] = blas_threads

    with tempfile.TemporaryDirectory(prefix="bench_peft_loftq_") as tmp:
        work_dir = Path(tmp)
        np.save(work_dir / "weight.npy", w)
        worker = PeftWorker(venv_python, work_dir, args.torch_threads)
        try:
            peft = worker.request("info")
            print("PEFT: NF4 quantize + dequantize and SVD alone ...", flush=True)
            peft["nf4_quantize_dequantize_s"] = [worker.request("nf4")["seconds"] for _ in range(args.component_repeats)]
            peft["svd_s"] = [worker.request("svd")["seconds"]]
            results["ours_svd_s"] = _time_jax_svd(w)
            peft["loftq_init"], results["ours"], results["pairs"] = run_interleaved(worker, w, args)
        finally:
            worker.close()

        for steps, run in peft["loftq_init"].items():
            q = np.load(work_dir / f"peft_T{steps}_q.npy")
            lora_a = np.load(work_dir / f"peft_T{steps}_lora_A.npy").astype(np.float64)
            lora_b = np.load(work_dir / f"peft_T{steps}_lora_B.npy").astype(np.float64)
            run["relative_error"] = relative_error_f64(w, q, lora_b @ lora_a)

    results["peft"] = peft
    results["comparison"] = compare(peft["loftq_init"], results["ours"], results["pairs"])
    ours_codebook = QuantConfig(bits=BITS, codebook="nf").values()
    results["codebook_max_difference"] = float(np.max(np.abs(np.asarray(peft["nf4_codebook"]) - ours_codebook)))
    results["load_average_after"] = load_average()

    write_results(args.out_dir, "peft_loftq", results, render_markdown(results))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}; expected an integer >= 1")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=positive_int, default=4096, help="rows and columns of the square weight")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random normal weight")
    parser.add_argument("--steps", type=positive_int, nargs="+", default=[1, 5], help="alternating steps T to compare")
    parser.add_argument("--exact-steps", type=positive_int, nargs="*", default=[5], help="those T at which loftq_jax also runs with exact SVD")
    parser.add_argument("--peft-repeats", type=positive_int, default=2, help="rounds for each T: one PEFT loftq_init call and loftq_jax calls each")
    parser.add_argument("--repeats", type=positive_int, default=3, help="warm loftq_jax calls with randomized SVD in each round")
    parser.add_argument("--component-repeats", type=positive_int, default=3, help="timed PEFT NF4 quantize + dequantize calls")
    parser.add_argument("--torch-threads", type=positive_int, default=2, help="torch intra-op threads in the PEFT process")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="virtual environment made by setup_peft_bench.sh")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where peft_loftq.json and README.md go")
    parser.add_argument("--peft-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not set(args.exact_steps) <= set(args.steps):
        parser.error(f"--exact-steps {args.exact_steps} must be a subset of --steps {args.steps}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.peft_worker:
        run_peft_worker(args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
