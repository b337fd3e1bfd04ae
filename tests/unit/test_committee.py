"""Committee loss and teacher-understanding module: exact reductions, baselines, and learning toward the expert."""
import math

import pytest
import torch

from kdcache.stages.committee import TeacherUnderstanding
from kdcache.stages.losses import ObjectiveSpec, SparseTarget, compute_objective
from kdcache.stages.losses import committee as cl
from kdcache.stages.signals import topk_signal

V, N, K = 50, 12, 6


def _sparse(logits, k=K):
    ids, logprobs, lognorm = topk_signal(logits, k)
    return SparseTarget(ids=ids, logprobs=logprobs, lognorm=lognorm)


def _inputs(seed=0, n_members=2, dense=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64)
    teachers = [torch.randn(N, V, generator=g, dtype=torch.float64) * 2 for _ in range(n_members)]
    targets = teachers if dense else [_sparse(t.float()) for t in teachers]
    labels = torch.randint(0, V, (N,), generator=g)
    return z, targets, labels


@pytest.mark.parametrize("name", ["kl", "rkl", "jsd", "taid", "rlkd+kl"])
@pytest.mark.parametrize("dense", [False, True])
def test_one_member_committee_equals_single_teacher(name, dense):
    z, targets, labels = _inputs(n_members=1, dense=dense)
    spec = ObjectiveSpec(name=name, chunk_size=5, ce_weight=0.2)
    mask = torch.ones(N, dtype=torch.bool)
    mask[3] = False
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    t = 0.6 if name == "taid" else None
    single = compute_objective(z1, targets[0], labels, mask, spec, taid_t=t)
    committee = cl.committee_objective(z2, targets, torch.ones(N, 1, dtype=torch.float64), labels, mask, spec,
                                       taid_t=t)
    assert set(single) == set(committee)
    for key in single:
        torch.testing.assert_close(committee[key], single[key], rtol=0, atol=0)
    single["loss_sum"].backward()
    committee["loss_sum"].backward()
    torch.testing.assert_close(z2.grad, z1.grad, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["kl", "taid", "srkl"])
def test_uniform_weights_average_the_members_losses(name):
    z, targets, labels = _inputs(n_members=3)
    spec = ObjectiveSpec(name=name, chunk_size=4)
    mask = torch.ones(N, dtype=torch.bool)
    t = 0.5 if name == "taid" else None
    zc = z.clone().requires_grad_()
    mixed = cl.committee_objective(zc, targets, cl.uniform_weights(N, 3).double(), labels, mask, spec, taid_t=t)
    mixed["loss_sum"].backward()
    members, grads = [], []
    for target in targets:
        zm = z.clone().requires_grad_()
        out = compute_objective(zm, target, labels, mask, spec, taid_t=t)
        out["loss_sum"].backward()
        members.append(out["loss_sum"].detach())
        grads.append(zm.grad)
    torch.testing.assert_close(mixed["loss_sum"].detach(), sum(members) / 3)
    torch.testing.assert_close(zc.grad, sum(grads) / 3)


@pytest.mark.parametrize("name", ["kl", "taid"])
def test_committee_on_hidden_states_with_the_output_layer_equals_the_logits_path(name):
    """The lean path train uses: hidden states (N, H) and the output layer applied chunk by chunk inside."""
    _, targets, labels = _inputs()
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(N, 8, generator=g, dtype=torch.float64)
    head = torch.nn.Linear(8, V, bias=False).double()
    alpha = cl.uniform_weights(N, 2).double()
    mask = torch.ones(N, dtype=torch.bool)
    mask[2] = False
    spec = ObjectiveSpec(name=name, chunk_size=4)
    lean_h = hidden.clone().requires_grad_()
    lean = cl.committee_objective(lean_h, targets, alpha, labels, mask, spec, taid_t=0.5, lm_head=head)
    lean["loss_sum"].backward()
    lean_grads = (lean_h.grad, head.weight.grad.clone())
    head.weight.grad = None
    full_h = hidden.clone().requires_grad_()
    full = cl.committee_objective(head(full_h), targets, alpha, labels, mask, spec, taid_t=0.5)
    full["loss_sum"].backward()
    for key in full:
        torch.testing.assert_close(lean[key].detach(), full[key].detach())
    torch.testing.assert_close(lean_grads[0], full_h.grad)
    torch.testing.assert_close(lean_grads[1], head.weight.grad)


