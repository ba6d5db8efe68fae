"""Turning the linear layers of a loaded NNX model into L4Q layers, and exporting the trained model.

    names = convert_to_l4q(model, L4QConfig(bits=2, rank=16), targets=["query", "value"], rngs=nnx.Rngs(0))
    ...                                  # train nnx.LoRAParam: A, B, the scales and the offsets
    export_l4q(model)                    # each L4QLinear becomes an L4QExportedLinear of packed codes

Targets work as in `loftq_jax.nn.convert_to_lora`: a name matches a module it equals or ends with after a
dot, anything else is a regular expression over the whole module name, and None selects every `Linear`
inside the repeated blocks.
"""

import logging
from typing import Literal, Optional, Sequence

import jax
from flax import nnx

from loftq_jax.errors import InputError
from loftq_jax.l4q.config import L4QConfig
from loftq_jax.l4q.export import L4QExport, exported_linear
from loftq_jax.l4q.layer import FrozenWeight, L4QLinear
from loftq_jax.loftq import LoftQConfig
from loftq_jax.nn.layers import QuantizedWeight
from loftq_jax.nn.loading import path_name
from loftq_jax.nn.lora import _check_rank, _linear_layers, _replace, _select, _Target

logger = logging.getLogger(__name__)


def convert_to_l4q(
    model: nnx.Module,
    config: L4QConfig,
    *,
    targets: Optional[Sequence[str]] = None,
    init: Literal["qlora"] | LoftQConfig = "qlora",
    warmup: bool = False,
    custom_vjp: bool = True,
    rngs: Optional[nnx.Rngs] = None,
) -> list[str]:
    """Replace the target `Linear` layers of `model` in place with `L4QLinear` layers; return their module names.

    Jeon, Kim and Kim, 2025, "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large Language
    Models", ACL 2025, arXiv 2402.04902. Each layer computes y = x·Q(W0 + s·A·B)ᵀ + bias with a learned
    uniform quantizer per group of `config.group_size` inputs. The names come in `nnx.iter_modules` order.

    Args:
      model: a model of `loftq_jax.nn` loaded from a checkpoint (`BertClassifier`, `BertModel`,
        `LlamaForCausalLM`), or any NNX module with `Linear` layers, named then by their NNX paths.
      config: bits, group size, rank, alpha and LSQ gradient scale of every converted layer.
      targets: PEFT-style module names or regular expressions. None selects every `Linear` inside the
        repeated blocks (a path with a list index).
      init: "qlora" keeps the pretrained W as the frozen base W0 with A = 0 and B uniform in ±1/√in, so
        the layer starts at Q(W). A `LoftQConfig` (same rank and alpha as `config`) runs LoftQ on W: its Q
        becomes W0 and its factors A and B, so the layer starts at Q(Q_LoftQ + s·A·B).
      warmup: start the layers in the warm-up form x·Q(W0)ᵀ + s·x·Bᵀ·Aᵀ, which trains only A and B;
        `end_warmup` switches them to the merged form.
      custom_vjp: True for the memory-saving hand-written backward (`l4q_linear`), False for plain
        autodiff (`l4q_linear_autodiff`). Both compute the same forward and gradients.
      rngs: the "params" stream draws B for init="qlora"; default nnx.Rngs(0).

    Raises:
      InputError: `config` or `init` is invalid, no layer matches the targets, a rank exceeds
        min(out, in) of a layer, or a LoftQ config has another rank or alpha. The model is unchanged then.
    """
    if not isinstance(config, L4QConfig):
        raise InputError(f"invalid config {config!r}; expected an L4QConfig")
    if not (init == "qlora" or isinstance(init, LoftQConfig)):
        raise InputError(f"invalid init {init!r}; expected 'qlora' or a LoftQConfig")
    if isinstance(init, LoftQConfig) and (init.rank != config.rank or init.scaling != config.scaling):
        raise InputError(
            f"LoftQ rank {init.rank} and scaling {init.scaling} differ from L4Q rank {config.rank} and "
            f"scaling {config.scaling}; set the same rank and alpha in both configs"
        )
    rngs = nnx.Rngs(0) if rngs is None else rngs
    chosen = _select(_linear_layers(model), targets)
    _check_rank(chosen, config.rank)

    # Layers are swapped only after all were built, so that an error leaves the model as it was.
    replacements = [(target, _l4q_layer(target, config, init, warmup, custom_vjp, rngs)) for target in chosen]
    for target, layer in replacements:
        _replace(model, target.path, layer)
    return [target.module for target, _ in replacements]


