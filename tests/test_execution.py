import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from loftq_jax import LoftQConfig, loftq
from loftq_jax.errors import InputError
from loftq_jax.execution import LoftQRunner, group_by_shape


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
    for index, w in enumerate(stack):
        single = loftq(w, config)
        np.testing.assert_allclose(result.errors[index], single.errors, rtol=1e-5)
        np.testing.assert_array_equal(result.quantized.codes[index], single.quantized.codes)


def test_chunk_length_follows_memory_budget():
    runner = LoftQRunner(LoftQConfig(rank=4, steps=1))
    per_weight = runner.bytes_per_weight((64, 64), np.float32)
    assert per_weight >= 64 * 64 * 4
    assert runner.chunk_length((64, 64), np.float32, 10, 3 * per_weight) == 3
    assert runner.chunk_length((64, 64), np.float32, 2, 3 * per_weight) == 2
    assert runner.chunk_length((64, 64), np.float32, 10, None) == 10
    with pytest.raises(InputError, match="too small for one 64x64 weight"):
        runner.chunk_length((64, 64), np.float32, 10, per_weight // 2)


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
