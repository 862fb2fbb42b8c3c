"""
Export a checkpoint of train.py as a Hugging Face transformers GPT-2 folder (config.json + model.safetensors).

    python export.py --out_dir=out-shakespeare --hf_dir=gpt2-shakespeare
    python export.py --out_dir=out-shakespeare-char --hf_dir=hf-shakespeare-char --ckpt=latest

transformers.AutoModelForCausalLM.from_pretrained(hf_dir) then gives the same logits as this repo's model.
A GPT-2 BPE checkpoint also gets GPT-2's tokenizer files, so AutoTokenizer.from_pretrained(hf_dir) works offline,
and its vocabulary padding (50304 rows) is cut back to GPT-2's 50257 tokens. A character-level checkpoint gets
char_vocab.json ({character: id}) instead of a tokenizer. A checkpoint trained on data in your own tokenizer
(data/train_tokenizer.py) gets its tokenizer.json (which the checkpoint's metadata carries) and tokenizer_config.json.
bias=False exports with zero biases, which is exact.
A chat checkpoint (finetuned on data/chat/prepare.py's data) keeps the rows of its chat tokens, and its tokenizer gets
them as special tokens with the chat template (a character-level one gets a transformers tokenizer of its characters
too), so tokenizer.apply_chat_template(messages) gives chat.py's ids and generate() stops at <|end|> (lib/chat.py).

The folder is written in full beside hf_dir, then swapped in whole (files.swap_folder). export.json lists every file
an export wrote, with its sha256: a later export into the same folder replaces those (and removes the ones it no
longer writes, such as a BPE tokenizer's files under a character-level model), keeps every other file (a model card,
a .git folder), and refuses, unless --overwrite=True, a file of the earlier export that was changed since, or a
folder that is not an export and is not empty.
"""

import glob
import hashlib
import json
import os
import re
import shutil
import sys

import torch

from configurator import configure
from lib import chat, checkpoint, files
from lib.batches import checkpoint_meta
from lib.runtime import UserError, install_error_hook
from model import CONV1D_WEIGHTS, GPTConfig

