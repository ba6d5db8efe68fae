"""Running LoftQ over many weights: same-shape groups, chunks sized to a memory budget, spread over devices.

Weights of one (shape, dtype) form a group that shares one compiled, vmapped LoftQ. A group is cut into
chunks whose working memory fits `max_memory`. Each chunk is split along its batch axis over a one-axis
device mesh with `jax.shard_map`, so every device factorizes its own slice of the chunk.

On several hosts, call `jax.distributed.initialize` (see `initialize_distributed`) in every process before
anything else uses JAX. The mesh then spans every device of every process. Each process reads only the
weights of its own devices' rows and gets back only those rows' results (`LoftQRunner.run_local`), so every
process writes the results of the weights that its devices computed.
"""

import dataclasses
import functools
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from loftq_jax.errors import InputError
from loftq_jax.loftq import LoftQConfig, loftq_unchecked, relative_error
from loftq_jax.quantize import QuantizedTensor

logger = logging.getLogger(__name__)

BATCH_AXIS = "batch"


# ---------------------------------------------------------------------------------------------------
# LoftQ of one weight, in the form that the output files store


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["quantized", "q", "a", "b", "errors", "error"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class ChunkResult:
    """LoftQ results of one weight W (out x in), or of a stack of them with a leading weight axis."""

    quantized: QuantizedTensor  # Q as packed codes and scales
    q: jax.Array  # Q dequantized and rounded to W's dtype, as the backbone stores it
    a: jax.Array  # float32 (out, rank), divided by √scaling
    b: jax.Array  # float32 (rank, in), divided by √scaling
    errors: jax.Array  # float32 (steps + 1,): entry 0 is QLoRA, entry t the error after step t
    # ||W - Q - scaling·A·B||_F / ||W||_F with Q rounded to W's dtype, as a reader of the files measures it.
    error: jax.Array  # float32 ()


def weight_key(config: LoftQConfig, weight_id: jax.Array) -> jax.Array:
    """Return the randomized-SVD key of the weight at position `weight_id` of the full target list.

    The key depends on the weight's position only, never on the chunk it runs in, so a resumed or
    differently chunked run draws the same sketches, and no two weights share them.
    """
    return jax.random.fold_in(jax.random.key(config.seed), weight_id)


def loftq_for_export(w: jax.Array, weight_id: jax.Array, config: LoftQConfig) -> ChunkResult:
    """Run LoftQ on one weight; return Q in the weight's dtype, A and B in float32 and the stored error."""
    result = loftq_unchecked(w, config, out_dtype=jnp.float32, key=weight_key(config, weight_id))
    q = result.q.astype(w.dtype)
    rebuilt = q.astype(jnp.float32) + config.scaling * (result.a @ result.b)
    error = relative_error(w.astype(jnp.float32), rebuilt)
    return ChunkResult(result.quantized, q, result.a, result.b, result.errors, error)


# ---------------------------------------------------------------------------------------------------
# Groups and chunks


@dataclasses.dataclass(frozen=True)
class ShapeGroup:
    """Names of the weights that share one shape and dtype, in checkpoint order."""

    shape: tuple[int, int]
    dtype: str
    names: tuple[str, ...]


def group_by_shape(shapes: dict[str, tuple[tuple[int, int], str]]) -> list[ShapeGroup]:
    """Group weight names by (shape, dtype), keeping the first-seen order of groups and names."""
    groups: dict[tuple, list[str]] = {}
    for name, (shape, dtype) in shapes.items():
        groups.setdefault((tuple(shape), dtype), []).append(name)
    return [ShapeGroup(shape, dtype, tuple(names)) for (shape, dtype), names in groups.items()]


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Weights run together: their positions in the full target list, padded to `length` rows."""

    group: int
    indices: tuple[int, ...]
    length: int


def plan_chunks(group_indices: Sequence[Sequence[int]], chunk_lengths: Sequence[int]) -> list[Chunk]:
    """Cut each group's weight positions into consecutive chunks of its chunk length.

    Results of a vmapped LoftQ differ in the last bits with the batch it runs in, so a weight's result is
    reproducible only with the same chunk. The plan is therefore a function of the full target list and
    the chunk lengths alone, never of which weights an earlier run finished.
    """
    chunks = []
    for group, (indices, length) in enumerate(zip(group_indices, chunk_lengths)):
        for start in range(0, len(indices), length):
            chunks.append(Chunk(group, tuple(indices[start : start + length]), length))
    return chunks


# ---------------------------------------------------------------------------------------------------
# Memory budget


_MEMORY_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "K": 2**10,
    "M": 2**20,
    "G": 2**30,
    "T": 2**40,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
MEMORY_UNITS_HELP = "B; KB, MB, GB, TB (powers of 1000); K, M, G, T or KiB, MiB, GiB, TiB (powers of 1024)"


def parse_memory(text: str) -> int:
    """Return the bytes of a size such as "2GB" (2·10⁹), "512MiB" (512·2²⁰), "1.5G" or "1000000"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _MEMORY_UNITS:
        raise InputError(f"invalid memory size {text!r}; expected a number with a unit of {MEMORY_UNITS_HELP}")
    size = int(float(match.group(1)) * _MEMORY_UNITS[unit])
    if size < 1:
        raise InputError(f"invalid memory size {text!r}; expected at least 1 byte")
    return size


def format_bytes(size: int) -> str:
    """Return a size in binary units for messages: 1536 -> "1.5 KiB"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


# ---------------------------------------------------------------------------------------------------
# Runner


class LoftQRunner:
    """Compiled LoftQ over stacks of same-shape weights, split over the devices of a mesh.

    One runner compiles once per (chunk length, shape, dtype); `chunk_length` picks the length from the
    memory budget, so a group of any size reuses one compiled function.
    """

    def __init__(self, config: LoftQConfig, *, devices: Sequence[jax.Device] | None = None):
        self.config = config
        self.devices = list(jax.devices() if devices is None else devices)
        self.mesh = jax.sharding.Mesh(np.array(self.devices), (BATCH_AXIS,))
        self.sharding = NamedSharding(self.mesh, PartitionSpec(BATCH_AXIS))
        per_device = jax.vmap(functools.partial(loftq_for_export, config=config))
        # check_vma=False: the scan carry starts as a replicated zero matrix and becomes per-device data.
        sharded = jax.shard_map(
            per_device,
            mesh=self.mesh,
            in_specs=(PartitionSpec(BATCH_AXIS), PartitionSpec(BATCH_AXIS)),
            out_specs=PartitionSpec(BATCH_AXIS),
            check_vma=False,
        )

        # Named functions, so that compile logs tell the chunk function from the memory probe.
        def loftq_chunk(w_NxOxI, weight_ids_N):
            return sharded(w_NxOxI, weight_ids_N)

        def loftq_memory_probe(w_1xOxI, weight_ids_1):
            return per_device(w_1xOxI, weight_ids_1)

        self._run = jax.jit(loftq_chunk)
        self._probe = jax.jit(loftq_memory_probe)
        self._compiled: dict[tuple, jax.stages.Compiled] = {}
        self._bytes_per_weight: dict[tuple, int] = {}

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def num_local_devices(self) -> int:
        """Devices of this process in the mesh: all of them unless `jax.distributed` spans several processes."""
        return sum(device.process_index == jax.process_index() for device in self.devices)

    def bytes_per_weight(self, shape: tuple[int, int], dtype) -> int:
        """Return the memory that one weight in flight needs, from XLA's memory analysis of a one-weight call.

        That is XLA's temporaries plus its arguments and outputs twice: once on the device and once as the
        host NumPy copies that are read from the checkpoint and written to the output files.
        """
        key = (tuple(shape), np.dtype(dtype).name)
        if key not in self._bytes_per_weight:
            stack = jax.ShapeDtypeStruct((1, *shape), dtype)
            ids = jax.ShapeDtypeStruct((1,), jnp.int32)
            analysis = self._probe.lower(stack, ids).compile().memory_analysis()
            if analysis is None:
                # NOTE: a backend without memory analysis gets an estimate of eight float32 copies of the weight.
                self._bytes_per_weight[key] = 8 * 4 * int(np.prod(shape))
            else:
                in_out = analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                self._bytes_per_weight[key] = int(analysis.temp_size_in_bytes + 2 * in_out)
        return self._bytes_per_weight[key]

    def upper_bytes_per_weight(self, shape: tuple[int, int]) -> int:
        """Return a bound on `bytes_per_weight` that needs no compiling: 20 float32 copies of the weight,
        8 of each factor and 1 MiB.

        XLA's analysis gives 5.4 to 14 float32 copies for shapes from 48x64 to 5632x2048 with either SVD
        (measured with jax 0.10.2 on CPU, float32 and bfloat16 weights). tests/test_execution.py checks the bound.
        """
        num_out, num_in = shape
        return 4 * (20 * num_out * num_in + 8 * self.config.rank * (num_out + num_in)) + 2**20

    def chunk_length(self, shape: tuple[int, int], dtype, num_weights: int, max_memory: int | None) -> int:
        """Return how many weights of `shape` to run at once: a multiple of the device count, within budget.

        `max_memory` is the budget of this process, shared by its local devices; None runs the whole group.
        A group that fits by `upper_bytes_per_weight` runs whole without compiling the memory probe.
        """
        whole_group = -(-num_weights // self.num_devices)
        if max_memory is None or whole_group * self.upper_bytes_per_weight(shape) * self.num_local_devices <= max_memory:
            return whole_group * self.num_devices

        per_weight = self.bytes_per_weight(shape, dtype)
        per_device = max_memory // (per_weight * self.num_local_devices)
        if per_device < 1:
            raise InputError(
                f"--max-memory {format_bytes(max_memory)} is too small for one {shape[0]}x{shape[1]} weight per "
                f"device: LoftQ needs about {format_bytes(per_weight)} per weight on each of "
                f"{self.num_local_devices} devices; pass --max-memory {-(-per_weight * self.num_local_devices // 2**20)}MiB "
                "or more"
            )
        return min(per_device, whole_group) * self.num_devices

    def compile(self, shape: tuple[int, int], dtype, chunk_length: int) -> float:
        """Compile the chunk function for (chunk_length, shape, dtype) unless done; return the seconds taken."""
        key = (chunk_length, tuple(shape), np.dtype(dtype).name)
        if key in self._compiled:
            return 0.0
        if chunk_length % self.num_devices:
            raise ValueError(f"invalid chunk length {chunk_length}: not a multiple of {self.num_devices} devices")
        started = time.perf_counter()
        abstract = jax.ShapeDtypeStruct((chunk_length, *shape), dtype, sharding=self.sharding)
        abstract_ids = jax.ShapeDtypeStruct((chunk_length,), jnp.int32, sharding=self.sharding)
        self._compiled[key] = self._run.lower(abstract, abstract_ids).compile()
        return time.perf_counter() - started

    def run_local(
        self,
        load_weight: Callable[[int], np.ndarray],
        num_weights: int,
        shape: tuple[int, int],
        dtype,
        chunk_length: int,
        weight_ids: Sequence[int] | None = None,
    ) -> dict[int, ChunkResult]:
        """Run LoftQ on weights 0..num_weights-1 of a chunk; return this process's rows as host NumPy results.

        `load_weight(row)` reads one weight, and each process reads only the rows of its own devices. Rows
        past `num_weights` repeat the last weight, so that every chunk of a group has one shape and the group
        compiles once. Their results are dropped. `weight_ids[row]` is the weight's position in the full
        target list, which picks its randomized-SVD key (default: the row).
        """
        if not 0 < num_weights <= chunk_length:
            raise ValueError(f"invalid chunk: {num_weights} weights for a chunk of {chunk_length}")
        weight_ids = list(range(num_weights)) if weight_ids is None else list(weight_ids)
        if len(weight_ids) != num_weights:
            raise ValueError(f"invalid chunk: {len(weight_ids)} weight ids for {num_weights} weights")
        ids_N = np.array([weight_ids[min(row, num_weights - 1)] for row in range(chunk_length)], np.int32)
        self.compile(shape, dtype, chunk_length)
        compiled = self._compiled[(chunk_length, tuple(shape), np.dtype(dtype).name)]

        def load_rows(index) -> np.ndarray:
            rows = range(*index[0].indices(chunk_length))
            stack = np.empty((len(rows), *shape), dtype)
            for position, row in enumerate(rows):
                stack[position] = load_weight(min(row, num_weights - 1))
            return stack

        stack = jax.make_array_from_callback((chunk_length, *shape), self.sharding, load_rows)
        ids = jax.make_array_from_callback(ids_N.shape, self.sharding, lambda index: ids_N[index])
        return _local_rows(compiled(stack, ids), num_weights)

    def run(self, stack: np.ndarray, chunk_length: int) -> ChunkResult:
        """Run LoftQ on `stack` (n, out, in), n <= chunk_length; return host NumPy results for the n weights."""
        num_weights = stack.shape[0]
        if num_weights > chunk_length or chunk_length % self.num_devices:
            raise ValueError(f"invalid chunk: {num_weights} weights for a chunk of {chunk_length} on {self.num_devices} devices")
        if jax.process_count() > 1:
            # Every process has the whole stack here, so the results are gathered to every process too.
            self.compile(stack.shape[1:], stack.dtype, chunk_length)
            compiled = self._compiled[(chunk_length, tuple(stack.shape[1:]), stack.dtype.name)]
            padded = np.concatenate([stack, np.repeat(stack[-1:], chunk_length - num_weights, axis=0)])
            array = jax.make_array_from_callback(padded.shape, self.sharding, lambda index: padded[index])
            ids_N = np.minimum(np.arange(chunk_length), num_weights - 1).astype(np.int32)
            ids = jax.make_array_from_callback(ids_N.shape, self.sharding, lambda index: ids_N[index])
            gathered = multihost_utils.process_allgather(compiled(array, ids), tiled=True)
            return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[:num_weights], gathered)
        rows = self.run_local(stack.__getitem__, num_weights, stack.shape[1:], stack.dtype, chunk_length)
        return jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *(rows[row] for row in range(num_weights)))


def _local_rows(result: ChunkResult, num_weights: int) -> dict[int, ChunkResult]:
    """Split a sharded chunk result into per-weight NumPy results, for the rows on this process's devices."""
    leaves, treedef = jax.tree_util.tree_flatten(result)
    per_row: dict[int, list] = {}
    for position, leaf in enumerate(leaves):
        for shard in leaf.addressable_shards:
            start = shard.index[0].start or 0
            data = np.asarray(shard.data)
            for offset in range(data.shape[0]):
                row = start + offset
                if row < num_weights:
                    per_row.setdefault(row, [None] * len(leaves))[position] = data[offset]
    return {row: jax.tree_util.tree_unflatten(treedef, values) for row, values in sorted(per_row.items())}


# ---------------------------------------------------------------------------------------------------
# Processes and caches


def initialize_distributed(
    coordinator_address: Optional[str] = None, num_processes: Optional[int] = None, process_id: Optional[int] = None
) -> None:
    """Join the processes of a multi-host run with `jax.distributed.initialize`.

    Call it in every process before anything else uses JAX. Values left None are detected by JAX on
    Slurm, Open MPI and Cloud TPU, or read from JAX_COORDINATOR_ADDRESS.
    """
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except (RuntimeError, ValueError) as error:
        raise InputError(f"cannot join the distributed run ({error}); check --coordinator, --num-processes and --process-id") from None
    logger.info("process %d of %d, %d of %d devices local", jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def broadcast_from_first(values: np.ndarray) -> np.ndarray:
    """Return process 0's `values` in every process, so that all processes take the same decision."""
    if jax.process_count() == 1:
        return values
    return np.asarray(multihost_utils.broadcast_one_to_all(values))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier of this name; a no-op in a single process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def default_compilation_cache_dir() -> Path:
    """Return JAX_COMPILATION_CACHE_DIR if set, else loftq-jax/xla in the user's cache folder (XDG_CACHE_HOME)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "loftq-jax" / "xla"


def configure_compilation_cache(cache_dir: Optional[Path]) -> None:
    """Store compiled programs in JAX's persistent compilation cache at `cache_dir`, or turn it off (None).

    Call it before the first compilation. JAX writes only programs that took at least
    jax_persistent_cache_min_compile_time_secs (default 1 s) to compile.
    """
    from jax.experimental.compilation_cache import compilation_cache

    if cache_dir is None:
        jax.config.update("jax_enable_compilation_cache", False)
    else:
        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(f"{cache_dir}: cannot create the compilation cache folder ({error.strerror})") from None
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    # JAX opens its cache once per process; a reset makes a changed setting take effect.
    compilation_cache.reset_cache()
