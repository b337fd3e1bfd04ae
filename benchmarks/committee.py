"""Teaching-committee experiment: the foundation teacher alone vs the foundation teacher + a complementary teacher
with uniform, confidence and learned weights — same student, seed, data order, steps and learning rate.

    make experiment-committee          # = python -m benchmarks.committee

Steps, all in one run folder runs/experiments/committee/run:
  1. prepare + precompute the default teacher on the default corpus (a small slice);
  2. the complementary teacher: a model of the student's size and architecture (layerdrop:N of the teacher)
     trained with `--loss ce` on the train split alone (train.output=comp -> RUN/comp/final), cached as source
     `comp` (precompute --source comp --model RUN/comp/final);
  3. the same student trained from: the teacher alone (KL); teacher + comp with uniform, confidence (entropy) and
     learned (teacher-understanding module) weights (KL per member);
  4. each student on the held-out split: KL(teacher || student) on the teacher's cache (support + tail bucket),
     perplexity on the ground truth, top-1 agreement with the teacher;
  5. the learned weights on the held-out split, split by the class of the true next token (whitespace /
     punctuation / digits / word = identifier-like / other) and by whether the teacher's top-1 is right, next to
     which member actually gives the true token more probability there (kdcache.stages.evaluate.committee_weights, which
     `kdcache evaluate` also writes for every committee run).
Writes results.json and results.md into runs/experiments/committee/. On a crowded machine the four students can
run as parallel processes (`--only NAME`, same budget); a final run without --only reuses their measurements.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from kdcache.pipeline.config import load_config
from kdcache.stages import precompute, prepare, train
from kdcache.stages.data import CachedKDDataset, to_device
from kdcache.stages.evaluate import committee_weights, evaluate_model
from kdcache.stages.losses import committee as cl

OUT = Path("runs/experiments/committee")
MEMBERS = ["teacher", "comp"]
# (label, train.output, overrides): the students compared; everything else is shared
STUDENTS = [
    ("teacher alone", "alone", {}),
    ("teacher + comp, uniform", "uniform", {"train.committee": "[teacher,comp]", "train.committee_weights": "uniform"}),
    ("teacher + comp, confidence", "confidence",
     {"train.committee": "[teacher,comp]", "train.committee_weights": "confidence"}),
    ("teacher + comp, learned", "learned", {"train.committee": "[teacher,comp]", "train.committee_weights": "learned"}),
]

def overrides(run_dir: Path, args, **extra) -> list[str]:
    base = {"run_dir": run_dir, "prepare.seq_len": args.seq_len, "prepare.max_train_sequences": args.train_sequences,
            "prepare.max_validation_sequences": args.validation_sequences, "prepare.shard_sequences": 16,
            # top-16, as when the README's results were measured (the member perplexities read the exact top-k)
            "precompute.signal": "topk", "precompute.k": 16,
            "precompute.scheduler": "sync", "precompute.threads_per_worker": args.threads,
            "train.student": args.student, "train.max_steps": args.steps, "train.batch_size": args.batch_size,
            "train.warmup_steps": max(1, args.steps // 10), "train.lr": args.lr, "train.checkpoint_every": args.steps,
            "train.keep_checkpoints": 1, "train.device": "cpu", "train.loss": "kl", "evaluate.batch_size": 8}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@torch.no_grad()
def member_perplexities(cfg) -> dict:
    """Perplexity of each member on the held-out ground truth, from its cached signal (true token's log-prob
    on the support, the uniform-tail value off it: an approximation for tokens off the top-k)."""
    tokens, stores = train.open_committee(cfg, MEMBERS)
    vocab = stores["teacher"].manifest.params["vocab_size"]
    nll, n = torch.zeros(len(MEMBERS), dtype=torch.float64), 0
    for _, batch in CachedKDDataset(tokens, stores, "validation", 8, shuffle=False, epochs=1):
        batch = to_device(batch, torch.device("cpu"), pin=False)
        _, labels, targets = train.loss_inputs(batch, MEMBERS)
        nll -= cl.label_logprobs(targets, labels, vocab).double().sum(0)
        n += labels.numel()
    return {m: math.exp(float(nll[i]) / n) for i, m in enumerate(MEMBERS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--train-sequences", type=int, default=64)
    parser.add_argument("--validation-sequences", type=int, default=24)
    parser.add_argument("--student", default="layerdrop:4")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--comp-steps", type=int, default=30)
    parser.add_argument("--comp-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--only", choices=[o for _, o, _ in STUDENTS], default=None,
                        help="train + evaluate this one student (to run students as parallel processes); a run "
                             "without --only reuses every student already measured and writes the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out
    run_dir = out / "run"
    started = time.perf_counter()
    timings = {}

    cfg = load_config(None, overrides(run_dir, args))
    t0 = time.perf_counter()
    prepare.run(cfg)
    precompute.run(cfg)
    timings["prepare + precompute teacher"] = time.perf_counter() - t0

    # the complementary teacher: the student's size and architecture, trained on the task data alone
    comp_cfg = load_config(None, overrides(run_dir, args, **{"train.loss": "ce", "train.output": "comp",
                                                             "train.max_steps": args.comp_steps,
                                                             "train.lr": args.comp_lr}))
    t0 = time.perf_counter()
    comp_path = comp_cfg.student_dir / "final"
    if not (comp_path / "config.json").exists():  # parallel --only runs must not rewrite it
        comp_path = train.run(comp_cfg)
    precompute.run(cfg, source="comp", model=str(comp_path))
    timings["complementary teacher (train + cache)"] = time.perf_counter() - t0
    if args.only:
        measure_student(run_dir, args, *next(s for s in STUDENTS if s[1] == args.only))
        return
    results = {"member_perplexity": member_perplexities(load_config(None, overrides(run_dir, args))),
               "comp_student": evaluate_model(_load(comp_path), *train.open_stores(cfg), 8, None,
                                              torch.device("cpu"), "evaluate (comp)")}
    rows = [measure_student(run_dir, args, *student) for student in STUDENTS]
    for row in rows:
        timings[f"train {row['output']}"] = row["train_seconds"]
    results["students"] = rows
    learned_cfg = load_config(None, overrides(run_dir, args, **{"train.output": "learned", **STUDENTS[-1][2]}))
    results["learned_weight_split"] = committee_weights(learned_cfg, torch.device("cpu"), None)["groups"]
    results["budget"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results["timings_seconds"] = timings
    results["total_seconds"] = time.perf_counter() - started
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}"
    results["command"] = "make experiment-committee"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(render(results))
    print(render(results))


def measure_student(run_dir: Path, args, label: str, output: str, extra: dict) -> dict:
    """Train one student and evaluate it on the teacher's held-out cache; kept in RUN/<output>/measured.json
    so a later run reuses it."""
    scfg = load_config(None, overrides(run_dir, args, **{"train.output": output, **extra}))
    saved = scfg.student_dir / "measured.json"
    if saved.exists():
        row = json.loads(saved.read_text())
        if row.get("budget") == {k: v for k, v in vars(args).items() if k not in ("only", "out")}:
            return row
    t0 = time.perf_counter()
    final = train.run(scfg)
    seconds = time.perf_counter() - t0
    metrics = evaluate_model(_load(final), *train.open_stores(scfg), 8, None, torch.device("cpu"),
                             f"evaluate ({output})")
    log = [json.loads(l) for l in (scfg.student_dir / "metrics.jsonl").read_text().splitlines()]
    row = {"label": label, "output": output, "train_seconds": seconds,
           "median_step_seconds": sorted(r["seconds"] for r in log)[len(log) // 2], **metrics}
    if scfg.train.committee:
        row["train_mean_alpha"] = {m: sum(r[f"alpha_{m}"] for r in log) / len(log) for m in MEMBERS}
        row["train_final_alpha"] = {m: log[-1][f"alpha_{m}"] for m in MEMBERS}
        row["train_final_committee_nll"] = log[-1]["committee_nll"]
    row["budget"] = {k: v for k, v in vars(args).items() if k not in ("only", "out")}
    saved.write_text(json.dumps(row, indent=1))
    return row


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def render(r: dict) -> str:
    b = r["budget"]
    lines = [f"Student `{b['student']}`, {b['steps']} steps of {b['batch_size']}x{b['seq_len']} tokens, lr {b['lr']}, "
             f"KL per member; {b['train_sequences']} train / {b['validation_sequences']} held-out sequences. "
             f"Complementary teacher: `{b['student']}` trained {b['comp_steps']} steps with `--loss ce` "
             f"(lr {b['comp_lr']}). Held-out perplexity from the cached signals: teacher "
             f"{r['member_perplexity']['teacher']:.2f}, comp {r['member_perplexity']['comp']:.2f}.", "",
             "| student | KL(teacher‖student) | perplexity | top-1 agreement | mean α teacher / comp (train) |",
             "|---|---|---|---|---|"]
    for row in r["students"]:
        alpha = row.get("train_mean_alpha")
        a = f"{alpha['teacher']:.3f} / {alpha['comp']:.3f}" if alpha else "—"
        lines.append(f"| {row['label']} | {row['kl_teacher']:.4f} | {row['perplexity']:.2f} | "
                     f"{row['top1_agreement']:.2%} | {a} |")
    c = r["comp_student"]
    lines.append(f"| (the complementary teacher itself) | {c['kl_teacher']:.4f} | {c['perplexity']:.2f} | "
                 f"{c['top1_agreement']:.2%} | — |")
    lines += ["", "Learned weights on the held-out positions, by the true next token:", "",
              "| positions | n | mean α teacher | mean α comp | share where comp gives the true token more probability |",
              "|---|---|---|---|---|"]
    for name, g in r["learned_weight_split"].items():
        lines.append(f"| {name} | {g['positions']} | {g['alpha']['teacher']:.3f} | {g['alpha']['comp']:.3f} | "
                     f"{g['best_share']['comp']:.1%} |")
    train_min = sum(row["train_seconds"] for row in r["students"]) / 60
    lines += ["", f"Students' training {train_min:.1f} min in total (median step "
              f"{sorted(row['median_step_seconds'] for row in r['students'])[len(r['students']) // 2]:.0f} s), "
              f"this invocation {r['total_seconds'] / 60:.1f} min (measured students are reused), on {r['machine']}; "
              f"command `{r['command']}`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
