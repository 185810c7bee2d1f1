"""Uniform affine fake quantizer (paper Eq. 7) with explicit, testable initialisation.

    x_hat = s * (clip(round(x / s) + z, 0, 2^b - 1) - z)

Scales are per output channel (``channel_axis=0``, weights), per output channel and group of ``group_size``
input channels (``group_size > 0``, group-wise weights), per tensor (``channel_axis=None``, activations) or per
token, computed from each token's own range at run time (:class:`DynamicTokenQuantizer`). Rounding uses a
straight-through estimator, so gradients reach the input and, when the
scale is learnable (LSQ, Esser et al. 2020), the step size.
"""
from __future__ import annotations

import torch
from torch import nn

N_GRID = 100          # candidate clipping ratios of the Lp grid search
MIN_RATIO = 0.2       # smallest ratio tried: ranges shrink to at most 20% of min/max
EPS = 1e-8


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest; gradient passes straight through."""
    return (x.round() - x).detach() + x


class NotInitializedError(RuntimeError):
    """A quantizer was used before its explicit initialisation step."""


def _reduce_dims(x: torch.Tensor, channel_axis: int | None) -> list[int] | None:
    return None if channel_axis is None else [d for d in range(x.dim()) if d != channel_axis]


def _stat_shape(x: torch.Tensor, channel_axis: int | None) -> tuple[int, ...]:
    if channel_axis is None:
        return ()
    shape = [1] * x.dim()
    shape[channel_axis] = x.shape[channel_axis]
    return tuple(shape)


def scale_zero_point(x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Step size and integer zero point covering [x_min, x_max] (zero always representable)."""
    x_min = torch.minimum(x_min, torch.zeros_like(x_min))
    x_max = torch.maximum(x_max, torch.zeros_like(x_max))
    if symmetric:
        a = torch.maximum(x_min.abs(), x_max)
        x_min, x_max = -a, a
    levels = 2 ** bits - 1
    scale = ((x_max - x_min) / levels).clamp_min(EPS)
    zero_point = (-x_min / scale).round().clamp(0, levels)
    return scale, zero_point


def fake_quant_(y: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, levels: int) -> torch.Tensor:
    """Inference path, in place on ``y = x / scale``: one allocation instead of seven, four passes over memory.

    (round(y) - y) + y == round(y) exactly in float, and clamp(r + z, 0, L) - z == clamp(r, -z, L - z) for the
    integer-valued r and z (exact below 2^24), so this equals the straight-through path bit for bit.
    """
    y = torch.clamp(y.round_(), -zero_point, levels - zero_point, out=y)  # tensor bounds: no device sync
    return y.mul_(scale)


