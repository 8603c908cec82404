"""A 0-100 judge read from a local model's next-token probabilities: the expected score.

The judge model is asked for a number and never generates; the score is read off its
distribution at the start of the assistant turn. For every candidate n in 0..100:

    P(n) = prod_i P(t_i | prompt, t_1..t_{i-1}) * P(stop | prompt, t_1..t_k)

where t_1..t_k is the canonical tokenization of str(n) (as the judge's tokenizer writes it
right after the generation prompt) and P(stop) = 1 - the mass of the tokens whose text starts
with a digit (the number ends there: "4" followed by "2" is 42, not 4). With this factor the
events "the answer is the number n" are disjoint, so the masses add up to at most 1. The score
is sum_n n P(n) / sum_n P(n); `mass` = sum_n P(n) before normalising. When the mass is below
`min_mass` (0.25, as Betley et al. 2025) the judge mostly answered something else (a refusal,
words) and the score is None.

Tokenizers differ: Llama-3 has one token per number up to 999, SmolLM2 / Qwen / Gemma split
numbers into digits, SentencePiece models may prefix a space marker. Nothing here assumes one
kind: the candidate sequences form a trie (digit-splitting: 101 nodes below the root for
0..100, at most 3 tokens deep), and the probabilities come from one forward pass per judged
prompt over `prompt + every trie node`, in which each node's token attends to the prompt and
to its own ancestors only ("tree attention": a custom mask, with each node at the position its
depth gives). That is one forward of (prompt + ~101) tokens per answer, batched and jitted,
rather than 101 forwards.

Pure math and model are separate: `node_terms` and `combine_node_terms` turn next-token
log-prob tables (one per trie node) into log P(n); `number_log_probs_from_tables` applies them
to given tables (fixed logits in tests), and the jitted judge (`trie_log_probs`) applies the
same two functions to the tables its forward pass produces.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from harmjax.config import ModelConfig
from harmjax.errors import HarmjaxError
from harmjax.inference import bucket_length, pad_batch, sharded_jit
from harmjax.model import layers
from harmjax.model.decoder import default_positions, hidden_states, logits_from_hidden
from harmjax.sharding import round_batch

DEFAULT_VALUES = tuple(range(101))
DEFAULT_MIN_MASS = 0.25  # Betley et al. 2025: below this the judge "refused" and the score is None
_DIGITS = frozenset("0123456789")
_BYTE_DIGIT = re.compile(r"^<0x3[0-9]>$")  # SentencePiece byte-fallback tokens for '0'..'9'


class NumberJudgeError(HarmjaxError, ValueError):
    """The judge's tokenizer cannot express the candidate numbers as a trie of token sequences."""


# ---------------------------------------------------------------------------------- the trie


@dataclasses.dataclass(frozen=True)
class NumberTrie:
    """Candidate numbers as a trie of token sequences.

    Node 0 is the root (the end of the judge prompt); node m >= 1 is the sequence of tokens on
    the path to it. Attributes (numpy, static):
      values: (K,) the candidate numbers, in order.
      sequences: the K token sequences.
      tokens: (M,) int32, node m's own token (root: 0, unused).
      parents: (M,) int32, node m's parent (root: 0).
      depths: (M,) int32, tokens from the root to node m (root: 0).
      ends: (K,) int32, the node where candidate k's sequence ends.
      members: (K, M) float32, 1 where node m (>= 1) lies on candidate k's path.
      ancestors: (M, M) bool, [m, a] True when node a is m or an ancestor of m (root included).
    """

    values: np.ndarray
    sequences: tuple[tuple[int, ...], ...]
    tokens: np.ndarray
    parents: np.ndarray
    depths: np.ndarray
    ends: np.ndarray
    members: np.ndarray
    ancestors: np.ndarray

    @property
    def num_nodes(self) -> int:
        """Nodes including the root."""
        return len(self.tokens)

    @property
    def max_depth(self) -> int:
        """Tokens in the longest candidate."""
        return int(self.depths.max())


