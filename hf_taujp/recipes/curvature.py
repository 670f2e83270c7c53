"""The recipes' ``kfac`` methods (Porrello et al., ICLR 2026): each task's KFAC factors estimated once at θ0 on its
own training inputs (:func:`estimate_curvature`, saved under ``<output_dir>/curvature/<task>`` as Hub artifacts),
the ``--kfac-*`` options, and the report's note. Training against the other tasks' factors is
:func:`hf_taujp.recipes.finetuning.finetune` with ``curvature=``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from ..hub import HfTaujpError
from .common import float_list
from .finetuning import low_rank_targets
from .statistics_merges import statistics_batches

__all__ = ["estimate_curvature", "kfac_layers", "kfac_note", "KFAC_PROBES", "add_kfac_arguments", "check_kfac_options"]


def kfac_layers(model: nn.Module, parameter_names: Sequence[str]) -> list[str]:
    """The layers whose factors a recipe's kfac methods need: every nn.Linear / Conv1D whose weight is trained.

    Raises:
        HfTaujpError: the output layer (LM head) is trained — directly or through embeddings tied to it — since its
            G would be vocabulary × vocabulary (49k² floats for SmolLM2); or no Linear / Conv1D weight is trained.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None and getattr(head, "weight", None) is not None:
        trained = set(parameter_names)
        tied = [n for n, p in model.named_parameters() if p is head.weight and n in trained]
        if tied:
            raise HfTaujpError(f"the kfac methods need the output layer frozen: {tied[0]} (the LM head, or embeddings "
                               "tied to it) is trained, and its KFAC factor G would be vocabulary × vocabulary; train "
                               "the last decoder layers (--layers N) or --target-modules without the head / embeddings")
    return low_rank_targets(model, parameter_names)


def estimate_curvature(model: nn.Module, data: Mapping[str, object], layers: Sequence[str], *, output_dir: str,
                       probe: str, seed: int, output: str = "logits", output_fn: Callable | None = None,
                       collate_fn: Callable | None = None, batch_size: int = 8, max_examples: int | None = None,
                       meta: Mapping | None = None, save: bool = True) -> tuple[dict, dict]:
    """Each task's KFAC factors at θ0 on its own training inputs, once for every ``kfac`` method of a recipe
    (:func:`~hf_taujp.trainer.estimate_kfac`), saved to ``<output_dir>/curvature/<task>`` (safetensors + card, the
    folder :class:`~hf_taujp.trainer.KFACStatistics.from_pretrained` and the trainer's ``taujp_curvature`` read).

    Args:
        model: θ0 in the structure it is trained in (the recipe's frozen-prefix suffix model, CLIP's classifier):
            factors are keyed by module path.
        data: ``{task: inputs}``: a sequence of example dicts batched with ``collate_fn`` (:func:`statistics_batches`),
            or, without ``collate_fn``, what ``estimate_kfac`` reads (batches, a dataset); labels not needed.
        layers: module paths of the trained nn.Linear / Conv1D layers (:func:`low_rank_targets`: never the LM head).
        probe: "fisher" (f read as logits: G in nats) or "gaussian" (the reference's, for an embedding f).
        output, output_fn: the penalised output f, as the training run's (``TauJpConfig.taujp_output`` / a function).
        max_examples: examples per task (the reference: 128–256 suffice).
        meta: ``base_model`` recorded on the card (the base fingerprint is the model's own).
        save: write the folders (False on the non-main processes of a DDP run: they hold the same factors).
    Returns:
        ``({task: KFACStatistics}, {task: {"seconds", "bytes", "examples", "layers"}})`` — bytes on disk per task.
    """
    import os

    from ..trainer import estimate_kfac

    stats, info = {}, {}
    for i, (task, inputs) in enumerate(data.items()):
        t0 = time.perf_counter()
        if collate_fn is not None:  # the recipe's own examples (token ids or cached features), batched as it batches them
            inputs = statistics_batches(inputs, collate_fn, batch_size, len(inputs) if max_examples is None else max_examples)
        st = estimate_kfac(model, inputs, output=output, output_fn=output_fn, layers=list(layers), probe=probe,
                           batch_size=batch_size, max_examples=max_examples, seed=seed + i, task=task, progress=True)
        if meta and meta.get("base_model"):
            st.base_model = meta["base_model"]
        folder = os.path.join(output_dir, "curvature", task)
        if save:
            st.save_pretrained(folder)
            size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
        else:
            size = sum(t.numel() * t.element_size() for t in st.tensors.values())
        stats[task] = st
        info[task] = {"seconds": round(time.perf_counter() - t0, 2), "bytes": size, "examples": st.num_examples,
                      "layers": len(st.layers), "probe": probe}
        print(f"[hf-taujp] KFAC factors of {task}: {len(st.layers)} layers, {st.num_examples} examples, "
              f"{size / 2**20:.1f} MiB, {info[task]['seconds']:.1f} s")
    return stats, info


