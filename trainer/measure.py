"""What each optimizer step did to the weights, measured on the device without ever waiting for it.

Per step: the gradient norm before clipping, the update `Δθ_t = θ_{t+1} − θ_t` and its norm, the
parameter norm, and two cosines that say whether the step size fits the valley it walks down:

- `update_cos = cos(Δθ_t, Δθ_{t−1})`: −1 when the updates bounce back and forth across a valley,
  +1 when they keep going the same way.
- `grad_alignment = cos(g_t, θ_{t−1} − θ_t)`: the normalised hypergradient of Baydin et al. 2018
  ("Online Learning Rate Adaptation with Hypergradient Descent"). Its sign says whether a larger last
  step would have lowered this step's loss: positive, the new gradient still points the way the last
  step went (the step could have been longer); negative, it points back (the step overshot).

The trainable (LoRA) weights are small, so the measurements work on flat copies: the gradient and the
last two updates each live in one contiguous buffer, and every dot product or norm is one kernel
instead of one per tensor. Nothing here calls `.item()`: every result is a device scalar.
"""

from __future__ import annotations

import torch


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of consecutive slices of `flat` shaped like each tensor of `like`."""
    out, start = [], 0
    for t in like:
        out.append(flat[start : start + t.numel()].view(t.shape))
        start += t.numel()
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of two flat vectors; NaN when either is zero (the first step has no previous update)."""
    return torch.dot(a, b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))


class StepMeter:
    """Call `before_step()` once the gradients are final (unscaled, not yet clipped) and `after_step()`
    after the optimizer's step; both return device scalars."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.weights = [p.detach() for p in params]  # made once: building them is per-step Python work
        n = sum(p.numel() for p in params)
        device = params[0].device if params else torch.device("cpu")
        self._grad = torch.zeros(n, device=device)
        self._grad_views = _views(self._grad, self.weights)
        # Two buffers take turns: one holds θ_{t−1} − θ_t (the last update, negated), the other this step's.
        self._updates = [torch.zeros(n, device=device), torch.zeros(n, device=device)]
        self._update_views = [_views(u, self.weights) for u in self._updates]
        self._current = 0

    def before_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(grad_norm before clipping, grad_alignment) of the gradients as they are now."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        torch._foreach_copy_(self._grad_views, grads)
        torch._foreach_copy_(self._update_views[self._current], self.weights)  # θ_t, before the step
        alignment = _cos(self._grad, self._updates[1 - self._current])
        return torch.linalg.vector_norm(self._grad), alignment

    def after_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(update_norm, param_norm, update_cos) of the step just taken."""
        views = self._update_views[self._current]
        torch._foreach_sub_(views, self.weights)  # θ_t − θ_{t+1}, in place: no new allocations
        update = self._updates[self._current]
        # Both buffers hold negated updates, so their cosine is cos(Δθ_t, Δθ_{t−1}).
        update_cos = _cos(update, self._updates[1 - self._current])
        param_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.weights)))
        self._current = 1 - self._current
        return torch.linalg.vector_norm(update), param_norm, update_cos

    def last_update(self) -> torch.Tensor:
        """θ_t − θ_{t+1} of the step just taken (the update, negated), flat; valid until the next step."""
        return self._updates[1 - self._current]

    def tensor_norms(self) -> torch.Tensor:
        """Per trainable tensor, [update norm, weight norm] of the step just taken: a (2, tensors) device tensor."""
        updates = torch._foreach_norm(self._update_views[1 - self._current])
        return torch.stack([torch.stack(updates), torch.stack(torch._foreach_norm(self.weights))])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The last update (negated), which the next step's alignment and update cosine compare against."""
        return {"last_update": self._updates[1 - self._current].detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._updates[1 - self._current].copy_(state["last_update"])
