"""Quantize your own noise predictor through the public API only: a tutorial-style DDPM UNet, W4A8, end to end.

    python experiments/examples/example_custom_unet.py            # ~1-2 min on 2 CPU cores

The network is the kind a tutorial writes, not a diffusers class: LayerNorm-style blocks with a time embedding,
strided convolutions down, ConvTranspose2d up, and skips as ``torch.cat([up, skip]) + time embedding``. It is
trained for a few hundred steps on scikit-learn's bundled digits (no download), then:

1. ``qdiff.calibration_data``: the paper's timestep-aware set from its own DDIM sampler (T=50, c=5, n=32);
2. ``qdiff.quantize`` twice: round-to-nearest (``method="linear"``) and Q-Diffusion (``method="qdiff"``,
   ``ReconConfig.preset("cpu")`` with a shorter budget), its blocks registered with ``qdiff.recon.register_block``;
3. the report: split points found behind the ``cat(...) + emb`` skips, per-unit MSE, rounding decided;
4. whole sampling runs: final-sample MSE against FP from the same noise, linear vs Q-Diffusion;
5. ``qdiff.export`` / ``qdiff.load_deployed``: the packed artifact rebuilds the network on its own.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class Block(nn.Module):
    """Two conv -> LayerNorm (over C, H, W) -> GELU layers, the time embedding added in between, a residual."""

    def __init__(self, cin: int, cout: int, tdim: int) -> None:
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(1, cout)
        self.temb = nn.Linear(tdim, cout)
        self.conv2, self.norm2 = nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(1, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.norm1(self.conv1(x))) + self.temb(temb)[:, :, None, None]
        return F.gelu(self.norm2(self.conv2(h))) + self.skip(x)


class SelfAttention(nn.Module):
    """Pre-LayerNorm single-head self-attention over the spatial positions."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(c)
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tok = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.ln(tok)).chunk(3, dim=-1)
        tok = tok + self.proj(F.scaled_dot_product_attention(q, k, v))
        return tok.transpose(1, 2).reshape(b, c, h, w)


