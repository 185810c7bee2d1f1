"""Block/layer reconstruction as a training-like Lightning loop (manual optimisation, ``max_steps``).

One :class:`ReconModule` per unit and phase. The phase is a strategy, not a copy of the loop:
``weights`` learns AdaRound rounding variables with the annealed rounding regulariser; ``acts`` learns
LSQ step sizes of the unit's activation quantizers. Lightning provides the loop, logging, device
placement and precision; progress shows on the engine's one bar (:class:`BarPostfix`).
"""
from __future__ import annotations

import os
from contextlib import ExitStack

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from qdiff.errors import DataError
from qdiff.quant.adaround import AdaRoundQuantizer
from qdiff.recon.capture import UnitCache, row_timesteps, target_slots, unit_call_args, unit_outputs, uses_timesteps
from qdiff.recon.config import ReconConfig

#: Losses are read back and logged every LOG_EVERY optimisation steps (and at the last one).
LOG_EVERY = 25


def lp_loss(pred: torch.Tensor, target: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """BRECQ's reconstruction loss: |pred - target|^p summed over the channels, averaged over the rest. Channels are
    dim 1 of feature maps [B, C, H, W] and the last dim of token sequences [B, L, D] (and of [B, D])."""
    d = pred - target
    return (d.square() if p == 2 else d.abs().pow(p)).sum(1 if d.dim() == 4 else -1).mean()


def unit_loss(outs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """The loss of every output of a unit (both streams of a joint-attention block), summed."""
    return sum(lp_loss(o.float(), t.float()) for o, t in zip(outs, targets))


class _RandomRows(IterableDataset):
    """``steps`` random batches of row indices, seeded (identical on resume)."""

    def __init__(self, n: int, batch_size: int, steps: int, seed: int) -> None:
        self.n, self.batch_size, self.steps, self.seed = n, batch_size, steps, seed

    def __iter__(self):
        g = np.random.default_rng(self.seed)
        for _ in range(self.steps):
            yield g.choice(self.n, size=min(self.batch_size, self.n), replace=False)


class ReconModule(pl.LightningModule):
    def __init__(self, unit: nn.Module, cache: UnitCache, calib, sample_idx: np.ndarray, phase: str,
                 params: list[nn.Parameter], cfg: ReconConfig, steps: int, seed: int,
                 adaround: list[AdaRoundQuantizer] | None = None, name: str = "") -> None:
        super().__init__()
        self.unit, self.unit_name = unit, name
        self.timed = uses_timesteps(unit)  # timestep-aware quantizers: each step gives them its rows' timesteps
        self.cache, self.calib, self.sample_idx = cache, calib, sample_idx
        self.phase, self.cfg, self.steps, self.seed = phase, cfg, steps, seed
        self.recon_params = params
        self.adaround = adaround or []
        self.automatic_optimization = False
        self.last: dict[str, float] = {}
        #: Optimisation steps actually run (fewer than ``steps`` when the rounding was decided early).
        self.steps_run = 0
        #: First step whose loss was non-finite (-1: none), kept on the device: checking it costs no sync per step.
        self._first_bad: torch.Tensor | None = None

    def train(self, mode: bool = True):
        # Lightning switches modules to train mode; the block itself must keep its inference behaviour
        # (BatchNorm statistics, dropout), only its quantizer parameters are learned.
        super().train(mode)
        self.unit.eval()
        return self

    def configure_optimizers(self):
        lr = self.cfg.weight_lr if self.phase == "weights" else self.cfg.act_lr
        # Fused Adam (one kernel for all tensors) where the device has it: per-step cost matters with ~1e4 small steps.
        fused = self.device.type in ("cpu", "cuda") and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                                            for p in self.recon_params)
        opt = torch.optim.Adam(self.recon_params, lr=lr, fused=fused or None)
        if self.phase == "acts":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.steps), eta_min=0.0)
            return [opt], [sched]
        return opt

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # the batch is a set of row indices into the unit cache: it stays on the host (the cache reads the rows)
        return batch

    def train_dataloader(self):
        return DataLoader(_RandomRows(self.cache.n, self.cfg.batch_size, self.steps, self.seed), batch_size=None)

    def temperature(self, step: int) -> float | None:
        """Rounding-regulariser exponent b at ``step``: None during warm-up, then b_start -> b_end linearly."""
        start = self.cfg.warmup * self.steps
        if step < start:
            return None
        rel = (step - start) / max(1.0, self.steps - start)
        return self.cfg.b_end + (self.cfg.b_start - self.cfg.b_end) * max(0.0, 1.0 - rel)

    def unit_output(self, rows: np.ndarray) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The unit's outputs on cached rows and their FP targets."""
        args, kwargs = unit_call_args(self.cache, rows, self.calib, self.sample_idx, self.device)
        with row_timesteps(self.timed, self.calib, self.sample_idx, rows):
            outs = unit_outputs(self.unit(*args, **kwargs))
        return outs, [self.cache.read(s, rows, self.device) for s in target_slots(len(outs))]

    def training_step(self, rows, batch_idx):
        opt = self.optimizers()
        step = self.global_step
        with ExitStack() as stack:
            for q in self.adaround:
                stack.enter_context(q.step_h())
            outs, targets = self.unit_output(np.asarray(rows))
            rec = unit_loss(outs, targets)
            loss = rec
            b = self.temperature(step) if self.phase == "weights" else None
            round_loss = torch.zeros((), device=rec.device)
            if b is not None and self.cfg.round_weight > 0:
                round_loss = self.cfg.round_weight * sum(q.round_loss(b) for q in self.adaround)
                loss = rec + round_loss
        self._track_non_finite(loss.detach(), step)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        if self.phase == "acts":
            self.lr_schedulers().step()
        self.steps_run = step + 1
        if (step + 1) % LOG_EVERY == 0 or step + 1 >= self.steps:
            self._raise_if_non_finite()  # before a broken state could be kept (or look "decided")
        if (self.phase == "weights" and self.cfg.stop_when_hard and (step + 1) % LOG_EVERY == 0
                and all(q.all_hard() for q in self.adaround)):
            self.trainer.should_stop = True  # exact: no later step can change a fully decided rounding
        if (step + 1) % LOG_EVERY == 0 or step + 1 >= self.steps:
            # Reading a loss value synchronises the device and logging costs ~1 ms on CPU: only every LOG_EVERY steps.
            self.last = {"rec_loss": float(rec.detach()), "round_loss": float(round_loss.detach())}
            self.log_dict({f"recon/{self.phase}/rec_loss": self.last["rec_loss"],
                           f"recon/{self.phase}/round_loss": self.last["round_loss"]}, prog_bar=True, on_step=True,
                          on_epoch=False, batch_size=len(rows))
        return loss


    def _track_non_finite(self, loss: torch.Tensor, step: int) -> None:
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = (self._first_bad < 0) & ~torch.isfinite(loss)
        self._first_bad = torch.where(bad, torch.full_like(self._first_bad, step), self._first_bad)

    def _raise_if_non_finite(self) -> None:
        first = int(self._first_bad) if self._first_bad is not None else -1
        if first >= 0:
            what = "AdaRound" if self.phase == "weights" else "LSQ"
            raise NonFiniteLoss(f"reconstruction: the {what} loss of unit '{self.unit_name}' became non-finite at "
                                f"step {first + 1} of {self.steps}")


