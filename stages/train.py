"""train: a student learns from the cached teacher signal. No teacher model is ever constructed here.

Recipe: open the token + signal stores (fingerprints checked) -> build the student -> stream batches (background
prefetch) -> objective on the sparse targets of the loss positions -> AdamW with warmup + cosine LR, gradient
accumulation and clipping -> atomic checkpoints (model, optimiser, schedules, stream position) -> save_pretrained.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from pipeline.config import TEACHER_SOURCE, Config, TrainConfig
from pipeline.errors import KdcacheError
from stages.data import CachedKDDataset, Prefetcher
from stages.losses import ObjectiveSpec, compute_objective
from stages.models import build_student, load_tokenizer, model_fingerprint, resolve_model_path, tokenizer_fingerprint
from stages.runtime import autocast, pick_device
from stages.schedules import TAIDSchedule, WarmupCosineLR
from stages.signals import sparse_target
from storage import Store

CHECKPOINT_PREFIX = "step-"


def objective_spec(tc: TrainConfig) -> ObjectiveSpec:
    try:
        return ObjectiveSpec(name=tc.loss, tail=tc.tail, temperature=tc.temperature, ce_weight=tc.ce_weight,
                             chunk_size=tc.chunk_size)
    except ValueError as e:
        raise KdcacheError(f"invalid config: {e}") from None


def open_stores(cfg: Config, source: str = TEACHER_SOURCE) -> tuple[Store, Store]:
    """The token store and the signal store of `source`, which must have been computed from those tokens."""
    tokens = Store.open(cfg.tokens_dir)
    signals = Store.open(cfg.signal_dir(source))
    made_from = signals.manifest.fingerprints.get("token_store")
    if made_from != tokens.manifest.fingerprint():
        raise KdcacheError(f"signal store {signals.path} was computed from another token store ({made_from}, but "
                           f"{tokens.path} is now {tokens.manifest.fingerprint()}: the tokens were rebuilt after "
                           "precompute): rerun precompute with --overwrite")
    signals.check({"tokenizer": tokens.manifest.fingerprints["tokenizer"],
                   "seq_len": tokens.manifest.params["seq_len"]})
    if source == TEACHER_SOURCE:  # the teacher's cache must come from the configured teacher
        want = model_fingerprint(cfg.precompute.teacher)
        if signals.manifest.fingerprints.get("teacher") != want:
            raise KdcacheError(f"signal store {signals.path} was computed by teacher "
                               f"{signals.manifest.params.get('teacher')!r} ({signals.manifest.fingerprints.get('teacher')}), "
                               f"not by precompute.teacher={cfg.precompute.teacher!r} ({want}): rerun precompute "
                               "with --overwrite or set precompute.teacher")
    return tokens, signals


def check_student(student, signals: Store, student_spec: str, trust_remote_code: bool = False) -> None:
    """The student's output layer must match the cached vocabulary, and a shipped tokenizer must match too."""
    vocab = signals.manifest.params["vocab_size"]
    student_vocab = student.get_output_embeddings().weight.shape[0]
    if student_vocab != vocab:
        raise KdcacheError(f"student {student_spec!r} has vocabulary size {student_vocab} but the cache "
                           f"{signals.path} has {vocab}: the student must share the teacher's tokenizer")
    path = Path(student_spec)
    if path.is_dir() and (path / "tokenizer_config.json").exists():
        fp = tokenizer_fingerprint(load_tokenizer(str(path), trust_remote_code))
        if fp != signals.manifest.fingerprints["tokenizer"]:
            raise KdcacheError(f"student {student_spec!r} tokenizer {fp} differs from the cache's "
                               f"{signals.manifest.fingerprints['tokenizer']}: use a student with the teacher's tokenizer")


