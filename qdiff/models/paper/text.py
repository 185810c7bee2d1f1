"""The text side of Stable Diffusion: tokenizers, the CLIP text encoder, and the prompt encoder the sampler calls."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from qdiff.models.base import ModelConfigError
from qdiff.models.hub import from_pretrained
from qdiff.models.ldm_convert import TEXT_ENCODER_PREFIX
from qdiff.models.paper.specs import CLIP_TOKENIZER_HUB_ID


def char_tokenizer(max_length: int = 77) -> Any:
    """A CLIP-shaped, character-level tokenizer built in code, for random-init text encoders (no hub access).

    Lower-cased printable ASCII, ``<|startoftext|>`` ... ``<|endoftext|>``, padded with ``<|endoftext|>`` like
    SD's CLIPTokenizer, so the text path runs end to end on real captions without downloading a vocabulary.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2}
    for ch in (chr(i).lower() for i in range(32, 127)):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<unk>", model_max_length=max_length,
    )


def build_text_encoder(text_cfg: dict) -> nn.Module:
    """A random-init CLIP text encoder; token ids default to the char tokenizer's for small vocabularies."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = dict(text_cfg)
    cfg.setdefault("bos_token_id", 0 if cfg["vocab_size"] < 49406 else 49406)
    cfg.setdefault("eos_token_id", 1 if cfg["vocab_size"] < 49406 else 49407)
    cfg.setdefault("pad_token_id", 1)
    return CLIPTextModel(CLIPTextConfig(**cfg))


def text_encoder_from_checkpoint(name: str, text_cfg: dict, sd: Mapping[str, torch.Tensor], path: str) -> nn.Module:
    """The CLIP text encoder held by original checkpoint ``sd`` (``cond_stage_model.transformer.*``), shapes checked."""
    encoder = build_text_encoder(text_cfg)
    text_sd = {}
    for k, v in sd.items():
        if k.startswith(TEXT_ENCODER_PREFIX):
            k = k[len(TEXT_ENCODER_PREFIX):]
            text_sd[k[len("text_model."):] if k.startswith("text_model.") else k] = v
    text_sd.pop("embeddings.position_ids", None)
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in text_sd]
    if missing:
        raise ModelConfigError(f"{name}: checkpoint '{path}' lacks text encoder tensor '{TEXT_ENCODER_PREFIX}text_model.{missing[0]}'")
    bad = [k for k in expected if tuple(text_sd[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise ModelConfigError(f"{name}: text encoder tensor '{bad[0]}' has shape {tuple(text_sd[bad[0]].shape)}, expected {tuple(expected[bad[0]].shape)}")
    encoder.load_state_dict({k: text_sd[k] for k in expected}, strict=True)
    return encoder


def original_tokenizer(name: str, path: str, local_files_only: bool) -> Any:
    """Original SD checkpoints carry no vocabulary: use a ``tokenizer/`` folder beside the file, else CLIP's hub copy."""
    from transformers import AutoTokenizer, CLIPTokenizer

    beside = Path(path).parent / "tokenizer"
    if beside.is_dir():
        return from_pretrained(name, str(beside), ("",), AutoTokenizer.from_pretrained, local_files_only, hint="")
    return from_pretrained(name, CLIP_TOKENIZER_HUB_ID, ("",), CLIPTokenizer.from_pretrained, local_files_only,
                           hint=", or put CLIP's tokenizer/ folder next to the checkpoint")


def prompt_encoder(tokenizer: Any, text_encoder: nn.Module, unet: nn.Module) -> Callable[[list[str]], torch.Tensor]:
    """The ``encode_prompts`` of a text-guided :class:`~qdiff.models.base.DiffusionModel`: prompts to UNet conditioning."""
    max_length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)  # 77 for CLIP

    def encode_prompts(prompts: list[str]) -> torch.Tensor:
        """[B, 77, D] last hidden states of the CLIP text encoder, in the UNet's dtype and device.

        The text encoder follows the UNet's device because ``DiffusionModel.to`` moves only unet and vae.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = tokenizer(list(prompts), padding="max_length", max_length=max_length,
                        truncation=True, return_tensors="pt").input_ids
        ref = next(unet.parameters())
        if next(text_encoder.parameters()).device != ref.device:
            text_encoder.to(ref.device)
        with torch.no_grad():
            hidden = text_encoder(ids.to(ref.device))[0]
        return hidden.to(ref.dtype)

    # Exposed for export and inspection (DiffusionModel has no field for the text side).
    encode_prompts.text_encoder = text_encoder
    encode_prompts.tokenizer = tokenizer
    return encode_prompts
