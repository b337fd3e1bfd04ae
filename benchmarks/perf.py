"""Performance benchmarks of the cache (`make bench`): five side-by-side ratios on the default teacher.

  1. precompute wall time / a bare teacher forward over the same batches, on shards of the demo's shape
     (32 sequences of 256 tokens): the whole run, and its per-shard tasks alone
  2. the reader through the public API, pinned to one core, on the shards precompute just wrote: kdcache.storage.read_shard
     (read + verify + decode) in tokens/s through a freshly opened store (every shard hashed) and through one open
     store (hashed once), kdcache.storage.read_sequence, the trainer's stream (CachedKDDataset: read + decode + batch), and
     read_shard / the trainer's consumption (tokens per offline-KD step time)
  3. offline-KD training step / plain CE step, same student, same batches
  4. offline-KD step vs online KD with the teacher in memory (dense teacher logits): speed-up and peak RSS saved
     (peak RSS from two child processes that run the same steps, one of them with the teacher loaded)
  5. precompute with 2 dask workers / 1 worker, one torch thread each, warm workers: scaling efficiency

Every figure alternates the two sides it compares (A B A B ...; precompute's long passes A B, B A, ...) and
reports the median of the per-repetition ratios, so load from other processes on a shared machine hits both sides
alike. Writes OUT/perf.json and OUT/perf.md and prints the table.

    python -m benchmarks.perf [--out runs/bench] [--reps 3] [--threads 1] [--only precompute,reader]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kdcache.pipeline.config import load_config
from kdcache.stages import precompute, prepare, train
from kdcache.stages.data import CachedKDDataset, Prefetcher
from kdcache.stages.losses import compute_objective
from kdcache.stages.models import build_student
from kdcache.stages.schedules import WarmupCosineLR
from kdcache.storage import open_store, read_sequence, read_shard
from kdcache.storage.codecs import sample_draws

TEACHER = "default"
STUDENT = "layerdrop:6"
SEQ_LEN = 128  # the training-step figures (3, 4, 6)
# precompute and the reader run on shards of the demo's shape (prepare's defaults: 32 sequences of 256 tokens), two
# of them: a pass long enough that the run's fixed setup weighs what it weighs in a real run, not 5% as on 2,560
DEMO_SHARDS = {"prepare.seq_len": 256, "prepare.shard_sequences": 32, "prepare.max_train_sequences": 32,
               "prepare.max_validation_sequences": 32}
PHASES = ("precompute", "reader", "steps", "rss", "scaling")


def _cfg(run_dir: Path, threads: int, **extra):
    base = {"run_dir": str(run_dir), "prepare.seq_len": SEQ_LEN, "prepare.max_train_sequences": 16,
            "prepare.max_validation_sequences": 4, "prepare.shard_sequences": 8,
            "precompute.teacher": TEACHER, "precompute.scheduler": "sync", "precompute.batch_size": 8,
            "precompute.threads_per_worker": threads, "train.student": STUDENT, "train.batch_size": 2,
            "train.max_steps": 1000, "train.warmup_steps": 0, "train.prefetch": 2}
    base.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def _median_ratio(pairs: list[tuple[float, float]]) -> float:
    return statistics.median(a / b for a, b in pairs)


# ---- 1. precompute vs a bare teacher forward ---------------------------------------------------------------

def bench_precompute(cfg, reps: int, threads: int) -> dict:
    teacher = precompute._worker_teacher(TEACHER, threads)  # the model object precompute's tasks reuse
    tokens = open_store(cfg.tokens_dir)
    batches = []
    for r in tokens.manifest.layout:
        ids = torch.from_numpy(tokens.read_shard(r.name, ["input_ids"])["input_ids"].astype("int64"))  # (n, T)
        batches += [ids[i:i + cfg.precompute.batch_size] for i in range(0, len(ids), cfg.precompute.batch_size)]
    n_tokens = sum(b.numel() for b in batches)

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                teacher(b).logits                                               # (b, T, V)
        return time.perf_counter() - start

    task_seconds = []
    real_task = precompute.precompute_shard

    def timed_task(*args, **kwargs):
        start = time.perf_counter()
        out = real_task(*args, **kwargs)
        task_seconds.append(time.perf_counter() - start)
        return out

    def full_run() -> tuple[float, float]:
        task_seconds.clear()
        shutil.rmtree(cfg.signals_dir, ignore_errors=True)  # else the rerun finds every shard done
        precompute.precompute_shard = timed_task
        try:
            start = time.perf_counter()
            precompute.run(cfg)
            return time.perf_counter() - start, sum(task_seconds)
        finally:
            precompute.precompute_shard = real_task

    bare()  # warm-up (first-call allocations)
    rows = []
    for rep in range(reps):  # A B, B A, A B ...: a load that rises or falls during the bench favours neither side
        if rep % 2 == 0:
            b = bare()
            wall, tasks = full_run()
        else:
            wall, tasks = full_run()
            b = bare()
        rows.append((b, wall, tasks))
    return {"tokens": n_tokens, "shards": len(tokens.manifest.layout), "shard_sequences": cfg.prepare.shard_sequences,
            "seq_len": tokens.manifest.params["seq_len"],
            "bare_forward_s": [r[0] for r in rows], "precompute_wall_s": [r[1] for r in rows],
            "precompute_tasks_s": [r[2] for r in rows],
            "setup_s": statistics.median(r[1] - r[2] for r in rows),
            "ratio_wall": _median_ratio([(r[1], r[0]) for r in rows]),
            "ratio_tasks": _median_ratio([(r[2], r[0]) for r in rows]),
            "teacher_tokens_per_s": n_tokens / statistics.median(r[0] for r in rows)}


# ---- 2. the reader ---------------------------------------------------------------------------------------------

def bench_reader(cfg, reps: int, min_seconds: float = 1.0) -> dict:
    """Tokens/s through the public reading API on one core, the sides alternated within each repetition."""
    records = open_store(cfg.signals_dir).manifest.shards
    seq_len = open_store(cfg.signals_dir).manifest.params["seq_len"]
    tokens = open_store(cfg.tokens_dir)

    def fresh_read_shard() -> int:  # a newly opened store: every shard is hashed before it is decoded
        store = open_store(cfg.signals_dir)
        for r in records:
            read_shard(store, r.name)
        return sum(r.count for r in records) * seq_len

    warm = open_store(cfg.signals_dir)

    def warm_read_shard() -> int:  # one open store: each shard was hashed once, its files are unchanged since
        for r in records:
            read_shard(warm, r.name)
        return sum(r.count for r in records) * seq_len

    def sequences() -> int:
        store = open_store(cfg.signals_dir)
        for r in records:
            for i in range(r.start, r.start + r.count):
                read_sequence(store, r.split, i)
        return sum(r.count for r in records) * seq_len

    stream = iter(CachedKDDataset(tokens, open_store(cfg.signals_dir), "train", cfg.train.batch_size, seed=0))
    sides = {"read_shard": fresh_read_shard, "read_shard_warm": warm_read_shard, "read_sequence": sequences,
             "dataset": lambda: next(stream)[1]["input_ids"].size}
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})  # one core, whatever threads the codecs would use
    try:
        for side in sides.values():  # warm-up
            side()
        rates = {name: [] for name in sides}
        for _ in range(reps):
            for name, side in sides.items():
                done, start = 0, time.perf_counter()
                while time.perf_counter() - start < min_seconds:
                    done += side()
                rates[name].append(done / (time.perf_counter() - start))
    finally:
        os.sched_setaffinity(0, cpus)
    out = {f"{name}_tokens_per_s": statistics.median(runs) for name, runs in rates.items()}
    params = warm.manifest.params
    return {**out, "runs": rates, "shards": len(records), "shard_tokens": records[0].count * seq_len,
            "batch": f"{cfg.train.batch_size}x{seq_len}", "kind": kind_label(params),
            "value_encoding": params["value_encoding"], "backend": warm.manifest.backend}


def kind_label(params: dict) -> str:
    """What a signal store caches, as the tables name it: top-16, sample N=40 systematic, hybrid 2+16."""
    if params["signal"] == "topk":
        return f"top-{params['k']}"
    label = f"sample N={params['samples']}" if params["signal"] == "sample" else \
        f"hybrid {params['k']}+{params['samples']}"
    return f"{label} {sample_draws(params)}"


# ---- 3 + 4. training steps: offline KD, plain CE, online KD --------------------------------------------------

def _student_and_optimizer(cfg, device):
    student = build_student(STUDENT, TEACHER, seed=0)
    student.config.use_cache = False
    student.to(device).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    return student, optimizer


def _offline_step(student, optimizer, stream, spec, cfg, device) -> float:
    """The trainer's own step (train._train_step); its logged seconds."""
    log = io.StringIO()
    bar = tqdm(disable=True)
    train._train_step(student, optimizer, stream, spec, cfg.train, device, WarmupCosineLR(1e-5, 0, 1000),
                      None, 0, log, bar)
    return json.loads(log.getvalue().splitlines()[-1])["seconds"]


