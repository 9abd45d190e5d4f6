"""DiST: the trainable branch over frozen CLIP features, and OnlineDiST, which computes those features live.

`DiST.forward` is the reference's per-layer loop (docs/MODEL.md, "Structure"), in its exact order:

    Z = stem(V); R = 0
    for each integrated layer l:
        Z      = TBlock_l(Z)
        M      = FC_l(X_l) + R
        Z_next = Φ_l(M) + Z          # Φ sees M, which does not yet contain Ψ
        M'     = M + Ψ_l(Z)          # Ψ sees the post-T-Block Z, before Φ was added
        R      = IBlock_l(M')
        Z      = Z_next              # Φ's output reaches the NEXT layer's T-Block
    F = R + M'                       # pooling input (the paper's AdaPooling(Y^(L)) has no "+ M'")
    video = ln_post(AdaPooling(F) + Linear(mean_T cls(X_last))) @ proj

The last layer's Φ output is discarded by the reference (its parameters never get a gradient), so this
implementation does not build that Φ at all: Φ exists for layers 0 .. L-2 only. Its compute (a Linear
αC->βC on T*N tokens, 0.06 GMACs for ViT-B/16 8f) is therefore not run and not counted by the profiler.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_cache.model.common import init_reference_weights, without_autocast
from dist_cache.model.compact import TokenBatch, class_tokens, layer_input
from dist_cache.model.config import DiSTConfig
from dist_cache.model.integration import IntegrationBranch
from dist_cache.model.interaction import Phi, Psi
from dist_cache.model.pooling import VideoHead
from dist_cache.model.switches import ConfigError
from dist_cache.model.temporal import TemporalEncoder


class DiST(nn.Module):
    """The DiST branch: temporal encoder, integration branch, Ψ/Φ interactions and the pooling head.

    Switches (Tab. 1a/1b). The reference code has none of them; these are the semantics chosen here:
      * temporal=False: no stem, T-Blocks, Ψ or Φ; `frames` may be None.
      * integration=False: no FC_l and no I-Blocks; the head pools Ψ_last(Z) of the final temporal features
        (only the last layer's Ψ is built, and no Φ, since there is no integration state to send back).
      * both False: nothing to pool; the embedding is the CLIP-cls path alone, ln_post(Linear(mean cls)) @ proj,
        i.e. "spatial encoder only" (Tab. 1a, first row).
      * integ_to_temp=False (needs temporal and integration): no Φ; the T-Blocks run on the stem output alone.
      * temp_to_integ=False (needs temporal and integration): no per-layer Ψ inside the loop; the temporal
        encoder's final output enters once, as F = R + M' + Ψ_last(Z). Without that late fusion the temporal
        encoder would not reach the output at all, while Tab. 1a/1b show it helping with both interactions off
        (67.5 vs 65.9 on SSv2).
    Every parameter that is built receives a gradient under every switch setting.
    """

    def __init__(self, config: DiSTConfig):
        super().__init__()
        self.config = config
        L = config.num_layers
        use_temporal, use_integration = config.switches.temporal, config.switches.integration
        self.temporal = TemporalEncoder(config) if use_temporal else None
        self.integration = IntegrationBranch(config) if use_integration else None

        # Which layers own a Ψ / Φ (string keys, because ModuleDict needs them).
        both = use_temporal and use_integration
        self._psi_in_loop = both and config.switches.temp_to_integ
        if self._psi_in_loop:
            psi_layers = range(L)
        elif use_temporal:
            psi_layers = [L - 1]  # the single late fusion of the final temporal features
        else:
            psi_layers = []
        phi_layers = range(L - 1) if both and config.switches.integ_to_temp else []
        self.psi = nn.ModuleDict({str(i): Psi(config) for i in psi_layers})
        self.phi = nn.ModuleDict({str(i): Phi(config) for i in phi_layers})

        self.head = VideoHead(config, with_pool=use_temporal or use_integration)
        init_reference_weights(self)

    # ---- helpers ----------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.head.proj.dtype

    def _check_inputs(self, features: TokenBatch, frames: torch.Tensor | None) -> None:
        cfg = self.config
        expected = (cfg.num_layers, cfg.num_frames, cfg.num_tokens, cfg.width)
        if len(features.shape) != 5 or (features.shape[0], *features.shape[2:]) != expected:
            raise ValueError(
                f"features must be (L, B, T, N+1, C) = ({cfg.num_layers}, B, {cfg.num_frames}, {cfg.num_tokens}, "
                f"{cfg.width}) for this DiST, got {tuple(features.shape)}"
            )
        if self.temporal is None:
            return
        if frames is None:
            raise ValueError("frames are required when the temporal encoder is on (temporal=True)")
        want = (features.shape[1], cfg.dense_frames, 3, cfg.image_size, cfg.image_size)
        if tuple(frames.shape) != want:
            raise ValueError(f"frames must be (B, gamma*T, 3, H, W) = {want}, got {tuple(frames.shape)}")

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, features: TokenBatch, frames: torch.Tensor | None = None) -> torch.Tensor:
        """features (L, B, T, N+1, C) raw pre-LN CLIP tokens of the configured layers (any float dtype), or a
        compact store's codes (`CompactTokens`: int8 dequantised where read, and every map that reads tokens folds
        the projection in, dist_cache/model/compact.py); frames (B, γT, 3, H, W) normalised dense frames, whose
        every γ-th frame (0, γ, ...) is the one CLIP saw. Returns the video embedding (B, E), not normalised."""
        self._check_inputs(features, frames)
        # Each layer is cast where it is used, never the whole (L, B, T, N+1, C) stack at once (at fp16 to
        # fp32, a copy twice the batch's size: ~1.9 GB for ViT-B/16 at B=32).
        z = self.temporal.stem(frames.to(self.dtype)) if self.temporal is not None else None

        r = m_prime = None
        for i in range(self.config.num_layers):
            key = str(i)
            if self.temporal is not None:
                z = self.temporal.blocks[i](z)
            if self.integration is None:
                continue
            m = self.integration.fcs[i](*layer_input(features, i, self.dtype))
            if r is not None:
                m = m + r
            z_next = z + self.phi[key](m) if key in self.phi else z
            m_prime = m + self.psi[key](z) if self._psi_in_loop else m
            r = self.integration.blocks[i](m_prime)
            z = z_next

        if self.integration is not None:
            f = r + m_prime
            if self.temporal is not None and not self._psi_in_loop:
                f = f + self.psi[str(self.config.num_layers - 1)](z)
        elif self.temporal is not None:
            f = self.psi[str(self.config.num_layers - 1)](z)
        else:
            f = None
        return self.head(f, *class_tokens(features, self.dtype))

    def logits(self, video_emb: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """logit_scale * cosine(video, text): (B, E) x (K, E) -> (B, K), fp32. The scale is fixed (CLIP's 100).

        Always in fp32, outside any autocast: in bf16 a cosine has 8 significant bits, so at scale 100 the
        logits would be rounded to steps of 0.06-0.5 and the gaps between classes, which are what the loss
        learns from, lost in that rounding (docs/MODEL.md, "Precision").
        """
        with without_autocast(video_emb.device.type):
            v = video_emb.float()
            v = v / v.norm(dim=-1, keepdim=True)
            t = text_features.to(device=v.device, dtype=torch.float32)
            t = t / t.norm(dim=-1, keepdim=True)
            return self.config.switches.logit_scale * v @ t.t()


def check_branch_state(config: DiSTConfig, state: object, what: str = "checkpoint") -> None:
    """Refuse, as one line, a state dict that is not exactly the weights of the branch `config` describes.

    Checked against a build on the meta device, before the branch is built for real: a malformed checkpoint
    (missing or extra tensors, wrong shapes) allocates nothing.
    """
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConfigError(f"{what}: the branch weights are not a mapping of names to tensors; the file is damaged")
    with torch.device("meta"):
        expected = DiST(config).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and (state[k].shape != expected[k].shape or
                                                    state[k].is_floating_point() != expected[k].is_floating_point())]
    if missing or unexpected or wrong:
        first = (f"{missing[0]} is missing" if missing else f"{unexpected[0]} is unexpected" if unexpected else
                 f"{wrong[0]} is {state[wrong[0]].dtype} {tuple(state[wrong[0]].shape)}, not "
                 f"{expected[wrong[0]].dtype} {tuple(expected[wrong[0]].shape)}")
        raise ConfigError(f"{what}: the branch weights do not match its DiST config ({first}; "
                          f"{len(missing) + len(unexpected) + len(wrong)} such tensors); the file is damaged")


class OnlineDiST(nn.Module):
    """A frozen `SpatialEncoder` plus a `DiST`: features computed live from the dense frames.

    CLIP sees exactly the dense frames 0, γ, 2γ, ... (`frames[:, ::gamma]`), so this computes the same
    function as feeding cached features of those frames to `DiST`. Checkpoints hold `.dist`'s state only
    (CLIP is rebuilt from its own weights).
    """

    def __init__(self, encoder: nn.Module, dist: DiST):
        super().__init__()
        if list(encoder.layers) != dist.config.layers:
            raise ValueError(f"encoder records layers {list(encoder.layers)} but DiST expects {dist.config.layers}")
        self.encoder = encoder
        self.dist = dist

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, γT, 3, H, W) -> (L, B, T, N+1, C), CLIP run under no_grad on the sparse frames, in the encoder's
        precision (its dtype: fp32, or the fp16/bf16 of its autocast); DiST casts each layer where it uses it.
        The tower's tokens become the branch's by the encoder's `branch_tokens`, the rule cached batches follow
        (dist_cache/model/tokens.py)."""
        b = frames.shape[0]
        sparse = frames[:, :: self.dist.config.switches.gamma]
        # Frozen CLIP runs as extraction ran it, in the encoder's own precision: the training step's autocast is
        # switched off around it, or online runs would get other features than the cached ones.
        with torch.no_grad(), without_autocast(sparse.device.type):
            tokens, _ = self.encoder(sparse.reshape(-1, *sparse.shape[2:]))
        return self.encoder.branch_tokens(tokens.reshape(tokens.shape[0], b, sparse.shape[1], *tokens.shape[2:]))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.dist(self.features(frames), frames if self.dist.temporal is not None else None)

    def logits(self, video_emb: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return self.dist.logits(video_emb, text_features)

