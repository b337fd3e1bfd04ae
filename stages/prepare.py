"""prepare: tokenise a dataset once into a token store.

Plain text is packed: documents are concatenated with an EOS separator and cut into seq_len sequences (no
cross-document attention masking; the last partial sequence is right-padded). Instruction data (instruction/
context/response fields or chat `messages`) goes through the tokenizer's chat template, one record per sequence,
right-padded, with the loss mask on response tokens only. Documents/records are split into train/validation by a
seeded shuffle, so validation text is never seen in training.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import random
import time
from pathlib import Path

import numpy as np

from kdcache.pipeline.config import RECORD_NAME, Config, PrepareConfig, record_config
from kdcache.pipeline.errors import KdcacheError
from kdcache.stages.hub import check_hub_id, hub_offline, not_local
from kdcache.stages.models import load_tokenizer, resolve_model_path, tokenizer_fingerprint
from kdcache.stages.progress import progress, track
from kdcache.storage import Manifest, Store, make_layout
from kdcache.storage.codecs import id_dtype

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
TEXT_SUFFIXES = (".jsonl", ".json", ".txt", ".csv")


# ---- loading -------------------------------------------------------------------------------------------

def load_records(cfg: PrepareConfig) -> list[dict]:
    """The dataset as a list of dicts: the default corpus, a local file, or a hub dataset."""
    if cfg.dataset == "default":
        import pydoc_data.topics

        return [{"text": text, "id": name} for name, text in sorted(pydoc_data.topics.topics.items())]
    import datasets

    datasets.disable_progress_bars()  # its per-split bars and parse-error logs would bury our one-line errors
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    path = Path(cfg.dataset).expanduser()
    suffix = path.suffix.lower()
    if suffix in LOCAL_FORMATS or path.exists():
        if not path.is_file():
            raise KdcacheError(f"data file {path} does not exist")
        if suffix not in LOCAL_FORMATS:
            raise KdcacheError(f"data file {path} has an unsupported type: use {', '.join(LOCAL_FORMATS)}")
        if suffix in TEXT_SUFFIXES:
            check_text_file(path)
        kwargs = {"sample_by": "paragraph"} if suffix == ".txt" else {}
        try:
            ds = datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train", **kwargs)
        except Exception as e:  # datasets wraps parse errors in many types
            detail = _bad_json_line(path) if suffix == ".jsonl" else None
            raise KdcacheError(f"cannot read {path}: {detail or _first_line(e)}") from e
    else:
        check_hub_id(cfg.dataset, "prepare.dataset", repo_type="dataset")  # at once, before the library's retries
        try:
            ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.dataset_split)
        except Exception as e:
            if hub_offline():
                raise KdcacheError(f"{not_local('prepare.dataset', cfg.dataset)}, and the hub is offline "
                                   f"(HF_HUB_OFFLINE=1) with no usable cached copy of it ({_first_line(e)}): unset "
                                   "HF_HUB_OFFLINE to download it, or pass a local file") from e
            raise KdcacheError(f"cannot load dataset {cfg.dataset!r} (not a local file; hub lookup failed: "
                               f"{_first_line(e)})") from e
    return [dict(r) for r in ds]


def check_text_file(path: Path) -> None:
    """Refuse non-UTF-8 bytes and empty files up front: datasets reports them as a traceback deep inside pyarrow
    or as a bare StopIteration. Reads the file in blocks (no size limit)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, empty = 1, True
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                where = line + e.object[:e.start].count(b"\n")
                raise KdcacheError(f"data file {path} is not valid UTF-8 (byte {e.object[e.start]:#04x} on line "
                                   f"{where}): re-encode it as UTF-8") from None
            line += block.count(b"\n")
            empty = empty and not block.strip()
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise KdcacheError(f"data file {path} is not valid UTF-8 (it ends inside a multi-byte character): "
                           "re-encode it as UTF-8") from None
    if empty:
        raise KdcacheError(f"data file {path} is empty: it has no records")