def test_weights_get_no_gradient_in_the_students_term():
    z, targets, labels = _inputs()
    alpha = torch.full((N, 2), 0.5, dtype=torch.float64, requires_grad=True)
    out = cl.committee_objective(z.requires_grad_(), targets, alpha, labels, torch.ones(N, dtype=torch.bool),
                                 ObjectiveSpec(name="kl"))
    out["loss_sum"].backward()
    assert alpha.grad is None and z.grad is not None


def test_label_logprobs_on_support_tail_and_dense():
    z, targets, labels = _inputs(dense=True)
    dense = cl.label_logprobs(targets, labels, V)                              # (N, 2)
    full = [torch.log_softmax(t.float(), -1) for t in targets]
    torch.testing.assert_close(dense, torch.stack([f.gather(-1, labels[:, None])[:, 0] for f in full], -1))
    sparse_targets = [_sparse(t.float()) for t in targets]
    sparse = cl.label_logprobs(sparse_targets, labels, V)
    for m, target in enumerate(sparse_targets):
        for i in range(N):
            hit = (target.ids[i] == labels[i]).nonzero()
            if len(hit):
                want = float(target.logprobs[i, hit[0, 0]])
            else:
                want = math.log(1 - float(target.logprobs[i].exp().sum())) - math.log(V - K)
            assert abs(float(sparse[i, m]) - want) < 1e-4
    # the whole vocabulary as the support: the sparse path equals the dense one
    exact = cl.label_logprobs([_sparse(t.float(), V) for t in targets], labels, V)
    torch.testing.assert_close(exact, dense, rtol=1e-5, atol=1e-5)


def test_confidence_weights_favour_the_certain_member():
    sharp = torch.full((N, V), -10.0)
    sharp[:, 0] = 10.0
    flat = torch.zeros(N, V)
    alpha = cl.confidence_weights([_sparse(flat), _sparse(sharp)], V)          # (N, 2)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(N))
    assert bool((alpha[:, 1] > 0.95).all())
    entropies = cl.member_entropies([flat, _sparse(flat, V)], V)               # dense and full-support sparse
    torch.testing.assert_close(entropies, torch.full((N, 2), math.log(V)), rtol=1e-5, atol=1e-5)


def test_fixed_weights_are_normalised():
    torch.testing.assert_close(cl.fixed_weights(3, [1.0, 3.0]), torch.tensor([[0.25, 0.75]] * 3))


def test_module_learns_which_member_knows_the_ground_truth():
    # two kinds of positions (told apart by the hidden state): member 0 predicts the truth on kind A,
    # member 1 on kind B. Trained on the mixture likelihood alone, the weights must follow the expert.
    torch.manual_seed(0)
    H, n = 16, 64
    kind = torch.arange(n) % 2                                                 # (n,) 0 = A, 1 = B
    hidden = torch.randn(n, H) * 0.1 + torch.where(kind[:, None] == 0, 1.0, -1.0)  # (n, H)
    labels = torch.randint(0, V, (n,))
    good, bad = torch.full((n, V), 0.0), torch.full((n, V), 0.0)
    good[torch.arange(n), labels] = 8.0                                        # puts most mass on the truth
    bad[torch.arange(n), (labels + 1) % V] = 8.0                               # confidently wrong
    member0 = torch.where(kind[:, None] == 0, good, bad)
    member1 = torch.where(kind[:, None] == 1, good, bad)
    targets = [_sparse(member0), _sparse(member1)]
    label_logp = cl.label_logprobs(targets, labels, V)                         # (n, 2)
    module = TeacherUnderstanding(H, 2, dim=8)
    start = module(hidden).exp()
    assert float((start.detach() - 0.5).abs().max()) < 0.1                             # near uniform at init
    opt = torch.optim.AdamW(module.parameters(), lr=5e-2)
    for _ in range(60):
        loss = cl.mixture_nll(module(hidden), label_logp) / n
        opt.zero_grad()
        loss.backward()
        opt.step()
    alpha = module(hidden).exp().detach()
    assert float(alpha[kind == 0, 0].mean()) > 0.9 and float(alpha[kind == 1, 1].mean()) > 0.9


