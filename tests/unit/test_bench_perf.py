"""`make bench`'s report: --only picks phases, and the table shows the figures of the phases that ran."""
import argparse

import pytest

from benchmarks import perf

MACHINE = {"cores": 2, "cpu": "x", "gpu": False, "torch": "t", "python": "p", "load_average": (0.5, 0, 0)}
READER = {"read_shard_tokens_per_s": 3.1e6, "read_shard_warm_tokens_per_s": 4.2e6, "dataset_tokens_per_s": 2.5e6,
          "read_sequence_tokens_per_s": 2.0e6, "shard_tokens": 8192, "batch": "2x256", "kind": "sample N=40 systematic"}


def test_only_names_known_phases():
    assert perf._phases("reader, precompute") == ["reader", "precompute"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown phase.*nope: choose from precompute, reader"):
        perf._phases("reader,nope")


def test_table_shows_only_the_phases_that_ran():
    text = perf.table({"reader": READER, "machine": MACHINE, "load_start": (1.2, 0, 0), "threads": 1, "reps": 3})
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| 2")]
    assert rows == ["| 2a", "| 2c", "| 2d"]  # 2b needs the training steps' consumption
    assert "3.10 M tokens/s (through one open store, hashed once: 4.20 M) | ≥ 1 M | yes" in text
    assert "Phases: reader." in text and "| 1 |" not in text and "| 3 |" not in text


def test_reader_row_names_the_cache_kind_measured():
    text = perf.table({"reader": READER, "machine": MACHINE, "load_start": (1.2, 0, 0), "threads": 1, "reps": 3})
    assert "8,192-token sample N=40 systematic shards, 1 core" in text


@pytest.mark.parametrize("params, label", [
    ({"signal": "topk", "k": 16, "samples": 40}, "top-16"),
    ({"signal": "sample", "k": 16, "samples": 40, "draws": "systematic"}, "sample N=40 systematic"),
    ({"signal": "sample", "k": 16, "samples": 50}, "sample N=50 iid"),  # stores from before `draws`
    ({"signal": "hybrid", "k": 2, "samples": 16, "draws": "iid"}, "hybrid 2+16 iid"),
])
def test_kind_label(params, label):
    assert perf.kind_label(params) == label
