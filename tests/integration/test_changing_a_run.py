"""Changing a run and coming back to it: raising max_steps continues, other changes are refused with one line (and
--overwrite / train.output=NAME as the ways on), each stage records the config it ran with beside its outputs,
evaluate reads how a student was trained from its record, an evaluation of an earlier student is marked stale, and
a second, named cache of the teacher sits beside the default one."""
import json
import math
import re
import shlex
import shutil
from pathlib import Path

import pytest

from kdcache.pipeline.cli import main
from kdcache.pipeline.config import load_config
from kdcache.pipeline.errors import KdcacheError
from kdcache.stages import evaluate, precompute, prepare, report, train
from kdcache.stages.schedules import WarmupCosineLR
from kdcache.storage import Store
from kdcache.storage.tools import verify_store
from tests.conftest import tiny_overrides, train_interrupted

pytestmark = pytest.mark.integration

SAMPLED = {"precompute.signal": "sample", "precompute.samples": 16}   # the default kind of cache, small N
MIN_LR = 3e-3 * 0.1                                                   # tiny_overrides' lr x the default min_lr_ratio


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory, tiny_teacher):
    """Tokens and the teacher's sampled cache (the default kind), shared read-only by the tests below."""
    run_dir = tmp_path_factory.mktemp("changes") / "run"
    cfg = load_config(None, tiny_overrides(run_dir, tiny_teacher, **SAMPLED))
    prepare.run(cfg)
    precompute.run(cfg)
    return run_dir


def _cfg(tmp_path, sampled_run, teacher, **extra):
    run_dir = tmp_path / "run"
    if not run_dir.exists():
        shutil.copytree(sampled_run, run_dir, ignore=shutil.ignore_patterns("student", "eval", ".stages"))
    return load_config(None, tiny_overrides(run_dir, teacher, **{**SAMPLED, **extra}))


def _opts(cfg, teacher, **extra) -> list[str]:
    return [a for o in tiny_overrides(cfg.run_dir, teacher, **{**SAMPLED, **extra}) for a in ("-s", o)]


def _log(cfg):
    return [json.loads(l) for l in (cfg.student_dir / "metrics.jsonl").read_text().splitlines()]


def _state(cfg) -> dict:
    return json.loads((train.latest_checkpoint(cfg.student_dir / "checkpoints") / "state.json").read_text())


def test_raising_max_steps_continues_a_finished_run_at_the_minimum_lr(tmp_path, sampled_run, tiny_teacher, capsys):
    cfg = _cfg(tmp_path, sampled_run, tiny_teacher, **{"train.max_steps": 4})
    train.run(cfg)
    first = _log(cfg)
    longer = _cfg(tmp_path, sampled_run, tiny_teacher, **{"train.max_steps": 8})
    capsys.readouterr()
    train.run(longer)
    out = capsys.readouterr().out
    assert "resuming from step-00000004" in out and "continuing to train.max_steps=8 (was 4)" in out
    log = _log(longer)
    assert [r["step"] for r in log] == list(range(1, 9)) and log[:4] == first    # steps 1-4 are not redone
    assert [r["lr"] for r in log[4:]] == pytest.approx([MIN_LR] * 4)            # no re-warm-up: the minimum goes on
    state = _state(longer)
    assert state["step"] == 8 and state["extended_at"] == [4] and state["lr_schedule"]["total_steps"] == 8
    assert train.student_record(longer.student_dir / "final")["step"] == 8
    assert load_config(longer.student_dir / "config.yaml").train.max_steps == 8  # the record follows
    capsys.readouterr()
    train.run(longer)
    assert "already at step 8 of 8" in capsys.readouterr().out


