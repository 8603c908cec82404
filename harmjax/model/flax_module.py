"""`FlaxDecoder`: harmjax's decoder as a Flax linen module, for code that expects one.

The module declares no layers of its own. Its variables are exactly harmjax's params tree
(HF names, HF orientation) under the "params" collection, and `__call__` is
`harmjax.forward` over them, so there is one decoder and the module is a view of it:

  module = FlaxDecoder(model.config)
  variables = module.init(jax.random.key(0), ids)   # {"params": <the tree param_specs describes>}
  logits = module.apply({"params": model.params}, ids, attention_mask)  # == harmjax.forward

Why linen and not NNX: harmjax is pure functions over a params pytree, and linen's
`apply(variables, ...)` is exactly that contract (variables in, logits out, nothing mutated),
so a loaded `harmjax.Model` becomes module variables without copying a weight. An NNX user can
still wrap it with `flax.nnx.bridge.ToNNX`, or score an NNX model of their own with
`harmjax.attribute`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from harmjax.config import ModelConfig
from harmjax.model.decoder import forward
from harmjax.model.init import init_leaf, leaf_kind
from harmjax.model.param_specs import param_specs
from harmjax.sharding import param_shardings
from harmjax.tree import unflatten


class FlaxDecoder(nn.Module):
    """The harmjax decoder of `config` as a linen module (see the module docstring).

    Attributes:
      config: the model's `ModelConfig` (hashable; any supported family).
      param_dtype: dtype of the parameters `init` creates.
      init_std: standard deviation of the random weight matrices `init` creates.
      remat: rematerialise each block in the backward pass.
    """

    config: ModelConfig
    param_dtype: Any = jnp.float32
    init_std: float = 0.02
    remat: bool = False

    def _init_subtree(self, top: str):
        """An initializer of one top-level entry ("model" or "lm_head") of the params tree."""
        specs = {n: s for n, s in param_specs(self.config).items() if n.split(".", 1)[0] == top}

        def init(key: jax.Array) -> dict[str, Any]:
            keys = jax.random.split(key, len(specs))
            flat = {
                name.split(".", 1)[1]: init_leaf(self.config, leaf_kind(name), spec.shape, k, self.param_dtype, self.init_std)
                for k, (name, spec) in zip(keys, specs.items())
            }
            return unflatten(flat)

        return init

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """float32 logits (batch, seq, vocab); the arguments are `harmjax.forward`'s."""
        tops = dict.fromkeys(name.split(".", 1)[0] for name in param_specs(self.config))
        # Each top-level entry is one linen param whose value is the nested HF-named subtree,
        # so variables["params"] is harmjax's params tree itself.
        params = {top: self.param(top, self._init_subtree(top)) for top in tops}
        return forward(params, self.config, input_ids, attention_mask, positions, remat=self.remat)

    @classmethod
    def from_model(cls, model, **kwargs) -> tuple["FlaxDecoder", dict[str, Any]]:
        """(module, variables) for a loaded `harmjax.Model`; the variables hold the model's own
        arrays (no copy), so `module.apply(variables, ...)` equals `harmjax.forward`."""
        return cls(model.config, **kwargs), {"params": model.params}

    def shardings(self, mesh: Mesh) -> dict[str, Any]:
        """NamedShardings of the variables on `mesh`, from harmjax's logical-axis rules."""
        return {"params": param_shardings(self.config, mesh)}


def variables_to_model(model, variables: dict[str, Any]):
    """A `harmjax.Model` like `model` whose params are `variables["params"]` (no copy)."""
    return model.with_params(variables["params"])
