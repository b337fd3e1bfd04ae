"""train: a student learns from the cached teacher signal. No teacher model is ever constructed here.

Recipe: open the token + signal stores (fingerprints checked) -> build the student -> stream batches (background
prefetch) -> objective on the sparse targets of the loss positions -> AdamW with warmup + cosine LR, gradient
accumulation and clipping -> atomic checkpoints (model, optimiser, schedules, stream position) -> save_pretrained.

A rerun resumes from the last checkpoint. Raising train.max_steps continues the run: the LR and TAID schedules
are extended from the resume step (kdcache.stages.schedules: WarmupCosineLR.extend, TAIDSchedule.extend), never
re-warmed. Any other change of a setting that shapes the trajectory, or of the stores it reads, is refused with
one line naming it (resume_plan); --overwrite starts the student over, train.output=NAME trains another beside it.
The config a student was trained with is recorded in RUN/<train.output>/config.yaml (evaluate reads it) and the
saved student carries final/training.json (its step and the sha256 of its weights), by which an evaluation of an
earlier student is told apart.

Under torchrun (WORLD_SIZE > 1) every rank streams its own disjoint shards, the loss is normalised by the global
token count of the step and the gradients are summed over the ranks once per step, so the run follows the
single-process one with batch_size x world. Rank 0 writes the log, the checkpoints (which record the world size
and every rank's stream position) and the student. A single process takes none of these detours.
With train.committee the student reads several sources in lockstep and learns from their weighted mix
(kdcache.stages.losses.committee; weights learned by kdcache.stages.committee.TeacherUnderstanding, or a baseline).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model

from kdcache.pipeline.config import RECORD_NAME, TEACHER_SOURCE, Config, TrainConfig, record_config
from kdcache.pipeline.errors import KdcacheError
from kdcache.stages.committee import TeacherUnderstanding
from kdcache.stages.data import CachedKDDataset, Prefetcher, signal_key
from kdcache.stages.losses import ObjectiveSpec, compute_objective
from kdcache.stages.losses import committee as committee_loss
from kdcache.stages.models import (build_student, load_tokenizer, model_fingerprint, model_tokenizer_fingerprint)
from kdcache.stages.progress import progress
from kdcache.stages.runtime import all_reduce_sum, autocast, init_distributed, pick_device
from kdcache.stages.schedules import TAIDSchedule, WarmupCosineLR
from kdcache.stages.signals import sparse_target
from kdcache.storage import Store
from kdcache.storage.files import atomic_write_text

CHECKPOINT_PREFIX = "step-"
TENSORBOARD_DIR = "tensorboard"
TRAINING_RECORD = "training.json"  # in RUN/<train.output>/final: its step, the sha256 of its weights, its inputs
# train settings that change how a run executes, logs or checkpoints, not its trajectory: a checkpoint made with
# other values resumes (chunk_size only cuts the same loss into pieces; output is the folder's own name)
RESUMABLE = frozenset({"checkpoint_every", "keep_checkpoints", "prefetch", "device", "chunk_size",
                       "trust_remote_code", "output"})
OVERWRITE_HINT = "pass --overwrite (make: OVERWRITE=1) to start it over, or -s train.output=NAME to train a new " \
                 "student beside it"


def objective_spec(tc: TrainConfig) -> ObjectiveSpec:
    try:
        return ObjectiveSpec(name=tc.loss, tail=tc.tail, temperature=tc.temperature, ce_weight=tc.ce_weight,
                             jsd_beta=tc.jsd_beta, skew_alpha=tc.skew_alpha, rlkd_k=tc.rlkd_k,
                             rlkd_weight=tc.rlkd_weight, rlkd_dynamic=tc.rlkd_dynamic, chunk_size=tc.chunk_size)
    except ValueError as e:
        raise KdcacheError(f"invalid config: {e}") from None


def taid_schedule(tc: TrainConfig) -> TAIDSchedule:
    return TAIDSchedule(total_steps=tc.max_steps, t_start=tc.taid_t_start, t_end=tc.taid_t_end,
                        alpha=tc.taid_alpha, beta=tc.taid_beta, adaptive=tc.taid_adaptive)


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


def check_student(student, signals: Store, student_spec: str, trust_remote_code: bool = False) -> None:
    """The student's output layer must match the cached vocabulary, and a shipped tokenizer must match too."""
    vocab = signals.manifest.params["vocab_size"]
    student_vocab = student.get_output_embeddings().weight.shape[0]
    if student_vocab != vocab:
        raise KdcacheError(f"student {student_spec!r} has vocabulary size {student_vocab} but the cache "
                           f"{signals.path} has {vocab}: the student must share the teacher's tokenizer")
    path = Path(student_spec)
    if path.is_dir() and (path / "tokenizer_config.json").exists():
        fp = model_tokenizer_fingerprint(str(path), trust_remote_code)
        if fp != signals.manifest.fingerprints["tokenizer"]:
            raise KdcacheError(f"student {student_spec!r} tokenizer {fp} differs from the cache's "
                               f"{signals.manifest.fingerprints['tokenizer']}: use a student with the teacher's tokenizer")


