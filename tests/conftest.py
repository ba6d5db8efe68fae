"""Shared fixtures: the real MiniLM checkpoint and a counter of XLA compilations."""

import contextlib
import logging

import numpy as np
import pytest

from loftq_jax import checkpoint


@pytest.fixture(scope="session")
def minilm_weights() -> dict[str, np.ndarray]:
    """The 36 encoder linear weights of all-MiniLM-L6-v2, by tensor name."""
    model = checkpoint.Checkpoint.from_dir(checkpoint.default_model_dir())
    return {info.name: model.load(info.name) for info in checkpoint.select_targets(model)}


class CompileCounter(logging.Handler):
    """Count the XLA compilations of one jitted function while `jax.log_compiles` is on."""

    def __init__(self, function_name: str):
        super().__init__(level=logging.DEBUG)
        self.marker = f"Compiling jit({function_name})"
        self.count = 0

    def emit(self, record):
        if self.marker in record.getMessage():
            self.count += 1


@pytest.fixture
def count_compiles():
    import jax

    @contextlib.contextmanager
    def counting(function_name: str):
        counter = CompileCounter(function_name)
        logger = logging.getLogger("jax")
        previous_level = logger.level
        logger.addHandler(counter)
        logger.setLevel(logging.DEBUG)
        try:
            with jax.log_compiles(True):
                yield counter
        finally:
            logger.removeHandler(counter)
            logger.setLevel(previous_level)

    return counting


@pytest.fixture(scope="module")
def private_cache_home(tmp_path_factory):
    """Keep the default compilation cache of `loftq-jax init` runs in a test folder, not in the user's home.

    Module scope, so that a test module can apply it to its module-scoped conversions too.
    """
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache-home")))
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        yield
