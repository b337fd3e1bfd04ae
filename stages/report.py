"""report: one Markdown + HTML page with PNG plots for a run folder (or a folder of runs, e.g. an experiment).

Recipe: find what the folder holds -> one section per kind of result that is present -> write report.md,
report.html and the PNGs into RUN/report/. A section whose data is absent is left out, so the same command
serves a single demo run, an experiment folder of many runs and a benchmark folder.

Sections (data they read; any depth below the folder):
  held-out metrics        eval/metrics.json               table: trained vs untrained student per run
  training curves         <student>/metrics.jsonl         loss per step of every student (train.output names it)
  TAID's t                <student>/metrics.jsonl         t per step of the students that log taid_t
  cache coverage          signals/*/manifest.json         histogram of the teacher mass the cached top-k holds
  bytes/token vs fidelity signals/*/manifest.json and     bytes per token on disk against teacher mass covered,
                          cache.json (make bench-cache)   the gradient angle and the held-out student KL
  MiniDisc λ-tradeoff     assistants/ta_plan.json         P and P + λ·sparsity of every candidate, the chosen one
  committee weights       eval/committee_weights.json     mean α per member by the class of the true next token
"""
from __future__ import annotations

import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdcache.pipeline.errors import KdcacheError
from kdcache.storage.files import atomic_write_bytes

REPORT_DIR = "report"
STUDENT_DIR = "student"   # train.output's default: such a student is labelled by its run alone
KIND_COLOURS = {"topk": "tab:blue", "sample": "tab:orange", "hybrid": "tab:green"}


@dataclass
class Section:
    title: str
    text: str = ""
    table: list[list[str]] = field(default_factory=list)   # first row is the header
    image: str | None = None                               # file name inside the report folder


@dataclass
class StudentLog:
    objective: str            # train.loss, from the student's last checkpoint ("?" without one)
    rows: list[dict]          # metrics.jsonl, one record per optimiser step


@dataclass
class StoreSummary:
    """What the report needs of one signal store."""
    signal: str
    bytes_per_token: float
    mass: np.ndarray | None   # (P,) teacher mass on the exact top-k per position; None for sampled signals
    entries: np.ndarray | None = None  # (P,) distinct ids the N draws hit per position; signal sample only
    samples: int | None = None         # N (sampled signals)


# ---- discovery ------------------------------------------------------------------------------------------

def _label(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return rel if rel != "." else root.name


def student_label(student_dir: Path, root: Path) -> str:
    """A student by its run, plus its train.output name when that is not the default `student`."""
    if student_dir.name == STUDENT_DIR:
        return _label(student_dir.parent, root)
    return _label(student_dir, root)


def find(root: Path, pattern: str) -> list[Path]:
    """Files matching `pattern` below root (root itself included), skipping the report's own folder."""
    return sorted(p for p in root.glob(pattern) if REPORT_DIR not in p.relative_to(root).parts[:1])


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log; a last line cut short by a killed writer is left out."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.rstrip().endswith("}")]


# the command that writes each JSON file the report reads, for the advice of its error
WRITERS = {"metrics.json": "`kdcache evaluate`", "committee_weights.json": "`kdcache evaluate`",
           "ta_plan.json": "`kdcache assistants`", "state.json": "`kdcache train`", "cache.json": "`make bench-cache`"}


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        writer = WRITERS.get(path.name, "the stage")
        raise KdcacheError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): rerun {writer}, which wrote it, "
                           "or move it out of the folder") from None


def training_logs(root: Path) -> dict[str, StudentLog]:
    """{student label: its log} of every training log (RUN/<train.output>/metrics.jsonl) with steps."""
    from kdcache.stages.train import latest_checkpoint

    logs = {}
    for path in find(root, "**/metrics.jsonl"):
        rows = read_jsonl(path)
        if rows and "step" in rows[0] and "loss" in rows[0]:
            checkpoint = latest_checkpoint(path.parent / "checkpoints")
            config = read_json(checkpoint / "state.json")["config"] if checkpoint else {}
            logs[student_label(path.parent, root)] = StudentLog(config.get("train", {}).get("loss", "?"), rows)
    return logs


