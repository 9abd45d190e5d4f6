"""The small arrays and the metadata documents are checked like the shards: a deleted label or text-embedding
chunk, a flipped byte in one, a per-array zarr.json replaced by broken JSON. verify (and verify --deep) fails
naming the key and the fix, info says DAMAGED, train and eval refuse in one line (a missing label chunk once read as
label 0: eval reported 100 % top-1), and extract --repair rewrites what is damaged, changing nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cli_runs import invoke, one_error_line
from storage import FeatureStore

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TRAIN_FLAGS = ("--epochs", "1", "--batch-size", "4", "--decode-workers", "0", "--alpha-dim", "32", "--beta-dim", "16",
               "--pool-blocks", "1", "--warmup-epochs", "1", "--device", "cpu")


def extract_args(dataset: Path, checkpoint: Path, out: Path, *extra: object) -> list[object]:
    return ["extract", "--manifest", dataset / "val.csv", "--video-root", dataset / "videos", "--out", out,
            "--model", "dist-tiny", "--pretrained", checkpoint, "--frames", "4", "--views", "1", "--split", "test",
            "--decode-workers", "1", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def intact(motion_dataset, tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """A store extracted through the CLI, and a run trained on it (for eval)."""
    root = tmp_path_factory.mktemp("integrity")
    result = invoke(*extract_args(motion_dataset, tiny_checkpoint, root / "val.zarr"))
    assert result.exit_code == 0, result.output
    result = invoke("train", "--cache", root / "val.zarr", "--video-root", motion_dataset / "videos",
                    "--out", root / "run", *TRAIN_FLAGS)
    assert result.exit_code == 0, result.output
    return {"store": root / "val.zarr", "checkpoint": root / "run" / "best.pt"}


@pytest.fixture
def store(intact, tmp_path) -> Path:
    shutil.copytree(intact["store"], tmp_path / "val.zarr")
    return tmp_path / "val.zarr"


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "label chunk deleted": (lambda root: (root / "videos/label/c.0").unlink(),
                            "videos/label/c.0, a chunk of videos/label, is missing"),
    "text chunk deleted": (lambda root: (root / "text_embeddings/c.0.0").unlink(),
                           "text_embeddings/c.0.0, a chunk of text_embeddings, is missing"),
    "label byte flipped": (lambda root: flip(root / "videos/label/c.0"), "array videos/label does not decode"),
    "text byte flipped": (lambda root: flip(root / "text_embeddings/c.0.0"), "array text_embeddings does not decode"),
    "status chunk deleted": (lambda root: (root / "samples/status/c.0").unlink(),
                             "samples/status/c.0, a chunk of samples/status, is missing"),
    "label metadata broken": (lambda root: (root / "videos/label/zarr.json").write_text("{not json"),
                              "videos/label/zarr.json is not valid JSON"),
    "features metadata broken": (lambda root: (root / "features/zarr.json").write_text('{"zarr_format": 3'),
                                 "features/zarr.json is not valid JSON"),
    "metadata edited": (lambda root: (root / "videos/path/zarr.json").write_text('{"node_type": "array"}'),
                        "videos/path/zarr.json differs from the copy consolidated in the root zarr.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("deep", [False, True])
def test_verify_finds_damage_to_every_array_and_document(store, damage, deep):
    do, finding = DAMAGE[damage]
    assert invoke("verify", store).exit_code == 0
    do(store)
    result = invoke("verify", store, *(["--deep"] if deep else []))
    assert result.exit_code == 1, result.output
    assert f"  damaged: store: {finding}" in result.output, result.output
    assert "problem: the store's own arrays or metadata are damaged (1 finding(s)); rerun the extract command " \
           "with --repair" in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("damage", ["label chunk deleted", "text chunk deleted", "label metadata broken",
                                    "status chunk deleted"])
def test_info_says_damaged_and_what_it_checked(store, damage):
    intact = invoke("info", store)
    assert intact.exit_code == 0 and ": complete," in intact.output, intact.output
    assert "the videos' shards were not checked: `dist-cache verify` checks them" in intact.output
    DAMAGE[damage][0](store)
    result = invoke("info", store)
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert ": DAMAGED," in first and "complete" not in first, result.output
    assert f"  damaged: {DAMAGE[damage][1]}" in result.output, result.output
    assert "  fix: rerun the extract command with --repair" in result.output


@pytest.mark.parametrize("key", ["videos/label/c.0", "text_embeddings/c.0.0"])
def test_eval_and_train_refuse_a_missing_small_chunk(intact, store, motion_dataset, tmp_path, key):
    """Before: a missing label chunk read as label 0 (eval: 100 % top-1 where the intact store gives 25 %), a
    missing text-embedding chunk as zeros ("loss is not finite")."""
    (store / key).unlink()
    line = one_error_line(invoke("eval", "--checkpoint", intact["checkpoint"], "--cache", store, "--video-root",
                                 motion_dataset / "videos", "--decode-workers", "0", "--device", "cpu"))
    assert f"{key}, a chunk of {key.rsplit('/', 1)[0]}, is missing" in line and "--repair" in line, line
    line = one_error_line(invoke("train", "--cache", store, "--video-root", motion_dataset / "videos", "--out",
                                 tmp_path / "run", *TRAIN_FLAGS))
    assert f"{key}, a chunk of" in line and str(store) in line, line


def test_repair_rewrites_the_damaged_arrays_and_documents(store, motion_dataset, tiny_checkpoint):
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    for damage in ("label chunk deleted", "text byte flipped", "features metadata broken", "status chunk deleted",
                   "metadata edited"):
        DAMAGE[damage][0](store)
    plain = invoke(*extract_args(motion_dataset, tiny_checkpoint, store))
    assert "--repair" in one_error_line(plain)
    result = invoke(*extract_args(motion_dataset, tiny_checkpoint, store, "--repair"))
    assert result.exit_code == 0, result.output
    for what in ("videos/label/c.0, a chunk of videos/label, is missing", "features/zarr.json is not valid JSON"):
        assert f"repaired the store's {what}" in result.output, result.output
    assert invoke("verify", store, "--deep").exit_code == 0
    after = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert after.keys() == before.keys()
    # Everything is as extracted, byte for byte, but the text embeddings: this run's (the same on this machine).
    assert [k for k in before if before[k] != after[k]] == [], [k for k in before if before[k] != after[k]]
    assert FeatureStore.open(store).complete


def test_repair_rewrites_the_tables_of_a_complete_store(store, motion_dataset, tiny_checkpoint):
    """Before: a complete store is read from its tables, so --repair's own check stopped at a missing or damaged
    table chunk (videos/fps, samples/crop...) with "rerun with --repair", and no command could mend it."""
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    (store / "videos/fps/c.0").unlink()
    flip(store / "samples/crop/c.0.0")
    line = one_error_line(invoke(*extract_args(motion_dataset, tiny_checkpoint, store)))
    assert "array samples/crop does not decode" in line and line.endswith("with --repair"), line
    result = invoke(*extract_args(motion_dataset, tiny_checkpoint, store, "--repair"))
    assert result.exit_code == 0, result.output
    for what in ("videos/fps/c.0, a chunk of videos/fps, is missing", "array samples/crop does not decode"):
        assert f"repaired the store's {what}" in result.output, result.output
    assert invoke("verify", store, "--deep").exit_code == 0
    after = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert after.keys() == before.keys()
    assert [k for k in before if before[k] != after[k]] == []
