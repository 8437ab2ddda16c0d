"""The synthetic chat corpus and the tokenizer of the shipped tiny model.

The corpus stands in for pretraining: correct worked examples of one problem family (a 2–3-digit
number times a 1–2-digit number), written as chats in the two roles SQLM needs:

* proposer: the topic prompt -> one question, e.g. ``347*26``;
* solver: the solver instruction and a question -> a worked answer,
  ``<think>300*26=7800 40*26=1040 7*26=182 7800+1040+182=9022</think><answer>9022</answer>``.

Every answer is correct. The scratchpad splits the first operand by place value, multiplies each part
by the second, then adds the partial products. Each example is written in one of several styles
(parts in descending or ascending order; one sum or a running sum), as text by different authors
would be: different styles make different mistakes, which is what gives majority voting over sampled
answers an edge over the greedy one (the self-consistency gap self-play learns from).

Problems of the evaluation set can be excluded (`exclude`), so held-out accuracy measures
generalisation, not recall. Pure functions of a seed: the same seed gives the same corpus.
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Callable, Iterable

# The tiny model's prompts: short, because a character-level model pays per character.
PROPOSER_PROMPT = "Write a multiplication problem."
SOLVER_INSTRUCTION = "Solve:"
QUESTION_TEMPLATE = "{a}*{b}"

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)
# Tags are single tokens (as <think> is in Qwen3's vocabulary); they are not special, so decoding
# with skip_special_tokens keeps them and the answer stays parseable.
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
ROLE_NAMES = ("system", "user", "assistant")

# Qwen's ChatML, without Qwen's default system message (it would double every prompt's length).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Split a by place value (desc/asc order of its parts; one sum or a running sum), or split b (the
# tens part or the ones part first; a is copied whole).
STYLES = ("desc_sum", "asc_sum", "desc_running", "asc_running", "btens", "bones", "horner", "horner_verbose")


@dataclasses.dataclass(frozen=True)
class ProblemFamily:
    """Questions ``template.format(a=a, b=b)`` with ``a`` in ``a_range`` and ``b`` in ``b_range``.

    Ranges are inclusive. Operands are uniform over their range, or with ``by_digits`` the number of
    digits is uniform first (short problems are then common, as easy text is in a pretraining mix).
    """

    a_range: tuple[int, int] = (10, 999)
    b_range: tuple[int, int] = (2, 99)
    template: str = QUESTION_TEMPLATE
    by_digits: bool = False

    def sample(self, rng: random.Random) -> tuple[int, int]:
        return self._operand(rng, *self.a_range), self._operand(rng, *self.b_range)

    def _operand(self, rng: random.Random, low: int, high: int) -> int:
        if self.by_digits:
            digits = rng.randint(len(str(low)), len(str(high)))
            low, high = max(low, 10 ** (digits - 1)), min(high, 10 ** digits - 1)
        return rng.randint(low, high)

    def question(self, a: int, b: int) -> str:
        return self.template.format(a=a, b=b)


def place_value_parts(a: int) -> list[int]:
    """Non-zero place-value parts of ``a``, largest first: 305 -> [300, 5]; 0 -> [0]."""
    digits = str(a)
    parts = [int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits) if d != "0"]
    return parts or [0]


def scratchpad(a: int, b: int, style: str) -> str:
    """The reasoning inside <think>: partial products, then their sum.

    ``{desc|asc}_{sum|running}`` multiplies each place-value part of ``a`` by ``b`` (largest part
    first or last), then adds the partial products in one sum or one addition at a time.
    ``btens`` / ``bones`` multiplies ``a`` by each place-value part of ``b`` (tens or ones first).
    """
    if style.startswith("horner"):
        return horner(a, b, verbose=style == "horner_verbose")
    if style in ("btens", "bones"):
        parts = place_value_parts(b)
        pairs = [(a, p) for p in (parts if style == "btens" else parts[::-1])]
        adding = "sum"
    else:
        order, adding = style.split("_")
        parts = place_value_parts(a)
        pairs = [(p, b) for p in (parts if order == "desc" else parts[::-1])]
    products = [x * y for x, y in pairs]
    steps = [f"{x}*{y}={x * y}" for x, y in pairs]
    if len(products) > 1:
        if adding == "sum":
            steps.append("+".join(map(str, products)) + f"={sum(products)}")
        else:
            total = products[0]
            for x in products[1:]:
                steps.append(f"{total}+{x}={total + x}")
                total += x
    return " ".join(steps)


def horner(a: int, b: int, verbose: bool) -> str:
    """Left to right over ``a``'s digits: each prefix of ``a`` times ``b`` is ten times the previous
    prefix's product plus the new digit times ``b``. Every number a step needs is next to it: the
    prefix is copied whole from the question, the new digit is the prefix's last, the previous
    product is the previous step's result.

    347*26 -> 3*26=78 34*26=780+104=884 347*26=8840+182=9022
    verbose -> 3*26=78 34*26=78*10+4*26=780+104=884 347*26=884*10+7*26=8840+182=9022
    """
    digits = str(a)
    total = int(digits[0]) * b
    steps = [f"{digits[0]}*{b}={total}"]
    for k in range(2, len(digits) + 1):
        d = int(digits[k - 1])
        explain = f"{total}*10+{d}*{b}=" if verbose else ""
        steps.append(f"{digits[:k]}*{b}={explain}{total * 10}+{d * b}={total * 10 + d * b}")
        total = total * 10 + d * b
    return " ".join(steps)


def solver_response(a: int, b: int, style: str) -> str:
    return f"<think>{scratchpad(a, b, style)}</think><answer>{a * b}</answer>"


def default_solver_prompt(question: str) -> str:
    """The arithmetic task's solver prompt with the tiny instruction (MathTask.solver_prompt)."""
    return f"{SOLVER_INSTRUCTION} {question}"


