"""Compact stores through the command line: extract --pca / --dtype int8 (fit pass, resume, refusal), copy to every
format, copy --dry-run, info, verify --video-root, and training plus evaluation on each, with the tiny CLIP on
generated H.264 videos. The device encoding (torch) against storage's numpy reference."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

import cli
from pipelines.compact_device import DeviceEncoding
from storage import FeatureStore
from storage.pca import draw_sample
from storage.testing import make_schema, open_writer, video_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run_cli(*args: object) -> Result:
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def _extract_args(dataset: Path, out: Path, ckpt: Path, *extra: object) -> list[object]:
    return ["extract", "--manifest", dataset / "train.csv", "--video-root", dataset / "videos", "--out", out,
            "--model", "dist-tiny", "--pretrained", ckpt, "--frames", "4", "--views", "2", "--dense-frames",
            "--decode-workers", "1", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, motion_dataset, tiny_checkpoint) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compact")
    out = {"fp16": root / "fp16.zarr", "pca": root / "pca.zarr", "test": root / "test.zarr"}
    assert run_cli(*_extract_args(motion_dataset, out["fp16"], tiny_checkpoint)).exit_code == 0
    # What eval scores: a test split (eval refuses a train split's augmented, relabelled views).
    test = _extract_args(motion_dataset, out["test"], tiny_checkpoint, "--split", "test", "--views", "1")
    test[2] = motion_dataset / "val.csv"
    assert run_cli(*test).exit_code == 0
    result = run_cli(*_extract_args(motion_dataset, out["pca"], tiny_checkpoint, "--pca", "16", "--dtype", "int8"))
    assert result.exit_code == 0, result.output
    return out


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def test_extract_pca_stores_codes_fitted_on_its_own_sample(stores, motion_dataset, tiny_checkpoint):
    fp16, pca = FeatureStore.open(stores["fp16"]), FeatureStore.open(stores["pca"])
    section = pca.schema.encoding
    fit = section["fit"]
    assert pca.schema.format_version == 3 and fit["source"] == "extract" and fit["components"] == [16, 16]
    assert fit["holdout"] and len(fit["holdout_videos"]) >= 1
    assert pca.read_sample(0).features.shape == (4 * 17 * 32,)
    recorded = max(fit["holdout"]["relative"])
    for i in (0, 7):
        assert _relative(pca.features(i, dtype=np.float32), fp16.features(i, dtype=np.float32)) < 2 * recorded + 0.01
    info = run_cli("info", stores["pca"]).output
    assert "PCA codes (top 16 components" in info and "held-out videos" in info and "per view" in info

    again = run_cli(*_extract_args(motion_dataset, stores["pca"], tiny_checkpoint, "--pca", "16", "--dtype", "int8"))
    assert again.exit_code == 0 and "stored 0 videos, skipped 8" in again.output
    assert FeatureStore.open(stores["pca"]).schema.encoding["fit"]["sha256"] == fit["sha256"]
    refused = run_cli(*_extract_args(motion_dataset, stores["pca"], tiny_checkpoint, "--pca", "0.9", "--dtype",
                                     "int8"))
    assert refused.exit_code == 2 and "encoding.pca.request 16, not 0.9" in refused.output


def test_verify_allows_the_recorded_error_of_a_compact_store(stores, motion_dataset, tiny_checkpoint):
    result = run_cli("verify", stores["pca"], "--video-root", motion_dataset / "videos", "--pretrained",
                     tiny_checkpoint, "--samples", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "compact store: the tolerance is twice the largest per-layer error" in result.output


def test_copy_dry_run_reports_bytes_and_error_and_writes_nothing(stores, tmp_path):
    result = run_cli("copy", stores["fp16"], "--pca", "0.9", "--dtype", "int8", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "nothing was written" in result.output and "Kinetics-400-sized store" in result.output
    assert re.search(r"per clip view: [\d.]+ MB \(the source: [\d.]+ MB\)", result.output)
    rows = [line for line in result.output.splitlines() if re.match(r"\s+[01]\s+\d+\s+0\.\d+", line)]
    assert len(rows) == 2  # per layer: K, variance kept, errors, cosines
    assert not (tmp_path / "out.zarr").exists()


def test_copy_dry_run_measures_jpeg_frames(stores):
    """JPEG frames' bytes depend on the content: the dry run encodes views spread over the source's samples."""
    raw = run_cli("copy", stores["fp16"], "--pca", "16", "--dtype", "int8", "--dry-run")
    jpeg = run_cli("copy", stores["fp16"], "--pca", "16", "--dtype", "int8", "--frames-format", "jpeg", "--dry-run")
    assert raw.exit_code == 0 and jpeg.exit_code == 0, jpeg.output

    def frames_mb(output: str) -> float:
        return float(re.search(r"dense frames ([\d.]+) MB", output).group(1))

    assert 0 < frames_mb(jpeg.output) < frames_mb(raw.output) / 2


@pytest.mark.parametrize("options", [("--dtype", "int8"), ("--pca", "12", "--dtype", "int8"), ("--pca", "0.9")])
def test_every_compact_format_trains_and_its_checkpoint_evaluates_on_fp16(stores, tmp_path, options):
    compact = tmp_path / "c.zarr"
    assert run_cli("copy", stores["fp16"], compact, *options).exit_code == 0
    assert FeatureStore.open(compact).schema.format_version == 3
    run = tmp_path / "run"
    result = run_cli("train", "--cache", compact, "--out", run, "--epochs", "1", "--batch-size", "4",
                     "--alpha-dim", "32", "--beta-dim", "16", "--pool-blocks", "1", "--feature-mixup", "0.8",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    compact_test = tmp_path / "c-test.zarr"
    assert run_cli("copy", stores["test"], compact_test, *options).exit_code == 0
    for store in (compact_test, stores["test"]):  # one kind of checkpoint: it evaluates on any store of that CLIP
        scored = run_cli("eval", "--checkpoint", run / "last.pt", "--cache", store, "--device", "cpu")
        assert scored.exit_code == 0 and "top-1" in scored.output, scored.output


def test_the_device_encoding_is_the_stores(tmp_path):
    """pipelines.compact_device (torch, what extraction and training run) against storage.encoding (numpy, what
    FeatureStore and the README's recipe follow)."""
    for kind in (dict(pca=0.6, dtype="int8"), dict(dtype="int8", compact=True), dict(pca=24)):
        schema = make_schema(num_videos=4, views=2, **kind)
        enc = open_writer(str(tmp_path / f"{len(list(tmp_path.iterdir()))}.zarr"), schema).encoding
        x = video_data(schema, 3)[2]  # (K, L, T, N+1, C)
        device = DeviceEncoding(enc, range(2), 4, 17, torch.device("cpu"))
        codes, scales = enc.encode(x)
        for n in range(2):
            got_codes, got_scales = device.encode_layer(n, torch.from_numpy(x[:, n]))
            want_codes, want_scales = enc.encode_layer(n, x[:, n])
            if want_scales is None:  # fp16 codes: the same values up to float32 summation order
                assert _relative(got_codes.numpy(), want_codes.astype(np.float32)) < 1e-3
                continue
            differ = got_codes.numpy().astype(np.int32) - want_codes  # a rounding tie may land one step off
            assert np.abs(differ).max() <= 1 and (differ != 0).mean() < 1e-3
            np.testing.assert_array_equal(got_scales.numpy(), want_scales)
        batch = device.tokens(torch.from_numpy(codes), None if scales is None else torch.from_numpy(scales))
        reference = np.stack([enc.decode(codes[k], None if scales is None else scales[k], [0, 1], 4, 17)
                              for k in range(2)]).transpose(1, 0, 2, 3, 4)
        tokens = torch.stack([batch.values(i) if batch.components is None else  # x = mean + z @ B
                              batch.values(i) @ batch.components[i] + batch.mean[i] for i in range(batch.num_layers)])
        assert _relative(tokens.numpy(), reference) < 1e-5


def test_the_fit_sample_is_drawn_over_the_whole_manifest():
    """Kinetics manifests are sorted by class: the fit must not see only the first rows."""
    sample = draw_sample(range(240_000), 40, seed=0)
    chosen = sample.fit + sample.holdout
    assert len(sample.fit) == 32 and len(sample.holdout) == 8 and len(set(chosen)) == 40
    assert min(chosen) < 60_000 and max(chosen) > 180_000
    assert draw_sample(range(240_000), 40, seed=0) == sample != draw_sample(range(240_000), 40, seed=1)
