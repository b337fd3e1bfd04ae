"""The KL family is one function by name; kl, rkl, ... are its shorthands (tests/unit/test_losses.py checks values)."""
import pytest

from kdcache.pipeline.config import DIVERGENCE_NAMES
from kdcache.stages import losses
from kdcache.stages.losses import divergence
from tests.unit.test_losses import K, all_rows, make_logits, sparse_from_dense


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_each_shorthand_is_the_one_function_by_name(name):
    z, target = make_logits(0), sparse_from_dense(make_logits(1), K)
    knobs = {"tail": "uniform", "temperature": 2.0, "jsd_beta": 0.3, "skew_alpha": 0.2}
    shorthand = getattr(losses, name)
    assert shorthand.func is divergence and shorthand.args == (name,)
    assert divergence(name, z, target, all_rows(), **knobs)[0] == shorthand(z, target, all_rows(), **knobs)[0]


def test_an_unknown_divergence_name_is_refused():
    with pytest.raises(ValueError, match="unknown divergence 'kld'; valid: kl, rkl, jsd, tvd, skl, srkl"):
        divergence("kld", make_logits(0), make_logits(1), all_rows())
