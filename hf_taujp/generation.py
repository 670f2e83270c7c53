"""Generation from linearized models: transformers' ``generate`` over f_lin(x) = f(x; θ0) + J f(x; θ0)·τ.

A linearized causal LM decodes by running the primal f(·; θ0) and the tangent J·τ together at every
step. Rather than re-implementing decoding, :func:`linearized_generate` runs the base model's own
``GenerationMixin.generate`` (every argument it takes: ``GenerationConfig``, ``max_new_tokens``,
``min_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
``num_return_sequences``, ``num_beams``, logits processors, stopping criteria, streamers,
``use_cache``, …) on the same model whose parameters are, for the duration of the call,
forward-mode dual tensors ``θ0 + ε·τ`` (``torch.autograd.forward_ad``):

- every activation computed from them is a dual (value, tangent) pair, so the **KV cache**
  (transformers' own ``DynamicCache``) stores primal keys/values *and* their tangents in the same
  tensors, and each decoding step costs one token (O(n) per step instead of re-reading the prefix);
  beam reordering, ``num_return_sequences`` expansion and cache cropping act on both;
- a forward hook on the model turns the dual logits into ``primal + tangent`` = f_lin(x) before
  generate's logits processors see them (:class:`_LinearizedOutputs` is the one place the
  linearization meets decoding);
- encoder-decoder models (T5) are covered by the same mechanism: the encoder runs once with dual
  parameters and its outputs carry their tangents into every cross-attention step.

Why dual tensors rather than ``torch.func.jvp`` per step: a ``DynamicCache`` is not a pytree of
tensors, so inside ``jvp`` the cache would have to be flattened into explicit (K, V, tK, tV) inputs and
rebuilt at every step, model by model; dual tensors live *inside* the ordinary cache object. The
tangents are exactly those of ``torch.func.jvp`` (the same forward-AD formulas); tests check the
generated logits against :class:`~hf_taujp.linearize.LinearizedModule`'s jvp forward and against
float64 finite differences.

Speed. PyTorch's forward AD is slow for a binary op between a dual and a plain operand (``0.5 * x``,
``x + mask``): the missing tangent becomes an ``_efficientzerotensor``, whose kernels find the output
shape by running the op on the Meta device, and torch registers Python meta kernels for ``aten::mul``
and friends (``torch/_meta_registrations.py``, in place of the C++ ones): ≈ 60–230 µs per op whatever
the size (torch 2.13 CPU; GPT-2's tanh-GELU has four such ops; ``torch.func.jvp`` pays the same). During
generation a torch-function mode (:class:`FastForwardAD`) computes those ops, and linear layers, from
their primal and tangent explicitly (same values). A linear layer still costs three matrix-vector
products per token (W·x, W·ẋ, τ·x) against one; stacking [x; ẋ] into one two-row matmul was tried
and is no faster with MKL on CPU (a two-row sgemm costs two one-row ones here; with weights read from
memory rather than cache, ≈ 10% less for the W part). The output layer needs only the sum,
f_lin = W·(x + ẋ) + τ·x: two products (see :class:`_LinearizedOutputs`). At one token per step the
rest is per-op overhead, which a profile of a cached step (py-spy, GPT-2 4 × 256, vocab 1000) put in
three places, now cut: the attention's two ``autograd.Function`` layers (≈ 0.2 ms a call; with grad mode
off :func:`hf_taujp.attention_jvp.linearized_sdpa` computes primal and tangent of dual inputs directly,
outside the mode), ``fwAD.unpack_dual`` / ``make_dual`` in the mode's rules (2.5 µs a call against 0.8 µs
for the ATen ops at a known level), and the cat of K with its tangent for one query row. Numbers:
``benchmarks/bench_generation.py``.

Limits: a cache passed in (``past_key_values``) cannot carry tangents from an earlier call and is
refused; the cache of a ``return_dict_in_generate`` output is returned as ``None`` (its tangents end
with the call). Static / offloaded / quantized cache implementations are refused (they copy into
preallocated plain buffers, dropping tangents). Attention runs on a forward-AD-capable path
(:func:`hf_taujp.attention.forward_ad_attention`).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Mapping
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.overrides import TorchFunctionMode

from .attention import forward_ad_attention
from .errors import HfTaujpError
from .jvp_context import jvp_ready  # one implementation of the checkpointing / eval-mode switch

__all__ = ["linearized_generate", "FastForwardAD"]

# Cache implementations that keep the tensors ``update`` returns (torch.cat of duals keeps tangents).
_DUAL_SAFE_CACHES = (None, "dynamic")
_CACHE_KWARGS = ("cache", "past_key_values", "cache_params")  # transformers 5.24 renamed the first two


# --------------------------------------------------------------------------------------------
# Fast paths for forward AD
# --------------------------------------------------------------------------------------------
# The rules below run on every hot op of a decoding step (≈ 100 per token for a 4-layer GPT-2), so they take
# dual tensors apart and put them together with the ATen ops themselves, at the level of the enclosing
# ``fwAD.dual_level()``: ``fwAD.unpack_dual`` / ``make_dual`` wrap the same ops in Python export / decomposition
# bookkeeping that costs ≈ 2.5 µs a call against ≈ 0.8 µs (torch 2.13 CPU), more than the small
# element-wise kernels they serve.
def _split(x: Any, level: int) -> tuple[Any, torch.Tensor | None]:
    if isinstance(x, torch.Tensor):
        return torch._unpack_dual(x, level)
    return x, None


def _dual(p: torch.Tensor, t: torch.Tensor, level: int) -> torch.Tensor:
    return torch._make_dual(p, _fit(t, p), level=level)


def _operand(x: Any) -> bool:
    return isinstance(x, torch.Tensor) or (isinstance(x, numbers.Number) and not isinstance(x, complex))


def _fit(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A tangent with the primal's dtype and shape (broadcast operands give a larger output)."""
    if t.dtype != p.dtype:
        t = t.to(p.dtype)
    if t.shape != p.shape:
        t = t.expand(p.shape).contiguous()
    return t


