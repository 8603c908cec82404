"""Which weights attribution scores: the scope, as dotted HF parameter names.

The default scope is the method's: the weight of each of the seven linear projections in every
decoder block (not embeddings, lm_head, norms or biases). A custom scope is a sequence of
fnmatch patterns over HF names, e.g. `("model.layers.*.mlp.*_proj.weight",)` or
`("model.layers.1[0-5].*",)`; only 2-D linear weights may be scored.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from harmjax.config import ModelConfig
from harmjax.model.param_specs import linear_names, param_specs
from harmjax.tree import unflatten

DEFAULT_SCOPE = ("model.layers.*.self_attn.*_proj.weight", "model.layers.*.mlp.*_proj.weight")


def scored_names(config: ModelConfig, scope: Sequence[str] | None = None) -> list[str]:
    """HF names of the scored weights, in HF parameter order.

    Raises ValueError when a pattern matches nothing or matches a non-linear parameter.
    """
    patterns = tuple(scope) if scope else DEFAULT_SCOPE
    specs = param_specs(config)
    linear = {
        f"model.layers.{i}.{n}.weight" for i in range(config.num_layers) for n in linear_names(config)
    }
    names = []
    for pattern in patterns:
        hits = [n for n in specs if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"Scope pattern {pattern!r} matches no parameter of this {config.model_type} model.")
        bad = [n for n in hits if n not in linear]
        if bad:
            raise ValueError(
                f"Scope pattern {pattern!r} matches {bad[0]!r}, which is not a decoder linear weight; "
                "only q/k/v/o/gate/up/down_proj weights can be scored."
            )
        names.extend(hits)
    chosen = set(names)
    return [n for n in specs if n in chosen]


def scope_tree(config: ModelConfig, scope: Sequence[str] | None, leaf_fn) -> dict[str, Any]:
    """A pytree over the scored weights with leaves `leaf_fn(name, ParamSpec)`."""
    specs = param_specs(config)
    return unflatten({n: leaf_fn(n, specs[n]) for n in scored_names(config, scope)})
