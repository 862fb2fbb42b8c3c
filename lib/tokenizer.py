"""
Text <-> token ids for a dataset's metadata (batches.load_meta / checkpoint_meta): its characters (stoi, itos),
or GPT-2's BPE via tiktoken (the tokenizer 'gpt2', and any metadata without a character vocabulary), or your own
byte-level BPE (tokenizer 'hf:<hash>', data/train_tokenizer.py) from the tokenizer.json the metadata embeds.

encode() reads all text as text: a special token's spelling in it (a literal "<|endoftext|>" in a document) becomes
the ids of its characters, as tiktoken's encode_ordinary and data/*/prepare.py do. Only a prompt, with
allow_special=True, may ask for the special token itself by its spelling (sample.py --start='<|endoftext|>').

    tok = load_tokenizer(meta, vocab_size=model.config.vocab_size)
    ids = tok.encode("ROMEO:"); text = tok.decode(ids)
    tok.encode(prompt, allow_special=True)  # a prompt may hold "<|endoftext|>" as the token itself
    tok.eot           # <|endoftext|>'s id, or None (characters)
    tok.valid_vocab   # ids >= this are padding of the model's vocabulary: never sampled
    tok.token_bytes(vocab_size)  # UTF-8 bytes each id stands for (0: padding, special tokens), for bits per byte
    tok.bytes_of(id)  # the bytes one token stands for (a BPE token may hold part of a character): for streaming
"""

import torch

from lib.runtime import UserError


class CharTokenizer:
    name = "char"
    eot = None

    def __init__(self, stoi, itos):
        # itos has int keys in meta.pkl, str keys once it went through JSON; a list works too
        items = itos.items() if isinstance(itos, dict) else enumerate(itos)
        self.itos = {int(i): ch for i, ch in items}
        self.stoi = {ch: int(i) for ch, i in stoi.items()}
        self.valid_vocab = len(self.itos)

    def encode(self, text, allow_special=False):  # (characters have no special tokens)
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise UserError(f"the prompt has characters the model never saw: {''.join(unknown)!r}")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.itos.get(int(i), "") for i in ids)

    def bytes_of(self, i):
        return self.itos.get(int(i), "").encode("utf-8")

    def token_bytes(self, vocab_size):
        out = torch.zeros(vocab_size, dtype=torch.long)
        for i, ch in self.itos.items():
            if i < vocab_size:
                out[i] = len(ch.encode("utf-8"))
        return out


class BPETokenizer:
    def __init__(self, name, vocab_size=None):
        import tiktoken

        try:
            self.enc = tiktoken.get_encoding(name)
        except Exception as e:  # tiktoken downloads its files once, then reads them from its cache
            raise UserError(f"could not load tiktoken's {name} encoding ({type(e).__name__}); without network, set "
                            f"TIKTOKEN_CACHE_DIR to a folder holding its cached files") from None
        self.name, self.eot = name, self.enc.eot_token
        self.valid_vocab = min(self.enc.n_vocab, vocab_size or self.enc.n_vocab)  # past n_vocab: padding
        self._bytes = None

    def encode(self, text, allow_special=False):
        if allow_special:
            return self.enc.encode(text, allowed_special={"<|endoftext|>"})
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])

    def bytes_of(self, i):
        return self.enc.decode_single_token_bytes(int(i))

    def token_bytes(self, vocab_size):
        if self._bytes is None:
            special = {self.enc.encode_single_token(s) for s in self.enc.special_tokens_set}
            self._bytes = torch.tensor([0 if i in special else len(self.enc.decode_single_token_bytes(i))
                                        for i in range(self.enc.n_vocab)], dtype=torch.long)
        out = torch.zeros(vocab_size, dtype=torch.long)
        n = min(vocab_size, len(self._bytes))
        out[:n] = self._bytes[:n]
        return out


def _byte_alphabet():
    """GPT-2's byte-level alphabet (the printable character standing for each byte), as tokenizers' ByteLevel uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


BYTE_OF = _byte_alphabet()  # character -> byte


class HFTokenizer:
    """Your own byte-level BPE (data/train_tokenizer.py), from the tokenizer.json that meta.json embeds."""

    def __init__(self, name, tokenizer_json, vocab_size=None):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # a damaged file in the metadata or checkpoint
            raise UserError(f"the tokenizer.json that the metadata of {name} holds cannot be loaded "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}): re-run the dataset's "
                            f"prepare.py with --tokenizer=path/to/tokenizer.json") from None
        self.name, self.eot = name, self.tok.token_to_id("<|endoftext|>")
        n = self.tok.get_vocab_size()
        self.valid_vocab = min(n, vocab_size or n)
        self.special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        self._bytes = {}

    def encode(self, text, allow_special=False):
        self.tok.encode_special_tokens = not allow_special  # True: "<|endoftext|>" in the text is text
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def bytes_of(self, i):
        i = int(i)
        if i not in self._bytes:
            piece = self.tok.id_to_token(i)
            if piece is None:
                self._bytes[i] = b""
            elif piece in self.special:
                self._bytes[i] = piece.encode("utf-8")
            else:
                self._bytes[i] = bytes(BYTE_OF[c] for c in piece)
        return self._bytes[i]

    def token_bytes(self, vocab_size):
        out = torch.zeros(vocab_size, dtype=torch.long)
        for i in range(min(vocab_size, self.tok.get_vocab_size())):
            piece = self.tok.id_to_token(i)
            if piece is not None and piece not in self.special:
                out[i] = len(self.bytes_of(i))
        return out


def load_tokenizer(meta, vocab_size=None):
    """The tokenizer of a dataset's metadata; vocab_size (the model's) checks that its vocabulary fits."""
    meta = meta or {}
    if "stoi" in meta:  # a character-level dataset
        tok = CharTokenizer(meta["stoi"], meta["itos"])
        if vocab_size is not None and tok.valid_vocab > vocab_size:
            raise UserError(f"the dataset's vocabulary has {tok.valid_vocab} characters but the model only "
                            f"{vocab_size} tokens")
        return tok
    name = meta.get("tokenizer") or "gpt2"
    if name.startswith("hf:"):
        if "tokenizer_json" not in meta:
            raise UserError(f"the metadata names tokenizer {name} but does not hold its tokenizer.json: re-run the "
                            f"dataset's prepare.py with --tokenizer=path/to/tokenizer.json")
        return HFTokenizer(name, meta["tokenizer_json"], vocab_size)
    if name == "char":
        raise UserError("the dataset's metadata says tokenizer 'char' but holds no character vocabulary (stoi): "
                        "re-run its prepare.py")
    return BPETokenizer(name, vocab_size)
