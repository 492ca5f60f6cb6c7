"""Token log-probabilities for ``edgeft serve``: log-softmax of the decoder's logits, top-N alternatives.

A :class:`Scorer` is fed the logits rows the decoder produces (``Decoder.generate_ids``'s
``observe``) and turns each row into a :class:`TokenScore` once the token it predicts is known: a
prompt token (echo) or a generated one. Log-probabilities are the model's own distribution
(log-softmax of the raw logits, in float64), whatever temperature or top-k/top-p the sampler used;
the chosen token's value and the top-N values come from the same array, so a greedy token's
log-probability equals the largest top-N value exactly (lm-evaluation-harness's ``is_greedy``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TokenScore:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the N most likely tokens at this position, most likely first


def log_softmax(rows: np.ndarray) -> np.ndarray:
    x = np.asarray(rows, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _score(logprobs: np.ndarray, token: int, top_n: int) -> TokenScore:
    top: list[tuple[int, float]] = []
    if top_n > 0:
        best = np.argpartition(-logprobs, top_n - 1)[:top_n] if top_n < logprobs.size else np.arange(logprobs.size)
        best = best[np.argsort(-logprobs[best], kind="stable")]
        top = [(int(i), float(logprobs[i])) for i in best]
    return TokenScore(int(token), float(logprobs[token]), top)


class Scorer:
    """Scores tokens from logits rows. With ``prompt`` (echo), the first rows observed are the
    prompt's: prompt token i > 0 is scored from row i - 1 (token 0 has no score); each later row
    scores the next generated token."""

    def __init__(self, top_n: int, prompt: list[int] | None = None):
        self.top_n = top_n
        self.prompt = prompt
        self.prompt_scores: list[TokenScore | None] = []
        self._pending: np.ndarray | None = None  # the row that predicts the next generated token

    def observe(self, rows: np.ndarray) -> None:
        if self.prompt is not None and not self.prompt_scores:
            # Row by row: a float64 copy of a long prompt's whole [n, vocab] block would be large.
            scores = [_score(log_softmax(rows[i]), t, self.top_n) for i, t in enumerate(self.prompt[1:])]
            self.prompt_scores = [None, *scores]
            rows = rows[len(self.prompt) - 1 :]
        self._pending = rows[-1]

    def take(self, token: int) -> TokenScore:
        """The score of generated ``token``, from the row observed last."""
        if self._pending is None:
            raise RuntimeError("no logits observed for this token")
        row, self._pending = self._pending, None
        return _score(log_softmax(row), token, self.top_n)
