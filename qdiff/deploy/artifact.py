"""One deployable artifact per quantized model: ``model.safetensors`` + ``deploy.json``, no pickle.

``model.safetensors`` holds a few flat tensors ("blobs"): ``codes`` (every quantized weight's integer codes,
packed two per byte at <= 4 bits, one per byte at 5-8 bits), ``uint8`` (per-channel weight zero points and
activation zero points), and one blob per floating dtype (per-channel weight scales, learned activation step
sizes, biases, norms and every other tensor of the network). ``deploy.json`` holds the format, the
architecture (a diffusers model's config, or an importable class path + constructor kwargs), the
QuantConfig, the layer table (bits, split points, which activation quantizers were calibrated: each layer's
tensors follow from it) and the index (name, blob, shape) of every other tensor, in blob order. The network
is rebuilt from the artifact alone: no FP checkpoint, no source edits. A few blobs instead of one tensor per
name keep the file's own header small: at 4 bits it would otherwise be ~5 % of the artifact.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from qdiff.errors import CheckpointError, ConfigError, config_from_dict
from qdiff.deploy.pack import pack, packed_bytes, unpack
from qdiff.quant.config import QuantConfig
from qdiff.quant.layers import QuantLayer
from qdiff.quant.wrap import LayerSpec, quant_layers

FORMAT = "qdiff-deployed-v1"
TENSORS_FILE = "model.safetensors"
META_FILE = "deploy.json"
_QUANTIZER_PARTS = (".wq.", ".aq.", ".matmul_quant.")


# --- architecture ------------------------------------------------------------------------------------------------

def architecture_of(model: nn.Module, init_kwargs: dict | None = None) -> dict:
    """How to build ``model``'s network again: a diffusers config, or an importable class + kwargs."""
    cls = type(model)
    path = f"{cls.__module__}.{cls.__qualname__}"
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise ConfigError(f"export: {path} is not importable (defined in __main__ or a function); move the class "
                          "into a module so the artifact can name it")
    config = getattr(model, "config", None)
    if init_kwargs is None and config is not None and hasattr(cls, "from_config"):
        arch = {"kind": "diffusers", "class": path, "config": json.loads(json.dumps(dict(config), default=str))}
        fresh = build_network(arch)
        heads = {n: m.heads for n, m in model.named_modules() if hasattr(m, "heads") and type(m).__name__ == "Attention"}
        fresh_heads = {n: m.heads for n, m in fresh.named_modules() if n in heads}
        arch["attention_heads"] = {n: h for n, h in heads.items() if fresh_heads.get(n) != h}  # set after building
        return arch
    try:
        kwargs = json.loads(json.dumps(init_kwargs or {}))
    except TypeError as e:
        raise ConfigError(f"export: init_kwargs must be JSON values ({e})") from None
    arch = {"kind": "module", "class": path, "init_kwargs": kwargs}
    try:
        fresh = build_network(arch)
    except Exception as e:  # noqa: BLE001 - any constructor error means the recorded call cannot rebuild it
        raise ConfigError(f"export: {path}(**{kwargs}) fails ({type(e).__name__}: {e}); pass init_kwargs=") from None
    shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    for name, layer in quant_layers(model):
        shapes.pop(f"{name}.bias", None)
        if shapes.pop(f"{name}.weight", None) != tuple(layer.weight.shape):
            raise ConfigError(f"export: {path}(**{kwargs}) builds a different network (at {name}); pass the "
                              "constructor arguments as init_kwargs=")
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in shapes}
    if own != shapes:
        raise ConfigError(f"export: {path}(**{kwargs}) builds a different network; pass the constructor arguments "
                          "as init_kwargs=")
    return arch


def build_network(arch: dict, device: str | torch.device = "meta") -> nn.Module:
    """The FP network described by ``arch`` (on the meta device by default: no memory, no init cost)."""
    module, _, name = arch["class"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"artifact names class {arch['class']}, which cannot be imported here ({e})") from None
    with torch.device(device):
        net = cls.from_config(arch["config"]) if arch["kind"] == "diffusers" else cls(**arch["init_kwargs"])
    for n, heads in arch.get("attention_heads", {}).items():
        net.get_submodule(n).heads = heads
    return net.eval().requires_grad_(False)


