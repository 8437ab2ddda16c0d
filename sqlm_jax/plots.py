"""Pictures of a run: rewards and held-out accuracy, the emergent curriculum, a PCA of the questions.

Everything is read back from what a run writes in its workdir (``metrics.jsonl``, ``questions.jsonl``,
``samples.jsonl``, ``summary.json``; see ``sqlm_jax.run_log``), so the plots can be drawn while a run
is still going, after it ended, or for a run made on another machine::

    python -m sqlm_jax.plots WORKDIR [WORKDIR ...] [--task arithmetic] [--compare accuracy.png]

The features and the PCA are pure functions over plain data (``question_features``, ``embed_questions``,
``pca``, ``pca_spread``); the plotting functions only lay them out. Figures are drawn with
matplotlib's object API on the Agg canvas, never through pyplot, so no display is needed and the
caller's backend is left alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import zlib
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from sqlm_jax.tasks.algebra import parse_selected_question
from sqlm_jax.tasks.coding import parse_proposal

TASK_NAMES = ("arithmetic", "algebra", "coding")
PLOTS_DIR = "plots"
DPI = 120

TRAIN_CURVES = (("reward/solver", "solver reward"), ("reward/proposer", "proposer reward"),
                ("proposals/valid", "valid proposals"))
EVAL_CURVES = (("eval/greedy_accuracy", "greedy", "-"),
               ("eval/sampled_accuracy", "sampled (mean of n)", "--"),
               ("eval/majority_accuracy", "majority of n", ":"))

# The PCA sees at most this many questions: SVD cost and an unreadable scatter both grow with it.
MAX_PCA_POINTS = 2000
# Character n-grams hashed into this many buckets: few enough to keep the SVD quick, enough that
# the n-grams of a template (digits read as 0) rarely collide.
HASH_DIM = 256
NGRAMS = (2, 3, 4)
# Coding problems run to thousands of characters; their opening says what the problem is.
MAX_EMBED_CHARS = 2000


# ------------------------------------------------------------------------------------------- reading
def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a .jsonl file; [] when it is missing. Lines that do not parse are skipped,
    since a run still being written may end in a half-written line."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_summary(workdir: str | Path) -> dict:
    """summary.json of a finished run, {} for a run that has not finished (or a damaged file)."""
    try:
        summary = json.loads((Path(workdir) / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_series(lines: Iterable[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one scalar, sorted by step. A resumed run logs the steps after its last
    checkpoint twice; the later line wins, as it is the one the final model descends from."""
    by_step = {int(line["step"]): float(line[key]) for line in lines
               if _is_number(line.get("step")) and _is_number(line.get(key))}
    steps = np.array(sorted(by_step), dtype=int)
    return steps, np.array([by_step[s] for s in steps], dtype=float)


def eval_series(workdir: str | Path, key: str = "eval/greedy_accuracy") -> tuple[np.ndarray, np.ndarray]:
    """An evaluation curve from metrics.jsonl, else from summary.json's eval_history."""
    steps, values = metric_series(read_jsonl(Path(workdir) / "metrics.jsonl"), key)
    if steps.size == 0:
        steps, values = metric_series(read_summary(workdir).get("eval_history") or [], key)
    return steps, values


@dataclasses.dataclass
class Proposals:
    """Every logged proposal, flattened over steps: parallel lists."""

    steps: np.ndarray  # int [N]
    texts: list[str]
    valid: np.ndarray  # bool [N]
    agreement: np.ndarray  # float [N]: solver answers agreeing with the majority (NaN if not logged)

    def only_valid(self) -> Proposals:
        keep = self.valid
        return Proposals(self.steps[keep], [t for t, k in zip(self.texts, keep) if k], self.valid[keep],
                         self.agreement[keep])


def _padded(values, length: int, fill) -> list:
    values = list(values) if isinstance(values, list) else []
    return (values + [fill] * length)[:length]


