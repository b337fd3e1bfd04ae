"""precompute: run the teacher (and every committee member) once over the token store and write each one's
sparse signal to its own signal store, RUN/signals/<source>, aligned 1:1 with the token store.

The work is one dask graph of coarse, idempotent tasks, one per (source, shard): a task reads its token shard,
runs the source's model (loaded once per worker process and cached), and commits its signal shard straight into
that source's store. Only a small summary goes back to the driver. Shards already committed are skipped, so a
killed run resumes and a member added later costs only its own shards.
On a cluster a task whose worker dies is rescheduled on another worker by the scheduler, and a task that raises
is retried `precompute.retries` times; as tasks are idempotent (a shard is committed once, atomically, and a
rewrite of identical bytes is a no-op) either way the store ends complete and identical.
Before any task is sent, every worker must import kdcache, and while the tasks run the cluster must keep a
worker: a cluster that cannot run the tasks fails the run in one line instead of leaving it waiting for ever.
"""
from __future__ import annotations

import concurrent.futures
import os
import time
from pathlib import Path

import dask
import torch

from kdcache.pipeline.config import RECORD_NAME, TEACHER_SOURCE, Config, check_source_name, record_config
from kdcache.pipeline.errors import KdcacheError
from kdcache.stages.models import (load_teacher, model_fingerprint, model_tokenizer_fingerprint,
                           resolve_model_path)
from kdcache.stages.progress import progress
from kdcache.stages.runtime import pick_device
from kdcache.stages.signals import concat_signals, extract_signal, shard_generator
from kdcache.storage import Manifest, Store, encode_signal
from kdcache.storage.codecs import sample_draws
from kdcache.storage.manifest import MANIFEST_NAME, read_manifest

_TEACHERS: dict = {}  # per worker process: teacher spec -> model, so each worker loads a source once
_STORES: dict = {}    # per worker process: store path -> (manifest file's stat, Store), see _worker_store


def _worker_store(path: str) -> Store:
    """The store at `path` as this worker last read it: its manifest is parsed once per worker, and again only when
    the file was replaced (a manifest is rewritten by rename, so a new one has a new inode). A task then pays one
    stat per store, not a parse of a manifest that grows with the shard count (quadratic over a run)."""
    manifest = Path(path) / MANIFEST_NAME
    st = os.stat(manifest)
    key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
    cached = _STORES.get(path)
    if cached is None or cached[0] != key:
        cached = _STORES[path] = (key, Store(Path(path), read_manifest(Path(path))))
    return cached[1]


def _worker_teacher(spec: str, threads: int | None, trust_remote_code: bool = False):
    if spec not in _TEACHERS:
        if threads:
            torch.set_num_threads(threads)
        _TEACHERS[spec] = load_teacher(spec, pick_device("auto"), trust_remote_code=trust_remote_code)
    return _TEACHERS[spec]


def precompute_shard(token_dir: str, signal_dir: str, name: str, teacher: str, batch_size: int,
                     threads: int | None = None, trust_remote_code: bool = False) -> dict:
    """One task: the teacher's signal for one token shard, committed into the signal store. What is cached
    (kind, k, N, value encoding, seed) is read from the store's manifest params."""
    signals, tokens = _worker_store(signal_dir), _worker_store(token_dir)
    n_tokens = tokens.manifest.layout.get(name).count * tokens.manifest.params["seq_len"]
    if signals.committed([name]):  # one commit record looked at
        return {"name": name, "tokens": n_tokens, "skipped": True, "seconds": 0.0}
    start = time.perf_counter()
    model = _worker_teacher(teacher, threads, trust_remote_code)
    device = next(model.parameters()).device
    params = signals.manifest.params
    kind = params["signal"]
    # one stream per shard, consumed batch after batch in order: the shard's draws do not depend on the worker
    generator = shard_generator(params["seed"], name) if kind != "topk" else None
    input_ids = torch.from_numpy(tokens.read_shard(name, ["input_ids"])["input_ids"].astype("int64"))  # (n, T)
    parts = []
    with torch.inference_mode():
        for i in range(0, len(input_ids), batch_size):
            logits = model(input_ids[i:i + batch_size].to(device)).logits     # (b, T, V)
            parts.append(extract_signal(kind, logits, params["k"], params["samples"], generator,
                                        sample_draws(params)))
            del logits
    arrays = concat_signals(kind, parts)                                      # (n, T, ...) padded to the shard's M
    record = signals.write_shard(name, encode_signal(kind, arrays, params["vocab_size"], params["value_encoding"]))
    return {"name": name, "tokens": n_tokens, "skipped": False, "seconds": time.perf_counter() - start,
            "checksum": record.checksum}


