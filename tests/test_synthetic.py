import json

import numpy as np
import pytest

from loftq_jax import checkpoint, synthetic
from loftq_jax.errors import InputError


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"])
def test_tiny_presets_write_readable_checkpoints(tmp_path, preset):
    synthetic.write_checkpoint(tmp_path, preset, dtype="bfloat16", max_shard_bytes=40_000)
    model = checkpoint.Checkpoint.from_dir(tmp_path)
    expected = synthetic.tensor_shapes(synthetic.PRESETS[preset])
    assert {name: info.shape for name, info in model.tensors.items()} == expected
    assert len(model.files) > 1
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == synthetic.PRESETS[preset].model_type
    targets = checkpoint.select_targets(model)
    assert targets
    assert all(len(info.shape) == 2 and info.dtype == "BF16" for info in targets)


def test_weights_have_initializer_scale(tmp_path):
    synthetic.write_checkpoint(tmp_path, "tiny-llama", dtype="float32")
    model = checkpoint.Checkpoint.from_dir(tmp_path)
    w = model.load("model.layers.0.mlp.up_proj.weight")
    assert w.std() == pytest.approx(0.02, rel=0.15)
    np.testing.assert_array_equal(model.load("model.norm.weight"), 1.0)


def test_llama_7b_shapes():
    shapes = synthetic.tensor_shapes(synthetic.PRESETS["llama-7b"])
    assert shapes["model.layers.31.mlp.down_proj.weight"] == (4096, 11008)
    assert sum(int(np.prod(shape)) for shape in shapes.values()) == 6_738_415_616


def test_unknown_preset_rejected(tmp_path):
    with pytest.raises(InputError, match="unknown preset 'llama-70b'"):
        synthetic.write_checkpoint(tmp_path, "llama-70b")
