"""MiniDisc end to end on tiny models: one slimmable trial from the cache, the λ choice, the chain, the Makefile."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdcache.pipeline.cli import main
from kdcache.pipeline.config import load_config
from kdcache.pipeline.errors import KdcacheError
from kdcache.stages import assistants, precompute
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TINY_TA = {"assistants.grid": "0.2,0.4,0.6", "assistants.steps": 4, "assistants.calibration_sequences": 8,
           "assistants.batch_size": 4, "assistants.lr": 3e-3, "assistants.warmup_steps": 1}


def _cfg(tmp_path, cached_run, teacher, **extra):
    run_dir = tmp_path / "run"
    if not run_dir.exists():
        shutil.copytree(cached_run, run_dir)
    return load_config(None, tiny_overrides(run_dir, teacher, **{**TINY_TA, **extra}))


def test_run_with_assistant_chooses_by_the_tradeoff_and_trains_the_student_from_it(tmp_path, cached_run,
                                                                                   tiny_teacher):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tmp_path, cached_run, tiny_teacher)     # tokens and teacher signals done: run skips them
    args = ["run", "--assistant"]
    for o in tiny_overrides(cfg.run_dir, tiny_teacher, **TINY_TA):
        args += ["-s", o]
    assert main(args) == 0
    run_dir = Path(cfg.run_dir)
    plan = json.loads((cfg.assistants_dir / "ta_plan.json").read_text())
    table = plan["table"]
    assert [r["target_sparsity"] for r in table] == [0.2, 0.4, 0.6]
    assert all(r["sparsity"] >= r["target_sparsity"] and 0.0 <= r["P"] <= 1.0 for r in table)
    # the student (layerdrop:2 of 4 layers) has half the teacher's non-embedding parameters: the floor
    half = plan["size_floor"]["student_non_embedding_params"]
    assert [r["eligible"] for r in table] == [r["non_embedding_params"] >= half for r in table]
    best = max((r for r in table if r["eligible"]), key=lambda r: r["P"] + 0.2 * r["sparsity"])
    assert plan["chosen"]["target_sparsity"] == best["target_sparsity"] and sum(r["chosen"] for r in table) == 1
    assert (cfg.assistants_dir / "ta_tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    chosen = AutoModelForCausalLM.from_pretrained(cfg.assistants_dir / "chosen")
    assert (chosen.config.intermediate_size, chosen.config.num_key_value_heads) == (plan["chosen"]["neurons"],
                                                                                    plan["chosen"]["kv_groups"])
    # the chain: the chosen assistant's cache, a student trained from it, judged against the teacher's cache
    store = json.loads((run_dir / "signals" / "assistant" / "manifest.json").read_text())
    assert store["params"]["teacher"] == str(cfg.assistants_dir / "chosen")
    assert load_config(run_dir / "student" / "config.yaml").train.source == "assistant"  # the student's record
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["cache"]["path"] == str(run_dir / "signals" / "teacher")
    assert metrics["students"]["trained"]["kl_teacher"] < metrics["students"]["untrained"]["kl_teacher"]
    for stage in ("prepare", "precompute", "assistants", "precompute-assistant", "train", "evaluate"):
        assert (run_dir / ".stages" / f"{stage}.done").exists()
    assert main(["precompute", "--model", "x", "--run-dir", str(run_dir)]) == 2   # --model without --source

    # a new λ reuses the trained slimmable assistant (no teacher load); other trial inputs need --overwrite
    def no_teacher(*a, **k):
        raise AssertionError("a rerun with the same trial inputs must not prune again")

    real = assistants.load_teacher
    assistants.load_teacher = no_teacher
    try:
        again = assistants.run(load_config(None, tiny_overrides(cfg.run_dir, tiny_teacher,
                                                                **{**TINY_TA, "assistants.tradeoff_lambda": 5.0})))
    finally:
        assistants.load_teacher = real
    assert again["chosen"]["sparsity"] == max(r["sparsity"] for r in table if r["eligible"])
    with pytest.raises(KdcacheError, match="--overwrite"):
        assistants.run(load_config(None, tiny_overrides(cfg.run_dir, tiny_teacher,
                                                        **{**TINY_TA, "assistants.steps": 5})))


def test_slimmable_training_never_constructs_the_teacher(tmp_path, cached_run, tiny_teacher, monkeypatch):
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    import kdcache.stages.models

    cfg = _cfg(tmp_path, cached_run, tiny_teacher)
    tokens, signals = assistants.open_stores(cfg)
    cfg.assistants_dir.mkdir(parents=True)
    candidates = assistants.prune_teacher(cfg, tokens, cfg.assistants_dir)   # pruning needs the teacher: not spied
    widths = [assistants.Width(c["kv_groups"], c["heads_per_group"], c["neurons"]) for c in candidates]

    built, loaded = [], []
    init, from_pretrained = modeling_llama.LlamaForCausalLM.__init__, AutoModelForCausalLM.from_pretrained

    def spy_init(self, config, *a, **k):
        built.append((config.num_attention_heads, config.intermediate_size))
        init(self, config, *a, **k)

    def spy_load(path, *a, **k):
        loaded.append(Path(path).resolve())
        return from_pretrained(path, *a, **k)

    def no_teacher(*a, **k):
        raise AssertionError("slimmable training must not load the teacher")

    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "__init__", spy_init)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy_load)
    for module in (kdcache.stages.models, assistants, precompute):
        monkeypatch.setattr(module, "load_teacher", no_teacher)
    assistants.train_slimmable(cfg, tokens, signals, cfg.assistants_dir, widths)
    assert loaded == [(cfg.assistants_dir / "slimmable-init").resolve()]
    largest = (widths[0].heads, widths[0].neurons)
    assert built == [largest] and largest != (4, 64)            # the 20%-pruned slice, never the teacher's shape
    log = [json.loads(l) for l in (cfg.assistants_dir / "slimmable_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(len(r["kl"]) == 3 for r in log)  # largest, smallest, one middle width per step


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make not installed")
def test_make_runs_the_assistant_chain_and_reruns_only_what_changed(tmp_path):
    from kdcache.pipeline.freshness import mark_done, write_stamps

    installed = tmp_path / "installed"
    installed.touch()
    run = tmp_path / "run"
    stages = ("prepare", "precompute --run-dir", "assistants", "precompute --source assistant", "train", "evaluate")

    def plan(*overrides):
        args = " ".join(f"-s {o}" for o in overrides)
        out = subprocess.run(["make", "-n", "-C", str(REPO), "evaluate", "ASSISTANT=1", f"RUN={run}",
                              f"PYTHON={sys.executable}", f"STAMP={installed}", f"ARGS={args}"],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert out.returncode == 0, out.stderr
        return [s for s in stages if f"kdcache.pipeline.cli {s} " in out.stdout]

    def finish_all(*overrides):
        import time

        cfg = load_config(None, [f"run_dir={run}", "train.source=assistant", *overrides])
        write_stamps(cfg)
        now = time.time()
        for i, stage in enumerate(("prepare", "precompute", "assistants", "precompute-assistant", "train",
                                   "evaluate")):
            config = run / ".stages" / f"{stage.split('-')[0]}.config"
            os.utime(config, (now - 30, now - 30))
            os.utime(mark_done(cfg, stage), (now - 20 + i, now - 20 + i))

    assert plan() == list(stages)
    finish_all()
    assert plan() == []
    assert plan("assistants.tradeoff_lambda=0.5") == ["assistants", "precompute --source assistant", "train",
                                                      "evaluate"]