def signal_manifest(cfg: Config, tokens: Store, source: str, model: str) -> Manifest:
    """What the signal store of `source` (computed by `model`) will hold, from the token store and the model's
    config/tokenizer (no weights loaded)."""
    from transformers import AutoConfig

    pc = cfg.precompute
    what = "precompute.teacher" if model == pc.teacher else f"the model of source {source!r}"  # names it in errors
    model_path = resolve_model_path(model, what)
    model_tok = model_tokenizer_fingerprint(model, pc.trust_remote_code, what)
    if model_tok != tokens.manifest.fingerprints["tokenizer"]:
        raise KdcacheError(f"{source} {model!r} tokenizer {model_tok} differs from the token store's "
                           f"{tokens.manifest.fingerprints['tokenizer']}: every source must share the tokenizer "
                           "the data was prepared with (the student's; cross-tokenizer members are not supported "
                           "yet)")
    vocab_size = AutoConfig.from_pretrained(model_path, trust_remote_code=pc.trust_remote_code).vocab_size
    if pc.signal != "sample" and pc.k > vocab_size:
        raise KdcacheError(f"precompute.k={pc.k} exceeds the {source}'s vocabulary ({vocab_size})")
    if pc.signal == "hybrid" and pc.k >= vocab_size:
        raise KdcacheError(f"precompute.k={pc.k} leaves no tail to sample in the {source}'s vocabulary "
                           f"({vocab_size}): use signal topk or a smaller k")
    sampled = pc.signal != "topk"
    params = {"signal": pc.signal, "k": pc.k if pc.signal != "sample" else None,
              "samples": pc.samples if sampled else None, "seed": pc.seed if sampled else None,
              "value_encoding": pc.value_encoding, "temperature": 1.0,
              "vocab_size": vocab_size, "seq_len": tokens.manifest.params["seq_len"], "teacher": model,
              "source": source}
    if sampled:  # only there: a topk store's params (and so its fingerprint) stay what they were before `draws`
        params["draws"] = pc.draws
    return Manifest(
        kind="signals", backend=pc.backend,
        fingerprints={"teacher": model_fingerprint(model, what), "tokenizer": model_tok,
                      "token_store": tokens.manifest.fingerprint()},
        params=params, layout=tokens.manifest.layout,
    )


def _client(scheduler: str, workers: int, threads: int | None, timeout: float):
    """A dask.distributed client: a LocalCluster by default, or the scheduler at an address (reached within
    `timeout` seconds)."""
    from dask.distributed import Client, LocalCluster

    if scheduler == "local":
        # dask's default MALLOC_TRIM_THRESHOLD_ makes glibc mmap every activation-sized tensor afresh: the page
        # faults cost the teacher ~40% of its speed. Threads per worker are torch's, set in the task.
        environ = {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": threads or 1, "MKL_NUM_THREADS": threads or 1,
                   "OPENBLAS_NUM_THREADS": threads or 1}
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=":0", silence_logs=40)
        return Client(cluster), cluster
    try:
        return Client(scheduler, timeout=timeout), None
    except (OSError, ValueError) as e:  # nothing listening, a host that does not answer, a malformed address
        raise KdcacheError(f"cannot reach the dask scheduler {scheduler} ({_one_line(e)}): start it (dask "
                           "scheduler) or check the address") from None


def worker_imports_kdcache() -> bool:
    """Run on every dask worker before any task (client.run): the call is sent by reference to this module, so
    merely receiving it makes the worker import kdcache.stages.precompute, and with it torch, transformers and
    kdcache.storage, as a task would. A worker that cannot (kdcache not installed in its environment, or another
    `kdcache` first on its sys.path) answers with the ImportError."""
    return True


