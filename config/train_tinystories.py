# A small GPT (6 layers, 6 heads, 384 wide: ~30M parameters, most of them GPT-2's 50304-token embedding) that learns
# to write simple, coherent stories. python data/tinystories/prepare.py && python train.py config/train_tinystories.py
#
# A healthy run, in GPT-2 BPE tokens on a GPU: the loss starts at ~10.8 (ln 50257, a uniform guess), is near 6
# after 100 steps, near 3 after 1,000 and at 1.5-2.0 after 5,000. Much slower than that: check the data and the lr.

out_dir = "out-tinystories"
eval_interval = 500
eval_iters = 100
log_interval = 10
always_save_checkpoint = False

wandb_log = False
wandb_project = "tinystories"
wandb_run_name = "gpt-6x384"

dataset = "tinystories"
batch_size = 32
block_size = 512  # most stories fit in 512 tokens
gradient_accumulation_steps = 2  # 32,768 tokens per step

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.0

learning_rate = 1e-3  # a small network takes a higher learning rate
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
warmup_iters = 100
beta2 = 0.99
weight_decay = 1e-1
