"""Generate responses to a prompt set (optionally under the prefilling attack and a mask)
and write them to JSONL, resumably.

  python -m launch.generate --config=configs/generate_embedded.py
  python -m launch.generate --config=configs/generate_embedded.py \
      --config.prompts=data/advbench.csv --config.prompt_key=goal --config.response_key=target \
      --config.mask=runs/masks/harm --config.limit=0

Writes `<output_dir>/generations.jsonl` (one record per prompt: id, prompt, prefix,
response, category, mask_id, seed, max_new_tokens, temperature, ...) and
`<output_dir>/metrics.json`. Records are written as each batch finishes; a rerun skips the
ids already in the file, so an interrupted run resumes without redoing finished items.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from typing import Any

from absl import logging

from harmjax import distributed
from launch.common import config_flag, config_main, run_app

_CONFIG = config_flag("configs/generate_embedded.py", "Job config file.")


def load_examples(cfg) -> list:
    """The prompt set as `Example`s (first `cfg.limit` rows; ids from `id_key` or row number)."""
    from harmjax import assets
    from harmjax.data.records import read_records, to_examples

    source = cfg.prompts or assets.strongreject_csv()
    rows = read_records(source, split=cfg.split)
    examples, _ = to_examples(
        rows,
        prompt_key=cfg.prompt_key,
        response_key=cfg.response_key or None,
        category_key=cfg.category_key or None,
        id_key=cfg.id_key or None,
        require_response=bool(cfg.response_key),
        on_bad="skip" if cfg.skip_bad_rows else "error",
        source=source,
    )
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{source}: duplicate ids {dup}; ids must be unique for resuming (set id_key).")
    return examples[: cfg.limit] if cfg.limit else examples


def sample_id(item_id: str) -> int:
    """A stable integer per item id, so a resumed run samples each item as a full run would."""
    return zlib.crc32(str(item_id).encode("utf-8"))


def run(cfg) -> dict[str, Any]:
    """Generates for every prompt not yet in the output file; returns the metrics."""
    import harmjax
    import harmjax.generate
    from harmjax.io.jsonl import JsonlWriter, read_jsonl
    from harmjax.model import fused
    from launch.common import mesh_config, resolve_model_source

    start = time.perf_counter()
    model = harmjax.load(resolve_model_source(cfg.model), dtype=cfg.dtype or None, mesh=mesh_config(cfg.mesh))
    model_name = os.path.basename(os.path.normpath(model.source_dir))
    params, mask_id = model.params, "none"
    if cfg.mask:
        from harmjax.masks import apply_mask, load_mask

        mask, _ = load_mask(cfg.mask, params=params)
        params = apply_mask(params, mask)
        mask_id = os.path.basename(os.path.normpath(cfg.mask))
    out_dir = cfg.output_dir or os.path.join("runs", "generate", f"{model_name}-{mask_id}")
    os.makedirs(out_dir, exist_ok=True)
    examples = load_examples(cfg)
    tok = model.tokenizer

    def prefix_of(example) -> str:
        if cfg.prefix:
            return cfg.prefix
        if cfg.response_key:
            return harmjax.generate.response_prefix(tok, example.response, cfg.prefix_tokens)
        return ""

    # Generation runs in chunks (each written before the next, for resume); fuse the
    # projections once for all of them rather than in every call.
    params = fused.fuse_if_worthwhile(params, model.config, model.mesh)

    path = os.path.join(out_dir, "generations.jsonl")
    new_tokens = generated = 0
    gen_seconds = 0.0
    with JsonlWriter(path, key="id") as out:
        todo = [e for e in examples if e.id not in out.done]
        logging.info("%d prompts, %d already in %s, %d to generate.", len(examples), len(examples) - len(todo), path, len(todo))
        step = max(1, int(cfg.batch_size))
        for s in range(0, len(todo), step):
            chunk = todo[s : s + step]
            prefixes = [prefix_of(e) for e in chunk]
            t0 = time.perf_counter()
            result = harmjax.generate.generate(
                model, [e.prompt for e in chunk], params=params, prefixes=prefixes,
                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                seed=cfg.seed, chat=cfg.chat, system=cfg.system or None, batch_size=cfg.batch_size,
                sample_ids=[sample_id(e.id) for e in chunk], progress=False,
            )
            gen_seconds += time.perf_counter() - t0
            for e, prefix, text, ids, finished in zip(
                chunk, result.prefixes, result.texts, result.token_ids, result.finished
            ):
                out.write({
                    "id": e.id, "prompt": e.prompt, "prefix": prefix, "response": text,
                    "category": e.category, "mask_id": mask_id, "seed": cfg.seed,
                    "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                    "top_p": cfg.top_p, "num_new_tokens": len(ids), "stopped_at_eos": finished,
                })
            new_tokens += result.stats["new_tokens"]
            generated += len(chunk)
            logging.info("%d/%d generated (%.1f tokens/s)", generated, len(todo), new_tokens / max(gen_seconds, 1e-9))
    count = len(read_jsonl(path))
    metrics = {
        "model": model.source_dir, "mask_id": mask_id, "count": count, "generated_this_run": generated,
        "already_done": len(examples) - generated, "new_tokens": new_tokens,
        "tokens_per_s": new_tokens / gen_seconds if gen_seconds else 0.0,
        "generation_s": gen_seconds, "wall_s": time.perf_counter() - start,
        "settings": {k: cfg[k] for k in ("max_new_tokens", "temperature", "top_p", "seed", "chat",
                                         "prefix", "response_key", "prefix_tokens", "batch_size", "dtype")},
    }
    if distributed.is_writer():  # every process generated; one writes
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    distributed.barrier(f"metrics {out_dir}")
    logging.info("Wrote %s (%d records) and metrics.json", path, count)
    return metrics


main = config_main(run, _CONFIG, lambda metrics: print(json.dumps({k: v for k, v in metrics.items() if k != "settings"},
                                                                   indent=2)))


if __name__ == "__main__":
    run_app(main)
