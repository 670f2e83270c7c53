"""Building the PEFT LoRA model of planned factors: the layers' (A, B, k, lora_alpha) with s = lora_alpha / k
(``_as_peft_factors``), the ``LoraConfig`` with ``rank_pattern`` / ``alpha_pattern`` (``_lora_config``), and the
check that PEFT built what was planned before the factors are copied in (``_install``).
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence

import torch

from ..errors import HfTaujpError
from ..low_rank_tau import LowRankTau
from .truncation import _few


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
