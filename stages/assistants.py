"""assistants (MiniDisc, Zhang et al. 2024): choose the teacher assistant for an extreme compression in one trial.

Recipe:
  1. prune     load the teacher (the only time this stage does), rank its heads and neurons by gradient importance
               on calibration sequences, reorder its weights so every candidate width is a slice, save the slice
               of the largest candidate (RUN/assistants/slimmable-init), free the teacher.
  2. train     the slimmable assistant learns from the teacher's CACHE (no teacher in memory) with the sandwich
               rule: each step sums the losses of the largest, the smallest and sampled middle widths.
  3. score     every candidate width on the validation split: P = top-1 agreement with the cached teacher.
  4. choose    argmax P + λ·sparsity among the candidates above the size floor; RUN/assistants/ta_plan.json (the
               whole table) and ta_tradeoff.png.
  5. export    the chosen width as a standalone HF model with the teacher's tokenizer (RUN/assistants/chosen).
Finished steps are reused when the stage reruns with the same inputs (inputs.json); the chosen assistant's
signal is then cached by `precompute --source assistant` and a student trains from it with train.source.
Widths are uniform across layers (exportable as a standard Llama config): see stages/pruning.py.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from kdcache.pipeline.config import Config, record_config
from kdcache.pipeline.errors import KdcacheError
from kdcache.stages import pruning
from kdcache.stages.data import CachedKDDataset, Prefetcher
from kdcache.stages.evaluate import validation_batches, validation_sequences
from kdcache.stages.losses import ObjectiveSpec, compute_objective
from kdcache.stages.models import load_teacher, load_tokenizer, model_fingerprint, resolve_model_path
from kdcache.stages.progress import progress, track
from kdcache.stages.pruning import Width
from kdcache.stages.report import markdown_table, plot_tradeoff
from kdcache.stages.runtime import pick_device
from kdcache.stages.schedules import WarmupCosineLR
from kdcache.stages.train import loss_inputs, open_stores
from kdcache.storage.files import atomic_write_text

INIT, TRAINED, CHOSEN = "slimmable-init", "slimmable", "chosen"
PLAN, PLOT, CANDIDATES, INPUTS = "ta_plan.json", "ta_tradeoff.png", "candidates.json", "inputs.json"


def _write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


# ---- 1. prune ------------------------------------------------------------------------------------------

def calibration_batches(tokens, n_sequences: int, batch_size: int):
    """The first n train sequences of the token store, in store order: (input_ids (B, T), loss_mask (B, T))."""
    dataset = CachedKDDataset(tokens, None, "train", batch_size, shuffle=False, epochs=1)
    seen = 0
    for _, batch in dataset:
        if seen >= n_sequences:
            break
        take = min(len(batch["input_ids"]), n_sequences - seen)
        seen += take
        yield torch.from_numpy(batch["input_ids"][:take]), torch.from_numpy(batch["loss_mask"][:take])


def prune_teacher(cfg: Config, tokens, out_dir: Path) -> list[dict]:
    """Importance, reorder, candidate widths; saves the largest candidate's slice. Returns the candidates."""
    ac = cfg.assistants
    teacher = load_teacher(cfg.precompute.teacher, "cpu")
    pruning.check_prunable(teacher)
    config = teacher.config
    batches = list(calibration_batches(tokens, ac.calibration_sequences, ac.batch_size))
    heads, neurons = pruning.importance_scores(teacher, track(batches, len(batches), "assistants: importance",
                                                                   unit="batch"))
    heads_n, neurons_n = pruning.normalise_per_layer(heads, neurons)
    kv_order, head_order, neuron_order = pruning.unit_orders(heads_n, neurons_n, config.num_key_value_heads)
    pruning.reorder_(teacher, kv_order, head_order, neuron_order)
    path = pruning.width_path(config, torch.gather(heads_n, 1, head_order), torch.gather(neurons_n, 1, neuron_order))
    widths = pruning.grid_widths(config, path, ac.sparsities)
    full = pruning.model_width(config)
    largest = widths[0]
    init = pruning.extract_width(teacher, full, largest)
    del teacher
    pruning.save_model_dir(init, out_dir / INIT, load_tokenizer(cfg.precompute.teacher))
    candidates = [{"target_sparsity": target, **w.to_dict(), "sparsity": pruning.sparsity(config, w),
                   "non_embedding_params": pruning.non_embedding_params(config, w)}
                  for target, w in zip(ac.sparsities, widths)]
    _write_json(out_dir / CANDIDATES, {
        "teacher_width": full.to_dict(), "teacher_non_embedding_params": pruning.non_embedding_params(config),
        "layout": largest.to_dict(), "candidates": candidates,
        "importance": {"heads": heads.tolist(), "neurons": neurons.tolist(),
                       "kv_order": kv_order.tolist(), "head_order": head_order.tolist(),
                       "neuron_order": neuron_order.tolist()}})
    return candidates


