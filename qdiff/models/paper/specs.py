"""The paper's four models and two transformer peers (DiT-XL/2, PixArt-Σ) as data: diffusers configs of every
component, training schedules, sampler settings.

Each architecture is written out from the official configs, so the same numbers build a random-init model,
shape the conversion of an original checkpoint, and name the weights in error messages.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qdiff.models.base import ModelConfigError

# --- architectures ---------------------------------------------------------------------------------------------

#: DDPM CIFAR-10 UNet (Ho et al. 2020), as in google/ddpm-cifar10-32: 35,746,307 parameters.
DDPM_CIFAR10_UNET: dict = dict(
    sample_size=32, in_channels=3, out_channels=3,
    block_out_channels=[128, 256, 256, 256], layers_per_block=2,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    norm_eps=1e-6, norm_num_groups=32,
)

#: latent-diffusion configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml: model_channels 224, channel_mult
#: [1,2,3,4], attention at downsampling factors 2,4,8, num_head_channels 32. 274,056,163 parameters.
LDM_BEDROOM_UNET: dict = dict(
    sample_size=64, in_channels=3, out_channels=3,
    block_out_channels=[224, 448, 672, 896], layers_per_block=2,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=32, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
)
#: VQ-f4 first stage (embed_dim 3, n_embed 8192, ch 128, ch_mult [1,2,4]).
LDM_BEDROOM_VQ: dict = dict(
    in_channels=3, out_channels=3, sample_size=256,
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[128, 256, 512], layers_per_block=2, latent_channels=3,
    num_vq_embeddings=8192, vq_embed_dim=3, norm_num_groups=32,
)

#: latent-diffusion configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml: model_channels 192, channel_mult
#: [1,2,2,4,4], attention at factors 1,2,4,8, num_heads 8, use_scale_shift_norm, resblock_updown.
#: 294,966,916 parameters.
LDM_CHURCH_UNET: dict = dict(
    sample_size=32, in_channels=4, out_channels=4,
    block_out_channels=[192, 384, 384, 768, 768], layers_per_block=2,
    down_block_types=["AttnDownBlock2D"] * 4 + ["DownBlock2D"],
    up_block_types=["ResnetUpsampleBlock2D"] + ["AttnUpBlock2D"] * 4,
    attention_head_dim=None, resnet_time_scale_shift="scale_shift", downsample_type="resnet",
    upsample_type="resnet", norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
    attn_norm_num_groups=32,  # diffusers drops the middle attention's GroupNorm under scale_shift unless set
)
#: KL-f8 first stage (embed_dim 4, ch 128, ch_mult [1,2,4,4]).
LDM_CHURCH_KL: dict = dict(
    in_channels=3, out_channels=3, sample_size=256,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
)

#: CompVis/stable-diffusion-v1-4 unet/config.json: 859,520,964 parameters.
SD14_UNET: dict = dict(
    sample_size=64, in_channels=4, out_channels=4,
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
)
SD14_VAE: dict = dict(LDM_CHURCH_KL, sample_size=512)
#: CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14), what SD v1 conditions on.
SD14_TEXT: dict = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)

#: facebook/DiT-XL-2-256 transformer/ (DiTTransformer2DModel; the diffusers defaults are these numbers too): 28 blocks,
#: 16 heads of 72 (hidden 1152), patch 2 on 4x32x32 latents, learned sigma (4 -> 8 channels), adaLN-Zero over the
#: timestep + class embedding (1000 classes; the table's row 1000 is the null class of classifier-free guidance).
#: 749,826,464 parameters as diffusers builds it: every block's adaLN-Zero holds its own copy of the timestep MLP and
#: the class table (27 extra copies, 74,991,744); without them 674,834,720, plus the fixed 256x1152 sin-cos position
#: embedding (a buffer here) = 675,129,632, the DiT paper's "675M" (its Table 1 counts the original model).
DIT_XL2_256_TRANSFORMER: dict = dict(
    num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, patch_size=2,
    sample_size=32, num_embeds_ada_norm=1000, norm_type="ada_norm_zero", activation_fn="gelu-approximate",
    norm_elementwise_affine=False, attention_bias=True,
)
#: stabilityai/sd-vae-ft-ema (DiT's first stage): SD v1's KL-f8 architecture (83,653,863 parameters), fine-tuned decoder.
DIT_VAE: dict = dict(LDM_CHURCH_KL, sample_size=256)

#: PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/ (PixArtTransformer2DModel, as diffusers'
#: scripts/convert_pixart_sigma_to_diffusers.py builds it for 1024 px): 28 blocks, 16 heads of 72, patch 2 on 4x128x128
#: latents, learned sigma, adaLN-single, cross-attention to the caption projected from T5's 4096 to 1152 channels,
#: no micro-conditions, position embedding interpolation 2. 610,856,096 parameters (the PixArt-Σ paper's "0.6B").
PIXART_SIGMA_TRANSFORMER: dict = dict(
    num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, patch_size=2,
    sample_size=128, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
    use_additional_conditions=False, interpolation_scale=2, norm_eps=1e-6, norm_elementwise_affine=False,
    attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
)
#: SDXL's VAE (PixArt-Σ's first stage): the same KL-f8 architecture as SD v1's (83,653,863 parameters), retrained;
#: latents scaled by 0.13025.
SDXL_VAE: dict = dict(LDM_CHURCH_KL, sample_size=1024)
#: T5 v1.1 XXL's encoder (google/t5-v1_1-xxl, what PixArt conditions on): 4,762,310,656 parameters.
PIXART_SIGMA_TEXT: dict = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
)

# --- training noise schedules (diffusers scheduler configs) ----------------------------------------------------
# latent-diffusion's "linear" schedule is linspace(sqrt(start), sqrt(end))**2, i.e. diffusers "scaled_linear".
# set_alpha_to_one/steps_offset reproduce the original DDIM samplers: the DDIM repo (CIFAR) steps to alpha=1 at
# the end; latent-diffusion/CompVis use timesteps 1, 1+c, ... and alphas_cumprod[0] as the final alpha.

DDPM_CIFAR10_SCHEDULE: dict = dict(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True, steps_offset=0,
)
LDM_BEDROOM_SCHEDULE: dict = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)
LDM_CHURCH_SCHEDULE: dict = dict(LDM_BEDROOM_SCHEDULE, beta_end=0.0155)
SD14_SCHEDULE: dict = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)

#: DiT and PixArt train on IDDPM's linear schedule (betas 1e-4..0.02, 1000 steps, epsilon + learned sigma). DDIM as
#: DiT's own sampler (guided-diffusion's "ddim50" respacing): timesteps 980, 960, ..., 0, stepping to alpha=1 at the end.
DIT_SCHEDULE: dict = dict(DDPM_CIFAR10_SCHEDULE)
#: PixArt-Σ samples with DPM-Solver++ (2nd order, diffusers' DPMSolverMultistepScheduler defaults); clip_sample off so
#: that a DDIM run on it does not clip latents.
PIXART_SIGMA_SCHEDULE: dict = dict(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="epsilon",
    clip_sample=False,
)

LSUN_BEDROOMS_URL = "https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip"
LSUN_CHURCHES_URL = "https://ommer-lab.com/files/latent-diffusion/lsun_churches.zip"
DDIM_CIFAR10_EMA_URL = "https://heibox.uni-heidelberg.de/f/2e4f01e2d9ee49bab1d5/?dl=1"
SD14_HUB_ID = "CompVis/stable-diffusion-v1-4"
CLIP_TOKENIZER_HUB_ID = "openai/clip-vit-large-patch14"
DIT_XL2_256_HUB_ID = "facebook/DiT-XL-2-256"
PIXART_SIGMA_HUB_ID = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
DIT_CONVERT_SCRIPT = "scripts/convert_dit_to_diffusers.py"
PIXART_SIGMA_CONVERT_SCRIPT = "scripts/convert_pixart_sigma_to_diffusers.py"


@dataclass(frozen=True)
class PaperModel:
    """What differs between the paper's models; the loader (:mod:`.loading`) is shared."""

    name: str
    unet_class: str
    unet: dict
    schedule: dict
    #: The paper's sampler and Table 5 calibration (T steps, interval c, n per step, N total).
    paper: dict
    default_source: str | None = None
    #: Where the official weights are, for error messages.
    weights_hint: str = ""
    #: Other accepted sources, appended to "(a diffusers folder...)" in the offline error.
    source_hint: str = ""
    first_stage_class: str | None = None
    first_stage: dict | None = None
    latent_scale: float = 1.0
    #: Fixed number of attention heads of the original UNet (LDM ``num_heads``), or None to use the config.
    num_heads: int | None = None
    text: dict | None = None
    #: Swap in latent-diffusion's ``model_ema.*`` weights from original checkpoints (what the paper samples).
    use_ema: bool = False
    #: Diffusers subfolders tried in order for each component ("" is the folder itself); "unet" is the denoiser
    #: whatever its class (the transformers' subfolder is "transformer").
    subfolders: dict = field(default_factory=dict)
    #: Class-conditional models (DiT): labels 0..num_classes-1, the null class num_classes; None: not class-conditional.
    #: The count a loaded model uses is its denoiser's ``num_embeds_ada_norm`` (so a width-reduced variant can shrink it).
    num_classes: int | None = None
    #: The text encoder's kind: "clip" (CLIPTextModel, ``text`` holds CLIPTextConfig fields) or "t5" (T5EncoderModel,
    #: ``text`` holds T5Config fields; the prompt encoder also gives the denoiser T5's attention mask).
    text_kind: str = "clip"
    #: Tokens per prompt for T5 encoders (PixArt-Σ: 300); CLIP's come from its position embeddings (77).
    text_max_length: int | None = None
    #: Original checkpoints are not converted here: the diffusers script that makes a diffusers folder of them.
    convert_script: str | None = None


