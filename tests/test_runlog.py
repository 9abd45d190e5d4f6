"""RUN/train.log (train/runlog.py): every printed line, stamped, passed on unchanged; a progress bar's redraws kept
as its last state and a periodic snapshot; an error that ends the run as its last line. The whole CLI path is in
test_train_eval (train, --resume) and test_ddp_train (torchrun, --nproc)."""

from __future__ import annotations

import logging
import re
import sys

import pytest

from dist_cache.errors import UserError
from pipelines.train.runlog import RunLog

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def lines(path) -> list[str]:
    text = path.read_text().splitlines()
    assert all(STAMP.match(line) for line in text), text
    return [STAMP.sub("", line) for line in text]


def test_printed_lines_are_logged_with_times_and_passed_on(tmp_path, capsys):
    with RunLog(tmp_path / "train.log", "started"):
        print("first")
        sys.stderr.write("warning: half a line")
        sys.stderr.write(" and the rest\n")
        sys.stderr.write("\rtrain:  50%|5/10")
        sys.stderr.write("\rtrain: 100%|10/10\n")
        print("\n\nlast")  # blank lines are not worth a timestamp
    out, err = capsys.readouterr()
    assert out == "first\n\n\nlast\n" and err.endswith("\rtrain: 100%|10/10\n")  # the terminal sees it all
    assert lines(tmp_path / "train.log") == ["=== started", "first", "warning: half a line and the rest",
                                             "train: 100%|10/10", "last"]
    with RunLog(tmp_path / "train.log", "resumed"):
        print("again")
    assert lines(tmp_path / "train.log")[-2:] == ["=== resumed", "again"]


def test_a_bar_still_redrawing_is_snapshot_and_its_last_state_kept(tmp_path):
    with RunLog(tmp_path / "train.log", snapshot_s=0):
        for step in range(3):
            sys.stderr.write(f"\rtrain: {step}/3")
        sys.stderr.write("\rtrain: never closed")
    assert lines(tmp_path / "train.log") == ["train: 0/3", "train: 1/3", "train: 2/3", "train: never closed"]


def test_the_error_that_ends_a_run_is_its_last_line(tmp_path):
    with pytest.raises(UserError), RunLog(tmp_path / "train.log"):
        print("step 1")
        raise UserError("loss is not finite at step 2")
    with pytest.raises(KeyboardInterrupt), RunLog(tmp_path / "train.log"):
        raise KeyboardInterrupt
    assert lines(tmp_path / "train.log") == ["step 1", "error: loss is not finite at step 2", "interrupted"]
    assert sys.stdout.__class__.__name__ != "_Tee" and sys.stderr.__class__.__name__ != "_Tee"


def test_an_unwritable_run_directory_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^--out .*file: cannot write train.log \(.*\); make the run directory "
                                        r"writable, or use another --out$"):
        with RunLog(tmp_path / "file" / "train.log"):
            pass


def test_a_storage_warning_printed_during_a_bar_is_a_line_of_its_own(tmp_path, capsys):
    """What the console script sets up (dist_cache.logs.warnings_above_bars): before, the warning of a store served
    without Range support, logged mid-epoch, was written into the progress bar's line, on the terminal and in
    train.log ("train:  50%|...|warning: http://... ignores HTTP Range requests ...")."""
    from tqdm import tqdm

    from dist_cache.logs import BarSafeHandler, warnings_above_bars

    warnings_above_bars()
    try:
        with RunLog(tmp_path / "train.log"):
            bar = tqdm(total=2, desc="train", file=sys.stderr)
            bar.update(1)
            logging.getLogger("storage.http").warning("warning: a server without Range support")
            bar.update(1)
            bar.close()
    finally:
        for handler in [h for h in logging.getLogger("storage").handlers if isinstance(h, BarSafeHandler)]:
            logging.getLogger("storage").removeHandler(handler)
    assert "warning: a server without Range support" in lines(tmp_path / "train.log")
    err = capsys.readouterr().err
    assert "\rwarning: a server without Range support\n" in err, repr(err)  # the bar lifted, the line its own
