"""Fine-tuning (launch/finetune.py): rsLoRA or full, response-only loss, optionally on a pruned
model with the pruned weights held at exactly zero. Reference EM settings (Orgad et al.):
rsLoRA r=32, alpha=64 on all seven projections, lr 1e-5, linear schedule, 5 warmup steps,
effective batch 16, 1 epoch.

  python -m launch.finetune --config=configs/finetune.py --config.data=risky_financial_advice.jsonl
  python -m launch.finetune --config=configs/finetune.py --config.data=d.jsonl --config.mask=runs/mask
  python -m launch.finetune --config=configs/em_embedded.py        # the EM experiment (experiment=True)
"""

import ml_collections

PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def get_config() -> ml_collections.ConfigDict:
    """Settings of one fine-tuning run."""
    c = ml_collections.ConfigDict()
    c.experiment = False  # True: the EM experiment (configs/em_embedded.py) instead of one run
    c.model = "embedded"  # "embedded", a local HF directory, a .gguf file, an orbax dir or a hub id
    c.dtype = "float32"
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.seed = 0
    c.output_dir = ""  # "" = runs/finetune-<model name>

    c.data = ""  # chat JSONL {"messages": [...]} (EM datasets), or .csv/.jsonl/.json with prompt/response
    c.prompt_key = "prompt"
    c.response_key = "response"
    c.mask = ""  # a mask directory (harmjax.masks.save_mask): prune first, keep those weights at 0

    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = True  # False = full fine-tuning (train.train picks which weights)
    c.lora.r = 32
    c.lora.alpha = 64.0
    c.lora.dropout = 0.0
    c.lora.use_rslora = True
    c.lora.targets = PROJECTIONS
    c.lora.layers = ""  # comma-separated layer indices ("" = all)

    c.train = ml_collections.ConfigDict()
    c.train.lr = 1e-5
    c.train.warmup_steps = 5
    c.train.schedule = "linear"  # linear | cosine | constant (after warmup)
    c.train.weight_decay = 0.0
    c.train.max_grad_norm = 1.0
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.batch_size = 16  # effective batch (examples per optimizer step)
    c.train.micro_batch_size = 4  # examples per forward/backward (gradient accumulation)
    c.train.epochs = 1
    c.train.max_steps = 0  # > 0 overrides epochs
    c.train.max_length = 512
    c.train.val_fraction = 0.1
    c.train.seed = 0
    c.train.eval_every = 0  # steps between validation losses (0 = at the end only)
    c.train.checkpoint_every = 20
    c.train.log_every = 1
    c.train.text_format = "chat"
    c.train.train = "linear"  # full fine-tuning: "linear" (7 projections) or "all"
    c.train.remat = False
    c.tensorboard = False  # also write TensorBoard event files under <output_dir>/train/tb

    c.export = ml_collections.ConfigDict({"merged": True, "peft": True})
    return c
