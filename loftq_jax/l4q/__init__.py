"""L4Q: LoRA and a learned uniform quantizer trained together, Q(W0 + s·A·B), quantized once at the end.

Jeon, Kim and Kim, 2025, "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large Language
Models", ACL 2025, arXiv 2402.04902. A is (out, rank) and B (rank, in), as in `loftq_jax.loftq`.
"""

from loftq_jax.l4q.config import L4QConfig, check_weight
from loftq_jax.l4q.convert import L4QExportedLinear, convert_to_l4q, end_warmup, export_l4q, l4q_layers
from loftq_jax.l4q.export import L4QExport, dequantize_export, export_params, exported_linear
from loftq_jax.l4q.initialization import init_params, init_params_from_loftq, reinit_quantizer
from loftq_jax.l4q.layer import TRAINABLE, FrozenWeight, L4QLinear, QuantParam
from loftq_jax.l4q.linear import L4QParams, check_params, l4q_linear, l4q_linear_autodiff, merged_weight, warmup_linear
from loftq_jax.l4q.quantizer import fake_quant, fake_quant_ste, init_quantizer, quantize_codes

__all__ = [
    "TRAINABLE",
    "FrozenWeight",
    "L4QConfig",
    "L4QExport",
    "L4QExportedLinear",
    "L4QLinear",
    "L4QParams",
    "QuantParam",
    "check_params",
    "check_weight",
    "convert_to_l4q",
    "dequantize_export",
    "end_warmup",
    "export_l4q",
    "export_params",
    "exported_linear",
    "fake_quant",
    "fake_quant_ste",
    "init_params",
    "init_params_from_loftq",
    "init_quantizer",
    "l4q_layers",
    "l4q_linear",
    "l4q_linear_autodiff",
    "merged_weight",
    "quantize_codes",
    "reinit_quantizer",
    "warmup_linear",
]
