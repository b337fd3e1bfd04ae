"""Objectives experiment: SFT (CE only), KL, TAID, TAID with the linear t schedule, KL + RLKD — same cache,
student, seed, data order, steps and learning rate.

    make experiment-objectives          # = python -m benchmarks.objectives

One shared cache: the prepare and precompute stages on the default teacher and the default corpus, once, into
runs/experiments/objectives/cache. Then per objective the train stage (a layer-dropped copy of the teacher as the
student) in its own run folder that links to the cache, and the evaluate stage's metrics on the held-out split:
KL(teacher || student) on the cached signal (support + tail bucket), perplexity, top-1 and top-5 order agreement.
Time per step relative to KL is the median of the training logs' `seconds` (what a run costs; noisy on a shared
machine, and the objectives may have been trained at different times under different load). As a control, the
objectives' own cost (forward + backward of the loss on one fixed batch of student logits) is timed interleaved,
objective after objective in rounds, so load drift hits every objective alike.
The objectives can be trained in separate processes (`--only kl,taid`); each keeps its result in its run folder and
a plain run reuses them (same budget) and writes the summary.
Writes results.json and results.md into runs/experiments/objectives/.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks import student_logits
from kdcache.pipeline.config import Config, EvaluateConfig, PrecomputeConfig, PrepareConfig, TrainConfig
from kdcache.stages import precompute, prepare, train
from kdcache.stages.data import CachedKDDataset, to_device
from kdcache.stages.evaluate import evaluate_model
from kdcache.stages.losses import compute_objective
from kdcache.stages.models import build_student
from kdcache.storage.files import atomic_write_text

OUT = Path("runs/experiments/objectives")

# (label, train-config changes): the objectives compared; everything else is shared
OBJECTIVES = [
    ("SFT (CE only)", {"loss": "ce"}),
    ("KL", {"loss": "kl"}),
    ("TAID", {"loss": "taid"}),
    ("TAID, linear t (--no-adaptive)", {"loss": "taid", "taid_adaptive": False}),
    ("KL + RLKD", {"loss": "rlkd+kl"}),
]
BASELINE = "KL"


def base_config(run_dir: Path, args) -> Config:
    """The shared budget (tiny: 30 steps of 2x128 tokens; every objective gets the same one)."""
    return Config(
        run_dir=str(run_dir),
        prepare=PrepareConfig(seq_len=args.seq_len, max_train_sequences=args.train_sequences,
                              max_validation_sequences=args.validation_sequences),
        # TAID and RLKD need the teacher's exact peaks: a top-16 cache for every objective
        precompute=PrecomputeConfig(signal="topk", k=16, scheduler="sync", threads_per_worker=args.threads),
        train=TrainConfig(student=args.student, max_steps=args.steps, batch_size=args.batch_size,
                          warmup_steps=max(1, args.steps // 10), lr=args.lr, checkpoint_every=args.steps,
                          keep_checkpoints=1, device="cpu"),
        evaluate=EvaluateConfig(batch_size=8),
    )


def objective_config(label: str, changes: dict, args) -> Config:
    """A run folder per objective whose tokens/ and signals/ link to the shared cache."""
    run_dir = OUT / "runs" / slug(label)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokens", "signals"):
        link = run_dir / name
        if not link.is_symlink():
            link.symlink_to(Path("..", "..", "cache", name))
    cfg = base_config(run_dir, args)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def slug(label: str) -> str:
    return {"SFT (CE only)": "ce", "KL": "kl", "TAID": "taid", "TAID, linear t (--no-adaptive)": "taid-linear",
            "KL + RLKD": "rlkd-kl"}[label]


def read_log(cfg: Config) -> list[dict]:
    return [json.loads(line) for line in (cfg.student_dir / "metrics.jsonl").read_text().splitlines() if line]


def evaluate_student(path: Path, cfg: Config, desc: str) -> dict:
    from transformers import AutoModelForCausalLM

    tokens, signals = train.open_stores(cfg)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return evaluate_model(model, tokens, signals, cfg.evaluate.batch_size, None, torch.device("cpu"), desc)


def interleaved_loss_times(configs: dict[str, Config], rounds: int) -> dict[str, float]:
    """Median seconds of objective forward + backward on one fixed batch of student logits (N, V), per
    objective, measured in rounds (every objective once per round) so that load drift on a shared machine hits
    every objective alike. The student's forward and backward (the same for every objective) are left out."""
    any_cfg = next(iter(configs.values()))
    tokens, signals = train.open_stores(any_cfg)
    student = build_student(any_cfg.train.student, signals.manifest.params["teacher"], seed=any_cfg.train.seed)
    batch = next(iter(CachedKDDataset(tokens, signals, "train", any_cfg.train.batch_size, seed=0)))[1]
    batch = to_device(batch, torch.device("cpu"), pin=False)
    positions, labels, target = train.loss_inputs(batch)
    with torch.no_grad():
        logits = student_logits(student, batch["input_ids"], positions)            # (N, V)
    every = torch.ones_like(labels, dtype=torch.bool)
    times: dict[str, list[float]] = {label: [] for label in configs}
    for round_ in range(rounds + 1):  # round 0 warms up allocator and kernels, not counted
        for label, cfg in configs.items():
            spec = train.objective_spec(cfg.train)
            z = logits.clone().requires_grad_(True)
            start = time.perf_counter()
            out = compute_objective(z, target, labels, every, spec, taid_t=0.5 if spec.name == "taid" else None)
            (out["loss_sum"] / len(labels)).backward()
            if round_ > 0:
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(ts) for label, ts in times.items()}


