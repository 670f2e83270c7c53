"""A task vector as a PEFT adapter: the tangent reading as a LINEARIZED adapter (:meth:`TaskVector.to_peft`,
full-rank or low-rank) and θ0 + τ as a LoRA adapter (:meth:`TaskVector.to_lora`, in
:mod:`hf_taujp.lora_extraction`). Reading adapters back is :meth:`TaskVector.from_peft`
(:mod:`hf_taujp.peft_conversion`).
"""

from __future__ import annotations

import copy
import re

import torch

from ..errors import HfTaujpError
from ..low_rank_tau import LowRankTau
from .entries import _few, _params_of, _task_type_of


class TaskVectorPeftAdapters:
    """Mixin of :class:`~hf_taujp.task_vector.TaskVector`: ``to_peft`` and ``to_lora``."""

    def to_peft(
        self,
        base: torch.nn.Module,
        alpha: float = 1.0,
        *,
        task_type: str | None = None,
        adapter_name: str = "default",
        check_base: bool = True,
        low_rank: bool | None = None,
    ):
        """The tangent reading as a LINEARIZED PEFT model: f(x; θ0) + J f(x; θ0)·ατ, saveable.

        Returns ``peft.get_peft_model(copy of base, LinearizedConfig(...))`` with τ = α·(this vector):
        ``save_pretrained(dir)`` writes an ordinary adapter folder that
        ``peft.PeftModel.from_pretrained(base, dir)`` loads (after ``import hf_taujp``), and
        ``TaskVector.from_peft(dir)`` reads back as a ``"linear"`` vector. The linearized modules are the
        modules owning the vector's keys; their other parameters get τ = 0. ``task_type`` (PEFT's,
        e.g. ``"CAUSAL_LM"``, ``"SEQ_CLS"``) defaults to the one the base model's class implies. A
        ``"nonlinear"`` vector gives its linear reading, with a ``UserWarning`` as in :meth:`apply_to`.

        ``low_rank`` (default: whether the vector holds factored entries): ``True`` gives a low-rank adapter,
        ``LinearizedConfig(r=R)`` with R the largest rank of the entries, whose factors are set
        (``set_factors``) to the vector's: each entry's A and B padded with zero rows / columns up to R
        (exact), in the layer's layout (Conv1D / Embedding: the transposed one), the scale α·s carried by
        ``lora_alpha`` = |α·s|·R when every entry has the same |α·s| and that gives s back exactly (signs go
        into B), else folded into B with ``lora_alpha = R`` (s = 1; one float32 rounding of B). The adapter
        stores float32 factors. ``False``: a full-rank adapter holding the full τ (materialised per tensor).

        Raises like :meth:`apply_to` on another base, unknown keys, shapes and NaN / inf. With
        ``low_rank=True``, ``HfTaujpError`` (pointing at ``low_rank=False``) for entries stored as full
        tensors (a head's h − h0, biases), entries that are not a module's ``weight``, or a rank R above
        min(out, in) of a target (a sum of many factored vectors).
        """
        import peft

        from ..tuners.linearized import LinearizedConfig

        if not isinstance(base, torch.nn.Module):
            raise HfTaujpError(f"to_peft expects a torch.nn.Module, got {type(base).__name__}.")
        if low_rank not in (None, True, False):
            raise HfTaujpError(f"low_rank must be True, False or None (whether the vector is factored), got {low_rank!r}.")
        self._reading(True, "to_peft")
        self._check_finite()
        if check_base:
            self.check_compatible(base)
        self._check_against(_params_of(base), what="base model")
        top = [k for k in self._entries if "." not in k]
        if top:
            raise HfTaujpError(f"Parameters {_few(top)} belong to the root module, which PEFT cannot target.")
        if self.is_low_rank if low_rank is None else low_rank:
            return self._to_low_rank_peft(base, alpha, task_type or _task_type_of(base), adapter_name)
        modules = sorted({k.rsplit(".", 1)[0] for k in self._entries})
        config = LinearizedConfig(
            task_type=task_type or _task_type_of(base),
            target_modules="(?:" + "|".join(re.escape(m) for m in modules) + ")",
        )
        pm = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=adapter_name)
        names = pm.base_model.parameter_names(adapter_name)
        mparams = dict(pm.get_base_model().named_parameters())
        tangents = {}
        full = self.tensors
        for n in names:
            t = full.get(n)
            tangents[n] = torch.zeros_like(mparams[n]) if t is None else alpha * t.to(device=mparams[n].device, dtype=torch.float32)
        missing = [k for k in self._entries if k not in tangents]
        if missing:  # never drop a part of τ silently
            raise HfTaujpError(f"The LINEARIZED adapter would not cover {_few(missing)} (tied or shared parameters?).")
        with torch.no_grad():
            pm.base_model.set_tangents(tangents, adapter_name=adapter_name)
        return pm

    def to_lora(self, base: torch.nn.Module, r: int | None = None, *, energy: float | None = None,
                target_modules: str | list[str] | None = None, rest: str = "error", adapter_name: str = "default",
                task_type: str | None = "auto", allow_linear: bool = False, check_base: bool = True):
        """θ0 + τ as a PEFT LoRA adapter on (a deep copy of) ``base``: per 2-D target weight, ΔW = the best rank-k
        approximation of τ_W (truncated SVD, Eckart–Young), the analogue of ``mergekit-extract-lora``.

        Targets: the weights of ``base``'s ``nn.Linear``, transformers ``Conv1D`` (ΔW = (B·A)ᵀ, PEFT's
        fan_in_fan_out) and ``nn.Embedding`` (``lora_embedding_A`` / ``_B``) modules that τ holds (``target_modules``:
        PEFT's rule, a regex matched in full or a list of module-name suffixes). Factors A = √σ_k·V_kᵀ (k × in),
        B = U_k·√σ_k (out × k), lora_alpha = k per layer (s = 1), ``rank_pattern`` / ``alpha_pattern`` per layer.

        Rank rule, per tensor, one of: ``r`` (clamped to min(out, in): full rank, exact, recorded in
        ``rank_pattern``) or ``energy`` ∈ (0, 1] (the smallest k keeping that fraction of ‖τ_W‖_F²). Neither: a
        factored vector's stored factors become the adapter as they are. Full rank reproduces θ0 + τ.
        ``rest``: what to do with entries that are no LoRA factor (biases, norms, other layer types, tied weights):
        ``"error"`` (default: ``HfTaujpError`` naming each with its reason), ``"drop"``, or ``"save"`` (a LoRA layer's
        bias via PEFT's ``bias="lora_only"``, any other module whole in ``modules_to_save`` at θ0 + τ).
        ``task_type``: PEFT's; ``"auto"`` (default) the one the base class implies (as :meth:`to_peft`), ``None`` a
        plain ``PeftModel``. SEQ_CLS / TOKEN_CLS / QUESTION_ANS heads are saved whole by PEFT. A ``"linear"`` vector is refused unless ``allow_linear=True`` (a LoRA gives its weight
        reading f(θ0 + τ); :meth:`to_peft` gives the linearized model). hf_taujp/lora_extraction/ has the details.

        Returns a ``peft.PeftModel`` (``save_pretrained`` / ``PeftModel.from_pretrained(base, dir)``).
        Raises ``HfTaujpError`` for a bad rank rule, another base (``BaseModelMismatchError``), keys / shapes that
        are not the base's, NaN / inf, entries that are no LoRA factor (``rest="error"``), or no target at all.
        """
        from ..lora_extraction import task_vector_to_lora

        return task_vector_to_lora(self, base, r, energy=energy, target_modules=target_modules, rest=rest,
                                   adapter_name=adapter_name,
                                   task_type=_task_type_of(base) if task_type == "auto" else task_type,
                                   allow_linear=allow_linear, check_base=check_base)

    def _to_low_rank_peft(self, base: torch.nn.Module, alpha: float, task_type: str, adapter_name: str):
        """:meth:`to_peft` with ``low_rank=True`` (see there)."""
        import peft

        from ..tuners.linearized import LinearizedConfig

        hint = " Use to_peft(base, low_rank=False) for a full-rank LINEARIZED adapter holding the full τ."
        dense = [k for k, e in self._entries.items() if not isinstance(e, LowRankTau)]
        if dense:
            raise HfTaujpError(f"A low-rank LINEARIZED adapter holds factors only, but {_few(dense)} are stored as full "
                               f"tensors (a head's h − h0, biases).{hint}")
        factors = self.factors
        if not factors:
            raise HfTaujpError(f"to_peft(low_rank=True) of a vector without entries.{hint}")
        not_weight = [k for k in factors if not k.endswith(".weight")]
        if not_weight:
            raise HfTaujpError(f"Low-rank tangents sit on a module's weight; {_few(not_weight)} are not.{hint}")
        R = max(max(e.rank for e in factors.values()), 1)
        too_big = [k for k, e in factors.items() if R > min(e.shape)]
        if too_big:
            raise HfTaujpError(f"Rank {R} exceeds min(out, in) of {_few(too_big)} (shape "
                               f"{tuple(factors[too_big[0]].shape)}): a LinearizedConfig cannot have r above it.{hint}")
        coef = {k: float(alpha) * e.scale for k, e in factors.items()}
        mags = {abs(c) for c in coef.values()}
        c0 = mags.pop() if len(mags) == 1 else 0.0
        # s = lora_alpha / R: c0 when every |α·s| is that one positive number, else 1 with the scales in B
        modules = sorted(k[: -len(".weight")] for k in factors)
        config = LinearizedConfig(task_type=task_type, r=R, lora_alpha=c0 * R if c0 > 0 else float(R),
                                  target_modules="(?:" + "|".join(re.escape(m) for m in modules) + ")")
        pm = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=adapter_name)
        have = pm.base_model.get_factors(adapter_name)
        if set(have) != set(factors):
            raise HfTaujpError(f"The low-rank adapter covers {_few(sorted(have))}, the vector {_few(sorted(factors))}.{hint}")
        # the adapter's own record of the weights stored (in, out) (Conv1D, Embedding): τ = (s·B·A)ᵀ there
        transposed = set(pm.peft_config[adapter_name].fan_in_fan_out_modules or [])
        new = {}
        for k, e in factors.items():
            A0, B0, s_ad = have[k]
            e = e.as_layout(k[: -len(".weight")] in transposed)
            A, B = torch.zeros_like(A0), torch.zeros_like(B0)
            A[: e.rank] = e.A.to(device=A.device, dtype=A.dtype)
            if abs(coef[k]) == s_ad:  # exact: the adapter's s is the entry's, the sign goes into B
                B[:, : e.rank] = (e.B if coef[k] > 0 else -e.B).to(device=B.device, dtype=B.dtype)
            else:  # one rounding of B: s_ad·B' = coef·B
                B[:, : e.rank] = (e.B.double() * (coef[k] / s_ad)).to(device=B.device, dtype=B.dtype)
            new[k] = (A, B)
        pm.base_model.set_factors(new, adapter_name=adapter_name)
        return pm
