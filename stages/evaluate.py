"""evaluate: the trained student against the untrained one, on the held-out split, against the cached teacher.

Metrics per student, over the validation loss positions:
  perplexity      exp(mean cross-entropy on the true next token)
  kl_teacher      KL(teacher || student) on the cached top-k support plus one tail bucket (a lower bound of the
                  full-vocabulary KL; the bound is tight when the top-k covers most of the teacher's mass)
  top1_agreement  fraction of positions where the student's argmax equals the teacher's top-1; where the teacher's
                  top value is shared by m ids (equal counts of a sampled cache, equal stored values) a student
                  whose argmax is one of them gets 1/m, the agreement a random tie-break would give
                  (kdcache.stages.losses.agreement_counts), never the credit of whichever id is stored first
  teacher_top1_tie_share  fraction of positions whose teacher top-1 is such a tie: where it is high (a flat
                  teacher cached by N draws) top-1 agreement says little
  top5_order_agreement  fraction where the student's top-5 ids equal the teacher's, in order (ties as for top-1);
                  None on a cache without the exact top-5 (sample, hybrid with k < 5): counts tie and miss ids, so
                  their order is noise
-> RUN/eval/metrics.json and report.md. A committee run (train.committee) also gets RUN/eval/committee_weights.json:
how the trained student weighs its members, by the class of the true next token (committee_weights).
How the student was trained (loss, source, committee, ...) is read from its recorded RUN/<train.output>/config.yaml
(trained_config), and metrics.json names the student it measured (step and sha256 of final/, from the student's
training.json), so an evaluation of an earlier student is told apart (kdcache report marks it stale).
"""
from __future__ import annotations

import dataclasses
import json
import math

import torch
from safetensors.torch import load_model

from kdcache.pipeline.config import Config, TrainConfig, record_config, recorded_config
from kdcache.pipeline.errors import KdcacheError
from kdcache.stages.committee import TOKEN_CLASSES, token_classes
from kdcache.stages.data import CachedKDDataset, to_device
from kdcache.stages.losses import ObjectiveSpec, compute_objective
from kdcache.stages.losses import committee as committee_loss
from kdcache.stages.losses.targets import SparseTarget
from kdcache.stages.models import load_tokenizer
from kdcache.stages.progress import progress
from kdcache.stages.runtime import pick_device
from kdcache.stages.train import (RESUMABLE, Committee, latest_checkpoint, loss_inputs, open_committee, open_stores,
                                  output_head, student_hidden, student_record)

KL_SPEC = ObjectiveSpec(name="kl", tail="bucket")
COMMITTEE_WEIGHTS = "committee_weights.json"


def validation_sequences(tokens, signals, max_sequences: int | None) -> int:
    """How many validation sequences `validation_batches` yields: all, or the first max_sequences."""
    n = sum(r.count for r in tokens.manifest.splits().get("validation", []))
    return n if max_sequences is None else min(max_sequences, n)


def validation_batches(tokens, signals, batch_size: int, max_sequences: int | None, device,
                       sources: list[str] | None = None):
    """The first validation sequences in store order, batched on `device`, with their loss inputs:
    yields (batch, positions (N,), labels (N,), target SparseTarget (N, K)). Shared by evaluate and assistants.
    With `sources` (signals a {source: store} dict of a committee) the target is the list of the members' targets."""
    dataset = CachedKDDataset(tokens, signals, "validation", batch_size, shuffle=False, epochs=1)
    total, seen = validation_sequences(tokens, signals, max_sequences), 0
    for _, batch in dataset:
        if seen >= total:
            break
        batch = to_device({k: v[:total - seen] for k, v in batch.items()}, device, pin=False)
        seen += len(batch["input_ids"])
        yield (batch, *loss_inputs(batch, sources))


def holds_exact_top5(params: dict) -> bool:
    """Whether a signal store holds the teacher's exact top-5 in order (topk; hybrid's exact part when k >= 5)."""
    signal = params.get("signal", "topk")
    return signal == "topk" or (signal == "hybrid" and params["k"] >= 5)


def percent(value: float | None) -> str:
    """A share as a table cell; None (not measurable on this cache, e.g. top-5 order on a sampled one) -> n/a."""
    return "n/a" if value is None else f"{value:.2%}"