# ---- 2. train the slimmable assistant from the teacher's cache -------------------------------------------

def sandwich(widths: list[Width], middle: int, rng: np.random.Generator) -> list[Width]:
    """The widths of one step: largest, smallest and `middle` distinct sampled ones in between."""
    inner = widths[1:-1]
    picked = rng.choice(len(inner), size=min(middle, len(inner)), replace=False) if inner else []
    return list(dict.fromkeys([widths[0], widths[-1], *(inner[i] for i in sorted(picked))]))


def train_slimmable(cfg: Config, tokens, signals, out_dir: Path, widths: list[Width]) -> Path:
    """The slimmable assistant (the largest candidate's slice, every other width a slice of it) learns from the
    cached teacher signal; saved as an HF dir at out_dir/slimmable. Returns that dir."""
    from transformers import AutoModelForCausalLM

    ac, tc = cfg.assistants, cfg.train
    device = pick_device(tc.device)
    torch.manual_seed(ac.seed)
    rng = np.random.default_rng(ac.seed)
    model = AutoModelForCausalLM.from_pretrained(out_dir / INIT, dtype=torch.float32).to(device).train()
    model.config.use_cache = False
    layout = widths[0]
    spec = ObjectiveSpec(name="kl", tail=tc.tail, chunk_size=tc.chunk_size)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": ac.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=ac.lr, betas=(0.9, 0.95))
    lr_schedule = WarmupCosineLR(ac.lr, ac.warmup_steps, ac.steps, ac.min_lr_ratio)
    stream = Prefetcher(CachedKDDataset(tokens, signals, "train", ac.batch_size, seed=ac.seed), device,
                        depth=tc.prefetch)
    bar = progress(ac.steps, "assistants: slimmable training", unit="step")
    log_path = out_dir / "slimmable_log.jsonl"
    try:
        with open(log_path, "w") as log:
            for step in range(ac.steps):
                _, batch = next(stream)
                positions, labels, target = loss_inputs(batch)
                n_tokens = max(1, int(positions.numel()))
                every = torch.ones_like(labels, dtype=torch.bool)
                for group in optimizer.param_groups:
                    group["lr"] = lr_schedule.lr(step)
                losses = {}
                for width in sandwich(widths, ac.middle_widths, rng):
                    logits = pruning.sliced_logits(model, layout, width, batch["input_ids"], positions)  # (N, V)
                    out = compute_objective(logits, target, labels, every, spec)
                    (out["loss_sum"] / n_tokens).backward()  # one backward per width: the sum, without its memory
                    losses[f"{width.kv_groups}x{width.heads_per_group}/{width.neurons}"] = float(out["loss_sum"].detach()) / n_tokens
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), ac.clip_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                log.write(json.dumps({"step": step + 1, "lr": lr_schedule.lr(step), "grad_norm": float(grad_norm),
                                      "kl": losses}) + "\n")
                kls = list(losses.values())
                bar.set_postfix(kl_largest=f"{kls[0]:.3f}", kl_smallest=f"{kls[min(1, len(kls) - 1)]:.3f}",
                                lr=f"{lr_schedule.lr(step):.1e}", refresh=False)
                bar.update(1)
    finally:
        stream.close()
        bar.close()
    pruning.save_model_dir(model.cpu().eval(), out_dir / TRAINED, load_tokenizer(str(out_dir / INIT)))
    return out_dir / TRAINED


# ---- 3. score every width ----------------------------------------------------------------------------------