def test_raising_max_steps_mid_run_restretches_the_cosine_from_the_resume_step(tmp_path, sampled_run, tiny_teacher,
                                                                                monkeypatch):
    cfg = _cfg(tmp_path, sampled_run, tiny_teacher, **{"train.max_steps": 6})
    train_interrupted(cfg, monkeypatch, after_step=2)                  # checkpoint at step 2 of 6
    raised = _cfg(tmp_path, sampled_run, tiny_teacher, **{"train.max_steps": 10})
    train.run(raised)
    log = _log(raised)
    assert [r["step"] for r in log] == list(range(1, 11))
    # the documented rule: from the resume step s0 = 2 on, a cosine from the old schedule's LR there to the minimum
    at_resume = WarmupCosineLR(3e-3, 1, 6, 0.1).lr(2)
    for r in log[2:]:
        s = r["step"] - 1                                              # the 0-based step whose LR the line logs
        expected = MIN_LR + (at_resume - MIN_LR) * 0.5 * (1 + math.cos(math.pi * (s - 2) / (10 - 2)))
        assert r["lr"] == pytest.approx(expected, rel=1e-12), r["step"]
    assert log[2]["lr"] == pytest.approx(at_resume)


def test_raising_max_steps_extends_taids_schedule(tmp_path, sampled_run, tiny_teacher):
    cfg = _cfg(tmp_path, sampled_run, tiny_teacher, **{"train.loss": "taid", "train.max_steps": 2})
    train.run(cfg)
    saved_t = _state(cfg)["taid"]["t"]
    longer = _cfg(tmp_path, sampled_run, tiny_teacher, **{"train.loss": "taid", "train.max_steps": 4})
    train.run(longer)
    taid = _state(longer)["taid"]
    assert (taid["total_steps"], taid["floor_step"]) == (4, 2)
    ts = [r["taid_t"] for r in _log(longer)]
    assert ts[2] == saved_t and ts == sorted(ts) and ts[-1] <= 1.0    # t goes on from where it was, never falls


def test_lowering_max_steps_or_a_rebuilt_cache_is_refused_and_nothing_is_touched(tmp_path, sampled_run,
                                                                                 tiny_teacher):
    cfg = _cfg(tmp_path, sampled_run, tiny_teacher, **{"train.max_steps": 4})
    train.run(cfg)
    before = {p: p.stat().st_mtime_ns for p in cfg.student_dir.rglob("*")}
    with pytest.raises(KdcacheError, match=r"\(train.max_steps: 4 -> 2 \(only a higher max_steps continues a run\)\)"):
        train.run(_cfg(tmp_path, sampled_run, tiny_teacher, **{"train.max_steps": 2}))
    resampled = _cfg(tmp_path, sampled_run, tiny_teacher, **{"train.max_steps": 4, "precompute.seed": 1})
    precompute.run(resampled, overwrite=True)                          # the teacher's cache drawn again
    with pytest.raises(KdcacheError, match=r"signals/teacher: sha256:\S+ -> sha256:\S+ \(rebuilt\)\): pass "
                                           r"--overwrite \(make: OVERWRITE=1\)"):
        train.run(resampled)
    assert {p: p.stat().st_mtime_ns for p in cfg.student_dir.rglob("*")} == before   # the record included


def test_settings_that_do_not_change_the_trajectory_are_accepted_on_resume(tmp_path, sampled_run, tiny_teacher,
                                                                           capsys):
    cfg = _cfg(tmp_path, sampled_run, tiny_teacher, **{"train.max_steps": 4})
    train.run(cfg)
    execution = {"train.checkpoint_every": 3, "train.keep_checkpoints": 1, "train.prefetch": 0,
                 "train.device": "cpu", "train.chunk_size": 7}
    capsys.readouterr()
    train.run(_cfg(tmp_path, sampled_run, tiny_teacher, **{"train.max_steps": 4, **execution}))
    assert "already at step 4 of 4" in capsys.readouterr().out
    train.run(_cfg(tmp_path, sampled_run, tiny_teacher, **{"train.max_steps": 6, **execution}))
    assert [r["step"] for r in _log(cfg)] == list(range(1, 7))


