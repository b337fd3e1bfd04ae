"""Structured pruning for MiniDisc teacher assistants: gradient importance of attention heads and MLP neurons,
a reordered network in which every candidate width is a slice, sliced forwards, and standalone exports.

A width is (kv_groups g, heads_per_group h, neurons m), THE SAME IN EVERY LAYER. This deviates from MiniDisc,
whose globally ranked pruning leaves each layer its own head and neuron counts: a Hugging Face Llama config has
one num_attention_heads / num_key_value_heads / intermediate_size for all layers and kdcache never runs
trust_remote_code, so only a uniform width exports as a standard LlamaForCausalLM. The global ranking survives
in the choice of the widths: scores are normalised per layer, averaged across layers rank by rank, and one
greedy path removes whichever unit slot (one neuron, one query head per KV group, or one whole KV group) costs
the least normalised importance per parameter (`width_path`). Each grid sparsity is the first point on that
path at or past it, so the candidates are nested and each one is a slice of the next larger.

Grouped-query attention: query head r of KV group j sits at q rows / o columns (j*H + r)*d ... +d. Groups are
ordered by their heads' total importance, heads within a group by their own; a width keeps the first g groups
and the first h heads of each (the same count in every group, as HF's repeat_kv requires).
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kdcache.pipeline.errors import KdcacheError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Width:
    kv_groups: int
    heads_per_group: int
    neurons: int

    @property
    def heads(self) -> int:
        return self.kv_groups * self.heads_per_group

    def to_dict(self) -> dict:
        return asdict(self)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def model_width(config) -> Width:
    groups = config.num_key_value_heads or config.num_attention_heads
    return Width(groups, config.num_attention_heads // groups, config.intermediate_size)


def non_embedding_params(config, width: Width | None = None) -> int:
    """Parameters outside the token embedding and output layer of a Llama-style model at `width` (default: its
    own): attention, MLP and norms of every layer plus the final norm."""
    w = width or model_width(config)
    hidden, d = config.hidden_size, head_dim(config)
    q_out, kv_out = w.heads * d, w.kv_groups * d
    attn = hidden * (2 * q_out + 2 * kv_out)
    if getattr(config, "attention_bias", False):
        attn += q_out + 2 * kv_out + hidden
    mlp = 3 * hidden * w.neurons + (2 * w.neurons + hidden if getattr(config, "mlp_bias", False) else 0)
    return config.num_hidden_layers * (attn + mlp + 2 * hidden) + hidden


def sparsity(config, width: Width) -> float:
    """1 - non-embedding parameters at `width` / at the model's own width."""
    return 1.0 - non_embedding_params(config, width) / non_embedding_params(config)


def check_prunable(model) -> None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    ok = layers is not None and all(all(hasattr(l.self_attn, p) for p in ATTENTION) and
                                    all(hasattr(l.mlp, p) for p in MLP) for l in layers)
    if not ok:
        raise KdcacheError(f"assistants need a Llama-style teacher (q/k/v/o and gate/up/down projections), "
                           f"got {type(model).__name__}")


# ---- importance ----------------------------------------------------------------------------------------

