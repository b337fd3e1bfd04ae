"""report: one Markdown + HTML page with PNG plots for a run folder (or a folder of runs, e.g. an experiment).

Recipe: find what the folder holds -> one section per kind of result that is present -> write report.md,
report.html and the PNGs into RUN/report/. A section whose data is absent is left out, so the same command
serves a single demo run and an experiment folder of many runs.

Sections (data they read):
  held-out metrics        */eval/metrics.json             table: trained vs untrained student per run
  training curves         */student/metrics.jsonl         loss per step, one line per run (objective)
  TAID's t                */student/metrics.jsonl         t per step for runs that log taid_t
  cache coverage          */signals/*/manifest.json       histogram of the teacher mass the cached support holds
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import KdcacheError

REPORT_DIR = "report"


@dataclass
class Section:
    title: str
    text: str = ""
    table: list[list[str]] = field(default_factory=list)   # first row is the header
    image: str | None = None                               # file name inside the report folder


# ---- discovery ------------------------------------------------------------------------------------------

def _label(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return rel if rel != "." else root.name


def find(root: Path, pattern: str) -> list[Path]:
    """Files matching `pattern` below root (root itself included), skipping the report's own folder."""
    return sorted(p for p in root.glob(pattern) if REPORT_DIR not in p.relative_to(root).parts[:1])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- plots ----------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3})
    return plt


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


def plot_training_curves(logs: dict[str, list[dict]], out: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, rows in logs.items():
        steps = np.array([r["step"] for r in rows])
        loss = np.array([r["loss"] for r in rows], dtype=float)
        window = max(1, len(rows) // 20)
        line, = ax.plot(steps, _smooth(loss, window), label=label, linewidth=1.6)
        ax.plot(steps, loss, color=line.get_color(), alpha=0.2, linewidth=0.8)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss per token")
    ax.set_title("Training curves (faint: per step; solid: trailing mean)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_taid_t(logs: dict[str, list[dict]], out: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for label, rows in logs.items():
        ax.plot([r["step"] for r in rows], [r["taid_t"] for r in rows], label=label, linewidth=1.6)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("t")
    ax.set_ylim(0, 1.05)
    ax.set_title("TAID interpolation weight t (0 = student, 1 = teacher)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_coverage(coverage: dict[str, np.ndarray], out: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    bins = np.linspace(0, 1, 41)
    for label, mass in coverage.items():
        ax.hist(mass, bins=bins, histtype="step", linewidth=1.6, label=f"{label} (mean {mass.mean():.1%})")
    ax.set_xlabel("teacher probability mass held by the cached support, per position")
    ax.set_ylabel("positions")
    ax.set_title("Cache coverage")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# ---- sections -------------------------------------------------------------------------------------------

def metrics_section(root: Path) -> Section | None:
    files = find(root, "**/eval/metrics.json")
    if not files:
        return None
    rows = [["run", "student", "KL(teacher‖student)", "top-1 agreement", "top-5 order agreement", "perplexity"]]
    for path in files:
        metrics = json.loads(path.read_text())
        for name, m in metrics["students"].items():
            rows.append([_label(path.parent.parent, root), name, f"{m['kl_teacher']:.4f}",
                         f"{m['top1_agreement']:.2%}", f"{m['top5_order_agreement']:.2%}", f"{m['perplexity']:.2f}"])
    return Section("Held-out metrics", "Validation split; KL against the cached teacher signal.", table=rows)


def training_sections(root: Path, out_dir: Path) -> list[Section]:
    logs = {_label(p.parent.parent, root): read_jsonl(p) for p in find(root, "**/student/metrics.jsonl")}
    logs = {k: v for k, v in logs.items() if v}
    if not logs:
        return []
    plot_training_curves(logs, out_dir / "training_curves.png")
    sections = [Section("Training curves", "Loss per optimiser step of each student in this folder.",
                        image="training_curves.png")]
    taid = {k: v for k, v in logs.items() if "taid_t" in v[0]}
    if taid:
        plot_taid_t(taid, out_dir / "taid_t.png")
        finals = ", ".join(f"{k}: {v[-1]['taid_t']:.3f}" for k, v in taid.items())
        sections.append(Section("TAID's t", f"t at the last step — {finals}.", image="taid_t.png"))
    return sections


def coverage_section(root: Path, out_dir: Path, max_positions: int = 200_000) -> Section | None:
    from storage import StoreError, open_store, read_shard

    coverage = {}
    for manifest in find(root, "**/signals/*/manifest.json"):
        try:
            store = open_store(manifest.parent)
        except StoreError:
            continue  # an unfinished store: nothing to show yet
        if store.manifest.params.get("signal", "topk") != "topk":
            continue  # sampled targets carry no exact per-position mass
        masses, n = [], 0
        for shard in store.manifest.shards:
            logprobs = read_shard(store, shard.name)["logprobs"]                    # (n, T, K)
            masses.append(np.exp(logprobs.astype(np.float64)).sum(-1).ravel())
            n += masses[-1].size
            if n >= max_positions:
                break
        coverage[_label(manifest.parent, root)] = np.clip(np.concatenate(masses), 0, 1)
    if not coverage:
        return None
    plot_coverage(coverage, out_dir / "coverage.png")
    return Section("Cache coverage", "How much of the teacher's probability the cached top-k holds at each position; "
                   "the rest is the tail the loss's tail mode accounts for.", image="coverage.png")


# ---- rendering ------------------------------------------------------------------------------------------

def to_markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.text:
            lines += [s.text, ""]
        if s.table:
            lines.append("| " + " | ".join(s.table[0]) + " |")
            lines.append("|" + "---|" * len(s.table[0]))
            lines += ["| " + " | ".join(row) + " |" for row in s.table[1:]]
            lines.append("")
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
    sections = [s for s in [metrics_section(root), *training_sections(root, out_dir),
                            coverage_section(root, out_dir)] if s is not None]
    if not sections:
        raise KdcacheError(f"{root} holds no results to report (no eval/metrics.json, training log or signal store)")
    title = f"kdcache report: {root.name}"
    (out_dir / "report.md").write_text(to_markdown(title, sections))
    (out_dir / "report.html").write_text(to_html(title, sections))
    print(f"report: {len(sections)} sections -> {out_dir / 'report.md'} and report.html", flush=True)
    return out_dir
