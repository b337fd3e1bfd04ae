"""Corrupted, edited and mismatched stores are refused before or at the first read, in one line naming the file
and the mismatch; `kdcache verify` reports every problem of a store at once."""
import json
import shutil
from pathlib import Path

import pytest

from kdcache.pipeline.cli import cli, main
from kdcache.stages import precompute
from kdcache.storage import StoreError, open_store, read_shard
from tests.conftest import build_tiny_model, build_tokenizer
from tests.reliability.conftest import cli_args, one_error_line

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def _chunk(store_dir: Path, shard: str) -> Path:
    """The largest data file of a shard (a compressed chunk, not metadata)."""
    files = [p for p in (store_dir / "shards" / shard).rglob("*") if p.is_file() and p.suffix != ".json"]
    return max(files, key=lambda p: p.stat().st_size)


def _edit_manifest(store_dir: Path, edit) -> None:
    path = store_dir / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


# (what, store, corrupt(store_dir), words the one-line error must contain)
CASES = [
    ("flipped byte in a signal chunk", "signals", lambda d: _flip(_chunk(d, "train-00001")),
     ["shards/train-00001", "is corrupted", "checksum"]),
    ("truncated signal chunk", "signals", lambda d: _truncate(_chunk(d, "train-00002")),
     ["shards/train-00002", "is corrupted"]),
    ("flipped byte in a token chunk", "tokens", lambda d: _flip(_chunk(d, "validation-00000")),
     ["tokens/shards/validation-00000", "is corrupted"]),
    ("deleted shard", "signals", lambda d: shutil.rmtree(d / "shards" / "train-00002"),
     ["shards/train-00002", "is missing"]),
    ("deleted first shard", "signals", lambda d: shutil.rmtree(d / "shards" / "train-00000"),
     ["shards/train-00000", "missing"]),
    ("manifest: params edited (k)", "signals", lambda d: _edit_manifest(d, lambda m: m["params"].update(k=4)),
     ["manifest.json", "does not match the commit record", "params"]),
    ("manifest: seq_len edited", "tokens", lambda d: _edit_manifest(d, lambda m: m["params"].update(seq_len=32)),
     ["tokens/manifest.json", "params"]),
    ("manifest: teacher fingerprint edited", "signals",
     lambda d: _edit_manifest(d, lambda m: m["fingerprints"].update(teacher="sha256:0")),
     ["manifest.json", "fingerprints"]),
    ("manifest: shard checksum edited", "signals",
     lambda d: _edit_manifest(d, lambda m: m["shards"]["checksum"].__setitem__(1, "sha256:" + "0" * 64)),
     ["shards/train-00001", "is corrupted"]),
    ("manifest: a shard dropped from the list", "signals", lambda d: _edit_manifest(d, lambda m: [column.pop() for column in m["shards"].values()]),
     ["signals/teacher", "incomplete"]),
    ("manifest: layout edited", "tokens",
     lambda d: _edit_manifest(d, lambda m: m["layout"]["splits"][0].__setitem__(1, m["layout"]["splits"][0][1] - 1)),
     ["manifest.json", "layout"]),
    ("manifest is not JSON", "signals", lambda d: (d / "manifest.json").write_text("{not json"),
     ["manifest.json", "is not a valid manifest"]),
    ("manifest deleted", "signals", lambda d: (d / "manifest.json").unlink(), ["signals/teacher", "manifest.json is missing"]),
    ("commit record garbled", "signals", lambda d: (d / "shards" / "train-00000" / "_commit.json").write_text("\x00{"),
     ["train-00000/_commit.json", "is corrupted"]),
]


def _read_everything(store_dir: Path) -> None:
    store = open_store(store_dir)
    for shard in store.manifest.shards:
        read_shard(store, shard.name)


@pytest.mark.parametrize("what, kind, corrupt, words", CASES, ids=[c[0] for c in CASES])
def test_corruption_is_detected_at_open_or_first_read(what, kind, corrupt, words, run_copy, tally):
    store_dir = run_copy.tokens_dir if kind == "tokens" else run_copy.signals_dir
    _read_everything(store_dir)  # intact before
    corrupt(store_dir)
    with pytest.raises(StoreError) as e:
        _read_everything(store_dir)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    tally("corruptions detected")


