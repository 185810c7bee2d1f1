"""Which weights a paper model loads (original checkpoint, diffusers folder or hub id) and the cheap checks of
``model.*`` run before any work, so a missing file or unreachable hub fails in one line naming the weights."""
from __future__ import annotations

from pathlib import Path

from qdiff.models.base import ModelConfigError, WeightsNotFoundError
from qdiff.models.config import ModelConfig
from qdiff.models.hub import hub_cached, hub_offline, hub_reachable, not_found
from qdiff.models.ldm_convert import CHECKPOINT_SUFFIXES
from qdiff.models.paper.arch import resolve_arch
from qdiff.models.paper.specs import PAPER_MODELS, PaperModel, get_spec


def source_kind(name: str, source: str) -> tuple[str, str]:
    """('original', file) | ('diffusers', folder) | ('hub', id). Models without a converter here (DiT, PixArt-Σ)
    refuse original checkpoints in one line naming diffusers' conversion script."""
    p = Path(source).expanduser()
    script = get_spec(name).convert_script if name in PAPER_MODELS else None
    if script is not None and p.is_file():
        raise ModelConfigError(
            f"{name}: '{source}' is a file; original checkpoints are not converted for this model: make a diffusers "
            f"folder of it with diffusers' {script} and set model.source=/path/to/that/folder")
    if script is not None and p.is_dir() and not _is_diffusers_folder(p):
        raise ModelConfigError(
            f"{name}: folder '{source}' is not a diffusers folder (no model_index.json or transformer/); original "
            f"checkpoints are not converted for this model: make a diffusers folder with diffusers' {script}")
    if p.is_file():
        if p.suffix not in CHECKPOINT_SUFFIXES:
            raise ModelConfigError(f"{name}: model.source '{source}' is a file but not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
        return "original", str(p)
    if p.is_dir():
        if _is_diffusers_folder(p):
            return "diffusers", str(p)
        for f in ("model.safetensors", "model.ckpt"):
            if (p / f).is_file():
                return "original", str(p / f)
        raise ModelConfigError(f"{name}: folder '{source}' is neither a diffusers folder nor holds model.ckpt/model.safetensors")
    looks_local = source.startswith(("/", ".", "~")) or source.count("/") != 1 or p.suffix in CHECKPOINT_SUFFIXES
    if looks_local:
        raise WeightsNotFoundError(f"{name}: model.source '{source}' does not exist")
    return "hub", source


def _is_diffusers_folder(p: Path) -> bool:
    return any((p / f).exists() for f in ("model_index.json", "unet", "transformer", "config.json", "vae", "vqvae"))


def check_cfg(spec: PaperModel, cfg: ModelConfig) -> None:
    """``cfg`` is meant for this loader, and the files it names besides the weights (reference, captions) exist."""
    if cfg.name != spec.name:
        raise ModelConfigError(f"loader '{spec.name}' called with model.name='{cfg.name}'")
    if cfg.reference and not Path(cfg.reference).expanduser().exists():
        raise WeightsNotFoundError(f"{spec.name}: model.reference '{cfg.reference}' does not exist; point it at a folder of images or an .npz/.safetensors file")
    if spec.text is not None and cfg.prompts and not Path(cfg.prompts).expanduser().is_file():
        raise WeightsNotFoundError(f"{spec.name}: model.prompts '{cfg.prompts}' does not exist; point it at a COCO captions JSON, TSV or TXT file")


def no_weights(spec: PaperModel) -> WeightsNotFoundError:
    """The error for a model without default weights and no ``model.source``: where to download them."""
    return WeightsNotFoundError(
        f"{spec.name}: no weights configured. Download {spec.weights_hint} and set model.source=/path/to/model.ckpt, "
        "or use model.random_init=true for a smoke test."
    )


def check_source(cfg: ModelConfig) -> None:
    """The cheap checks of :func:`load_paper_model`, run before any work: a missing local file, no configured
    weights, or a hub id that is neither cached nor reachable fails here in one line naming the weights."""
    spec = get_spec(cfg.name)
    check_cfg(spec, cfg)
    resolve_arch(spec.name, cfg.arch)
    if cfg.random_init:
        return
    source = cfg.source or spec.default_source
    if source is None:
        raise no_weights(spec)
    kind, _ = source_kind(spec.name, source)
    # the denoiser's config marks a cached copy (subfolder "unet", "transformer", or the repo root)
    if kind == "hub" and not hub_cached(source, spec.subfolders.get("unet", ("unet",))):
        if cfg.local_files_only or hub_offline() or not hub_reachable():
            raise not_found(spec.name, source, spec.source_hint)