def signal_stores(root: Path, max_positions: int = 200_000) -> dict[str, StoreSummary]:
    """{label: summary} of every finished signal store below root (coverage from up to max_positions positions)."""
    from kdcache.stages.inspect import mass_covered
    from kdcache.storage import StoreError, open_store, read_shard

    stores = {}
    for manifest in find(root, "**/signals/*/manifest.json"):
        try:
            store = open_store(manifest.parent)
        except StoreError:
            continue  # an unfinished store: nothing to show yet
        params = store.manifest.params
        positions = sum(r.count for r in store.manifest.shards) * params["seq_len"]
        if positions == 0:
            continue
        signal = params.get("signal", "topk")
        per_position, n = [], 0
        for shard in store.manifest.shards:
            logprobs = read_shard(store, shard.name)["logprobs"]                       # (n, T, C)
            if signal == "sample":  # no coverage gap to show (the estimate sums to 1): its support instead
                per_position.append(np.isfinite(logprobs).sum(-1).ravel())             # (n*T,)
            else:
                per_position.append(mass_covered(logprobs, params).ravel())            # (n*T,)
            n += per_position[-1].size
            if n >= max_positions:
                break
        values = np.concatenate(per_position)
        stores[_label(manifest.parent, root)] = StoreSummary(
            signal=signal, bytes_per_token=store.nbytes() / positions,
            mass=None if signal == "sample" else np.clip(values, 0, 1),
            entries=values if signal == "sample" else None, samples=params.get("samples"))
    return stores


def _image_name(stem: str, index: int, count: int) -> str:
    return f"{stem}.png" if count == 1 else f"{stem}-{index + 1}.png"


# ---- plots ----------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _legend(fig, handles=None, labels=None) -> None:
    """The legend below the plot, outside the axes, so it never covers data (constrained layout makes room)."""
    if handles is None:
        handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=_legend_columns(labels), fontsize=8, frameon=False)


def _legend_columns(labels: list[str]) -> int:
    longest = max(len(label) for label in labels)
    columns = 1 if longest > 48 else 2 if longest > 30 else 3  # long names (paths of a bench folder) stay whole
    return min(columns, len(labels))


