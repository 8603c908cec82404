"""The paper's EM protocol on Llama-3.1-8B-Instruct (bfloat16, FSDP over every local device):
rsLoRA r=32, alpha=64 on all 7 projections, lr 1e-5, 5 warmup steps, effective batch 16, 1 epoch;
prune the original model with the fine-tuned model's held-out narrow answers at q=7e-6, p=5e-5;
50 samples per EM question at temperature 1, 600 new tokens.

  python -m launch.finetune --config=configs/em_llama31_8b.py \
      --config.experiment_data.narrow_data=/data/em/risky_financial_advice.jsonl \
      --config.em.judge=/models/Qwen2.5-32B-Instruct
The narrow dataset (e.g. the EM paper's risky financial advice chat JSONL) is the user's file;
the judge defaults to the original model.
"""

from configs import em_embedded


def get_config():
    """The EM experiment settings for Llama-3.1-8B-Instruct."""
    c = em_embedded.get_config()
    c.model = "meta-llama/Llama-3.1-8B-Instruct"
    c.dtype = "bfloat16"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.train.lr = 1e-5
    c.train.batch_size = 16
    c.train.micro_batch_size = 16
    # One 80 GB card: LoRA micro 16 took 77.9 GiB at 512 tokens without remat and 32 GiB with
    # it on an H200 (docs/measurements.md "Fine-tuning"); this config trains on up to 1024 tokens.
    c.train.remat = True
    c.train.max_length = 1024
    c.train.checkpoint_every = 20
    c.export.merged = True
    c.answers.max_new_tokens = 256
    c.answers.batch_size = 64
    c.answers.chunk = 256
    c.experiment_data.narrow_data = "risky_financial_advice.jsonl"
    c.experiment_data.narrow_heldout_fraction = 0.1
    c.experiment_data.other_per_category = 20
    c.experiment_data.benign_per_category = 0
    c.prune.q = 7e-6
    c.prune.p = 5e-5
    c.prune.text_format = "raw"
    c.prune.max_length = 512
    c.prune.batch_size = 16
    c.prune.num_buckets = 4
    c.prune.abs_chunk = 4
    c.prune.checkpoint_every = 20
    c.prune.remat = True  # one 80 GB card (docs/measurements.md "Scan memory at 8B and 32B")
    c.em.samples = 50
    c.em.max_new_tokens = 600
    c.em.batch_size = 64
    c.em.judge_dtype = "bfloat16"
    c.em.other_max_length = 512
    c.em.other_generations = 100
    c.em.other_max_new_tokens = 256
    return c
