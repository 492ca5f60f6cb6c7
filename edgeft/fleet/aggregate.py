"""Merging the clients' LoRA adapters into one, on the server. numpy only (no torch, no flwr).

Every client starts a round from the same global adapter and returns its trained (A_c, B_c); its
weight w_c is its share of the round's tokens. What the fleet learned is the token-weighted mean of
the clients' weight updates, and since the weights sum to 1 and every client started from the
same global, that is the mean of their adapters' ΔW = s · B_c A_c (s: the module's scaling):

    mean ΔW = Σ_c w_c s (B_c A_c − B_g A_g) + s B_g A_g = s · Σ_c w_c B_c A_c = s · M

One public function per aggregation, each taking the same updates and returning PEFT tensors:

* :func:`svd` (default): the best rank-r approximation of M (Eckart-Young), so the next round's
  global fits the bundle's fixed-rank graphs. M is never formed: with B_cat = [w_1 B_1 … w_C B_C]
  and A_cat = [A_1; …; A_C], M = B_cat A_cat, and two thin QRs plus the SVD of a (Σ r_c)² core
  give its singular triplets. The factors are balanced, B = U √Σ and A = √Σ Vᵀ: the product is
  what counts, but AdamW normalizes each parameter's step by its own gradient scale and the LoRA
  gradients of A and B scale with the other factor, so putting all of Σ on one side would make
  that side's relative steps tiny and the other's huge next round. Balanced factors are also what
  the L2 penalty ‖A‖² + ‖B‖² settles on. Directions with no energy (σ ≈ 0, e.g. round one from
  B = 0) get B = 0 and a fresh random A row of the clients' A row norm, as LoRA's own init does,
  instead of A = B = 0, whose gradients would be zero forever.
* :func:`stack`: exact, A_stack = A_cat and B_stack = B_cat, rank Σ r_c. PEFT loads it (r and
  lora_alpha say so), the bundle does not (its graphs have the bundle's rank).
* :func:`fedavg`: A and B averaged separately, the usual Flower LoRA recipe and the baseline:
  mean(B) · mean(A) ≠ mean(B · A).

DoRA magnitudes are averaged with the token weights by all three (no method is exact for DoRA:
its normalization is not linear in ΔW). :func:`relative_error` measures ‖mean ΔW − ΔW_agg‖ /
‖mean ΔW‖ over all modules, again without forming a matrix of the base's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeft.bundle import lora_module

A_KEY = ".lora_A.weight"
B_KEY = ".lora_B.weight"
MAGNITUDE_KEY = ".lora_magnitude_vector"


@dataclass
class Update:
    """One client's result of a round: its adapter tensors (PEFT keys) and its token count."""

    client: str
    tensors: dict[str, np.ndarray]
    tokens: int
    loss: float = float("nan")  # the client's mean training loss in the round (reported, not used here)
    norm: float = 0.0  # its weight-space distance from the global it started from


def modules(tensors: dict[str, np.ndarray]) -> list[str]:
    """The LoRA modules (PEFT key prefixes) of an adapter, sorted."""
    return sorted({lora_module(k) for k in tensors if k.endswith(A_KEY)})


def weights(updates: list[Update]) -> np.ndarray:
    """Each update's share of the round's tokens (float64, sums to 1)."""
    tokens = np.array([u.tokens for u in updates], np.float64)
    if len(tokens) == 0 or tokens.min() <= 0:
        raise ValueError("every update needs a positive token count")
    return tokens / tokens.sum()


def _factors(updates: list[Update], module: str) -> tuple[np.ndarray, np.ndarray]:
    """B_cat (out × Σr, each client's B times its weight) and A_cat (Σr × in), in float64."""
    w = weights(updates)
    b = np.concatenate([wc * u.tensors[module + B_KEY].astype(np.float64) for wc, u in zip(w, updates)], axis=1)
    a = np.concatenate([u.tensors[module + A_KEY].astype(np.float64) for u in updates], axis=0)
    return b, a


def _mean_magnitudes(updates: list[Update], out: dict[str, np.ndarray]) -> None:
    w = weights(updates)
    for key in updates[0].tensors:
        if key.endswith(MAGNITUDE_KEY):
            out[key] = sum(wc * u.tensors[key].astype(np.float64) for wc, u in zip(w, updates)).astype(np.float32)


