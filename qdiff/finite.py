"""Where numbers break: the first non-finite row of a batch, said the same way by every stage.

Every stage that produces or changes numbers (calibration data, unit capture, losses, activation ranges, the bias
match, sampling, the quantized model's output) checks them with these helpers and raises
:class:`qdiff.errors.DataError` naming where the first bad value is, before it reaches anything that is kept.
"""
from __future__ import annotations

import torch

#: Model inputs a diffusion sampler produces from unit-variance noise and data stay within a few units (|x_t| of
#: a VP sampler is below ~6 on digits and SD latents alike); far beyond this the sampler that made them diverged.
ABSURD_X = 100.0


def first_bad_row(t: torch.Tensor) -> int | None:
    """Index along dim 0 of the first row holding a NaN or an infinity (None when every value is finite)."""
    if t.is_meta or not (t.is_floating_point() or t.is_complex()):
        return None
    ok = torch.isfinite(t)
    if bool(ok.all()):
        return None
    if t.dim() == 0:
        return 0
    bad = ~ok.reshape(t.shape[0], -1).all(1)
    return int(bad.nonzero()[0, 0])


def kind(t: torch.Tensor) -> str:
    """What is wrong in ``t``: "nan", "inf", "-inf" or a combination, for messages."""
    t = t.detach()
    found = [name for name, mask in (("nan", torch.isnan(t)), ("inf", torch.isposinf(t)), ("-inf", torch.isneginf(t)))
             if bool(mask.any())]
    return "/".join(found) or "finite"


def max_abs(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0
