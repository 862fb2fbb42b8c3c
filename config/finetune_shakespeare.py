# Finetune OpenAI's GPT-2 XL (1.5B) on tiny Shakespeare in GPT-2 BPE tokens (nanoGPT's finetuning example).
# python data/shakespeare/prepare.py && python train.py config/finetune_shakespeare.py
# Offline, or for a smaller model: --init_from=path/to/hf_gpt2_folder (or gpt2, gpt2-medium, gpt2-large).
# Then: python sample.py --out_dir=out-shakespeare, or python export.py --out_dir=out-shakespeare --hf_dir=...

out_dir = "out-shakespeare"
eval_interval = 5
eval_iters = 40
wandb_log = False  # feel free to turn on
wandb_project = "shakespeare"
wandb_run_name = "ft-gpt2-xl"

dataset = "shakespeare"
init_from = "gpt2-xl"  # the largest GPT-2

# only save checkpoints if the validation loss improves
always_save_checkpoint = False

# the number of examples per iter: 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter
# shakespeare has 301,966 tokens, so 1 epoch ~= 9.2 iters
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# finetune at a small constant learning rate
learning_rate = 3e-5
decay_lr = False

# Frozen layers (lib/freeze.py), cheaper finetuning: freeze_layers=K freezes the embeddings and the bottom K of the
# n_layer blocks, so only the top n_layer-K blocks train, plus ln_f and the head while freeze_train_head=True. The
# head is tied to the token embedding (one tensor, as in GPT-2): training the head also moves every token's input
# embedding; freeze_train_head=False freezes both (and ln_f), i.e. freezes the embedding. unfreeze_every=S unfreezes
# one more block, from the top down, every S steps (progressive unfreezing; the embeddings last, once every block
# trains). The optimizer holds only the trainable parameters (no AdamW state for frozen ones: less memory), the
# header prints trainable vs total parameters, and --init_from=resume is exact. E.g. for gpt2-xl (48 layers):
#   python train.py config/finetune_shakespeare.py --freeze_layers=40 --unfreeze_every=5
freeze_layers = 0  # 0: train every layer (the default)
freeze_train_head = True
unfreeze_every = 0
