"""What a user sees of a run: progress as plain lines in a log, and `kdcache report` with every plot that applies
(the default demo run; a folder that also holds a MiniDisc trial, a committee, a TAID student and bench-cache data).
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdcache.pipeline.cli import main
from kdcache.pipeline.config import load_config
from kdcache.stages import assistants, evaluate, precompute, report, train
from tests.conftest import build_tiny_model, tiny_overrides

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BENCH_CACHE = REPO / "tests" / "data" / "bench-cache.json"   # kinds rows of `make bench-cache`, as in the README
TINY_TA = {"assistants.grid": "0.2,0.4,0.6", "assistants.steps": 4, "assistants.calibration_sequences": 8,
           "assistants.batch_size": 4, "assistants.lr": 3e-3, "assistants.warmup_steps": 1}
# done/total unit (percent), rate unit/s, elapsed, ETA: the part of a progress line every stage shares
PROGRESS = r"\d+(\.\d+)?k?/\d+(\.\d+)?k? \w+ \(\d+%\), (\d+(\.\d+)?k?|\?) \w+/s, elapsed \d\d:\d\d, ETA (\d\d:\d\d|\?)"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_teacher):
    """`kdcache run` (prepare -> precompute -> train -> evaluate, the default chain) on the tiny teacher with
    stderr a pipe, as under CI, `make demo | tee log` or nohup. Returns (run dir, stderr)."""
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    args = [sys.executable, "-m", "kdcache.pipeline.cli", "run"]
    for o in tiny_overrides(run_dir, tiny_teacher):
        args += ["-s", o]
    # TQDM_DELAY=0: lines from the start, though the tiny stages finish within the default 5 s
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DELAY": "0"}
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return run_dir, out.stderr


def _copy(tmp_path, demo_run) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(demo_run[0], run_dir, ignore=shutil.ignore_patterns("report"))
    return run_dir


def _report_images(out: Path) -> list[str]:
    return re.findall(r"!\[[^]]*\]\(([^)]+)\)", (out / "report.md").read_text())


def _check_png(path: Path) -> None:
    import matplotlib.image

    assert path.stat().st_size > 0, path
    pixels = matplotlib.image.imread(path)                          # (H, W, 4) floats in [0, 1]
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400, path
    assert pixels[..., :3].reshape(-1, 3).std(0).max() > 0.05, path  # more than one colour: something is drawn


def test_every_stage_writes_plain_progress_lines_when_stderr_is_not_a_terminal(demo_run):
    stderr = demo_run[1]
    assert "\r" not in stderr                                       # no bar redrawn in place: a log stays readable
    for stage in ("prepare: tokenising", "precompute teacher", r"train \(kl\)", r"evaluate \(untrained\)",
                  r"evaluate \(trained\)"):
        lines = [l for l in stderr.splitlines() if re.match(stage, l)]
        assert len(lines) >= 2, (stage, stderr)                     # the start, then as the work goes on
        assert all(re.search(PROGRESS, l) for l in lines), lines
        assert re.search(r"\(100%\)", lines[-1]) and "ETA 00:00" in lines[-1], lines
    train_lines = [l for l in stderr.splitlines() if l.startswith("train (kl)") and "(0%)" not in l]
    assert train_lines and all(re.search(r"step/s, .*loss=\d+\.\d+, lr=\d\.\de-\d\d, tok_s=\d+", l)
                               for l in train_lines), train_lines
    assert re.search(r"precompute teacher \(4 of 4 shards to do\): .* tok/s", stderr)


def test_taid_progress_lines_carry_t(tmp_path, demo_run, tiny_teacher, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DELAY", "0")
    cfg = load_config(None, tiny_overrides(_copy(tmp_path, demo_run), tiny_teacher,
                                           **{"train.loss": "taid", "train.output": "taid"}))
    train.run(cfg)
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("train (taid)") and "(0%)" not in l]
    assert lines and all(re.search(r"loss=\d+\.\d+, lr=\S+, tok_s=\d+, t=0\.\d{4}$", l) for l in lines), lines


def test_report_of_the_demo_run_has_every_plot_that_applies_and_each_renders(tmp_path, demo_run, capsys):
    run_dir = _copy(tmp_path, demo_run)
    assert main(["report", str(run_dir)]) == 0
    out = run_dir / "report"
    images = _report_images(out)
    # a KL student, the teacher's cache, held-out metrics: no TAID, MiniDisc or committee data in this run
    assert images == ["training_curves.png", "coverage.png", "cache_fidelity.png"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(images)
    html = (out / "report.html").read_text()
    for name in images:
        assert f'src="{name}"' in html
        _check_png(out / name)
    text = (out / "report.md").read_text()
    assert "| run | trained |" in text and "| signals/teacher | this folder | topk |" in text


def test_report_of_a_folder_with_assistants_committee_taid_and_bench_data(tmp_path, demo_run, tiny_teacher,
                                                                         tiny_tokenizer):
    run_dir = _copy(tmp_path, demo_run)
    helper = build_tiny_model(tmp_path / "helper-model", tiny_tokenizer, layers=2, seed=3)

    def cfg(**extra):
        return load_config(None, tiny_overrides(run_dir, tiny_teacher, **TINY_TA, **extra))

    assistants.run(cfg())                                           # MiniDisc: ta_plan.json
    precompute.run(cfg(), source="helper", model=str(helper))      # a second committee member
    committee = cfg(**{"train.committee": "[teacher,helper]", "train.committee_weights": "learned",
                       "train.output": "committee"})
    train.run(committee)
    evaluate.run(committee)                                         # committee/eval/committee_weights.json
    train.run(cfg(**{"train.loss": "taid", "train.output": "taid"}))
    (run_dir / "bench").mkdir()
    shutil.copy(BENCH_CACHE, run_dir / "bench" / "cache.json")

    weights = json.loads((run_dir / "committee" / "eval" / "committee_weights.json").read_text())
    groups = weights["groups"]
    assert weights["members"] == ["teacher", "helper"] and groups["all"]["positions"] > 0
    assert sum(g["positions"] for name, g in groups.items() if name.startswith("class: ")) == groups["all"]["positions"]
    for g in groups.values():
        assert sum(g["alpha"].values()) == pytest.approx(1) and sum(g["best_share"].values()) == pytest.approx(1)
    uniform = evaluate.committee_weights(cfg(**{"train.committee": "[teacher,helper]", "train.output": "committee",
                                                "train.committee_weights": "uniform"}), "cpu", None)
    assert all(a == pytest.approx(0.5) for g in uniform["groups"].values() for a in g["alpha"].values())

    out = report.run(run_dir)
    images = _report_images(out)
    assert images == ["training_curves.png", "taid_t.png", "coverage.png", "cache_fidelity.png", "ta_tradeoff.png",
                      "committee_weights.png"]
    for name in images:
        _check_png(out / name)
    assert set(report.training_logs(run_dir)) == {"run", "committee", "taid"}   # labelled by train.output
    text = (out / "report.md").read_text()
    assert "| committee | trained |" in text                       # the last evaluation was the committee's
    assert "| topk-16 int8 | bench-cache | topk | 49.6 | 0.800 | 8.3° | — |" in text
    assert "| signals/helper | this folder | topk |" in text
    assert "| class: word |" in text and re.search(r"\| chosen \|", text)

    evaluate.run(cfg())                        # the default student: RUN/eval, no weights; the committee's stay
    assert not (run_dir / "eval" / "committee_weights.json").exists()
    assert (run_dir / "committee" / "eval" / "committee_weights.json").exists()
    # re-evaluated without the committee flags: evaluated as the committee student it was trained as
    evaluate.run(cfg(**{"train.output": "committee"}))
    assert (run_dir / "committee" / "eval" / "committee_weights.json").exists()
    assert "committee_weights.png" in _report_images(report.run(run_dir))
