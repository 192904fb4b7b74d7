"""Policies with a known relation to their reference, for the KL tests."""

from __future__ import annotations

import dataclasses

from edgerlhf.align.policy import PolicyModels


@dataclasses.dataclass
class ScaledPolicy(PolicyModels):
    """A policy whose logits are the reference's times `alpha`: the same ranking, sharper (alpha > 1, as a policy
    collapsing onto its favourite tokens) or flatter (alpha < 1)."""

    alpha: float = 1.0

    def forward(self, *args, **kwargs):
        logits, values = super().forward(*args, **kwargs)
        return self.alpha * logits, values

    @classmethod
    def of(cls, models: PolicyModels, alpha: float) -> ScaledPolicy:
        return cls(**{f.name: getattr(models, f.name) for f in dataclasses.fields(PolicyModels)}, alpha=alpha)