class _FakeQuantSTE(torch.autograd.Function):
    """Training path as one autograd node: the straight-through estimator's gradients, written out.

    out = s * (clamp(round(x/s) + z, 0, L) - z), with round's gradient taken as 1 (STE). Inside the range
    (0 < round(x/s) + z < L): d out/dx = 1 and d out/ds = (round(x/s) - x/s); elsewhere: 0 and the clipped
    level (c - z). These are the gradients autograd derives for the composed STE expression (LSQ without
    its gradient scaling), in two saved tensors instead of the composed graph's seven intermediates.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, levels: int) -> torch.Tensor:
        y = x / scale
        c = torch.round(y).add_(zero_point)
        inside = (c > 0) & (c < levels)  # strict, as autograd's clamp backward: the end levels count as clipped
        c = c.clamp_(0, levels).sub_(zero_point)  # clipped integer level minus zero point
        out = c * scale
        ctx.scale_needs_grad = ctx.needs_input_grad[1]
        ctx.scale_shape = scale.shape
        if ctx.scale_needs_grad:
            ctx.save_for_backward(inside, c.sub_(y.mul_(inside)))  # d out/ds per element
        else:
            ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        inside = ctx.saved_tensors[0]
        gx = g * inside if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.scale_needs_grad:
            t = g * ctx.saved_tensors[1]
            gs = t.sum() if len(ctx.scale_shape) == 0 else t.sum_to_size(ctx.scale_shape)
        return gx, gs, None, None


def needs_no_grad(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """True when no gradient can flow through fake-quantizing ``x`` with ``scale`` (the inference path applies)."""
    return not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2 ** bits - 1
    if needs_no_grad(x, scale):
        return fake_quant_(x / scale, scale, zero_point, levels)
    return _FakeQuantSTE.apply(x, scale, zero_point, levels)


def fake_quant_composed(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """The straight-through expression composed from autograd ops (the reference for :class:`_FakeQuantSTE`)."""
    q = torch.clamp(round_ste(x / scale) + zero_point, 0, 2 ** bits - 1)
    return (q - zero_point) * scale


@torch.no_grad()
def search_range(x: torch.Tensor, bits: int, symmetric: bool, channel_axis: int | None, method: str, p: float = 2.4,
                 x_min: torch.Tensor | None = None, x_max: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) by min-max or by the clipping ratio minimising the Lp error, per channel.

    ``x_min``/``x_max`` may be given when ``x`` is only a subsample of the data (activations): the grid
    then spans the true range while the error is measured on the subsample.
    """
    dims = _reduce_dims(x, channel_axis)
    shape = _stat_shape(x, channel_axis)
    if x_min is None:
        x_min = x.amin() if dims is None else x.amin(dim=dims, keepdim=True)
        x_max = x.amax() if dims is None else x.amax(dim=dims, keepdim=True)
    x_min, x_max = x_min.reshape(shape).float(), x_max.reshape(shape).float()
    x = x.float()
    if method == "minmax" or x.is_meta:  # meta tensors (structure checks of full-size models) have no values to search
        return scale_zero_point(x_min, x_max, bits, symmetric)
    if method != "mse":
        raise ValueError(f"unknown scale method '{method}'")
    # Evaluate the candidate ratios in chunks, all at once per chunk: [R, *x.shape] (bounded memory).
    ratios = torch.linspace(1.0, MIN_RATIO, N_GRID, device=x.device)
    chunk = max(1, min(N_GRID, (1 << 24) // max(1, x.numel())))
    best_err = torch.full(shape, float("inf"), device=x.device)
    best_s, best_z = scale_zero_point(x_min, x_max, bits, symmetric)
    rdims = None if dims is None else [d + 1 for d in dims]
    for start in range(0, N_GRID, chunk):
        r = ratios[start:start + chunk].view(-1, *([1] * x.dim()))
        s, z = scale_zero_point(x_min * r, x_max * r, bits, symmetric)          # [R, *shape]
        xq = fake_quant(x.unsqueeze(0), s, z, bits)
        err = (x.unsqueeze(0) - xq).abs().pow(p)
        err = err.flatten(1).mean(1).view(-1, *([1] * x.dim())) if rdims is None else err.mean(dim=rdims, keepdim=True)
        err = err.reshape(-1, *shape) if shape else err.reshape(-1)
        s, z = s.reshape(err.shape), z.reshape(err.shape)
        i = err.argmin(0, keepdim=True)
        e_best = err.gather(0, i).squeeze(0)
        better = e_best < best_err
        best_err = torch.where(better, e_best, best_err)
        best_s = torch.where(better, s.gather(0, i).squeeze(0), best_s)
        best_z = torch.where(better, z.gather(0, i).squeeze(0), best_z)
    return best_s, best_z


class UniformQuantizer(nn.Module):
    """Fake quantizer with explicit init (:meth:`init_from`), optional learnable step size (LSQ).

    Bits 16/32 mean "off": the quantizer is the identity. Using a required quantizer before :meth:`init_from`
    (or loading a state) raises :class:`NotInitializedError`; an optional one is the identity until then.
    """

    #: Whether the step size is computed from each input at run time (no calibrated state; see DynamicTokenQuantizer).
    dynamic = False

    def __init__(self, bits: int, symmetric: bool = False, channel_axis: int | None = None,
                 learnable_scale: bool = False, required: bool = True, group_size: int = 0) -> None:
        super().__init__()
        self.bits = bits
        self.symmetric = symmetric
        self.channel_axis = channel_axis
        if group_size and channel_axis != 0:
            raise ValueError("group-wise scales need channel_axis=0 (a weight's output channels)")
        #: Input channels per scale (group-wise weights): a weight [O, I, *k] has one step size per output channel and
        #: group of ``group_size`` input channels, i.e. per row of its view [O * I / G, G * prod(k)]; 0 = per channel.
        self.group_size = int(group_size)
        #: Runtime switch, only turned off for the duration of a ``with`` (see ``qdiff.quant.wrap.activations_fp``).
        self.enabled = True
        #: Required quantizers (weights) refuse to run before their init; optional ones (activations) pass their
        #: input through until calibration initialises them, and stay off if it never sees them run.
        self.required = required
        #: Bumped whenever the quantization function changes (layers key their weight caches on it).
        self.version = 0
        self._ready = False
        self.scale = nn.Parameter(torch.ones(()), requires_grad=learnable_scale)
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def extra_repr(self) -> str:
        axis = "per-tensor" if self.channel_axis is None else f"channel_axis={self.channel_axis}"
        axis += f", group_size={self.group_size}" if self.group_size else ""
        return f"bits={self.bits}, symmetric={self.symmetric}, {axis}, active={self.active}"

    @property
    def levels(self) -> int:
        return 2 ** self.bits - 1

    @torch.no_grad()
    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale.data = scale.detach().clone().to(self.scale.device)
        self.zero_point = zero_point.detach().clone().to(self.scale.device)
        self.initialized.fill_(True)
        self._ready = True
        self.version += 1

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, method: str = "minmax", p: float = 2.4,
                  x_min: torch.Tensor | None = None, x_max: torch.Tensor | None = None) -> "UniformQuantizer":
        """Set the step size and zero point from data ``x`` (weights, or sampled activations)."""
        if self.bits < 16:
            s, z = search_range(self.grouped(x), self.bits, self.symmetric, self.channel_axis, method, p, x_min, x_max)
            self.set_params(s, z)
        return self

    def grouped(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` as the rows its step sizes apply to: [O * I / G, G * prod(k)] for group-wise scales, else ``w``."""
        return w if not self.group_size else group_view(w, self.group_size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Scale and zero point change shape at init (per channel); adopt the stored shapes.
        for name in ("scale", "zero_point"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                if name == "scale":
                    self.scale.data = torch.empty_like(state_dict[key])
                else:
                    self.zero_point = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)
        self.version += 1

    def integer(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes in [0, 2^b - 1] (what a deployed kernel stores)."""
        g = self.grouped(x)
        return torch.clamp(torch.round(g / self.scale) + self.zero_point, 0, self.levels).reshape(x.shape)

    @property
    def active(self) -> bool:
        """Whether forward changes its input: bits < 16, switched on, and initialised unless required."""
        return self.enabled and self.bits < 16 and (self._ready or self.required)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        if not self._ready:
            raise NotInitializedError("quantizer used before initialisation (call init_from or load a quantized state)")
        if self.group_size:
            return fake_quant(self.grouped(x), self.scale, self.zero_point, self.bits).reshape(x.shape)
        return fake_quant(x, self.scale, self.zero_point, self.bits)


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """A weight [O, I, *k] as [O * I / G, G * prod(k)]: row (o, g) holds output channel o's weights on input channels
    [g G, (g + 1) G) (a view of a contiguous weight)."""
    if w.dim() < 2 or w.shape[1] % group_size:
        raise ValueError(f"group-wise scales: {w.shape[1] if w.dim() > 1 else 0} input channels are not a multiple of "
                         f"the group size {group_size}")
    return w.reshape(w.shape[0] * (w.shape[1] // group_size), -1)


class DynamicTokenQuantizer(UniformQuantizer):
    """Per-token dynamic activation quantizer: every token's step size and zero point come from that token's own
    min/max at run time (LLM.int8 / ViDiT-Q / Q-DiT style), so nothing is calibrated or learned.

    A token is one position's channel vector: a row over the last axis of a Linear's input, one (sample, pixel)
    over axis 1 of a conv's. Gradients pass to the input straight through (the step sizes are not trained). The
integers a deployed kernel would see are not stored: they exist only at run time.
    """

    dynamic = True

    def __init__(self, bits: int, symmetric: bool = False, token_axis: int = -1) -> None:
        super().__init__(bits, symmetric, None, learnable_scale=False, required=False)
        #: The channel axis each token spans (its min/max is taken over it): -1 for a Linear's input, 1 for a conv's.
        self.token_axis = int(token_axis)
        self.initialized.fill_(True)
        self._ready = True

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, per-token dynamic over axis {self.token_axis}, active={self.active}"

    def init_from(self, x, method="minmax", p=2.4, x_min=None, x_max=None) -> "DynamicTokenQuantizer":
        return self  # nothing to calibrate

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = True  # ready without any stored state

    def token_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) of every token of ``x``, broadcastable against it."""
        with torch.no_grad():
            xf = x.detach().float() if x.dtype not in (torch.float32, torch.float64) else x.detach()
            s, z = scale_zero_point(xf.amin(self.token_axis, keepdim=True), xf.amax(self.token_axis, keepdim=True),
                                    self.bits, self.symmetric)
        return s.to(x.dtype), z.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        s, z = self.token_params(x)
        if needs_no_grad(x, s):
            return fake_quant_(x / s, s, z, self.levels)
        # every token's range is its own min/max, so nothing is clipped: the gradient is the identity everywhere
        # (the clipped-STE's strict inside test would drop it at each token's two end values)
        return x + (fake_quant_(x.detach() / s, s, z, self.levels) - x).detach()
