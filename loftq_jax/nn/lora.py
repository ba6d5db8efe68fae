"""Turning the linear layers of a loaded NNX model into LoRA layers: LoftQ or QLoRA over a quantized base,
plain LoRA over a 16-bit or float32 base, or the adapters and quantized backbone that `loftq-jax init` wrote.

    names = convert_to_lora(model, LoftQConfig(bits=4, rank=16, steps=5), targets=["query", "value"])
    names = convert_to_lora(model, LoRAConfig(rank=16, alpha=32), dropout=0.1, rngs=nnx.Rngs(0))
    names = convert_to_lora(model, "out/init_dir")

Targets work as PEFT's target_modules and as `loftq-jax init --target`: a name matches a module it equals or
ends with after a dot, anything else is a regular expression over the whole module name. Module names are
those of the checkpoint the model was loaded from ("encoder.layer.0.attention.self.query").
"""

import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loftq_jax import peft_export
from loftq_jax.checkpoint import Checkpoint, matches_target
from loftq_jax.errors import InputError
from loftq_jax.loftq import LoftQConfig, loftq
from loftq_jax.nn.layers import LoRALinear, Linear, QuantizedLoRALinear, kaiming_uniform_b
from loftq_jax.nn.loading import path_name
from loftq_jax.packing import pack_codes
from loftq_jax.quantize import QuantConfig, QuantizedTensor, dequantize, quantize

logger = logging.getLogger(__name__)

_BASE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Plain LoRA ("16-bit LoRA"): the base weight is kept unquantized, A = 0 and B is PEFT's default."""

    rank: int = 16
    # LoRA scaling is alpha / rank; None means alpha = rank.
    alpha: Optional[float] = None
    # dtype of the frozen base weight: "bfloat16", "float16" or "float32"; None keeps the loaded dtype.
    base_dtype: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise InputError(f"invalid rank {self.rank!r}; expected an integer >= 1")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise InputError(f"invalid alpha {self.alpha!r}; expected a finite positive number")
        if self.base_dtype is not None and self.base_dtype not in _BASE_DTYPES:
            raise InputError(f"invalid base_dtype {self.base_dtype!r}; expected one of {sorted(_BASE_DTYPES)} or None")

    @property
    def scaling(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class _Target:
    path: tuple  # NNX path of the layer in the model
    module: str  # checkpoint module name
    layer: Linear


def convert_to_lora(
    model: nnx.Module,
    init: LoftQConfig | LoRAConfig | str | Path,
    *,
    targets: Optional[Sequence[str]] = None,
    dropout: float = 0.0,
    rngs: Optional[nnx.Rngs] = None,
) -> list[str]:
    """Replace the target `Linear` layers of `model` in place with LoRA layers; return their module names.

    The names come in `nnx.iter_modules` order (attribute names sorted at each level), or in the adapter
    file's order for an init folder.

    Args:
      model: a model of `loftq_jax.nn` loaded from a checkpoint (`BertModel`, `BertClassifier`,
        `LlamaForCausalLM`), or any NNX module with `Linear` layers, named then by their NNX paths.
      init: what the layers start from.
        - `LoftQConfig`: run LoftQ on each target weight (T = `steps` alternating steps) and build a
          `QuantizedLoRALinear`. With steps=0 this is QLoRA: Q = q(W), A = 0 and B is drawn as PEFT draws
          lora_A, so that A still gets a gradient.
        - `LoRAConfig`: a `LoRALinear` over the unquantized weight, A = 0 and B drawn as above.
        - a folder written by `loftq-jax init`: A and B from adapter_model.safetensors, the scaling from
          adapter_config.json, and the packed base from re-quantizing the dequantized Q of its
          model.safetensors with the quantizer settings of adapter_config.json's loftq_config. Q lies on
          the quantizer's grid, so this gives back the same codes; Q that does not raise InputError.
      targets: PEFT-style module names or regular expressions. None selects every `Linear` inside the
        repeated blocks (a path with a list index), or, for an init folder, every module it has adapters for.
      dropout: LoRA dropout rate on the adapters' input.
      rngs: random streams for B ("params") and the dropout masks ("dropout"); default nnx.Rngs(0).

    Raises:
      InputError: no layer matches the targets, a rank exceeds min(out, in) of a layer, or the init folder
        is invalid. The model is unchanged then.
    """
    rngs = nnx.Rngs(0) if rngs is None else rngs
    layers = _linear_layers(model)
    if isinstance(init, (str, Path)):
        replacements = _from_init_dir(Path(init), layers, targets, dropout, rngs)
    else:
        if not isinstance(init, (LoftQConfig, LoRAConfig)):
            raise InputError(f"invalid init {init!r}; expected a LoftQConfig, a LoRAConfig or an init folder")
        chosen = _select(layers, targets)
        _check_rank(chosen, init.rank)
        if isinstance(init, LoftQConfig):
            replacements = [(target, _loftq_layer(target, init, dropout, rngs)) for target in chosen]
        else:
            replacements = [(target, _lora_layer(target, init, dropout, rngs)) for target in chosen]

    # Layers are swapped only after all were built, so that an error leaves the model as it was.
    for target, new_layer in replacements:
        _replace(model, target.path, new_layer)
    return [target.module for target, _ in replacements]


def state_nbytes(module: nnx.Module, *filters) -> int:
    """Return the bytes of the arrays in `module`'s state selected by `filters` (all state by default)."""
    state = nnx.state(module, *filters) if filters else nnx.state(module)
    leaves = jax.tree_util.tree_leaves(state)
    # dtype.itemsize rather than np.dtype, which does not accept PRNG key dtypes such as key<fry>.
    return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in leaves if hasattr(leaf, "dtype"))


