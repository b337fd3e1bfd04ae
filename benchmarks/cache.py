"""make bench-cache: which signal kind should the cache store by default?

On the default teacher and a slice of the default corpus, for each signal kind at a few sizes:
  (1) bytes per token on disk, written through the store API (real Zarr shards);
  (2) fidelity against the full-vocabulary teacher computed in this run: teacher mass on the exact top-k, unique
      ids per position, and the angle and norm ratio between the full-KD logit gradient (q - p) and the gradient
      of the cached target's KL (per tail mode), for a fixed student (the untrained layerdrop student), per batch;
  (3) held-out KL(teacher || student) against the FULL teacher distribution, and perplexity, of students trained
      for the same budget on each kind (a subset of the kinds), against a student trained on the full dense
      teacher logits (online-KD reference: the logits are kept in memory for this small slice);
  (4) encode and decode throughput (tokens/s, one thread), and read + decode from the store.
Writes runs/bench/cache.json and runs/bench/cache.md. Usage: python -m benchmarks.cache [--steps 120] [--quick]

Every trained student's measurements are kept in OUT/cache-students/<kind>.json with the setup they were made
under, and reused by a later run with the same setup: on a crowded machine students can be trained by parallel
processes (`--only "sample N=32,topk-16"`), and a final plain run writes the table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks import student_logits
from kdcache.pipeline.config import Config, PrepareConfig, TrainConfig
from kdcache.stages import prepare
from kdcache.stages.losses import ObjectiveSpec, compute_objective
from kdcache.stages.losses.divergences import divergence_rows
from kdcache.stages.models import build_student, load_teacher
from kdcache.stages.schedules import WarmupCosineLR
from kdcache.stages.signals import concat_signals, extract_signal, shard_generator, sparse_target
from kdcache.storage import Manifest, Store, decode_signal, encode_signal, make_layout, read_shard

OUT = Path("runs/bench")
TEACHER = "default"
STUDENT = "layerdrop:4"
DENSE = "dense (full logits)"
SEED = 0


@dataclass(frozen=True)
class Kind:
    label: str
    signal: str
    k: int | None = None
    samples: int | None = None
    value_encoding: str = "float16"
    train: bool = False         # part of the (expensive) student comparison (3)
    seed: int = SEED            # the sampling seed (sampled kinds)
    draws: str = "iid"          # iid | systematic (sampled kinds)
    tail: str = "bucket"        # the student's tail mode (top-k kinds)


KINDS = [
    Kind("topk-8", "topk", k=8, train=True),
    Kind("topk-8 int8", "topk", k=8, value_encoding="int8", train=True),
    Kind("topk-16", "topk", k=16, train=True),
    Kind("topk-16 renorm", "topk", k=16, train=True, tail="renorm"),
    Kind("topk-16 int8", "topk", k=16, value_encoding="int8"),
    Kind("topk-64", "topk", k=64, train=True),
    Kind("sample N=16", "sample", samples=16, train=True),
    Kind("sample N=24", "sample", samples=24, train=True),
    Kind("sample N=32", "sample", samples=32, train=True),
    Kind("sample N=32 seed 1", "sample", samples=32, train=True, seed=1),
    Kind("sample N=50", "sample", samples=50, train=True),
    Kind("sample N=16 systematic", "sample", samples=16, train=True, draws="systematic"),
    Kind("sample N=24 systematic", "sample", samples=24, train=True, draws="systematic"),
    Kind("sample N=32 systematic", "sample", samples=32, train=True, draws="systematic"),
    Kind("sample N=40 systematic", "sample", samples=40, train=True, draws="systematic"),
    Kind("hybrid 2+8 int8", "hybrid", k=2, samples=8, value_encoding="int8", train=True),
    Kind("hybrid 4+16 int8", "hybrid", k=4, samples=16, value_encoding="int8", train=True),
    Kind("hybrid 2+16 int8 systematic", "hybrid", k=2, samples=16, value_encoding="int8", train=True,
         draws="systematic"),
    Kind("hybrid 8+32", "hybrid", k=8, samples=32, train=True),
]


def _median_rate(fn, n_tokens: int, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n_tokens / statistics.median(times)


def _positions(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As kdcache.stages.train.loss_inputs: position t predicts token t+1 where that token is a loss token."""
    target_mask = torch.zeros_like(loss_mask)
    target_mask[:, :-1] = loss_mask[:, 1:]                                    # (B, T)
    positions = target_mask.flatten().nonzero().squeeze(1)                    # (N,)
    labels = torch.roll(input_ids, -1, dims=1).flatten()[positions]           # (N,)
    return positions, labels


