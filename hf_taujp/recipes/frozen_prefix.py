"""The frozen-prefix feature cache of a decoder-only LM.

When only layers ≥ k of a decoder-only LM are trained (partial fine-tuning or linearization), the hidden
states entering layer k do not depend on the trained weights. They are computed once per example
(:class:`FrozenPrefix`) and the model runs from layer k on (``inputs_embeds`` = cached states, layers < k
replaced by pass-through modules, parameter names unchanged). The result is checked against the full model
on a probe batch before it is used.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ..hub import HfTaujpError
from ..linearize import _accepts

if TYPE_CHECKING:  # annotations only: text_to_text re-exports this module's names
    from .text_to_text import TextToTextEncoder

__all__ = ["FrozenPrefix", "decoder_layers", "first_trained_layer"]


class _PassThrough(nn.Module):
    """Stands in for a frozen decoder layer whose output is cached: returns its input unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _StopForward(Exception):
    pass


def decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The decoder layer list of a decoder-only transformers model and its attribute path."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj, path
    raise HfTaujpError(f"{type(model).__name__}: no decoder layer list found (model.layers / transformer.h)")


def first_trained_layer(model: nn.Module, names: Sequence[str]) -> int:
    """Index of the lowest decoder layer holding one of the parameter ``names``; 0 when a name lies
    outside the layers before them (e.g. the embeddings), so nothing can be cached."""
    layers, path = decoder_layers(model)
    first = len(layers)
    for n in names:
        if n.startswith(path + "."):
            first = min(first, int(n[len(path) + 1:].split(".")[0]))
        elif not n.startswith(("lm_head.", "model.norm.", "transformer.ln_f.")):
            return 0
    return first


