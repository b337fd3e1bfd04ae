"""Shared fixtures: a tiny random Llama teacher with a small BPE tokenizer, built locally (no hub, no network)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

DOLLY = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly-sample.jsonl"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on the default corpus, with ChatML special tokens and template."""
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(pydoc_data.topics.topics.values())[:20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>", chat_template=CHATML)


def build_tiny_model(out: Path, tokenizer, layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.2,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    # a large init makes every layer matter, so a layer-dropped student starts measurably far from the teacher
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_tokenizer) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "tiny-teacher", tiny_tokenizer)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Converted models and hash caches go to a per-session folder, not the user's ~/.cache."""
    home = tmp_path_factory.getbasetemp() / "kdcache-home"
    monkeypatch.setenv("KDCACHE_HOME", str(home))


@pytest.fixture
def tiny_jsonl(tmp_path) -> Path:
    """Instruction records in the dolly format (from the shared sample when present)."""
    path = tmp_path / "instructions.jsonl"
    if DOLLY.exists():
        lines = DOLLY.read_text().splitlines()[:60]
    else:  # a self-made fallback with the same fields; every 4th record longer than 200 tokens, as some real ones
        lines = [json.dumps({"instruction": f"Say {i}", "context": "", "response": f"{i} " * (5 if i % 4 else 300),
                             "category": "x"}) for i in range(60)]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_overrides(run_dir: Path, teacher: Path, **extra) -> list[str]:
    """Config overrides for a fast end-to-end run on the tiny teacher."""
    base = {
        "run_dir": str(run_dir),
        "prepare.seq_len": 64, "prepare.max_train_sequences": 24, "prepare.max_validation_sequences": 8,
        "prepare.shard_sequences": 8,
        "precompute.teacher": str(teacher), "precompute.signal": "topk", "precompute.k": 8, "precompute.scheduler": "sync",
        "precompute.batch_size": 4,
        "train.student": "layerdrop:2", "train.max_steps": 6, "train.batch_size": 4, "train.warmup_steps": 1,
        "train.checkpoint_every": 2, "train.lr": 3e-3, "train.prefetch": 2,
        "evaluate.batch_size": 4,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]



@pytest.fixture(scope="session")
def cached_run(tmp_path_factory, tiny_teacher) -> Path:
    """A run folder with tokens and the tiny teacher's top-k signals (tiny_overrides), built once per session and
    shared read-only: tests copy it before writing (a student, an evaluation) into it."""
    from kdcache.pipeline.config import load_config
    from kdcache.stages import precompute, prepare

    run_dir = tmp_path_factory.mktemp("cached") / "run"
    cfg = load_config(None, tiny_overrides(run_dir, tiny_teacher))
    prepare.run(cfg)
    precompute.run(cfg)
    return run_dir


def train_interrupted(cfg, monkeypatch, after_step: int) -> None:
    """Run train on `cfg` and interrupt it (KeyboardInterrupt, as Ctrl-C) just before step after_step + 1; the
    stage is then ready to be run again, to resume."""
    from kdcache.stages import train

    real = train._train_step

    def interrupt(*args, **kwargs):
        if args[8] == after_step:  # the step counter
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "_train_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg)
    monkeypatch.setattr(train, "_train_step", real)