def student_logits(student, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits only where the loss is taken: hidden states (B, T, H) -> rows at `positions` (N,) -> (N, V)."""
    hidden = student.base_model(input_ids=input_ids).last_hidden_state     # (B, T, H)
    hidden = hidden.flatten(0, 1)[positions]                                # (N, H)
    return student.get_output_embeddings()(hidden).float()                  # (N, V)


def loss_inputs(batch: dict[str, torch.Tensor]):
    """Positions t < T-1 predict token t+1: flattened row indices where the target token is a loss token."""
    input_ids = batch["input_ids"]                                          # (B, T)
    B, T = input_ids.shape
    target_mask = torch.zeros_like(batch["loss_mask"])
    target_mask[:, :-1] = batch["loss_mask"][:, 1:]                         # (B, T): position t predicts t+1
    positions = target_mask.flatten().nonzero().squeeze(1)                  # (N,)
    labels = torch.roll(input_ids, -1, dims=1).flatten()[positions]         # (N,)
    target = sparse_target(batch["sig_ids"], batch["sig_logprobs"], batch["sig_lognorm"])[positions]
    return positions, labels, target


# ---- checkpoints ---------------------------------------------------------------------------------------

def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob(CHECKPOINT_PREFIX + "*") if (p / "state.json").exists())
    return done[-1] if done else None


def save_checkpoint(ckpt_dir: Path, step: int, student, optimizer, state: dict, keep: int) -> Path:
    """model.safetensors + optimizer.pt (tensors only) + state.json, written aside and renamed into place."""
    final = ckpt_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_model(student, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:  # e.g. disk full: earlier checkpoints stay, no half-written one is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(ckpt_dir.glob(CHECKPOINT_PREFIX + "*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, student, optimizer) -> dict:
    """Tensors only: safetensors, JSON, and torch.load(weights_only=True), which refuses any pickled object."""
    try:
        load_model(student, str(path / "model.safetensors"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        return json.loads((path / "state.json").read_text())
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise KdcacheError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {reason}): delete it to "
                           "resume from an earlier one, or pass --no-resume") from e


def save_student(student, out: Path, tokenizer_spec: str, trust_remote_code: bool = False) -> None:
    """save_pretrained (+ the teacher's tokenizer) atomically, so `from_pretrained(out)` loads the student."""
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    student.save_pretrained(tmp)
    load_tokenizer(tokenizer_spec, trust_remote_code).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log has each step once. Rewritten
    aside and renamed, so a kill during the rewrite cannot lose the lines that are kept."""
    if path.exists():
        lines = [l for l in path.read_text().splitlines() if l.endswith("}") and json.loads(l)["step"] <= step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(l + "\n" for l in lines))
        os.replace(tmp, path)


# ---- the stage -----------------------------------------------------------------------------------------

def run(cfg: Config, resume: bool = True) -> Path:
    tc = cfg.train
    spec = objective_spec(tc)
    device = pick_device(tc.device)
    torch.manual_seed(tc.seed)
    tokens, signals = open_stores(cfg, tc.source)
    # layerdrop/random students and the saved tokenizer come from the teacher, whichever source the signal is
    teacher_spec = cfg.precompute.teacher

    student = build_student(tc.student, teacher_spec, seed=tc.seed, trust_remote_code=tc.trust_remote_code)
    check_student(student, signals, tc.student, tc.trust_remote_code)
    student.config.use_cache = False
    out_dir, ckpt_dir = cfg.student_dir, cfg.student_dir / "checkpoints"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "init" / "config.json").exists():  # the untrained student, evaluate's baseline
        save_student(student, out_dir / "init", teacher_spec, cfg.precompute.trust_remote_code)
    student.to(device).train()

    decay = [p for n, p in student.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95),
                                  foreach=device.type == "cuda")
    lr_schedule = WarmupCosineLR(tc.lr, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    taid = TAIDSchedule(total_steps=tc.max_steps) if spec.name == "taid" else None

    step, position = 0, 0
    log_path = out_dir / "metrics.jsonl"
    checkpoint = latest_checkpoint(ckpt_dir) if resume else None
    if not resume:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        log_path.unlink(missing_ok=True)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, student, optimizer)
        step, position = state["step"], state["position"]
        if taid is not None:
            taid.load_state_dict(state["taid"])
        print(f"train: resuming from {checkpoint.name} (step {step}, sequence {position})", flush=True)
    _truncate_log(log_path, step)  # lines past the resume point (all, when a run killed before its first checkpoint)
    if step >= tc.max_steps:
        print(f"train: already at step {step} of {tc.max_steps}", flush=True)
    else:
        dataset = CachedKDDataset(tokens, signals, "train", tc.batch_size, seed=tc.seed, start=position)
        stream = Prefetcher(dataset, device, depth=tc.prefetch)
        bar = tqdm(total=tc.max_steps, initial=step, desc=f"train ({spec.name})", unit="step")
        try:
            with open(log_path, "a") as log:
                while step < tc.max_steps:
                    step, position = _train_step(student, optimizer, stream, spec, tc, device, lr_schedule, taid,
                                                 step, log, bar)
                    if step % tc.checkpoint_every == 0 or step == tc.max_steps:
                        state = {"step": step, "position": position,
                                 "lr_schedule": lr_schedule.state_dict(),
                                 "taid": taid.state_dict() if taid is not None else None,
                                 "config": cfg.to_dict()}
                        save_checkpoint(ckpt_dir, step, student, optimizer, state, tc.keep_checkpoints)
        finally:
            stream.close()
            bar.close()
    save_student(student.cpu(), out_dir / "final", teacher_spec, cfg.precompute.trust_remote_code)
    print(f"train: student saved to {out_dir / 'final'}", flush=True)
    return out_dir / "final"


def _train_step(student, optimizer, stream, spec, tc, device, lr_schedule, taid, step, log, bar):
    """One optimiser step over grad_accum micro-batches, normalised once by the step's loss-token count."""
    start = time.perf_counter()
    micro = [next(stream) for _ in range(tc.grad_accum)]
    position = micro[-1][0]
    prepared = [loss_inputs(batch) for _, batch in micro]
    n_tokens = max(1, sum(int(p[0].numel()) for p in prepared))
    lr = lr_schedule.lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    totals: dict[str, float] = {}
    for (_, batch), (positions, labels, target) in zip(micro, prepared):
        with autocast(device, tc.precision):
            logits = student_logits(student, batch["input_ids"], positions)   # (N, V)
        out = compute_objective(logits, target, labels, torch.ones_like(labels, dtype=torch.bool), spec,
                                taid_t=taid.t if taid is not None else None)
        (out["loss_sum"] / n_tokens).backward()
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), tc.clip_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    kd_per_token = totals.get("kd_sum", totals["loss_sum"]) / n_tokens
    record = {"step": step, "loss": totals["loss_sum"] / n_tokens, "lr": lr, "grad_norm": float(grad_norm),
              "tokens": n_tokens, "seconds": time.perf_counter() - start}
    for k, v in totals.items():
        if k.endswith("_sum") and k != "loss_sum":
            record[k[:-4]] = v / n_tokens
        elif k not in ("loss_sum", "n_tokens"):
            record[k] = v / n_tokens
    if taid is not None:
        record["taid_t"] = taid.t
        taid.update(step, kd_per_token)
    log.write(json.dumps(record) + "\n")
    log.flush()
    bar.update(1)
    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.1e}", tok_s=f"{n_tokens / record['seconds']:.0f}")
    return step, position
