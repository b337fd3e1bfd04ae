"""evaluate: the trained student against the untrained one, on the held-out split, against the cached teacher.

Metrics per student, over the validation loss positions:
  perplexity      exp(mean cross-entropy on the true next token)
  kl_teacher      KL(teacher || student) on the cached top-k support plus one tail bucket (a lower bound of the
                  full-vocabulary KL; the bound is tight when the top-k covers most of the teacher's mass)
  top1_agreement  fraction of positions where the student's argmax equals the teacher's top-1
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.errors import KdcacheError
from stages.data import CachedKDDataset, to_device
from stages.losses import ObjectiveSpec, compute_objective
from stages.progress import progress
from stages.runtime import pick_device
from stages.train import loss_inputs, open_stores, output_head, student_hidden

KL_SPEC = ObjectiveSpec(name="kl", tail="bucket")


def validation_sequences(tokens, signals, max_sequences: int | None) -> int:
    """How many validation sequences `validation_batches` yields: all, or the first max_sequences."""
    n = sum(r.count for r in tokens.manifest.splits().get("validation", []))
    return n if max_sequences is None else min(max_sequences, n)


def validation_batches(tokens, signals, batch_size: int, max_sequences: int | None, device):
    """The first validation sequences in store order, batched on `device`, with their loss inputs:
    yields (batch, positions (N,), labels (N,), target SparseTarget (N, K)). Shared by evaluate and assistants."""
    dataset = CachedKDDataset(tokens, signals, "validation", batch_size, shuffle=False, epochs=1)
    total, seen = validation_sequences(tokens, signals, max_sequences), 0
    for _, batch in dataset:
        if seen >= total:
            break
        batch = to_device({k: v[:total - seen] for k, v in batch.items()}, device, pin=False)
        seen += len(batch["input_ids"])
        yield (batch, *loss_inputs(batch))


@torch.no_grad()
def evaluate_model(model, tokens, signals, batch_size: int, max_sequences: int | None, device, desc: str) -> dict:
    model.to(device).eval()
    totals = {"ce": 0.0, "kl": 0.0, "top1": 0.0, "top5_order": 0.0, "tail_mass": 0.0, "n": 0}
    seen = 0
    seq_len = tokens.manifest.params["seq_len"]
    bar = progress(validation_sequences(tokens, signals, max_sequences) * seq_len, desc, unit="tok", unit_scale=True)
    for batch, positions, labels, target in validation_batches(tokens, signals, batch_size, max_sequences, device):
        seen += len(batch["input_ids"])
        hidden = student_hidden(model, batch["input_ids"], positions)                 # (N, H)
        every = torch.ones_like(labels, dtype=torch.bool)
        kl = compute_objective(hidden, target, labels, every, KL_SPEC, lm_head=output_head(model, device))
        totals["kl"] += float(kl["loss_sum"])
        totals["ce"] += float(kl["ce_sum"])  # the true-token cross-entropy of the same logits
        totals["top1"] += float(kl["top1_agree"])
        totals["top5_order"] += float(kl["top5_order_agree"])
        totals["tail_mass"] += float((1 - target.logprobs.exp().sum(-1)).clamp(min=0).sum())
        totals["n"] += int(labels.numel())
        bar.update(batch["input_ids"].numel())
    bar.close()
    n = max(1, totals["n"])
    return {"perplexity": math.exp(totals["ce"] / n), "cross_entropy": totals["ce"] / n,
            "kl_teacher": totals["kl"] / n, "top1_agreement": totals["top1"] / n,
            "top5_order_agreement": totals["top5_order"] / n, "teacher_tail_mass": totals["tail_mass"] / n,
            "positions": totals["n"], "sequences": seen}


def run(cfg: Config) -> dict:
    from transformers import AutoModelForCausalLM

    ec = cfg.evaluate
    device = pick_device(cfg.train.device)
    tokens, signals = open_stores(cfg)
    results = {}
    for name in ("untrained", "trained"):
        path = cfg.student_dir / ("init" if name == "untrained" else "final")
        if not (path / "config.json").exists():
            raise KdcacheError(f"no {name} student at {path}: run `kdcache train` first")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     trust_remote_code=cfg.train.trust_remote_code)
        results[name] = evaluate_model(model, tokens, signals, ec.batch_size, ec.max_sequences, device,
                                       desc=f"evaluate ({name})")
        del model
    metrics = {"split": "validation", "students": results,
               "cache": {"path": str(cfg.signals_dir), "signal": signals.manifest.params.get("signal", "topk"),
                         "k": signals.manifest.params["k"], "samples": signals.manifest.params.get("samples"),
                         "bytes_per_token": signals.nbytes() / _positions(signals)},
               "config": {"student": cfg.train.student, "loss": cfg.train.loss, "tail": cfg.train.tail,
                          "max_steps": cfg.train.max_steps, "teacher": signals.manifest.params["teacher"]}}
    cfg.eval_dir.mkdir(parents=True, exist_ok=True)
    (cfg.eval_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (cfg.eval_dir / "report.md").write_text(render_report(metrics))
    print(render_table(results), flush=True)
    print(f"evaluate: wrote {cfg.eval_dir / 'metrics.json'} and {cfg.eval_dir / 'report.md'}", flush=True)
    return metrics


def _positions(store) -> int:
    return sum(r.count for r in store.manifest.shards) * store.manifest.params["seq_len"]


def render_table(results: dict) -> str:
    rows = ["| student | KL(teacher‖student) | top-1 agreement | top-5 order agreement | perplexity |",
            "|---|---|---|---|---|"]
    for name, m in results.items():
        rows.append(f"| {name} | {m['kl_teacher']:.4f} | {m['top1_agreement']:.2%} | "
                    f"{m['top5_order_agreement']:.2%} | {m['perplexity']:.2f} |")
    return "\n".join(rows)


def render_report(metrics: dict) -> str:
    c = metrics["config"]
    s = metrics["students"]
    verdict = ("closer to the teacher than the untrained student"
               if s["trained"]["kl_teacher"] < s["untrained"]["kl_teacher"]
               and s["trained"]["top1_agreement"] > s["untrained"]["top1_agreement"]
               else "NOT closer to the teacher than the untrained student on both KL and top-1")
    return "\n".join([
        "# kdcache evaluation", "",
        f"Teacher `{c['teacher']}`, student `{c['student']}`, loss `{c['loss']}` (tail `{c['tail']}`), "
        f"{c['max_steps']} steps. Held-out split: {metrics['split']} "
        f"({s['trained']['positions']} loss positions).", "",
        render_table(s), "",
        f"The trained student is {verdict}.", "",
        _kl_note(metrics["cache"], s["trained"]["teacher_tail_mass"]), "",
    ])


def _kl_note(cache: dict, tail_mass: float) -> str:
    if cache.get("signal", "topk") == "topk":
        return (f"KL is measured against the cached top-{cache['k']} signal with one tail bucket (a lower bound of "
                f"the full-vocabulary KL); the teacher's mass outside the top-{cache['k']} is {tail_mass:.1%} on average.")
    # sum p_hat log(p_hat / q): its cross-entropy part is unbiased, its entropy part is not (H(p_hat) < H(p))
    drawn = f"{cache['samples']} draws" if cache["signal"] == "sample" else f"the top-{cache['k']} + {cache['samples']} tail draws"
    return (f"KL is measured against the cached sampled estimate of the teacher ({drawn} per position): a noisy "
            "estimate whose entropy term is biased; compare students on the same cache only.")
