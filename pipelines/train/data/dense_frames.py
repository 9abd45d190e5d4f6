"""Decoding a cached view's dense frames from its video, in a decode-pool worker (see `dist_cache.decode_pool`).

The frames are those of the view's recorded plan (`dense_indices`), rendered to uint8 by the same
`render_frames` extraction used: so dense[::gamma] are, byte for byte, the frames whose features the store
holds. That only holds for the very file that was extracted. A video replaced by another valid clip would
still decode (frame indices past its end are clamped), and train on frames that do not belong to the cached
features; so the first time a run decodes a video, the file's size and, where the store recorded it, its
sha256 are compared with the record, and then the decoded frames' size (a video another decoder, or a PyAV
that did not yet apply display matrices, turns otherwise would put the view's crop elsewhere): a mismatch stops
the run.
"""

from __future__ import annotations

import numpy as np

from dist_cache.decoders import get_decoder
from dist_cache.errors import DecodeError, UserError
from dist_cache.paths import file_mismatch
from dist_cache.sampling import ViewPlan, dense_indices
from dist_cache.transforms import render_frames


class VideoChanged(UserError):
    """A video on disk is not the one the store was extracted from, or no longer decodes."""


def decode_view(path: str, plan: dict, gamma: int, num_frames: int, image_size: int, decoder: str,
                expected: dict | None, where: str) -> np.ndarray:
    """uint8 (gamma*T, R, R, 3): the view's dense frames. `expected` (size_bytes, sha256, width, height) checks the
    file first and the decoded frames' size after; `where` names the video and the store for the one-line error."""
    if expected is not None:
        why = file_mismatch(path, expected)
        if why:
            raise VideoChanged(f"{path} ({where}) is not the video the store was extracted from: {why}; restore "
                               "that video, or re-extract the store from these files")
    view = ViewPlan.from_dict(plan)
    try:
        decoded = get_decoder(decoder).read(path, dense_indices(view, gamma, num_frames).tolist())
    except DecodeError as err:
        reason = str(err).removeprefix(f"{path}: ")
        raise VideoChanged(f"{path} ({where}): {reason}, but it decoded at extraction; restore the video the store "
                           "was extracted from, or re-extract") from None
    size = (int(decoded.shape[2]), int(decoded.shape[1]))
    if expected is not None and expected.get("width") is not None and size != (expected["width"], expected["height"]):
        raise VideoChanged(f"{path} ({where}) decodes with {decoder} as {size[0]}x{size[1]} frames, the store recorded "
                           f"{expected['width']}x{expected['height']} (another decoder, or one that turns it upright "
                           "by its display matrix where the extraction's did not); re-extract the store with this "
                           "decoder")
    return render_frames(decoded, view, image_size).numpy()
