"""LoRA-native results: a task vector as a PEFT LoRA adapter, and LoRA adapters merged into one LoRA adapter.

``TaskVector.to_lora(base, r)`` is the analogue of ``mergekit-extract-lora`` (mergekit
``mergekit/scripts/extract_lora.py``): per 2-D target weight, the adapter's ΔW is the best rank-k
approximation of τ_W (Eckart–Young–Mirsky: for τ_W = U·diag(σ)·Vᵀ, the truncation U_k·diag(σ_1..k)·V_kᵀ
minimises ‖τ_W − X‖_F over rank(X) ≤ k, with error² = Σ_{i>k} σ_i²). :func:`merge_lora_adapters` merges
LoRA adapters into one with the semantics of PEFT's ``LoraModel.add_weighted_adapter`` (peft 0.21
``tuners/lora/model.py``): ``"cat"`` concatenates the factors (exact), ``"svd"`` truncates the weighted sum.

Conventions (chosen here; each test checks one):

- Orientation. A LoRA layer holds A (k × in) and B (out × k), ΔW = s·B·A in the (out, in) orientation; weights
  stored (in, out) get (s·B·A)ᵀ: transformers' ``Conv1D`` (GPT-2; PEFT's ``fan_in_fan_out``, which PEFT sets per
  layer) and ``nn.Embedding`` (PEFT's ``lora_embedding_A`` (k × num_embeddings) / ``lora_embedding_B``
  (dim × k)). This is :class:`~hf_taujp.low_rank_tau.LowRankTau`'s ``transposed`` layout.
- Factor split (mergekit's default ``--distribute-scale``): A = diag(√σ_1..k)·V_kᵀ, B = U_k·diag(√σ_1..k), so
  B·A is the truncation and ‖A‖_F = ‖B‖_F (balanced factors: neither carries the whole magnitude, which suits
  further training and half-precision storage). PEFT's own ``svd`` merge puts σ into B (B = U·S, A = Vᵀ); the
  product, which is all the adapter computes, is the same.
- Scale. s = lora_alpha / r = 1 exactly: lora_alpha = r per layer (mergekit's ``alpha_pattern`` = its
  ``rank_pattern``), ``use_rslora=False``. ``r`` of the config is the largest rank; the layers of another rank are
  listed in ``rank_pattern`` / ``alpha_pattern`` under their full module paths. A factored entry kept as it is
  carries its own s in ``alpha_pattern`` (α = s·k when α / k gives s back exactly, else s is folded into B).
- SVD in float64 on the entry's device; factors in ``promote_types(τ dtype, float32)`` (PEFT keeps adapters of
  half-precision bases in float32).
- Rank rule, per tensor (exactly one of): ``r`` (fixed; above min(out, in) it is clamped to min(out, in), i.e. full
  rank, exact, and that rank is what ``rank_pattern`` records — a fixed r must fit heads narrower than r, as
  mergekit's ``min(max_rank, len(σ))``); ``energy`` ∈ (0, 1]: the smallest k with Σ_{i≤k} σ_i² ≥ energy·Σ σ_i²
  (energy = 1: every non-zero direction, the full τ_W up to rounding). Neither: only for a vector whose LoRA
  entries are all factored (``from_peft(..., factored=True)``, a ``"cat"`` merge): the stored factors are the
  adapter's, bit for bit. A factored entry of rank ≤ min(r, out, in) is kept as it is (exact); otherwise it is
  truncated from its factors without forming the full matrix: B = Q_B·R_B, Aᵀ = Q_A·R_A (QR), SVD of the
  small core s·R_B·R_Aᵀ = U_c·S·V_cᵀ, U = Q_B·U_c, V = Q_A·V_c (the SVD of s·B·A itself).
  A τ_W that is exactly zero has rank 0: its module gets no LoRA layer (ΔW = 0 exactly).
- What cannot be a LoRA factor is NAMED (``rest=``): every τ entry that is not the weight of an ``nn.Linear``,
  ``Conv1D`` or ``nn.Embedding`` module of the base (biases, norms, 1-D / 3-D tensors, other module types, the
  root module's parameters, weights outside ``target_modules``, and weights tied to another module — GPT-2's
  ``transformer.wte.weight`` / ``lm_head.weight`` — since an unmerged LoRA on one of two tied modules changes
  only that one, and on both is added twice by ``merge_and_unload``, PEFT issue #2777).
  ``rest="error"`` (default) raises ``HfTaujpError`` listing them with the reason; ``"drop"`` leaves them out
  (the adapter is then θ0 + τ minus those entries; the caller asked); ``"save"`` keeps them exactly with what
  PEFT supports: a LoRA layer's bias through ``bias="lora_only"`` (the adapter stores that layer's bias,
  θ0 + Δb, as mergekit stores Δb as ``lora_B.bias``; PEFT's ``lora_bias`` cannot be used here because PEFT
  refuses it on embeddings and cannot merge it into a layer without a bias), any other entry's module whole in
  ``modules_to_save`` at θ0 + τ (every module sharing a tied weight, so the tie's copies agree; a saved module
  holds the LoRA targets inside it at full value). Note that ``bias="lora_only"`` writes the biases into the
  base model on load: ``disable_adapter()`` then keeps them (PEFT's rule for trained biases).
- ``task_type`` (``"auto"``, the default: the one the base class implies, as ``to_peft``; ``None``: a plain
  ``PeftModel``): PEFT's SEQ_CLS / TOKEN_CLS /
  QUESTION_ANS models always save their head (``classifier`` / ``score`` / ``qa_outputs``) whole in
  ``modules_to_save`` (peft ``peft_model.py``); its τ goes there exactly, whatever ``rest`` says.
- Linear (tangent) task vectors: a LoRA adapter is a change of weights, so its model is f(x; θ0 + τ), the weight
  reading of a tangent τ, not the linearized model it was trained as (``to_peft`` gives that one). Refused unless
  ``allow_linear=True``.

Import rules: this module imports errors, tied, low_rank_tau and peft_conversion (never task_vector; it
builds task vectors with ``type(tv)(...)``), and peft / transformers inside functions.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .errors import HfTaujpError, MergeConfigError
from .low_rank_tau import LowRankTau, low_rank_sum
from .peft_conversion import tensors_from_peft
from .tied import tied_groups

__all__ = ["task_vector_to_lora", "low_rank_approximation", "merge_lora_adapters", "truncated_factors",
           "REST_MODES", "LORA_COMBINATIONS"]

logger = logging.getLogger(__name__)

REST_MODES = ("error", "drop", "save")
# PEFT add_weighted_adapter's combination types this module implements (the others combine A and B themselves,
# not ΔW, or prune: for TIES / DARE on task vectors use hf_taujp.merge)
LORA_COMBINATIONS = ("cat", "svd")
# PEFT 0.21 peft_model.py: the heads its task-type classes always add to modules_to_save (suffix match)
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def _few(names: Iterable[str], n: int = 6) -> str:
    names = list(names)
    return ", ".join(repr(x) for x in names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# --------------------------------------------------------------------------------------------
# The rank rule and the truncated SVD (Eckart–Young)
# --------------------------------------------------------------------------------------------
def _check_rule(r, energy, allow_neither: bool, err=HfTaujpError) -> None:
    if r is not None and energy is not None:
        raise err(f"Give one rank rule: r (a fixed rank) or energy (a fraction of ‖τ_W‖²), not both (r={r!r}, "
                  f"energy={energy!r}).")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
        raise err(f"r must be a positive integer (the LoRA rank), got {r!r}.")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not math.isfinite(energy) or not 0 < energy <= 1):
        raise err(f"energy must be a number in (0, 1] (the fraction of ‖τ_W‖_F² kept per tensor), got {energy!r}.")
    if r is None and energy is None and not allow_neither:
        raise err("Give a rank rule: r (a fixed rank) or energy (the fraction of ‖τ_W‖_F² kept per tensor).")


def _svd(entry: torch.Tensor | LowRankTau, transposed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, σ, Vᵀ (float64, reduced) of τ_W in the (out, in) orientation: τ_W itself (``transposed=False``) or τ_Wᵀ.

    A factored entry s·B·A is decomposed from its factors: B = Q_B R_B, Aᵀ = Q_A R_A, SVD of s·R_B·R_Aᵀ (≤ k × k),
    U = Q_B·U_c, Vᵀ = V_cᵀ·Q_Aᵀ — the SVD of s·B·A without forming it."""
    if isinstance(entry, LowRankTau):
        lr = entry.as_layout(transposed)
        Qb, Rb = torch.linalg.qr(lr.B.double())
        Qa, Ra = torch.linalg.qr(lr.A.double().t())
        Uc, S, Vhc = torch.linalg.svd(lr.scale * (Rb @ Ra.t()), full_matrices=False)
        return Qb @ Uc, S, Vhc @ Qa.t()
    M = entry.double()
    return torch.linalg.svd(M.t() if transposed else M, full_matrices=False)


