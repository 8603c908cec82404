"""The sampler: one jitted prefill per prompt-length bucket and one jitted decode loop
(`lax.while_loop`) over a donated KV cache.

Shapes are static and few: prompts are left-padded to power-of-two buckets, the number of
generated tokens is padded to a power-of-two buffer, and the actual count is passed as an
array, so changing `max_new_tokens` within a bucket, the temperature or top-p does not
recompile. Positions count real tokens only (as transformers' `generate` derives them from
the attention mask), so a left-padded row generates what it would alone.

Each decode step reads the weights and the cache once: the new token's keys and values are
written into the cache in place (`dynamic_update_slice` on the loop carry), RoPE is computed
for the one new position only, and weights stay in their dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from harmjax.config import ModelConfig
from harmjax.distributed import to_host
from harmjax.generate import kv_cache as kvc
from harmjax.generate import prompts as prompt_fmt
from harmjax.generate.sampling import row_keys, sample_tokens
from harmjax.inference import bucket_length, pad_batch
from harmjax.model import fused, moe_stack
from harmjax.model.decoder import default_positions, hidden_states, logits_from_hidden
from harmjax.sharding import batch_sharding, param_shardings, replicated, round_batch

# An id no tokenizer produces: used as the EOS set when generation must not stop early.
_NO_EOS = -1


@dataclasses.dataclass(frozen=True)
class GeneratedIds:
    """Token-level output of `generate_ids`, in input order.

    Attributes:
      tokens: per input, the new token ids (int32), ending with the EOS token when one was
        produced; nothing after it.
      finished: per input, True when generation stopped at an EOS token.
      stats: timings and counts (prefill_s, decode_s, wall_s, new_tokens, tokens_per_s, ...).
    """

    tokens: list[np.ndarray]
    finished: list[bool]
    stats: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Output of `generate`, in prompt order.

    Attributes:
      texts: the continuations, decoded without special tokens, the prefix excluded; the
        judged response of the prefilling attack is `prefixes[i] + texts[i]`.
      prefixes: the assistant-turn prefix each prompt was given ("" for none).
      token_ids: the new token ids (EOS included when produced).
      prompt_token_ids: the model input of each prompt, chat template and prefix included.
      finished: True where generation stopped at EOS rather than at `max_new_tokens`.
      stats: timings and counts, see `GeneratedIds.stats`.
    """

    texts: list[str]
    prefixes: list[str]
    token_ids: list[list[int]]
    prompt_token_ids: list[list[int]]
    finished: list[bool]
    stats: dict[str, Any]


def _key_valid(prompt_mask: jax.Array, cache_len: int) -> jax.Array:
    """Validity of every cache slot: the prompt's mask, then the generated slots (causality
    hides the ones not written yet)."""
    b, t = prompt_mask.shape
    return jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.ones((b, cache_len - t), jnp.int32)], axis=1)


def _param_shardings(config: ModelConfig, mesh: Mesh, fused_bias: tuple[bool, bool] | None, stacked: bool):
    if stacked:
        return moe_stack.stacked_shardings(config, mesh)
    if fused_bias is None:
        return param_shardings(config, mesh)
    return fused.fused_shardings(config, mesh, fused_bias)


