"""Packed LoftQ checkpoints in orbax format: uint8 codes, scales, adapters and quantizer settings per weight.

A packed checkpoint is a folder with one or more orbax checkpoints under `arrays/`, each holding a batch of
weights as {tensor name: {"codes", "scales", ["offsets"], "a", "b"}}, and a JSON sidecar,
`loftq_settings.json`, holding each weight's shape, dtype, layout, quantizer settings, array shapes and
batch. `packed_abstract_tree` builds the abstract tree from the sidecar alone, and `restore_packed` reads
the arrays back bit for bit. Batches bound the memory of writing, because `PackedWriter` keeps one batch at a time.
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable, Optional

import jax
import numpy as np

from loftq_jax.errors import InputError
from loftq_jax.quantize import QuantConfig, QuantizedTensor

SETTINGS_FILE = "loftq_settings.json"
ARRAYS_DIR = "arrays"
FORMAT_VERSION = 1
LAYOUTS = ("linear", "conv1d")


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """One weight's LoftQ result in its packed form, in the layout the weight is stored in.

    With layout "linear" the weight is (out, in); with "conv1d" it is stored (in, out) as transformers'
    Conv1D does. Either way `a` is (rows, r) and `b` is (r, columns) of the stored weight, so that
    Q + scaling·a·b approximates it.
    """

    quantized: QuantizedTensor
    a: np.ndarray
    b: np.ndarray
    dtype: str  # dtype of the original weight, for dequantizing back
    layout: str = "linear"


def _arrays(weight: PackedWeight) -> dict[str, np.ndarray]:
    arrays = {"codes": weight.quantized.codes, "scales": weight.quantized.scales, "a": weight.a, "b": weight.b}
    if weight.quantized.offsets is not None:
        arrays["offsets"] = weight.quantized.offsets
    return {key: np.asarray(value) for key, value in arrays.items()}


def _checkpointer():
    """Return an orbax StandardCheckpointer in which only the calling process takes part.

    A multi-process run can then write a packed checkpoint from one process alone. orbax is imported here
    because importing it calls logging.basicConfig, which would leave the command line's logging unset.
    """
    import orbax.checkpoint as ocp

    this_process = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=this_process, active_processes={this_process})
    return ocp.StandardCheckpointer(multiprocessing_options=options)


class PackedWriter:
    """Write a packed checkpoint batch by batch; the folder is usable once `close` wrote the sidecar."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        self.path.mkdir(parents=True)
        self._settings: dict[str, dict] = {}
        self._checkpointer = _checkpointer()

    def add_batch(self, weights: dict[str, PackedWeight]) -> None:
        """Save one orbax checkpoint of `weights`; names must not repeat across batches."""
        repeated = sorted(set(weights) & set(self._settings))
        if repeated:
            raise ValueError(f"{self.path}: weight {repeated[0]!r} is already in an earlier batch")
        batch = f"batch-{len({entry['batch'] for entry in self._settings.values()}):05d}"
        tree = {name: _arrays(weight) for name, weight in weights.items()}
        for name, weight in weights.items():
            if weight.layout not in LAYOUTS:
                raise ValueError(f"{name}: unknown layout {weight.layout!r}; expected one of {LAYOUTS}")
            self._settings[name] = {
                "shape": list(weight.quantized.shape),
                "dtype": weight.dtype,
                "layout": weight.layout,
                "quantizer": dataclasses.asdict(weight.quantized.config),
                "arrays": {key: [list(value.shape), str(value.dtype)] for key, value in tree[name].items()},
                "batch": batch,
            }
        self._checkpointer.save(self.path / ARRAYS_DIR / batch, tree)
        self._checkpointer.wait_until_finished()

    def close(self) -> None:
        """Write the sidecar, last, so that a folder with a sidecar has every batch."""
        temporary = self.path / f".{SETTINGS_FILE}.tmp"
        temporary.write_text(json.dumps({"format": FORMAT_VERSION, "weights": self._settings}, indent=1))
        os.replace(temporary, self.path / SETTINGS_FILE)
        self._checkpointer.close()


def save_packed(path: str | Path, weights: dict[str, PackedWeight]) -> None:
    """Write `weights` as one batch to the folder `path` (created; it must not exist yet)."""
    save_packed_batches(path, [weights])


def save_packed_batches(path: str | Path, batches: Iterable[dict[str, PackedWeight]]) -> None:
    """Write each dict of `batches` as one orbax checkpoint in the folder `path`, holding one batch at a time."""
    writer = PackedWriter(path)
    for batch in batches:
        writer.add_batch(batch)
    writer.close()


def _read_settings(path: Path) -> dict[str, dict]:
    settings_path = path / SETTINGS_FILE
    if not settings_path.is_file():
        raise InputError(f"{path}: not a packed LoftQ checkpoint ({SETTINGS_FILE} is missing)")
    try:
        settings = json.loads(settings_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{settings_path}: invalid JSON ({error})") from None
    if not isinstance(settings, dict) or settings.get("format") != FORMAT_VERSION:
        raise InputError(f"{settings_path}: unsupported packed checkpoint format; expected format {FORMAT_VERSION}")
    return settings["weights"]


def packed_abstract_tree(path: str | Path) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """Return the tree of a packed checkpoint as jax.ShapeDtypeStruct leaves, read from its sidecar alone."""
    settings = _read_settings(Path(path).absolute())
    return {
        name: {key: jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype)) for key, (shape, dtype) in entry["arrays"].items()}
        for name, entry in settings.items()
    }


def restore_packed(path: str | Path, names: Optional[Iterable[str]] = None) -> dict[str, PackedWeight]:
    """Read a folder written by `save_packed` or `PackedWriter` back into `PackedWeight`s, bit for bit.

    `names` restricts the result to those weights; only the batches that hold them are read.
    """
    path = Path(path).absolute()
    settings = _read_settings(path)
    abstract = packed_abstract_tree(path)
    selected = list(settings) if names is None else list(names)
    unknown = [name for name in selected if name not in settings]
    if unknown:
        raise InputError(f"{path}: no weight {unknown[0]!r} in this packed checkpoint")

    by_batch: dict[str, list[str]] = {}
    for name in selected:
        by_batch.setdefault(settings[name]["batch"], []).append(name)
    checkpointer = _checkpointer()
    trees = {}
    for batch, batch_names in by_batch.items():
        batch_abstract = {name: abstract[name] for name in settings if settings[name]["batch"] == batch}
        restored = checkpointer.restore(path / ARRAYS_DIR / batch, batch_abstract)
        trees.update({name: restored[name] for name in batch_names})
    checkpointer.close()

    weights = {}
    for name in selected:
        entry, arrays = settings[name], trees[name]
        quantized = QuantizedTensor(
            codes=np.asarray(arrays["codes"]),
            scales=np.asarray(arrays["scales"]),
            offsets=np.asarray(arrays["offsets"]) if "offsets" in arrays else None,
            shape=tuple(entry["shape"]),
            config=QuantConfig(**entry["quantizer"]),
        )
        weights[name] = PackedWeight(
            quantized, np.asarray(arrays["a"]), np.asarray(arrays["b"]), entry["dtype"], entry.get("layout", "linear")
        )
    return weights


def directory_size(path: str | Path) -> int:
    """Return the bytes of all files below `path`."""
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())
