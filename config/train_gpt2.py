# GPT-2 (124M) on OpenWebText: nanoGPT's reproduction recipe (nanoGPT reaches val loss ~2.85 in ~4 days on 8 A100s).
# python data/openwebtext/prepare.py
# torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py     (or: python train.py config/... on 1 GPU)

wandb_log = False  # --wandb_log=True to follow the run
wandb_project = "owt"
wandb_run_name = "gpt2-124M"

dataset = "openwebtext"
# 491,520 tokens per step: 12 sequences x 1024 tokens x 40 micro-steps, in total over all GPUs
# (gradient_accumulation_steps is shared out among the processes: 5 each on 8 GPUs)
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# GPT-2 small
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

# 600,000 steps (~300B tokens) at lr 6e-4, warmup 2000 steps, cosine decay to 6e-5
learning_rate = 6e-4
max_iters = 600000
lr_decay_iters = 600000
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 1000
eval_iters = 200
log_interval = 10
