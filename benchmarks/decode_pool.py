"""Decode pool vs bare decord readers: clips/s of what an extraction worker does per video (probe, plan,
decode, render to uint8: `pipelines.extract.prepare.prepare_video` in `DecodePool`) against a bare process pool of
decord readers that only open each video and decode the same frames, same worker count, same K400-like
videos (340x256, 25 fps H.264, 10 s; generated here), timed bare / pool / bare in one run.

Also, in this process on one thread (as in a worker): the median time per video of each step: a bare decode,
`probe_and_read` (decord and PyAV), the whole `prepare_video`. (How uint8 rendering compared with dist-cache 0.1's
float path is recorded in benchmarks/RESULTS.md.)

And the same pool with the PyAV decoder (`extract --decoder pyav`), timed between the decord pool and the
second bare pass: what choosing PyAV, the decoder that installs everywhere, costs in extraction throughput.

    python -m benchmarks.decode_pool [--quick] [--workers N|auto]
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import parse, report

FPS, WIDTH, HEIGHT, IMAGE_SIZE, FRAMES = 25, 340, 256, 224, 8


def k400_like(path: Path, seconds: float, rng: np.random.Generator) -> None:
    """A textured scene panning behind a moving block, with sensor noise: detail and motion enough that
    H.264 spends bits on every frame, as on a real clip (a static or flat clip decodes unrealistically fast)."""
    from dist_cache.synthetic import write_video

    n = int(seconds * FPS)
    scene = np.kron(rng.integers(0, 256, size=(HEIGHT // 8, (WIDTH + 2 * n) // 8 + 1, 3)), np.ones((8, 8, 1)))
    frames = np.empty((n, HEIGHT, WIDTH, 3), dtype=np.uint8)
    for t in range(n):
        frame = scene[:, 2 * t : 2 * t + WIDTH] + rng.normal(0, 6, size=(HEIGHT, WIDTH, 3))
        x = int((WIDTH - 64) * (0.5 + 0.5 * np.sin(t / 20)))
        frame[96:160, x : x + 64] = (220, 60, 60)
        frames[t] = np.clip(frame, 0, 255)
    write_video(path, frames, fps=FPS)


def bare_read(path: str, indices: list[int]) -> np.ndarray:
    """What a bare reader does: open (decord indexes the file), count, decode the frames; nothing checked."""
    import decord

    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    len(vr)
    return vr.get_batch(indices).asnumpy()


def planned(num_frames: int, video_index: int, spec) -> list[int]:
    """The frames prepare_video decodes for this video (planned from the facts the generator wrote)."""
    plans = spec.sampling.plan(num_frames, WIDTH, HEIGHT, video_index)
    return sorted({i for p in plans for i in p.sparse_indices})


def serial_split(videos: list[Path], num_frames: int, spec, rounds: int) -> dict:
    """One process, one thread: median seconds per video of the bare decode, of probe_and_read (both
    backends), and of the whole prepare_video (probe_and_read and rendering), interleaved video by video so
    that a busy moment of the machine hits them all alike; wall-clock, and CPU seconds of this process (all its
    threads: decord decodes on a thread of its own), which a machine shared with other jobs disturbs far less."""
    from dist_cache.decoders import get_decoder
    from pipelines.extract.prepare import prepare_video

    def checked(name: str, path: Path, v: int) -> None:
        get_decoder(name).probe_and_read(path, lambda facts: planned(facts.num_frames, v, spec))

    steps = {
        "bare_decode": lambda path, v: bare_read(str(path), planned(num_frames, v, spec)),
        "probe_and_read_decord": lambda path, v: checked("decord", path, v),
        "probe_and_read_pyav": lambda path, v: checked("pyav", path, v),
        "prepare_video": lambda path, v: prepare_video(str(path), v, spec),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in steps.values():  # warm-up: imports, first calls
            step(videos[0], 0)
        seconds: dict[str, list[float]] = {name: [] for name in steps}
        cpu: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(rounds):
            for v, path in enumerate(videos):
                for name, step in steps.items():
                    start, start_cpu = time.perf_counter(), time.process_time()
                    step(path, v)
                    seconds[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
    finally:
        torch.set_num_threads(threads)
    median = {f"{name}_s_per_video": round(float(np.median(t)), 4) for name, t in seconds.items()}
    median.update({f"{name}_cpu_s_per_video": round(float(np.median(t)), 4) for name, t in cpu.items()})
    median["pyav_over_decord_cpu"] = round(median["probe_and_read_pyav_cpu_s_per_video"]
                                           / median["probe_and_read_decord_cpu_s_per_video"], 3)
    median["prepare_over_bare"] = round(median["prepare_video_s_per_video"] / median["bare_decode_s_per_video"], 3)
    return median


def run_bare(executor, jobs) -> float:
    start = time.perf_counter()
    for future in [executor.submit(bare_read, *job) for job in jobs]:
        future.result()
    return time.perf_counter() - start


def run_pool(pool, jobs) -> float:
    from pipelines.extract.prepare import prepare_video

    start = time.perf_counter()
    for _, future in pool.map_unordered(prepare_video, jobs):
        future.result()
    return time.perf_counter() - start


def main() -> None:
    args = parse(__doc__.splitlines()[0], extra=lambda p: p.add_argument(
        "--workers", default="auto", help="processes in each pool (default: auto, as `--decode-workers auto`)"))
    from dist_cache.decode_pool import DecodePool, auto_workers
    from dist_cache.sampling import Sampling
    from pipelines.extract.extractor import DECODE_PRELOAD
    from pipelines.extract.prepare import RenderSpec

    workers = auto_workers() if args.workers == "auto" else int(args.workers)
    count, seconds = (4, 2.0) if args.quick else (32, 10.0)
    sampling = Sampling(FRAMES, 1, "train", 0, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5, grayscale_p=0.2)
    spec = RenderSpec(sampling, IMAGE_SIZE, decoder="decord")
    tmp = Path(tempfile.mkdtemp(prefix="dist-bench-decode-"))
    try:
        rng = np.random.default_rng(0)
        videos = [tmp / f"{i}.mp4" for i in range(count)]
        num_frames = int(seconds * FPS)
        for path in videos:
            k400_like(path, seconds, rng)
        bare_jobs = [(str(p), planned(num_frames, v, spec)) for v, p in enumerate(videos)]
        pool_jobs = [(str(p), v, spec) for v, p in enumerate(videos)]
        pyav_jobs = [(str(p), v, dataclasses.replace(spec, decoder="pyav")) for v, p in enumerate(videos)]
        split = serial_split(videos[: min(count, 8)], num_frames, spec, rounds=1 if args.quick else 3)

        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as executor, \
                DecodePool(workers, timeout=600, preload=DECODE_PRELOAD) as pool:
            # Warm-up: every worker started and has imported what it needs; only then is anything timed.
            run_bare(executor, bare_jobs[:workers] * 2)
            run_pool(pool, pool_jobs[:workers] * 2)
            run_pool(pool, pyav_jobs[:workers])  # the PyAV backend imported in every worker
            bare_first = run_bare(executor, bare_jobs)
            pool_s = run_pool(pool, pool_jobs)
            pyav_s = run_pool(pool, pyav_jobs)
            bare_second = run_bare(executor, bare_jobs)
            start = time.perf_counter()
            pool.close()
            close_s = time.perf_counter() - start
        bare_s = (bare_first + bare_second) / 2
        clips = count * sampling.views
        ratio = round(bare_s / pool_s, 3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(
        parameters={"videos": count, "seconds": seconds, "size": f"{WIDTH}x{HEIGHT}", "fps": FPS,
                    "codec": "H.264 (libx264 veryfast crf 18)",
                    "workers": workers, "frames": FRAMES, "views": sampling.views, "image_size": IMAGE_SIZE,
                    "split": "train (random crop, flip, grayscale)", "decoder": spec.decoder},
        results={"pool_clips_per_s": round(clips / pool_s, 3), "bare_clips_per_s": round(clips / bare_s, 3),
                 "pool_s": round(pool_s, 3), "bare_s": [round(bare_first, 3), round(bare_second, 3)],
                 "pool_close_s": round(close_s, 3),
                 "pyav_pool_clips_per_s": round(clips / pyav_s, 3), "pyav_over_decord_pool": round(pool_s / pyav_s, 3),
                 "serial_one_thread": split},
        ratio=ratio,
        goal="decode pool (probe, plan, decode, render) >= 90% of the clips/s of bare decord readers",
        verdict="met" if ratio >= 0.9 else "missed",
    )


if __name__ == "__main__":
    main()