def kfac_note(curvature: Mapping) -> str:
    """The report's note on the kfac methods, from ``results["curvature"]`` (:func:`estimate_curvature`'s info)."""
    tasks = curvature["tasks"]
    mib = sum(t["bytes"] for t in tasks.values()) / len(tasks) / 2**20
    used = sorted({t["examples"] for t in tasks.values()})
    used = f"{used[0]}" if len(used) == 1 else f"{used[0]}–{used[-1]}"
    return (f"+ KFAC: the dataless penalty λ·Σ_layers tr(G·ΔW̃·A·ΔW̃ᵀ) (Porrello et al. 2026) with the other tasks' "
            f"KFAC factors of {curvature['output']} ({curvature['probe']} probe, {used} training "
            f"inputs per task, {curvature['aggregation']}), no other task's data; factors {mib:.1f} MiB per task on "
            f"disk, estimated in {sum(t['seconds'] for t in tasks.values()):.0f} s for all tasks")


KFAC_PROBES = ("fisher", "gaussian")


def add_kfac_arguments(p, *, default_lambda: float, default_probe: str, why: str, several: bool = True) -> None:
    """The recipes' ``--kfac-lambda``, ``--kfac-probe``, ``--kfac-examples`` and ``--kfac-aggregation`` (the ``kfac``
    methods); ``why`` says where the recipe's default λ comes from; ``several``: the recipe takes a λ list."""
    p.add_argument("--kfac-lambda", type=float_list, default=[default_lambda],
                   help=f"λ of the kfac methods ({why})" + ("; a comma list trains them once per λ and marks the one "
                                                           "chosen on validation" if several else ""))
    p.add_argument("--kfac-probe", default=default_probe, choices=list(KFAC_PROBES),
                   help="G's probe: fisher (y ∼ softmax(f): the KL's curvature, in nats; for logits) or gaussian "
                        "(ε ∼ N(0, I): the reference's, for an embedding)")
    p.add_argument("--kfac-examples", type=int, default=256,
                   help="training inputs per task for its KFAC factors (the reference: 128–256 suffice)")
    p.add_argument("--kfac-aggregation", default="merged", choices=["merged", "per_task"],
                   help="how the other tasks' factors combine: merged (paper Eq. 8, the reference's default: A weighted "
                        "by examples, G summed) or per_task (Eq. 7: one term per task)")


def check_kfac_options(kfac_lambda, kfac_probe: str, kfac_examples: int, kfac_aggregation: str) -> list[float]:
    """The kfac methods' λ list after checking the ``--kfac-*`` options together (before any work).

    Raises:
        HfTaujpError: λ not one or more distinct finite numbers ≥ 0; an unknown probe or aggregation;
            kfac_examples < 1.
    """
    lams = list(kfac_lambda) if isinstance(kfac_lambda, (list, tuple)) else [kfac_lambda]
    try:
        lams = [float(x) for x in lams]
    except (TypeError, ValueError):
        lams = []
    if not lams or any(not (0 <= x < math.inf) for x in lams) or len(set(lams)) != len(lams):
        raise HfTaujpError(f"kfac_lambda must be one or more distinct finite numbers >= 0, got {kfac_lambda!r}")
    if kfac_probe not in KFAC_PROBES:
        raise HfTaujpError(f"kfac_probe must be one of {KFAC_PROBES}, got {kfac_probe!r}")
    if kfac_aggregation not in ("merged", "per_task"):
        raise HfTaujpError(f"kfac_aggregation must be 'merged' or 'per_task', got {kfac_aggregation!r}")
    if isinstance(kfac_examples, bool) or not isinstance(kfac_examples, int) or kfac_examples < 1:
        raise HfTaujpError(f"kfac_examples must be an integer >= 1, got {kfac_examples!r}")
    return lams
