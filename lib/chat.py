"""
The chat template, in one place: prepare (data/chat/prepare.py), training, chat.py, eval_chat.py and export.py all
use this definition.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": text}. Each message
becomes its role's marker token, its text, then the end-of-turn token:

    <|system|>You are brief.<|end|><|user|>spell cat backwards<|end|><|assistant|>tac<|end|>

The four markers are special tokens placed right after the tokenizer's own vocabulary: for GPT-2's BPE (50,257 ids)
they are 50257..50260, four of the 47 unused ids of the 50,304-row embedding this repo pads GPT-2 to; characters and
your own BPE get them appended (ids vocab_size .. vocab_size + 3). Text is always encoded as plain text, so nothing
a user types can become a special token (not even "<|end|>" or "<|endoftext|>"). Training sees a loss on the
assistant's text and its <|end|> only (the loss mask); to answer, the model gets the conversation and <|assistant|>
and writes until <|end|>. meta.json keeps the markers' ids and the template in transformers' Jinja form (TEMPLATE),
which export.py writes as the tokenizer's chat_template, so apply_chat_template gives these same ids.

    tok = ChatTokenizer(meta)                  # a chat dataset's or a chat checkpoint's metadata
    ids, mask = tok.render(messages)           # token ids and the loss mask (1: assistant text and its <|end|>)
    ids = tok.prompt(messages)                 # the conversation so far, then <|assistant|>: what the model answers
    chat = Chat(model, tok); for t in chat.ask("hi"): ...   # a conversation whose KV cache outlives each turn
"""

import torch
from torch.nn import functional as F

from lib.runtime import UserError
from lib.tokenizer import BPETokenizer, HFTokenizer, load_tokenizer
from model import KVCache

ROLES = ("system", "user", "assistant")
END = "<|end|>"
TOKENS = tuple(f"<|{role}|>" for role in ROLES) + (END,)  # in id order, right after the tokenizer's vocabulary
GPT2_PADDED = 50304  # GPT-2's 50,257 tokens padded to a multiple of 64 (faster matmuls); the chat tokens fit in it
# transformers' chat_template (Jinja): exactly render()'s ids once the markers are special tokens of the tokenizer
TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


class BadConversation(ValueError):
    """A conversation that cannot be rendered: the reason, in words."""


def base_vocab_size(meta):
    """The tokenizer's own vocabulary (the chat markers come right after it)."""
    if meta.get("chat"):
        return meta["chat"]["tokens"][TOKENS[0]]
    if "stoi" in meta:
        return len(meta["stoi"])
    if str(meta.get("tokenizer", "")).startswith("hf:"):
        return load_tokenizer(meta).tok.get_vocab_size()
    return 50257  # GPT-2's BPE


def chat_spec(base_size):
    """meta.json's "chat" entry for a tokenizer of base_size ids."""
    return {"tokens": {t: base_size + i for i, t in enumerate(TOKENS)}, "template": TEMPLATE}


def plain_encoder(tok):
    """text -> ids of lib.tokenizer's tok with every special token's text read as plain text; BadConversation for
    characters a character vocabulary lacks."""
    if isinstance(tok, BPETokenizer):
        return tok.enc.encode_ordinary
    if isinstance(tok, HFTokenizer):
        tok.tok.encode_special_tokens = True  # this instance's own Tokenizer: "<|endoftext|>" is then just text
        return lambda text: tok.tok.encode(text, add_special_tokens=False).ids
    stoi = tok.stoi  # characters: there is no special token to type

    def encode_chars(text):
        unknown = set(text) - stoi.keys()
        if unknown:
            raise BadConversation(f"it has characters the model never saw: {''.join(sorted(unknown))!r}")
        return [stoi[c] for c in text]
    return encode_chars