def _histogram_figure(labels: list[str]):
    """A figure for one histogram whose legend, below it, has one entry per label: taller as the legend grows,
    so the plot keeps its height."""
    plt = _pyplot()
    rows = -(-len(labels) // _legend_columns(labels))
    return plt.subplots(figsize=(7.5, 3.4 + 0.2 * rows), layout="constrained")


def _colours(n: int) -> list:
    """n distinguishable line colours: tab10, or tab20 when more curves than that share a plot."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _share_hist(ax, values: np.ndarray, bins: np.ndarray, colour, label: str) -> None:
    """A histogram as the share of positions per bin, so stores of different sizes compare."""
    ax.hist(values, bins=bins, weights=np.full(len(values), 100 / len(values)), histtype="step", linewidth=1.6,
            color=colour, label=label)


def _save(fig, path: Path) -> None:
    """Written aside and renamed, so a reader never sees half a PNG."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` steps (the raw per-step loss is noisy at small batch sizes)."""
    if window <= 1 or len(values) < 2:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    out = np.empty_like(values)
    for i in range(len(values)):
        lo = max(0, i + 1 - window)
        out[i] = (cumsum[i + 1] - cumsum[lo]) / (i + 1 - lo)
    return out


def trailing_window(n_steps: int) -> int:
    """Steps in the trailing mean of a training curve: ~5% of the run, and at least 2, so the mean is a second
    line beside the per-step one even for a short run (with 1 the two lines would be the same)."""
    return max(2, n_steps // 20)


def _step_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("optimiser step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_training_curves(logs: dict[str, StudentLog], out: Path) -> None:
    """One panel per objective (their losses are on different scales: TAID's CE includes an entropy, KL does
    not), one line per student."""
    plt = _pyplot()
    objectives = sorted({log.objective for log in logs.values()})
    fig, axes = plt.subplots(len(objectives), 1, figsize=(7.5, 0.8 + 3.3 * len(objectives)), sharex=True,
                             squeeze=False, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, log) in enumerate(logs.items()):
        ax = axes[objectives.index(log.objective), 0]
        steps = np.array([r["step"] for r in log.rows])
        loss = np.array([r["loss"] for r in log.rows], dtype=float)
        window = trailing_window(len(loss))
        colour = colours[i % len(colours)]
        ax.plot(steps, loss, color=colour, alpha=0.35, linewidth=0.9)
        ax.plot(steps, _smooth(loss, window), label=f"{label} (mean of {window} steps)", linewidth=1.8, color=colour)
    for ax, objective in zip(axes[:, 0], objectives):
        ax.set_title(f"train.loss = {objective}", fontsize=10)
        ax.set_ylabel("training loss per token")
    _step_axis(axes[-1, 0])
    fig.suptitle("Training curves (faint: per step; solid: trailing mean)", fontsize=11)
    handles = [h for ax in axes[:, 0] for h in ax.get_legend_handles_labels()[0]]
    _legend(fig, handles, [h.get_label() for h in handles])
    _save(fig, out)


def plot_taid_t(logs: dict[str, StudentLog], out: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.8), layout="constrained")
    for label, log in logs.items():
        ax.plot([r["step"] for r in log.rows], [r["taid_t"] for r in log.rows], label=label, linewidth=1.6)
    _step_axis(ax)
    ax.set_ylabel("t")
    ax.set_ylim(0, 1.05)
    ax.set_title("TAID interpolation weight t (0 = student, 1 = teacher)")
    _legend(fig)
    _save(fig, out)


def plot_coverage(coverage: dict[str, np.ndarray], out: Path) -> None:
    labels = [f"{label} (mean {mass.mean():.1%})" for label, mass in coverage.items()]
    fig, ax = _histogram_figure(labels)
    bins = np.linspace(0, 1, 41)
    for mass, label, colour in zip(coverage.values(), labels, _colours(len(coverage))):
        _share_hist(ax, mass, bins, colour, label)
    ax.set_xlabel("teacher probability mass held by the cached top-k, per position")
    ax.set_ylabel("% of positions")
    ax.set_title("Cache coverage")
    _legend(fig)
    _save(fig, out)


def plot_support(stores: dict[str, StoreSummary], out: Path) -> None:
    labels = [f"{label} (N={s.samples}, mean {s.entries.mean():.1f})" for label, s in stores.items()]
    fig, ax = _histogram_figure(labels)
    top = max(int(s.entries.max()) for s in stores.values())
    bins = np.arange(0.5, top + 1.5)  # one bin per count of distinct ids
    for s, label, colour in zip(stores.values(), labels, _colours(len(stores))):
        _share_hist(ax, s.entries, bins, colour, label)
    ax.set_xlabel("distinct ids among the N draws, per position")
    ax.set_ylabel("% of positions")
    ax.set_title("Cache support (sampled signals)")
    _legend(fig)
    _save(fig, out)


# label offsets (points) tried in turn, right of the point then left of it, nearest first
_LABEL_OFFSETS = [(dx, dy) for dy in (0, 10, -10, 20, -20, 30, -30, 40, -40, 50, -50) for dx in (7, -7)]


def _label_points(ax, xy: list[tuple[float, float]], labels: list[str]) -> None:
    """Name every point at the first offset where its name overlaps no other name and no other point (points of
    nearly equal size and fidelity, e.g. one kind at two value encodings, would otherwise print their names on
    top of each other), else where it overlaps the fewest; a thin line ties a name that had to move to its point.
    Boxes are computed in display pixels from each name's measured size; the figure must have been drawn."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dots = [ax.transData.transform(p) for p in xy]                             # display pixels
    # r: keep names this far (pixels) from other points, or a name reads as the neighbour's; px: pixels per point
    r, pad, px = 9.0, 2.0, fig.dpi / 72
    placed: list = []
    for i, (point, label, (x, y)) in enumerate(zip(xy, labels, dots)):
        probe = ax.text(0, 0, label, fontsize=7.5)
        extent = probe.get_window_extent(renderer)
        width, height = extent.width + 2 * pad, extent.height + 2 * pad
        probe.remove()
        obstacles = placed + [Bbox.from_extents(u - r, v - r, u + r, v + r) for j, (u, v) in enumerate(dots) if j != i]
        best = None
        for dx, dy in _LABEL_OFFSETS:
            left = x + dx * px - (width if dx < 0 else 0)
            box = Bbox.from_bounds(left, y + dy * px - height / 2, width, height)
            outside = not (frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1))
            cost = sum(box.overlaps(b) for b in obstacles) + 100 * outside
            if best is None or cost < best[0]:
                best = (cost, dx, dy, box)
            if cost == 0:
                break
        _, dx, dy, box = best
        ax.annotate(label, point, textcoords="offset points", xytext=(dx, dy), fontsize=7.5,
                    ha="left" if dx > 0 else "right", va="center",
                    arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5} if dy else None)
        placed.append(box)


def plot_fidelity(points: list[dict], out: Path) -> None:
    """One panel per measure (teacher mass covered, gradient angle, student KL vs dense) that any point has,
    against bytes per token (shared log axis); each point named, coloured by signal kind."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plt = _pyplot()
    panels = [(key, title, unit) for key, title, unit in [
        ("mass", "teacher mass on the exact top-k (higher is better)", "mass"),
        ("angle", "gradient angle to full KD, bucket tail (lower is better)", "degrees"),
        ("kl_vs_dense", "held-out student KL vs the full-logit student (lower is better)", "% above dense")]
        if any(p.get(key) is not None for p in points)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 0.6 + 3.3 * len(panels)), sharex=True, squeeze=False,
                             layout="constrained")
    axes = axes[:, 0]
    for ax, (key, title, unit) in zip(axes, panels):
        shown = [p for p in points if p.get(key) is not None]
        values = [100 * p[key] if key == "kl_vs_dense" else p[key] for p in shown]
        for p, value in zip(shown, values):
            marker, size = ("*", 180) if p["origin"] == "store" else ("o", 45)
            ax.scatter(p["bytes_per_token"], value, marker=marker, s=size, color=KIND_COLOURS.get(p["kind"], "grey"),
                       edgecolors="black", linewidths=0.5, zorder=3)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.3, y=0.25)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        if key == "kl_vs_dense":
            ax.axhline(0, color="grey", linewidth=0.8)
            if max(abs(v) for v in values) > 20:  # one catastrophic kind would flatten the ones within a few %
                ax.set_yscale("symlog", linthresh=1)
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.set_ylabel("% above dense (symlog)")
                low, high = min(values), max(values)
                ax.set_ylim(min(-0.5, 3 * low), 3 * high)  # no empty decades below the lowest point
    fig.canvas.draw()  # the layout and the shared axis's range are final: names can be placed in pixels
    for ax, (key, _, _) in zip(axes, panels):
        shown = [p for p in points if p.get(key) is not None]
        _label_points(ax, [(p["bytes_per_token"], 100 * p[key] if key == "kl_vs_dense" else p[key]) for p in shown],
                      [p["label"] for p in shown])
    axes[-1].set_xlabel("bytes per token on disk (log scale)")
    plotted = [p for p in points if any(p.get(key) is not None for key, _, _ in panels)]  # the legend's entries
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, markeredgecolor="black", label=kind)
               for kind, c in KIND_COLOURS.items() if any(p["kind"] == kind for p in plotted)]
    if any(p["origin"] == "store" for p in plotted):
        handles.append(plt.Line2D([], [], marker="*", markersize=11, linestyle="", color="lightgrey",
                                  markeredgecolor="black", label="a store in this folder"))
    if any(p["origin"] == "bench" for p in plotted):
        handles.append(plt.Line2D([], [], marker="o", linestyle="", color="lightgrey", markeredgecolor="black",
                                  label="a kind of make bench-cache"))
    _legend(fig, handles, [h.get_label() for h in handles])
    fig.suptitle("Cache size vs fidelity", fontsize=11)
    _save(fig, out)


