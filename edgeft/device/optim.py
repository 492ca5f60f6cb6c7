"""AdamW over the LoRA tensors, in numpy, with torch.optim.AdamW's exact update rule.

ORT 1.19 keeps optimizer moments inside its CheckpointState and can only save them together with
every frozen base weight; holding the (small) LoRA moments here lets a device checkpoint be a few
megabytes instead of a copy of the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class AdamW:
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    step_count: int = 0
    exp_avg: dict[str, np.ndarray] = field(default_factory=dict)
    exp_avg_sq: dict[str, np.ndarray] = field(default_factory=dict)
    last_grad_norm: float = 0.0

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float) -> dict[str, np.ndarray]:
        """One update; returns the new parameters (``last_grad_norm`` keeps the pre-clip norm)."""
        norm = float(np.sqrt(sum(float(np.vdot(g, g)) for g in grads.values())))
        clip = 1.0
        if self.max_grad_norm and norm > self.max_grad_norm:
            clip = self.max_grad_norm / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s formula
        self.step_count += 1
        b1, b2 = self.betas
        bias1 = 1 - b1**self.step_count
        bias2 = 1 - b2**self.step_count
        out = {}
        for name, p in params.items():
            g = grads[name] * np.float32(clip)
            m = self.exp_avg.setdefault(name, np.zeros_like(p))
            v = self.exp_avg_sq.setdefault(name, np.zeros_like(p))
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p = p * np.float32(1 - lr * self.weight_decay)
            denom = np.sqrt(v) / np.sqrt(bias2) + self.eps
            out[name] = (p - (lr / bias1) * m / denom).astype(np.float32)
        self.last_grad_norm = norm
        return out

    def state_tensors(self) -> dict[str, np.ndarray]:
        tensors = {f"exp_avg.{n}": a for n, a in self.exp_avg.items()}
        tensors.update({f"exp_avg_sq.{n}": a for n, a in self.exp_avg_sq.items()})
        return tensors

    def load_state_tensors(self, tensors: dict[str, np.ndarray], step_count: int) -> None:
        self.step_count = step_count
        self.exp_avg = {k.removeprefix("exp_avg."): v for k, v in tensors.items() if k.startswith("exp_avg.")}
        self.exp_avg_sq = {k.removeprefix("exp_avg_sq."): v for k, v in tensors.items() if k.startswith("exp_avg_sq.")}


def linear_schedule(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up then linear decay to 0: transformers' get_linear_schedule_with_warmup."""
    if step < warmup:
        return base_lr * step / max(1, warmup)
    return base_lr * max(0.0, (total - step) / max(1, total - warmup))
