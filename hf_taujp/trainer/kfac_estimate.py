"""Estimating one task's KFAC factors at θ0 from its own inputs (Porrello et al., ICLR 2026).

See :mod:`hf_taujp.trainer.curvature` for what A and G are. How they are measured here, per batch, in one
forward and one (Gaussian probe) or several (exact) backward passes through the model at θ0 in eval mode:

* a forward hook on every chosen nn.Linear / Conv1D layer adds ã·ãᵀ of its valid input rows to A's sum
  (float64) and replaces the layer's output y by y + z, z a zero tensor that requires grad, so that
  ∂(·)/∂z = ∂(·)/∂y for every layer in one autograd call (the reference reaches the same by a
  ``fake_param`` on the image input);
* the probe: ``"gaussian"`` (the reference, ``fisher_num_samples_expectation`` = 1): ε ∼ N(0, I) of f's
  shape, zero at padded output positions, g = ∂(εᵀ f)/∂y, so E_ε[g·gᵀ] = J_yᵀ J_y (J_y = ∂f/∂y);
  ``samples`` > 1 averages the samples (the reference *sums* them without dividing: its G grows with the
  number of samples). ``"fisher"``: the categorical (true) Fisher of f read as logits — y ∼ softmax(f) over the
  last dimension, ε = onehot(y) − softmax(f), so E_y[ε·εᵀ] = diag(p) − p·pᵀ, the Hessian of the softmax
  cross-entropy in the logits (Martens & Grosse 2015, Sec. 5; the GGN), and E[g·gᵀ] = J_yᵀ (diag(p) − p·pᵀ) J_y:
  the penalty then approximates Σ_s E_x tᵀ(diag(p) − p·pᵀ)t = 2·Σ_s KL₂, twice the second-order
  KL(softmax(f) ‖ softmax(f + t)) of ``taujp_norm="kl"`` summed over the other tasks — in nats, whatever the
  vocabulary size; ``samples`` average as for the Gaussian probe. ``"exact"``: one backward per entry of the
  per-example output (a sum over output dimensions instead of a probe; cost × that size — for small outputs
  and tests);
* rows (token positions) where the mask that fits the input's leading dims is 0 are excluded; for an
  encoder-decoder, encoder-side inputs take ``attention_mask`` and decoder-side ones
  ``decoder_attention_mask`` (as :func:`~hf_taujp.merging.regmean.estimate_gram` decides).

A = (1 / T)·Σ ã·ãᵀ and G = (1 / T)·Σ g·gᵀ over the T valid rows of the layer (the mean over rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import HfTaujpError
from ..linearize import LOSS_KEYS, LinearizedModule, _accepts
from .curvature import KFACStatistics
from .penalty import output_mask, prepare_reg_batch, select_output

__all__ = ["estimate_kfac", "KFAC_PROBES"]

KFAC_PROBES = ("gaussian", "fisher", "exact")


class _Rows:
    """The valid-row mask of a layer input of leading shape ``lead`` (None: every row), encoder / decoder aware."""

    def __init__(self, model):
        self.masks: dict[str, torch.Tensor | None] = {}
        self.seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self.encoder = model.get_encoder() if self.seq2seq and hasattr(model, "get_encoder") else None
        self.inside, self.enc_out = False, None

    def hooks(self) -> list:
        if self.encoder is None:
            return []
        return [self.encoder.register_forward_pre_hook(lambda m, a: setattr(self, "inside", True)),
                self.encoder.register_forward_hook(lambda m, a, out: self._left(out))]

    def _left(self, out):
        self.inside, self.enc_out = False, out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)

    def reset(self, batch: dict) -> None:
        self.masks = {k: batch.get(k) for k in ("attention_mask", "decoder_attention_mask") if k in batch}
        self.inside, self.enc_out = False, None

    def of(self, x: torch.Tensor) -> torch.Tensor | None:
        lead = tuple(x.shape[:-1])
        if self.encoder is not None and self.masks.get("decoder_attention_mask") is not None:
            e = self.enc_out
            enc = self.inside or (e is not None and x.shape == e.shape and x.data_ptr() == e.data_ptr())
            cands = [self.masks.get("attention_mask" if enc else "decoder_attention_mask")]
        else:
            cands = list(self.masks.values())
        for m in cands:
            if m is not None and tuple(m.shape) == lead:
                return m.reshape(-1).bool()
        return None


def _layers(model, layers):
    from ..merging.regmean import linear_layers

    layers = None if layers is None else list(layers)
    if layers is not None and not layers:
        raise HfTaujpError("layers is empty: name the Linear / Conv1D layers to estimate (None: all of them)")
    found = linear_layers(model, layers)
    if not found:
        raise HfTaujpError("the model has no nn.Linear / Conv1D layers: no KFAC factors to estimate")
    return found


def _model_inputs(model, batch: dict, output: str, output_fn) -> dict:
    """The batch as the model's keyword inputs: no KV cache (a tensor-only output), and the tuple outputs the
    penalised output needs (``output_hidden_states`` for ``"hidden_states[-1]"``)."""
    if _accepts(model, "use_cache"):
        batch["use_cache"] = False
    if output_fn is None and output.startswith(("hidden_states", "attentions")):
        batch[f"output_{output.split('[')[0]}"] = True
    return batch


def _probe(f: torch.Tensor, mask, zs: list, probe: str, samples: int, gen: torch.Generator, add_g) -> None:
    """Backward passes of the probe through f, handing each pass's ∂/∂(layer outputs) and its weight to ``add_g``.

    ``"gaussian"``: ``samples`` passes of εᵀ f, ε ∼ N(0, I) (zero at the padded positions of ``mask``), weight
    1 / samples each. ``"fisher"``: ``samples`` passes of εᵀ f, ε = onehot(y) − p, y ∼ p = softmax(f) (last
    dimension; zero at padded positions), weight 1 / samples each. ``"exact"``: one pass per entry j of the per-example output, Σ_n f[n, j], weight 1 (so
    Σ_j g_j g_jᵀ = J_yᵀ J_y exactly; examples do not interact in eval mode)."""
    m = None if mask is None else mask.to(f.dtype).reshape(mask.shape + (1,) * (f.dim() - mask.dim()))
    if probe == "gaussian":
        for s in range(samples):
            eps = torch.randn(f.shape, generator=gen, dtype=torch.float32).to(f.device, f.dtype)
            eps = eps * m if m is not None else eps
            add_g(torch.autograd.grad((eps * f).sum(), zs, retain_graph=s < samples - 1, allow_unused=True),
                  1.0 / samples)
        return
    if probe == "fisher":
        p = torch.softmax(f.detach().to(torch.float32), dim=-1).cpu()
        flat = p.reshape(-1, p.shape[-1])
        for s in range(samples):
            y = torch.multinomial(flat, 1, generator=gen).reshape(p.shape[:-1])
            eps = (torch.nn.functional.one_hot(y, p.shape[-1]).to(p.dtype) - p).to(f.device, f.dtype)
            eps = eps * m if m is not None else eps
            add_g(torch.autograd.grad((eps * f).sum(), zs, retain_graph=s < samples - 1, allow_unused=True),
                  1.0 / samples)
        return
    fm = (f * m if m is not None else f).reshape(f.shape[0], -1)
    for j in range(fm.shape[1]):
        add_g(torch.autograd.grad(fm[:, j].sum(), zs, retain_graph=j < fm.shape[1] - 1, allow_unused=True), 1.0)


def estimate_kfac(
    model: torch.nn.Module,
    data: Iterable[dict] | Any,
    *,
    output: str = "logits",
    output_fn: Callable | None = None,
    layers: Iterable[str] | None = None,
    batch_size: int = 8,
    collate_fn=None,
    max_examples: int | None = None,
    probe: str = "gaussian",
    samples: int = 1,
    seed: int = 0,
    task: str | None = None,
    progress: bool = True,
) -> KFACStatistics:
    """KFAC factors (A, G) of every chosen linear layer of ``model`` at θ0 over ``data`` (one task's inputs).

    Args:
        model: the base model θ0 (a plain model, or a LinearizedModule: its wrapped base is used). Not a PEFT
            model: pass the base model it wraps.
        data: that task's *training* inputs: a DataLoader / iterable of dict batches, or a dataset / list of
            examples batched with ``collate_fn`` (as ``estimate_fisher`` / ``estimate_gram`` read them). Labels
            are not needed; an encoder-decoder batch with ``labels`` gets its decoder inputs from them
            (``decoder_attention_mask`` = labels ≠ −100), as the τJp regularization batches do. Give the batches
            the training run's form (e.g. ``logits_to_keep=1`` for answer-position logits), and the model the
            structure it is trained in: factors are keyed by module path and checked by base fingerprint.
        output: the output field f whose drift is penalised, as ``TauJpConfig.taujp_output`` ("logits",
            "image_embeds", "hidden_states[-1]", ...); or ``output_fn(outputs, batch) -> Tensor`` (as
            ``TauJpTrainer(taujp_output_fn=...)``, e.g. the logits at the answer positions). Use the same f as
            the training run that will use the factors.
        layers: module paths of the layers (default: every nn.Linear / Conv1D layer of the model). G is
            out × out: leave out layers too wide to store (an LM head over a large vocabulary).
        max_examples: examples used at most (the reference: 128–256 suffice).
        probe: "gaussian" (ε ∼ N(0, I), the reference: G in the output's own units, squared), "fisher" (f read as
            logits, y ∼ softmax(f): G in nats, independent of the vocabulary size — for LM logits) or "exact"
            (sum over the output's entries).
        samples: probe samples per batch ("gaussian", "fisher"; reference: 1).
        seed: seed of the probe's generator.
        task: the task's name, recorded in the card (the trainer refuses a task's own factors by it).
    Returns:
        :class:`~hf_taujp.trainer.curvature.KFACStatistics` (float32; float64 for a float64 model), with the
        base fingerprint of ``model``.
    Raises:
        HfTaujpError: a PEFT model; an unknown probe; samples < 1; a layer path that is not a Linear / Conv1D;
            no examples; a layer never called or without valid rows; an output that is not a tensor.
    """
    from ..fingerprints import fingerprint
    from ..merging.statistics import example_batches, uses_absolute_positions, with_position_ids

    if isinstance(model, LinearizedModule):
        model = model.base_model
    if hasattr(model, "peft_config"):
        raise HfTaujpError("estimate_kfac needs the base model θ0, not a PEFT model: pass the model before "
                           "get_peft_model (a LoRA model: peft_model.unload() gives it back without the adapters)")
    if probe not in KFAC_PROBES:
        raise HfTaujpError(f"unknown probe {probe!r} (expected one of {KFAC_PROBES})")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise HfTaujpError(f"samples must be an integer >= 1, got {samples!r}")
    found = _layers(model, layers)
    a_sum = {p: None for p in found}
    g_sum = {p: None for p in found}
    rows_n = {p: 0 for p in found}
    rows = _Rows(model)
    calls: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []  # (layer, z, row mask) of this batch

    def hook(path):
        def fn(module, args, kwargs, out):
            x = args[0] if args else next(iter(kwargs.values()))
            keep = rows.of(x)
            xr = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            xr = torch.cat([xr, torch.ones(xr.shape[0], 1, dtype=xr.dtype, device=xr.device)], dim=1)
            if keep is not None:
                xr = xr[keep.to(xr.device)]
            rows_n[path] += xr.shape[0]
            a = xr.T @ xr
            a_sum[path] = a if a_sum[path] is None else a_sum[path].add_(a)
            z = torch.zeros_like(out, requires_grad=True)
            calls.append((path, z, keep))
            return out + z
        return fn

    handles = [m.register_forward_hook(hook(p), with_kwargs=True) for p, (m, _) in found.items()] + rows.hooks()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(int(seed))
    absolute = uses_absolute_positions(model)
    # labels stay until prepare_reg_batch (an encoder-decoder's decoder inputs); logits_to_keep stays too: f is the
    # output the training run penalises, and its LM head rows are the kept positions only
    drop = tuple(k for k in LOSS_KEYS if k != "labels")
    was_training = model.training
    model.eval()
    count = 0

    def add_g(grads, weight):
        for (path, z, keep), g in zip(calls, grads):
            if g is None:
                g = torch.zeros_like(z)
            gr = g.detach().reshape(-1, g.shape[-1]).to(torch.float64)
            if keep is not None:
                gr = gr[keep.to(gr.device)]
            gg = weight * (gr.T @ gr)
            g_sum[path] = gg if g_sum[path] is None else g_sum[path].add_(gg)

    try:
        bar = tqdm(desc="kfac", unit="ex", total=max_examples, disable=not progress)
        for batch, n_b in example_batches(data, batch_size=batch_size, collate_fn=collate_fn, max_examples=max_examples,
                                          device=device, drop=drop, who="estimate_kfac"):
            batch = _model_inputs(model, with_position_ids(prepare_reg_batch(model, batch), absolute), output, output_fn)
            rows.reset(batch)
            calls.clear()
            with torch.enable_grad():
                outputs = model(**batch)
                f = output_fn(outputs, batch) if output_fn is not None else select_output(outputs, output)
                if not isinstance(f, torch.Tensor):
                    raise HfTaujpError(f"the penalised output f must be a tensor, got {type(f).__name__}"
                                       + (" from output_fn" if output_fn is not None else f" for output={output!r}"))
                mask = output_mask(model, batch, f, None if output_fn is not None else output)
                _probe(f, mask, [z for _, z, _ in calls], probe, samples, gen, add_g)
            calls.clear()
            count += n_b
            bar.update(n_b)
        bar.close()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    never = [p for p, n in rows_n.items() if n == 0]
    if never:
        raise HfTaujpError(f"layers never called (or without a valid row) during the forward passes: {never[:5]} "
                           "(pass layers=...)")
    dt = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    tensors, info = {}, {}
    for p, (module, layout) in found.items():
        tensors[f"{p}.A"] = (a_sum[p] / rows_n[p]).to(dt)
        tensors[f"{p}.G"] = (g_sum[p] / rows_n[p]).to(dt)
        w = module.weight
        out_f, in_f = (w.shape[0], w.shape[1]) if layout == "out_in" else (w.shape[1], w.shape[0])
        info[p] = {"in_features": int(in_f), "out_features": int(out_f), "layout": layout, "rows": int(rows_n[p])}
    cfg = getattr(model, "config", None)
    extra = {"layers": info, "output": "custom" if output_fn is not None else output, "probe": probe,
             "samples": samples if probe != "exact" else None, "seed": int(seed), "compression": None}
    return KFACStatistics(tensors, num_examples=count, base_model=getattr(cfg, "_name_or_path", None) or None,
                          base_fingerprint=fingerprint(model), task=task, extra=extra)
