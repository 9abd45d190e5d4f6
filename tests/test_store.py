"""Feature store: round trips, layout on disk, reading rules, finalize, pickling, fsspec URLs.

Real zarr stores in tmp_path with tiny shapes (L=2, T=4, N+1=17, C=64); no mocks.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from dist_cache.errors import UserError
from storage import FeatureStore, SampleNotDoneError, StoreNotFoundError, StoreWriter, dequantize_int8, quantize_int8
from storage.testing import make_schema, manifest, open_writer, video_data, write_videos


def expected_fp16(schema, i):
    v, k = divmod(i, schema.views_per_video)
    return video_data(schema, v)[2][k].astype(np.float16)


class CountingStore(LocalStore):
    """A real LocalStore that also records every read (key, bytes returned)."""

    def __init__(self, root, **kw):
        super().__init__(root, **kw)
        self.reads: list[tuple[str, int]] = []

    async def get(self, key, prototype=None, byte_range=None):
        buf = await super().get(key, prototype, byte_range)
        self.reads.append((key, 0 if buf is None else len(buf)))
        return buf

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        out = await super().get_partial_values(prototype, key_ranges)
        self.reads += [(k, 0 if b is None else len(b)) for (k, _), b in zip(key_ranges, out)]
        return out


# ------------------------------------------------------------------ round trips


def test_fp16_round_trip_exact(tmp_path):
    schema = make_schema(num_videos=4, views=2)
    write_videos(str(tmp_path / "s.zarr"), schema, range(4))
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert len(store) == 8 and store.schema.num_videos == 4 and store.schema.views_per_video == 2
    assert store.schema.layers == (0,
                                   1) and store.schema.num_frames == 4 and store.schema.backbone["model"] == "dist-tiny"
    for i in range(8):
        got = store.features(i)
        assert got.dtype == np.float16 and got.shape == (2, 4, 17, 64)
        np.testing.assert_array_equal(got, expected_fp16(schema, i))
        v, k = divmod(i, 2)
        clip = store.clip_embeddings(i)
        assert clip.dtype == np.float16 and clip.shape == (4, 32)
        np.testing.assert_array_equal(clip, video_data(schema, v)[3][k].astype(np.float16))
    videos, labels, text = manifest(schema)
    np.testing.assert_array_equal(store.text_features, text)
    assert store.text_features.dtype == np.float32
    assert store.videos == videos and store.labels.tolist() == labels


def test_int8_round_trip_within_two_percent(tmp_path):
    schema = make_schema(num_videos=3, views=2, dtype="int8")
    write_videos(str(tmp_path / "q.zarr"), schema, range(3))
    store = FeatureStore.open(tmp_path / "q.zarr")
    raw = zarr.open_group(tmp_path / "q.zarr", mode="r")
    assert raw["features"].dtype == np.int8 and raw["feature_scales"].dtype == np.float16
    assert raw["feature_scales"].shape == (6, 2, 4, 17)
    for i in range(6):
        v, k = divmod(i, 2)
        x = video_data(schema, v)[2][k]
        got = store.features(i)
        assert got.dtype == np.float16 and got.shape == x.shape
        rel = np.linalg.norm(got.astype(np.float32) - x) / np.linalg.norm(x)
        assert rel < 0.02
        # The reader applies exactly the writer's quantisation, no more error than that.
        np.testing.assert_array_equal(got, dequantize_int8(*quantize_int8(x)))


def test_quantize_guards_zero_and_tiny_tokens():
    x = np.zeros((3, 8), np.float32)
    x[1] = 1e-9  # absmax/127 underflows fp16
    x[2] = np.linspace(-5, 5, 8)
    codes, scales = quantize_int8(x)
    assert np.isfinite(scales.astype(np.float32)).all() and (scales > 0).all()
    assert codes[0].tolist() == [0] * 8 and np.abs(codes).max() <= 127
    back = dequantize_int8(codes, scales).astype(np.float32)
    np.testing.assert_allclose(back[2], x[2], atol=5 / 127)
    assert np.abs(back[:2]).max() < 1e-6


def test_layer_subset_reads_only_those_chunks(tmp_path):
    schema = make_schema(num_videos=2, views=2, layers=[3, 7, 11])
    write_videos(str(tmp_path / "s.zarr"), schema, range(2), finalize=True)
    full = FeatureStore.open(tmp_path / "s.zarr").features(3)
    counting = CountingStore(tmp_path / "s.zarr", read_only=True)
    store = FeatureStore.open(counting)
    store.features(3, layers=[11])  # warm: status tables, metadata
    counting.reads.clear()
    one = store.features(3, layers=[11])
    chunk_bytes = 4 * 17 * 64 * 2 + 4  # values and their crc32c
    shard_reads = [(k, n) for k, n in counting.reads if k.startswith("features/c.")]
    data = [n for _, n in shard_reads if n == chunk_bytes]
    assert len(data) == 1, shard_reads  # one inner chunk, not the shard
    assert sum(n for _, n in shard_reads) < 2 * chunk_bytes  # plus the small shard index
    counting.reads.clear()
    store.features(3, layers=[7, 11])  # adjacent layers: still one ranged read
    assert [n for k, n in counting.reads if k.startswith("features/c.")] == [2 * chunk_bytes]
    np.testing.assert_array_equal(one, full[2:3])
    np.testing.assert_array_equal(store.features(3, layers=[11, 3]), full[[2, 0]])
    np.testing.assert_array_equal(store.features(3, layers=7), full[1:2])
    as32 = store.features(3, layers=[7, 11], dtype=np.float32)
    assert as32.dtype == np.float32
    np.testing.assert_array_equal(as32, full[1:].astype(np.float32))
    with pytest.raises(ValueError, match=r"available layers: \[3, 7, 11\]"):
        store.features(3, layers=[5])


# ------------------------------------------------------------------ layout


def test_one_shard_file_per_video(tmp_path):
    root = tmp_path / "s.zarr"
    schema = make_schema(num_videos=5, views=3, dtype="int8")
    write_videos(str(root), schema, [0, 2, 3], fail={3})
    for array in ("features", "feature_scales", "clip_embeddings"):
        files = sorted(p.name for p in (root / array).iterdir() if p.name != "zarr.json")
        # exactly one file per written video (3 is failed: no data), named by the shard's video index
        assert [int(f.split(".")[1]) for f in files] == [0, 2], files
        assert all(set(f.split(".")[2:]) == {"0"} for f in files)
        meta = json.loads((root / array / "zarr.json").read_text())
        shard = meta["codecs"][0]
        assert meta["chunk_grid"]["configuration"]["chunk_shape"][0] == 3  # K views per shard
        assert shard["name"] == "sharding_indexed"
        assert shard["configuration"]["chunk_shape"][0] == 1  # one sample per inner chunk
        assert shard["configuration"]["chunk_shape"][1] == (1 if array != "clip_embeddings" else 4)  # and layer
    assert sorted(p.name for p in (root / "records").iterdir()) == ["000000000.json", "000000002.json",
                                                                    "000000003.json"]
    failed = json.loads((root / "records" / "000000003.json").read_text())
    assert failed["status"] == "failed" and "truncated" in failed["error"]


def test_codec_option_compresses_and_round_trips(tmp_path):
    schema = make_schema(num_videos=2, views=1, dtype="int8", codec="zstd")
    write_videos(str(tmp_path / "z.zarr"), schema, range(2))
    meta = json.loads((tmp_path / "z.zarr" / "features" / "zarr.json").read_text())
    inner = [c["name"] for c in meta["codecs"][0]["configuration"]["codecs"]]
    assert inner == ["bytes", "zstd", "crc32c"]
    store = FeatureStore.open(tmp_path / "z.zarr")
    np.testing.assert_array_equal(store.features(1), dequantize_int8(*quantize_int8(video_data(schema, 1)[2][0])))


# ------------------------------------------------------------------ reading rules


def test_pending_and_failed_samples_refuse_features(tmp_path):
    schema = make_schema(num_videos=4, views=2)
    write_videos(str(tmp_path / "s.zarr"), schema, [0, 1], fail={1})
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert not store.complete
    assert store.status.tolist() == [1, 1, 2, 2, 0, 0, 0, 0]
    assert store.done_indices().tolist() == [0, 1]
    assert store.progress() == {"done": 1, "failed": 1, "pending": 2}
    with pytest.raises(SampleNotDoneError, match="is failed: DecodeError: video 1 is truncated"):
        store.features(2)
    with pytest.raises(SampleNotDoneError, match="is pending"):
        store.features(5)  # its shard reads as zeros in zarr; the store must not hand them out
    with pytest.raises(SampleNotDoneError):
        store.clip_embeddings(6)
    with pytest.raises(IndexError):
        store.features(8)
    failed = store.sample(3)
    assert failed["status"] == "failed" and "truncated" in failed["error"] and failed["sparse_indices"] is None
    pending = store.sample(4)
    assert pending["status"] == "pending" and pending["video"] == "class2/video_002.mp4" and pending["view"] == 0
    done = store.sample(1)
    facts, plans, _, _ = video_data(schema, 0)
    assert done["status"] == "done" and done["crop"] == tuple(plans[1]["crop"]) and done["fps"] == 25.0
    assert done["sparse_indices"].tolist() == plans[1]["sparse_indices"]


def test_failure_never_replaces_done(tmp_path):
    schema = make_schema(num_videos=2, views=1)
    w = write_videos(str(tmp_path / "s.zarr"), schema, [0])
    assert w.write_failure(0, "late failure from an overlapping writer") is False
    assert FeatureStore.open(tmp_path / "s.zarr").sample(0)["status"] == "done"


def test_bad_inputs_write_nothing(tmp_path):
    schema = make_schema(num_videos=2, views=2)
    w = open_writer(str(tmp_path / "s.zarr"), schema)
    facts, plans, feats, clip = video_data(schema, 0)
    with pytest.raises(ValueError, match="features have shape"):
        w.write_video(0, facts, plans, feats[:, :1], clip)
    with pytest.raises(ValueError, match="sparse_indices has 3 frames"):
        w.write_video(0, facts, [dict(plans[0], sparse_indices=[1, 2, 3]), plans[1]], feats, clip)
    bad = feats.copy()
    bad[0, 0, 0, 0, 0] = 1e6  # overflows fp16
    with pytest.raises(ValueError, match="NaN or inf"):
        w.write_video(0, facts, plans, bad, clip)
    bad_clip = clip.copy()
    bad_clip[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="clip_embeds contain NaN or inf"):
        w.write_video(0, facts, plans, feats.astype(np.float16), bad_clip)
    with pytest.raises(TypeError):
        w.write_failure(0, {"num_frames": 1})  # (v, error, facts): error text comes second
    assert w.pending() == [0, 1]
    assert not (tmp_path / "s.zarr" / "features" / "c.0.0.0.0.0").exists()
    q = open_writer(str(tmp_path / "q.zarr"), make_schema(num_videos=1, views=2, dtype="int8"))
    with pytest.raises(ValueError, match="features contain NaN or inf in float16"):
        q.write_video(0, facts, plans, np.where(feats > 4, np.inf, feats).astype(np.float16), clip)
    assert q.pending() == [0] and not list((tmp_path / "q.zarr" / "features").glob("c.*"))


def test_finite_checked_skips_only_the_scan(tmp_path):
    # Extraction checks finiteness on the device and says so (finite_checked): the writer then stores the same
    # bytes without its own scan, and still refuses wrong shapes.
    schema = make_schema(num_videos=1, views=2)
    facts, plans, feats, clip = video_data(schema, 0)
    feats16, clip16 = feats.astype(np.float16), clip.astype(np.float16)
    scanned, trusted = (open_writer(str(tmp_path / f"{n}.zarr"), schema) for n in ("scanned", "trusted"))
    with pytest.raises(ValueError, match="features have shape"):
        trusted.write_video(0, facts, plans, feats16[:, :1], clip16, finite_checked=True)
    scanned.write_video(0, facts, plans, feats16, clip16)
    trusted.write_video(0, facts, plans, feats16, clip16, finite_checked=True)
    for name in ("features/c.0.0.0.0.0", "clip_embeddings/c.0.0.0"):
        assert (tmp_path / "trusted.zarr" / name).read_bytes() == (tmp_path / "scanned.zarr" / name).read_bytes()
    bad = feats.copy()
    bad[0, 0, 0, 0, 0] = 1e6  # given as fp32: the caller checked other values than those stored, so the scan runs
    with pytest.raises(ValueError, match="NaN or inf"):
        open_writer(str(tmp_path / "wide.zarr"), schema).write_video(0, facts, plans, bad, clip16,
                                                                     finite_checked=True)


# ------------------------------------------------------------------ finalize


def test_finalize_consolidates_and_keeps_sample_fields(tmp_path):
    root = tmp_path / "s.zarr"
    schema = make_schema(num_videos=5, views=2)
    w = write_videos(str(root), schema, [0, 1, 2, 3], fail={2})
    assert w.finalize() == {"done": 3, "failed": 1, "pending": 1, "bytes": w.finalize()["bytes"], "complete": False}
    assert not FeatureStore.open(root).complete
    before = FeatureStore.open(root)
    expected = [before.sample(i) for i in range(8)]
    write_videos(str(root), schema, [4])
    summary = w.finalize()
    shard_bytes = sum(p.stat().st_size for a in ("features", "clip_embeddings") for p in (root / a).glob("c.*"))
    assert summary == {"done": 4, "failed": 1, "pending": 0, "bytes": shard_bytes, "complete": True}
    assert w.finalize() == summary  # idempotent

    # A remote-style reader: consolidated metadata must be there, and opening must be a few requests.
    group = zarr.open_group(root, mode="r", use_consolidated=True)
    assert group.attrs["complete"] is True and group.attrs["summary"]["failed"] == 1
    counting = CountingStore(root, read_only=True)
    store = FeatureStore.open(counting)
    assert store.complete and store.consolidated
    sample = store.sample(3)
    store.features(0)
    assert len(counting.reads) <= 22, counting.reads  # root metadata twice, the tables a sample reads, a shard
    assert not any(k.startswith("records/") for k, _ in counting.reads)  # tables, not records

    for i in range(8):
        got = store.sample(i)
        assert {k: got[k] for k in got if k != "sparse_indices"} == \
            {k: expected[i][k] for k in got if k != "sparse_indices"}
        assert (got["sparse_indices"] is None) == (expected[i]["sparse_indices"] is None)
        if got["sparse_indices"] is not None:
            np.testing.assert_array_equal(got["sparse_indices"], expected[i]["sparse_indices"])
    assert sample["status"] == "done" and sample["label_name"] == "class1"
    assert store.sample(4)["status"] == "failed" and "truncated" in store.sample(4)["error"]
    assert store.sample(8)["num_frames"] == 34 and store.sample(8)["status"] == "done"
    assert store.status.tolist() == [1, 1, 1, 1, 2, 2, 1, 1, 1, 1]
    assert group["videos/error"][2] == "DecodeError: video 2 is truncated"
    with pytest.raises(SampleNotDoneError):
        store.features(5)


def test_retry_failed_reopens_and_refinalizes(tmp_path):
    root = str(tmp_path / "s.zarr")
    schema = make_schema(num_videos=3, views=1)
    write_videos(root, schema, range(3), fail={1}, finalize=True)
    w = open_writer(root, schema)
    assert w.pending() == [] and w.pending(retry_failed=True) == [1]
    w.write_video(1, *video_data(schema, 1))
    assert not FeatureStore.open(root).complete  # tables are stale until finalize
    assert w.finalize()["complete"]
    store = FeatureStore.open(root)
    assert store.complete and store.status.tolist() == [1, 1, 1]
    np.testing.assert_array_equal(store.features(1), expected_fp16(schema, 1))


def test_fingerprint_stable_and_sensitive(tmp_path):
    schema = make_schema(num_videos=2, views=1)
    w = write_videos(str(tmp_path / "a.zarr"), schema, range(2), finalize=True)
    fp = FeatureStore.open(tmp_path / "a.zarr").fingerprint
    assert len(fp) == 64 and fp == w.fingerprint == FeatureStore.open(tmp_path / "a.zarr").fingerprint
    other = write_videos(str(tmp_path / "b.zarr"), make_schema(num_videos=2, views=1, seed=1), [])
    assert other.fingerprint != fp
    informational = dataclasses.replace(schema, extra={"software": {"note": "newer"}})
    assert open_writer(str(tmp_path / "c.zarr"), informational).fingerprint == fp


# ------------------------------------------------------------------ opening errors


def test_open_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no dist-cache store"):
        FeatureStore.open(tmp_path / "missing.zarr")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write store") as err:
        open_writer(str(blocker / "s.zarr"), make_schema())
    assert "\n" not in str(err.value)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a dist-cache store"):
        open_writer(str(foreign), make_schema())
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    rows = manifest(make_schema())
    with pytest.raises(ValueError, match="missing fields"):
        StoreWriter.open(str(tmp_path / "x.zarr"), {k: v for k, v in make_schema().to_json().items() if k != "layers"},
                         *rows)
    with pytest.raises(ValueError, match="layers must lie"):
        StoreWriter.open(str(tmp_path / "x.zarr"), dict(make_schema().to_json(), layers=[0, 99]), *rows)
    assert not (tmp_path / "x.zarr").exists()


# ------------------------------------------------------------------ pickling and fsspec


def read_in_child(store: FeatureStore, i: int, layers: list[int] | None = None) -> tuple[np.ndarray, dict]:
    """Target for the spawned process: use a FeatureStore that arrived by pickle."""
    return store.features(i, layers), store.sample(i)


def test_feature_store_pickles_cheaply_and_works_in_spawned_process(tmp_path):
    schema = make_schema(num_videos=3, views=2)
    write_videos(str(tmp_path / "s.zarr"), schema, range(3), finalize=True)
    store = FeatureStore.open(tmp_path / "s.zarr")
    store.features(0)  # populate caches: they must not travel
    blob = pickle.dumps(store)
    assert len(blob) < 500
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        feats, sample = pool.apply(read_in_child, (store, 5, [1]))
    np.testing.assert_array_equal(feats, expected_fp16(schema, 5)[1:2])
    assert sample["video_index"] == 2 and sample["view"] == 1 and sample["status"] == "done"


def test_memory_fsspec_url_write_and_read(tmp_path):
    url = f"memory://dist-cache-tests/{uuid.uuid4().hex}/s.zarr"
    schema = make_schema(num_videos=4, views=2, dtype="int8")
    w = write_videos(url, schema, [0, 1, 2], fail={2})
    assert w.pending() == [3]
    assert FeatureStore.open(url).status.tolist() == [1, 1, 1, 1, 2, 2, 0, 0]
    write_videos(url, schema, [3])
    assert w.finalize()["complete"]
    store = FeatureStore.open(url)
    assert store.complete and store.consolidated
    local = write_videos(str(tmp_path / "l.zarr"), schema, range(4), fail={2}, finalize=True)
    ref = FeatureStore.open(local.url)
    assert store.fingerprint == ref.fingerprint
    for i in (0, 3, 7):
        np.testing.assert_array_equal(store.features(i), ref.features(i))
        assert store.sample(i)["crop"] == ref.sample(i)["crop"]
    with pytest.raises(SampleNotDoneError):
        store.features(4)
    unpickled = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(unpickled.features(7, [0]), ref.features(7, [0]))


def test_writer_reopen_uses_stored_schema(tmp_path):
    schema = make_schema(num_videos=2, views=1)
    videos, labels, text = manifest(schema)
    StoreWriter.open(str(tmp_path / "s.zarr"), schema, videos, labels, text)
    again = StoreWriter.open(str(tmp_path / "s.zarr"), dataclasses.replace(schema, extra={"software": {"note": "v2"}}),
                             videos, labels, text)
    assert again.schema.extra["software"] == {"note": "informational, not compat"}
    assert pickle.loads(pickle.dumps(again)).pending() == [0, 1]
    assert Path(tmp_path / "s.zarr" / "zarr.json").exists()


def test_many_records_are_gathered_in_order(tmp_path):
    # Enough videos that records are read by the threaded batch path.
    schema = make_schema(num_videos=90, views=1, num_frames=2)
    fail = set(range(0, 90, 7))
    w = write_videos(str(tmp_path / "s.zarr"), schema, range(85), fail=fail)
    partial = FeatureStore.open(tmp_path / "s.zarr")
    expect = [2 if v in fail else 1 if v < 85 else 0 for v in range(90)]
    assert partial.status.tolist() == expect
    assert w.finalize()["pending"] == 5
    write_videos(str(tmp_path / "s.zarr"), schema, range(85, 90), fail=fail)
    shard_bytes = sum(p.stat().st_size for a in ("features",
                                                 "clip_embeddings") for p in (tmp_path / "s.zarr" / a).glob("c.*"))
    assert w.finalize() == {"done": 90 - len(fail), "failed": len(fail), "pending": 0, "bytes": shard_bytes,
                            "complete": True}
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.status.tolist() == [2 if v in fail else 1 for v in range(90)]
    assert [store.sample(v)["num_frames"] for v in (1, 89)] == [31, 119]


def test_decoder_facts_round_trip_and_stores_without_their_tables_read_as_unknown(tmp_path):
    """The display transform and variable frame rate a decoder reports go into the record and, at finalize, the
    videos/transform and videos/vfr tables; a fact the decoder could not tell (decord's transform) stays unknown.
    A store finalized before those tables existed reads every row as unknown."""
    import shutil

    from storage.writer import consolidate

    schema = make_schema(num_videos=3, views=1)
    root = tmp_path / "s.zarr"
    w = open_writer(str(root), schema)
    told = [{"transform": "transpose=cclock", "vfr": True}, {"transform": "", "vfr": False}, {"vfr": False}]
    for v in range(3):
        facts, plans, features, clip = video_data(schema, v)
        w.write_video(v, {**facts, **told[v]}, plans, features, clip)
    assert {k: FeatureStore.open(root).sample(0)[k] for k in ("transform", "vfr")} == told[0]  # from the record
    w.finalize()
    store = FeatureStore.open(root)
    assert store.complete
    assert [{k: store.sample(v)[k] for k in ("transform", "vfr")} for v in range(3)] == \
        [told[0], told[1], {"transform": None, "vfr": False}]
    group = zarr.open_group(root, mode="r")
    assert list(group["videos/transform"][:]) == ["transpose=cclock", "none", ""]
    assert list(group["videos/vfr"][:]) == [1, 0, 0]

    for name in ("videos/transform", "videos/vfr"):  # as finalized by an earlier dist-cache
        shutil.rmtree(root / name)
    consolidate(LocalStore(root))
    old = FeatureStore.open(root)
    assert old.complete and old.sample(0)["num_frames"] == store.sample(0)["num_frames"]
    assert (old.sample(0)["transform"], old.sample(0)["vfr"]) == (None, None)
    # Intact, as info and verify check it (before: "videos/transform/zarr.json is missing", DAMAGED); info does not
    # blame decord for what such a store never recorded.
    assert old.check_store() == []
    from pipelines.info import format_info, store_info

    assert "3 unknown; 0 turned upright by a display matrix, 3 unknown (decord does not report it, and older stores " \
           "did not record it)" in format_info(store_info(str(root)))
