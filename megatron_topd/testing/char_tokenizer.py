"""A character-level HF tokenizer over a Unicode alphabet, built offline at test time: the "other tokenizer" of the
cross-tokenizer tests (megatron_topd/topd/cross_tokenizer.py), beside tiny_hf's byte-level BPE.

It differs from the BPE in every way that matters to an alignment: one token per character (BPE: several characters
per token, and several byte tokens per rare character), a WordLevel model with a ``Fuse`` decoder (not byte-level:
the alignment decodes it incrementally), and its own special tokens (``<pad> <s> </s> <unk>`` vs ``<|...|>``).
"""
from __future__ import annotations

from pathlib import Path

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIALS))
# ASCII letters, digits, punctuation, whitespace (space, newline, tab) and characters of 2, 3 and 4 UTF-8 bytes.
ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n\t.,;:!?+-=*/()[]<>|'\"_"
    "éöüßñøçΩω€中文字語😀🚀"
)


def build_char_tokenizer(out_dir: str | Path, alphabet: str = ALPHABET) -> Path:
    """One token per character of ``alphabet`` after the specials; any other character is ``<unk>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *chars))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS[UNK_ID]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[PAD_ID], bos_token=SPECIALS[BOS_ID],
                                   eos_token=SPECIALS[EOS_ID], unk_token=SPECIALS[UNK_ID])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out
