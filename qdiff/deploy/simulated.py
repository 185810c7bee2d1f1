"""The ``simulated`` backend: the artifact rebuilt as qdiff's fake-quantized network (QuantLayer wrappers),
reproducing the model that was calibrated; the reference every other backend is measured against."""
from __future__ import annotations

import torch
from torch import nn

from qdiff.deploy.artifact import Artifact, build_network
from qdiff.errors import CheckpointError
from qdiff.quant.wrap import quant_layers, wrap_model


def load_simulated(art: Artifact, device: torch.device | str = "cpu") -> nn.Module:
    """Build the network on the meta device, wrap it as recorded, then fill every tensor from the artifact."""
    net = build_network(art.meta["architecture"])
    try:
        q = wrap_model(net, art.quant, art.specs) if art.specs else net
    except ValueError as e:
        raise CheckpointError(f"{art.path}: the layer table does not fit the recorded architecture: {e}") from None
    q = q.to_empty(device=device)
    t = art.tensors
    state = {k: v for k, v in t.items() if not k.startswith("buffer:") and not k.endswith(".codes")}
    codes = {}
    for name, layer in quant_layers(q):
        if f"{name}.codes" in t:
            codes[name] = t[f"{name}.codes"]
            state[f"{name}.weight"] = torch.empty_like(layer.weight)  # replaced from the codes below
        for i, (wq, aq) in enumerate(zip(layer.wq, layer.aq)):
            for prefix, quantizer in ((f"{name}.wq.{i}", wq), (f"{name}.aq.{i}", aq)):
                found = f"{prefix}.scale" in t
                state.setdefault(f"{prefix}.scale", torch.ones(()))
                state.setdefault(f"{prefix}.zero_point", torch.zeros(()))
                state[f"{prefix}.initialized"] = torch.tensor(found)
                if hasattr(quantizer, "t_edges"):  # timestep-aware: boundaries stored only where calibrated
                    state.setdefault(f"{prefix}.t_edges", torch.zeros_like(quantizer.t_edges, device="cpu"))
    own = q.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if missing or unexpected:
        first = f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'"
        raise CheckpointError(f"{art.path}: tensors do not fit the recorded architecture ({first})")
    q.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    layers = dict(quant_layers(q))
    for name, c in codes.items():
        layers[name].set_weight_from_codes(c.to(device))
    for k, v in t.items():
        if k.startswith("buffer:"):
            owner, _, attr = k.removeprefix("buffer:").rpartition(".")
            q.get_submodule(owner).register_buffer(attr, v.to(device), persistent=False)
    q.quant_config, q.quant_specs = art.quant, art.specs
    return q.eval().requires_grad_(False)