class NonFiniteLoss(DataError):
    """A unit's reconstruction loss became NaN/Inf (the engine adds where the finished steps are kept)."""


def trainer_for(steps: int, device: torch.device, precision: str, progress: bool, logger, callbacks: list | None = None) -> pl.Trainer:
    """A Lightning trainer for one unit loop; ``progress``: Lightning's own per-unit bar."""
    plugins = []
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        # submitit (or the user's own script) handles requeue; Lightning's own SLURM requeue stays off.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = pl.Trainer(
        max_steps=steps, max_epochs=-1, accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1, precision=precision, logger=logger,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        enable_progress_bar=progress, log_every_n_steps=LOG_EVERY, plugins=plugins, callbacks=callbacks or [],
        limit_val_batches=0, use_distributed_sampler=False,
    )
    if os.environ.get("SUBMITIT_EXECUTOR"):
        # Under submitit, SIGTERM (sent first on preemption) must be ignored: submitit's USR2 handler checkpoints
        # and requeues the job. Lightning 2.x chains its own SIGTERM handler in front of submitit's even with
        # auto_requeue=False, and its loops then raise SIGTERMException at the next step, ending a preempted
        # job instead of letting it be requeued. So Lightning installs no signal handlers in submitit jobs.
        trainer._signal_connector.register_signal_handlers = lambda: None
    return trainer


class BarPostfix(pl.Callback):
    """Shows the running unit loop's step and loss on the engine's one progress bar (Lightning's own stays off)."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self.label = ""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % LOG_EVERY == 0 or step >= module.steps:
            loss = module.last.get("rec_loss")
            self.bar.set_postfix_str(f"{self.label} {step}/{module.steps}" + (f" loss {loss:.3g}" if loss is not None else ""))