def test_train_output_name_trains_a_new_student_beside_the_refused_one(tmp_path, sampled_run, tiny_teacher):
    cfg = _cfg(tmp_path, sampled_run, tiny_teacher, **{"train.max_steps": 2})
    train.run(cfg)
    kept = _log(cfg), sorted(p.name for p in (cfg.student_dir / "checkpoints").iterdir())
    assert main(["train", *_opts(cfg, tiny_teacher, **{"train.max_steps": 2, "train.lr": 1e-3})]) == 2
    beside = _opts(cfg, tiny_teacher, **{"train.max_steps": 2, "train.lr": 1e-3, "train.output": "lr-1e-3"})
    assert main(["train", *beside]) == 0 and main(["evaluate", *beside]) == 0
    run_dir = Path(cfg.run_dir)
    assert (run_dir / "lr-1e-3" / "final" / "config.json").exists()
    assert (run_dir / "lr-1e-3" / "eval" / "metrics.json").exists() and not (run_dir / "eval").exists()
    assert (_log(cfg), sorted(p.name for p in (cfg.student_dir / "checkpoints").iterdir())) == kept


def test_overwrite_keeps_only_work_a_fresh_run_would_retrace(tmp_path, sampled_run, tiny_teacher, monkeypatch,
                                                             capsys):
    cfg = _cfg(tmp_path, sampled_run, tiny_teacher, **{"train.max_steps": 4})
    train_interrupted(cfg, monkeypatch, after_step=2)
    capsys.readouterr()
    train.run(cfg, overwrite=True)                                     # same settings: the same trajectory resumes
    out = capsys.readouterr().out
    assert "resuming from step-00000002" in out and "starting" not in out
    longer = _cfg(tmp_path, sampled_run, tiny_teacher, **{"train.max_steps": 6})
    train.run(longer)                                                  # continued: not what a fresh 6-step run is
    capsys.readouterr()
    train.run(longer, overwrite=True)
    assert f"--overwrite: starting {cfg.student_dir} over (extended at step(s) [4])" in capsys.readouterr().out
    assert _state(longer)["extended_at"] == [] and [r["step"] for r in _log(longer)] == list(range(1, 7))


def test_an_evaluation_of_an_earlier_student_is_marked_stale_and_removed_on_overwrite(tmp_path, sampled_run,
                                                                                      tiny_teacher):
    cfg = _cfg(tmp_path, sampled_run, tiny_teacher, **{"train.max_steps": 2})
    train.run(cfg)
    metrics = evaluate.run(cfg)
    record = train.student_record(cfg.student_dir / "final")
    assert metrics["student"]["step"] == 2 and metrics["student"]["sha256"] == record["sha256"]
    assert record["sha256"] == train.weights_sha256(cfg.student_dir / "final")

    def table() -> str:
        return (report.run(Path(cfg.run_dir)) / "report.md").read_text()

    assert "| run | trained |" in table()
    train.run(_cfg(tmp_path, sampled_run, tiny_teacher, **{"train.max_steps": 4}))  # the student moves on
    text = table()
    assert "| run | trained (stale) |" in text and "| run | untrained |" in text and "rerun `kdcache evaluate`" in text
    evaluate.run(_cfg(tmp_path, sampled_run, tiny_teacher, **{"train.max_steps": 4}))
    assert "| run | trained |" in table()
    train.run(_cfg(tmp_path, sampled_run, tiny_teacher, **{"train.max_steps": 4, "train.lr": 1e-3}), overwrite=True)
    assert not cfg.eval_dir.exists()                                   # it measured a student that is gone


