"""Stage one on a dask.distributed cluster: the same extraction as `pipelines.extract.extractor`, spread over workers.

The client creates (or reopens) the store, splits the pending videos into chunks and submits one task per
chunk. Each worker process loads the backbone once per run and writes its videos' shards and records
straight to the shared store; only the client finalizes, once every chunk is done.

Exactly-once comes from the store, not from dask: a task whose worker dies is rerun elsewhere, and
rewriting a video writes the same bytes (StoreWriter's rules), so retries are harmless.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dist_cache.errors import UserError

# Nothing that imports `storage` at module level: see _import_storage.
if TYPE_CHECKING:
    import distributed

    from pipelines.extract.extractor import ExtractOptions, Extractor, ExtractSummary

DEFAULT_CHUNK_VIDEOS = 8
TASK_PREFIX = "extract-chunk"

# The one Extractor this worker process holds, by run key: loading CLIP per chunk would dominate small
# chunks, and keeping only the latest run's lets a long-lived worker free the previous model.
_WORKER_EXTRACTOR: dict[str, Extractor] = {}


def _import_storage() -> None:
    """A `dask worker` puts its local directory first on sys.path, and that directory holds a `storage/`
    spill folder, which would shadow this project's `storage` package as an empty namespace package.
    So tasks carry only plain data (options as a dict) and import the package with those entries hidden."""
    from distributed import get_worker

    local = get_worker().local_directory
    hidden = {local, os.path.dirname(local)}
    if getattr(sys.modules.get("storage"), "__file__", "") is None:
        del sys.modules["storage"]  # an earlier import already picked up the spill folder
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if p not in hidden]
    try:
        importlib.import_module("storage")
    finally:
        sys.path[:] = saved


def _extract_chunk(run_key: str, options: dict[str, Any], videos: list[int]) -> ExtractSummary:
    """Runs on a worker: extract `videos` into the store with this process's cached Extractor."""
    if multiprocessing.current_process().daemon:
        # Decoding runs in killable child processes, which a daemonic process may not start.
        raise UserError("dask workers must not be daemonic (they start decode processes): start them with "
                        "DASK_DISTRIBUTED__WORKER__DAEMON=False")
    extractor = _WORKER_EXTRACTOR.get(run_key)
    if extractor is None:
        _import_storage()
        from pipelines.extract.extractor import ExtractOptions, Extractor

        _WORKER_EXTRACTOR.clear()
        extractor = _WORKER_EXTRACTOR[run_key] = Extractor.open(ExtractOptions(**options))
    return extractor.run(videos)


