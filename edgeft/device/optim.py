"""AdamW over the LoRA tensors, in numpy, with torch.optim.AdamW's exact update rule.

The training graph only computes gradients; the step runs here over the (small) LoRA tensors, in
place, so a device checkpoint is the LoRA tensors and their moments: a few megabytes.
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
    clipped: bool = False  # the last step scaled its gradients down to max_grad_norm

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float) -> None:
        """One update of ``params`` in place (``last_grad_norm`` keeps the pre-clip norm)."""
        norm = float(np.sqrt(sum(float(np.vdot(g, g)) for g in grads.values())))
        clip = 1.0
        if self.max_grad_norm and norm > self.max_grad_norm:
            clip = self.max_grad_norm / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s formula
        self.step_count += 1
        b1, b2 = self.betas
        bias1 = 1 - b1**self.step_count
        bias2 = 1 - b2**self.step_count
        for name, p in params.items():
            g = grads[name] * np.float32(clip)
            m = self.exp_avg.setdefault(name, np.zeros_like(p))
            v = self.exp_avg_sq.setdefault(name, np.zeros_like(p))
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p *= np.float32(1 - lr * self.weight_decay)
            denom = np.sqrt(v) / np.sqrt(bias2) + self.eps
            p -= (lr / bias1) * m / denom
        self.last_grad_norm = norm
        self.clipped = clip < 1.0

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
