"""torch.profiler of one cached DiST training step (ViT-B/16 shapes, batch 2, gamma 2): where the branch time goes.

    python -m benchmarks.profile_branch [--device cpu|cuda] [--quick]     (--quick: 2 layers, 4 frames; a smoke run)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks._common import parse, report


def main() -> None:
    args = parse(__doc__.splitlines()[0])
    from dist_cache.model import DiST, DiSTConfig, DiSTSwitches
    device = torch.device(args.device)
    layers, frames_t = (2, 4) if args.quick else (12, 8)  # ViT-B/16's widths either way
    cfg = DiSTConfig(width=768, patch_size=16, image_size=224, num_frames=frames_t, embed_dim=512,
                     layers=list(range(layers)), switches=DiSTSwitches(gamma=2))
    net = DiST(cfg).to(device).train()
    feats = torch.randn(layers, 2, frames_t, 197, 768, device=device).half()
    frames = torch.randn(2, 2 * frames_t, 3, 224, 224, device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)

    def step():
        loss = F.cross_entropy(net(feats, frames), torch.tensor([0, 1], device=device))
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
        step()
    rows = []
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]:
        rows.append({"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 3),
                     "share": round(e.self_cpu_time_total / total, 3), "calls": e.count,
                     "gflops": round((e.flops or 0) / 1e9, 2)})
    report(parameters={"batch": 2, "gamma": 2, "layers": layers, "frames": frames_t,
                       "model": "DiST over ViT-B/16 shapes", "device": str(device)},
           results={"total_self_s": round(total / 1e6, 2), "top_ops": rows},
           ratio=None, goal="diagnostic (no goal)", verdict="n/a")


if __name__ == "__main__":
    main()
