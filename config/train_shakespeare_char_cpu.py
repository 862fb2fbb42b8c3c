# The tiny Shakespeare baby GPT sized for a laptop CPU (nanoGPT's README CPU recipe): ~30 s on 2 cores, val 1.70.
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

# the modern recipe (docs/recipe.md) without three parts that buy no more loss than their step time at this
# size on a 2-core CPU: Muon, QK-norm and the x0 shortcut. With them a step took 1.43x as long (uncompiled, --against);
# at step counts of equal cost the two end equal (1.676 vs 1.694, 1.632 vs 1.637: docs/recipe.md), and the 2,000
# steps here are 1.4x faster. What is left, rotary, RMSNorm, ReLU^2, untied head, zero-init, soft-cap, WSD, compiled:
# val 1.70 in 2.1-2.4x less wall time than nanoGPT's 1.886 (alternating runs; docs/benchmarks.md).
# The whole modern recipe: --optimizer=muon --qk_norm=True --x0_mix=True; GPT-2's: --recipe=gpt2.
recipe = "modern"
optimizer = "adamw"
qk_norm = False
x0_mix = False

device = "cpu"
# torch.compile fuses the small ops between the matmuls: a step takes ~0.65x the time of eager mode. The first run
# on a machine compiles for ~12 s (g++; Inductor caches the kernels on disk), later runs load them in ~2 s.
compile = True