def teacher_logits(teacher, input_ids: np.ndarray, batch_size: int = 8) -> torch.Tensor:
    """Full teacher logits (n, T, V) float32."""
    parts = []
    with torch.inference_mode():
        for i in range(0, len(input_ids), batch_size):
            parts.append(teacher(torch.from_numpy(input_ids[i:i + batch_size].astype(np.int64))).logits.float())
    return torch.cat(parts)


def write_store(kind: Kind, logits: torch.Tensor, vocab: int, path: Path, shard_sequences: int,
                batch_size: int = 8) -> tuple[Store, float]:
    """The signal of `kind` for every train sequence, as real shards; returns the store and encode tokens/s
    (encode_signal alone, median over shards)."""
    n = logits.shape[0]
    params = {"signal": kind.signal, "k": kind.k, "samples": kind.samples, "seed": kind.seed, "draws": kind.draws,
              "value_encoding": kind.value_encoding, "temperature": 1.0, "vocab_size": vocab,
              "seq_len": logits.shape[1], "teacher": TEACHER, "source": "teacher"}
    manifest = Manifest(kind="signals", backend="zarr", fingerprints={"teacher": "bench"}, params=params,
                        layout=make_layout({"train": n}, shard_sequences))
    store = Store.create(path, manifest, overwrite=True)
    rates = []
    for rec in manifest.layout:
        generator = shard_generator(kind.seed, rec.name) if kind.signal != "topk" else None
        parts = [extract_signal(kind.signal, logits[i:i + batch_size], kind.k, kind.samples, generator, kind.draws)
                 for i in range(rec.start, rec.start + rec.count, batch_size)]
        arrays = concat_signals(kind.signal, parts)
        start = time.perf_counter()
        encoded = encode_signal(kind.signal, arrays, vocab, kind.value_encoding)
        rates.append(rec.count * logits.shape[1] / (time.perf_counter() - start))
        store.write_shard(rec.name, encoded)
    store.refresh_manifest()
    return store, statistics.median(rates)


def read_decoded(store: Store) -> dict[str, np.ndarray]:
    """All shards decoded and joined, widths padded as the reader pads them (id = first id, logprob = -inf)."""
    from kdcache.stages.data import stack_sequences

    seqs = []
    for rec in store.manifest.shards:
        sig = decode_signal(store.read_shard(rec.name), store.manifest.params)
        seqs += [{"sig_ids": sig["ids"][i], "sig_logprobs": sig["logprobs"][i], "sig_lognorm": sig["lognorm"][i]}
                 for i in range(len(sig["ids"]))]
    return stack_sequences(seqs)


