"""Report helpers that decide what a reader sees: point names that stay readable, students named by train.output."""
from pathlib import Path

import numpy as np
import pytest
from matplotlib.text import Text

from kdcache.stages import report


def test_point_names_overlap_neither_each_other_nor_other_points():
    plt = report._pyplot()
    fig, ax = plt.subplots(figsize=(6, 3), layout="constrained")
    # pairs that differ only by value encoding sit almost on top of each other, as in make bench-cache
    xy = [(28.6, 0.735), (30.0, 0.736), (44.1, 0.655), (45.4, 0.655), (49.6, 0.800), (56.1, 0.800), (30.4, 0.176),
          (30.4, 0.176)]
    labels = ["topk-8 int8", "topk-8", "hybrid 4+16", "hybrid 4+16 int8", "topk-16 int8", "topk-16", "signals/a",
              "signals/b"]
    ax.scatter(*zip(*xy))
    ax.set_xscale("log")
    ax.margins(x=0.3, y=0.25)
    fig.canvas.draw()
    report._label_points(ax, xy, labels)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = {t.get_text(): t for t in ax.texts}
    assert sorted(texts) == sorted(labels)
    boxes = {name: Text.get_window_extent(t, renderer) for name, t in texts.items()}  # names, not leader lines
    names = list(boxes)
    for i, a in enumerate(names):
        assert ax.get_window_extent(renderer).contains(boxes[a].x0, boxes[a].y0)
        for b in names[i + 1:]:
            assert not boxes[a].overlaps(boxes[b]), (a, b)
    dots = ax.transData.transform(np.array(xy))                                   # (n, 2) pixels
    for i, name in enumerate(labels):
        for j in range(len(xy)):  # no name sits on another point
            if tuple(dots[j]) != tuple(dots[i]):
                assert not boxes[name].contains(*dots[j]), (name, labels[j])
    plt.close(fig)


def test_students_are_named_by_run_and_train_output(tmp_path):
    root = tmp_path / "experiment"
    assert report.student_label(root / "student", root) == "experiment"
    assert report.student_label(root / "comp", root) == "comp"
    assert report.student_label(root / "kl" / "student", root) == "kl"
    assert report.student_label(root / "kl" / "comp", root) == "kl/comp"


def test_held_out_metrics_of_each_student_output_are_labelled_by_it(tmp_path):
    import json

    m = {"kl_teacher": 1.0, "top1_agreement": 0.5, "top5_order_agreement": 0.1, "perplexity": 9.0}
    for folder, output in (("eval", "student"), ("comp/eval", "comp")):  # RUN/eval and RUN/<train.output>/eval
        (tmp_path / "run" / folder).mkdir(parents=True)
        (tmp_path / "run" / folder / "metrics.json").write_text(json.dumps(
            {"students": {"trained": m}, "config": {"output": output}}))
    rows = report.metrics_section(tmp_path / "run").table[1:]
    assert sorted(row[0] for row in rows) == ["comp", "run"]


def test_a_log_cut_by_a_kill_is_read_up_to_its_last_whole_line(tmp_path):
    log = tmp_path / "run" / "student" / "metrics.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    logs = report.training_logs(tmp_path / "run")
    assert list(logs) == ["run"] and [r["step"] for r in logs["run"].rows] == [1, 2]
    assert logs["run"].objective == "?"                              # no checkpoint says which loss it was


def test_a_broken_result_file_is_a_one_line_error(tmp_path, capsys):
    from kdcache.pipeline.cli import main

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "committee_weights.json").write_text('{"members": [')
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "committee_weights.json is not valid JSON" in err
    assert "rerun `kdcache evaluate`, which wrote it" in err


def test_a_histogram_keeps_its_plot_height_however_many_stores_its_legend_lists():
    def plot_height(n: int) -> float:
        labels = [f"cache-work/signals/sample_N{i}_systematic (N=40, mean 17.0)" for i in range(n)]
        fig, ax = report._histogram_figure(labels)
        for i, label in enumerate(labels):
            ax.plot([0, 1], [i, i], label=label)
        report._legend(fig)
        fig.canvas.draw()
        height = ax.get_window_extent().height
        report._pyplot().close(fig)
        return height

    assert plot_height(12) > 0.9 * plot_height(1)


def test_a_catastrophic_kind_does_not_flatten_the_others_on_the_kl_panel(tmp_path, monkeypatch):
    points = [{"label": f"k{i}", "origin": "bench", "kind": "sample", "bytes_per_token": 10 + i, "mass": None,
               "angle": None, "kl_vs_dense": v} for i, v in enumerate([0.006, 0.011, 0.075, 2.43])]
    scales = []
    real_save = report._save
    monkeypatch.setattr(report, "_save", lambda fig, path: (scales.append(fig.axes[0].get_yscale()),
                                                             real_save(fig, path)))
    report.plot_fidelity(points, tmp_path / "f.png")
    report.plot_fidelity(points[:3], tmp_path / "g.png")  # all within a few %: a plain linear axis
    assert scales == ["symlog", "linear"]


