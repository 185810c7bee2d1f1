"""Save and load quantized models without pickle: safetensors (integer weight codes + scales) + JSON.

``model.safetensors`` holds, for each quantized layer, its weight as uint8 codes (``<layer>.weight_codes``)
with the per-channel scales and zero points; everything else (biases, FP layers, activation step sizes)
as plain tensors. ``quant_config.json`` holds the QuantConfig and the per-layer table used to rebuild
the wrappers on a freshly built FP model of the same architecture. Loading reproduces outputs exactly.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from qdiff.errors import config_from_dict
from qdiff.io import CheckpointError, load_state_dict_file, write_json
from qdiff.quant.config import QuantConfig
from qdiff.quant.layers import QuantLayer
from qdiff.quant.wrap import LayerSpec, quant_layers, wrap_model

FORMAT = "qdiff-quantized-v1"


def save_quantized(model: nn.Module, cfg: QuantConfig, specs: list[LayerSpec], out_dir: str | Path,
                   extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``quant_config.json`` into ``out_dir``; returns the folder."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    n_codes = 0
    for name, layer in quant_layers(model):
        if layer.quantizes_weight:
            state.pop(f"{name}.weight")
            state[f"{name}.weight_codes"] = layer.weight_codes().contiguous().cpu()
            n_codes += 1
    save_file(state, str(out / "model.safetensors"), metadata={"format": FORMAT})
    write_json(out / "quant_config.json", {
        "format": FORMAT, "quant": asdict(cfg), "layers": [asdict(s) for s in specs],
        "n_weight_quantized_layers": n_codes, **(extra or {}),
    })
    return out


def load_quantized(fp_model: nn.Module, path: str | Path) -> tuple[nn.Module, QuantConfig, list[LayerSpec]]:
    """Rebuild the quantized model saved in ``path`` on top of ``fp_model`` (same architecture)."""
    p = Path(path)
    cfg_file = p / "quant_config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{p}: no quant_config.json (not a saved quantized model)")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: corrupt JSON ({e.msg} at line {e.lineno})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: unknown format {meta.get('format')!r}, expected {FORMAT}")
    cfg = config_from_dict(QuantConfig, meta["quant"], "quant")
    specs = [LayerSpec(**s) for s in meta["layers"]]
    try:
        q = wrap_model(fp_model, cfg, specs)
    except ValueError as e:
        raise CheckpointError(f"{p}: saved quantized model does not fit this architecture: {e}") from None
    state = load_state_dict_file(p / "model.safetensors")
    codes = {k[: -len(".weight_codes")]: state.pop(k) for k in list(state) if k.endswith(".weight_codes")}
    own = q.state_dict()
    for name in codes:
        state[f"{name}.weight"] = own[f"{name}.weight"]  # placeholder; replaced from the codes below
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        first = f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'"
        raise CheckpointError(f"{p}: checkpoint does not fit the model ({len(missing)} missing, {len(unexpected)} unexpected; {first})")
    for k, v in state.items():
        if own[k].shape != v.shape and not k.endswith((".scale", ".zero_point")):
            raise CheckpointError(f"{p}: shape mismatch at '{k}': file {tuple(v.shape)} vs model {tuple(own[k].shape)}")
    q.load_state_dict(state, strict=True)  # activation quantizers initialised when saved run again
    layers = dict(quant_layers(q))
    for name, c in codes.items():
        layer: QuantLayer = layers[name]
        if c.shape != layer.weight.shape:
            raise CheckpointError(f"{p}: shape mismatch at '{name}.weight_codes': {tuple(c.shape)} vs {tuple(layer.weight.shape)}")
        layer.set_weight_from_codes(c.to(layer.weight.device))
    return q, cfg, specs
