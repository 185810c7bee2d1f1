"""The ``int8`` backend: the artifact's own integers on PyTorch's x86 int8 kernels (CPU).

Every quantized layer becomes the graph PyTorch's PT2E flow produces after conversion, built directly from
the artifact (never re-calibrated): the input is quantized and dequantized with the layer's learned step size
and zero point (``quantized_decomposed.quantize_per_tensor``/``dequantize_per_tensor``), the weight is an int8
tensor ``codes - zero_point`` with its per-channel scales (``dequantize_per_channel``). ``torch.export`` +
``torch.compile`` with inductor's weight freezing then lower each such pattern to one oneDNN int8 kernel
(``onednn.qconv_pointwise`` / ``qlinear_pointwise``); torchao's x86 passes must be imported for that.

* 2-7-bit weights (and symmetric 8-bit ones) fit int8 exactly. Asymmetric 8-bit codes minus their zero point
  span up to [-255, 255], and oneDNN ignores weight zero points: the weight is stored as ``codes - 128`` and
  ``(128 - z)`` times the input's window sum is added back, the window sum being one extra all-ones output
  channel of the same int8 kernel (exact).
* Shortcut-split layers run as two int8 kernels on the two input halves, summed.
* ``ConvTranspose2d`` (inductor's int8 conv pass cannot lower it) becomes a regular int8 conv over the
  zero-upsampled input with the flipped kernel (exact: zeros quantize to the zero point, i.e. back to zero).
* What the paper keeps FP stays FP: norms, activation functions, attention matmuls and softmax.
* Linear inputs with more than two dimensions (attention projections) are flattened to 2-D: the int8 linear
  pattern only matches a 2-D matmul.

One static export and compile per input signature (batch size, conditioning shapes), cached; compile and run
under ``torch.no_grad()``. Matches the simulated model within float rounding (``round(x * (1/s))`` vs
``round(x / s)`` moves a few activation codes by one step): relative L2 of eps ~3e-3 on digits, the same as
the simulated model's own batch-size-to-batch-size difference.
"""
from __future__ import annotations

import logging
import warnings
import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from torch import nn

from qdiff.errors import ConfigError
from qdiff.models.base import call, unwrap_output
from qdiff.quant.layers import QuantLayer, lowrank_branch, smooth_input
from qdiff.quant.wrap import quant_layers

log = logging.getLogger("qdiff")


def _x86_passes() -> None:
    """torchao's x86 int8 inductor passes register themselves on import (without them nothing is lowered)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401


class DeployedUNetOutput(BaseOutput):
    """``.sample`` (and ``[0]``), like diffusers' UNet outputs."""

    sample: torch.Tensor


#: Without VNNI (AVX2, AVX-512 without VNNI) oneDNN's x86 int8 kernels add uint8 x int8 products in pairs into a
#: saturating int16 (vpmaddubsw): exact only while 255 * (|w1| + |w2|) <= 32767, i.e. |w| <= 64. Measured on an AMD
#: EPYC (Zen 3, AVX2): 8-bit weights gave 14-16 % relative error against the simulated model, 7-bit and 4-bit 0.3-0.5 %.
PAIR_SAFE = 64


def refused_settings(quant) -> list[str]:
    """The settings of a QuantConfig whose arithmetic these int8 patterns cannot express (each layer refuses them
    again when lowered; a run checks them before any work)."""
    out = []
    if quant.act_time_groups > 1 and quant.act_bits < 16:
        out.append(f"timestep-aware activation step sizes (quant.act_time_groups={quant.act_time_groups})")
    if quant.weight_group_size and quant.weight_bits < 16:
        out.append(f"group-wise weight scales (quant.weight_group_size={quant.weight_group_size})")
    if quant.act_dynamic and quant.act_bits < 16:
        out.append("per-token dynamic activation scales (quant.act_dynamic=true)")
    return out