# ---------------------------------------------------------------------------------------------------
# Choosing layers


def _linear_layers(model: nnx.Module) -> list[_Target]:
    """Return every `Linear` of the model that its checkpoint names, in `nnx.iter_modules` order."""
    name_of = getattr(model, "checkpoint_name", lambda path: path)
    layers = []
    for path, module in nnx.iter_modules(model):
        if type(module) is not Linear:
            continue
        name = name_of(path_name(path))
        if name is not None:
            layers.append(_Target(tuple(path), name, module))
    return layers


def _select(layers: Sequence[_Target], targets: Optional[Sequence[str]]) -> list[_Target]:
    if not targets:
        chosen = [target for target in layers if any(isinstance(part, int) for part in target.path)]
    else:
        chosen = [target for target in layers if any(matches_target(target.module, name) for name in targets)]
        for name in targets:
            if not any(matches_target(target.module, name) for target in layers):
                logger.warning("target %s matches no linear layer; ignored", name)
    if not chosen:
        requested = f"targets {list(targets)}" if targets else "the default targets (layers inside repeated blocks)"
        raise InputError(f"no linear layer matches {requested}; the model's linear layers are {_summary(layers)}")
    return chosen


def _summary(layers: Sequence[_Target]) -> str:
    """Return the layers' distinct module names with block indices written as N, e.g. 'model.layers.N.mlp.up_proj'."""
    names = list(dict.fromkeys(re.sub(r"\.\d+\.", ".N.", target.module) for target in layers))
    if not names:
        return "none"
    more = ", ..." if len(names) > 12 else ""
    return ", ".join(names[:12]) + more


def _check_rank(chosen: Sequence[_Target], rank: int) -> None:
    for target in chosen:
        shape = target.layer.shape
        if rank > min(shape):
            raise InputError(
                f"{target.module}: rank {rank} exceeds min(out, in) = {min(shape)} for shape {shape}; "
                "lower the rank or leave this layer out of the targets"
            )


def _replace(model: nnx.Module, path: tuple, new_layer: nnx.Module) -> None:
    parent = model
    for part in path[:-1]:
        parent = parent[part] if isinstance(part, int) else getattr(parent, part)
    if isinstance(path[-1], int):
        parent[path[-1]] = new_layer
    else:
        setattr(parent, path[-1], new_layer)


# ---------------------------------------------------------------------------------------------------
# In-memory initializations


