"""LoRA / rsLoRA adapters as a separate pytree, applied through the decoder's `linear` hook.

Adapters mirror the params' HF names: `adapters["model"]["layers"]["3"]["self_attn"]["q_proj"]`
is `{"lora_A": (r, in), "lora_B": (out, r)}`, float32. In the forward pass each adapted weight
leaf is replaced by a `LoraWeight` whose `linear(x)` computes, like PEFT,

    y = x W^T + scale * (dropout(x) A^T) B^T        scale = alpha/sqrt(r) (rsLoRA) or alpha/r

factored, so the (out, in) delta is never formed for the main matmul. With a pruning mask M
(True = pruned) the effective weight is (W + scale B A) * ~M; W is already 0 on M, so the masked
part of the delta is subtracted again: y -= scale * dropout(x) ((B A) * M)^T. Masks are very
sparse (a few hundred entries per matrix), so by default that correction gathers only the pruned
(row, col) pairs: cost O(tokens * nnz), not a second dense matmul. A dense correction is used
when the mask is not sparse.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from harmjax.config import ModelConfig
from harmjax.distributed import to_host
from harmjax.errors import UnsupportedArchitectureError
from harmjax.io.lora import merged_weight
from harmjax.model.moe_specs import matrix_names
from harmjax.model.param_specs import linear_names, param_specs
from harmjax.sharding import logical_to_spec
from harmjax.tree import flatten, iter_leaves, unflatten

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Above this fraction of pruned entries in one matrix, the dense masked correction is cheaper
# than gathering the pruned pairs one by one.
_SPARSE_MAX_FRACTION = 0.01


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which weights get adapters and how they are scaled.

    Attributes:
      r: rank.
      alpha: lora_alpha.
      dropout: dropout probability on the adapter input (PEFT's lora_dropout).
      use_rslora: scale alpha/sqrt(r) (rank-stabilised) instead of alpha/r.
      targets: projection names (of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj);
        on MoE models only attention and dense-MLP ones (`adapted_weight_names`).
      layers: decoder layer indices to adapt; None adapts every layer.
    """

    r: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    use_rslora: bool = True
    targets: tuple[str, ...] = PROJECTIONS
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"LoraConfig.r must be >= 1, got {self.r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}.")
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if bad or not self.targets:
            raise ValueError(f"LoraConfig.targets {bad or '()'} are not among {PROJECTIONS}.")
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    @property
    def scale(self) -> float:
        """alpha / sqrt(r) with rsLoRA, else alpha / r."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def adapted_weight_names(config: ModelConfig, lora_cfg: LoraConfig) -> list[str]:
    """Dotted HF names of the weights `lora_cfg` adapts, in `param_specs` order.

    MoE models get adapters on attention and dense-MLP projections only, never on routers or
    expert matrices (the MoE block consumes experts stacked, not through `linear`); a target
    that the chosen layers have only inside their experts is refused rather than dropped."""
    if config.fused_linears:  # adapting only o/down_proj silently would mislead
        raise UnsupportedArchitectureError(
            f"LoRA on {config.model_type}'s fused qkv_proj/gate_up_proj is not supported; "
            f"LoRA targets {PROJECTIONS} of unfused checkpoints."
        )
    layers = range(config.num_layers) if lora_cfg.layers is None else lora_cfg.layers
    bad = [i for i in layers if not 0 <= i < config.num_layers]
    if bad:
        raise ValueError(f"LoraConfig.layers {bad} out of range for a {config.num_layers}-layer model.")
    specs = param_specs(config)
    expert_rel = {n.removesuffix(".weight") for n in matrix_names(config)} if config.num_experts else set()
    rels = [rel for rel in linear_names(config) if rel.split(".")[-1] in lora_cfg.targets and rel not in expert_rel]
    wanted = {f"model.layers.{i}.{rel}.weight" for i in layers for rel in rels}
    names = [name for name in specs if name in wanted]
    if config.num_experts:
        found = {name.removesuffix(".weight").rsplit(".", 1)[-1] for name in names}
        missing = [t for t in lora_cfg.targets if t not in found]
        if missing:
            raise UnsupportedArchitectureError(
                f"LoRA targets {missing} exist only as expert weights in the chosen layers of this "
                f"{config.model_type} model, and LoRA adapts attention and dense-MLP projections only: "
                f"drop them (e.g. targets q_proj,k_proj,v_proj,o_proj)."
            )
    return names


def adapter_shardings(config: ModelConfig, lora_cfg: LoraConfig, mesh: Mesh) -> dict[str, Any]:
    """NamedShardings of the adapters: A (None, in-axis of W), B (out-axis of W, None)."""
    specs = param_specs(config)
    flat = {}
    for name in adapted_weight_names(config, lora_cfg):
        spec = specs[name]
        out_dim, in_dim = spec.shape
        out_axis, in_axis = spec.axes
        module = name[: -len(".weight")]
        r = lora_cfg.r
        flat[f"{module}.lora_A"] = NamedSharding(mesh, logical_to_spec((None, in_axis), (r, in_dim), mesh))
        flat[f"{module}.lora_B"] = NamedSharding(mesh, logical_to_spec((out_axis, None), (out_dim, r), mesh))
    return unflatten(flat)


def init_lora(key: jax.Array, config: ModelConfig, lora_cfg: LoraConfig, mesh: Mesh) -> dict[str, Any]:
    """Fresh float32 adapters with PEFT's default init, each sharded by its logical axes.

    lora_A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); lora_B = 0, so the adapted
    model starts equal to the base model. Each matrix gets its own key (fold_in of its index).
    """
    specs = param_specs(config)
    shardings = flatten(adapter_shardings(config, lora_cfg, mesh))
    flat = {}
    for i, name in enumerate(adapted_weight_names(config, lora_cfg)):
        out_dim, in_dim = specs[name].shape
        module = name[: -len(".weight")]
        bound = 1.0 / math.sqrt(in_dim)
        a_sh, b_sh = shardings[f"{module}.lora_A"], shardings[f"{module}.lora_B"]
        flat[f"{module}.lora_A"] = _uniform(a_sh, (lora_cfg.r, in_dim), bound)(jax.random.fold_in(key, i))
        flat[f"{module}.lora_B"] = _zeros(b_sh, (out_dim, lora_cfg.r))()
    return unflatten(flat)


@functools.lru_cache(maxsize=None)
def _uniform(sharding, shape, bound):
    return jax.jit(lambda k: jax.random.uniform(k, shape, jnp.float32, -bound, bound), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _zeros(sharding, shape):
    return jax.jit(lambda: jnp.zeros(shape, jnp.float32), out_shardings=sharding)


# ------------------------------------------------------------------------------ forward


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraWeight:
    """A frozen weight plus its adapter; the decoder calls `linear(x)` on it.

    Attributes:
      weight: frozen (out, in) weight, any float dtype (already zero where pruned).
      lora_a: float32 (r, in).  lora_b: float32 (out, r).
      key: dropout PRNG key (uint32[2]) or None when dropout is off.
      rows, cols: int32 (nnz,) pruned positions for the sparse masked correction, else None.
      dense_mask: bool (out, in) for the dense masked correction, else None.
      scale, dropout: static floats.
    """

    weight: jax.Array
    lora_a: jax.Array
    lora_b: jax.Array
    key: jax.Array | None = None
    rows: jax.Array | None = None
    cols: jax.Array | None = None
    dense_mask: jax.Array | None = None
    scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)
    dropout: float = dataclasses.field(metadata=dict(static=True), default=0.0)

    def linear(self, x: jax.Array) -> jax.Array:
        """x W^T + scale * (dropout(x) A^T) B^T, minus the pruned part of the delta; float32
        adapter math (PEFT casts x to the adapter dtype), result in x's dtype."""
        base = jnp.einsum("...i,oi->...o", x, self.weight)
        xd = x.astype(jnp.float32)
        if self.dropout > 0.0:
            keep = jax.random.bernoulli(self.key, 1.0 - self.dropout, xd.shape)
            xd = jnp.where(keep, xd / (1.0 - self.dropout), 0.0)
        delta = jnp.einsum("...r,or->...o", jnp.einsum("...i,ri->...r", xd, self.lora_a), self.lora_b)
        if self.rows is not None:
            # Entries (rows[k], cols[k]) of B A, removed one pair at a time.
            vals = jnp.einsum("kr,rk->k", self.lora_b[self.rows], self.lora_a[:, self.cols])
            delta = delta - pruned_pairs_linear(xd, vals, self.rows, self.cols, delta.shape[-1])
        elif self.dense_mask is not None:
            masked = jnp.where(self.dense_mask, self.lora_b @ self.lora_a, 0.0)
            delta = delta - jnp.einsum("...i,oi->...o", xd, masked)
        return (base.astype(jnp.float32) + self.scale * delta).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def pruned_pairs_linear(x, vals, rows, cols, out_dim):
    """y[..., rows[k]] += x[..., cols[k]] * vals[k]: x times a sparse (out_dim, in) matrix.

    A custom VJP so that the backward pass keeps only x (saved anyway) rather than the
    (tokens, nnz) gathered inputs; the gather is redone there.
    """
    y = jnp.zeros((*x.shape[:-1], out_dim), x.dtype)
    return y.at[..., rows].add(x[..., cols] * vals)


