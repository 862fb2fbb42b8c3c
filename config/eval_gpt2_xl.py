# Evaluate OpenAI's gpt2-xl (1558M) on a dataset's train and val splits, without training.
# python train.py config/eval_gpt2_xl.py                                  # OpenWebText (data/openwebtext)
# python train.py config/eval_gpt2_xl.py --dataset=shakespeare            # or any prepared GPT-2 BPE dataset
# Offline: --init_from=path/to/hf_gpt2_xl_folder (a local transformers GPT-2 folder)

batch_size = 8
eval_iters = 500  # use more iterations to get a good estimate
eval_only = True
wandb_log = False
init_from = "gpt2-xl"
dataset = "openwebtext"
