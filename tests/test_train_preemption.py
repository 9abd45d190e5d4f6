"""Preemption: SIGTERM or SIGUSR1 to a training run stops it after the step in progress, with last.pt written and
exit status 75; `--resume` then ends exactly where an uninterrupted run ends. The signals are real, sent to real
`dist-cache train` processes (and, at a chosen step, by the run to itself)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pipelines.extract.extractor import ExtractOptions, extract
from pipelines.train.checkpoint import load_checkpoint
from pipelines.train.plots import read_metrics
from pipelines.train.preemption import PREEMPTED_EXIT

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def stores(tmp_path_factory, motion_dataset, tiny_checkpoint) -> dict[str, str]:
    root = tmp_path_factory.mktemp("preempt")
    common = dict(video_root=str(motion_dataset / "videos"), model="dist-tiny", pretrained=str(tiny_checkpoint),
                  frames=4, decode_workers=1, device="cpu")
    extract(ExtractOptions(manifest=str(motion_dataset / "train.csv"), out=str(root / "train.zarr"), views=2,
                           split="train", **common), progress=False)
    extract(ExtractOptions(manifest=str(motion_dataset / "val.csv"), out=str(root / "val.zarr"), views=1,
                           split="test", **common), progress=False)
    return {"train": str(root / "train.zarr"), "val": str(root / "val.zarr"), "videos": common["video_root"]}


def train_args(stores: dict[str, str], out: Path, *extra: str) -> list[str]:
    # 8 videos at batch 2: 4 steps an epoch, 24 in all; validated at every epoch's end.
    return ["train", "--cache", stores["train"], "--val-cache", stores["val"], "--video-root", stores["videos"],
            "--out", str(out), "--alpha-dim", "32", "--beta-dim", "16", "--pool-blocks", "1", "--epochs", "6",
            "--batch-size", "2", "--lr", "1e-3", "--warmup-epochs", "1", "--device", "cpu", "--decode-workers", "0",
            "--read-threads", "2", "--log-every", "1", *extra]


def dist_cache(*args: str, **popen) -> subprocess.Popen:
    # One intra-op thread in every run: the reductions, hence the weights, are bit for bit the same across them.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **popen)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, err


def spawned_ranks(pid: int) -> list:
    """The ranks `train --nproc` spawned: children running multiprocessing's spawn_main (others, such as a short-lived
    helper that has already exited and is a zombie, are skipped)."""
    import psutil

    ranks = []
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.Error):
            if "spawn_main" in " ".join(child.cmdline()):
                ranks.append(child)
    return ranks


def train_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


@pytest.fixture(scope="module")
def uninterrupted(stores, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    code, err = finish(dist_cache(*train_args(stores, out)))
    assert code == 0, err
    return out


def assert_same_run(resumed: Path, full: Path) -> None:
    """The weights and optimiser state bit for bit, every step logged once, the same validations."""
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert a["step"] == b["step"] == 24
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][key][name])), name
    assert train_steps(resumed) == list(range(1, 25))
    epochs = [(r["epoch"], r["val_top1"]) for r in read_metrics(resumed / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epochs == [(r["epoch"], r["val_top1"]) for r in read_metrics(full / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [e for e, _ in epochs] == [1, 2, 3, 4, 5, 6]
    best_a, best_b = load_checkpoint(full / "best.pt"), load_checkpoint(resumed / "best.pt")
    assert best_a["step"] == best_b["step"]
    assert all(torch.equal(tensor, best_b["model"][name]) for name, tensor in best_a["model"].items())


def test_sigterm_mid_run_loses_no_step_and_the_resume_is_exact(stores, uninterrupted, tmp_path):
    out, stop = tmp_path / "run", signal.SIGTERM
    proc = dist_cache(*train_args(stores, out))
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").exists() or not train_steps(out):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(stop)
    code, err = finish(proc)
    assert code == PREEMPTED_EXIT, err
    step = load_checkpoint(out / "last.pt")["step"]
    assert 1 <= step < 24 and train_steps(out)[-1] == step  # every step it logged is in last.pt: none lost
    last = err.strip().splitlines()[-1]
    assert last == (f"preempted: stopped by {stop.name} after step {step} of 24; {out / 'last.pt'} holds it: rerun "
                    "the same command with --resume to continue"), err
    assert "Traceback" not in err
    assert (out / "train.log").read_text().splitlines()[-1].endswith(last)  # the run's log ends as the user saw it

    code, err = finish(dist_cache(*train_args(stores, out, "--resume")))
    assert code == 0, err
    assert_same_run(out, uninterrupted)


def test_a_stop_at_an_epochs_last_step_leaves_its_validation_to_the_resume(stores, uninterrupted, tmp_path):
    """The run sends itself SIGUSR1 (SLURM's early warning) during step 8, the second epoch's last: it stops after
    that step without validating (validation could outlast the grace before SIGKILL); the resume validates epoch 2
    first, then goes on."""
    out = tmp_path / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent("""
        import os, signal, sys
        import pipelines.train.run as train_mod
        import cli

        real_step = train_mod.train_step

        def step(model, batch, ranks, store, done):
            if done == 7:  # computing step 8
                os.kill(os.getpid(), signal.SIGUSR1)
            return real_step(model, batch, ranks, store, done)

        train_mod.train_step = step
        sys.exit(cli.main(sys.argv[1:]))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, str(driver), *train_args(stores, out)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == PREEMPTED_EXIT, done.stderr
    assert "stopped by SIGUSR1 after step 8 of 24" in done.stderr.strip().splitlines()[-1]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 8 and ckpt["epoch_end_pending"] is True
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"] == [1]

    code, err = finish(dist_cache(*train_args(stores, out, "--resume")))
    assert code == 0, err
    assert_same_run(out, uninterrupted)


def test_ranks_signalled_at_different_steps_stop_after_the_same_one(stores, tmp_path):
    """`train --nproc 2`: SIGTERM reaches rank 1 alone (as a signal sent to some processes of a job can); the ranks'
    flags are summed after every step, so both stop after the same step (a rank that went on would wait in its next
    collective for hours), rank 0 writes last.pt, and the launcher exits 75. The resume takes every remaining step
    once. (That a resume ends on the uninterrupted run's weights is shown above, in one process.)"""

    args = ["--nproc", "2", "--no-temporal", "--no-temp-to-integ", "--no-integ-to-temp", "--epochs", "6",
            "--batch-size", "4"]
    out = tmp_path / "run"
    proc = dist_cache(*train_args(stores, out, *args))
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").exists() or not train_steps(out):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    ranks = spawned_ranks(proc.pid)
    assert len(ranks) == 2
    rank1 = [p for p in ranks if p.environ().get("RANK") == "1"] or sorted(ranks, key=lambda p: p.pid)[1:]
    rank1[0].send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == PREEMPTED_EXIT, err
    step = load_checkpoint(out / "last.pt")["step"]
    assert 1 <= step < 12 and train_steps(out)[-1] == step
    assert err.strip().splitlines()[-1].startswith(f"preempted: stopped by a stop signal to another rank after step "
                                                   f"{step} of 12;"), err
    code, err = finish(dist_cache(*train_args(stores, out, *args, "--resume")))
    assert code == 0, err
    assert load_checkpoint(out / "last.pt")["step"] == 12 and train_steps(out) == list(range(1, 13))


def test_a_stop_signal_while_the_ranks_start_is_one_line_and_the_signals_exit_status(stores, tmp_path):
    """`train --nproc 2`, SIGTERM to the launcher as soon as its ranks exist: they are still importing, their stop
    handlers not yet in place, so the forwarded signal kills them. The launcher says so in one line and exits 143
    (128 + SIGTERM, as one process killed by it), not with a traceback, and not 75: there is no last.pt to resume."""
    proc = dist_cache(*train_args(stores, tmp_path / "run", "--nproc", "2"))
    deadline = time.monotonic() + 120
    while not spawned_ranks(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert "stopped by SIGTERM while the ranks were starting or finishing, outside a step" in err
    assert not (tmp_path / "run" / "last.pt").exists()
