"""The bad-input matrix: every case is one `kdcache: error:` line on stderr naming the problem, exit code 2 and no
traceback; `--debug` shows the traceback. The table in README.md `## Reliability` lists these cases."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdcache.pipeline.cli import main
from kdcache.pipeline.config import PrecomputeConfig
from kdcache.pipeline.errors import KdcacheError
from tests.conftest import build_tiny_model, build_tokenizer
from tests.reliability.conftest import DETAILS, cli_args, instruction_lines, one_error_line

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

LINES: dict[str, str] = {}  # case -> the error line, written next to the counts for the README table
DETAILS["bad_input_lines"] = LINES


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, base_run, tiny_teacher):
    """Bad files, a run with tokens and signals, a run with tokens only, a student with another vocabulary."""
    d = tmp_path_factory.mktemp("bad-input")
    (d / "empty.jsonl").write_text("")
    (d / "no-text.jsonl").write_text('{"title": "a"}\n{"title": "b"}\n')
    (d / "no-response.jsonl").write_text('{"instruction": "say hi"}\n{"instruction": "say bye"}\n')
    (d / "latin1.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 cr\xe8me"}\n')
    (d / "latin1.txt").write_bytes(b"first paragraph\n\nsecond caf\xe9\n")
    (d / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "no closing quote}\n')
    (d / "data.xml").write_text("<a/>")
    (d / "long.jsonl").write_text(instruction_lines(20, words=40))
    (d / "bad.yaml").write_text("train:\n  lr: [1e-4\n")
    (d / "list.yaml").write_text("- train\n- lr\n")
    shutil.copytree(base_run, d / "run")
    (d / "tokens-only").mkdir()
    shutil.copytree(base_run / "tokens", d / "tokens-only" / "tokens")
    build_tiny_model(d / "student-v300", build_tokenizer(vocab_size=300), layers=1)
    return d


def _samples_case():
    has = "samples" in PrecomputeConfig.__dataclass_fields__
    return pytest.param("precompute", {"precompute.samples": 0}, "precompute.samples must be in 1..255", "run",
                        id="samples N <= 0",
                        marks=pytest.mark.skipif(not has, reason="precompute.samples lands with the kinds branch"))


# (command, overrides or extra CLI args, words of the error, run folder) — {d} is the inputs folder
CASES = [
    pytest.param("prepare", {"prepare.dataset": "{d}/empty.jsonl"}, "empty.jsonl is empty", "new", id="empty dataset"),
    pytest.param("prepare", {"prepare.dataset": "{d}/no-text.jsonl"}, "record 0 has fields ['title']", "new",
                 id="missing text field"),
    pytest.param("prepare", {"prepare.dataset": "{d}/no-response.jsonl", "prepare.format": "instruction"},
                 "lacks text field(s) ['response']", "new", id="missing response field"),
    pytest.param("prepare", {"prepare.dataset": "{d}/latin1.jsonl"}, "latin1.jsonl is not valid UTF-8 (byte 0xe9 on line 2)",
                 "new", id="non-UTF-8 jsonl"),
    pytest.param("prepare", {"prepare.dataset": "{d}/latin1.txt"}, "latin1.txt is not valid UTF-8 (byte 0xe9 on line 3)",
                 "new", id="non-UTF-8 txt"),
    pytest.param("prepare", {"prepare.dataset": "{d}/broken.jsonl"}, "broken.jsonl: line 2 is not valid JSON", "new",
                 id="invalid JSON line"),
    pytest.param("prepare", {"prepare.dataset": "{d}/long.jsonl", "prepare.seq_len": 16, "prepare.truncation": "drop"},
                 "split is empty after tokenisation", "new", id="records longer than seq_len (truncation=drop)"),
    pytest.param("prepare", {"prepare.dataset": "{d}/missing.jsonl"}, "missing.jsonl does not exist", "new",
                 id="data file missing"),
    pytest.param("prepare", {"prepare.dataset": "{d}/data.xml"}, "data.xml has an unsupported type", "new",
                 id="unsupported data file"),
    pytest.param("prepare", {"prepare.seq_len": 4}, "prepare.seq_len must be >= 8", "new", id="seq_len too small"),
    pytest.param("precompute", {"precompute.k": 100000}, "precompute.k=100000 exceeds the teacher's vocabulary (384)",
                 "run", id="k > vocab"),
    pytest.param("precompute", {"precompute.k": 0}, "precompute.k must be >= 1", "run", id="k <= 0"),
    _samples_case(),
    pytest.param("precompute", {"precompute.teacher": "/no/such/teacher"},
                 "precompute.teacher '/no/such/teacher' is not a local path (no such file or folder) and not a hub id",
                 "run", id="teacher path missing"),
    pytest.param("precompute", {"precompute.teacher": "tiny-teacer"},
                 "precompute.teacher 'tiny-teacer' is not a local path (no such file or folder) and not a hub id",
                 "run", id="teacher name misspelled"),
    pytest.param("train", ["--loss", "nonsense"], "unknown loss 'nonsense'", "run", id="unknown loss name"),
    pytest.param("train", ["-c", "{d}/bad.yaml"], "bad.yaml is not valid YAML at line", "run", id="invalid YAML"),
    pytest.param("train", ["-c", "{d}/list.yaml"], "list.yaml must be a mapping of sections", "run", id="YAML not a mapping"),
    pytest.param("train", ["-c", "{d}/none.yaml"], "none.yaml does not exist", "run", id="config file missing"),
    pytest.param("train", {"train.lr": -1}, "train.lr must be > 0, got -1", "run", id="negative learning rate"),
    pytest.param("train", {"train.nope": 1}, "unknown key train.nope", "run", id="unknown config key"),
    pytest.param("train", {"train.max_steps": "many"}, "train.max_steps must be int", "run", id="wrong value type"),
    pytest.param("train", ["-s", "train.lr"], "invalid override 'train.lr'", "run", id="override without ="),
    pytest.param("train", {"train.student": "{d}/student-v300"}, "has vocabulary size 300 but the cache", "run",
                 id="student vocab differs from the cache"),
    pytest.param("train", {"train.student": "layerdrop:x"}, "invalid student spec 'layerdrop:x'", "run",
                 id="bad student spec"),
    pytest.param("train", {"train.source": "../x"}, "'../x' is not a valid source name", "run", id="unsafe source name"),
    pytest.param("train", {}, "no store at {d}/tokens-only/signals/teacher: manifest.json is missing (run `kdcache "
                 "precompute`", "tokens-only", id="train before precompute"),
    pytest.param("evaluate", {}, "no store at {d}/nothing/tokens: manifest.json is missing (run `kdcache prepare`",
                 "nothing", id="evaluate an empty run"),
    pytest.param("inspect", ["{d}"], "no store at {d}", None, id="inspect a folder that is no store"),
]


def _args(command, extra, where, d: Path, teacher) -> list[str]:
    if where is None:
        return [command] + [a.format(d=d) for a in extra]
    base = cli_args(d / where, teacher, command)
    if isinstance(extra, dict):
        return base + [a for k, v in extra.items() for a in ("-s", f"{k}={str(v).format(d=d)}")]
    return base + [a.format(d=d) for a in extra]


@pytest.mark.parametrize("command, extra, words, where", CASES)
def test_bad_input_is_one_line_and_nonzero(command, extra, words, where, inputs, tiny_teacher, capfd, tally, request):
    code = main(_args(command, extra, where, inputs, tiny_teacher))
    line = one_error_line(capfd.readouterr().err)
    assert code == 2
    assert words.format(d=inputs) in line, line
    LINES[request.node.callspec.id] = line.replace(str(inputs), "…")
    tally("bad inputs tried")


def test_debug_shows_the_traceback(inputs, tiny_teacher):
    with pytest.raises(KdcacheError, match="train.lr must be > 0"):
        main(["--debug"] + cli_args(inputs / "run", tiny_teacher, "train", **{"train.lr": -1}))
    # and through the installed entry point, as a user sees it
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "kdcache.pipeline.cli", "--debug", "prepare", "-s", "prepare.seq_len=4"],
                          env=env, capture_output=True, text=True, cwd=inputs)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "prepare.seq_len must be >= 8" in proc.stderr