def svd(updates: list[Update], ranks: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The token-weighted mean update of each module, truncated to rank r (the bundle's rank of that
    module: ``ranks[module]``, default the rank of the first update's A) by SVD, as balanced factors."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for module in modules(updates[0].tensors):
        r = (ranks or {}).get(module, updates[0].tensors[module + A_KEY].shape[0])
        b_cat, a_cat = _factors(updates, module)
        qb, rb = np.linalg.qr(b_cat)
        qa, ra = np.linalg.qr(a_cat.T)
        u, s, vt = np.linalg.svd(rb @ ra.T)
        left, right = qb @ u, qa @ vt.T  # M = left · diag(s) · rightᵀ
        k = min(r, len(s))
        live = s[:k] > max(float(s[0]) if len(s) else 0.0, 1e-30) * 1e-9
        n = int(live.sum())
        root = np.sqrt(s[:n])
        b = np.zeros((b_cat.shape[0], r))
        a = np.zeros((r, a_cat.shape[1]))
        b[:, :n] = left[:, :n] * root
        a[:n] = root[:, None] * right[:, :n].T
        if n < r:  # no energy there: B = 0 and a random A row orthogonal to the kept ones
            scale = float(np.median(np.linalg.norm(a_cat, axis=1))) or 1.0
            fill = rng.standard_normal((a_cat.shape[1], r - n))
            if n:
                fill -= right[:, :n] @ (right[:, :n].T @ fill)
            q, _ = np.linalg.qr(fill)
            a[n:] = q.T * scale
        out[module + A_KEY] = a.astype(np.float32)
        out[module + B_KEY] = b.astype(np.float32)
    _mean_magnitudes(updates, out)
    return out


def stack(updates: list[Update]) -> dict[str, np.ndarray]:
    """The exact mean: the clients' A stacked and their weighted B side by side (rank Σ r_c)."""
    out: dict[str, np.ndarray] = {}
    for module in modules(updates[0].tensors):
        b_cat, a_cat = _factors(updates, module)
        out[module + A_KEY] = a_cat.astype(np.float32)
        out[module + B_KEY] = b_cat.astype(np.float32)
    _mean_magnitudes(updates, out)
    return out


def fedavg(updates: list[Update]) -> dict[str, np.ndarray]:
    """A and B averaged separately with the token weights (the baseline)."""
    w = weights(updates)
    return {
        key: sum(wc * u.tensors[key].astype(np.float64) for wc, u in zip(w, updates)).astype(np.float32)
        for key in updates[0].tensors
    }


def relative_error(updates: list[Update], aggregated: dict[str, np.ndarray], scaling: dict[str, float]) -> float:
    """‖mean ΔW − ΔW_agg‖ / ‖mean ΔW‖, Frobenius over all modules, ΔW = s · B A per module.

    Computed from the factors: for ΔW = P Q (P = [s B_cat, −s B_agg], Q = [A_cat; A_agg]),
    ‖P Q‖² = Σ (PᵀP) ∘ (Q Qᵀ), a (Σ r)² sum instead of an out × in matrix."""
    err2 = norm2 = 0.0
    for module in modules(updates[0].tensors):
        s = scaling[module]
        b_cat, a_cat = _factors(updates, module)
        b_agg = aggregated[module + B_KEY].astype(np.float64)
        a_agg = aggregated[module + A_KEY].astype(np.float64)
        norm2 += _lowrank_norm2(s * b_cat, a_cat)
        err2 += _lowrank_norm2(np.concatenate([s * b_cat, -s * b_agg], axis=1), np.concatenate([a_cat, a_agg]))
    return float(np.sqrt(max(err2, 0.0) / norm2)) if norm2 > 0 else 0.0


def update_norm(update: dict[str, np.ndarray], start: dict[str, np.ndarray], scaling: dict[str, float]) -> float:
    """‖ΔW_update − ΔW_start‖ over all modules: how far a client moved the adapter in weight space."""
    total = 0.0
    for module in modules(start):
        s = scaling[module]
        p = np.concatenate([s * update[module + B_KEY], -s * start[module + B_KEY]], axis=1).astype(np.float64)
        q = np.concatenate([update[module + A_KEY], start[module + A_KEY]]).astype(np.float64)
        total += _lowrank_norm2(p, q)
    return float(np.sqrt(max(total, 0.0)))


def _lowrank_norm2(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum((p.T @ p) * (q @ q.T)))
