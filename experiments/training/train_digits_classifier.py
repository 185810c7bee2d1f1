"""Train the digits classifier used as torch-fidelity feature extractor for the embedded model.

Trains on 80% of scikit-learn's digits (16x16, [-1, 1]) with light shift augmentation and reports the
accuracy on the held-out 20%. Deterministic given --seed. Writes
qdiff/models/weights/digits_classifier.safetensors and a JSON card with the test accuracy.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from qdiff.models.digits import CLASSIFIER_WEIGHTS, DigitsClassifier, load_digits_images, load_digits_labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=CLASSIFIER_WEIGHTS)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    x, y = load_digits_images(), load_digits_labels()
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = len(x) // 5
    te, tr = perm[:n_test], perm[n_test:]
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    t0 = time.time()
    for _ in range(args.epochs):
        net.train()
        order = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            xb = x[idx]
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(net(xb)[1], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[te])[1].argmax(1) == y[te]).float().mean().item()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out))
    card = {"test_accuracy": round(acc, 4), "n_train": len(tr), "n_test": n_test, "epochs": args.epochs,
            "seed": args.seed, "train_seconds": round(time.time() - t0, 1), "feature_dim": DigitsClassifier.feature_dim}
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=2))
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
