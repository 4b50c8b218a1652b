"""The critical-model-size heuristic: how small a model may get and still reach the dense loss.

Loss law (Chinchilla form, Hoffmann et al. 2022):  ``L(N, D) = E + A / N^α + B / D^β``
for ``N`` parameters trained on ``D`` tokens.

- Target: the dense model's loss ``L* = L(N, D)`` at the planned tokens ``D``.
- Critical size: no model smaller than ``N_crit = (A / (L* − E))^(1/α)`` reaches ``L*``, however
  long it trains; just above it the tokens needed explode.
- A sparse layer with density ``d`` keeps ``d·n`` of its ``n`` weights, and each kept weight is worth
  more than a dense one (Frantar et al. 2024: 50–75% sparsity gives up to about 2x the capacity of a
  dense model with as many nonzeros). We count it as ``n·d·d^(−γ) = n·d^(1−γ)`` dense-equivalent
  parameters; ``γ = 0.5`` (the default ``sparsity_efficiency``) gives 2x at 75% sparsity.
- Tokens the sparse model needs to reach ``L*``:  ``D' = (B / (L* − E − A / N_eq^α))^(1/β)``
  (infinite when ``N_eq ≤ N_crit``).
- Predicted time to the target loss, relative to dense:
  ``(sparse step time / dense step time) × (D' / D)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LOSS_LAWS", "LossLaw", "ScalingView", "equivalent_params"]


@dataclass(frozen=True)
class LossLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    name: str = "custom"

    def loss(self, n_params: float, tokens: float) -> float:
        return self.E + self.A / n_params**self.alpha + self.B / tokens**self.beta

    def critical_size(self, target_loss: float) -> float:
        """``N_crit``: the smallest model that can reach ``target_loss`` with unlimited tokens."""
        gap = target_loss - self.E
        return math.inf if gap <= 0 else (self.A / gap) ** (1 / self.alpha)

    def tokens_needed(self, n_params: float, target_loss: float) -> float:
        """Tokens a model of ``n_params`` (dense-equivalent) needs to reach ``target_loss``."""
        gap = target_loss - self.E - self.A / n_params**self.alpha
        return math.inf if gap <= 0 else (self.B / gap) ** (1 / self.beta)


LOSS_LAWS = {
    "chinchilla": LossLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, name="chinchilla"),
    "besiroglu": LossLaw(E=1.82, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658, name="besiroglu"),
}


def equivalent_params(n_weights: float, density: float, sparsity_efficiency: float) -> float:
    """Dense-equivalent size of ``n_weights`` kept at ``density``: ``n · d^(1−γ)``."""
    return n_weights * density ** (1.0 - sparsity_efficiency)


@dataclass(frozen=True)
class ScalingView:
    """The heuristic's numbers for one model and training budget."""

    law: LossLaw
    n_params: float
    tokens: float
    margin: float

    @property
    def target_loss(self) -> float:
        return self.law.loss(self.n_params, self.tokens)

    @property
    def critical_size(self) -> float:
        return self.law.critical_size(self.target_loss)

    @property
    def minimum_size(self) -> float:
        """The plan never takes the dense-equivalent size below ``N_crit × (1 + margin)``."""
        return self.critical_size * (1.0 + self.margin)

    def token_ratio(self, n_equivalent: float) -> float:
        """``D' / D`` for a model of ``n_equivalent`` dense-equivalent parameters."""
        if n_equivalent >= self.n_params:
            return 1.0
        return self.law.tokens_needed(n_equivalent, self.target_loss) / self.tokens
