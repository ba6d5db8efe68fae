"""Running LoftQ over many weights: same-shape groups, chunks sized to a memory budget, spread over devices.

Weights of one (shape, dtype) form a group that shares one compiled, vmapped LoftQ. A group is cut into
chunks whose working memory fits `max_memory`. Each chunk is split along its batch axis over a one-axis
device mesh with `jax.shard_map`, so every local device factorizes its own slice of the chunk. After
`jax.distributed.initialize` the mesh spans every device of every host.

NOTE: the multi-host path (`jax.process_count() > 1`) has not been run yet; only 1 and 4 local devices are tested.
"""

import dataclasses
import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from loftq_jax.errors import InputError
from loftq_jax.loftq import LoftQConfig, LoftQResult, loftq_unchecked

logger = logging.getLogger(__name__)

BATCH_AXIS = "batch"


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
        per_device = jax.vmap(functools.partial(loftq_unchecked, config=config))
        # check_vma=False: the scan carry starts as a replicated zero matrix and becomes per-device data.
        self._run = jax.jit(
            jax.shard_map(
                per_device,
                mesh=self.mesh,
                in_specs=PartitionSpec(BATCH_AXIS),
                out_specs=PartitionSpec(BATCH_AXIS),
                check_vma=False,
            )
        )

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def bytes_per_weight(self, shape: tuple[int, int], dtype) -> int:
        """Return the working memory of one weight in flight, from XLA's memory analysis of a one-weight call."""
        stack = jax.ShapeDtypeStruct((1, *shape), dtype)
        single = jax.jit(jax.vmap(functools.partial(loftq_unchecked, config=self.config)))
        analysis = single.lower(stack).compile().memory_analysis()
        if analysis is None:
            # NOTE: a backend without memory analysis gets an estimate of eight float32 copies of the weight.
            return 8 * 4 * int(np.prod(shape))
        return int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes)

    def chunk_length(self, shape: tuple[int, int], dtype, num_weights: int, max_memory: int | None) -> int:
        """Return how many weights of `shape` to run at once: a multiple of the device count, within budget."""
        if max_memory is None:
            per_device = -(-num_weights // self.num_devices)
        else:
            per_weight = self.bytes_per_weight(shape, dtype)
            per_device = max_memory // (per_weight * self.num_devices)
            if per_device < 1:
                raise InputError(
                    f"--max-memory {max_memory} bytes is too small for one {shape[0]}x{shape[1]} weight per device: "
                    f"LoftQ needs about {per_weight} bytes per weight on each of {self.num_devices} devices"
                )
            per_device = min(per_device, -(-num_weights // self.num_devices))
        return per_device * self.num_devices

    def run(self, stack: np.ndarray, chunk_length: int) -> LoftQResult:
        """Run LoftQ on `stack` (n, out, in), n <= chunk_length; return host NumPy results for the n weights.

        The stack is padded to `chunk_length` by repeating its last weight, so that every chunk of a
        group has one shape and the group compiles once; the padded results are dropped.
        """
        num_weights = stack.shape[0]
        if num_weights > chunk_length or chunk_length % self.num_devices:
            raise ValueError(f"invalid chunk: {num_weights} weights for a chunk of {chunk_length} on {self.num_devices} devices")
        padded = np.concatenate([stack, np.repeat(stack[-1:], chunk_length - num_weights, axis=0)])
        sharded = self._put(padded)
        result = self._run(sharded)
        return jax.tree_util.tree_map(lambda leaf: self._get(leaf)[:num_weights], result)

    def _put(self, padded: np.ndarray) -> jax.Array:
        if jax.process_count() == 1:
            return jax.device_put(padded, self.sharding)
        # Every host has the whole chunk in memory, so each one passes on the rows of its own devices.
        return jax.make_array_from_callback(padded.shape, self.sharding, lambda index: padded[index])

    @staticmethod
    def _get(leaf: jax.Array) -> np.ndarray:
        if jax.process_count() == 1 or leaf.is_fully_addressable:
            return np.asarray(leaf)
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