class ChatTokenizer:
    """The chat template on top of a dataset's tokenizer (lib/tokenizer.py), from metadata that has a "chat" entry."""

    def __init__(self, meta):
        spec = (meta or {}).get("chat")
        if not spec:
            raise UserError("this model or dataset has no chat template: finetune it on chat data first "
                            "(data/chat/prepare.py, then train.py --init_from=... --dataset=...; docs/chat.md)")
        ids = spec.get("tokens", {})
        first = ids.get(TOKENS[0])
        if not isinstance(first, int) or [ids.get(t) for t in TOKENS] != list(range(first, first + len(TOKENS))):
            raise UserError(f"the chat template's tokens {sorted(ids)} are not this repo's {', '.join(TOKENS)}: "
                            f"re-run data/chat/prepare.py")
        self.base = load_tokenizer(meta)
        self.encode_text = plain_encoder(self.base)
        self.role_ids = {role: ids[f"<|{role}|>"] for role in ROLES}
        self.end = ids[END]
        self.vocab_size = first + len(TOKENS)  # ids a reply may hold: the tokenizer's and the markers
        self.special = set(ids.values()) | ({self.base.eot} if self.base.eot is not None else set())

    def message(self, role, content):
        """(ids, mask) of one message: its marker, text and <|end|>; the mask is 1 on an assistant's text and end."""
        if role not in self.role_ids:
            raise BadConversation(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise BadConversation(f"a {role} message has content of type {type(content).__name__}, not text")
        text = self.encode_text(content)
        trained = int(role == "assistant")
        return [self.role_ids[role]] + text + [self.end], [0] + [trained] * (len(text) + 1)

    def render(self, messages):
        """(ids, mask) of a whole conversation; BadConversation says why one cannot be used for training."""
        if not isinstance(messages, list) or not messages:
            raise BadConversation(f"'messages' is {'empty' if messages == [] else type(messages).__name__}, "
                                  f"not a list of messages")
        ids, mask = [], []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise BadConversation(f"message {i + 1} is not an object with a role and a content")
            try:
                m_ids, m_mask = self.message(m["role"], m["content"])
            except BadConversation as e:
                raise BadConversation(f"message {i + 1}: {e}") from None
            ids += m_ids
            mask += m_mask
        if not any(m["role"] == "assistant" for m in messages):
            raise BadConversation("no assistant turn: nothing to learn from")
        return ids, mask

    def prompt(self, messages):
        """The ids the model answers: the conversation so far, then <|assistant|>."""
        ids = []
        for m in messages:
            ids += self.message(m["role"], m["content"])[0]
        return ids + [self.role_ids["assistant"]]

    def bytes_of(self, i):
        return b"" if i in self.special else self.base.bytes_of(i)

    def decode(self, ids):
        return b"".join(self.bytes_of(i) for i in ids).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- a model that has not seen the tokens

def fit_vocab(model, data_meta, model_meta, say=print):
    """
    Finetuning a model on chat data whose markers it never learned (model_meta: the metadata it was trained with):
    grow its vocabulary to hold them (OpenAI's GPT-2: 50,257 -> 50,304 rows, the multiple of 64 this repo trains
    with; characters: +4) and start the markers' rows (input embedding and, when untied, output row) at the mean of
    the tokenizer's rows. A row of the mean embedding adds no direction of its own: a marker's logit starts at the
    average token's, and its embedding as a blend of the model's vocabulary, which SFT then moves. Nothing happens
    when the data has no chat template or the model already learned it.
    """
    if not data_meta.get("chat") or ((model_meta or {}).get("chat") or {}).get("tokens") == data_meta["chat"]["tokens"]:
        return
    first = data_meta["chat"]["tokens"][TOKENS[0]]
    need = first + len(TOKENS)
    old = model.config.vocab_size
    size = max(old, GPT2_PADDED if data_meta.get("tokenizer") == "gpt2" else need)
    tables = [model.lm_head] + ([] if model.config.tie_head else [model.transformer.wte])
    with torch.no_grad():
        for table in tables:
            weight = table.weight
            grown = weight.new_empty(size, weight.size(1))
            grown[:old] = weight
            grown[first:] = weight[:first].mean(dim=0)  # the markers and any rows past them (never sampled)
            table.weight = torch.nn.Parameter(grown)
    if model.config.tie_head:
        model.transformer.wte.weight = model.lm_head.weight
    model.transformer.wte.num_embeddings = model.lm_head.out_features = model.config.vocab_size = size
    say(f"chat tokens: {', '.join(TOKENS)} are ids {first}-{need - 1}; their rows start at the mean of the "
        f"{first:,} token rows{f', and the vocabulary grows from {old:,} to {size:,}' if size > old else ''}")


# ----------------------------------------------------------------------------- talking: the KV cache across turns

def sample_next(logits, temperature, top_k, vocab_limit, generator=None):
    """One token id from logits (vocab,): greedy at temperature 0, else from the top_k likeliest below vocab_limit."""
    logits = logits.float().clone()
    logits[vocab_limit:] = -float("inf")
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits[logits < kth] = -float("inf")
    return int(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator))


