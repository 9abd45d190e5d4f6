"""DiSTSwitches: every setting of the DiST branch that is not a shape of the backbone, defined once.

Each field carries its default, its allowed values and its help text in the field's metadata. From this one
definition come the `train` and `profile` command-line options (`dist_cache.model.options`), the validation
(`DiSTSwitches.__post_init__`), checkpoints (`to_dict` / `from_dict`) and the recipes' presets.

Names follow the paper (Qing et al., ICCV 2023, §3): alpha_dim = αC is the integration branch width (the
reference's INTEGRATION_DIM), beta_dim = βC the temporal encoder width (TEMPORAL_DIM), and gamma = γ the ratio
of dense (temporal encoder) frames to sparse (CLIP) frames. Beware the reference's SPARSE_SAMPLE_ALPHA, which
is γ, not α (docs/MODEL.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dist_cache.errors import UserError
from dist_cache.sampling import DENSE_GAMMAS

T_BLOCKS = ("r2plus1d", "c3d", "tada", "joint")
PSI_MODES = ("dconv", "avg", "max")
PHI_MODES = ("nearest", "trilinear", "deconv")


class ConfigError(UserError, ValueError):
    """An invalid DiST setting. A UserError so the CLI prints it as one line, a ValueError for library callers."""


def switch(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
           maximum: float | None = None, cli: bool = True) -> Any:
    """A DiSTSwitches field. `cli=False`: a library-only setting (no command-line option).
    A boolean switch defaults to on and its option is `--no-NAME`, whose help says what turning it off drops."""
    meta = {"help": help, "choices": choices, "min": minimum, "max": maximum, "cli": cli}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class DiSTSwitches:
    """The branch's architecture switches; the defaults are the reference's SSv2 configuration for ViT-B/16.

    The bounds are generous (the paper explores alpha_dim <= 768, beta_dim <= 192) but finite: a checkpoint
    from a stranger cannot make us build a 15 GB branch.
    """

    gamma: int = switch(2, "Dense frames per sparse frame for the temporal encoder (paper's gamma, Tab. 1d).",
                        choices=DENSE_GAMMAS)
    alpha_dim: int = switch(384, "Integration branch width (alpha*C, Tab. 1e).", minimum=1, maximum=4096)
    beta_dim: int = switch(96, "Temporal encoder width (beta*C, Tab. 1f).", minimum=1, maximum=1024)
    t_block: str = switch("r2plus1d", "T-Block of the temporal encoder (Tab. 1c): (2+1)D convs, one 3D conv, "
                          "a temporally adaptive conv (TAdaConv), or joint space-time attention.", choices=T_BLOCKS)
    psi: str = switch("dconv", "Temporal -> integration downsampling (Tab. 2a).", choices=PSI_MODES)
    phi: str = switch("nearest", "Integration -> temporal upsampling (Tab. 2b).", choices=PHI_MODES)
    temporal: bool = switch(True, "Drop the temporal encoder (Tab. 1a).")
    integration: bool = switch(True, "Drop the integration branch (Tab. 1a).")
    integ_to_temp: bool = switch(True, "Drop Phi (Tab. 1b).")
    temp_to_integ: bool = switch(True, "Drop Psi (Tab. 1b).")
    pool_blocks: int = switch(2, "AdaPooling blocks (reference: 2 for SSv2, 4 for K400).", minimum=1, maximum=16)
    pool_heads: int | None = switch(None, "AdaPooling attention heads; None: 64-wide heads (6 for alpha_dim 384).",
                                    minimum=1, maximum=4096, cli=False)
    stem_t_kernel: int = switch(5, "Temporal kernel of the temporal encoder's stem (odd: no frame is dropped).",
                                minimum=1, maximum=15, cli=False)
    logit_scale: float = switch(100.0, "Fixed scale of the cosine logits (CLIP's).", minimum=1e-3, maximum=1e4,
                                cli=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        if self.pool_heads is not None and self.alpha_dim % self.pool_heads:
            raise ConfigError(f"DiST pool_heads={self.pool_heads} must divide alpha_dim={self.alpha_dim}")
        if self.stem_t_kernel % 2 == 0:
            # An odd kernel with padding k//2 keeps all gamma*T frames (the reference never downsamples time).
            raise ConfigError(f"DiST stem_t_kernel={self.stem_t_kernel} must be odd")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, what: str = "DiST switches") -> DiSTSwitches:
        """Validate a recorded dict (a checkpoint's): unknown keys are refused, missing ones take the default."""
        if not isinstance(data, dict):
            raise ConfigError(f"{what} must be a JSON object, not {type(data).__name__}")
        unknown = sorted(set(data) - set(SWITCH_NAMES))
        if unknown:
            raise ConfigError(f"{what} has unknown keys {unknown[:5]}; it was written by a different version")
        return cls(**data)

    def replace(self, **changes: Any) -> DiSTSwitches:
        """A copy with `changes` applied, validated like any other."""
        unknown = sorted(set(changes) - set(SWITCH_NAMES))
        if unknown:
            raise ConfigError(f"unknown DiST settings {unknown}; use some of {', '.join(SWITCH_NAMES)}")
        return dataclasses.replace(self, **changes)


SWITCH_NAMES = tuple(f.name for f in dataclasses.fields(DiSTSwitches))


def _check_field(f: dataclasses.Field, value: Any) -> None:
    """One switch's type and range, from its declared type and metadata; one-line ConfigError otherwise."""
    meta, name = f.metadata, f.name
    if value is None and f.default is None:
        return
    kind = type(f.default) if f.default is not None else int
    # bool is an int in Python: keep the two apart, and accept an int where a float is declared.
    ok = isinstance(value, bool) if kind is bool else (
        isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
        isinstance(value, kind) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"DiST {name}={str(value)[:40]!r} must be a {kind.__name__}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"DiST {name}={value!r} is unknown; use one of {', '.join(map(str, meta['choices']))}")
    low, high = meta["min"], meta["max"]
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"DiST {name}={value} must lie in [{low}, {high}]")