def _online_step(student, optimizer, teacher, stream, spec, cfg, device) -> float:
    """The same step with the teacher in memory: its forward on the batch, then KD on its dense logits."""
    start = time.perf_counter()
    _, batch = next(stream)
    positions, labels, _ = train.loss_inputs(batch)
    with torch.no_grad():
        dense = teacher(batch["input_ids"]).logits.flatten(0, 1)[positions].float()  # (N, V)
    hidden = train.student_hidden(student, batch["input_ids"], positions)            # (N, H)
    out = compute_objective(hidden, dense, labels, torch.ones_like(labels, dtype=torch.bool), spec,
                            lm_head=train.output_head(student, device))
    (out["loss_sum"] / max(1, labels.numel())).backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.clip_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _full_logits_step(student, optimizer, stream, spec, cfg, device) -> float:
    """The offline-KD step as it was before the memory-lean loss: the (N, V) logits of the whole batch at once."""
    start = time.perf_counter()
    _, batch = next(stream)
    positions, labels, target = train.loss_inputs(batch)
    logits = train.output_head(student, device)(train.student_hidden(student, batch["input_ids"], positions))
    out = compute_objective(logits, target, labels, torch.ones_like(labels, dtype=torch.bool), spec)  # (N, V) in
    (out["loss_sum"] / max(1, labels.numel())).backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.clip_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bench_steps(cfg, reps: int, steps: int, threads: int) -> dict:
    device = torch.device("cpu")
    tokens, signals = train.open_stores(cfg)
    student, optimizer = _student_and_optimizer(cfg, device)
    teacher = precompute._worker_teacher(TEACHER, threads)
    kd, ce = train.objective_spec(cfg.train), train.objective_spec(
        load_config(None, ["train.loss=ce"]).train)
    streams = {name: Prefetcher(CachedKDDataset(tokens, signals, "train", cfg.train.batch_size, seed=0), device, 2)
               for name in ("kd", "ce", "online", "full")}
    runs = {"kd": lambda: _offline_step(student, optimizer, streams["kd"], kd, cfg, device),
            "ce": lambda: _offline_step(student, optimizer, streams["ce"], ce, cfg, device),
            "online": lambda: _online_step(student, optimizer, teacher, streams["online"], kd, cfg, device),
            "full": lambda: _full_logits_step(student, optimizer, streams["full"], kd, cfg, device)}
    for run in runs.values():  # warm-up
        run()
    times = {name: [] for name in runs}
    for _ in range(steps * reps):
        for name, run in runs.items():
            times[name].append(run())
    for s in streams.values():
        s.close()
    tokens_per_step = cfg.train.batch_size * SEQ_LEN
    kd_median = statistics.median(times["kd"])
    return {"batch": f"{cfg.train.batch_size}x{SEQ_LEN}", "step_s": times,
            "kd_over_ce": _median_ratio(list(zip(times["kd"], times["ce"]))),
            "online_over_offline": _median_ratio(list(zip(times["online"], times["kd"]))),
            "lean_over_full_logits": _median_ratio(list(zip(times["kd"], times["full"]))),
            "kd_step_s": kd_median, "trainer_tokens_per_s": tokens_per_step / kd_median}