def _bias(layer: Linear) -> Optional[jax.Array]:
    return None if layer.bias is None else layer.bias[...]


def _loftq_layer(target: _Target, config: LoftQConfig, dropout: float, rngs: nnx.Rngs) -> QuantizedLoRALinear:
    weight_OxI = target.layer.weight[...]
    result = loftq(weight_OxI, config, name=f"{target.module}.weight", out_dtype=jnp.float32)
    errors = np.asarray(result.errors)
    if not np.isfinite(errors).all():
        raise RuntimeError(f"{target.module}: LoftQ produced NaN or Inf (errors {errors}); the SVD may have failed")
    a_OxR, b_RxI = result.a, result.b
    if config.steps == 0:
        b_RxI = kaiming_uniform_b(rngs.params(), config.rank, weight_OxI.shape[1])
    logger.debug("%s: relative error %.5f (QLoRA %.5f)", target.module, errors[-1], errors[0])
    return QuantizedLoRALinear(
        result.quantized, a_OxR, b_RxI, _bias(target.layer),
        scaling=config.scaling, dropout=dropout, rngs=rngs, name=target.module,
    )


def _lora_layer(target: _Target, config: LoRAConfig, dropout: float, rngs: nnx.Rngs) -> LoRALinear:
    weight_OxI = target.layer.weight[...]
    if config.base_dtype is not None:
        weight_OxI = weight_OxI.astype(_BASE_DTYPES[config.base_dtype])
    num_out, num_in = weight_OxI.shape
    a_OxR = jnp.zeros((num_out, config.rank), jnp.float32)
    b_RxI = kaiming_uniform_b(rngs.params(), config.rank, num_in)
    return LoRALinear(
        weight_OxI, a_OxR, b_RxI, _bias(target.layer),
        scaling=config.scaling, dropout=dropout, rngs=rngs, name=target.module,
    )


# ---------------------------------------------------------------------------------------------------
# From the outputs of `loftq-jax init`


def _from_init_dir(
    init_dir: Path, layers: Sequence[_Target], targets: Optional[Sequence[str]], dropout: float, rngs: nnx.Rngs
) -> list[tuple[_Target, QuantizedLoRALinear]]:
    settings = read_adapter_config(init_dir)
    adapters = Checkpoint([init_dir / peft_export.ADAPTER_WEIGHTS_FILE])
    backbone = Checkpoint.from_dir(init_dir)

    adapter_modules = _adapter_modules(adapters)
    by_module = {target.module: target for target in layers}
    missing = [module for module in adapter_modules if module not in by_module]
    if missing:
        logger.warning("%s: ignored adapters of %d modules the model has no linear layer for: %s",
                       init_dir, len(missing), ", ".join(missing[:6]))
    chosen = [by_module[module] for module in adapter_modules if module in by_module]
    if not chosen:
        raise InputError(
            f"{init_dir}: none of the adapters' modules is a linear layer of the model; adapters exist for "
            f"{', '.join(adapter_modules[:6]) or 'no module'}, and the model's linear layers are {_summary(layers)}"
        )
    if targets:
        without = [target.module for target in _select(layers, targets) if target.module not in adapter_modules]
        if without:
            raise InputError(f"{init_dir}: no adapters for target layers {', '.join(without[:6])}")
        chosen = _select(chosen, targets)
    _check_rank(chosen, settings["rank"])

    replacements = []
    for target in chosen:
        key_a, key_b = peft_export.lora_keys(target.module)
        # PEFT's lora_B (out x r) is our A and its lora_A (r x in) is our B.
        a_OxR, b_RxI = adapters.load(key_b), adapters.load(key_a)
        quantized = requantize(backbone, f"{target.module}.weight", settings["quant_config"])
        layer = QuantizedLoRALinear(
            quantized, a_OxR, b_RxI, _bias(target.layer),
            scaling=settings["scaling"], dropout=dropout, rngs=rngs, name=target.module,
        )
        replacements.append((target, layer))
    return replacements


