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

# The package's modules, one concept each: truncation (the rank rule, truncated SVD, low_rank_approximation),
# targets (which entries become what), peft_lora (building the LoRA model), extraction (task_vector_to_lora),
# adapter_merging (merge_lora_adapters). Every name stays importable from hf_taujp.lora_extraction.
from .adapter_merging import LORA_COMBINATIONS, _check_weights, _combine, _max_rank, _merge_in_peft_model  # noqa: F401
from .adapter_merging import merge_lora_adapters
from .extraction import _check_inputs, _write_full_values, task_vector_to_lora  # noqa: F401
from .peft_lora import _as_peft_factors, _build_quietly, _install, _lora_config  # noqa: F401
from .targets import _TASK_HEADS, REST_MODES, _inside, _matches, _module_kind, _Plan, _plan, logger  # noqa: F401
from .truncation import _check_rule, _few, _rank_of, _svd, low_rank_approximation, truncated_factors  # noqa: F401

__all__ = ["task_vector_to_lora", "low_rank_approximation", "merge_lora_adapters", "truncated_factors",
           "REST_MODES", "LORA_COMBINATIONS"]