def build_trie(sequences: Sequence[Sequence[int]], values: Sequence[int] = DEFAULT_VALUES) -> NumberTrie:
    """The trie of candidate token sequences, one per value (same order).

    Raises NumberJudgeError when a sequence is empty or two values share one sequence.
    """
    if len(sequences) != len(values):
        raise NumberJudgeError(f"{len(sequences)} token sequences for {len(values)} values.")
    children: list[dict[int, int]] = [{}]
    tokens, parents, depths = [0], [0], [0]
    ends, seen = [], {}
    for value, seq in zip(values, sequences):
        seq = tuple(int(t) for t in seq)
        if not seq:
            raise NumberJudgeError(f"The value {value} tokenizes to no tokens.")
        if seq in seen:
            raise NumberJudgeError(f"The values {seen[seq]} and {value} have the same tokens {seq}.")
        seen[seq] = value
        node = 0
        for tok in seq:
            if tok not in children[node]:
                children[node][tok] = len(tokens)
                children.append({})
                tokens.append(tok)
                parents.append(node)
                depths.append(depths[node] + 1)
            node = children[node][tok]
        ends.append(node)
    m = len(tokens)
    ancestors = np.zeros((m, m), bool)
    for node in range(m):
        a = node
        while True:
            ancestors[node, a] = True
            if a == 0:
                break
            a = parents[a]
    members = ancestors[np.asarray(ends)].astype(np.float32)
    members[:, 0] = 0.0  # the root has no incoming token
    return NumberTrie(
        values=np.asarray(values, np.float32),
        sequences=tuple(tuple(int(t) for t in s) for s in sequences),
        tokens=np.asarray(tokens, np.int32),
        parents=np.asarray(parents, np.int32),
        depths=np.asarray(depths, np.int32),
        ends=np.asarray(ends, np.int32),
        members=members,
        ancestors=ancestors,
    )


def number_token_sequences(tokenizer, context: str = "", values: Sequence[int] = DEFAULT_VALUES) -> list[list[int]]:
    """Canonical token ids of str(n) for each value, as the tokenizer writes them after `context`.

    The tokenization is read in context (`tokenize(context + str(n))` minus the tokens of
    `context`), so tokenizers that mark a word start (SentencePiece's "▁") or merge across the
    boundary give the ids a judge would really produce there. When the context's own tokens are
    not a prefix of the joint tokenization, str(n) is tokenized alone.
    """
    base = list(tokenizer(context, add_special_tokens=False)["input_ids"]) if context else []
    out = []
    for value in values:
        text = str(value)
        ids = list(tokenizer(context + text, add_special_tokens=False)["input_ids"])
        if base and ids[: len(base)] == base and len(ids) > len(base):
            out.append(ids[len(base):])
        else:
            out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def digit_token_mask(tokenizer, vocab_size: int) -> np.ndarray:
    """(vocab_size,) bool: True for tokens whose text starts with a digit 0-9, i.e. tokens that
    would continue a number written just before them.

    Read from the raw vocabulary strings (`convert_ids_to_tokens`), where byte-level BPE writes
    digits as themselves and SentencePiece writes a leading space as "▁" (so "▁5" starts a new
    word, not a digit); byte-fallback tokens <0x30>..<0x39> count as digits. Ids past the
    tokenizer's vocabulary (padding rows of the embedding) are False.
    """
    n = min(len(tokenizer), vocab_size)
    mask = np.zeros((vocab_size,), bool)
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
        if tok and (tok[0] in _DIGITS or _BYTE_DIGIT.match(tok)):
            mask[i] = True
    return mask


# ---------------------------------------------------------------------------------- pure math


