"""Generation on the embedded SmolLM2-135M-Instruct: StrongREJECT prompts, greedy, 256 new tokens.

A few items by default; `--config.limit=0` runs all 313 prompts.

  python -m launch.generate --config=configs/generate_embedded.py
  python -m launch.generate --config=configs/generate_embedded.py --config.prefix="Sure, here is" \
      --config.mask=runs/masks/harm --config.limit=0
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Settings of `launch.generate` on the embedded default model."""
    c = ml_collections.ConfigDict()
    c.model = "embedded"  # "embedded", a local HF directory, a .gguf file or a hub id
    c.dtype = "float32"
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    # Prompts: "" = the embedded StrongREJECT CSV; else a .csv/.jsonl/.json file or a hub name.
    c.prompts = ""
    c.split = "train"
    c.prompt_key = "forbidden_prompt"
    c.category_key = "category"  # "" for none
    c.id_key = ""  # "" = the row number
    c.limit = 4  # first N prompts (0 = all)
    c.skip_bad_rows = False

    # Prefilling attack: a fixed prefix for every prompt, or the first `prefix_tokens` tokens
    # of each row's harmful reference response (column `response_key`). Neither = no attack.
    c.prefix = ""
    c.response_key = ""
    c.prefix_tokens = 10

    c.chat = True
    c.system = ""
    c.max_new_tokens = 256
    c.temperature = 0.0  # 0 = greedy
    c.top_p = 1.0
    c.seed = 0
    c.batch_size = 8

    c.mask = ""  # a mask directory written by harmjax.masks.save_mask ("" = unpruned)
    c.output_dir = ""  # "" = runs/generate/<model name>-<mask id>
    return c
