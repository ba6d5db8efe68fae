"""The work folder inside the output folder of `loftq-jax init`: settings, chunk plan and one file per finished weight.

An interrupted run leaves this folder behind, and `--resume` continues from it:

    .loftq-parts/plan.json                    chunk length of each (shape, dtype) group
    .loftq-parts/settings.json                everything that changes the results; written last at start
    .loftq-parts/parts/000012.safetensors     the results of target weight 12

Every file is written under a temporary name and renamed, so a file under its final name is complete.
"""

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from loftq_jax.errors import InputError
from loftq_jax.peft_export import atomic_path, write_json

WORK_DIR = ".loftq-parts"
SETTINGS_FILE = "settings.json"
PLAN_FILE = "plan.json"
PARTS_DIR = "parts"
ASSEMBLY_DIR = "assembly"
_ENTRY_KEY = "entry"


class WorkFolder:
    """The work folder of one output folder; see the module docstring for its files."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / WORK_DIR
        self.parts = self.path / PARTS_DIR

    def read_settings(self) -> Optional[dict[str, Any]]:
        """Return the settings of the run that made this folder, or None if it has none yet."""
        path = self.path / SETTINGS_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"{path}: invalid JSON ({error}); pass --overwrite to start over") from None

    def read_chunk_lengths(self) -> list[int]:
        """Return the chunk length of each group, as the run that made this folder planned it."""
        path = self.path / PLAN_FILE
        try:
            return [int(length) for length in json.loads(path.read_text())["chunk_lengths"]]
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
            raise InputError(f"{path}: missing or invalid chunk plan ({error}); pass --overwrite to start over") from None

    def start(self, settings: dict[str, Any], chunk_lengths: list[int]) -> None:
        """Replace any earlier work folder with an empty one for `settings`; the settings file comes last."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.parts.mkdir(parents=True)
        write_json(self.path / PLAN_FILE, {"chunk_lengths": list(chunk_lengths)})
        write_json(self.path / SETTINGS_FILE, settings)

    def remove_temporary_files(self) -> None:
        """Delete files that a killed run left under temporary names, and its unfinished final outputs."""
        for path in self.path.rglob(".*.tmp"):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.path / ASSEMBLY_DIR, ignore_errors=True)

    def part_path(self, index: int) -> Path:
        return self.parts / f"{index:06d}.safetensors"

    def has_part(self, index: int) -> bool:
        return self.part_path(index).is_file()

    def write_part(self, index: int, tensors: dict[str, np.ndarray], entry: dict[str, Any]) -> None:
        """Save one weight's result arrays and report entry atomically."""
        path = self.part_path(index)
        with atomic_path(path) as temporary:
            save_file(tensors, str(temporary), metadata={_ENTRY_KEY: json.dumps(entry)})

    def read_entry(self, index: int) -> dict[str, Any]:
        """Return the report entry stored with a weight's part."""
        with self._open(index) as handle:
            return json.loads(handle.metadata()[_ENTRY_KEY])

    def read_tensor(self, index: int, key: str) -> np.ndarray:
        """Read one array of a weight's part, memory-mapped, so that other arrays stay on disk."""
        with self._open(index) as handle:
            return handle.get_tensor(key)

    def read_tensors(self, index: int) -> dict[str, np.ndarray]:
        with self._open(index) as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}

    def fresh_assembly_dir(self) -> Path:
        """Return an empty folder inside the work folder where the final outputs are built."""
        path = self.path / ASSEMBLY_DIR
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        return path

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _open(self, index: int):
        path = self.part_path(index)
        try:
            return safe_open(str(path), framework="numpy")
        except (SafetensorError, OSError) as error:
            raise InputError(f"{path}: unreadable result of target weight {index} ({error}); pass --overwrite to start over") from None


def changed_setting(old: dict[str, Any], new: dict[str, Any]) -> Optional[str]:
    """Return the first key whose value differs between two settings dicts, or None if they agree."""
    for key in list(new) + [key for key in old if key not in new]:
        if old.get(key) != new.get(key):
            return key
    return None

