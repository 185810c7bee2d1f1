"""The paper's four models and the transformers DiT-XL/2 and PixArt-Σ: architectures, random-init smoke tests (the
transformers sample as their diffusers pipelines do), original-checkpoint conversion, errors.

CPU only and offline: full-size architectures are built on the meta device (parameter counts only); forward
passes run on width-reduced variants.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F

from qdiff.models import DiffusionModel, ModelConfig, ModelConfigError, WeightsNotFoundError, load_model
from qdiff.models import ldm_convert as lc
from qdiff.models.base import eps as model_eps
from qdiff.models import paper
from qdiff.models.prompts import load_captions, sample_prompts
from qdiff.models.reference import load_reference_images

COCO_TSV = "/work/shared/data/coco2014_val_captions.tsv"

# Exact parameter counts of the full-size networks, computed here and cross-checked against published numbers:
# - ddim_cifar10: DDPM paper (Ho et al. 2020), CIFAR-10 model "35.7M parameters".
# - ldm_bedroom:  LDM paper (Rombach et al. 2022) hyperparameter table, LDM-4 LSUN-Bedrooms "274M".
# - ldm_church:   LDM paper, LDM-8 LSUN-Churches "294M" (294.97M; the paper truncates).
# - sd14:         CompVis/stable-diffusion-v1-4 UNet2DConditionModel, 859,520,964.
# - dit_xl2_256:  DiTTransformer2DModel as diffusers builds it, with the timestep/class embedder copied into each of the
#                 28 blocks; the DiT paper's 675M is the original model's count (DIT_PAPER_PARAMS below).
# - pixart_sigma: PixArtTransformer2DModel (1024 px, no micro-conditions), the PixArt-Σ paper's "0.6B".
UNET_PARAMS = {
    "ddim_cifar10": 35_746_307,
    "ldm_bedroom": 274_056_163,
    "ldm_church": 294_966_916,
    "sd14": 859_520_964,
    "dit_xl2_256": 749_826_464,
    "pixart_sigma": 610_856_096,
}
# First stages: VQ-f4 (latent-diffusion vq-f4, 55.3M) and KL-f8 (kl-f8 = SD v1 VAE = sd-vae-ft-ema = SDXL's VAE
# architecture, 83,653,863). Text encoders: SD's is CLIP ViT-L/14's text tower (123,060,480), PixArt-Σ's T5 v1.1 XXL's
# encoder (4,762,310,656).
FIRST_STAGE_PARAMS = {"ldm_bedroom": 55_322_782, "ldm_church": 83_653_863, "sd14": 83_653_863,
                      "dit_xl2_256": 83_653_863, "pixart_sigma": 83_653_863}
SD_TEXT_PARAMS = 123_060_480
TEXT_PARAMS = {"sd14": SD_TEXT_PARAMS, "pixart_sigma": 4_762_310_656}
# DiT-XL/2 as the DiT paper counts it (the original model: one timestep/class embedder, and its fixed sin-cos position
# embedding stored as a parameter).
DIT_PAPER_PARAMS = 675_129_632

_VAE_TINY = dict(
    vae_block_out_channels=[32, 32], vae_down_block_types=["DownEncoderBlock2D"] * 2,
    vae_up_block_types=["UpDecoderBlock2D"] * 2, vae_layers_per_block=1,
)
# Width-reduced variants that keep each model's block pattern (attention placement, up/down-sampling kind,
# scale-shift norm, several heads per attention layer).
TINY = {
    "ddim_cifar10": dict(
        block_out_channels=[32, 64], layers_per_block=1, sample_size=8,
        down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    ),
    "ldm_bedroom": dict(
        block_out_channels=[32, 64, 96], layers_per_block=1, sample_size=8,
        down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        vae_num_vq_embeddings=64, **_VAE_TINY,
    ),
    "ldm_church": dict(
        block_out_channels=[32, 64, 64], layers_per_block=1, sample_size=8,
        down_block_types=["AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        up_block_types=["ResnetUpsampleBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"], **_VAE_TINY,
    ),
    "sd14": dict(
        block_out_channels=[32, 64], layers_per_block=1, sample_size=8, cross_attention_dim=32,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        text_hidden_size=32, text_intermediate_size=64, text_num_hidden_layers=2, text_num_attention_heads=4,
        text_projection_dim=32, text_vocab_size=128, **_VAE_TINY,
    ),
    # two blocks, 2 heads of 16; learned sigma, adaLN-Zero over 1000 classes + null class
    "dit_xl2_256": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, sample_size=8, **_VAE_TINY),
    # two blocks, adaLN-single, cross-attention to a 2-layer T5 encoder (d_model 32) through the caption projection
    "pixart_sigma": dict(
        num_layers=2, num_attention_heads=2, attention_head_dim=16, sample_size=8, cross_attention_dim=32,
        caption_channels=32, text_d_model=32, text_d_kv=8, text_d_ff=64, text_num_layers=2, text_num_heads=4,
        text_vocab_size=128, text_relative_attention_num_buckets=8, **_VAE_TINY,
    ),
}
#: The UNet models (original checkpoints converted here); the transformers load from diffusers folders only.
UNETS = [n for n in TINY if paper.PAPER_MODELS[n].unet_class.startswith("UNet")]
TRANSFORMERS = [n for n in TINY if n not in UNETS]


@functools.lru_cache(maxsize=None)
def tiny(name: str, **kw) -> DiffusionModel:
    """Width-reduced random-init model, built once per test session (tests only read it)."""
    torch.manual_seed(0)
    return load_model(ModelConfig(name=name, random_init=True, arch=TINY[name], **kw))


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """These tensors are tiny: one thread avoids spin-wait slowdowns on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cond(model: DiffusionModel, n: int) -> dict:
    if model.is_class_conditional:
        return {"class_labels": torch.tensor([207, 1000])[:n]}  # a class and the null class
    if not model.is_text_guided:
        return {}
    return model.text_conditioning(["a red bus on a street", "two cats"][:n])


