"""Random-init, tiny diffusers pipelines (UNet and transformer), for trying qdiff offline in seconds.

Every pipeline is the real diffusers class with the real component classes (transformer, VAE, text encoders,
scheduler) wired the way the hub checkpoints wire them; only the widths and depths are tiny and the weights random.
Nothing is downloaded: tokenizers are character-level and built in code.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import (
    AutoencoderKL, DDIMScheduler, DiffusionPipeline, DiTPipeline, DiTTransformer2DModel,
    DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
    PixArtSigmaPipeline, PixArtTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast, T5Config, T5EncoderModel,
)

__all__ = ["CALL_KWARGS", "KINDS", "t5_char_tokenizer", "tiny_pipeline", "tiny_transformer_pipeline"]

from qdiff.models.paper.text import char_tokenizer, t5_char_tokenizer

KINDS = ("dit", "pixart_sigma", "sd3", "flux")
TEXT_DIM = 32  # hidden size of every tiny text encoder (CLIP: also its projection; T5: d_model)
CLIP_MAX_LENGTH = 77  # as the real CLIP tokenizers; the T5 length is the pipeline call's max_sequence_length


def _clip(tokenizer: PreTrainedTokenizerFast, with_projection: bool) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A 2-layer CLIP text encoder (width 32, 4 heads) whose vocabulary and special ids match ``tokenizer``."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=TEXT_DIM,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _t5(tokenizer: PreTrainedTokenizerFast) -> T5EncoderModel:
    """A 2-layer T5 v1.1 encoder (gated GELU, relative position buckets; d_model 32, 4 heads)."""
    config = T5Config(
        vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=2 * TEXT_DIM, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_gated_act=True,
        dense_act_fn="gelu_new", tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _vae(latent_channels: int, scaling_factor: float, shift_factor: float | None = None) -> AutoencoderKL:
    """A 4-level KL autoencoder (downsampling 8x like SD's), 8-16 channels wide, 64x64 images.

    ``shift_factor`` set means the SD3/FLUX VAE: 16 latent channels and no quant convs.
    """
    flow = shift_factor is not None
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=64, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=not flow, use_post_quant_conv=not flow,
    )


def _dit() -> DiTPipeline:
    """DiT-XL/2 shape: class-conditional (1000 classes + null class 1000), learned sigma (4 -> 8 channels), DDIM."""
    transformer = DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        norm_num_groups=8, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
    )
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    id2label = {0: "zero", 1: "one", 2: "two, deux", 3: "three"}
    pipe = DiTPipeline(transformer=transformer, vae=_vae(4, 0.18215), scheduler=scheduler, id2label=id2label)
    pipe.register_to_config(id2label=id2label)  # DiTPipeline does not save id2label itself; the hub configs carry it
    return pipe


def _pixart_sigma() -> PixArtSigmaPipeline:
    """PixArt-Σ shape: T5 cross-attention with its attention mask, adaLN-single, learned sigma, DPM-Solver++."""
    tokenizer = t5_char_tokenizer(300)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, norm_num_groups=8, sample_size=8, patch_size=2, caption_channels=TEXT_DIM,
        use_additional_conditions=False,
    )
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    return PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=_t5(tokenizer), vae=_vae(4, 0.13025),
                               transformer=transformer, scheduler=scheduler)


def _sd3() -> StableDiffusion3Pipeline:
    """SD3 shape: MMDiT over 16-channel latents, two CLIPs (hidden states + pooled), no T5 (zeros), flow matching.

    As with the hub's SD3 loaded without T5, ``from_pretrained`` of a saved copy needs ``text_encoder_3=None,
    tokenizer_3=None``: diffusers saves them as ``[null, null]`` and then refuses the folder without them.
    """
    tok, tok_2 = char_tokenizer(CLIP_MAX_LENGTH), char_tokenizer(CLIP_MAX_LENGTH)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=2 * TEXT_DIM, caption_projection_dim=32, pooled_projection_dim=2 * TEXT_DIM,
        out_channels=16, pos_embed_max_size=16,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, 1.5305, 0.0609), text_encoder=_clip(tok, True), tokenizer=tok,
        text_encoder_2=_clip(tok_2, True), tokenizer_2=tok_2, text_encoder_3=None, tokenizer_3=None,
    )


def _flux() -> FluxPipeline:
    """FLUX.1-dev shape: 2x2-packed 16-channel latents, double + single stream blocks, 3-axis RoPE, guidance embedding,
    CLIP pooled + T5 sequence, flow matching with resolution-dependent shift (``mu``)."""
    tok, tok_2 = char_tokenizer(CLIP_MAX_LENGTH), t5_char_tokenizer(512)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(scheduler=scheduler, vae=_vae(16, 0.3611, 0.1159), text_encoder=_clip(tok, False),
                        tokenizer=tok, text_encoder_2=_t5(tok_2), tokenizer_2=tok_2, transformer=transformer)


_BUILDERS: dict[str, Callable[[], DiffusionPipeline]] = {
    "dit": _dit, "pixart_sigma": _pixart_sigma, "sd3": _sd3, "flux": _flux,
}


def tiny_transformer_pipeline(kind: str, seed: int = 0) -> DiffusionPipeline:
    """A random-init tiny diffusers transformer pipeline of ``kind`` (one of :data:`KINDS`), on CPU, float32.

    Tiny: 2 transformer blocks of width 32 (FLUX: 1 double- + 1 single-stream), 2-layer text encoders of
    width 32 with character-level tokenizers, a 4-level VAE 8-16 channels wide; 64x64 images (8x8 latents).
    Real: the pipeline and component classes, their wiring and conditioning paths (class labels / T5 with mask /
    two CLIPs / CLIP + T5, learned sigma for DiT and PixArt-Σ, 16-channel latents with shift/scale for SD3 and
    FLUX), and the scheduler classes with SD3's and FLUX's shift settings. Weights come from
    ``torch.manual_seed(seed)`` without touching the global RNG state.
    :data:`CALL_KWARGS` holds call arguments that work (e.g. ``use_resolution_binning=False`` for PixArt-Σ).
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; expected one of {KINDS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _BUILDERS[kind]()
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # as from_pretrained leaves them (DiT's class-label dropout is active in train mode)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Keyword arguments each tiny pipeline's ``__call__`` runs with (add ``num_inference_steps``, ``generator`` and
# ``output_type``). DiT takes no height/width (its transformer's ``sample_size`` fixes 64x64) and always decodes;
# FLUX's ``guidance_scale`` feeds the guidance embedding, true CFG needs ``true_cfg_scale > 1`` and ``negative_prompt``.
CALL_KWARGS: dict[str, dict[str, Any]] = {
    "dit": dict(class_labels=[1, 2], guidance_scale=4.0),
    "pixart_sigma": dict(prompt=["a red circle", "a blue square"], guidance_scale=4.5, height=64, width=64,
                         max_sequence_length=16, use_resolution_binning=False, clean_caption=False),
    "sd3": dict(prompt=["a red circle", "a blue square"], guidance_scale=7.0, height=64, width=64,
                max_sequence_length=16),
    "flux": dict(prompt=["a red circle", "a blue square"], guidance_scale=3.5, height=64, width=64,
                 max_sequence_length=16),
}


def tiny_pipeline(kind: str = "ddim", seed: int = 0) -> DiffusionPipeline:
    """A random-init, tiny diffusers pipeline for trying the API offline in seconds (no weights, no hub).

    ``kind``: ``ddpm`` / ``ddim`` (unconditional ``UNet2DModel``, 3x16x16 images), ``stable_diffusion``
    (``UNet2DConditionModel`` on 4x8x8 latents, a 2-layer CLIP text encoder with a character tokenizer, a
    two-block VAE: 16x16 images), or a transformer pipeline (:data:`KINDS`: ``dit``, ``pixart_sigma``, ``sd3``,
    ``flux``; :func:`tiny_transformer_pipeline`). Its samples are noise; its structure is the real one.
    """
    import diffusers

    from qdiff.errors import ConfigError

    if kind in KINDS:
        return tiny_transformer_pipeline(kind, seed)
    kinds = ("ddpm", "ddim", "stable_diffusion", *KINDS)
    if kind not in kinds:
        raise ConfigError(f"tiny_pipeline: unknown kind {kind!r}; known: {', '.join(kinds)}")
    torch.manual_seed(seed)
    if kind != "stable_diffusion":
        unet = diffusers.UNet2DModel(
            sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8, attention_head_dim=8)
        pipeline, scheduler = ((diffusers.DDPMPipeline, diffusers.DDPMScheduler) if kind == "ddpm"
                               else (diffusers.DDIMPipeline, diffusers.DDIMScheduler))
        return pipeline(unet=unet.eval(), scheduler=scheduler(num_train_timesteps=1000))
    from qdiff.models.paper.text import build_text_encoder, char_tokenizer

    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                  sample_size=16)
    text_encoder = build_text_encoder(dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, projection_dim=32, max_position_embeddings=77))
    scheduler = diffusers.PNDMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, skip_prk_steps=True, steps_offset=1)
    return diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=char_tokenizer(), unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