def _rank_of(S: torch.Tensor, r: int | None, energy: float | None, full: int) -> int:
    """k of the rank rule: min(r, min(out, in), len σ) for a fixed r; the smallest k with Σ_{i≤k} σ_i² ≥ energy·Σ σ²
    for ``energy``; 0 for a zero τ_W."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    if energy is not None:
        c = torch.cumsum(S.double() ** 2, 0)
        return min(int((c < energy * c[-1]).sum()) + 1, S.numel())
    return min(r, full, S.numel())


def truncated_factors(entry: torch.Tensor | LowRankTau, r: int | None = None, *, energy: float | None = None,
                      transposed: bool = False) -> LowRankTau:
    """The best approximation of rank ≤ k of one 2-D τ entry (Eckart–Young), as factors in the given layout.

    Args:
        entry: τ_W as stored ((out, in) for ``transposed=False``, (in, out) for ``True``), or a ``LowRankTau``.
        r / energy: the rank rule (exactly one): k = min(r, out, in) or the smallest k keeping ``energy`` of ‖τ_W‖²
            (see the module docstring). A factored entry of rank ≤ min(r, out, in) is returned as it is (in
            ``transposed``'s layout; exact).
        transposed: the layout of the result (``LowRankTau.transposed``): True for Conv1D / Embedding weights.

    Returns:
        ``LowRankTau(A, B, 1.0, transposed)`` with A = diag(√σ_k)·V_kᵀ (k × in), B = U_k·diag(√σ_k) (out × k), in
        ``promote_types(dtype, float32)``, on the entry's device; k = 0 (empty factors) for a zero τ_W.

    Raises:
        HfTaujpError: a bad rank rule, an entry that is not 2-D, or NaN / inf values.
    """
    _check_rule(r, energy, allow_neither=False)
    if entry.dim() != 2:
        raise HfTaujpError(f"A LoRA factorisation needs a 2-D tensor, got shape {tuple(entry.shape)}.")
    finite = entry.is_finite() if isinstance(entry, LowRankTau) else bool(torch.isfinite(entry).all())
    if not finite:
        raise HfTaujpError(f"Cannot factorise a tensor of shape {tuple(entry.shape)} holding NaN or inf values.")
    out_in = tuple(entry.shape)[::-1] if transposed else tuple(entry.shape)
    full = min(out_in)
    if isinstance(entry, LowRankTau) and r is not None and entry.rank <= min(r, full):
        return entry.as_layout(transposed)
    dt = torch.promote_types(entry.dtype, torch.float32)
    U, S, Vh = _svd(entry, transposed)
    k = _rank_of(S, r, energy, full)
    root = S[:k].clamp_min(0).sqrt()
    A = (root[:, None] * Vh[:k]).to(dt).contiguous()
    B = (U[:, :k] * root[None, :]).to(dt).contiguous()
    return LowRankTau(A, B, 1.0, transposed)


def low_rank_approximation(tv, r: int | None = None, *, energy: float | None = None,
                           keys: Iterable[str] | None = None):
    """τ with every 2-D entry (or each of ``keys``) replaced by its best rank-k approximation, kept as factors.

    Per entry :func:`truncated_factors` in the entry's own layout (τ_W = B·A as stored; a factored entry keeps its
    layout): ‖τ_W − B·A‖_F² = Σ_{i>k} σ_i² (Eckart–Young). Other entries (1-D biases / norms, or those not in
    ``keys``) are kept unchanged; the metadata is the vector's. The result is a factored ``TaskVector`` (saved with
    size ∝ k; ``.to_lora(base)`` without a rank rule turns it into the adapter as it is).

    Raises:
        HfTaujpError: a bad rank rule, ``keys`` naming entries the vector lacks or that are not 2-D, NaN / inf.
    """
    _check_rule(r, energy, allow_neither=False)
    entries = tv.entries
    if keys is None:
        chosen = [k for k, e in entries.items() if e.dim() == 2]
    else:
        chosen = list(keys)
        missing = [k for k in chosen if k not in entries]
        if missing:
            raise HfTaujpError(f"keys not in the task vector: {_few(missing)}.")
        bad = [k for k in chosen if entries[k].dim() != 2]
        if bad:
            raise HfTaujpError(f"Only 2-D entries have a low-rank approximation; {_few(bad)} are not 2-D.")
    out = {}
    for k, e in entries.items():
        if k in chosen:
            try:
                out[k] = truncated_factors(e, r, energy=energy, transposed=isinstance(e, LowRankTau) and e.transposed)
            except HfTaujpError as exc:
                raise HfTaujpError(f"Entry {k!r}: {exc}") from None
        else:
            out[k] = e
    return type(tv)(out, **tv.metadata())


# --------------------------------------------------------------------------------------------
# Which entries become what: LoRA factors, a LoRA layer's bias, a saved module — or nothing (named)
# --------------------------------------------------------------------------------------------
def _module_kind(module: torch.nn.Module) -> str | None:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return "conv1d"  # weight (in, out): PEFT's fan_in_fan_out
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    return None


def _matches(path: str, target_modules) -> bool:
    """PEFT's target_modules rule: a string is a regex matched in full, a list names module-path suffixes."""
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == t or path.endswith("." + t) for t in target_modules)


