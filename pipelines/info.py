"""`dist-cache info`: what a store holds and how far its extraction got, for people and for scripts."""

from __future__ import annotations

from storage import FeatureStore


def store_info(url: str, storage_options: dict | None = None) -> dict:
    store = FeatureStore.open(url, storage_options=storage_options)
    status = store.status
    failed = []
    for i in sorted(set(int(i) // store.views_per_video for i in (status == 2).nonzero()[0])):
        sample = store.sample(i * store.views_per_video)
        failed.append({"video": sample["video"], "error": sample["error"]})
    return {
        "store": url,
        "complete": store.complete,
        "fingerprint": store.fingerprint,
        "videos": store.num_videos,
        "samples": len(store),
        "done": int((status == 1).sum()),
        "failed": int((status == 2).sum()),
        "pending": int((status == 0).sum()),
        "failed_videos": failed,
        "schema": store.schema,
    }


def format_info(info: dict, show_failed: bool = False) -> str:
    schema = info["schema"]
    backbone = schema["backbone"]
    layers = schema["layers"]
    lines = [
        f"{info['store']}: {'complete' if info['complete'] else 'INCOMPLETE'}, {info['videos']} videos, "
        f"{info['samples']} samples ({info['done']} done, {info['failed']} failed, {info['pending']} pending)",
        f"  backbone   {backbone['model']} pretrained={backbone['pretrained']} sha256={(backbone['weights_sha256'] or 'none')[:16]}",
        f"  features   layers {layers[0]}..{layers[-1]} ({len(layers)}) x {schema['num_frames']} frames x "
        f"{schema['tokens']} tokens x {schema['width']} ch, {schema['dtype']}, codec {schema['codec']}",
        f"  sampling   split {schema['split']}, {schema['views_per_video']} view(s)/video, "
        f"{schema['sampling']['policy']}, seed {schema['sampling']['seed']}, image {backbone['image_size']} px",
        f"  classes    {len(schema['class_names'])}, text templates {schema['text']['templates']}",
        f"  fingerprint {info['fingerprint'][:16]}",
    ]
    if show_failed:
        lines += [f"  failed: {f['video']}: {f['error']}" for f in info["failed_videos"]]
    elif info["failed_videos"]:
        lines.append(f"  {len(info['failed_videos'])} failed video(s): list them with --failed")
    return "\n".join(lines)