def test_top5_order_of_a_sampled_cache_reads_n_a(tmp_path):
    import json

    m = {"kl_teacher": 1.0, "top1_agreement": 0.5, "top5_order_agreement": None, "perplexity": 9.0}
    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "metrics.json").write_text(json.dumps(
        {"students": {"trained": m}, "config": {"output": "student"}}))
    assert report.metrics_section(tmp_path / "run").table[1] == ["run", "trained", "?", "1.0000", "50.00%", "n/a",
                                                                  "n/a", "9.00"]


def _metrics(run: Path, cache: dict, tied: float = 0.25) -> None:
    import json

    m = {"kl_teacher": 1.0, "top1_agreement": 0.5, "top5_order_agreement": None, "perplexity": 9.0,
         "teacher_top1_tie_share": tied}
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(json.dumps(
        {"students": {"trained": m}, "config": {"output": "student"}, "cache": cache}))


def test_the_held_out_table_names_the_cache_each_kl_was_measured_against(tmp_path):
    _metrics(tmp_path / "runs" / "a", {"signal": "topk", "k": 16, "samples": None})
    _metrics(tmp_path / "runs" / "b", {"signal": "sample", "k": None, "samples": 40, "draws": "systematic"}, 1.0)
    _metrics(tmp_path / "runs" / "c", {"signal": "hybrid", "k": 4, "samples": 16, "draws": "iid"})
    section = report.metrics_section(tmp_path / "runs")
    header, *rows = section.table
    assert header[2] == "measured against (cache)" and header[5] == "teacher top-1 tied"
    assert [(r[0], r[2], r[5]) for r in rows] == [("a", "topk k=16", "25.00%"), ("b", "sample N=40 systematic", "100.00%"),
                                                 ("c", "hybrid k=4 + N=16 iid", "25.00%")]
    assert "compare between rows of the same cache only" in section.text


def _captured_figures(monkeypatch) -> list:
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig))
    return figures


def test_training_curves_draw_a_faint_per_step_line_and_a_trailing_mean(tmp_path, monkeypatch):
    figures = _captured_figures(monkeypatch)
    loss = [3.0, 2.0, 2.6, 1.8, 2.2, 1.5]                      # a short, noisy run: 6 steps
    logs = {"run": report.StudentLog("kl", [{"step": i + 1, "loss": v} for i, v in enumerate(loss)])}
    report.plot_training_curves(logs, tmp_path / "curves.png")
    lines = figures[0].axes[0].get_lines()
    assert len(lines) == 2
    faint, mean = sorted(lines, key=lambda line: line.get_alpha() or 1.0)
    assert faint.get_alpha() < 1 and list(faint.get_ydata()) == loss
    assert list(mean.get_ydata()) != loss and mean.get_ydata()[-1] == pytest.approx(np.mean(loss[-2:]))  # of 2 steps
    assert mean.get_label() == "run (mean of 2 steps)"


def test_the_fidelity_legend_lists_only_the_kinds_it_plots(tmp_path, monkeypatch):
    figures = _captured_figures(monkeypatch)
    stores = {"top/signals/teacher": report.StoreSummary("topk", 30.0, np.array([0.5, 0.7])),
              "drawn/signals/teacher": report.StoreSummary("sample", 31.0, None, np.array([12, 14]), 40)}
    section = report.fidelity_section(stores, [], tmp_path)
    legend = [t.get_text() for t in figures[0].legends[0].get_texts()]
    assert legend == ["topk", "a store in this folder"]     # no orange "sample" entry without an orange point
    assert "Not plotted" in section.text and "drawn/signals/teacher" in section.text
    assert [row[0] for row in section.table[1:]] == ["top/signals/teacher", "drawn/signals/teacher"]


def test_report_takes_its_folder_as_run_dir_argument_option_or_config(tmp_path, monkeypatch, capsys):
    from kdcache.pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    _metrics(tmp_path / "runs" / "x", {"signal": "topk", "k": 8})
    (tmp_path / "my.yaml").write_text("run_dir: runs/x\n")
    for args in (["report", "runs/x"], ["report", "--run-dir", "runs/x"], ["report", "-c", "my.yaml"]):
        (tmp_path / "runs" / "x" / "report" / "report.md").unlink(missing_ok=True)
        assert main(args) == 0, args
        assert (tmp_path / "runs" / "x" / "report" / "report.md").exists(), args
    assert main(["report", "runs/x", "--run-dir", "runs/y"]) == 2
    assert "report got two folders" in capsys.readouterr().err