def _l4q_layer(
    target: _Target, config: L4QConfig, init, warmup: bool, custom_vjp: bool, rngs: nnx.Rngs
) -> L4QLinear:
    weight_OxI = target.layer.weight[...]
    bias_O = None if target.layer.bias is None else target.layer.bias[...]
    name = f"{target.module}.weight"
    options = {"warmup": warmup, "custom_backward": custom_vjp}
    if init == "qlora":
        return L4QLinear.from_weight(weight_OxI, config, rngs=rngs, bias=bias_O, name=name, **options)
    return L4QLinear.from_loftq(weight_OxI, config, init, bias=bias_O, name=name, **options)


def l4q_layers(model: nnx.Module) -> list[tuple[str, L4QLinear]]:
    """Return (module name, layer) for every `L4QLinear` of `model`, in `nnx.iter_modules` order."""
    name_of = getattr(model, "checkpoint_name", lambda path: path)
    layers = []
    for path, module in nnx.iter_modules(model):
        if isinstance(module, L4QLinear):
            name = name_of(path_name(path))
            layers.append((name if name is not None else path_name(path), module))
    return layers


def end_warmup(model: nnx.Module, *, reinit_quantizer: bool = True) -> int:
    """Switch every `L4QLinear` of `model` still in warm-up to the merged form; return how many switched.

    With `reinit_quantizer` each switched layer refits its scales and offsets to W0 + s·A·B, as
    `L4QLinear.end_warmup` does.
    """
    switched = 0
    for _, layer in l4q_layers(model):
        if layer.warmup:
            layer.end_warmup(reinit_quantizer=reinit_quantizer)
            switched += 1
    return switched


# ---------------------------------------------------------------------------------------------------
# Export


class L4QExportedLinear(nnx.Module):
    """An exported L4Q layer: y = x·Wᵀ + bias with W rebuilt from packed codes, scales and offsets.

    It contains no adapter and no float copy of the weight, so its weight memory is `nbytes`. The codes,
    scales and offsets are `QuantizedWeight` and the bias a `FrozenWeight`, so no filter on `nnx.Param`
    selects them for training.
    """

    def __init__(self, export: L4QExport):
        self.codes = QuantizedWeight(export.codes)
        self.scales = QuantizedWeight(export.scales)
        self.offsets = QuantizedWeight(export.offsets)
        self.bias = None if export.bias is None else FrozenWeight(export.bias)
        self.weight_shape = tuple(export.shape)
        self.config = export.config

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's (out, in)."""
        return self.weight_shape

    @property
    def nbytes(self) -> int:
        """Bytes of the packed codes, scales and offsets."""
        return sum(variable[...].nbytes for variable in (self.codes, self.scales, self.offsets))

    def export(self) -> L4QExport:
        """Return the layer's tensors as an `L4QExport` without the 16-bit weight (weight_16 is None)."""
        bias = None if self.bias is None else self.bias[...]
        return L4QExport(
            self.codes[...], self.scales[...], self.offsets[...], bias, None, self.weight_shape, self.config
        )

    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        del deterministic  # accepted so that this layer can stand where a `Linear` was
        return exported_linear(x, self.export())


def export_l4q(model: nnx.Module) -> dict[str, int]:
    """Replace every `L4QLinear` of `model` in place with its `L4QExportedLinear`; return bytes per module.

    Each layer's merged weight W0 + s·A·B is quantized once with its trained scales and offsets, so the
    exported model computes the trained forward (up to float32 rounding). Layers still in warm-up are
    exported in the merged form too, which differs from their warm-up output.

    Raises:
      InputError: the model has no `L4QLinear`.
    """
    layers = l4q_layers(model)
    if not layers:
        raise InputError(f"{type(model).__name__} has no L4QLinear layer to export; convert it with convert_to_l4q first")
    warming = [name for name, layer in layers if layer.warmup]
    if warming:
        logger.warning("exporting %d layers still in warm-up in the merged form, e.g. %s", len(warming), warming[0])

    paths = {id(module): tuple(path) for path, module in nnx.iter_modules(model)}
    # `export` also returns a 16-bit copy of the weight, which the exported layer does not keep.
    exports = [(name, paths[id(layer)], L4QExportedLinear(layer.export())) for name, layer in layers]
    for _, path, exported in exports:
        _replace(model, path, exported)
    return {name: exported.nbytes for name, _, exported in exports}
