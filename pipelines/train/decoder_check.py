"""Decoding a store's videos with another decoder than the one that extracted it (`train`/`eval --decoder`).

A store records its decoder, and training decodes the dense frames with it, so that dense[::gamma] are the
frames CLIP saw. decord has wheels for x86-64 Linux and Windows only: without this, a store extracted there could
be trained on an aarch64 or macOS machine only if it held its dense frames. The two decoders number frames alike
and give the same pixels within `dist_cache.decoders`' tolerance (identical bytes on even-size and 4:4:4 frames),
except on what decord's FFmpeg does not read (mirrored display matrices, Matroska's: `dist_cache.display`). So
before the run, on the first CHECKED_VIDEOS videos the run uses:
- the frame count and size this decoder finds must be those the store recorded (a video numbered or turned
  otherwise would put the crops of its views elsewhere);
- where the recorded decoder is installed too, each video's first view, decoded both ways, must agree within the
  tolerance (nothing heavy: a few frames; CLIP is never run).
Every other video's decoded size is checked against its record the first time the run decodes it
(`pipelines.train.data.dense_frames.decode_view`).
"""

from __future__ import annotations

import numpy as np

from dist_cache.decoders import LUMA_TOLERANCE, DecodeError, disagreement, get_decoder
from dist_cache.errors import UserError
from dist_cache.paths import resolve_under
from storage import FeatureStore

CHECKED_VIDEOS = 4


def check_decoder(store: FeatureStore, usable: np.ndarray, video_root: str, decoder: str) -> str | None:
    """None when `decoder` is the store's; else the line saying what was checked, or a UserError saying what
    differs and what works instead."""
    recorded = store.schema.preprocess["decoder"]["name"]
    if decoder == recorded:
        return None
    substitute = get_decoder(decoder)
    try:
        original = get_decoder(recorded)
    except UserError:
        original = None  # not installed here (decord off x86-64): sizes and counts only
    K = store.schema.views_per_video
    videos = list(dict.fromkeys(int(i) // K for i in usable))[:CHECKED_VIDEOS]
    refuse = (f"; extract the store with --decoder {decoder}, or one with --dense-frames (it needs no decoder), "
              f"or train where {recorded} is installed")
    for v in videos:
        sample = store.sample(v * K)
        path = resolve_under(video_root, sample["video"], f"store {store.url}")
        where = f"--decoder {decoder}: {sample['video']} (video {v} of {store.url}, extracted with {recorded})"
        try:
            facts = substitute.probe(path)
        except DecodeError as err:
            raise UserError(f"{where} does not decode with {decoder} ({err})" + refuse) from None
        found = (facts.num_frames, facts.width, facts.height)
        wanted = (int(sample["num_frames"]), int(sample["width"]), int(sample["height"]))
        if found != wanted:
            raise UserError(f"{where} has {found[0]} frames of {found[1]}x{found[2]} with {decoder}, the store "
                            f"recorded {wanted[0]} of {wanted[1]}x{wanted[2]}" + refuse)
        if original is not None:
            indices = [int(i) for i in sample["sparse_indices"]]
            why = disagreement(substitute.read(path, indices), original.read(path, indices))
            if why:
                raise UserError(f"{where}: its frames differ between {decoder} and {recorded}: {why}" + refuse)
    compared = (f"and their frames agree with {recorded}'s within the decoders' tolerance (luma within "
                f"{LUMA_TOLERANCE:g} levels)" if original is not None
                else f"(their frames not compared: {recorded} is not installed here)")
    return (f"decoding with {decoder}, not the store's {recorded}: the first {len(videos)} videos have the recorded "
            f"frame counts and sizes {compared}; every video's size is checked as it is first decoded")
