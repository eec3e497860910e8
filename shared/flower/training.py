"""Local training and evaluation with torch: what a ClientApp does with a site's data."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from fedsky.shared.metrics import Matrix, confusion_matrix
from torch import nn


@dataclass(frozen=True)
class TrainResult:
    examples: int
    loss: float  # mean training loss over the last epoch


@dataclass(frozen=True)
class EvalResult:
    examples: int
    loss: float  # mean cross-entropy
    confusion: Matrix


def site_seed(seed: int, round: int, site: str) -> int:
    """A seed that differs per site and round but is reproducible."""
    h = hashlib.sha256(f"{seed}:{round}:{site}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class _Sgd:
    """SGD with momentum 0.9, as torch.optim.SGD computes it.

    Not torch.optim: constructing any torch optimizer imports torch._dynamo (measured 1.5-2.4 s),
    and every Flower message runs in a new process that would pay it again.
    """

    def __init__(self, params: list[nn.Parameter], lr: float, momentum: float = 0.9) -> None:
        self.params, self.lr, self.momentum = params, lr, momentum
        self.bufs: list[torch.Tensor | None] = [None] * len(params)

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            buf = self.bufs[i]
            if buf is None:
                buf = self.bufs[i] = p.grad.detach().clone()
            else:
                buf.mul_(self.momentum).add_(p.grad)
            p.add_(buf, alpha=-self.lr)


class _Adam:
    """Adam (betas 0.9, 0.999, eps 1e-8), as torch.optim.Adam computes it; see _Sgd for why."""

    def __init__(
        self,
        params: list[nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v / c2).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / c1)


def train(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    optimizer: str,
    seed: int,
) -> TrainResult:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = _Adam(params, learning_rate) if optimizer == "adam" else _Sgd(params, learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    module.train()
    n = len(yt)
    last = 0.0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            for p in params:
                p.grad = None
            loss = loss_fn(module(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        last = total / n
    return TrainResult(examples=n, loss=last)


@torch.no_grad()
def predict(
    module: nn.Module, x: np.ndarray, *, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and predicted labels, batch by batch, in evaluation mode."""
    module.eval()
    xt = torch.from_numpy(x)
    outs = [module(xt[i : i + batch_size]) for i in range(0, len(xt), batch_size)]
    logits = torch.cat(outs) if outs else torch.empty((0,))
    return logits.numpy(), logits.argmax(dim=1).numpy()


@torch.no_grad()
def evaluate(
    module: nn.Module, x: np.ndarray, y: np.ndarray, *, num_classes: int, batch_size: int = 256
) -> EvalResult:
    logits, pred = predict(module, x, batch_size=batch_size)
    loss = float(
        nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y), reduction="mean")
    )
    return EvalResult(
        examples=len(y),
        loss=loss,
        confusion=confusion_matrix(y.tolist(), pred.tolist(), num_classes),
    )
