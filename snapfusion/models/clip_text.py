"""CLIP's text tower in plain torch: transformers' ``CLIPTextModel`` (v5, sdpa attention) op for op, with its module
names, so its state dict and outputs are the same bit for bit (tests/test_text.py checks both) without importing
transformers, which costs seconds at start-up.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (2021), the text encoder:
pre-LN transformer, causal self-attention, quick-GELU MLP, final layer norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class ClipTextOutput:
    """``last_hidden_state`` (B, T, D) after the final layer norm; ``pooler_output`` (B, D) at the end token;
    ``hidden_states``: the embeddings and every layer's output (before the final norm) if asked for."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation, ``x * sigmoid(1.702 x)`` (transformers' QuickGELUActivation)."""
    return x * torch.sigmoid(1.702 * x)


class ClipEmbeddings(nn.Module):
    """Token ids (B, T) -> token + position embeddings (B, T, D)."""

    def __init__(self, vocab: int, width: int, positions: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.position_embedding = nn.Embedding(positions, width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] > self.position_embedding.weight.shape[0]:
            raise ValueError(f"{input_ids.shape[-1]} tokens, more than the {self.position_embedding.weight.shape[0]} "
                             "positions of the text tower")
        # transformers keeps these ids in a non-persistent buffer; made here, a model built on the meta device and
        # given its saved tensors is complete
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)[None]  # (1, T)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class ClipAttention(nn.Module):
    """Causal multi-head self-attention (B, T, D) -> (B, T, D)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.head_dim = width // heads
        self.scale = self.head_dim ** -0.5
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=self.scale, is_causal=True)
        out = out.transpose(1, 2).contiguous()  # (B, T, H, d)
        return self.out_proj(out.reshape(*x.shape[:-1], -1).contiguous())


class ClipMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = quick_gelu if act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(ln1 x), then + mlp(ln2 x)."""

    def __init__(self, width: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.self_attn = ClipAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.mlp = ClipMLP(width, hidden, act)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, layers: list[ClipLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class ClipTextModel(nn.Module):
    """``CLIPTextModel``'s layout (embeddings, encoder.layers.N, final_layer_norm): ids (B, T) -> ``ClipTextOutput``.

    ``eos_token_id`` picks the pooled position as transformers does: 2 means the largest id (the old CLIP rule),
    any other value its first occurrence."""

    def __init__(self, *, vocab: int, width: int, layers: int, heads: int, hidden: int, positions: int,
                 act: str = "quick_gelu", eps: float = 1e-5, eos_token_id: int = 49407):
        super().__init__()
        self.eos_token_id = eos_token_id
        self.embeddings = ClipEmbeddings(vocab, width, positions)
        self.encoder = ClipEncoder([ClipLayer(width, heads, hidden, act, eps) for _ in range(layers)])
        self.final_layer_norm = nn.LayerNorm(width, eps=eps)
        init_clip_weights(self)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> ClipTextOutput:
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        x = self.embeddings(input_ids)  # (B, T, D)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        x = self.final_layer_norm(x)
        ids = input_ids.to(dtype=torch.int, device=x.device)
        end = ids.argmax(dim=-1) if self.eos_token_id == 2 else (ids == self.eos_token_id).int().argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), end]  # (B, D)
        return ClipTextOutput(x, pooled, tuple(states) if output_hidden_states else None)


@torch.no_grad()
def init_clip_weights(model: ClipTextModel, factor: float = 1.0) -> None:
    """transformers' CLIP initialisation draw for draw, so a seeded model is the same as theirs: its generic pass
    (every Linear and Embedding at std 0.02) and then CLIP's ``_init_weights``, module by module in post-order."""
    emb, layers = model.embeddings, model.encoder.layers
    for table in (emb.token_embedding, emb.position_embedding, emb.token_embedding, emb.position_embedding):
        nn.init.normal_(table.weight, std=0.02 * factor)  # the generic pass, then CLIPTextEmbeddings'
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        width = attn.q_proj.in_features
        in_std = width ** -0.5 * (2 * len(layers)) ** -0.5 * factor
        for lin in (attn.k_proj, attn.v_proj, attn.q_proj, attn.out_proj):  # the generic pass, children in order
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        for lin, std in ((attn.q_proj, in_std), (attn.k_proj, in_std), (attn.v_proj, in_std),
                         (attn.out_proj, width ** -0.5 * factor)):
            nn.init.normal_(lin.weight, std=std)
        for lin in (mlp.fc1, mlp.fc2):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        nn.init.normal_(mlp.fc1.weight, std=(2 * width) ** -0.5 * factor)
        nn.init.normal_(mlp.fc2.weight, std=in_std)
    for norm in [m for m in model.modules() if isinstance(m, nn.LayerNorm)]:
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)
