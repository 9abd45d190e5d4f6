"""Training from stores that hold the dense frames: the same bytes as decoding, so the same run, with no video
left on disk; and the refusals around them (a gamma the frames do not cover, a decoder that is not installed)."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from dense_stores import extract_with_frames
from pipelines.extract.extractor import ExtractOptions, extract
from pipelines.train.checkpoint import load_checkpoint
from pipelines.train.data.loader import BatchLoader, DecodedFrames, EpochSampler, StoredFrames
from pipelines.train.evaluation import EvalOptions, evaluate
from pipelines.train.plots import read_metrics
from storage import FeatureStore, SampleStatus

# The demo's task at small scale: no flips (a mirrored "left" is a "right"), crops keeping most of the frame.
TRAIN_VIEWS = dict(views=2, split="train", flip_p=0.0, scale=(0.8, 1.0))
RUN = ["--alpha-dim", "32", "--beta-dim", "16", "--pool-blocks", "1", "--epochs", "3", "--batch-size", "4",
       "--lr", "1e-3", "--warmup-epochs", "1", "--device", "cpu", "--decode-workers", "0", "--read-threads", "2"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, motion_dataset, tiny_checkpoint):
    root = tmp_path_factory.mktemp("frames")
    videos = root / "videos"
    shutil.copytree(motion_dataset / "videos", videos)
    common = dict(video_root=videos, checkpoint=tiny_checkpoint)
    plain = dict(video_root=str(videos), model="dist-tiny", pretrained=str(tiny_checkpoint), frames=4, decode_workers=1,
                 device="cpu", decoder="decord")  # a store that needs decord, for the refusal below
    extract(ExtractOptions(manifest=str(motion_dataset / "train.csv"), out=str(root / "train.zarr"), **TRAIN_VIEWS,
                           **plain), progress=False)
    extract(ExtractOptions(manifest=str(motion_dataset / "val.csv"), out=str(root / "val.zarr"), views=3, split="test",
                           **plain), progress=False)
    return {
        "root": root, "videos": videos,
        "train": str(root / "train.zarr"), "val": str(root / "val.zarr"),
        "train_frames": extract_with_frames(motion_dataset / "train.csv", out=root / "train-frames.zarr", gamma=2,
                                            **TRAIN_VIEWS, **common),
        "val_frames": extract_with_frames(motion_dataset / "val.csv", out=root / "val-frames.zarr", gamma=2, views=3,
                                          split="test", **common),
    }


def _batch(store: FeatureStore, frames, layers=None) -> tuple[torch.Tensor | None, torch.Tensor]:
    usable = np.flatnonzero(store.status == SampleStatus.DONE)
    loader = BatchLoader(store, EpochSampler(usable, store.schema.views_per_video, len(usable), train=False),
                         layers=layers, frames=frames, device=torch.device("cpu"), read_threads=2)
    try:
        batch = next(iter(loader))
        return None if batch.features is None else batch.features.clone(), batch.frames.clone()
    finally:
        loader.close()


@pytest.mark.parametrize("gamma", [2, 1])
def test_stored_frames_are_the_decoded_frames(stores, gamma):
    store, plain = FeatureStore.open(stores["train_frames"]), FeatureStore.open(stores["train"])
    layers = list(store.schema.layers)
    stored_features, stored = _batch(store, StoredFrames(store, gamma), layers)
    plain_features, decoded = _batch(plain, DecodedFrames(plain, stores["videos"], gamma, workers=0), layers)
    assert stored.shape[1] == gamma * 4 and torch.equal(stored, decoded)  # gamma 1: the subset of the stored 2
    assert torch.equal(stored_features, plain_features)  # the same extraction, frames or not


def test_training_on_stored_frames_without_the_videos_matches_decoding(stores, tmp_path):
    runner = CliRunner()
    decoded = runner.invoke(cli.main,
                            ["train", "--cache", stores["train"], "--val-cache", stores["val"], "--video-root",
                                       str(stores["videos"]), "--out", str(tmp_path / "decoded"), *RUN],
                            catch_exceptions=False)
    assert decoded.exit_code == 0, decoded.output
    assert f"dense frames: decoded from {stores['videos']}" in decoded.output

    gone = stores["root"] / "videos-gone"
    shutil.move(stores["videos"], gone)  # a store alone is enough to train DiST
    try:
        stored = runner.invoke(cli.main,
                               ["train", "--cache", stores["train_frames"], "--val-cache", stores["val_frames"],
                                          "--out", str(tmp_path / "stored"), *RUN], catch_exceptions=False)
        assert stored.exit_code == 0, stored.output
        assert "dense frames: read from the store (gamma 2 of its stored 2)" in stored.output
        report = evaluate(EvalOptions(checkpoint=str(tmp_path / "stored" / "best.pt"), cache=stores["val_frames"],
                                      device="cpu"), progress=False)
    finally:
        shutil.move(gone, stores["videos"])
    losses = [[r.get("loss", r.get("val_top1")) for r in read_metrics(tmp_path / run / "metrics.jsonl")]
              for run in ("decoded", "stored")]
    assert losses[0] == losses[1]  # the same bytes in, the same run: step by step, and every validation
    a, b = load_checkpoint(tmp_path / "decoded" / "last.pt"), load_checkpoint(tmp_path / "stored" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert report["top1"] == load_checkpoint(tmp_path / "decoded" / "best.pt")["best_top1"]


def test_frames_the_store_does_not_cover_are_decoded_or_refused(stores, tmp_path):
    runner = CliRunner()
    args = ["train", "--cache", stores["train_frames"], "--out", str(tmp_path / "g4"), *RUN, "--gamma", "4"]
    refused = runner.invoke(cli.main, args)
    assert refused.exit_code == 2
    assert refused.output.startswith("error: ") and refused.output.count("\n") == 1, refused.output
    assert "gamma 2" in refused.output and "--video-root" in refused.output
    assert not (tmp_path / "g4").exists()
    decoded = runner.invoke(cli.main, [*args, "--video-root", str(stores["videos"]), "--epochs", "1"],
                            catch_exceptions=False)
    assert decoded.exit_code == 0 and "dense frames: decoded from" in decoded.output, decoded.output


def test_a_store_without_frames_needs_the_videos_and_an_installed_decoder(stores, tmp_path, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(cli.main, ["train", "--cache", stores["train"], "--out", str(tmp_path / "x"), *RUN])
    assert result.exit_code == 2 and "holds no dense frames" in result.output and "--video-root" in result.output
    # A machine where decord does not import (its wheels are x86-64 Linux and Windows only).
    monkeypatch.setitem(sys.modules, "dist_cache.decode_decord", None)
    result = runner.invoke(cli.main, ["train", "--cache", stores["train"], "--out", str(tmp_path / "x"),
                                      "--video-root", str(stores["videos"]), *RUN])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "extracted with the decord decoder" in result.output and "pyav" in result.output
