"""precompute: run the teacher once over the token store and write its sparse signal to a signal store.

The work is a dask graph of coarse, idempotent tasks, one per shard: a task reads its token shard, runs the
teacher (loaded once per worker process and cached), and commits its signal shard straight into the store.
Only a small summary goes back to the driver. Shards already committed are skipped, so a killed run resumes.
On a cluster a task whose worker dies is rescheduled on another worker by the scheduler, and a task that raises
is retried `precompute.retries` times; as tasks are idempotent (a shard is committed once, atomically, and a
rewrite of identical bytes is a no-op) either way the store ends complete and identical.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import dask
import torch
from tqdm.auto import tqdm

from pipeline.config import TEACHER_SOURCE, Config
from pipeline.errors import KdcacheError
from stages.models import load_teacher, load_tokenizer, model_fingerprint, resolve_model_path, tokenizer_fingerprint
from stages.runtime import pick_device
from stages.signals import concat_signals, extract_signal, shard_generator
from storage import Manifest, Store, encode_signal
from storage.manifest import read_manifest

_TEACHERS: dict = {}  # per worker process: teacher spec -> model, so each worker loads a source once


def _worker_teacher(spec: str, threads: int | None):
    if spec not in _TEACHERS:
        if threads:
            torch.set_num_threads(threads)
        _TEACHERS[spec] = load_teacher(spec, pick_device("auto"))
    return _TEACHERS[spec]


def precompute_shard(token_dir: str, signal_dir: str, name: str, teacher: str, batch_size: int,
                     threads: int | None = None) -> dict:
    """One task: the teacher's signal for one token shard, committed into the signal store. What is cached
    (kind, k, N, value encoding, seed) is read from the store's manifest params."""
    signals = Store(Path(signal_dir), read_manifest(Path(signal_dir)))
    tokens = Store(Path(token_dir), read_manifest(Path(token_dir)))
    n_tokens = next(r.count for r in tokens.manifest.layout if r.name == name) * tokens.manifest.params["seq_len"]
    if name in signals.committed():
        return {"name": name, "tokens": n_tokens, "skipped": True, "seconds": 0.0}
    start = time.perf_counter()
    model = _worker_teacher(teacher, threads)
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
            parts.append(extract_signal(kind, logits, params["k"], params["samples"], generator))
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
    model_path = resolve_model_path(model)
    tokenizer = load_tokenizer(model)
    model_tok = tokenizer_fingerprint(tokenizer)
    if model_tok != tokens.manifest.fingerprints["tokenizer"]:
        raise KdcacheError(f"{source} {model!r} tokenizer {model_tok} differs from the token store's "
                           f"{tokens.manifest.fingerprints['tokenizer']}: every source must share the tokenizer "
                           "the data was prepared with")
    vocab_size = AutoConfig.from_pretrained(model_path).vocab_size
    if pc.signal != "sample" and pc.k > vocab_size:
        raise KdcacheError(f"precompute.k={pc.k} exceeds the {source}'s vocabulary ({vocab_size})")
    if pc.signal == "hybrid" and pc.k >= vocab_size:
        raise KdcacheError(f"precompute.k={pc.k} leaves no tail to sample in the {source}'s vocabulary "
                           f"({vocab_size}): use signal topk or a smaller k")
    sampled = pc.signal != "topk"
    return Manifest(
        kind="signals", backend=pc.backend,
        fingerprints={"teacher": model_fingerprint(model), "tokenizer": model_tok,
                      "token_store": tokens.manifest.fingerprint()},
        params={"signal": pc.signal, "k": pc.k if pc.signal != "sample" else None,
                "samples": pc.samples if sampled else None, "seed": pc.seed if sampled else None,
                "value_encoding": pc.value_encoding, "temperature": 1.0,
                "vocab_size": vocab_size, "seq_len": tokens.manifest.params["seq_len"], "teacher": model,
                "source": source},
        layout=tokens.manifest.layout,
    )


def _client(scheduler: str, workers: int, threads: int | None):
    """A dask.distributed client: a LocalCluster by default, or the scheduler at an address."""
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
    return Client(scheduler, timeout="30s"), None


def _has_dashboard() -> bool:
    """dask serves its dashboard only with bokeh installed (not a kdcache dependency)."""
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


def run(cfg: Config, scheduler: str | None = None, overwrite: bool = False, source: str = TEACHER_SOURCE,
        model: str | None = None) -> Store:
    """Cache the signal of `model` (default: precompute.teacher) as source `source` in RUN/signals/<source>."""
    pc = cfg.precompute
    scheduler = scheduler or pc.scheduler
    model = model or pc.teacher
    out_dir = cfg.signal_dir(source)
    tokens = Store.open(cfg.tokens_dir)
    manifest = signal_manifest(cfg, tokens, source, model)
    signals = Store.create(out_dir, manifest, overwrite)
    done = signals.committed()
    todo = [r for r in manifest.layout if r.name not in done]
    seq_len = manifest.params["seq_len"]
    total = sum(r.count for r in manifest.layout) * seq_len
    threads = pc.threads_per_worker or max(1, (os.cpu_count() or 1) // pc.workers)
    tasks = [dask.delayed(precompute_shard, pure=True)(str(cfg.tokens_dir), str(out_dir), r.name,
                                                       model, pc.batch_size, threads)
             for r in todo]
    bar = tqdm(total=total, initial=total - sum(r.count for r in todo) * seq_len, unit="tok", unit_scale=True,
               desc=f"precompute {source} ({len(todo)} of {len(manifest.layout)} shards to do)", smoothing=0.1)
    try:
        if not todo:
            pass
        elif scheduler == "sync":
            for task in tasks:
                bar.update(task.compute(scheduler="sync")["tokens"])
        else:
            from dask.distributed import as_completed

            client, cluster = _client(scheduler, pc.workers, threads)
            try:
                where = f"attached to dask scheduler {scheduler}" if cluster is None else \
                    f"LocalCluster with {pc.workers} worker(s) x {threads} torch thread(s)"
                dashboard = client.dashboard_link if cluster is None or _has_dashboard() else \
                    "off: pip install bokeh for it"
                print(f"precompute: {where} (dashboard: {dashboard})", flush=True)
                for future in as_completed(client.compute(tasks, retries=pc.retries)):
                    bar.update(future.result()["tokens"])
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
    finally:
        bar.close()
        signals.refresh_manifest()
    if not signals.manifest.complete:
        raise KdcacheError(f"precompute finished with {len(manifest.layout) - len(signals.manifest.shards)} "
                           f"shards missing in {out_dir}: rerun to resume")
    mb = signals.nbytes() / 1e6
    what = {"topk": f"top-{pc.k}", "sample": f"sample N={pc.samples}",
            "hybrid": f"top-{pc.k} + N={pc.samples} tail draws"}[pc.signal]
    print(f"precompute: {total} positions, {what}, {mb:.1f} MB ({signals.nbytes() / total:.1f} B/token) "
          f"-> {out_dir}", flush=True)
    return signals
