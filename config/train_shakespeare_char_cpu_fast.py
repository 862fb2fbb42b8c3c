# The CPU preset's model on a short schedule: nanoGPT's final val loss (1.886, after its 2,000 steps) as soon as
# possible. python data/shakespeare_char/prepare.py && python train.py config/train_shakespeare_char_cpu_fast.py
#
# Stopping the 2,000-step preset early (--target_val_loss=1.886) stops it mid-schedule, at a high learning rate; a
# schedule that ends here gets there in fewer tokens. 500 steps of 24 sequences at lr 2e-3, the learning rate cooled
# to 0 over the last 40% (WSD): val 1.869. Tried on the 2-core CPU (one thread, warm compile cache, CPU seconds of the
# whole process; 2026-12-02): 900 x 12 at 1e-3, 1.8735 in 27.5 s; 500 x 24 at 2e-3, 1.8693 in 26.0 s; 400 x 32 at
# 3e-3, 1.8728 in 29.8 s; 300 x 48 at 3e-3, 1.8527 in 32.6 s; 450 x 24 at 2e-3, 1.8904; 800 x 12 at 1e-3, 1.8924.
# Evaluated at the start and the end only, no samples; sample from the checkpoint with sample.py.

out_dir = "out-shakespeare-char-fast"
eval_interval = 500
eval_iters = 20
log_interval = 100
always_save_checkpoint = False
sample_interval = 0

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 24
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 2e-3
max_iters = 500
lr_decay_iters = 500
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 50

# the CPU preset's recipe: modern, with AdamW, without QK-norm and the x0 shortcut (train_shakespeare_char_cpu.py)
recipe = "modern"
optimizer = "adamw"
qk_norm = False
x0_mix = False

device = "cpu"
compile = True
