"""The synthetic chat corpus and the tokenizer of the shipped tiny model.

The corpus stands in for pretraining: correct worked examples of one problem family (a number of up
to four digits times a one-digit number), written as chats in the two roles SQLM needs:

* proposer: the topic prompt -> one question, e.g. ``7230*3``;
* solver: the solver instruction and a question -> an answer, in one of two ways:
  straight away, ``<answer>21690</answer>``, or after a scratchpad that builds the product up one
  digit at a time, ``<think>7*3=21 72*3=210+6=216 723*3=2160+9=2169 7230*3=21690+0=21690</think>
  <answer>21690</answer>``.

Every answer is correct. Direct answers are the more common kind (as terse answers are in text), and
the harder to get right: a small model that answers directly makes scattered mistakes, while its
worked answers mostly agree with each other. So sampled answers' majority beats the greedy answer
(the self-consistency gap majority-vote self-play learns from); see docs/results.md.

Problems of the evaluation set can be excluded (`exclude`), so held-out accuracy measures
generalisation, not recall. Pure functions of a seed: the same seed gives the same corpus.
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping

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

# A solver answer is written straight away ("direct"), or after a scratchpad in one of these styles:
# over a's digits left to right (``prefix``, prefixes of a) or right to left (``suffix``, suffixes of a).
WORKED_STYLES = ("prefix", "suffix")


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

    def parse(self, text: str) -> tuple[int, int] | None:
        """The operands of ``text`` if it is exactly a question of this family, else None."""
        pattern = re.escape(self.template).replace(r"\{a\}", r"(\d+)").replace(r"\{b\}", r"(\d+)")
        match = re.fullmatch(pattern, text.strip())
        if not match:
            return None
        a, b = int(match.group(1)), int(match.group(2))
        inside = (self.a_range[0] <= a <= self.a_range[1] and self.b_range[0] <= b <= self.b_range[1])
        return (a, b) if inside else None


def scratchpad(a: int, b: int, style: str) -> str:
    """The reasoning inside <think>: ``a * b`` built up one digit of ``a`` at a time.

    ``prefix`` walks ``a``'s digits left to right: each prefix of ``a`` times ``b`` is ten times the
    previous prefix's product plus the new digit times ``b``. ``suffix`` walks them right to left:
    each suffix times ``b`` is the new digit times ``b``, shifted to its place, plus the previous
    suffix's product. Each step copies its operand whole from the question and needs one
    single-digit product and one addition; the two methods add different numbers, so they make
    different mistakes.

    7230*3, prefix: 7*3=21 72*3=210+6=216 723*3=2160+9=2169 7230*3=21690+0=21690
    7230*3, suffix: 0*3=0 30*3=90+0=90 230*3=600+90=690 7230*3=21000+690=21690
    """
    digits = str(a)
    if style not in WORKED_STYLES:
        raise ValueError(f"unknown style {style!r}; valid: {WORKED_STYLES}")
    if style == "prefix":
        total = int(digits[0]) * b
        steps = [f"{digits[0]}*{b}={total}"]
        for k in range(2, len(digits) + 1):
            part = int(digits[k - 1]) * b
            steps.append(f"{digits[:k]}*{b}={total * 10}+{part}={total * 10 + part}")
            total = total * 10 + part
    else:
        total = int(digits[-1]) * b
        steps = [f"{digits[-1]}*{b}={total}"]
        for k in range(2, len(digits) + 1):
            part = int(digits[-k]) * b * 10 ** (k - 1)
            steps.append(f"{digits[-k:]}*{b}={part}+{total}={part + total}")
            total += part
    return " ".join(steps)


def solver_response(a: int, b: int, style: str) -> str:
    if style == "direct":
        return f"<answer>{a * b}</answer>"
    return f"<think>{scratchpad(a, b, style)}</think><answer>{a * b}</answer>"


def default_solver_prompt(question: str) -> str:
    """The arithmetic task's solver prompt with the tiny instruction (MathTask.solver_prompt)."""
    return f"{SOLVER_INSTRUCTION} {question}"


def chat_examples(n: int, seed: int, *, family: ProblemFamily = ProblemFamily(),
                  proposer_fraction: float = 0.1, worked_style: str = "prefix",
                  worked_fraction: float | Mapping[int, float] = 0.5,
                  proposer_prompt: str = PROPOSER_PROMPT,
                  solver_prompt: Callable[[str], str] = default_solver_prompt,
                  exclude: Iterable[str] = ()) -> list[tuple[str, str]]:
    """``n`` (user, assistant) chats: a ``proposer_fraction`` of proposer turns, the rest solver turns.

    A solver turn is worked (a ``worked_style`` scratchpad, then the answer) with probability
    ``worked_fraction``, a number or a mapping from the second operand ``b`` to one; else direct.
    Questions in ``exclude`` (question texts, e.g. the held-out set's) never appear, in either role.
    """
    if worked_style not in WORKED_STYLES:
        raise ValueError(f"worked_style must be one of {WORKED_STYLES}, got {worked_style!r}")
    b_values = range(family.b_range[0], family.b_range[1] + 1)
    if isinstance(worked_fraction, Mapping):
        missing = [b for b in b_values if b not in worked_fraction]
        if missing:
            raise ValueError(f"worked_fraction gives no fraction for b = {missing}")
        fraction = worked_fraction
    else:
        fraction = dict.fromkeys(b_values, worked_fraction)
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
            style = worked_style if rng.random() < fraction[b] else "direct"
            chats.append((solver_prompt(question), solver_response(a, b, style)))
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

