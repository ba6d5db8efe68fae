"""Tests of safetensors reading: index and shard checks, raw bytes, target selection and NaN counting."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from loftq_jax import checkpoint
from loftq_jax.errors import InputError


def _sharded(folder, tensors, split):
    """Write `tensors` into two shards, the first holding the names in `split`, with an index."""
    folder.mkdir()
    shards = {
        "model-00001-of-00002.safetensors": {name: tensors[name] for name in tensors if name in split},
        "model-00002-of-00002.safetensors": {name: tensors[name] for name in tensors if name not in split},
    }
    weight_map = {}
    for shard, shard_tensors in shards.items():
        save_file(shard_tensors, str(folder / shard))
        weight_map.update({name: shard for name in shard_tensors})
    (folder / checkpoint.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "layers.0.q.weight": rng.standard_normal((4, 6)).astype(np.float32),
        "layers.0.q.bias": rng.standard_normal(4).astype(np.float32),
        "layers.1.q.weight": rng.standard_normal((4, 6)).astype(ml_dtypes.bfloat16),
        "head.weight": rng.standard_normal((3, 6)).astype(np.float16),
    }


def test_sharded_checkpoint_reads_every_tensor(tmp_path):
    tensors = _tensors()
    model = checkpoint.Checkpoint.from_dir(_sharded(tmp_path / "model", tensors, {"layers.0.q.weight", "head.weight"}))
    assert model.sharded
    assert len(model.files) == 2
    for name, array in tensors.items():
        assert model.load(name).tobytes() == array.tobytes(), name
        assert b"".join(model.iter_bytes(name, piece_size=7)) == array.tobytes(), name
        begin, end = model.byte_range(name)
        assert end - begin == array.nbytes


def test_single_file_is_not_sharded(tmp_path):
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    assert not checkpoint.Checkpoint.from_dir(tmp_path).sharded


def test_index_tensor_absent_from_shard(tmp_path):
    folder = _sharded(tmp_path / "model", _tensors(), {"head.weight"})
    index = json.loads((folder / checkpoint.INDEX_FILE).read_text())
    index["weight_map"]["layers.0.q.weight"] = "model-00001-of-00002.safetensors"
    (folder / checkpoint.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(InputError) as raised:
        checkpoint.Checkpoint.from_dir(folder)
    message = str(raised.value)
    assert "lists tensor 'layers.0.q.weight' in model-00001-of-00002.safetensors" in message
    assert "it is in model-00002-of-00002.safetensors" in message


def test_index_names_missing_shard(tmp_path):
    folder = _sharded(tmp_path / "model", _tensors(), {"head.weight"})
    (folder / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match="names shard model-00001-of-00002.safetensors, which is missing"):
        checkpoint.Checkpoint.from_dir(folder)


@pytest.mark.parametrize("index_text", ["{", '{"weight_map": ["a"]}', '{"weight_map": {"a": 3}}'])
def test_invalid_index_rejected(tmp_path, index_text):
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    (tmp_path / checkpoint.INDEX_FILE).write_text(index_text)
    with pytest.raises(InputError, match="invalid safetensors index"):
        checkpoint.Checkpoint.from_dir(tmp_path)


def test_tensor_in_two_shards_rejected(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "a.safetensors"))
    save_file({"head.weight": tensors["head.weight"]}, str(tmp_path / "b.safetensors"))
    with pytest.raises(InputError, match="b.safetensors: tensor 'head.weight' is also stored in .*a.safetensors"):
        checkpoint.Checkpoint.from_dir(tmp_path)


def test_corrupt_header_names_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), str(path))
    data = bytearray(path.read_bytes())
    data[9:13] = b"\xff\xfe{["
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="model.safetensors: not a valid safetensors file"):
        checkpoint.Checkpoint.from_dir(tmp_path)


def test_select_targets_within_blocks(tmp_path):
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    model = checkpoint.Checkpoint.from_dir(tmp_path)
    names = [info.name for info in checkpoint.select_targets(model, ["q", "head"], within_blocks=True)]
    assert names == ["layers.0.q.weight", "layers.1.q.weight"]
    names = [info.name for info in checkpoint.select_targets(model, ["q", "head"])]
    assert names == ["head.weight", "layers.0.q.weight", "layers.1.q.weight"]


@pytest.mark.parametrize("dtype, name", [(np.float32, "F32"), (ml_dtypes.bfloat16, "BF16"), (np.float16, "F16"), (np.float64, "F64")])
def test_count_nonfinite(dtype, name):
    values = np.linspace(-3, 3, 2000).reshape(40, 50).astype(dtype)
    assert checkpoint.count_nonfinite(values, name, rows_per_piece=7) == 0
    values[3, 4] = np.nan
    values[39, 49] = np.inf
    values[0, 0] = -np.inf
    # The largest finite value has every exponent bit but the lowest set, and must not count.
    values[5, 5] = np.finfo(dtype).max
    assert checkpoint.count_nonfinite(values, name, rows_per_piece=7) == 3