def node_terms(
    log_probs: jax.Array, parents: jax.Array, tokens: jax.Array, digit_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-node terms from next-token tables (the arrays of a `NumberTrie`).

    Args:
      log_probs: (..., M, V) next-token log-probabilities after each trie node's prefix, node 0
        being the prompt alone.
      parents, tokens: (M,) each node's parent and own token.
      digit_mask: (V,) True for tokens that continue a number.

    Returns:
      edge: (..., M) log P(node's token | parent's prefix); 0 at the root.
      stop: (..., M) log P(next token does not start with a digit | node's prefix).
    """
    edge = log_probs[..., parents, tokens]  # (..., M): each node's token under its parent's table
    edge = jnp.where(jnp.arange(parents.shape[0]) == 0, 0.0, edge)
    # log(1 - digit mass) as a logsumexp over the other tokens: exact when the digit mass is ~1.
    stop = jax.nn.logsumexp(jnp.where(digit_mask, -jnp.inf, log_probs), axis=-1)
    return edge, stop


def combine_node_terms(edge: jax.Array, stop: jax.Array, members: jax.Array, ends: jax.Array) -> jax.Array:
    """(..., K) log P(n): the edges along each candidate's path (`members` (K, M)) plus the stop
    term at its end node (`ends` (K,))."""
    # A -inf edge off a path times a 0 membership would be NaN in a matmul: mask, then sum.
    on_path = jnp.where(members > 0, edge[..., None, :], 0.0)  # (..., K, M)
    return jnp.sum(on_path, axis=-1) + jnp.take(stop, ends, axis=-1)


def number_log_probs_from_tables(log_probs: jax.Array, trie: NumberTrie, digit_mask: np.ndarray) -> np.ndarray:
    """(..., K) unnormalised log P(n) from per-node next-token tables.

    `log_probs` (..., M, V): the next-token log-probabilities (or logits: they are
    log-softmaxed) after each node's prefix, node 0 being the prompt alone; `digit_mask` (V,):
    the tokens that continue a number. The same functions run inside the jitted judge.
    """
    lp = jax.nn.log_softmax(jnp.asarray(log_probs, jnp.float32), axis=-1)
    edge, stop = node_terms(lp, jnp.asarray(trie.parents), jnp.asarray(trie.tokens), jnp.asarray(digit_mask))
    return np.asarray(combine_node_terms(edge, stop, jnp.asarray(trie.members), jnp.asarray(trie.ends)))


@dataclasses.dataclass(frozen=True)
class NumberScores:
    """Expected-score judgements, one entry per judged prompt.

    Attributes:
      scores: sum_n n P(n) / mass, or None where mass < min_mass.
      expected: the same expectation regardless of the mass (NaN where the mass is 0).
      mass: sum_n P(n) before normalising, float64 (n,).
      probs: (n, K) normalised P(n) over the candidate values (NaN rows where mass is 0).
      values: (K,) the candidate values.
    """

    scores: list[float | None]
    expected: np.ndarray
    mass: np.ndarray
    probs: np.ndarray
    values: np.ndarray


def scores_from_log_probs(
    log_p: np.ndarray, values: Sequence[float] = DEFAULT_VALUES, min_mass: float = DEFAULT_MIN_MASS
) -> NumberScores:
    """Normalises (n, K) unnormalised log P(value) into expected scores, masses and probabilities."""
    log_p = np.asarray(log_p, np.float64)
    values = np.asarray(values, np.float64)
    if log_p.ndim != 2 or log_p.shape[1] != len(values):
        raise ValueError(f"log_p must be (n, {len(values)}), got {log_p.shape}.")
    top = np.max(log_p, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    w = np.exp(log_p - top)
    total = w.sum(axis=1, keepdims=True)
    mass = (total[:, 0] * np.exp(top[:, 0]))
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = w / total
    expected = probs @ values
    scores = [float(e) if m >= min_mass and np.isfinite(e) else None for e, m in zip(expected, mass)]
    return NumberScores(scores, expected, mass, probs, values)


# ---------------------------------------------------------------------------------- the model


def _tree_masks(config: ModelConfig, mask: jax.Array, ancestors: jax.Array, depths: jax.Array):
    """Attention masks and positions for [left-padded prompt (L) | trie nodes 1..M-1 (T)].

    Prompt queries see the prompt causally (as usual); node queries see every real prompt
    token and their own ancestors among the nodes. A node of depth d sits at position
    n_real + d - 1 (right after the prompt), so RoPE and sliding windows see it exactly where
    its token would be in `prompt + sequence`.
    """
    b, L = mask.shape
    t = depths.shape[0] - 1
    pos_prompt = default_positions(mask)
    n_real = jnp.sum(mask.astype(jnp.int32), axis=-1)
    pos_nodes = n_real[:, None] + depths[None, 1:] - 1  # (b, T)
    positions = jnp.concatenate([pos_prompt, pos_nodes], axis=1)
    node_anc = ancestors[1:, 1:]  # (T, T), self included
    masks = {}
    for kind in set(config.layer_types):
        window = config.sliding_window if kind == "sliding" else None
        top = layers.attention_mask(mask, L, window)  # (b, L, L)
        top = jnp.concatenate([top, jnp.zeros((b, L, t), bool)], axis=2)
        low_prompt = jnp.broadcast_to(mask[:, None, :].astype(bool), (b, t, L))
        low_nodes = jnp.broadcast_to(node_anc[None], (b, t, t))
        if window is not None:
            low_prompt = low_prompt & (pos_nodes[:, :, None] - pos_prompt[:, None, :] < window)
            low_nodes = low_nodes & (pos_nodes[:, :, None] - pos_nodes[:, None, :] < window)
        masks[kind] = jnp.concatenate([top, jnp.concatenate([low_prompt, low_nodes], axis=2)], axis=1)
    return masks, positions


def tree_hidden_states(params, config: ModelConfig, input_ids, mask, node_tokens, ancestors, depths):
    """Final-norm hidden states of the prompt's last position and of every trie node, (b, M, hidden).

    `input_ids`/`mask`: (b, L) left-padded prompts; `node_tokens` (M,), `ancestors` (M, M),
    `depths` (M,) from the trie. `harmjax.model.decoder.hidden_states` over prompt + nodes,
    with the tree-shaped masks and positions of `_tree_masks`.
    """
    b, L = input_ids.shape
    masks, positions = _tree_masks(config, mask, ancestors, depths)
    ids = jnp.concatenate([input_ids, jnp.broadcast_to(node_tokens[None, 1:], (b, node_tokens.shape[0] - 1))], axis=1)
    h = hidden_states(params, config, ids, positions=positions, block_masks=masks)
    return h[:, L - 1 :]  # the root (last prompt token) and the nodes


@functools.lru_cache(maxsize=16)
def _jit_trie_log_probs(config: ModelConfig, mesh: Mesh):
    """jit(params, ids, mask, tokens, parents, ancestors, depths, members, ends, digit_mask) -> (b, K).

    Its own jit (not `harmjax.inference.token_logprobs`): the stop term needs the whole
    next-token table at every node."""

    def fn(params, input_ids, mask, tokens, parents, ancestors, depths, members, ends, digit_mask):
        h = tree_hidden_states(params, config, input_ids, mask, tokens, ancestors, depths)
        lp = jax.nn.log_softmax(logits_from_hidden(params, config, h), axis=-1)  # (b, M, V)
        edge, stop = node_terms(lp, parents, tokens, digit_mask)
        return combine_node_terms(edge, stop, members, ends)

    return sharded_jit(fn, config, mesh, (2, 2), n_replicated=7)


@dataclasses.dataclass(frozen=True)
class JudgeVocabulary:
    """What the judge reads off its model: the candidates' trie and the digit-token mask."""

    trie: NumberTrie
    digit_mask: np.ndarray


def judge_vocabulary(model, values: Sequence[int] = DEFAULT_VALUES, system: str | None = None) -> JudgeVocabulary:
    """The trie of `values` as the judge's tokenizer writes them at the start of its assistant
    turn, and its digit-token mask."""
    from harmjax.generate.prompts import prompt_token_ids

    tok = model.tokenizer
    prompt_token_ids(tok, "x", chat=True, system=system)  # raises a clear error without a template
    # The text right before the judge's answer: any prompt's generation prompt ends the same way.
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "x"}]
    context = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    sequences = number_token_sequences(tok, context, values)
    return JudgeVocabulary(build_trie(sequences, values), digit_token_mask(tok, model.config.vocab_size))


