"""Optional quantization of attention matmuls (``quant.attn_bits``) for diffusers ``Attention`` modules.

The paper keeps attention matmuls in FP; this installs a processor that fake-quantizes the inputs of
both matmuls (q, k for QK^T; softmax output and v for PV) with per-tensor quantizers held in a
submodule ``attn.matmul_quant`` so they are saved, moved and initialised like every other quantizer.
"""
from __future__ import annotations

import torch
from torch import nn

from qdiff.quant.quantizer import UniformQuantizer


class AttnMatmulQuantizers(nn.Module):
    def __init__(self, bits: int, symmetric: bool) -> None:
        super().__init__()
        self.q = UniformQuantizer(bits, symmetric, None, learnable_scale=True, required=False)
        self.k = UniformQuantizer(bits, symmetric, None, learnable_scale=True, required=False)
        self.v = UniformQuantizer(bits, symmetric, None, learnable_scale=True, required=False)
        # Softmax outputs lie in [0, 1]: unsigned, asymmetric, fixed range, never learned.
        self.probs = UniformQuantizer(bits, False, None)
        self.probs.set_params(torch.tensor(1.0 / (2 ** bits - 1)), torch.tensor(0.0))


class QuantAttnProcessor:
    """Attention forward of diffusers' default processor with fake-quantized matmul inputs."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        mq: AttnMatmulQuantizers = attn.matmul_quant
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(mq.q(query))
        key = attn.head_to_batch_dim(mq.k(key))
        value = attn.head_to_batch_dim(mq.v(value))
        probs = mq.probs(attn.get_attention_scores(query, key, attention_mask))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


#: The processors :class:`QuantAttnProcessor` reproduces (diffusers' default self/cross attention: UNets, DiT, PixArt).
DEFAULT_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0")


def install_attention_quant(model: nn.Module, bits: int, symmetric: bool) -> list[str]:
    """Attach matmul quantizers and the processor to every diffusers Attention; returns their names.

    Attention with another processor (SD3's joint attention, FLUX's attention modules, ...) is refused in one line
    rather than silently left in FP or computed the wrong way.
    """
    from qdiff.errors import ConfigError

    try:
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover
        return []
    for name, m in model.named_modules():
        processor = type(getattr(m, "processor", None)).__name__
        if (processor not in DEFAULT_PROCESSORS if isinstance(m, Attention) else isinstance(m, AttentionModuleMixin)):
            raise ConfigError(f"quant.attn_bits: {name} ({type(m).__name__} with {processor}) is not supported: attention "
                              "matmuls are quantized for diffusers' default attention (UNets, DiT, PixArt); leave "
                              "quant.attn_bits null for this model")
    names = []
    for name, m in model.named_modules():
        if isinstance(m, Attention):
            m.matmul_quant = AttnMatmulQuantizers(bits, symmetric).to(next(m.parameters()).device)
            m.set_processor(QuantAttnProcessor())
            names.append(name)
    return names
