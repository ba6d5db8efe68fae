"""Tests of `loftq-jax init` in other processes: killed and resumed runs, 4 simulated devices, 2 processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from safetensors import safe_open

from loftq_jax import cli, synthetic
from loftq_jax.packed_checkpoint import restore_packed

OPTIONS = ["--rank", "4", "--iters", "2", "--svd", "randomized"]


@pytest.fixture(scope="module", autouse=True)
def _private_cache_home(private_cache_home):
    yield


def _environment(devices: int, **extra) -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **extra)


def _init_command(model, out, *options) -> list[str]:
    return [sys.executable, "-m", "loftq_jax.cli", "init", str(model), "--out", str(out), *OPTIONS, *options]


def _load(path) -> dict[str, np.ndarray]:
    with safe_open(str(path), "numpy") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _weight_files(out) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.safetensors"))}


def _report_without_timing(out) -> list[dict]:
    report = json.loads((out / "loftq_report.json").read_text())
    return [{key: value for key, value in entry.items() if key != "seconds"} for entry in report["weights"]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """tiny-llama in bfloat16, three shards."""
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("llama") / "model", "tiny-llama", max_shard_bytes=100_000)


# ---------------------------------------------------------------------------------------------------
# Interrupted runs


def _interrupt_after_new_part(command, parts, sig, *, timeout=240) -> subprocess.CompletedProcess:
    """Start `command`, send `sig` once a part file beyond those already in `parts` appears, return the result."""
    before = len(list(parts.glob("*.safetensors"))) if parts.is_dir() else 0
    process = subprocess.Popen(command, env=_environment(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if parts.is_dir() and len(list(parts.glob("*.safetensors"))) > before:
            process.send_signal(sig)
            break
        time.sleep(0.02)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_interrupted_runs_resume_identically(llama, tmp_path):
    """Ctrl-C, then kill -9 of the resumed run, then a second resume: the files equal an uninterrupted run's."""
    reference = tmp_path / "reference"
    assert cli.main(_init_command(llama, reference, "--no-compilation-cache")[3:]) == 0

    out = tmp_path / "out"
    parts = out / ".loftq-parts" / "parts"
    command = _init_command(llama, out, "--no-compilation-cache")
    interrupted = _interrupt_after_new_part(command, parts, signal.SIGINT)
    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    assert "interrupted; run the same command with --resume" in interrupted.stderr
    assert sorted(path.name for path in out.iterdir()) == [".loftq-parts"]
    parts_after_interrupt = len(list(parts.glob("*.safetensors")))
    assert 0 < parts_after_interrupt < 14

    killed = _interrupt_after_new_part([*command, "--resume"], parts, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # A killed run leaves its work folder and temporary files, never a file that looks like a finished output.
    assert sorted(path.name for path in out.iterdir()) == [".loftq-parts"]
    assert parts_after_interrupt < len(list(parts.glob("*.safetensors"))) < 14

    assert cli.main([*command[3:], "--resume"]) == 0
    assert _weight_files(out) == _weight_files(reference)
    assert _report_without_timing(out) == _report_without_timing(reference)
    assert not (out / ".loftq-parts").exists()
    resumed, uninterrupted = restore_packed(out / "loftq_packed"), restore_packed(reference / "loftq_packed")
    assert sorted(resumed) == sorted(uninterrupted)
    for name, weight in uninterrupted.items():
        np.testing.assert_array_equal(resumed[name].quantized.codes, weight.quantized.codes)
        np.testing.assert_array_equal(resumed[name].quantized.scales, weight.quantized.scales)
        np.testing.assert_array_equal(resumed[name].b, weight.b)


# ---------------------------------------------------------------------------------------------------
# Several devices and processes


FOUR_DEVICES_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import jax
    from loftq_jax import LoftQConfig, execution, init_model

    model, root = Path(sys.argv[1]), Path(sys.argv[2])
    assert jax.device_count() == 4, jax.devices()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    execution.configure_compilation_cache(root / "cache")
    config = LoftQConfig(rank=4, steps=2, svd="randomized")
    targets = ["q_proj", "o_proj", "down_proj"]
    spread = init_model.initialize(model, root / "four", config, targets=targets)
    alone = init_model.initialize(model, root / "one", config, targets=targets, devices=jax.devices()[:1])
    print(json.dumps({"four": spread["execution"], "one": alone["execution"]}))
    """
)


@pytest.fixture(scope="module")
def four_devices(llama, tmp_path_factory):
    """Outputs of one process with 4 simulated CPU devices, and of the same process on its first device alone."""
    root = tmp_path_factory.mktemp("devices")
    completed = subprocess.run(
        [sys.executable, "-c", FOUR_DEVICES_SCRIPT, str(llama), str(root)],
        env=_environment(4),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return root, json.loads(completed.stdout.strip().splitlines()[-1])


def test_four_devices_match_one_device(four_devices):
    root, executions = four_devices
    assert executions["four"]["devices"] == 4
    assert executions["one"]["devices"] == 1
    # down_proj's group of two weights is padded to one weight per device.
    assert {group["weights"]: group["chunk_length"] for group in executions["four"]["groups"]} == {4: 4, 2: 4}
    assert {group["weights"]: group["chunk_length"] for group in executions["one"]["groups"]} == {4: 4, 2: 2}

    spread, alone = root / "four", root / "one"
    assert sorted(_weight_files(spread)) == sorted(_weight_files(alone))
    for name in _weight_files(spread):
        four, one = _load(spread / name), _load(alone / name)
        assert sorted(four) == sorted(one)
        for key in four:
            # vmap over another batch size changes the last bits of A and B, not the result.
            np.testing.assert_allclose(four[key].astype(np.float32), one[key].astype(np.float32), rtol=1e-4, atol=2e-5, err_msg=key)
    for entry_four, entry_one in zip(_report_without_timing(spread), _report_without_timing(alone)):
        assert entry_four["name"] == entry_one["name"]
        assert entry_four["error"] == pytest.approx(entry_one["error"], rel=1e-4)
    packed_four, packed_one = restore_packed(spread / "loftq_packed"), restore_packed(alone / "loftq_packed")
    for name, weight in packed_one.items():
        np.testing.assert_array_equal(packed_four[name].quantized.codes, weight.quantized.codes, err_msg=name)


def test_compilation_cache_stores_programs(four_devices):
    root, _ = four_devices
    entries = [path.name for path in (root / "cache").iterdir()]
    assert any(name.startswith("jit_loftq_chunk") for name in entries), entries


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_match_one_process(llama, four_devices, tmp_path):
    """Two processes with two devices each write the same files as one process with four devices."""
    root, _ = four_devices
    out = tmp_path / "out"
    port = _free_port()
    # The coordinator listens on the loopback interface only.
    env = _environment(2, JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")
    processes = []
    for process_id in range(2):
        command = _init_command(llama, out, "--target", "q_proj", "o_proj", "down_proj", "--no-compilation-cache")
        command += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(process_id)]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [process.communicate(timeout=300) for process in processes]
    for process, (_, stderr) in zip(processes, results):
        assert process.returncode == 0, stderr[-3000:]

    # Each process logs only the weights that its own two devices computed: two of the four 64x64 weights
    # each, and both 64x176 weights, whose chunk of four puts the padding on process 1's devices.
    logged = []
    for _, stderr in results:
        logged.append([line for line in stderr.splitlines() if "] model.layers." in line])
    assert [len(lines) for lines in logged] == [4, 2]
    assert _weight_files(out) == _weight_files(root / "four")
    assert _report_without_timing(out) == _report_without_timing(root / "four")
    report = json.loads((out / "loftq_report.json").read_text())
    assert report["execution"]["processes"] == 2
    assert report["execution"]["devices"] == 4
