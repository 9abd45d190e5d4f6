"""Small generated H.264 datasets whose classes are defined by motion, for the demo and the tests.

Each clip is a textured square sliding over a textured background. Appearance (textures, colours, where the
path lies) is drawn from one distribution for every class, and a clip's path is symmetric about its midpoint,
so the unordered set of frames is distributed the same for left and right (and for up and down): only the
order of the frames tells the direction. (An order-blind model can still tell the axis, horizontal or
vertical, so it tops out at 50 % on the four default classes.)
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import av
import numpy as np

# Unit step per frame, as (dx, dy) in image coordinates (y grows downwards).
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int) -> None:
    """H.264 (libx264, yuv420p) mp4 of uint8 frames (n, H, W, 3); H and W must be even for yuv420p."""
    n, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
    # faststart puts the index first, as on the web: a truncated file then over-reports its frames.
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def _texture(rng: np.random.Generator, size: int, cells: int, colour: np.ndarray) -> np.ndarray:
    """`colour` with blocky brightness noise: `cells` x `cells` random cells scaled up to `size`."""
    noise = rng.uniform(-40, 40, size=(cells, cells, 1))
    reps = -(-size // cells)
    tex = np.kron(noise, np.ones((reps, reps, 1)))[:size, :size] + colour
    return np.clip(tex, 0, 255)


def motion_clip(
    rng: np.random.Generator, direction: str, size: int = 64, num_frames: int = 32, high_contrast: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames (n, size, size, 3) of a square moving in `direction`, and its top-left corners (n, 2) as (x, y).

    Default: random colours for square and background (the harder, colour-invariant task). `high_contrast`:
    a light square on a dark background, which a small model trained for a minute can follow.
    """
    dx, dy = DIRECTIONS[direction]
    side = max(4, size // 5)
    free = size - side
    if high_contrast:
        back_colour, square_colour = rng.uniform(20, 70, size=3), rng.uniform(190, 240, size=3)
    else:
        back_colour = rng.uniform(40, 215, size=3)
        square_colour = rng.uniform(40, 215, size=3)
    while np.abs(square_colour - back_colour).max() < 60:  # keep the square visible
        square_colour = rng.uniform(40, 215, size=3)
    background = _texture(rng, size, 8, back_colour)
    square = _texture(rng, side, 4, square_colour)
    # Travel over half the free space at least, so no pixel is covered by the square in most frames.
    travel = rng.uniform(0.6, 1.0) * free
    centre = rng.uniform(travel / 2, free - travel / 2)
    across = rng.uniform(0, free)
    t = np.linspace(-0.5, 0.5, num_frames)
    along = np.rint(centre + (dx + dy) * travel * t).astype(int)
    other = np.full(num_frames, int(round(across)))
    corners = np.stack([along, other] if dx else [other, along], axis=1)
    frames = np.repeat(background[None], num_frames, axis=0)
    for frame, (x, y) in zip(frames, corners):
        frame[y : y + side, x : x + side] = square
    return frames.round().astype(np.uint8), corners


def make_motion_dataset(
    root: str | os.PathLike,
    *,
    videos_per_class: int,
    classes: tuple[str, ...] = ("left", "right", "up", "down"),
    size: int = 64,
    num_frames: int = 32,
    fps: int = 16,
    seed: int = 0,
    high_contrast: bool = False,
) -> Path:
    """Write root/videos/<class>/<i>.mp4 and root/train.csv, root/val.csv (`path,label`, paths relative to
    root/videos; a quarter of each class, at least one video, goes to val). Returns root.

    decord 0.6 cannot convert frames a few widths wide (8-24, 48, 72 pixels), so keep `size` at 32, 40, 56, 64
    or from 80 up.
    """
    unknown = [c for c in classes if c not in DIRECTIONS]
    if unknown:
        raise ValueError(f"unknown motion class {unknown[0]!r}; choose from {', '.join(DIRECTIONS)}")
    if videos_per_class < 2:
        raise ValueError("videos_per_class must be >= 2, so that train and val both get every class")
    root = Path(root)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    for ci, name in enumerate(classes):
        (root / "videos" / name).mkdir(parents=True, exist_ok=True)
        n_val = max(1, round(videos_per_class / 4))
        val = set(np.random.default_rng([seed, ci]).permutation(videos_per_class)[:n_val].tolist())
        for i in range(videos_per_class):
            # Seeded per video, so a clip does not change when others are added.
            frames, _ = motion_clip(np.random.default_rng([seed, ci, i]), name, size, num_frames, high_contrast)
            rel = f"{name}/{i}.mp4"
            write_video(root / "videos" / rel, frames, fps)
            splits["val" if i in val else "train"].append((rel, name))
    for split, rows in splits.items():
        with (root / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label"])
            writer.writerows(rows)
    return root