def _pairs_fwd(x, vals, rows, cols, out_dim):
    return pruned_pairs_linear(x, vals, rows, cols, out_dim), (x, vals, rows, cols)


def _pairs_bwd(out_dim, residuals, g):
    x, vals, rows, cols = residuals
    g_rows = g[..., rows]
    dx = jnp.zeros_like(x).at[..., cols].add(g_rows * vals)
    dvals = jnp.einsum("...k,...k->k", g_rows, x[..., cols])
    return dx, dvals, None, None


pruned_pairs_linear.defvjp(_pairs_fwd, _pairs_bwd)


def mask_plan(mask_leaf: np.ndarray | jax.Array, sparse: bool | None = None) -> dict[str, Any]:
    """How a LoraWeight removes the pruned part of its delta: {"rows", "cols"} (sparse) or
    {"dense_mask"}; {} for an all-False mask. `sparse=None` picks by the pruned fraction."""
    m = to_host(mask_leaf).astype(bool)
    nnz = int(m.sum())
    if nnz == 0:
        return {}
    if sparse is None:
        sparse = nnz <= _SPARSE_MAX_FRACTION * m.size
    if not sparse:
        return {"dense_mask": mask_leaf}
    rows, cols = np.nonzero(m)
    return {"rows": jnp.asarray(rows, jnp.int32), "cols": jnp.asarray(cols, jnp.int32)}


