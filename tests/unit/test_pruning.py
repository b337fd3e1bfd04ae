"""MiniDisc pruning: reordering keeps the teacher, slices export to identical standard models, the λ choice."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from kdcache.pipeline.config import load_config
from kdcache.pipeline.errors import KdcacheError
from kdcache.stages import pruning
from kdcache.stages.assistants import choose, sandwich
from kdcache.stages.pruning import Width


@pytest.fixture(scope="module")
def reordered(tiny_teacher):
    """The tiny teacher, its importance on random text, reordered; plus the reference teacher and the path."""
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    heads, neurons = pruning.importance_scores(model, [(ids, torch.ones_like(ids))])
    heads_n, neurons_n = pruning.normalise_per_layer(heads, neurons)
    kv, head_order, neuron_order = pruning.unit_orders(heads_n, neurons_n, model.config.num_key_value_heads)
    pruning.reorder_(model, kv, head_order, neuron_order)
    path = pruning.width_path(model.config, torch.gather(heads_n, 1, head_order),
                              torch.gather(neurons_n, 1, neuron_order))
    return teacher, model, ids, path, (heads, neurons, head_order, neuron_order)


def test_zero_pruning_is_the_teacher(reordered):
    teacher, model, ids, path, _ = reordered
    full = pruning.model_width(teacher.config)
    assert path[0] == full and pruning.sparsity(teacher.config, full) == 0.0
    with torch.no_grad():
        reference = teacher(ids).logits                                                  # (B, T, V)
        # the sliced forward at full width of the untouched teacher: bit for bit
        assert torch.equal(pruning.sliced_logits(teacher, full, full, ids), reference)
        # reordered heads/neurons: the same function, up to float summation order in o_proj / down_proj
        torch.testing.assert_close(pruning.sliced_logits(model, full, full, ids), reference, rtol=1e-5, atol=1e-5)
        exported = pruning.extract_width(model, full, full)
        torch.testing.assert_close(exported(ids).logits, reference, rtol=1e-5, atol=1e-5)


def test_importance_ranks_units_most_important_first(reordered):
    _, _, _, _, (heads, neurons, head_order, neuron_order) = reordered
    assert heads.shape == (4, 4) and neurons.shape == (4, 64) and bool((heads > 0).all())
    sorted_neurons = torch.gather(neurons, 1, neuron_order)
    assert bool((sorted_neurons[:, :-1] >= sorted_neurons[:, 1:]).all())
    for layer in range(4):  # heads stay in their KV group (0,1 | 2,3), most important first within it
        groups = head_order[layer].view(2, 2) // 2
        assert bool((groups[:, 0] == groups[:, 1]).all())
        for pair in head_order[layer].view(2, 2):
            assert heads[layer, pair[0]] >= heads[layer, pair[1]]


def test_width_path_is_nested_and_counts_parameters_exactly(reordered, tmp_path, tiny_tokenizer):
    _, model, ids, path, _ = reordered
    for big, small in zip(path, path[1:]):
        assert (small.kv_groups <= big.kv_groups and small.heads_per_group <= big.heads_per_group
                and small.neurons <= big.neurons and small != big)
    widths = pruning.grid_widths(model.config, path, [0.2, 0.5])
    assert [pruning.sparsity(model.config, w) >= s for w, s in zip(widths, [0.2, 0.5])] == [True, True]
    for width in widths:
        exported = pruning.extract_width(model, path[0], width)
        counted = sum(p.numel() for n, p in exported.named_parameters() if "embed_tokens" not in n)
        assert counted == pruning.non_embedding_params(model.config, width)
    with pytest.raises(KdcacheError, match="out of reach"):
        pruning.grid_widths(model.config, path, [0.99])


def test_slice_and_its_export_give_identical_logits(reordered, tmp_path, tiny_tokenizer):
    _, model, ids, path, _ = reordered
    layout = pruning.grid_widths(model.config, path, [0.1])[0]
    slimmable = pruning.extract_width(model, path[0], layout)       # the network the candidates are slices of
    for width in pruning.grid_widths(model.config, path, [0.1, 0.3, 0.6]):
        out = pruning.save_model_dir(pruning.extract_width(slimmable, layout, width), tmp_path / "ta", tiny_tokenizer)
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(loaded).__name__ == "LlamaForCausalLM"
        assert (loaded.config.num_key_value_heads, loaded.config.intermediate_size) == (width.kv_groups, width.neurons)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, pruning.sliced_logits(slimmable, layout, width, ids))


def _row(p, s, params):
    return {"P": p, "sparsity": s, "non_embedding_params": params}


def test_choice_is_the_argmax_of_the_tradeoff():
    table = [_row(0.90, 0.1, 900), _row(0.88, 0.3, 700), _row(0.86, 0.5, 500), _row(0.60, 0.9, 100)]
    assert choose(table, 0.2) == 2          # P + 0.2 s: 0.92, 0.94, 0.96, 0.78
    assert choose(table, 0.0) == 0          # λ = 0: the best P
    assert choose(table, 1.0) == 3          # λ = 1: 1.00, 1.18, 1.36, 1.50
    tie = [_row(0.5, 0.0, 10), _row(0.3, 1.0, 0)]
    assert choose(tie, 0.2) == 0 and choose([_row(0.5, 0.0, 10), _row(0.3, 0.2, 8)], 1.0) == 0  # ties: larger


def test_choice_honours_the_size_floor():
    table = [_row(0.50, 0.1, 900), _row(0.49, 0.5, 500), _row(0.48, 0.9, 100)]
    assert choose(table, 0.2) == 2
    assert choose(table, 0.2, max_sparsity=0.6) == 1
    assert choose(table, 0.2, min_params=600) == 0
    with pytest.raises(KdcacheError, match="size floor"):
        choose(table, 0.2, min_params=1000)


def test_sandwich_has_largest_smallest_and_middle_widths():
    import numpy as np

    widths = [Width(2, 2, m) for m in (60, 50, 40, 30, 20)]
    rng = np.random.default_rng(0)
    for _ in range(5):
        step = sandwich(widths, 2, rng)
        assert step[:2] == [widths[0], widths[-1]] and len(step) == 4 and set(step[2:]) <= set(widths[1:-1])
    assert sandwich(widths[:1], 1, rng) == widths[:1]


@pytest.mark.parametrize("override, message", [
    ("assistants.grid=0.2,1.5", "assistants.grid values must be distinct and in"),
    ("assistants.grid=a,b", "assistants.grid must be comma-separated"),
    ("assistants.tradeoff_lambda=-1", "assistants.tradeoff_lambda must be >= 0"),
    ("assistants.source=teacher", "assistants.source cannot be 'teacher'"),
])
def test_bad_assistants_config(override, message):
    with pytest.raises(KdcacheError, match=message):
        load_config(None, [override])
