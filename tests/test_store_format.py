"""Format 2 on disk: shards byte-identical to zarr's own encoding, readable by plain zarr (and xarray),
one sample one ranged read straight into caller buffers, dense frames, per-view labels.

Real zarr stores in tmp_path with tiny shapes; zarr itself is the reference for the byte format.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from dist_cache.sampling import ViewPlan, dense_indices, dense_subset
from storage import FeatureStore, RawSample, StoreSchema, layout
from storage.shards import MISSING, ShardFormat
from storage.testing import make_schema, open_writer, video_data, video_frames, write_videos
from test_store import CountingStore


def zarr_shard_bytes(tmp_path, spec: layout.ArraySpec, block: np.ndarray) -> bytes:
    """What zarr itself writes for the first shard of `spec` holding `block`."""
    store = LocalStore(tmp_path / "ref.zarr")
    arr = zarr.create_array(store, **{**spec.create_kwargs(), "name": spec.name})
    arr[: block.shape[0]] = block
    return (tmp_path / "ref.zarr" / ShardFormat.of(spec).shard_key(0)).read_bytes()


def chunks_by_coordinate(fmt: ShardFormat, shard: bytes) -> list[bytes]:
    index = np.frombuffer(shard[-fmt.index_nbytes:-4], "<u8").reshape(-1, 2)
    assert not (index[:, 0] == MISSING).any()
    return [shard[int(o):int(o + n)] for o, n in index]


@pytest.mark.parametrize("codec", ["none", "zstd", "blosc-zstd", "blosc-lz4"])
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_shards_are_zarrs_own_bytes(tmp_path, codec, dtype):
    """One view per video (what extract writes): every shard is byte for byte what zarr writes. Several
    views: zarr orders chunks in Morton order and we in sample-major order, so each chunk's bytes are
    equal, the shard sizes are equal, and our order puts a sample's layers back to back."""
    for views in (1, 3):
        schema = make_schema(num_videos=2, views=views, dtype=dtype, codec=codec, layers=[0, 1, 2], dense_gamma=2)
        root = tmp_path / f"s{views}.zarr"
        write_videos(str(root), schema, [1])
        group = zarr.open_group(root, mode="r")
        for spec in layout.sharded_arrays(schema):
            fmt = ShardFormat.of(spec)
            ours = (root / fmt.shard_key(1)).read_bytes()
            block = np.asarray(group[spec.name][views: 2 * views])
            theirs = zarr_shard_bytes(tmp_path / f"{spec.name}{views}", spec, block)
            if views == 1:
                assert ours == theirs, spec.name
            else:
                assert len(ours) == len(theirs)
                assert chunks_by_coordinate(fmt, ours) == chunks_by_coordinate(fmt, theirs), spec.name
                index = np.frombuffer(ours[-fmt.index_nbytes:-4], "<u8").reshape(-1, 2)
                assert (index[1:, 0] == index[:-1, 0] + index[:-1, 1]).all()  # C order, back to back


def test_plain_zarr_and_xarray_open_the_store(tmp_path):
    schema = make_schema(num_videos=3, views=2, dtype="int8", codec="zstd", dense_gamma=2)
    root = tmp_path / "s.zarr"
    write_videos(str(root), schema, range(3), finalize=True)
    store = FeatureStore.open(root)
    group = zarr.open_group(root, mode="r")  # consolidated metadata, zarr's own reader, its crc32c check
    for i in range(6):
        raw = store.read_sample(i)
        np.testing.assert_array_equal(group["features"][i], raw.features)
        np.testing.assert_array_equal(group["feature_scales"][i], raw.scales)
        np.testing.assert_array_equal(group["clip_embeddings"][i], store.clip_embeddings(i))
        np.testing.assert_array_equal(group["frames"][i], store.frames(i))
    assert group["samples/label"][:].tolist() == [store.label(i) for i in range(6)]
    try:
        import xarray
    except ImportError:
        return  # not installed here: zarr alone is the check
    # The values as stored: without CF masking, which would read every 0 (zarr's fill value) as missing.
    ds = xarray.open_zarr(root, consolidated=True, mask_and_scale=False)
    np.testing.assert_array_equal(ds["features"][3].values, store.read_sample(3).features)
    np.testing.assert_array_equal(ds["frames"][5].values, store.frames(5))
    assert ds["frames"].dims == ("sample", "dense_frame", "height", "width", "rgb")