# ----------------------------------------------------------------------------- settings
out_dir = "out"
ckpt = "best"  # 'best' (best.pt, else ckpt.pt), 'latest' (ckpt.pt), or a file in out_dir
hf_dir = ""  # the folder to write (required)
overwrite = False  # also replace files in hf_dir that no export wrote, or that were changed since one did
# -----------------------------------------------------------------------------
GPT2_VOCAB = 50257  # GPT-2's tokens; 50256 is <|endoftext|>
EOT = "<|endoftext|>"
# OpenAI's GPT-2 BPE files (as in tiktoken_ext/openai_public.py), read through tiktoken's cache. transformers'
# vocab.json is the same file as encoder.json, and merges.txt the same as vocab.bpe.
GPT2_FILES = {
    "vocab.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                   "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                   "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}


def gpt2_state_dict(sd, reference, bias, vocab, path):
    """Our state_dict in GPT2LMHeadModel's layout: Conv1D weights transposed, vocab cut to `vocab`, zero biases."""
    wte, head = sd.get("transformer.wte.weight"), sd.get("lm_head.weight")
    if wte is not None and head is not None and not torch.equal(wte, head):
        raise UserError(f"{path} has an lm_head not tied to wte, which the GPT-2 format cannot hold")
    out, unused = {}, set(sd)
    for k, ref in reference.items():
        if k in sd:
            unused.discard(k)
            v = sd[k].t() if k.endswith(CONV1D_WEIGHTS) else sd[k]
            if k in ("transformer.wte.weight", "lm_head.weight"):
                v = v[:vocab]  # rows past the tokenizer's vocabulary are padding, never predicted
        elif k.endswith(".bias") and not bias:
            v = torch.zeros(ref.shape)  # bias=False is the same as a zero bias
        else:
            raise UserError(f"{path} lacks {k}, which GPT-2 needs: this architecture cannot be exported")
        if v.shape != ref.shape:
            raise UserError(f"{path}: {k} has shape {tuple(v.shape)} but GPT-2 expects {tuple(ref.shape)}: "
                            f"this architecture cannot be exported")
        out[k] = v.to(torch.float32).contiguous()
    if unused:
        raise UserError(f"{path} has weights the GPT-2 format cannot hold: {', '.join(sorted(unused))}")
    return out


MARKER = "export.json"  # what this script writes into every export: the checkpoint it came from, its files' sha256
# the names an export may write (save_pretrained's, the tokenizers'), checked before the work; after it, the real ones
EXPORT_NAMES = re.compile(r"(config|generation_config|vocab|tokenizer|tokenizer_config|special_tokens_map|added_tokens|"
                          r"char_vocab|export)\.json|merges\.txt|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")
_sha256 = {}  # path -> its sha256, each file read once


def file_sha256(path):
    if path not in _sha256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        _sha256[path] = digest.hexdigest()
    return _sha256[path]


def earlier_export(folder):
    """{name: sha256} of the files an earlier export wrote into folder, from its export.json (an export.json of an
    older version lists none: then every name an export writes counts, sha256 None); None if folder is no export."""
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or "checkpoint" not in marker:
        return None
    listed = marker.get("files")
    if isinstance(listed, dict):
        return listed
    return {name: None for name in os.listdir(folder) if EXPORT_NAMES.fullmatch(name)}


def check_target(folder, writes, overwrite):
    """
    files.guard for an export into folder, whose files at the names writes(name) says this export writes are
    replaced: folder must be empty, or an earlier export whose files being replaced or removed are unchanged since,
    unless overwrite. Returns the names in folder that the export keeps (carried into the new folder).
    """
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--hf_dir={folder} is a file: pick a folder")
    there = sorted(set(os.listdir(folder)) - {files.LOCK}) if os.path.isdir(folder) else []
    listed = earlier_export(folder)
    if listed is None:
        files.guard([folder] if there else [], overwrite, "--hf_dir", folder, holds=lambda _: (
                    f"is not empty and is not an earlier export (no {MARKER}; it holds {files.names(there)})"),
                    overwrite_does="export into it anyway with --overwrite=True (its other files stay)")
        listed = {}
    replaced = [os.path.join(folder, n) for n in there if n != MARKER and (writes(n) or n in listed)]
    unchanged = lambda path: listed.get(os.path.basename(path), "") in (None, file_sha256(path))  # noqa: E731
    files.guard(replaced, overwrite, "--hf_dir", folder, ours=unchanged, holds=lambda paths: (
                f"holds {files.names(paths)}, which this export would replace or remove, but which "
                f"{'were changed since an earlier export wrote them' if listed else 'no export wrote'}"),
                overwrite_does="replace them with --overwrite=True (once the new export is complete)")
    return [n for n in there if n != MARKER and not writes(n) and n not in listed]


install_error_hook()
configure(globals(), sys.argv[1:])
if not hf_dir:
    raise UserError("pass --hf_dir=FOLDER: where to write the transformers GPT-2 folder")
hf_dir = hf_dir.rstrip(os.sep) or os.sep
check_target(hf_dir, EXPORT_NAMES.fullmatch, overwrite)  # before the work; again once the names are known

path = checkpoint.find(out_dir, ckpt)
state = checkpoint.load(path)
args, sd = state["model_args"], state["model"]
allowed = set(checkpoint.ARCH_KEYS) | {"dropout"}
extra, missing = sorted(set(args) - allowed), sorted(set(checkpoint.GPT2_KEYS) - set(args))
if extra or missing:
    raise UserError(f"{path} has model_args the GPT-2 format cannot hold (extra {extra}, missing {missing}): "
                    f"GPT-2 is described by exactly {', '.join(sorted(allowed))}")
for k in checkpoint.RECIPE_KEYS:  # the modern recipe's options must all be off (older checkpoints lack them)
    if args.get(k, getattr(GPTConfig, k)) != getattr(GPTConfig, k):
        raise UserError(f"{path} was trained with {k}={args[k]!r}, which GPT-2 cannot hold: only the GPT-2 "
                        f"architecture exports ({k}={getattr(GPTConfig, k)!r}, as --recipe=gpt2 trains)")
meta = checkpoint_meta(state)

# the vocabulary: GPT-2 BPE (the default when a dataset has no meta.pkl), characters, or something else
vocab = args["vocab_size"]
is_gpt2 = "stoi" not in meta and meta.get("tokenizer", "gpt2") == "gpt2" and vocab >= GPT2_VOCAB
tokenizer_files = {}
if is_gpt2:
    vocab = GPT2_VOCAB
    from tiktoken.load import read_file_cached

    for name, (url, sha256) in GPT2_FILES.items():
        try:
            tokenizer_files[name] = read_file_cached(url, sha256)
        except Exception as e:
            raise UserError(f"could not get GPT-2's tokenizer file {url} ({type(e).__name__}): offline, set "
                            f"TIKTOKEN_CACHE_DIR to a tiktoken cache that holds it") from None

from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast  # noqa: E402  (slow import, after checks)
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()
eot, dropout = (GPT2_VOCAB - 1 if is_gpt2 else None), args.get("dropout", 0.0)
if meta.get("chat"):  # a chat model: its vocabulary runs to the chat tokens (lib/chat.py), and a reply ends at <|end|>
    vocab = chat.ChatTokenizer(meta).vocab_size
own_tokenizer = str(meta.get("tokenizer", "")).startswith("hf:") and "tokenizer_json" in meta  # train_tokenizer.py's
if own_tokenizer:
    from lib.tokenizer import load_tokenizer  # noqa: E402

    eot = load_tokenizer(meta).eot
try:
    config = GPT2Config(vocab_size=vocab, n_positions=args["block_size"], n_embd=args["n_embd"],
                        n_layer=args["n_layer"], n_head=args["n_head"], activation_function="gelu_new",
                        layer_norm_epsilon=1e-5, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        tie_word_embeddings=True, bos_token_id=eot,
                        eos_token_id=meta["chat"]["tokens"][chat.END] if meta.get("chat") else eot)
    with torch.device("meta"):  # shapes only: the weights come from the checkpoint
        hf = GPT2LMHeadModel(config)
except ValueError as e:
    raise UserError(f"{path}: model_args {args} make no GPT-2 ({e})") from None
hf.load_state_dict(gpt2_state_dict(sd, hf.state_dict(), args["bias"], vocab, path), strict=True, assign=True)
hf.tie_weights()  # lm_head is wte again after assign=True

staging = f"{hf_dir}.tmp-{os.getpid()}"  # written in full first, then swapped in whole
created = not os.path.exists(hf_dir)  # then made here, for its lock, and removed again should the export fail
held = None
try:
    os.makedirs(hf_dir, exist_ok=True)
    held = files.lock(hf_dir, "export", "--hf_dir")  # one export into hf_dir at a time
    for stale in glob.glob(glob.escape(hf_dir) + ".tmp-*"):  # staging folders of killed exports (none runs: the lock)
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(staging)
    hf.save_pretrained(staging)
    for name, data in tokenizer_files.items():
        with open(os.path.join(staging, name), "wb") as f:
            f.write(data)
    if is_gpt2:  # tokenizer.json and tokenizer_config.json, for AutoTokenizer
        merges = [tuple(line.split(" ")) for line in tokenizer_files["merges.txt"].decode().splitlines()[1:] if line]
        GPT2TokenizerFast(vocab=json.loads(tokenizer_files["vocab.json"]), merges=merges,
                          model_max_length=args["block_size"]).save_pretrained(staging)
        tokenizer = "GPT-2 tokenizer"
    elif own_tokenizer:  # the tokenizer.json the checkpoint carries, as a transformers fast tokenizer
        from transformers import PreTrainedTokenizerFast  # noqa: E402

        with open(os.path.join(staging, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(meta["tokenizer_json"])
        special = {"eos_token": EOT, "bos_token": EOT} if eot is not None else {}
        PreTrainedTokenizerFast(tokenizer_file=os.path.join(staging, "tokenizer.json"),
                                model_max_length=args["block_size"], **special).save_pretrained(staging)
        tokenizer = f"your own tokenizer {meta['tokenizer']} (tokenizer.json)"
    elif "stoi" in meta:
        with open(os.path.join(staging, "char_vocab.json"), "w", encoding="utf-8") as f:
            json.dump(meta["stoi"], f, ensure_ascii=False, indent=0)
        tokenizer = f"char_vocab.json (character-level{'' if meta.get('chat') else ', no transformers tokenizer'})"
    else:
        tokenizer = f"no tokenizer files (tokenizer {meta.get('tokenizer')!r} unknown here)"
    if meta.get("chat"):  # the chat tokens and template, so that apply_chat_template gives chat.py's ids
        tokenizer += chat.export_tokenizer(staging, meta, args["block_size"])
    written = {name: file_sha256(os.path.join(staging, name)) for name in sorted(os.listdir(staging))}
    files.write_json(os.path.join(staging, MARKER), {"checkpoint": os.path.abspath(path), "iter_num": state["iter_num"],
                                                     "tokenizer": tokenizer, "files": written})
    keep = check_target(hf_dir, lambda name: name in written or name == MARKER, overwrite)  # the names written now
    files.swap_folder(staging, hf_dir, keep)
except Exception as e:  # a full disk, a folder in the way: one line (safetensors' own errors too)
    if files.errno_of(e) is None:
        raise
    raise files.failed(e, hf_dir, "export") from None
finally:
    shutil.rmtree(staging, ignore_errors=True)  # only left if something failed
    if created and os.path.isdir(hf_dir) and os.listdir(hf_dir) == [files.LOCK]:  # a failed export into a new folder
        shutil.rmtree(hf_dir, ignore_errors=True)
    files.unlock(held)
print(f"exported {path} (iter {state['iter_num']}) to {hf_dir}: GPT-2 with {args['n_layer']} layers, "
      f"{args['n_head']} heads, n_embd {args['n_embd']}, {args['block_size']} positions, vocab {vocab}; {tokenizer}"
      f"{f'; kept {files.names(keep)}, which no export wrote' if keep else ''}")
