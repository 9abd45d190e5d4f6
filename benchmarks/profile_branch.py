"""torch.profiler of one cached DiST training step (ViT-B/16 shapes, batch 2, gamma 2): where the branch time goes.

    python benchmarks/profile_branch.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import parse, report  # noqa: E402


def main() -> None:
    args = parse(__doc__.splitlines()[0])
    from dist_cache.model import DiST, DiSTConfig, DiSTSwitches
    device = torch.device(args.device)
    cfg = DiSTConfig(width=768, patch_size=16, image_size=224, num_frames=8, embed_dim=512, layers=list(range(12)),
                     switches=DiSTSwitches(gamma=2))
    net = DiST(cfg).to(device).train()
    feats = torch.randn(12, 2, 8, 197, 768, device=device).half()
    frames = torch.randn(2, 16, 3, 224, 224, device=device)
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
    report(parameters={"batch": 2, "gamma": 2, "model": "DiST over ViT-B/16 shapes", "device": str(device)},
           results={"total_self_s": round(total / 1e6, 2), "top_ops": rows},
           ratio=None, goal="diagnostic (no goal)", verdict="n/a")


if __name__ == "__main__":
    main()