def _inside(path: str, ancestors: Iterable[str]) -> str | None:
    for a in ancestors:
        if path == a or path.startswith(a + "."):
            return a
    return None


class _Plan:
    """What the adapter holds for each τ entry.

    ``targets``: {module path: (kind, τ key)} LoRA layers; ``biases``: {τ key: module path} biases of LoRA layers
    (``bias="lora_only"``); ``saved``: module paths kept whole in ``modules_to_save``; ``dropped``: {τ key: reason}."""

    def __init__(self):
        self.targets: dict[str, tuple[str, str]] = {}
        self.biases: dict[str, str] = {}
        self.saved: list[str] = []
        self.dropped: dict[str, str] = {}


def _plan(entries: Mapping[str, Any], base: torch.nn.Module, target_modules, rest: str, task_type: str | None) -> _Plan:
    modules = dict(base.named_modules())
    groups = {n: g for g in tied_groups(base) for n in g}
    head_names = _TASK_HEADS.get(getattr(task_type, "value", task_type), ())
    heads = sorted({p for p in modules if p and any(p.endswith(h) for h in head_names)})  # PEFT's suffix rule
    heads = [h for h in heads if _inside(h, [x for x in heads if x != h]) is None]
    plan = _Plan()
    pending: dict[str, str] = {}  # τ key -> why it is no LoRA factor
    for k, e in entries.items():
        owner, pname = k.rsplit(".", 1) if "." in k else ("", k)
        if _inside(owner, heads) is not None:
            continue  # in the task type's head: saved whole by PEFT
        mod = modules.get(owner)
        kind = _module_kind(mod) if mod is not None else None
        tied = [n for n in groups.get(k, ()) if n.rsplit(".", 1)[0] != owner]
        if owner == "":
            why = "a parameter of the root module (PEFT cannot wrap it)"
        elif pname != "weight" or e.dim() != 2:
            why = (f"the bias of a {type(mod).__name__} layer" if pname == "bias" and kind in ("linear", "conv1d")
                   else f"{e.dim()}-D parameter {pname!r} of a {type(mod).__name__}")
        elif kind is None:
            why = f"the weight of a {type(mod).__name__} (LoRA here covers nn.Linear, Conv1D and nn.Embedding)"
        elif tied:
            why = (f"tied to {_few(tied)}: an unmerged LoRA on one tied module changes only that one, and on both is "
                   "added twice by merge_and_unload")
        elif isinstance(modules.get(owner.rsplit(".", 1)[0] if "." in owner else ""), torch.nn.MultiheadAttention):
            why = "inside nn.MultiheadAttention, which reads its out_proj weight directly (LoRA would not act)"
        elif not _matches(owner, target_modules):
            why = "not matched by target_modules"
        else:
            plan.targets[owner] = (kind, k)
            continue
        pending[k] = why
    for k in list(pending):  # a LoRA layer's bias: bias="lora_only" in "save" mode
        owner = k.rsplit(".", 1)[0]
        if k.endswith(".bias") and owner in plan.targets and plan.targets[owner][0] != "embedding":
            pending[k] = f"the bias of LoRA layer {owner!r} ({type(modules[owner]).__name__})"
    if pending and rest == "error":
        lines = "\n".join(f"  - {k}: {why}" for k, why in list(pending.items())[:20])
        more = f"\n  ... and {len(pending) - 20} more" if len(pending) > 20 else ""
        raise HfTaujpError(
            f"{len(pending)} task-vector entr{'y is' if len(pending) == 1 else 'ies are'} not LoRA factors:\n{lines}{more}\n"
            "Pass rest='save' to keep them exactly (a LoRA layer's bias with PEFT's bias='lora_only', any other "
            "module whole in modules_to_save) or rest='drop' to leave them out of the adapter.")
    if rest == "drop":
        plan.dropped = pending
        if pending:
            logger.info("to_lora(rest='drop') leaves out %d entries: %s", len(pending), _few(pending))
        pending = {}
    saved = set(heads)
    for k in pending:
        owner = k.rsplit(".", 1)[0] if "." in k else ""
        if k.endswith(".bias") and owner in plan.targets and plan.targets[owner][0] != "embedding":
            plan.biases[k] = owner
            continue
        if owner == "":
            raise HfTaujpError(f"{k!r} is a parameter of the root module: PEFT's modules_to_save cannot hold it; "
                               "pass rest='drop' to leave it out.")
        saved.add(owner)
        saved.update(n.rsplit(".", 1)[0] for n in groups.get(k, ()) if "." in n)  # every copy of a tied weight
    plan.saved = sorted(p for p in saved if _inside(p, [x for x in saved if x != p]) is None)
    for m in [m for m in plan.targets if _inside(m, plan.saved)]:
        del plan.targets[m]  # its weight (and bias) live in the saved copy
    for k in [k for k, m in plan.biases.items() if m not in plan.targets]:
        del plan.biases[k]
    # never drop a part of τ silently: every entry is a LoRA weight, a LoRA layer's bias, in a saved module or dropped
    covered = {k for _, k in plan.targets.values()} | set(plan.biases) | set(plan.dropped)
    for s in plan.saved:
        for q, _ in modules[s].named_parameters(remove_duplicate=False):
            covered.update(n for n in groups.get(f"{s}.{q}", (f"{s}.{q}",)))
    left = [k for k in entries if k not in covered]
    if left:
        raise HfTaujpError(f"to_lora has no place for {_few(left)} in the adapter; please report this with the model.")
    return plan