def importance_scores(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order Taylor importance of every query head and MLP neuron for the LM loss on the true next token.

    |dL/d mask| of a unit gating a head's (neuron's) output equals |sum of grad * weight| over that head's
    o_proj columns (neuron's down_proj column); it is taken per batch, then summed over batches.
    batches: iterable of (input_ids (B, T), loss_mask (B, T)) -> heads (L, n_heads), neurons (L, M).
    """
    check_prunable(model)
    config = model.config
    layers, d = model.model.layers, head_dim(config)
    heads = torch.zeros(len(layers), config.num_attention_heads)
    neurons = torch.zeros(len(layers), config.intermediate_size)
    for input_ids, loss_mask in batches:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=input_ids).logits[:, :-1]                  # (B, T-1, V)
        mask = loss_mask[:, 1:].bool()                                       # (B, T-1): targets that are loss tokens
        loss = F.cross_entropy(logits[mask].float(), input_ids[:, 1:][mask])
        loss.backward()
        with torch.no_grad():
            for i, layer in enumerate(layers):
                o = layer.self_attn.o_proj.weight                            # (hidden, n_heads * d)
                heads[i] += (o.grad * o).sum(0).view(-1, d).sum(-1).abs()    # (n_heads,)
                down = layer.mlp.down_proj.weight                            # (hidden, M)
                neurons[i] += (down.grad * down).sum(0).abs()                # (M,)
    model.zero_grad(set_to_none=True)
    return heads, neurons


def normalise_per_layer(heads: torch.Tensor, neurons: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide each layer's scores by that layer's total (heads and neurons together), so every layer counts alike
    in the global ranking and heads and neurons stay on one scale (both estimate the loss change of removal)."""
    total = (heads.sum(1) + neurons.sum(1)).clamp(min=1e-30)[:, None]       # (L, 1)
    return heads / total, neurons / total


def unit_orders(heads: torch.Tensor, neurons: torch.Tensor, kv_groups: int):
    """Per layer, most important first: kv_order (L, G), head_order (L, G*H) as original head indices laid out
    group-major (new slot j*H + r = r-th best head of the j-th best group), neuron_order (L, M)."""
    L, n_heads = heads.shape
    per_group = n_heads // kv_groups
    grouped = heads.view(L, kv_groups, per_group)                            # (L, G, H)
    within = grouped.argsort(dim=-1, descending=True, stable=True)           # (L, G, H)
    kv_order = grouped.sum(-1).argsort(dim=-1, descending=True, stable=True)  # (L, G)
    head_order = torch.stack([torch.cat([g * per_group + within[l, g] for g in kv_order[l].tolist()])
                              for l in range(L)])                            # (L, G*H)
    neuron_order = neurons.argsort(dim=-1, descending=True, stable=True)     # (L, M)
    return kv_order, head_order, neuron_order


@torch.no_grad()
def reorder_(model, kv_order, head_order, neuron_order) -> None:
    """Permute every layer's heads, KV groups and neurons in place; the function the model computes is unchanged
    (up to float summation order in o_proj / down_proj)."""
    d = head_dim(model.config)

    def rows(order):                                                         # unit order -> row indices
        return (order[:, None] * d + torch.arange(d)).flatten()

    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        q_rows, kv_rows = rows(head_order[i]), rows(kv_order[i])
        _take_rows(attn.q_proj, q_rows)
        _take_rows(attn.k_proj, kv_rows)
        _take_rows(attn.v_proj, kv_rows)
        attn.o_proj.weight.data = attn.o_proj.weight.data[:, q_rows].clone()
        _take_rows(mlp.gate_proj, neuron_order[i])
        _take_rows(mlp.up_proj, neuron_order[i])
        mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, neuron_order[i]].clone()


def _take_rows(linear, index) -> None:
    linear.weight.data = linear.weight.data[index].clone()
    if linear.bias is not None:
        linear.bias.data = linear.bias.data[index].clone()


# ---- candidate widths ------------------------------------------------------------------------------------

def width_path(config, heads_norm: torch.Tensor, neurons_norm: torch.Tensor) -> list[Width]:
    """Nested widths from the full model down to (1 group, 1 head, 1 neuron), removing at each step the unit slot
    whose mean (over layers) normalised importance per parameter is smallest. Scores must be in the reordered
    layout (most important first): heads_norm (L, G*H), neurons_norm (L, M)."""
    full = model_width(config)
    G, H, d, hidden = full.kv_groups, full.heads_per_group, head_dim(config), config.hidden_size
    head_slot = heads_norm.mean(0).view(G, H)                                # (G, H) mean score by rank
    neuron_slot = neurons_norm.mean(0)                                       # (M,)
    g, h, m = G, H, full.neurons
    path = [Width(g, h, m)]
    while (g, h, m) != (1, 1, 1):
        moves = []  # (cost per parameter, new state)
        if m > 1:
            moves.append((float(neuron_slot[m - 1]) / (3 * hidden), (g, h, m - 1)))
        if h > 1:
            moves.append((float(head_slot[:g, h - 1].sum()) / (g * 2 * d * hidden), (g, h - 1, m)))
        if g > 1:
            moves.append((float(head_slot[g - 1, :h].sum()) / ((h + 1) * 2 * d * hidden), (g - 1, h, m)))
        g, h, m = min(moves, key=lambda move: move[0])[1]
        path.append(Width(g, h, m))
    return path


def grid_widths(config, path: list[Width], grid: list[float]) -> list[Width]:
    """For each target sparsity, the first width on the path at or past it."""
    sparsities = [sparsity(config, w) for w in path]
    out = []
    for target in grid:
        hit = next((w for w, s in zip(path, sparsities) if s >= target - 1e-9), None)
        if hit is None:
            raise KdcacheError(f"sparsity {target:g} is out of reach: the smallest slice (1 KV group, 1 head, 1 "
                               f"neuron per layer) is {sparsities[-1]:.1%} sparse; lower assistants.grid")
        out.append(hit)
    return out