def train_and_evaluate(label: str, cfg: Config, budget: dict) -> dict:
    """Train one objective and evaluate it; the result is kept in its run folder, so a rerun with the same
    budget reuses it (and a student already trained with the same train config is only evaluated)."""
    result_path = Path(cfg.run_dir) / "result.json"
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if result["budget"] == budget:
            print(f"== {label}: reusing {result_path}", flush=True)
            return result
    print(f"\n== {label}: kdcache train --loss {cfg.train.loss}"
          f"{'' if cfg.train.taid_adaptive else ' --no-adaptive'}", flush=True)
    checkpoint = train.latest_checkpoint(cfg.student_dir / "checkpoints")
    state = json.loads((checkpoint / "state.json").read_text()) if checkpoint else None
    finished = (state is not None and state["step"] == cfg.train.max_steps
                and state["config"]["train"] == dataclasses.asdict(cfg.train)
                and (cfg.student_dir / "final" / "config.json").exists())
    final = cfg.student_dir / "final" if finished else train.run(cfg, overwrite=True)
    log = read_log(cfg)
    result = {"budget": budget, "config": {"loss": cfg.train.loss, "taid_adaptive": cfg.train.taid_adaptive},
              "median_step_seconds": statistics.median(r["seconds"] for r in log),
              "train_seconds": sum(r["seconds"] for r in log),
              "final_train_loss": log[-1]["loss"],
              "eval": evaluate_student(final, cfg, f"evaluate ({label})")}
    if cfg.train.loss == "taid":
        result["taid_t"] = [r["taid_t"] for r in log]
        result["taid_t_linear"] = [train.taid_schedule(cfg.train).linear(r["step"] - 2) for r in log]  # t of step s: the floor set after step s - 1
    atomic_write_text(result_path, json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--student", default="layerdrop:6")
    parser.add_argument("--train-sequences", type=int, default=160)
    parser.add_argument("--validation-sequences", type=int, default=32)
    parser.add_argument("--timing-rounds", type=int, default=5, help="interleaved loss timing rounds (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None,
                        help="comma-separated slugs (ce,kl,taid,taid-linear,rlkd-kl): train and evaluate these "
                             "only, no summary (to split the work over processes; a full run then reuses them)")
    parser.add_argument("--summary-only", action="store_true",
                        help="train nothing: summarise the objectives whose results exist (the rest are listed "
                             "as not run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()

    cache = base_config(OUT / "cache", args)
    prepare.run(cache, overwrite=True)       # reopened as is when it was built from the same inputs
    precompute.run(cache, overwrite=True)
    budget = {"teacher": cache.precompute.teacher, "k": cache.precompute.k, "corpus": cache.prepare.dataset,
              "seq_len": args.seq_len, "train_sequences": args.train_sequences,
              "validation_sequences": args.validation_sequences, "student": args.student,
              "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
              "warmup_steps": cache.train.warmup_steps, "seed": cache.train.seed,
              "tokens_per_step": args.batch_size * args.seq_len}

    objectives = [(label, changes) for label, changes in OBJECTIVES
                  if args.only is None or slug(label) in args.only.split(",")]
    configs = {label: objective_config(label, changes, args) for label, changes in objectives}
    if args.summary_only:
        results = {label: json.loads((Path(cfg.run_dir) / "result.json").read_text())
                   for label, cfg in configs.items() if (Path(cfg.run_dir) / "result.json").exists()}
        results = {label: r for label, r in results.items() if r["budget"] == budget}
        configs = {label: configs[label] for label in results}
    else:
        results = {label: train_and_evaluate(label, cfg, budget) for label, cfg in configs.items()}
    if args.only is not None:
        return results

    first = next(iter(configs.values()))
    untrained_path = OUT / "cache" / "untrained.json"
    untrained = json.loads(untrained_path.read_text()) if untrained_path.exists() else {}
    if untrained.get("budget") != budget:
        untrained = {"budget": budget, "eval": evaluate_student(first.student_dir / "init", first,
                                                                "evaluate (untrained)")}
        atomic_write_text(untrained_path, json.dumps(untrained, indent=1))
    kl_log = results[BASELINE]["median_step_seconds"]
    for r in results.values():
        r["log_time_vs_kl"] = r["median_step_seconds"] / kl_log
    if args.timing_rounds > 0:
        print("\n== interleaved loss timing", flush=True)
        interleaved = interleaved_loss_times(configs, args.timing_rounds)
        for label, r in results.items():
            r["loss_seconds"] = interleaved[label]
            r["loss_time_vs_kl"] = interleaved[label] / interleaved[BASELINE]

    summary = {
        "command": "make experiment-objectives  (python -m benchmarks.objectives"
                   + (" " + " ".join(argv) if argv else "") + ")",
        "machine": {"cpu_cores": os.cpu_count(), "gpu": torch.cuda.is_available(), "torch": torch.__version__,
                    "threads": args.threads, "platform": platform.platform(),
                    "shared": "other jobs were using the same cores: step times are noisy"},
        "budget": budget,
        "untrained": untrained["eval"],
        "objectives": results,
        "not_run": [label for label, _ in OBJECTIVES if label not in results],
        "wall_seconds": time.perf_counter() - wall_start,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUT / "results.json", json.dumps(summary, indent=1))
    table = render_table(summary)
    atomic_write_text(OUT / "results.md", table + "\n")
    print("\n" + table, flush=True)
    print(f"\nwrote {OUT / 'results.json'} and {OUT / 'results.md'} ({summary['wall_seconds'] / 60:.1f} min)")
    return summary


def render_table(summary: dict) -> str:
    b = summary["budget"]
    rows = [f"Teacher `{b['teacher']}` (top-{b['k']} cache), corpus `{b['corpus']}`, student `{b['student']}`, "
            f"{b['steps']} steps of {b['batch_size']}x{b['seq_len']} tokens, lr {b['lr']:g}, seed {b['seed']}; "
            f"held-out: {summary['untrained']['positions']} positions.", "",
            "| objective | KL(teacher‖student) | perplexity | top-1 agreement | top-5 order agreement "
            "| time/step vs KL (logs) | loss fwd+bwd vs KL (interleaved) |",
            "|---|---|---|---|---|---|---|"]
    u = summary["untrained"]
    rows.append(f"| untrained student | {u['kl_teacher']:.4f} | {u['perplexity']:.2f} | {u['top1_agreement']:.2%} "
                f"| {u['top5_order_agreement']:.2%} | – | – |")
    for label, r in summary["objectives"].items():
        e = r["eval"]
        ratio = f"{r['log_time_vs_kl']:.3f}×"
        inter = (f"{r['loss_time_vs_kl']:.2f}× ({r['loss_seconds'] * 1e3:.0f} ms)" if "loss_time_vs_kl" in r
                 else "–")
        rows.append(f"| {label} | {e['kl_teacher']:.4f} | {e['perplexity']:.2f} | {e['top1_agreement']:.2%} "
                    f"| {e['top5_order_agreement']:.2%} | {ratio} | {inter} |")
    for label in summary["not_run"]:
        rows.append(f"| {label} | not finished | | | | | |")
    for label, r in summary["objectives"].items():
        if "taid_t" in r:
            gap = max(a - l for a, l in zip(r["taid_t"], r["taid_t_linear"]))
            rows.append(f"\n{label}: t from {r['taid_t'][0]:.4f} to {r['taid_t'][-1]:.4f} over the run "
                        f"(largest lead over the linear schedule {gap:.2e}).")
    m = summary["machine"]
    rows.append(f"\nMachine: {m['cpu_cores']} CPU cores, no GPU, torch {m['torch']} CPU, {m['threads']} threads; "
                f"{m['shared']}. Median step seconds: "
                + ", ".join(f"{label} {r['median_step_seconds']:.2f} s" for label, r in summary["objectives"].items())
                + f". This invocation took {summary['wall_seconds'] / 60:.1f} min.")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