def test_one_ranged_read_into_caller_buffers(tmp_path):
    schema = make_schema(num_videos=2, views=2, layers=[2, 5, 7, 9])
    write_videos(str(tmp_path / "s.zarr"), schema, range(2), finalize=True)
    counting = CountingStore(tmp_path / "s.zarr", read_only=True)
    store = FeatureStore.open(counting)
    store.read_sample(0)  # warm: tables, metadata, shard index
    counting.reads.clear()
    backing = np.zeros((2, 3, 4, 17, 64), np.float16)  # e.g. a pinned batch; fill its row 1
    out = RawSample(backing[1])
    got = store.read_sample(1, layers=[5, 7, 9], out=out)
    assert got is out
    assert [n for k, n in counting.reads] == [3 * (4 * 17 * 64 * 2 + 4)]  # index cached; one range, 3 chunks
    expected = video_data(schema, 0)[2][1].astype(np.float16)
    np.testing.assert_array_equal(backing[1], expected[1:])
    assert not backing[0].any()
    with pytest.raises(ValueError, match="out.features must be"):
        store.read_sample(1, layers=[5, 7], out=RawSample(backing[0]))


def test_frames_subsets_follow_the_dense_index_rule(tmp_path):
    schema = make_schema(num_videos=2, views=2, num_frames=4, dense_gamma=4)
    write_videos(str(tmp_path / "s.zarr"), schema, range(2))
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.has_frames and store.dense_gamma == 4
    stored = video_frames(schema, 1)[0]
    np.testing.assert_array_equal(store.frames(2), stored)
    np.testing.assert_array_equal(store.frames(2, gamma=2), stored[dense_subset(4, 2, 4)])
    np.testing.assert_array_equal(store.frames(2, gamma=1), stored[::4])
    out = np.empty((8, 64, 64, 3), np.uint8)
    assert store.frames(2, gamma=2, out=out) is out
    with pytest.raises(ValueError, match="does not divide"):
        store.frames(2, gamma=3)
    plan = ViewPlan.from_dict(store.sample(2))
    n = int(store.sample(2)["num_frames"])
    np.testing.assert_array_equal(dense_indices(plan, 4, n)[dense_subset(4, 2, 4)], dense_indices(plan, 2, n))
    no_frames = write_videos(str(tmp_path / "n.zarr"), make_schema(num_videos=1, views=1), [0])
    with pytest.raises(ValueError, match="--dense-frames"):
        FeatureStore.open(no_frames.url).frames(0)


def test_per_view_labels_are_validated_and_kept(tmp_path):
    schema = make_schema(num_videos=3, views=2, num_classes=3)
    w = open_writer(str(tmp_path / "s.zarr"), schema)
    facts, plans, feats, clip = video_data(schema, 1)
    for bad in ([0, 99], [-1, 0], [0]):
        with pytest.raises(ValueError, match="label|labels"):
            w.write_video(1, facts, plans, feats, clip, labels=bad)
    w.write_video(1, facts, plans, feats, clip, labels=[1, 2])  # view 1 flipped with its label swapped
    for v in (0, 2):
        w.write_video(v, *video_data(schema, v))
    live = FeatureStore.open(tmp_path / "s.zarr")
    assert [live.label(i) for i in range(6)] == [0, 0, 1, 2, 2, 2]
    assert live.sample(3)["label"] == 2 and live.sample(3)["label_name"] == "class2"
    assert w.finalize()["complete"]
    done = FeatureStore.open(tmp_path / "s.zarr")
    assert [done.label(i) for i in range(6)] == [0, 0, 1, 2, 2, 2] and done.labels.tolist() == [0, 1, 2]