@torch.no_grad()
def score_widths(model, layout: Width, widths: list[Width], tokens, signals, batch_size: int,
                 max_sequences: int | None, device) -> list[dict]:
    """P (top-1 agreement with the cached teacher) and KL(teacher‖width) of every width on the validation split."""
    model.to(device).eval()
    sums = [{"top1": 0.0, "kl": 0.0} for _ in widths]
    n_positions = 0
    spec = ObjectiveSpec(name="kl", tail="bucket")
    total = validation_sequences(tokens, signals, max_sequences)
    bar = progress(total * len(widths), "assistants: scoring widths", unit="seq")
    for batch, positions, labels, target in validation_batches(tokens, signals, batch_size, max_sequences, device):
        every = torch.ones_like(labels, dtype=torch.bool)
        for width, s in zip(widths, sums):
            out = compute_objective(pruning.sliced_logits(model, layout, width, batch["input_ids"], positions),
                                    target, labels, every, spec)
            s["top1"] += float(out["top1_agree"])
            s["kl"] += float(out["loss_sum"])
            bar.update(len(batch["input_ids"]))
        n_positions += int(labels.numel())
    bar.close()
    n = max(1, n_positions)
    return [{"P": s["top1"] / n, "kl_teacher": s["kl"] / n, "positions": n_positions} for s in sums]


# ---- 4. choose ---------------------------------------------------------------------------------------------

def choose(table: list[dict], tradeoff_lambda: float, max_sparsity: float = 1.0, min_params: int = 0) -> int:
    """Index of the row maximising P + λ·sparsity among rows with sparsity ≤ max_sparsity and at least
    min_params non-embedding parameters (ties: the first, i.e. the larger assistant). Rows need the keys
    P, sparsity, non_embedding_params."""
    eligible = [i for i, r in enumerate(table)
                if r["sparsity"] <= max_sparsity + 1e-9 and r["non_embedding_params"] >= min_params]
    if not eligible:
        raise KdcacheError(f"no candidate assistant is within the size floor (sparsity <= {max_sparsity:g} and "
                           f">= {min_params} non-embedding parameters): lower assistants.grid, raise "
                           "assistants.max_sparsity or lower assistants.min_size_over_student")
    return max(eligible, key=lambda i: (table[i]["P"] + tradeoff_lambda * table[i]["sparsity"], -i))


def student_non_embedding_params(cfg: Config) -> int:
    """The student's non-embedding parameters, from configs only (no weights, no model built)."""
    from transformers import AutoConfig

    kind, _, arg = cfg.train.student.partition(":")
    if kind in ("layerdrop", "random"):
        config = AutoConfig.from_pretrained(resolve_model_path(cfg.precompute.teacher, "precompute.teacher"))
        config.num_hidden_layers = int(arg)
    else:
        config = AutoConfig.from_pretrained(resolve_model_path(cfg.train.student, "train.student"))
    return pruning.non_embedding_params(config)


# ---- the stage -----------------------------------------------------------------------------------------

# fields that only change the scoring and the choice: a rerun with new values reuses the trained assistant
CHOICE_ONLY = {"tradeoff_lambda", "max_sparsity", "min_size_over_student", "eval_sequences", "source"}


def trial_inputs(cfg: Config, signals) -> dict:
    """What the pruned and trained slimmable assistant depends on; a rerun with other inputs needs --overwrite."""
    section = {k: v for k, v in cfg.assistants.__dict__.items() if k not in CHOICE_ONLY}
    return {"assistants": section | {"sparsities": cfg.assistants.sparsities},
            "teacher": model_fingerprint(cfg.precompute.teacher), "signals": signals.manifest.fingerprint(),
            "tail": cfg.train.tail, "chunk_size": cfg.train.chunk_size}


