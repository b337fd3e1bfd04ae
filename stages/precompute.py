"""precompute: run the teacher once over the token store and write its sparse signal to a signal store.

The work is a dask graph of coarse, idempotent tasks, one per shard: a task reads its token shard, runs the
teacher (loaded once per worker process and cached), and commits its signal shard straight into the store.
Only a small summary goes back to the driver. Shards already committed are skipped, so a killed run resumes.
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
from stages.signals import topk_signal, to_numpy_signal
from storage import Manifest, Store, encode_topk
from storage.manifest import read_manifest

_TEACHERS: dict = {}  # per worker process: teacher spec -> model, so each worker loads a source once


def _worker_teacher(spec: str, threads: int | None, trust_remote_code: bool = False):
    if spec not in _TEACHERS:
        if threads:
            torch.set_num_threads(threads)
        _TEACHERS[spec] = load_teacher(spec, pick_device("auto"), trust_remote_code=trust_remote_code)
    return _TEACHERS[spec]


def precompute_shard(token_dir: str, signal_dir: str, name: str, teacher: str, k: int, batch_size: int,
                     value_dtype: str, threads: int | None = None, trust_remote_code: bool = False) -> dict:
    """One task: the teacher's top-k signal for one token shard, committed into the signal store."""
    signals = Store(Path(signal_dir), read_manifest(Path(signal_dir)))
    tokens = Store(Path(token_dir), read_manifest(Path(token_dir)))
    n_tokens = next(r.count for r in tokens.manifest.layout if r.name == name) * tokens.manifest.params["seq_len"]
    if name in signals.committed():
        return {"name": name, "tokens": n_tokens, "skipped": True, "seconds": 0.0}
    start = time.perf_counter()
    model = _worker_teacher(teacher, threads, trust_remote_code)
    device = next(model.parameters()).device
    input_ids = torch.from_numpy(tokens.read_shard(name, ["input_ids"])["input_ids"].astype("int64"))  # (n, T)
    parts = []
    with torch.inference_mode():
        for i in range(0, len(input_ids), batch_size):
            logits = model(input_ids[i:i + batch_size].to(device)).logits     # (b, T, V)
            parts.append(topk_signal(logits, k))
            del logits
    ids, logprobs, lognorm = (torch.cat(p) for p in zip(*parts))              # (n, T, k), (n, T, k), (n, T)
    arrays = to_numpy_signal(ids, logprobs, lognorm)
    record = signals.write_shard(name, encode_topk(arrays["ids"], arrays["logprobs"], arrays["lognorm"],
                                                   signals.manifest.params["vocab_size"], value_dtype))
    return {"name": name, "tokens": n_tokens, "skipped": False, "seconds": time.perf_counter() - start,
            "checksum": record.checksum}


def signal_manifest(cfg: Config, tokens: Store, source: str, model: str) -> Manifest:
    """What the signal store of `source` (computed by `model`) will hold, from the token store and the model's
    config/tokenizer (no weights loaded)."""
    from transformers import AutoConfig

    pc = cfg.precompute
    model_path = resolve_model_path(model)
    tokenizer = load_tokenizer(model, pc.trust_remote_code)
    model_tok = tokenizer_fingerprint(tokenizer)
    if model_tok != tokens.manifest.fingerprints["tokenizer"]:
        raise KdcacheError(f"{source} {model!r} tokenizer {model_tok} differs from the token store's "
                           f"{tokens.manifest.fingerprints['tokenizer']}: every source must share the tokenizer "
                           "the data was prepared with")
    vocab_size = AutoConfig.from_pretrained(model_path, trust_remote_code=pc.trust_remote_code).vocab_size
    if pc.k > vocab_size:
        raise KdcacheError(f"precompute.k={pc.k} exceeds the {source}'s vocabulary ({vocab_size})")
    return Manifest(
        kind="signals", backend=pc.backend,
        fingerprints={"teacher": model_fingerprint(model), "tokenizer": model_tok,
                      "token_store": tokens.manifest.fingerprint()},
        params={"signal": "topk", "k": pc.k, "value_dtype": pc.value_dtype, "temperature": 1.0,
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
                                   dashboard_address=None, silence_logs=40)
        return Client(cluster), cluster
    return Client(scheduler, timeout="30s"), None


def run(cfg: Config, scheduler: str | None = None, overwrite: bool = False, source: str = TEACHER_SOURCE,
        model: str | None = None) -> Store:
    """Cache the signal of `model` (default: precompute.teacher) as source `source` in RUN/signals/<source>."""
    pc = cfg.precompute
    scheduler = scheduler or pc.scheduler
    model = model or pc.teacher
    out_dir = cfg.signal_dir(source)
    tokens = Store.open(cfg.tokens_dir)
    manifest = signal_manifest(cfg, tokens, source, model)
    signals = Store.create(out_dir, manifest, overwrite)  # holds the store's writer lock until close()
    done = signals.committed()
    todo = [r for r in manifest.layout if r.name not in done]
    seq_len = manifest.params["seq_len"]
    total = sum(r.count for r in manifest.layout) * seq_len
    threads = pc.threads_per_worker or max(1, (os.cpu_count() or 1) // pc.workers)
    tasks = [dask.delayed(precompute_shard, pure=True)(str(cfg.tokens_dir), str(out_dir), r.name,
                                                       model, pc.k, pc.batch_size, pc.value_dtype, threads,
                                                       pc.trust_remote_code)
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
                if cluster is None:
                    print(f"precompute: attached to dask scheduler {scheduler} "
                          f"(dashboard: {client.dashboard_link})", flush=True)
                for future in as_completed(client.compute(tasks)):
                    bar.update(future.result()["tokens"])
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
    finally:
        bar.close()
        try:
            signals.refresh_manifest()
        finally:
            signals.close()
    if not signals.manifest.complete:
        raise KdcacheError(f"precompute finished with {len(manifest.layout) - len(signals.manifest.shards)} "
                           f"shards missing in {out_dir}: rerun to resume")
    mb = signals.nbytes() / 1e6
    print(f"precompute: {total} positions, top-{pc.k}, {mb:.1f} MB ({signals.nbytes() / total:.1f} B/token) "
          f"-> {out_dir}", flush=True)
    return signals
