"""The fingerprint of a set of base weights: how task vectors, statistics and merges tell bases apart.

Named ``fingerprints`` (plural) because the package exports the function ``hf_taujp.fingerprint``: a
submodule of the same name would replace that attribute when imported (see ``hf_taujp.linearize``).
``hf_taujp.task_vector.fingerprint`` re-exports it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from .errors import HfTaujpError

__all__ = ["fingerprint"]

_SAMPLES_PER_TENSOR = 256


def _state_of(model_or_state_dict) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state_dict, torch.nn.Module):
        return model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, Mapping):
        return dict(model_or_state_dict)
    raise HfTaujpError(f"Expected a torch.nn.Module or a state dict, got {type(model_or_state_dict).__name__}.")


def fingerprint(model_or_state_dict) -> str:
    """A short identifier of a set of base weights, equal for fp32 / bf16 / fp16 loads of them and for
    every way the same weights are listed (a model, its ``state_dict()``, ``named_parameters()``, a
    ``save_pretrained`` folder that dropped tied copies or buffers).

    For every floating tensor, the *signs* (x > 0) of up to 256 entries at deterministic evenly spaced
    flat positions are taken with its shape; the SHA-256 (first 32 hex digits, prefixed ``"tjp2-"``)
    is of the sorted set of these (shape, signs) keys. Signs survive rounding to any of these dtypes
    (only |x| < 3e-8 can flush to zero in fp16), whereas rounded values do not (double rounding
    fp32→fp16→bf16 differs from fp32→bf16 for about 1 value in 16). Names are not hashed and a repeated
    key counts once, so tied weights (GPT-2's lm_head / wte, T5's shared / embed_tokens, BERT's decoder /
    word embeddings) count once whichever name a source kept; tensors whose sampled signs are all
    equal (LayerNorm ones, zero biases, most buffers) and non-floating buffers carry no identity and
    are skipped. It tells different checkpoints apart (another pretraining, another seed, another
    architecture); it is not meant to tell θ0 from a slightly fine-tuned θ0.
    """
    state = _state_of(model_or_state_dict)
    keys: set[bytes] = set()
    for t in state.values():
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and t.device.type != "meta"):
            continue
        flat = t.detach().reshape(-1)
        n = flat.numel()
        k = min(n, _SAMPLES_PER_TENSOR)
        idx = torch.div(torch.arange(k, dtype=torch.int64) * n, k, rounding_mode="floor").to(flat.device)
        signs = bytes((flat[idx] > 0).to("cpu", torch.uint8).tolist())
        if len(set(signs)) > 1:
            keys.add(repr(tuple(t.shape)).encode() + b"|" + signs)
    h = hashlib.sha256()
    for key in sorted(keys):
        h.update(len(key).to_bytes(4, "little"))
        h.update(key)
    return "tjp2-" + h.hexdigest()[:32]