def _single_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert e.value.__cause__ is None, "error should not chain a traceback"
    assert e.value.__context__ is None or e.value.__suppress_context__, "error should not chain a traceback"
    return msg


# --- architectures ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(UNET_PARAMS))
def test_full_size_architectures_match_official_parameter_counts(name):
    spec = paper.PAPER_MODELS[name]
    with torch.device("meta"):
        unet = paper.build_unet(name)
        assert paper.n_params(unet) == UNET_PARAMS[name]
        if name in FIRST_STAGE_PARAMS:
            assert paper.n_params(paper.build_first_stage(name)) == FIRST_STAGE_PARAMS[name]
        if name in TEXT_PARAMS:
            assert paper.n_params(paper.build_text_encoder(spec.text, spec.text_kind)) == TEXT_PARAMS[name]
    if name == "dit_xl2_256":  # diffusers copies the timestep MLP and class table into each block's adaLN-Zero
        emb = paper.n_params(unet.transformer_blocks[0].norm1.emb)
        assert emb == (256 * 1152 + 1152) + (1152 * 1152 + 1152) + 1001 * 1152
        assert UNET_PARAMS[name] - 27 * emb + unet.pos_embed.pos_embed.numel() == DIT_PAPER_PARAMS
        assert unet.pos_embed.pos_embed.shape == (1, 256, 1152)  # 16x16 patches of 2x2 latent pixels
    if name == "pixart_sigma":
        assert unet.pos_embed.pos_embed.shape == (1, 4096, 1152) and unet.caption_projection.linear_1.in_features == 4096


