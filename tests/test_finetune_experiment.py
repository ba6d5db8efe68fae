"""Tests of experiments/finetune_sentiment.py: a --quick run of every setting on a few hundred tweets, its
results.json, pages and plots, resuming a killed run, and the README block writer."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "experiments" / "finetune_sentiment.py"
sys.path.insert(0, str(SCRIPT.parent))

import finetune_report as report  # noqa: E402
import finetune_sentiment as experiment  # noqa: E402

QUICK_STEPS = experiment.QUICK_OVERRIDES["steps"]
BITS_PER_WEIGHT = {"lora16": 16.0, "qlora4": 4.5, "loftq4": 4.5, "l4q4": 4.5, "qlora2": 2.5, "loftq2": 2.5, "l4q2": 2.5}


def run_script(*arguments: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """A --quick run of all 7 settings with seed 0 into a temporary folder, and its wall time."""
    root = tmp_path_factory.mktemp("finetune")
    out_dir, work_dir = root / "results", root / "work"
    began = time.perf_counter()
    completed = run_script("--quick", "--jobs", "2", "--out", str(out_dir), "--work-dir", str(work_dir))
    seconds = time.perf_counter() - began
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads((out_dir / "results.json").read_text())
    return {"out": out_dir, "work": work_dir, "results": results, "log": completed.stderr, "seconds": seconds}


def run_dir(quick, setting: str) -> Path:
    return quick["work"] / "runs" / quick["results"]["settings"][setting]["runs"][0]["hyper_key"] / setting / "seed0"


# ---------------------------------------------------------------------------------------------------
# The quick run's outputs


def test_quick_run_covers_every_setting(quick):
    results = quick["results"]
    assert results["quick"] is True
    assert list(results["settings"]) == list(experiment.SETTINGS)
    assert results["seeds"] == [0]
    assert results["hyperparameters"]["steps"] == QUICK_STEPS
    assert results["data"]["train"] == 384
    assert results["data"]["test"] == 128
    # One log line per run: 7 settings and the two L4Q memory runs.
    assert quick["log"].count("seed 0: ") == 9


@pytest.mark.parametrize("setting", list(experiment.SETTINGS))
def test_quick_run_results(quick, setting):
    entry = quick["results"]["settings"][setting]
    assert len(entry["runs"]) == 1
    run = entry["runs"][0]

    assert run["status"] == "finished"
    assert run["steps"] == QUICK_STEPS
    for split, examples in (("dev", 128), ("test", 128)):
        assert 0 <= run[split]["accuracy"] <= 1
        assert 0 <= run[split]["macro_f1"] <= 1
        assert run[split]["examples"] == examples
    assert run["median_step_s"] > 0
    assert run["peak_rss_train_bytes"] > 100 * 2**20
    assert run["peak_rss_bytes"] >= run["peak_rss_train_bytes"]
    assert run["xla_memory"]["temp_bytes"] > 0
    assert run["weights"]["target_weights"] == 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert run["weights"]["base_bits_per_weight"] == pytest.approx(BITS_PER_WEIGHT[setting])
    assert run["curves"]["dev_step"][0] == 0
    assert run["curves"]["dev_step"][-1] == QUICK_STEPS
    assert entry["summary"]["test_accuracy"]["mean"] == run["test"]["accuracy"]
    assert entry["summary"]["test_accuracy"]["std"] is None


def test_quick_run_initial_errors(quick):
    settings = quick["results"]["settings"]
    errors = {name: entry["runs"][0]["init_error"] for name, entry in settings.items()}
    # bfloat16 storage rounds W by about 2**-9 of its magnitude.
    assert errors["lora16"] < 3e-3
    for bits in (4, 2):
        assert errors[f"loftq{bits}"] < errors[f"qlora{bits}"]
    assert errors["qlora2"] > errors["qlora4"]
    assert errors["l4q2"] > errors["l4q4"]


def test_quick_run_l4q_export_and_memory(quick):
    results = quick["results"]
    for setting, bits in (("l4q4", 4), ("l4q2", 2)):
        run = results["settings"][setting]["runs"][0]
        # The exported model computes the trained forward up to float32 rounding, so it predicts the same.
        assert run["exported_test"]["accuracy"] == pytest.approx(run["test"]["accuracy"], abs=1 / 128)
        weights = run["weights"]
        assert weights["inference_bytes"] == weights["export_bytes"]
        assert weights["export_bytes"] == weights["target_weights"] * bits // 8 + 2 * 4 * weights["target_weights"] // 128
        # During training L4Q keeps the float32 W.
        assert weights["training_base_bytes"] > weights["float32_bytes"]

    probes = results["probes"]
    assert [(probe["setting"], probe["backward"]) for probe in probes] == [("l4q2", "custom"), ("l4q2", "autodiff")]
    for probe in probes:
        assert probe["steps"] == experiment.QUICK_PROBE_STEPS
        assert probe["xla_memory"]["temp_bytes"] > 0
        assert probe["peak_rss_train_bytes"] > 100 * 2**20


def test_quick_run_comparisons(quick):
    results = quick["results"]
    comparisons = results["comparisons"]
    assert set(comparisons["loftq_minus_qlora"]) == {"4", "2"}
    assert set(comparisons["l4q_minus_best_decoupled"]) == {"4", "2"}
    settings = results["settings"]
    for bits, stats in comparisons["loftq_minus_qlora"].items():
        expected = settings[f"loftq{bits}"]["runs"][0]["test"]["accuracy"] - settings[f"qlora{bits}"]["runs"][0]["test"]["accuracy"]
        assert stats["accuracy"]["mean"] == pytest.approx(expected)
        assert stats["accuracy"]["n"] == 1


def test_quick_run_metrics_log_each_step_once(quick):
    records = [json.loads(line) for line in (run_dir(quick, "qlora2") / "metrics.jsonl").read_text().splitlines()]
    train_steps = [record["step"] for record in records if record["kind"] == "train"]
    eval_steps = [record["step"] for record in records if record["kind"] == "eval"]
    assert train_steps == list(range(1, QUICK_STEPS + 1))
    assert eval_steps == [0, QUICK_STEPS // 2, QUICK_STEPS]
    assert records[-1]["kind"] == "summary"


def test_quick_run_page_and_plots(quick):
    page = (quick["out"] / "README.md").read_text()
    results = quick["results"]
    for setting in experiment.SETTINGS.values():
        accuracy = results["settings"][setting.name]["summary"]["test_accuracy"]["mean"]
        assert f"| {setting.label} | {BITS_PER_WEIGHT[setting.name]:.2f} | {100 * accuracy:.1f} |" in page
    difference = results["comparisons"]["loftq_minus_qlora"]["2"]["accuracy"]["mean"]
    assert f"LoftQ − QLoRA at 2 bits: {100 * difference:+.1f} points test accuracy (mean over 1 paired seed" in page
    assert f"The learning rate {experiment.DEFAULT_LEARNING_RATE:g} was not chosen on dev: no tuning.json exists." in page
    assert "| L4Q, 2 bits | autodiff |" in page

    for name in ("loss.png", "dev_accuracy.png"):
        data = (quick["out"] / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 10_000


def test_quick_run_time(quick):
    # 130 to 300 s measured on 2 cores shared with other jobs. The bound leaves room for more load.
    assert quick["seconds"] < 600


# ---------------------------------------------------------------------------------------------------
# Rerunning the command


def test_rerun_skips_finished_and_resumes_killed_run(quick):
    killed = run_dir(quick, "loftq4")
    finished = run_dir(quick, "lora16") / "result.json"
    finished_mtime = finished.stat().st_mtime
    # A run killed after its checkpoint at step 6: no result, no newer checkpoint, steps 7.. logged.
    (killed / "result.json").unlink()
    shutil.rmtree(killed / "checkpoints" / str(QUICK_STEPS))

    completed = run_script("--quick", "--out", str(quick["out"]), "--work-dir", str(quick["work"]))

    assert completed.returncode == 0, completed.stderr[-4000:]
    assert completed.stderr.count("finished before, skipped") == 8
    assert finished.stat().st_mtime == finished_mtime
    result = json.loads((killed / "result.json").read_text())
    assert result["resumed_from"] == QUICK_STEPS // 2
    assert result["steps"] == QUICK_STEPS
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if record["kind"] == "train"] == list(range(1, QUICK_STEPS + 1))
    assert sum(record["kind"] == "summary" for record in records) == 1


def test_quick_run_refuses_committed_results_folder(tmp_path):
    completed = run_script("--quick", "--out", str(REPO_ROOT / "results" / "finetune"), "--work-dir", str(tmp_path))
    assert completed.returncode != 0
    assert "--quick writes smoke-run results; pass another --out than results/finetune" in completed.stderr


def test_readme_without_markers_stops_before_training(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# project\n")
    completed = run_script("--quick", "--readme", str(readme), "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path))
    assert completed.returncode != 0
    assert "expected the markers <!-- begin finetune summary --> and <!-- end finetune summary --> once each" in completed.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------
# The README block


def test_readme_block_rewrites_only_between_markers(quick, tmp_path):
    readme = tmp_path / "README.md"
    head, tail = "# loftq-jax\n\nIntro.\n\n", "\n\n## Tests\n\nMore text.\n"
    readme.write_text(f"{head}{report.BEGIN}\nold summary\n{report.END}{tail}")
    block = report.readme_block(quick["results"])

    report.update_readme_block(readme, block)
    text = readme.read_text()
    assert text == f"{head}{report.BEGIN}\n{block}{report.END}{tail}"
    assert "old summary" not in text
    assert "| LoftQ, 2 bits |" in text
    assert "LoftQ − QLoRA at 4 bits:" in text
    assert "`results/finetune/README.md`" in text

    report.update_readme_block(readme, block)
    assert readme.read_text() == text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("# no markers\n", "found <!-- begin finetune summary --> 0 time"),
        (f"{report.BEGIN}\n", "<!-- end finetune summary --> 0 time"),
        (f"{report.END}\n{report.BEGIN}\n", "comes before"),
        (f"{report.BEGIN}\n{report.END}\n{report.BEGIN}\n", "<!-- begin finetune summary --> 2 time"),
    ],
)
def test_readme_block_rejects_bad_markers(tmp_path, content, message):
    readme = tmp_path / "README.md"
    readme.write_text(content)
    with pytest.raises(ValueError, match=message):
        report.update_readme_block(readme, "block\n")
    assert readme.read_text() == content


# ---------------------------------------------------------------------------------------------------
# Budget and tuning


def test_default_budget_fits_two_hours():
    l4q = [name for name, setting in experiment.SETTINGS.items() if setting.method == "l4q"]
    estimate = experiment.estimate_seconds(
        list(experiment.SETTINGS), experiment.DEFAULT_SEEDS, experiment.DEFAULT_STEPS,
        probe_settings=l4q, probe_steps=experiment.DEFAULT_PROBE_STEPS,
    )
    assert 60 * 60 < estimate < 2 * 60 * 60


def test_choose_learning_rate_by_mean_dev_accuracy():
    accuracy = {"0.0003": {"a": 0.60, "b": 0.50}, "0.001": {"a": 0.62, "b": 0.56}, "0.003": {"a": 0.70, "b": 0.40}}
    chosen, means = experiment.choose_learning_rate(accuracy)
    assert chosen == 0.001
    assert means["0.003"] == pytest.approx(0.55)

    tied = {"0.001": {"a": 0.5}, "0.0003": {"a": 0.5}}
    assert experiment.choose_learning_rate(tied)[0] == 0.0003


def test_hyper_key_changes_with_learning_rate():
    base = experiment.Hyper()
    assert base.key("lora") == experiment.Hyper().key("lora")
    assert base.key("lora") != experiment.Hyper(learning_rate=3e-4).key("lora")
    spec = experiment.RunSpec("train", "l4q2", 1, "run", "data.npz", base, 300, custom_vjp=False)
    assert experiment.RunSpec.from_json(spec.to_json()) == spec


def _run_record(seed: int, mean_step_s: float, median_step_s: float) -> dict:
    metrics = {"accuracy": 0.7, "macro_f1": 0.6}
    return {
        "seed": seed, "test": metrics, "dev": metrics, "init_error": 0.1, "mean_step_s": mean_step_s,
        "median_step_s": median_step_s, "peak_rss_train_bytes": 2**30, "peak_rss_bytes": 2**30,
        "weights": {}, "trainable_parameters": 10,
    }  # fmt: skip


def test_step_time_is_median_of_run_means():
    runs = [_run_record(0, 0.30, 0.24), _run_record(1, 0.32, 0.35), _run_record(2, 0.90, 0.36)]
    summary = report.summarize_setting(runs)
    assert summary["mean_step_s"] == pytest.approx(0.32)
    assert summary["median_step_s"] == pytest.approx(0.35)


def test_quantizer_ratio_changes_only_l4q_key():
    base, slower = experiment.Hyper(quantizer_lr_ratio=1.0), experiment.Hyper(quantizer_lr_ratio=0.1)
    assert base.key("l4q") != slower.key("l4q")
    for method in ("lora", "qlora", "loftq"):
        assert base.key(method) == slower.key(method)