def _one_line(error: BaseException) -> str:
    """An exception from a worker as one short line (distributed wraps one it could not unpickle in Exception)."""
    text = str(error) if type(error) is Exception else f"{type(error).__name__}: {error}"
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def check_workers(client, where: str, timeout: float) -> None:
    """Fail at once, in one line, when the cluster cannot run precompute's tasks: no worker joins within `timeout`
    seconds, or a worker cannot import kdcache. Otherwise such a worker fails every task (or dies on it) and
    the run would wait for ever."""
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise KdcacheError(f"no dask worker joined {where} within {timeout:g} s (precompute.worker_timeout): "
                           "start workers (dask worker SCHEDULER_ADDRESS) in an environment with kdcache "
                           "installed") from None
    # client.run has no timeout of its own: a worker that hangs while importing must not hang the run
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        answers = pool.submit(client.run, worker_imports_kdcache, on_error="return").result(timeout)
    except TimeoutError:
        raise KdcacheError(f"the dask workers of {where} did not import kdcache within {timeout:g} s "
                           "(precompute.worker_timeout): check the workers' logs") from None
    finally:
        pool.shutdown(wait=False)
    failed = sorted((worker, answer) for worker, answer in answers.items() if isinstance(answer, BaseException))
    if failed:
        worker, error = failed[0]
        others = f" (and {len(failed) - 1} other worker(s))" if len(failed) > 1 else ""
        raise KdcacheError(f"dask worker {worker}{others} cannot import this kdcache ({_one_line(error)}): install "
                           "kdcache, the same version as here, in the environment the workers run in (and "
                           "nothing else named kdcache on their PYTHONPATH)")


WATCH_S = 2.0  # how often the driver looks at the cluster while it waits for tasks


def collect(client, futures: list, bar, where: str, timeout: float) -> None:
    """Wait for the tasks, counting each finished shard's tokens on `bar`. Fails in one line when the cluster
    has had no worker for `timeout` seconds (they died or were stopped: the tasks would wait for ever) and when
    a task killed every worker that ran it (dask's KilledWorker, after distributed.scheduler.allowed-failures)."""
    from dask.distributed import KilledWorker, wait

    pending, alone_since = futures, None
    while pending:
        try:
            done, pending = wait(pending, timeout=WATCH_S, return_when="FIRST_COMPLETED")
        except TimeoutError:
            done = ()
        for future in done:
            try:
                bar.update(future.result()["tokens"])
            except KilledWorker:
                raise KdcacheError(f"a precompute task killed every dask worker of {where} that ran it (out of "
                                   "memory? see the workers' logs): finished shards are kept; rerun to resume") \
                    from None
        if client.nthreads():
            alone_since = None
        elif alone_since is None:
            alone_since = time.monotonic()
        elif time.monotonic() - alone_since > timeout:
            raise KdcacheError(f"{where} has had no dask worker for {timeout:g} s (precompute.worker_timeout) with "
                               f"{len(pending)} shard(s) still to do: the workers died or were stopped; finished "
                               "shards are kept: start workers and rerun to resume")


def _has_dashboard() -> bool:
    """dask serves its dashboard only with bokeh installed (not a kdcache dependency)."""
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


def run(cfg: Config, scheduler: str | None = None, overwrite: bool = False, source: str | None = None,
        model: str | None = None) -> Store:
    """Cache the signal of every source of precompute (the teacher, then precompute.members), each in its own
    store RUN/signals/<source>, in one dask graph. With `source` (and `model`, default precompute.teacher): that
    one source only. Returns the first source's store (the teacher's, or `source`'s)."""
    if source is None:
        sources = cfg.precompute.sources()
    else:
        check_source_name(source, "precompute source")
        sources = [(source, model or cfg.precompute.teacher)]
    return run_sources(cfg, sources, scheduler, overwrite)[0]