def trie_log_probs(
    model,
    prompt_ids: Sequence[Sequence[int]],
    vocab: JudgeVocabulary,
    *,
    batch_size: int = 8,
    params: Any = None,
    progress: bool = True,
    desc: str = "number judge",
) -> np.ndarray:
    """(n, K) unnormalised log P(value) for each tokenized judge prompt (ending at the assistant turn).

    Prompts are sorted by length and batched into power-of-two buckets; each batch is one
    jitted forward over prompt + trie nodes.
    """
    from harmjax.data.calibration import pad_id_of

    n = len(prompt_ids)
    trie = vocab.trie
    out = np.full((n, len(trie.values)), -np.inf, np.float32)
    if n == 0:
        return out
    step = round_batch(batch_size, model.mesh)
    fn = _jit_trie_log_probs(model.config, model.mesh)
    consts = tuple(
        jnp.asarray(a)
        for a in (trie.tokens, trie.parents, trie.ancestors, trie.depths, trie.members, trie.ends, vocab.digit_mask)
    )
    params = model.params if params is None else params
    pad_id = pad_id_of(model.tokenizer)
    order = sorted(range(n), key=lambda i: -len(prompt_ids[i]))
    longest = len(prompt_ids[order[0]]) + trie.max_depth
    if longest > model.config.max_position_embeddings:
        from tqdm.auto import tqdm as _tqdm

        _tqdm.write(
            f"warning: a judge prompt of {longest} tokens exceeds the judge's "
            f"max_position_embeddings={model.config.max_position_embeddings}."
        )
    starts = range(0, n, step)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False, disable=len(starts) < 2)
    for start in starts:
        rows = order[start : start + step]
        chunk = [prompt_ids[i] for i in rows]
        if any(len(s) == 0 for s in chunk):
            raise NumberJudgeError("A judge prompt encodes to no tokens.")
        length = bucket_length(max(len(s) for s in chunk))
        ids, mask = pad_batch(chunk, pad_id, length, step, left=True)
        # Filler rows get one real token so no softmax row is empty.
        mask[len(chunk):, -1] = 1
        res = np.asarray(fn(params, jnp.asarray(ids), jnp.asarray(mask), *consts))
        out[rows] = res[: len(chunk)]
    return out


