"""Typed configs: defaults, YAML, overrides, validation with one-line messages."""
from pathlib import Path

import pytest

from kdcache.pipeline.config import Config, load_config
from kdcache.pipeline.errors import KdcacheError


def test_default_config_needs_no_arguments():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.precompute.teacher == "default" and cfg.prepare.dataset == "default"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: runs/x\ntrain:\n  lr: 1e-4\n  max_steps: 7\nprecompute:\n  k: 32\n")
    cfg = load_config(path, ["train.max_steps=9", "prepare.max_train_sequences=null"])
    assert (cfg.run_dir, cfg.train.lr, cfg.train.max_steps, cfg.precompute.k) == (str(tmp_path / "runs/x"), 1e-4, 9, 32)
    assert cfg.prepare.max_train_sequences is None


@pytest.mark.parametrize("overrides, message", [
    (["train.lr=-1"], "train.lr must be > 0"),
    (["train.lr=abc"], "train.lr must be float"),
    (["train.nope=1"], "unknown key train.nope"),
    (["nope.lr=1"], "invalid override nope.lr=1"),
    (["precompute.k=0"], "precompute.k must be >= 1"),
    (["precompute.signal=dense"], "precompute.signal 'dense' is not one of topk, sample, hybrid"),
    (["precompute.samples=0"], "precompute.samples must be in 1..255"),
    (["precompute.samples=256"], "precompute.samples must be in 1..255"),
    (["precompute.value_encoding=int4"], "precompute.value_encoding 'int4' is not one of"),
    (["precompute.draws=stratified"], "precompute.draws 'stratified' is not one of iid, systematic"),
    (["train.tail=cut"], "train.tail 'cut' is not one of"),
    (["prepare.seq_len"], "use section.field=value"),
    (["train.taid_t_start=0.9", "train.taid_t_end=0.5"], "need 0 <= t_start <= t_end <= 1"),
    (["train.taid_t_end=1.5"], "need 0 <= t_start <= t_end <= 1"),
    (["train.taid_alpha=2"], "train.taid_alpha must be in \\[0, 1\\]"),
    (["train.taid_beta=1"], "train.taid_beta must be in \\[0, 1\\)"),
    (["train.taid_adaptive=maybe"], "train.taid_adaptive must be bool"),
    (["train.rlkd_k=0"], "train.rlkd_k must be >= 1"),
    (["train.rlkd_weight=-1"], "train.rlkd_weight must be >= 0"),
    (["train.jsd_beta=1"], "train.jsd_beta must be in \\(0, 1\\)"),
    (["train.skew_alpha=1"], "train.skew_alpha must be in \\[0, 1\\)"),
])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(KdcacheError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(KdcacheError, match="not valid YAML at line"):
        load_config(bad)
    with pytest.raises(KdcacheError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_store_backends_and_value_encodings():
    cfg = load_config(None, ["prepare.backend=arrow", "precompute.backend=arrow", "precompute.value_encoding=int8"])
    assert (cfg.prepare.backend, cfg.precompute.backend, cfg.precompute.value_encoding) == ("arrow", "arrow", "int8")
    assert (Config().prepare.backend, Config().precompute.value_encoding) == ("zarr", "float16")
    for overrides, message in [(["precompute.backend=parquet"], "precompute.backend 'parquet' is not one of zarr, arrow"),
                               (["prepare.backend=hdf5"], "prepare.backend 'hdf5' is not one of zarr, arrow"),
                               (["precompute.value_encoding=int4"], "value_encoding 'int4' is not one of float16")]:
        with pytest.raises(KdcacheError, match=message):
            load_config(None, overrides)


def test_objective_knobs_reach_the_loss_spec_and_the_taid_schedule():
    from kdcache.stages.train import objective_spec, taid_schedule

    cfg = load_config(None, ["train.loss=rlkd+jsd", "train.rlkd_k=3", "train.rlkd_weight=0.5",
                             "train.rlkd_dynamic=true", "train.jsd_beta=0.3", "train.skew_alpha=0.2",
                             "train.taid_t_start=0.1", "train.taid_t_end=0.8", "train.taid_alpha=0.01",
                             "train.taid_beta=0.9", "train.taid_adaptive=false", "train.max_steps=7"])
    spec = objective_spec(cfg.train)
    assert (spec.name, spec.rlkd_k, spec.rlkd_weight, spec.rlkd_dynamic, spec.jsd_beta, spec.skew_alpha) == \
        ("rlkd+jsd", 3, 0.5, True, 0.3, 0.2)
    sched = taid_schedule(cfg.train)
    assert (sched.total_steps, sched.t_start, sched.t_end, sched.alpha, sched.beta, sched.adaptive) == \
        (7, 0.1, 0.8, 0.01, 0.9, False)
    assert sched.t == 0.1
    defaults = taid_schedule(load_config(None, []).train)
    assert (defaults.t_start, defaults.t_end, defaults.alpha, defaults.beta, defaults.adaptive) == \
        (0.4, 1.0, 5e-4, 0.99, True)


def test_unknown_loss_is_a_one_line_config_error():
    from kdcache.stages.train import objective_spec

    with pytest.raises(KdcacheError, match="invalid config: unknown loss 'kll'; valid: ce, kl") as info:
        objective_spec(load_config(None, ["train.loss=kll"]).train)
    assert "\n" not in str(info.value)


def test_cli_no_adaptive_sets_linear_taid(tmp_path, monkeypatch, capsys):
    import kdcache.stages.train
    from kdcache.pipeline.cli import main

    seen = []
    monkeypatch.setattr(kdcache.stages.train, "run", lambda cfg, overwrite=False: seen.append(cfg.train))
    run_dir = ["--run-dir", str(tmp_path / "run")]
    assert main(["train", "--loss", "taid", "--no-adaptive", *run_dir]) == 0
    assert main(["train", "--loss", "taid", *run_dir]) == 0
    assert [(tc.loss, tc.taid_adaptive) for tc in seen] == [("taid", False), ("taid", True)]
    assert main(["train", "--loss", "kl", "--no-adaptive", *run_dir]) == 2
    assert capsys.readouterr().err.strip() == "kdcache: error: --no-adaptive applies to --loss taid only, not 'kl'"


def test_each_student_output_gets_its_own_eval_folder():
    assert load_config(None, ["run_dir=r"]).eval_dir == Path("r") / "eval"
    assert load_config(None, ["run_dir=r", "train.output=comp"]).eval_dir == Path("r") / "comp" / "eval"


def test_paths_in_a_yaml_are_relative_to_its_folder(tmp_path, monkeypatch):
    project, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    (project / "data").mkdir(parents=True)
    (project / "data" / "chat.jsonl").write_text("{}\n")
    for name in ("teacher", "student", "tok", "ta"):
        (project / "models" / name).mkdir(parents=True)
    elsewhere.mkdir()
    (project / "my.yaml").write_text(
        "run_dir: runs/mine\n"
        "prepare: {dataset: data/chat.jsonl, tokenizer: models/tok}\n"
        "precompute: {teacher: models/teacher, members: [ta=models/ta, big=org/big-model]}\n"
        "train: {student: models/student}\n")
    monkeypatch.chdir(elsewhere)                     # run from another folder
    cfg = load_config(project / "my.yaml")
    assert cfg.run_dir == str(project / "runs/mine")  # always: a run folder is made where the config says
    assert cfg.prepare.dataset == str(project / "data/chat.jsonl") and cfg.prepare.tokenizer == str(project / "models/tok")
    assert cfg.precompute.teacher == str(project / "models/teacher") and cfg.train.student == str(project / "models/student")
    assert cfg.precompute.members == [f"ta={project / 'models/ta'}", "big=org/big-model"]  # a hub id stays one
    # -s overrides and --run-dir stay relative to the current folder
    cfg = load_config(project / "my.yaml", ["run_dir=here", "precompute.teacher=models/other"])
    assert (cfg.run_dir, cfg.precompute.teacher) == ("here", "models/other")


def test_yaml_values_that_are_not_paths_next_to_it_stay_as_written(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "teacher-here").mkdir()               # relative to the current folder, not to the YAML
    (tmp_path / "conf" / "c.yaml").write_text(
        "prepare: {dataset: default, tokenizer: teacher}\n"
        "precompute: {teacher: teacher-here}\n"
        "train: {student: layerdrop:4}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("conf/c.yaml")
    assert (cfg.prepare.dataset, cfg.prepare.tokenizer, cfg.train.student) == ("default", "teacher", "layerdrop:4")
    assert cfg.precompute.teacher == "teacher-here"   # missing next to the YAML: read from the current folder
    assert cfg.run_dir == "runs/default"              # not in the YAML: the default, relative to the current folder


def test_a_recorded_config_reads_back_its_local_paths_from_any_folder(tmp_path, monkeypatch):
    from kdcache.pipeline.config import record_config, recorded_config

    (tmp_path / "work" / "my-teacher").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    cfg = load_config(None, ["precompute.teacher=my-teacher", "precompute.members=[side=my-teacher]",
                             "train.student=layerdrop:2", "prepare.dataset=default"])
    record_config(cfg, tmp_path / "work" / "runs" / "x" / "student", "train")
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = recorded_config(tmp_path / "work" / "runs" / "x" / "student")
    assert again.precompute.teacher == str(tmp_path / "work" / "my-teacher")
    assert again.precompute.members == [f"side={tmp_path / 'work' / 'my-teacher'}"]
    assert (again.train.student, again.prepare.dataset) == ("layerdrop:2", "default")  # specs, not paths
