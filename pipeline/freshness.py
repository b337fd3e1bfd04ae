"""Stage freshness for the Makefile: which config fields each stage's output depends on, and completion markers.

`make` decides by file times. Two kinds of small files in RUN/.stages/ give it what it needs:

  <stage>.config  the config fields the stage's output depends on, rewritten only when they change — so editing
                  train.lr touches train.config alone, and make reruns train and what depends on it.
  <stage>.done    written when the stage finishes. A store's manifest exists from the first shard on, so it cannot
                  tell a finished stage from a killed one; a killed stage leaves no .done and is rerun (and resumes).

Upstream outputs are covered by the dependency chain itself (precompute.done depends on prepare.done, ...).
"""
from __future__ import annotations

import json
from pathlib import Path

from kdcache.pipeline.config import TEACHER_SOURCE, Config

STAGES_DIR = ".stages"

# fields that change how a stage runs, not what it produces
EXECUTION_ONLY = {
    "precompute": {"scheduler", "workers", "threads_per_worker", "retries", "worker_timeout"},
    "train": {"prefetch", "checkpoint_every", "keep_checkpoints"},
}


def stage_inputs(cfg: Config) -> dict[str, dict]:
    """stage -> the config values its output depends on (beyond its upstream stages' outputs)."""
    out = {}
    for stage in ("prepare", "precompute", "train", "evaluate", "assistants"):
        section = getattr(cfg, stage).__dict__
        out[stage] = {k: v for k, v in section.items() if k not in EXECUTION_ONLY.get(stage, set())}
    if cfg.prepare.tokenizer == "teacher":  # the token store is made with the teacher's tokenizer
        out["prepare"]["teacher"] = cfg.precompute.teacher
    out["evaluate"]["device"] = cfg.train.device
    # the size floor is relative to the student; the assistant learns with the student's tail mode and device
    out["assistants"].update(student=cfg.train.student, tail=cfg.train.tail, device=cfg.train.device)
    return out


def precompute_stage(source: str) -> str:
    """The stage name (and .done marker) of caching one source: precompute, or precompute-<source>."""
    return "precompute" if source == TEACHER_SOURCE else f"precompute-{source}"


def stages_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir) / STAGES_DIR


def _atomic_write_text(path: Path, text: str) -> Path:
    # imported when writing: kdcache.storage's package imports zarr, which the make helpers must not load
    from kdcache.storage.files import atomic_write_text

    return atomic_write_text(path, text)


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    _atomic_write_text(path, text)
    return True


def write_stamps(cfg: Config) -> list[str]:
    """Write RUN/.stages/<stage>.config for every stage whose inputs changed; returns those stages."""
    folder = stages_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    changed = []
    for stage, inputs in stage_inputs(cfg).items():
        if _write_if_changed(folder / f"{stage}.config", json.dumps(inputs, indent=1, sort_keys=True) + "\n"):
            changed.append(stage)
    return changed


def mark_done(cfg: Config, stage: str, summary: dict | None = None) -> Path:
    """Record that `stage` finished (the Makefile's target for the stage)."""
    folder = stages_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stage}.done"
    return _atomic_write_text(path, json.dumps(summary or {}, indent=1, sort_keys=True, default=str) + "\n")
