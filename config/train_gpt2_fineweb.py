# GPT-2 (124M) on 10B tokens of FineWeb-Edu: the recipe of llm.c and build-nanogpt (llm.c reports val loss ~3.28
# on FineWeb after its 10B tokens, about 1.5 hours on 8 H100s in its own CUDA code).
# python data/fineweb_edu/prepare.py
# torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_fineweb.py   (or: python train.py ... on 1 GPU)

wandb_log = False
wandb_project = "fineweb"
wandb_run_name = "gpt2-124M-10B"
out_dir = "out-gpt2-fineweb"

dataset = "fineweb_edu"
# 524,288 (2**19) tokens per step: 16 sequences x 1024 tokens x 32 micro-steps, in total over all GPUs;
# 19,073 steps of it are one pass over the 10B tokens
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 32

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

learning_rate = 6e-4
max_iters = 19073
lr_decay_iters = 19073
min_lr = 6e-5
warmup_iters = 715
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 250
eval_iters = 100
log_interval = 10
