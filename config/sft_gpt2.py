# Chat finetuning (SFT) of OpenAI's GPT-2 124M on smol-smoltalk's conversations, on one GPU (docs/chat.md).
# python data/chat/prepare.py --hub_dataset=HuggingFaceTB/smol-smoltalk --val_split=test --block_size=1024
# python train.py config/sft_gpt2.py && python chat.py --out_dir=out-sft-gpt2
# Offline: --init_from=path/to/gpt2 (a transformers folder), or a checkpoint pretrained here (a .pt file or out_dir,
# e.g. config/train_gpt2.py's out-gpt2), whose weights and tokenizer start the run at iteration 0.

out_dir = "out-sft-gpt2"
init_from = "gpt2"  # its 50,257-row embedding grows to 50,304: the chat tokens take ids 50257-50260 (mean-initialized)
dataset = "chat"  # data/chat: what data/chat/prepare.py writes by default

# each row is one conversation padded to block_size, the loss only on the assistant's tokens; 16 x 1024 x 4 = 64K
# token slots per step, ~460K conversations in smol-smoltalk's train split: ~2 epochs in 15,000 steps
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 4
max_iters = 15000
lr_decay_iters = 15000
eval_interval = 500
eval_iters = 50
sample_interval = 0  # samples continue text: chat with the model instead (chat.py)

# finetuning: a tenth of pretraining's peak lr, short warmup, cosine to 0
learning_rate = 6e-5
min_lr = 0.0
warmup_iters = 200
weight_decay = 0.0
dropout = 0.0
