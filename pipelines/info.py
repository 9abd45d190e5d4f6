"""`dist-cache info`: what a store holds and how far its extraction got, for people and for scripts."""

from __future__ import annotations

from storage import FeatureStore, SampleStatus


def store_info(url: str, storage_options: dict | None = None) -> dict:
    store = FeatureStore.open(url, storage_options=storage_options)
    schema = store.schema
    K = schema.views_per_video
    per_video = store.status[::K]
    failed = []
    for v in map(int, (per_video == SampleStatus.FAILED).nonzero()[0]):
        record = store.record(v)
        failed.append({"video": store.video(v), "error": record.error if record else None})
    counts = store.progress()
    return {
        "store": url,
        "complete": store.complete,
        "fingerprint": store.fingerprint,
        "videos": schema.num_videos,
        "samples": len(store),
        **{name: count * K for name, count in counts.items()},
        "failed_videos": failed,
        "limitations": store.limitations(),
        "schema": schema.to_json(),
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
        f"{schema['sampling'].get('policy', 'unrecorded policy')}, seed {schema['sampling']['seed']}, image {backbone['image_size']} px",
        f"  classes    {len(schema['class_names'])}, text templates {schema['text']['templates']}",
        f"  fingerprint {info['fingerprint'][:16]}",
    ]
    lines += [f"  note: {note}" for note in info["limitations"]]
    if show_failed:
        lines += [f"  failed: {f['video']}: {f['error']}" for f in info["failed_videos"]]
    elif info["failed_videos"]:
        lines.append(f"  {len(info['failed_videos'])} failed video(s): list them with --failed")
    return "\n".join(lines)
