"""Selection on MoE checkpoints with one leaf per expert (`harmjax.masks.groups`): granularity
"matrix" ranks a layer's experts of one kind as one matrix. Checked against NumPy's stable
top-k over the concatenated (fused) scores split back per expert, against `select` on the
same scores stored as one gpt-oss style (E, ., .) tensor, through the candidates path, and for
the random control; host and multi-device scores. Scores are rounded so ties occur, and 12
experts make the expert order numeric (10 and 11 sort before 2 alphabetically)."""

import json
import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from harmjax.attribution import scored_names
from harmjax.config import ModelConfig
from harmjax.errors import CheckpointError
from harmjax.masks import (
    hf_order_key, load_candidates, mask_indices, random_indices, save_candidates, select, select_indices, top_candidates,
)
from harmjax.masks.groups import expert_groups, selection_units
from harmjax.masks.storage import read_summary
from harmjax.model.moe_specs import expert_leaf
from harmjax.model.param_specs import param_specs
from harmjax.tree import flatten, unflatten

E = 12
CONFIG = ModelConfig.from_hf({
    "model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 32,
    "rms_norm_eps": 1e-5, "rope_theta": 1e4, "num_experts": E, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
    "mlp_only_layers": [1],
})
NAMES = scored_names(CONFIG)
SHAPES = {n: tuple(param_specs(CONFIG)[n].shape) for n in NAMES}
_EXPERT = re.compile(r"^model\.layers\.0\.mlp\.experts\.(\d+)\.(\w+)\.weight$")


def _scores(seed, hot_expert=None):
    """Rounded normal scores (many ties); `hot_expert` lifts one expert so a top-k sits there."""
    rng = np.random.default_rng(seed)
    out = {}
    for n, shape in SHAPES.items():
        x = np.round(rng.standard_normal(shape), 1).astype(np.float32)
        m = _EXPERT.match(n)
        if hot_expert is not None and m and int(m.group(1)) == hot_expert:
            x += 6.0
        out[n] = x
    return out


def _numpy_top(flat_scores, k):
    """Bool mask of the k largest by a stable sort on (-score, index)."""
    order = np.lexsort((np.arange(flat_scores.size), -flat_scores))
    out = np.zeros(flat_scores.size, bool)
    out[order[:k]] = True
    return out


def _reference(harm, retain, q, p):
    """{name: mask}: per matrix for dense leaves; each (layer 0, kind) group of experts as one
    matrix, its leaves concatenated in expert order (the fused tensor's flat order)."""
    units = {}
    for n in NAMES:
        m = _EXPERT.match(n)
        units.setdefault(m.group(2) if m else n, []).append(n)
    out = {}
    for members in units.values():
        members.sort(key=lambda n: int(_EXPERT.match(n).group(1)) if _EXPERT.match(n) else 0)
        h = np.concatenate([harm[n].ravel() for n in members])
        mask = _numpy_top(h, int(q * h.size))
        if retain is not None:
            r = np.concatenate([retain[n].ravel() for n in members])
            mask &= ~_numpy_top(r, int(p * r.size))
        for n, part in zip(members, np.split(mask, np.cumsum([harm[n].size for n in members])[:-1])):
            out[n] = part.reshape(SHAPES[n])
    return out


def _placed(flat, devices):
    """The score tree with its expert leaves replicated over `devices` CPU devices (not "on the
    host", so the global engine serves the groups); other leaves stay NumPy (their device
    path is unchanged and tested in test_select.py, and compiling it here would cost ~10 s)."""
    if devices == 1:
        return unflatten(flat)
    sharding = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("x",)), P())
    groups = expert_groups(flat)
    return unflatten({n: jax.device_put(x, sharding) if n in groups else x for n, x in flat.items()})


def test_expert_leaf_names_and_groups():
    assert expert_leaf("model.layers.3.mlp.experts.11.gate_proj.weight") == (
        "model.layers.3.mlp.experts.*.gate_proj.weight", 11)
    assert expert_leaf("model.layers.0.block_sparse_moe.experts.2.w2.weight") == (
        "model.layers.0.block_sparse_moe.experts.*.w2.weight", 2)
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.gate.weight",
                 "model.layers.1.mlp.gate_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert expert_leaf(name) is None, name
    groups = expert_groups(NAMES)
    assert len(set(groups.values())) == 3 and len(groups) == 3 * E  # layer 0's gate, up, down
    unit = groups["model.layers.0.mlp.experts.10.up_proj.weight"]
    assert [int(_EXPERT.match(n).group(1)) for n in unit] == list(range(E))
    assert len(selection_units(NAMES)) == len(NAMES) - 3 * E + 3


