"""The four manifest formats, class lists, path resolution and every one-line error."""

import json

import pytest

from dist_cache.errors import UserError
from dist_cache.manifests import ManifestError, load_class_names, load_manifest


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def fails(match, fn, *args, **kwargs):
    """fn raises a one-line ManifestError (a UserError the CLI prints) matching `match`; returns the message."""
    with pytest.raises(ManifestError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    return message


# ---- class lists --------------------------------------------------------------------------------------------


def test_class_names_from_text_json_list_and_ssv2_dict(tmp_path):
    assert load_class_names(write(tmp_path / "c.txt", "b\n\na x\r\nc  \n")) == ["b", "a x", "c"]
    assert load_class_names(write(tmp_path / "c.json", '["z", "y"]')) == ["z", "y"]
    labels = {"Pushing something from left to right": "1", "Approaching something with your camera": "0"}
    assert load_class_names(write(tmp_path / "labels.json", json.dumps(labels))) == [
        "Approaching something with your camera",
        "Pushing something from left to right",
    ]


def test_class_list_errors(tmp_path):
    fails("not found", load_class_names, tmp_path / "nope.txt")
    fails("is empty", load_class_names, write(tmp_path / "empty.txt", "\n\n"))
    fails("'a' more than once", load_class_names, write(tmp_path / "dup.txt", "a\nb\na\n"))
    fails("not valid JSON", load_class_names, write(tmp_path / "bad.json", "{"))
    fails("index 0..K-1", load_class_names, write(tmp_path / "gap.json", '{"a": 0, "b": 2}'))
    fails("index 0..K-1", load_class_names, write(tmp_path / "obj.json", '{"a": "x"}'))


# ---- path,label CSV -----------------------------------------------------------------------------------------


def test_csv_with_class_names(tmp_path):
    path = write(tmp_path / "train.csv", "path,label\nb/1.mp4,dog\na/2.mp4,cat\nc/3.mp4,dog\n")
    m = load_manifest(path)
    assert m.class_names == ["cat", "dog"] and m.labels == [1, 0, 1]
    assert m.videos == ["b/1.mp4", "a/2.mp4", "c/3.mp4"] and len(m) == 3
    assert load_manifest(path, video_root=tmp_path / "vids").videos == m.videos  # stay relative


def test_csv_with_a_class_list_extra_columns_and_a_bom(tmp_path):
    classes = write(tmp_path / "classes.txt", "dog\ncat\nbird\n")
    path = write(tmp_path / "train.csv", "\ufeffid,Path, label\n7,x.mp4, cat\n8,y.mp4,bird\n")
    m = load_manifest(path, classes=classes)
    assert m.class_names == ["dog", "cat", "bird"] and m.labels == [1, 2] and m.videos == ["x.mp4", "y.mp4"]
    assert load_manifest(path, classes=["bird", "cat"]).labels == [1, 0]


def test_csv_with_label_indices(tmp_path):
    classes = write(tmp_path / "classes.txt", "dog\ncat\n")
    path = write(tmp_path / "train.csv", "path,label\nx.mp4,1\ny.mp4,0\n")
    m = load_manifest(path, classes=classes)
    assert m.labels == [1, 0] and m.class_names == ["dog", "cat"]
    fails(r"train.csv line 2: labels are class indices.*pass --classes", load_manifest, path)
    bad = write(tmp_path / "bad.csv", "path,label\nx.mp4,1\ny.mp4,2\n")
    fails(r"bad.csv line 3: label index 2 is out of range for --classes classes.txt \(2 names\)",
          load_manifest, bad, classes=classes)


def test_csv_errors(tmp_path):
    classes = write(tmp_path / "classes.txt", "dog\ncat\n")
    message = fails(
        r"train.csv line 3: label 'foo' is not in --classes classes.txt \(2 names\); add it or fix the row",
        load_manifest, write(tmp_path / "train.csv", "path,label\nx.mp4,dog\ny.mp4,foo\n"), classes=classes,
    )
    assert message.startswith("train.csv")
    fails("not found", load_manifest, tmp_path / "missing.csv")
    fails("lists no videos", load_manifest, write(tmp_path / "empty.csv", "path,label\n"))
    fails(r"lacks column\(s\) label", load_manifest, write(tmp_path / "cols.csv", "path,class\nx.mp4,dog\n"))
    fails("line 2: empty path or label", load_manifest, write(tmp_path / "hole.csv", "path,label\n,dog\n"))
    fails("line 3: empty path or label", load_manifest,
          write(tmp_path / "hole2.csv", "path,label\na.mp4,dog\nb.mp4,\n"))
    fails("unknown manifest format 'tsv'", load_manifest, tmp_path / "train.csv", fmt="tsv")
    fails("class list .* not found", load_manifest, tmp_path / "train.csv", classes=tmp_path / "none.txt")
    video = tmp_path / "clip.mp4"
    video.write_bytes(bytes(range(256)) * 4)
    fails("clip.mp4 is not a text manifest", load_manifest, video)
    fails("class list .* is not UTF-8 text", load_manifest, tmp_path / "train.csv", classes=video)


# ---- official Kinetics CSV ----------------------------------------------------------------------------------

KINETICS = (
    "label,youtube_id,time_start,time_end,split\n"
    "air drumming,abc,10,20,train\n"
    "abseiling,def,0,10,train\n"
    "abseiling,ghi,5,15,train\n"
    '"massaging person\'s head",jkl,30,40,train\n'
)


def test_kinetics_paths_and_classes(tmp_path):
    m = load_manifest(write(tmp_path / "train.csv", KINETICS))
    assert m.videos == [
        "air drumming/abc_000010_000020.mp4",
        "abseiling/def_000000_000010.mp4",
        "abseiling/ghi_000005_000015.mp4",
        "massaging person's head/jkl_000030_000040.mp4",
    ]
    assert m.class_names == ["abseiling", "air drumming", "massaging person's head"] and m.labels == [1, 0, 0, 2]


def test_kinetics_finds_downloaded_variants(tmp_path):
    root = tmp_path / "k400"
    write(root / "air_drumming" / "abc_000010_000020.mkv", "")  # underscores and another container
    write(root / "abseiling" / "def_000000_000010.mp4", "")
    write(root / "abseiling" / "ghi_000005_000015.webm", "")
    m = load_manifest(write(tmp_path / "train.csv", KINETICS), video_root=root)
    assert m.videos == [
        "air_drumming/abc_000010_000020.mkv",
        "abseiling/def_000000_000010.mp4",
        "abseiling/ghi_000005_000015.webm",
        "massaging person's head/jkl_000030_000040.mp4",  # missing: kept for the extractor to report
    ]


def test_kinetics_errors(tmp_path):
    fails(r"lacks column\(s\) time_end", load_manifest,
          write(tmp_path / "k.csv", "label,youtube_id,time_start\nx,a,1\n"), fmt="kinetics")
    fails(r"k2.csv line 2: time_start/time_end 'x'/'10' are not numbers", load_manifest,
          write(tmp_path / "k2.csv", "label,youtube_id,time_start,time_end\nx,a,x,10\n"))
    # Read as a path,label CSV instead, the Kinetics header lacks `path`.
    fails(r"lacks column\(s\) path", load_manifest, write(tmp_path / "k3.csv", KINETICS), fmt="csv")
    fails(r"k4.csv line 3: label 'abseiling' is not in the given classes \(1 names\)", load_manifest,
          write(tmp_path / "k4.csv", KINETICS), classes=["air drumming"])


# ---- Something-Something v2 JSON ----------------------------------------------------------------------------

SSV2 = [
    {"id": "78687", "label": "pushing a cup from left to right", "template": "Pushing [something] from left to right",
     "placeholders": ["a cup"]},
    {"id": "42326", "template": "Approaching [something] with your camera"},
    {"id": "100", "label": "Dropping something"},
]


def test_ssv2_with_labels_json(tmp_path):
    labels = write(tmp_path / "labels.json", json.dumps({
        "Approaching something with your camera": "0", "Dropping something": "1",
        "Pushing something from left to right": "2"}))
    m = load_manifest(write(tmp_path / "train.json", json.dumps(SSV2)), classes=labels)
    assert m.videos == ["78687.webm", "42326.webm", "100.webm"] and m.labels == [2, 0, 1]
    assert len(m.class_names) == 3


def test_ssv2_without_classes_and_with_converted_videos(tmp_path):
    root = tmp_path / "videos"
    write(root / "42326.mp4", "")
    m = load_manifest(write(tmp_path / "val.json", json.dumps(SSV2)), video_root=root)
    assert m.class_names == ["Approaching something with your camera", "Dropping something",
                             "Pushing something from left to right"]
    assert m.videos == ["78687.webm", "42326.mp4", "100.webm"]


def test_ssv2_errors(tmp_path):
    fails("entry 2: no 'template' or 'label'", load_manifest,
          write(tmp_path / "test.json", json.dumps([{"id": "1", "label": "a"}, {"id": "2"}])))
    fails("entry 1: no 'id'", load_manifest, write(tmp_path / "noid.json", json.dumps([{"template": "x"}])))
    fails("JSON list", load_manifest, write(tmp_path / "obj.json", json.dumps({"id": "1"})))
    fails("not valid JSON", load_manifest, write(tmp_path / "broken.json", "[{"))
    fails("lists no videos", load_manifest, write(tmp_path / "empty.json", "[]"))
    fails(r"entry 1: label 'Dropping something' is not in", load_manifest,
          write(tmp_path / "one.json", json.dumps(SSV2[2:])), classes=["Something else"])


# ---- mmaction list ------------------------------------------------------------------------------------------


def test_mmaction_list(tmp_path):
    classes = write(tmp_path / "classes.txt", "a\nb\nc\n")
    path = write(tmp_path / "train_list.txt", "x/1.mp4 2\n\ny/2.mp4\t0\n")
    m = load_manifest(path, classes=classes, video_root=tmp_path)
    assert m.videos == ["x/1.mp4", "y/2.mp4"] and m.labels == [2, 0]
    assert m.class_names == ["a", "b", "c"]
    other = write(tmp_path / "list.csv", "x/1.mp4 1\n")  # an odd extension: fmt says what it is
    assert load_manifest(other, classes=classes, fmt="mmaction").labels == [1]


def test_mmaction_errors(tmp_path):
    classes = write(tmp_path / "classes.txt", "a\nb\n")
    fails("line 1: labels are class indices", load_manifest, write(tmp_path / "l.txt", "x.mp4 1\n"))
    fails(r"line 2: expected 'relative/path label_index'", load_manifest,
          write(tmp_path / "sp.txt", "x.mp4 1\nmy video.mp4 0\n"), classes=classes)
    fails(r"line 1: expected", load_manifest, write(tmp_path / "name.txt", "x.mp4 b\n"), classes=classes)
    fails(r"line 1: expected", load_manifest, write(tmp_path / "raw.txt", "x 300 1\n"), classes=classes)
    fails(r"line 2: label index 5 is out of range", load_manifest,
          write(tmp_path / "oor.txt", "x.mp4 1\ny.mp4 5\n"), classes=classes)
    fails("lists no videos", load_manifest, write(tmp_path / "blank.txt", "\n \n"), classes=classes)


# ---- paths ------------------------------------------------------------------------------------------------


def test_a_video_listed_twice_is_refused_in_every_format(tmp_path):
    fails(r"m.txt lists a/x.mp4 twice with different labels \(line 1: 'p', line 3: 'q'\)", load_manifest,
          write(tmp_path / "m.txt", "a/x.mp4 0\na/y.mp4 0\na/x.mp4 1\n"), classes=["p", "q"])
    entry = {"id": "7", "label": "Pushing x"}
    fails(r"s.json lists 7.webm twice \(entry 1 and entry 2, both 'Pushing x'\)", load_manifest,
          write(tmp_path / "s.json", json.dumps([entry, entry])))


@pytest.mark.parametrize("path", ["/abs/video.mp4", "../up.mp4", "a/../../up.mp4", "C:/x.mp4", "..\\up.mp4"])
def test_paths_outside_the_video_root_are_refused(tmp_path, path):
    manifest = write(tmp_path / "m.csv", f"path,label\nok/a.mp4,x\n{path},y\n")
    message = fails("m.csv line 3: video path .* is not a relative path inside the video root", load_manifest, manifest)
    assert "no leading '/', no '..'" in message


def test_resolve_under_keeps_paths_inside_the_root(tmp_path):
    from dist_cache.paths import resolve_under

    assert resolve_under(tmp_path, "a/./b/../c.mp4", "here") == tmp_path / "a/c.mp4"
    with pytest.raises(UserError, match="here: video path '' is not"):
        resolve_under(tmp_path, "", "here")


# ---- a folder of class folders (extract --videos DIR) --------------------------------------------------------


def video_folder(root):
    for rel in ("walk/b.mp4", "walk/a.MP4", "run/sub/z.webm", "run/c.mkv", "run/notes.txt", "run/._c.mkv",
                ".cache/x.mp4", "run/.hidden/y.mp4"):
        write(root / rel, "")
    return root


def test_a_folder_lists_its_videos_sorted_and_labelled_by_class_folder(tmp_path):
    from dist_cache.manifests import FOLDER_FORMAT

    root = video_folder(tmp_path / "v")
    m = load_manifest(root, fmt=FOLDER_FORMAT)
    # Other extensions, hidden files (macOS ._ files) and hidden folders left out; nested folders kept.
    assert m.videos == ["run/c.mkv", "run/sub/z.webm", "walk/a.MP4", "walk/b.mp4"]
    assert m.class_names == ["run", "walk"] and m.labels == [0, 0, 1, 1]
    # A class list fixes names and order; a class without a folder is fine (a split may lack one).
    m = load_manifest(root, fmt=FOLDER_FORMAT, classes=write(tmp_path / "c.txt", "walk\njump\nrun\n"))
    assert m.class_names == ["walk", "jump", "run"] and m.labels == [2, 2, 0, 0]
    # A store extracted with its --out inside the folder is no class folder (before: "class folder train.zarr/
    # holds no videos", so the extraction's rerun, --repair or --retry-failed was refused).
    for rel in ("train.zarr/zarr.json", "train.zarr/features/zarr.json", "walk/val.zarr/zarr.json"):
        write(root / rel, "{}")
    assert load_manifest(root, fmt=FOLDER_FORMAT).videos == ["run/c.mkv", "run/sub/z.webm", "walk/a.MP4", "walk/b.mp4"]


def test_a_folder_whose_labels_would_be_guesses_is_refused(tmp_path):
    from dist_cache.manifests import FOLDER_FORMAT

    root = video_folder(tmp_path / "v")
    fails(r"class folder walk/ is not in --classes c.txt; add it", load_manifest, root, fmt=FOLDER_FORMAT,
          classes=write(tmp_path / "c.txt", "run\n"))
    (root / "empty").mkdir()
    fails(r"--videos .*: class folder empty/ holds no videos", load_manifest, root, fmt=FOLDER_FORMAT)
    write(root / "loose.mp4", "")
    fails(r"--videos .*: loose.mp4 is in no class folder; move each video into .*/<class>/", load_manifest, root,
          fmt=FOLDER_FORMAT)
    fails(r"--videos .*: no videos in class folders \(.mp4 .m4v", load_manifest, write(tmp_path / "t" / "a" / "x.txt",
                                                                                       "").parent.parent,
          fmt=FOLDER_FORMAT)
    fails(r"--videos .*: no such directory", load_manifest, tmp_path / "absent", fmt=FOLDER_FORMAT)
    fails(r"manifest .* is a folder: pass it as --videos", load_manifest, root)