def gradient_fidelity(student_z: list[torch.Tensor], teacher_z: list[torch.Tensor], targets: list, tail: str) -> dict:
    """Per batch: angle (degrees) and norm ratio between the cached-target KL gradient and q - p."""
    angles, ratios = [], []
    for z, tz, target in zip(student_z, teacher_z, targets):
        full = torch.softmax(z, -1) - torch.softmax(tz, -1)                   # (N, V) full-KD logit gradient
        z = z.clone().requires_grad_(True)
        divergence_rows("kl", z, target, tail=tail).sum().backward()
        g = z.grad                                                             # (N, V)
        cos = float((g * full).sum() / (g.norm() * full.norm()))
        angles.append(math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
        ratios.append(float(g.norm() / full.norm()))
    return {"angle_deg": statistics.median(angles), "norm_ratio": statistics.median(ratios)}


def evaluate(student, val_ids: torch.Tensor, val_mask: torch.Tensor, val_logits: torch.Tensor,
             batch_size: int = 4) -> dict:
    """Held-out KL(teacher || student) against the full teacher distribution, perplexity, top-1 agreement."""
    student.eval()
    kl = ce = top1 = 0.0
    n = 0
    with torch.no_grad():
        for i in range(0, len(val_ids), batch_size):
            ids, mask = val_ids[i:i + batch_size], val_mask[i:i + batch_size]
            positions, labels = _positions(ids, mask)
            z = student_logits(student, ids, positions)                       # (N, V)
            logq = torch.log_softmax(z, -1)
            logp = torch.log_softmax(val_logits[i:i + batch_size].flatten(0, 1)[positions], -1)
            kl += float((logp.exp() * (logp - logq)).sum())
            ce += float(-logq.gather(-1, labels[:, None]).sum())
            top1 += float((z.argmax(-1) == logp.argmax(-1)).sum())
            n += len(labels)
    student.train()
    return {"kl_teacher": kl / n, "perplexity": math.exp(ce / n), "top1_agreement": top1 / n, "positions": n}


def train_student(batches, steps: int, tc: TrainConfig, spec: ObjectiveSpec):
    """The trainer's optimisation (AdamW, warmup + cosine, clipping) for `steps` steps on `batches(step)`
    -> (input_ids, positions, labels, target)."""
    torch.manual_seed(tc.seed)
    student = build_student(STUDENT, TEACHER, seed=tc.seed)
    student.config.use_cache = False
    student.train()
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))
    lr_schedule = WarmupCosineLR(tc.lr, tc.warmup_steps, steps, tc.min_lr_ratio)
    start = time.perf_counter()
    for step in range(steps):
        input_ids, positions, labels, target = batches(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule.lr(step)
        logits = student_logits(student, input_ids, positions)               # (N, V)
        out = compute_objective(logits, target, labels, torch.ones_like(labels, dtype=torch.bool), spec)
        (out["loss_sum"] / max(1, len(labels))).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), tc.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return student, (time.perf_counter() - start) / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-sequences", type=int, default=256)
    ap.add_argument("--val-sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-seed", type=int, default=SEED, help="seed of the batch order every student shares")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny slice, 2 steps, 3 kinds")
    ap.add_argument("--only", help="comma-separated kind labels (and/or 'dense'): train only these students, "
                    "then stop (their results are reused by a later full run)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    kinds = KINDS
    if args.quick:
        args.train_sequences, args.val_sequences, args.steps = 16, 4, 2
        kinds = [replace(k, train=True) for k in KINDS if k.label in ("topk-16", "sample N=16", "hybrid 2+8 int8")]
    only = [label.strip() for label in args.only.split(",")] if args.only else None
    unknown = sorted(set(only or []) - {k.label for k in kinds} - {"dense"})
    if unknown:
        raise SystemExit(f"bench-cache: unknown kind(s) {unknown}: use labels from {[k.label for k in kinds]} or dense")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = out / "cache-work"
    t_start = time.perf_counter()

    # ---- data and the full teacher --------------------------------------------------------------------
    cfg = Config(run_dir=str(work), prepare=PrepareConfig(seq_len=args.seq_len, max_train_sequences=args.train_sequences,
                                                          max_validation_sequences=args.val_sequences))
    tokens = prepare.run(cfg, overwrite=True)
    split = {s: [r for r in tokens.manifest.layout if r.split == s] for s in ("train", "validation")}
    arrays = {s: {k: np.concatenate([tokens.read_shard(r.name)[k] for r in recs]) for k in ("input_ids", "loss_mask")}
              for s, recs in split.items()}
    teacher = load_teacher(TEACHER)
    vocab = teacher.config.vocab_size
    t0 = time.perf_counter()
    train_logits = teacher_logits(teacher, arrays["train"]["input_ids"])     # (n, T, V)
    val_logits = teacher_logits(teacher, arrays["validation"]["input_ids"])  # (m, T, V)
    teacher_tok_s = (train_logits.shape[0] + val_logits.shape[0]) * args.seq_len / (time.perf_counter() - t0)
    del teacher
    print(f"bench-cache: teacher forward {teacher_tok_s:.0f} tok/s", flush=True)
    train_ids = torch.from_numpy(arrays["train"]["input_ids"].astype(np.int64))
    train_mask = torch.from_numpy(arrays["train"]["loss_mask"].astype(bool))
    val_ids = torch.from_numpy(arrays["validation"]["input_ids"].astype(np.int64))
    val_mask = torch.from_numpy(arrays["validation"]["loss_mask"].astype(bool))
    n_positions = train_ids.numel()
    tc = TrainConfig()
    setup = {"teacher": "SmolLM2-135M-Instruct", "student": STUDENT, "corpus": "default (pydoc topics)",
             "train_sequences": int(len(train_ids)), "val_sequences": int(len(val_ids)), "seq_len": args.seq_len,
             "steps": args.steps, "batch_size": args.batch_size, "loss": "kl", "lr": tc.lr,
             "data_order_seed": args.data_seed}

    # ---- (1), (2), (4) for every kind -------------------------------------------------------------------
    fid = fidelity_probe(train_ids, train_mask, train_logits, args.batch_size) if only is None else None
    results, decoded = [], {}
    for kind in kinds:
        if only is not None and kind.label not in only:
            continue
        store, encode_rate = write_store(kind, train_logits, vocab, work / "signals" / slug(kind.label),
                                         shard_sequences=PrepareConfig().shard_sequences)
        decoded[kind.label] = read_decoded(store)
        if only is None:
            results.append(measure_kind(kind, store, decoded[kind.label], encode_rate, n_positions, fid, args.threads))

    if only is not None and "dense" not in only:
        train_logits = None  # only the dense student needs the full logits after this: free ~6 GB
    # ---- (3) students on the kinds marked train, against the dense reference -----------------------------
    untrained = evaluate(build_student(STUDENT, TEACHER, seed=0), val_ids, val_mask, val_logits)
    report = {"machine": machine(args.threads), "setup": setup, "untrained_student": untrained, "students": {},
              "kinds": results}
    students_dir = out / "cache-students"
    trained = [None] + [k for k in kinds if k.train]
    for kind in trained:
        label = kind.label if kind else DENSE
        if only is not None and (kind.label if kind else "dense") not in only:
            continue
        key = {**setup, "kind": None if kind is None else asdict(kind)}
        path = students_dir / f"{slug(label)}.json"
        saved = json.loads(path.read_text()) if path.exists() else None
        if saved is not None and _normalised(saved["key"]) == key:
            report["students"][label] = saved["result"]
            print(f"bench-cache: student {label}: reusing {path}", flush=True)
            continue
        spec = ObjectiveSpec(name="kl", tail=kind.tail if kind else "bucket", chunk_size=tc.chunk_size)
        batches = _batches(kind.label if kind else None, decoded, train_logits, train_ids, train_mask, args)
        model, step_s = train_student(batches, args.steps, tc, spec)
        result = {**evaluate(model, val_ids, val_mask, val_logits), "seconds_per_step": step_s}
        del model
        students_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "result": result}, indent=1))  # a late kill keeps what was measured
        report["students"][label] = result
        print(f"bench-cache: student {label}: KL {result['kl_teacher']:.4f}, ppl {result['perplexity']:.2f} "
              f"({step_s:.1f} s/step)", flush=True)
    if only is not None:
        return None
    report["seconds"] = time.perf_counter() - t_start
    write_report(report, out)
    print(markdown(report))