@torch.no_grad()
def evaluate_model(model, tokens, signals, batch_size: int, max_sequences: int | None, device, desc: str) -> dict:
    model.to(device).eval()
    totals = {"ce": 0.0, "kl": 0.0, "top1": 0.0, "top5_order": 0.0, "top1_tied": 0.0, "tail_mass": 0.0, "n": 0}
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
        totals["top1_tied"] += float(kl["top1_tied"])
        totals["tail_mass"] += float((1 - target.logprobs.exp().sum(-1)).clamp(min=0).sum())
        totals["n"] += int(labels.numel())
        bar.update(batch["input_ids"].numel())
    bar.close()
    n = max(1, totals["n"])
    top5 = totals["top5_order"] / n if holds_exact_top5(signals.manifest.params) else None
    return {"perplexity": math.exp(totals["ce"] / n), "cross_entropy": totals["ce"] / n,
            "kl_teacher": totals["kl"] / n, "top1_agreement": totals["top1"] / n,
            "top5_order_agreement": top5, "teacher_top1_tie_share": totals["top1_tied"] / n,
            "teacher_tail_mass": totals["tail_mass"] / n,
            "positions": totals["n"], "sequences": seen}


@torch.no_grad()
def committee_weights(cfg: Config, device, max_sequences: int | None) -> dict | None:
    """How the trained student of a committee run weighs its members on the held-out loss positions: the mean
    alpha per member over all positions, by the class of the true next token (kdcache.stages.committee.TOKEN_CLASSES)
    and by whether the first member's top-1 is right, next to the share of positions where each member gives
    the true token the most probability (which member *should* be trusted there). Ties are split evenly: members
    that give the true token the same probability share that position's "best" (members of one cache kind tie
    often, e.g. equal counts, or the same tail value off every support), and a position whose first member's
    top-1 is tied among m ids counts 1/m as "right" when the true token is one of them. None, with one line
    saying why, when a learned module has no checkpoint to load."""
    from transformers import AutoModelForCausalLM

    tc = cfg.train
    tokens, stores = open_committee(cfg, tc.committee)
    vocab = stores[tc.committee[0]].manifest.params["vocab_size"]
    path = cfg.student_dir / "final"
    student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=tc.trust_remote_code)
    student.to(device).eval()
    committee = Committee(tc, student.config.hidden_size, vocab, device)
    if committee.module is not None:  # the module is not part of the saved student: it lives in the checkpoints
        checkpoint = latest_checkpoint(cfg.student_dir / "checkpoints")
        if checkpoint is None or not (checkpoint / "committee.safetensors").exists():
            print(f"evaluate: no checkpoint of the committee module in {cfg.student_dir / 'checkpoints'}, so no "
                  "committee weights by token class", flush=True)
            return None
        load_model(committee.module, str(checkpoint / "committee.safetensors"))
    classes = token_classes(load_tokenizer(str(path), tc.trust_remote_code)).to(device)        # (V,)
    first, n_members = tc.committee[0], len(tc.committee)
    groups = ["all", *(f"class: {c}" for c in TOKEN_CLASSES), f"{first} top-1 right", f"{first} top-1 wrong"]
    count = torch.zeros(len(groups), dtype=torch.float64)
    alpha_sum = torch.zeros(len(groups), n_members, dtype=torch.float64)
    best_sum = torch.zeros(len(groups), n_members, dtype=torch.float64)
    bar = progress(validation_sequences(tokens, stores, max_sequences) * tokens.manifest.params["seq_len"],
                   "evaluate (committee weights)", unit="tok", unit_scale=True)
    for batch, positions, labels, targets in validation_batches(tokens, stores, cfg.evaluate.batch_size,
                                                                max_sequences, device, tc.committee):
        hidden = student_hidden(student, batch["input_ids"], positions)                     # (N, H)
        alpha, _ = committee.weights(hidden, targets)                                       # (N, M)
        label_logp = committee_loss.label_logprobs(targets, labels, vocab)                  # (N, M)
        best = best_members(label_logp)                                                     # (N, M)
        right = top1_right(targets[0], labels)                                              # (N,) in [0, 1]
        label_class = classes[labels]                                                       # (N,)
        member = torch.stack([torch.ones_like(right), *((label_class == c).double() for c in range(len(TOKEN_CLASSES))),
                              right, 1 - right]).cpu()                                      # (G, N) weights
        count += member.sum(1)
        alpha_sum += member @ alpha.double().cpu()
        best_sum += member @ best.double().cpu()
        bar.update(batch["input_ids"].numel())
    bar.close()
    out = {}
    for g, name in enumerate(groups):
        n = float(count[g])
        if n > 0:
            out[name] = {"positions": round(n),
                         "alpha": {m: float(alpha_sum[g, i]) / n for i, m in enumerate(tc.committee)},
                         "best_share": {m: float(best_sum[g, i]) / n for i, m in enumerate(tc.committee)}}
    return {"split": "validation", "members": list(tc.committee), "weights": tc.committee_weights, "groups": out}


