"""Extraction when the store is in trouble: write errors stop the run resumably (a real full disk, a real
file-size limit), decode workers killed mid-run cost no video, `--repair` redoes exactly the damaged videos,
and two runs racing to create one store with other flags leave exactly one winner."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

import cli
from storage import FeatureStore, StoreDamagedError
from test_store_write_errors import remount

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def args(dataset: Path, out: Path, ckpt: Path, *extra: str) -> list[str]:
    # --batch-frames 16 = one video (4 views x 4 frames) per forward: a redone video's bytes equal the first run's.
    return [str(a) for a in ["extract", "--manifest", dataset / "train.csv", "--video-root", dataset / "videos",
                             "--out", out, "--model", "dist-tiny", "--pretrained", ckpt, "--frames", "4", "--views",
                             "4",
                             "--batch-frames", "16", "--decode-workers", "1", *extra]]


def run(*argv: str):
    return CliRunner().invoke(cli.main, list(argv))


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def error_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if not line.startswith("extract:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


@pytest.fixture(scope="module")
def clean(tmp_path_factory, motion_dataset, tiny_checkpoint) -> Path:
    """An uninterrupted run: what every recovered store must equal, byte for byte."""
    out = tmp_path_factory.mktemp("clean") / "s.zarr"
    result = run(*args(motion_dataset, out, tiny_checkpoint, "--dense-frames"))
    assert result.exit_code == 0, result.output
    return out


def test_a_full_disk_stops_the_run_and_the_rerun_finishes_it(small_disk, clean, motion_dataset, tiny_checkpoint):
    remount(small_disk, "size=1m")
    out = small_disk / "s.zarr"  # ~470 kB per video with its dense frames: the disk fills up part way
    full = run(*args(motion_dataset, out, tiny_checkpoint, "--dense-frames"))
    assert full.exit_code == 2
    assert error_line(full.output) == f"error: disk full writing {out}: free space and rerun"
    progress = FeatureStore.open(out).progress()
    # A write error is no video's failure. Four writer threads fill the disk together, so whether any video was
    # whole before it filled depends on their timing: only that some are left pending is certain.
    assert progress["failed"] == 0 and progress["pending"] > 0
    remount(small_disk, "size=8m")
    rerun = run(*args(motion_dataset, out, tiny_checkpoint, "--dense-frames"))
    assert rerun.exit_code == 0, rerun.output
    assert tree_digest(out) == tree_digest(clean)


def test_a_file_size_limit_stops_the_run_with_one_line(motion_dataset, tiny_checkpoint, tmp_path):
    out = tmp_path / "s.zarr"

    def limit() -> None:  # 48 kB: the store's metadata fits, a video's 70 kB feature shard does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    done = subprocess.run([sys.executable, "-m", "cli", *args(motion_dataset, out, tiny_checkpoint)],
                          capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert done.returncode == 2
    assert error_line(done.stderr).startswith(f"error: file too large writing {out}") and "Traceback" not in done.stderr
    assert FeatureStore.open(out).progress() == {"done": 0, "failed": 0, "pending": 8}
    assert not list(out.rglob("*.partial"))
    rerun = run(*args(motion_dataset, out, tiny_checkpoint))
    assert rerun.exit_code == 0 and FeatureStore.open(out).complete


def damage(path: Path) -> None:
    """Flip one byte in the middle of a file (inside the data, not the shard index at its end)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def repaired(output: str) -> set[int]:
    return {int(line.split()[2]) for line in output.splitlines() if line.startswith("repaired video ")}


def test_repair_redoes_exactly_the_damaged_videos(clean, motion_dataset, tiny_checkpoint, tmp_path):
    out = tmp_path / "s.zarr"
    assert run(*args(motion_dataset, out, tiny_checkpoint, "--dense-frames")).exit_code == 0
    assert tree_digest(out) == tree_digest(clean)
    (out / "features" / "c.2.0.0.0.0").unlink()  # a lost shard
    damage(out / "frames" / "c.5.0.0.0.0")  # a flipped bit in a video's dense frames
    with pytest.raises(StoreDamagedError, match="--repair"):
        for k in range(4):
            FeatureStore.open(out).frames(5 * 4 + k)

    # The default check reads the shard indexes: it finds the lost shard, not the flipped data byte.
    shallow = run(*args(motion_dataset, out, tiny_checkpoint, "--dense-frames", "--repair"))
    assert shallow.exit_code == 0, shallow.output
    assert repaired(shallow.output) == {2} and "stored 1 videos, skipped 7" in shallow.output
    # --deep reads every chunk.
    deep = run(*args(motion_dataset, out, tiny_checkpoint, "--dense-frames", "--repair", "--deep"))
    assert deep.exit_code == 0, deep.output
    assert repaired(deep.output) == {5} and "stored 1 videos, skipped 7" in deep.output
    assert tree_digest(out) == tree_digest(clean)

    # Both kinds of damage at once: one deep repair redoes exactly those two videos.
    (out / "clip_embeddings" / "c.1.0.0").unlink()
    damage(out / "features" / "c.6.0.0.0.0")
    both = run(*args(motion_dataset, out, tiny_checkpoint, "--dense-frames", "--repair", "--deep"))
    assert both.exit_code == 0, both.output
    assert repaired(both.output) == {1, 6} and "(2 damaged, redone)" in both.output
    assert tree_digest(out) == tree_digest(clean)


