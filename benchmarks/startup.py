"""Start-up: loading a ViT-B/16-sized CLIP from a local checkpoint, as dist-cache 0.1 did it and as load_backbone does.

0.1: `open_clip.create_model(name, pretrained=PATH)` (random initialisation of every weight, then a weights-only
torch.load and a copy into the model) and a hash that copied every tensor's bytes. Now: the network is built on
the meta device, the checkpoint's tensors are assigned to it, and the hash reads them in place. Both run in this
process, interleaved, on the same checkpoint (in the page cache after the first read); the minimum of the
repetitions is reported.

    python -m benchmarks.startup [--device cpu|cuda] [--quick]     (--quick: the tiny CLIP, a smoke run)
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import parse, report

MODEL = "ViT-B-16"
QUICK_MODEL = "dist-tiny"  # --quick: the bundled tiny config, seconds on a CPU


def hash_0_1(module: torch.nn.Module) -> str:
    """dist-cache 0.1's weights_sha256 (every tensor's bytes copied out first): the same digest, slower."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_0_1(model: str, checkpoint: str, device: str) -> tuple[float, str]:
    from dist_cache.backbone import _open_clip

    open_clip = _open_clip()  # registers dist-tiny, which 0.1 did not know
    start = time.perf_counter()
    clip = open_clip.create_model(model, pretrained=checkpoint, device=device)
    clip.eval().requires_grad_(False)
    digest = hash_0_1(clip)
    return time.perf_counter() - start, digest


def load_now(model: str, checkpoint: str, device: str) -> tuple[float, str]:
    from dist_cache.backbone import load_backbone

    start = time.perf_counter()
    backbone = load_backbone(model, checkpoint, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, backbone.weights_sha256


def main() -> None:
    args = parse(__doc__.splitlines()[0])
    from dist_cache.backbone import _open_clip

    start = time.perf_counter()
    open_clip = _open_clip()
    import_s = time.perf_counter() - start
    reps = 2 if args.quick else 4
    model = QUICK_MODEL if args.quick else MODEL
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        checkpoint = str(Path(tmp) / f"{model}.pt")
        torch.manual_seed(0)
        torch.save(open_clip.create_model(model).state_dict(), checkpoint)
        times: dict[str, list[float]] = {"dist_cache_0_1": [], "load_backbone": []}
        digests = set()
        for _ in range(reps):
            for name, load in (("dist_cache_0_1", load_0_1), ("load_backbone", load_now)):
                seconds, digest = load(model, checkpoint, args.device)
                times[name].append(round(seconds, 3))
                digests.add(digest)
    best = {name: min(values) for name, values in times.items()}
    ratio = best["dist_cache_0_1"] / best["load_backbone"]
    report(
        {"model": model, "checkpoint": "fp32 state dict (torch.save)", "device": args.device, "repetitions": reps},
        {"seconds": times, "best_seconds": best, "import_open_clip_s": round(import_s, 3),
         "same_digest": len(digests) == 1},
        round(ratio, 2),
        "load_backbone faster than 0.1's load; the first video within 25 s of the command on an H200 box",
        f"load_backbone {best['load_backbone']:.2f} s vs 0.1 {best['dist_cache_0_1']:.2f} s ({ratio:.1f}x)",
    )


if __name__ == "__main__":
    main()
