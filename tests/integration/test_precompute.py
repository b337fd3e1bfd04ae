"""precompute end to end on a tiny teacher: exact signals, resume after failure and after SIGKILL, dask cluster."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.pipeline.config import load_config
from kdcache.stages import precompute, prepare
from kdcache.storage import open_store, read_shard
from tests.conftest import build_tiny_model, tiny_overrides

pytestmark = pytest.mark.integration


def _store_bytes(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted((path / "shards").rglob("*")) if p.is_file()}


def test_signals_equal_the_teachers_topk(tmp_path, tiny_teacher):
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, tiny_overrides(tmp_path / "run", tiny_teacher, **{"precompute.value_encoding": "float32"}))
    prepare.run(cfg)
    signals = precompute.run(cfg)
    tokens = open_store(cfg.tokens_dir)
    assert signals.manifest.complete and signals.manifest.fingerprints["token_store"] == tokens.manifest.fingerprint()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    name = signals.manifest.shards[0].name
    ids = torch.from_numpy(tokens.read_shard(name)["input_ids"].astype(np.int64))
    with torch.no_grad():
        logits = teacher(ids).logits                                     # (n, T, V)
    sig = read_shard(signals, name)
    want_vals, want_ids = torch.topk(logits, 8, dim=-1)
    np.testing.assert_array_equal(sig["ids"], want_ids.numpy())
    np.testing.assert_allclose(sig["lognorm"], torch.logsumexp(logits, -1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sig["logprobs"], torch.log_softmax(logits, -1).gather(-1, want_ids).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_failed_run_resumes_with_only_the_missing_shards(tmp_path, tiny_teacher, monkeypatch):
    cfg = load_config(None, tiny_overrides(tmp_path / "run", tiny_teacher))
    prepare.run(cfg)
    real, calls = precompute.precompute_shard, []

    def failing(*args, **kwargs):
        if len(calls) == 2:
            raise RuntimeError("worker lost")
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(precompute, "precompute_shard", failing)
    with pytest.raises(RuntimeError, match="worker lost"):
        precompute.run(cfg)
    done_before = _store_bytes(cfg.signals_dir)
    monkeypatch.setattr(precompute, "precompute_shard", lambda *a, **k: (calls.append(a[2]), real(*a, **k))[1])
    store = precompute.run(cfg)
    total = len(store.manifest.layout)
    assert store.manifest.complete and len(calls) == total  # 2 before the failure + the rest, none twice
    assert len(set(calls)) == total
    after = _store_bytes(cfg.signals_dir)
    assert all(after[k] == v for k, v in done_before.items())  # committed shards untouched


def test_sigkill_mid_run_then_rerun_completes_identically(tmp_path, tiny_tokenizer):
    # a teacher big enough that the run lasts seconds, so the kill lands mid-run
    teacher = build_tiny_model(tmp_path / "teacher", tiny_tokenizer, layers=4, hidden=256)
    extra = {"prepare.seq_len": 128, "prepare.max_train_sequences": 96, "prepare.shard_sequences": 4,
             "precompute.batch_size": 4}
    # TQDM_DELAY=0: the resume line is asserted, and a rerun of 23 tiny shards can finish within the default 5 s
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1",
           "TQDM_DELAY": "0"}

    def cli(run_dir, *cmd):
        args = [sys.executable, "-m", "kdcache.pipeline.cli", *cmd]
        for o in tiny_overrides(run_dir, teacher, **extra):
            args += ["-s", o]
        return args

    reference = tmp_path / "reference"
    subprocess.run(cli(reference, "prepare"), env=env, check=True, capture_output=True)
    subprocess.run(cli(reference, "precompute"), env=env, check=True, capture_output=True)

    run = tmp_path / "killed"
    subprocess.run(cli(run, "prepare"), env=env, check=True, capture_output=True)
    proc = subprocess.Popen(cli(run, "precompute"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = run / "signals" / "teacher" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len([p for p in shards.glob("*") if not p.name.startswith(".")]) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = [p.name for p in shards.glob("*") if not p.name.startswith(".")]
    total = len(open_store(run / "tokens").manifest.layout)
    assert 3 <= len(committed) < total, "the kill should land mid-run"
    before = {n: (shards / n / "_commit.json").stat().st_mtime_ns for n in committed}
    out = subprocess.run(cli(run, "precompute"), env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"{total - len(committed)} of {total} shards to do" in out.stderr
    assert all((shards / n / "_commit.json").stat().st_mtime_ns == t for n, t in before.items())
    assert _store_bytes(run / "signals" / "teacher") == _store_bytes(reference / "signals" / "teacher")
    assert open_store(run / "signals" / "teacher").manifest.complete


def test_local_cluster_writes_the_same_store_as_sync(tmp_path, tiny_teacher):
    # the hybrid kind: exact top-k plus seeded draws, so two workers must also draw what the sync run drew
    kind = {"precompute.signal": "hybrid", "precompute.k": 4, "precompute.samples": 16}
    sync = load_config(None, tiny_overrides(tmp_path / "sync", tiny_teacher, **kind))
    prepare.run(sync)
    precompute.run(sync)
    dist = load_config(None, tiny_overrides(tmp_path / "dist", tiny_teacher, **kind,
                                            **{"precompute.scheduler": "local", "precompute.workers": 2,
                                               "precompute.threads_per_worker": 1}))
    prepare.run(dist)
    precompute.run(dist)
    assert _store_bytes(sync.signals_dir) == _store_bytes(dist.signals_dir)


def test_arrow_backend_and_int8_values_end_to_end(tmp_path, tiny_teacher):
    """prepare + precompute into Arrow stores with int8 values: verified clean, the teacher's top-k within the
    int8 bound, convertible to Zarr with the same fingerprint, and trainable."""
    from transformers import AutoModelForCausalLM

    from kdcache.stages import train
    from kdcache.storage.tools import convert_store, verify_store

    cfg = load_config(None, tiny_overrides(tmp_path / "run", tiny_teacher, **{
        "prepare.backend": "arrow", "precompute.backend": "arrow", "precompute.value_encoding": "int8",
        "train.max_steps": 2, "train.checkpoint_every": 2}))
    prepare.run(cfg)
    signals = precompute.run(cfg)
    tokens = open_store(cfg.tokens_dir)
    assert tokens.manifest.backend == signals.manifest.backend == "arrow"
    assert (cfg.signals_dir / "shards" / signals.manifest.shards[0].name / "data.arrow").exists()
    assert verify_store(cfg.tokens_dir) == ([], len(tokens.manifest.layout))
    assert verify_store(cfg.signals_dir)[0] == []
    name = signals.manifest.shards[0].name
    ids = torch.from_numpy(tokens.read_shard(name)["input_ids"].astype(np.int64))
    with torch.no_grad():
        logprobs = torch.log_softmax(AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()(ids).logits, -1)
    want_vals, want_ids = torch.topk(logprobs, 8, dim=-1)
    sig = read_shard(signals, name)
    np.testing.assert_array_equal(sig["ids"], want_ids.numpy())
    bound = (want_vals[..., :1] - want_vals[..., -1:]).numpy() / 510 * (1 + 2**-10) + 1e-5
    assert (np.abs(sig["logprobs"] - want_vals.numpy()) <= bound).all()
    converted = convert_store(cfg.signals_dir, tmp_path / "zarr-signals", "zarr")
    assert converted.manifest.fingerprint() == signals.manifest.fingerprint()
    zarr_tokens = convert_store(cfg.tokens_dir, tmp_path / "zarr-tokens", "zarr")  # signals still match them
    open_store(tmp_path / "zarr-signals", expect={"token_store": zarr_tokens.manifest.fingerprint()})
    np.testing.assert_array_equal(read_shard(converted, name)["logprobs"], sig["logprobs"])
    train.run(cfg)
    assert (cfg.student_dir / "final").exists()


VICTIM = "train-00001"


def dies_once_mid_task(token_dir, signal_dir, name, *args):
    """Runs in a dask worker process: the first attempt at VICTIM computes the teacher's signal and then kills
    its whole worker process (os._exit, no cleanup) just before committing the shard."""
    from kdcache.stages import precompute as worker_precompute
    from kdcache.storage import Store

    marker = Path(signal_dir).parent / f"died-{name}"
    if name == VICTIM and not marker.exists():
        marker.write_text(str(os.getpid()))

        def die(self, *a, **k):
            os._exit(1)

        Store.write_shard = die
    return worker_precompute.precompute_shard(token_dir, signal_dir, name, *args)


def test_worker_killed_mid_task_is_retried_and_the_store_ends_identical(tmp_path, tiny_teacher, monkeypatch,
                                                                        capsys):
    sync = load_config(None, tiny_overrides(tmp_path / "sync", tiny_teacher))
    prepare.run(sync)
    precompute.run(sync)
    dist = load_config(None, tiny_overrides(tmp_path / "dist", tiny_teacher,
                                            **{"precompute.scheduler": "local", "precompute.workers": 2,
                                               "precompute.threads_per_worker": 1}))
    prepare.run(dist)
    assert VICTIM in [r.name for r in open_store(dist.tokens_dir).manifest.layout]
    monkeypatch.setattr(precompute, "precompute_shard", dies_once_mid_task)
    store = precompute.run(dist)
    assert "precompute: LocalCluster with 2 worker(s) x 1 torch thread(s) (dashboard: " in capsys.readouterr().out
    died = dist.signals_dir.parent / f"died-{VICTIM}"
    assert died.exists() and int(died.read_text()) != os.getpid()  # a worker process died, not this one
    assert store.manifest.complete
    assert _store_bytes(sync.signals_dir) == _store_bytes(dist.signals_dir)