class Chat:
    """
    A conversation with a model whose KV cache lives from turn to turn: each turn runs only its own new tokens
    through the model (extend). When the conversation outgrows block_size, the oldest exchanges (a message and its
    reply; never the system message) are dropped and the cache is rebuilt from what is left; `dropped` counts those
    of the last ask(), for the caller to say so.
    """

    def __init__(self, model, tok, system=""):
        self.model, self.tok, self.block_size = model, tok, model.config.block_size
        self.device = next(model.parameters()).device
        self.reset(system)

    def reset(self, system=None):
        """Start over (with a new system message, when given)."""
        if system is not None:
            self.system = self.encode("system", system) if system else []
        self.turns = []  # the ids of each exchange after the system message: a message, <|assistant|>, reply, <|end|>
        self.cache, self.cached, self.logits = None, [], None  # the KV cache, the ids it holds, the last logits
        self.dropped = 0

    def encode(self, role, text):
        try:
            return self.tok.message(role, text)[0]
        except BadConversation as e:  # characters the vocabulary lacks
            raise UserError(f"the {role} message cannot be read: {e}") from None

    def ids(self):
        return self.system + [i for turn in self.turns for i in turn]

    def extend(self, ids):
        """Run ids through the model in one pass after the tokens in the cache; keep the logits after the last one."""
        if not ids:
            return
        with torch.no_grad():
            if self.cache is None:
                self.cache = KVCache(self.model.config, 1)
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            self.logits = self.model(x, kv_cache=self.cache)[0][0, -1]
            self.cached += ids

    def sync(self):
        """Make the cache hold exactly the conversation's ids: extend it when it holds a prefix of them, else (turns
        were dropped, or a Ctrl-C left the cache and the ids it holds apart) rebuild it."""
        ids = self.ids()
        if self.cache is None or self.cache.length != len(self.cached) or self.cached != ids[:len(self.cached)]:
            self.cache, self.cached = None, []
        self.extend(ids[len(self.cached):])

    def make_room(self, needed):
        """Drop the oldest turns, but the last, until needed more tokens fit in block_size; False if they cannot."""
        while len(self.ids()) + needed > self.block_size and len(self.turns) > 1:
            self.turns.pop(0)
            self.dropped += 1
        return len(self.ids()) + needed <= self.block_size

    def ask(self, text, max_new_tokens=256, temperature=0.0, top_k=None, generator=None):
        """
        Add a user message, run its tokens (and <|assistant|>) through the model, and return an iterator over the
        reply's token ids as they are sampled. The reply ends at <|end|> (or any other marker), after max_new_tokens,
        or where the context is full. Stopping the iterator early (a Ctrl-C, then close()) still ends the turn with
        <|end|>; a Ctrl-C while the message is read leaves the conversation as it was.
        """
        self.dropped = 0
        user = self.encode("user", text) + [self.tok.role_ids["assistant"]]
        room = min(max_new_tokens, self.block_size // 8) + 1  # an eighth of the context at least for the reply
        if len(self.system) + len(user) + room > self.block_size:
            raise UserError(f"the message is {len(user) - 1} tokens: too long for the model's context of "
                            f"{self.block_size} tokens (with the system message and room for a reply)")
        self.turns.append([])
        self.make_room(len(user) + room)
        self.turns[-1] = user  # the message, then <|assistant|>: the reply is written after them
        try:
            self.sync()
        except BaseException:
            self.turns.pop()
            raise
        return self._reply(max_new_tokens, temperature, top_k, generator)

    def _reply(self, max_new_tokens, temperature, top_k, generator):
        try:
            for _ in range(max_new_tokens):
                t = sample_next(self.logits, temperature, top_k, self.tok.vocab_size, generator)
                if t in self.tok.special or (len(self.ids()) >= self.block_size and not self.make_room(1)):
                    break
                self.turns[-1].append(t)
                yield t
                self.sync()
        finally:  # close the turn, also when stopped early; the cache catches up at the next sync
            if self.make_room(1):
                self.turns[-1].append(self.tok.end)


# ----------------------------------------------------------------------------- exact-match replies, in batches

@torch.no_grad()
def greedy_replies(model, tok, prompts, max_new_tokens, batch_size=64, autocast=None):
    """The greedy reply (text) to each prompt (ids from tok.prompt), prompts of equal length batched together."""
    from contextlib import nullcontext

    device = next(model.parameters()).device
    replies = [None] * len(prompts)
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for length, rows in sorted(by_length.items()):
        new = max(0, min(max_new_tokens, model.config.block_size - length))
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            x = torch.tensor([prompts[i] for i in batch], dtype=torch.long, device=device)
            with autocast or nullcontext():
                steps = list(model.generate_tokens(x, new, temperature=0, vocab_limit=tok.vocab_size,
                                                   stop_token=tok.end)) if new else []
            out = torch.cat(steps, dim=1).tolist() if steps else [[] for _ in batch]
            for i, ids in zip(batch, out):
                cut = next((k for k, t in enumerate(ids) if t in tok.special), len(ids))
                replies[i] = tok.decode(ids[:cut])
    return replies


# ----------------------------------------------------------------------------- transformers (export.py)

def export_tokenizer(folder, meta, block_size):
    """
    Give the transformers tokenizer export.py wrote into folder (GPT-2's, or your own BPE's) the chat tokens, as
    special tokens with these same ids, and TEMPLATE as its chat_template, with <|end|> as eos; characters, which have
    no transformers tokenizer of their own, get one (one token per character). Checked: apply_chat_template of a
    conversation gives render()'s ids. Returns what was written, in words.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = ChatTokenizer(meta)
    if "stoi" in meta:  # characters: a word-level vocabulary of single characters, split off one by one
        vocab = {**meta["stoi"], **meta["chat"]["tokens"]}
        char_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
        char_level.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        char_level.decoder = decoders.Fuse()
        hf = PreTrainedTokenizerFast(tokenizer_object=char_level, model_max_length=block_size)
    else:
        hf = AutoTokenizer.from_pretrained(folder)
    hf.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True, normalized=False)
                                                         for t in TOKENS]})
    hf.eos_token, hf.chat_template = END, TEMPLATE
    example = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, who are you?"},
               {"role": "assistant", "content": "A model."}, {"role": "user", "content": "OK."}]
    try:
        ids = tok.prompt(example)
    except BadConversation:  # a vocabulary without these characters: its own first characters instead
        text = "".join(sorted(meta["stoi"])[:8])
        example = [{"role": r, "content": text} for r in ("system", "user", "assistant", "user")]
        ids = tok.prompt(example)
    got = hf.apply_chat_template(example, add_generation_prompt=True, tokenize=True, return_dict=False)
    if [hf.convert_tokens_to_ids(t) for t in TOKENS] != [tok.role_ids[r] for r in ROLES] + [tok.end] or got != ids:
        raise UserError("the exported tokenizer does not give the chat template's ids (a tokenizer this export "
                        "cannot handle)")
    hf.save_pretrained(folder)
    what = "; and a transformers tokenizer of its characters" if "stoi" in meta else ""
    return f"{what}, with the chat tokens {', '.join(TOKENS)} ({tok.role_ids['system']}-{tok.end}) and chat_template"