def slug(label: str) -> str:
    return label.replace(" ", "_").replace("=", "").replace("+", "-").replace("(", "").replace(")", "")


def machine(threads: int) -> dict:
    return {"cpu_threads": threads, "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "load_average_at_end": os.getloadavg()[0], "torch": torch.__version__,
            "python": platform.python_version()}


def fidelity_probe(train_ids, train_mask, train_logits, batch_size: int) -> dict:
    """A fixed student distribution for the gradient fidelity: the untrained layerdrop student on 4 train
    batches, its logits and the full teacher logits at the loss positions."""
    probe = build_student(STUDENT, TEACHER, seed=0).eval()
    batches = [slice(i, i + batch_size) for i in range(0, min(len(train_ids), 4 * batch_size), batch_size)]
    positions = [_positions(train_ids[b], train_mask[b])[0] for b in batches]
    with torch.no_grad():
        student = [student_logits(probe, train_ids[b], p) for b, p in zip(batches, positions)]
    teacher = [train_logits[b].flatten(0, 1)[p] for b, p in zip(batches, positions)]
    return {"batches": batches, "positions": positions, "student": student, "teacher": teacher}


def measure_kind(kind: Kind, store: Store, sig: dict, encode_rate: float, n_positions: int, fid: dict,
                 threads: int) -> dict:
    """Bytes per token, decode speeds (one thread) and fidelity to the full teacher of one kind's store."""
    raw = [store.read_shard(r.name) for r in store.manifest.shards]
    torch.set_num_threads(1)
    decode_rate = _median_rate(lambda: [decode_signal(a, store.manifest.params) for a in raw], n_positions)
    read_rate = _median_rate(lambda: [read_shard(store, r.name) for r in store.manifest.shards], n_positions)
    torch.set_num_threads(threads)
    logprobs = sig["sig_logprobs"]                                             # (n, T, C)
    used = np.isfinite(logprobs)
    row = {"label": kind.label, "signal": kind.signal, "k": kind.k, "samples": kind.samples, "seed": kind.seed,
           "value_encoding": kind.value_encoding, "tail": kind.tail, "bytes_per_token": store.nbytes() / n_positions,
           "entries_per_position": float(used.sum(-1).mean()), "width": int(logprobs.shape[-1]),
           "encode_tok_s": encode_rate, "decode_tok_s": decode_rate, "read_decode_tok_s": read_rate}
    if kind.signal in ("topk", "hybrid"):  # exact teacher mass on the top-k part
        row["topk_mass"] = float(np.exp(logprobs[..., :kind.k].astype(np.float64)).sum(-1).mean())
    targets = [sparse_target(*(torch.from_numpy(sig[k][b]) for k in ("sig_ids", "sig_logprobs", "sig_lognorm")))[p]
               for b, p in zip(fid["batches"], fid["positions"])]
    for tail in ("bucket", "renorm"):
        row[f"grad_{tail}"] = gradient_fidelity(fid["student"], fid["teacher"], targets, tail)
    print(f"bench-cache: {kind.label}: {row['bytes_per_token']:.1f} B/token, "
          f"angle bucket {row['grad_bucket']['angle_deg']:.2f} deg, decode {decode_rate / 1e6:.2f} M tok/s", flush=True)
    return row