def load_proposals(question_lines: Iterable[Mapping]) -> Proposals:
    """Flattens questions.jsonl lines (the last line of a step wins, as in `metric_series`).
    A line missing `valid` counts its proposals valid; a missing `agreement` reads as NaN."""
    by_step = {int(line["step"]): line for line in question_lines
               if _is_number(line.get("step")) and isinstance(line.get("proposals"), list)}
    steps, texts, valid, agreement = [], [], [], []
    for step in sorted(by_step):
        line = by_step[step]
        proposals = [p if isinstance(p, str) else "" for p in line["proposals"]]
        count = len(proposals)
        steps += [step] * count
        texts += proposals
        valid += [bool(v) for v in _padded(line.get("valid", [True] * count), count, False)]
        agreement += [float(a) if _is_number(a) else math.nan
                      for a in _padded(line.get("agreement"), count, math.nan)]
    return Proposals(np.array(steps, dtype=int), texts, np.array(valid, dtype=bool),
                     np.array(agreement, dtype=float))


def solver_samples(metric_lines: Sequence[Mapping], sample_lines: Sequence[Mapping],
                   agreement: np.ndarray) -> int:
    """n, the solver answers per question, which the logged agreement counts are out of.

    Read from samples.jsonl (n rewards per question), else from the largest `agreement/k{j}` metric
    the math tasks log, else the largest agreement seen (a lower bound, for a bare questions.jsonl).
    """
    for line in sample_lines:
        if isinstance(line.get("solver_rewards"), list) and line["solver_rewards"]:
            return len(line["solver_rewards"])
    ks = [int(m.group(1)) for line in metric_lines for key in line
          if (m := re.fullmatch(r"agreement/k(\d+)", key))]
    if ks:
        return max(ks)
    seen = agreement[np.isfinite(agreement)]
    return max(1, math.ceil(seen.max())) if seen.size else 1


def infer_task(texts: Iterable[str]) -> str:
    """The task a run's proposals read like: coding proposals carry test cases, algebra ones a
    "Selected Question"; anything else is treated as arithmetic."""
    texts = list(texts)
    if any("|||" in t or "Test Cases:" in t for t in texts):
        return "coding"
    if any("Selected Question" in t for t in texts):
        return "algebra"
    return "arithmetic"