def run(cfg: Config, overwrite: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    ac = cfg.assistants
    out_dir = cfg.assistants_dir
    tokens, signals = open_stores(cfg)                                  # the teacher's cache
    inputs = trial_inputs(cfg, signals)
    inputs_path = out_dir / INPUTS
    if inputs_path.exists() and json.loads(inputs_path.read_text()) != json.loads(json.dumps(inputs)):
        if not overwrite:
            raise KdcacheError(f"{out_dir} was built from other inputs (assistants config, teacher or cache): "
                               "pass --overwrite (make: OVERWRITE=1) to replace it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record_config(cfg, out_dir, "kdcache assistants: the config this MiniDisc trial and choice ran with")
    _write_json(inputs_path, inputs)
    seconds = {}

    start = time.perf_counter()
    if not (out_dir / INIT / "config.json").exists() or not (out_dir / CANDIDATES).exists():
        prune_teacher(cfg, tokens, out_dir)
        shutil.rmtree(out_dir / TRAINED, ignore_errors=True)
    seconds["prune"] = time.perf_counter() - start
    info = json.loads((out_dir / CANDIDATES).read_text())
    candidates = info["candidates"]
    widths = [Width(c["kv_groups"], c["heads_per_group"], c["neurons"]) for c in candidates]
    layout = Width(**info["layout"])

    start = time.perf_counter()
    if not (out_dir / TRAINED / "config.json").exists():
        train_slimmable(cfg, tokens, signals, out_dir, widths)
    seconds["train"] = time.perf_counter() - start

    start = time.perf_counter()
    device = pick_device(cfg.train.device)
    model = AutoModelForCausalLM.from_pretrained(out_dir / TRAINED, dtype=torch.float32)
    scores = score_widths(model, layout, widths, tokens, signals, cfg.evaluate.batch_size, ac.eval_sequences, device)
    seconds["score"] = time.perf_counter() - start

    student_params = student_non_embedding_params(cfg)
    min_params = int(ac.min_size_over_student * student_params)
    table = [{**c, **s} for c, s in zip(candidates, scores)]
    for row in table:
        row["tradeoff"] = row["P"] + ac.tradeoff_lambda * row["sparsity"]
        row["eligible"] = row["sparsity"] <= ac.max_sparsity + 1e-9 and row["non_embedding_params"] >= min_params
    chosen = choose(table, ac.tradeoff_lambda, ac.max_sparsity, min_params)
    for i, row in enumerate(table):
        row["chosen"] = i == chosen

    start = time.perf_counter()
    export = pruning.extract_width(model.cpu(), layout, widths[chosen])
    pruning.save_model_dir(export, out_dir / CHOSEN, load_tokenizer(cfg.precompute.teacher))
    seconds["export"] = time.perf_counter() - start

    plan = {"chosen": table[chosen], "chosen_dir": str(out_dir / CHOSEN), "tradeoff_lambda": ac.tradeoff_lambda,
            "size_floor": {"max_sparsity": ac.max_sparsity, "min_size_over_student": ac.min_size_over_student,
                           "student": cfg.train.student, "student_non_embedding_params": student_params,
                           "min_non_embedding_params": min_params},
            "teacher_width": info["teacher_width"],
            "teacher_non_embedding_params": info["teacher_non_embedding_params"],
            "score": "P = top-1 agreement with the cached teacher on the validation split",
            "uniform_widths": "each width is the same in every layer (exportable as a standard HF config)",
            "table": table, "seconds": seconds}
    _write_json(out_dir / PLAN, plan)
    plot_tradeoff(table, chosen, ac.tradeoff_lambda, out_dir / PLOT)
    print(render_table(table), flush=True)
    print(f"assistants: chose {table[chosen]['sparsity']:.0%} sparsity (P {table[chosen]['P']:.3f}) -> "
          f"{out_dir / CHOSEN}; plan {out_dir / PLAN}, plot {out_dir / PLOT}", flush=True)
    return plan


def table_rows(table: list[dict]) -> list[list[str]]:
    """The candidates as table rows, the header first (the stage's printout and `kdcache report`)."""
    rows = [["sparsity", "size (% teacher)", "KV groups × heads", "neurons", "P (top-1)", "KL(teacher‖TA)",
             "P + λ·s", ""]]
    for r in table:
        mark = "chosen" if r.get("chosen") else ("" if r.get("eligible", True) else "below floor")
        rows.append([f"{r['sparsity']:.1%}", f"{1 - r['sparsity']:.1%}", f"{r['kv_groups']} × {r['heads_per_group']}",
                     str(r["neurons"]), f"{r['P']:.3f}", f"{r['kl_teacher']:.3f}", f"{r['tradeoff']:.3f}", mark])
    return rows


def render_table(table: list[dict]) -> str:
    return markdown_table(table_rows(table))
