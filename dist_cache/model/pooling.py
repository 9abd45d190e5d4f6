"""AdaPooling and the video embedding head (paper §3.4, Eq. 7; docs/MODEL.md, "Structure")."""

from __future__ import annotations

import torch
from torch import nn

from dist_cache.model.common import mlp, new_token, without_autocast
from dist_cache.model.compact import TokenLinear
from dist_cache.model.config import DiSTConfig


class CrossAttentionUnit(nn.Module):
    """q += MHA(LN(q), LN(kv), LN(kv)); q += MLP(LN2(q)).

    ONE LayerNorm is applied to the query, the key and the value alike, as in the reference's
    `CrossAttentionBlockGenral`; the MLP is 4x wide with QuickGELU.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = mlp(dim, 4 * dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        kv = self.norm(context)
        query = query + self.attn(self.norm(query), kv, kv, need_weights=False)[0]
        return query + self.mlp(self.norm_mlp(query))


class AdaPoolBlock(nn.Module):
    """A spatial unit (per-frame query over that frame's N+1 tokens) then a temporal unit (video query over frames)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.spatial = CrossAttentionUnit(dim, heads)
        self.temporal = CrossAttentionUnit(dim, heads)


class AdaPooling(nn.Module):
    """Pool (B, T, N+1, αC) to (B, αC).

    The per-frame queries s and the video query v start from learned tokens and are carried from block
    to block, while the pooled features stay fixed. One temporal positional embedding (T, αC), shared by
    all blocks, is added to s before the temporal unit reads it.
    """

    def __init__(self, config: DiSTConfig):
        super().__init__()
        dim, heads = config.switches.alpha_dim, config.pool_num_heads
        self.frame_query = new_token(1, 1, dim)   # reference: aggregated_spatial_cls_token
        self.video_query = new_token(1, 1, dim)   # reference: aggregated_cls_token
        self.temporal_pos = new_token(1, config.num_frames, dim)
        self.blocks = nn.ModuleList(AdaPoolBlock(dim, heads) for _ in range(config.switches.pool_blocks))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        b, t, n, c = f.shape
        tokens = f.reshape(b * t, n, c)
        s = self.frame_query.to(f.dtype).expand(b * t, 1, c)
        v = self.video_query.to(f.dtype).expand(b, 1, c)
        pos = self.temporal_pos.to(f.dtype)
        for block in self.blocks:
            s = block.spatial(s, tokens)
            v = block.temporal(v, s.reshape(b, t, c) + pos)
        return v[:, 0]


class VideoHead(nn.Module):
    """Video embedding = ln_post(v + Linear C->αC (mean over T of CLIP's raw cls token, last layer)) @ proj.

    This is the reference's fusion with CLIP: the cls token of the last selected block, pre-`ln_post`, is
    averaged over frames and added to the pooled branch output. `ln_post` and `proj` (αC x E, init
    randn * αC^-0.5) belong to the branch and are trained; CLIP's own ln_post/proj are not used.
    `pool` is None when there is nothing to pool (no temporal encoder and no integration branch), which
    leaves only the CLIP-cls path: the "spatial encoder only" row of Tab. 1a.
    """

    def __init__(self, config: DiSTConfig, with_pool: bool):
        super().__init__()
        self.pool = AdaPooling(config) if with_pool else None
        alpha = config.switches.alpha_dim
        self.cls_proj = TokenLinear(config.width, alpha)
        self.ln_post = nn.LayerNorm(alpha)
        self.proj = nn.Parameter(torch.randn(alpha, config.embed_dim) * alpha**-0.5)

    def forward(self, f: torch.Tensor | None, clip_cls: torch.Tensor, *fold: torch.Tensor) -> torch.Tensor:
        """f (B, T, N+1, αC) or None; clip_cls (B, T, C) -> (B, E), fp32. With `fold` (components, mean),
        clip_cls are PCA codes (B, T, K) of the class tokens: the mean over frames commutes with the projection.

        The last normalisation and the projection run in fp32 outside any autocast: the embedding's direction is
        all the cosine logits see, and (B, αC) x (αC, E) costs nothing next to the branch.
        """
        x = self.cls_proj(clip_cls.mean(dim=1), *fold)
        if self.pool is not None:
            x = x + self.pool(f)
        with without_autocast(x.device.type):
            return self.ln_post(x.float()) @ self.proj.float()