# --------------------------------------------------------------------------------------------
# Building the PEFT model
# --------------------------------------------------------------------------------------------
def _as_peft_factors(lr: LowRankTau, transposed: bool) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(A, B, k, lora_alpha) for a LoRA layer computing (lora_alpha / k)·B·A = s·B·A (in ``transposed``'s layout):
    the sign of s goes into B (exact); α = |s|·k when α / k gives |s| back exactly, else |s| is folded into B."""
    lr = lr.as_layout(transposed)
    A, B, s, k = lr.A, lr.B, lr.scale, lr.rank
    if s < 0:
        B, s = -B, -s
    alpha = s * k
    if alpha / k != s:
        B, alpha = (B.double() * s).to(B.dtype), float(k)
    return A, B, k, (int(alpha) if float(alpha).is_integer() else alpha)


def _lora_config(layers: Mapping[str, tuple[str, int, float]], saved: Sequence[str], biases: bool,
                 task_type: str | None):
    """The LoraConfig of ``layers`` {module path: (kind, k, α)}: r = the largest k, lora_alpha = the commonest α
    among the layers of that rank, ``rank_pattern`` / ``alpha_pattern`` for the others (full module paths)."""
    import peft

    R = max(k for _, k, _ in layers.values())
    alpha = Counter(a for _, k, a in layers.values() if k == R).most_common(1)[0][0]
    kinds = Counter(kind for kind, _, _ in layers.values())
    return peft.LoraConfig(
        task_type=task_type, r=R, lora_alpha=alpha,
        target_modules="(?:" + "|".join(re.escape(m) for m in layers) + ")",
        rank_pattern={m: k for m, (_, k, _) in layers.items() if k != R},
        alpha_pattern={m: a for m, (_, _, a) in layers.items() if a != alpha},
        lora_dropout=0.0, use_rslora=False, fan_in_fan_out=kinds["conv1d"] >= max(kinds["linear"], 1),
        bias="lora_only" if biases else "none", modules_to_save=list(saved) or None,
    )


def _build_quietly(build):
    """``build()`` with PEFT's fan_in_fan_out warning silenced: PEFT sets the flag per layer (Conv1D: True, Linear:
    False) and warns when that differs from the config's one value, which a model with both always does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*fan_in_fan_out is set to")
        return build()