def _mul(level, a, b):
    pa, ta = _split(a, level)
    pb, tb = _split(b, level)
    if (ta is None) == (tb is None):  # both dual (product rule needs both terms) or none: default path
        return NotImplemented
    p = pa * pb
    return _dual(p, ta * pb if ta is not None else pa * tb, level)


def _add(level, a, b, alpha=1):
    pa, ta = _split(a, level)
    pb, tb = _split(b, level)
    if (ta is None) == (tb is None):
        return NotImplemented
    p = pa + pb if alpha == 1 else pa + alpha * pb
    t = ta if ta is not None else (tb if alpha == 1 else alpha * tb)
    return _dual(p, t, level)


def _div(level, a, b):
    pa, ta = _split(a, level)
    pb, tb = _split(b, level)
    if ta is None or tb is not None:  # only dual / plain: d(a/b) = da / b
        return NotImplemented
    p = pa / pb
    return _dual(p, ta / pb, level)


def _linear(level, x, weight, bias=None):
    """F.linear: out = W·x + b, tangent = W·ẋ + τ_W·x + τ_b with the terms of plain operands left out."""
    px, tx = _split(x, level)
    pw, tw = _split(weight, level)
    pb, tb = _split(bias, level) if bias is not None else (None, None)
    if tx is None and tw is None:
        return NotImplemented
    p = nn.functional.linear(px, pw, pb)
    if tx is not None:
        t = nn.functional.linear(tx, pw, tb)  # W·ẋ + τ_b in one call
        if tw is not None:
            t += nn.functional.linear(px, tw)  # a fresh tensor: accumulate in place
    else:
        t = nn.functional.linear(px, tw, tb)
    return _dual(p, t, level)


