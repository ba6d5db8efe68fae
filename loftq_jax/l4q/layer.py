"""A Flax NNX linear layer trained with L4Q.

Trainable tensors are typed so that an optimizer selects them with a filter, not by name:

- `nnx.LoRAParam` selects every L4Q trainable: A, B, the scales and the offsets;
- `QuantParam`, a subclass of `nnx.LoRAParam`, selects the scales and offsets alone (e.g. for their own
  learning rate); `nnx.All(nnx.LoRAParam, nnx.Not(QuantParam))` selects A and B;
- `FrozenWeight` contains W0 and the bias. It is not an `nnx.Param`, so no optimizer state is created for it.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from loftq_jax.loftq import LoftQConfig
from loftq_jax.l4q import export as export_lib
from loftq_jax.l4q import initialization, linear
from loftq_jax.l4q.config import L4QConfig

# Filter of every tensor that L4Q trains.
TRAINABLE = nnx.LoRAParam


class QuantParam(nnx.LoRAParam):
    """A learned quantizer scale or offset (out, groups)."""


class FrozenWeight(nnx.Variable):
    """A frozen pretrained tensor: the base weight W0 or the bias."""


class L4QLinear(nnx.Module):
    """A linear layer y = x @ Q(W0 + s·A·B)ᵀ + bias with learned quantizer scales and offsets.

    Jeon, Kim and Kim, 2025, L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large Language
    Models, ACL 2025, arXiv 2402.04902.

    Example:

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> w0 = jax.random.normal(jax.random.key(0), (8, 16)) * 0.02
    >>> layer = L4QLinear.from_weight(w0, L4QConfig(bits=4, group_size=8, rank=2), rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((3, 5, 16))).shape
    (3, 5, 8)
    >>> len(jax.tree_util.tree_leaves(nnx.state(layer, TRAINABLE)))
    4

    Attributes:
      config: bits, group size, rank, LoRA scaling and LSQ gradient scale.
      warmup: while True the layer computes `warmup_linear` (LoRA on the frozen Q(W0)); `end_warmup`
        switches to the merged form.
      custom_backward: True for `l4q_linear` (memory-saving backward), False for plain autodiff.
    """

    def __init__(
        self,
        params: linear.L4QParams,
        config: L4QConfig = L4QConfig(),
        *,
        warmup: bool = False,
        custom_backward: bool = True,
    ):
        linear.check_params(params, config)
        self.base = FrozenWeight(params.base)
        self.bias: Optional[FrozenWeight] = None if params.bias is None else FrozenWeight(params.bias)
        self.a = nnx.LoRAParam(params.a)
        self.b = nnx.LoRAParam(params.b)
        self.scale = QuantParam(params.scale)
        self.offset = QuantParam(params.offset)
        self.config = config
        self.warmup = warmup
        self.custom_backward = custom_backward

    @classmethod
    def from_weight(cls, w0, config: L4QConfig = L4QConfig(), *, rngs: nnx.Rngs, bias=None, name: str = "weight", **kwargs):
        """Build a layer on the pretrained weight `w0` (out, in) with `init_params` (zero LoRA product)."""
        params = initialization.init_params(w0, config, key=rngs.params(), bias=bias, name=name)
        return cls(params, config, **kwargs)

    @classmethod
    def from_loftq(cls, w, config: L4QConfig, loftq_config: LoftQConfig, *, bias=None, name: str = "weight", **kwargs):
        """Build a layer whose base is LoftQ's Q and whose A and B are LoftQ's factors."""
        params, _ = initialization.init_params_from_loftq(w, config, loftq_config, bias=bias, name=name)
        return cls(params, config, **kwargs)

    @property
    def params(self) -> linear.L4QParams:
        """The current tensors as a pure `L4QParams`."""
        bias = None if self.bias is None else self.bias[...]
        return linear.L4QParams(self.base[...], self.a[...], self.b[...], self.scale[...], self.offset[...], bias)

    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Apply the layer to x (..., in), such as (batch, length, in), and return y (..., out).

        `deterministic` is accepted so that this layer can replace a `loftq_jax.nn.Linear` in a model that
        passes it. L4Q has no LoRA dropout, so it changes nothing.
        """
        del deterministic
        if self.warmup:
            return linear.warmup_linear(x, self.params, self.config)
        if self.custom_backward:
            return linear.l4q_linear(x, self.params, self.config)
        return linear.l4q_linear_autodiff(x, self.params, self.config)

    def end_warmup(self, *, reinit_quantizer: bool = True) -> None:
        """Switch from the warm-up form to Q(W0 + s·A·B), by default refitting the quantizer to that weight."""
        if reinit_quantizer:
            params = initialization.reinit_quantizer(self.params, self.config)
            self.scale[...] = params.scale
            self.offset[...] = params.offset
        self.warmup = False

    def export(self, dtype=jnp.bfloat16) -> export_lib.L4QExport:
        """Quantize the merged weight once; see `export_params`."""
        return export_lib.export_params(self.params, self.config, dtype)