def _install(pm, adapter_name: str, factors: Mapping[str, tuple[str, torch.Tensor, torch.Tensor, int, float]],
             saved: Sequence[str]) -> None:
    """Check that PEFT built what was planned (the LoRA layers, their r and scaling, the modules_to_save wrappers)
    and copy the factors in. ``HfTaujpError`` when PEFT matched the config otherwise."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    inner = pm.get_base_model()
    have = {p for p, m in inner.named_modules() if isinstance(m, LoraLayer) and (
        adapter_name in m.lora_A or adapter_name in m.lora_embedding_A)}
    wrapped = {p for p, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)
               and adapter_name in m.modules_to_save}
    if have != set(factors) or not set(saved) <= wrapped:
        raise HfTaujpError(f"PEFT built LoRA layers {_few(sorted(have ^ set(factors)))} / saved modules "
                           f"{_few(sorted(set(saved) - wrapped))} other than planned; please report this with the model.")
    with torch.no_grad():
        for m, (kind, A, B, k, alpha) in factors.items():
            layer = inner.get_submodule(m)
            if layer.r[adapter_name] != k or layer.scaling[adapter_name] != alpha / k:
                raise HfTaujpError(f"PEFT gave {m!r} rank {layer.r[adapter_name]} / scaling {layer.scaling[adapter_name]}, "
                                   f"planned {k} / {alpha / k}: its rank_pattern matched another module.")
            if kind == "embedding":
                pa, pb = layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
            else:
                pa, pb = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if tuple(pa.shape) != tuple(A.shape) or tuple(pb.shape) != tuple(B.shape):
                raise HfTaujpError(f"LoRA layer {m!r} has A {tuple(pa.shape)}, B {tuple(pb.shape)}; the factors are "
                                   f"{tuple(A.shape)}, {tuple(B.shape)}.")
            pa.copy_(A)
            pb.copy_(B)


def _check_inputs(tv, base, check_base: bool) -> dict[str, torch.Tensor]:
    if not isinstance(base, torch.nn.Module):
        raise HfTaujpError(f"to_lora expects the base model (a torch.nn.Module), got {type(base).__name__}.")
    bad = [k for k, e in tv.entries.items()
           if not (e.is_finite() if isinstance(e, LowRankTau) else bool(torch.isfinite(e).all()))]
    if bad:
        raise HfTaujpError(f"Task vector contains NaN or inf values in {len(bad)} tensor(s): {_few(bad)}.")
    if check_base:
        tv.check_compatible(base)
    params = dict(base.named_parameters())
    missing = [k for k in tv.entries if k not in params]
    if missing:
        raise HfTaujpError(f"{len(missing)} task vector key(s) are not parameters of the base model: {_few(missing)}.")
    for k, e in tv.entries.items():
        if tuple(params[k].shape) != tuple(e.shape):
            raise HfTaujpError(f"Shape mismatch for {k!r}: task vector {tuple(e.shape)} vs base {tuple(params[k].shape)}.")
    meta = [k for k, p in params.items() if p.device.type == "meta"]
    if meta:
        raise HfTaujpError(f"to_lora builds the adapter on the base model, whose weights {_few(meta)} are on the meta "
                           "device: load the base with its weights.")
    return params


def task_vector_to_lora(tv, base: torch.nn.Module, r: int | None = None, *, energy: float | None = None,
                        target_modules: str | Sequence[str] | None = None, rest: str = "error",
                        adapter_name: str = "default", task_type: str | None = None, allow_linear: bool = False,
                        check_base: bool = True):
    """``TaskVector.to_lora``'s implementation (see there); ``task_type`` is used as given (None: a plain PeftModel)."""
    import peft

    if rest not in REST_MODES:
        raise HfTaujpError(f"rest must be one of {REST_MODES}, got {rest!r}.")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise HfTaujpError(f"adapter_name must be a non-empty string, got {adapter_name!r}.")
    if target_modules is not None and not isinstance(target_modules, str) and not (
            isinstance(target_modules, (list, tuple, set)) and all(isinstance(t, str) for t in target_modules)):
        raise HfTaujpError(f"target_modules must be a regex string or a list of module names, got {target_modules!r}.")
    _check_rule(r, energy, allow_neither=True)
    if tv.kind == "linear" and allow_linear is not True:
        raise HfTaujpError(
            "This is a 'linear' task vector (the tangent of a linearized model): a LoRA adapter changes weights, so "
            "its model would be f(x; θ0 + τ), the weight reading, not the linearized model f(θ0) + J·τ it was trained "
            "as. Use to_peft(base) for the linearized adapter, or pass allow_linear=True for the weight reading.")
    params = _check_inputs(tv, base, check_base)
    entries = tv.entries
    plan = _plan(entries, base, target_modules, rest, task_type)
    if r is None and energy is None:
        dense = [k for _, k in plan.targets.values() if not isinstance(entries[k], LowRankTau)]
        if dense:
            raise HfTaujpError(f"Give a rank rule (r= or energy=): {_few(dense)} are full tensors (only a factored "
                               "vector's stored factors can become the adapter as they are).")
    factors = {}
    zero = []
    for m, (kind, k) in plan.targets.items():
        transposed = kind != "linear"
        e = entries[k]
        try:
            lr = e.as_layout(transposed) if r is None and energy is None else truncated_factors(
                e, r, energy=energy, transposed=transposed)
        except HfTaujpError as exc:
            raise HfTaujpError(f"Entry {k!r}: {exc}") from None
        if lr.rank == 0 or lr.scale == 0:
            if f"{m}.bias" not in plan.biases:
                zero.append(m)
                continue
            lr = LowRankTau(torch.zeros(1, lr.A.shape[1], dtype=lr.dtype), torch.zeros(lr.B.shape[0], 1, dtype=lr.dtype),
                            1.0, transposed)  # a rank-1 zero ΔW: the layer exists for its bias
        A, B, rk, alpha = _as_peft_factors(lr, transposed)
        factors[m] = (kind, A, B, rk, alpha)
    if not factors:
        why = f" (τ is zero on {_few(zero)})" if zero else ""
        raise HfTaujpError(f"No LoRA layer to build{why}: the task vector has no non-zero weight of an nn.Linear, "
                           "Conv1D or nn.Embedding module that target_modules selects.")
    config = _lora_config({m: (f[0], f[3], f[4]) for m, f in factors.items()}, plan.saved, bool(plan.biases), task_type)
    pm = _build_quietly(lambda: peft.get_peft_model(copy.deepcopy(base), config, adapter_name=adapter_name))
    _install(pm, adapter_name, factors, plan.saved)
    _write_full_values(pm, adapter_name, entries, params, plan, base)
    return pm


