"""Safety: no pickle in the code's loading paths or in a store, checkpoints load tensors only, remote code only on
request, and names read from a manifest cannot reach outside the store."""
import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from kdcache.pipeline.cli import main
from kdcache.stages import train
from kdcache.storage import StoreError, open_store, read_shard
from tests.reliability.conftest import cli_args

pytestmark = [pytest.mark.reliability]

ROOT = Path(__file__).resolve().parents[2]
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _calls(tree, name):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            dotted = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if dotted == name:
                yield node


def _kwarg(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_no_unpickling_anywhere_in_the_code():
    problems = []
    for file in sorted(f for d in ("pipeline", "stages", "storage") for f in (ROOT / d).rglob("*.py")):
        if True:
            tree = ast.parse(file.read_text())
            where = file.relative_to(ROOT)
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                problems += [f"{where}: imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
            for call in _calls(tree, "load"):
                target = ast.unparse(call.func)
                if target == "torch.load":
                    weights_only = _kwarg(call, "weights_only")
                    if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                        problems.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
                allow = _kwarg(call, "allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    problems.append(f"{where}:{call.lineno}: {target} with allow_pickle")
            for call in ast.walk(tree):
                if isinstance(call, ast.Call):
                    trc = _kwarg(call, "trust_remote_code")
                    if isinstance(trc, ast.Constant) and trc.value is True:
                        problems.append(f"{where}:{call.lineno}: trust_remote_code=True hard-coded")
    assert not problems, problems


BLOSC_ZSTD = 4  # Blosc header: flags byte, top 3 bits = the inner compressor's code (4 = zstd)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@pytest.mark.integration
def test_stores_hold_only_json_and_zstd_chunks(base_run, tally):
    """Every file of both stores is JSON (manifest, commit records, zarr metadata) or a zstd frame of raw array
    bytes — nothing a reader would have to unpickle."""
    seen = 0
    for store in (base_run / "tokens", base_run / "signals" / "teacher"):
        for path in store.rglob("*"):
            if not path.is_file() or path.name == ".writer.lock":
                continue
            data = path.read_bytes()
            if path.suffix == ".json":
                json.loads(data)
            elif path.name == "config.yaml":    # the config the writing stage recorded: plain YAML, no tags
                assert isinstance(yaml.safe_load(data), dict)
            else:
                # a zstd frame, or (float arrays, byte-shuffled) a Blosc frame whose compressor is zstd
                blosc_zstd = data[:1] == b"\x02" and (data[2] >> 5) == BLOSC_ZSTD and ZSTD_MAGIC in data[16:]
                assert data.startswith(ZSTD_MAGIC) or blosc_zstd, f"{path} is neither JSON nor a zstd chunk"
            seen += 1
            if path.name == "zarr.json" and json.loads(data).get("node_type") == "array":
                assert json.loads(data)["data_type"] in ("uint8", "uint16", "int32", "int64", "float16", "float32")
    assert seen > 10


class _Payload:
    """An object whose unpickling would run code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.integration
def test_a_checkpoint_with_a_pickled_payload_is_refused_unexecuted(run_copy, tiny_teacher, tmp_path, capfd, tally):
    train.run(run_copy)
    latest = train.latest_checkpoint(run_copy.student_dir / "checkpoints")
    marker = tmp_path / "code-ran"
    torch.save({"state": {}, "param_groups": [], "evil": _Payload(marker)}, latest / "optimizer.pt")
    # the same settings (other settings would start over without loading it): resuming loads the checkpoint
    assert main(cli_args(run_copy, tiny_teacher, "train")) == 2
    err = capfd.readouterr().err
    errors = [l for l in err.splitlines() if l.startswith("kdcache: error: ")]
    assert len(errors) == 1 and f"checkpoint {latest}" in errors[0] and "Traceback" not in err, err
    assert not marker.exists()  # torch.load(weights_only=True) never ran the payload
    tally("unsafe inputs refused")


@pytest.mark.parametrize("name", ["../../escaped", "/etc/passwd", "sub/dir", "..", ".hidden", "nul\x00byte", ""])
def test_shard_names_from_an_edited_manifest_cannot_leave_the_store(name, base_run, tmp_path, tally):
    store_dir = tmp_path / "signals"
    shutil.copytree(base_run / "signals" / "teacher", store_dir)
    outside = tmp_path / "escaped"
    shutil.copytree(store_dir / "shards" / "train-00000", outside)  # a perfect shard, but outside the store
    manifest = json.loads((store_dir / "manifest.json").read_text())
    checksum = manifest["shards"]["checksum"][0]
    manifest["shards"]["name"][0] = name  # the layout is derived (split sizes): only the committed list names shards
    manifest["shards"]["checksum"][0] = checksum
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError) as e:
        store = open_store(store_dir)
        read_shard(store, name)
    assert f"invalid shard name {name!r}" in str(e.value) and "tampered" in str(e.value)
    tally("unsafe inputs refused")


class _Spy:
    """Records the trust_remote_code argument of every from_pretrained call."""

    def __init__(self, monkeypatch):
        import transformers

        self.calls = []
        for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
            real = cls.from_pretrained.__func__

            def spy(klass, *args, _real=real, _name=cls.__name__, **kwargs):
                self.calls.append((_name, kwargs.get("trust_remote_code", "absent")))
                return _real(klass, *args, **kwargs)
            monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))


@pytest.mark.integration
@pytest.mark.parametrize("flag", [False, True], ids=["default", "--trust-remote-code"])
def test_remote_code_runs_only_when_asked(flag, run_copy, tiny_teacher, monkeypatch, tally):
    from kdcache.stages import precompute

    shutil.rmtree(run_copy.signals_dir)  # so precompute loads the teacher
    monkeypatch.setattr(precompute, "_TEACHERS", {})  # ... afresh, not from this process's cache
    spy = _Spy(monkeypatch)
    opt = ["--trust-remote-code"] if flag else []
    assert main(cli_args(run_copy, tiny_teacher, "precompute") + opt) == 0
    # a student given as a model folder goes through from_pretrained too
    assert main(cli_args(run_copy, tiny_teacher, "train", **{"train.student": tiny_teacher, "train.max_steps": 1})
                + opt) == 0
    models = [v for name, v in spy.calls if name == "AutoModelForCausalLM"]
    assert len(models) >= 2 and all(v is flag for v in models), spy.calls  # the teacher and the student
    assert {name for name, v in spy.calls if v is flag} == {"AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"}
    assert not [c for c in spy.calls if c[1] is (not flag)], spy.calls
    tally("unsafe inputs refused", int(not flag))
