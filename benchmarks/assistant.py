"""Experiment: a student at ~10% of the teacher's non-embedding parameters, distilled (a) directly from the
teacher's cache, (b) through the λ-chosen MiniDisc assistant, (c) through two other assistants of the grid.

Same budget for every student; held-out KL to the TEACHER's cache and perplexity (the evaluate stage). Also the
wall time of the one-trial selection (prune + slimmable training + scoring + export) against the per-assistant
cost of trying assistants one by one (cache the assistant + train and evaluate a student through it).

    python -m benchmarks.assistant [--out runs/experiments/assistant]   (make experiment-assistant)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from kdcache.pipeline.config import Config, load_config
from kdcache.pipeline.errors import KdcacheError
from kdcache.stages import assistants, evaluate, precompute, prepare, pruning, train
from kdcache.stages.models import load_tokenizer

# tiny budgets: the machine is 2 shared CPU cores and the teacher has 30 layers
BASE = {
    "prepare.seq_len": 128, "prepare.max_train_sequences": 48, "prepare.max_validation_sequences": 16,
    "prepare.shard_sequences": 16,
    "precompute.signal": "topk", "precompute.k": 16, "precompute.scheduler": "sync", "precompute.batch_size": 8,
    "train.student": "layerdrop:3", "train.max_steps": 20, "train.batch_size": 2, "train.lr": 1e-3,
    "train.warmup_steps": 2, "train.checkpoint_every": 20,
    "evaluate.batch_size": 8,
    # a coarser grid than the default 0.1..0.9 (scoring cost), 0.85 instead of 0.9: the 90% slice would be just
    # below the student's own size (the floor min_size_over_student=1 excludes it)
    "assistants.grid": "0.1,0.3,0.5,0.7,0.85", "assistants.steps": 4, "assistants.calibration_sequences": 4,
    "assistants.batch_size": 2, "assistants.lr": 2e-4, "assistants.warmup_steps": 1,
    "assistants.eval_sequences": 8,
}
OTHER_PREFERENCE = (0.1, 0.5, 0.85, 0.3, 0.7)  # the two comparison assistants: the first two of these not chosen


def export_candidate(cfg: Config, target_sparsity: float, out: Path) -> Path:
    """Export another grid candidate of the trained slimmable assistant (e.g. to compare assistants)."""
    from transformers import AutoModelForCausalLM

    info = json.loads((cfg.assistants_dir / assistants.CANDIDATES).read_text())
    match = [c for c in info["candidates"] if abs(c["target_sparsity"] - target_sparsity) < 1e-9]
    if not match:
        raise KdcacheError(f"sparsity {target_sparsity:g} is not in the assistants grid {cfg.assistants.grid}")
    c = match[0]
    model = AutoModelForCausalLM.from_pretrained(cfg.assistants_dir / assistants.TRAINED, dtype=torch.float32)
    small = pruning.extract_width(model, pruning.Width(**info["layout"]),
                                  pruning.Width(c["kv_groups"], c["heads_per_group"], c["neurons"]))
    return pruning.save_model_dir(small, out, load_tokenizer(cfg.precompute.teacher))

def _config(run_dir: Path, **extra):
    return load_config(None, [f"run_dir={run_dir}", *(f"{k}={v}" for k, v in {**BASE, **extra}.items())])


def _variant_dir(base: Path, out: Path, name: str, source: str) -> Path:
    """A run folder for one student that shares the base run's tokens and signal stores (symlinks)."""
    run = out / name
    shutil.rmtree(run, ignore_errors=True)
    (run / "signals").mkdir(parents=True)
    os.symlink((base / "tokens").resolve(), run / "tokens")
    for src in {"teacher", source}:
        os.symlink((base / "signals" / src).resolve(), run / "signals" / src)
    return run