def test_church_unet_uses_eight_heads_at_every_width():
    from diffusers.models.attention_processor import Attention

    with torch.device("meta"):
        unet = paper.build_unet("ldm_church")
    attns = [m for m in unet.modules() if isinstance(m, Attention)]
    assert attns and {m.heads for m in attns} == {8}
    assert {m.to_q.out_features // m.heads for m in attns} == {24, 48, 96}


@pytest.mark.parametrize("name", list(UNET_PARAMS))
def test_model_config_files_pick_the_papers_sampler_and_calibration(name):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={name}"])
    model_cfg = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    assert model_cfg.name == name and not model_cfg.random_init and model_cfg.arch == {}
    p = paper.PAPER_MODELS[name].paper
    assert (cfg.sampler.name, cfg.sampler.steps, cfg.sampler.eta) == (p["sampler"], p["steps"], p["eta"])
    assert (cfg.calib.c, cfg.calib.n) == (p["calib"]["c"], p["calib"]["n"])
    assert p["calib"]["N"] == p["calib"]["n"] * p["calib"]["T"] // p["calib"]["c"] and p["calib"]["T"] == p["steps"]
    assert model_cfg.guidance_scale == p.get("guidance_scale", 1.0)
    assert model_cfg.source == paper.PAPER_MODELS[name].default_source


# --- random-init smoke tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TINY))
def test_width_reduced_random_init_predicts_noise_and_decodes(name):
    model = tiny(name)
    c, h, w = model.sample_shape
    assert (h, w) == (8, 8)
    x = torch.randn(2, c, h, w)
    t = torch.tensor([1, 999])
    with torch.no_grad():
        eps = model_eps(model.unet, x, t, _cond(model, 2))
    learned_sigma = name in TRANSFORMERS  # eps and the variance: 2C channels, the sampler takes the first C
    assert eps.shape == (2, 2 * c if learned_sigma else c, h, w) and torch.isfinite(eps).all()
    img = model.decode(x)
    side = 16 if model.is_latent else 8
    assert img.shape == (2, 3, side, side) and img.abs().max() <= 1
    assert model.meta["source"] == "random_init" and model.meta["n_params_unet"] == paper.n_params(model.unet)
    assert model.eval_kind == "inception" and model.real_images is None
    sched = model.scheduler_config
    assert sched["num_train_timesteps"] == 1000 and sched["prediction_type"] == "epsilon"
    assert model.is_latent == (name != "ddim_cifar10") and model.is_text_guided == (name in ("sd14", "pixart_sigma"))
    assert model.num_classes == (1000 if name == "dit_xl2_256" else None)


def test_paper_schedules_and_latent_scales():
    assert tiny("ldm_bedroom").scheduler_config["beta_end"] == 0.0195
    assert tiny("ldm_church").scheduler_config["beta_end"] == 0.0155
    sd = tiny("sd14")
    assert sd.latent_scale == 0.18215 and sd.guidance_scale == 7.5
    assert sd.scheduler_config["beta_schedule"] == "scaled_linear" and sd.scheduler_config["beta_start"] == 0.00085
    assert sd.meta["paper"]["calib"] == {"T": 50, "c": 2, "n": 256, "N": 6400}
    dit = tiny("dit_xl2_256")
    assert dit.latent_scale == 0.18215 and dit.guidance_scale == 7.5  # ModelConfig's default; the config file sets 1.5
    assert dit.scheduler_config["beta_schedule"] == "linear" and dit.scheduler_config["set_alpha_to_one"] is True
    assert dit.meta["resolution"] == 16 and dit.meta["paper"]["calib"] == {"T": 50, "c": 5, "n": 256, "N": 2560}
    pixart = tiny("pixart_sigma")
    assert pixart.latent_scale == 0.13025 and pixart.scheduler_config["beta_end"] == 0.02
    assert pixart.meta["paper"]["sampler"] == "dpm_solver" and pixart.meta["paper"]["guidance_scale"] == 4.5


def test_sd14_tiny_text_path_encodes_real_coco_captions():
    captions = load_captions(COCO_TSV)
    prompts = sample_prompts(captions, 3, seed=0)
    model = tiny("sd14")
    emb = model.encode_prompts(prompts)
    assert emb.shape == (3, 77, 32) and emb.dtype == torch.float32
    empty = model.encode_prompts([""] * 3)
    assert not torch.allclose(emb, empty)
    x = torch.randn(3, *model.sample_shape)
    with torch.no_grad():
        eps = model_eps(model.unet, x, torch.tensor([10, 500, 990]), {"encoder_hidden_states": emb})
    assert eps.shape == x.shape


def test_pixart_sigma_prompts_give_t5_states_and_mask_as_its_pipeline_encodes_them():
    from diffusers import PixArtSigmaPipeline

    model = tiny("pixart_sigma")
    prompts = sample_prompts(load_captions(COCO_TSV), 3, seed=0)
    cond = model.encode_prompts(prompts)
    assert set(cond) == {"encoder_hidden_states", "encoder_attention_mask"}
    emb, mask = cond["encoder_hidden_states"], cond["encoder_attention_mask"]
    assert emb.shape == (3, 300, 32) and mask.shape == (3, 300) and mask.dtype == torch.long
    assert mask.sum(1).tolist() == [len(p.strip()) + 1 for p in prompts]  # one token per character, and </s>
    pipe = PixArtSigmaPipeline(tokenizer=model.encode_prompts.tokenizer, text_encoder=model.text_encoder, vae=model.vae,
                               transformer=model.unet, scheduler=None)
    with torch.no_grad():
        want = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt="", device="cpu",
                                  clean_caption=False, max_sequence_length=300)
    assert torch.equal(emb, want[0]) and torch.equal(mask, want[1])
    empty = model.text_conditioning([""] * 3)
    assert torch.equal(empty["encoder_hidden_states"], want[2]) and torch.equal(empty["encoder_attention_mask"], want[3])


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_random_init_transformer_samples_what_its_diffusers_pipeline_samples(name):
    """Same noise, scheduler and guidance: qdiff's sampler and DiTPipeline / PixArtSigmaPipeline give the same images
    (class labels and the null class 1000; T5 states, their mask and the empty prompt; learned sigma dropped)."""
    from diffusers import DiTPipeline, PixArtSigmaPipeline

    from qdiff.sampling import SamplerConfig, generate
    from qdiff.sampling.samplers import build_scheduler

    model = tiny(name)
    model = dataclasses.replace(model, guidance_scale=paper.PAPER_MODELS[name].paper["guidance_scale"])
    sampler = SamplerConfig(name=model.meta["paper"]["sampler"], steps=3, batch_size=2)
    sched = build_scheduler(sampler, model.scheduler_config)
    g = torch.Generator().manual_seed(5)
    if name == "dit_xl2_256":
        labels = [207, 360]
        ours = generate(model, model.unet, sampler, 2, seed=5, prompts=labels, progress=False)
        pipe = DiTPipeline(transformer=model.unet, vae=model.vae, scheduler=sched)
        theirs = pipe(class_labels=labels, guidance_scale=model.guidance_scale, generator=g, num_inference_steps=3,
                      output_type="np").images
    else:
        prompts = ["A red bus on a street.", "Two cats on a sofa"]
        ours = generate(model, model.unet, sampler, 2, seed=5, prompts=prompts, progress=False)
        pipe = PixArtSigmaPipeline(tokenizer=model.encode_prompts.tokenizer, text_encoder=model.text_encoder,
                                   vae=model.vae, transformer=model.unet, scheduler=sched)
        theirs = pipe(prompt=prompts, guidance_scale=model.guidance_scale, generator=g, num_inference_steps=3,
                      height=16, width=16, use_resolution_binning=False, clean_caption=False, max_sequence_length=300,
                      output_type="np").images
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2)
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert torch.allclose(ours / 2 + 0.5, theirs, atol=1e-5), (ours / 2 + 0.5 - theirs).abs().max()


# --- original checkpoint conversion ---------------------------------------------------------------------------

def _assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", UNETS)
def test_diffusers_original_round_trip_is_exact(name):
    model = tiny(name)
    layout = "ddpm" if name == "ddim_cifar10" else "ldm"
    sd = model.unet.state_dict()
    orig = lc.diffusers_to_original(sd, model.unet, layout=layout)
    if layout == "ldm":
        assert all(k.startswith(lc.UNET_PREFIX) for k in orig)
    _assert_same_state(lc.original_to_diffusers(orig, model.unet, layout=layout), sd)
    if model.vae is not None:
        vsd = model.vae.state_dict()
        vorig = lc.diffusers_to_original(vsd, model.vae)
        assert "first_stage_model.encoder.down.0.block.0.norm1.weight" in vorig
        _assert_same_state(lc.original_to_diffusers(vorig, model.vae), vsd)


