"""The scan step as a chain of small programs, one decoder block each: compiles one block, not all of them.

`step.WholeStep` compiles a whole forward/backward pass into one XLA program. XLA unrolls the
decoder's blocks, so that program, and its compilation time, grows with depth (measurements:
docs/design.md "Attribution: per-block programs"). `LayerwiseStep`, the other `core.AccumulateStep`, runs the
same step as

  prologue:  embeddings, RoPE tables, masks                      (one program)
  forward:   block i: x_i -> x_{i+1}, plus block i's residuals    (one program, every block)
  head:      final norm, logits, loss and its gradient d x_L      (one program)
  backward:  block i: (residuals, d x_{i+1}) -> (accumulators, d x_i)  (one program, every block)

All blocks of a model have the same shapes, so each program compiles once per batch shape and
serves every layer, with no stacked copy of the weights and the params tree untouched (a
`lax.scan` over layers would need the weights stacked: a second copy of them on every
device, which the largest scans have no room for). The per-block residuals are what `jax.vjp`
keeps for that block, i.e. what the whole program keeps; the weights, the accumulators, the
block's input and the RoPE tables and masks are left out of them and passed to the backward
program again, so nothing is copied. With `remat` the forward keeps only each block's input and
the backward recomputes the block (the same trade as `jax.checkpoint` per block).

The arithmetic is that of the whole program (the same probes and backward rules, the same
float32 additions into each accumulator); results differ only where XLA fuses and rounds the
two program partitions differently (float32 rounding on CPU, bf16 program rounding on GPUs).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from harmjax.attribution.core import (
    AccumulateStep, accumulator_mode, accumulator_parts, from_parts, grad_mode, probe_params, scope_shardings,
)
from harmjax.config import ModelConfig
from harmjax.model.decoder import (
    block_tables, decoder_layer, default_positions, embed, final_norm, layer_rope, logits_from_hidden,
)
from harmjax.model.loss import mean_nll_per_example
from harmjax.sharding import batch_sharding, replicated
from harmjax.tree import flatten, unflatten

_LAYER_PREFIX = "model.layers."


def _split_by_layer(flat: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """{"model.layers.3.mlp.up_proj.weight": v} -> {3: {"mlp.up_proj.weight": v}}."""
    out: dict[int, dict[str, Any]] = {}
    for name, value in flat.items():
        index, rest = name[len(_LAYER_PREFIX):].split(".", 1)
        out.setdefault(int(index), {})[rest] = value
    return out


class LayerwiseStep(AccumulateStep):
    """f(params, accs, input_ids, attention_mask, loss_mask) -> (accs, loss_sum), like
    `step.WholeStep` (same arguments, same results, `accs` donated), run as per-block programs
    (see the module docstring). `needed_bytes` is the memory preflight's estimate."""

    def __init__(self, config: ModelConfig, mesh: Mesh, names: tuple[str, ...], kind, remat: bool, chunk: int,
                 kernel: str, compiler_options: dict[str, Any] | None = None):
        self.config, self.mesh, self.names, self.kind, self.remat = config, mesh, names, kind, remat
        self.mode = accumulator_mode(kind)
        self.chunk = chunk
        flat_sh = flatten(scope_shardings(config, mesh, names))
        # Same choice as the whole-program step: the accumulator sharding lets "abs" mode use
        # the fused kernel; None keeps XLA's path.
        self._kernel_sh = _split_by_layer(flat_sh) if grad_mode(self.mode) == "abs" and kernel != "off" else {}
        self._acc_sh = _split_by_layer(flat_sh)
        self._lowest_scored = min(self._acc_sh)  # the backward pass stops below it
        self._first = self._first_of_kind()
        self._recipes: dict[Any, tuple[Any, tuple[int, ...]]] = {}
        self._bwd: dict[Any, Any] = {}
        # Between programs the residual stream (and its gradient) is split over the batch like
        # the examples and whole on each tensor-parallel device (Megatron's layout); inside a
        # program XLA partitions freely. The other inputs arrive committed to their shardings.
        self._act = batch_sharding(mesh, 3)
        self._options = compiler_options or None  # XLA options of every program (core.compiler_options)
        self._prologue = jax.jit(self._prologue_fn, compiler_options=self._options)
        self._head = jax.jit(self._head_fn, out_shardings=(replicated(mesh), self._act), donate_argnums=(1,),
                             compiler_options=self._options)
        self._fwd = jax.jit(self._fwd_fn, static_argnums=(0,), compiler_options=self._options)

    # -- the programs ------------------------------------------------------------------------

    def _prologue_fn(self, params, input_ids, attention_mask):
        c = self.config
        x = embed(params, c, input_ids)
        ropes, masks = block_tables(c, default_positions(attention_mask), attention_mask, input_ids.shape[1], x.dtype)
        return self._pin(x), ropes, masks

    def _pin(self, x):
        return jax.lax.with_sharding_constraint(x, self._act)

    def _head_fn(self, params, x, input_ids, loss_mask):
        def loss(x):
            logits = logits_from_hidden(params, self.config, final_norm(params, self.config, x))
            return mean_nll_per_example(logits, input_ids, loss_mask).sum()
        return jax.value_and_grad(loss)(x)

    def _block_fn(self, index: int, block, accs, token_mask):
        """x -> block output, with the block's scored weights probed by `accs` (wanda's input
        sums counting the tokens of `token_mask`, the attention mask)."""
        mode, chunk = self.mode, self.chunk
        if accs is not None:
            accs = from_parts(mode, {s: unflatten(t) for s, t in accumulator_parts(mode, accs).items()})
        probed = block if accs is None else probe_params(block, accs, mode, chunk, self._kernel_sh.get(index),
                                                         token_mask=token_mask)
        return lambda x, rope, mask: decoder_layer(probed, self.config, x, rope, mask)

    def _fwd_fn(self, index, block, accs, x, rope, mask, token_mask):
        if self.remat or index < self._lowest_scored:  # nothing kept (below: no backward at all)
            return self._pin(self._block_fn(index, block, accs, token_mask)(x, rope, mask)), ()
        # jax.vjp over (accs, x) with everything else closed over. Its residuals include the
        # program's own inputs (weights, accumulators, x, tables); returned from a jitted
        # function those would be copies (jit does not forward inputs), so they are dropped
        # here and handed to the backward program again by position.
        y, vjp = jax.vjp(lambda a, x: self._block_fn(index, block, a, token_mask)(x, rope, mask), accs, x)
        leaves, treedef = jax.tree.flatten(vjp)
        inputs = {id(t): i for i, t in enumerate(jax.tree.leaves((block, accs, x, rope, mask, token_mask)))}
        where = tuple(inputs.get(id(leaf), -1) for leaf in leaves)
        self._recipes[self._key(index, block, accs, x)] = (treedef, where)
        return self._pin(y), tuple(leaf for leaf, w in zip(leaves, where) if w < 0)

    def _bwd_fn(self, index, recipe, block, accs, x, rope, mask, token_mask, saved, dy):
        if recipe is None:  # remat: recompute the block
            _, vjp = jax.vjp(lambda a, x: self._block_fn(index, block, a, token_mask)(x, rope, mask), accs, x)
        else:
            treedef, where = recipe
            inputs, saved = jax.tree.leaves((block, accs, x, rope, mask, token_mask)), iter(saved)
            vjp = jax.tree.unflatten(treedef, [inputs[w] if w >= 0 else next(saved) for w in where])
        new_accs, dx = vjp(dy)
        return new_accs, self._pin(dx)

    def _key(self, index, block, accs, x):
        # Blocks with the same parameter and accumulator structure and the same batch shape
        # share programs; a scope that scores some layers only gives at most a few kinds.
        return (self._kind_of(index), jax.tree.structure((block, accs)), x.shape, x.dtype)

    def _kind_of(self, index: int) -> tuple:
        # A NoPE block (no RoPE tables) is a program of its own.
        c = self.config
        return (c.layer_types[index], index in c.nope_layers, index in self._acc_sh, index < self._lowest_scored)

    def _backward_program(self, index, block, accs, x):
        key = self._key(index, block, accs, x)
        if key not in self._bwd:
            recipe = None if self.remat else self._recipes[key]
            # Static: the block's kind (same program for every block of that kind) and the
            # residual recipe. Donated: the accumulators (updated in place) and d x_{i+1}.
            fn = lambda *a, i=index, r=recipe: self._bwd_fn(i, r, *a)  # noqa: E731
            self._bwd[key] = jax.jit(fn, donate_argnums=(1, 7), compiler_options=self._options)
        return self._bwd[key]

    def _layer_accs(self, accs) -> dict[int, Any]:
        # Each block's accumulators in the mode's layout, over flat {relative name: leaf} dicts.
        parts = {s: _split_by_layer(flatten(t)) for s, t in accumulator_parts(self.mode, accs).items()}
        layers = next(iter(parts.values()), {})
        return {i: from_parts(self.mode, {s: p[i] for s, p in parts.items()}) for i in layers}

    def _first_of_kind(self) -> dict[int, int]:
        """For each block, the first block with the same program (the one whose index the
        programs are traced with: the index only picks the kind and its shardings)."""
        first: dict[tuple, int] = {}
        return {i: first.setdefault(self._kind_of(i), i) for i in range(self.config.num_layers)}

    # -- the step ----------------------------------------------------------------------------

    def __call__(self, params, accs, input_ids, attention_mask, loss_mask):
        """One accumulation step; see the class docstring."""
        c = self.config
        blocks = params["model"]["layers"]
        layer_accs = self._layer_accs(accs)
        del accs
        first = self._first
        x, ropes, masks = self._prologue(params, input_ids, attention_mask)
        xs, saved = {}, {}
        for i, kind in enumerate(c.layer_types):
            y, res = self._fwd(first[i], blocks[str(i)], layer_accs.get(i), x, layer_rope(c, ropes, i), masks[kind],
                               attention_mask)
            if i >= self._lowest_scored:  # kept for the backward pass
                xs[i], saved[i] = x, res
            x = y
        loss, dy = self._head(params, x, input_ids, loss_mask)
        del x
        new = {}
        for i in range(c.num_layers - 1, self._lowest_scored - 1, -1):
            kind, a = c.layer_types[i], layer_accs.pop(i, None)
            bwd = self._backward_program(first[i], blocks[str(i)], a, xs[i])
            new_a, dy = bwd(blocks[str(i)], a, xs[i], layer_rope(c, ropes, i), masks[kind], attention_mask, saved[i], dy)
            del xs[i], saved[i]  # freed once the program has run
            if new_a is not None:
                new[i] = new_a
        return self._merge(new), loss

    def _merge(self, per_layer: dict[int, Any]):
        parts: dict[str, dict[str, Any]] = {}
        for i in sorted(per_layer):
            for s, t in accumulator_parts(self.mode, per_layer[i]).items():
                parts.setdefault(s, {}).update({f"{_LAYER_PREFIX}{i}.{n}": v for n, v in t.items()})
        return from_parts(self.mode, {s: unflatten(f) for s, f in parts.items()})

    # -- memory ------------------------------------------------------------------------------

    def needed_bytes(self, params, accs, input_ids, attention_mask, loss_mask) -> int:
        """Per-device bytes of a step on these (abstract or concrete) arguments: the sum of
        `memory_breakdown`'s parts."""
        return sum(self.memory_breakdown(params, accs, input_ids, attention_mask, loss_mask).values())

    def memory_breakdown(self, params, accs, input_ids, attention_mask, loss_mask) -> dict[str, int]:
        """Per-device bytes of a step, from XLA's estimates of each program: "resident" (the
        params and accumulators), "kept" (every block's input and residuals, all alive when
        the head runs) and "work" (the largest program's working memory and outputs).
        Compiles the programs (the step's own calls reuse them)."""
        c = self.config
        blocks = params["model"]["layers"]
        layer_accs = self._layer_accs(accs)
        first = self._first
        resident = _args_bytes((params, accs))
        lowered = self._prologue.lower(params, input_ids, attention_mask)
        work = _work(lowered.compile())
        x, ropes, masks = lowered.out_info
        kept, seen = 0, {}
        for i, kind in enumerate(c.layer_types):
            args = (blocks[str(i)], layer_accs.get(i), x, layer_rope(c, ropes, i), masks[kind], attention_mask)
            key = (self._key(first[i], *args[:3]), i >= self._lowest_scored)
            if key not in seen:  # one compilation per distinct program, as in the step
                lowered = self._fwd.lower(first[i], *args)
                y, res = lowered.out_info
                w = _work(lowered.compile())
                if i >= self._lowest_scored:
                    bwd = self._backward_program(first[i], *args[:3])
                    w = max(w, _work(bwd.lower(*args, res, y).compile()))
                seen[key] = (y, res, w)
            y, res, w = seen[key]
            if i >= self._lowest_scored:  # block i's input and residuals wait for its backward
                kept += _args_bytes((x, res))
            work = max(work, w)
            x = y
        lowered = self._head.lower(params, x, input_ids, loss_mask)
        work = max(work, _work(lowered.compile()) + _args_bytes(x))
        return {"resident": resident, "kept": kept, "work": work}


def _work(compiled) -> int:
    """A program's own working memory and outputs (its arguments are counted elsewhere)."""
    m = compiled.memory_analysis()
    return 0 if m is None else int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def _args_bytes(tree) -> int:
    """Per-device bytes of the arrays (or ShapeDtypeStructs with shardings) in `tree`."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(tuple(leaf.shape)) if sharding is not None else leaf.shape
        n = jnp.dtype(leaf.dtype).itemsize
        for d in shape:
            n *= d
        total += n
    return total