# --- writing -----------------------------------------------------------------------------------------------------

#: Columns of a row of the layer table (one row per quantized layer, in module order).
LAYER_FIELDS = ["name", "type", "weight_shape", "weight_bits", "act_bits", "split", "dtype", "bias", "act_init", "smooth",
                "rank", "time_groups", "weight_group", "act_dynamic"]


class _Blobs:
    """Tensors appended to flat per-kind blobs. Layer tensors are found again from the layer table; every
    other tensor from the index (name, blob, shape[, bits or dtype])."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.index: list[list] = []

    def add(self, name: str, t: torch.Tensor, bits: int | None = None, as_uint8: bool = False, indexed: bool = True) -> None:
        t = t.detach().cpu().contiguous()
        entry: list = [name, "", list(t.shape)]
        if bits is not None:
            entry[1], data = "codes", pack(t, bits)
            entry.append(bits)
        elif as_uint8:  # integer-valued zero points kept in float buffers
            entry[1], data = "uint8", t.reshape(-1).to(torch.uint8)
            entry.append(str(t.dtype).removeprefix("torch."))
        else:
            entry[1], data = str(t.dtype).removeprefix("torch."), t.reshape(-1)
        self.parts[entry[1]].append(data)
        if indexed:
            self.index.append(entry)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.cat(v) for k, v in self.parts.items()}


def _layer_entries(row: dict) -> list[list]:
    """The tensors of one quantized layer, in blob order, as index entries (derived, so never stored)."""
    name, shape, dtype = row["name"], row["weight_shape"], row["dtype"]
    out_axis = 1 if row["type"] == "ConvTranspose2d" else 0
    channel = [1] * len(shape)
    channel[out_axis] = shape[out_axis]
    quantized = row["weight_bits"] < 16
    groups = int(row.get("time_groups", 1))
    act = [groups] if groups > 1 else []
    wgroup = int(row.get("weight_group", 0))  # artifacts written before group-wise scales have no such column
    split = int(row["split"])
    parts = [split, shape[1] - split] if split else [shape[1]]
    entries = [[f"{name}.codes", "codes", shape, row["weight_bits"]] if quantized else [f"{name}.weight", dtype, shape]]
    for i, act_init in enumerate(row["act_init"]):
        if quantized:  # one step size per output channel, or per output channel and group of input channels: [O*I/G, 1]
            scales = [shape[0] * parts[i] // wgroup, 1] if wgroup else channel
            entries += [[f"{name}.wq.{i}.scale", dtype, scales], [f"{name}.wq.{i}.zero_point", "uint8", scales, dtype]]
        if act_init:
            entries += [[f"{name}.aq.{i}.scale", dtype, act], [f"{name}.aq.{i}.zero_point", "uint8", act, dtype]]
            if groups > 1:
                entries.append([f"{name}.aq.{i}.t_edges", "float32", [groups - 1]])
    if row["bias"]:
        entries.append([f"{name}.bias", dtype, [shape[out_axis]]])
    if row.get("smooth"):  # artifacts written before the transforms have neither column
        entries.append([f"{name}.smooth", dtype, [shape[1]]])
    if row.get("rank"):
        lr = "float16"  # the branch's values are float16 (qdiff.quant.transforms.LOWRANK_DTYPE): stored exactly
        entries += [[f"{name}.lr_down", lr, [row["rank"], *shape[1:]]], [f"{name}.lr_up", lr, [shape[0], row["rank"]]]]
    return entries


def export(qmodel: nn.Module, path: str | Path, init_kwargs: dict | None = None, extra: dict | None = None,
           overwrite: bool = False) -> dict:
    """Write ``qmodel`` (from :func:`qdiff.quantize`, or any FP model) as a deployable artifact; returns its sizes.

    ``init_kwargs``: constructor arguments of a non-diffusers network (diffusers models record their config).
    ``extra``: JSON facts kept with the artifact (e.g. the scheduler config a sampler needs). A folder that is not
    empty is refused unless ``overwrite=True``; the artifact is written beside it and renamed into place, so a
    failed or killed export leaves the folder as it was.
    """
    out = Path(path)
    refuse_nonempty(out, overwrite, "export")
    check_weights(qmodel)
    cfg = getattr(qmodel, "quant_config", None) or QuantConfig(method="fp")
    arch = architecture_of(qmodel, init_kwargs)
    blobs, rows, layer_keys = _Blobs(), [], set()
    layers = dict(quant_layers(qmodel))
    for name, layer in layers.items():
        row = {"name": name, "type": layer.org_type, "weight_shape": list(layer.weight.shape),
               "weight_bits": layer.weight_bits if layer.quantizes_weight else 32, "act_bits": layer.act_bits,
               "split": layer.split, "dtype": str(layer.weight.dtype).removeprefix("torch."), "bias": layer.bias is not None,
               # per-token dynamic quantizers have no calibrated state to store (act_dynamic rebuilds them)
               "act_init": [int(q.bits < 16 and bool(q.initialized) and not q.dynamic) for q in layer.aq],
               "smooth": layer.smooth is not None, "rank": layer.rank,
               "time_groups": getattr(layer.aq[0], "groups", 1), "weight_group": layer.weight_group,
               "act_dynamic": bool(layer.aq[0].dynamic)}
        own = layer.state_dict()
        for entry in _layer_entries(row):
            tensor = layer.weight_codes() if entry[1] == "codes" else own[entry[0][len(name) + 1:]]
            if entry[1] == "float16" and tensor.dtype != torch.float16:  # the low-rank branch: float16 values
                if not torch.equal(tensor.half().to(tensor.dtype), tensor):
                    raise ConfigError(f"export: {entry[0]} holds values that float16 does not represent")
                tensor = tensor.half()
            blobs.add(entry[0], tensor, bits=entry[3] if entry[1] == "codes" else None, as_uint8=entry[1] == "uint8",
                      indexed=False)
        rows.append([row[f] for f in LAYER_FIELDS])
        layer_keys.update(f"{name}.{k}" for k in own)
    state = qmodel.state_dict()
    for k, v in state.items():
        if k not in layer_keys:
            blobs.add(k, v)
    persistent = set(state)
    for k, v in qmodel.named_buffers():
        if k not in persistent and not any(k.startswith(n + ".") for n in layers):
            blobs.add(f"buffer:{k}", v)
    fp32_bytes = 4 * sum(p.numel() for n, p in qmodel.named_parameters() if not any(q in n for q in _QUANTIZER_PARTS))
    from qdiff.cache import publish_folder, save_tensors

    with publish_folder(out, overwrite, "export") as tmp:
        save_tensors(tmp / TENSORS_FILE, blobs.tensors(), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "architecture": arch, "quant": asdict(cfg), "layer_fields": LAYER_FIELDS,
                "layers": rows, "tensors": blobs.index, "tensors_sha256": _sha256(tmp / TENSORS_FILE),
                "fp32_bytes": fp32_bytes, "extra": extra or {}}
        (tmp / META_FILE).write_text(json.dumps(meta, separators=(",", ":")))
    return artifact_sizes(out)


def refuse_nonempty(path: Path, overwrite: bool, what: str) -> None:
    """One line, before any work, when ``path`` holds something and ``overwrite`` was not asked for (after putting
    back an earlier output that a killed writer had moved aside)."""
    from qdiff.cache import recover_publish_leftovers

    recover_publish_leftovers(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}: {path} is a file, not a folder")
    if not overwrite and path.is_dir() and any(path.iterdir()):
        held = ", ".join(sorted(p.name for p in path.iterdir())[:3])
        raise ConfigError(f"{what}: {path} is not empty (holds {held}); pass overwrite=True (CLI: --overwrite) to "
                          "replace it, or choose another folder")


def check_weights(model: nn.Module) -> None:
    """Refuse to write a network whose tensors hold NaN/Inf (a broken model is not deployed)."""
    from qdiff.errors import DataError
    from qdiff.finite import first_bad_row, kind

    for name, v in model.state_dict().items():
        if first_bad_row(v) is not None:
            raise DataError(f"export: {name} holds {kind(v)}; a model with non-finite tensors is not exported")


def artifact_sizes(path: str | Path) -> dict:
    """Exact bytes of the artifact's files against the FP32 weights of the same network."""
    p = Path(path)
    meta = json.loads((p / META_FILE).read_text())
    total = (p / TENSORS_FILE).stat().st_size + (p / META_FILE).stat().st_size
    return {"artifact_bytes": total, "fp32_bytes": meta["fp32_bytes"], "ratio_to_fp32": round(total / meta["fp32_bytes"], 4)}


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# --- reading -----------------------------------------------------------------------------------------------------

