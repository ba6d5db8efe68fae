"""Tests of loftq_jax.runtime: the allocator settings stop per-call page faults of large JAX outputs, and a
dropped Ctrl-C is raised again."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from loftq_jax import runtime

# Prints the median minor page faults of one call of a jitted multiply over a (4096, 4096) float32 array.
# The heap needs a few calls to grow to its working size, so the first thirty calls are not counted.
FAULT_PROBE = """
import json, resource, statistics, sys
from loftq_jax import runtime
configured = runtime.configure_allocator() if sys.argv[1] == "configure" else False
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
scale = jax.jit(lambda x: x * 1.5)
for _ in range(30):
    scale(x).block_until_ready()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    scale(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"configured": configured, "faults_per_call": statistics.median(faults)}))
"""

PAGES_PER_OUTPUT = 4096 * 4096 * 4 // 4096

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")


def _probe(mode: str, env_extra: dict[str, str] | None = None) -> dict:
    env = {key: value for key, value in os.environ.items() if key != runtime.DISABLE_ENV}
    env.update(env_extra or {})
    completed = subprocess.run(
        [sys.executable, "-c", FAULT_PROBE, mode], env=env, check=True, capture_output=True, text=True, timeout=300
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


@linux_only
def test_configured_allocator_reuses_output_buffers():
    configured = _probe("configure")

    assert configured["configured"] is True
    assert configured["faults_per_call"] < PAGES_PER_OUTPUT / 10


@linux_only
def test_default_allocator_faults_every_page():
    # Shows what the settings fix: without them each 64 MiB output is faulted in page by page.
    default = _probe("default")

    assert default["faults_per_call"] > PAGES_PER_OUTPUT / 2


@linux_only
def test_disable_variable_keeps_defaults():
    disabled = _probe("configure", {runtime.DISABLE_ENV: "1"})

    assert disabled["configured"] is False
    assert disabled["faults_per_call"] > PAGES_PER_OUTPUT / 2


def test_limit_blas_threads_sets_openblas():
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(limits=None):
        applied = runtime.limit_blas_threads(1)
        blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]

        assert applied == 1
        assert blas, "no BLAS library found after loading SciPy's LAPACK"
        assert all(pool["num_threads"] == 1 for pool in blas)


def _drop_interrupt() -> None:
    """Deliver Ctrl-C to this process and drop the KeyboardInterrupt, as Python does inside a gc callback."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    except KeyboardInterrupt:
        return
    raise AssertionError("SIGINT did not raise KeyboardInterrupt within 1 s")


def test_dropped_interrupt_is_raised_again():
    with runtime.remember_interrupts():
        runtime.raise_if_interrupted()
        _drop_interrupt()
        with pytest.raises(KeyboardInterrupt):
            runtime.raise_if_interrupted()


def test_remembered_interrupt_ends_with_the_block():
    default = signal.getsignal(signal.SIGINT)
    with runtime.remember_interrupts():
        _drop_interrupt()
    assert signal.getsignal(signal.SIGINT) is default
    runtime.raise_if_interrupted()
