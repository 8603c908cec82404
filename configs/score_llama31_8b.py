"""Attribution scan of Llama-3.1-8B-Instruct on GPUs/TPUs: bf16 weights, float32 scores.

On one 80 GB card keep remat on (49.8 GiB peak at batch 16 x 256 tokens on an H200; 67.8 GiB
without remat, 1.26x faster). On several devices the params are split over them (FSDP).

  python -m launch.score --config=configs/score_llama31_8b.py --config.data=harmful.csv \
      --config.kind=harm --config.output_dir=runs/llama8b/harm
"""

from configs import score


def get_config():
    """Scan settings for Llama-3.1-8B-Instruct (the reference's 412 samples, seed 0)."""
    c = score.get_config()
    c.model = "meta-llama/Llama-3.1-8B-Instruct"
    c.dtype = "bfloat16"
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.batch_size = 16
    c.remat = True
    return c
