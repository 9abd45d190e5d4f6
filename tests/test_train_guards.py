"""Nothing silently wrong in training: non-finite losses stop the run before an update, full disks are one line,
changed videos are refused, a run directory is held by one process, ranks die with their launcher; and the run's
record in TensorBoard and W&B. Real processes, real files, real stores."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from dist_cache.errors import UserError
from pipelines.extract.extractor import ExtractOptions, extract
from pipelines.train.branch import online_precision
from pipelines.train.checkpoint import load_checkpoint
from pipelines.train.data.dense_frames import VideoChanged
from pipelines.train.data.loader import BatchLoader, EpochSampler
from pipelines.train.evaluation import EvalOptions, evaluate
from pipelines.train.run import TrainOptions, train
from pipelines.train.runlock import RunLock
from storage import FeatureStore
from storage.testing import make_schema, write_videos

FEATURES_ONLY = ["--no-temporal", "--no-integ-to-temp", "--no-temp-to-integ", "--alpha-dim", "32", "--beta-dim", "16",
                 "--pool-blocks", "1", "--batch-size", "4", "--warmup-epochs", "1", "--device", "cpu",
                 "--decode-workers", "0", "--read-threads", "2"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stores(tmp_path_factory, motion_dataset, tiny_checkpoint):
    root = tmp_path_factory.mktemp("guards")
    videos = root / "videos"
    shutil.copytree(motion_dataset / "videos", videos)
    common = dict(video_root=str(videos), model="dist-tiny", pretrained=str(tiny_checkpoint), frames=4,
                  decode_workers=1, device="cpu")
    for name, csv, views, split in (("train", "train.csv", 2, "train"), ("val", "val.csv", 3, "test"),
                                    ("test", "train.csv", 1, "test")):
        extract(ExtractOptions(manifest=str(motion_dataset / csv), out=str(root / f"{name}.zarr"), views=views,
                               split=split, hash_videos=True, **common), progress=False)
    return {"root": root, "videos": videos, "train": str(root / "train.zarr"), "val": str(root / "val.zarr"),
            "test": str(root / "test.zarr")}


def cli_train(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli.main, ["train", *args])
    return result.exit_code, result.output


def test_a_non_finite_loss_stops_the_run_before_any_update_or_checkpoint(stores, tmp_path):
    out = tmp_path / "nan"
    code, output = cli_train("--cache", stores["train"], "--out", str(out), "--lr", "1e30", "--epochs", "2",
                             "--save-every", "1", *FEATURES_ONLY)
    assert code == 2, output
    last = output.splitlines()[-1]
    found = re.match(r"error: step (\d+): the loss is not finite for samples \d+ \(video \d+ \w+/\d+\.mp4, view \d\)",
                     last)
    assert found and "nothing was updated or saved" in last, output
    ckpt = load_checkpoint(out / "last.pt")  # the step before's, saved before the bad step: never a NaN weight
    assert ckpt["step"] == int(found[1]) - 1 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_a_full_disk_is_one_line(stores, tmp_path):
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        code, output = cli_train("--cache", stores["train"], "--out", str(mount / "run"), "--epochs", "1",
                                 *FEATURES_ONLY)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
    assert code == 2, output
    last = output.splitlines()[-1]
    # The disk fills before the run's first last.pt: there is nothing to resume, and the line says so.
    assert last.startswith("error: disk full writing ") and last.endswith(
        "free space (or fix the file system) and rerun the same command (without --resume: the run has no last.pt "
        "yet)"), output
    assert "basic_ios" not in output and "Traceback" not in output


def test_a_write_failure_says_resume_only_when_there_is_a_last_pt(tmp_path):
    import errno

    from pipelines.files import write_failure

    full = OSError(errno.ENOSPC, "No space left on device")
    assert str(write_failure(tmp_path / "metrics.jsonl", full)).endswith("rerun the same command (without --resume: "
                                                                          "the run has no last.pt yet)")
    (tmp_path / "last.pt").write_bytes(b"")
    assert str(write_failure(tmp_path / "metrics.jsonl", full)).endswith("and rerun with --resume")


def test_a_video_replaced_by_another_valid_clip_is_refused(stores, tmp_path):
    store = FeatureStore.open(stores["train"])
    root = tmp_path / "videos"
    shutil.copytree(stores["videos"], root)
    sizes = {name: (root / name).stat().st_size for name in store.videos}
    big, small = max(sizes, key=sizes.get), min(sizes, key=sizes.get)
    opts = dict(cache=stores["train"], video_root=str(root), epochs=1, device="cpu", decode_workers=0, batch_size=4)
    (root / big).write_bytes((root / small).read_bytes())  # another valid clip, of another size
    with pytest.raises(Exception, match=f"{big} is {sizes[small]} bytes, but the store recorded {sizes[big]}"):
        train(TrainOptions(out=str(tmp_path / "a"), **opts), progress=False)
    # The same size (padded): only the recorded sha256 tells, when the video is first decoded.
    (root / big).write_bytes((root / small).read_bytes() + bytes(sizes[big] - sizes[small]))
    with pytest.raises(VideoChanged, match=f"{big} .*its sha256 differs") as err:
        train(TrainOptions(out=str(tmp_path / "b"), **opts), progress=False)
    assert "\n" not in str(err.value)


def test_int8_features_are_dequantised_on_the_device_as_the_store_does(tmp_path):
    schema = make_schema(num_videos=4, views=2, dtype="int8")
    write_videos(str(tmp_path / "s.zarr"), schema, range(4), finalize=True)
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    layers = list(schema.layers)
    loader = BatchLoader(store, EpochSampler(np.arange(8), 2, 3, train=False), layers=layers, frames=None,
                         device=torch.device("cpu"), read_threads=2)
    try:
        for batch in loader:
            assert batch.features.dtype == torch.float16 and batch.frames is None
            for j, i in enumerate(batch.index.tolist()):
                assert torch.equal(batch.features[:, j], torch.from_numpy(store.features(i, layers)))
    finally:
        loader.close()


def test_online_clip_runs_in_the_stores_precision_where_the_device_can():
    assert online_precision("fp16", torch.device("cuda")) == "fp16"
    assert online_precision("bf16", torch.device("cpu")) == "bf16"
    assert online_precision("fp16", torch.device("cpu")) == "fp32"  # a CPU has no fp16 matmuls


def test_eval_warns_when_the_checkpoint_was_chosen_on_the_evaluated_store(stores, tmp_path, motion_dataset,
                                                                           tiny_checkpoint):
    out = tmp_path / "run"
    code, output = cli_train("--cache", stores["train"], "--val-cache", stores["val"], "--out", str(out), "--epochs",
                             "1",
                             *FEATURES_ONLY)
    assert code == 0, output
    best = load_checkpoint(out / "best.pt")
    val_fingerprint = FeatureStore.open(stores["val"]).fingerprint
    assert best["chosen_on"]["fingerprint"] == best["val_store"]["fingerprint"] == val_fingerprint
    result = CliRunner().invoke(cli.main, ["eval", "--checkpoint", str(out / "best.pt"), "--cache",
                                                           stores["val"], "--device", "cpu"])
    assert result.exit_code == 0, result.output
    warning = result.stderr.splitlines()[-1]
    assert warning.startswith("warning: ") and "chosen as its run's best on this very store" in warning
    views = len(FeatureStore.open(stores["val"]))
    assert "eval: 100%" in result.stderr and f"{views}/{views}" in result.stderr  # scoring shows its progress
    # last.pt was not selected by anything, and another store is a fair test.
    assert evaluate(EvalOptions(checkpoint=str(out / "last.pt"), cache=stores["val"], device="cpu"),
                    progress=False)["warnings"] == []
    assert evaluate(EvalOptions(checkpoint=str(out / "best.pt"), cache=stores["test"], device="cpu"),
                    progress=False)["warnings"] == []

    # Copies of the validation store are the same evaluation set: each warns, naming the store it was chosen on.
    for name, flags in (("int8", ["--dtype", "int8"]), ("packed", ["--videos-per-shard", "2"])):
        copied = stores["root"] / f"val-{name}.zarr"
        done = CliRunner().invoke(cli.main, ["copy", stores["val"], str(copied), *flags])
        assert done.exit_code == 0, done.output
        warnings = evaluate(EvalOptions(checkpoint=str(out / "best.pt"), cache=str(copied), device="cpu"),
                            progress=False)["warnings"]
        assert len(warnings) == 1 and f"chosen as its run's best on {FeatureStore.open(stores['val']).url}, the " \
            f"same videos, classes, split and sampling as {FeatureStore.open(copied).url}" in warnings[0], warnings
    # The same videos with another sampling (one clip each, not three) are another evaluation set.
    one_clip = stores["root"] / "val-1clip.zarr"
    common = dict(video_root=str(stores["videos"]), model="dist-tiny", pretrained=str(tiny_checkpoint), frames=4,
                  decode_workers=1, device="cpu")
    extract(ExtractOptions(manifest=str(motion_dataset / "val.csv"), out=str(one_clip), views=1, split="test",
                           **common), progress=False)
    assert evaluate(EvalOptions(checkpoint=str(out / "best.pt"), cache=str(one_clip), device="cpu"),
                    progress=False)["warnings"] == []


def test_a_checkpoint_from_before_the_evaluation_set_was_recorded_still_warns_on_its_store(stores):
    from pipelines.train.selection import chosen_on_this_set, store_identity

    val = FeatureStore.open(stores["val"])
    old = {"fingerprint": val.fingerprint, "url": val.url}  # what checkpoints recorded until now
    assert chosen_on_this_set(old, val) and not chosen_on_this_set(old, FeatureStore.open(stores["test"]))
    assert chosen_on_this_set(store_identity(val), val) and not chosen_on_this_set(None, val)


def test_a_validation_store_of_another_activation_is_refused(stores, tmp_path):
    """The same model, weights and geometry run with GELU where training's ran QuickGELU compute other features: the
    validation store must be refused, as a resume refuses it (one definition, schema.BACKBONE_COMPAT_KEYS)."""
    val = tmp_path / "val-quick-gelu.zarr"
    shutil.copytree(stores["val"], val)
    meta = json.loads((val / "zarr.json").read_text())
    record = meta["attributes"]["dist_cache"]["backbone"]
    assert FeatureStore.open(stores["train"]).schema.backbone["activation"] == record["activation"] == "gelu"
    record["activation"] = "quick_gelu"
    (val / "zarr.json").write_text(json.dumps(meta))
    for consolidated in meta.get("consolidated_metadata", {}).get("metadata", {}).values():
        assert "dist_cache" not in consolidated.get("attributes", {})
    code, output = cli_train("--cache", stores["train"], "--val-cache", str(val), "--out", str(tmp_path / "r"),
                             "--epochs", "1", *FEATURES_ONLY)
    assert code == 2 and output.strip().count("\n") == 0, output
    assert "backbone activation 'quick_gelu'" in output and "'gelu'" in output and not (tmp_path / "r").exists()


def test_a_validation_store_from_a_renamed_copy_of_the_weights_is_accepted(stores, tmp_path):
    """`pretrained` records a local checkpoint's file name; the weights' sha256 is their identity. A validation store
    extracted from a copy of the checkpoint under another name holds the same features; other weights do not."""
    from pipelines.train.checks import check_backbone

    recorded = FeatureStore.open(stores["train"]).schema.backbone
    val = tmp_path / "val-renamed.zarr"
    shutil.copytree(stores["val"], val)
    meta = json.loads((val / "zarr.json").read_text())
    meta["attributes"]["dist_cache"]["backbone"]["pretrained"] = "a-copy-of-the-weights.pt"
    (val / "zarr.json").write_text(json.dumps(meta))
    check_backbone(FeatureStore.open(str(val)), recorded, "--val-cache", "the training store")
    with pytest.raises(UserError, match="backbone weights_sha256"):
        check_backbone(FeatureStore.open(str(val)), {**recorded, "weights_sha256": "0" * 64}, "--val-cache",
                       "the training store")


def test_eval_and_validation_refuse_train_split_stores(stores, tmp_path):
    """Per-video scoring of augmented views, some relabelled by a flip, would count correct views as wrong."""
    code, output = cli_train("--cache", stores["train"], "--val-cache", stores["train"], "--out", str(tmp_path / "r"),
                             "--epochs", "1", *FEATURES_ONLY)
    assert code == 2 and output.strip().count("\n") == 0, output
    assert output.startswith(f"error: --val-cache {FeatureStore.open(stores['train']).url} is a train-split store")
    assert "--split test" in output and not (tmp_path / "r").exists()
    code, output = cli_train("--cache", stores["train"], "--out", str(tmp_path / "run"), "--epochs", "1",
                             *FEATURES_ONLY)
    assert code == 0, output
    result = CliRunner().invoke(cli.main, ["eval", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--cache",
                                           stores["train"], "--device", "cpu"])
    assert result.exit_code == 2 and "is a train-split store" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def _wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline W&B run: its .wandb file is a LevelDB-style log of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = Path(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))[0]).read_bytes()
    block, pos, record, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        record += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            if parsed.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in parsed.history.item})
            record = b""
    return rows


def test_tensorboard_and_wandb_get_the_runs_scalars(stores, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    reporters = ["tensorboard"]
    try:
        import wandb  # noqa: F401  (an optional extra)
        reporters.append("wandb")
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
    except ImportError:
        pass
    out = tmp_path / "run"
    from dist_cache.model import DiSTSwitches

    train(TrainOptions(cache=stores["train"], val_cache=stores["val"], out=str(out), epochs=2, log_every=1,
                       batch_size=4,
                       switches=DiSTSwitches(temporal=False, integ_to_temp=False, temp_to_integ=False, alpha_dim=32,
                                             beta_dim=16, pool_blocks=1),
                       warmup_epochs=1, device="cpu", report_to=tuple(reporters)), progress=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/clips_per_s", "train/epoch_loss", "val/top1", "val/top5"} <= set(scalars)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val_top1 = [r["val_top1"] for r in metrics if "val_top1" in r]
    assert [e.value for e in events.Scalars("val/top1")] == pytest.approx(val_top1)
    if "wandb" in reporters:
        rows = _wandb_history(out)
        assert [r["train/loss"] for r in rows if "train/loss" in r] == pytest.approx(
            [r["loss"] for r in metrics if r["kind"] == "train"])
        assert any("val/top1" in r for r in rows)


def test_a_run_directory_is_held_by_one_process_and_its_ranks_die_with_the_launcher(stores, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    launcher = subprocess.Popen([sys.executable, "-m", "cli", "train", "--nproc", "2", "--cache", stores["train"],
                                 "--out", str(out), "--epochs", "100000", "--save-every", "1", *FEATURES_ONLY],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").exists():
            assert launcher.poll() is None, launcher.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the ranks never saved a checkpoint"
            time.sleep(0.2)
        ranks = [pid for pid in _children(launcher.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(ranks) == 2
        # A second train (here a --resume) on the same run is refused, naming the process that holds it.
        second = subprocess.run([sys.executable, "-m", "cli", "train", "--resume", "--cache", stores["train"],
                                 "--out", str(out), "--epochs", "100000", "--save-every", "1", *FEATURES_ONLY],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and f"in use by pid {launcher.pid} on " in second.stderr
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in ranks):
            assert time.monotonic() < deadline, "ranks outlived their launcher"
            time.sleep(0.1)
    finally:
        launcher.kill()
        launcher.wait()


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipelines.train.runlock import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match=f"in use by pid {holder.pid} on "):
            RunLock(tmp_path).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # the dead pid's lock (its file still names it) is taken over
        assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()


def _children(pid: int) -> list[int]:
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.split("/")[2]))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
