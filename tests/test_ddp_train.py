"""Data-parallel training: 2 real CPU processes (gloo, loopback) take the same steps to the same weights as
one process with the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_cache.errors import UserError
from dist_cache.model import DiSTSwitches
from pipelines.train.checkpoint import load_checkpoint
from pipelines.train.plots import read_metrics
from pipelines.train.run import TrainOptions, train, train_ranks

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Feature-only (no temporal encoder: no video decoding), small, and with every step a full global batch.
SMALL = dict(switches=DiSTSwitches(alpha_dim=32, beta_dim=16, pool_blocks=1, temporal=False, temp_to_integ=False,
                               integ_to_temp=False),
             batch_size=4, decode_workers=0, warmup_epochs=1, log_every=1, epochs=2, device="cpu")


def test_two_processes_match_one(train_store, motion_dataset, tmp_path: Path):
    video_root = str(motion_dataset / "videos")
    single = train(TrainOptions(cache=train_store, video_root=video_root, out=str(tmp_path / "one"), **SMALL),
                   progress=False)
    double = train_ranks(TrainOptions(cache=train_store, video_root=video_root, out=str(tmp_path / "two"), **SMALL), 2)
    assert double.steps == single.steps == 4  # 8 videos / global batch 4, 2 epochs
    one, two = load_checkpoint(single.last), load_checkpoint(double.last)
    assert one["model"].keys() == two["model"].keys()
    for name, weight in one["model"].items():
        torch.testing.assert_close(two["model"][name], weight, atol=1e-4, rtol=1e-4, msg=name)
    losses = [[r["loss"] for r in read_metrics(run.metrics) if r["kind"] == "train"] for run in (single, double)]
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)  # rank 0 logs the global batch's loss


def test_nproc_bad_store_is_one_line_before_any_process(motion_dataset, tmp_path: Path):
    from click.testing import CliRunner

    import cli

    missing = tmp_path / "absent.zarr"
    result = CliRunner().invoke(cli.main, ["train", "--nproc", "2", "--cache", str(missing), "--video-root",
                                           str(motion_dataset / "videos"), "--out", str(tmp_path / "run"),
                                           "--device", "cpu", "--decode-workers", "0"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], result.output
    assert "Traceback" not in result.output


def test_a_rank_user_error_reaches_the_parent_as_one(motion_dataset, tmp_path: Path, monkeypatch):
    import pipelines.train.run

    # Skip the parent's checks, so the ranks (fresh spawned processes, not patched) meet the error themselves.
    monkeypatch.setattr(pipelines.train.run, "preflight", lambda opts, world=1: None)
    missing = tmp_path / "absent.zarr"
    opts = TrainOptions(cache=str(missing), video_root=str(motion_dataset / "videos"), out=str(tmp_path / "run"),
                        **SMALL)
    with pytest.raises(UserError, match="--cache") as err:
        train_ranks(opts, 2)
    assert "\n" not in str(err.value) and str(missing) in str(err.value)


def shadowing_directory(root: Path) -> Path:
    """A project directory with its own `cli.py`, `pipelines/` and `storage/`, the top-level names dist-cache's
    wheel installs: anything that puts the working directory first on sys.path (`python -m cli`) imports these."""
    for name in ("cli.py", "pipelines/__init__.py", "storage/__init__.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("raise SystemExit('imported the working directory\\'s module, not dist-cache\\'s')\n")
    return root


SMALL_FLAGS = ["--epochs", "2", "--batch-size", "4", "--warmup-epochs", "1", "--device", "cpu", "--no-temporal",
               "--no-integ-to-temp", "--no-temp-to-integ", "--alpha-dim", "32", "--beta-dim", "16", "--pool-blocks",
               "1", "--read-threads", "2"]


def test_torchrun_starts_the_cli_entry_point_on_every_rank(train_store, tmp_path: Path):
    """The README's launch, `torchrun ... --no-python dist-cache train ...`, from a directory whose own modules
    shadow dist-cache's: every rank runs the installed console script, whose sys.path starts at its own bin."""
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    out = tmp_path / "torchrun"
    # --standalone: a local rendezvous on a free port. (`--master_port 0` hands the ranks MASTER_PORT=0 to connect
    # to the agent's store, and they wait there until the timeout.)
    done = subprocess.run(
        [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", str(bin_dir / "dist-cache"),
         "train", "--cache", train_store, "--out", str(out), *SMALL_FLAGS],
        cwd=shadowing_directory(tmp_path / "project"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 4 steps over 2 epochs") == 1  # rank 0 alone reports
    assert load_checkpoint(out / "last.pt")["step"] == 4
    assert '"pid"' in (out / "train.lock").read_text()  # rank 0 held the run directory
    log = (out / "train.log").read_text()
    assert log.count("=== dist-cache train: started") == 1 and "trained 4 steps over 2 epochs" in log


def test_nproc_from_a_shadowing_directory_and_its_log(train_store, tmp_path: Path):
    """`train --nproc 2` spawns its ranks with the launcher's sys.path, so the working directory's modules never
    shadow dist-cache's either; rank 0's progress bar joins the launcher's lines in RUN/train.log."""
    import subprocess
    import sys

    out = tmp_path / "nproc"
    done = subprocess.run([str(Path(sys.executable).parent / "dist-cache"), "train", "--nproc", "2", "--cache",
                           train_store, "--out", str(out), *SMALL_FLAGS], cwd=shadowing_directory(tmp_path / "project"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(out / "last.pt")["step"] == 4
    log = (out / "train.log").read_text()
    assert "trained 4 steps over 2 epochs" in log and "train: 100%" in log and "4/4" in log, log
