"""CPU torch peers: ``torch.optim.AdamW`` with ``foreach=True`` and ``fused=True``.

Torch parameters are a list of tensors with the same shapes and values as the JAX tree; gradients
are set once and ``optimizer.step()`` is timed (it updates parameters and state in place, so nothing
needs donating). Torch is imported only here, lazily.
"""

from __future__ import annotations

import jax
import numpy as np

from benchmarks.timing import Candidate


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


class TorchAdamW(Candidate):
    def __init__(self, label: str, variant: str, params, grads, **kwargs):
        import torch

        self.label, self.kind = label, f"torch-{variant}"
        self.params = [torch.nn.Parameter(torch.from_numpy(np.array(x))) for x in jax.tree.leaves(params)]
        for p, g in zip(self.params, jax.tree.leaves(grads)):
            p.grad = torch.from_numpy(np.array(g))
        flags = {"foreach": dict(foreach=True), "fused": dict(fused=True)}[variant]
        self.opt = torch.optim.AdamW(self.params, **kwargs, **flags)
        self.opt.step()          # creates the state
        self.state_bytes = int(sum(t.numel() * t.element_size()
                                   for s in self.opt.state.values() for t in s.values()
                                   if torch.is_tensor(t)))

    def step(self) -> None:
        self.opt.step()

    def release(self) -> None:
        self.opt = None
        self.params = []

    def params_numpy(self):
        return [p.detach().numpy() for p in self.params]
