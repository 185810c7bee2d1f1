"""The text side of the text-guided models: tokenizers, the text encoders (CLIP for Stable Diffusion, T5 for PixArt-Σ),
and the prompt encoders the sampler calls."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from qdiff.models.base import ModelConfigError
from qdiff.models.hub import from_pretrained
from qdiff.models.ldm_convert import TEXT_ENCODER_PREFIX
from qdiff.models.paper.specs import CLIP_TOKENIZER_HUB_ID


def _char_level(specials: dict[str, int], template: str, max_length: int, **tokens: str) -> Any:
    """Lower-cased printable ASCII, one token per character, after ``specials``; ``template`` adds them around it."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = dict(specials)
    for ch in (chr(i).lower() for i in range(32, 127)):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, i) for t, i in specials.items() if t in template.split()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", model_max_length=max_length, **tokens)


def char_tokenizer(max_length: int = 77) -> Any:
    """A CLIP-shaped, character-level tokenizer built in code, for random-init text encoders (no hub access).

    Lower-cased printable ASCII, ``<|startoftext|>`` ... ``<|endoftext|>``, padded with ``<|endoftext|>`` like
    SD's CLIPTokenizer, so the text path runs end to end on real captions without downloading a vocabulary.
    """
    return _char_level({"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2}, "<|startoftext|> $A <|endoftext|>",
                       max_length, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def t5_char_tokenizer(max_length: int = 512) -> Any:
    """A T5-shaped, character-level tokenizer: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, no BOS, ``</s>`` appended,
    so T5 encoders (PixArt-Σ, FLUX) get T5's padding (id 0) and attention masks."""
    return _char_level({"<pad>": 0, "</s>": 1, "<unk>": 2}, "$A </s>", max_length, eos_token="</s>", pad_token="<pad>")


def build_text_encoder(text_cfg: dict, kind: str = "clip") -> nn.Module:
    """A random-init text encoder: CLIP (``kind="clip"``; token ids default to the char tokenizer's for small
    vocabularies) or T5's encoder (``kind="t5"``; T5Config's ids, pad 0 and eos 1, are the char tokenizer's too)."""
    if kind == "t5":
        from transformers import T5Config, T5EncoderModel

        return T5EncoderModel(T5Config(**text_cfg))
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


def t5_prompt_encoder(tokenizer: Any, text_encoder: nn.Module, net: nn.Module,
                      max_length: int) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """The ``encode_prompts`` of a T5-conditioned model (PixArt-Σ), as ``PixArtSigmaPipeline.encode_prompt`` does it.

    Prompts are lower-cased and stripped (the pipeline's ``clean_caption=False`` path; its default caption cleaning
    needs bs4 and ftfy), padded to ``max_length`` tokens (300) and encoded with their attention mask; the transformer
    gets both. The empty prompt, encoded the same way, is the unconditional branch (the pipeline's negative prompt).
    """

    def encode_prompts(prompts: list[str]) -> dict[str, torch.Tensor]:
        """``encoder_hidden_states`` [B, L, D] (the denoiser's dtype) and ``encoder_attention_mask`` [B, L] (int64)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tok = tokenizer([p.lower().strip() for p in prompts], padding="max_length", max_length=max_length,
                        truncation=True, add_special_tokens=True, return_tensors="pt")
        ref = next(net.parameters())
        if next(text_encoder.parameters()).device != ref.device:
            text_encoder.to(ref.device)
        mask = tok.attention_mask.to(ref.device)
        with torch.no_grad():
            hidden = text_encoder(tok.input_ids.to(ref.device), attention_mask=mask)[0]
        return {"encoder_hidden_states": hidden.to(ref.dtype), "encoder_attention_mask": mask}

    encode_prompts.text_encoder = text_encoder
    encode_prompts.tokenizer = tokenizer
    return encode_prompts
