"""Which τ entries become what in a LoRA adapter (``_plan``): LoRA factors of nn.Linear / Conv1D /
nn.Embedding weights, a LoRA layer's bias, a module saved whole in ``modules_to_save``, or nothing —
every other entry named with its reason (``rest=``: ``REST_MODES``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import HfTaujpError
from ..tied import tied_groups
from .truncation import _few

# the package's logger, "hf_taujp.lora_extraction" (its name before the package was split into modules)
logger = logging.getLogger(__package__)

REST_MODES = ("error", "drop", "save")
# PEFT 0.21 peft_model.py: the heads its task-type classes always add to modules_to_save (suffix match)
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


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
