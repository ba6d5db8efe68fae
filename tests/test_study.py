"""Tests of the quantization-error study: `loftq-jax study` on the real MiniLM checkpoint and on synthetic models."""

import argparse
import csv
import json
import logging
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from loftq_jax import checkpoint, cli, plots, study
from loftq_jax.errors import InputError

# Mean relative Frobenius error over MiniLM's 36 encoder linear weights, NF code book, block size 64, rank 16,
# exact SVD: (QLoRA, LoftQ after 5 steps) per bit width.
REFERENCE_MEANS = {4: (0.094, 0.078), 2: (0.570, 0.472)}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """Run `loftq-jax study --quick` on the default model; return the output folder and its study.json."""
    out = tmp_path_factory.mktemp("quick_study")
    assert cli.main(["study", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / study.JSON_FILE).read_text())


def run_by_key(study_json: dict) -> dict[tuple[str, int, int], dict]:
    return {(run["codebook"], run["bits"], run["rank"]): run for run in study_json["runs"]}


def save_tiny_model(folder, tensors: dict[str, np.ndarray]):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


# ---------------------------------------------------------------------------------------------------
# --quick on the real model


def test_quick_study_writes_every_file(quick_study):
    out, _ = quick_study
    for name in (study.JSON_FILE, study.CSV_FILE, study.README_FILE):
        assert (out / name).stat().st_size > 0, name
    for name in study.FIGURE_FILES.values():
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name


def test_quick_study_json_records_settings(quick_study):
    _, result = quick_study
    settings = study.QUICK_SETTINGS
    assert result["command"] == f"loftq-jax study --out {quick_study[0]} --quick"
    assert result["settings"]["bits"] == list(settings.bits)
    assert result["settings"]["max_steps"] == settings.max_steps
    assert set(result["versions"]) >= {"jax", "numpy", "loftq_jax"}
    # One weight of each of MiniLM's three shapes.
    assert sorted(tuple(weight["shape"]) for weight in result["weights"]) == [(384, 384), (384, 1536), (1536, 384)]
    assert result["skipped"] == []
    assert set(run_by_key(result)) == set(settings.configs())


