"""The memory-lean loss: the student's output layer runs chunk by chunk inside compute_objective, so the loss's
peak memory does not grow with the number of positions, and its values and gradients equal the unchunked ones."""
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kdcache.stages.losses import ObjectiveSpec, SparseTarget, compute_objective

H, V, K, CHUNK = 8, 1024, 4, 32


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside the mode that are alive at once (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                self.live.setdefault(ref.cdata, (ref, storage.nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _problem(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g)                                    # (N, H)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    teacher = torch.randn(n, V, generator=g) * 2                               # (N, V)
    logprobs, ids = torch.log_softmax(teacher, -1).topk(K, dim=-1)             # (N, K)
    target = SparseTarget(ids=ids, logprobs=logprobs, lognorm=torch.logsumexp(teacher, -1))
    labels = torch.randint(0, V, (n,), generator=g)
    return hidden, head, target, labels


def _loss_peak(n: int, name: str, lean: bool) -> int:
    hidden, head, target, labels = _problem(n)
    hidden.requires_grad_(True)
    spec = ObjectiveSpec(name=name, chunk_size=CHUNK, ce_weight=0.1)
    mode = PeakLiveBytes()
    with mode:
        if lean:
            out = compute_objective(hidden, target, labels, torch.ones(n, dtype=torch.bool), spec, taid_t=0.5,
                                    lm_head=lambda h: head(h).float())
        else:
            out = compute_objective(head(hidden).float(), target, labels, torch.ones(n, dtype=torch.bool), spec,
                                    taid_t=0.5)
        out["loss_sum"].backward()
    assert torch.isfinite(hidden.grad).all() and head.weight.grad.abs().sum() > 0
    return mode.peak


@pytest.mark.parametrize("name", ["kl", "taid", "ce"])
def test_peak_memory_of_the_loss_does_not_grow_with_positions(name):
    short, long = _loss_peak(64, name, lean=True), _loss_peak(256, name, lean=True)
    # what may grow with N is (N, H)-sized (the hidden states' gradient and its accumulation), a few H * 4 bytes
    # per position, against V * 4 = 4 KB per position for the (N, V) logits
    assert (long - short) / (256 - 64) < 0.1 * V * 4, (short, long)
    assert long < 10 * CHUNK * V * 4  # a few (chunk, V) float32 tensors at a time
    # the measurement can fail: the full-logits path grows with N
    assert _loss_peak(256, name, lean=False) > 256 * V * 4


@pytest.mark.parametrize("name, chunk_size", [("kl", 7), ("taid", 16), ("ce", 5), ("rlkd+kl", 9)])
def test_lean_loss_equals_the_full_logits_loss_in_values_and_grads(name, chunk_size):
    n = 40
    hidden, head, target, labels = _problem(n, seed=1)
    mask = torch.arange(n) % 5 != 0
    spec = ObjectiveSpec(name=name, chunk_size=chunk_size)

    def run(lean: bool):
        h = hidden.clone().requires_grad_(True)
        head.weight.grad = None
        if lean:
            out = compute_objective(h, target, labels, mask, spec, taid_t=0.5, lm_head=lambda x: head(x).float())
        else:
            full = ObjectiveSpec(name=name, chunk_size=10_000)
            out = compute_objective(head(h).float(), target, labels, mask, full, taid_t=0.5)
        out["loss_sum"].backward()
        return out, h.grad, head.weight.grad.clone()

    lean, lean_h, lean_w = run(True)
    full, full_h, full_w = run(False)
    assert set(lean) == set(full)
    for key in full:
        torch.testing.assert_close(lean[key], full[key], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean_h, full_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean_w, full_w, rtol=1e-5, atol=1e-6)
    assert lean_w.abs().sum() > 0 and lean_h.abs().sum() > 0
