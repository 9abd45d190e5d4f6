"""Accuracy of compact stores against fp16, paired by seed, in one command: the training and test stores are copied
to each format (`dist-cache copy --pca ... --dtype ...`, each fitted on its own store), the same runs are trained
on each (same seeds, schedule and branch), and each is scored on its format's test store.

    python -m benchmarks.compact_accuracy --train TRAIN.zarr --test TEST.zarr [--out RESULT.json]
        [--formats int8,pca128-int8,pca0.99] [--seeds 0,1,2] [--epochs 10] [--batch-size 8] [--lr 1e-3]
        [--no-temporal (only the cached CLIP features can solve the task)] [--video-root DIR] [--pretrained PATH]
        [--workdir DIR]
    python -m benchmarks.compact_accuracy --quick   (a generated tiny task: a smoke run)

A format is `int8` (int8 with channel and token scales), `pcaK` or `pcaF` (fp16 PCA codes: K components, or the
share F of the variance), or either followed by `-int8` (int8 codes). Reported per format: top-1 per seed, its mean,
the mean of the per-seed differences to fp16 (paired), bytes per clip view, and the fit's recorded per-layer error
on held-out videos. Stores and runs are kept in --workdir, so a rerun resumes (copies resume, trained runs are
scored again)."""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import machine


def parse_format(name: str) -> dict:
    """`int8`, `pca128`, `pca0.99`, `pca128-int8` -> copy_store's options."""
    from pipelines.compact import parse_pca

    base, _, suffix = name.partition("-")
    if base == "int8" and not suffix:
        return {"dtype": "int8"}
    if not base.startswith("pca") or suffix not in ("", "int8"):
        raise SystemExit(f"error: format {name!r}: use int8, pcaK, pcaF, pcaK-int8 or pcaF-int8")
    return {"pca": parse_pca(base[3:]), "dtype": "int8" if suffix else "fp16"}


def quick_task(workdir: Path) -> tuple[Path, Path, str, str]:
    """A tiny generated task (the demo's motion classes, dist-tiny with random weights): train and test stores."""
    from dist_cache.backbone import load_backbone
    from dist_cache.synthetic import make_motion_dataset
    from pipelines.extract.extractor import ExtractOptions, extract

    data = make_motion_dataset(workdir / "data", videos_per_class=2, seed=0)
    checkpoint = workdir / "dist-tiny-random.pt"
    torch.manual_seed(0)
    torch.save(load_backbone("dist-tiny", "none", allow_random_weights=True).model.state_dict(), checkpoint)
    stores = []
    for split, manifest in (("train", "train.csv"), ("test", "val.csv")):
        out = workdir / f"{split}.zarr"
        extract(ExtractOptions(manifest=str(data / manifest), video_root=str(data / "videos"), out=str(out),
                               model="dist-tiny", pretrained=str(checkpoint), frames=4, views=1, split=split,
                               dense_frames=True, decode_workers=1), progress=False)
        stores.append(out)
    return stores[0], stores[1], str(data / "videos"), str(checkpoint)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--train"), p.add_argument("--test")
    p.add_argument("--out", default=None, help="JSON file for the whole report (default: only the summary)")
    p.add_argument("--formats", default="int8,pca128-int8,pca0.99-int8")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--no-temporal", action="store_true", help="the branch without the temporal encoder")
    p.add_argument("--video-root", default=None, help="for stores without dense frames")
    p.add_argument("--pretrained", default=None, help="the stores' CLIP checkpoint, where it is a local file")
    p.add_argument("--workdir", default=None)
    p.add_argument("--quick", action="store_true", help="a generated tiny task, one seed, one epoch, two formats")
    args = p.parse_args()

    from dist_cache.model import DiSTSwitches
    from pipelines.compact import sample_bytes
    from pipelines.copy import copy_store
    from pipelines.train.evaluation import EvalOptions, evaluate
    from pipelines.train.run import TrainOptions, train
    from storage import FeatureStore

    tick = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="compact-accuracy-") as tmp:
        workdir = Path(args.workdir or tmp)
        if args.quick:
            train_store, test_store, video_root, pretrained = quick_task(workdir)
            formats, seeds, epochs = ["int8", "pca8-int8"], [0], 1
        else:
            if not (args.train and args.test):
                raise SystemExit("error: give --train and --test stores (or --quick)")
            train_store, test_store = Path(args.train), Path(args.test)
            video_root, pretrained = args.video_root, args.pretrained
            formats, seeds, epochs = args.formats.split(","), [int(s) for s in args.seeds.split(",")], args.epochs
        switches = DiSTSwitches(gamma=2, alpha_dim=64, beta_dim=32, temporal=not args.no_temporal)
        results = {}
        for name in ["fp16", *formats]:
            stores = {"train": train_store, "test": test_store}
            if name != "fp16":
                for split in stores:
                    stores[split] = workdir / f"{split}-{name}.zarr"
                    copy_store(str(train_store if split == "train" else test_store), str(stores[split]),
                               progress=False, **parse_format(name))
            top1 = []
            for seed in seeds:
                run = workdir / "runs" / f"{name}-s{seed}"
                result = train(TrainOptions(cache=str(stores["train"]), video_root=video_root, out=str(run),
                                            epochs=epochs, batch_size=args.batch_size, lr=args.lr, warmup_epochs=1,
                                            seed=seed, decode_workers=0, pretrained=pretrained, switches=switches),
                               progress=False)
                top1.append(evaluate(EvalOptions(checkpoint=str(result.last), cache=str(stores["test"]),
                                                 video_root=video_root, decode_workers=0))["top1"])
            schema = FeatureStore.open(stores["train"]).schema
            fit = (schema.encoding or {}).get("fit") or {}
            results[name] = {"top1": top1, "mean": statistics.fmean(top1),
                             "bytes_per_view": sum(sample_bytes(schema).values()),
                             "components": fit.get("components"),
                             "holdout_relative_error": (fit.get("holdout") or {}).get("relative")}
        for r in results.values():
            r["paired_diff_to_fp16"] = statistics.fmean(a - b for a, b in zip(r["top1"], results["fp16"]["top1"]))
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "parameters": {"train": str(train_store), "test": str(test_store), "formats": formats, "seeds": seeds,
                             "epochs": epochs, "batch_size": args.batch_size, "lr": args.lr,
                             "temporal": not args.no_temporal, "quick": args.quick},
              "results": results, "seconds": round(time.monotonic() - tick, 1)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({name: {"top1": f"{r['mean']:.1%}", "vs fp16": f"{r['paired_diff_to_fp16']:+.1%}",
                             "MB/view": round(r["bytes_per_view"] / 1e6, 3)} for name, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
