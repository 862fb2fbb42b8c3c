# Chat finetuning on a CPU, in minutes: the CPU preset's tiny Shakespeare model (config/train_shakespeare_char_cpu.py,
# out-shakespeare-char) learns data/chat/synthetic.py's four tasks (spell a word, spell it backwards, count a letter,
# add two numbers); eval_chat.py then scores held-out words and sums (docs/chat.md has the commands and numbers).
# python data/chat/synthetic.py && python data/chat/prepare.py --data_files=data/chat_tasks/train.jsonl \
#     --tokenizer=data/shakespeare_char --block_size=64 --out=data/chat_tasks
# python train.py config/sft_shakespeare_char_cpu.py && python chat.py --out_dir=out-chat-tasks

out_dir = "out-chat-tasks"
init_from = "out-shakespeare-char"  # its weights and characters; 4 chat tokens join its 65 (rows at the mean)
dataset = "chat_tasks"

block_size = 64  # the pretrained model's; every conversation fits
batch_size = 32
gradient_accumulation_steps = 1
max_iters = 1500
lr_decay_iters = 1500
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False
sample_interval = 0  # samples continue text: eval_chat.py and chat.py talk to it instead

learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
beta2 = 0.99
dropout = 0.0

device = "cpu"
compile = True