@pytest.mark.parametrize("devices", [1, 2])
def test_grouped_selection_equals_numpy_top_k_over_fused_scores(devices):
    harm, retain = _scores(1, hot_expert=4), _scores(2)
    h, r = _placed(harm, devices), _placed(retain, devices)
    for q, p in [(0.05, 0.0), (0.05, 0.1), (0.3, 0.2)]:
        got = flatten(select(h, r if p else None, q=q, p=p, progress=False))
        want = _reference(harm, retain if p else None, q, p)
        for n in NAMES:
            np.testing.assert_array_equal(np.asarray(got[n]), want[n], err_msg=f"{q} {p} {n}")
    # q=0.05 of the up group (76 of 1536) fits in expert 4 (128 entries): all of it lands there.
    top = flatten(select(h, None, q=0.05, progress=False))
    per_expert = [int(np.sum(top[f"model.layers.0.mlp.experts.{e}.up_proj.weight"])) for e in range(E)]
    assert per_expert[4] == int(0.05 * E * 128) and sum(per_expert) == per_expert[4]


@pytest.mark.parametrize("devices", [1, 2])
def test_per_expert_and_fused_layouts_select_the_same_entries(devices):
    rng = np.random.default_rng(3)
    fused = {k: np.round(rng.standard_normal((E, 8, 16)), 1).astype(np.float32) for k in ("harm", "retain")}
    fused["harm"][7] += 0.5  # one expert favoured, not exclusively
    per = {k: {f"model.layers.0.mlp.experts.{e}.gate_proj.weight": v[e] for e in range(E)} for k, v in fused.items()}
    one = {k: {"model.layers.0.mlp.experts.gate_up_proj": v} for k, v in fused.items()}
    for q, p, flip, skip in [(0.1, 0.0, False, False), (0.1, 0.2, False, False), (0.04, 0.0, True, False),
                             (0.04, 0.1, False, True)]:
        args = dict(q=q, p=p, sign_flip=flip, skip_first=skip, progress=False)
        a = flatten(select(_placed(per["harm"], devices), _placed(per["retain"], devices) if p else None, **args))
        b = flatten(select(_placed(one["harm"], devices), _placed(one["retain"], devices) if p else None, **args))
        stacked = np.stack([np.asarray(a[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"]) for e in range(E)])
        np.testing.assert_array_equal(stacked, np.asarray(b["model.layers.0.mlp.experts.gate_up_proj"]),
                                      err_msg=f"{q} {p} {flip} {skip}")
        assert 0 < stacked.sum() and len(set(stacked.reshape(E, -1).sum(1))) > 1  # counts differ per expert


def test_candidates_equal_dense_selection(tmp_path):
    harm, retain = _placed(_scores(5, hot_expert=9), 2), _placed(_scores(6), 2)
    for key, tree in (("h", harm), ("r", retain)):
        save_candidates(str(tmp_path / key), top_candidates(tree, 0.3), SHAPES, {"kind": key})
    ch, shapes, summary = load_candidates(str(tmp_path / "h"))
    cr = load_candidates(str(tmp_path / "r"))[0]
    assert summary["selection_units"] == "expert groups"
    # A hot expert holds more of its group's candidates than floor(f x its own size).
    assert len(ch["model.layers.0.mlp.experts.9.down_proj.weight"][0]) > int(0.3 * 128)
    for q, p in [(0.3, 0.1), (0.05, 0.3), (0.2, 0.0), (0.001, 0.0)]:
        want = mask_indices(select(harm, retain if p else None, q=q, p=p, progress=False))
        got = select_indices(ch, cr if p else None, shapes, q, p)
        for n in NAMES:
            np.testing.assert_array_equal(got[n], want[n], err_msg=f"{q} {p} {n}")
    group = expert_groups(NAMES)["model.layers.0.mlp.experts.0.down_proj.weight"]
    with pytest.raises(ValueError, match="needs the top 768 entries of the 12-expert group .* hold 460"):
        select_indices(ch, None, {n: shapes[n] for n in group}, 0.5)
    # Candidates written per expert matrix (before grouping) are refused, not misused.
    summary = read_summary(str(tmp_path / "h"))
    summary.pop("selection_units")
    (tmp_path / "h" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(CheckpointError, match="rescore"):
        load_candidates(str(tmp_path / "h"))


def test_random_control_draws_each_groups_count_over_its_experts():
    harm = select(unflatten(_scores(7, hot_expert=2)), None, q=0.05, progress=False)
    counts = {n: int(np.sum(x)) for n, x in flatten(harm).items()}
    control = random_indices(counts, SHAPES, seed=3)
    for unit in selection_units(NAMES):
        assert sum(len(control[n]) for n in unit) == sum(counts[n] for n in unit)
        for n in unit:
            idx = control[n]
            assert np.all(np.diff(idx) > 0) and (idx.size == 0 or 0 <= idx[0] <= idx[-1] < np.prod(SHAPES[n]))
    up = [f"model.layers.0.mlp.experts.{e}.up_proj.weight" for e in range(E)]
    assert [counts[n] > 0 for n in up] == [e == 2 for e in range(E)]  # harm: all in expert 2
    assert sum(len(control[n]) > 0 for n in up) >= E // 2  # the control: spread over the experts
    # Dense leaves keep NumPy's draw per matrix (unchanged for dense models).
    for i, n in enumerate(sorted(SHAPES, key=hf_order_key)):  # matrix i of the documented seed rule
        if n not in expert_groups(NAMES):
            want = np.sort(np.random.default_rng([3, i]).choice(int(np.prod(SHAPES[n])), counts[n], replace=False))
            np.testing.assert_array_equal(control[n], want, err_msg=n)