def test_racing_runs_with_other_flags_have_exactly_one_winner(motion_dataset, tiny_checkpoint, tmp_path):
    out = tmp_path / "raced.zarr"
    procs = {seed: subprocess.Popen([sys.executable, "-m", "cli", *args(motion_dataset, out, tiny_checkpoint,
                                                                        "--seed", str(seed))],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)}
    results = {seed: (p.communicate(timeout=300)[1], p.returncode) for seed, p in procs.items()}
    results = {seed: (code, err) for seed, (err, code) in results.items()}
    winners = [seed for seed, (code, _) in results.items() if code == 0]
    assert len(winners) == 1, results
    (loser_code, loser_err), = [r for seed, r in results.items() if seed not in winners]
    assert loser_code == 2
    line = error_line(loser_err)
    assert f"was extracted with sampling.seed {winners[0]}, not " in line
    assert "use another --out or the same flags" in line
    store = FeatureStore.open(out)
    assert store.complete and store.schema.sampling["seed"] == winners[0]


def many_videos(dataset: Path, root: Path, count: int) -> Path:
    """A manifest of `count` distinct files (copies of the generated clips): enough videos for a run to be
    killed in the middle of. Returns the manifest; the videos are under root/videos."""
    sources = sorted((dataset / "videos").rglob("*.mp4"))
    lines = ["path,label"]
    for i in range(count):
        src = sources[i % len(sources)]
        rel = f"{src.parent.name}/{i:03d}.mp4"
        (root / "videos" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / "videos" / rel)
        lines.append(f"{rel},{src.parent.name}")
    (root / "many.csv").write_text("\n".join(lines) + "\n")
    return root / "many.csv"


def decode_workers(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children() if "spawn_main" in " ".join(p.cmdline())]


def wait_for(condition, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def test_killed_decode_workers_fail_no_video(motion_dataset, tiny_checkpoint, tmp_path):
    """kill -9 of decode workers during extract (one while it starts, one once videos are being stored): each is
    replaced, its videos are retried, no healthy video is recorded failed, and the store equals a clean run's."""
    manifest = many_videos(motion_dataset, tmp_path, 24)
    argv = ["extract", "--manifest", manifest, "--video-root", tmp_path / "videos", "--model", "dist-tiny",
            "--pretrained", tiny_checkpoint, "--frames", "4", "--views", "1", "--batch-frames", "4",
            "--decode-workers", "2"]
    clean_out, out = tmp_path / "clean.zarr", tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "cli", *map(str, argv), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = wait_for(lambda: decode_workers(proc.pid))[0]
        first.kill()  # while it imports, or waits for its first job
        records = out / "records"
        wait_for(lambda: records.is_dir() and any(records.iterdir()))
        second = wait_for(lambda: [p for p in decode_workers(proc.pid) if p.pid != first.pid])[0]
        second.kill()  # while it decodes a video, or waits for the next one
        stored_before = len(list(records.iterdir()))
        output = "".join(proc.communicate(timeout=300))
    finally:
        proc.kill()
    assert stored_before < 24  # the kill came mid-run
    assert proc.returncode == 0, output
    assert "stored 24 videos, skipped 0 (already done), failed 0" in output
    assert FeatureStore.open(out).progress() == {"done": 24, "failed": 0, "pending": 0}
    assert run(*map(str, argv), "--out", str(clean_out)).exit_code == 0
    assert tree_digest(out) == tree_digest(clean_out)


def _as_from_a_terminal() -> None:
    """In the child before exec: SIGINT's default action, as a shell gives the command it starts in a terminal. A
    suite started in the background (`pytest &`, nohup, some CI runners) ignores SIGINT, and exec passes an
    ignored signal on: the child would never see the Ctrl-C under test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("cluster", [[], ["--dask-workers", "2"]], ids=["in-process", "dask"])
def test_ctrl_c_during_extract_prints_one_line_and_the_rerun_resumes(motion_dataset, tiny_checkpoint, tmp_path,
                                                                     cluster):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it, while decode workers (and dask's worker
    processes) run: no process but the one the user started prints a KeyboardInterrupt traceback, the
    "interrupted" line ends the output, and (in-process) the rerun finishes the store."""
    count = 24
    manifest = many_videos(motion_dataset, tmp_path, count)
    argv = [str(a) for a in ["extract", "--manifest", manifest, "--video-root", tmp_path / "videos", "--out",
                             tmp_path / "s.zarr", "--model", "dist-tiny", "--pretrained", tiny_checkpoint,
                             "--frames", "4", "--views", "1", "--batch-frames", "4",
                             "--decode-workers", "1" if cluster else "2", *cluster]]
    proc = subprocess.Popen([sys.executable, "-m", "cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_as_from_a_terminal)
    try:
        records = tmp_path / "s.zarr" / "records"
        wait_for(lambda: records.is_dir() and any(records.iterdir()), timeout=120)
        assert proc.poll() is None, "the run ended before the signal: give it more videos"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("extract:")]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert lines[-1] == "interrupted: rerun the same command to resume (train: add --resume)", err
    if not cluster:  # dask's own processes may log (as warnings) the tasks they were told to cancel
        assert len(lines) == 1, err
    assert FeatureStore.open(tmp_path / "s.zarr").progress()["failed"] == 0
    if not cluster:  # (a rerun resumes the same under dask: test_dask_extract)
        rerun = run(*argv)
        assert rerun.exit_code == 0, rerun.output
        assert FeatureStore.open(tmp_path / "s.zarr").progress() == {"done": count, "failed": 0, "pending": 0}
