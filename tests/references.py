"""Independent reference computations shared by several test files (the slow, obvious way)."""
import torch


def loop_fisher(model: torch.nn.Module, examples, loglik) -> dict[str, torch.Tensor]:
    """Diagonal Fisher the plain way: one example at a time, ordinary backward of ``loglik(example)``
    (log p(ŷ | x) of that example), mean of the squared gradients over ``examples``."""
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for ex in examples:
        model.zero_grad()
        loglik(ex).backward()
        for n, p in model.named_parameters():
            sums[n] += p.grad ** 2
    return {n: s / len(examples) for n, s in sums.items()}
