"""Signal extraction and model building."""
import pytest
import torch

from kdcache.pipeline.errors import KdcacheError
from kdcache.stages.models import (build_student, layer_indices, model_fingerprint, model_tokenizer_fingerprint,
                           tokenizer_fingerprint)
from kdcache.stages.signals import topk_signal


def test_topk_signal_in_chunks_equals_one_pass(monkeypatch):
    import kdcache.stages.signals

    torch.manual_seed(1)
    logits = torch.randn(3, 7, 50) * 3                                  # 21 rows: chunks of 4 leave a partial one
    whole = topk_signal(logits, k=5)
    monkeypatch.setattr(kdcache.stages.signals, "CHUNK_BYTES", 4 * 50 * 4)      # 4 rows per chunk
    chunked = topk_signal(logits, k=5)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))       # bit for bit: stores stay byte-identical
    assert [t.shape for t in chunked] == [(3, 7, 5), (3, 7, 5), (3, 7)]


def test_topk_signal_matches_torch_topk_and_logsumexp():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50) * 3                                  # (B, T, V)
    ids, logprobs, lognorm = topk_signal(logits, k=7)
    values, want_ids = torch.topk(logits, 7, dim=-1)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(lognorm, torch.logsumexp(logits, -1))
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(-1, want_ids))
    # exact support probabilities and the tail mass are recoverable from what is stored
    tail = 1 - logprobs.exp().sum(-1)
    full = torch.softmax(logits, -1)
    torch.testing.assert_close(tail, 1 - full.gather(-1, want_ids).sum(-1))
    torch.testing.assert_close(logprobs + lognorm.unsqueeze(-1), values)


def test_layer_indices_keep_first_and_last():
    assert layer_indices(30, 6) == [0, 6, 12, 17, 23, 29]
    assert layer_indices(4, 1) == [0]
    assert layer_indices(4, 4) == [0, 1, 2, 3]


def test_layerdrop_student_copies_teacher_layers(tiny_teacher):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    student = build_student("layerdrop:2", str(tiny_teacher))
    assert student.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    torch.testing.assert_close(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    torch.testing.assert_close(s["model.layers.1.mlp.up_proj.weight"], t["model.layers.3.mlp.up_proj.weight"])
    torch.testing.assert_close(s["model.norm.weight"], t["model.norm.weight"])
    # a full-depth layerdrop student is the teacher
    same = build_student("layerdrop:4", str(tiny_teacher))
    ids = torch.randint(0, teacher.config.vocab_size, (1, 12))
    torch.testing.assert_close(same(ids).logits, teacher(ids).logits)


def test_student_spec_errors(tiny_teacher):
    with pytest.raises(KdcacheError, match="use layerdrop:N"):
        build_student("layerdrop:x", str(tiny_teacher))
    with pytest.raises(KdcacheError, match="more layers than the teacher"):
        build_student("layerdrop:9", str(tiny_teacher))
    with pytest.raises(KdcacheError, match=r"^train.student '\./no/such/dir' is not a local path"):
        build_student("./no/such/dir", str(tiny_teacher))


def test_fingerprints_change_with_content(tmp_path, tiny_teacher, tiny_tokenizer):
    from tests.conftest import build_tiny_model, build_tokenizer

    other = build_tiny_model(tmp_path / "other", tiny_tokenizer, seed=1)
    assert model_fingerprint(str(tiny_teacher)) == model_fingerprint(str(tiny_teacher))
    assert model_fingerprint(str(tiny_teacher)) != model_fingerprint(str(other))
    assert tokenizer_fingerprint(tiny_tokenizer) != tokenizer_fingerprint(build_tokenizer(vocab_size=300))


def test_tokenizer_fingerprint_of_a_model_folder_is_cached_until_its_files_change(tmp_path, tiny_tokenizer,
                                                                                   monkeypatch):
    import os

    import kdcache.stages.models
    from tests.conftest import build_tiny_model, build_tokenizer

    folder = build_tiny_model(tmp_path / "m", tiny_tokenizer, layers=1)
    want = tokenizer_fingerprint(tiny_tokenizer)
    assert model_tokenizer_fingerprint(str(folder)) == want
    loads = []
    real = kdcache.stages.models.load_tokenizer
    monkeypatch.setattr(kdcache.stages.models, "load_tokenizer", lambda *a, **k: loads.append(1) or real(*a, **k))
    assert model_tokenizer_fingerprint(str(folder)) == want and loads == []        # from the cache
    build_tokenizer(vocab_size=300).save_pretrained(folder)                         # another tokenizer, same folder
    st = (folder / "tokenizer.json").stat()
    os.utime(folder / "tokenizer.json", ns=(st.st_atime_ns, st.st_mtime_ns + 1))    # whatever the mtime resolution
    assert model_tokenizer_fingerprint(str(folder)) == tokenizer_fingerprint(build_tokenizer(vocab_size=300))
    assert loads == [1]


def test_weight_hash_cache_keeps_the_format_other_kdcache_versions_read(tiny_teacher):
    """KDCACHE_HOME/hashes is shared by every kdcache version on a machine; older ones read {"key", "sha256"}."""
    import json

    from kdcache.stages.models import kdcache_home

    model_fingerprint(str(tiny_teacher))
    records = [json.loads(p.read_text()) for p in (kdcache_home() / "hashes").glob("*.json")]
    weights = [r for r in records if r["key"].split(":")[0].isdigit()]
    assert weights and all(set(r) == {"key", "sha256"} for r in weights)