@functools.lru_cache(maxsize=64)
def jit_prefill(
    config: ModelConfig, mesh: Mesh, batch: int, prompt_len: int, cache_len: int, greedy: bool, use_top_p: bool,
    fused_bias: tuple[bool, bool] | None = None, stacked: bool = False,
):
    """Jitted prefill of one (batch, prompt bucket, cache length) shape.

    Returns f(params, ids, mask, key_data, temperature, top_p, eos_ids, row_valid, edit) ->
    (cache, first_token, done): the cache holds the prompt's keys and values in slots
    [0, prompt_len), `first_token` is sampled from the last position's logits with step 0,
    and `done` is set for padding rows and rows whose first token is EOS. `fused_bias` is
    None for the params tree as loaded, else the (qkv, gate_up) bias flags of a tree from
    `harmjax.model.fused.fuse_projections`; `stacked` is True for a tree from
    `harmjax.model.moe_stack.stack_for_generation`.
    """
    b1, b2 = batch_sharding(mesh, 1), batch_sharding(mesh, 2)
    rep = replicated(mesh)

    def prefill(params, ids, mask, key_data, temperature, top_p, eos_ids, row_valid, edit):
        cache = kvc.init_cache(config, batch, cache_len, kvc.activation_dtype(params))
        key_valid = _key_valid(mask, cache_len)
        h, cache = hidden_states(
            params, config, ids, key_valid, default_positions(mask), kv_cache=cache, cache_index=0,
            residual_edit=edit,
        )
        # Logits of the last position only: (batch, vocab) rather than (batch, seq, vocab).
        logits = logits_from_hidden(params, config, h[:, -1])
        tok = sample_tokens(logits, key_data, 0, temperature, top_p, greedy=greedy, use_top_p=use_top_p)
        done = ~row_valid | jnp.isin(tok, eos_ids)
        return cache, tok, done

    return jax.jit(
        prefill,
        in_shardings=(_param_shardings(config, mesh, fused_bias, stacked), b2, b2, b2, rep, rep, rep, b1, rep),
        out_shardings=(kvc.cache_shardings(config, mesh, batch, cache_len), b1, b1),
    )


UNROLL_ENV = "HARMJAX_DECODE_UNROLL"


def decode_unroll() -> int:
    """Decode steps per iteration of the decode loop: $HARMJAX_DECODE_UNROLL, default 1."""
    value = os.environ.get(UNROLL_ENV, "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{UNROLL_ENV} must be a positive integer, got {value!r}.")
    return int(value)


@functools.lru_cache(maxsize=64)
def jit_decode(
    config: ModelConfig, mesh: Mesh, batch: int, prompt_len: int, gen_len: int, greedy: bool, use_top_p: bool,
    fused_bias: tuple[bool, bool] | None = None, unroll: int = 1, stacked: bool = False,
):
    """Jitted decode loop of one (batch, prompt bucket, generation buffer) shape; the cache
    argument is donated.

    Returns f(params, cache, first_token, done, mask, key_data, n_new, temperature, top_p,
    eos_ids, pad_id, edit) -> (tokens (batch, gen_len), done, steps, cache). Token i of a row is
    drawn with step i; rows that are done emit `pad_id`; the loop stops after `n_new` tokens
    or when every row is done. `fused_bias` and `stacked` as in `jit_prefill`. `unroll` > 1
    runs that many steps per loop iteration (fewer iterations, each a host round trip on
    GPUs); a step past the end changes nothing, so the tokens are the same.
    """
    cache_len = prompt_len + gen_len
    b1, b2 = batch_sharding(mesh, 1), batch_sharding(mesh, 2)
    rep = replicated(mesh)
    cache_sh = kvc.cache_shardings(config, mesh, batch, cache_len)

    def decode(params, cache, first, done, mask, key_data, n_new, temperature, top_p, eos_ids, pad_id, edit):
        key_valid = _key_valid(mask, cache_len)
        lengths = jnp.sum(mask.astype(jnp.int32), axis=-1)
        tokens = jnp.full((batch, gen_len), pad_id, jnp.int32).at[:, 0].set(first)

        def cond(state):
            i, _, _, _, row_done = state
            return (i < n_new) & ~jnp.all(row_done)

        def step(state):
            i, cache, tokens, last, row_done = state
            # Token i-1 (`last`) goes into slot prompt_len + i - 1 at position length + i - 1.
            h, cache = hidden_states(
                params, config, last[:, None], key_valid, (lengths + i - 1)[:, None],
                kv_cache=cache, cache_index=prompt_len + i - 1, residual_edit=edit,
            )
            logits = logits_from_hidden(params, config, h[:, 0])
            tok = sample_tokens(logits, key_data, i, temperature, top_p, greedy=greedy, use_top_p=use_top_p)
            tok = jnp.where(row_done, pad_id, tok)
            if unroll == 1:  # the loop's condition holds: this step is live
                tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (jnp.int32(0), i))
                return i + 1, cache, tokens, tok, row_done | jnp.isin(tok, eos_ids)
            # An unrolled step past the end keeps every output as it was. Its cache write
            # goes to slot prompt_len + i - 1 >= prompt_len + n_new - 1, read by no live step
            # (or, when every row is done, rewrites that slot with the same key and value).
            live = cond(state)
            old = jax.lax.dynamic_slice(tokens, (jnp.int32(0), i), (batch, 1))
            tokens = jax.lax.dynamic_update_slice(tokens, jnp.where(live, tok[:, None], old), (jnp.int32(0), i))
            row_done = jnp.where(live, row_done | jnp.isin(tok, eos_ids), row_done)
            return i + live.astype(jnp.int32), cache, tokens, jnp.where(live, tok, last), row_done

        def body(state):
            for _ in range(unroll):
                state = step(state)
            return state

        state = (jnp.int32(1), cache, tokens, first, done)
        steps, cache, tokens, _, done = jax.lax.while_loop(cond, body, state)
        return tokens, done, steps, cache

    return jax.jit(
        decode,
        in_shardings=(_param_shardings(config, mesh, fused_bias, stacked), cache_sh, b1, b1, b2, b2, *(rep,) * 6),
        out_shardings=(b2, b1, rep, cache_sh),
        donate_argnums=(1,),
    )