def mask_plans(mask: Mapping[str, Any] | None, config: ModelConfig, lora_cfg: LoraConfig,
               sparse: bool | None = None) -> dict[str, dict[str, Any]]:
    """`mask_plan` for every adapted weight that the mask prunes, keyed by dotted weight name."""
    if mask is None:
        return {}
    flat = dict(iter_leaves(mask))
    plans = {}
    for name in adapted_weight_names(config, lora_cfg):
        if name in flat:
            plan = mask_plan(flat[name], sparse)
            if plan:
                plans[name] = plan
    return plans


def apply_lora(params: Mapping[str, Any], adapters: Mapping[str, Any], lora_cfg: LoraConfig,
               plans: Mapping[str, dict[str, Any]] | None = None, key: jax.Array | None = None) -> dict[str, Any]:
    """A params tree whose adapted weight leaves are `LoraWeight`s (for `forward`).

    `plans` come from `mask_plans` (pruned positions); `key` is the dropout key of this forward
    pass (each weight folds in its own index), required when lora_cfg.dropout > 0.
    """
    if lora_cfg.dropout > 0.0 and key is None:
        raise ValueError("apply_lora: lora_cfg.dropout > 0 needs a dropout key.")
    flat = flatten(params)
    plans = plans or {}
    for i, (module, ab) in enumerate(_modules(adapters)):
        name = f"{module}.weight"
        if name not in flat:
            raise ValueError(f"Adapter for {module!r} has no weight {name!r} in the params.")
        flat[name] = LoraWeight(
            weight=flat[name], lora_a=ab["lora_A"], lora_b=ab["lora_B"],
            key=None if lora_cfg.dropout == 0.0 else jax.random.fold_in(key, i),
            scale=lora_cfg.scale, dropout=lora_cfg.dropout, **plans.get(name, {}),
        )
    return unflatten(flat)


def _modules(adapters: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(dotted module name, {"lora_A", "lora_B"}) pairs in the adapters' order."""
    out: dict[str, dict[str, Any]] = {}
    for name, leaf in iter_leaves(adapters):
        module, which = name.rsplit(".", 1)
        if which not in ("lora_A", "lora_B"):
            raise ValueError(f"Adapter leaf {name!r} is neither lora_A nor lora_B.")
        out.setdefault(module, {})[which] = leaf
    for module, ab in out.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"Adapter module {module!r} lacks lora_A or lora_B.")
    return list(out.items())


# ------------------------------------------------------------------------------ merging


@functools.lru_cache(maxsize=None)
def _merge_fn(sharding, masked: bool):
    def merge(w, a, b, scale, m=None):
        # Merge and re-mask in one pass over the weight.
        out = merged_weight(w, b, a, scale)
        return jnp.where(m, jnp.zeros_like(out), out) if masked else out

    kwargs = {} if sharding is None else {"out_shardings": sharding}
    return jax.jit(merge, **kwargs)


def merge_adapters(params: Mapping[str, Any], adapters: Mapping[str, Any], lora_cfg: LoraConfig,
                   mask: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Params with W <- (W + scale * B A) * ~M for every adapted weight.

    float32 math, cast back to each weight's dtype and sharding; with `mask`, the pruned
    weights are exactly 0.0 afterwards. Unadapted leaves are the same arrays as in `params`.
    """
    flat = flatten(params)
    flat_mask = dict(iter_leaves(mask)) if mask is not None else {}
    for module, ab in _modules(adapters):
        name = f"{module}.weight"
        w = flat[name]
        m = flat_mask.get(name)
        fn = _merge_fn(getattr(w, "sharding", None), m is not None)
        args = (w, ab["lora_A"], ab["lora_B"], np.float32(lora_cfg.scale))
        flat[name] = fn(*args, m) if m is not None else fn(*args)
    return unflatten(flat)