class Artifact:
    """A read and checked artifact: its metadata, QuantConfig, layer table and tensors by name."""

    def __init__(self, path: str | Path) -> None:
        from qdiff.io import load_state_dict_file

        self.path = Path(path)
        meta_file, tensors_file = self.path / META_FILE, self.path / TENSORS_FILE
        if not meta_file.is_file() or not tensors_file.is_file():
            raise CheckpointError(f"{self.path}: not a qdiff artifact (needs {META_FILE} and {TENSORS_FILE})")
        try:
            self.meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{meta_file}: corrupt JSON ({e.msg} at line {e.lineno})") from None
        if self.meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_file}: unknown format {self.meta.get('format')!r}, expected {FORMAT}")
        if _sha256(tensors_file) != self.meta["tensors_sha256"]:
            raise CheckpointError(f"{tensors_file} is not the one {META_FILE} describes (truncated, corrupt or from "
                                  "another export)")
        self.quant = config_from_dict(QuantConfig, self.meta["quant"], "quant")
        self.rows = [dict(zip(self.meta["layer_fields"], r)) for r in self.meta["layers"]]
        self.specs = [LayerSpec(r["name"], r["type"], r["weight_shape"], r["weight_bits"], r["act_bits"], r["split"],
                                bool(r.get("smooth", False)), int(r.get("rank", 0)), int(r.get("time_groups", 1)),
                                int(r.get("weight_group", 0)), bool(r.get("act_dynamic", False)))
                      for r in self.rows]
        self.tensors = self._unblob(load_state_dict_file(tensors_file))

    def _unblob(self, blobs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, offset = {}, defaultdict(int)
        for entry in [e for r in self.rows for e in _layer_entries(r)] + self.meta["tensors"]:
            name, blob, shape = entry[:3]
            numel = math.prod(shape)
            size = packed_bytes(numel, entry[3]) if blob == "codes" else numel
            data = blobs.get(blob)
            if data is None or offset[blob] + size > data.numel():
                raise CheckpointError(f"{self.path}: tensor '{name}' lies beyond the end of blob '{blob}' (mismatched artifact)")
            chunk = data[offset[blob]:offset[blob] + size]
            offset[blob] += size
            if blob == "codes":
                out[name] = unpack(chunk, entry[3], shape)
            else:
                out[name] = chunk.reshape(shape).to(getattr(torch, entry[3]) if blob == "uint8" else chunk.dtype)
            if blob not in ("codes", "uint8") and out[name].dtype != getattr(torch, blob):
                raise CheckpointError(f"{self.path}: blob '{blob}' has dtype {out[name].dtype} (mismatched artifact)")
        leftover = [b for b, t in blobs.items() if t.numel() != offset[b]]
        if leftover:
            raise CheckpointError(f"{self.path}: blob '{leftover[0]}' holds data its index does not describe (mismatched artifact)")
        return out

    def codes(self, layer: str) -> torch.Tensor | None:
        return self.tensors.get(f"{layer}.codes")