PAPER_MODELS: dict[str, PaperModel] = {
    "ddim_cifar10": PaperModel(
        name="ddim_cifar10", unet_class="UNet2DModel", unet=DDPM_CIFAR10_UNET, schedule=DDPM_CIFAR10_SCHEDULE,
        paper=dict(sampler="ddim", steps=100, eta=0.0, calib=dict(T=100, c=5, n=256, N=5120)),
        default_source="google/ddpm-cifar10-32",
        weights_hint=f"google/ddpm-cifar10-32 (diffusers) or the DDIM repo's ema_cifar10 model-790000.ckpt ({DDIM_CIFAR10_EMA_URL})",
        source_hint=f", or the DDIM repo's ema_cifar10 model-790000.ckpt from {DDIM_CIFAR10_EMA_URL}",
        subfolders={"unet": ("", "unet")},
    ),
    "ldm_bedroom": PaperModel(
        name="ldm_bedroom", unet_class="UNet2DModel", unet=LDM_BEDROOM_UNET, schedule=LDM_BEDROOM_SCHEDULE,
        paper=dict(sampler="ddim", steps=200, eta=1.0, calib=dict(T=200, c=10, n=256, N=5120)),
        weights_hint=f"{LSUN_BEDROOMS_URL} (unzip; model.ckpt)",
        source_hint=f", or the model.ckpt of {LSUN_BEDROOMS_URL}",
        first_stage_class="VQModel", first_stage=LDM_BEDROOM_VQ, use_ema=True,
        subfolders={"unet": ("unet",), "vae": ("vqvae", "vae")},
    ),
    "ldm_church": PaperModel(
        name="ldm_church", unet_class="UNet2DModel", unet=LDM_CHURCH_UNET, schedule=LDM_CHURCH_SCHEDULE,
        paper=dict(sampler="ddim", steps=500, eta=0.0, calib=dict(T=500, c=25, n=256, N=5120)),
        weights_hint=f"{LSUN_CHURCHES_URL} (unzip; model.ckpt)",
        source_hint=f", or the model.ckpt of {LSUN_CHURCHES_URL}",
        first_stage_class="AutoencoderKL", first_stage=LDM_CHURCH_KL, num_heads=8, use_ema=True,
        subfolders={"unet": ("unet",), "vae": ("vqvae", "vae")},
    ),
    "sd14": PaperModel(
        name="sd14", unet_class="UNet2DConditionModel", unet=SD14_UNET, schedule=SD14_SCHEDULE,
        paper=dict(sampler="plms", steps=50, eta=0.0, guidance_scale=7.5, calib=dict(T=50, c=2, n=256, N=6400)),
        default_source=SD14_HUB_ID, weights_hint=f"{SD14_HUB_ID} (diffusers)",
        first_stage_class="AutoencoderKL", first_stage=SD14_VAE, latent_scale=0.18215, text=SD14_TEXT,
        subfolders={"unet": ("unet",), "vae": ("vae",), "text_encoder": ("text_encoder",), "tokenizer": ("tokenizer",)},
    ),
    # Peers (PTQ4DiT, Q-DiT, ViDiT-Q): DDIM 50 (and 100) steps, classifier-free guidance 1.5 (the DiT paper's FID
    # setting). Calibration here: T = steps, c = 5 at 50 steps (c = 10 at 100), n = 256 -> N = 2560 either way.
    "dit_xl2_256": PaperModel(
        name="dit_xl2_256", unet_class="DiTTransformer2DModel", unet=DIT_XL2_256_TRANSFORMER, schedule=DIT_SCHEDULE,
        paper=dict(sampler="ddim", steps=50, eta=0.0, guidance_scale=1.5, calib=dict(T=50, c=5, n=256, N=2560)),
        default_source=DIT_XL2_256_HUB_ID, weights_hint=f"{DIT_XL2_256_HUB_ID} (diffusers)",
        source_hint=f", e.g. made from the original DiT-XL-2-256x256.pt by diffusers' {DIT_CONVERT_SCRIPT}",
        first_stage_class="AutoencoderKL", first_stage=DIT_VAE, latent_scale=0.18215, num_classes=1000,
        convert_script=DIT_CONVERT_SCRIPT, subfolders={"unet": ("transformer",), "vae": ("vae",)},
    ),
    # PixArtSigmaPipeline's defaults: DPM-Solver++ 20 steps, guidance 4.5, T5 prompts of 300 tokens with their mask,
    # the empty prompt as the unconditional branch. Calibration here: T = 20, c = 2, n = 64 COCO captions -> N = 640.
    "pixart_sigma": PaperModel(
        name="pixart_sigma", unet_class="PixArtTransformer2DModel", unet=PIXART_SIGMA_TRANSFORMER,
        schedule=PIXART_SIGMA_SCHEDULE,
        paper=dict(sampler="dpm_solver", steps=20, eta=0.0, guidance_scale=4.5, calib=dict(T=20, c=2, n=64, N=640)),
        default_source=PIXART_SIGMA_HUB_ID, weights_hint=f"{PIXART_SIGMA_HUB_ID} (diffusers)",
        source_hint=f", e.g. made from an original PixArt-Sigma .pth by diffusers' {PIXART_SIGMA_CONVERT_SCRIPT}",
        first_stage_class="AutoencoderKL", first_stage=SDXL_VAE, latent_scale=0.13025, text=PIXART_SIGMA_TEXT,
        text_kind="t5", text_max_length=300, convert_script=PIXART_SIGMA_CONVERT_SCRIPT,
        subfolders={"unet": ("transformer",), "vae": ("vae",), "text_encoder": ("text_encoder",), "tokenizer": ("tokenizer",)},
    ),
}


def get_spec(name: str) -> PaperModel:
    """The :class:`PaperModel` of ``name``; an unknown name fails in one line listing the known ones."""
    if name not in PAPER_MODELS:
        raise ModelConfigError(f"unknown paper model '{name}'; known: {', '.join(PAPER_MODELS)}")
    return PAPER_MODELS[name]
