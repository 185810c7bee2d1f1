"""Train the embedded digits DiT (class-conditional, DDPM epsilon-prediction) on scikit-learn's bundled digits.

DiT's recipe at digits size: a diffusers ``DiTTransformer2DModel`` (adaLN-Zero blocks, patch 2) conditioned on the
digit's class, dropped to the null class (10) for 10 % of the samples (classifier-free guidance, as DiT-XL/2 is
trained and sampled). The drop is drawn once per sample here: diffusers' DiT gives every block its own label
embedder, which would each drop on its own in train mode, so the model is trained in eval mode (it has no dropout
or batch norm) with the labels already dropped. Deterministic on CPU given --seed. Writes
qdiff/models/weights/digits_dit.safetensors (EMA weights) and a JSON card beside it.

    python experiments/train_digits_dit.py [--steps 4000] [--out PATH]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from qdiff.models.digits import (DIT_CONFIG, DIT_WEIGHTS, NUM_CLASSES, SCHEDULER_CONFIG, build_digits_dit,
                                 load_digits_images, load_digits_labels)

#: Share of training samples whose class is replaced by the null class (DiT: 0.1).
CLASS_DROPOUT = 0.1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DIT_WEIGHTS)
    args = p.parse_args()
    if args.steps <= 0 or args.batch_size <= 0:
        raise SystemExit("error: --steps and --batch-size must be positive")

    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)
    data, labels = load_digits_images(), load_digits_labels()
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    model = build_digits_dit().eval()  # eval: no per-block label dropout (drawn once per sample below)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = min(200, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    losses: list[float] = []
    bar = tqdm(range(args.steps), desc="train digits DiT")
    for step in bar:
        idx = torch.randint(0, len(data), (args.batch_size,), generator=g)
        x0, y = data[idx], labels[idx]
        y = torch.where(torch.rand(args.batch_size, generator=g) < CLASS_DROPOUT, NUM_CLASSES, y)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=g)
        xt = scheduler.add_noise(x0, noise, t)
        loss = torch.nn.functional.mse_loss(model(xt, t, class_labels=y).sample, noise)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in ema.state_dict().items()}
    save_file(state, str(args.out), metadata={"model": "qdiff-digits-dit", "seed": str(args.seed)})
    card = {
        "command": f"python experiments/train_digits_dit.py --steps {args.steps} --batch-size {args.batch_size} "
                   f"--lr {args.lr} --ema {args.ema} --seed {args.seed}",
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema, "seed": args.seed,
        "class_dropout": CLASS_DROPOUT, "final_loss_avg100": sum(losses[-100:]) / len(losses[-100:]),
        "train_seconds": round(time.time() - t0, 1), "n_params": sum(p.numel() for p in model.parameters()),
        "dit_config": DIT_CONFIG, "scheduler_config": SCHEDULER_CONFIG, "torch": torch.__version__,
    }
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=2))
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
