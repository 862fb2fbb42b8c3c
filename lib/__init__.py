"""
The machinery the scripts at the repo's root share (train.py, sample.py, chat.py, bench.py, export.py, eval*.py,
bench/, experiments/ and data/*/prepare.py). Nothing here is run directly, except `python -m lib.checkpoint
convert` and `python -m lib.parallel`.

    runtime      device, dtype and autocast, torch.compile, torchrun, peak FLOP/s, one-line errors
    batches      reproducible batches from train.bin / val.bin, and a dataset's metadata
    step         one optimizer step, the evaluation, SIGTERM / Ctrl-C handling
    checkpoint   crash-safe checkpoints; models from scratch, checkpoints or GPT-2
    parallel     DDP / FSDP2 wrapping, activation checkpointing, full and sharded state dicts
    optim        AdamW, Muon + AdamW, the recipe switch, the lr schedules
    metrics      the run header, step and eval lines, metrics.jsonl, loss.png, the training doctor, wandb
    tokenizer    text <-> ids for characters, GPT-2's BPE or your own BPE
    scaling      the training horizon (target_flops, tokens_per_param), the depth dial, the power-law fit
    freeze       frozen layers and progressive unfreezing
    core_eval    CORE and its tasks: prompts, the three kinds of scoring, the eval bundle
    hellaswag    HellaSwag's validation file, as a task of core_eval
    kernels      two of model.py's ops made fast (RMSNorm's backward, CPU bfloat16 attention)
    decode       decoding without per-token overhead: a static KV cache and one compiled step per token
    dataset      the dataset format (train.bin, val.bin, meta.json) and its crash-safe writing
    corpus       the corpus pipeline behind data/*/prepare.py: sources, validation split, parallel tokenization
    files        the one atomic writer, the rule for what a script may replace (guard), one lock per folder
    errors       UserError (a mistake the user can fix: one line), without torch
    chat         the chat template and its tokens, vocabulary fitting, the KV cache across turns, transformers export
    chat_data    conversations -> ids + loss mask (data/chat/prepare.py), and the padded batches of chat data
    finetune     --init_from=a checkpoint of this repo: its weights and tokenizer, from iteration 0

The modules import each other in one direction only (no two import each other).
"""