def _student(base: Path, out: Path, name: str, source: str) -> dict:
    run = _variant_dir(base, out, name, source)
    cfg = _config(run, **{"train.source": source})
    start = time.perf_counter()
    train.run(cfg, overwrite=True)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate.run(cfg)
    return {"source": source, "train_seconds": train_s, "evaluate_seconds": time.perf_counter() - start,
            **{k: metrics["students"]["trained"][k] for k in ("kl_teacher", "perplexity", "top1_agreement")},
            "untrained": {k: metrics["students"]["untrained"][k] for k in ("kl_teacher", "perplexity")}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/experiments/assistant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--from-partial", action="store_true",
                        help="write results.json/.md from the students an interrupted run finished (partial.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.from_partial:
        partial = json.loads((out / "partial.json").read_text())
        students = partial.get("students", {})
        finish(out, partial["plan"], partial["wall"], students, args.threads, complete=len(students) == 4)
        return
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base"
    cfg = _config(base)
    wall = {}

    start = time.perf_counter()
    prepare.run(cfg)
    precompute.run(cfg)
    wall["prepare_and_teacher_cache"] = time.perf_counter() - start

    start = time.perf_counter()
    plan = assistants.run(cfg, overwrite=True)
    wall["one_trial_selection"] = time.perf_counter() - start
    table = plan["table"]
    chosen = plan["chosen"]["target_sparsity"]
    grid = [r["target_sparsity"] for r in table]
    others = [s for s in OTHER_PREFERENCE if s in grid and s != chosen][:2]

    (out / "partial.json").write_text(json.dumps({"wall": wall, "plan": plan}, indent=1))
    results = {"direct": _student(base, out, "direct", "teacher")}
    (out / "partial.json").write_text(json.dumps({"wall": wall, "plan": plan, "students": results}, indent=1))
    for target in [chosen, *others]:
        name = f"ta-{round(100 * target)}"
        row = next(r for r in table if r["target_sparsity"] == target)
        model_dir = base / "assistants" / "exports" / name
        start = time.perf_counter()
        export_candidate(cfg, target, model_dir)
        precompute.run(cfg, source=name, model=str(model_dir), overwrite=True)
        cache_s = time.perf_counter() - start
        result = _student(base, out, name, name)
        result.update(cache_seconds=cache_s, assistant_sparsity=row["sparsity"], assistant_P=row["P"],
                      assistant_tradeoff=row["tradeoff"], chosen=target == chosen)
        results[name] = result
        print(json.dumps({name: result}), flush=True)
        (out / "partial.json").write_text(json.dumps({"wall": wall, "plan": plan, "students": results}, indent=1))

    finish(out, plan, wall, results, args.threads)


def finish(out: Path, plan: dict, wall: dict, results: dict, threads: int, complete: bool = True) -> dict:
    """results.json + results.md from whatever students finished."""
    table = plan["table"]
    tried = [r for r in results.values() if "cache_seconds" in r]
    per_assistant = [r["cache_seconds"] + r["train_seconds"] + r["evaluate_seconds"] for r in tried]
    summary = {
        "command": "make experiment-assistant  (python -m benchmarks.assistant)",
        "complete": complete,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (load average "
                   f"{os.getloadavg()[0]:.0f} at the end), torch {torch.__version__}, {threads} threads",
        "budget": dict(BASE),
        "teacher_non_embedding_params": plan["teacher_non_embedding_params"],
        "student_non_embedding_params": plan["size_floor"]["student_non_embedding_params"],
        "student_fraction_of_teacher": plan["size_floor"]["student_non_embedding_params"]
                                       / plan["teacher_non_embedding_params"],
        "ta_table": table, "chosen_target_sparsity": plan["chosen"]["target_sparsity"], "students": results,
        "chosen_is_best_of_tried": (min(tried, key=lambda r: r["kl_teacher"]).get("chosen", False)
                                    if len(tried) > 1 else None),
        "wall_seconds": {**wall, "one_trial_breakdown": plan["seconds"], "grid_size": len(table),
                         "per_assistant_downstream_median": statistics.median(per_assistant) if per_assistant else None,
                         "try_every_assistant_estimate": (len(table) * statistics.median(per_assistant)
                                                          if per_assistant else None)},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(render(summary))
    print(render(summary))
    return summary


def render(s: dict) -> str:
    rows = ["| student learns from | assistant sparsity | assistant P | P + λ·s | KL(teacher‖student) | "
            "perplexity | top-1 agreement |", "|---|---|---|---|---|---|---|"]
    for name, r in s["students"].items():
        label = "teacher's cache (direct)" if name == "direct" else \
            f"assistant {name}{' (**λ-chosen**)' if r.get('chosen') else ''}"
        ta = ("—", "—", "—") if name == "direct" else (f"{r['assistant_sparsity']:.1%}", f"{r['assistant_P']:.3f}",
                                                       f"{r['assistant_tradeoff']:.3f}")
        rows.append(f"| {label} | {ta[0]} | {ta[1]} | {ta[2]} | {r['kl_teacher']:.4f} | {r['perplexity']:.1f} | "
                    f"{r['top1_agreement']:.1%} |")
    if s["students"]:
        untrained = next(iter(s["students"].values()))["untrained"]
        rows.append(f"| (untrained student) | | | | {untrained['kl_teacher']:.4f} | {untrained['perplexity']:.1f} | |")
    rows = ["The one trial (slimmable assistant, every width scored on held-out data):", "",
            assistants.render_table(s["ta_table"]), "", "Students at "
            f"{s['student_fraction_of_teacher']:.0%} of the teacher's non-embedding parameters, same budget:", "",
            *rows]
    w = s["wall_seconds"]
    if w["per_assistant_downstream_median"] is None:
        return "\n".join(rows + ["", f"One-trial selection: {w['one_trial_selection']:.0f} s; no assistant "
                                      "student finished, so no per-assistant cost was measured."])
    return "\n".join(rows + [
        "", f"One-trial selection: {w['one_trial_selection']:.0f} s (prune {w['one_trial_breakdown']['prune']:.0f}, "
            f"slimmable training {w['one_trial_breakdown']['train']:.0f}, scoring "
            f"{w['one_trial_breakdown']['score']:.0f}, export {w['one_trial_breakdown']['export']:.0f}). "
            f"Per assistant tried (cache + student + evaluate): median {w['per_assistant_downstream_median']:.0f} s, "
            f"so trying all {w['grid_size']} grid assistants ≈ {w['try_every_assistant_estimate']:.0f} s "
            "(extrapolated; without training each assistant separately).",
    ])


if __name__ == "__main__":
    main()
