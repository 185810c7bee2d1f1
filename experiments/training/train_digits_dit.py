"""Train the embedded digits DiT (class-conditional, DDPM epsilon-prediction) on scikit-learn's bundled digits.

DiT's recipe at digits size: a diffusers ``DiTTransformer2DModel`` (adaLN-Zero blocks, patch 2) conditioned on the
digit's class, dropped to the null class (10) for 10 % of the samples (classifier-free guidance, as DiT-XL/2 is
trained and sampled). The drop is drawn once per sample here: diffusers' DiT gives every block its own label
embedder, which would each drop on its own in train mode, so the model is trained in eval mode (it has no dropout
or batch norm) with the labels already dropped. The loop is train_digits.py's. Deterministic on CPU given --seed.
Writes qdiff/models/weights/digits_dit.safetensors (EMA weights) and a JSON card beside it.

    python experiments/training/train_digits_dit.py [--steps 4000] [--out PATH]
"""
from __future__ import annotations

import math

import torch

from qdiff.models.digits import (DIT_CONFIG, DIT_WEIGHTS, NUM_CLASSES, SCHEDULER_CONFIG, build_digits_dit,
                                 load_digits_images, load_digits_labels)
from train_digits import arguments, fit, save

#: Share of training samples whose class is replaced by the null class (DiT: 0.1).
CLASS_DROPOUT = 0.1


def main() -> None:
    args = arguments(__doc__, DIT_WEIGHTS, 4000)
    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)
    data, labels = load_digits_images(), load_digits_labels()
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    model = build_digits_dit().eval()  # eval: no per-block label dropout (drawn once per sample below)
    warmup = min(200, args.steps // 10)

    def batch_loss(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(data), (args.batch_size,), generator=g)
        x0, y = data[idx], labels[idx]
        y = torch.where(torch.rand(args.batch_size, generator=g) < CLASS_DROPOUT, NUM_CLASSES, y)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=g)
        return torch.nn.functional.mse_loss(model(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample, noise)

    ema, losses, seconds = fit(model, args, "digits DiT", batch_loss,
                               lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    save(ema, args, "qdiff-digits-dit", {
        "command": f"python experiments/training/train_digits_dit.py --steps {args.steps} --batch-size {args.batch_size} "
                   f"--lr {args.lr} --ema {args.ema} --seed {args.seed}",
        "class_dropout": CLASS_DROPOUT, "dit_config": DIT_CONFIG, "scheduler_config": SCHEDULER_CONFIG}, losses, seconds)


if __name__ == "__main__":
    main()