def _addmm(level, bias, x, weight, *, beta=1, alpha=1):
    """torch.addmm (GPT-2's Conv1D: b + x·W), same rule as :func:`_linear`."""
    if beta != 1 or alpha != 1:
        return NotImplemented
    px, tx = _split(x, level)
    pw, tw = _split(weight, level)
    pb, tb = _split(bias, level)
    if tx is None and tw is None:
        return NotImplemented
    p = torch.addmm(pb, px, pw)
    if tx is not None:
        t = tx.mm(pw) if tb is None else torch.addmm(tb, tx, pw)
        if tw is not None:
            t.addmm_(px, tw)
    else:
        t = px.mm(tw) if tb is None else torch.addmm(tb, px, tw)
    return _dual(p, t, level)


_T = torch.Tensor
_BINARY = {
    _T.__mul__: _mul, _T.__rmul__: lambda lv, a, b: _mul(lv, b, a), torch.mul: _mul, _T.mul: _mul,
    _T.__add__: _add, _T.__radd__: lambda lv, a, b: _add(lv, b, a), torch.add: _add, _T.add: _add,
    _T.__sub__: lambda lv, a, b: _add(lv, a, b, -1), _T.__rsub__: lambda lv, a, b: _add(lv, b, a, -1),
    torch.sub: lambda lv, a, b: _add(lv, a, b, -1), _T.sub: lambda lv, a, b: _add(lv, a, b, -1),
    _T.__truediv__: _div, torch.div: _div, _T.div: _div,
}


class FastForwardAD(TorchFunctionMode):
    """Torch-function mode that evaluates a few hot ops on dual tensors from primal and tangent explicitly.

    - binary ``*``, ``+``, ``-``, ``/`` with exactly one dual operand: d(a∘b) from the dual side only,
      instead of PyTorch's zero-tensor tangent for the plain side (slow, see the module docstring);
    - ``F.linear`` / ``torch.addmm`` (a layer's W·x + b): the tangent W·ẋ + τ·x + τ_b from the dual
      operands only (a layer left out of the linearization has a plain W: PyTorch's rule would
      multiply x by a zero-tensor tangent, the slow path above).

    Args:
        level: the forward-AD level whose duals the rules read and build (what ``fwAD.dual_level()``
            returns); ``None``: the innermost level open when the mode is entered.

    Values are those of PyTorch's own rules up to float rounding; every other op (and every call
    with keyword arguments this mode does not know) takes the default path. Active only inside
    :func:`linearized_generate`.
    """

    def __init__(self, level: int | None = None):
        super().__init__()
        self._level = level

    def __enter__(self):
        if self._level is None:
            self._level = fwAD._current_level  # the public API exposes the level only as dual_level()'s value
        if self._level < 0:
            raise HfTaujpError("FastForwardAD needs an open forward-AD level (inside `fwAD.dual_level()`).")
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # The mode is popped off the stack while this runs, so calls below take the default path.
        rule = _RULES.get(func)
        if rule is not None:
            out = rule(self._level, args, kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **(kwargs or {}))


def _binary_rule(f):
    def rule(level, args, kwargs):
        if len(args) == 2 and not kwargs and _operand(args[0]) and _operand(args[1]):
            return f(level, *args)
        return NotImplemented
    return rule


def _linear_rule(level, args, kwargs):
    kwargs = kwargs or {}
    if len(args) + len(kwargs) <= 3 and set(kwargs) <= {"bias"}:
        return _linear(level, *args, **kwargs)
    return NotImplemented


def _addmm_rule(level, args, kwargs):
    kwargs = kwargs or {}
    if len(args) == 3 and set(kwargs) <= {"beta", "alpha"}:
        return _addmm(level, *args, **kwargs)
    return NotImplemented


