"""Which stores are the same evaluation set, so that `eval` can tell when a best.pt is scored on the data it was
chosen on (test-set selection), whatever copy of that data it is given.

Two stores are the same evaluation set when they hold the same views of the same videos with the same labels: the
videos (paths and labels in order, and each file's recorded size, so that another dataset laid out under the same
relative paths is not mistaken for this one), the classes, the split, and the sampling that made the views (clips
per video, frames per clip, the clips' offsets). Not what a `copy` may change (dtype, codec, layers, dense frames,
packing) nor what does not change a test view (a test split's seed and augmentation settings).
"""

from __future__ import annotations

import hashlib
from typing import Any

from storage import FeatureStore
from storage.schema import canonical_json

# Sampling keys that do not change a test-split view: views are the clips at fixed offsets with the centre crop.
_TEST_INDEPENDENT = ("seed", "scale", "ratio", "flip_p", "grayscale_p", "rng", "flip_label_map")


def evaluation_set(store: FeatureStore) -> str:
    """sha256 of what makes `store` this evaluation set (module docstring)."""
    schema = store.schema
    sampling = dict(schema.sampling)
    if schema.split == "test":
        sampling = {k: v for k, v in sampling.items() if k not in _TEST_INDEPENDENT}
    basis = {
        "videos": schema.videos_sha256, "sizes": store.video_sizes().tolist(), "classes": list(schema.class_names),
        "split": schema.split, "views_per_video": schema.views_per_video, "frames": schema.num_frames,
        "sampling": sampling,
    }
    return hashlib.sha256(canonical_json(basis).encode()).hexdigest()


def store_identity(store: FeatureStore) -> dict[str, str]:
    """What a checkpoint records of a store it validated on."""
    return {"fingerprint": store.fingerprint, "url": store.url, "evaluation_set": evaluation_set(store)}


def chosen_on_this_set(chosen: dict[str, Any] | None, store: FeatureStore) -> bool:
    """Whether a checkpoint's `chosen_on` record names this store's evaluation set. Checkpoints written before the
    evaluation set was recorded compare the whole fingerprint (a copy then goes unnoticed)."""
    if not chosen:
        return False
    if "evaluation_set" in chosen:
        return chosen["evaluation_set"] == evaluation_set(store)
    return chosen.get("fingerprint") == store.fingerprint
