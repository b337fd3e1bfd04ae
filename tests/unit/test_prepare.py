"""prepare: packing, chat-template masks, splits, truncation, and bad input."""
import json

import numpy as np
import pytest

from kdcache.pipeline.config import load_config
from kdcache.pipeline.errors import KdcacheError
from kdcache.stages import prepare
from kdcache.stages.prepare import chat_tokens, pack_documents
from kdcache.storage import open_store, read_sequence


def _cfg(tmp_path, teacher, **extra):
    base = {"run_dir": str(tmp_path / "run"), "precompute.teacher": str(teacher), "prepare.seq_len": 64,
            "prepare.shard_sequences": 8}
    base.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def test_packing_concatenates_with_eos_and_pads_the_tail(tiny_tokenizer):
    docs = ["first document here", "second one"]
    ids, mask = pack_documents(docs, tiny_tokenizer, seq_len=8)
    stream = []
    for d in docs:
        stream += tiny_tokenizer(d, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert ids.shape == (-(-len(stream) // 8), 8)
    np.testing.assert_array_equal(ids.reshape(-1)[:len(stream)], stream)
    assert mask.reshape(-1)[:len(stream)].all() and not mask.reshape(-1)[len(stream):].any()


def test_chat_mask_covers_exactly_the_response(tiny_tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
                {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six."}]
    ids, mask = chat_tokens(messages, tiny_tokenizer, 0)
    assert len(ids) == len(mask)
    learned = tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "It is 4.<|im_end|>\nSix.<|im_end|>\n"
    assert tiny_tokenizer.decode(ids) == tiny_tokenizer.apply_chat_template(messages, tokenize=False)


def test_instruction_dataset_masks_responses_and_splits_records(tmp_path, tiny_teacher, tiny_jsonl):
    store = prepare.run(_cfg(tmp_path, tiny_teacher, **{"prepare.dataset": tiny_jsonl, "prepare.seq_len": 256}))
    m = store.manifest
    assert m.params["format"] == "instruction" and m.complete
    splits = m.params["splits"]
    assert 0 < splits["validation"]["sequences"] < splits["train"]["sequences"]
    assert 0 < splits["train"]["loss_tokens"] < splits["train"]["tokens"]
    seq = read_sequence(open_store(tmp_path / "run" / "tokens"), "train", 0)
    start = int(np.argmax(seq["loss_mask"]))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    assert tok.decode(seq["input_ids"][:start]).endswith("<|im_start|>assistant\n")


def test_truncation_policies(tmp_path, tiny_teacher, tiny_jsonl):
    common = {"prepare.dataset": tiny_jsonl, "prepare.seq_len": 200}
    right = prepare.run(_cfg(tmp_path / "a", tiny_teacher, **common)).manifest.params
    drop = prepare.run(_cfg(tmp_path / "b", tiny_teacher, **common, **{"prepare.truncation": "drop"})).manifest.params
    assert right["stats"]["truncated"] > 0 and right["stats"]["dropped_too_long"] == 0
    assert drop["stats"]["truncated"] == 0 and drop["stats"]["dropped_too_long"] == right["stats"]["truncated"]


def test_default_corpus_is_packed_text(tmp_path, tiny_teacher):
    store = prepare.run(_cfg(tmp_path, tiny_teacher, **{"prepare.max_train_sequences": 20}))
    params = store.manifest.params
    assert params["format"] == "text" and params["splits"]["train"]["sequences"] == 20
    assert store.manifest.fingerprints["dataset"].startswith("sha256:")


def test_rerun_with_same_inputs_resumes_and_other_inputs_are_refused(tmp_path, tiny_teacher):
    cfg = _cfg(tmp_path, tiny_teacher, **{"prepare.max_train_sequences": 16})
    first = prepare.run(cfg).manifest
    assert prepare.run(cfg).manifest == first
    from kdcache.storage import StoreError
    with pytest.raises(StoreError, match="pass --overwrite"):
        prepare.run(_cfg(tmp_path, tiny_teacher, **{"prepare.max_train_sequences": 17}))


@pytest.mark.parametrize("content, message", [
    (None, "data file .* does not exist"),
    ("", "has no records|cannot read"),
    ('{"question": "a"}\n{"question": "b"}\n', "record 0 has fields \\['question'\\]"),
    ('{"instruction": "a", "response": "b"}\n{"instruction": "c"}\n', "record 1 lacks text field"),
])
def test_bad_datasets_are_one_line_errors(tmp_path, tiny_teacher, content, message):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(KdcacheError, match=message) as info:
        prepare.run(_cfg(tmp_path, tiny_teacher, **{"prepare.dataset": path}))
    assert "\n" not in str(info.value)


def test_chat_messages_format(tmp_path, tiny_teacher):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    store = prepare.run(_cfg(tmp_path, tiny_teacher, **{"prepare.dataset": path}))
    assert store.manifest.params["format"] == "instruction"
    assert store.manifest.params["splits"]["validation"]["sequences"] == 1