@pytest.mark.parametrize("what, kind, corrupt, words", [CASES[0], CASES[5], CASES[3]], ids=["flip", "edit", "delete"])
def test_train_stops_with_one_line_on_a_corrupted_store(what, kind, corrupt, words, run_copy, tiny_teacher, capfd):
    corrupt(run_copy.signals_dir)
    assert main(cli_args(run_copy, tiny_teacher, "train")) == 2
    err = capfd.readouterr().err
    errors = [l for l in err.splitlines() if l.startswith("kdcache: error: ")]
    assert len(errors) == 1 and all(w in errors[0] for w in words) and "Traceback" not in err, err


def test_token_store_rebuilt_after_precompute_is_refused(run_copy, tiny_teacher, capfd, tally):
    # the user re-prepares with another seq_len: the signals no longer describe these tokens
    assert main(cli_args(run_copy, tiny_teacher, "prepare", "--overwrite", **{"prepare.seq_len": 32})) == 0
    capfd.readouterr()
    for command in ("train", "evaluate"):
        assert main(cli_args(run_copy, tiny_teacher, command, **{"prepare.seq_len": 32})) == 2
        line = one_error_line(capfd.readouterr().err)
        assert "signals/teacher was computed from another token store" in line and "rerun precompute" in line
        tally("corruptions detected")


def test_token_store_from_another_tokenizer_is_refused(run_copy, tiny_teacher, tmp_path, capfd, tally):
    other = build_tiny_model(tmp_path / "other-tok", build_tokenizer(vocab_size=300), layers=1)
    foreign = run_copy.run_dir + "-foreign"
    assert main(cli_args(foreign, tiny_teacher, "prepare", **{"prepare.tokenizer": other})) == 0
    shutil.rmtree(run_copy.tokens_dir)
    shutil.copytree(Path(foreign) / "tokens", run_copy.tokens_dir)  # a token store copied in from another run
    capfd.readouterr()
    assert main(cli_args(run_copy, tiny_teacher, "train")) == 2
    assert "computed from another token store" in one_error_line(capfd.readouterr().err)
    tally("corruptions detected")


def test_signal_store_of_another_teacher_is_refused(run_copy, tiny_teacher, tiny_tokenizer, tmp_path, capfd, tally):
    other = build_tiny_model(tmp_path / "other-teacher", tiny_tokenizer, layers=2, seed=3)
    # the cache was made by tiny_teacher; the config now names another teacher
    assert main(cli_args(run_copy, other, "train")) == 2
    line = one_error_line(capfd.readouterr().err)
    assert "signals/teacher was computed by teacher" in line and str(other) in line
    assert main(cli_args(run_copy, other, "precompute")) == 2  # and precompute will not mix the two
    line = one_error_line(capfd.readouterr().err)
    assert "already holds a store with different fingerprints" in line
    tally("corruptions detected", 2)


def test_shard_copied_from_another_store_is_refused_by_the_writer(run_copy, tally):
    victim = run_copy.signals_dir / "shards" / "train-00001"
    shutil.rmtree(victim)
    shutil.copytree(run_copy.tokens_dir / "shards" / "train-00001", victim)
    with pytest.raises(StoreError, match="train-00001 was written for another store"):
        precompute.run(run_copy)
    with pytest.raises(StoreError, match="train-00001 is corrupted"):
        read_shard(open_store(run_copy.signals_dir), "train-00001")
    tally("corruptions detected")


@pytest.mark.xfail("verify" not in cli.commands, strict=True,
                   reason="`kdcache verify` lands with the storage branch")
def test_verify_reports_every_problem_at_once(run_copy, capfd, tally):
    store = run_copy.signals_dir
    _flip(_chunk(store, "train-00000"))
    _truncate(_chunk(store, "train-00001"))
    shutil.rmtree(store / "shards" / "train-00002")
    code = main(["verify", str(store)])
    out = capfd.readouterr()
    text = out.out + out.err
    assert code == 1 and "Traceback" not in text
    for shard in ("train-00000", "train-00001", "train-00002"):
        lines = [l for l in text.splitlines() if shard in l]
        assert lines, text  # every damaged shard is named, all in one report
    tally("corruptions detected", 3)
