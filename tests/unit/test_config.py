"""Typed configs: defaults, YAML, overrides, validation with one-line messages."""
import pytest

from pipeline.config import Config, load_config
from pipeline.errors import KdcacheError


def test_default_config_needs_no_arguments():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.precompute.teacher == "default" and cfg.prepare.dataset == "default"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: runs/x\ntrain:\n  lr: 1e-4\n  max_steps: 7\nprecompute:\n  k: 32\n")
    cfg = load_config(path, ["train.max_steps=9", "prepare.max_train_sequences=null"])
    assert (cfg.run_dir, cfg.train.lr, cfg.train.max_steps, cfg.precompute.k) == ("runs/x", 1e-4, 9, 32)
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
    (["train.tail=cut"], "train.tail 'cut' is not one of"),
    (["prepare.seq_len"], "use section.field=value"),
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
