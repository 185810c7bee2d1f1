"""Quantization core: quantizer math, STE, layers, wrapping any nn.Module, splits, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qdiff
from qdiff.errors import ConfigError
from qdiff.quant import QuantConfig, QuantLayer, UniformQuantizer, find_concat_splits, quant_layers
from qdiff.quant.quantizer import NotInitializedError
from tiny_unet import TinyUNet


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(bits, symmetric):
    x = torch.linspace(-1.3, 2.1, 5001)
    q = UniformQuantizer(bits, symmetric).init_from(x, "minmax")
    err = (q(x) - x).abs()
    assert err.max() <= q.scale / 2 + 1e-6
    assert len(torch.unique(q(x))) <= 2 ** bits
    assert float(q.scale) == pytest.approx((2.1 + (1.3 if not symmetric else 2.1)) / (2 ** bits - 1), rel=1e-5)


def test_more_bits_means_less_error_and_mse_search_beats_minmax_on_outliers():
    torch.manual_seed(0)
    x = torch.randn(20000)
    x[:5] = 40.0  # outliers: min-max wastes the grid on them
    errs = [((UniformQuantizer(b).init_from(x, "minmax")(x) - x) ** 2).mean() for b in (2, 4, 6, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    mm = ((UniformQuantizer(4).init_from(x, "minmax")(x) - x) ** 2).mean()
    mse = ((UniformQuantizer(4).init_from(x, "mse", p=2.4)(x) - x) ** 2).mean()
    assert mse < 0.6 * mm


def test_channel_wise_and_per_tensor_shapes():
    # channel k is (k + 1) times one shared random filter, so the Lp-optimal steps grow with k whatever the draw
    w = torch.randn(1, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 7).view(6, 1, 1, 1)
    cw = UniformQuantizer(4, channel_axis=0).init_from(w, "mse")
    pt = UniformQuantizer(4).init_from(w, "minmax")
    assert cw.scale.shape == (6, 1, 1, 1) and cw.zero_point.shape == (6, 1, 1, 1)
    assert pt.scale.shape == () and pt.zero_point.shape == ()
    assert (cw.scale.flatten().diff() > 0).all(), "wider channels get larger steps"
    convt = UniformQuantizer(4, channel_axis=1).init_from(torch.randn(3, 5, 4, 4), "minmax")
    assert convt.scale.shape == (1, 5, 1, 1)


def test_ste_gradients_reach_input_and_learnable_scale():
    q = UniformQuantizer(4, learnable_scale=True).init_from(torch.linspace(-1, 1, 100))
    x = torch.tensor([-3.0, -0.5, 0.1, 0.7, 3.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # identity inside the range, clipped outside
    assert q.scale.grad is not None and q.scale.grad != 0


def test_uninitialised_quantizer_refuses_to_run_and_off_bits_are_identity():
    with pytest.raises(NotInitializedError):
        UniformQuantizer(8)(torch.randn(4))
    x = torch.randn(4)
    assert torch.equal(UniformQuantizer(32)(x), x) and torch.equal(UniformQuantizer(16)(x), x)


def test_weights_are_fake_quantized_once_per_state_change():
    layer = QuantLayer(nn.Conv2d(4, 8, 3), 4, 32)
    layer.wq[0].init_from(layer.weight, "minmax")
    calls = []
    h = layer.wq[0].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 4, 8, 8)
    for _ in range(5):
        layer(x)
    assert len(calls) == 1
    layer.wq[0].init_from(layer.weight, "mse")  # a state change
    layer(x)
    assert len(calls) == 2
    h.remove()


def _calib(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 1000, (n,), generator=g)


def test_plain_module_unet_quantizes_runs_and_finds_its_skip_concat():
    torch.manual_seed(0)
    net = TinyUNet().eval()
    x, t = _calib()
    assert find_concat_splits(net, (x[:2], t[:2])) == {"dec.conv1": 8, "dec.skip": 8}
    q = qdiff.quantize(net, QuantConfig(method="linear", weight_bits=4, act_bits=8), (x, t), progress=False)
    layers = dict(quant_layers(q))
    assert {type(m).__name__ for m in net.modules()} >= {"LayerNorm", "ConvTranspose2d", "Sequential"}
    assert {"up", "mid.mlp.0", "time.0", "dec.conv1", "out.2"} <= set(layers)
    assert layers["up"].org_type == "ConvTranspose2d" and layers["dec.conv1"].split == 8
    with torch.no_grad():
        a, b = net(x[:4], t[:4]), q(x[:4], t[:4])
    assert torch.isfinite(b).all() and not torch.equal(a, b)
    assert ((a - b) ** 2).mean() < 0.1 * (a ** 2).mean()
    assert all(not isinstance(m, QuantLayer) for m in net.modules()), "the original model is untouched"


def test_activation_quantizers_are_active_after_init_and_change_outputs():
    from qdiff.quant import act_quantizers

    torch.manual_seed(0)
    net = TinyUNet().eval()
    x, t = _calib()
    w4a32 = qdiff.quantize(net, QuantConfig(method="linear", weight_bits=4, act_bits=32), (x, t), progress=False)
    w4a4 = qdiff.quantize(net, QuantConfig(method="linear", weight_bits=4, act_bits=4), (x, t), progress=False)
    qs = act_quantizers(w4a4)
    assert qs and all(q.active and q._ready for _, q in qs)
    assert not act_quantizers(w4a32)
    with torch.no_grad():
        ref, a, b = net(x[:8], t[:8]), w4a32(x[:8], t[:8]), w4a4(x[:8], t[:8])
    assert ((b - ref) ** 2).mean() > 1.5 * ((a - ref) ** 2).mean(), "4-bit activations must add error"


def test_diffusers_unet_split_detection_finds_exactly_the_up_block_concats():
    from qdiff.models.digits import build_digits_unet

    unet = build_digits_unet().eval()
    splits = find_concat_splits(unet, (torch.randn(1, 1, 16, 16), torch.tensor([10])))
    expected = {f"up_blocks.{b}.resnets.{r}.{c}" for b in range(3) for r in range(2) for c in ("conv1", "conv_shortcut")}
    assert set(splits) == expected
    # the split point is the channel count of the up-path feature
    assert splits["up_blocks.2.resnets.1.conv1"] == 32 and splits["up_blocks.0.resnets.0.conv1"] == 64


def test_layer_policy_first_last_and_overrides():
    net = TinyUNet().eval()
    x, t = _calib(8)
    cfg = QuantConfig(method="linear", weight_bits=4, act_bits=8, first_last_bits=8,
                      overrides=[{"pattern": r"^down\.(conv1|skip)$", "weight_bits": 8, "act_quant": False}])
    q = qdiff.quantize(net, cfg, (x, t), progress=False)
    bits = {n: (m.weight_bits, m.act_bits) for n, m in quant_layers(q)}
    assert bits["time.0"] == (8, 8) and bits["out.2"] == (8, 8), "first and last executed layers"
    assert bits["down.conv1"] == (8, 32) and bits["dec.conv1"] == (4, 8)


def test_attention_matmuls_stay_fp_unless_attn_bits():
    from qdiff.models.digits import build_digits_unet

    unet = build_digits_unet().eval()
    x, t = _calib(8)
    q_fp_attn = qdiff.quantize(unet, QuantConfig(method="linear"), (x, t), progress=False)
    q_attn = qdiff.quantize(unet, QuantConfig(method="linear", attn_bits=6), (x, t), progress=False)
    assert not any(hasattr(m, "matmul_quant") for m in q_fp_attn.modules())
    mq = [m.matmul_quant for m in q_attn.modules() if hasattr(m, "matmul_quant")]
    assert len(mq) == 4 and all(m.q._ready and m.k._ready and m.v._ready for m in mq)
    with torch.no_grad():
        assert not torch.equal(q_fp_attn(x[:2], t[:2]).sample, q_attn(x[:2], t[:2]).sample)


@pytest.mark.parametrize("kwargs, message", [
    ({"weight_bits": 9}, "quant.weight_bits must be an integer in 2..8"),
    ({"weight_bits": 1}, "quant.weight_bits"),
    ({"act_bits": 12}, "quant.act_bits"),
    ({"attn_bits": 0}, "quant.attn_bits"),
    ({"method": "awq"}, "unknown quant.method 'awq'"),
    ({"scale_method": "kl"}, "quant.scale_method"),
    ({"overrides": [{"pattern": "(", "weight_bits": 8}]}, "bad pattern"),
])
def test_bad_quant_settings(kwargs, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        QuantConfig(**kwargs)


def test_quantize_needs_calibration_data():
    with pytest.raises(ConfigError, match="needs calib"):
        qdiff.quantize(TinyUNet(), QuantConfig(method="linear"))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_inference_fake_quant_equals_straight_through_path(bits):
    """Sampling uses a single-allocation path; it must give the training (STE) path's values bit for bit."""
    from qdiff.quant.quantizer import fake_quant

    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 8, 5, 5, generator=g) * 3
    x_before = x.clone()
    scale, zp = torch.tensor(6.0 / (2 ** bits - 1)), torch.tensor(float(2 ** (bits - 1)))
    with torch.no_grad():
        fast = fake_quant(x, scale, zp, bits)
    ste = fake_quant(x.clone().requires_grad_(True), scale, zp, bits)
    assert ste.requires_grad and torch.equal(fast, ste.detach())
    assert torch.equal(x, x_before)  # the input is not modified in place


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_ste_autograd_node_gives_the_composed_expressions_values_and_gradients(bits, per_channel):
    """Training uses one autograd node with the STE/LSQ gradients written out; the composed expression is the reference."""
    from qdiff.quant.quantizer import fake_quant, fake_quant_composed

    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    shape = (6, 1, 1, 1) if per_channel else ()
    scale = torch.full(shape, 6.0 / (2 ** bits - 1), dtype=torch.float64).requires_grad_(True)
    zp = torch.full(shape, float(2 ** (bits - 1)), dtype=torch.float64)
    upstream = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    node = fake_quant(x, scale, zp, bits)
    ref = fake_quant_composed(x, scale, zp, bits)
    assert torch.equal(node, ref) and node.grad_fn is not None and "FakeQuantSTE" in type(node.grad_fn).__name__
    gx, gs = torch.autograd.grad((node * upstream).sum(), (x, scale))
    rx, rs = torch.autograd.grad((ref * upstream).sum(), (x, scale))
    assert gs.shape == scale.shape
    assert torch.allclose(gx, rx, rtol=0, atol=1e-12) and torch.allclose(gs, rs, rtol=1e-10, atol=1e-10)
    # values exactly on the end levels (and beyond) pass no gradient to x, as autograd's clamp does
    edge = torch.tensor([-100.0, (0 - zp.flatten()[0].item()) * scale.flatten()[0].item(), 100.0],
                        dtype=torch.float64, requires_grad=True)
    s0, z0 = scale.detach().flatten()[0], zp.flatten()[0]
    (ge,) = torch.autograd.grad(fake_quant(edge, s0, z0, bits).sum(), edge)
    assert torch.equal(ge, torch.zeros(3, dtype=torch.float64))


