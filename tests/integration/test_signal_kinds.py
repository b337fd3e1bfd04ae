"""precompute -> train -> evaluate on the sampled signal kinds, on the tiny teacher: seeded, byte-identical shards."""
import re
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from kdcache.pipeline.config import load_config
from kdcache.pipeline.errors import KdcacheError
from kdcache.stages import evaluate, precompute, prepare, report, train
from kdcache.storage import read_shard
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.integration

KINDS = {"sample": {"precompute.signal": "sample", "precompute.samples": 24, "precompute.draws": "iid"},
         "sample-systematic": {"precompute.signal": "sample", "precompute.samples": 24, "precompute.draws": "systematic"},
         "hybrid": {"precompute.signal": "hybrid", "precompute.k": 4, "precompute.samples": 16}}


def _store_bytes(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted((path / "shards").rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sampled_kind_end_to_end_is_reproducible(tmp_path, tiny_teacher, kind):
    cfg = load_config(None, tiny_overrides(tmp_path / "a", tiny_teacher, **KINDS[kind]))
    prepare.run(cfg)
    store = precompute.run(cfg)
    params = store.manifest.params
    want = KINDS[kind]
    assert (params["signal"], params["samples"], params["seed"], params["draws"]) == \
        (want["precompute.signal"], want["precompute.samples"], 0, want.get("precompute.draws", "systematic"))
    reference = _store_bytes(cfg.signals_dir)

    # a resumed run redraws a lost shard exactly: its stream depends on (seed, shard name) only
    shutil.rmtree(cfg.signals_dir / "shards" / "train-00001")
    precompute.run(cfg)
    assert _store_bytes(cfg.signals_dir) == reference

    # another seed draws other samples; the same seed in another run folder the same ones
    other = load_config(None, tiny_overrides(tmp_path / "b", tiny_teacher, **KINDS[kind], **{"precompute.seed": 1}))
    prepare.run(other)
    precompute.run(other)
    assert _store_bytes(other.signals_dir) != reference

    sig = read_shard(store, "train-00000")  # decoded: estimates normalised over the full vocabulary
    assert sig["ids"].shape[:2] == (8, 64)
    np.testing.assert_allclose(np.exp(sig["logprobs"].astype(np.float64)).sum(-1), 1.0, atol=2e-3)

    train.run(cfg)
    metrics = evaluate.run(cfg)
    for student in metrics["students"].values():
        assert all(np.isfinite(student[m]) for m in ("kl_teacher", "perplexity", "top1_agreement"))
        assert student["top5_order_agreement"] is None  # no exact top-5 here (sample; hybrid with k = 4)
        assert 0 <= student["teacher_top1_tie_share"] <= 1  # equal counts: how often the cache's top-1 is a tie
    assert metrics["students"]["trained"]["kl_teacher"] < metrics["students"]["untrained"]["kl_teacher"]

    # the report shows what applies to the kind: coverage of the exact top-k (hybrid), the draws' support (sample)
    out = report.run(Path(cfg.run_dir))
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", (out / "report.md").read_text())
    plot = "coverage.png" if want["precompute.signal"] == "hybrid" else "support.png"
    assert plot in images and ({"coverage.png", "support.png"} - {plot}).isdisjoint(images)
    pixels = matplotlib.image.imread(out / plot)                                 # (H, W, 4)
    assert pixels.shape[0] > 200 and pixels[..., :3].reshape(-1, 3).std(0).max() > 0.05  # something is drawn


def test_hybrid_needs_a_tail_to_sample(tmp_path, tiny_teacher):
    # the tiny tokenizer's vocabulary is 384
    cfg = load_config(None, tiny_overrides(tmp_path / "r", tiny_teacher, **{"precompute.signal": "hybrid",
                                                                           "precompute.k": 384}))
    prepare.run(cfg)
    with pytest.raises(KdcacheError, match="leaves no tail to sample"):
        precompute.run(cfg)
    cfg = load_config(None, tiny_overrides(tmp_path / "r", tiny_teacher, **{"precompute.k": 385}))
    with pytest.raises(KdcacheError, match="exceeds"):
        precompute.run(cfg)
