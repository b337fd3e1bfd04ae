"""`--overwrite` on every stage that writes (run passes it down), the deprecated `train --no-resume`, and a
student's folder that may not take the name of a stage's folder."""
import pytest

from kdcache.pipeline.cli import main
from kdcache.pipeline.config import load_config
from kdcache.pipeline.errors import KdcacheError


def _spy(monkeypatch, module, seen, name):
    def record(cfg, *args, **kwargs):
        seen.append((name, kwargs.get("overwrite", False)))
        return {"chosen": {"sparsity": 0.5}} if name == "assistants" else None
    monkeypatch.setattr(module, "run", record)


@pytest.fixture
def stages(monkeypatch):
    from kdcache.stages import assistants, evaluate, precompute, prepare, train

    seen = []
    for name, module in (("prepare", prepare), ("precompute", precompute), ("assistants", assistants),
                         ("train", train), ("evaluate", evaluate)):
        _spy(monkeypatch, module, seen, name)
    monkeypatch.setattr("kdcache.pipeline.cli._source_model", lambda cfg, source: "chosen")
    return seen


def test_run_passes_overwrite_to_every_stage(tmp_path, stages):
    run_dir = ["--run-dir", str(tmp_path / "run")]
    assert main(["run", "--assistant", "--overwrite", *run_dir]) == 0
    assert stages == [("prepare", True), ("precompute", True), ("assistants", True), ("precompute", True),
                      ("train", True), ("evaluate", False)]
    stages.clear()
    assert main(["run", *run_dir]) == 0
    assert {flag for _, flag in stages} == {False}


@pytest.mark.parametrize("command", ["prepare", "precompute", "assistants", "train", "evaluate"])
def test_every_stage_that_writes_accepts_overwrite(tmp_path, stages, command):
    assert main([command, "--overwrite", "--run-dir", str(tmp_path / "run")]) == 0


def test_no_resume_is_a_hidden_deprecated_overwrite(tmp_path, stages, capsys):
    assert main(["train", "--no-resume", "--run-dir", str(tmp_path / "run")]) == 0
    assert stages == [("train", True)]
    assert "--no-resume is deprecated: use --overwrite" in capsys.readouterr().err
    assert main(["train", "--help"]) == 0
    assert "--no-resume" not in capsys.readouterr().out


def test_precompute_source_without_model_means_the_teacher(tmp_path, monkeypatch):
    from kdcache.stages import precompute

    seen = []
    monkeypatch.setattr(precompute, "run", lambda cfg, **kw: seen.append((kw["source"], kw["model"])))
    assert main(["precompute", "--source", "topk", "--run-dir", str(tmp_path)]) == 0
    assert seen == [("topk", None)]                # None: precompute.run caches precompute.teacher


@pytest.mark.parametrize("name", ["tokens", "signals", "eval", "assistants", "report"])
def test_a_student_may_not_take_a_stage_folders_name(name):
    with pytest.raises(KdcacheError, match=f"train.output '{name}' is a folder of the run"):
        load_config(None, [f"train.output={name}"])
