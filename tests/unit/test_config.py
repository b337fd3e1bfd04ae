"""Typed configs: defaults, YAML, overrides, validation with one-line messages."""
from pathlib import Path

import pytest

from kdcache.pipeline.cli import main
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


# every field with a closed set or a range, one invalid value each: (override, the field the error must name)
INVALID_FIELDS = [
    ("run_dir=", "run_dir"),
    ("prepare.dataset=", "prepare.dataset"),
    ("prepare.dataset_config=''", "prepare.dataset_config"),
    ("prepare.dataset_split=", "prepare.dataset_split"),
    ("prepare.format=markdown", "prepare.format"),
    ("prepare.text_field=", "prepare.text_field"),
    ("prepare.seq_len=7", "prepare.seq_len"),
    ("prepare.validation_fraction=0", "prepare.validation_fraction"),
    ("prepare.validation_fraction=1", "prepare.validation_fraction"),
    ("prepare.max_train_sequences=0", "prepare.max_train_sequences"),
    ("prepare.max_validation_sequences=0", "prepare.max_validation_sequences"),
    ("prepare.truncation=left", "prepare.truncation"),
    ("prepare.shard_sequences=0", "prepare.shard_sequences"),
    ("prepare.seed=-1", "prepare.seed"),
    ("prepare.tokenizer=", "prepare.tokenizer"),
    ("prepare.backend=hdf5", "prepare.backend"),
    ("precompute.teacher=", "precompute.teacher"),
    ("precompute.signal=dense", "precompute.signal"),
    ("precompute.k=0", "precompute.k"),
    ("precompute.samples=0", "precompute.samples"),
    ("precompute.samples=256", "precompute.samples"),
    ("precompute.draws=stratified", "precompute.draws"),
    ("precompute.seed=-1", "precompute.seed"),
    ("precompute.value_encoding=int4", "precompute.value_encoding"),
    ("precompute.batch_size=0", "precompute.batch_size"),
    ("precompute.scheduler=threads", "precompute.scheduler"),
    ("precompute.workers=0", "precompute.workers"),
    ("precompute.threads_per_worker=0", "precompute.threads_per_worker"),
    ("precompute.retries=-1", "precompute.retries"),
    ("precompute.worker_timeout=0", "precompute.worker_timeout"),
    ("precompute.backend=parquet", "precompute.backend"),
    ("precompute.members=[nameonly]", "precompute.members"),
    ("train.student=", "train.student"),
    ("train.source=../x", "train.source"),
    ("train.loss=nonsense", "train.loss"),
    ("train.tail=cut", "train.tail"),
    ("train.temperature=0", "train.temperature"),
    ("train.ce_weight=1.5", "train.ce_weight"),
    ("train.jsd_beta=0", "train.jsd_beta"),
    ("train.skew_alpha=-0.1", "train.skew_alpha"),
    ("train.taid_t_start=-0.1", "taid_t_start"),
    ("train.taid_alpha=-1", "train.taid_alpha"),
    ("train.taid_beta=1", "train.taid_beta"),
    ("train.rlkd_k=0", "train.rlkd_k"),
    ("train.rlkd_weight=-1", "train.rlkd_weight"),
    ("train.lr=0", "train.lr"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio"),
    ("train.min_lr_ratio=-0.5", "train.min_lr_ratio"),
    ("train.weight_decay=-0.01", "train.weight_decay"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.clip_grad_norm=-1", "train.clip_grad_norm"),
    ("train.clip_grad_norm=0", "train.clip_grad_norm"),
    ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.seed=-1", "train.seed"),
    ("train.device=tpu", "train.device"),
    ("train.device=cuda:x", "train.device"),
    ("train.device=cpu:0", "train.device"),
    ("train.precision=fp16", "train.precision"),
    ("train.prefetch=-1", "train.prefetch"),
    ("train.chunk_size=0", "train.chunk_size"),
    ("train.output=tokens", "train.output"),
    ("train.committee=[a,a]", "train.committee"),
    ("train.committee_weights=vote", "train.committee_weights"),
    ("train.committee_dim=0", "train.committee_dim"),
    ("train.committee_lr=0", "train.committee_lr"),
    ("evaluate.batch_size=0", "evaluate.batch_size"),
    ("evaluate.max_sequences=0", "evaluate.max_sequences"),
    ("assistants.grid=0.5,1.5", "assistants.grid"),
    ("assistants.tradeoff_lambda=-1", "assistants.tradeoff_lambda"),
    ("assistants.max_sparsity=2", "assistants.max_sparsity"),
    ("assistants.min_size_over_student=-1", "assistants.min_size_over_student"),
    ("assistants.calibration_sequences=0", "assistants.calibration_sequences"),
    ("assistants.steps=0", "assistants.steps"),
    ("assistants.middle_widths=-1", "assistants.middle_widths"),
    ("assistants.batch_size=0", "assistants.batch_size"),
    ("assistants.lr=0", "assistants.lr"),
    ("assistants.warmup_steps=-1", "assistants.warmup_steps"),
    ("assistants.min_lr_ratio=2", "assistants.min_lr_ratio"),
    ("assistants.weight_decay=-1", "assistants.weight_decay"),
    ("assistants.clip_grad_norm=-1", "assistants.clip_grad_norm"),
    ("assistants.eval_sequences=0", "assistants.eval_sequences"),
    ("assistants.source=teacher", "assistants.source"),
    ("assistants.seed=-1", "assistants.seed"),
]


@pytest.mark.parametrize("override, key", INVALID_FIELDS, ids=[o for o, _ in INVALID_FIELDS])
def test_every_invalid_field_is_a_one_line_error_at_load(override, key):
    with pytest.raises(KdcacheError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert message.startswith("invalid config: ") and key in message and "\n" not in message, message


@pytest.mark.parametrize("override, key", INVALID_FIELDS, ids=[o for o, _ in INVALID_FIELDS])
def test_every_invalid_field_stops_the_cli_before_any_work(override, key, tmp_path, capsys, monkeypatch):
    import kdcache.stages.train

    # the stage must never be reached: a config error is raised while the options are read
    monkeypatch.setattr(kdcache.stages.train, "run", lambda *a, **k: pytest.fail("train ran with an invalid config"))
    run_dir = [] if override.startswith("run_dir=") else ["--run-dir", str(tmp_path / "run")]
    assert main(["train", "-s", override, *run_dir]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kdcache: error: invalid config: ") and key in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_valid_devices_and_schedulers_load():
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert load_config(None, [f"train.device={device}"]).train.device == device
    for scheduler in ("local", "sync", "tcp://10.0.0.1:8786"):
        assert load_config(None, [f"precompute.scheduler={scheduler}"]).precompute.scheduler == scheduler


def test_choice_lists_agree_with_the_layers_that_cannot_import_them():
    """storage/ imports nothing above it, so it keeps its own copies of these lists: they must stay equal."""
    from kdcache.pipeline import config
    from kdcache.storage import codecs, store

    assert (codecs.KINDS, codecs.VALUE_ENCODINGS, codecs.MAX_SAMPLES) == \
        (config.SIGNAL_KINDS, config.VALUE_ENCODINGS, config.MAX_SAMPLES)
    assert sorted(store.BACKENDS) == sorted(config.BACKENDS)


@pytest.mark.parametrize("command", ["precompute", "run"])
def test_a_scheduler_typo_on_the_command_line_stops_before_any_work(command, tmp_path, capsys):
    assert main([command, "--scheduler", "threads", "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == "kdcache: error: invalid config: --scheduler 'threads' is not local, sync or " \
                                      "a scheduler address like tcp://host:8786\n"
    assert not (tmp_path / "run").exists()