def _write_full_values(pm, adapter_name, entries, params, plan: _Plan, base) -> None:
    """θ0 + τ (float64, cast to the parameter's dtype) into the saved modules' copies and the LoRA layers' biases."""
    inner = pm.get_base_model()
    alias = {n: g for g in tied_groups(base) for n in g}
    full = {}

    def value(name):
        key = next((n for n in alias.get(name, (name,)) if n in entries), None)
        if key is None:
            return None
        if key not in full:
            e = entries[key]
            full[key] = e.full(torch.float64) if isinstance(e, LowRankTau) else e.double()
        p0 = params.get(name, params.get(key))
        return (p0.detach().double() + full[key].to(p0.device)).to(p0.dtype)

    with torch.no_grad():
        for k, m in plan.biases.items():
            b = inner.get_submodule(m).get_base_layer().bias
            b.copy_(value(k).to(b.device))
        for s in plan.saved:
            copy_ = inner.get_submodule(s).modules_to_save[adapter_name]
            for q, p in copy_.named_parameters(remove_duplicate=False):
                v = value(f"{s}.{q}")
                if v is not None:
                    p.copy_(v.to(p.device))


# --------------------------------------------------------------------------------------------
# Merging LoRA adapters (PEFT add_weighted_adapter: "cat", "svd")
# --------------------------------------------------------------------------------------------
def _check_weights(weights, n: int) -> list[float]:
    if isinstance(weights, (int, float)) and not isinstance(weights, bool):
        weights = [weights] * n
    try:
        ws = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise MergeConfigError(f"weights must be numbers, got {weights!r}.") from None
    if len(ws) != n:
        raise MergeConfigError(f"{len(ws)} weights for {n} adapters.")
    if any(isinstance(w, bool) for w in weights) or not all(math.isfinite(w) for w in ws):
        raise MergeConfigError(f"weights must be finite numbers, got {list(weights)!r}.")
    return ws