# ------------------------------------------------------------------------------------------ features
_NUMBER = re.compile(r"(?<![\w.])-?(\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# A binary operator sits between an operand (a digit or a closing parenthesis) and the next operand
# (a digit, possibly signed or parenthesised); this keeps "-5" a sign, not a subtraction.
_SYMBOL_OPERATOR = re.compile(r"[\d)]\s*([-+*/×÷xX·])\s*(?=[(-]?\s*\d)")
_OPERATOR_NAMES = {"+": "add", "-": "sub", "*": "mul", "×": "mul", "x": "mul", "X": "mul", "·": "mul",
                   "/": "div", "÷": "div"}
# Words are only a fallback (used when no symbol is found): "product", "sum" and the like also occur
# in questions that do not ask for that operation.
_WORD_OPERATORS = {
    "add": re.compile(r"\b(plus|add|added|sum)\b", re.I),
    "sub": re.compile(r"\b(minus|subtract|subtracted|difference)\b", re.I),
    "mul": re.compile(r"\b(times|multiply|multiplied|product)\b", re.I),
    "div": re.compile(r"\b(divide|divided|quotient)\b", re.I),
}
OPERATORS = ("add", "sub", "mul", "div")
# A variable: a lone letter right after a digit ("2y"), or next to an operator, "=" or a parenthesis
# ("3*x", "x ="), so that "a" in "a number" or "a 5% discount" and the pronoun "I" are not counted.
_VARIABLE = re.compile(r"(?:\d|[*+\-/=^(]\s*)([a-zA-Z])(?![a-zA-Z])"
                       r"|(?<![a-zA-Z])([a-zA-Z])(?=\s*[*+\-/=^)])")
_WORD = re.compile(r"\S+")


def question_text(text: str, task_name: str) -> str:
    """The question inside a logged proposal: algebra's text after "Selected Question", coding's
    problem before "Test Cases:". Pregenerated runs log the question itself, which is kept as is."""
    if task_name == "algebra":
        return parse_selected_question(text) or text.strip()
    if task_name == "coding":
        parsed = parse_proposal(text)
        return parsed[0] if parsed else text.split("Test Cases:")[0].strip()
    return text.strip()


def _digits(number: str) -> int:
    return len(str(int(number.replace(",", ""))))


def operand_digits(question: str) -> list[int]:
    """Digits of each number of the question, in order ("347*26" -> [3, 2])."""
    return [_digits(m.group(1)) for m in _NUMBER.finditer(question)]


def operator_counts(question: str) -> dict[str, int]:
    """How often each of + - * / joins two operands; spelled-out operators when there is no symbol."""
    counts = dict.fromkeys(OPERATORS, 0)
    for m in _SYMBOL_OPERATOR.finditer(question):
        counts[_OPERATOR_NAMES[m.group(1)]] += 1
    if not any(counts.values()):
        for name, pattern in _WORD_OPERATORS.items():
            counts[name] = len(pattern.findall(question))
    return counts


def variables(question: str) -> set[str]:
    """The letters used as variables in the question ("Solve 3*x + 2 = 11 for x." -> {"x"})."""
    return {a or b for a, b in _VARIABLE.findall(question)}


def _arithmetic_features(question: str) -> dict[str, float]:
    digits = operand_digits(question)
    numbers = [int(m.group(1).replace(",", "")) for m in _NUMBER.finditer(question)]
    # Digits of the operands' product: the size of the answer of a multiplication, and a scale of the
    # work for the other operators.
    product_digits = sum(math.log10(max(abs(v), 1)) for v in numbers)
    counts = operator_counts(question)
    total = sum(counts.values())
    return {
        "digits_a": float(digits[0]) if digits else 0.0,
        "digits_b": float(digits[1]) if len(digits) > 1 else 0.0,
        "digits_max": float(max(digits, default=0)),
        "product_digits": math.floor(product_digits) + 1.0 if numbers else 0.0,
        # Continuous sizes, which tell apart questions with equally long operands.
        "log10_a": math.log10(abs(numbers[0]) + 1) if numbers else 0.0,
        "log10_b": math.log10(abs(numbers[1]) + 1) if len(numbers) > 1 else 0.0,
        "numbers": float(len(numbers)),
        "operators": float(total),
        # Shares of the question's operators, so that their mean over proposals is the operator mix.
        **{f"op_{name}": counts[name] / total if total else 0.0 for name in OPERATORS},
        "op_none": 0.0 if total else 1.0,
        "chars": float(len(question)),
    }


def _algebra_features(question: str) -> dict[str, float]:
    return {
        "variables": float(len(variables(question))),
        "equations": float(question.count("=")),
        "numbers": float(len(_NUMBER.findall(question))),
        "digits_max": float(max(operand_digits(question), default=0)),
        "words": float(len(_WORD.findall(question))),
    }


def _coding_features(text: str) -> dict[str, float]:
    parsed = parse_proposal(text)
    problem, tests = parsed if parsed else (question_text(text, "coding"), ())
    input_ints = [len(_NUMBER.findall(given)) for given, _ in tests]
    return {
        "tests": float(len(tests)),
        "words": float(len(_WORD.findall(problem))),
        "input_ints": float(np.mean(input_ints)) if input_ints else 0.0,
    }


def question_features(text: str, task_name: str) -> dict[str, float]:
    """Difficulty features of one proposal (raw as logged, or the bare question), by regex.

    arithmetic: digits of the 1st / 2nd / largest operand, digits of the operands' product, log10 of
    the 1st / 2nd operand, counts of numbers and operators, each operator's share (op_add, op_sub,
    op_mul, op_div; op_none = 1 when no operator is found) and the length in characters. algebra:
    distinct variables, "=" signs, numbers, the largest number's digits, words. coding: test cases,
    words of the problem, integers per test input. A task always returns the same keys; text with no
    numbers gives zeros, not an error.
    """
    if task_name == "arithmetic":
        return _arithmetic_features(question_text(text, task_name))
    if task_name == "algebra":
        return _algebra_features(question_text(text, task_name))
    if task_name == "coding":
        return _coding_features(text)
    raise ValueError(f"unknown task {task_name!r}; valid names: {', '.join(TASK_NAMES)}")


def feature_table(texts: Sequence[str], task_name: str) -> dict[str, np.ndarray]:
    """question_features of every text, as one array per feature."""
    rows = [question_features(t, task_name) for t in texts]
    keys = rows[0] if rows else question_features("", task_name)
    return {k: np.array([r[k] for r in rows], dtype=float) for k in keys}


# ---------------------------------------------------------------------------------- series and bins
def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Centred mean over `window` points, the window shrinking at the ends (no padding bias)."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or v.size == 0:
        return v
    cumulative = np.concatenate([[0.0], np.cumsum(v)])
    index = np.arange(v.size)
    lo = np.maximum(index - window // 2, 0)
    hi = np.minimum(index + window // 2 + 1, v.size)
    return (cumulative[hi] - cumulative[lo]) / (hi - lo)


def step_bins(steps: np.ndarray, max_bins: int = 40) -> np.ndarray:
    """Bin edges over steps: one bin per step when there are few, else `max_bins` equal windows."""
    if steps.size == 0:
        return np.array([0.0, 1.0])
    distinct = np.unique(steps)
    if distinct.size <= max_bins:
        return np.append(distinct, distinct[-1] + 1).astype(float)
    return np.linspace(steps.min(), steps.max() + 1, max_bins + 1)


@dataclasses.dataclass
class Binned:
    """Per-bin statistics of one quantity; bins without a finite value are left out."""

    centers: np.ndarray  # mean step of the bin's values
    mean: np.ndarray
    low: np.ndarray  # mean - 1.96 standard errors
    high: np.ndarray  # mean + 1.96 standard errors


def binned_stats(steps: np.ndarray, values: np.ndarray, edges: np.ndarray) -> Binned:
    """Mean of `values` within each step bin, with a 95% interval of that mean.

    The interval of the mean, not the spread of the values, is what says whether a curriculum trend
    is real; and the features are small integers, whose percentiles jump between them.
    """
    which = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for b in range(len(edges) - 1):
        keep = (which == b) & np.isfinite(values)
        if keep.any():
            v = values[keep]
            half = 1.96 * v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else 0.0
            rows.append((steps[keep].mean(), v.mean(), v.mean() - half, v.mean() + half))
    columns = np.array(rows, dtype=float).reshape(-1, 4).T
    return Binned(*columns)


# ------------------------------------------------------------------------------------------------ PCA
def _hashed_ngrams(text: str) -> np.ndarray:
    """Counts of the text's character n-grams, hashed (crc32: stable across processes, unlike hash()).

    Every digit reads as 0: the n-grams then see a question's shape (wording, operators, how many
    digits), which the numbers' values would otherwise drown, since any two short questions with
    different numbers share almost no n-gram. The values enter through the numeric features.
    """
    text = re.sub(r"\d", "0", " ".join(text.lower().split()))[:MAX_EMBED_CHARS]
    counts = np.zeros(HASH_DIM)
    for n in NGRAMS:
        for i in range(len(text) - n + 1):
            counts[zlib.crc32(text[i:i + n].encode()) % HASH_DIM] += 1
    return counts


def embed_questions(texts: Sequence[str], task_name: str) -> np.ndarray:
    """A model-free embedding `[N, HASH_DIM + F]`: sublinear-tf character n-grams (L2-normalised)
    beside the task's `question_features` (log1p-compressed).

    Every scale is fixed rather than taken from the corpus (no IDF, no z-scoring), so that the spread
    of two runs' questions can be compared: corpus statistics would rescale a narrow set of questions
    to look as varied as a broad one.
    """
    if not texts:
        return np.zeros((0, HASH_DIM + len(question_features("", task_name))))
    grams = np.log1p(np.stack([_hashed_ngrams(question_text(t, task_name)) for t in texts]))
    grams /= np.maximum(np.linalg.norm(grams, axis=1, keepdims=True), 1e-12)
    features = feature_table(texts, task_name)
    numeric = np.log1p(np.maximum(np.stack(list(features.values()), axis=1), 0.0))
    # Divided by sqrt(F) so that the feature block weighs about as much as the unit-norm n-grams.
    return np.hstack([grams, numeric / math.sqrt(numeric.shape[1])])


@dataclasses.dataclass
class PCA:
    projected: np.ndarray  # [N, k] coordinates on the leading components
    components: np.ndarray  # [k, D] unit directions
    explained: np.ndarray  # [k] variance along each component
    total_variance: float  # sum of the variance of every column (= of every component)


def pca(x: np.ndarray, k: int = 2) -> PCA:
    """Principal components of the rows of `x` by SVD of the centred data. Each component's sign is
    fixed (largest coefficient positive) so that reruns draw the same picture."""
    x = np.asarray(x, dtype=float)
    n, d = x.shape
    if n < 2:
        return PCA(np.zeros((n, k)), np.zeros((k, d)), np.zeros(k), 0.0)
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    variance = s ** 2 / (n - 1)
    components = np.zeros((k, d))
    explained = np.zeros(k)
    m = min(k, vt.shape[0])
    signs = np.sign(vt[np.arange(m), np.abs(vt[:m]).argmax(axis=1)])
    components[:m] = vt[:m] * signs[:, None]
    explained[:m] = variance[:m]
    return PCA(centred @ components.T, components, explained, float(variance.sum()))


def subsample(count: int, limit: int = MAX_PCA_POINTS) -> np.ndarray:
    """Evenly spaced indices (deterministic, and spread over the whole run rather than its start)."""
    if count <= limit:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(int))


def pca_spread(questions: Sequence[str], task_name: str = "arithmetic",
               limit: int = MAX_PCA_POINTS) -> float:
    """The diversity of a set of questions: total variance of their `embed_questions` vectors (the
    sum of all PCA eigenvalues; half the mean squared distance between two questions). Comparable
    across runs of one task; a deterministic subsample of at most `limit` questions is used."""
    picked = [questions[i] for i in subsample(len(questions), limit)]
    return pca(embed_questions(picked, task_name)).total_variance


# ------------------------------------------------------------------------------------------ plotting
def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="gray")


def _change(steps: np.ndarray, values: np.ndarray) -> str:
    """First → last value of a non-empty curve, with their steps."""
    return f"{values[0]:.3f} → {values[-1]:.3f} (step {steps[0]} → {steps[-1]})"


def plot_rewards(metric_lines: Sequence[Mapping], out_path: Path, title: str) -> Path:
    """Training rewards and validity (raw, faint; moving average, solid) over the held-out accuracy."""
    fig = Figure(figsize=(9, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    drawn = False
    for (key, label), color in zip(TRAIN_CURVES, ("C0", "C1", "C2")):
        steps, values = metric_series(metric_lines, key)
        if steps.size:
            drawn = True
            top.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            top.plot(steps, moving_average(values, max(1, steps.size // 25)), color=color, label=label)
    if drawn:
        top.legend(loc="best", fontsize="small")
    else:
        _empty(top, "no training steps logged yet")
    top.set(ylabel="mean per step", title=f"{title}: rewards (faint: per step; solid: moving average)")
    top.set_ylim(-0.03, 1.03)

    greedy = metric_series(metric_lines, "eval/greedy_accuracy")
    for key, label, style in EVAL_CURVES:
        steps, values = metric_series(metric_lines, key)
        if steps.size:
            bottom.plot(steps, values, style, marker="o", markersize=4, label=label)
    if greedy[0].size:
        bottom.legend(loc="best", fontsize="small")
        bottom.set_title(f"held-out accuracy; greedy {_change(*greedy)}")
    else:
        _empty(bottom, "no evaluation logged yet")
        bottom.set_title("held-out accuracy")
    bottom.set(xlabel="step", ylabel="accuracy")
    bottom.grid(alpha=0.3)
    top.grid(alpha=0.3)
    return _save(fig, out_path)


@dataclasses.dataclass(frozen=True)
class Panel:
    """One curriculum panel: features drawn as lines with bands, or as stacked shares."""

    title: str
    ylabel: str
    curves: tuple[tuple[str, str], ...]  # (feature key, legend label)
    stacked: bool = False
    fraction: bool = False  # drawn on [0, 1], so that noise in a flat fraction does not look like a trend


_AGREEMENT = {
    "arithmetic": Panel("Solver agreement (majority answers / n)", "fraction", (("agreement", "agreement"),),
                        fraction=True),
    "algebra": Panel("Solver agreement (majority answers / n)", "fraction", (("agreement", "agreement"),),
                     fraction=True),
    "coding": Panel("Solver pass rate (mean over n solutions)", "fraction", (("agreement", "pass rate"),),
                    fraction=True),
}
CURRICULUM_PANELS = {
    "arithmetic": (
        Panel("Operand size", "digits", (("digits_a", "1st operand"), ("digits_b", "2nd operand"),
                                         ("product_digits", "product of operands"))),
        Panel("Operator mix", "share of valid proposals",
              (("op_add", "+"), ("op_sub", "−"), ("op_mul", "×"), ("op_div", "÷"),
               ("op_none", "none found")),
              stacked=True, fraction=True),
        _AGREEMENT["arithmetic"]),
    "algebra": (
        Panel("Unknowns", "count", (("variables", "variables"), ("equations", "'=' signs"))),
        Panel("Question length", "words", (("words", "words"),)),
        _AGREEMENT["algebra"]),
    "coding": (
        Panel("Test cases", "count", (("tests", "test cases"), ("input_ints", "integers per input"))),
        Panel("Problem length", "words", (("words", "words"),)),
        _AGREEMENT["coding"]),
}


def curriculum_table(proposals: Proposals, task_name: str, n: int) -> dict[str, np.ndarray]:
    """The valid proposals' features, plus their solver agreement as a fraction of n."""
    table = feature_table(proposals.texts, task_name)
    table["agreement"] = proposals.agreement / max(n, 1)
    return table


def plot_curriculum(proposals: Proposals, task_name: str, n: int, out_path: Path, title: str) -> Path:
    """Difficulty of the valid proposals against step, one panel per `CURRICULUM_PANELS` entry."""
    valid = proposals.only_valid()
    table = curriculum_table(valid, task_name, n)
    edges = step_bins(valid.steps)
    panels = CURRICULUM_PANELS[task_name]
    fig = Figure(figsize=(9, 3 * len(panels) + 0.5), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True)
    per_step = len(edges) - 1 >= np.unique(valid.steps).size
    window = "per step" if per_step else f"windows of {edges[1] - edges[0]:.3g} steps"
    fig.suptitle(f"{title}: curriculum of {len(valid.texts)} valid proposals (of {len(proposals.texts)})\n"
                 f"mean over {window}; bands: 95% interval of the mean")
    for ax, panel in zip(axes, panels):
        ax.set(title=panel.title, ylabel=panel.ylabel)
        ax.grid(alpha=0.3)
        stats = [(label, binned_stats(valid.steps, table[key], edges)) for key, label in panel.curves]
        if not any(s.centers.size for _, s in stats):
            _empty(ax, "no valid proposals logged yet")
            continue
        if panel.stacked:
            ax.stackplot(stats[0][1].centers, *[s.mean for _, s in stats], labels=[l for l, _ in stats],
                         alpha=0.8)
        else:
            for i, (label, s) in enumerate(stats):
                ax.plot(s.centers, s.mean, color=f"C{i}", label=label)
                ax.fill_between(s.centers, s.low, s.high, color=f"C{i}", alpha=0.2, linewidth=0)
        if panel.fraction:
            ax.set_ylim(0, 1)
        # Outside the axes: a stacked area has no empty corner to hold it.
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    axes[-1].set_xlabel("step")
    return _save(fig, out_path)


def _short(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def plot_questions_pca(proposals: Proposals, task_name: str, out_path: Path, title: str) -> Path:
    """The valid proposals on their first two principal components, coloured early → late, with the
    questions at the ends of each axis written out so the axes can be read."""
    valid = proposals.only_valid()
    index = subsample(len(valid.texts))
    texts = [valid.texts[i] for i in index]
    steps = valid.steps[index]
    fit = pca(embed_questions(texts, task_name))
    fig = Figure(figsize=(9, 7), layout="constrained")
    ax = fig.subplots()
    if len(texts) < 2:
        _empty(ax, "fewer than two valid proposals logged yet")
        ax.set_title(f"{title}: PCA of proposed questions")
        return _save(fig, out_path)
    points = ax.scatter(fit.projected[:, 0], fit.projected[:, 1], c=steps, cmap="viridis", s=10, alpha=0.6,
                        linewidths=0)
    fig.colorbar(points, ax=ax, label="step (early → late)")
    middle = fit.projected[:, 0].min() + np.ptp(fit.projected[:, 0]) / 2
    for axis in (0, 1):
        for i in {int(fit.projected[:, axis].argmin()), int(fit.projected[:, axis].argmax())}:
            # Written towards the middle, and kept out of the layout, so a long question at the edge
            # neither leaves the figure nor squeezes the axes.
            right = fit.projected[i, 0] > middle
            label = ax.annotate(_short(question_text(texts[i], task_name)), fit.projected[i], fontsize=7,
                                xytext=(-4 if right else 4, 4), textcoords="offset points",
                                ha="right" if right else "left", alpha=0.8)
            label.set_in_layout(False)
    share = fit.explained.sum() / fit.total_variance if fit.total_variance else 0.0
    ax.set(xlabel=f"PC1 ({fit.explained[0]:.3f})", ylabel=f"PC2 ({fit.explained[1]:.3f})",
           title=f"{title}: PCA of {len(texts)} proposed questions (of {len(valid.texts)} valid)\n"
                 f"spread (total variance) = {fit.total_variance:.4f}; PC1+PC2 explain {share:.0%}")
    ax.grid(alpha=0.3)
    return _save(fig, out_path)


def plot_run(workdir: str | Path, task_name: str | None = None) -> list[Path]:
    """Writes rewards.png, curriculum.png and questions_pca.png into WORKDIR/plots/ and returns their
    paths. The task is `task_name`, else summary.json's, else read off the proposals (`infer_task`).
    Works on a run in progress: missing files and lines give empty panels with a note."""
    workdir = Path(workdir)
    metric_lines = read_jsonl(workdir / "metrics.jsonl")
    proposals = load_proposals(read_jsonl(workdir / "questions.jsonl"))
    task_name = task_name or read_summary(workdir).get("task") or infer_task(proposals.texts)
    if task_name not in TASK_NAMES:
        raise ValueError(f"unknown task {task_name!r}; valid names: {', '.join(TASK_NAMES)}")
    n = solver_samples(metric_lines, read_jsonl(workdir / "samples.jsonl"), proposals.agreement)
    out = workdir / PLOTS_DIR
    title = f"{workdir.name} ({task_name})"
    return [plot_rewards(metric_lines, out / "rewards.png", title),
            plot_curriculum(proposals, task_name, n, out / "curriculum.png", title),
            plot_questions_pca(proposals, task_name, out / "questions_pca.png", title)]


def compare_runs(workdirs: Mapping[str, str | Path], out_path: str | Path,
                 key: str = "eval/greedy_accuracy") -> Path:
    """One held-out accuracy curve per run (label -> workdir) on one axis: seeds, ablations."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    for label, workdir in workdirs.items():
        steps, values = eval_series(workdir, key)
        if steps.size:
            ax.plot(steps, values, marker="o", markersize=4,
                    label=f"{label}: {values[0]:.3f} → {values[-1]:.3f}")
        else:
            ax.plot([], [], label=f"{label}: no evaluation logged")
    if workdirs:
        ax.legend(loc="best", fontsize="small")
    else:
        _empty(ax, "no runs given")
    ax.set(xlabel="step", ylabel=key.removeprefix("eval/").replace("_", " "),
           title=f"held-out {key.removeprefix('eval/').replace('_', ' ')} by run")
    ax.grid(alpha=0.3)
    return _save(fig, Path(out_path))


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m sqlm_jax.plots", description=__doc__.split("\n")[0])
    parser.add_argument("workdirs", nargs="+", help="run directories (holding metrics.jsonl etc.)")
    parser.add_argument("--task", choices=TASK_NAMES, help="task of the runs (default: summary.json's)")
    parser.add_argument("--compare", metavar="PNG",
                        help="also draw every run's held-out greedy accuracy on one axis into PNG")
    args = parser.parse_args(argv)
    paths = []
    for workdir in args.workdirs:
        if not Path(workdir).is_dir():
            parser.error(f"{workdir} is not a directory")
        paths += plot_run(workdir, args.task)
    if args.compare:
        # Labels are the directory names, or the whole paths where two names are the same.
        names = [Path(w).name for w in args.workdirs]
        labels = names if len(set(names)) == len(names) else list(args.workdirs)
        paths.append(compare_runs(dict(zip(labels, args.workdirs)), args.compare))
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