_RULES = {func: _binary_rule(f) for func, f in _BINARY.items()}
_RULES[nn.functional.linear] = _linear_rule
_RULES[torch.addmm] = _addmm_rule


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
def _collapse(x: Any) -> Any:
    """Dual → primal + tangent (f_lin's value), through tuples, lists and ModelOutputs; other objects
    (a Cache) unchanged."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            return x
        p, t = fwAD.unpack_dual(x)
        return p if t is None else p + t
    if isinstance(x, Mapping):
        for k in list(x.keys()):
            if k not in _CACHE_KWARGS:
                x[k] = _collapse(x[k])
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(_collapse(v) for v in x)
    return x


class _LinearizedOutputs:
    """The hooks where the linearization meets decoding.

    On the model: every output of a forward becomes primal + tangent (f_lin) before generate reads it.
    On the output layer (an ``nn.Linear`` head, e.g. ``lm_head``): when its result *is* the returned
    ``logits`` (no soft-capping or other op after it, which the first forward checks), primal and
    tangent are only ever summed, so from the second forward on the head computes
    f_lin = W·(x + ẋ) + τ_W·x (+ b + τ_b) directly: two matrix-vector products instead of three, the
    largest matmul of a decoding step at GPT-2's vocabulary.
    """

    def __init__(self, model: nn.Module, fuse_head: bool):
        self.handles = [model.register_forward_hook(self._model_hook)]
        head = model.get_output_embeddings() if fuse_head and hasattr(model, "get_output_embeddings") else None
        # Only a plain Linear head whose forward is the class's (no accelerate / PEFT hook in its place).
        self.head = head if type(head) is nn.Linear and "forward" not in vars(head) else None
        self.head_out = None
        self.fused = False
        if self.head is not None:
            self.handles.append(self.head.register_forward_hook(self._record_head))

    def _record_head(self, module, args, output):
        self.head_out = output

    def _fused_head(self, x: torch.Tensor) -> torch.Tensor:
        head = self.head
        px, tx = fwAD.unpack_dual(x)
        pw, tw = fwAD.unpack_dual(head.weight)
        pb, tb = fwAD.unpack_dual(head.bias) if head.bias is not None else (None, None)
        out = nn.functional.linear(px if tx is None else px + tx, pw, pb)  # W·(x + ẋ) + b
        if tw is not None:
            out = out + nn.functional.linear(px, tw)  # + τ_W·x
        if tb is not None:
            out = out + tb
        return out

    def _model_hook(self, module, args, output):
        if self.head is not None and not self.fused:
            logits = output.get("logits") if isinstance(output, Mapping) else None
            if logits is not None and logits is self.head_out:
                self.fused = True
                self.head.forward = self._fused_head  # instance attribute: nn.Module.__call__ uses it
            else:
                self.head = None  # something acts on the head's output: keep primal and tangent apart
            self.head_out = None
        return _collapse(output)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        if self.fused:
            del self.head.forward


def _check_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    for k in _CACHE_KWARGS:
        if kwargs.get(k) is not None:
            raise HfTaujpError(
                f"linearized generate() does not take `{k}`: a cache from another call holds no tangents "
                "J·τ of its keys/values. Pass the full prompt instead."
            )
    config = kwargs.get("generation_config")
    impl = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    if impl is None:
        impl = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
    if impl not in _DUAL_SAFE_CACHES:
        raise HfTaujpError(
            f"linearized generate() supports the dynamic KV cache only, not cache_implementation={impl!r} "
            "(it copies keys/values into preallocated buffers, which would drop their tangents)."
        )
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None:
        raise HfTaujpError("linearized generate() does not support assisted / speculative decoding.")
    if not hasattr(model, "generate"):
        raise HfTaujpError(f"{type(model).__name__} has no generate(): not a generative transformers model.")


def _check_tangents(model: nn.Module, primals: Mapping[str, torch.Tensor],
                    tangents: Mapping[str, torch.Tensor]) -> None:
    """One-line HfTaujpError unless ``primals`` and ``tangents`` name the same parameters of ``model``, once each,
    with tensors of the parameters' shapes.

    The parameters are swapped in with ``strict=False`` (a partial linearization names only some), so a name the
    model does not have would otherwise be ignored without a word: the decoding would be f's, not f_lin's.
    """
    missing = [k for k in primals if k not in tangents]
    extra = [k for k in tangents if k not in primals]
    if missing or extra:
        raise HfTaujpError(f"Tangents do not match primals: missing {missing[:5]}, unexpected {extra[:5]}.")
    params = dict(model.named_parameters(remove_duplicate=False))  # tied aliases (lm_head.weight) count
    unknown = [k for k in tangents if k not in params]
    if unknown:
        raise HfTaujpError(f"Unknown tangent key(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}: not "
                           f"parameters of {type(model).__name__}.")
    seen: dict[int, str] = {}
    for k in tangents:
        other = seen.setdefault(id(params[k]), k)
        if other != k:
            raise HfTaujpError(f"Tangent keys {other!r} and {k!r} name one tied parameter of {type(model).__name__}: "
                               "give it once.")
    for k, t in tangents.items():
        for what, x in (("Tangent", t), ("Primal", primals[k])):
            if not isinstance(x, torch.Tensor):
                raise HfTaujpError(f"{what} {k!r} is a {type(x).__name__}, not a tensor.")
            if tuple(x.shape) != tuple(params[k].shape):
                raise HfTaujpError(f"{what} {k!r} has shape {tuple(x.shape)}, parameter has {tuple(params[k].shape)}.")


@torch.no_grad()
def linearized_generate(
    model: nn.Module,
    primals: Mapping[str, torch.Tensor],
    tangents: Mapping[str, torch.Tensor],
    *args,
    fast: bool = True,
    **kwargs,
):
    """``model.generate(*args, **kwargs)`` decoding from f_lin(x) = f(x; θ0) + J f(x; θ0)·τ.

    Args:
        model: a transformers generative model (``GenerationMixin``: causal LM or encoder-decoder);
            its parameters named in ``primals`` are θ0.
        primals: ``{param name: θ0}`` (``model.named_parameters()`` names, tied weights once).
        tangents: ``{param name: τ}``, same keys and shapes; cast to the primal dtype (PEFT keeps τ in
            fp32 on bf16 models).
        *args, **kwargs: everything transformers' ``generate`` takes (``input_ids``, ``attention_mask``,
            ``generation_config``, ``max_new_tokens``, ``do_sample``, ``top_p``, ``num_beams``,
            ``logits_processor``, ``use_cache``, …), with the same meaning and defaults
            (``model.generation_config``).
        fast: use :class:`FastForwardAD` (default); ``False`` keeps PyTorch's own forward-AD rules
            everywhere (same values to float rounding, slower).

    Returns:
        What ``generate`` returns: token ids (batch·num_return_sequences, prompt + new) or a
        ``GenerateOutput`` whose ``logits`` / ``scores`` / hidden states are those of f_lin, and whose
        ``past_key_values`` is ``None``.

    Raises:
        HfTaujpError: a ``past_key_values`` / ``cache`` argument, a non-dynamic cache implementation,
            assisted decoding, mismatched primals/tangents, a name that is not a parameter of ``model`` (or two
            names of one tied parameter), a non-tensor or a shape other than the parameter's, or a model without
            ``generate``.

    Cost per new token with the cache: one forward-mode pass over one token, 3× an ordinary cached step
    in matmul work (W·x, W·ẋ and τ·x per layer; the output layer two) plus forward AD's element-wise
    kernels; without the cache (``use_cache=False``) each step re-reads the whole prefix, O(n²) over the
    sequence.
    """
    _check_kwargs(model, args, kwargs)
    _check_tangents(model, primals, tangents)

    with contextlib.ExitStack() as stack:
        level = stack.enter_context(fwAD.dual_level())
        duals = {k: fwAD.make_dual(p.detach(), tangents[k].detach().to(dtype=p.dtype, device=p.device))
                 for k, p in primals.items()}
        stack.enter_context(jvp_ready(model, "eval"))  # decoding: the authors' eval-mode linearization point
        stack.enter_context(forward_ad_attention(model))
        stack.enter_context(_reparametrize_module(model, duals, tie_weights=True, strict=False))
        stack.callback(_LinearizedOutputs(model, fuse_head=fast).close)
        if fast:
            stack.enter_context(FastForwardAD(level))
        out = model.generate(*args, **kwargs)
        if isinstance(out, Mapping):
            # Encoder states come from generate's own encoder call (not through the hook); the cache's
            # tangents die with the dual level, so it is not returned.
            for k in list(out.keys()):  # keys(): `in` on a ModelOutput warns about the old cache names
                if k in _CACHE_KWARGS:
                    out[k] = None
            out = _collapse(out)
        return out
