"""Format 1 stores (dist-cache 0.1) stay readable, are never written into, and say what they lack.

`write_format1` is a few lines of 0.1's writer, kept here only: zarr's own writes of the old layout
(no checksums, unsharded CLIP chunks of one video, records without labels, tables without samples/label).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import cli
from storage import FeatureStore, StoreMismatchError, StoreWriter
from storage.schema import canonical_json, videos_sha256
from storage.testing import make_schema, manifest, video_data
from test_store_resume import snapshot

KEYS_NEW_IN_2 = ("precision", "dense_frames")


def format1_schema(pretrained: str = "none", model: str = "dist-tiny") -> dict:
    schema = make_schema(num_videos=4, views=2, model=model).to_json()
    for key in (*KEYS_NEW_IN_2, "compat"):
        schema.pop(key)
    schema["format_version"] = 1
    del schema["backbone"]["activation"]
    del schema["sampling"]["flip_label_map"]
    schema["backbone"]["pretrained"] = pretrained
    compat_keys = ("format_version", "backbone", "preprocess", "layers", "num_frames", "views_per_video", "split",
                   "dtype", "codec", "tokens", "width", "sampling", "num_videos", "class_names", "text")
    schema["compat"] = {k: schema[k] for k in compat_keys}
    schema["compat"]["backbone"] = {k: v for k, v in schema["backbone"].items() if k != "open_clip_version"}
    return schema


def write_format1(root: Path, schema: dict, done: list[int], finalize: bool) -> None:
    V, K, T = schema["num_videos"], schema["views_per_video"], schema["num_frames"]
    L, N1, C, E = len(schema["layers"]), schema["tokens"], schema["width"], schema["backbone"]["embed_dim"]
    typed = make_schema(num_videos=V, views=K)
    videos, labels, text = manifest(typed)
    schema = {**schema, "videos_sha256": videos_sha256(videos, labels)}
    group = zarr.open_group(root, mode="w", zarr_format=3)
    dot = {"name": "default", "separator": "."}
    feats = group.create_array("features", shape=(V * K, L, T, N1, C), dtype="float16", chunks=(1, 1, T, N1, C),
                               shards=(K, L, T, N1, C), compressors=None, chunk_key_encoding=dot)
    clip = group.create_array("clip_embeddings", shape=(V * K, T, E), dtype="float16", chunks=(K, T, E),
                              compressors=None, chunk_key_encoding=dot)
    group.create_array("text_embeddings", data=text)
    group.create_array("videos/path", data=np.array(videos, dtype=str))
    group.create_array("videos/label", data=np.array(labels, dtype=np.int32))
    status = np.zeros(V, np.uint8)
    for v in done:
        facts, plans, f, c = video_data(typed, v)
        feats[v * K:(v + 1) * K] = f.astype(np.float16)
        clip[v * K:(v + 1) * K] = c.astype(np.float16)
        record = {"format_version": 1, "video_index": v, "status": "done", "error": None, "bytes": 0,
                  "facts": facts, "views": plans}
        (root / "records").mkdir(exist_ok=True)
        (root / "records" / f"{v:09d}.json").write_text(canonical_json(record) + "\n")
        status[v] = 1
    if finalize:
        group.create_array("samples/status", data=np.repeat(status, K))
        sparse = np.full((V * K, T), -1, np.int32)
        for v in done:
            sparse[v * K:(v + 1) * K] = [p["sparse_indices"] for p in video_data(typed, v)[1]]
        group.create_array("samples/sparse_indices", data=sparse)
        for name, dtype, fill in (("window", np.float32, 1.0), ("flip", bool, False), ("grayscale", bool, False)):
            group.create_array(f"samples/{name}", data=np.full(V * K, fill, dtype))
        group.create_array("samples/crop", data=np.zeros((V * K, 4), np.int32))
        group.create_array("videos/status", data=status)
        group.create_array("videos/error", data=np.array([""] * V, dtype=str))
        for name in ("num_frames", "width", "height"):
            group.create_array(f"videos/{name}", data=np.full(V, 30, np.int32))
        group.create_array("videos/fps", data=np.full(V, 25.0))
    group.attrs.update({"dist_cache": schema, "complete": finalize, "summary": None})
    if finalize:
        zarr.consolidate_metadata(root, zarr_format=3)


@pytest.mark.parametrize("finalize", [False, True])
def test_format1_reads_through_zarr_and_says_what_it_lacks(tmp_path, finalize):
    root = tmp_path / "old.zarr"
    schema = format1_schema()
    write_format1(root, schema, done=[0, 2, 3] if not finalize else [0, 1, 2, 3], finalize=finalize)
    store = FeatureStore.open(root)
    typed = make_schema(num_videos=4, views=2)
    assert store.schema.format_version == 1 and not store.checksummed and not store.has_frames
    for i in (0, 1, 4, 7):
        v, k = divmod(i, 2)
        np.testing.assert_array_equal(store.features(i), video_data(typed, v)[2][k].astype(np.float16))
        np.testing.assert_array_equal(store.clip_embeddings(i), video_data(typed, v)[3][k].astype(np.float16))
        assert store.label(i) == store.labels[v] == v % 3 and store.sample(i)["label"] == v % 3
    assert store.check_video(0) == []
    with pytest.raises(ValueError, match="no dense frames"):
        store.frames(0)
    assert any("integrity unchecked" in line for line in store.limitations())
    # Checkpoints record 0.1's fingerprint of their store: it must not change.
    stored = json.loads((root / "zarr.json").read_text())["attributes"]["dist_cache"]
    basis = {"compat": stored["compat"], "class_names": stored["class_names"], "videos_sha256": stored["videos_sha256"]}
    assert store.fingerprint == hashlib.sha256(canonical_json(basis).encode()).hexdigest()


def test_format1_is_never_written_into(tmp_path):
    root = tmp_path / "old.zarr"
    write_format1(root, format1_schema(), done=[0], finalize=False)
    before = snapshot(root)
    with pytest.raises(StoreMismatchError, match="made by dist-cache 0.1.*use a new --out") as err:
        StoreWriter.open(str(root), make_schema(num_videos=4, views=2), *manifest(make_schema(num_videos=4, views=2)))
    assert "\n" not in str(err.value)
    assert snapshot(root) == before


def test_info_flags_openai_weights_run_without_quickgelu_and_copy_upgrades(tmp_path):
    root = tmp_path / "old.zarr"
    write_format1(root, format1_schema(pretrained="openai"), done=[0, 1, 2, 3], finalize=True)
    result = CliRunner().invoke(cli.main, ["info", str(root)])
    assert result.exit_code == 0, result.output
    assert "without QuickGELU" in result.output and "integrity unchecked" in result.output
    copied = CliRunner().invoke(cli.main, ["copy", str(root), str(tmp_path / "new.zarr")])
    assert copied.exit_code == 0, copied.output
    new, old = FeatureStore.open(tmp_path / "new.zarr"), FeatureStore.open(root)
    assert new.schema.format_version == 2 and new.checksummed and new.complete
    for i in range(8):
        np.testing.assert_array_equal(new.features(i), old.features(i))
        assert new.label(i) == old.label(i)
