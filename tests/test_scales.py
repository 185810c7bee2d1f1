"""Finer step sizes than the paper's: group-wise weight scales (``quant.weight_group_size``) and per-token dynamic
activation scales (``quant.act_dynamic``) — their arithmetic, reconstruction with them, the artifact round trip and
the int8 backend's refusal."""
from __future__ import annotations

import pytest
import torch

import qdiff
from qdiff.deploy import export, load_deployed
from qdiff.errors import ConfigError
from qdiff.models import eps
from qdiff.quant import QuantConfig, quant_layers
from qdiff.quant.quantizer import DynamicTokenQuantizer, UniformQuantizer, fake_quant, scale_zero_point
from tiny_unet import TinyUNet


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 1000, (n,), generator=g)


def test_group_wise_scales_quantize_each_group_of_input_channels_on_its_own_range():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, 3, 3, generator=g)
    w[:, 5] *= 20                                     # one outlier input channel, in the second group of four
    per_channel = UniformQuantizer(4, channel_axis=0).init_from(w)
    grouped = UniformQuantizer(4, channel_axis=0, group_size=4).init_from(w)
    assert grouped.scale.shape == (12, 1) and per_channel.scale.shape == (6, 1, 1, 1)
    out = grouped(w)
    for o in range(6):
        for k in range(2):                            # group (o, k) = input channels 4k..4k+3: min-max on itself alone
            part = w[o, 4 * k:4 * k + 4]
            s, z = scale_zero_point(part.min(), part.max(), 4, False)
            assert torch.equal(grouped.scale[2 * o + k, 0], s) and torch.equal(out[o, 4 * k:4 * k + 4], fake_quant(part, s, z, 4))
    # the outlier only coarsens its own group: the first group's error is below the per-channel quantizer's
    assert ((out - w)[:, :4].abs().max()) < ((per_channel(w) - w)[:, :4].abs().max())
    codes = grouped.integer(w)
    assert codes.shape == w.shape and int(codes.max()) <= 15
    with pytest.raises(ValueError, match="multiple of the group size"):
        UniformQuantizer(4, channel_axis=0, group_size=3).init_from(w)


def test_per_token_dynamic_scales_use_each_tokens_own_range():
    g = torch.Generator().manual_seed(0)
    lin = DynamicTokenQuantizer(4, token_axis=-1)
    x = torch.randn(3, 5, 16, generator=g) * torch.tensor([1.0, 10.0, 0.1]).view(3, 1, 1)
    y = lin(x)
    for i in range(3):
        for j in range(5):
            s, z = scale_zero_point(x[i, j].min(), x[i, j].max(), 4, False)
            assert torch.equal(y[i, j], fake_quant(x[i, j], s, z, 4))
    conv = DynamicTokenQuantizer(4, token_axis=1)
    x = torch.randn(2, 8, 4, 4, generator=g)
    y = conv(x)
    s, z = scale_zero_point(x[1, :, 2, 3].min(), x[1, :, 2, 3].max(), 4, False)
    assert torch.equal(y[1, :, 2, 3], fake_quant(x[1, :, 2, 3], s, z, 4))
    # no state to calibrate; the input's gradient passes straight through inside the range
    assert not any(p.requires_grad for p in conv.parameters())
    x.requires_grad_(True)
    conv(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("cfg", [
    QuantConfig(method="qdiff", weight_bits=4, act_bits=4, weight_group_size=4),
    QuantConfig(method="qdiff", weight_bits=4, act_bits=4, act_dynamic=True),
    QuantConfig(method="qdiff", weight_bits=4, act_bits=4, weight_group_size=4, act_dynamic=True, smooth=0.5, lowrank=2),
], ids=["groupwise", "dynamic", "all"])
def test_reconstructed_models_with_finer_scales_round_trip_bit_exact_and_int8_refuses_them(tmp_path, cfg):
    net = TinyUNet().eval()
    x, t = _data()
    recon = qdiff.ReconConfig(weight_iters=8, act_iters=4, batch_size=8)
    q = qdiff.quantize(net, cfg, (x, t), recon, progress=False)
    layers = dict(quant_layers(q))
    grouped = {n for n, m in layers.items() if m.weight_group}
    if cfg.weight_group_size:
        # every Conv2d/Linear whose input channels (per split part) are a multiple of 4 and more than 4; not the
        # 1-channel input conv, not the transposed conv
        assert grouped and "inc" not in grouped and "up" not in grouped and "dec.conv1" in grouped
        assert all(m.wq[0].scale.shape[0] == m.weight.shape[0] * (m.weight_parts()[0].shape[1] // 4) for n, m in layers.items()
                   if n in grouped)
    else:
        assert not grouped
    dynamic = [m for m in layers.values() if m.aq[0].dynamic]
    assert bool(dynamic) == cfg.act_dynamic
    if cfg.act_dynamic:  # nothing calibrated for layer inputs: a sample's output does not depend on the batch
        assert all(m.act_bits < 16 for m in dynamic)
        with torch.no_grad():
            assert torch.allclose(eps(q, x[:4], t[:4])[1], eps(q, x[1:2], t[1:2])[0], atol=1e-5)
    assert q.qdiff_report["sanity"]["rel_l2_vs_fp"] < 1.0
    assert set(cfg.transforms) >= ({"wg4"} if cfg.weight_group_size else set()) | ({"dyn"} if cfg.act_dynamic else set())
    export(q, tmp_path / "a")
    sim = load_deployed(tmp_path / "a")
    assert [(s.weight_group, s.act_dynamic) for s in sim.quant_specs] == [(s.weight_group, s.act_dynamic) for s in q.quant_specs]
    with torch.no_grad():
        assert torch.equal(eps(sim, x, t), eps(q, x, t))
    with pytest.raises(ConfigError, match="group-wise weight scales|per-token dynamic"):
        load_deployed(tmp_path / "a", backend="int8")


@pytest.mark.parametrize("bad", [{"weight_group_size": -1}, {"weight_group_size": 2.5}, {"weight_group_size": True},
                                 {"act_dynamic": "yes"}, {"act_dynamic": True, "act_time_groups": 4}])
def test_bad_scale_settings_are_one_clear_error(bad):
    with pytest.raises(ConfigError, match="quant.weight_group_size|quant.act_dynamic"):
        QuantConfig(method="qdiff", **bad)


def test_fp_drops_the_finer_scales_and_a_run_refuses_them_on_int8_before_any_work(compose_cfg):
    from qdiff.spec import build_spec

    assert QuantConfig(method="fp", weight_group_size=32, act_dynamic=True).transforms == []
    spec = build_spec(compose_cfg("model=digits", "quant=w4a8", "quant.weight_group_size=16", "quant.act_dynamic=true"))
    assert spec.quant.transforms == ["wg16", "dyn"]
    for setting, what in (("quant.weight_group_size=16", "group-wise"), ("quant.act_dynamic=true", "per-token"),
                          ("quant.act_time_groups=4", "timestep-aware")):
        with pytest.raises(ConfigError, match=f"deploy.backend=int8 cannot run {what}"):
            build_spec(compose_cfg("model=digits", "quant=w4a8", setting, "deploy=int8"))
