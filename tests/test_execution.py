import os
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest

from loftq_jax import LoftQConfig, execution, loftq
from loftq_jax.errors import InputError
from loftq_jax.execution import Chunk, LoftQRunner, group_by_shape, parse_memory, plan_chunks, weight_key


def test_group_by_shape_keeps_order():
    shapes = {"a": ((4, 8), "F32"), "b": ((8, 4), "F32"), "c": ((4, 8), "F32"), "d": ((4, 8), "BF16")}
    groups = group_by_shape(shapes)
    assert [(group.shape, group.dtype, group.names) for group in groups] == [
        ((4, 8), "F32", ("a", "c")),
        ((8, 4), "F32", ("b",)),
        ((4, 8), "BF16", ("d",)),
    ]


def test_runner_equals_one_at_a_time():
    config = LoftQConfig(rank=4, steps=2, svd="randomized")
    stack = np.random.default_rng(0).standard_normal((3, 48, 32)).astype(np.float32)
    runner = LoftQRunner(config)
    result = runner.run(stack, chunk_length=4)
    assert result.errors.shape == (3, 3)
    assert result.a.dtype == np.float32
    for index, w in enumerate(stack):
        single = loftq(w, config, key=weight_key(config, index))
        np.testing.assert_allclose(result.errors[index], single.errors, rtol=1e-5)
        np.testing.assert_array_equal(result.quantized.codes[index], single.quantized.codes)
        # The stored error is that of Q + A·B; with a float32 weight Q needs no rounding.
        np.testing.assert_allclose(result.error[index], single.errors[-1], rtol=1e-4)


def test_run_local_loads_rows_and_drops_padding():
    config = LoftQConfig(rank=4, steps=2, svd="randomized")
    stack = np.random.default_rng(0).standard_normal((3, 48, 32)).astype(np.float32)
    runner = LoftQRunner(config)
    loaded = []

    def load_weight(row):
        loaded.append(row)
        return stack[row]

    rows = runner.run_local(load_weight, 3, (48, 32), np.float32, chunk_length=4)
    assert sorted(rows) == [0, 1, 2]
    # The padding row repeats the last weight.
    assert sorted(loaded) == [0, 1, 2, 2]
    together = runner.run(stack, chunk_length=4)
    for row, result in rows.items():
        np.testing.assert_array_equal(result.quantized.codes, together.quantized.codes[row])
        np.testing.assert_array_equal(result.q, together.q[row])
        assert result.quantized.shape == (48, 32)
    assert runner.compile((48, 32), np.float32, 4) == 0.0


def test_chunk_length_follows_memory_budget():
    runner = LoftQRunner(LoftQConfig(rank=4, steps=1))
    per_weight = runner.bytes_per_weight((64, 64), np.float32)
    assert per_weight >= 64 * 64 * 4
    assert runner.chunk_length((64, 64), np.float32, 10, 3 * per_weight) == 3
    assert runner.chunk_length((64, 64), np.float32, 2, 3 * per_weight) == 2
    assert runner.chunk_length((64, 64), np.float32, 10, None) == 10
    with pytest.raises(InputError, match="too small for one 64x64 weight"):
        runner.chunk_length((64, 64), np.float32, 10, per_weight // 2)
    # A group within the bound needs no memory analysis.
    upper = runner.upper_bytes_per_weight((64, 64))
    assert per_weight <= upper
    assert runner.chunk_length((64, 64), np.float32, 10, 10 * upper) == 10


@pytest.mark.parametrize("shape, dtype", [((176, 48), np.float32), ((48, 176), ml_dtypes.bfloat16)])
def test_upper_bound_covers_memory_analysis(shape, dtype):
    runner = LoftQRunner(LoftQConfig(rank=8, steps=2, svd="exact"))
    assert runner.bytes_per_weight(shape, dtype) <= runner.upper_bytes_per_weight(shape)


def test_plan_chunks_cuts_each_group():
    chunks = plan_chunks([[0, 2, 4, 6, 8], [1, 3]], [2, 4])
    assert chunks == [
        Chunk(0, (0, 2), 2),
        Chunk(0, (4, 6), 2),
        Chunk(0, (8,), 2),
        Chunk(1, (1, 3), 4),
    ]


@pytest.mark.parametrize(
    "text, size",
    [
        ("2GB", 2 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5G", 3 * 2**29),
        ("64 kib", 64 * 1024),
        (" 3 MB ", 3 * 10**6),
        ("1000000", 1000000),
        ("1000000B", 1000000),
    ],
)
def test_parse_memory(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["", "GB", "2 parsecs", "-1GB", "0", "0.1B", "1e9"])
def test_parse_memory_rejects(text):
    with pytest.raises(InputError, match="invalid memory size"):
        parse_memory(text)


def test_format_bytes():
    assert execution.format_bytes(512) == "512 B"
    assert execution.format_bytes(1536) == "1.5 KiB"
    assert execution.format_bytes(3 * 2**30) == "3.0 GiB"


def test_default_compilation_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert execution.default_compilation_cache_dir() == tmp_path / "loftq-jax" / "xla"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert execution.default_compilation_cache_dir() == tmp_path / "jax"


def test_configure_compilation_cache(tmp_path):
    previous = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
    try:
        execution.configure_compilation_cache(tmp_path / "cache")
        assert (tmp_path / "cache").is_dir()
        assert jax.config.jax_enable_compilation_cache
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
        execution.configure_compilation_cache(None)
        assert not jax.config.jax_enable_compilation_cache
    finally:
        jax.config.update("jax_enable_compilation_cache", previous[0])
        jax.config.update("jax_compilation_cache_dir", previous[1])
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()


def test_four_devices_equal_one_device(tmp_path):
    script = textwrap.dedent(
        """
        import numpy as np, jax
        from loftq_jax import LoftQConfig
        from loftq_jax.execution import LoftQRunner
        assert jax.device_count() == 4, jax.devices()
        config = LoftQConfig(rank=4, steps=2, svd="randomized")
        stack = np.random.default_rng(0).standard_normal((6, 48, 32)).astype(np.float32)
        spread = LoftQRunner(config).run(stack, chunk_length=8)
        alone = LoftQRunner(config, devices=jax.devices()[:1]).run(stack, chunk_length=6)
        np.testing.assert_allclose(spread.errors, alone.errors, rtol=1e-6)
        np.testing.assert_array_equal(spread.quantized.codes, alone.quantized.codes)
        np.testing.assert_allclose(spread.a, alone.a, rtol=1e-5, atol=1e-6)
        print("equal on", jax.device_count(), "devices")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    completed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "equal on 4 devices" in completed.stdout