def test_quick_study_csv_matches_json(quick_study):
    out, result = quick_study
    with open(out / study.CSV_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    num_weights = len(result["weights"])
    assert len(rows) == sum((run["steps"] + 1) * num_weights for run in result["runs"])

    runs = run_by_key(result)
    for row in rows[:: max(1, len(rows) // 50)]:
        run = runs[row["codebook"], int(row["bits"]), int(row["rank"])]
        step = int(row["steps"])
        assert float(row["frobenius"]) == pytest.approx(run["frobenius"]["per_weight"][row["weight"]][step], rel=1e-6)
        assert float(row["spectral"]) == pytest.approx(run["spectral"]["per_weight"][row["weight"]][step], rel=1e-6)


def test_quick_study_errors_in_range(quick_study):
    _, result = quick_study
    for run in result["runs"]:
        for norm in study.NORMS:
            for name, errors in run[norm]["per_weight"].items():
                assert len(errors) == run["steps"] + 1
                assert all(0 < error < 1 for error in errors), (run["codebook"], run["bits"], norm, name, errors)


def test_quick_study_loftq_beats_qlora_per_weight(quick_study):
    _, result = quick_study
    for run in result["runs"]:
        for name, errors in run["frobenius"]["per_weight"].items():
            key = (run["codebook"], run["bits"], run["rank"], name)
            assert errors[1] < errors[0], key
            assert errors[-1] < errors[0], key


def test_quick_study_error_falls_with_bits(quick_study):
    _, result = quick_study
    for codebook in result["settings"]["codebooks"]:
        rows = {row["bits"]: row for row in result["summary"]["steps"] if row["codebook"] == codebook}
        for key in ("qlora", "loftq"):
            assert rows[8][key] < rows[4][key] < rows[2][key], (codebook, key)


def test_quick_study_error_falls_with_rank(quick_study):
    _, result = quick_study
    for bits in result["settings"]["rank_bits"]:
        rows = sorted((row for row in result["summary"]["rank"] if row["bits"] == bits), key=lambda row: row["rank"])
        errors = [row["loftq"] for row in rows]
        assert all(high < low for low, high in zip(errors, errors[1:])), (bits, errors)
        # QLoRA starts from zero adapters, so its error is the same at every rank.
        for row in rows[1:]:
            assert row["qlora"] == pytest.approx(rows[0]["qlora"], rel=1e-6), bits


def test_quick_study_nf4_matches_known_range(quick_study):
    _, result = quick_study
    nf4 = next(row for row in result["summary"]["steps"] if row["codebook"] == "nf" and row["bits"] == 4)
    assert 0.08 < nf4["qlora"] < 0.11
    assert nf4["loftq"] < nf4["qlora"]


# ---------------------------------------------------------------------------------------------------
# Reference values on all 36 MiniLM weights


def test_study_reproduces_minilm_reference_means():
    settings = study.StudySettings(
        bits=(4, 2), codebooks=("nf",), rank=16, max_steps=5, steps=5, ranks=(16,), rank_bits=(4, 2), spectral=False
    )
    result = study.run_error_study(checkpoint.default_model_dir(), settings)
    assert len(result.weights) == 36

    rows = {row["bits"]: row for row in study.summarize(result)["steps"]}
    for bits, (qlora, loftq) in REFERENCE_MEANS.items():
        assert rows[bits]["qlora"] == pytest.approx(qlora, rel=0.02), bits
        assert rows[bits]["loftq"] == pytest.approx(loftq, rel=0.02), bits
        assert rows[bits]["weights_improved_after_1"] == 36, bits


# ---------------------------------------------------------------------------------------------------
# Synthetic models


def test_study_on_synthetic_model(tmp_path, caplog):
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(2):
        prefix = f"encoder.layer.{layer}."
        tensors[prefix + "attention.self.query.weight"] = (rng.standard_t(5, (48, 32)) * 0.02).astype(np.float32)
        tensors[prefix + "intermediate.dense.weight"] = (rng.standard_t(5, (64, 32)) * 0.02).astype(np.float16)
        tensors[prefix + "attention.output.LayerNorm.weight"] = np.ones(32, np.float32)
    tensors["embeddings.word_embeddings.weight"] = rng.standard_normal((100, 32)).astype(np.float32)
    model = save_tiny_model(tmp_path / "tiny", tensors)
    out = tmp_path / "out"

    argv = ["study", "--model", str(model), "--out", str(out), "--bits", "2,4", "--rank", "4", "--ranks", "2,4",
            "--max-iters", "2", "--iters", "1", "--target", "query", "dense", "LayerNorm"]
    with caplog.at_level(logging.WARNING, logger="loftq_jax.study"):
        assert cli.main(argv) == 0

    result = json.loads((out / study.JSON_FILE).read_text())
    assert [weight["name"] for weight in result["weights"]] == [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.intermediate.dense.weight",
        "encoder.layer.1.attention.self.query.weight",
        "encoder.layer.1.intermediate.dense.weight",
    ]
    assert result["weights"][1]["dtype"] == "F16"
    skipped = [entry["name"] for entry in result["skipped"]]
    assert skipped == [f"encoder.layer.{layer}.attention.output.LayerNorm.weight" for layer in range(2)]
    for name in skipped:
        assert any(name in message and "not a 2-D weight" in message for message in caplog.messages), name

    runs = run_by_key(result)
    assert set(runs) == {(codebook, bits, 4) for codebook in ("nf", "int", "uniform") for bits in (2, 4)} | {
        ("nf", 4, 2),
        ("nf", 2, 2),
    }
    for (codebook, bits, rank), run in runs.items():
        for errors in run["frobenius"]["per_weight"].values():
            assert errors[1] < errors[0], (codebook, bits, rank)
    for name in study.FIGURE_FILES.values():
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name
    assert "loftq-jax study --model" in (out / study.README_FILE).read_text()


def test_default_targets_skip_embeddings(tmp_path):
    rng = np.random.default_rng(1)
    model = save_tiny_model(tmp_path / "tiny", {
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((40, 24)).astype(np.float32),
        "model.embed_tokens.weight": rng.standard_normal((50, 24)).astype(np.float32),
        "model.layers.0.input_layernorm.weight": np.ones(24, np.float32),
    })
    settings = study.StudySettings(bits=(4,), codebooks=("nf",), max_steps=1, steps=1, rank=4, ranks=(4,), rank_bits=(4,))
    result = study.run_error_study(model, settings)
    assert result.weight_names == ["model.layers.0.mlp.up_proj.weight"]
    assert result.skipped == []


def test_weights_per_shape_keeps_first_of_each_shape(tmp_path):
    rng = np.random.default_rng(2)
    names = [f"h.{layer}.attn.c_proj.weight" for layer in range(3)] + ["h.0.mlp.c_fc.weight"]
    shapes = [(16, 16)] * 3 + [(32, 16)]
    model = save_tiny_model(tmp_path / "tiny", {
        name: rng.standard_normal(shape).astype(np.float32) for name, shape in zip(names, shapes)
    })
    settings = study.StudySettings(
        bits=(4,), codebooks=("nf",), max_steps=1, steps=1, rank=2, ranks=(2,), rank_bits=(4,), weights_per_shape=1
    )
    result = study.run_error_study(model, settings)
    assert sorted(result.weight_names) == ["h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight"]


# ---------------------------------------------------------------------------------------------------
# Invalid input


def test_missing_model_folder_exits_2(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert cli.main(["study", "--model", str(missing), "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert str(missing) in message
    assert "model folder not found" in message


def test_rank_above_weight_size_exits_2(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny", {
        "encoder.layer.0.attention.self.query.weight": np.ones((24, 12), np.float32),
    })
    assert cli.main(["study", "--model", str(model), "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "encoder.layer.0.attention.self.query.weight: rank 64 exceeds min(out, in) = 12" in message
    assert "--ranks" in message


def test_no_matching_target_exits_2(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny", {"encoder.layer.0.output.LayerNorm.weight": np.ones(8, np.float32)})
    assert cli.main(["study", "--model", str(model), "--target", "LayerNorm", "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "no 2-D weight matches the targets (LayerNorm)" in message


def test_integer_weight_exits_2(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny", {"encoder.layer.0.output.dense.weight": np.ones((8, 8), np.int8)})
    assert cli.main(["study", "--model", str(model), "--rank", "2", "--ranks", "2", "--out", str(tmp_path / "out")]) == 2
    assert "encoder.layer.0.output.dense.weight: dtype I8 is not floating point" in capsys.readouterr().err


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"bits": (5,)}, "unsupported bits 5"),
        ({"codebooks": ("nf4",)}, "unknown code book 'nf4'"),
        ({"steps": 6, "max_steps": 5}, "invalid steps 6 with max_steps 5"),
        ({"ranks": ()}, "invalid ranks: the list is empty"),
        ({"ranks": (4, 4)}, "invalid ranks [4, 4]: values repeat"),
        ({"rank": 0}, "invalid rank 0"),
        ({"svd": "lanczos"}, "unknown SVD method 'lanczos'"),
        ({"weights_per_shape": 0}, "invalid weights per shape 0"),
    ],
)
def test_settings_reject_invalid_values(changes, expected):
    with pytest.raises(InputError, match=re.escape(expected)):
        study.StudySettings(**changes)


def test_out_path_that_is_a_file_exits_2(tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    assert cli.main(["study", "--quick", "--out", str(out)]) == 2
    assert f"{out}: failed to create the output folder" in capsys.readouterr().err


def test_malformed_list_option_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["study", "--bits", "4,four"])
    assert exit_info.value.code == 2
    assert "invalid list '4,four'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Helpers


def test_settings_share_runs_between_sweeps():
    settings = study.StudySettings(bits=(2, 4), codebooks=("nf", "int"), rank=16, max_steps=10, ranks=(8, 16),
                                   rank_bits=(4,), steps=5)
    configs = settings.configs()
    # The rank sweep's rank-16 run is the steps sweep's run, with the steps sweep's 10 steps.
    assert configs[study.RunKey("nf", 4, 16)].steps == 10
    assert configs[study.RunKey("nf", 4, 8)].steps == 5
    assert len(configs) == 2 * 2 + 1


def test_options_override_quick_settings():
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    args = parser.parse_args(["--quick", "--bits", "4,8", "--no-spectral", "--out", "here"])
    settings = study.settings_from_args(args)
    assert settings.bits == (4, 8)
    assert settings.spectral is False
    assert settings.max_steps == study.QUICK_SETTINGS.max_steps
    assert study.command_line(args) == "loftq-jax study --out here --bits 4,8 --no-spectral --quick"


def test_short_names_drop_shared_prefix():
    names = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.1.output.dense.weight"]
    assert study.short_names(names) == ["0.attention.self.query", "1.output.dense"]
    assert study.short_names(["encoder.layer.0.output.dense.weight"]) == ["dense"]


def test_plots_accept_plain_lists(tmp_path):
    """Notebooks call the plotting functions with plain Python lists, without running a study."""
    steps_figure = plots.plot_error_vs_steps({4: [[0.09, 0.08, 0.075], [0.1, 0.09, 0.08]]}, {4: [[0.06, 0.05, 0.04]] * 2})
    weight_figure = plots.plot_per_weight(["q", "k"], {2: [0.57, 0.56]}, {2: [0.47, 0.46]}, steps=5)
    rank_figure = plots.plot_error_vs_rank([4, 8], {4: [0.09, 0.1]}, {4: [[0.088, 0.084], [0.09, 0.085]]}, steps=5)
    codebook_figure = plots.plot_codebooks(["nf", "int"], {("nf", 4): 0.094, ("int", 4): 0.115},
                                           {("nf", 4): 0.078, ("int", 4): 0.096}, steps=5)

    for index, figure in enumerate([steps_figure, weight_figure, rank_figure, codebook_figure]):
        path = plots.save_figure(figure, tmp_path / f"figure{index}.png")
        assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert [axes.get_title() for axes in steps_figure.axes] == ["4-bit nf"]
    assert weight_figure.axes[0].get_ylabel() == "relative Frobenius error"
    assert rank_figure.axes[0].get_xlabel() == "LoRA rank r"