def _reference_ldm_unet(p: dict, x: torch.Tensor, t: torch.Tensor, *, ch: int, mult: list[int], n_res: int,
                        attn_ds: set[int], heads, scale_shift: bool, updown: bool) -> torch.Tensor:
    """latent-diffusion's openaimodel.UNetModel forward, written from its definition over ORIGINAL keys."""
    def gn(h, key):
        return F.group_norm(h, 32, p[key + ".weight"], p[key + ".bias"], eps=1e-5)

    def conv(h, key, **kw):
        return F.conv2d(h, p[key + ".weight"], p[key + ".bias"], **kw)

    def res(h, emb, key, up=False, down=False):
        a = F.silu(gn(h, key + ".in_layers.0"))
        if up:
            a, h = F.interpolate(a, scale_factor=2, mode="nearest"), F.interpolate(h, scale_factor=2, mode="nearest")
        if down:
            a, h = F.avg_pool2d(a, 2), F.avg_pool2d(h, 2)
        a = conv(a, key + ".in_layers.2", padding=1)
        e = F.linear(F.silu(emb), p[key + ".emb_layers.1.weight"], p[key + ".emb_layers.1.bias"])[..., None, None]
        if scale_shift:
            scale, shift = e.chunk(2, dim=1)
            a = gn(a, key + ".out_layers.0") * (1 + scale) + shift
        else:
            a = gn(a + e, key + ".out_layers.0")
        a = conv(F.silu(a), key + ".out_layers.3", padding=1)
        skip = conv(h, key + ".skip_connection") if key + ".skip_connection.weight" in p else h
        return skip + a

    def attn(h, key):  # AttentionBlock + QKVAttentionLegacy: heads split before q/k/v
        b, c, hh, ww = h.shape
        flat = h.reshape(b, c, -1)
        qkv = F.conv1d(gn(flat, key + ".norm"), p[key + ".qkv.weight"], p[key + ".qkv.bias"])
        n = heads(c)
        q, k, v = qkv.reshape(b * n, 3 * (c // n), -1).split(c // n, dim=1)
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(c // n), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
        return (flat + F.conv1d(a, p[key + ".proj_out.weight"], p[key + ".proj_out.bias"])).reshape(b, c, hh, ww)

    half = ch // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = F.linear(F.silu(F.linear(temb, p["time_embed.0.weight"], p["time_embed.0.bias"])),
                   p["time_embed.2.weight"], p["time_embed.2.bias"])

    h = conv(x, "input_blocks.0.0", padding=1)
    hs, k, ds = [h], 1, 1
    for level in range(len(mult)):
        for _ in range(n_res):
            h = res(h, emb, f"input_blocks.{k}.0")
            if ds in attn_ds:
                h = attn(h, f"input_blocks.{k}.1")
            hs.append(h)
            k += 1
        if level != len(mult) - 1:
            h = res(h, emb, f"input_blocks.{k}.0", down=True) if updown else conv(h, f"input_blocks.{k}.0.op", stride=2, padding=1)
            hs.append(h)
            k, ds = k + 1, ds * 2
    h = res(attn(res(h, emb, "middle_block.0"), "middle_block.1"), emb, "middle_block.2")
    k = 0
    for level in reversed(range(len(mult))):
        for i in range(n_res + 1):
            h = res(torch.cat([h, hs.pop()], dim=1), emb, f"output_blocks.{k}.0")
            n = 1
            if ds in attn_ds:
                h, n = attn(h, f"output_blocks.{k}.1"), 2
            if level and i == n_res:
                key = f"output_blocks.{k}.{n}"
                h = res(h, emb, key, up=True) if updown else conv(F.interpolate(h, scale_factor=2, mode="nearest"), key + ".conv", padding=1)
                ds //= 2
            k += 1
    return conv(F.silu(gn(h, "out.0")), "out.2", padding=1)


@pytest.mark.parametrize("name", ["ldm_bedroom", "ldm_church"])
def test_converted_unet_computes_what_the_original_architecture_computes(name):
    """Guards the semantics (head-interleaved qkv, scale-shift norm, resblock up/down), not just the names."""
    model = tiny(name)
    orig = lc.diffusers_to_original(model.unet.state_dict(), model.unet, prefix="")
    x, t = torch.randn(2, *model.sample_shape), torch.tensor([3, 871])
    if name == "ldm_bedroom":  # mult [1,2,3] of 32; attention at 2,4 (32 channels per head); conv resampling
        kw = dict(ch=32, mult=[1, 2, 3], attn_ds={2, 4}, heads=lambda c: c // 32, scale_shift=False, updown=False)
    else:  # mult [1,2,2] of 32; attention at 1,2; 8 heads; scale-shift norm; resblock up/down
        kw = dict(ch=32, mult=[1, 2, 2], attn_ds={1, 2}, heads=lambda c: 8, scale_shift=True, updown=True)
    with torch.no_grad():
        want = _reference_ldm_unet(orig, x, t, n_res=1, **kw)
        got = model_eps(model.unet, x, t)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


def _reference_ddpm_unet(p: dict, x: torch.Tensor, t: torch.Tensor, *, ch: int, mult: list[int], n_res: int,
                         attn_levels: set[int]) -> torch.Tensor:
    """The DDIM repository's ``models/diffusion.py`` Model forward, written from its definition over its keys."""
    def gn(h, key):
        return F.group_norm(h, 32, p[key + ".weight"], p[key + ".bias"], eps=1e-6)

    def conv(h, key, **kw):
        return F.conv2d(h, p[key + ".weight"], p[key + ".bias"], **kw)

    def res(h, temb, key):
        a = conv(F.silu(gn(h, key + ".norm1")), key + ".conv1", padding=1)
        a = a + F.linear(F.silu(temb), p[key + ".temb_proj.weight"], p[key + ".temb_proj.bias"])[..., None, None]
        a = conv(F.silu(gn(a, key + ".norm2")), key + ".conv2", padding=1)
        return (conv(h, key + ".nin_shortcut") if key + ".nin_shortcut.weight" in p else h) + a

    def attn(h, key):  # single head, q/k/v as 1x1 convs
        b, c, hh, ww = h.shape
        n = gn(h, key + ".norm")
        q, k, v = (conv(n, f"{key}.{m}").reshape(b, c, -1) for m in "qkv")
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c ** -0.5, dim=-1)
        return h + conv(torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww), key + ".proj_out")

    half = ch // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None]
    temb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    temb = F.linear(F.silu(F.linear(temb, p["temb.dense.0.weight"], p["temb.dense.0.bias"])),
                    p["temb.dense.1.weight"], p["temb.dense.1.bias"])
    hs = [conv(x, "conv_in", padding=1)]
    for lvl in range(len(mult)):
        for j in range(n_res):
            h = res(hs[-1], temb, f"down.{lvl}.block.{j}")
            hs.append(attn(h, f"down.{lvl}.attn.{j}") if lvl in attn_levels else h)
        if lvl != len(mult) - 1:
            hs.append(conv(F.pad(hs[-1], (0, 1, 0, 1)), f"down.{lvl}.downsample.conv", stride=2))
    h = res(attn(res(hs[-1], temb, "mid.block_1"), "mid.attn_1"), temb, "mid.block_2")
    for lvl in reversed(range(len(mult))):
        for j in range(n_res + 1):
            h = res(torch.cat([h, hs.pop()], dim=1), temb, f"up.{lvl}.block.{j}")
            if lvl in attn_levels:
                h = attn(h, f"up.{lvl}.attn.{j}")
        if lvl != 0:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"up.{lvl}.upsample.conv", padding=1)
    return conv(F.silu(gn(h, "norm_out")), "conv_out", padding=1)