def rss_probe(run_dir: str, mode: str, threads: int) -> None:
    """Child process: 3 offline-KD or online-KD steps of the benchmark student, then print peak RSS (MB). The
    student is loaded from a saved copy, so the offline child never holds teacher weights."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    cfg = _cfg(Path(run_dir), threads)
    device = torch.device("cpu")
    tokens, signals = train.open_stores(cfg)
    student = AutoModelForCausalLM.from_pretrained(Path(run_dir) / "student-init", dtype=torch.float32)
    student.config.use_cache = False
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    stream = Prefetcher(CachedKDDataset(tokens, signals, "train", cfg.train.batch_size, seed=0), device, 2)
    spec = train.objective_spec(cfg.train)
    teacher = precompute._worker_teacher(TEACHER, threads) if mode == "online" else None
    for _ in range(3):
        if teacher is None:
            _offline_step(student, optimizer, stream, spec, cfg, device)
        else:
            _online_step(student, optimizer, teacher, stream, spec, cfg, device)
    stream.close()
    # VmHWM, not getrusage's ru_maxrss: a child's ru_maxrss keeps the parent's RSS at fork
    hwm = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024}))


def bench_rss(cfg, threads: int) -> dict:
    student = build_student(STUDENT, TEACHER, seed=0)
    student.save_pretrained(Path(cfg.run_dir) / "student-init")
    del student
    out = {}
    for mode in ("offline", "online"):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.perf", "--probe", mode, "--probe-run",
                               str(cfg.run_dir), "--threads", str(threads)], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if proc.returncode != 0:
            raise RuntimeError(f"rss probe {mode} failed: {proc.stderr[-2000:]}")
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    out["saved_mb"] = out["online"] - out["offline"]
    return out


# ---- 5. dask scaling -----------------------------------------------------------------------------------------

def _warm_worker() -> None:
    precompute._worker_teacher(TEACHER, 1)


def bench_scaling(root: Path, reps: int) -> dict:
    cfg = _cfg(root / "scaling", 1, **{"prepare.max_train_sequences": 12, "prepare.max_validation_sequences": 4,
                                       "prepare.shard_sequences": 4, "precompute.batch_size": 4})
    prepare.run(cfg)
    n_tasks = len(open_store(cfg.tokens_dir).manifest.layout)
    clusters = {}
    try:
        for n in (1, 2):
            client, cluster = precompute._client("local", n, 1)
            client.run(_warm_worker)  # the teacher loaded once in each worker, before the clock starts
            clusters[n] = (client, cluster)
        times = {1: [], 2: []}
        for _ in range(reps):
            for n, (client, cluster) in clusters.items():
                shutil.rmtree(cfg.signals_dir, ignore_errors=True)
                start = time.perf_counter()
                store = precompute.run(cfg, scheduler=cluster.scheduler_address)
                times[n].append(time.perf_counter() - start)
                assert store.manifest.complete
    finally:
        for client, cluster in clusters.values():
            client.close()
            cluster.close()
    speedup = _median_ratio(list(zip(times[1], times[2])))
    return {"tasks": n_tasks, "seconds": times, "speedup": speedup, "efficiency": speedup / 2}


# ---- report --------------------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "gpu": torch.cuda.is_available(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "load_average": os.getloadavg()}


def table(r: dict) -> str:
    """The figures of the phases that ran (`--only` leaves the others out)."""
    p, rd, st, rss, sc = (r.get(name) for name in PHASES)
    ok = lambda cond: "yes" if cond else "**no**"  # noqa: E731
    rows = ["| # | figure | measured | target | met |", "|---|---|---|---|---|"]
    if p:
        rows.append(f"| 1 | precompute wall time ÷ bare teacher forward (same {p['tokens']:,} tokens: {p['shards']} "
                    f"shards of ≤ {p['shard_sequences']} × {p['seq_len']}) | {p['ratio_wall']:.3f} (tasks alone {p['ratio_tasks']:.3f}; "
                    f"fixed setup {p['setup_s']:.2f} s) | ≤ 1.10 | {ok(p['ratio_wall'] <= 1.10)} |")
    if rd:
        rate = rd["read_shard_tokens_per_s"]
        rows.append(f"| 2a | reader, `kdcache.storage.read_shard` (read + sha256 + decode) of {rd['shard_tokens']:,}-token "
                    f"{rd['kind']} shards, 1 core | {rate / 1e6:.2f} M tokens/s (through one open store, hashed "
                    f"once: {rd['read_shard_warm_tokens_per_s'] / 1e6:.2f} M) | ≥ 1 M | {ok(rate >= 1e6)} |")
        if st:
            rows.append(f"| 2b | reader ÷ trainer consumption ({st['trainer_tokens_per_s']:.0f} tokens/s) | "
                        f"{rate / st['trainer_tokens_per_s']:.0f}× | ≥ 20× | "
                        f"{ok(rate / st['trainer_tokens_per_s'] >= 20)} |")
        rows.append(f"| 2c | trainer's stream (`CachedKDDataset`: read + decode + batch {rd['batch']}), 1 core | "
                    f"{rd['dataset_tokens_per_s'] / 1e6:.2f} M tokens/s | | |")
        rows.append(f"| 2d | `kdcache.storage.read_sequence`, every sequence in turn, 1 core | "
                    f"{rd['read_sequence_tokens_per_s'] / 1e6:.2f} M tokens/s | | |")
    if st:
        rows += [f"| 3 | offline-KD step ÷ plain CE step (same student, batch {st['batch']}) | {st['kd_over_ce']:.3f} "
                 f"| ≤ 1.15 | {ok(st['kd_over_ce'] <= 1.15)} |",
                 f"| 4a | online KD step (teacher in memory) ÷ offline-KD step: speed-up | "
                 f"{st['online_over_offline']:.2f}× | | |"]
    if rss:
        rows.append(f"| 4b | peak RSS, online KD − offline KD | {rss['saved_mb']:.0f} MB saved "
                    f"({rss['online']:.0f} → {rss['offline']:.0f} MB) | | |")
    if sc:
        rows.append(f"| 5 | precompute, 2 dask workers ÷ 1 (1 thread each, {sc['tasks']} tasks): speed-up, "
                    f"efficiency | {sc['speedup']:.2f}×, {sc['efficiency']:.0%} | | |")
    if st:
        rows.append(f"| 6 | memory-lean loss step ÷ the same step with the whole (B·T, V) logits | "
                    f"{st['lean_over_full_logits']:.3f} | | |")
    m = r["machine"]
    teacher = f"fp32, {p['teacher_tokens_per_s']:.0f} tokens/s bare forward here" if p else "fp32"
    steps = f" (steps: {len(st['step_s']['kd'])} each)" if st else ""
    rows += ["", f"Machine: {m['cores']} CPU cores ({m['cpu']}), GPU: {'yes' if m['gpu'] else 'no'}, torch "
             f"{m['torch']}, Python {m['python']}; load average at start {r['load_start'][0]:.1f}, at end "
             f"{m['load_average'][0]:.1f}. Teacher SmolLM2-135M-Instruct ({teacher}), student {STUDENT}, "
             f"training steps at seq_len {SEQ_LEN}, {r['threads']} torch thread(s), medians of {r['reps']} "
             f"repetitions{steps}. Phases: {', '.join(n for n in PHASES if r.get(n))}."]
    return "\n".join(rows)


def _phases(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PHASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown phase(s) {', '.join(unknown) or '(none)'}: choose from "
                                         f"{', '.join(PHASES)}")
    return names


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="training steps per repetition and side")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", type=_phases, default=list(PHASES), metavar="PHASE[,PHASE]",
                    help=f"run only these phases ({', '.join(PHASES)}); default all")
    ap.add_argument("--probe", choices=("offline", "online"), help=argparse.SUPPRESS)
    ap.add_argument("--probe-run", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        return rss_probe(args.probe_run, args.probe, args.threads)
    from kdcache.pipeline.cli import _quiet_libraries

    _quiet_libraries()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"load_start": os.getloadavg(), "threads": args.threads, "reps": args.reps}
    cfg = _cfg(out / "perf", args.threads)                      # training steps (seq_len 128)
    demo = _cfg(out / "perf-demo", args.threads, **DEMO_SHARDS)  # precompute and the reader
    if {"precompute", "reader"} & set(args.only):
        prepare.run(demo)
    if {"steps", "rss"} & set(args.only):
        prepare.run(cfg)
        precompute.run(cfg)  # resumes: only what a previous bench did not leave
    phases = {"precompute": lambda: bench_precompute(demo, args.reps, args.threads),
              "reader": lambda: bench_reader(demo, args.reps),
              "steps": lambda: bench_steps(cfg, args.reps, args.steps, args.threads),
              "rss": lambda: bench_rss(cfg, args.threads),
              "scaling": lambda: bench_scaling(out, max(2, args.reps - 1))}
    for name in PHASES:
        if name not in args.only:
            continue
        if name == "reader" and "precompute" not in args.only:
            precompute.run(demo)  # the signal store the precompute phase would have left
        start = time.perf_counter()
        results[name] = phases[name]()
        print(f"bench: {name} done in {time.perf_counter() - start:.0f} s", flush=True)
    results["machine"] = machine()
    md = table(results)
    (out / "perf.json").write_text(json.dumps(results, indent=1))
    (out / "perf.md").write_text(md + "\n")
    print(md)
    print(f"bench: wrote {out / 'perf.json'} and {out / 'perf.md'}")


if __name__ == "__main__":
    main()
