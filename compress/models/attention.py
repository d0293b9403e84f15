"""Self-attention whose heads can be removed.

``nn.MultiheadAttention`` ties the width of q, k, v and the output projection to ``embed_dim``,
the width of the residual stream around it, so a whole head cannot be removed without narrowing
every block's input and output. ``SelfAttention`` computes the same function with one ``qkv``
Linear (``3 · num_heads · head_dim`` outputs) and an ``out_proj`` Linear, so the number of heads is
its own dimension: torch-pruning removes heads from it (``num_heads`` / ``prune_num_heads``).

``decouple_attention`` swaps it in for every ``nn.MultiheadAttention`` of a model, weights
copied, outputs unchanged. A checkpoint of a converted model records it by its keys
(``….qkv.weight`` instead of ``….in_proj_weight``); ``compress.checkpoint.load_weights`` converts a
fresh model the same way before loading, so no pickled module is ever needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError


class SelfAttention(nn.Module):
    """Drop-in for a self-attention ``nn.MultiheadAttention`` (``attn(x, x, x)``), heads separable."""

    def __init__(
        self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True, dropout: float = 0.0,
        batch_first: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_heads, self.head_dim, self.dropout, self.batch_first = num_heads, head_dim, dropout, batch_first
        self.qkv = nn.Linear(embed_dim, 3 * num_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, name: str = "") -> SelfAttention:
        """The same function as ``mha`` (weights copied). Refuses what it cannot reproduce."""
        where = f"{name!r} " if name else ""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise CompressError(
                f"attention {where}uses separate key/value widths, bias_k/bias_v or add_zero_attn; "
                "only plain self-attention can lose whole heads"
            )
        bias = mha.in_proj_bias is not None
        new = cls(
            mha.embed_dim, mha.num_heads, mha.head_dim, bias=bias, dropout=mha.dropout, batch_first=mha.batch_first
        )
        new = new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            new.qkv.weight.copy_(mha.in_proj_weight)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                new.qkv.bias.copy_(mha.in_proj_bias)
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise CompressError("SelfAttention computes self-attention only (query, key and value the same tensor)")
        if key_padding_mask is not None or attn_mask is not None:
            raise CompressError("SelfAttention does not take attention masks (converted for head pruning)")
        x = query if self.batch_first else query.transpose(0, 1)
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=is_causal)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"


def decouple_attention(model: nn.Module, only: set[str] | None = None) -> int:
    """Replace ``nn.MultiheadAttention`` modules (all, or those named in ``only``) by
    ``SelfAttention`` in place; returns how many were replaced."""
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention) and (only is None or name in only)
    ]
    for name, mha in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, SelfAttention.from_mha(mha, name))
    return len(targets)