def _combine(per_adapter: Sequence[Mapping[str, Any]], ws: Sequence[float], combination_type: str,
             r: int | None, energy: float | None) -> dict[str, Any]:
    """Σ_t w_t·τ_t per key (a missing key counts as 0). Entries factored in every operand that has them: ``cat``
    concatenates the factors (:func:`~hf_taujp.low_rank_tau.low_rank_sum`, rank Σ k_t, exact), ``svd`` truncates
    that sum from its factors (:func:`truncated_factors`). Other entries: the exact full sum (``svd``: a 2-D sum of
    which some operand is factored is truncated too)."""
    keys = list(dict.fromkeys(k for d in per_adapter for k in d))
    out = {}
    for key in keys:
        terms = [(w, d[key]) for w, d in zip(ws, per_adapter) if key in d]
        factored = [isinstance(e, LowRankTau) for _, e in terms]
        if all(factored):
            s = low_rank_sum(terms)
            out[key] = s if combination_type == "cat" else truncated_factors(s, r, energy=energy,
                                                                             transposed=s.transposed)
            continue
        dt = terms[0][1].dtype
        for _, e in terms[1:]:
            dt = torch.promote_types(dt, e.dtype)
        total = sum(w * (e.full(torch.float64) if isinstance(e, LowRankTau) else e.double().to(terms[0][1].device))
                    for w, e in terms)
        if combination_type == "svd" and any(factored) and total.dim() == 2:
            lay = next(e for _, e in terms if isinstance(e, LowRankTau)).transposed
            out[key] = truncated_factors(total.to(dt), r, energy=energy, transposed=False).as_layout(lay)
        else:
            out[key] = total.to(dt)
    return out


def _max_rank(per_adapter) -> int:
    ranks = [e.rank for d in per_adapter for e in d.values() if isinstance(e, LowRankTau)]
    if not ranks:
        raise MergeConfigError("The adapters hold no LoRA factors to merge.")
    return max(ranks)


def merge_lora_adapters(adapters, weights, combination_type: str = "svd", *, r: int | None = None,
                        energy: float | None = None, adapter_names: Sequence[str] | None = None,
                        adapter_name: str | None = None, base: torch.nn.Module | None = None, **to_lora_kwargs):
    """LoRA adapters merged into one LoRA adapter: ΔW = Σ_t w_t·s_t·B_t·A_t per layer (PEFT's
    ``LoraModel.add_weighted_adapter`` semantics, peft 0.21 ``tuners/lora/model.py``).

    ``combination_type``:
    - ``"cat"`` (exact): A = [w_1 s_1 A_1; …; w_T s_T A_T], B = [B_1, …, B_T] — PEFT folds w_t·s_t into A, we into B
      (:func:`~hf_taujp.low_rank_tau.low_rank_sum`; none when the |w_t s_t| are equal); rank Σ_t k_t of the
      adapters that have the layer (PEFT pads every adapter to its largest rank first; the product is the same).
      ``r`` / ``energy`` are refused: cat keeps everything.
    - ``"svd"``: the weighted sum truncated per layer to its best rank-k approximation (Eckart–Young; computed from
      the concatenated factors by QR, never the full matrix; factors split as √σ on both sides, PEFT puts σ in B):
      k = min(r, out, in) with ``r`` defaulting to the largest rank of the adapters (PEFT's ``svd_rank=None``), or
      the ``energy`` rule of ``to_lora``.
    PEFT's other combination types combine A and B themselves (not ΔW) or prune; for TIES / DARE / … of the full
    ΔW use ``hf_taujp.merge`` on task vectors.

    Args:
        adapters: a ``peft.PeftModel`` holding the LoRA adapters (``adapter_names``: which, in order; default all),
            or a sequence of ``TaskVector``s whose LoRA weights are factored (``TaskVector.from_peft(pm,
            factored=True)``, ``to_lora``'s factors via :func:`low_rank_approximation`).
        weights: one finite number per adapter (or one number for all); negative weights subtract.
        adapter_name: the merged adapter's name: default ``"merged"`` for a PeftModel, ``"default"`` with ``base``.
        base: with task vectors, build the adapter on ``base`` (``TaskVector.to_lora(base, **to_lora_kwargs)`` of the
            merged, factored vector) instead of returning the vector.

    Returns:
        - PeftModel input: the same model with the merged adapter added (in place, not activated: PEFT's
          ``add_weighted_adapter`` contract; ``pm.set_adapter(name)``, ``pm.save_pretrained(dir,
          selected_adapters=[name])``). Its config: ``r`` = the largest rank, ``rank_pattern`` / ``alpha_pattern``
          per layer, ``use_rslora=False``, the first adapter's ``task_type``.
        - Task vectors: the merged factored ``TaskVector`` (full entries, e.g. ``lora_bias`` Δb, summed exactly), or
          with ``base`` the PeftModel of ``to_lora``.

    Raises:
        MergeConfigError: an unknown ``combination_type`` (PEFT's others named), weights of the wrong number or not
            finite, ``r`` / ``energy`` with ``"cat"``, a bad rank rule, an unknown or existing adapter name, no
            LoRA factors at all.
        HfTaujpError: adapters that are not LoRA (or, from a PeftModel, whose change is not only factors: DoRA,
            ``lora_bias``, trained biases, modules_to_save — named), vectors of different kinds or bases.
    """
    if combination_type not in LORA_COMBINATIONS:
        raise MergeConfigError(
            f"combination_type must be one of {LORA_COMBINATIONS}, got {combination_type!r}. PEFT's 'linear', 'ties', "
            "'dare_*' and 'magnitude_prune*' combine the A and B factors themselves (Σ w·B_t · Σ w·A_t is not "
            "Σ w·B_t·A_t) or prune them; for TIES / DARE on ΔW merge task vectors with hf_taujp.merge.")
    if combination_type == "cat" and (r is not None or energy is not None):
        raise MergeConfigError("combination_type='cat' is exact (rank Σ k_t): r / energy apply to 'svd' only.")
    _check_rule(r, energy, allow_neither=True, err=MergeConfigError)
    if isinstance(adapters, torch.nn.Module):
        if not hasattr(adapters, "peft_config"):
            raise HfTaujpError(f"merge_lora_adapters expects a peft.PeftModel or task vectors, got {type(adapters).__name__}.")
        if to_lora_kwargs or base is not None:
            raise MergeConfigError(f"base= and to_lora options apply to task vectors, not to a PeftModel "
                                   f"(got {sorted(to_lora_kwargs) + (['base'] if base is not None else [])}).")
        return _merge_in_peft_model(adapters, weights, combination_type, r, energy, adapter_names,
                                    adapter_name or "merged")
    if adapter_names is not None:
        raise MergeConfigError("adapter_names selects adapters of a PeftModel; got task vectors.")
    vectors = list(adapters)
    if not vectors:
        raise MergeConfigError("merge_lora_adapters needs at least one adapter.")
    if not all(hasattr(v, "entries") and hasattr(v, "check_compatible") for v in vectors):
        raise HfTaujpError("merge_lora_adapters expects a PeftModel or a sequence of TaskVectors, got "
                           f"{[type(v).__name__ for v in vectors]}.")
    for v in vectors[1:]:
        vectors[0].check_compatible(v)
    ws = _check_weights(weights, len(vectors))
    per = [dict(v.entries) for v in vectors]
    if combination_type == "svd" and r is None and energy is None:
        r = _max_rank(per)
    else:
        _max_rank(per)
    meta = vectors[0].metadata()
    meta.update(task=meta["task"] if all(v.task == meta["task"] for v in vectors) else None,
                training=meta["training"] if all(v.training == meta["training"] for v in vectors) else {})
    for field in ("base_fingerprint", "base_model", "base_model_revision"):
        meta[field] = next((getattr(v, field) for v in vectors if getattr(v, field)), None)
    merged = type(vectors[0])(_combine(per, ws, combination_type, r, energy), **meta)
    if base is None:
        return merged
    return merged.to_lora(base, adapter_name=adapter_name or "default", **to_lora_kwargs)


