"""`train` records its resolved options in the run directory (config.toml), and `train --config` with that file
repeats the run: the same metrics, step for step, with the seed it recorded. Real store, real training."""

from __future__ import annotations

from click.testing import CliRunner

import cli
from pipelines.config_file import read_config
from pipelines.train.plots import read_metrics


def train(*args: object) -> str:
    result = CliRunner().invoke(cli.main, ["train", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout


def deterministic(metrics: list[dict]) -> list[dict]:
    """A run's metrics without the throughput, which is the machine's, not the run's."""
    return [{k: v for k, v in record.items() if k != "clips_per_s"} for record in metrics]


def test_config_toml_repeats_the_run(train_store, motion_dataset, tmp_path, monkeypatch):
    # Started with relative paths, from the directory that holds the store and the videos.
    here = tmp_path / "here"
    here.mkdir()
    (here / "train.zarr").symlink_to(train_store)
    (here / "videos").symlink_to(motion_dataset / "videos")
    monkeypatch.chdir(here)
    first = here / "first"
    train("--cache", "train.zarr", "--video-root", "videos", "--out", "first", "--recipe", "k400",
          "--alpha-dim", "32", "--beta-dim", "16", "--no-integ-to-temp", "--epochs", "2", "--batch-size", "4",
          "--decode-workers", "0", "--warmup-epochs", "1", "--log-every", "1", "--seed", "3", "--device", "cpu",
          "--storage-options", "{}")
    recorded = read_config(first / "config.toml")
    # Resolved: the recipe's switch, the defaults, the flags as typed; never the one-off or secret options.
    assert recorded["pool-blocks"] == 4 and recorded["recipe"] == "k400" and recorded["no-integ-to-temp"] is True
    assert recorded["seed"] == 3 and recorded["lr"] == 3.2e-4
    assert recorded["clip-grad"] == 0 and recorded["epochs"] == 2  # the recipe's, and a flag over the recipe
    assert not {"resume", "storage-options", "config"} & set(recorded)
    # Local paths recorded absolute, so the file repeats the run from any directory.
    assert (recorded["out"], recorded["cache"], recorded["video-root"]) == \
        (str(first), str(here / "train.zarr"), str(here / "videos"))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = tmp_path / "again"
    train("--config", first / "config.toml", "--out", again)
    assert deterministic(read_metrics(again / "metrics.jsonl")) == deterministic(read_metrics(first / "metrics.jsonl"))
    assert read_config(again / "config.toml") == {**recorded, "out": str(again)}

    # --resume (here with a runtime option changed) keeps the run's config as it was started.
    before = (first / "config.toml").read_text()
    train("--config", first / "config.toml", "--resume", "--save-every", "7")
    assert (first / "config.toml").read_text() == before and "save-every = 500" in before


def test_a_bad_input_leaves_nothing_behind(train_store, motion_dataset, tiny_checkpoint, tmp_path):
    """Every input is checked before the run directory gets its first file: no config.toml, metrics.jsonl or
    train.log for a run that never started."""
    common = ["train", "--cache", str(train_store), "--video-root", str(motion_dataset / "videos"), "--device", "cpu",
              "--decode-workers", "0"]
    for n, (extra, says) in enumerate([
        (["--seed", "-1"], "--seed"),
        (["--online"], "pass --pretrained PATH"),  # the store was made from a local checkpoint
        (["--online", "--pretrained", str(tmp_path / "absent.pt")], "no such checkpoint file"),
        (["--reaugment"], "add --online"),
    ]):
        out = tmp_path / f"run{n}"
        result = CliRunner().invoke(cli.main, [*common, "--out", str(out), *extra])
        assert result.exit_code == 2 and says in result.output, result.output
        assert not out.exists(), sorted(p.name for p in out.iterdir())