def _bad_json_line(path: Path) -> str | None:
    """The first line of a JSON-lines file that does not parse, to name it in the error."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    return f"line {number} is not valid JSON ({e.msg})"
    return None


def _first_line(e: BaseException) -> str:
    while e.__cause__ is not None:  # datasets wraps the parser's message in a generic one
        e = e.__cause__
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def detect_format(records: list[dict], cfg: PrepareConfig) -> str:
    if not records:
        raise KdcacheError(f"dataset {cfg.dataset!r} is empty: it has no records")
    first = records[0]
    if cfg.format != "auto":
        return cfg.format
    if "messages" in first or ("instruction" in first and "response" in first):
        return "instruction"
    if cfg.text_field in first:
        return "text"
    raise KdcacheError(f"record 0 has fields {sorted(first)}: expected '{cfg.text_field}' (text), "
                       "'instruction'+'response' or 'messages' (instruction data); set prepare.text_field or prepare.format")


def to_messages(record: dict, index: int) -> list[dict]:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise KdcacheError(f"record {index}: 'messages' must be a list of {{role, content}} objects")
        return messages
    missing = [f for f in ("instruction", "response") if not isinstance(record.get(f), str)]
    if missing:
        present = sorted(k for k, v in record.items() if v is not None)
        raise KdcacheError(f"record {index} lacks text field(s) {missing} (has {present}): "
                           "instruction data needs 'instruction' and 'response'")
    prompt = record["instruction"]
    if record.get("context"):
        prompt += "\n\n" + str(record["context"])
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["response"]}]


# ---- tokenisation --------------------------------------------------------------------------------------

def pack_documents(docs: list[str], tokenizer, seq_len: int, on_doc=None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents, each followed by EOS, and cut into (n, seq_len) rows; pad the last with mask 0.
    `on_doc(n_tokens)` is called after each document (progress)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        stream.extend(ids)
        stream.append(eos)
        if on_doc is not None:
            on_doc(len(ids) + 1)
    n = -(-len(stream) // seq_len)
    ids = np.full((n, seq_len), pad_id(tokenizer), dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=np.uint8)
    flat_ids, flat_mask = ids.reshape(-1), mask.reshape(-1)
    flat_ids[:len(stream)] = stream
    flat_mask[:len(stream)] = 1
    return ids, mask


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def chat_tokens(messages: list[dict], tokenizer, index: int) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a mask that is 1 on the assistant turns (their content and end token).

    The rendered text is cut at each assistant turn's start and end (found by rendering the conversation prefix
    with and without the generation prompt) and each piece is tokenised on its own, so the mask is exact.
    """
    if tokenizer.chat_template is None:
        raise KdcacheError("the tokenizer has no chat template: instruction data needs one (or use prepare.format=text)")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    cuts = [(0, False)]
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        end = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (full.startswith(start) and full.startswith(end)):
            raise KdcacheError(f"record {index}: the chat template does not render conversations prefix by prefix; "
                               "response-only masks cannot be derived")
        cuts += [(len(start), True), (len(end), False)]
    if not any(is_response for _, is_response in cuts):
        raise KdcacheError(f"record {index} has no assistant message: nothing to learn from it")
    ids, mask = [], []
    bounds = cuts + [(len(full), False)]
    for (a, is_response), (b, _) in zip(bounds, bounds[1:]):
        piece = tokenizer(full[a:b], add_special_tokens=False)["input_ids"] if b > a else []
        ids += piece
        mask += [int(is_response)] * len(piece)
    return ids, mask


def tokenize_instructions(records: list[tuple[int, dict]], tokenizer, cfg: PrepareConfig,
                          stats: dict, on_doc=None) -> tuple[np.ndarray, np.ndarray]:
    """(original index, record) pairs -> (n, seq_len) ids and response-only loss masks, right-padded.
    `on_doc(n_tokens)` is called after each record (progress)."""
    rows_ids, rows_mask = [], []
    for index, record in records:
        ids, mask = chat_tokens(to_messages(record, index), tokenizer, index)
        if on_doc is not None:
            on_doc(len(ids))
        if len(ids) > cfg.seq_len:
            if cfg.truncation == "drop":
                stats["dropped_too_long"] += 1
                continue
            ids, mask = ids[:cfg.seq_len], mask[:cfg.seq_len]
            stats["truncated"] += 1
        if sum(mask[1:]) == 0:  # the response was cut away entirely
            stats["dropped_no_response"] += 1
            continue
        pad = cfg.seq_len - len(ids)
        rows_ids.append(ids + [pad_id(tokenizer)] * pad)
        rows_mask.append(mask + [0] * pad)
    if not rows_ids:
        return np.zeros((0, cfg.seq_len), np.int64), np.zeros((0, cfg.seq_len), np.uint8)
    return np.asarray(rows_ids, dtype=np.int64), np.asarray(rows_mask, dtype=np.uint8)


def dataset_fingerprint(records: list[dict]) -> str:
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps(r, sort_keys=True, default=str).encode())
    return "sha256:" + digest.hexdigest()[:32]


# ---- the stage -----------------------------------------------------------------------------------------