def test_split_layer_fast_inference_path_equals_the_quantizer_modules_and_respects_hooks():
    """Without grad, a split layer quantizes both halves straight into one buffer; same values as calling each quantizer."""
    torch.manual_seed(0)
    net = TinyUNet().eval()
    x, t = _calib()
    q = qdiff.quantize(net, QuantConfig(method="linear", weight_bits=4, act_bits=4), (x, t), progress=False)
    layer = dict(quant_layers(q))["dec.conv1"]
    assert layer.split == 8
    inp = torch.randn(3, 16, 6, 6) * 2
    with torch.no_grad():
        fast = layer.quantize_input(inp)
    ref = torch.cat([layer.aq[0](inp[:, :8].clone().requires_grad_(True)),
                     layer.aq[1](inp[:, 8:].clone().requires_grad_(True))], dim=1).detach()
    assert torch.equal(fast, ref)
    seen = []
    h = layer.aq[1].register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape))
    with torch.no_grad():
        layer.quantize_input(inp)
    h.remove()
    assert seen == [torch.Size([3, 8, 6, 6])], "a hooked quantizer must still be called (activation-range init uses hooks)"


class _CatThenOps(nn.Module):
    """Up path: cat([h, skip]) followed by ``+ temb`` (broadcast) or a functional layer_norm before the conv."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.inc = nn.Conv2d(1, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 6, 3, padding=1)
        self.temb = nn.Linear(1, 10)
        self.dec = nn.Conv2d(10, 1, 3, padding=1)

    def forward(self, x, t):
        skip = self.inc(x)
        h = torch.cat([self.mid(skip), skip], dim=1)
        if self.mode == "add":
            h = h + self.temb(t.float()[:, None] / 1000)[:, :, None, None]
        else:
            h = torch.nn.functional.layer_norm(h, h.shape[1:])
        return self.dec(torch.relu(h))


@pytest.mark.parametrize("mode", ["add", "layer_norm"])
def test_split_detection_follows_the_concat_through_elementwise_ops_and_functional_norms(mode, caplog):
    import logging

    net = _CatThenOps(mode).eval()
    x, t = _calib(8)
    assert find_concat_splits(net, (x, t)) == {"dec": 6}
    with caplog.at_level(logging.INFO, logger="qdiff"):
        q = qdiff.quantize(net, QuantConfig(method="linear", weight_bits=4, act_bits=8), (x, t), progress=False)
    assert dict(quant_layers(q))["dec"].split == 6 and "1 layer(s) split (1 detected, 0 named): dec@6" in caplog.text


def test_split_points_by_name_and_a_warning_when_none_is_found(caplog):
    import logging

    class NoConcat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 1, 3, padding=1)

        def forward(self, x, t):
            return self.b(self.a(x))

    net, (x, t) = NoConcat().eval(), _calib(8)
    with caplog.at_level(logging.INFO, logger="qdiff"):
        q = qdiff.quantize(net, QuantConfig(method="linear"), (x, t), progress=False)
    assert "no concatenation feeding a convolution was found" in caplog.text and not dict(quant_layers(q))["b"].split
    q = qdiff.quantize(net, QuantConfig(method="linear", split_layers={"b": 2}), (x, t), progress=False)
    assert dict(quant_layers(q))["b"].split == 2
    assert not dict(quant_layers(qdiff.quantize(net, QuantConfig(method="linear", split=False, split_layers={"b": 2}),
                                                 (x, t), progress=False)))["b"].split
    with pytest.raises(ConfigError, match="no quantizable layer named 'c'"):
        qdiff.quantize(net, QuantConfig(method="linear", split_layers={"c": 2}), (x, t), progress=False)
    with pytest.raises(ConfigError, match="bad split 9"):
        qdiff.quantize(net, QuantConfig(method="linear", split_layers={"b": 9}), (x, t), progress=False)
    with pytest.raises(ConfigError, match="quant.split_layers must map"):
        QuantConfig(split_layers={"b": 0})