def saturating_pairs() -> bool:
    """Whether this CPU's int8 kernels sum products pairwise in saturating int16 (no AVX-512 VNNI, no AMX)."""
    cpu = getattr(torch, "cpu", None)
    try:
        return not (cpu._is_vnni_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probes: assume the worst, the split below is exact anyway
        return True


def _int8_weight(layer: QuantLayer, i: int, codes: torch.Tensor, out_axis: int) -> dict[str, torch.Tensor]:
    """Part ``i``'s weight as int8 + per-channel scales (+ the zero-point channel of asymmetric 8-bit weights).

    Where the CPU's kernels saturate (:func:`saturating_pairs`) a weight wider than +-64 becomes two int8 kernels,
    ``k = 16 * hi + lo`` with hi in [-8, 7] and lo in [0, 15]: exact, at twice the kernels for that layer.
    """
    wq = layer.wq[i]
    z = wq.zero_point.to(torch.int16).reshape(-1, *([1] * (codes.dim() - 1)))
    k = codes.to(torch.int16) - z
    scale = wq.scale.detach().reshape(-1).float().clone()
    if int(k.min()) >= -128 and int(k.max()) <= 127:
        out = {"int_weight": k, "scale": scale}
    elif out_axis != 0:
        raise ConfigError(f"int8 backend: asymmetric 8-bit weights of {layer.org_type} need quant.weight_symmetric=true")
    else:
        out = {"int_weight": torch.cat([codes.to(torch.int16) - 128, torch.ones_like(k[:1])]),
               "scale": torch.cat([scale, torch.ones(1)]), "zp_channel": scale * (128 - z.reshape(-1)).float()}
    k = out["int_weight"]
    if saturating_pairs() and int(k.abs().max()) > PAIR_SAFE:
        lo = torch.remainder(k, 16)
        out.update(int_weight=torch.div(k - lo, 16, rounding_mode="floor"), int_weight_lo=lo,
                   scale_lo=out["scale"].clone(), scale=out["scale"] * 16)
    return {name: v.to(torch.int8) if name.startswith("int_weight") else v for name, v in out.items()}


class Int8Layer(nn.Module):
    """A QuantLayer as quantize/dequantize + int8-weight patterns (one or two, summed, for a split layer)."""

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        self.org_type, self.split = layer.org_type, layer.split
        self.fn, self.kw = layer.fn, dict(layer.fwd_kwargs)
        self.zero_insert = None
        codes, weight, out_axis = layer.weight_codes(), layer.weight.detach(), layer.out_axis
        if self.org_type == "ConvTranspose2d":
            self._zero_insert_conv(codes.shape[2:])
            codes, weight = (w.transpose(0, 1).flip(2, 3).contiguous() for w in (codes, weight))
            out_axis = 0
        if layer.weight_group:
            raise ConfigError("int8 backend: group-wise weight scales (quant.weight_group_size) need one step size per "
                              "group of input channels, which oneDNN's per-channel int8 kernels cannot apply; use "
                              "backend='simulated'")
        if any(q.dynamic and q.active for q in layer.aq):
            raise ConfigError("int8 backend: per-token dynamic activation scales (quant.act_dynamic) compute a step size "
                              "per token at run time, which the per-tensor int8 patterns inductor lowers cannot "
                              "express; use backend='simulated'")
        sizes = [codes.shape[1]] if not self.split else [self.split, codes.shape[1] - self.split]
        self.acts = []
        for i, (c, w) in enumerate(zip(codes.split(sizes, 1), weight.split(sizes, 1))):
            aq = layer.aq[i]
            if aq.active and aq.scale.dim() > 0:
                raise ConfigError("int8 backend: timestep-aware activation scales (quant.act_time_groups > 1) pick a step "
                                  "size per sample, which PyTorch's per-tensor int8 quantize op cannot express; use "
                                  "backend='simulated'")
            self.acts.append((float(aq.scale), int(aq.zero_point), aq.levels) if aq.active else None)
            tensors = _int8_weight(layer, i, c, out_axis) if layer.wq[i].active else {"fp_weight": w.clone()}
            if "int_weight" in tensors:
                tensors["zeros"] = torch.zeros(tensors["scale"].numel(), dtype=torch.int64)
            for name, value in tensors.items():  # buffers: inductor freezes them into constants
                self.register_buffer(f"{name}{i}", value)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        # transforms (qdiff.quant.transforms): the input divisor and the low-rank branch run in float, as simulated
        if layer.smooth is not None:
            self.register_buffer("smooth", layer.smooth.detach().clone())
        else:
            self.smooth = None
        self.rank = layer.rank
        if self.rank:
            self.register_buffer("lr_down", layer.lr_down.detach().clone())
            self.register_buffer("lr_up", layer.lr_up.detach().clone())

    def _zero_insert_conv(self, k: torch.Size) -> None:
        """A transposed conv as a regular conv over the zero-upsampled input (its weight flipped and transposed)."""
        kw = self.kw
        if kw["groups"] != 1 or tuple(kw["dilation"]) != (1, 1):
            raise ConfigError("int8 backend: ConvTranspose2d with groups or dilation is not supported")
        self.zero_insert = (tuple(kw["stride"]), [(k[d] - 1 - kw["padding"][d], k[d] - 1 - kw["padding"][d]
                                                   + kw["output_padding"][d]) for d in (0, 1)])
        self.fn, self.kw = F.conv2d, {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}

    @property
    def int8_kernels(self) -> int:
        return sum(hasattr(self, f"int_weight{i}") + hasattr(self, f"int_weight_lo{i}") for i in range(len(self.acts)))

    def _input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        if self.acts[i] is None:
            return x
        s, z, top = self.acts[i]
        return qd.dequantize_per_tensor(qd.quantize_per_tensor(x, s, z, 0, top, torch.uint8), s, z, 0, top, torch.uint8)

    def _kernel(self, i: int, x: torch.Tensor, bias: torch.Tensor | None, suffix: str = "") -> torch.Tensor:
        """One int8 pattern: the input's quantize/dequantize, the int8 weight's dequantize, the layer's op."""
        qd = torch.ops.quantized_decomposed
        w = qd.dequantize_per_channel(getattr(self, f"int_weight{suffix}{i}"), getattr(self, f"scale{suffix}{i}"),
                                      getattr(self, f"zeros{i}"), 0, -128, 127, torch.int8)
        return self.fn(self._input(i, x), w, bias, **self.kw)

    def _part(self, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not hasattr(self, f"int_weight{i}"):
            return self.fn(self._input(i, x), getattr(self, f"fp_weight{i}"), bias, **self.kw)
        corr = getattr(self, f"zp_channel{i}", None)
        if corr is not None and bias is not None:
            bias = torch.cat([bias, bias.new_zeros(1)])
        y = self._kernel(i, x, bias)
        if hasattr(self, f"int_weight_lo{i}"):  # a weight split for a saturating CPU: 16 * hi + lo
            y = y + self._kernel(i, x, None, "_lo")
        if corr is None:
            return y
        # asymmetric 8-bit weights: the last output channel is the input's window sum, times (128 - z) * s
        n = corr.numel()
        return y[:, :n] + corr.view(1, n, *([1] * (y.dim() - 2))) * y[:, n:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.zero_insert is not None:
            (sh, sw), ((pt, pb), (pl, pr)) = self.zero_insert
            up = x.new_zeros(x.shape[0], x.shape[1], (x.shape[2] - 1) * sh + 1, (x.shape[3] - 1) * sw + 1)
            up[:, :, ::sh, ::sw] = x
            x = F.pad(up, (pl, pr, pt, pb))
        if self.org_type == "Linear" and x.dim() > 2:
            return self.forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        linear = self.org_type == "Linear"
        if self.smooth is not None:
            x = smooth_input(x, self.smooth, linear)
        if not self.split:
            y = self._part(0, x, self.bias)
        else:
            y = self._part(0, x[:, :self.split], self.bias) + self._part(1, x[:, self.split:], None)
        return y + lowrank_branch(x, self.lr_down, self.lr_up, self.fn, self.kw, linear) if self.rank else y


class _Eps(nn.Module):
    """The network's noise estimate as a plain tensor of positional inputs (what torch.export traces):
    ``(x, t, *cond)`` with the conditioning tensors in the order of ``keys``."""

    def __init__(self, net: nn.Module, keys: list[str] = ()) -> None:
        super().__init__()
        self.net, self.keys = net, list(keys)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        return unwrap_output(call(self.net, x, t, dict(zip(self.keys, cond))))


class CompiledUNet(nn.Module):
    """A network called like the original (``model(x_t, t, **cond)``), exported and compiled once per input
    signature (shapes) with inductor's weight freezing: the int8 backend, and the compiled-FP32 baseline it is
    timed against.

    ``kernels``: int8 kernels inductor produced vs expected, per compiled signature (a shortfall means some
    layer silently ran in float and is logged as a warning).
    """

    def __init__(self, net: nn.Module, compile: bool = True) -> None:
        super().__init__()
        self.net = net
        self.compile = compile
        self.diffusers = hasattr(net, "config")
        self.expected = {"conv": sum(m.int8_kernels for m in net.modules() if isinstance(m, Int8Layer) and m.org_type != "Linear"),
                         "linear": sum(m.int8_kernels for m in net.modules() if isinstance(m, Int8Layer) and m.org_type == "Linear")}
        self._compiled: dict = {}
        self.kernels: dict = {}

    def forward(self, x: torch.Tensor, t, *args, return_dict: bool = True, **kwargs):
        if args:
            raise TypeError("int8 backend: pass conditioning as keyword arguments (e.g. encoder_hidden_states=...)")
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])  # exported with float t
        cond = {k: v for k, v in kwargs.items() if v is not None}
        if not all(isinstance(v, torch.Tensor) for v in cond.values()):
            raise TypeError(f"int8 backend: only tensor keyword arguments are supported, got {sorted(cond)}")
        with torch.no_grad():
            out = self._run(x, t, cond) if self.compile else unwrap_output(call(self.net, x, t, cond))
        if not return_dict:
            return (out,)
        return DeployedUNetOutput(sample=out) if self.diffusers else out

    def _run(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        keys = sorted(cond)
        args = (x, t, *(cond[k] for k in keys))
        key = tuple((tuple(a.shape), a.dtype) for a in args) + tuple(keys)
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compiled[key] = self._compile(args, keys)
        return fn(*args)

    def _compile(self, args: tuple, keys: list[str]):
        """Export for these shapes and compile with inductor directly (no dynamo guards at call time: the
        per-call overhead would be a tenth of this small network's latency)."""
        import torch._inductor.config as inductor_config
        from torch._dynamo.utils import counters
        from torch._inductor.compile_fx import compile_fx

        before = {k: counters["inductor"].get(f"q{k}_weight_prepack_matcher_count", 0) for k in ("conv", "linear")}
        # cpp_wrapper: the compiled graph's kernel launches from C++ instead of a Python wrapper. Measured on the
        # digits UNet, 2 threads (bench_int8_latency.py, interleaved medians): int8 at batch 64 25.6-26.7 ms
        # instead of 27.3-29.1 ms, compiled FP32 unchanged (40-42 ms); batch 256 unchanged within noise.
        cpp_wrapper = args[0].device.type == "cpu"
        with inductor_config.patch(freezing=True, cpp_wrapper=cpp_wrapper), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="To copy construct from a tensor")  # inductor's int8 lowering
            graph = torch.export.export(_Eps(self.net, keys).eval(), args).module()
            fn = compile_fx(graph, list(args))
            fn(*args)
        found = {k: counters["inductor"].get(f"q{k}_weight_prepack_matcher_count", 0) - before[k] for k in before}
        self.kernels[str(tuple(args[0].shape))] = {"int8": found, "expected": self.expected}
        if found != self.expected:
            log.warning("int8 backend: inductor lowered %s int8 kernels, expected %s: the rest runs in float", found, self.expected)
        return fn


def lower_int8(simulated: nn.Module, compile: bool = True) -> CompiledUNet:
    """The simulated network (from the artifact) with every QuantLayer replaced by its int8 pattern."""
    import copy

    if next(simulated.parameters()).device.type != "cpu":
        raise ConfigError("the int8 backend runs PyTorch's x86 (oneDNN) int8 kernels on the CPU; use backend=simulated on a GPU")
    _x86_passes()
    net = copy.deepcopy(simulated)
    for name, layer in quant_layers(net):
        net.set_submodule(name, Int8Layer(layer))
    return CompiledUNet(net.eval(), compile=compile)


def compile_fp(unet: nn.Module) -> CompiledUNet:
    """The FP network through the same export + compile (the baseline a deployed model is timed against)."""
    import copy

    return CompiledUNet(copy.deepcopy(unet).eval())
