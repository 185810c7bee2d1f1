"""A plain nn.Module noise predictor (no diffusers): LayerNorm, ConvTranspose2d, Sequential blocks, a skip concat;
and the DDIM scheduler the tests sample it with."""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)  # a 2-D concat: must NOT be mistaken for a skip


class Res(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(4, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.body = nn.Sequential(nn.GroupNorm(4, cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(torch.nn.functional.silu(self.norm(x)))
        h = h + self.temb(temb)[:, :, None, None]
        return self.skip(x) + self.body(h)


class TokenMix(nn.Module):
    """Transformer-ish block over spatial tokens with LayerNorm and Linear layers."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        b, c, h, w = x.shape
        tok = x.flatten(2).transpose(1, 2)
        tok = tok + self.mlp(self.ln(tok))
        return tok.transpose(1, 2).reshape(b, c, h, w)


class TinyUNet(nn.Module):
    def __init__(self, ch: int = 8, tdim: int = 16) -> None:
        super().__init__()
        self.tdim = tdim
        self.time = nn.Sequential(nn.Linear(tdim, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.inc = nn.Conv2d(1, ch, 3, padding=1)
        self.down = Res(ch, 2 * ch, tdim)
        self.pool = nn.Conv2d(2 * ch, 2 * ch, 3, stride=2, padding=1)
        self.mid = TokenMix(2 * ch)
        self.up = nn.ConvTranspose2d(2 * ch, ch, 4, stride=2, padding=1)
        self.dec = Res(2 * ch, ch, tdim)        # input: cat([up-path (ch), skip (ch)])
        self.out = nn.Sequential(nn.GroupNorm(4, ch), nn.SiLU(), nn.Conv2d(ch, 1, 3, padding=1))

    def forward(self, x, t):
        temb = self.time(timestep_embedding(t, self.tdim))
        h0 = self.inc(x)
        h = self.mid(self.pool(self.down(h0, temb)))
        h = self.up(h)
        h = self.dec(torch.cat([h, h0], dim=1), temb)
        return self.out(h)


class ConstantImageEps(nn.Module):
    """The exact noise predictor for data that is one constant image (every pixel ``level``), followed by a 1x1
    output conv (identity weight, zero bias): its output bias moves the sampler's final mean smoothly, so a test
    can plant a known offset there and ask the output bias match to remove it."""

    def __init__(self, level: float = 0.3, num_train_timesteps: int = 1000) -> None:
        super().__init__()
        betas = torch.linspace(1e-4, 0.02, num_train_timesteps)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0))
        self.level = level
        self.out = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.out.weight.fill_(1.0)
            self.out.bias.zero_()

    def forward(self, x, t):
        a = self.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        return self.out((x - a.sqrt() * self.level) / (1 - a).sqrt())


def ddim(**kw):
    """diffusers' DDIM scheduler on the 1000-step training schedule (``kw``: its other settings)."""
    import diffusers

    return diffusers.DDIMScheduler(num_train_timesteps=1000, **kw)