def trained_config(cfg: Config) -> Config:
    """cfg with the train section the student of cfg.train.output was trained with, read from its recorded
    config.yaml: how it learnt (loss, source, committee members and weights, ...) is not asked again. Which student
    (train.output), on which device and whether remote code may run stay the caller's. A setting given here
    that differs from the record (and from the default, so it was asked for) is named in one line; a student
    trained before configs were recorded is evaluated with cfg as given."""
    recorded = recorded_config(cfg.student_dir)
    if recorded is None:
        return cfg
    given = cfg.train
    train = dataclasses.replace(recorded.train, output=given.output, device=given.device,
                                trust_remote_code=given.trust_remote_code)
    asked = [f"train.{f.name}={getattr(train, f.name)} (not {getattr(given, f.name)})"
             for f in dataclasses.fields(TrainConfig) if f.name not in RESUMABLE
             and getattr(given, f.name) not in (getattr(train, f.name), getattr(TrainConfig(), f.name))]
    if asked:
        print(f"evaluate: {cfg.student_dir} is evaluated as it was trained ({cfg.student_dir / 'config.yaml'}): "
              + ", ".join(asked), flush=True)
    return dataclasses.replace(cfg, train=train)


def best_members(label_logp: torch.Tensor) -> torch.Tensor:
    """Which member gives the true token the most probability, ties split evenly: label_logp (N, M) -> (N, M),
    1/j for each of the j members sharing the row's largest value, 0 for the others (rows sum to 1)."""
    is_best = label_logp == label_logp.amax(-1, keepdim=True)                              # (N, M)
    return is_best.double() / is_best.sum(-1, keepdim=True)


def top1_right(target, labels: torch.Tensor) -> torch.Tensor:
    """How far the teacher's top-1 is the true next token, per position: 1/m when the true token is one of the m
    ids sharing the teacher's top value (1 without a tie), else 0. target SparseTarget (N, K) | logits (N, V),
    labels (N,) -> (N,) float64."""
    values = target.logprobs if isinstance(target, SparseTarget) else target                # (N, K) | (N, V)
    ids = target.ids if isinstance(target, SparseTarget) else None
    top = values == values.amax(-1, keepdim=True)                                          # (N, K) | (N, V)
    if ids is None:
        hit = top.gather(-1, labels[:, None]).squeeze(-1)                                   # (N,)
    else:
        hit = (top & (ids == labels[:, None])).any(-1)                                      # (N,)
    return hit.double() / top.sum(-1).double()