def test_converted_cifar_unet_computes_what_the_ddim_repo_model_computes():
    model = tiny("ddim_cifar10")
    orig = lc.diffusers_to_original(model.unet.state_dict(), model.unet, layout="ddpm")
    x, t = torch.randn(2, *model.sample_shape), torch.tensor([0, 640])
    with torch.no_grad():
        want = _reference_ddpm_unet(orig, x, t, ch=32, mult=[1, 2], n_res=1, attn_levels={1})
        got = model_eps(model.unet, x, t)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


def _reference_first_stage_decode(p: dict, z: torch.Tensor, *, n_levels: int, n_res: int, vq: bool) -> torch.Tensor:
    """latent-diffusion's first-stage decode (VQModelInterface / AutoencoderKL) over ORIGINAL keys."""
    def gn(h, key):
        return F.group_norm(h, 32, p[key + ".weight"], p[key + ".bias"], eps=1e-6)

    def conv(h, key, **kw):
        return F.conv2d(h, p[key + ".weight"], p[key + ".bias"], **kw)

    def res(h, key):
        a = conv(F.silu(gn(h, key + ".norm1")), key + ".conv1", padding=1)
        a = conv(F.silu(gn(a, key + ".norm2")), key + ".conv2", padding=1)
        return (conv(h, key + ".nin_shortcut") if key + ".nin_shortcut.weight" in p else h) + a

    def attn(h, key):
        b, c, hh, ww = h.shape
        n = gn(h, key + ".norm")
        q, k, v = (conv(n, f"{key}.{m}").reshape(b, c, -1) for m in "qkv")
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c ** -0.5, dim=-1)
        return h + conv(torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww), key + ".proj_out")

    if vq:  # nearest codebook entry per position
        book = p["quantize.embedding.weight"]
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        z = book[torch.cdist(flat, book).argmin(1)].reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    h = conv(conv(z, "post_quant_conv"), "decoder.conv_in", padding=1)
    h = res(attn(res(h, "decoder.mid.block_1"), "decoder.mid.attn_1"), "decoder.mid.block_2")
    for lvl in reversed(range(n_levels)):
        for j in range(n_res + 1):
            h = res(h, f"decoder.up.{lvl}.block.{j}")
        if lvl != 0:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up.{lvl}.upsample.conv", padding=1)
    return conv(F.silu(gn(h, "decoder.norm_out")), "decoder.conv_out", padding=1)


@pytest.mark.parametrize("name", ["ldm_bedroom", "ldm_church"])
def test_converted_first_stage_decodes_like_the_original(name):
    model = tiny(name)
    orig = lc.diffusers_to_original(model.vae.state_dict(), model.vae, prefix="")
    z = torch.randn(2, *model.sample_shape)
    with torch.no_grad():
        want = _reference_first_stage_decode(orig, z, n_levels=2, n_res=1, vq=name == "ldm_bedroom")
        got = model.vae.decode(z).sample
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


