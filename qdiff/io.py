"""Safe checkpoint I/O: safetensors or ``torch.load(weights_only=True)``, never arbitrary unpickling."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


from qdiff.errors import CheckpointError

__all__ = ["CheckpointError", "load_state_dict_file", "load_into", "write_json", "NpyRowWriter", "read_rows"]


def load_state_dict_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a weights-only torch checkpoint, never running pickled code.

    A Lightning-style ``{"state_dict": ...}`` wrapper is unwrapped and non-tensor entries (``global_step``)
    are dropped.
    """
    import re
    from collections.abc import Mapping

    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device=str(device))
        except Exception as e:  # safetensors raises several types for truncated/garbled headers
            raise CheckpointError(f"cannot read {p} as safetensors ({_first_line(e)}); the file is corrupt or truncated") from None
    with open(p, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format, or a legacy pickle
        raise CheckpointError(f"{p} is not a checkpoint: neither safetensors nor a torch.save file "
                              "(another kind of file, or corrupt or truncated)")
    try:
        obj = torch.load(str(p), map_location=device, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError ... for bad or pickled files
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(
                f"{p} holds pickled Python objects ({found.group(1)}), which qdiff does not unpickle; on a machine where "
                "you trust the file, save its tensors with safetensors.torch.save_file and use the .safetensors file"
            ) from None
        raise CheckpointError(f"cannot read checkpoint {p} ({_first_line(e)}); the file is corrupt or truncated") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {p} holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint {p} holds no tensors")
    return tensors


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first mismatch."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        first = f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'"
        raise CheckpointError(
            f"{what}: checkpoint does not fit the model ({len(missing)} missing, {len(unexpected)} unexpected keys; {first})"
        )
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{what}: shape mismatch at '{k}': checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
    module.load_state_dict(state, strict=True)


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write JSON atomically (temp file + rename) so a killed run never leaves half a file."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_default(o: object) -> object:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class NpyRowWriter:
    """An ``.npy`` file of shape ``(N, *row)`` filled in contiguous row slices by positioned writes.

    A writable memmap would keep every written page mapped, so the process's resident memory would grow
    with the set; writes leave the pages to the kernel's page cache, which flushes and evicts them.
    """

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)  # header; data stays sparse
        self.offset, self.row_bytes = mm.offset, int(np.prod(shape[1:], dtype=np.int64)) * 4
        del mm
        self.f = open(path, "r+b")

    def write(self, rows: slice, values: np.ndarray) -> None:
        self.f.seek(self.offset + rows.start * self.row_bytes)
        self.f.write(memoryview(np.ascontiguousarray(values, dtype=np.float32)).cast("B"))

    def close(self) -> None:
        self.f.close()


def read_rows(array: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of a (memory-mapped) array in request order, read in ascending order (kind to the page cache)."""
    idx = np.asarray(idx, dtype=np.int64)
    order = np.argsort(idx, kind="stable")
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    return np.ascontiguousarray(array[idx[order]])[inv]
