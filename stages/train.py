"""train: a student learns from the cached teacher signal. No teacher model is ever constructed here.

Recipe: open the token + signal stores (fingerprints checked) -> build the student -> stream batches (background
prefetch) -> objective on the sparse targets of the loss positions -> AdamW with warmup + cosine LR, gradient
accumulation and clipping -> atomic checkpoints (model, optimiser, schedules, stream position) -> save_pretrained.
With train.committee the student reads several sources in lockstep and learns from their weighted mix
(stages.losses.committee; weights learned by stages.committee.TeacherUnderstanding, or a baseline).
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
from stages.committee import TeacherUnderstanding
from stages.data import CachedKDDataset, Prefetcher, signal_key
from stages.losses import ObjectiveSpec, compute_objective
from stages.losses import committee as committee_loss
from stages.models import build_student, load_tokenizer, resolve_model_path, tokenizer_fingerprint
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
    signals = Store.open(cfg.signal_dir(source), expect={"token_store": tokens.manifest.fingerprint(),
                                                         "tokenizer": tokens.manifest.fingerprints["tokenizer"]})
    return tokens, signals


def open_committee(cfg: Config, sources: list[str]) -> tuple[Store, dict[str, Store]]:
    """The token store and {source: signal store} of every committee member, each computed from those tokens."""
    tokens = Store.open(cfg.tokens_dir)
    expect = {"token_store": tokens.manifest.fingerprint(), "tokenizer": tokens.manifest.fingerprints["tokenizer"]}
    stores = {}
    for source in sources:
        if not (cfg.signal_dir(source) / "manifest.json").exists():
            raise KdcacheError(f"train.committee member {source!r} has no signal store at {cfg.signal_dir(source)}: "
                               f"add it to precompute.members (or `kdcache precompute --source {source} --model SPEC`)")
        stores[source] = Store.open(cfg.signal_dir(source), expect=expect)
    return tokens, stores


def check_student(student, signals: Store, student_spec: str) -> None:
    """The student's output layer must match the cached vocabulary, and a shipped tokenizer must match too."""
    vocab = signals.manifest.params["vocab_size"]
    student_vocab = student.get_output_embeddings().weight.shape[0]
    if student_vocab != vocab:
        raise KdcacheError(f"student {student_spec!r} has vocabulary size {student_vocab} but the cache "
                           f"{signals.path} has {vocab}: the student must share the teacher's tokenizer")
    path = Path(student_spec)
    if path.is_dir() and (path / "tokenizer_config.json").exists():
        fp = tokenizer_fingerprint(load_tokenizer(str(path)))
        if fp != signals.manifest.fingerprints["tokenizer"]:
            raise KdcacheError(f"student {student_spec!r} tokenizer {fp} differs from the cache's "
                               f"{signals.manifest.fingerprints['tokenizer']}: use a student with the teacher's tokenizer")


def student_logits(student, input_ids: torch.Tensor, positions: torch.Tensor, return_hidden: bool = False):
    """Logits only where the loss is taken: hidden states (B, T, H) -> rows at `positions` (N,) -> (N, V).
    With return_hidden: (logits (N, V), last hidden states (N, H)) (the committee module reads them)."""
    hidden = student.base_model(input_ids=input_ids).last_hidden_state     # (B, T, H)
    hidden = hidden.flatten(0, 1)[positions]                                # (N, H)
    logits = student.get_output_embeddings()(hidden).float()                # (N, V)
    return (logits, hidden) if return_hidden else logits


def loss_inputs(batch: dict[str, torch.Tensor], sources: list[str] | None = None):
    """Positions t < T-1 predict token t+1: flattened row indices where the target token is a loss token.
    With `sources` (a committee batch) the target is the list of the members' targets, in that order."""
    input_ids = batch["input_ids"]                                          # (B, T)
    B, T = input_ids.shape
    target_mask = torch.zeros_like(batch["loss_mask"])
    target_mask[:, :-1] = batch["loss_mask"][:, 1:]                         # (B, T): position t predicts t+1
    positions = target_mask.flatten().nonzero().squeeze(1)                  # (N,)
    labels = torch.roll(input_ids, -1, dims=1).flatten()[positions]         # (N,)
    if sources is not None:
        return positions, labels, [sparse_target(*(batch[signal_key(f, s)] for f in
                                                   ("sig_ids", "sig_logprobs", "sig_lognorm")))[positions]
                                   for s in sources]
    target = sparse_target(batch["sig_ids"], batch["sig_logprobs"], batch["sig_lognorm"])[positions]
    return positions, labels, target