def _merge_in_peft_model(pm, weights, combination_type, r, energy, adapter_names, adapter_name):
    names = list(adapter_names) if adapter_names is not None else list(pm.peft_config)
    unknown = [n for n in names if n not in pm.peft_config]
    if unknown or not names:
        raise MergeConfigError(f"Adapters {unknown or names} are not in the PEFT model (has {sorted(pm.peft_config)}).")
    if adapter_name in pm.peft_config:
        raise MergeConfigError(f"The PEFT model already has an adapter named {adapter_name!r}; choose another "
                               "adapter_name (PEFT's add_weighted_adapter silently keeps the old one).")
    ws = _check_weights(weights, len(names))
    per = []
    for n in names:
        peft_type = str(getattr(pm.peft_config[n], "peft_type", "")).split(".")[-1].upper()
        if peft_type != "LORA":
            raise HfTaujpError(f"Adapter {n!r} is a {peft_type} adapter: merge_lora_adapters merges LoRA adapters.")
        tensors, _, _ = tensors_from_peft(pm, None, n, {}, factored=True)
        full = [k for k, e in tensors.items() if not isinstance(e, LowRankTau)]
        if full:
            raise HfTaujpError(f"Adapter {n!r} changes {_few(full)} by more than LoRA factors (lora_bias or trained "
                               "biases): a merged LoRA adapter of a PeftModel holds factors only. Merge "
                               "TaskVector.from_peft(pm, adapter_name=..., factored=True) vectors instead and build "
                               "the adapter with to_lora(base, rest='save').")
        per.append(tensors)
    if combination_type == "svd" and r is None and energy is None:
        r = _max_rank(per)
    else:
        _max_rank(per)
    merged = _combine(per, ws, combination_type, r, energy)
    inner = pm.get_base_model()
    factors = {}
    for key, lr in merged.items():
        m = key[: -len(".weight")]
        layer = inner.get_submodule(m)
        kind = _module_kind(layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer)
        if lr.rank == 0 or lr.scale == 0:
            continue
        A, B, k, alpha = _as_peft_factors(lr, kind != "linear")
        factors[m] = (kind, A, B, k, alpha)
    if not factors:
        raise MergeConfigError("The weighted sum of the adapters is zero on every layer: no adapter to build.")
    first = pm.peft_config[names[0]]
    config = _lora_config({m: (f[0], f[3], f[4]) for m, f in factors.items()}, (), False,
                          getattr(first, "task_type", None))
    _build_quietly(lambda: pm.add_adapter(adapter_name, config))
    _install(pm, adapter_name, factors, ())
    return pm
