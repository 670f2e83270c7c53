"""Applying a task vector to a base model, under either reading of τ: the weights θ0 + α·τ, or the
tangent f(x; θ0) + α·J f(x; θ0)·τ of a linearized model (:meth:`TaskVector.apply_to`).
"""

from __future__ import annotations

import copy
import warnings

import torch

from ..errors import HfTaujpError
from ..low_rank_tau import LowRankTau
from .entries import _few, _params_of


class TaskVectorApplication:
    """Mixin of :class:`~hf_taujp.task_vector.TaskVector`: ``apply_to`` and the checks and reading rule it shares
    with the PEFT conversions."""

    # ---------------------------------------------------------------- application
    def apply_to(
        self,
        base: torch.nn.Module,
        alpha: float = 1.0,
        *,
        linear: bool | None = None,
        inplace: bool = False,
        check_base: bool = True,
    ) -> torch.nn.Module:
        """The model θ0 + α·τ under one of the two readings of τ.

        ``linear=False`` (the weight reading): a deep copy of ``base`` (``base`` itself when
        ``inplace=True``) whose parameters are θ0 + α·τ, computed in float32 and cast to each
        parameter's dtype. ``linear=True`` (the tangent reading): ``hf_taujp.linearize(copy,
        parameter_names=keys, tangents={k: α·τ[k]})``, i.e. f(x; θ0) + α·J f(x; θ0)·τ
        (Ortiz-Jiménez et al. 2023, Eq. 4). ``linear=None`` (default) takes the vector's own reading
        (``kind``). Either reading of either kind is allowed: the linear reading of a non-linear vector
        is Ortiz-Jiménez et al.'s diagnostic of how far fine-tuning left the tangent space, the weight
        reading of a linear vector is what ``merge_and_unload`` gives; a ``UserWarning`` says so when
        the reading differs from ``kind``. For a saveable linearized model use :meth:`to_peft`.
        The caller's ``base`` is never modified unless ``inplace=True``. A factored (low-rank) entry is
        applied as its full τ, materialised one tensor at a time. Raises on a different base
        (fingerprint), keys that are not base parameters, shape mismatches and NaN / inf entries.
        """
        if not isinstance(base, torch.nn.Module):
            raise HfTaujpError(f"apply_to expects a torch.nn.Module, got {type(base).__name__}.")
        linear = self._reading(linear, "apply_to")
        self._check_finite()
        if check_base:
            self.check_compatible(base)
        params = _params_of(base)
        self._check_against(params, what="base model")
        not_float = [k for k in self._entries if not params[k].is_floating_point()]
        if not_float:
            raise HfTaujpError(
                f"Base parameter(s) {_few(not_float)} have non-floating dtype {params[not_float[0]].dtype} "
                "(quantized or integer storage): θ0 + α·τ cannot be written into them; load the base in float."
            )
        model = base if inplace else copy.deepcopy(base)
        if linear:
            from ..linearize import linearize

            tangents = {}
            mparams = _params_of(model)
            for k, t in self._full_items():
                p = mparams[k]
                tangents[k] = (alpha * t.to(device=p.device, dtype=torch.float32)).to(p.dtype)
            return linearize(model, parameter_names=list(self._entries), tangents=tangents)
        mparams = _params_of(model)
        with torch.no_grad():
            for k, t in self._full_items():
                p = mparams[k]
                new = p.detach().to(torch.float32) + alpha * t.to(device=p.device, dtype=torch.float32)
                p.copy_(new.to(p.dtype))
        return model

    def _check_finite(self) -> None:
        """``HfTaujpError`` naming the entries holding NaN / inf: full tensors and factors as stored (a
        factored entry is not materialised here; :meth:`_full_items` checks what it materialises)."""
        bad = [k for k, e in self._entries.items()
               if not (e.is_finite() if isinstance(e, LowRankTau) else bool(torch.isfinite(e).all()))]
        if bad:
            raise HfTaujpError(f"Task vector ({self.task or 'untitled'}) contain NaN or inf values in {len(bad)} "
                               f"tensor(s): {_few(bad)}.")

    def _full_items(self):
        """``(name, full τ)`` one at a time, a factored entry materialised just then (and checked finite: the
        float64 product of finite factors can still overflow the entry's dtype)."""
        for k, e in self._entries.items():
            if isinstance(e, LowRankTau):
                t = e.full()
                if not bool(torch.isfinite(t).all()):
                    raise HfTaujpError(f"Task vector entry {k!r}: s·B·A overflows {t.dtype} (inf after the cast).")
                yield k, t
            else:
                yield k, e

    def _reading(self, linear: bool | None, where: str) -> bool:
        if linear is None:
            return self.kind == "linear"
        if not isinstance(linear, bool):
            raise HfTaujpError(f"linear must be True, False or None (the vector's own reading), got {linear!r}.")
        if linear and self.kind != "linear":
            warnings.warn(
                f"{where}(linear=True) of a 'nonlinear' task vector (θ_ft − θ0): its tangent-space reading "
                "f(θ0) + J·ατ, the diagnostic of Ortiz-Jiménez et al. 2023, not the fine-tuned model θ0 + ατ.",
                UserWarning,
                stacklevel=3,
            )
        elif not linear and self.kind == "linear":
            warnings.warn(
                f"{where}(linear=False) of a 'linear' task vector (a tangent): its weight reading f(θ0 + ατ), "
                "as merge_and_unload gives, not the linearized model it was trained as.",
                UserWarning,
                stacklevel=3,
            )
        return linear
