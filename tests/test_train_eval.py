"""Stage two end to end on real stores: generated H.264 videos, extracted with the tiny CLIP, trained,
killed, resumed and evaluated. Nothing is mocked; the kill is a real SIGKILL of a training process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_cache.backbone import load_backbone, load_recorded_backbone
from dist_cache.errors import UserError
from dist_cache.model import DiSTSwitches
from dist_cache.sampling import ViewPlan
from dist_cache.transforms import normalize_frames
from pipelines.extract.extractor import ExtractOptions, extract
from pipelines.extract.prepare import RenderSpec, prepare_video
from pipelines.train.checkpoint import load_checkpoint
from pipelines.train.data.dense_frames import VideoChanged
from pipelines.train.data.loader import BatchLoader, DecodedFrames, EpochSampler
from pipelines.train.evaluation import EvalOptions, evaluate, format_report
from pipelines.train.plots import read_metrics
from pipelines.train.run import TrainOptions, train
from storage import FeatureStore, SampleStatus
from video_files import truncate_file

# A small branch and batch, so every run takes seconds on two CPU cores.
SMALL = dict(switches=DiSTSwitches(alpha_dim=32, beta_dim=16, pool_blocks=1), batch_size=4, decode_workers=0,
             warmup_epochs=1,
             log_every=1)


def _extract(manifest: Path, video_root: Path, out: Path, checkpoint: Path, *, views: int, split: str,
             layers: str = "all") -> str:
    extract(ExtractOptions(manifest=str(manifest), video_root=str(video_root), out=str(out), model="dist-tiny",
                           pretrained=str(checkpoint), layers=layers, frames=4, views=views, split=split,
                           decode_workers=1, device="cpu"), progress=False)
    return str(out)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, motion_dataset, tiny_checkpoint):
    """train (8 videos x 2 augmented views), val (4 videos x 3 clips), broken (val plus a truncated and a
    missing video), layer1 (only block 1 cached) and other (another CLIP's weights)."""
    root = tmp_path_factory.mktemp("stage2")
    videos = root / "videos"
    shutil.copytree(motion_dataset / "videos", videos)
    shutil.copy(videos / "left" / "0.mp4", videos / "left" / "truncated.mp4")
    truncate_file(videos / "left" / "truncated.mp4", 0.3)
    broken_csv = root / "broken.csv"
    broken_csv.write_text((motion_dataset / "val.csv").read_text() + "left/truncated.mp4,left\nup/missing.mp4,up\n")
    one_csv = root / "one.csv"
    one_csv.write_text("path,label\nleft/0.mp4,left\nright/0.mp4,right\n")
    torch.manual_seed(1)
    other_checkpoint = root / "other-clip.pt"
    torch.save(load_backbone("dist-tiny", "none", allow_random_weights=True).model.state_dict(), other_checkpoint)
    return {
        "root": root,
        "videos": str(videos),
        "other_checkpoint": other_checkpoint,
        "train": _extract(motion_dataset / "train.csv", videos, root / "train.zarr", tiny_checkpoint, views=2,
                          split="train"),
        "val": _extract(motion_dataset / "val.csv", videos, root / "val.zarr", tiny_checkpoint, views=3, split="test"),
        "broken": _extract(broken_csv, videos, root / "broken.zarr", tiny_checkpoint, views=3, split="test"),
        "layer1": _extract(one_csv, videos, root / "layer1.zarr", tiny_checkpoint, views=1, split="test", layers="1"),
        "other": _extract(one_csv, videos, root / "other.zarr", other_checkpoint, views=1, split="test"),
    }


@pytest.fixture(scope="module")
def run(stores):
    """A finished 2-epoch run with validation."""
    out = stores["root"] / "run"
    result = train(TrainOptions(cache=stores["train"], video_root=stores["videos"], out=str(out),
                                val_cache=stores["val"], epochs=2, **SMALL), progress=False)
    return result


def test_train_recipe_from_the_cli_is_printed_and_recorded(stores, tmp_path):
    from click.testing import CliRunner

    import cli

    out = tmp_path / "k400"
    args = ["train", "--cache", stores["train"], "--video-root", stores["videos"], "--out", str(out), "--recipe",
            "k400",
            "--alpha-dim", "32", "--beta-dim", "16", "--epochs", "1", "--batch-size", "4", "--decode-workers", "0",
            "--warmup-epochs", "1", "--device", "cpu"]
    result = CliRunner().invoke(cli.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    line = result.output.splitlines()[0]
    assert line.startswith("recipe: k400 (Kinetics-400): pool_blocks 4, lr 0.00032, weight_decay 0.0001, ")
    assert "clip_grad 0" in line and "alpha_dim 32 (flag, reference 384)" in line and "epochs 1 (flag" in line
    # One warm-up epoch of one: the learning rate would never reach its peak.
    assert "warning: --warmup-epochs 1 >= --epochs 1: the learning rate rises for the whole run" in result.stderr
    # RUN/train.log: what was printed, each line with its time; a --resume appends.
    log = (out / "train.log").read_text().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
    assert all(re.match(stamp, line) for line in log), log
    texts = [re.sub(stamp, "", line, count=1) for line in log]
    assert texts[0] == "=== dist-cache train: started" and texts[1] == line
    assert any(t.startswith("warning: --warmup-epochs") for t in texts) and texts[-1].startswith("trained 2 steps")
    resumed = CliRunner().invoke(cli.main, [*args, "--resume"], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    again = (out / "train.log").read_text().splitlines()
    assert again[: len(log)] == log and again[len(log)].endswith("=== dist-cache train: resumed (--resume)")
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["train_config"]["recipe"] == "k400" and ckpt["train_config"]["clip_grad"] == 0.0
    assert ckpt["dist_config"]["switches"]["pool_blocks"] == ckpt["train_config"]["switches"]["pool_blocks"] == 4
    assert ckpt["dist_config"]["switches"]["alpha_dim"] == 32  # an explicit flag beside the recipe


def test_round_trip_train_then_eval(stores, run, tmp_path):
    assert run.steps == 4 and run.epochs == 2  # 8 videos, one view each per epoch, batches of 4
    for path in (run.last, run.best, run.metrics, run.plot):
        assert path.is_file()
    assert run.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ckpt = load_checkpoint(run.last)
    assert ckpt["step"] == 4 and ckpt["epoch"] == 2
    assert ckpt["store"]["fingerprint"] == FeatureStore.open(stores["train"]).fingerprint
    # The trainable branch only: no CLIP weight, and every branch parameter (biases too) was updated.
    assert not any(k.startswith(("encoder", "visual", "transformer")) for k in ckpt["model"])
    assert len(ckpt["optimizer"]["state"]) == len(ckpt["model"])
    assert ckpt["model"]["temporal.stem.conv.bias"].abs().sum() > 0  # initialised to zero, so it was optimised

    records = read_metrics(run.metrics)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all("val_top1" in r for r in epochs)
    assert run.best_top1 == max(r["val_top1"] for r in epochs)

    report_path, predictions = tmp_path / "report.json", tmp_path / "predictions.jsonl"
    report = evaluate(EvalOptions(checkpoint=str(run.best), cache=stores["val"], video_root=stores["videos"],
                                  json=str(report_path), predictions=str(predictions), decode_workers=1),
                      progress=False)
    assert json.loads(report_path.read_text()) == report
    assert report["videos"] == 4 and report["views"] == 12 and report["views_per_video"] == 3
    assert report["top1"] == pytest.approx(run.best_top1)  # the same scoring as validation in training
    assert 0 <= report["top1"] <= report["top5"] <= 1
    assert sorted(report["per_class_accuracy"]) == sorted(FeatureStore.open(stores["val"]).schema.class_names)
    assert np.array(report["confusion_matrix"]).sum() == 4
    assert Path(report["confusion_png"]).read_bytes()[:4] == b"\x89PNG"
    assert "top-1" in format_report(report) and "skipped" not in format_report(report)

    # Per-video predictions: a JSON line per video, in the store's order, that agree with the report.
    val = FeatureStore.open(stores["val"])
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [line["video"] for line in lines] == val.videos
    names = list(val.schema.class_names)
    for line, label in zip(lines, val.labels):
        assert (line["label"], line["label_index"], line["views"]) == (names[label], label, 3)
        assert len(line["top"]) == 4 and [names[i] for i in line["top_index"]] == line["top"]
        assert line["scores"] == sorted(line["scores"], reverse=True) and 0.99 < sum(line["scores"]) <= 1.0001
    assert np.mean([line["top"][0] == line["label"] for line in lines]) == pytest.approx(report["top1"])
    confusion = np.zeros_like(report["confusion_matrix"])
    for line in lines:
        confusion[line["label_index"], line["top_index"][0]] += 1
    assert confusion.tolist() == report["confusion_matrix"]
    # The same from the command line, which says where they went.
    from click.testing import CliRunner

    import cli

    again = tmp_path / "again.jsonl"
    result = CliRunner().invoke(cli.main, ["eval", "--checkpoint", str(run.best), "--cache", stores["val"],
                                           "--video-root", stores["videos"], "--decode-workers", "0", "--device",
                                           "cpu", "--predictions", str(again)])
    assert result.exit_code == 0 and f"per-video predictions -> {again}" in result.stdout, result.output
    assert again.read_text() == predictions.read_text()
    missing = CliRunner().invoke(cli.main, ["eval", "--checkpoint", str(run.best), "--cache", stores["val"],
                                            "--predictions", str(tmp_path / "no" / "p.jsonl")])
    assert missing.exit_code == 2 and "--predictions" in missing.output and "create it" in missing.output
    both = str(tmp_path / "r.json")
    same = CliRunner().invoke(cli.main, ["eval", "--checkpoint", str(run.best), "--cache", stores["val"],
                                         "--report", both, "--predictions", both])
    assert same.exit_code == 2 and "name the same file" in same.output and not (tmp_path / "r.json").exists()


def first_batch(store: FeatureStore, indices: list[int], frames, layers=None, **kw):
    """The loader's batch of exactly these samples, in this order."""
    sampler = EpochSampler(np.array(indices), store.schema.views_per_video, len(indices), train=False)
    loader = BatchLoader(store, sampler, layers=layers, frames=frames, device=torch.device("cpu"), **kw)
    try:
        batch = next(iter(loader))
        return batch, [None if t is None else t.clone() for t in (batch.features, batch.frames, batch.label)]
    finally:
        loader.close()


def test_decoded_frames_are_the_pixels_clip_saw(stores, tiny_checkpoint):
    store = FeatureStore.open(stores["train"])
    batch, (features, frames, labels) = first_batch(store, [3], DecodedFrames(store, stores["videos"], 2, workers=0),
                                                    layers=list(store.schema.layers))
    assert frames.shape == (1, 8, 64, 64, 3) and frames.dtype == torch.uint8
    assert features.dtype == torch.float16 and features.shape[:2] == (2, 1)  # layers first
    assert not torch.equal(frames[0, 0], frames[0, 1])  # the dense frames in between are others
    assert labels.tolist() == [store.label(3)]
    # Byte for byte what the extraction worker rendered for this view and CLIP saw ...
    backbone = load_recorded_backbone(store.schema.backbone, pretrained=str(tiny_checkpoint))
    sample = store.sample(3)
    video, view = int(sample["video_index"]), int(sample["view"])
    prepared = prepare_video(str(Path(stores["videos"]) / sample["video"]), video, RenderSpec.of_schema(store.schema))
    assert prepared.plans[view] == ViewPlan.from_dict(sample)
    assert torch.equal(frames[0, ::2], torch.from_numpy(prepared.images[4 * view : 4 * view + 4]))
    # ... whose features are the stored ones, once normalised.
    encoder = backbone.spatial_encoder(list(store.schema.layers))
    tokens, _ = encoder(normalize_frames(frames[0, ::2], backbone.mean, backbone.std))
    assert torch.allclose(tokens, features[:, 0].float(), atol=2e-2, rtol=1e-2)


def test_loader_batches_follow_the_sampler_whatever_the_threads(stores):
    store = FeatureStore.open(stores["val"])
    usable = np.flatnonzero(store.status == SampleStatus.DONE)
    layers = list(store.schema.layers)
    sampler = EpochSampler(usable, store.schema.views_per_video, 5, train=False)
    loader = BatchLoader(store, sampler, layers=layers, frames=DecodedFrames(store, stores["videos"], 2, workers=0),
                         device=torch.device("cpu"), read_threads=3, prefetch=2)
    try:
        seen = []
        for batch in loader:
            seen += batch.index.tolist()
            for j, i in enumerate(batch.index.tolist()):
                assert torch.equal(batch.features[:, j], torch.from_numpy(store.features(int(i), layers)))
                assert int(batch.label[j]) == store.label(int(i))
        assert seen == usable.tolist()
        # Abandoned halfway, then iterated again: the same batches, nothing left running into the buffers.
        next(iter(loader))
        assert [b.index.tolist() for b in loader] == [usable[k:k + 5].tolist() for k in range(0, len(usable), 5)]
    finally:
        loader.close()


def test_resume_after_kill_matches_an_uninterrupted_run(stores, tmp_path):
    # On the CPU: exact replay is what is tested, and GPU kernels need not be deterministic.
    common = dict(cache=stores["train"], video_root=stores["videos"], epochs=2, save_every=2, device="cpu",
                  **{**SMALL, "batch_size": 2})
    full = train(TrainOptions(out=str(tmp_path / "full"), **common), progress=False)
    assert full.steps == 8

    # The child trains normally; once last.pt holds step 2, it finishes step 3 and stalls at step 4, where it is
    # killed: step 3's work is lost and must be redone on resume.
    killed = tmp_path / "killed"
    marker = tmp_path / "stalled"
    driver = tmp_path / "driver.py"
    # The child must reduce in the same order as this process: same number of intra-op threads.
    driver.write_text(textwrap.dedent(f"""
        import json, sys, time
        from pathlib import Path
        import torch
        torch.set_num_threads({torch.get_num_threads()})
        import pipelines.train.run as train_mod

        saved = []
        real_save, real_step = train_mod.save_checkpoint, train_mod.train_step

        def save(path, payload):
            real_save(path, payload)
            saved.append(payload["step"])

        def step(model, batch, ranks, store, done):
            if done == 3:  # step 4, after step 3 was logged but not saved
                Path({str(marker)!r}).write_text(str(saved))
                time.sleep(600)
            return real_step(model, batch, ranks, store, done)

        train_mod.save_checkpoint, train_mod.train_step = save, step
        from dist_cache.model import DiSTSwitches
        options = json.loads(sys.argv[1])
        options["switches"] = DiSTSwitches(**options["switches"])
        train_mod.train(train_mod.TrainOptions(**options), progress=False)
    """))
    child = subprocess.Popen([sys.executable, str(driver),
                              json.dumps({**common, "switches": common["switches"].to_dict(), "out": str(killed)})],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert child.poll() is None, f"training exited before the kill: {child.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "training never reached its first checkpoint"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert json.loads(marker.read_text()) == [2]
    assert load_checkpoint(killed / "last.pt")["step"] == 2
    assert 3 in [r["step"] for r in read_metrics(killed / "metrics.jsonl")]  # logged, then lost

    with pytest.raises(UserError, match="--resume"):
        train(TrainOptions(out=str(killed), **common), progress=False)  # never overwrite a run silently
    with (killed / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 4, "lo')  # a kill mid-write tears the last line
    resumed = train(TrainOptions(out=str(killed), resume=True, **common), progress=False)
    assert resumed.steps == full.steps
    a, b = load_checkpoint(full.last), load_checkpoint(resumed.last)
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor, b["model"][name], atol=1e-6), name
    full_log, resumed_log = read_metrics(full.metrics), read_metrics(resumed.metrics)
    assert [r["step"] for r in resumed_log if r["kind"] == "train"] == list(range(1, 9))
    assert [r["kind"] for r in resumed_log] == [r["kind"] for r in full_log]
    assert np.allclose([r["loss"] for r in resumed_log if r["kind"] == "train"],
                       [r["loss"] for r in full_log if r["kind"] == "train"], atol=1e-5)


def test_store_and_run_mismatches_fail_before_training(stores, run, tmp_path):
    out = str(tmp_path / "x")
    with pytest.raises(UserError, match=r"holds layers \[1\].*missing \[0\]"):
        train(TrainOptions(cache=stores["layer1"], video_root=stores["videos"], out=out, layers="0,1", **SMALL),
              progress=False)
    with pytest.raises(UserError, match="weights_sha256"):
        train(TrainOptions(cache=stores["train"], video_root=stores["videos"], out=out, val_cache=stores["other"],
                           **SMALL), progress=False)
    with pytest.raises(UserError, match="not the store this run was trained on"):
        train(TrainOptions(cache=stores["val"], video_root=stores["videos"], out=str(run.out), resume=True,
                           val_cache=stores["val"], epochs=2, **SMALL), progress=False)
    with pytest.raises(UserError, match="started with epochs=2, not 3"):
        train(TrainOptions(cache=stores["train"], video_root=stores["videos"], out=str(run.out), resume=True,
                           val_cache=stores["val"], epochs=3, **SMALL), progress=False)
    with pytest.raises(UserError, match="--video-root .* has no left/"):
        train(TrainOptions(cache=stores["train"], video_root=str(tmp_path), out=out, **SMALL), progress=False)
    partial = tmp_path / "partial"
    shutil.copytree(stores["videos"], partial)
    store = FeatureStore.open(stores["train"])
    usable = np.flatnonzero(store.status == SampleStatus.DONE)
    # every video is looked for, not the first only
    gone = store.videos[int(usable[-1]) // store.schema.views_per_video]
    (partial / gone).unlink()
    with pytest.raises(UserError, match=f"--video-root .* has no {gone} \\(1 of the \\d+ videos"):
        train(TrainOptions(cache=stores["train"], video_root=str(partial), out=out, **SMALL), progress=False)
    with pytest.raises(UserError, match="missing"):
        evaluate(EvalOptions(checkpoint=str(run.best), cache=stores["layer1"], video_root=stores["videos"],
                             decode_workers=0),
                 progress=False)
    with pytest.raises(UserError, match="weights_sha256"):
        evaluate(EvalOptions(checkpoint=str(run.best), cache=stores["other"], video_root=stores["videos"],
                             decode_workers=0),
                 progress=False)
    assert not (tmp_path / "x").exists()


def test_cached_and_online_training_take_the_same_first_step(stores, tiny_checkpoint, tmp_path):
    losses = {}
    for mode in ("cached", "online"):
        result = train(TrainOptions(cache=stores["train"], video_root=stores["videos"], out=str(tmp_path / mode),
                                    epochs=1, online=mode == "online", pretrained=str(tiny_checkpoint), device="cpu",
                                    **SMALL), progress=False)
        losses[mode] = [r["loss"] for r in read_metrics(result.metrics) if r["kind"] == "train"]
        assert result.steps == 2
    # Same initial weights, same views; the features differ only by the store's fp16 rounding.
    assert losses["online"][0] == pytest.approx(losses["cached"][0], rel=1e-3)
    assert losses["online"][1] == pytest.approx(losses["cached"][1], rel=1e-2)


def test_eval_skips_and_counts_failed_samples(stores, run):
    report = evaluate(EvalOptions(checkpoint=str(run.best), cache=stores["broken"], video_root=stores["videos"],
                                  decode_workers=0), progress=False)
    assert report["skipped_failed_samples"] == 6 and report["skipped_failed_videos"] == 2  # 2 videos x 3 views
    assert report["videos"] == 4 and report["views"] == 12
    assert "skipped 6 failed samples" in format_report(report)
    # Training skips them too, and says how many.
    result = train(TrainOptions(cache=stores["broken"], video_root=stores["videos"], out=str(stores["root"] / "b"),
                                epochs=1, **SMALL), progress=False)
    assert result.skipped_failed_samples == 6 and result.steps == 1


def test_zero_shot_eval_on_another_label_set(stores, run, tiny_checkpoint, tmp_path):
    val = FeatureStore.open(stores["val"])
    base = evaluate(EvalOptions(checkpoint=str(run.best), cache=stores["val"], video_root=stores["videos"],
                                decode_workers=0), progress=False)
    # The store's own names, in its order: the text tower must reproduce the stored class embeddings.
    same = tmp_path / "same.txt"
    same.write_text("\n".join(val.schema.class_names) + "\n")
    again = evaluate(EvalOptions(checkpoint=str(run.best), cache=stores["val"], video_root=stores["videos"],
                                 classes=str(same), pretrained=str(tiny_checkpoint), decode_workers=0), progress=False)
    assert again["confusion_matrix"] == base["confusion_matrix"] and again["top1"] == base["top1"]

    # Another label set: extra classes, another order; labels are mapped by name.
    names = ["spin", *reversed(val.schema.class_names), "jump"]
    other = tmp_path / "other.txt"
    other.write_text("\n".join(names) + "\n")
    report = evaluate(EvalOptions(checkpoint=str(run.best), cache=stores["val"], video_root=stores["videos"],
                                  classes=str(other), pretrained=str(tiny_checkpoint), decode_workers=0),
                      progress=False)
    assert report["class_names"] == names and report["classes"] == str(other)
    assert report["per_class_videos"] == {"spin": 0, "jump": 0, **{n: 1 for n in val.schema.class_names}}
    assert report["per_class_accuracy"]["spin"] is None
    assert report["top5_k"] == 5

    missing = tmp_path / "missing.txt"
    missing.write_text("\n".join(val.schema.class_names[1:]) + "\n")
    with pytest.raises(UserError, match=f"lacks 1 of the store's classes.*{val.schema.class_names[0]}"):
        evaluate(EvalOptions(checkpoint=str(run.best), cache=stores["val"], video_root=stores["videos"],
                             classes=str(missing), pretrained=str(tiny_checkpoint), decode_workers=0), progress=False)
    # The text tower's weights must be those the store was extracted with.
    for weights, why in ((tmp_path / "absent.pt", "no such checkpoint file"),
                         (stores["other_checkpoint"], "differs from the store")):
        with pytest.raises(UserError, match=why):
            evaluate(EvalOptions(checkpoint=str(run.best), cache=stores["val"], video_root=stores["videos"],
                                 classes=str(other), pretrained=str(weights), decode_workers=0), progress=False)


def test_a_video_that_stops_decoding_mid_run_is_named(stores, tmp_path):
    root = tmp_path / "videos"
    shutil.copytree(stores["videos"], root)
    store = FeatureStore.open(stores["train"])
    usable = np.flatnonzero(store.status == SampleStatus.DONE)
    broken = store.videos[int(usable[0]) // store.schema.views_per_video]
    (root / broken).write_bytes(b"not a video any more")
    # Through a real decode pool (a worker process); the error reaches this thread as one line.
    with pytest.raises(VideoChanged) as err:
        first_batch(store, usable[:2].tolist(), DecodedFrames(store, root, 2, workers=1))
    message = str(err.value)
    assert "\n" not in message and broken in message and "re-extract" in message, message
