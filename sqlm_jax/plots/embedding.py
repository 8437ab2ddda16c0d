"""A model-free embedding of questions and its PCA: the coordinates of the question scatter and the
spread (diversity) of a run's questions. Pure functions over Questions and arrays."""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Sequence

import numpy as np

from sqlm_jax.tasks import Question, Task

# The PCA sees at most this many questions: SVD cost and an unreadable scatter both grow with it.
MAX_PCA_POINTS = 2000
# Character n-grams hashed into this many buckets: few enough to keep the SVD quick, enough that
# the n-grams of a template (digits read as 0) rarely collide.
HASH_DIM = 256
NGRAMS = (2, 3, 4)
# Coding problems run to thousands of characters; their opening says what the problem is.
MAX_EMBED_CHARS = 2000


def feature_table(questions: Sequence[Question], task: Task) -> dict[str, np.ndarray]:
    """The task's `question_features` of every question, as one array `[N]` per feature (the keys
    of an empty question when there are none, so that the columns are the same)."""
    rows = [task.question_features(q) for q in questions]
    keys = rows[0] if rows else task.question_features(Question(""))
    return {k: np.array([r[k] for r in rows], dtype=float) for k in keys}


def hashed_ngrams(text: str) -> np.ndarray:
    """Counts `[HASH_DIM]` of the text's character n-grams, hashed (crc32: stable across processes,
    unlike hash()).

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


def embed_questions(questions: Sequence[Question], task: Task) -> np.ndarray:
    """A model-free embedding `[N, HASH_DIM + F]`: sublinear-tf character n-grams of the question
    text (L2-normalised) beside the task's F `question_features` (log1p-compressed).

    Every scale is fixed rather than taken from the corpus (no IDF, no z-scoring), so that the spread
    of two runs' questions can be compared: corpus statistics would rescale a narrow set of questions
    to look as varied as a broad one.
    """
    features = feature_table(questions, task)
    if not questions:
        return np.zeros((0, HASH_DIM + len(features)))
    grams = np.log1p(np.stack([hashed_ngrams(q.text) for q in questions]))
    grams /= np.maximum(np.linalg.norm(grams, axis=1, keepdims=True), 1e-12)
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
    """Principal components of the rows of `x` `[N, D]` by SVD of the centred data. Each component's
    sign is fixed (largest coefficient positive) so that reruns draw the same picture; components
    beyond the data's rank are zero."""
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
    """Evenly spaced indices `[min(count, limit)]` (deterministic, and spread over the whole run
    rather than its start)."""
    if count <= limit:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(int))


def pca_spread(questions: Sequence[Question], task: Task, limit: int = MAX_PCA_POINTS) -> float:
    """The diversity of a set of questions: total variance of their `embed_questions` vectors (the
    sum of all PCA eigenvalues; half the mean squared distance between two questions). Comparable
    across runs of one task; a deterministic subsample of at most `limit` questions is used."""
    picked = [questions[i] for i in subsample(len(questions), limit)]
    return pca(embed_questions(picked, task)).total_variance
