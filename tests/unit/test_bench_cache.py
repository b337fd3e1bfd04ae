"""`make bench-cache` reuses a trained student whose setup is unchanged, including one saved before a Kind field
existed (then at its default), and retrains one whose setup differs."""
from dataclasses import asdict

from benchmarks.cache import Kind, _normalised

SETUP = {"student": "layerdrop:4", "steps": 120, "data_order_seed": 0}


def test_a_key_saved_before_a_kind_field_existed_matches_at_its_default():
    kind = Kind("sample N=50", "sample", samples=50, train=True)
    old = {k: v for k, v in asdict(kind).items() if k != "draws"}  # saved before `draws` (then always iid)
    assert _normalised({**SETUP, "kind": old}) == {**SETUP, "kind": asdict(kind)}


def test_a_different_kind_or_setup_does_not_match():
    key = {**SETUP, "kind": asdict(Kind("sample N=50", "sample", samples=50, train=True))}
    systematic = {**SETUP, "kind": asdict(Kind("sample N=50", "sample", samples=50, train=True, draws="systematic"))}
    assert _normalised(key) != systematic
    assert _normalised({**key, "steps": 30}) != key
    assert _normalised({**SETUP, "kind": None}) == {**SETUP, "kind": None}  # the dense reference
    unknown = {**SETUP, "kind": {**asdict(Kind("x", "topk", k=8)), "future_field": 1}}
    assert _normalised(unknown) == unknown
