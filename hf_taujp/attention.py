"""Forward-AD-safe attention routing for jvp through Hugging Face models.

PyTorch has no forward-mode AD rule for the fused SDPA kernels (flash / memory-efficient, the CPU
flash kernel included; pytorch#98164, #117629), and FlashAttention-2/3, flex attention, paged and
Hub-kernel implementations have no JVP. Inside :func:`forward_ad_attention`:

* models loaded with any implementation other than eager/sdpa (``flash_attention_2``,
  ``flex_attention``, ``paged|…``, a kernel repo, one registered with ``transformers.AttentionInterface``)
  are switched to ``"sdpa"`` for the duration of the block, or to ``"eager"`` for a model class that
  does not support SDPA; every config touched is restored afterwards, also on error;
* ``attention="fused"`` (the default): transformers' ``"sdpa"`` attention function is replaced by
  :func:`jvp_sdpa_attention_forward`, which runs :func:`hf_taujp.attention_jvp.linearized_sdpa`
  (fused primal, blockwise closed-form tangent, fused backward: O(L) memory, see that module);
  calls it does not cover (dropout > 0 in train mode, nested tensors) go to the math kernel, and so does every
  call when a user-registered "sdpa" function is kept; each such reason is said once per process, as a
  :class:`MathAttentionWarning` naming the reason and its memory cost (math path: O(L²) memory);
* ``attention="math"``: the reference path, PyTorch's decomposed math SDPA kernel under forward AD,
  which materialises (batch, heads, L, L) score matrices for the primal, the tangent and their
  backward (quadratic memory: at L = 2048 it dominates a step, benchmarks/bench_attention_jvp.py);
* ``"eager"`` models and code calling ``F.scaled_dot_product_attention`` directly always run the
  math path (``sdpa_kernel([SDPBackend.MATH])`` is active in the block).

All compute the same softmax attention, so only rounding changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import HfTaujpError

__all__ = ["forward_ad_attention", "SAFE_ATTN_IMPLEMENTATIONS", "ATTENTION_PATHS", "jvp_sdpa_attention_forward",
           "MathAttentionWarning"]

ATTENTION_PATHS = ("fused", "math")
# The path chosen by the innermost enclosing forward_ad_attention(attention=...); None: "fused".
_PATH: contextvars.ContextVar[str | None] = contextvars.ContextVar("hf_taujp_attention_path", default=None)

# Implementations whose forward is made of ordinary differentiable ops (with the math SDPA backend).
SAFE_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
_SUB_CONFIGS = ("text_config", "vision_config", "audio_config", "encoder", "decoder")


class MathAttentionWarning(UserWarning):
    """Attention inside a linearized forward runs PyTorch's math SDPA kernel instead of the fused linearized op.

    The math kernel under forward AD keeps (batch, heads, L_q, L_k) score matrices for the primal, the tangent
    and their backward: at L = 2048 that is ≈ 12× the memory of an ordinary step (benchmarks/bench_attention_jvp.py)
    where the fused op keeps O(L). Silence it with
    ``warnings.filterwarnings("ignore", category=hf_taujp.attention.MathAttentionWarning)``.
    """


# Reasons already said in this process: a linearized step calls attention once per layer, a run for hours.
_SAID: set[str] = set()


def _say_math_path(reason: str) -> None:
    """Warn once per process and ``reason`` that attention leaves the fused path (the reason and its memory cost)."""
    if reason in _SAID:
        return
    _SAID.add(reason)
    warnings.warn(f"hf-taujp linearized attention: {reason}. That attention runs on the math path (PyTorch's math "
                  "SDPA kernel or eager attention under forward AD, which keep (batch, heads, L_q, L_k) scores for the "
                  "primal, the tangent and their backward): math path: O(L²) memory, against O(L) on the fused path. "
                  "Said once per reason.", MathAttentionWarning, stacklevel=2)


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
def forward_ad_attention(module: torch.nn.Module | None = None, attention: str | None = None) -> Iterator[None]:
    """Route attention to a forward-AD-capable path inside the block.

    Args:
        module: a model whose configs with an ``_attn_implementation`` other than eager/sdpa (e.g.
            ``flash_attention_2``, ``flex_attention``) are set to ``"sdpa"`` inside the block and restored
            on exit, so the user-visible config never changes.
        attention: ``"fused"`` (linearized SDPA, O(L) memory) or ``"math"`` (the reference math kernel);
            ``None`` inherits the choice of an enclosing ``forward_ad_attention`` block, else ``"fused"``.
            So ``with forward_ad_attention(attention="math"): trainer.train()`` picks the math path for
            every jvp the library runs inside.

    Raises:
        HfTaujpError: an unknown ``attention`` value.
    """
    if attention is not None and attention not in ATTENTION_PATHS:
        raise HfTaujpError(f"forward_ad_attention(attention={attention!r}): choose one of {ATTENTION_PATHS}")
    path = attention or _PATH.get() or "fused"
    token = _PATH.set(path)
    changed: list[tuple[object, str]] = []
    swapped = None
    try:
        swapped = _swap_sdpa(path)
        if module is not None:
            target = "sdpa" if _supports_sdpa(module) else "eager"
            for cfg in _configs(module):
                impl = getattr(cfg, "_attn_implementation", None)
                if impl is not None and impl not in SAFE_ATTN_IMPLEMENTATIONS:
                    changed.append((cfg, impl))
                    _set_impl(cfg, target)
                    if target == "eager" and path == "fused":
                        _say_math_path(f"{type(module).__name__} does not support SDPA: its {impl!r} attention runs "
                                       "as eager inside the jvp")
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for cfg, impl in reversed(changed):
            _set_impl(cfg, impl)
        if swapped is not None:
            swapped()
        _PATH.reset(token)


def _swap_sdpa(path: str):
    """Put the function of ``path`` in transformers' class-wide attention registry under "sdpa"; return the undo.

    The class-wide mapping (``AttentionInterface._global_mapping``) is what every model's
    ``ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", ...)`` reads. Only transformers' own
    ``sdpa_attention_forward`` is replaced: an "sdpa" registered by the user, or one a model file overrides
    locally, is kept and runs on the math kernel. ``"math"`` puts transformers' function back (a math block
    nested in a fused one). Not thread-safe against a second thread entering and leaving in another order.
    """
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    mapping = AttentionInterface._global_mapping
    previous = mapping.get("sdpa")
    if previous not in (sdpa_attention_forward, jvp_sdpa_attention_forward):
        if path == "fused":
            _say_math_path(f"the \"sdpa\" attention function registered in transformers' AttentionInterface "
                           f"({getattr(previous, '__qualname__', previous)!s}) is not transformers' own and is kept")
        return None
    mapping["sdpa"] = jvp_sdpa_attention_forward if path == "fused" else sdpa_attention_forward

    def undo():
        mapping["sdpa"] = previous

    return undo


def jvp_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                               position_bias=None, **kwargs):
    """transformers' ``sdpa_attention_forward`` (same arguments and decisions: causal flag, key crop,
    position-bias mask) computed by :func:`hf_taujp.attention_jvp.linearized_sdpa`.

    query (B, Hq, Lq, E), key (B, Hk, Lk, E), value (B, Hk, Lk, Ev) with Hq a multiple of Hk (GQA) and Ev = E or
    not (DeepSeek-V2/V3: E = 192, Ev = 128), attention_mask bool or
    additive float (B | 1, 1 | Hq, Lq, Lk) or None; returns ((B, Lq, Hq, Ev) contiguous, None).
    Dropout > 0 (train mode with attention dropout) and the rare inputs the op does not cover
    (:class:`~hf_taujp.errors.UnsupportedAttentionError`) run transformers' own function, i.e. the math kernel inside
    the block, and say so once per reason (:class:`MathAttentionWarning`). ``softcap`` goes to transformers' function
    too, which refuses it as it does outside the jvp.
    """
    from transformers.integrations import sdpa_attention as hf_sdpa

    from .attention_jvp import UnsupportedAttentionError, linearized_sdpa

    def transformers_sdpa():  # the math kernel inside forward_ad_attention
        return hf_sdpa.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, is_causal=is_causal, position_bias=position_bias,
                                              **kwargs)

    if kwargs.get("softcap") is not None:
        return transformers_sdpa()  # raises, as it does outside the jvp
    if dropout:
        # One jvp must share one dropout mask between primal and tangent: only the math kernel's own rule does.
        _say_math_path('attention dropout > 0 (a model in train mode, linearized with mode="train" / '
                       'linearization_mode="train")')
        return transformers_sdpa()
    q, k, v, mask, bias = query, key, value, attention_mask, position_bias
    q_length = q.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_length > 1 and mask is None and causal)
    if causal and k.shape[2] > q_length:  # as transformers: empty static cache at prefill
        k, v = k[:, :, :q_length], v[:, :, :q_length]
        if bias is not None:
            bias = bias[:, :, :, :q_length]
    if bias is not None:
        mask = hf_sdpa.create_position_bias_mask(bias, mask, causal, q, k)
        causal = False
    try:
        out = linearized_sdpa(q, k, v, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])
    except UnsupportedAttentionError as e:  # a case the op does not cover (nested tensors, ...): said, then math
        _say_math_path(str(e))
        return transformers_sdpa()
    return out.transpose(1, 2).contiguous(), None


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