def run(cfg: Config) -> dict:
    from transformers import AutoModelForCausalLM

    cfg = trained_config(cfg)
    ec = cfg.evaluate
    device = pick_device(cfg.train.device)
    tokens, signals = open_stores(cfg)
    paths = {name: cfg.student_dir / folder for name, folder in (("untrained", "init"), ("trained", "final"))}
    for name, path in paths.items():
        if not (path / "config.json").exists():
            raise KdcacheError(f"no {name} student at {path}: run `kdcache train` first")
    record_config(cfg, cfg.eval_dir, "kdcache evaluate: the config this evaluation ran with (its train section "
                                     "is the student's recorded one)")
    (cfg.eval_dir / COMMITTEE_WEIGHTS).unlink(missing_ok=True)  # a report must not show another run's weights
    results = {}
    for name, path in paths.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     trust_remote_code=cfg.train.trust_remote_code)
        results[name] = evaluate_model(model, tokens, signals, ec.batch_size, ec.max_sequences, device,
                                       desc=f"evaluate ({name})")
        del model
    record = student_record(paths["trained"]) or {}
    metrics = {"split": "validation", "students": results,
               # which trained student this measured: kdcache report compares it with final/training.json
               "student": {"path": str(paths["trained"]), "step": record.get("step"), "sha256": record.get("sha256")},
               "cache": {"path": str(cfg.signals_dir), "signal": signals.manifest.params.get("signal", "topk"),
                         "k": signals.manifest.params["k"], "samples": signals.manifest.params.get("samples"),
                         "draws": signals.manifest.params.get("draws"),
                         "bytes_per_token": signals.nbytes() / _positions(signals)},
               "config": {"student": cfg.train.student, "output": cfg.train.output, "loss": cfg.train.loss,
                          "tail": cfg.train.tail, "max_steps": cfg.train.max_steps, "source": cfg.train.source,
                          "committee": cfg.train.committee,
                          "teacher": signals.manifest.params["teacher"]}}
    cfg.eval_dir.mkdir(parents=True, exist_ok=True)
    (cfg.eval_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (cfg.eval_dir / "report.md").write_text(render_report(metrics))
    print(render_table(results), flush=True)
    print(tie_note(results["trained"].get("teacher_top1_tie_share")), flush=True)
    print(f"evaluate: wrote {cfg.eval_dir / 'metrics.json'} and {cfg.eval_dir / 'report.md'}", flush=True)
    weights = committee_weights(cfg, device, ec.max_sequences) if cfg.train.committee else None
    if weights is not None:
        (cfg.eval_dir / COMMITTEE_WEIGHTS).write_text(json.dumps(weights, indent=1))
        print(f"evaluate: committee weights by token class -> {cfg.eval_dir / COMMITTEE_WEIGHTS}", flush=True)
    return metrics


def _positions(store) -> int:
    return sum(r.count for r in store.manifest.shards) * store.manifest.params["seq_len"]


def render_table(results: dict) -> str:
    rows = ["| student | KL(teacher‖student) | top-1 agreement | top-5 order agreement | perplexity |",
            "|---|---|---|---|---|"]
    for name, m in results.items():
        rows.append(f"| {name} | {m['kl_teacher']:.4f} | {m['top1_agreement']:.2%} | "
                    f"{percent(m['top5_order_agreement'])} | {m['perplexity']:.2f} |")
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
        tie_note(s["trained"].get("teacher_top1_tie_share")), "",
        f"The trained student is {verdict}.", "",
        _kl_note(metrics["cache"], s["trained"]["teacher_tail_mass"]), "",
    ])


def tie_note(share: float | None) -> str:
    """How top-1 agreement treats ties, and how often the teacher's top-1 is one (None: measured before ties
    were counted)."""
    how = ("Top-1 agreement counts ties fairly: where m ids share the teacher's top value, a student whose argmax "
           "is one of them gets 1/m.")
    if share is None:
        return how
    return f"{how} The teacher's top-1 is a tie at {share:.1%} of these positions" + (
        ": the cache often cannot tell the teacher's top-1 apart, so top-1 agreement says little here." if share > 0.5
        else ".")


def _kl_note(cache: dict, tail_mass: float) -> str:
    if cache.get("signal", "topk") == "topk":
        return (f"KL is measured against the cached top-{cache['k']} signal with one tail bucket (a lower bound of "
                f"the full-vocabulary KL); the teacher's mass outside the top-{cache['k']} is {tail_mass:.1%} on average.")
    # sum p_hat log(p_hat / q): its cross-entropy part is unbiased, its entropy part is not (H(p_hat) < H(p))
    drawn = f"{cache['samples']} draws" if cache["signal"] == "sample" else f"the top-{cache['k']} + {cache['samples']} tail draws"
    return (f"KL is measured against the cached sampled estimate of the teacher ({drawn} per position): a noisy "
            "estimate whose entropy term is biased; compare students on the same cache only.")