def read_adapter_config(init_dir: str | Path) -> dict:
    """Return the rank, scaling and QuantConfig that adapter_config.json of a `loftq-jax init` folder records."""
    path = Path(init_dir) / peft_export.ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{init_dir}: {peft_export.ADAPTER_CONFIG_FILE} not found; expected a folder written by loftq-jax init")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: invalid JSON ({error})") from None

    for key, allowed in (("use_dora", (False, None)), ("use_rslora", (False, None)), ("fan_in_fan_out", (False, None))):
        if config.get(key) not in allowed:
            raise InputError(f"{path}: {key} = {config.get(key)!r} is not supported; expected false")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"{path}: invalid r {rank!r}; expected an integer >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise InputError(f"{path}: invalid lora_alpha {alpha!r}; expected a positive number")

    loftq_settings = config.get("loftq_config") or {}
    if "loftq_bits" not in loftq_settings:
        raise InputError(
            f"{path}: loftq_config has no loftq_bits, so the quantizer is unknown; expected a folder written by loftq-jax init"
        )
    quant_config = QuantConfig(
        bits=loftq_settings["loftq_bits"],
        codebook=loftq_settings.get("codebook", "nf"),
        block_size=loftq_settings.get("block_size", 64),
    )
    return {"rank": rank, "scaling": alpha / rank, "quant_config": quant_config}


def _adapter_modules(adapters: Checkpoint) -> list[str]:
    """Return the modules that have a lora_A weight in a PEFT adapter file, in file order."""
    suffix = ".lora_A.weight"
    modules = []
    for name in adapters.names:
        if name.endswith(suffix):
            modules.append(name.removeprefix(peft_export.PEFT_KEY_PREFIX).removesuffix(suffix))
    return modules


def requantize(backbone: Checkpoint, tensor_name: str, config: QuantConfig) -> QuantizedTensor:
    """Quantize the dequantized Q stored as `tensor_name` again, and check that this reproduces Q.

    A blockwise Q = values[code]·scale holds the code ±1 in every nonzero block (the block's absmax element),
    so its absmax is the old scale and every element rounds back to its old code. The "uniform" quantizer
    would clip Q at a new mean ± c·std, so its grid is read from Q instead. The offset is min(Q) and the
    step (max(Q) - min(Q)) / (2**bits - 1), which is the old grid when Q uses the lowest and highest code.
    Q stored in 16 bits was rounded, so it reproduces to within that rounding.
    """
    q_OxI = backbone.load(tensor_name)
    if q_OxI.ndim != 2:
        raise InputError(f"{tensor_name}: shape {q_OxI.shape} in {backbone.files[0].name} is not a 2-D weight (out, in)")
    q_float = jnp.asarray(np.asarray(q_OxI, np.float32))
    quantized = quantize(q_float, config) if config.blockwise else _affine_grid(q_float, config)
    difference = float(jnp.max(jnp.abs(dequantize(quantized) - q_float)))
    tolerance = 4 * float(jnp.finfo(q_OxI.dtype).eps) * float(jnp.max(jnp.abs(q_float)))
    if difference > tolerance:
        raise InputError(
            f"{tensor_name}: re-quantizing the stored Q with bits={config.bits}, codebook={config.codebook!r}, "
            f"block_size={config.block_size} changes it by up to {difference:.3g} (allowed {tolerance:.3g}); "
            "the quantizer settings of adapter_config.json do not match the backbone"
        )
    return quantized


def _affine_grid(q_OxI: jax.Array, config: QuantConfig) -> QuantizedTensor:
    """Return the codes of a Q that lies on a per-tensor affine grid spanning min(Q) to max(Q)."""
    low = jnp.min(q_OxI)
    step = (jnp.max(q_OxI) - low) / (2**config.bits - 1)
    step = jnp.where(step == 0, 1.0, step)
    codes = jnp.clip(jnp.round((q_OxI - low) / step), 0, 2**config.bits - 1).reshape(-1)
    packed = pack_codes(codes, config.bits, config.bit_order)
    return QuantizedTensor(packed, step[None].astype(jnp.float32), low[None].astype(jnp.float32), tuple(q_OxI.shape), config)