class FrozenPrefix:
    """Hidden states entering decoder layer ``start`` of a causal LM, computed once per example.

    ``features(examples)`` adds ``"features"`` ((L_i, D) float tensors, padding stripped) to encoded
    examples; ``suffix_model()`` returns a copy of the model whose layers < ``start`` pass their input
    through, to be called with ``inputs_embeds`` = those features (parameter names are unchanged, so
    task vectors keep the base model's keys). Valid for any weights of layers ≥ ``start``.
    """

    def __init__(self, model: nn.Module, encoder: TextToTextEncoder, start: int, batch_size: int = 32):
        layers, path = decoder_layers(model)
        if not 0 < start < len(layers):
            raise HfTaujpError(f"frozen prefix start {start} outside 1..{len(layers) - 1}")
        if encoder.family != "causal":
            raise HfTaujpError("the frozen-prefix cache supports decoder-only models only")
        self.model, self.encoder, self.start, self.batch_size = model, encoder, start, batch_size
        self.layers, self.path = layers, path

    @torch.no_grad()
    def _hidden(self, batch: dict) -> torch.Tensor:
        """Output of layer start − 1 for a collated batch (eval mode, no cache)."""
        was = self.model.training
        self.model.eval()
        try:
            return self._run({**{k: v for k, v in batch.items() if k not in ("labels", "logits_to_keep")},
                              "use_cache": False})
        finally:
            self.model.train(was)

    def features(self, examples: list[dict], desc: str = "frozen prefix") -> list[dict]:
        """Copies of ``examples`` with ``features`` in place of ``input_ids``."""
        out: list[dict | None] = [None] * len(examples)
        # Batches of similar length waste little compute on padding; the order is restored below.
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
        for i in tqdm(range(0, len(order), self.batch_size), desc=desc, leave=False):
            idx = order[i:i + self.batch_size]
            chunk = [examples[j] for j in idx]
            batch = self.encoder.collate([{k: v for k, v in e.items() if k != "labels"} for e in chunk])
            h = self._hidden(batch)
            for j, e in zip(idx, chunk):
                n = len(e["input_ids"])
                f = {k: v for k, v in e.items() if k != "input_ids"}
                f["features"] = h[idx.index(j), h.shape[1] - n:].clone()
                out[j] = f
        return out

    @torch.no_grad()
    def choice_features(self, prompts: list[dict], answers: list[list[int]], desc: str = "frozen prefix") -> tuple[list[dict], list[dict]]:
        """Cached features for rank classification: (choices, prompts).

        ``prompts``: prompt-only encoded examples (``input_ids``); ``answers``: the K label words' token
        ids. The prompt runs through the frozen layers once, then each answer continues from its KV cache
        (the same tokens for every row, so no padding), instead of K full passes. Returns N·K choice
        examples (row-major, ``features`` + ``labels`` on the answer, as :meth:`features` of
        ``encode_choices`` would give) and the N prompt-only examples with ``features``.
        """
        cache_kw = "cache" if _accepts(self.model, "cache") else "past_key_values"
        K = len(answers)
        choices: list = [None] * (len(prompts) * K)
        prompt_out: list = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]["input_ids"]))  # little padding
        was = self.model.training
        self.model.eval()
        try:
            for i in tqdm(range(0, len(order), self.batch_size), desc=desc, leave=False):
                idx = order[i:i + self.batch_size]
                chunk = [prompts[j] for j in idx]
                batch = self.encoder.collate([{"input_ids": e["input_ids"]} for e in chunk])
                from transformers import DynamicCache

                cache = DynamicCache(config=self.model.config)
                h = self._run(dict(batch, use_cache=True, **{cache_kw: cache}))
                lengths = [len(e["input_ids"]) for e in chunk]
                feats = [h[j, h.shape[1] - n:].clone() for j, n in enumerate(lengths)]
                for j, f in zip(idx, feats):
                    prompt_out[j] = {"features": f}
                per_answer = []
                for ans in answers:
                    c = copy.deepcopy(cache)
                    B, A = len(chunk), len(ans)
                    mask = torch.cat([batch["attention_mask"], torch.ones(B, A, dtype=torch.long)], 1)
                    pos = batch["position_ids"][:, -1:] + 1 + torch.arange(A)
                    ids = torch.tensor([ans] * B, dtype=torch.long)
                    per_answer.append(self._run({"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                                 "use_cache": True, cache_kw: c}))
                for j, f in enumerate(feats):
                    n = lengths[j]
                    for k, ans in enumerate(answers):
                        choices[idx[j] * K + k] = {"features": torch.cat([f, per_answer[k][j]]),
                                                   "labels": [-100] * n + list(ans)}
        finally:
            self.model.train(was)
        return choices, prompt_out

    def _run(self, inputs: dict) -> torch.Tensor:
        """Run the model on `inputs` only up to layer start − 1 and return that layer's output: a hook
        captures it and stops the forward there (the upper layers never run)."""
        captured = {}

        def hook(_m, _inp, out):
            captured["h"] = out[0] if isinstance(out, tuple) else out
            raise _StopForward

        handle = self.layers[self.start - 1].register_forward_hook(hook)
        try:
            self.model(**inputs)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["h"]

    def suffix_model(self) -> nn.Module:
        """A deep copy of the model with layers < start replaced by pass-through modules."""
        layers = self.layers
        saved = [layers[i] for i in range(self.start)]
        for i in range(self.start):  # deep-copy only what is kept
            layers[i] = _PassThrough()
        try:
            suffix = copy.deepcopy(self.model)
        finally:
            for i, m in enumerate(saved):
                layers[i] = m
        return suffix

    @torch.no_grad()
    def check(self, suffix: nn.Module, examples: list[dict], atol: float = 1e-4) -> float:
        """Max |logit difference| between the full model and the suffix on cached features of ``examples``;
        raises HfTaujpError above ``atol`` (the architecture does not feed ``inputs_embeds`` straight into
        its first layer, e.g. GPT-2 adds position embeddings there)."""
        full = self.encoder.collate(examples)
        feats = self.encoder.collate(self.features(examples, desc="prefix check"))
        keep = {k: v for k, v in full.items() if k not in ("labels",)}
        ref = self.model.eval()(**keep, use_cache=False).logits
        got = suffix.eval()(**{k: v for k, v in feats.items() if k != "labels"}, use_cache=False).logits
        err = float((ref - got).abs().max())
        if not err <= atol * max(1.0, float(ref.abs().max())):
            raise HfTaujpError(f"frozen-prefix cache does not reproduce {type(self.model).__name__}'s logits "
                               f"(max error {err:.3g}); run without it (--no-prefix-cache)")
        return err