# ---- checkpoints ---------------------------------------------------------------------------------------

def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob(CHECKPOINT_PREFIX + "*") if (p / "state.json").exists())
    return done[-1] if done else None


def save_checkpoint(ckpt_dir: Path, step: int, student, optimizer, state: dict, keep: int,
                    committee: "Committee | None" = None) -> Path:
    """model.safetensors + optimizer.pt (tensors only) + state.json, written aside and renamed into place; a
    learned committee module adds committee.safetensors + committee_optimizer.pt (it is not in the student)."""
    final = ckpt_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    save_model(student, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if committee is not None and committee.module is not None:
        save_model(committee.module, str(tmp / "committee.safetensors"))
        torch.save(committee.optimizer.state_dict(), tmp / "committee_optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(ckpt_dir.glob(CHECKPOINT_PREFIX + "*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, student, optimizer, committee: "Committee | None" = None) -> dict:
    load_model(student, str(path / "model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if committee is not None and committee.module is not None:
        load_model(committee.module, str(path / "committee.safetensors"))
        committee.optimizer.load_state_dict(torch.load(path / "committee_optimizer.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())


def save_student(student, out: Path, tokenizer_spec: str) -> None:
    """save_pretrained (+ the teacher's tokenizer) atomically, so `from_pretrained(out)` loads the student."""
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    student.save_pretrained(tmp)
    load_tokenizer(tokenizer_spec).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log has each step once."""
    if path.exists():
        lines = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= step]
        path.write_text("".join(l + "\n" for l in lines))


# ---- the committee -------------------------------------------------------------------------------------

class Committee:
    """The members a student learns from at once, how their per-position weights are made, and (learned) the
    teacher-understanding module with its own optimiser."""

    def __init__(self, tc: TrainConfig, hidden_size: int, vocab_size: int, device):
        self.sources, self.kind, self.vocab_size = list(tc.committee), tc.committee_weights, vocab_size
        self.fixed = list(tc.committee_fixed)
        self.module = self.optimizer = None
        if self.kind == "learned":
            # its own generator: building the module leaves the student's random stream untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(tc.seed + 1)
                self.module = TeacherUnderstanding(hidden_size, len(self.sources), tc.committee_dim).to(device)
            self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=tc.committee_lr, weight_decay=0.0)

    def weights(self, hidden: torch.Tensor, targets: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha (N, M) for the student's term, log alpha (N, M) — with the module's gradient when learned)."""
        n, device = hidden.shape[0], hidden.device
        if self.kind == "learned":
            log_alpha = self.module(hidden)                                    # (N, M) hidden detached inside
            return log_alpha.detach().exp(), log_alpha
        if self.kind == "uniform":
            alpha = committee_loss.uniform_weights(n, len(self.sources), device)
        elif self.kind == "fixed":
            alpha = committee_loss.fixed_weights(n, self.fixed, device)
        else:
            alpha = committee_loss.confidence_weights(targets, self.vocab_size).to(device)
        return alpha, alpha.clamp(min=1e-30).log()


# ---- the stage -----------------------------------------------------------------------------------------

def run(cfg: Config, resume: bool = True) -> Path:
    tc = cfg.train
    spec = objective_spec(tc)
    device = pick_device(tc.device)
    torch.manual_seed(tc.seed)
    if tc.committee:
        tokens, member_stores = open_committee(cfg, tc.committee)
        signals = member_stores[tc.committee[0]]
    else:
        tokens, signals = open_stores(cfg, tc.source)
        member_stores = None
    # layerdrop/random students and the saved tokenizer come from the teacher, whichever source the signal is
    teacher_spec = cfg.precompute.teacher

    student = build_student(tc.student, teacher_spec, seed=tc.seed)
    for store in (member_stores or {"": signals}).values():
        check_student(student, store, tc.student)
    student.config.use_cache = False
    out_dir, ckpt_dir = cfg.student_dir, cfg.student_dir / "checkpoints"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "init" / "config.json").exists():  # the untrained student, evaluate's baseline
        save_student(student, out_dir / "init", teacher_spec)
    student.to(device).train()

    decay = [p for n, p in student.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95),
                                  foreach=device.type == "cuda")
    lr_schedule = WarmupCosineLR(tc.lr, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    taid = TAIDSchedule(total_steps=tc.max_steps) if spec.name == "taid" else None
    committee = None
    if tc.committee:
        if spec.name == "ce":
            raise KdcacheError("invalid config: train.committee needs a distillation loss, not train.loss=ce")
        committee = Committee(tc, student.config.hidden_size, signals.manifest.params["vocab_size"], device)

    step, position = 0, 0
    log_path = out_dir / "metrics.jsonl"
    checkpoint = latest_checkpoint(ckpt_dir) if resume else None
    if not resume:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        log_path.unlink(missing_ok=True)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, student, optimizer, committee)
        step, position = state["step"], state["position"]
        if taid is not None:
            taid.load_state_dict(state["taid"])
        _truncate_log(log_path, step)
        print(f"train: resuming from {checkpoint.name} (step {step}, sequence {position})", flush=True)
    if step >= tc.max_steps:
        print(f"train: already at step {step} of {tc.max_steps}", flush=True)
    else:
        dataset = CachedKDDataset(tokens, member_stores or signals, "train", tc.batch_size, seed=tc.seed,
                                  start=position)
        stream = Prefetcher(dataset, device, depth=tc.prefetch)
        bar = tqdm(total=tc.max_steps, initial=step, desc=f"train ({spec.name})", unit="step")
        try:
            with open(log_path, "a") as log:
                while step < tc.max_steps:
                    step, position = _train_step(student, optimizer, stream, spec, tc, device, lr_schedule, taid,
                                                 step, log, bar, committee=committee)
                    if step % tc.checkpoint_every == 0 or step == tc.max_steps:
                        state = {"step": step, "position": position,
                                 "lr_schedule": lr_schedule.state_dict(),
                                 "taid": taid.state_dict() if taid is not None else None,
                                 "config": cfg.to_dict()}
                        save_checkpoint(ckpt_dir, step, student, optimizer, state, tc.keep_checkpoints,
                                        committee)
        finally:
            stream.close()
            bar.close()
    save_student(student.cpu(), out_dir / "final", teacher_spec)
    print(f"train: student saved to {out_dir / 'final'}", flush=True)
    return out_dir / "final"


def _train_step(student, optimizer, stream, spec, tc, device, lr_schedule, taid, step, log, bar, committee=None):
    """One optimiser step over grad_accum micro-batches, normalised once by the step's loss-token count."""
    start = time.perf_counter()
    micro = [next(stream) for _ in range(tc.grad_accum)]
    position = micro[-1][0]
    prepared = [loss_inputs(batch, committee.sources if committee else None) for _, batch in micro]
    n_tokens = max(1, sum(int(p[0].numel()) for p in prepared))
    lr = lr_schedule.lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    totals: dict[str, float] = {}
    for (_, batch), (positions, labels, target) in zip(micro, prepared):
        every = torch.ones_like(labels, dtype=torch.bool)
        taid_t = taid.t if taid is not None else None
        if committee is None:
            with autocast(device, tc.precision):
                logits = student_logits(student, batch["input_ids"], positions)   # (N, V)
            out = compute_objective(logits, target, labels, every, spec, taid_t=taid_t)
        else:
            with autocast(device, tc.precision):
                logits, hidden = student_logits(student, batch["input_ids"], positions, return_hidden=True)
            alpha, log_alpha = committee.weights(hidden, target)               # (N, M), (N, M)
            out = committee_loss.committee_objective(logits, target, alpha, labels, every, spec, taid_t=taid_t)
            nll = committee_loss.mixture_nll(log_alpha, committee_loss.label_logprobs(
                target, labels, committee.vocab_size))                        # the weights' own objective
            if committee.module is not None:
                (nll / n_tokens).backward()
            out["committee_nll_sum"] = nll.detach()
            for m, source in enumerate(committee.sources):
                out[f"alpha_{source}"] = alpha[:, m].sum()
        (out["loss_sum"] / n_tokens).backward()
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), tc.clip_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if committee is not None and committee.module is not None:
        committee.optimizer.step()
        committee.optimizer.zero_grad(set_to_none=True)
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