def test_frames_are_required_exactly_when_the_schema_says(tmp_path):
    with_frames = open_writer(str(tmp_path / "f.zarr"), make_schema(num_videos=1, views=1, dense_gamma=2))
    with pytest.raises(ValueError, match="frames must be uint8"):
        with_frames.write_video(0, *video_data(with_frames.schema, 0))
    without = open_writer(str(tmp_path / "n.zarr"), make_schema(num_videos=1, views=1))
    with pytest.raises(ValueError, match="holds no dense frames"):
        without.write_video(0, *video_data(without.schema, 0), frames=np.zeros((1, 4, 64, 64, 3), np.uint8))


def test_schema_round_trips_and_derives_compat(tmp_path):
    schema = make_schema(num_videos=2, dense_gamma=2)
    again = StoreSchema.from_json(schema.to_json())
    assert again == schema and again.fingerprint == schema.fingerprint
    compat = schema.compat
    assert compat["preprocess"]["decoder"] == {"name": "decord"}  # the decoder's version may change
    newer_decoder = dataclasses.replace(
        schema, preprocess={**schema.preprocess, "decoder": {"name": "decord", "version": "9.9"}})
    assert newer_decoder.fingerprint == schema.fingerprint
    for field, value in (("precision", "bf16"), ("dense_frames", None)):
        assert dataclasses.replace(schema, **{field: value}).fingerprint != schema.fingerprint
    other_act = dataclasses.replace(schema, backbone={**schema.backbone, "activation": "quick_gelu"})
    assert other_act.fingerprint != schema.fingerprint
    bad = schema.to_json()
    bad["sampling"]["flip_label_map"] = [["class0", "nope"]]
    with pytest.raises(ValueError, match="flip_label_map names"):
        StoreSchema.from_json(bad)
    bad["sampling"]["flip_label_map"] = [["class0", "class1"], ["class1", "class2"]]
    with pytest.raises(ValueError, match="at most once"):
        StoreSchema.from_json(bad)


@pytest.mark.filterwarnings("ignore:Object at records is not recognized")
def test_packed_shards_written_by_zarr_itself_are_read(tmp_path):
    """Shards of several videos (a packed copy) and chunks in zarr's Morton order (a store rewritten by zarr):
    the reader follows the index, one read per chunk where they are not back to back, checksums checked."""
    schema = make_schema(num_videos=4, views=2, layers=[0, 1, 2])
    root = tmp_path / "s.zarr"
    write_videos(str(root), schema, range(4), finalize=True)
    reference = FeatureStore.open(root)
    expected = {i: (reference.features(i), reference.clip_embeddings(i)) for i in range(8)}
    group = zarr.open_group(root, mode="r+", use_consolidated=False)
    for spec in layout.sharded_arrays(schema, videos_per_shard=2):
        values = group[spec.name][...]
        del group[spec.name]
        zarr.create_array(LocalStore(root), **spec.create_kwargs())[...] = values
    assert sorted(p.name for p in (root / "features").glob("c.*")) == ["c.0.0.0.0.0", "c.1.0.0.0.0"]
    zarr.consolidate_metadata(LocalStore(root), zarr_format=3)
    packed = FeatureStore.open(root)
    for i, (features, clip) in expected.items():
        np.testing.assert_array_equal(packed.features(i), features)
        np.testing.assert_array_equal(packed.features(i, layers=[2, 1]), features[[2, 1]])
        np.testing.assert_array_equal(packed.clip_embeddings(i), clip)
    # Every shard checks out; the records are still one per video, which a packed copy would have per group.
    assert packed.check_video(3, deep=True) == ["records/group-000000001.json is missing"]
