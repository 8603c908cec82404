"""Attribution scan settings (launch/score.py). Reference settings: 412 samples, seed 0, raw text.

  python -m launch.score --config=configs/score.py --config.data=harmful.csv --config.kind=harm
  python -m launch.score --config=configs/score.py --config.data=alpaca_benign.json \
      --config.kind=retain --config.output_dir=runs/scores/retain

`data` is a .csv/.jsonl/.json file or a `datasets` hub name with prompt and response columns.
For generations written by launch/generate.py (prefilling attack), set prefix_key="prefix" so
the forced prefix counts as part of the scored response, as the judged text does.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Settings of one attribution scan."""
    c = ml_collections.ConfigDict()
    c.model = "embedded"  # "embedded", a local HF directory, a .gguf file, an orbax dir or a hub id
    c.dtype = "float32"
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.data = ""  # required: the harmful (kind=harm) or benign (kind=retain*) set; any set for wanda
    c.split = "train"  # hub split
    c.prompt_key = "prompt"
    c.response_key = "response"
    c.prefix_key = ""  # e.g. "prefix": prepended to the response before scoring
    c.category_key = ""  # e.g. "category"; needed by include/exclude
    c.include = ""  # comma-separated categories to keep ("" = all)
    c.exclude = ""  # comma-separated categories to drop (cross-category tests: A minus B)
    c.skip_bad_rows = False  # skip (and count) rows with a missing prompt/response instead of failing
    c.nsamples = 412
    c.seed = 0
    c.kind = "harm"  # harm | retain | retain_mean | wanda | magnitude (docs/design.md "Score kinds")
    c.scope = ""  # comma-separated fnmatch patterns of HF names; "" = the 7 projections of every block
    c.text_format = "raw"  # raw (prompt + "\n" + response, the reference) | chat
    c.max_length = 256
    c.batch_size = 8
    c.remat = False
    c.layerwise = False  # one small program per decoder block: compiles in seconds at 14B-32B (docs/design.md "Attribution: per-block programs")
    c.abs_chunk = 8
    c.checkpoint_every = 20  # batches between resumable saves
    c.output_dir = ""  # "" = runs/scores/<kind>
    return c
