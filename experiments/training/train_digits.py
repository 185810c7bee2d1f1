"""Train the embedded digits UNet (DDPM epsilon-prediction) on scikit-learn's bundled digits.

Deterministic on CPU given --seed. Writes qdiff/models/weights/digits_unet.safetensors (EMA weights)
and a JSON card beside it. ~20 minutes on 2 CPU cores with the defaults. :func:`fit` and :func:`save` are the
loop and the output of every embedded model's training (``train_digits_dit.py`` uses them too).

    python experiments/training/train_digits.py [--steps 3000] [--out PATH]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from qdiff.models.digits import SCHEDULER_CONFIG, UNET_CONFIG, UNET_WEIGHTS, build_digits_unet, load_digits_images


def arguments(doc: str, out: Path, steps: int) -> argparse.Namespace:
    """The training options every embedded model takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=out)
    args = p.parse_args()
    if args.steps <= 0 or args.batch_size <= 0:
        raise SystemExit("error: --steps and --batch-size must be positive")
    return args


def fit(model: torch.nn.Module, args: argparse.Namespace, name: str, batch_loss: Callable[[torch.Generator], torch.Tensor],
        lr_lambda: Callable[[int], float]) -> tuple[torch.nn.Module, list[float], float]:
    """AdamW with ``lr_lambda``, gradients clipped at 1, an EMA of the weights; ``batch_loss(g)`` draws a batch with
    the seeded generator ``g`` and returns its loss. Returns (EMA model, losses, seconds)."""
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    losses: list[float] = []
    bar = tqdm(range(args.steps), desc=f"train {name}")
    for step in bar:
        loss = batch_loss(g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - args.ema)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return ema, losses, time.time() - t0


def save(ema: torch.nn.Module, args: argparse.Namespace, tag: str, card: dict, losses: list[float], seconds: float) -> None:
    """The EMA weights as safetensors and a JSON card beside them (settings, final loss, time, CPU)."""
    import platform

    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in ema.state_dict().items()}
    save_file(state, str(args.out), metadata={"model": tag, "seed": str(args.seed)})
    card = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema, "seed": args.seed,
            **card, "final_loss_avg100": sum(losses[-100:]) / len(losses[-100:]), "train_seconds": round(seconds, 1),
            "n_params": sum(p.numel() for p in ema.parameters()), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine()}
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=2))
    print(json.dumps(card, indent=2))


def main() -> None:
    args = arguments(__doc__, UNET_WEIGHTS, 3000)
    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)
    data = load_digits_images()
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    model = build_digits_unet()
    warmup = min(200, args.steps // 10)

    def batch_loss(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(data), (args.batch_size,), generator=g)
        x0 = data[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=g)
        return torch.nn.functional.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)

    ema, losses, seconds = fit(model, args, "digits UNet", batch_loss, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (
        1 + torch.cos(torch.tensor(s / args.steps * torch.pi)).item()))
    save(ema, args, "qdiff-digits-unet", {"unet_config": UNET_CONFIG, "scheduler_config": SCHEDULER_CONFIG}, losses, seconds)


if __name__ == "__main__":
    main()