# ---- sliced forward and export ---------------------------------------------------------------------------

def slice_indices(layout: Width, width: Width, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices of a width inside a network laid out at `layout`: q rows (g*h*d,), k/v rows (g*d,), neurons."""
    if width.kv_groups > layout.kv_groups or width.heads_per_group > layout.heads_per_group \
            or width.neurons > layout.neurons:
        raise KdcacheError(f"width {width} is not a slice of a network of width {layout}")
    heads = torch.tensor([j * layout.heads_per_group + r for j in range(width.kv_groups)
                          for r in range(width.heads_per_group)])
    span = torch.arange(d)
    q_rows = (heads[:, None] * d + span).flatten()
    kv_rows = torch.arange(width.kv_groups * d)
    return q_rows, kv_rows, torch.arange(width.neurons)


def sliced_state(model, layout: Width, width: Width) -> dict[str, torch.Tensor]:
    """The decoder's attention/MLP tensors at `width`, as differentiable index selections of the full ones
    (names relative to model.model). Tensors not listed (embeddings, norms) are shared unchanged."""
    q_rows, kv_rows, neurons = slice_indices(layout, width, head_dim(model.config))
    state = {}
    for i, layer in enumerate(model.model.layers):
        attn, mlp, p = layer.self_attn, layer.mlp, f"layers.{i}."
        for name, lin, index in (("q_proj", attn.q_proj, q_rows), ("k_proj", attn.k_proj, kv_rows),
                                 ("v_proj", attn.v_proj, kv_rows), ("gate_proj", mlp.gate_proj, neurons),
                                 ("up_proj", mlp.up_proj, neurons)):
            part = "self_attn." if name in ATTENTION else "mlp."
            state[f"{p}{part}{name}.weight"] = lin.weight[index]
            if lin.bias is not None:
                state[f"{p}{part}{name}.bias"] = lin.bias[index]
        state[f"{p}self_attn.o_proj.weight"] = attn.o_proj.weight[:, q_rows]
        state[f"{p}mlp.down_proj.weight"] = mlp.down_proj.weight[:, neurons]
    return state


@contextlib.contextmanager
def _heads_per_group(model, h: int):
    """HF attention repeats each KV head num_key_value_groups times; a slice has h query heads per group."""
    modules = [layer.self_attn for layer in model.model.layers]
    saved = [m.num_key_value_groups for m in modules]
    for m in modules:
        m.num_key_value_groups = h
    try:
        yield
    finally:
        for m, s in zip(modules, saved):
            m.num_key_value_groups = s


def sliced_hidden(model, layout: Width, width: Width, input_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states at `width`: input_ids (B, T) -> (B, T, hidden). Gradients flow into the
    full network's weights."""
    from torch.func import functional_call

    with _heads_per_group(model, width.heads_per_group):
        out = functional_call(model.model, sliced_state(model, layout, width), args=(),
                              kwargs={"input_ids": input_ids}, strict=False)
    return out.last_hidden_state


def sliced_logits(model, layout: Width, width: Width, input_ids: torch.Tensor,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits at `width`: (B, T, V), or (N, V) at the flattened `positions` (N,) only."""
    hidden = sliced_hidden(model, layout, width, input_ids)                 # (B, T, H)
    if positions is not None:
        hidden = hidden.flatten(0, 1)[positions]                            # (N, H)
    return model.get_output_embeddings()(hidden).float()


def width_config(config, width: Width):
    out = copy.deepcopy(config)
    out.head_dim = head_dim(config)  # no longer hidden // heads once heads are pruned
    out.num_attention_heads = width.heads
    out.num_key_value_heads = width.kv_groups
    out.intermediate_size = width.neurons
    return out


@torch.no_grad()
def extract_width(model, layout: Width, width: Width):
    """A standalone model (same class, a standard config) holding the slice `width` of `model`."""
    from transformers import AutoModelForCausalLM

    small = AutoModelForCausalLM.from_config(width_config(model.config, width), dtype=torch.float32)
    sliced = {f"model.{k}": v.detach().clone() for k, v in sliced_state(model, layout, width).items()}
    state = {k: v for k, v in model.state_dict().items() if k not in sliced}
    state.update(sliced)
    small.load_state_dict(state, strict=True)
    return small.eval()


def save_model_dir(model, out: Path, tokenizer=None) -> Path:
    """save_pretrained (+ tokenizer) to a temporary name, renamed into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out
