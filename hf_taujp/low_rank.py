"""Low-rank tangents: τ_W = s·B·A carried through the forward-mode pass without ever forming τ_W.

For a targeted weight W (out × in) the linearized model is f_lin(x) = f(x; θ0) + J_θ f(x; θ0)·τ with
τ_W = s·B·A, A ∈ R^{r×in}, B ∈ R^{out×r} and s = lora_alpha / r (or lora_alpha / √r, rsLoRA) — PEFT
LoRA's factor names, shapes and scaling (``peft.tuners.lora.layer.LoraLayer``). The model is exactly
linear in τ, so task addition in the tangent space stays exact (Σ_t s·B_t·A_t is again a tangent of
rank ≤ Σ r_t).

How it is computed. The tangent of a layer y = W·x at θ0 in direction τ_W is W·ẋ + τ_W·x0 (ẋ the
tangent of the layer's input, x0 its primal value). The first term is what forward-mode AD of the
frozen layer gives; the second, s·B·(A·x0), is added by :class:`LowRankTangent` inside the layer: a
zero-valued output whose forward-AD rule is s·B·(A·x0) — r·(in + out) multiply-adds per token instead
of in·out, and no (out × in) tensor ever exists. B enters the pass as the tangent of a zero primal
Z ∈ R^{out×r}, so the jvp's tangent inputs are (out × r) tensors; A enters only the forward-AD rule,
so the primal f(x; θ0) does not depend on A or B and autograd runs no backward through the primal
network (only through the tangent path). Gradients of A and B come from that one backward.

Relation to L-LoRA (Tang et al., ICLR 2024; FusionBench ``LinearizedModelWraper``): L-LoRA linearizes a
LoRA model in its *factors* around their initialisation (A0, B0 = 0): f(x; θ0) + J_{(A,B)}·(A − A0, B − B0)
= f(x; θ0) + J_W·(s·(B − 0)·A0): only B moves to first order (the Jacobian w.r.t. A is zero at B0 = 0) and
A stays at its random initial value. Here τ itself is the low-rank product s·B·A of two trained factors:
the model is linear in τ (not in (A, B)), both factors learn, and τ is the task vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import HfTaujpError

__all__ = ["LowRankFactors", "LowRankTangent", "low_rank_scaling", "weight_layout", "layer_kind"]

LAYER_KINDS = ("linear", "conv1d", "embedding")


def low_rank_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """s = lora_alpha / r, or lora_alpha / √r with rsLoRA (Kalajdzievski 2023; PEFT's ``use_rslora``)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def layer_kind(module: nn.Module) -> str:
    """``"linear"`` (nn.Linear), ``"conv1d"`` (transformers' Conv1D, weight (in, out)) or ``"embedding"``.

    Raises:
        HfTaujpError: any other module type (a low-rank tangent needs a weight that acts as one matrix).
    """
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            raise HfTaujpError("A low-rank tangent on an nn.Embedding with max_norm is not supported (the "
                               "renormalisation makes the layer non-linear in its weight).")
        return "embedding"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        Conv1D = ()
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d"
    raise HfTaujpError(f"{type(module).__name__} cannot take a low-rank tangent: targets must be nn.Linear, "
                       "transformers' Conv1D or nn.Embedding modules.")


def weight_layout(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of the matrix the factors act on: B is (out × r), A is (r × in), ΔW = s·B·A.

    nn.Linear: weight (out, in). Conv1D: weight (in, out), so τ_weight = (s·B·A)ᵀ. nn.Embedding: weight
    (num_embeddings, dim) read as a map from one-hot ids (in = num_embeddings) to vectors (out = dim),
    so τ_weight = (s·B·A)ᵀ, PEFT's ``lora_embedding_A`` (r × num_embeddings) / ``lora_embedding_B``.
    """
    kind = layer_kind(module)
    w = module.weight
    if kind == "linear":
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[1]), int(w.shape[0])


@dataclass
class LowRankFactors:
    """One low-rank tangent: the module it sits in and its factors.

    Attributes:
        module: the nn.Linear / Conv1D / nn.Embedding whose output receives the tangent s·B·(A·x0).
        A: (r, in) factor (trainable, any float dtype; cast to the layer input's dtype).
        B: (out, r) factor (trainable): the jvp's tangent input, cast to the primal dtype.
        scaling: s.
        dropout: dropout probability on the factor path's input (PEFT's ``lora_dropout``), applied only
            when ``training`` is true.
        training: whether dropout is active for this call.
    """

    module: nn.Module
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    dropout: float = 0.0
    training: bool = False

    @property
    def kind(self) -> str:
        return layer_kind(self.module)


class LowRankTangent(torch.autograd.Function):
    """Zero primal, forward-AD tangent s·B·(A·x0): the low-rank part of a layer's tangent W·ẋ + τ_W·x0.

    ``apply(x, z, a_detached, spec)``: ``x`` the layer input (ids for an embedding), ``z`` the zero
    (out × r) primal whose tangent is B, ``a_detached`` A without autograd history (so the zero output
    does not depend on A), ``spec = (A, scaling, kind)`` holds the live A: the forward-AD rule uses it, and
    autograd records that rule, so gradients reach A and B through the tangent only. Output shape: the
    layer's output shape (…, out). Checked against the full-rank jvp with τ_W = s·B·A materialised
    (tests/test_low_rank.py), float64.
    """

    @staticmethod
    def forward(x, z, a_detached, spec):
        return z.new_zeros(tuple(x.shape if spec[2] == "embedding" else x.shape[:-1]) + (z.shape[0],))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, _, spec = inputs
        ctx.save_for_forward(x)
        ctx.spec = spec

    @staticmethod
    def jvp(ctx, x_t, z_t, a_t, spec_t):
        (x,) = ctx.saved_tensors
        A, scaling, kind = ctx.spec
        if kind == "embedding":
            h = F.embedding(x, A.t().to(z_t.dtype))
        else:
            h = F.linear(x.to(z_t.dtype), A.to(z_t.dtype))
        return scaling * F.linear(h, z_t)

    @staticmethod
    def backward(ctx, grad):
        # The output is identically zero: nothing flows back through the primal.
        return None, None, None, None


def low_rank_hook(factors: LowRankFactors, z_of: callable):
    """A forward hook adding the low-rank tangent of ``factors`` to its module's output.

    ``z_of()`` returns the zero primal Z (the dual tensor whose tangent is B) of the current jvp call.
    """
    def hook(module, args, output):
        if not args:
            raise HfTaujpError(f"{type(module).__name__} was called without a positional input: the low-rank "
                               "tangent needs the layer's input.")
        x = args[0]
        if factors.dropout and factors.training and factors.kind != "embedding":
            x = F.dropout(x, p=factors.dropout, training=True)
        z = z_of()
        spec = (factors.A, factors.scaling, factors.kind)
        return output + LowRankTangent.apply(x, z, factors.A.detach(), spec).to(output.dtype)

    return hook
