"""Tests of the work folder that lets an interrupted `loftq-jax init` resume."""

import json

import ml_dtypes
import numpy as np
import pytest

from loftq_jax.errors import InputError
from loftq_jax.work_folder import WorkFolder, changed_setting


def test_start_writes_settings_and_plan(tmp_path):
    work = WorkFolder(tmp_path)
    assert work.read_settings() is None
    work.start({"rank": 4, "targets": None}, [4, 2])
    assert work.read_settings() == {"rank": 4, "targets": None}
    assert work.read_chunk_lengths() == [4, 2]
    assert sorted(path.name for path in work.path.iterdir()) == ["parts", "plan.json", "settings.json"]


def test_start_discards_earlier_parts(tmp_path):
    work = WorkFolder(tmp_path)
    work.start({"rank": 4}, [1])
    work.write_part(0, {"a": np.ones((2, 2), np.float32)}, {"name": "w"})
    work.start({"rank": 8}, [1])
    assert not work.has_part(0)


def test_part_round_trip(tmp_path):
    work = WorkFolder(tmp_path)
    work.start({}, [1])
    q = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    codes = np.array([1, 2, 255], np.uint8)
    work.write_part(7, {"q": q, "codes": codes}, {"name": "layers.0.q.weight", "error": 0.25})
    assert work.has_part(7)
    assert work.part_path(7).name == "000007.safetensors"
    assert work.read_entry(7) == {"name": "layers.0.q.weight", "error": 0.25}
    assert work.read_tensor(7, "q").tobytes() == q.tobytes()
    assert work.read_tensor(7, "q").dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(work.read_tensors(7)["codes"], codes)
    assert not list(work.parts.glob("*.tmp"))


def test_remove_temporary_files(tmp_path):
    work = WorkFolder(tmp_path)
    work.start({}, [1])
    (work.parts / ".000003.safetensors.123.tmp").write_bytes(b"half")
    work.fresh_assembly_dir()
    work.remove_temporary_files()
    assert sorted(path.name for path in work.path.iterdir()) == ["parts", "plan.json", "settings.json"]
    assert list(work.parts.iterdir()) == []


def test_unreadable_part_names_file(tmp_path):
    work = WorkFolder(tmp_path)
    work.start({}, [1])
    work.part_path(2).write_bytes(b"\x00" * 4)
    with pytest.raises(InputError, match="000002.safetensors: unreadable result of target weight 2"):
        work.read_entry(2)


def test_invalid_plan_rejected(tmp_path):
    work = WorkFolder(tmp_path)
    work.start({}, [1])
    (work.path / "plan.json").write_text(json.dumps({"lengths": [1]}))
    with pytest.raises(InputError, match="invalid chunk plan"):
        work.read_chunk_lengths()


@pytest.mark.parametrize(
    "old, new, key",
    [
        ({"rank": 4, "bits": 4}, {"rank": 4, "bits": 4}, None),
        ({"rank": 4, "bits": 4}, {"rank": 8, "bits": 4}, "rank"),
        ({"rank": 4, "bits": 4}, {"rank": 4, "bits": 2}, "bits"),
        ({"rank": 4, "jax": "0.10.2"}, {"rank": 4}, "jax"),
        ({"rank": 4}, {"rank": 4, "targets": ["q"]}, "targets"),
    ],
)
def test_changed_setting(old, new, key):
    assert changed_setting(old, new) == key