def peaks_note(loss: str, signals: Store, output: str = TrainConfig.output) -> str | None:
    """A warning when an objective built on the teacher's exact distribution shape reads a sampled cache: TAID
    interpolates teacher logits, which a `sample` cache holds only for the drawn ids (every other id gets
    probability 0 in its target), and RLKD ranks the teacher's top ids, which count ties blur. A hybrid cache
    keeps exact top-k peaks. The advice is the pair of commands that works in the same run folder: a top-k cache
    of the same model as a source of its own beside the sampled one (which other students may use), and a new
    student trained from it beside the current one."""
    kind = signals.manifest.params.get("signal", "topk")
    if kind != "sample" or not (loss == "taid" or loss.startswith("rlkd")):
        return None
    source = signals.manifest.params.get("source", TEACHER_SOURCE)
    topk = "topk" if source == TEACHER_SOURCE else f"{source}-topk"
    model = "" if source == TEACHER_SOURCE else f" --model {signals.manifest.params.get('teacher')}"
    name = loss.split("+")[0]
    student = name if name != output else f"{name}-topk"
    return (f"train: warning: train.loss={loss} on the sampled cache {signals.path} (precompute.signal=sample): "
            f"{name.upper()} needs the teacher's exact peaks, which a sampled cache only estimates; cache them beside "
            f"it and train from there: `kdcache precompute --source {topk}{model} -s precompute.signal=topk` then "
            f"`kdcache train --loss {loss} -s train.source={topk} -s train.output={student}` (give both this run's "
            "-c/--run-dir/-s options first)")


