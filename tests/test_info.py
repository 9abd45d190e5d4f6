"""`dist-cache info`: dense frames and the gammas they serve, what CLIP ran in, the decoder, packing, objects and
size where the store lives (walked locally, derived over HTTP), stores written through the StoreWriter API, and
the QuickGELU warning."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from pipelines.copy import copy_store
from pipelines.info import dense_gammas
from servers import serve
from storage import StoreWriter
from storage.testing import make_schema, manifest, write_videos

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def info(*args: object) -> str:
    result = CliRunner().invoke(cli.main, ["info", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout


def walk(root: Path) -> tuple[int, int]:
    files = [Path(d) / f for d, _, names in os.walk(root) for f in names]
    return len(files), sum(f.stat().st_size for f in files)


def test_dense_gammas_follow_the_index_rule():
    assert dense_gammas(None) == [] and dense_gammas(1) == [1]
    assert dense_gammas(4) == [1, 2, 4] and dense_gammas(8) == [1, 2, 4, 8] and dense_gammas(6) == [1, 2, 3, 6]


def test_frames_precision_activation_decoder_objects_and_size(tmp_path):
    root = tmp_path / "s.zarr"
    write_videos(str(root), make_schema(num_videos=5, views=2, dense_gamma=4), range(5), fail={3}, finalize=True)
    text = info(root)
    assert "frames     dense frames for gamma 1, 2, 4 (stored G=4)" in text
    assert "activation gelu, run in fp32" in text and "decoded by decord test" in text
    objects, size = walk(root)
    data = json.loads(info(root, "--json"))
    assert (data["objects"], data["bytes"], data["measured"]) == (objects, size, "listing")
    raw = 4 * 4 * (64 * 64 * 3 + 4)  # G*T frames of 64 px, each with its chunk's checksum
    assert data["dense_frames"] == {"gamma": 4, "gammas": [1, 2, 4], "format": "raw", "quality": None,
                                    "encoded_before": [], "bytes_per_view": raw, "raw_bytes_per_view": raw}
    assert data["videos_per_shard"] == 1
    assert f"storage    format 2, {objects} objects" in text
    assert "none stored" in info(_plain_store(tmp_path))


def _plain_store(tmp_path: Path) -> Path:
    write_videos(str(tmp_path / "plain.zarr"), make_schema(num_videos=2), range(2), finalize=True)
    return tmp_path / "plain.zarr"


@pytest.mark.parametrize("packed", [1, 3])
def test_over_http_the_objects_are_derived_from_the_metadata(tmp_path, packed):
    """HTTP lists nothing: the count derived from the metadata and the status must be what a walk finds."""
    src = tmp_path / "src.zarr"
    write_videos(str(src), make_schema(num_videos=7, views=2, dtype="int8", dense_gamma=2), range(7), fail={2, 5},
                 finalize=True)
    copy_store(str(src), str(tmp_path / "s.zarr"), videos_per_shard=packed, progress=False)
    local = json.loads(info(tmp_path / "s.zarr", "--json"))
    with serve(tmp_path) as (base, _):
        remote = json.loads(info(f"{base}/s.zarr", "--json"))
        text = info(f"{base}/s.zarr")
    assert remote["measured"] == "metadata" and remote["objects"] == local["objects"] == walk(tmp_path / "s.zarr")[0]
    summary = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]["summary"]
    assert remote["bytes"] == summary["bytes"] <= local["bytes"]
    assert f"{local['objects']} objects (from the metadata)" in text
    assert ("packed copy of 3 videos per shard (read-only)" in text) == (packed == 3)


def test_a_store_written_through_the_storewriter_api(tmp_path):
    """The minimal schema storage/README.md documents: no sampling policy, no recorded crop parameters."""
    schema = make_schema(num_videos=2, views=1).to_json()
    schema["sampling"] = {"seed": 0}
    schema["preprocess"] = {"decoder": {"name": "pyav", "version": "13"}}
    typed = make_schema(num_videos=2, views=1)
    videos, labels, text = manifest(typed)
    writer = StoreWriter.open(str(tmp_path / "api.zarr"), schema, videos, labels, text)
    for v in range(2):
        facts = {"num_frames": 30, "fps": 25.0, "width": 64, "height": 48}
        plans = [{"sparse_indices": [0, 5, 10, 15], "window": 7.5, "crop": [0, 0, 48, 48], "flip": False,
                  "grayscale": False}]
        writer.write_video(v, facts, plans, np.ones((1, 2, 4, 17, 64), np.float32), np.ones((1, 4, 32), np.float32))
    writer.finalize()
    assert "unrecorded policy" in info(tmp_path / "api.zarr") and "decoded by pyav 13" in info(tmp_path / "api.zarr")
    result = CliRunner().invoke(cli.main, ["verify", str(tmp_path / "api.zarr")])
    assert result.exit_code == 0, result.output


def test_gelu_runs_of_quickgelu_weights_are_flagged(tmp_path):
    """A format-2 store from before dist-cache built the activation from the weights: OpenAI's tag, run in GELU."""
    root = tmp_path / "s.zarr"
    write_videos(str(root), make_schema(num_videos=1, views=1), [0], finalize=True)
    meta = json.loads((root / "zarr.json").read_text())
    meta["attributes"]["dist_cache"]["backbone"].update(model="ViT-B-16", pretrained="openai")
    (root / "zarr.json").write_text(json.dumps(meta))
    text = info(root)
    assert "note: backbone: the features were computed with GELU, but the openai weights of ViT-B-16 were trained " \
           "with QuickGELU" in text
    assert "QuickGELU" not in info(_plain_store(tmp_path))
