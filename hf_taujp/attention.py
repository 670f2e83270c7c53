"""Forward-AD-safe attention routing for jvp through Hugging Face models.

PyTorch has no forward-mode AD rule for the fused SDPA kernels (flash / memory-efficient, the CPU
flash kernel included; pytorch#98164, #117629), and FlashAttention-2/3, flex attention, paged and
Hub-kernel implementations have no JVP. Inside :func:`forward_ad_attention` attention runs on a path
forward AD can differentiate: the math SDPA backend, and models loaded with any other implementation
(``flash_attention_2``, ``flex_attention``, ``paged|…``, a kernel repo, one registered with
``transformers.AttentionInterface``) are switched to ``"sdpa"`` (math) for the duration of the block,
or to ``"eager"`` for a model class that does not support SDPA. Both compute the same softmax
attention, so only rounding changes. Every config touched is restored afterwards, also on error.

Cost: the math kernel materialises the (batch, heads, L, L) score matrix that fused kernels avoid;
irrelevant at L ≲ 1k, quadratic memory beyond.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["forward_ad_attention", "SAFE_ATTN_IMPLEMENTATIONS"]

# Implementations whose forward is made of ordinary differentiable ops (with the math SDPA backend).
SAFE_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
_SUB_CONFIGS = ("text_config", "vision_config", "audio_config", "encoder", "decoder")


def _configs(module: torch.nn.Module) -> list:
    """Every distinct config object reachable from ``module`` (model config, sub-configs, submodules')."""
    seen: dict[int, object] = {}

    def add(cfg):
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation"):
            return
        seen[id(cfg)] = cfg
        for name in _SUB_CONFIGS:
            add(getattr(cfg, name, None))

    for m in module.modules():
        add(getattr(m, "config", None))
    return list(seen.values())


@contextlib.contextmanager
def forward_ad_attention(module: torch.nn.Module | None = None) -> Iterator[None]:
    """Route attention to a forward-AD-capable path inside the block.

    ``sdpa_kernel([SDPBackend.MATH])`` pins SDPA to its decomposed math kernel, and configs whose
    ``_attn_implementation`` is not eager/sdpa (e.g. ``flash_attention_2``, ``flex_attention``) are
    set to ``"sdpa"`` and restored on exit, so the user-visible config never changes.
    """
    changed: list[tuple[object, str]] = []
    try:
        if module is not None:
            target = "sdpa" if _supports_sdpa(module) else "eager"
            for cfg in _configs(module):
                impl = getattr(cfg, "_attn_implementation", None)
                if impl is not None and impl not in SAFE_ATTN_IMPLEMENTATIONS:
                    changed.append((cfg, impl))
                    _set_impl(cfg, target)
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for cfg, impl in reversed(changed):
            _set_impl(cfg, impl)


def _supports_sdpa(module: torch.nn.Module) -> bool:
    """False when a transformers model class inside ``module`` declares ``_supports_sdpa = False``."""
    return all(getattr(type(m), "_supports_sdpa", True) is not False for m in module.modules()
               if hasattr(type(m), "_supports_sdpa"))


def _set_impl(cfg, impl: str) -> None:
    # transformers 5 stores the value in `_attn_implementation_internal` behind a property; set the
    # private field directly so no validation (e.g. "flash_attn not installed") runs on restore.
    if hasattr(cfg, "_attn_implementation_internal"):
        cfg._attn_implementation_internal = impl
    else:
        cfg._attn_implementation = impl
