"""Bad extraction input stops before anything is written, in one line: flags, templates, the flip-label map,
manifest paths, and a video root where nothing decodes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from storage import FeatureStore

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def invoke(dataset: Path, out: Path, ckpt: Path, *extra: str, manifest: Path | None = None):
    args = ["extract", "--manifest", manifest or dataset / "val.csv", "--video-root", dataset / "videos", "--out", out,
            "--model", "dist-tiny", "--pretrained", ckpt, "--frames", "4", "--decode-workers", "1", *extra]
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def one_line_error(result) -> str:
    """The error line (after the progress bar, if the run had started extracting)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("extract:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_a_negative_seed_is_refused_by_the_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cli", "extract", "--manifest", "m.csv", "--video-root", ".",
                           "--out", str(tmp_path / "o.zarr"), "--seed", "-1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "--seed" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("template", ["a photo", "{x}", "{} and {}", "{0:>5}", "unbalanced {"])
def test_templates_need_exactly_one_placeholder(motion_dataset, tiny_checkpoint, tmp_path, template):
    line = one_line_error(invoke(motion_dataset, tmp_path / "t.zarr", tiny_checkpoint, "--template", template))
    assert "--template" in line and "exactly one {}" in line
    assert not (tmp_path / "t.zarr").exists()


@pytest.mark.parametrize("rows, says", [
    (["left/0.mp4,left", "up/0.mp4,up", "left/0.mp4,right"],
     "lists left/0.mp4 twice with different labels (line 2: 'left', line 4: 'right'); keep only the row with the "
     "right label"),
    (["left/0.mp4,left", "up/0.mp4,up", "./left//0.mp4,left"],
     "lists ./left//0.mp4 twice (line 2 and line 4, both 'left'); delete the repeated row"),
])
def test_a_video_listed_twice_is_refused_naming_both_rows(motion_dataset, tiny_checkpoint, tmp_path, rows, says):
    manifest = tmp_path / "twice.csv"
    manifest.write_text("\n".join(["path,label", *rows]) + "\n")
    line = one_line_error(invoke(motion_dataset, tmp_path / "t.zarr", tiny_checkpoint, manifest=manifest))
    assert line.startswith("error: twice.csv ") and says in line
    assert not (tmp_path / "t.zarr").exists()


def test_literal_braces_in_a_template_are_fine():
    from pipelines.extract.extractor import check_template

    check_template("a video of {} {{in braces}}")


@pytest.mark.parametrize("content, says", [
    ('[["left", "sideways"]]', "'sideways', which is not among the 4 classes"),
    ('[["left", "right"], ["right", "up"]]', "more than one place"),
    ('{"left": "right"}', "JSON list of [class, class] pairs"),
    ("left\tright\n", "not a JSON file"),
])
def test_flip_label_maps_are_checked(motion_dataset, tiny_checkpoint, tmp_path, content, says):
    path = tmp_path / "flips.json"
    path.write_text(content)
    line = one_line_error(invoke(motion_dataset, tmp_path / "f.zarr", tiny_checkpoint, "--flip-label-map", path))
    assert says in line and "--flip-label-map" in line
    assert not (tmp_path / "f.zarr").exists()


def test_the_built_in_ssv2_map_on_other_classes_says_whose_names_it_needs(motion_dataset, tiny_checkpoint, tmp_path):
    """Before: "fix the name in the file", with no file (--flip-label-map ssv2)."""
    line = one_line_error(invoke(motion_dataset, tmp_path / "f.zarr", tiny_checkpoint, "--flip-label-map", "ssv2"))
    assert "'Pulling something from left to right', which is not among the 4 classes" in line, line
    assert "Something-Something v2's" in line and "in the file" not in line, line
    assert not (tmp_path / "f.zarr").exists()


def test_manifest_paths_outside_the_video_root_are_refused(motion_dataset, tiny_checkpoint, tmp_path):
    manifest = tmp_path / "escape.csv"
    manifest.write_text("path,label\nleft/0.mp4,left\n../../etc/passwd,right\n")
    line = one_line_error(invoke(motion_dataset, tmp_path / "e.zarr", tiny_checkpoint, manifest=manifest))
    assert "line 3" in line and "not a relative path inside the video root" in line
    assert not (tmp_path / "e.zarr").exists()


def test_deep_needs_repair(motion_dataset, tiny_checkpoint, tmp_path):
    assert "--repair" in one_line_error(invoke(motion_dataset, tmp_path / "d.zarr", tiny_checkpoint, "--deep"))


def test_when_the_first_100_videos_all_fail_it_stops_and_records_none(motion_dataset, tiny_checkpoint, tmp_path):
    # 100 real videos (hard links to the generated clips: a manifest lists each video once); the first run points
    # --video-root at an empty directory.
    videos = tmp_path / "videos"
    sources = sorted((motion_dataset / "videos").rglob("*.mp4"))
    names = [f"{sources[i % len(sources)].parent.name}/{i:03d}.mp4" for i in range(100)]
    for i, name in enumerate(names):
        (videos / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(sources[i % len(sources)], videos / name)
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows((name, name.split("/")[0]) for name in names)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "s.zarr"
    base = ["extract", "--manifest", manifest, "--out", out, "--model", "dist-tiny", "--pretrained", tiny_checkpoint,
            "--frames", "2", "--decode-workers", "1", "--batch-frames", "64"]
    wrong = CliRunner().invoke(cli.main, [str(a) for a in base + ["--video-root", empty]])
    line = one_line_error(wrong)
    assert line.startswith("error: the first 100 videos all failed to decode (first error: ")
    assert "check --video-root" in line and str(empty) in line
    assert FeatureStore.open(out).progress() == {"done": 0, "failed": 0, "pending": 100}
    # Nothing was recorded, so the right root simply finishes the store.
    right = CliRunner().invoke(cli.main, [str(a) for a in base + ["--video-root", videos]])
    assert right.exit_code == 0, right.output
    assert "stored 100 videos" in right.output and FeatureStore.open(out).complete


def test_a_folder_of_videos_extracts_like_its_manifest(motion_dataset, tiny_checkpoint, tmp_path):
    """`--videos DIR` lists DIR/<class>/<video> sorted and labels each by its folder: the store equals the one
    made from a CSV listing the same videos. Decoded in this process (--decode-workers 0) against decode
    worker processes (1): the same bytes either way."""
    import numpy as np

    videos = motion_dataset / "videos"
    common = ["--model", "dist-tiny", "--pretrained", tiny_checkpoint, "--frames", "4", "--device", "cpu"]
    folder = CliRunner().invoke(cli.main, [str(a) for a in ["extract", "--videos", videos, "--out",
                                                            tmp_path / "folder.zarr", "--decode-workers", "0",
                                                            *common]])
    assert folder.exit_code == 0 and "stored 12 videos" in folder.output, folder.output
    listed = sorted(p.relative_to(videos).as_posix() for p in videos.rglob("*.mp4"))
    manifest = tmp_path / "all.csv"
    manifest.write_text("path,label\n" + "".join(f"{v},{v.split('/')[0]}\n" for v in listed))
    made = invoke(motion_dataset, tmp_path / "csv.zarr", tiny_checkpoint, "--device", "cpu", manifest=manifest)
    assert made.exit_code == 0, made.output
    a, b = FeatureStore.open(tmp_path / "folder.zarr"), FeatureStore.open(tmp_path / "csv.zarr")
    assert a.videos == b.videos == listed and list(a.labels) == list(b.labels)
    assert list(a.schema.class_names) == ["down", "left", "right", "up"]
    for i in range(len(a)):
        np.testing.assert_array_equal(a.features(i), b.features(i))


@pytest.mark.parametrize("extra, says", [
    (["--manifest", "m.csv"], "--videos V is the list of videos and their root: drop --manifest"),
    (["--video-root", "."], "--videos V is the list of videos and their root: drop --video-root"),
    (["--manifest-format", "csv"], "--videos V is a folder of class folders, not a manifest: drop --manifest-format"),
])
def test_a_folder_of_videos_is_not_mixed_with_a_manifest(tmp_path, extra, says):
    (tmp_path / "V").mkdir()
    result = CliRunner().invoke(cli.main, ["extract", "--videos", str(tmp_path / "V"), "--out", "o.zarr", *extra])
    assert result.exit_code == 2 and says.replace("V", str(tmp_path / "V")) in result.output, result.output
    nothing = CliRunner().invoke(cli.main, ["extract", "--out", "o.zarr"])
    assert nothing.exit_code == 2 and "pass --manifest FILE with --video-root DIR, or --videos DIR" in nothing.output


def test_a_missing_folder_of_videos_is_named_by_its_flag(tmp_path, tiny_checkpoint):
    """Before: "--video-root V: no such directory", a flag the user never gave."""
    result = CliRunner().invoke(cli.main, ["extract", "--videos", str(tmp_path / "V"), "--out",
                                           str(tmp_path / "o.zarr"), "--model", "dist-tiny", "--pretrained",
                                           str(tiny_checkpoint)])
    assert result.exit_code == 2 and result.output == f"error: --videos {tmp_path / 'V'}: no such directory\n", \
        result.output
    assert not (tmp_path / "o.zarr").exists()