def run_sources(cfg: Config, sources: list[tuple[str, str]], scheduler: str | None = None,
                overwrite: bool = False) -> list[Store]:
    """Cache [(source, model spec)] into RUN/signals/<source>, aligned to the same token store. One task per
    (source, shard) not yet committed; tasks of the sources are interleaved shard by shard so every worker
    stays busy, and each worker loads a model once (_TEACHERS). Every model must share the token store's
    tokenizer (checked before any task runs)."""
    pc = cfg.precompute
    scheduler = scheduler or pc.scheduler
    # the sync scheduler runs the tasks in this process: what an earlier run here cached must not outlive it (a
    # store recreated at the same path could even reuse the manifest's inode within one mtime tick)
    _STORES.clear()
    tokens = Store.open(cfg.tokens_dir)
    manifests = [signal_manifest(cfg, tokens, name, spec) for name, spec in sources]  # refuses a mismatch first
    # each store holds its writer lock until close()
    stores = [Store.create(cfg.signal_dir(name), manifest, overwrite) for (name, _), manifest in zip(sources, manifests)]
    # Store.create refreshed each manifest from the shards on disk: what it lists is what is done
    done = [{s.name for s in store.manifest.shards} for store in stores]
    todo = [[r for r in store.manifest.layout if r.name not in d] for store, d in zip(stores, done)]
    for (name, spec), store, records in zip(sources, stores, todo):  # a finished store keeps the config that made it
        if records or not (store.path / RECORD_NAME).exists():    # (its manifest's params.teacher names the model)
            record_config(cfg, store.path, f"kdcache precompute: the config this signal store was made with "
                                           f"(source {name}, model {spec})")
    seq_len = tokens.manifest.params["seq_len"]
    total = sum(r.count for r in tokens.manifest.layout) * seq_len * len(sources)
    threads = pc.threads_per_worker or max(1, (os.cpu_count() or 1) // pc.workers)
    tasks = []
    for i in range(max((len(t) for t in todo), default=0)):  # shard i of every source, then shard i + 1, ...
        for (name, spec), store, records in zip(sources, stores, todo):
            if i < len(records):
                tasks.append(dask.delayed(precompute_shard, pure=True)(
                    str(cfg.tokens_dir), str(store.path), records[i].name, spec, pc.batch_size, threads,
                    pc.trust_remote_code))
    n_todo = sum(len(t) for t in todo)
    n_shards = len(tokens.manifest.layout) * len(sources)
    what = sources[0][0] if len(sources) == 1 else f"{len(sources)} sources"
    bar = progress(total, f"precompute {what} ({n_todo} of {n_shards} shards to do)", unit="tok",
                   initial=total - sum(r.count for t in todo for r in t) * seq_len, unit_scale=True)
    try:
        if not tasks:
            pass
        elif scheduler == "sync":
            for task in tasks:
                bar.update(task.compute(scheduler="sync")["tokens"])
        else:
            client, cluster = _client(scheduler, pc.workers, threads, pc.worker_timeout)
            try:
                where = f"attached to dask scheduler {scheduler}" if cluster is None else \
                    f"LocalCluster with {pc.workers} worker(s) x {threads} torch thread(s)"
                dashboard = client.dashboard_link if cluster is None or _has_dashboard() else \
                    "off: pip install bokeh for it"
                print(f"precompute: {where} (dashboard: {dashboard})", flush=True)
                cluster_name = f"the dask scheduler {scheduler}" if cluster is None else "the LocalCluster"
                check_workers(client, cluster_name, pc.worker_timeout)
                collect(client, client.compute(tasks, retries=pc.retries), bar, cluster_name, pc.worker_timeout)
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
    finally:
        bar.close()
        for store in stores:
            try:
                store.refresh_manifest()
            finally:
                store.close()
    what = {"topk": f"top-{pc.k}", "sample": f"sample N={pc.samples}",
            "hybrid": f"top-{pc.k} + N={pc.samples} tail draws"}[pc.signal]
    for (name, _), store in zip(sources, stores):
        if not store.manifest.complete:
            raise KdcacheError(f"precompute finished with {len(store.manifest.layout) - len(store.manifest.shards)} "
                               f"shards missing in {store.path}: rerun to resume")
        positions = sum(r.count for r in store.manifest.layout) * seq_len
        made_by = "" if name == TEACHER_SOURCE else f" (model {store.manifest.params['teacher']})"
        print(f"precompute: {name}{made_by}: {positions} positions, {what}, {store.nbytes() / 1e6:.1f} MB "
              f"({store.nbytes() / positions:.1f} B/token) -> {store.path}", flush=True)
    return stores