def _batches(lengths: Sequence[int], batch: int) -> list[list[int]]:
    """Input indices grouped into batches of similar length (longest first), so each batch
    pads to a tight bucket."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s : s + batch] for s in range(0, len(order), batch)]


def generate_ids(
    params: dict,
    config: ModelConfig,
    mesh: Mesh,
    inputs: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    pad_id: int = 0,
    eos_ids: Sequence[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    sample_ids: Sequence[int] | None = None,
    batch_size: int = 8,
    min_bucket: int = 16,
    progress: bool = True,
    fuse_projections: bool | str = "auto",
    residual_edit: Any = None,
) -> GeneratedIds:
    """Generates continuations of token-id inputs (no tokenizer needed).

    Args:
      params: the params pytree, sharded as `param_shardings(config, mesh)`.
      config, mesh: the model's config and the mesh the params live on.
      inputs: token ids per sequence (prompt plus any prefix).
      max_new_tokens: tokens to generate per sequence (fewer where EOS comes first).
      pad_id: the id emitted after EOS and used for left padding.
      eos_ids: ids that end a sequence; empty to always generate `max_new_tokens`.
      temperature: 0 for greedy decoding, else the softmax temperature.
      top_p: nucleus mass (1.0 disables it); only used when sampling.
      seed, sample_ids: sequence r draws with key fold_in(key(seed), sample_ids[r])
        (default: r), so results do not depend on batching.
      batch_size: sequences per batch (rounded up to a multiple of the mesh's batch extent).
      min_bucket: the shortest prompt bucket.
      progress: show a tqdm bar over batches.
      fuse_projections: run on a copy of the weights with q/k/v and gate/up concatenated
        (`harmjax.model.fused`; for Mixtral / Qwen3-MoE, the experts' matrices stacked,
        `harmjax.model.moe_stack`): True, False, or "auto" (when the devices have the memory).
        Same results; fewer, larger matmuls per decode step. `params` may also be an
        already fused or stacked tree (callers that generate in many chunks derive it once).
      residual_edit: a `harmjax.model.residual.ResidualEdit` applied at every position, prompt
        and generated tokens alike (directional ablation, activation addition).
    """
    n = len(inputs)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"Need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}.")
    empty = [i for i, seq in enumerate(inputs) if len(seq) == 0]
    if empty:
        raise ValueError(f"Inputs {empty[:10]} are empty; every sequence needs at least one token.")
    if sample_ids is None:
        sample_ids = range(n)
    if len(sample_ids) != n:
        raise ValueError(f"{len(sample_ids)} sample_ids for {n} inputs.")
    unroll = decode_unroll()
    stats = {"prefill_s": 0.0, "decode_s": 0.0, "batches": 0, "decode_steps": 0, "new_tokens": 0,
             "decode_unroll": unroll}
    if n == 0:
        return GeneratedIds([], [], {**stats, "wall_s": 0.0, "tokens_per_s": 0.0})

    batch = round_batch(min(batch_size, n), mesh)
    gen_len = bucket_length(max_new_tokens, minimum=1)
    greedy = temperature == 0.0
    use_top_p = (not greedy) and top_p < 1.0
    keys_all = row_keys(seed, list(sample_ids))
    eos = jnp.asarray(list(eos_ids) or [_NO_EOS], jnp.int32)
    scalars = (
        jnp.asarray(max_new_tokens, jnp.int32),
        jnp.asarray(max(temperature, 1e-6), jnp.float32),
        jnp.asarray(top_p, jnp.float32),
    )
    pad = jnp.asarray(pad_id, jnp.int32)
    for length in {len(s) for s in inputs}:
        if length + max_new_tokens > config.max_position_embeddings:
            tqdm.write(
                f"warning: {length} prompt tokens + {max_new_tokens} new exceed the model's "
                f"max_position_embeddings={config.max_position_embeddings}."
            )
            break

    params = fused.fuse_if_worthwhile(params, config, mesh, fuse_projections)
    fused_bias = fused.bias_flags(params) if fused.is_fused(params) else None
    stacked = moe_stack.is_stacked(params, config)

    tokens_out: list[np.ndarray | None] = [None] * n
    finished: list[bool] = [False] * n
    start = time.perf_counter()
    groups = _batches([len(s) for s in inputs], batch)
    for rows in tqdm(groups, desc="generate", unit="batch", disable=not progress or len(groups) < 2):
        prompt_len = bucket_length(max(len(inputs[r]) for r in rows), minimum=min_bucket)
        ids, mask = pad_batch([inputs[r] for r in rows], pad_id, prompt_len, batch)
        key_data = np.zeros((batch, 2), np.uint32)
        key_data[: len(rows)] = keys_all[rows]
        row_valid = np.arange(batch) < len(rows)
        prefill = jit_prefill(config, mesh, batch, prompt_len, prompt_len + gen_len, greedy, use_top_p, fused_bias,
                              stacked)
        decode = jit_decode(config, mesh, batch, prompt_len, gen_len, greedy, use_top_p, fused_bias, unroll, stacked)

        # Host arrays become device arrays outside the context mesh below: made inside it
        # they would be committed to a replicated sharding that jit refuses to reshard.
        ids_d, mask_d, key_d, valid_d = (jnp.asarray(x) for x in (ids, mask, key_data, row_valid))
        t0 = time.perf_counter()
        # The context mesh lets mesh-aware layers (the decode-attention kernel's shard_map)
        # see how the batch and heads are split while tracing.
        with jax.set_mesh(mesh):
            cache, first, done = prefill(
                params, ids_d, mask_d, key_d, scalars[1], scalars[2], eos, valid_d, residual_edit
            )
            first.block_until_ready()
            t1 = time.perf_counter()
            toks, done, steps, _ = decode(
                params, cache, first, done, mask_d, key_d, scalars[0], scalars[1], scalars[2], eos, pad,
                residual_edit,
            )
            toks = to_host(toks)  # the batch spans every process's devices
        t2 = time.perf_counter()
        stats["prefill_s"] += t1 - t0
        stats["decode_s"] += t2 - t1
        stats["batches"] += 1
        stats["decode_steps"] += int(steps) - 1

        eos_set = set(int(e) for e in eos_ids)
        for j, r in enumerate(rows):
            row = toks[j, :max_new_tokens]
            hits = np.flatnonzero(np.isin(row, list(eos_set))) if eos_set else []
            if len(hits):
                tokens_out[r], finished[r] = row[: hits[0] + 1].copy(), True
            else:
                tokens_out[r] = row[: int(steps)].copy()
            stats["new_tokens"] += len(tokens_out[r])
    wall = time.perf_counter() - start
    stats.update(wall_s=wall, tokens_per_s=stats["new_tokens"] / wall if wall else 0.0, batch=batch,
                 gen_buffer=gen_len, fused_projections=fused_bias is not None, stacked_experts=stacked)
    return GeneratedIds(tokens_out, finished, stats)


def default_eos_ids(model) -> list[int]:
    """The ids that end generation, as transformers' `generate` would use them: the
    checkpoint's generation_config.json, else config.json, else the tokenizer's EOS."""
    candidates: list[Any] = []
    gen_path = os.path.join(model.source_dir or "", "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            candidates.append(json.load(f).get("eos_token_id"))
    candidates.append((model.hf_config or {}).get("eos_token_id"))
    if model.tokenizer is not None:
        candidates.append(model.tokenizer.eos_token_id)
    for value in candidates:
        if value is None:
            continue
        ids = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        if ids:
            return ids
    return []


def _pad_id(model, eos: Sequence[int]) -> int:
    tok = model.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    pad = (model.hf_config or {}).get("pad_token_id")
    if pad is not None:
        return int(pad)
    return int(eos[0]) if eos else 0


def generate(
    model,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    prefixes: Sequence[str | None] | None = None,
    chat: bool = True,
    system: str | None = None,
    mask: Any = None,
    batch_size: int = 8,
    eos_token_ids: Sequence[int] | None = None,
    stop_at_eos: bool = True,
    sample_ids: Sequence[int] | None = None,
    params: dict | None = None,
    progress: bool = True,
    fuse_projections: bool | str = "auto",
    residual_edit: Any = None,
) -> GenerationResult:
    """Generates a response to each prompt, optionally under the prefilling attack.

    Args:
      model: a `harmjax.Model` (params, config, tokenizer, mesh).
      prompts: user messages (chat=True) or raw texts (chat=False).
      max_new_tokens: new tokens per prompt, counted after the prefix.
      temperature: 0 for greedy (token-for-token transformers' greedy `generate`), else
        sampling at this temperature.
      top_p: nucleus sampling mass (1.0 = off).
      seed: sampling seed; prompt i uses fold_in(key(seed), sample_ids[i]).
      prefixes: per prompt, text the assistant turn starts with (None or "" for none). The
        prefix is part of the input; `texts` holds only what the model added after it.
      chat: apply the tokenizer's chat template.
      system: optional system message (chat only).
      mask: optional boolean mask pytree (see `harmjax.masks.apply_mask`): its True weights
        are zeroed for this generation only.
      batch_size: prompts per batch.
      eos_token_ids: ids that end a response; default `default_eos_ids(model)`.
      stop_at_eos: False generates exactly `max_new_tokens` tokens per prompt.
      sample_ids: per-prompt integers for the sampling keys (default: the prompt's index).
      params: use these params instead of `model.params` (e.g. an edited copy).
      progress: show a tqdm bar over batches.
      fuse_projections: see `generate_ids`.
      residual_edit: see `generate_ids`.
    """
    if model.tokenizer is None:
        raise prompt_fmt.PromptFormatError(
            f"The model from {model.source_dir} has no tokenizer; use generate_ids with token ids."
        )
    tok = model.tokenizer
    params = model.params if params is None else params
    if mask is not None:
        from harmjax.masks import apply_mask  # imported lazily: the masks package is optional here

        params = apply_mask(params, mask)
    eos = list(default_eos_ids(model) if eos_token_ids is None else eos_token_ids)
    inputs, prefix_ids = prompt_fmt.build_inputs(tok, list(prompts), prefixes, chat=chat, system=system)
    out = generate_ids(
        params, model.config, model.mesh, inputs,
        max_new_tokens=max_new_tokens, pad_id=_pad_id(model, eos), eos_ids=eos if stop_at_eos else (),
        temperature=temperature, top_p=top_p, seed=seed, sample_ids=sample_ids,
        batch_size=batch_size, progress=progress, fuse_projections=fuse_projections,
        residual_edit=residual_edit,
    )
    texts = []
    for pre, new, done in zip(prefix_ids, out.tokens, out.finished):
        body = new[:-1] if done else new  # the EOS token is not part of the text
        texts.append(prompt_fmt.continuation_text(tok, pre, body))
    return GenerationResult(
        texts=texts,
        prefixes=[(p or "") for p in (prefixes or [None] * len(inputs))],
        token_ids=[t.tolist() for t in out.tokens],
        prompt_token_ids=inputs,
        finished=out.finished,
        stats=out.stats,
    )