def test_precompute_source_without_model_caches_the_teacher_beside_and_the_taid_warning_commands_work(
        tmp_path, sampled_run, tiny_teacher, capsys):
    cfg = _cfg(tmp_path, sampled_run, tiny_teacher)
    opts = _opts(cfg, tiny_teacher, **{"train.max_steps": 2})
    capsys.readouterr()
    assert main(["train", "--loss", "taid", *opts]) == 0
    warning = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("train: warning:"))
    commands = re.findall(r"`(kdcache [^`]+)`", warning)
    assert commands == ["kdcache precompute --source topk -s precompute.signal=topk",
                        "kdcache train --loss taid -s train.source=topk -s train.output=taid"]
    for command in commands:                                           # this run's options first, then the advice
        words = shlex.split(command)
        assert main([words[1], *opts, *words[2:]]) == 0, command
    run_dir = Path(cfg.run_dir)
    teacher, topk = Store.open(run_dir / "signals" / "teacher"), Store.open(run_dir / "signals" / "topk")
    assert teacher.manifest.params["signal"] == "sample" and topk.manifest.params["signal"] == "topk"
    assert topk.manifest.params["teacher"] == str(tiny_teacher)       # made by the configured teacher, and says so
    assert topk.manifest.fingerprints["teacher"] == teacher.manifest.fingerprints["teacher"]
    assert load_config(run_dir / "signals" / "topk" / "config.yaml").precompute.signal == "topk"
    assert load_config(run_dir / "taid" / "config.yaml").train.source == "topk"
    assert [r["step"] for r in json.loads("[" + ",".join((run_dir / "taid" / "metrics.jsonl").read_text()
                                                         .splitlines()) + "]")] == [1, 2]
    assert main(["evaluate", *opts, "-s", "train.output=taid"]) == 0   # judged against the teacher's own cache
    metrics = json.loads((run_dir / "taid" / "eval" / "metrics.json").read_text())
    assert metrics["config"]["source"] == "topk" and metrics["config"]["loss"] == "taid"
    assert metrics["cache"]["path"].endswith("signals/teacher")


def test_each_stage_records_its_config_and_evaluate_reads_a_committee_students_record(tmp_path, sampled_run,
                                                                                     tiny_teacher, capsys):
    cfg = _cfg(tmp_path, sampled_run, tiny_teacher)
    run_dir = Path(cfg.run_dir)
    assert main(["precompute", "--source", "topk", *_opts(cfg, tiny_teacher), "-s", "precompute.signal=topk"]) == 0
    committee = ["-s", "train.committee=[teacher,topk]", "-s", "train.committee_weights=uniform",
                 "-s", "train.output=committee"]
    assert main(["train", *_opts(cfg, tiny_teacher, **{"train.max_steps": 2}), *committee]) == 0
    # evaluate without the committee flags: it reads how RUN/committee was trained, and says what it ignores
    capsys.readouterr()
    assert main(["evaluate", *_opts(cfg, tiny_teacher), "-s", "train.output=committee", "-s", "train.loss=rkl"]) == 0
    assert (f"evaluate: {run_dir / 'committee'} is evaluated as it was trained "
            f"({run_dir / 'committee' / 'config.yaml'}): train.loss=kl (not rkl)") in capsys.readouterr().out
    weights = json.loads((run_dir / "committee" / "eval" / "committee_weights.json").read_text())
    assert weights["members"] == ["teacher", "topk"] and weights["weights"] == "uniform"
    metrics = json.loads((run_dir / "committee" / "eval" / "metrics.json").read_text())
    assert metrics["config"]["committee"] == ["teacher", "topk"] and metrics["config"]["max_steps"] == 2
    # every output keeps the config that made it, whatever ran after it; no RUN/config.yaml
    recorded = {folder: load_config(run_dir / folder / "config.yaml")
                for folder in ("tokens", "signals/teacher", "signals/topk", "committee", "committee/eval")}
    assert recorded["signals/teacher"].precompute.signal == "sample"
    assert recorded["signals/topk"].precompute.signal == "topk"
    assert recorded["committee"].train.committee == ["teacher", "topk"]
    assert recorded["committee/eval"].train.committee == ["teacher", "topk"]
    assert recorded["committee/eval"].train.loss == "kl"
    assert not (run_dir / "config.yaml").exists()
    for store in ("tokens", "signals/teacher", "signals/topk"):       # a recorded config is no stray file
        assert verify_store(run_dir / store)[0] == []


@pytest.mark.parametrize("args", [
    ["train", "-s", "train.lr=-1"],                 # refused by the config's validation
    ["train", "--loss", "nonsense"],                # refused by the stage's own checks
    ["train", "--loss", "kl", "--no-adaptive"],     # refused by the command
    ["prepare", "-s", "prepare.dataset=/no/such/data.jsonl"],
    ["evaluate"],
])
def test_a_refused_command_leaves_no_config_behind(tmp_path, args):
    run_dir = tmp_path / "run"
    assert main(args + ["--run-dir", str(run_dir)]) == 2
    assert not list(tmp_path.rglob("config.yaml"))
