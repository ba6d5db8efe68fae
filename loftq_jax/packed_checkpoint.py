"""Packed LoftQ checkpoints in orbax format: uint8 codes, scales, adapters and quantizer settings per weight.

The tree saved is {tensor name: {"codes", "scales", ["offsets"], "a", "b"}} plus a JSON sidecar,
`loftq_settings.json`, holding each weight's shape, dtype and quantizer settings, which `restore_packed`
needs to build the abstract tree and the `QuantizedTensor`s back.
"""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from loftq_jax.errors import InputError
from loftq_jax.quantize import QuantConfig, QuantizedTensor

SETTINGS_FILE = "loftq_settings.json"
ARRAYS_DIR = "arrays"


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """One weight's LoftQ result in its packed form; `a` is (out, r) and `b` is (r, in)."""

    quantized: QuantizedTensor
    a: np.ndarray
    b: np.ndarray
    dtype: str  # dtype of the original weight, for dequantizing back


def _arrays(weight: PackedWeight) -> dict[str, np.ndarray]:
    arrays = {"codes": weight.quantized.codes, "scales": weight.quantized.scales, "a": weight.a, "b": weight.b}
    if weight.quantized.offsets is not None:
        arrays["offsets"] = weight.quantized.offsets
    return {key: np.asarray(value) for key, value in arrays.items()}


def save_packed(path: str | Path, weights: dict[str, PackedWeight]) -> None:
    """Write `weights` to the folder `path` (created; it must not exist yet)."""
    path = Path(path).absolute()
    tree = {name: _arrays(weight) for name, weight in weights.items()}
    settings = {
        name: {
            "shape": list(weight.quantized.shape),
            "dtype": weight.dtype,
            "quantizer": dataclasses.asdict(weight.quantized.config),
            "arrays": {key: [list(value.shape), str(value.dtype)] for key, value in tree[name].items()},
        }
        for name, weight in weights.items()
    }
    path.mkdir(parents=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / ARRAYS_DIR, tree)
    checkpointer.wait_until_finished()
    (path / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))


def restore_packed(path: str | Path) -> dict[str, PackedWeight]:
    """Read a folder written by `save_packed` back into `PackedWeight`s, bit for bit."""
    path = Path(path).absolute()
    settings_path = path / SETTINGS_FILE
    if not settings_path.is_file():
        raise InputError(f"{path}: not a packed LoftQ checkpoint ({SETTINGS_FILE} is missing)")
    settings = json.loads(settings_path.read_text())
    abstract = {
        name: {key: jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype)) for key, (shape, dtype) in entry["arrays"].items()}
        for name, entry in settings.items()
    }
    tree = ocp.StandardCheckpointer().restore(path / ARRAYS_DIR, abstract)

    weights = {}
    for name, entry in settings.items():
        arrays = tree[name]
        quantized = QuantizedTensor(
            codes=np.asarray(arrays["codes"]),
            scales=np.asarray(arrays["scales"]),
            offsets=np.asarray(arrays["offsets"]) if "offsets" in arrays else None,
            shape=tuple(entry["shape"]),
            config=QuantConfig(**entry["quantizer"]),
        )
        weights[name] = PackedWeight(quantized, np.asarray(arrays["a"]), np.asarray(arrays["b"]), entry["dtype"])
    return weights


def directory_size(path: str | Path) -> int:
    """Return the bytes of all files below `path`."""
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())