def _original_file(model: DiffusionModel, path: Path, fmt: str) -> None:
    name = model.name
    if name == "ddim_cifar10":
        sd = lc.diffusers_to_original(model.unet.state_dict(), model.unet, layout="ddpm")
    else:
        sd = lc.original_checkpoint(model.unet, model.vae, scale_factor=0.3 if name == "ldm_church" else None)
    if name == "sd14":  # CompVis checkpoints hold the HF CLIPTextModel under cond_stage_model.transformer.text_model.
        text = model.encode_prompts.text_encoder.state_dict()
        sd.update({lc.TEXT_ENCODER_PREFIX + "text_model." + k: v for k, v in text.items()})
    if fmt == "ckpt":
        torch.save({"state_dict": sd, "global_step": 123}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
@pytest.mark.parametrize("name", UNETS)
def test_original_checkpoint_file_reproduces_outputs(name, fmt, tmp_path):
    ref = tiny(name)
    path = tmp_path / f"model.{fmt}"
    _original_file(ref, path, fmt)
    if name == "sd14":  # original SD checkpoints carry no vocabulary: a tokenizer/ folder beside the file
        paper.char_tokenizer().save_pretrained(tmp_path / "tokenizer")
    loaded = load_model(ModelConfig(name=name, source=str(path), arch=TINY[name]))
    assert loaded.meta["format"].startswith("original")
    x, t = torch.randn(2, *ref.sample_shape), torch.tensor([7, 700])
    with torch.no_grad():
        assert torch.equal(model_eps(ref.unet, x, t, _cond(ref, 2)), model_eps(loaded.unet, x, t, _cond(loaded, 2)))
    if name == "ldm_church":  # LDM-8 scales latents by the factor stored in its checkpoint
        assert loaded.latent_scale == pytest.approx(0.3)
        assert torch.equal(ref.vae.decode(x / 0.3).sample.clamp(-1, 1), loaded.decode(x))
    elif ref.vae is not None:
        assert torch.equal(ref.decode(x), loaded.decode(x))
    if name == "sd14":
        prompts = ["a horse on a beach", ""]
        assert torch.equal(ref.encode_prompts(prompts), loaded.encode_prompts(prompts))


def clip_tokenizer_from_captions(folder: Path, captions: list[str], n_merges: int = 40) -> "CLIPTokenizer":  # noqa: F821
    """A real CLIPTokenizer (byte-level BPE) whose vocab.json/merges.txt are generated here from captions."""
    import collections

    from transformers import CLIPTokenizer

    keep = [b for r in (("!", "~"), ("\u00a1", "\u00ac"), ("\u00ae", "\u00ff")) for b in range(ord(r[0]), ord(r[1]) + 1)]
    extra = [b for b in range(256) if b not in keep]
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    pairs = collections.Counter()
    for cap in captions[:500]:
        for word in cap.lower().split():
            sym = list(word[:-1]) + [word[-1] + "</w>"]
            pairs.update(zip(sym, sym[1:]))
    merges = [f"{a} {b}" for (a, b), _ in pairs.most_common(n_merges) if a in vocab and b in vocab]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


@pytest.mark.parametrize("name", list(TINY))
def test_diffusers_folder_source_loads_the_same_model(name, tmp_path):
    ref = tiny(name)
    if name == "ddim_cifar10":  # google/ddpm-cifar10-32 keeps the UNet at the repository root
        ref.unet.save_pretrained(tmp_path)
    else:  # DiTPipeline and PixArtSigmaPipeline folders keep theirs in transformer/
        ref.unet.save_pretrained(tmp_path / ("transformer" if name in TRANSFORMERS else "unet"))
        (tmp_path / "model_index.json").write_text("{}")
    if ref.vae is not None:  # LDMPipeline calls the first stage "vqvae", the others "vae"
        ref.vae.save_pretrained(tmp_path / ("vqvae" if name.startswith("ldm_") else "vae"))
    if name == "pixart_sigma":  # T5 encoder and tokenizer as save_pretrained writes them
        ref.text_encoder.save_pretrained(tmp_path / "text_encoder")
        ref.encode_prompts.tokenizer.save_pretrained(tmp_path / "tokenizer")
    x, t = torch.randn(2, *ref.sample_shape), torch.tensor([7, 700])
    if name == "sd14":
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        tok = clip_tokenizer_from_captions(tmp_path / "bpe", load_captions(COCO_TSV))
        tok.save_pretrained(tmp_path / "tokenizer")
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            projection_dim=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ))
        text.save_pretrained(tmp_path / "text_encoder")
    loaded = load_model(ModelConfig(name=name, source=str(tmp_path), guidance_scale=1.5))
    assert loaded.meta["format"] == "diffusers"
    assert loaded.num_classes == ref.num_classes and loaded.guidance_scale == (1.5 if ref.is_conditional else 1.0)
    cond = _cond(ref, 2)
    with torch.no_grad():
        assert torch.equal(model_eps(ref.unet, x, t, cond), model_eps(loaded.unet, x, t, cond))
    if ref.vae is not None:
        assert torch.equal(ref.vae.decode(x).sample, loaded.vae.decode(x).sample)
    if name == "ldm_church":  # the head count is not part of the diffusers config; the loader restores it
        from diffusers.models.attention_processor import Attention

        assert {m.heads for m in loaded.unet.modules() if isinstance(m, Attention)} == {8}
    if name == "sd14":
        assert isinstance(loaded.encode_prompts.tokenizer, CLIPTokenizer)
        emb = loaded.encode_prompts(sample_prompts(load_captions(COCO_TSV), 4, seed=1))
        assert emb.shape == (4, 77, 32)
    if name == "pixart_sigma":
        prompts = sample_prompts(load_captions(COCO_TSV), 4, seed=1)
        want, got = ref.encode_prompts(prompts), loaded.encode_prompts(prompts)
        assert all(torch.equal(want[k], got[k]) for k in want) and set(got) == set(want)