class TutorialUNet(nn.Module):
    """eps = model(x_t, t) on 1x16x16 images: 16 -> 8 -> 4 and back, skips as cat(...) + time embedding."""

    def __init__(self, ch: int = 24, tdim: int = 64) -> None:
        super().__init__()
        self.tdim = tdim
        self.time = nn.Sequential(nn.Linear(tdim, 2 * tdim), nn.SiLU(), nn.Linear(2 * tdim, tdim))
        self.inc = Block(1, ch, tdim)
        self.down1, self.enc1 = nn.Conv2d(ch, ch, 3, stride=2, padding=1), Block(ch, 2 * ch, tdim)
        self.down2, self.enc2 = nn.Conv2d(2 * ch, 2 * ch, 3, stride=2, padding=1), Block(2 * ch, 2 * ch, tdim)
        self.attn, self.mid = SelfAttention(2 * ch), Block(2 * ch, 2 * ch, tdim)
        self.up1, self.emb1 = nn.ConvTranspose2d(2 * ch, 2 * ch, 4, stride=2, padding=1), nn.Linear(tdim, 4 * ch)
        self.dec1 = Block(4 * ch, ch, tdim)
        self.up2, self.emb2 = nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1), nn.Linear(tdim, 2 * ch)
        self.dec2 = Block(2 * ch, ch, tdim)
        self.out = nn.Conv2d(ch, 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time(sinusoidal(t, self.tdim))
        s0 = self.inc(x, temb)                                 # 16x16
        s1 = self.enc1(self.down1(s0), temb)                   # 8x8
        h = self.mid(self.attn(self.enc2(self.down2(s1), temb)), temb)  # 4x4
        h = torch.cat([self.up1(h), s1], 1) + self.emb1(temb)[:, :, None, None]
        h = self.dec1(h, temb)
        h = torch.cat([self.up2(h), s0], 1) + self.emb2(temb)[:, :, None, None]
        return self.out(self.dec2(h, temb))


def train(net: nn.Module, scheduler, steps: int, seed: int = 0) -> float:
    """A few hundred DDPM training steps on the digits (eps-prediction MSE); returns the last loss."""
    from qdiff.models.digits import load_digits_images

    data = load_digits_images(16)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    net.train()
    loss = 0.0
    for _ in range(steps):
        x0 = data[torch.randint(0, len(data), (48,), generator=g)]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (48,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        batch_loss = F.mse_loss(net(scheduler.add_noise(x0, noise, t), t), noise)
        opt.zero_grad()
        batch_loss.backward()
        opt.step()
        loss = float(batch_loss.detach())
    return loss


def main() -> None:
    import diffusers

    import qdiff

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--weight-iters", type=int, default=400, help="AdaRound iterations per unit (paper: 20k)")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "examples" / "custom_unet")
    args = ap.parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()

    net = TutorialUNet(ch=24)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    loss = train(net, scheduler, args.train_steps)
    net.eval().requires_grad_(False)
    print(f"[1] trained TutorialUNet ({sum(p.numel() for p in net.parameters()):,} parameters) for "
          f"{args.train_steps} steps on the digits: loss {loss:.3f} ({time.perf_counter() - t_start:.0f} s)")

    calib = qdiff.calibration_data(net, scheduler, (1, 16, 16), T=50, c=5, n=32, cache_dir=args.out / "cache")
    print(f"[2] calibration data: {len(calib)} inputs (n=32 trajectories x {len(calib.timesteps())} kept steps of "
          f"DDIM-50), timesteps {calib.timesteps().tolist()}")

    for cls in (Block, SelfAttention):  # reconstructed jointly, like the paper's residual/attention blocks
        qdiff.recon.register_block(cls)
    qcfg = qdiff.QuantConfig(method="qdiff", weight_bits=4, act_bits=8)
    linear = qdiff.quantize(net, qdiff.QuantConfig(method="linear", weight_bits=4, act_bits=8), calib, progress=False)
    recon = qdiff.ReconConfig.preset("cpu", weight_iters=args.weight_iters, act_iters=args.weight_iters // 5)
    q = qdiff.quantize(net, qcfg, calib, recon, work_dir=args.out / "recon_w4a8", progress=False)
    rep = q.qdiff_report
    splits = {s.name: s.split for s in q.quant_specs if s.split}
    print(f"[3] quantized W4A8 in {sum(rep['seconds'].values()):.0f} s; split points (cat(...) + emb skips): {splits}")
    print(f"    {rep['n_units']} units; rounding decided: {rep['hard_fraction_mean']:.0%} of the AdaRound variables")
    for s in rep["steps"]:
        if s["step"].startswith("weights:"):
            print(f"    {s['unit']:<10} {s['kind']:<5} MSE {s['mse_before']:.2e} -> {s['mse_after']:.2e}  "
                  f"decided {s['hard_fraction']:.0%}")
    print(f"    output bias match: {rep['output'].get('bias_match', {}).get('bias_shift')}")

    fp_final = calib.final_latents(net, 32)
    for name, model in (("linear", linear), ("Q-Diffusion", q)):
        mse = float(((calib.final_latents(model, 32) - fp_final) ** 2).mean())
        print(f"[4] {name:<12} final-sample MSE vs FP over 32 DDIM-50 runs from the same noise: {mse:.4f}")

    sizes = qdiff.export(q, args.out / "w4a8", init_kwargs={"ch": 24, "tdim": 64}, overwrite=True)  # this script's own folder
    deployed = qdiff.load_deployed(args.out / "w4a8")
    x, t, _ = calib.get(list(range(8)))
    same = torch.equal(deployed(x, t), q(x, t))
    print(f"[5] exported {sizes['artifact_bytes']:,} bytes ({sizes['ratio_to_fp32']:.3f} of FP32) to {args.out / 'w4a8'};"
          f" reloaded alone, identical outputs: {same}")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    # Run through the importable module, not __main__: qdiff.export records the network's class by import path.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import example_custom_unet

    example_custom_unet.main()
