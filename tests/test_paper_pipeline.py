"""The paper's four models and the transformers DiT-XL/2 and PixArt-Σ through the real pipeline, offline: width-reduced random-init variants end to end,
full-size split/block detection on the meta device, the paper's layer exceptions and experiment configs,
text-guided evaluation (CLIP score, prompt grid), disk-streamed reconstruction, mixed precision, offline errors.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch


from qdiff.errors import ConfigError
from qdiff.run import run
from qdiff.quant import QuantLayer
from qdiff.spec import build_spec

COCO_TSV = "/work/shared/data/coco2014_val_captions.tsv"
PAPER_PROMPTS = ["A puppy wearing a hat.", "Cluttered house in the woods in anime oil painting style."]

_VAE = dict(vae_block_out_channels=[32, 32], vae_down_block_types=["DownEncoderBlock2D"] * 2,
            vae_up_block_types=["UpDecoderBlock2D"] * 2, vae_layers_per_block=1)
# Two-level, width-reduced variants that keep each model's block pattern (attention placement, resnet
# up/down-sampling of LDM-8, cross-attention transformer blocks of SD).
ARCH = {
    "ddim_cifar10": dict(block_out_channels=[32, 64], layers_per_block=1, sample_size=8,
                         down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"]),
    "ldm_bedroom": dict(block_out_channels=[32, 64], layers_per_block=1, sample_size=8,
                        down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
                        vae_num_vq_embeddings=64, **_VAE),
    "ldm_church": dict(block_out_channels=[32, 64], layers_per_block=1, sample_size=8,
                       down_block_types=["AttnDownBlock2D", "DownBlock2D"],
                       up_block_types=["ResnetUpsampleBlock2D", "AttnUpBlock2D"], **_VAE),
    "sd14": dict(block_out_channels=[32, 64], layers_per_block=1, sample_size=8, cross_attention_dim=32,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                 text_hidden_size=32, text_intermediate_size=64, text_num_hidden_layers=2, text_num_attention_heads=4,
                 text_projection_dim=32, text_vocab_size=128, **_VAE),
    "dit_xl2_256": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, sample_size=8, **_VAE),
    "pixart_sigma": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, sample_size=8, cross_attention_dim=32,
                         caption_channels=32, text_d_model=32, text_d_kv=8, text_d_ff=64, text_num_layers=2,
                         text_num_heads=4, text_vocab_size=128, text_relative_attention_num_buckets=8, **_VAE),
}
LATENT_CHANNELS = {"ddim_cifar10": 3, "ldm_bedroom": 3, "ldm_church": 4, "sd14": 4, "dit_xl2_256": 4, "pixart_sigma": 4}
BLOCKS = {"ddim_cifar10": {"ResnetBlock2D", "Attention"}, "ldm_bedroom": {"ResnetBlock2D", "Attention"},
          "ldm_church": {"ResnetBlock2D", "Attention"}, "sd14": {"ResnetBlock2D", "BasicTransformerBlock"},
          "dit_xl2_256": {"BasicTransformerBlock"}, "pixart_sigma": {"BasicTransformerBlock"}}
TRANSFORMERS = ("dit_xl2_256", "pixart_sigma")
TEXT = ("sd14", "pixart_sigma")

# Tiny sampler / calibration / reconstruction: T=4 steps, c=2 -> 2 kept steps, n=4 -> 8 calibration entries.
SMALL = ["logger=none", "eval.fid=false", "eval.isc=false", "eval.n_samples=4", "eval.isc_splits=2", "eval.analysis=false",
         "eval.prompts_grid_n=1", "sampler.steps=4", "calib.n=4", "calib.c=2", "recon.weight_iters=2", "recon.act_iters=1",
         "recon.batch_size=4"]


def _hydra(v) -> str:
    """A Python value as a Hydra override value."""
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_hydra(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_hydra(x) for x in v) + "]"
    return str(v)


def _model_overrides(name: str) -> list[str]:
    out = [f"model={name}", "model.random_init=true", f"model.arch={_hydra(ARCH[name])}"]
    return out + ([f"model.prompts={COCO_TSV}"] if name in TEXT else [])


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random-init CLIP model + processor saved like a downloaded one (a local eval.clip_model folder)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root = tmp_path_factory.mktemp("clip")
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs + [256 + i for i in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    chars = [chr(c) for c in cs]                     # GPT-2/CLIP byte-to-unicode alphabet
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root)
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image, tokenizer=tok).save_pretrained(root)
    return root


# --- end to end ---------------------------------------------------------------------------------------------------

# sd14 (CLIP text encoder, CLIP score, cross-attention blocks) takes ~3x the others: slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "sd14" else n for n in ARCH])
def test_paper_model_quantizes_and_samples_end_to_end(name, compose_cfg, tiny_clip):
    extra = [f"eval.clip_model={tiny_clip}"] if name in TEXT else []
    cfg = compose_cfg(*_model_overrides(name), *SMALL, "quant=w4a8", *extra)
    metrics, objects = run(cfg)
    spec, model, calib = objects["spec"], objects["model"], objects["calib"]
    out = Path(metrics["output_dir"])

    # report
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["model"] == name and on_disk["quant"] == "W4A8" and on_disk["method"] == "qdiff"
    assert on_disk["model_meta"]["source"] == "random_init" and on_disk["device"] == str(spec.device)
    assert set(on_disk["cost"]["seconds"]) >= {"load", "calib_data", "quantize", "reconstruct", "sample", "evaluate"}
    assert on_disk["calibration"] == {**on_disk["calibration"], "T": 4, "c": 2, "n": 4, "entries": 8, "mode": "uniform"}
    assert "fp" in on_disk and (out / "samples.png").stat().st_size > 0 and (out / "quantized_unet").is_dir()

    # calibration data: the UNet's inputs (latents for LDM/SD), streamed from disk
    c = LATENT_CHANNELS[name]
    assert model.sample_shape == (c, 8, 8)
    assert isinstance(calib.x, np.memmap) and calib.x.shape == (8, c, 8, 8)
    x, t, cond = calib.get([0, 1])
    assert x.shape == (2, c, 8, 8) and t.shape == (2,)

    # only the UNet is quantized; first stage and text encoder stay full precision
    qunet = objects["qunet"]
    n_quant = sum(isinstance(m, QuantLayer) for m in qunet.modules())
    assert n_quant == metrics["quant_layers"]["n_layers"] > 0
    assert not any(isinstance(m, QuantLayer) for m in model.unet.modules()), "the FP UNet is left untouched"
    for part in (model.vae, model.text_encoder):
        if part is not None:
            assert not any(isinstance(m, QuantLayer) for m in part.modules())
            assert all(p.dtype == torch.float32 for p in part.parameters())
    assert model.is_latent == (name != "ddim_cifar10")

    # shortcut splits (UNets: at the up path's skip concatenations; transformers have none) and reconstruction blocks
    # were found, and reconstruction ran
    splits = metrics["quant_layers"]["split_layers"]
    assert (not splits) if name in TRANSFORMERS else (splits and all(k.startswith("up_blocks.") for k in splits))
    rec = metrics["reconstruction"]
    kinds = Counter(u["module_type"] for u in rec["units"] if u["kind"] == "block")
    assert set(kinds) == BLOCKS[name], kinds
    assert sum(u["n_layers"] for u in rec["units"]) == n_quant
    weights = [s for s in rec["steps"] if s["step"].startswith("weights:")]
    assert weights and all(s["hard_fraction"] is not None for s in weights)
    assert any(s["step"] == "act_init" for s in rec["steps"])

    # samples are decoded images
    side = 16 if model.is_latent else 8
    assert objects["samples"].shape == (4, 3, side, side) and torch.isfinite(objects["samples"]).all()

    if name in TEXT:
        _check_text_guided(metrics, model, calib, spec, out)
    elif name == "dit_xl2_256":  # class labels 0, 1, ... with the null class 1000 as guidance's unconditional branch
        assert model.guidance_scale == spec.model.guidance_scale == 1.5 and "clip_score" not in metrics
        assert len(calib) == 2 * calib.n_entries and set(cond) == {"class_labels"}
        n = spec.calib.n
        assert calib.get(range(n))[2]["class_labels"].tolist() == list(range(n))
        assert calib.get(range(calib.n_entries, calib.n_entries + n))[2]["class_labels"].tolist() == [1000] * n
    else:
        assert "clip_score" not in metrics and cond == {} and len(calib) == calib.n_entries


def _check_text_guided(metrics: dict, model, calib, spec, out: Path) -> None:
    from qdiff.models.prompts import load_captions, sample_prompts

    # calibration: real COCO captions, the model's guidance, conditional and unconditional branch
    guidance = {"sd14": 7.5, "pixart_sigma": 4.5}[model.name]
    assert model.guidance_scale == spec.model.guidance_scale == guidance and calib.meta["text_guided"]
    prompts = sample_prompts(load_captions(COCO_TSV), spec.calib.n, spec.calib.seed)
    assert set(prompts) <= set(load_captions(COCO_TSV))
    n, entries = spec.calib.n, calib.n_entries
    length = 300 if model.name == "pixart_sigma" else 77  # T5 tokens of PixArt-Σ, CLIP's of SD
    assert len(calib) == 2 * entries and calib.cond.shape == (entries, length, 32) and calib.uncond.shape == (1, length, 32)
    with torch.no_grad():
        want, empty = model.text_conditioning(prompts), model.text_conditioning([""])
    assert np.allclose(calib.cond[:n], want["encoder_hidden_states"].numpy(), atol=1e-6)
    assert np.allclose(calib.uncond, empty["encoder_hidden_states"].numpy(), atol=1e-6)
    xc, tc, cc = calib.get([0])
    xu, tu, cu = calib.get([entries])
    assert torch.equal(xc, xu) and torch.equal(tc, tu) and set(cc) == set(want)
    assert not torch.equal(cc["encoder_hidden_states"], cu["encoder_hidden_states"])
    if model.name == "pixart_sigma":  # T5's attention mask travels with the states, for both branches
        assert torch.equal(calib.get(range(n))[2]["encoder_attention_mask"], want["encoder_attention_mask"])
        assert torch.equal(cu["encoder_attention_mask"], empty["encoder_attention_mask"])
    # evaluation: CLIP score of quantized and FP samples, and the fixed-prompt grid
    assert isinstance(metrics["clip_score"], float) and isinstance(metrics["fp"]["clip_score"], float)
    grid = metrics["text_eval"]["prompts_grid"]
    assert grid["prompts"] == PAPER_PROMPTS and grid["columns"] == ["FP W32A32", "qdiff W4A8"]
    assert (out / "prompts_grid.png").stat().st_size > 0


def test_sd14_without_clip_weights_records_null_and_goes_on(compose_cfg, tmp_path, caplog):
    cfg = compose_cfg(*_model_overrides("sd14"), *SMALL, "quant=fp", f"eval.clip_model={tmp_path / 'no-clip'}",
                      "eval.prompts_grid=[a red bus]")
    with caplog.at_level(logging.WARNING, logger="qdiff"):
        metrics, _ = run(cfg)
    assert metrics["clip_score"] is None
    notes = [r.getMessage() for r in caplog.records if "CLIP" in r.getMessage()]
    assert len(notes) == 1 and "no-clip" in notes[0] and "\n" not in notes[0]
    assert json.loads((Path(metrics["output_dir"]) / "metrics.json").read_text())["clip_score"] is None
    assert metrics["text_eval"]["prompts_grid"]["columns"] == ["FP W32A32"]
    assert metrics["text_eval"]["prompts_grid"]["prompts"] == ["a red bus"]


def test_clip_score_is_torchmetrics_clip_score_of_the_local_weights(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    from qdiff.eval.clip import clip_score, load_clip_scorer, resolve_clip_model
    from qdiff.eval.fidelity import to_uint8

    source, note = resolve_clip_model(str(tiny_clip))
    assert source == str(tiny_clip) and note is None
    scorer, note = load_clip_scorer(source, "cpu")
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a red bus", "two cats on a sofa", PAPER_PROMPTS[0]]
    score = clip_score(scorer, images, prompts, batch_size=2)
    model, proc = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        img = model.get_image_features(proc(images=list(to_uint8(images)), return_tensors="pt")["pixel_values"])
        txt = model.get_text_features(**proc(text=prompts, return_tensors="pt", padding=True))
    img, txt = (f if isinstance(f, torch.Tensor) else f.pooler_output for f in (img, txt))
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert score == pytest.approx(max(100 * float(cos.mean()), 0.0), abs=1e-3)
    assert resolve_clip_model("/nowhere/clip")[0] is None


def test_clip_score_and_grid_settings_are_validated(compose_cfg):
    for bad, msg in [("eval.prompts_grid_n=0", "eval.prompts_grid_n must be >= 1"),
                     ("eval.prompts_grid=[' ']", "eval.prompts_grid must be a list of non-empty prompts"),
                     ("eval.clip_model=''", "eval.clip_model must name CLIP weights")]:
        with pytest.raises(ConfigError, match=msg):
            build_spec(compose_cfg(bad))
    spec = build_spec(compose_cfg())
    assert spec.eval.prompts_grid == PAPER_PROMPTS and spec.eval.clip_score


# --- full-size architectures on the meta device -------------------------------------------------------------------

# (quantized layers, split layers, {block type: count}, layers reconstructed alone) of each full-size UNet or
# transformer. DiT-XL/2: 9 layers per block (its own copy of the timestep MLP, the adaLN-Zero linear, q/k/v/out, the
# MLP's two) + patch embedding and the two output linears; PixArt-Σ: 10 per block (self- and cross-attention q/k/v/out,
# the MLP's two) + patch embedding, the shared timestep MLP and adaLN-single linear, the caption projection's two
# linears and the output linear.
FULL_SIZE = {
    "ddim_cifar10": (113, 24, {"ResnetBlock2D": 22, "Attention": 6}, 10),
    "ldm_bedroom": (155, 24, {"ResnetBlock2D": 22, "Attention": 16}, 10),
    "ldm_church": (210, 30, {"ResnetBlock2D": 35, "Attention": 21}, 4),
    "sd14": (282, 24, {"ResnetBlock2D": 22, "BasicTransformerBlock": 16}, 42),
    "dit_xl2_256": (255, 0, {"BasicTransformerBlock": 28}, 3),
    "pixart_sigma": (287, 0, {"BasicTransformerBlock": 28}, 7),
}


def _meta_unet(name: str):
    from qdiff.models import paper

    with torch.device("meta"):
        unet = paper.build_unet(name).eval()
    c = unet.config
    x = torch.zeros(2, c.in_channels, c.sample_size, c.sample_size, device="meta")
    t = torch.zeros(2, dtype=torch.long, device="meta")
    cond = {}
    if name == "sd14":
        cond = {"encoder_hidden_states": torch.zeros(2, 77, c.cross_attention_dim, device="meta")}
    elif name == "dit_xl2_256":
        cond = {"class_labels": torch.zeros(2, dtype=torch.long, device="meta")}
    elif name == "pixart_sigma":  # 300 T5 tokens of 4096 channels and their mask
        cond = {"encoder_hidden_states": torch.zeros(2, 300, c.caption_channels, device="meta"),
                "encoder_attention_mask": torch.ones(2, 300, dtype=torch.long, device="meta")}
    return unet, (x, t, cond)


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_unet_splits_and_blocks_are_found_on_the_meta_device(name):
    from qdiff.api import prepare
    from qdiff.quant import QuantConfig, execution_order, find_concat_splits
    from qdiff.recon import find_units

    unet, (x, t, cond) = _meta_unet(name)
    splits = find_concat_splits(unet, (x, t), cond)
    q, specs = prepare(unet, QuantConfig(method="qdiff", weight_bits=4, act_bits=8), (x, t, cond))
    units = find_units(q, execution_order(unet, (x, t), cond))
    n_layers, n_split, blocks, alone = FULL_SIZE[name]
    assert len(specs) == n_layers and len(splits) == n_split == sum(1 for s in specs if s.split)
    assert dict(Counter(u.module_type for u in units if u.kind == "block")) == blocks
    assert sum(u.kind == "layer" for u in units) == alone
    assert sum(u.n_layers for u in units) == n_layers, "every quantized layer is reconstructed exactly once"
    if name in TRANSFORMERS:
        return
    # every split is a skip concatenation [up-path | skip] feeding an up block's first conv or its shortcut
    assert all(k.startswith("up_blocks.") and k.rsplit(".", 1)[1] in ("conv1", "conv_shortcut") for k in splits)
    first = dict(unet.named_modules())["up_blocks.0.resnets.0.conv1"]
    assert splits["up_blocks.0.resnets.0.conv1"] == unet.config.block_out_channels[-1] < first.in_channels


# --- the paper's layer exceptions and experiment configs ----------------------------------------------------------

DDIM_EXCEPTIONS = ["down_blocks.1.resnets.0.conv_shortcut", "up_blocks.0.resnets.0.conv_shortcut",
                   "up_blocks.0.resnets.1.conv_shortcut"]


def test_cifar10_experiment_keeps_the_first_three_residual_convs_at_8_bit_with_fp_activations(compose_cfg):
    from qdiff.api import prepare
    from qdiff.quant import execution_order

    unet, (x, t, _) = _meta_unet("ddim_cifar10")
    spec = build_spec(compose_cfg("experiment=table2_cifar10"))
    q, specs = prepare(unet, spec.quant, (x, t, {}))
    special = {s.name: (s.weight_bits, s.act_bits) for s in specs if (s.weight_bits, s.act_bits) != (4, 8)}
    assert special == {n: (8, 32) for n in DDIM_EXCEPTIONS}
    layers = dict(q.named_modules())
    for n in DDIM_EXCEPTIONS:
        assert all(wq.bits == 8 for wq in layers[n].wq) and not any(aq.active for aq in layers[n].aq)
    # they are the first three shortcut convs of ResnetBlocks (the residual path) in execution order
    shortcuts = [n for n in execution_order(unet, (x, t)) if n.endswith(".conv_shortcut")]
    assert shortcuts[:3] == DDIM_EXCEPTIONS
    # every grid point of the sweep keeps the exceptions
    for bits in ("w8a32", "w4a32", "w8a8", "w4a8"):
        spec = build_spec(compose_cfg("experiment=table2_cifar10", f"quant={bits}"))
        assert [(o.weight_bits, o.act_quant) for o in spec.quant.overrides] == [(8, False)] * 3


@pytest.mark.parametrize("experiment, model, sampler, steps, eta, T, c, n, N", [
    ("table2_cifar10", "ddim_cifar10", "ddim", 100, 0.0, 100, 5, 256, 5120),
    ("table3_bedroom", "ldm_bedroom", "ddim", 200, 1.0, 200, 10, 256, 5120),
    ("table4_church", "ldm_church", "ddim", 500, 0.0, 500, 25, 256, 5120),
    ("sd14_w4a8", "sd14", "plms", 50, 0.0, 50, 2, 256, 6400),
    ("dit_xl2_256", "dit_xl2_256", "ddim", 50, 0.0, 50, 5, 256, 2560),
    ("pixart_sigma_w8a8", "pixart_sigma", "dpm_solver", 20, 0.0, 20, 2, 64, 640),
])
def test_paper_experiments_use_the_papers_sampler_and_table5_calibration(experiment, model, sampler, steps, eta, T, c, n,
                                                                         N, compose_cfg):
    from omegaconf import OmegaConf

    spec = build_spec(compose_cfg(f"experiment={experiment}"))
    assert spec.model.name == model and spec.task_name == experiment
    assert (spec.sampler.name, spec.sampler.steps, spec.sampler.eta) == (sampler, steps, eta)
    assert (spec.calib.mode, spec.calib.T, spec.calib.c, spec.calib.n, spec.calib.N) == ("uniform", T, c, n, N)
    assert (spec.quant.method, spec.quant.label) == ("qdiff", "W8A8" if model == "pixart_sigma" else "W4A8")
    grid = OmegaConf.load(Path(__file__).parents[1] / "conf" / "experiment" / f"{experiment}.yaml").hydra.sweeper.params
    if model in ("sd14", "pixart_sigma"):
        assert spec.model.guidance_scale == (7.5 if model == "sd14" else 4.5) and spec.eval.clip_score
        assert spec.quant.attn_bits is None and grid.quant == "w8a8,w4a8"
    elif model == "dit_xl2_256":  # the peers' grid: 50 and 100 DDIM steps, with c = 5 and 10 (N = 2560 either way)
        assert spec.model.guidance_scale == 1.5 and spec.eval.fid and spec.eval.isc and spec.quant.attn_bits is None
        assert grid.quant == "w8a8,w4a8" and grid["quant.method"] == "linear,qdiff" and grid["sampler.steps"] == "50,100"
        spec = build_spec(compose_cfg(f"experiment={experiment}", "sampler.steps=100"))
        assert (spec.sampler.steps, spec.calib.T, spec.calib.c, spec.calib.N) == (100, 100, 10, 2560)
    else:
        assert grid.quant == "w8a32,w4a32,w8a8,w4a8" and grid["quant.method"] == "linear,qdiff"
        assert spec.eval.fid and spec.eval.isc == (model == "ddim_cifar10")  # the paper reports no IS for LSUN


# --- scale: disk-streamed reconstruction, mixed precision ---------------------------------------------------------

@pytest.mark.slow
def test_reconstruction_streamed_from_disk_equals_in_memory(tmp_path, monkeypatch):
    from qdiff.api import prepare
    from qdiff.calib import CalibConfig, collect_calibration
    from qdiff.models import ModelConfig, load_model
    from qdiff.models.prompts import load_captions, sample_prompts
    from qdiff.quant import QuantConfig
    from qdiff.recon import ReconConfig, reconstruct
    from qdiff.recon import steps as steps_mod
    from qdiff.sampling import SamplerConfig

    torch.manual_seed(0)
    model = load_model(ModelConfig(name="sd14", random_init=True, arch=ARCH["sd14"]))
    prompts = sample_prompts(load_captions(COCO_TSV), 4, 0)
    calib, _ = collect_calibration(model, SamplerConfig(name="plms", steps=4), CalibConfig(T=4, c=2, n=4), tmp_path / "cache",
                                   prompts=prompts, progress=False)
    qcfg = QuantConfig(method="qdiff", weight_bits=4, act_bits=8, scale_method="minmax")  # no Lp grid search: faster
    stores: dict[str, set] = {"memory": set(), "disk": set()}
    capture = steps_mod.capture_unit

    def spy(*args, **kwargs):
        cache = capture(*args, **kwargs)
        stores[cache.storage].update("npy file" if cache.storage == "disk" and (cache.root / f"{k}.npy").is_file()
                                     else type(v).__name__ for k, v in cache.slots.items())
        return cache

    monkeypatch.setattr(steps_mod, "capture_unit", spy)
    states = {}
    for storage in ("memory", "disk"):
        q, _ = prepare(model.unet, qcfg, calib.get([0, 1]))
        rcfg = ReconConfig(weight_iters=2, act_iters=1, batch_size=4, cache_storage=storage)
        reconstruct(model.unet, q, calib, qcfg, rcfg, work_dir=tmp_path / storage, progress=False)
        states[storage] = q.state_dict()
        assert not (tmp_path / storage / "unit_cache").exists(), "the per-unit cache is removed after each unit"
    assert stores == {"memory": {"Tensor"}, "disk": {"npy file"}}
    mem, disk = states["memory"], states["disk"]
    assert mem.keys() == disk.keys()
    assert all(torch.equal(mem[k], disk[k]) for k in mem), [k for k in mem if not torch.equal(mem[k], disk[k])][:5]


def test_bf16_mixed_reconstruction_runs_on_cpu_and_16_mixed_is_refused(compose_cfg):
    from recon_job import setup

    from qdiff.recon import reconstruct

    net, q, calib, qcfg, rcfg = setup(iters=3)
    report = reconstruct(net, q, calib, qcfg, dataclasses.replace(rcfg, precision="bf16-mixed"), progress=False)
    assert all(np.isfinite(s["mse_after"]) for s in report["steps"] if s["mse_after"] is not None)
    x, t, _ = calib.get(np.arange(4))
    with torch.no_grad():
        assert torch.isfinite(q(x, t)).all()
    assert build_spec(compose_cfg("recon.precision=bf16-mixed", "device=cpu")).recon.precision == "bf16-mixed"
    with pytest.raises(ConfigError, match="recon.precision=16-mixed needs a CUDA device"):
        build_spec(compose_cfg("recon.precision=16-mixed", "device=cpu"))


# --- offline ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, names_weights", [
    ("sd14", "CompVis/stable-diffusion-v1-4"),
    ("ldm_bedroom", "https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip"),
    ("dit_xl2_256", "facebook/DiT-XL-2-256"),
    ("pixart_sigma", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"),
])
def test_cli_without_weights_fails_in_one_line_before_any_work(name, names_weights, tmp_path, monkeypatch, cli):
    monkeypatch.delenv("QDIFF_COCO_CAPTIONS", raising=False)  # the missing-captions check must not come first
    r = cli([f"model={name}", f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path,
            env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    assert names_weights in errors[0] and "model.source=" in errors[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "metrics.json").exists()