def test_module_does_not_push_the_student():
    hidden = torch.randn(5, 8, requires_grad=True)
    module = TeacherUnderstanding(8, 3, dim=4)
    cl.mixture_nll(module(hidden), torch.randn(5, 3)).backward()
    assert hidden.grad is None and module.proj.weight.grad is not None


def test_members_and_committee_config_from_overrides():
    from kdcache.pipeline.config import load_config

    cfg = load_config(None, ["precompute.members=[ta=/models/a, big=hub/model]", "train.committee=[teacher,ta]",
                             "train.committee_weights=fixed", "train.committee_fixed=[1, 3]"])
    assert cfg.precompute.sources() == [("teacher", "default"), ("ta", "/models/a"), ("big", "hub/model")]
    assert cfg.train.committee == ["teacher", "ta"] and cfg.train.committee_fixed == [1.0, 3.0]
    assert load_config(None, ["precompute.members=ta=/x"]).precompute.members == ["ta=/x"]  # one scalar is a list
    assert load_config(None, []).precompute.sources() == [("teacher", "default")]


@pytest.mark.parametrize("override, message", [
    ("precompute.members=[a=/x,a=/y]", "'a' is used twice"),
    ("precompute.members=[teacher=/x]", "is the teacher's own source"),
    ("precompute.members=[a]", "is not name=model_spec"),
    ("precompute.members=[../up=/x]", "not a valid source name"),
    ("precompute.members={a: x}", "must be a list"),
    ("train.committee=[a,a]", "lists a source twice"),
    ("train.committee_weights=best", "is not one of learned, uniform, fixed, confidence"),
    ("train.committee_fixed=[a]", r"train.committee_fixed\[0\] must be float"),
    ("train.output=../x", "not a valid source name"),
])
def test_bad_committee_config_is_a_one_line_error(override, message):
    from kdcache.pipeline.config import load_config
    from kdcache.pipeline.errors import KdcacheError

    with pytest.raises(KdcacheError, match="invalid config: .*" + message):
        load_config(None, [override])


@pytest.mark.parametrize("text, expected", [(" \n", "whitespace"), ("", "whitespace"), (" ),", "punctuation"),
                                            ("42", "digits"), (" self_x2", "word"), ("é", "word"), ("->x", "other"),
                                            ("«", "other")])
def test_token_class_of_the_decoded_text(text, expected):
    from kdcache.stages.committee import token_class

    assert token_class(text) == expected


def _with_unused_slots(target: SparseTarget, extra: int = 3) -> SparseTarget:
    """The same support with `extra` unused slots appended (-inf, id repeating the row's first id), as the
    sampled kinds pad their rows."""
    n = len(target)
    return SparseTarget(ids=torch.cat([target.ids, target.ids[:, :1].expand(n, extra)], -1),
                        logprobs=torch.cat([target.logprobs, torch.full((n, extra), -math.inf)], -1),
                        lognorm=target.lognorm)


def test_label_logprobs_and_entropies_count_used_slots_only_like_the_losses():
    """The tail is spread over V - (used slots), the count the losses use: padding a target with unused slots
    changes neither the label log-probs nor the entropies (before, the tail was spread over V - all slots and an
    unused slot's 0 * -inf made the entropy NaN)."""
    z, targets, labels = _inputs()
    padded = [_with_unused_slots(t) for t in targets]
    torch.testing.assert_close(cl.label_logprobs(padded, labels, V), cl.label_logprobs(targets, labels, V))
    torch.testing.assert_close(cl.member_entropies(padded, V), cl.member_entropies(targets, V))
    # a row whose used slots are the whole vocabulary has no tail, whatever padding follows
    full = _with_unused_slots(_sparse(torch.randn(N, V), V))
    assert bool(torch.isfinite(cl.member_entropies([full], V)).all())
    off = torch.full((N,), V - 1)
    assert bool(torch.isfinite(cl.label_logprobs([full], off, V)).all())
