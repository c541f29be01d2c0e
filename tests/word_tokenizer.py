"""A tokenizer for the tiny test models (tests import it by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations


def make_word_tokenizer(chat: bool = False):
    """A word-level tokenizer over the tiny models' 96 ids ("w0" .. "w95", space separated); ``chat``: with a chat
    template (each message's content, then "w1" opens the assistant turn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w3", eos_token="w2")
    if chat:
        out.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                             "{% if add_generation_prompt %}w1{% endif %}")
    return out
