"""A short, human-readable summary of a loaded model: size, shape and a sanity NLL."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from harmjax.inference import text_nll


def summarize(model, sentences: Sequence[str], batch_size: int = 8, max_length: int = 128) -> dict[str, Any]:
    """Parameter count, layer count, family and the mean NLL (nats/token) of `sentences`.

    The NLL is a quick check that real weights were loaded: random weights give about
    ln(vocab_size).
    """
    start = time.perf_counter()
    nll = text_nll(model, list(sentences), batch_size=batch_size, max_length=max_length)
    c = model.config
    return {
        "model_type": c.model_type,
        "source_dir": model.source_dir,
        "num_params": int(model.num_params()),
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "num_heads": c.num_heads,
        "num_kv_heads": c.num_kv_heads,
        "vocab_size": c.vocab_size,
        "dtype": str(jax.tree.leaves(model.params)[0].dtype),
        "mesh": dict(model.mesh.shape),
        "sentence_nll": [float(x) for x in nll],
        "mean_nll": float(np.mean(nll)),
        "uniform_nll": float(np.log(c.vocab_size)),
        "nll_seconds": time.perf_counter() - start,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few aligned lines for the terminal."""
    lines = [
        f"model         {summary['model_type']}  ({summary['source_dir']})",
        f"parameters    {summary['num_params']:,}  ({summary['dtype']})",
        f"layers        {summary['num_layers']}  hidden {summary['hidden_size']}  "
        f"heads {summary['num_heads']}/{summary['num_kv_heads']} (q/kv)  vocab {summary['vocab_size']}",
        f"mesh          {summary['mesh']}",
        f"mean NLL      {summary['mean_nll']:.3f} nats/token over {len(summary['sentence_nll'])} sentences "
        f"(uniform guess: {summary['uniform_nll']:.2f})",
    ]
    if "wall_seconds" in summary:
        lines.append(
            f"wall time     {summary['wall_seconds']:.1f} s  (assets {summary['asset_seconds']:.1f} s, "
            f"load {summary['load_seconds']:.1f} s, NLL {summary['nll_seconds']:.1f} s)"
        )
    return "\n".join(lines)
