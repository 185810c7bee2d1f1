"""Reconstruct a TinyUNet (used by the kill-and-resume test): python recon_job.py WORK_DIR OUT_FILE [ITERS]."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from qdiff.api import prepare  # noqa: E402
from qdiff.calib import TensorCalibration  # noqa: E402
from qdiff.quant import QuantConfig  # noqa: E402
from qdiff.recon import ReconConfig, reconstruct  # noqa: E402
from tiny_unet import TinyUNet  # noqa: E402


def setup(iters: int = 60):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = TinyUNet().eval()
    g = torch.Generator().manual_seed(1)
    calib = TensorCalibration(torch.randn(48, 1, 16, 16, generator=g), torch.randint(0, 1000, (48,), generator=g))
    qcfg = QuantConfig(method="qdiff", weight_bits=4, act_bits=8)
    rcfg = ReconConfig(weight_iters=iters, act_iters=iters // 3, batch_size=8, block_patterns=["down", "dec", "mid"])
    q, _ = prepare(net, qcfg, calib.get([0, 1]))
    return net, q, calib, qcfg, rcfg


if __name__ == "__main__":
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    net, q, calib, qcfg, rcfg = setup(int(sys.argv[3]) if len(sys.argv) > 3 else 60)
    report = reconstruct(net, q, calib, qcfg, rcfg, work_dir=work, progress=False)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in q.state_dict().items()}, str(out), metadata={"resumed": str(report["resumed_steps"])})