def number_scores(
    model,
    user_texts: Sequence[str],
    *,
    values: Sequence[int] = DEFAULT_VALUES,
    min_mass: float = DEFAULT_MIN_MASS,
    system: str | None = None,
    batch_size: int = 8,
    params: Any = None,
    progress: bool = True,
    vocab: JudgeVocabulary | None = None,
    desc: str = "number judge",
) -> NumberScores:
    """Expected 0-100 scores of a local judge model for each user message.

    Each text is the judge's user turn; it goes through the judge's chat template (with
    `system`, if given) and the number is read at the start of the assistant turn.

    Args:
      model: a `harmjax.Model` with a chat template (any instruct model).
      user_texts: the judge prompts, already filled in.
      values: the candidate numbers (default 0..100).
      min_mass: scores with less probability on the candidates are None.
      system: optional system message of the judge.
      batch_size: prompts per forward.
      params: override the judge's params.
      progress: show a tqdm bar.
      vocab: a precomputed `judge_vocabulary(model, values, system)`.
    """
    from harmjax.generate.prompts import prompt_token_ids

    vocab = vocab or judge_vocabulary(model, values, system)
    ids = [prompt_token_ids(model.tokenizer, t, chat=True, system=system) for t in user_texts]
    log_p = trie_log_probs(model, ids, vocab, batch_size=batch_size, params=params, progress=progress, desc=desc)
    return scores_from_log_probs(log_p, vocab.trie.values, min_mass)
