"""Reading the video lists people already have: a `path,label` CSV, the official Kinetics CSV, the SSv2 JSON
and mmaction's `path label_index` lists, or a folder of class folders (`extract --videos DIR`), into one
`Manifest` (row v is video index v everywhere downstream).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, first_line
from .paths import resolve_under

FORMATS = ("csv", "kinetics", "ssv2", "mmaction")
_KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
# Kinetics downloaders save whatever container YouTube served; SSv2 ships webm that some convert.
_VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi")
# `extract --videos DIR`: a folder of class folders instead of a manifest file (not an --manifest-format choice).
FOLDER_FORMAT = "folder"
# The files a folder listing takes (compared in lower case): containers FFmpeg, and so both decoders, read.
FOLDER_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ogv")


class ManifestError(UserError, ValueError):
    """A manifest or class list that cannot be read; the message names the file, the line and the fix."""


@dataclass
class Manifest:
    videos: list[str]  # relative to the video root, as listed (or the variant found on disk, see _resolve)
    labels: list[int]  # indices into class_names
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.videos)


def load_class_names(path: str | os.PathLike) -> list[str]:
    """Class names in index order from classes.txt (one per line), a JSON list, or a JSON dict name -> index
    (SSv2's labels.json, whose indices are strings)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"class list {path} not found; pass an existing classes file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"class list {path} is not UTF-8 text ({exc}); pass the class-names file") from exc
    if path.suffix.lower() == ".json":
        names = _class_names_from_json(path, text)
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ManifestError(f"class list {path} is empty; put one class name per line")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ManifestError(f"class list {path} names {dupes[0]!r} more than once; remove the duplicate")
    return names


def _class_names_from_json(path: Path, text: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"class list {path} is not valid JSON ({exc.msg}, line {exc.lineno}); fix the file"
        ) from exc
    if isinstance(data, list) and all(isinstance(n, str) for n in data):
        return [n.strip() for n in data]
    if isinstance(data, dict):
        try:
            index = {name.strip(): int(i) for name, i in data.items()}
        except (TypeError, ValueError):
            index = {}
        if index and sorted(index.values()) == list(range(len(index))):
            return sorted(index, key=index.__getitem__)
    raise ManifestError(
        f"class list {path} must be a JSON list of names or a dict name -> index 0..K-1; fix the file"
    )


def load_manifest(
    path: str | os.PathLike,
    *,
    video_root: str | os.PathLike | None = None,
    classes: str | os.PathLike | Sequence[str] | None = None,
    fmt: str = "auto",
) -> Manifest:
    """Read a manifest; `classes` (a class-list file or the names) fixes the label order, else the sorted names.

    fmt: "auto" (by extension and header), "csv", "kinetics", "ssv2", "mmaction", or FOLDER_FORMAT (`path` is
    a folder of class folders: `load_video_folder`). Video paths stay relative (stores record them so, and
    readers join their own root); `video_root` only lets Kinetics and SSv2 names be matched to the files a
    downloader actually wrote.
    """
    if fmt == FOLDER_FORMAT:
        return load_video_folder(path, classes=classes)
    path = Path(path)
    if path.is_dir():
        raise ManifestError(f"manifest {path} is a folder: pass it as --videos {path} (labels from its class "
                            "folders), or name the manifest file")
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found; check the path")
    if fmt != "auto" and fmt not in FORMATS:
        raise ManifestError(f"unknown manifest format {fmt!r}; use one of auto, {', '.join(FORMATS)}")
    label_map = _Labels(path, classes)
    try:
        fmt = _detect_format(path) if fmt == "auto" else fmt
        if fmt == "ssv2":
            rows = _read_ssv2(path)
        elif fmt == "mmaction":
            rows = _read_mmaction(path)
        else:
            rows = _read_csv(path, fmt)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{path.name} is not a text manifest ({exc}); pass the list of videos") from exc
    if not rows:
        raise ManifestError(f"manifest {path} lists no videos; add rows or pick another file")
    root = Path(video_root) if video_root is not None else None
    for where, rel, _ in rows:
        try:
            resolve_under(root or ".", rel, f"{path.name} {where}")
        except UserError as err:
            raise ManifestError(str(err)) from None
    labels = label_map.index([(where, label) for where, _, label in rows])
    videos = [_resolve(root, rel, fmt) for _, rel, _ in rows]
    _refuse_duplicates(path, rows, videos, labels, label_map.names)
    return Manifest(videos=videos, labels=labels, class_names=label_map.names)


def _refuse_duplicates(path: Path, rows: list[Row], videos: list[str], labels: list[int], names: list[str]) -> None:
    """A video listed twice is refused, with both rows named. With two labels one of them is wrong. With the same
    label it is refused too, not warned about: the store would hold the video twice, so every epoch and every
    evaluation would weigh it double without a word; it is nearly always two lists concatenated; and weighting
    videos is the training sampler's business, not worth a second CLIP forward and a second copy of its features."""
    first: dict[str, int] = {}
    for i, video in enumerate(videos):
        j = first.setdefault(os.path.normpath(video), i)
        if j == i:
            continue
        (where_j, _, _), (where_i, _, _) = rows[j], rows[i]
        if labels[i] != labels[j]:
            raise ManifestError(
                f"{path.name} lists {video} twice with different labels ({where_j}: {names[labels[j]]!r}, "
                f"{where_i}: {names[labels[i]]!r}); keep only the row with the right label"
            )
        raise ManifestError(
            f"{path.name} lists {video} twice ({where_j} and {where_i}, both {names[labels[i]]!r}); delete the "
            "repeated row (a store holds each video once: weight videos at training time instead)"
        )


def load_video_folder(root: str | os.PathLike, *, classes: str | os.PathLike | Sequence[str] | None = None,
                      ) -> Manifest:
    """Every video under `root`'s class folders, labelled with its top-level folder (torchvision's ImageFolder
    convention: root/<class>/**/<video>), sorted by relative path so every run lists the same videos in the same
    order. Files with other extensions, and hidden files and folders (macOS's ._ files), are left out.

    The classes are the folder names sorted, or, with `classes`, that list (every folder must be in it; a
    class may have no folder, e.g. a validation split lacking one). A video outside every class folder, or a
    class folder without videos, is an error: the label of either would be a guess. A zarr store or group (a
    folder holding a zarr.json, such as the store extracted from `root` with its --out inside it) is no class
    folder and is left out, so that the extraction's rerun lists the same videos."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"--videos {root}: no such directory")

    def listed(folder: Path, name: str) -> bool:
        return not name.startswith(".") and not (folder / name / "zarr.json").is_file()

    videos: list[str] = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if listed(Path(folder), d)]
        for name in files:
            if not name.startswith(".") and name.lower().endswith(FOLDER_EXTENSIONS):
                videos.append(Path(folder, name).relative_to(root).as_posix())
    videos.sort()
    loose = [v for v in videos if "/" not in v]
    if loose:
        raise ManifestError(f"--videos {root}: {loose[0]} is in no class folder; move each video into "
                            f"{root}/<class>/ (its label)")
    found = sorted({v.split("/", 1)[0] for v in videos})
    if not found:
        raise ManifestError(f"--videos {root}: no videos in class folders ({' '.join(FOLDER_EXTENSIONS)}); "
                            "check the folder")
    empty = sorted(d.name for d in root.iterdir() if d.is_dir() and listed(root, d.name) and d.name not in found)
    if empty:
        raise ManifestError(f"--videos {root}: class folder {empty[0]}/ holds no videos; add some or remove it")
    label_map = _Labels(root, classes)
    stray = [c for c in found if label_map.given and c not in label_map.names]
    if stray:
        raise ManifestError(f"--videos {root}: class folder {stray[0]}/ is not in {label_map.source}; add it to "
                            "the list or move the folder out")
    labels = label_map.index([(v, v.split("/", 1)[0]) for v in videos])
    return Manifest(videos=videos, labels=labels, class_names=label_map.names)


def _detect_format(path: Path) -> str:
    if path.suffix.lower() == ".json":
        return "ssv2"
    with path.open(encoding="utf-8-sig") as f:
        first = next((line for line in f if line.strip()), "")
    if "," not in first:
        return "mmaction"
    header = {c.strip().lower() for c in first.split(",")}
    return "kinetics" if set(_KINETICS_COLUMNS) <= header else "csv"


# A row is (where, for messages: "line 14" or "entry 3"; relative video path; label as written: a name or an index).
Row = tuple[str, str, str | int]


def _read_csv(path: Path, fmt: str) -> list[Row]:
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheets save a BOM
        reader = csv.DictReader(f, skipinitialspace=True)
        header = [c.strip().lower() for c in reader.fieldnames or []]
        reader.fieldnames = header
        required = _KINETICS_COLUMNS if fmt == "kinetics" else ("path", "label")
        missing = [c for c in required if c not in header]
        if missing:
            raise ManifestError(
                f"{path.name}: header {','.join(header) or '(none)'} lacks column(s) {','.join(missing)}; "
                f"a {fmt} manifest needs {','.join(required)}"
            )
        rows: list[Row] = []
        for rec in reader:
            where = f"line {reader.line_num}"
            label = (rec["label"] or "").strip()
            rel = _kinetics_path(path, where, rec) if fmt == "kinetics" else (rec["path"] or "").strip()
            if not rel or not label:
                raise ManifestError(f"{path.name} {where}: empty path or label; fill it in or delete the row")
            rows.append((where, rel, _label_value(label)))
    return rows


def _kinetics_path(path: Path, where: str, rec: dict) -> str:
    try:
        start, end = int(float(rec["time_start"])), int(float(rec["time_end"]))
    except (TypeError, ValueError):
        raise ManifestError(
            f"{path.name} {where}: time_start/time_end {rec['time_start']!r}/{rec['time_end']!r} are not "
            "numbers; fix the row"
        ) from None
    return f"{(rec['label'] or '').strip()}/{(rec['youtube_id'] or '').strip()}_{start:06d}_{end:06d}.mp4"


def _label_value(label: str) -> str | int:
    """An integer-looking label is a class index, anything else a class name."""
    return int(label) if re.fullmatch(r"-?\d+", label) else label


def _read_ssv2(path: Path) -> list[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path.name} is not valid JSON ({exc.msg}, line {exc.lineno}); fix the file") from exc
    if not isinstance(data, list):
        raise ManifestError(f"{path.name}: an SSv2 manifest is a JSON list of {{id, template}} objects; fix the file")
    rows: list[Row] = []
    for i, item in enumerate(data, start=1):
        where = f"entry {i}"
        if not isinstance(item, dict) or "id" not in item:
            raise ManifestError(f"{path.name} {where}: no 'id'; each entry needs id and template (or label)")
        if "template" in item:
            label = re.sub(r"\[([^\]]*)\]", r"\1", str(item["template"])).strip()
        elif "label" in item:
            label = str(item["label"]).strip()
        else:
            raise ManifestError(
                f"{path.name} {where}: no 'template' or 'label'; use the labelled train/validation json"
            )
        rows.append((where, f"{item['id']}.webm", label))
    return rows


def _read_mmaction(path: Path) -> list[Row]:
    rows: list[Row] = []
    for line, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        parts = text.split()
        if not parts:
            continue
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise ManifestError(
                f"{path.name} line {line}: expected 'relative/path label_index' (no spaces in the path), "
                f"got {text.strip()!r}; fix the row"
            )
        rows.append((f"line {line}", parts[0], int(parts[1])))
    return rows


class _Labels:
    """Maps labels (names or indices) to indices, against the given class list or the sorted names found."""

    def __init__(self, manifest: Path, classes: str | os.PathLike | Sequence[str] | None):
        self.manifest = manifest
        if classes is None:
            self.names: list[str] = []
            self.source = ""
        elif isinstance(classes, (str, os.PathLike)):
            self.names = load_class_names(classes)
            self.source = f"--classes {Path(classes).name}"
        else:
            self.names = list(classes)
            self.source = "the given classes"
        self.given = classes is not None

    def index(self, labels: list[tuple[str, str | int]]) -> list[int]:
        name = self.manifest.name
        if not self.given:
            ints = [where for where, label in labels if isinstance(label, int)]
            if ints:
                raise ManifestError(
                    f"{name} {ints[0]}: labels are class indices, so the class names are needed; pass --classes"
                )
            self.names = sorted({label for _, label in labels})
        lookup = {n: i for i, n in enumerate(self.names)}
        out = []
        for where, label in labels:
            if isinstance(label, int):
                if not 0 <= label < len(self.names):
                    raise ManifestError(
                        f"{name} {where}: label index {label} is out of range for {self.source} "
                        f"({len(self.names)} names); fix the row or the class list"
                    )
                out.append(label)
            elif label in lookup:
                out.append(lookup[label])
            else:
                raise ManifestError(
                    f"{name} {where}: label {label!r} is not in {self.source} ({len(self.names)} names); "
                    "add it or fix the row"
                )
        return out


def _resolve(root: Path | None, rel: str, fmt: str) -> str:
    """`rel`, or for Kinetics and SSv2, when root/rel is missing, the first variant under root with another
    container extension (or, for Kinetics, underscores for spaces in the class folder). A video found under
    none keeps its listed name, and the extractor records it as missing."""
    if root is None or fmt not in ("kinetics", "ssv2") or (root / rel).exists():
        return rel
    parent, stem = os.path.split(os.path.splitext(rel)[0])
    folders = dict.fromkeys([parent, parent.replace(" ", "_")])  # ordered, without the duplicate
    for folder in folders:
        for ext in _VIDEO_EXTENSIONS:
            candidate = os.path.join(folder, stem + ext)
            if (root / candidate).exists():
                return candidate
    return rel


def load_flip_label_map(path: str | os.PathLike) -> tuple[tuple[str, str], ...]:
    """`extract --flip-label-map FILE`: the pairs of class names a horizontal flip swaps (SSv2's "left to right"
    and "right to left"), as a JSON list of two-name lists, e.g. [["Pushing something from left to right",
    "Pushing something from right to left"]]. Returned canonical (each pair and the list sorted), since the
    relation is symmetric and the store compares it with a rerun's."""
    path = Path(path)
    flag = f"--flip-label-map {path}"
    if not path.is_file():
        raise ManifestError(f"{flag}: no such file; pass a JSON list of [class, class] pairs")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{flag} is not a JSON file ({first_line(exc, 80)}); write a JSON list of "
                            f"[class, class] pairs") from None
    if not isinstance(data, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) and n.strip() for n in p) for p in data):
        raise ManifestError(f"{flag}: expected a JSON list of [class, class] pairs of class names, "
                            f'e.g. [["left", "right"]]; fix the file')
    pairs = sorted(tuple(sorted(n.strip() for n in p)) for p in data)
    named = [n for p in pairs for n in p]
    twice = sorted({n for n in named if named.count(n) > 1})
    if twice:
        raise ManifestError(f"{flag}: class {twice[0]!r} appears in more than one place; each class swaps with "
                            f"one partner at most")
    return tuple(pairs)  # type: ignore[return-value]


def flip_partners(pairs: Sequence[Sequence[str]], class_names: Sequence[str]) -> dict[int, int]:
    """Class index -> the index its flipped views are labelled with, for every class in a pair; a UserError
    naming the first class that the manifest's class list lacks."""
    lookup = {n: i for i, n in enumerate(class_names)}
    unknown = [n for p in pairs for n in p if n not in lookup]
    if unknown:
        raise ManifestError(f"--flip-label-map names the class {unknown[0]!r}, which is not among the "
                            f"{len(class_names)} classes of the manifest (or --classes): a map pairs the dataset's "
                            f"own class names (the built-in ssv2 map, Something-Something v2's as its labels.json "
                            f"spells them); fix the map or the class list")
    partners: dict[int, int] = {}
    for a, b in pairs:
        partners[lookup[a]], partners[lookup[b]] = lookup[b], lookup[a]
    return partners
