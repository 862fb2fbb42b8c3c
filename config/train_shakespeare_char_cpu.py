# The tiny Shakespeare baby GPT sized for a laptop CPU (nanoGPT's README CPU recipe): ~70 s on 2 cores.
# python data/shakespeare_char/prepare.py && python train.py config/train_shakespeare_char_cpu.py

out_dir = "out-shakespeare-char"
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False
sample_interval = 250  # a short sample at every eval

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

# the modern recipe (README: The modern recipe): Muon, rotary, RMSNorm, QK-norm, ReLU^2, untied head, soft-cap, WSD.
# It reached a lower val loss than GPT-2's in the same 40 s of CPU time (1.69 vs 1.94-1.99, experiments/ablation.py),
# and 1.639 in about nanoGPT's time (nanoGPT: 1.886; README: Benchmarks); the GPT-2 recipe is one override away:
# --recipe=gpt2 (1.921, 1.55-1.65x nanoGPT's speed)
recipe = "modern"

device = "cpu"
compile = False