def _normalised(key: dict) -> dict:
    """A saved student's key with the Kind fields added since it was saved at their defaults (a kind saved before
    `draws` existed drew iid), so a new field does not retrain every student; a key with unknown fields is kept."""
    try:
        return {**key, "kind": None if key.get("kind") is None else asdict(Kind(**key["kind"]))}
    except TypeError:
        return key


def _batches(label: str | None, decoded: dict, train_logits: torch.Tensor | None, train_ids: torch.Tensor,
             train_mask: torch.Tensor, args):
    """step -> (input_ids, positions, labels, target) in one seeded order shared by every student; label None =
    the dense teacher logits."""
    n_train = len(train_ids)
    rng = np.random.default_rng(args.data_seed)
    order = np.concatenate([rng.permutation(n_train) for _ in range(args.steps * args.batch_size // n_train + 1)])

    def batch(step):
        idx = torch.from_numpy(order[step * args.batch_size:(step + 1) * args.batch_size])
        ids = train_ids[idx]
        positions, labels = _positions(ids, train_mask[idx])
        if label is None:  # dense: the full teacher logits of these rows
            return ids, positions, labels, train_logits[idx].flatten(0, 1)[positions]
        sig = decoded[label]
        target = sparse_target(*(torch.from_numpy(sig[k][idx.numpy()])
                                 for k in ("sig_ids", "sig_logprobs", "sig_lognorm")))[positions]
        return ids, positions, labels, target
    return batch


def write_report(report: dict, out: Path) -> None:
    students = report["students"]
    dense_kl = students[DENSE]["kl_teacher"]
    for row in report["kinds"]:
        if row["label"] in students:
            s = students[row["label"]]
            row["student"] = {**s, "kl_vs_dense": s["kl_teacher"] / dense_kl - 1}
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache.json").write_text(json.dumps(report, indent=1))
    (out / "cache.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    dense = report["students"][DENSE]
    lines = ["| kind | values | B/token | entries/pos | top-k mass | angle bucket | norm bucket | angle renorm "
             "| student KL | vs dense | ppl | encode Mtok/s | decode Mtok/s | read+decode Mtok/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["kinds"]:
        s = r.get("student")  # absent for kinds not trained (yet)
        mass = f"{r['topk_mass']:.3f}" if "topk_mass" in r else "-"
        values = r["value_encoding"] if r["signal"] != "sample" else "counts"
        trained = f"{s['kl_teacher']:.4f} | {100 * s['kl_vs_dense']:+.1f}% | {s['perplexity']:.2f}" if s else "- | - | -"
        lines.append(f"| {r['label']} | {values} | {r['bytes_per_token']:.1f} | {r['entries_per_position']:.1f} | {mass} "
                     f"| {r['grad_bucket']['angle_deg']:.1f}° | {r['grad_bucket']['norm_ratio']:.2f} "
                     f"| {r['grad_renorm']['angle_deg']:.1f}° | {trained} | {r['encode_tok_s'] / 1e6:.2f} "
                     f"| {r['decode_tok_s'] / 1e6:.2f} | {r['read_decode_tok_s'] / 1e6:.2f} |")
    u = report["untrained_student"]
    lines.append(f"| dense (full logits) | float32 | {4 * 49152:.0f} (raw) | 49152 | 1.000 | 0.0° | 1.00 | - "
                 f"| {dense['kl_teacher']:.4f} | ref | {dense['perplexity']:.2f} | - | - | - |")
    lines.append(f"| untrained student | - | - | - | - | - | - | - | {u['kl_teacher']:.4f} | - | {u['perplexity']:.2f} "
                 "| - | - | - |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
