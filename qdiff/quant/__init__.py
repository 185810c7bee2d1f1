"""Quantization core: quantizers, AdaRound, quantized layers, model wrapping (saving: :mod:`qdiff.deploy`).

The public verb is :func:`qdiff.quantize`; the pieces below are its stages, usable on their own.
"""
from qdiff.quant.config import LayerOverride, QuantConfig
from qdiff.quant.layers import LAYER_REGISTRY, QuantLayer, register_layer
from qdiff.quant.quantizer import NotInitializedError, UniformQuantizer, round_ste
from qdiff.quant.split import execution_order, find_concat_splits
from qdiff.quant.wrap import (LayerSpec, act_quantizers, activations_fp, init_weight_quantizers, quant_layers,
                              resolve_layer_specs, wrap_model)

__all__ = [
    "QuantConfig", "LayerOverride", "QuantLayer", "LAYER_REGISTRY", "register_layer", "UniformQuantizer",
    "NotInitializedError", "round_ste", "find_concat_splits", "execution_order",
    "LayerSpec", "resolve_layer_specs", "wrap_model", "init_weight_quantizers", "act_quantizers", "quant_layers",
    "activations_fp",
]
