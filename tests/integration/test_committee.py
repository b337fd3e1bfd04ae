"""Teaching committee end to end on tiny models: members cached in one precompute run (and added later at the
cost of their own shards only), a complementary teacher made by the pipeline, lockstep reading, committee
training that reduces to single-source training, a module checkpointed with the run and absent from the student."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kdcache.pipeline.cli import main
from kdcache.pipeline.config import load_config
from kdcache.pipeline.errors import KdcacheError
from kdcache.pipeline.freshness import stage_inputs
from kdcache.stages import evaluate, precompute, prepare, train
from kdcache.stages.data import CachedKDDataset, signal_key
from kdcache.storage import Store
from tests.conftest import build_tiny_model, build_tokenizer, tiny_overrides, train_interrupted

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def committee_run(tmp_path_factory, tiny_teacher, tiny_tokenizer):
    """Tokens + teacher + one member ("helper", another tiny model) cached by one precompute run."""
    root = tmp_path_factory.mktemp("committee")
    helper = build_tiny_model(root / "helper-model", tiny_tokenizer, layers=2, seed=3)
    run_dir = root / "run"
    cfg = load_config(None, tiny_overrides(run_dir, tiny_teacher, **{"precompute.members": f"[helper={helper}]"}))
    prepare.run(cfg)
    precompute.run(cfg)
    return run_dir, helper


def _copy(tmp_path, committee_run, teacher, **extra):
    run_dir = tmp_path / "run"
    if not run_dir.exists():
        shutil.copytree(committee_run[0], run_dir, ignore=shutil.ignore_patterns("student", "eval", "comp"))
    extra.setdefault("precompute.members", f"[helper={committee_run[1]}]")
    return load_config(None, tiny_overrides(run_dir, teacher, **extra))


def _log(path: Path):
    return [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]


def _count_tasks(monkeypatch):
    real, ran = precompute.precompute_shard, []

    def counting(token_dir, signal_dir, name, *a, **k):
        ran.append((Path(signal_dir).name, name))
        return real(token_dir, signal_dir, name, *a, **k)

    monkeypatch.setattr(precompute, "precompute_shard", counting)
    return ran


def test_one_run_caches_every_member_and_a_later_member_costs_only_its_shards(
        tmp_path, tiny_teacher, tiny_tokenizer, monkeypatch):
    helper = build_tiny_model(tmp_path / "helper", tiny_tokenizer, layers=2, seed=3)
    late = build_tiny_model(tmp_path / "late", tiny_tokenizer, layers=1, seed=4)
    cfg = load_config(None, tiny_overrides(tmp_path / "run", tiny_teacher, **{"precompute.members": f"[helper={helper}]"}))
    prepare.run(cfg)
    n_shards = len(Store.open(cfg.tokens_dir).manifest.layout)
    ran = _count_tasks(monkeypatch)
    precompute.run(cfg)
    assert sorted(ran) == sorted((s, r.name) for s in ("teacher", "helper")
                                 for r in Store.open(cfg.tokens_dir).manifest.layout)
    assert [s for s, _ in ran[:4]] == ["teacher", "helper", "teacher", "helper"]  # interleaved shard by shard
    teacher_files = {p: p.stat().st_mtime_ns for p in (cfg.signal_dir("teacher") / "shards").rglob("*")}
    for source, model in (("teacher", tiny_teacher), ("helper", helper)):
        store = Store.open(cfg.signal_dir(source))
        assert store.manifest.complete and store.manifest.params["source"] == source
        assert store.manifest.params["teacher"] == str(model)

    ran.clear()
    later = load_config(None, tiny_overrides(cfg.run_dir, tiny_teacher,
                                             **{"precompute.members": f"[helper={helper},late={late}]"}))
    assert stage_inputs(later)["precompute"] != stage_inputs(cfg)["precompute"]  # make sees the new member
    precompute.run(later)
    assert len(ran) == n_shards and {s for s, _ in ran} == {"late"}
    assert {p: p.stat().st_mtime_ns for p in (cfg.signal_dir("teacher") / "shards").rglob("*")} == teacher_files


def test_member_with_another_tokenizer_is_refused_before_any_work(tmp_path, tiny_teacher, capsys):
    foreign = build_tiny_model(tmp_path / "foreign", build_tokenizer(vocab_size=300), layers=1)
    overrides = tiny_overrides(tmp_path / "run", tiny_teacher, **{"precompute.members": f"[foreign={foreign}]"})
    prepare.run(load_config(None, overrides))
    assert main(["precompute"] + [a for o in overrides for a in ("-s", o)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kdcache: error: foreign") and "every source must share the tokenizer" in err
    assert not (tmp_path / "run" / "signals" / "teacher").exists()  # refused before any store was made


def test_reader_yields_every_member_in_lockstep(committee_run, tiny_teacher):
    run_dir, _ = committee_run
    tokens = Store.open(run_dir / "tokens")
    stores = {s: Store.open(run_dir / "signals" / s) for s in ("teacher", "helper")}
    both = iter(CachedKDDataset(tokens, stores, "train", 4, seed=1))
    alone = {s: iter(CachedKDDataset(tokens, store, "train", 4, seed=1)) for s, store in stores.items()}
    for _ in range(4):
        position, batch = next(both)
        for source, it in alone.items():
            pos, single = next(it)
            assert pos == position
            np.testing.assert_array_equal(batch["input_ids"], single["input_ids"])
            for field in ("sig_ids", "sig_logprobs", "sig_lognorm"):
                np.testing.assert_array_equal(batch[signal_key(field, source)], single[field])
    with pytest.raises(Exception, match="token_store"):  # a store of other tokens is refused
        bad = Store.open(run_dir / "signals" / "helper")
        bad.manifest.fingerprints["token_store"] = "sha256:other"
        CachedKDDataset(tokens, {"teacher": stores["teacher"], "helper": bad}, "train", 4)


def test_one_member_committee_trains_exactly_like_single_source(tmp_path, committee_run, tiny_teacher):
    steps = {"train.loss": "taid", "train.max_steps": 3}
    single = _copy(tmp_path / "a", committee_run, tiny_teacher, **steps)
    train.run(single)
    for weights in ("uniform", "learned"):
        one = _copy(tmp_path / weights, committee_run, tiny_teacher,
                    **{**steps, "train.committee": "[teacher]", "train.committee_weights": weights})
        train.run(one)
        a, b = _log(single.student_dir), _log(one.student_dir)
        for key in ("loss", "kd", "ce", "grad_norm", "taid_t"):
            assert [r[key] for r in a] == [r[key] for r in b], (weights, key)
        assert all(r["alpha_teacher"] == 1.0 for r in b)


def test_complementary_teacher_made_by_the_pipeline_then_a_learned_committee(tmp_path, committee_run, tiny_teacher,
                                                                            capsys):
    cfg = _copy(tmp_path, committee_run, tiny_teacher)
    opts = [a for o in tiny_overrides(cfg.run_dir, tiny_teacher, **{"precompute.members": f"[helper={committee_run[1]}]"})
            for a in ("-s", o)]
    # 1. a model of the student's size trained on the task data alone -> RUN/comp/final
    assert main(["train", "--loss", "ce", "-s", "train.output=comp"] + opts) == 0
    comp = Path(cfg.run_dir) / "comp" / "final"
    assert (comp / "config.json").exists() and not (Path(cfg.run_dir) / "student").exists()
    # 2. cached as its own source; precompute.done is not claimed by a one-source run
    assert main(["precompute", "--source", "comp", "--model", str(comp)] + opts) == 0
    assert Store.open(cfg.signal_dir("comp")).manifest.params["teacher"] == str(comp)
    # 3. a learned committee of the foundation teacher, the helper and the complementary teacher
    committee = ["-s", "train.committee=[teacher,helper,comp]", "-s", "train.committee_weights=learned",
                 "-s", "train.max_steps=6"]
    assert main(["train"] + committee + opts) == 0
    log = _log(cfg.student_dir)
    for r in log:
        alphas = [r[f"alpha_{s}"] for s in ("teacher", "helper", "comp")]
        assert abs(sum(alphas) - 1) < 1e-5 and r["committee_nll"] > 0
    assert log[-1]["alpha_teacher"] != log[0]["alpha_teacher"]  # the module was trained
    # the module is checkpointed with the run and absent from the saved student
    ckpt = train.latest_checkpoint(cfg.student_dir / "checkpoints")
    with safe_open(str(ckpt / "committee.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"proj.weight", "members"} and f.get_tensor("members").shape[0] == 3
    for path in (cfg.student_dir / "final").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            assert not [k for k in f.keys() if k.startswith("proj.") or k == "members"]
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(cfg.student_dir / "final")
    assert set(saved.state_dict()) == set(train.build_student("layerdrop:2", str(tiny_teacher)).state_dict())
    # evaluation stays against the foundation teacher's cache
    metrics = evaluate.run(load_config(None, tiny_overrides(cfg.run_dir, tiny_teacher)))
    assert metrics["cache"]["path"].endswith("signals/teacher")


def test_learned_committee_resumes_exactly(tmp_path, committee_run, tiny_teacher, monkeypatch):
    extra = {"train.committee": "[teacher,helper]", "train.committee_weights": "learned"}
    full = _copy(tmp_path / "full", committee_run, tiny_teacher, **extra)
    train.run(full)
    cut = _copy(tmp_path / "cut", committee_run, tiny_teacher, **extra)
    train_interrupted(cut, monkeypatch, after_step=4)
    train.run(cut)
    a, b = _log(full.student_dir), _log(cut.student_dir)
    for key in ("loss", "alpha_teacher", "committee_nll"):
        torch.testing.assert_close(torch.tensor([r[key] for r in b]), torch.tensor([r[key] for r in a]),
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("extra, message", [
    ({"train.committee": "[teacher,nowhere]"}, "member 'nowhere' has no signal store"),
    ({"train.committee": "[teacher,helper]", "train.loss": "ce"}, "needs a distillation loss"),
    ({"train.committee": "[teacher,helper]", "train.committee_weights": "fixed", "train.committee_fixed": "[1]"},
     "train.committee_fixed needs 2 weights"),
])
def test_bad_committee_configs_are_one_line_errors(tmp_path, committee_run, tiny_teacher, extra, message):
    with pytest.raises(KdcacheError, match=message):
        train.run(_copy(tmp_path, committee_run, tiny_teacher, **extra))
