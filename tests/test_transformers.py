"""Transformer backbones through the whole stack: DiT, PixArt-Σ, SD3 and FLUX pipelines (tiny, random, offline)
quantized, sampled, saved and loaded; their blocks as reconstruction units; the conditioning path's precision; the
embedded digits DiT through the CLI; the int8 backend on a DiT."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import qdiff
from qdiff.errors import ConfigError
from qdiff.quant import QuantConfig, QuantLayer
from qdiff.recon import ReconConfig
from qdiff.testing import CALL_KWARGS, tiny_pipeline

W4A8 = QuantConfig(method="qdiff", weight_bits=4, act_bits=8)
SHORT = ReconConfig.preset("cpu", weight_iters=8, act_iters=2, batch_size=4, probe_samples=2)
#: The blocks each pipeline's transformer is reconstructed by.
BLOCKS = {"dit": {"BasicTransformerBlock"}, "pixart_sigma": {"BasicTransformerBlock"}, "sd3": {"JointTransformerBlock"},
          "flux": {"FluxTransformerBlock", "FluxSingleTransformerBlock"}}


@pytest.fixture(autouse=True)
def _one_thread(_cpu_threads):
    torch.set_num_threads(1)


def _conditioning(kind: str) -> tuple[dict, dict]:
    """(what conditions the trajectories, the rest of the tiny pipeline's call arguments)."""
    call = dict(CALL_KWARGS[kind])
    cond = {k: call.pop(k) for k in ("prompt", "class_labels") if k in call}
    call.pop("guidance_scale", None)
    return cond, call


def _sample(pipe, kind: str) -> np.ndarray:
    cond, call = _conditioning(kind)
    out = pipe(**cond, **call, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    return np.asarray(out.images)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dit", "pixart_sigma", "sd3", "flux"])
def test_quantize_pipeline_quantizes_the_transformer_samples_saves_and_loads(kind, tmp_path):
    pipe = tiny_pipeline(kind)
    fp = _sample(pipe, kind)
    cond, call = _conditioning(kind)
    prompts = cond.get("prompt")
    out = qdiff.quantize_pipeline(pipe, W4A8, calib=qdiff.CalibConfig(T=4, c=2, n=2, batch_size=2), recon=SHORT,
                                  prompts=prompts, class_labels=cond.get("class_labels"), call_kwargs=call,
                                  progress=False)
    assert out is pipe and sum(isinstance(m, QuantLayer) for m in pipe.transformer.modules()) > 10
    report = pipe.transformer.qdiff_report
    cal = report["calibration"]
    assert cal["source"] == "pipeline" and cal["T"] == 4 and cal["scheduler"] == type(pipe.scheduler).__name__
    # both guidance branches are inputs where the pipeline batches them (FLUX distils guidance into an embedding)
    assert cal["rows_per_step"] == (2 if kind == "flux" else 4) and cal["N"] == 2 * cal["rows_per_step"]
    assert {u["module_type"] for u in report["units"] if u["kind"] == "block"} == BLOCKS[kind]
    if kind == "flux":
        assert {"img_ids", "txt_ids"} <= set(cal["constants"])      # FLUX's position ids, stored once
    q = _sample(pipe, kind)
    assert q.shape == fp.shape and np.isfinite(q).all() and not np.array_equal(q, fp)
    sizes = qdiff.save_pipeline(pipe, tmp_path / "saved")
    # packed linears; what stays FP (norms, positional and label embeddings: DiT's 1001-row class tables) weighs
    # more in these width-32 networks than in real ones
    assert sizes["ratio_to_fp32"] < 0.75 and (tmp_path / "saved" / "transformer" / "deploy.json").is_file()
    loaded = qdiff.load_pipeline(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(_sample(loaded, kind), q)            # the simulated backend is the calibrated model


def test_transformer_pipelines_say_what_they_need_in_one_line():
    pipe = tiny_pipeline("pixart_sigma")
    _, call = _conditioning("pixart_sigma")
    with pytest.raises(ConfigError, match=r"needs one prompt per calibration trajectory, 2; got 1"):
        qdiff.quantize_pipeline(pipe, W4A8, calib=qdiff.CalibConfig(T=4, c=2, n=2), prompts=["a cat"], call_kwargs=call,
                                progress=False)
    with pytest.raises(ConfigError, match="is class-conditional; give class_labels"):
        qdiff.quantize_pipeline(tiny_pipeline("dit"), W4A8, calib=qdiff.CalibConfig(T=4, c=2, n=2), prompts=["a", "b"],
                                progress=False)
    with pytest.raises(ConfigError, match="calib.mode=t0 is not available for transformer pipelines"):
        qdiff.quantize_pipeline(tiny_pipeline("dit"), W4A8, calib=qdiff.CalibConfig(T=4, c=2, n=2, mode="t0"),
                                progress=False)


def test_attention_matmuls_follow_attn_bits_where_the_processor_is_the_default_and_are_refused_elsewhere():
    from qdiff.quant.attention import install_attention_quant

    dit = tiny_pipeline("dit").transformer
    assert len(install_attention_quant(dit, 8, False)) == 2               # DiT: diffusers' default attention
    for kind in ("sd3", "flux"):
        with pytest.raises(ConfigError, match="quant.attn_bits: .* is not supported"):
            install_attention_quant(tiny_pipeline(kind).transformer, 8, False)


def test_conditioning_path_is_an_explicit_logged_choice(caplog):
    from qdiff.quant.wrap import conditioning_layers

    dit = tiny_pipeline("dit").transformer
    cond = conditioning_layers(dit)
    assert "proj_out_1" in cond and "transformer_blocks.0.norm1.linear" in cond             # adaLN modulation
    assert "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1" in cond            # the timestep embedding
    assert not any(".attn1." in n or ".ff." in n for n in cond)
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([10, 300, 600, 900])
    y = torch.tensor([1, 2, 3, 1000])
    with caplog.at_level(logging.INFO, logger="qdiff"):
        q = qdiff.quantize(dit, QuantConfig(method="linear", weight_bits=4, act_bits=8, cond_bits=8),
                           (x, t, {"class_labels": y}), progress=False)
    assert any("conditioning path" in r.message and "quant.cond_bits=8" in r.message for r in caplog.records)
    bits = {s.name: (s.weight_bits, s.act_bits) for s in q.quant_specs}
    assert all(bits[n] == (8, 8) for n in cond) and bits["transformer_blocks.0.attn1.to_q"] == (4, 8)


def test_learned_sigma_outputs_give_the_sampler_their_noise_half():
    from qdiff.sampling.samplers import noise_part

    x = torch.randn(2, 4, 8, 8)
    both = torch.randn(2, 8, 8, 8)
    assert torch.equal(noise_part(both, x), both[:, :4]) and torch.equal(noise_part(x, x), x)


def test_keyword_convention_for_transformers_that_take_timestep_later():
    from qdiff.models.base import call

    class Late(torch.nn.Module):
        def forward(self, hidden_states, encoder_hidden_states=None, timestep=None):
            return hidden_states * 0 + timestep.view(-1, 1)

    class Plain(torch.nn.Module):
        def forward(self, x, t, y=None):
            return x * 0 + t.view(-1, 1)

    x, t = torch.zeros(2, 3), torch.tensor([1.0, 2.0])
    assert torch.equal(call(Late(), x, t, {"encoder_hidden_states": x}), torch.tensor([[1.0] * 3, [2.0] * 3]))
    assert torch.equal(call(Plain(), x, t), torch.tensor([[1.0] * 3, [2.0] * 3]))


@pytest.mark.slow
def test_digits_dit_runs_the_whole_pipeline_through_the_cli_config(compose_cfg):
    from conftest import TINY
    from qdiff.run import run

    cfg = compose_cfg(*TINY, "model=digits_dit", "model.random_init=true", "eval.grid_linear=false",
                      "recon.probe_samples=4")
    m, objects = run(cfg)
    assert m["model"] == "digits_dit" and np.isfinite(m["fid"]) and np.isfinite(m["fp"]["fid"])
    cal = m["calibration"]
    assert cal["N"] == 2 * 4 * 5                       # n=4 trajectories x 5 kept steps, both guidance branches
    units = m["reconstruction"]["units"]
    assert sum(u["module_type"] == "BasicTransformerBlock" for u in units) == 6
    assert m["quant_layers"]["conditioning_path"]["n_layers"] == 19
    assert objects["samples"].shape == (32, 1, 16, 16)


@pytest.mark.slow
def test_int8_backend_runs_every_linear_of_a_dit_on_int8_kernels(tmp_path):
    from qdiff.models import eps

    dit = tiny_pipeline("dit").transformer
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g)
    y = torch.tensor([1, 2, 3, 4, 1000, 1000, 1000, 1000])
    q = qdiff.quantize(dit, QuantConfig(method="linear", weight_bits=4, act_bits=8), (x, t, {"class_labels": y}),
                       progress=False)
    qdiff.export(q, tmp_path / "dit")
    int8 = qdiff.load_deployed(tmp_path / "dit", backend="int8")
    with torch.no_grad():
        ref = eps(q, x, t, {"class_labels": y})
        out = eps(int8, x, t, {"class_labels": y})
    assert float((out - ref).norm() / ref.norm()) < 0.02
    kernels = next(iter(int8.kernels.values()))
    n_linear = sum(1 for s in q.quant_specs if s.type == "Linear")
    assert kernels["int8"] == kernels["expected"] and kernels["expected"]["linear"] == n_linear


def test_the_output_bias_match_maps_a_transformers_patch_outputs_onto_sample_channels():
    from qdiff.recon.output import bias_channels

    assert bias_channels(4, 4).tolist() == [0, 1, 2, 3]                         # a conv: one bias per channel
    assert bias_channels(4, 1, period=1).tolist() == [0, 0, 0, 0]               # digits DiT: 2x2 patch, 1 channel
    # learned sigma (8 output channels for 4 sample channels), 2x2 patch: the variance half feeds no channel
    assert bias_channels(32, 4, period=8).tolist()[:8] == [0, 1, 2, 3, -1, -1, -1, -1]
    assert bias_channels(6, 4, period=4) is None
