"""The teacher-understanding module of a teaching committee (DiverseDistill, Liu et al., arXiv 2402.14035).

    alpha_m(t) = softmax_m(<W h_t, e_m> / sqrt(d))       h_t (H,) the student's last hidden state at position t,
                                                        W (d, H), e_m (d,) a learned embedding per member

It is trained with its own AdamW on the mixture likelihood of the ground truth (kdcache.stages.losses.committee.mixture_nll)
and reads h_t *detached*: the module's objective is about which member to trust, not about the student's own
prediction, so it must not reshape the student's representation (and the student's gradient stays exactly
its KD gradient). It lives beside the student: checkpointed with the run (committee.safetensors), never part of
the saved student.
"""
from __future__ import annotations

import math
import string

import torch
from torch import nn

# classes of the true next token, to see which member the weights trust for what (evaluate, report, benchmark)
TOKEN_CLASSES = ("whitespace", "punctuation", "digits", "word", "other")


def token_class(text: str) -> str:
    """whitespace (only spaces/newlines), punctuation (only ASCII punctuation), digits, word (letters, digits,
    underscore: identifier-like) or other, for the decoded text of one token."""
    core = text.strip()
    if not core:
        return "whitespace"
    if all(c in string.punctuation for c in core):
        return "punctuation"
    if core.isdigit():
        return "digits"
    if core.replace("_", "a").isalnum():
        return "word"
    return "other"


def token_classes(tokenizer) -> torch.Tensor:
    """(V,) index into TOKEN_CLASSES of every token id of the tokenizer."""
    return torch.tensor([TOKEN_CLASSES.index(token_class(tokenizer.decode([i]))) for i in range(len(tokenizer))])


class TeacherUnderstanding(nn.Module):
    def __init__(self, hidden_size: int, n_members: int, dim: int = 64):
        super().__init__()
        self.proj = nn.Linear(hidden_size, dim, bias=False)                    # W (d, H)
        # small embeddings: the weights start near uniform and move as the ground truth says
        self.members = nn.Parameter(torch.randn(n_members, dim) * 0.01)        # e (M, d)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, H) (detached here) -> log alpha (N, M)."""
        query = self.proj(hidden.detach().float())                             # (N, d)
        return torch.log_softmax(query @ self.members.t() * self.scale, dim=-1)  # (N, M)