def student_hidden(student, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The last hidden states where the loss is taken: (B, T, H) -> rows at `positions` (N,) -> (N, H).
    The output layer is applied later, chunk by chunk, inside the objective (see output_head)."""
    hidden = student.base_model(input_ids=input_ids).last_hidden_state     # (B, T, H)
    return hidden.flatten(0, 1)[positions]                                  # (N, H)


def output_head(student, device: torch.device, precision: str = "fp32"):
    """The student's output layer as compute_objective's lm_head: hidden (n, H) -> float32 logits (n, V), under
    the run's autocast, so the (N, V) logits of a batch never exist at once."""
    lm_head = student.get_output_embeddings()

    def head(hidden: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return lm_head(hidden).float()                                  # (n, V)
    return head


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


def training_inputs(cfg: Config, stores: dict[str, Store]) -> dict:
    """What a checkpoint's trajectory depends on: the train settings that shape it (all but RESUMABLE) and the
    content of the stores it streams, {"tokens" | "signals/<source>": fingerprint}. As JSON would give it back."""
    shaping = {k: v for k, v in cfg.train.__dict__.items() if k not in RESUMABLE}
    return json.loads(json.dumps({"train": shaping,
                                  "stores": {name: s.manifest.fingerprint() for name, s in stores.items()}}))


def _show(value) -> str:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else str(value)


def setting_changes(saved: dict, inputs: dict) -> list[str]:
    """How `inputs` differ from the inputs a checkpoint was made from, one `train.lr: 0.003 -> 0.001` or
    `signals/teacher: sha256:... -> sha256:...` each; RESUMABLE settings and max_steps (see resume_plan) aside."""
    old, new = saved["train"], inputs["train"]
    changes = [f"train.{k}: {_show(old.get(k))} -> {_show(new.get(k))}"
               for k in sorted((set(old) | set(new)) - RESUMABLE - {"max_steps"}) if old.get(k) != new.get(k)]
    if isinstance(saved["stores"], list):  # a checkpoint from before the stores were named
        if sorted(saved["stores"]) != sorted(inputs["stores"].values()):
            changes.append("the cached stores were rebuilt")
        return changes
    for name in sorted(set(saved["stores"]) & set(inputs["stores"])):  # another source is a train.* change above
        if saved["stores"][name] != inputs["stores"][name]:
            changes.append(f"{name}: {saved['stores'][name][:19]}... -> {inputs['stores'][name][:19]}... (rebuilt)")
    return changes


def resume_plan(out_dir: Path, inputs: dict, max_steps: int, overwrite: bool) -> tuple[str, dict | None, str]:
    """What to do with the student already in out_dir: (action, saved, why). saved is the latest checkpoint's
    state (or, with no checkpoint left, final/training.json; None when there is no student). action:
      fresh       no student yet: train from step 0
      resume      the same settings: continue from the checkpoint (or nothing to do, already trained)
      extend      only max_steps raised: continue from the checkpoint, schedules extended to the new horizon
      start over  --overwrite and a student that a fresh run with these settings would not retrace (other
                  settings, another max_steps, or extended before): it is removed, training starts from step 0
    Without --overwrite any other change (lr, loss, student, a rebuilt store, a lower max_steps, ...) raises one
    line naming it and the two ways on. `why` names the changes of a start over."""
    checkpoint = latest_checkpoint(out_dir / "checkpoints")
    record = out_dir / "final" / TRAINING_RECORD
    if checkpoint is not None:
        saved = json.loads((checkpoint / "state.json").read_text())
    elif record.exists():  # checkpoints deleted by hand: the saved student's record still says what it is
        saved = json.loads(record.read_text())
    else:
        return "fresh", None, ""
    if saved.get("inputs") is None:  # a checkpoint older than the record of its inputs: taken as these settings
        return "resume", saved, ""
    changes = setting_changes(saved["inputs"], inputs)
    before = saved["inputs"]["train"]["max_steps"]
    if overwrite:
        if before != max_steps:
            changes.append(f"train.max_steps: {before} -> {max_steps}")
        if not changes and saved.get("extended_at"):
            changes.append(f"extended at step(s) {_show(saved['extended_at'])}")
        return ("start over", saved, "; ".join(changes)) if changes else ("resume", saved, "")
    if max_steps < before:
        changes.append(f"train.max_steps: {before} -> {max_steps} (only a higher max_steps continues a run)")
    if changes:
        raise KdcacheError(f"{out_dir} holds a student trained with other settings ({'; '.join(changes)}): "
                           + OVERWRITE_HINT)
    if max_steps > before and checkpoint is None:
        raise KdcacheError(f"{out_dir} has no checkpoint left to continue from (train.max_steps: {before} -> "
                           f"{max_steps}): " + OVERWRITE_HINT)
    return ("extend" if max_steps > before else "resume"), saved, ""


def save_checkpoint(ckpt_dir: Path, step: int, student, optimizer, state: dict, keep: int,
                    committee: "Committee | None" = None) -> Path:
    """model.safetensors + optimizer.pt (tensors only) + state.json, written aside and renamed into place; a
    learned committee module adds committee.safetensors + committee_optimizer.pt (it is not in the student)."""
    final = ckpt_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_model(student, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if committee is not None and committee.module is not None:
            save_model(committee.module, str(tmp / "committee.safetensors"))
            torch.save(committee.optimizer.state_dict(), tmp / "committee_optimizer.pt")
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


def load_checkpoint(path: Path, student, optimizer, committee: "Committee | None" = None) -> dict:
    """Tensors only: safetensors, JSON, and torch.load(weights_only=True), which refuses any pickled object."""
    try:
        load_model(student, str(path / "model.safetensors"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        if committee is not None and committee.module is not None:
            load_model(committee.module, str(path / "committee.safetensors"))
            committee.optimizer.load_state_dict(torch.load(path / "committee_optimizer.pt", weights_only=True))
        return json.loads((path / "state.json").read_text())
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        # not --overwrite: with unchanged settings it would resume from this very checkpoint
        raise KdcacheError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {reason}): delete it to "
                           f"resume from an earlier one, or delete {path.parent} to start over") from e


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the safetensors files of a saved model, in name order: which student an evaluation measured."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def save_student(student, out: Path, tokenizer_spec: str, trust_remote_code: bool = False,
                 record: dict | None = None) -> None:
    """save_pretrained (+ the teacher's tokenizer) atomically, so `from_pretrained(out)` loads the student. With
    `record`, out/training.json holds it plus the sha256 of the saved weights."""
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    student.save_pretrained(tmp)
    load_tokenizer(tokenizer_spec, trust_remote_code).save_pretrained(tmp)
    if record is not None:
        (tmp / TRAINING_RECORD).write_text(json.dumps({**record, "sha256": weights_sha256(tmp)}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)


def student_record(model_dir: Path) -> dict | None:
    """The saved student's final/training.json (step, sha256 of its weights, ...), or None for a student saved
    without one."""
    path = Path(model_dir) / TRAINING_RECORD
    return json.loads(path.read_text()) if path.exists() else None


def clear_student(cfg: Config) -> None:
    """Forget the student of cfg.train.output: checkpoints, log, TensorBoard events, the saved untrained and
    trained students, its recorded config and its evaluation (which measured it). Only these: the folder may
    hold the user's own files."""
    out_dir = cfg.student_dir
    for name in ("checkpoints", TENSORBOARD_DIR, "init", "final"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", RECORD_NAME):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(cfg.eval_dir, ignore_errors=True)


def tensorboard_writer(path: Path, purge_step: int):
    """A SummaryWriter into `path` (events at steps >= purge_step from an earlier, interrupted run are hidden),
    or None with one info line when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("train: tensorboard is not installed, so per-step metrics go to metrics.jsonl only "
              "(pip install tensorboard for TensorBoard event files)", flush=True)
        return None
    return SummaryWriter(str(path), purge_step=purge_step)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log has each step once. Rewritten
    aside and renamed, so a kill during the rewrite cannot lose the lines that are kept."""
    if path.exists():
        lines = [l for l in path.read_text().splitlines() if l.endswith("}") and json.loads(l)["step"] <= step]
        atomic_write_text(path, "".join(l + "\n" for l in lines))


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

def run(cfg: Config, overwrite: bool = False) -> Path:
    """Train cfg.train.output; resume or continue what is there (see resume_plan). overwrite: start over a
    student trained with other settings instead of refusing."""
    tc = cfg.train
    spec = objective_spec(tc)
    rank, world, device = init_distributed(pick_device(tc.device))
    try:
        return _run(cfg, tc, spec, rank, world, device, overwrite)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run(cfg: Config, tc: TrainConfig, spec: ObjectiveSpec, rank: int, world: int, device, overwrite: bool) -> Path:
    torch.manual_seed(tc.seed)
    if tc.committee:
        if spec.name == "ce":
            raise KdcacheError("invalid config: train.committee needs a distillation loss, not train.loss=ce")
        if world > 1:
            raise KdcacheError("train.committee under torchrun is not supported yet: train a committee in one process")
        tokens, member_stores = open_committee(cfg, tc.committee)
        signals = member_stores[tc.committee[0]]
    else:
        tokens, signals = open_stores(cfg, tc.source)
        member_stores = None
    for store in (member_stores or {"": signals}).values():
        note = peaks_note(spec.name, store, tc.output)
        if note and rank == 0:
            print(note, flush=True)
    # layerdrop/random students and the saved tokenizer come from the teacher, whichever source the signal is
    teacher_spec = cfg.precompute.teacher
    n_shards = len(tokens.manifest.splits().get("train", []))
    if n_shards < world:
        raise KdcacheError(f"the train split has {n_shards} shards, fewer than the {world} ranks: prepare with a "
                           f"smaller prepare.shard_sequences or run fewer processes")

    student = build_student(tc.student, teacher_spec, seed=tc.seed, trust_remote_code=tc.trust_remote_code)
    for store in (member_stores or {"": signals}).values():
        check_student(student, store, tc.student, tc.trust_remote_code)
    student.config.use_cache = False
    out_dir, ckpt_dir = cfg.student_dir, cfg.student_dir / "checkpoints"
    log_path = out_dir / "metrics.jsonl"
    sources = tc.committee or [tc.source]
    inputs = training_inputs(cfg, {"tokens": tokens, **{f"signals/{s}": (member_stores or {s: signals})[s]
                                                         for s in sources}})
    action, saved, why = resume_plan(out_dir, inputs, tc.max_steps, overwrite)  # may refuse, before any change
    resumable = action in ("resume", "extend") and latest_checkpoint(ckpt_dir) is not None
    if resumable and saved.get("world_size", 1) != world:  # a rank's stream position belongs to that world's split
        raise KdcacheError(f"the checkpoints in {ckpt_dir} were written by {saved['world_size']} process(es) but "
                           f"this run has {world}: resume with {saved['world_size']} (torchrun "
                           f"--nproc_per_node={saved['world_size']}) or start over with --overwrite")
    if world > 1:
        dist.barrier()  # every rank has read the checkpoints before rank 0 may clear them
    if rank == 0:
        if action == "start over":
            print(f"train: --overwrite: starting {out_dir} over ({why}): its checkpoints (up to step "
                  f"{saved['step']}), log, saved students and evaluation are removed", flush=True)
        if action in ("fresh", "start over"):
            clear_student(cfg)  # also what a run killed before its first checkpoint left
            out_dir.mkdir(parents=True, exist_ok=True)
            # the untrained student, evaluate's baseline
            save_student(student, out_dir / "init", teacher_spec, cfg.precompute.trust_remote_code)
        record_config(cfg, out_dir, "kdcache train: the config this student is trained with (rewritten when it "
                                    "continues; evaluate reads it)")
    if world > 1:
        dist.barrier()  # rank 0 has cleared old checkpoints before anyone looks for one
    if action == "resume" and not resumable:  # checkpoints deleted by hand, the trained student is saved
        if rank == 0:
            print(f"train: {out_dir / 'final'} is already trained to step {saved['step']} (no checkpoint left)",
                  flush=True)
        return out_dir / "final"
    student.to(device).train()
    if world > 1:  # every rank starts from rank 0's weights, whatever its own random state
        for tensor in student.state_dict().values():
            dist.broadcast(tensor, 0)

    decay = [p for n, p in student.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95),
                                  foreach=device.type == "cuda")
    lr_schedule = WarmupCosineLR(tc.lr, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    taid = taid_schedule(tc) if spec.name == "taid" else None
    committee = None
    if tc.committee:
        committee = Committee(tc, student.config.hidden_size, signals.manifest.params["vocab_size"], device)

    step, position, extended_at = 0, 0, []
    checkpoint = latest_checkpoint(ckpt_dir) if action in ("resume", "extend") else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, student, optimizer, committee)
        step, position = state["step"], state.get("positions", [state["position"]])[rank]
        extended_at = state.get("extended_at", [])
        if state.get("lr_schedule"):  # an earlier extension lives in the schedule's state
            lr_schedule.load_state_dict(state["lr_schedule"])
        if taid is not None:
            taid.load_state_dict(state["taid"])
        if rank == 0:
            print(f"train: resuming from {checkpoint.name} (step {step}, sequence {position})", flush=True)
        if tc.max_steps > lr_schedule.total_steps:  # train.max_steps raised: the same run goes on, longer
            before = lr_schedule.total_steps
            lr_schedule.extend(step, tc.max_steps)
            if taid is not None:
                taid.extend(step, tc.max_steps)
            extended_at = [*extended_at, step]
            if rank == 0:
                lr, floor = lr_schedule.lr(step), tc.lr * tc.min_lr_ratio
                how = (f"stays at its minimum {floor:.2e} (the cosine had ended)" if math.isclose(lr, floor) else
                       f"goes on from {lr:.2e} at step {step} down a cosine to {floor:.2e} at step {tc.max_steps}")
                print(f"train: continuing to train.max_steps={tc.max_steps} (was {before}): the LR {how}", flush=True)
    if rank == 0:
        _truncate_log(log_path, step)  # lines past the resume point (all, when a run killed before its first checkpoint)
    if step >= tc.max_steps:
        if rank == 0:
            print(f"train: already at step {step} of {tc.max_steps}", flush=True)
    else:
        dataset = CachedKDDataset(tokens, member_stores or signals, "train", tc.batch_size, seed=tc.seed, start=position,
                                  rank=rank, world=world)
        stream = Prefetcher(dataset, device, depth=tc.prefetch)
        bar = progress(tc.max_steps, f"train ({spec.name})", unit="step", initial=step, disable=rank != 0)
        # events past the resume point were logged again above the checkpoint: purge_step hides the old ones
        board = tensorboard_writer(out_dir / TENSORBOARD_DIR, purge_step=step + 1) if rank == 0 else None
        try:
            with open(log_path, "a") if rank == 0 else contextlib.nullcontext() as log:
                while step < tc.max_steps:
                    step, position = _train_step(student, optimizer, stream, spec, tc, device, lr_schedule, taid,
                                                 step, log, bar, committee=committee, board=board)
                    if step % tc.checkpoint_every == 0 or step == tc.max_steps:
                        if board is not None:  # a killed run keeps every event up to its last checkpoint
                            board.flush()
                        positions = _gather_positions(position, world)
                        if rank == 0:
                            state = {"step": step, "position": positions[0], "positions": positions,
                                     "world_size": world, "lr_schedule": lr_schedule.state_dict(),
                                     "taid": taid.state_dict() if taid is not None else None,
                                     "config": cfg.to_dict(), "inputs": inputs, "extended_at": extended_at}
                            save_checkpoint(ckpt_dir, step, student, optimizer, state, tc.keep_checkpoints,
                                            committee)
        finally:
            stream.close()
            bar.close()
            if board is not None:
                board.close()
    if rank == 0:
        record = {"step": step, "inputs": inputs, "extended_at": extended_at, "world_size": world}
        save_student(student.cpu(), out_dir / "final", teacher_spec, cfg.precompute.trust_remote_code, record)
        print(f"train: student saved to {out_dir / 'final'}", flush=True)
    if world > 1:
        dist.barrier()  # the student is saved before any rank returns
    return out_dir / "final"


def _gather_positions(position: int, world: int) -> list[int]:
    """Every rank's stream position (one all-gather; [position] in a single process)."""
    if world == 1:
        return [position]
    gathered = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor([position], dtype=torch.int64))
    return [int(t) for t in gathered]


def _all_reduce_grads(student) -> None:
    """Sum the gradients over the ranks in one flat all-reduce (the loss is already divided by the global count)."""
    params = [p for p in student.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for grad, summed in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(summed)


def _train_step(student, optimizer, stream, spec, tc, device, lr_schedule, taid, step, log, bar, committee=None,
                board=None):
    """One optimiser step over grad_accum micro-batches, normalised once by the step's (global) loss-token count.
    `log` (the JSONL file) and `board` (a TensorBoard writer, or None) are None on ranks other than 0."""
    start = time.perf_counter()
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    micro = [next(stream) for _ in range(tc.grad_accum)]
    position = micro[-1][0]
    prepared = [loss_inputs(batch, committee.sources if committee else None) for _, batch in micro]
    n_tokens = sum(int(p[0].numel()) for p in prepared)
    if distributed:
        n_tokens = int(all_reduce_sum(torch.tensor(n_tokens, dtype=torch.int64)))
    n_tokens = max(1, n_tokens)
    lr = lr_schedule.lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    head = output_head(student, device, tc.precision)
    totals: dict[str, torch.Tensor] = {}
    for (_, batch), (positions, labels, target) in zip(micro, prepared):
        every = torch.ones_like(labels, dtype=torch.bool)
        taid_t = taid.t if taid is not None else None
        with autocast(device, tc.precision):
            hidden = student_hidden(student, batch["input_ids"], positions)   # (N, H)
        if committee is None:
            out = compute_objective(hidden, target, labels, every, spec, taid_t=taid_t, lm_head=head)
        else:
            alpha, log_alpha = committee.weights(hidden, target)               # (N, M), (N, M)
            out = committee_loss.committee_objective(hidden, target, alpha, labels, every, spec, taid_t=taid_t,
                                                     lm_head=head)
            nll = committee_loss.mixture_nll(log_alpha, committee_loss.label_logprobs(
                target, labels, committee.vocab_size))                        # the weights' own objective
            if committee.module is not None:
                (nll / n_tokens).backward()
            out["committee_nll_sum"] = nll.detach()
            for m, source in enumerate(committee.sources):
                out[f"alpha_{source}"] = alpha[:, m].sum()
        (out["loss_sum"] / n_tokens).backward()
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + v.detach().double().cpu()
    if distributed:
        _all_reduce_grads(student)
        summed = all_reduce_sum(torch.stack([totals[k] for k in sorted(totals)]))
        totals = dict(zip(sorted(totals), summed))
    totals = {k: float(v) for k, v in totals.items()}
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
    if log is not None:
        log.write(json.dumps(record) + "\n")
        log.flush()
    if board is not None:  # the same numbers as the JSONL line, one scalar per key
        for key, value in record.items():
            if key != "step":
                board.add_scalar(key, value, step)
    postfix = {"loss": f"{record['loss']:.3f}", "lr": f"{lr:.1e}", "tok_s": f"{n_tokens / record['seconds']:.0f}"}
    if taid is not None:
        postfix["t"] = f"{record['taid_t']:.4f}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1)
    return step, position