def chat_examples(n: int, seed: int, *, family: ProblemFamily = ProblemFamily(),
                  proposer_fraction: float = 0.1, styles: tuple[str, ...] = STYLES,
                  proposer_prompt: str = PROPOSER_PROMPT,
                  solver_prompt: Callable[[str], str] = default_solver_prompt,
                  exclude: Iterable[str] = ()) -> list[tuple[str, str]]:
    """``n`` (user, assistant) chats: a ``proposer_fraction`` of proposer turns, the rest solver turns.

    Questions in ``exclude`` (question texts, e.g. the held-out set's) never appear, in either role.
    """
    unknown = set(styles) - set(STYLES)
    if unknown or not styles:
        raise ValueError(f"styles must be a non-empty subset of {STYLES}, got {styles}")
    excluded = set(exclude)
    rng = random.Random(seed)
    chats = []
    while len(chats) < n:
        a, b = family.sample(rng)
        question = family.question(a, b)
        if question in excluded:
            continue
        if rng.random() < proposer_fraction:
            chats.append((proposer_prompt, question))
        else:
            chats.append((solver_prompt(question),
                          solver_response(a, b, rng.choice(styles))))
    return chats


def byte_symbols() -> list[str]:
    """The 256 byte-level symbols (GPT-2's bytes_to_unicode), in byte order: printable bytes stand for
    themselves, the others map to unused code points (space is "Ġ", newline "Ċ")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def build_tokenizer():
    """A byte-level BPE tokenizer in Qwen2's layout, with ChatML special tokens and a chat template.

    Qwen2's pipeline (NFC, Qwen's split regex, byte-level) with a tiny vocabulary: the 256 byte
    symbols (so every character is one token and digits are read one by one), merges only for the
    role names the chat template writes in every turn, the special tokens and the four tag tokens.
    It must be Qwen2's pipeline exactly: transformers loads any qwen2 checkpoint's tokenizer as
    `Qwen2Tokenizer`, which rebuilds the pipeline from the vocabulary and merges alone.
    Stop token and eos: <|im_end|>; pad: <|endoftext|>.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    symbols = byte_symbols()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + TAG_TOKENS + tuple(symbols))}
    merges = []
    for word in ROLE_NAMES:  # merge left to right: u+s, us+e, use+r
        for k in range(2, len(word) + 1):
            if word[:k] not in vocab:
                vocab[word[:k]] = len(vocab)
                merges.append((word[:k - 1], word[k - 1]))
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    core.add_tokens([AddedToken(t, normalized=False, special=False) for t in TAG_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=None, eos_token=IM_END, pad_token=PAD, unk_token=None,
        additional_special_tokens=[IM_START], chat_template=CHAT_TEMPLATE, padding_side="left",
        model_max_length=512)


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """Writes the tokenizer files and a generation_config.json naming <|im_end|> as the stop id."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    stop = tokenizer.convert_tokens_to_ids(IM_END)
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": stop, "pad_token_id": tokenizer.pad_token_id, "do_sample": False}, indent=2))

