"""DDP training under torchrun (2 gloo processes on CPU): disjoint per-rank data, the single-process trajectory
with the equivalent global batch, rank-0 outputs, and a resume with another world size refused."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.pipeline.config import load_config
from kdcache.pipeline.errors import KdcacheError
from kdcache.stages import precompute, prepare, train
from kdcache.stages.data import CachedKDDataset
from kdcache.storage import open_store
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.integration

PER_RANK = 4  # shards of PER_RANK sequences: each rank's batch of a step is one whole shard
STORE = {"prepare.shard_sequences": PER_RANK, "train.max_steps": 6, "train.checkpoint_every": 3}


@pytest.fixture(scope="module")
def store_run(tmp_path_factory, tiny_teacher):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    cfg = load_config(None, tiny_overrides(run_dir, tiny_teacher, **STORE))
    prepare.run(cfg)
    precompute.run(cfg)
    return run_dir


def _copy(store_run, dest):
    shutil.copytree(store_run, dest, ignore=shutil.ignore_patterns("student"))
    return dest


def _losses(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "student" / "metrics.jsonl").read_text().splitlines()]


def test_ranks_stream_disjoint_shards_that_together_make_the_single_process_batches(store_run):
    tokens, signals = open_store(store_run / "tokens"), open_store(store_run / "signals" / "teacher")
    single = iter(CachedKDDataset(tokens, None, "train", 2 * PER_RANK, seed=3))
    ranks = [iter(CachedKDDataset(tokens, None, "train", PER_RANK, seed=3, rank=r, world=2)) for r in (0, 1)]
    n_shards = len(tokens.manifest.splits()["train"])
    for step in range(n_shards):  # two epochs
        _, whole = next(single)
        parts = [next(r)[1]["input_ids"] for r in ranks]
        np.testing.assert_array_equal(np.concatenate(parts), whole["input_ids"])
        if step < n_shards // 2:  # within an epoch the ranks' sequences never overlap
            assert not {tuple(x) for x in parts[0]} & {tuple(x) for x in parts[1]}
    # a resumed rank continues its own stream
    _, expected = next(CachedKDDataset(tokens, None, "train", PER_RANK, seed=3, rank=1, world=2, start=3 * PER_RANK)
                       .__iter__())
    fresh = iter(CachedKDDataset(tokens, None, "train", PER_RANK, seed=3, rank=1, world=2))
    for _ in range(3):
        next(fresh)
    np.testing.assert_array_equal(next(fresh)[1]["input_ids"], expected["input_ids"])
    with pytest.raises(ValueError, match="fewer than the 9 ranks"):
        CachedKDDataset(tokens, signals, "train", PER_RANK, world=9)


def test_torchrun_two_processes_match_one_process_with_the_global_batch(tmp_path, store_run, tiny_teacher):
    single = load_config(None, tiny_overrides(_copy(store_run, tmp_path / "single"), tiny_teacher,
                                              **STORE, **{"train.batch_size": 2 * PER_RANK}))
    train.run(single)
    reference = _losses(single.run_dir)

    ddp_dir = _copy(store_run, tmp_path / "ddp")
    overrides = tiny_overrides(ddp_dir, tiny_teacher, **STORE, **{"train.batch_size": PER_RANK})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "kdcache.pipeline.cli", "train"] + [a for o in overrides for a in ("-s", o)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    log = _losses(ddp_dir)
    assert [r["step"] for r in log] == list(range(1, 7))  # rank 0 alone writes the log, each step once
    assert [r["tokens"] for r in log] == [r["tokens"] for r in reference]  # the global token count
    torch.testing.assert_close(torch.tensor([r["loss"] for r in log]), torch.tensor([r["loss"] for r in reference]),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor([r["grad_norm"] for r in log]),
                               torch.tensor([r["grad_norm"] for r in reference]), rtol=1e-3, atol=1e-5)
    state = json.loads((ddp_dir / "student" / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["positions"]) == 2
    assert (ddp_dir / "student" / "final" / "config.json").exists()

    # the per-rank stream positions of a 2-process checkpoint do not fit one process: refused in one line
    more = load_config(None, tiny_overrides(ddp_dir, tiny_teacher, **{**STORE, "train.max_steps": 8}))
    with pytest.raises(KdcacheError, match=r"written by 2 process\(es\) but this run has 1"):
        train.run(more)
