"""Reproduce the GFLOPs of DiST Table 1 (c)-(f) (ViT-B/16, 8 frames, one view) and the parameter count.

Prints ONE JSON object. For every setting: `ours` (what this pipeline runs), `paper_convention` (plus the
reference's patch embedding of the non-CLIP dense frames, which is how the paper counts), the paper's value
and the relative difference of the paper-convention count from it. Runs on the meta device in seconds.

    python -m benchmarks.flops_table [--quick]     (--quick: the default setting alone, a smoke run)
"""

from __future__ import annotations

import argparse
import json

from dist_cache.flops import profile_dist

SETTINGS = [
    ("default", {}),
    ("1d gamma 1", {"gamma": 1}),
    ("1d gamma 2", {"gamma": 2}),
    ("1d gamma 4", {"gamma": 4}),
    ("1d gamma 8", {"gamma": 8}),
    ("1e alpha 96", {"alpha_dim": 96}),
    ("1e alpha 192", {"alpha_dim": 192}),
    ("1e alpha 384", {"alpha_dim": 384}),
    ("1e alpha 768", {"alpha_dim": 768}),
    ("1f beta 64", {"beta_dim": 64}),
    ("1f beta 96", {"beta_dim": 96}),
    ("1f beta 128", {"beta_dim": 128}),
    ("1f beta 192", {"beta_dim": 192}),
    # Tab. 1c T-Block variants: informational; the paper's joint-transformer block is not specified.
    ("1c C3D", {"t_block": "c3d"}),
    ("1c joint transformer", {"t_block": "joint"}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the default setting alone (a smoke run)")
    args = p.parse_args()
    rows = {}
    for name, kwargs in SETTINGS[:1] if args.quick else SETTINGS:
        r = profile_dist("ViT-B-16", frames=8, **kwargs)
        rows[name] = {
            "ours": round(r["gflops"], 2),
            "paper_convention": round(r["gflops_paper_convention"], 2),
            "paper": r["paper_gflops"],
            "rel_diff_paper_convention": round(r["paper_rel_diff"], 4),
            "rel_diff_ours": round(r["gflops"] / r["paper_gflops"] - 1, 4),
            "dist_params_m": round(r["params"]["dist_trainable"] / 1e6, 2),
        }
    default = profile_dist("ViT-B-16", frames=8)
    params = default["params"]
    print(json.dumps({
        "model": "ViT-B-16",
        "frames": 8,
        "convention": default["convention"],
        "clip_gflops_per_frame": round(default["clip_gflops_per_frame"], 2),
        "gflops_by_part_default": {k: round(v, 2) for k, v in default["gflops_by_part"].items()},
        "table1": rows,
        "params_m": {
            "clip_visual_frozen": round(params["clip_visual_frozen"] / 1e6, 2),
            "dist_trainable": round(params["dist_trainable"] / 1e6, 2),
            "total": round(params["total"] / 1e6, 2),
            "paper_total": 105,
        },
    }, indent=1))


if __name__ == "__main__":
    main()