def plot_tradeoff(table: list[dict], chosen: int, tradeoff_lambda: float, path: Path, title: str = "") -> None:
    """MiniDisc: P and P + λ·sparsity against sparsity; the chosen assistant and the size floor marked."""
    plt = _pyplot()
    x = [100 * r["sparsity"] for r in table]
    p = [r["P"] for r in table]
    tradeoff = [r["tradeoff"] for r in table]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    excluded = [xi for xi, r in zip(x, table) if not r["eligible"]]
    if excluded:
        ax.axvspan(min(excluded) - 2, max(excluded) + 2, color="grey", alpha=0.15, label="below the size floor")
    ax.plot(x, p, "o-", color="tab:blue", label="P = top-1 agreement with the teacher")
    ax.plot(x, tradeoff, "s-", color="tab:orange", label=f"P + λ·sparsity (λ = {tradeoff_lambda:g})")
    ax.scatter([x[chosen]], [tradeoff[chosen]], s=220, facecolors="none", edgecolors="red", linewidths=2,
               zorder=5, label=f"chosen: {x[chosen]:.0f}% sparse")
    ax.set_xlim(min(x) - 5, max(x) + 5)
    ax.set_ylim(0, max(tradeoff) * 1.15)
    ax.set_xlabel("sparsity of non-embedding parameters (%)")
    ax.set_ylabel("score")
    ax.set_title(title or "MiniDisc: teacher-assistant candidates (one slimmable trial)", fontsize=10)
    secondary = ax.secondary_xaxis("top", functions=(lambda s: 100 - s, lambda k: 100 - k))
    secondary.set_xlabel("assistant size (% of the teacher's non-embedding parameters)")
    _legend(fig)
    _save(fig, path)


