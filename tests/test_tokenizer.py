"""load_tokenizer: tokenizer.json and sentencepiece models, chat templates, left padding, stop ids."""
import json

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sqlm_jax.tokenizer import load_tokenizer, pad_left

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def fast_folder(tmp_path):
    """A word-level tokenizer.json folder with Qwen-style chat special tokens."""
    words = ["<pad>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "user", "assistant",
             "what", "is", "2", "+", "?"]
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r"\n| "), behavior="removed")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>", "<|endoftext|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    return tmp_path


def test_chat_prompt_ends_with_generation_prompt_and_stop_ids_come_from_generation_config(fast_folder):
    tok = load_tokenizer(fast_folder)
    ids = tok.chat_prompt("what is 2 + 2 ?")
    vocab = tok.hf.get_vocab()
    assert ids[0] == vocab["<|im_start|>"]
    assert ids[-2:] == [vocab["<|im_start|>"], vocab["assistant"]]  # whitespace is not a token here
    assert tok.stop_ids == (2, 3) and tok.pad_id == 0


def test_decode_stops_at_the_first_stop_id(fast_folder):
    tok = load_tokenizer(fast_folder)
    what, is_, im_end = (tok.hf.get_vocab()[w] for w in ("what", "is", "<|im_end|>"))
    assert tok.decode([what, is_, im_end, what]).split() == ["what", "is"]


def test_pad_left_right_aligns_each_row():
    ids, mask = pad_left([[5, 6, 7], [8]], pad_id=0, length=4)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="does not fit"):
        pad_left([[1, 2, 3]], pad_id=0, length=2)


def test_sentencepiece_model_loads_with_its_chat_template(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox jumps over the lazy dog {i}" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=3, minloglevel=2)
    folder = tmp_path / "tok"
    folder.mkdir()
    (tmp_path / "sp.model").rename(folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>",
        "chat_template": "{% for m in messages %}the {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}over the{% endif %}"}))
    tok = load_tokenizer(folder)
    assert tok.stop_ids == (2,) and tok.pad_id == 3
    prompt = tok.chat_prompt("the lazy fox")
    assert tok.hf.decode(prompt) == "the the lazy fox over the"
    assert tok.decode(tok.encode("the lazy dog") + [2] + tok.encode("fox")) == "the lazy dog"


def test_missing_chat_template_is_a_clear_error(fast_folder):
    config = json.loads((fast_folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (fast_folder / "tokenizer_config.json").write_text(json.dumps(config))
    for f in fast_folder.glob("chat_template.*"):
        f.unlink()
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(fast_folder)
