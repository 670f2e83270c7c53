"""Task vectors τ = θ_ft − θ0 (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, Eq. 1)
and their linearized counterpart (Ortiz-Jiménez et al., "Task Arithmetic in the Tangent Space", 2023):
a tangent τ applied as f_lin(x; θ0 + τ) = f(x; θ0) + J_θ f(x; θ0)·τ.

Keys are the base model's parameter names (``named_parameters()``; tied weights once). A task vector is
a Hub artifact: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` with the folder layout of
docs/modules.md (``config.json`` + ``task_vector*.safetensors`` + model card), never pickles.

Rules (documented choices):
- Arithmetic between vectors of different bases (fingerprint or base model id differ) raises
  ``BaseModelMismatchError``; use ``a.add(b, check_base=False)`` to override. Vectors of different
  kinds ("linear" vs "nonlinear") never combine: they live in different spaces (weights vs tangents).
- Keys present in only one operand count as zero there (union of keys); a shape mismatch on a shared
  key raises. The result dtype is ``torch.promote_types`` of the operands.
- ``apply_to`` computes θ0 + α·τ in float32 and casts back to each base parameter's dtype. Either
  reading applies to either kind (``linear=``; the vector's own by default, the other one warns);
  ``to_peft`` gives the tangent reading as a saveable LINEARIZED PEFT model.
- ``save_pretrained`` writes only the vector's own files into a folder (``hub.atomic_dir``).

Low-rank (factored) vectors: an entry may be a :class:`~hf_taujp.low_rank_tau.LowRankTau` (τ = s·B·A kept
as its factors; ``TaskVector.from_peft(..., factored=True)`` for LoRA and low-rank LINEARIZED adapters).
``tv[name]`` / ``tv.tensors`` give the exact full τ, materialised per tensor on each access (not cached),
so every consumer (both readings, dot / norm, merges) sees the full tensor and nothing is truncated;
``tv.entries`` gives what is stored. Arithmetic stays factored where it is exact: c·τ and −τ scale the
factors' scale, τ_1 + τ_2 of two factored entries concatenates the factors (the rank adds), factored + full
is full. Saved, the factors are ``<name>.lora_A`` (r × in) and ``<name>.lora_B`` (out × r) with the
config's ``low_rank`` table ({name: rank, scale, layout, shape}) and ``format_version`` 2 (full vectors
keep writing version 1, so older hf-taujp still reads them).
"""

from __future__ import annotations

# The package's modules, one concept each: core (the TaskVector class: construction, entries, metadata,
# compatibility), arithmetic, application (apply_to), peft_adapters (to_peft, to_lora), serialization (the Hub
# artifact), entries (helpers they share). Every name stays importable from hf_taujp.task_vector.
from ..fingerprints import fingerprint  # re-exported: hf_taujp.task_vector.fingerprint
from ..peft_conversion import tensors_from_peft  # noqa: F401
from .arithmetic import cosine_matrix
from .core import KINDS, TaskVector  # noqa: F401
from .entries import _FullTensors, _few, _name_of, _params_of, _rank_text, _task_type_of  # noqa: F401
from .serialization import FORMAT, FORMAT_VERSION, PREFIX, _entries_from_files, read_task_vector_config  # noqa: F401

__all__ = ["TaskVector", "fingerprint", "cosine_matrix", "read_task_vector_config", "FORMAT", "FORMAT_VERSION", "PREFIX"]