def plot_committee_weights(weights: dict, title: str, out: Path) -> None:
    """Per group of positions (all, then each token class): the mean α of each member (left) next to the share
    of positions where that member gives the true token the most probability (right)."""
    plt = _pyplot()
    members = weights["members"]
    groups = [g for g in weights["groups"] if g == "all" or g.startswith("class: ")]
    ticks = [f"{g.removeprefix('class: ')}\n(n={weights['groups'][g]['positions']})" for g in groups]
    x = np.arange(len(groups))
    width = 0.8 / len(members)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True, layout="constrained")
    for ax, key, subtitle in [(axes[0], "alpha", f"mean α ({weights['weights']} weights)"),
                              (axes[1], "best_share", "share of positions where the member is best on the true token")]:
        for i, member in enumerate(members):
            ax.bar(x + (i - (len(members) - 1) / 2) * width, [weights["groups"][g][key][member] for g in groups],
                   width, label=member)
        ax.set_xticks(x, ticks, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(subtitle, fontsize=10)
        ax.grid(axis="x", visible=False)
    axes[0].set_ylabel("fraction of positions / weight")
    _legend(fig)
    fig.suptitle(title, fontsize=11)
    _save(fig, out)


# ---- sections -------------------------------------------------------------------------------------------

def metrics_section(root: Path) -> Section | None:
    from kdcache.stages.evaluate import percent

    files = find(root, "**/eval/metrics.json")
    if not files:
        return None
    rows = [["run", "student", "measured against (cache)", "KL(teacher‖student)", "top-1 agreement",
             "teacher top-1 tied", "top-5 order agreement", "perplexity"]]
    stale_any = False
    for path in files:
        metrics = read_json(path)
        output, above = metrics["config"].get("output", STUDENT_DIR), path.parent.parent
        # RUN/eval belongs to the default student, RUN/<train.output>/eval to another one
        student_dir = above if above.name == output else above / output
        run = student_label(student_dir, root)
        cache = cache_label(metrics.get("cache", {}))
        stale = _stale_evaluation(metrics, student_dir / "final")
        stale_any |= stale
        for name, m in metrics["students"].items():
            label = f"{name} (stale)" if stale and name == "trained" else name
            rows.append([run, label, cache, f"{m['kl_teacher']:.4f}", f"{m['top1_agreement']:.2%}",
                         percent(m.get("teacher_top1_tie_share")), percent(m.get("top5_order_agreement")),
                         f"{m['perplexity']:.2f}"])
    text = ("Validation split. KL and agreement are measured against the cached teacher signal named in the cache "
            "column, so they compare between rows of the same cache only: a sampled cache's KL is against its "
            "estimate, a top-k's against its support plus one tail bucket. A teacher top-1 tied among m ids credits "
            "1/m (n/a: measured before ties were counted).")
    if stale_any:
        text += (" A student marked (stale) was trained further or replaced after it was evaluated: its row "
                 "measures the earlier student; rerun `kdcache evaluate` for the current one.")
    return Section("Held-out metrics", text, table=rows)


def _stale_evaluation(metrics: dict, final: Path) -> bool:
    """Whether an evaluation measured another trained student than the one now in `final`: its sha256 (from the
    student's training.json) differs, or the student is gone. An evaluation or student without the record is
    taken as current (they predate it)."""
    measured = (metrics.get("student") or {}).get("sha256")
    if measured is None:
        return False
    record = final / "training.json"
    return not record.exists() or read_json(record).get("sha256") != measured


def cache_label(cache: dict) -> str:
    """The cache an evaluation measured against, by kind and parameters: `topk k=16`, `sample N=40 systematic`,
    `hybrid k=16 + N=40 iid`; `?` for a metrics.json that does not say."""
    signal = cache.get("signal")
    if signal is None:
        return "?"
    draws = f"N={cache.get('samples')}" + (f" {cache['draws']}" if cache.get("draws") else "")
    return {"topk": f"topk k={cache.get('k')}", "sample": f"sample {draws}",
            "hybrid": f"hybrid k={cache.get('k')} + {draws}"}.get(signal, signal)


def training_sections(logs: dict[str, StudentLog], out_dir: Path) -> list[Section]:
    if not logs:
        return []
    plot_training_curves(logs, out_dir / "training_curves.png")
    sections = [Section("Training curves", "Loss per optimiser step of each student in this folder, one panel per "
                        "objective.", image="training_curves.png")]
    taid = {k: v for k, v in logs.items() if "taid_t" in v.rows[0]}
    if taid:
        plot_taid_t(taid, out_dir / "taid_t.png")
        finals = ", ".join(f"{k}: {v.rows[-1]['taid_t']:.3f}" for k, v in taid.items())
        sections.append(Section("TAID's t", f"t at the last step — {finals}.", image="taid_t.png"))
    return sections


def coverage_section(stores: dict[str, StoreSummary], out_dir: Path) -> Section | None:
    coverage = {label: s.mass for label, s in stores.items() if s.mass is not None}
    if not coverage:
        return None
    plot_coverage(coverage, out_dir / "coverage.png")
    return Section("Cache coverage", "How much of the teacher's probability the cached top-k holds at each position; "
                   "the rest is the tail the loss's tail mode accounts for.", image="coverage.png")


def support_section(stores: dict[str, StoreSummary], out_dir: Path) -> Section | None:
    sampled = {label: s for label, s in stores.items() if s.entries is not None}
    if not sampled:
        return None
    plot_support(sampled, out_dir / "support.png")
    return Section("Cache support", "A sampled cache has no coverage gap: its estimate of the teacher sums to 1 at "
                   "every position. What it holds per position are the distinct ids its N draws hit — few where the "
                   "teacher is sure, many where it hesitates — and its bytes grow with them.", image="support.png")


def bench_cache_rows(root: Path) -> list[dict]:
    """The kinds of every cache.json written by `make bench-cache` (benchmarks/cache.py) below root."""
    rows = []
    for path in find(root, "**/cache.json"):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue  # a cache.json of some other tool
        if isinstance(data, dict) and isinstance(data.get("kinds"), list):
            rows += data["kinds"]
    return rows


def fidelity_section(stores: dict[str, StoreSummary], bench: list[dict], out_dir: Path) -> Section | None:
    points = [{"label": label, "origin": "store", "kind": s.signal, "bytes_per_token": s.bytes_per_token,
               "mass": float(s.mass.mean()) if s.mass is not None else None} for label, s in stores.items()]
    points += [{"label": r["label"], "origin": "bench", "kind": r["signal"], "bytes_per_token": r["bytes_per_token"],
                "mass": r.get("topk_mass"), "angle": r.get("grad_bucket", {}).get("angle_deg"),
                "kl_vs_dense": (r.get("student") or {}).get("kl_vs_dense")} for r in bench]
    if not any(p["mass"] is not None or p.get("angle") is not None for p in points):
        return None
    plot_fidelity(points, out_dir / "cache_fidelity.png")

    def cell(value, fmt: str, unit: str = "") -> str:
        return "—" if value is None else format(value, fmt) + unit

    table = [["cache", "from", "signal", "bytes/token", "teacher mass on top-k", "gradient angle (bucket)",
              "student KL vs dense"]]
    for p in sorted(points, key=lambda p: p["bytes_per_token"]):
        table.append([p["label"], "this folder" if p["origin"] == "store" else "bench-cache", p["kind"],
                      f"{p['bytes_per_token']:.1f}", cell(p["mass"], ".3f"), cell(p.get("angle"), ".1f", "°"),
                      cell(p.get("kl_vs_dense"), "+.1%")])
    text = ("Bytes per token on disk against how faithful the cached signal is: the teacher mass the exact top-k holds "
            "(sampled signals have none), and for `make bench-cache` kinds the angle between the cached target's "
            "gradient and full KD's and the held-out KL of a student trained on each, relative to one trained on "
            "the full logits. Held-out KLs of this folder's runs are not plotted: each is measured against its own "
            "cache, so they do not compare across caches.")
    unplotted = [p["label"] for p in points if p["mass"] is None and p.get("angle") is None
                 and p.get("kl_vs_dense") is None]
    if unplotted:  # a sampled store of this folder: no exact top-k, and no gradient angle measured for it
        text += (f" Not plotted, having none of these measures (a sampled store holds no exact top-k; the angle and "
                 f"student KL come from `make bench-cache` only): {', '.join(unplotted)}; their bytes per token are "
                 "in the table.")
    return Section("Bytes per token vs fidelity", text, table=table, image="cache_fidelity.png")


def tradeoff_sections(root: Path, out_dir: Path) -> list[Section]:
    from kdcache.stages.assistants import table_rows

    plans = find(root, "**/assistants/ta_plan.json")
    sections = []
    for i, path in enumerate(plans):
        plan = read_json(path)
        table = plan["table"]
        chosen = next(j for j, r in enumerate(table) if r["chosen"])
        run = _label(path.parent.parent, root)
        name = _image_name("ta_tradeoff", i, len(plans))
        plot_tradeoff(table, chosen, plan["tradeoff_lambda"], out_dir / name,
                      title=f"MiniDisc teacher-assistant candidates: {run}")
        c = table[chosen]
        text = (f"One slimmable trial scored every candidate width; the choice is argmax P + λ·sparsity "
                f"(λ = {plan['tradeoff_lambda']:g}) above the size floor: {c['sparsity']:.1%} sparse, "
                f"P = {c['P']:.3f}. {plan['score']}.")
        sections.append(Section(f"MiniDisc λ-tradeoff: {run}", text, table=table_rows(table), image=name))
    return sections


def committee_sections(root: Path, out_dir: Path) -> list[Section]:
    files = find(root, "**/eval/committee_weights.json")
    sections = []
    for i, path in enumerate(files):
        weights = read_json(path)
        run = _label(path.parent.parent, root)
        name = _image_name("committee_weights", i, len(files))
        plot_committee_weights(weights, f"Committee weights by the class of the true next token: {run}",
                               out_dir / name)
        members = weights["members"]
        table = [["positions", "n", *(f"mean α {m}" for m in members), *(f"{m} best" for m in members)]]
        for group, g in weights["groups"].items():
            table.append([group, str(g["positions"]), *(f"{g['alpha'][m]:.3f}" for m in members),
                          *(f"{g['best_share'][m]:.1%}" for m in members)])
        text = (f"How the student weighed its committee ({weights['weights']} weights) on the held-out positions, "
                "by the class of the true next token, next to how often each member gives that token the most "
                "probability: weights that follow expertise put more α where a member is best.")
        sections.append(Section(f"Committee weights by token type: {run}", text, table=table, image=name))
    return sections


# ---- rendering ------------------------------------------------------------------------------------------

def markdown_table(rows: list[list[str]]) -> str:
    """Rows (the first is the header) as a Markdown table."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]])


def to_markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.text:
            lines += [s.text, ""]
        if s.table:
            lines += [markdown_table(s.table), ""]
        if s.image:
            lines += [f"![{s.title}]({s.image})", ""]
    return "\n".join(lines)


def to_html(title: str, sections: list[Section]) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{e(s.title)}</h2>")
        if s.text:
            body.append(f"<p>{e(s.text)}</p>")
        if s.table:
            head = "".join(f"<th>{e(c)}</th>" for c in s.table[0])
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in s.table[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        if s.image:
            body.append(f'<img src="{e(s.image)}" alt="{e(s.title)}">')
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}"
             "img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def run(root: Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise KdcacheError(f"run folder {root} does not exist: pass the --run-dir of a run (e.g. runs/default)")
    out_dir = root / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):  # plots of data that is gone must not linger beside the new report
        old.unlink()
    stores = signal_stores(root)
    sections = [metrics_section(root), *training_sections(training_logs(root), out_dir),
                coverage_section(stores, out_dir), support_section(stores, out_dir),
                fidelity_section(stores, bench_cache_rows(root), out_dir),
                *tradeoff_sections(root, out_dir), *committee_sections(root, out_dir)]
    sections = [s for s in sections if s is not None]
    if not sections:
        raise KdcacheError(f"{root} holds no results to report (no eval/metrics.json, training log, signal store, "
                           "ta_plan.json or cache.json)")
    title = f"kdcache report: {root.name}"
    (out_dir / "report.md").write_text(to_markdown(title, sections))
    (out_dir / "report.html").write_text(to_html(title, sections))
    print(f"report: {len(sections)} sections -> {out_dir / 'report.md'} and report.html", flush=True)
    return out_dir