def run(cfg: Config, overwrite: bool = False) -> Store:
    pc = cfg.prepare
    tokenizer_spec, tokenizer_what = ((cfg.precompute.teacher, "precompute.teacher") if pc.tokenizer == "teacher"
                                      else (pc.tokenizer, "prepare.tokenizer"))
    if tokenizer_spec != "default":  # a misspelled model fails before the data is read (the default converts later)
        resolve_model_path(tokenizer_spec, tokenizer_what)
    records = load_records(pc)
    fmt = detect_format(records, pc)
    tokenizer = load_tokenizer(tokenizer_spec, cfg.precompute.trust_remote_code, tokenizer_what)
    if len(records) < 2:
        raise KdcacheError(f"dataset {pc.dataset!r} has {len(records)} record(s): at least 2 are needed "
                           "for a train/validation split")

    order = list(range(len(records)))
    random.Random(pc.seed).shuffle(order)
    n_val = min(len(records) - 1, max(1, round(pc.validation_fraction * len(records))))
    # (original index, record), so errors name the record as the user numbers it
    split_records = {"train": [(i, records[i]) for i in order[n_val:]],
                     "validation": [(i, records[i]) for i in order[:n_val]]}

    stats = {"records": len(records), "truncated": 0, "dropped_too_long": 0, "dropped_no_response": 0}
    arrays = {}
    bar = progress(len(records), "prepare: tokenising", unit="doc")
    started, tokenised = time.perf_counter(), [0]

    def on_doc(n_tokens: int) -> None:
        tokenised[0] += n_tokens
        bar.set_postfix(tokens=tokenised[0], tok_s=f"{tokenised[0] / (time.perf_counter() - started):.0f}",
                        refresh=False)
        bar.update(1)

    try:
        for split, recs in split_records.items():
            if fmt == "text":
                bad = next(((i, r) for i, r in recs if not isinstance(r.get(pc.text_field), str)), None)
                if bad is not None:
                    fields = sorted(k for k, v in bad[1].items() if v is not None)
                    raise KdcacheError(f"record {bad[0]} has no text field '{pc.text_field}' (fields: {fields}): "
                                       "set prepare.text_field")
                docs = [r[pc.text_field] for _, r in recs if r[pc.text_field].strip()]
                bar.update(len(recs) - len(docs))  # blank documents: nothing to tokenise
                ids, mask = pack_documents(docs, tokenizer, pc.seq_len, on_doc)
            else:
                ids, mask = tokenize_instructions(recs, tokenizer, pc, stats, on_doc)
            limit = pc.max_train_sequences if split == "train" else pc.max_validation_sequences
            if limit is not None:
                ids, mask = ids[:limit], mask[:limit]
            if len(ids) == 0:
                raise KdcacheError(f"the {split} split is empty after tokenisation ({stats}): "
                                   "use more data, a larger seq_len or prepare.truncation=right")
            arrays[split] = (ids, mask)
    finally:
        bar.close()

    vocab_size = len(tokenizer)
    manifest = Manifest(
        kind="tokens", backend=pc.backend,
        fingerprints={"dataset": dataset_fingerprint(records), "tokenizer": tokenizer_fingerprint(tokenizer)},
        params={"dataset": pc.dataset, "format": fmt, "seq_len": pc.seq_len, "vocab_size": vocab_size,
                "pad_id": pad_id(tokenizer), "eos_id": tokenizer.eos_token_id,
                "packing": "concat-eos, no cross-document mask" if fmt == "text" else "one record per sequence, right-padded",
                "loss_mask": "all tokens" if fmt == "text" else "assistant turns only",
                "truncation": pc.truncation, "validation_fraction": pc.validation_fraction, "seed": pc.seed,
                "tokenizer": tokenizer_spec, "stats": stats,
                "splits": {s: {"sequences": int(len(i)), "tokens": int(m.size), "loss_tokens": int(m.sum())}
                           for s, (i, m) in arrays.items()}},
        layout=make_layout({s: len(i) for s, (i, _) in arrays.items()}, pc.shard_sequences),
    )
    store = Store.create(cfg.tokens_dir, manifest, overwrite)  # holds the store's writer lock until close()
    try:
        done = {s.name for s in store.manifest.shards}  # Store.create refreshed it from the shards on disk
        todo = [r for r in manifest.layout if r.name not in done]
        if todo or not (cfg.tokens_dir / RECORD_NAME).exists():  # a finished store keeps the config that made it
            record_config(cfg, cfg.tokens_dir, "kdcache prepare: the config this token store was made with")
        dtype = id_dtype(vocab_size)
        for rec in track(todo, len(todo), "prepare: writing shards", unit="shard"):
            ids, mask = arrays[rec.split]
            store.write_shard(rec.name, {"input_ids": ids[rec.start:rec.start + rec.count].astype(dtype),
                                         "loss_mask": mask[rec.start:rec.start + rec.count]})
        store.refresh_manifest()
    finally:
        store.close()
    counts = manifest.params["splits"]
    if stats["truncated"] or stats["dropped_too_long"] or stats["dropped_no_response"]:  # never silently
        print(f"prepare: of {stats['records']} records, {stats['truncated']} longer than {pc.seq_len} tokens were cut "
              f"at the end, {stats['dropped_too_long']} too long were dropped and {stats['dropped_no_response']} "
              f"with no response left were dropped (prepare.truncation={pc.truncation})", flush=True)
    print(f"prepare: {fmt} data, {counts['train']['sequences']} train / {counts['validation']['sequences']} "
          f"validation sequences of {pc.seq_len} tokens -> {cfg.tokens_dir}", flush=True)
    return store