def _fit_task(options: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Runs on one worker, before any chunk: a compact store's fit pass (pipelines.extract.fit) on the worker's
    device and decode processes. Returns the fit record and the parameters (small numpy arrays) to the client."""
    _import_storage()
    from pipelines.extract.extractor import fit_here, load_for_fit

    opts, backbone, layers, manifest, device, schema = load_for_fit(options)
    return fit_here(opts, backbone, layers, manifest, device, None, schema)


@contextlib.contextmanager
def connect(workers: int | None, scheduler: str | None) -> Iterator[distributed.Client]:
    """A client of the cluster at `scheduler`, or of a LocalCluster of `workers` single-threaded processes."""
    import dask
    from distributed import Client, LocalCluster

    from dist_cache.decode_pool import sigint_ignored

    if (workers is None) == (scheduler is None):
        raise UserError("pass exactly one of --dask-workers N (a local cluster) and --scheduler ADDRESS")
    if scheduler is not None:
        with Client(scheduler) as client:
            yield client
        return
    if workers < 1:
        raise UserError(f"--dask-workers {workers}: must be at least 1")
    with dask.config.set({"distributed.worker.daemon": False}):
        # The cluster's nannies and workers start with SIGINT ignored: they then ignore a terminal's Ctrl-C, which
        # would make each print a KeyboardInterrupt traceback; this process alone handles it, and closes the cluster.
        with sigint_ignored():
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address=None)
        with cluster, Client(cluster) as client:
            yield client


def _task_resources(client) -> dict[str, int] | None:
    """Ask for one GPU per task when the cluster declares GPUs (`dask worker --resources GPU=1`), else none:
    a task that requests a resource no worker has would wait forever."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return {"GPU": 1} if any(w.get("resources", {}).get("GPU") for w in workers) else None


def _worker_device_type(device: str) -> str:
    """Runs on a worker: the kind of device `--device` gives there."""
    from dist_cache.devices import resolve_device

    return resolve_device(device).type


def cluster_precision(client, opts: ExtractOptions) -> str:
    """--precision for the whole cluster (the store records one): as given, else fp16 when every worker's device
    is a GPU and fp32 otherwise. Asked of the workers, since the client may have no GPU while they do."""
    if opts.precision is not None:
        return opts.precision
    kinds = set(client.run(_worker_device_type, opts.device).values())
    return "fp16" if kinds == {"cuda"} else "fp32"


def extract_on_cluster(opts: ExtractOptions, client, *, chunk_videos: int = DEFAULT_CHUNK_VIDEOS,
                       progress: bool = True) -> ExtractSummary:
    """Extract every pending (and, with --repair, damaged) video on the cluster behind `client`, then finalize the
    store once."""
    from distributed import as_completed
    from tqdm import tqdm

    from pipelines.extract.extractor import FIRST_FAILURES_LIMIT, Extractor, ExtractSummary, first_failures_error

    if chunk_videos < 1:
        raise ValueError("chunk_videos must be at least 1")
    started = time.monotonic()
    opts = dataclasses.replace(opts, precision=cluster_precision(client, opts))
    # Opening here creates the store and raises every user error before a task runs; workers only reopen it. A
    # compact store is fitted once, on one worker, and only if the store has to be created (a rerun keeps its fit).
    fit_options = dataclasses.asdict(opts)

    def fit_on_a_worker() -> Any:
        return client.submit(_fit_task, fit_options, key=f"extract-fit-{uuid.uuid4().hex}", pure=False,
                             resources=_task_resources(client)).result()

    extractor = Extractor.open(opts, decode=False, fit=fit_on_a_worker)
    writer = extractor.writer
    todo, damaged = extractor.to_extract(progress)
    summary = ExtractSummary(skipped=len(extractor.manifest.videos) - len(todo), damaged=damaged,
                             repaired=writer.repaired)
    del extractor  # the client needs only the writer from here on, not the model

    # Workers redo no integrity check: they extract exactly the chunks given.
    options = dataclasses.asdict(dataclasses.replace(opts, repair=False, deep=False))
    run_key = json.dumps({"run": uuid.uuid4().hex, "opts": options}, sort_keys=True, default=str)
    resources = _task_resources(client)
    chunks = [todo[i : i + chunk_videos] for i in range(0, len(todo), chunk_videos)]
    futures = {
        client.submit(_extract_chunk, run_key, options, chunk, key=f"{TASK_PREFIX}-{n}-{uuid.uuid4().hex}",
                      retries=2, resources=resources, pure=False): len(chunk)
        for n, chunk in enumerate(chunks)
    }
    with tqdm(total=len(todo), unit="video", desc="extract", disable=not progress, dynamic_ncols=True) as bar:
        for future in as_completed(futures):
            summary.merge(future.result())
            bar.update(futures[future])
            future.release()
            if not summary.stored and summary.failed >= FIRST_FAILURES_LIMIT:
                client.cancel(list(futures))
                raise first_failures_error(summary.failed, summary.failures[0][1],
                                           ", then rerun with --retry-failed (their failures are recorded)")
    return summary.finalized(writer, started)


def extract_distributed(opts: ExtractOptions, *, workers: int | None, scheduler: str | None,
                        chunk_videos: int = DEFAULT_CHUNK_VIDEOS, progress: bool = True) -> ExtractSummary:
    """`dist-cache extract --dask-workers N | --scheduler ADDRESS`."""
    from dist_cache.decode_pool import auto_workers
    from pipelines.extract.extractor import check_options

    check_options(opts)  # fail on a bad flag before starting or joining a cluster
    if workers is not None and opts.decode_workers == "auto":
        # N local workers share this machine's cores: split auto's decode processes among them.
        opts = dataclasses.replace(opts, decode_workers=max(1, auto_workers() // max(1, workers)))
    with connect(workers, scheduler) as client:
        return extract_on_cluster(opts, client, chunk_videos=chunk_videos, progress=progress)
