"""Probed weights: linear weights that accumulate their own gradient statistic in the backward pass.

Attribution needs, per scored weight matrix W of a linear map y = x W^T, either
  G = sum_i dL_i/dW             (signed; for `harm` and `retain_mean`), or
  A = sum_i |dL_i/dW|           (per-example absolute; for `retain`),
accumulated in float32 over a whole dataset, for every layer, from one backward pass per
micro-batch. With upstream gradient g = dL/dy, dL_i/dW = g_i^T x_i (row i of the batch), so both
statistics are computable inside the backward rule of the linear map from (x, g) alone.

`ProbedWeight(weight, acc)` is a pytree that stands in for a weight leaf. Its `linear` is a
`jax.custom_vjp` whose backward rule returns, as the cotangent of `acc`, the updated
accumulator `acc + contribution`. Differentiating the loss with respect to the accumulators
therefore *is* one accumulation step:
  * the weight's own gradient is never formed (nothing is requested for it), so a bf16 model
    costs no bf16 gradient tree and no precision is lost: the per-batch contribution is a
    float32 dot (`preferred_element_type`), added to a float32 accumulator;
  * per-example |grad| is formed one matrix at a time, in chunks of examples, never as B copies
    of the model's gradients;
  * with the accumulators donated, XLA updates them in place.

Wanda's statistic, X = sum_t x_t^2 per input feature of each linear map, needs x alone:
`record_inputs` is an identity on x whose backward rule returns, as the cotangent of its (1, in)
accumulator, the accumulator plus this batch's sums, formed in the forward pass (only the
(1, in) sums are kept for the backward pass, not x). Its cotangent depends on no gradient, so
when wanda is the only statistic asked for ("act" mode, the linear map itself then plain), the
whole backward computation feeds nothing and XLA removes it from a whole-step program: the
step costs a forward pass (docs/design.md "Score kinds").
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from harmjax.attribution import abs_kernel

MODES = ("signed", "abs", "both", "none")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def probed_linear(x: jax.Array, weight: jax.Array, acc: jax.Array, mode: str, chunk: int,
                  sharding: NamedSharding | None = None) -> jax.Array:
    """`x @ weight.T`; the backward pass adds this batch's gradient statistic to `acc`
    (`sharding`, the accumulator's, lets "abs" mode use the fused kernel per device)."""
    del acc
    return jnp.einsum("...i,oi->...o", x, weight)


def _fwd(x, weight, acc, mode, chunk, sharding):
    return probed_linear(x, weight, acc, mode, chunk, sharding), (x, weight, acc)


def _bwd(mode, chunk, sharding, residuals, g):
    x, weight, acc = residuals
    dx = jnp.einsum("...o,oi->...i", g, weight)
    if mode == "signed":
        contribution = jnp.einsum("...o,...i->oi", g, x, preferred_element_type=jnp.float32)
        return dx, None, acc + contribution
    if mode == "abs" and abs_kernel.applicable(x, g, sharding):
        # One fused pass, no per-example block in memory (harmjax.attribution.abs_kernel).
        return dx, None, acc + abs_kernel.abs_grad_sum(x, g, sharding)
    abs_sum, signed_sum = per_example_sums(x, g, chunk, signed=mode == "both")
    if mode == "both":
        return dx, None, (acc[0] + abs_sum, acc[1] + signed_sum)
    return dx, None, acc + abs_sum


def per_example_sums(x: jax.Array, g: jax.Array, chunk: int, signed: bool = False):
    """(sum_b |g[b]^T x[b]|, sum_b g[b]^T x[b] or None) in float32, from XLA's per-example
    blocks: x (batch, seq, in), g (batch, seq, out). One (chunk, out, in) float32 block of
    per-example gradients at a time bounds the transient memory; with `signed` the signed sum
    comes from the same blocks, so one backward pass serves both statistics."""
    abs_sum = signed_sum = None
    for start in range(0, x.shape[0], chunk):
        per_example = jnp.einsum(
            "bto,bti->boi", g[start : start + chunk], x[start : start + chunk],
            preferred_element_type=jnp.float32,
        )
        part = jnp.abs(per_example).sum(0)
        abs_sum = part if abs_sum is None else abs_sum + part
        if signed:
            part = per_example.sum(0)
            signed_sum = part if signed_sum is None else signed_sum + part
    return abs_sum, signed_sum


probed_linear.defvjp(_fwd, _bwd)


def input_square_sum(x: jax.Array, token_mask: jax.Array | None) -> jax.Array:
    """sum over tokens of x^2 per input feature, (1, in) float32; with `token_mask` (x's leading
    shape, e.g. (batch, length)) only the tokens where it is non-zero count."""
    sq = jnp.square(x.astype(jnp.float32))
    if token_mask is not None:
        if token_mask.shape != x.shape[:-1]:
            raise ValueError(f"token_mask {token_mask.shape} must have the leading shape of the inputs {x.shape}.")
        # where, not a product: a padded position's activations may be anything.
        sq = jnp.where(token_mask[..., None] != 0, sq, 0.0)
    return sq.reshape(-1, x.shape[-1]).sum(0, keepdims=True)


@jax.custom_vjp
def record_inputs(x: jax.Array, act: jax.Array, token_mask: jax.Array | None) -> jax.Array:
    """`x`; the backward pass returns `act` + this batch's `input_square_sum` as act's cotangent."""
    del act, token_mask
    return x


def _record_fwd(x, act, token_mask):
    return x, act + input_square_sum(x, token_mask)


def _record_bwd(new_act, g):
    return g, new_act, None


record_inputs.defvjp(_record_fwd, _record_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ProbedWeight:
    """A weight leaf plus its float32 accumulator; the decoder calls `linear(x)` on it.

    Attributes:
      weight: the (out, in) weight, any float dtype.
      acc: float32 (out, in) accumulator, updated by the backward pass; in "both" mode a pair
        (abs accumulator, signed accumulator).
      mode: "signed" (sum of gradients), "abs" (sum of per-example absolute gradients),
        "both" (the two at once, from one backward pass) or "none" (no gradient statistic:
        `acc` is None and the linear map is plain).
      chunk: examples per per-example block in "abs" mode.
      sharding: the accumulator's sharding; in "abs" mode it lets the backward pass run the
        fused per-example |grad| kernel per device (`abs_kernel`), None keeps the XLA path.
      act: float32 (1, in) wanda accumulator (sums of squared inputs), or None.
      token_mask: the tokens `act` counts (the inputs' leading shape), or None for all.
    """

    weight: jax.Array
    acc: jax.Array | tuple[jax.Array, jax.Array] | None
    mode: str = dataclasses.field(metadata=dict(static=True), default="signed")
    chunk: int = dataclasses.field(metadata=dict(static=True), default=8)
    sharding: NamedSharding | None = dataclasses.field(metadata=dict(static=True), default=None)
    act: jax.Array | None = None
    token_mask: jax.Array | None = None

    def linear(self, x: jax.Array) -> jax.Array:
        """`x @ weight.T` with the accumulating backward rules."""
        if self.act is not None:
            x = record_inputs(x, self.act, self.token_mask)
        if self.acc is None:
            return jnp.einsum("...i,oi->...o", x, self.weight)
        return probed_linear(x, self.weight, self.acc, self.mode, self.chunk, self.sharding)

    def grouped_dot(self, x: jax.Array, probes, group_sizes: jax.Array, rows: jax.Array, batch: int) -> jax.Array:
        """The MoE block's grouped matmul over `probes` (this probe's experts: a list of
        per-expert probes or this 3-D probe) with per-expert accumulation (`expert_probes`)."""
        from harmjax.attribution import expert_probes

        return expert_probes.grouped_dot(x, probes, group_sizes, rows, batch)