def test_ema_weights_are_preferred(tmp_path):
    ref = tiny("ldm_bedroom")
    sd = lc.original_checkpoint(ref.unet, ref.vae)
    for k in [k for k in sd if k.startswith(lc.UNET_PREFIX)]:
        sd[lc.EMA_PREFIX + k.split(".", 1)[1].replace(".", "")] = sd[k] * 0.5
    torch.save({"state_dict": sd}, tmp_path / "m.ckpt")
    loaded = load_model(ModelConfig(name="ldm_bedroom", source=str(tmp_path / "m.ckpt"), arch=TINY["ldm_bedroom"]))
    assert loaded.meta["ema"] is True
    assert torch.equal(loaded.unet.conv_in.weight, ref.unet.conv_in.weight * 0.5)


def test_conversion_errors_name_the_first_offending_key():
    model = tiny("ldm_church")
    orig = lc.diffusers_to_original(model.unet.state_dict(), model.unet)
    missing = dict(orig)
    missing.pop("model.diffusion_model.input_blocks.1.1.qkv.weight")
    with pytest.raises(ModelConfigError, match=r"missing key 'model\.diffusion_model\.input_blocks\.1\.1\.qkv\.weight'") as e:
        lc.original_to_diffusers(missing, model.unet)
    _single_line(e)
    extra = dict(orig, **{"model.diffusion_model.input_blocks.99.0.weight": torch.zeros(1)})
    with pytest.raises(ModelConfigError, match="unexpected key 'model.diffusion_model.input_blocks.99.0.weight'"):
        lc.original_to_diffusers(extra, model.unet)
    bad = dict(orig, **{"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 1, 1)})
    with pytest.raises(ModelConfigError, match=r"'model\.diffusion_model\.out\.2\.weight' has shape \[4, 32, 1, 1\]"):
        lc.original_to_diffusers(bad, model.unet)
    with pytest.raises(ModelConfigError, match="missing key"):  # a full-size checkpoint against a tiny arch and back
        lc.original_to_diffusers(orig, tiny("ldm_bedroom").unet)


# --- sources and errors ---------------------------------------------------------------------------------------

def test_offline_hub_id_fails_fast_with_one_line_pointing_at_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as e:
        load_model(ModelConfig(name="sd14", source="qdiff-tests/stable-diffusion-v1-4"))
    msg = _single_line(e)
    assert msg.startswith("sd14: cannot load 'qdiff-tests/stable-diffusion-v1-4' (no network or not cached)")
    assert "model.source=/path/to/stable-diffusion-v1-4" in msg and "model.random_init=true" in msg
    with pytest.raises(WeightsNotFoundError, match="model.source=") as e:
        load_model(ModelConfig(name="ddim_cifar10", source="qdiff-tests/ddpm-cifar10-32"))
    _single_line(e)
    # the transformers' default hub ids; the pre-run check looks for the cached transformer/config.json
    from qdiff.models.paper import sources

    asked = []
    monkeypatch.setattr(sources, "hub_cached", lambda repo, subfolders: asked.append((repo, subfolders)) or False)
    for name, repo in (("dit_xl2_256", "facebook/DiT-XL-2-256"), ("pixart_sigma", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")):
        for attempt in (paper.check_source, load_model):
            with pytest.raises(WeightsNotFoundError) as e:
                attempt(ModelConfig(name=name))
            msg = _single_line(e)
            assert msg.startswith(f"{name}: cannot load '{repo}' (no network or not cached)"), msg
            assert f"model.source=/path/to/{repo.split('/')[1]}" in msg and "model.random_init=true" in msg
            assert paper.PAPER_MODELS[name].convert_script in msg  # how to make a diffusers folder of the original
    assert asked == [("facebook/DiT-XL-2-256", ("transformer",)), ("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", ("transformer",))]


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_original_checkpoints_are_refused_naming_the_conversion_script(name, tmp_path):
    ckpt = tmp_path / ("DiT-XL-2-256x256.pt" if name == "dit_xl2_256" else "PixArt-Sigma-XL-2-1024-MS.pth")
    torch.save({"x_embedder.proj.weight": torch.zeros(1)}, ckpt)
    not_diffusers = tmp_path / "folder"
    not_diffusers.mkdir()
    for source in (ckpt, not_diffusers):
        for attempt in (paper.check_source, load_model):
            with pytest.raises(ModelConfigError) as e:
                attempt(ModelConfig(name=name, source=str(source)))
            msg = _single_line(e)
            assert msg.startswith(f"{name}: ") and f"diffusers' {paper.PAPER_MODELS[name].convert_script}" in msg, msg


@pytest.mark.parametrize("name,url", [("ldm_bedroom", paper.LSUN_BEDROOMS_URL), ("ldm_church", paper.LSUN_CHURCHES_URL)])
def test_lsun_models_without_source_say_where_the_weights_are(name, url):
    with pytest.raises(WeightsNotFoundError) as e:
        load_model(ModelConfig(name=name))
    msg = _single_line(e)
    assert url in msg and "model.source=" in msg


def test_missing_local_source_and_unknown_arch_key(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_model(ModelConfig(name="ldm_church", source=str(tmp_path / "nope.ckpt")))
    with pytest.raises(ModelConfigError, match="unknown model.arch key 'channels'") as e:
        load_model(ModelConfig(name="ldm_church", random_init=True, arch={"channels": 3}))
    _single_line(e)
    with pytest.raises(ModelConfigError, match="has 2 levels but down_block_types has 4"):
        load_model(ModelConfig(name="ldm_bedroom", random_init=True, arch={"block_out_channels": [32, 64]}))
    with pytest.raises(ModelConfigError, match="cross_attention_dim .* must equal text_hidden_size"):
        load_model(ModelConfig(name="sd14", random_init=True, arch={**TINY["sd14"], "cross_attention_dim": 64}))
    with pytest.raises(ModelConfigError, match=r"accepted: <DiTTransformer2DModel kwarg>, vae_<first-stage kwarg>$") as e:
        load_model(ModelConfig(name="dit_xl2_256", random_init=True, arch={"text_d_model": 32}))
    _single_line(e)
    with pytest.raises(ModelConfigError, match=r"accepted: .*text_<T5Config field>"):
        load_model(ModelConfig(name="pixart_sigma", random_init=True, arch={"text_hidden_size": 32}))
    with pytest.raises(ModelConfigError, match=r"caption_channels \(32\) must equal text_d_model \(64\)"):
        load_model(ModelConfig(name="pixart_sigma", random_init=True, arch={**TINY["pixart_sigma"], "text_d_model": 64}))
    with pytest.raises(ModelConfigError, match=r"cross_attention_dim \(32\) must equal num_attention_heads x attention_head_dim \(64\)"):
        load_model(ModelConfig(name="pixart_sigma", random_init=True, arch={**TINY["pixart_sigma"], "attention_head_dim": 32}))
    with pytest.raises(ModelConfigError, match="sample_size 9 is not divisible by patch_size 2"):
        load_model(ModelConfig(name="dit_xl2_256", random_init=True, arch={**TINY["dit_xl2_256"], "sample_size": 9}))


def test_corrupt_and_pickled_checkpoints_give_one_clear_error(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint" * 64)
    truncated = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 64)
    for f in (garbage, truncated, bad_st):
        with pytest.raises(ModelConfigError, match="corrupt or truncated") as e:
            load_model(ModelConfig(name="ldm_church", source=str(f), arch=TINY["ldm_church"]))
        _single_line(e)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "hparams": argparse.Namespace(lr=1.0)}, pickled)
    with pytest.raises(ModelConfigError, match=r"pickled Python objects \(argparse\.Namespace\).*safetensors") as e:
        load_model(ModelConfig(name="ldm_church", source=str(pickled)))
    _single_line(e)


# --- captions and reference images -----------------------------------------------------------------------------

def test_load_captions_from_tsv_txt_and_coco_json(tmp_path):
    tsv = load_captions(COCO_TSV)
    assert len(tsv) == 5000 and tsv[0] == "A city at night with people walking around."
    txt = tmp_path / "c.txt"
    txt.write_text("  a cat  \n\n a dog\n")
    assert load_captions(txt) == ["a cat", "a dog"]
    js = tmp_path / "captions_val2014.json"
    js.write_text(json.dumps({"images": [], "annotations": [{"image_id": 1, "caption": " A bus. "}, {"caption": ""}]}))
    assert load_captions(js) == ["A bus."]
    assert sample_prompts(tsv, 5, seed=3) == sample_prompts(tsv, 5, seed=3) != sample_prompts(tsv, 5, seed=4)
    assert len(sample_prompts(["x", "y"], 5, seed=0)) == 5


def test_load_captions_errors(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_captions(tmp_path / "missing.tsv")
    no_col = tmp_path / "c.tsv"
    no_col.write_text("id\ttext\n1\thello\n")
    with pytest.raises(ModelConfigError, match="no 'caption' column") as e:
        load_captions(no_col)
    _single_line(e)
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        load_captions(bad)
    empty = tmp_path / "e.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ModelConfigError, match="no captions"):
        load_captions(empty)


def test_reference_images_from_folder_and_npz(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 30), (255 * (i % 2), 128, 0)).save(tmp_path / f"{i}.png")
    x = load_reference_images(tmp_path, 16)
    assert x.shape == (3, 3, 16, 16) and x.min() >= -1 and x.max() <= 1 and x[1, 0].mean() > 0.9
    import numpy as np

    np.savez(tmp_path / "ref.npz", np.full((2, 8, 8, 3), 255, dtype=np.uint8))
    assert torch.allclose(load_reference_images(tmp_path / "ref.npz", 8), torch.ones(2, 3, 8, 8))
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_reference_images(tmp_path / "none", 8)
    model = load_model(ModelConfig(name="ddim_cifar10", random_init=True, arch=TINY["ddim_cifar10"], reference=str(tmp_path / "ref.npz")))
    assert model.real_images().shape == (2, 3, 8, 8)
