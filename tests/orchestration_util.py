"""Shared bits of the orchestration tests: a tiny, fast job and readers for its outputs."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

# A random-init, width-reduced digits UNet: a whole quantized job takes a few seconds on one core.
TINY_FAST = [
    "logger=none", "eval.n_samples=16", "eval.isc_splits=2", "eval.analysis=false", "sampler.steps=4", "calib.n=2",
    "calib.c=2", "recon.weight_iters=2", "recon.act_iters=1", "recon.batch_size=4",
    "model.arch={block_out_channels:[8,16,16],norm_num_groups:4,attention_head_dim:8}", "model.random_init=true",
]
# One thread per job: the machine has 2 cores, and bit-identical results need the same thread count.
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}


def tiny(*extra: str, **replace: str) -> list[str]:
    """TINY_FAST with ``key=value`` replacements (``tiny(**{"recon.weight_iters": "100"})``) and extra overrides."""
    out = [o for o in TINY_FAST if o.split("=", 1)[0] not in replace]
    return out + [f"{k}={v}" for k, v in replace.items()] + list(extra)


def env() -> dict:
    return {**os.environ, **ENV}


def read_json(p: Path) -> dict:
    return json.loads(Path(p).read_text())


def wandb_records(path: Path):
    """Records of an offline W&B run file (``run-<id>.wandb``: a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            rec = pb.Record()
            rec.ParseFromString(buf + chunk if kind == 4 else chunk)
            buf = b""
            yield rec
        elif kind == 2:  # FIRST
            buf = chunk
        elif kind == 3:  # MIDDLE
            buf += chunk
