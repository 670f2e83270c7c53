"""Text-to-text encoding and rank classification (the frozen-prefix feature cache: :mod:`.frozen_prefix`).

Encoding (both model families answer in words):

* seq2seq (T5): encoder input = the prompt; decoder target = the label word's tokens (+ EOS).
* causal LM (GPT-2, Llama, SmolLM2): one sequence prompt + " " + label word, the loss on the answer
  tokens only (labels -100 on the prompt). Sequences are **left-padded** with explicit position ids, so
  every answer ends at the last position and the LM head runs only on the last A + 1 positions
  (``logits_to_keep``, where the model supports it).

Rank classification: the prediction is argmax_k log p(word_k | prompt) = Σ_j log p(w_k,j | prompt, w_k,<j)
(the sum of the label sequence's token log-probabilities; multi-token words included), computed for an
ordinary model or, with ``tangents``, for the linearized model f_lin(x) = f(x; θ0) + α·J f(x; θ0)·τ at
any number of α from ONE forward-mode pass (the logits are linear in α; the log-softmax is taken after).

Frozen prefix: the cached hidden states of a decoder-only LM's frozen lower layers are
:mod:`hf_taujp.recipes.frozen_prefix` (:class:`FrozenPrefix`, re-exported here); the encoder collates them
(``features`` → ``inputs_embeds``) and the scoring reads them like token ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..evaluation.predict import _device_of
from ..hub import HfTaujpError
from ..linearize import _accepts, linearized_forward
from ..merging.statistics import position_ids_from_mask
from .frozen_prefix import FrozenPrefix, decoder_layers, first_trained_layer  # re-exported: recipes, models, scripts
from .tasks import TextTask

__all__ = ["TextToTextEncoder", "FrozenPrefix", "decoder_layers", "first_trained_layer", "rank_scores", "generate_scores",
           "predict_scores", "answer_logits_output"]

PENALIZED_OUTPUTS = ("answer", "all")


class TextToTextEncoder:
    """Tokenizes tasks for one model family and collates batches (see the module docstring).

    Args:
        tokenizer: the model's tokenizer (a pad token is required).
        family: "seq2seq" or "causal".
        max_length: maximum prompt length in tokens (seq2seq: the encoder input; causal: prompt and
            answer together). Longer prompts are truncated: seq2seq keeps the start (HF's default),
            causal keeps the end, where the answer cue sits.
        keep_logits: causal only: the model accepts ``logits_to_keep`` (then only the answer positions'
            logits are computed).
        penalized_output: what the τJp penalty sees on prompt-only (regularization) batches:
            "answer" = the logits at the position that predicts the answer (the first decoder position
            for seq2seq); "all" = the logits at every prompt position (causal; masked mean over tokens).
    """

    def __init__(self, tokenizer, family: str, *, max_length: int = 128, keep_logits: bool = False,
                 penalized_output: str = "answer", decoder_start_token_id: int | None = None):
        if family not in ("seq2seq", "causal"):
            raise HfTaujpError(f"family must be 'seq2seq' or 'causal', got {family!r}")
        if penalized_output not in PENALIZED_OUTPUTS:
            raise HfTaujpError(f"penalized output must be one of {PENALIZED_OUTPUTS}, got {penalized_output!r}")
        if tokenizer.pad_token_id is None:
            raise HfTaujpError("the tokenizer has no pad token")
        if family == "seq2seq" and decoder_start_token_id is None:
            raise HfTaujpError("seq2seq encoding needs the model's decoder_start_token_id")
        self.tokenizer = tokenizer
        self.family = family
        self.max_length = int(max_length)
        self.keep_logits = bool(keep_logits) and family == "causal"
        self.penalized_output = penalized_output
        self.decoder_start_token_id = decoder_start_token_id
        self._answers: dict[str, list[list[int]]] = {}

    # ------------------------------------------------------------------ tokens
    def answer_ids(self, task: TextTask) -> list[list[int]]:
        """Token ids of each label word (causal: with a leading space, as it follows the prompt; seq2seq:
        with the tokenizer's EOS). Raises HfTaujpError when a word cannot be encoded (empty or unknown
        tokens only) or two words encode identically."""
        if task.name not in self._answers:
            tok = self.tokenizer
            out = []
            for word in task.words:
                if self.family == "causal":
                    ids = tok(" " + word, add_special_tokens=False)["input_ids"]
                else:
                    ids = tok(word, add_special_tokens=True)["input_ids"]
                content = [i for i in ids if i not in (tok.eos_token_id, tok.pad_token_id)]
                if not content or (tok.unk_token_id is not None and all(i == tok.unk_token_id for i in content)):
                    raise HfTaujpError(f"task {task.name!r}: the tokenizer cannot encode label word {word!r} "
                                       f"(got ids {ids})")
                out.append(list(ids))
            if len({tuple(x) for x in out}) != len(out):
                raise HfTaujpError(f"task {task.name!r}: label words {task.words} encode to identical tokens")
            self._answers[task.name] = out
        return self._answers[task.name]

    def check_single_token(self, task: TextTask) -> None:
        """Raise unless each label word's FIRST token differs (what a single-token read-out needs)."""
        firsts = [ids[0] for ids in self.answer_ids(task)]
        if len(set(firsts)) != len(firsts):
            dup = [w for w, f in zip(task.words, firsts) if firsts.count(f) > 1]
            raise HfTaujpError(f"task {task.name!r}: label words {dup} share their first token, so a single-token "
                               "read-out cannot tell them apart; use rank classification over whole words")

    def _prompt_ids(self, task: TextTask, row, room: int) -> list[int]:
        tok = self.tokenizer
        ids = tok(task.prompt(row), add_special_tokens=self.family == "seq2seq")["input_ids"]
        if len(ids) > room:
            ids = ids[:room - 1] + [ids[-1]] if self.family == "seq2seq" else ids[-room:]
        return ids

    def encode(self, task: TextTask, row, answer: int | None = None) -> dict:
        """One example: prompt (+ label word ``answer``, an index into ``task.words``).

        Returns ``{"input_ids": [...], "labels": [...]}`` (labels only when ``answer`` is given).
        """
        answers = self.answer_ids(task)
        # Causal: the prompt leaves room for the LONGEST label word, so every choice (and the τJp input)
        # sees the same prompt, whatever the answer's length.
        room = self.max_length - (max(len(a) for a in answers) if self.family == "causal" else 0)
        if room < 1:
            raise HfTaujpError(f"task {task.name!r}: max_length {self.max_length} leaves no room for a prompt")
        prompt = self._prompt_ids(task, row, room)
        if answer is None:
            return {"input_ids": prompt}
        ans = answers[answer]
        if self.family == "seq2seq":
            return {"input_ids": prompt, "labels": list(ans)}
        return {"input_ids": prompt + list(ans), "labels": [-100] * len(prompt) + list(ans)}

    def encode_train(self, task: TextTask, rows) -> list[dict]:
        return [self.encode(task, r, task.label_index(r)) for r in rows]

    def encode_prompts(self, task: TextTask, rows) -> list[dict]:
        return [self.encode(task, r) for r in rows]

    def encode_choices(self, task: TextTask, rows) -> list[dict]:
        """Rank-classification inputs: for each row, K examples prompt + word_k (row-major, N·K)."""
        self.answer_ids(task)
        return [self.encode(task, r, k) for r in rows for k in range(len(task.words))]

    # ------------------------------------------------------------------ batches
    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict:
        return self.collate(examples)

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict:
        """Pad a list of encoded examples into a batch (see the class docstring for the layout).

        Examples may carry ``features`` (cached frozen-prefix hidden states, (L, D)) instead of
        ``input_ids``; they become ``inputs_embeds``.
        """
        if not examples:
            raise HfTaujpError("empty batch")
        has_labels = ["labels" in e for e in examples]
        if any(has_labels) and not all(has_labels):
            raise HfTaujpError("a batch mixes examples with and without labels")
        return self._collate_causal(examples, all(has_labels)) if self.family == "causal" else \
            self._collate_seq2seq(examples, all(has_labels))

    def _sequences(self, examples):
        key = "features" if "features" in examples[0] else "input_ids"
        seqs = [torch.as_tensor(e[key]) for e in examples]
        return key, seqs

    def _collate_causal(self, examples, labelled: bool) -> dict:
        key, seqs = self._sequences(examples)
        B, L = len(seqs), max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        mask = torch.zeros(B, L, dtype=torch.long)
        if key == "features":
            x = torch.zeros(B, L, seqs[0].shape[-1], dtype=seqs[0].dtype)
        else:
            x = torch.full((B, L), pad, dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long) if labelled else None
        for i, s in enumerate(seqs):
            x[i, L - len(s):] = s
            mask[i, L - len(s):] = 1
            if labelled:
                labels[i, L - len(s):] = torch.as_tensor(examples[i]["labels"])
        batch = {"inputs_embeds" if key == "features" else "input_ids": x, "attention_mask": mask,
                 "position_ids": position_ids_from_mask(mask)}
        if labelled:
            if self.keep_logits:
                span = int((labels != -100).sum(-1).max()) + 1  # the answer and the position before it
                batch["labels"] = labels[:, -span:]
                batch["logits_to_keep"] = span
            else:
                batch["labels"] = labels
        elif self.keep_logits:
            batch["logits_to_keep"] = 1 if self.penalized_output == "answer" else 0
        return batch

    def _collate_seq2seq(self, examples, labelled: bool) -> dict:
        key, seqs = self._sequences(examples)
        if key == "features":
            raise HfTaujpError("the frozen-prefix cache supports decoder-only models only")
        B, L = len(seqs), max(len(s) for s in seqs)
        x = torch.full((B, L), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, :len(s)] = s
            mask[i, :len(s)] = 1
        batch = {"input_ids": x, "attention_mask": mask}
        if labelled:
            A = max(len(e["labels"]) for e in examples)
            labels = torch.full((B, A), -100, dtype=torch.long)
            for i, e in enumerate(examples):
                labels[i, :len(e["labels"])] = torch.as_tensor(e["labels"])
            batch["labels"] = labels
        else:  # the answer position: one decoder step from the start token
            batch["decoder_input_ids"] = torch.full((B, 1), self.decoder_start_token_id, dtype=torch.long)
        return batch


def answer_logits_output(outputs, batch) -> torch.Tensor:
    """τJp output for text-to-text models: the logits the penalty sees, (B, V) at the answer position or
    (B, L, V) at every prompt position (a selection, so linear in the outputs: valid on tangents)."""
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
    return logits[:, -1, :] if logits.shape[1] == 1 else logits


# --------------------------------------------------------------------------------------------- scoring
def _label_positions(labels: torch.Tensor, family: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, position, token) of every label token whose log-probability is summed: a causal LM's logits at
    position j predict the token at j + 1; a seq2seq decoder's logits at j predict label j."""
    if family == "causal":
        rows, pos = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)
        return rows, pos, labels[rows, pos + 1]
    rows, pos = torch.nonzero(labels != -100, as_tuple=True)
    return rows, pos, labels[rows, pos]


def _label_logprobs(logits: torch.Tensor, labels: torch.Tensor, family: str,
                    tangent: torch.Tensor | None = None, alphas: Sequence[float] = (1.0,)) -> torch.Tensor:
    """Σ over label tokens of log p(token), (B,) — or (B, len(alphas)) for the logits ``logits + α·tangent``.

    Only the rows of the label tokens are normalised (log-softmax over the vocabulary), so an α grid
    costs one (tokens × V) log-softmax per α, not one over every kept position."""
    rows, pos, tok = _label_positions(labels, family)
    sel = logits[rows, pos].float()  # (M, V)
    tsel = tangent[rows, pos].float() if tangent is not None else None
    out = torch.zeros(labels.shape[0], len(alphas) if tangent is not None else 1, dtype=torch.float32, device=logits.device)
    for j, a in enumerate(alphas if tangent is not None else (None,)):
        z = sel if a is None else sel + a * tsel
        lp = z.gather(-1, tok.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
        out[:, j].index_add_(0, rows, lp)
    return out if tangent is not None else out[:, 0]


def _scoring_inputs(model: nn.Module, batch: dict, family: str) -> tuple[dict, torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    if family == "seq2seq":
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels) \
            if hasattr(model, "prepare_decoder_input_ids_from_labels") else model._shift_right(labels)
    return inputs, labels


@torch.no_grad()
def rank_scores(model: nn.Module, encoder: TextToTextEncoder, num_choices: int, choices: list[dict], *,
                batch_size: int = 32, tangents: Mapping[str, torch.Tensor] | None = None,
                alphas: Sequence[float] = (1.0,), desc: str = "scoring") -> torch.Tensor:
    """Log-likelihood of every label word: (N, K) for an ordinary model, (N, K, len(alphas)) with ``tangents``.

    ``choices``: :meth:`TextToTextEncoder.encode_choices` output (N·K examples, row-major: prompt +
    word_k with labels on the word), possibly with cached ``features``. With ``tangents`` ({base
    parameter name: τ}) the model is read as f_lin(x; θ0 + α τ) = f(x; θ0) + α·J f(x; θ0)·τ
    (Ortiz-Jiménez et al. 2023, Eq. 2): one jvp per batch gives the primal and tangent logits, and each
    α costs one log-softmax.
    """
    K = int(num_choices)
    if len(choices) % K:
        raise HfTaujpError(f"{len(choices)} choice examples is not a multiple of {K} label words")
    was = model.training
    model.eval()
    dev = _device_of(model)
    if tangents is not None:
        params = dict(model.named_parameters())
        missing = [k for k in tangents if k not in params]
        if missing:
            raise HfTaujpError(f"tangents name parameters the model lacks: {missing[:3]}")
        primals = {k: params[k] for k in tangents}
    per = max(1, batch_size // K)
    use_cache = {"use_cache": False} if _accepts(model, "use_cache") else {}
    n_rows = len(choices) // K
    key = "features" if choices and "features" in choices[0] else "input_ids"
    # rows (groups of K choices) in order of length: batches waste little on padding; order restored below
    order = sorted(range(n_rows), key=lambda r: max(len(choices[r * K + k][key]) for k in range(K)))
    out = []
    try:
        for i in tqdm(range(0, n_rows, per), desc=desc, leave=False):
            rows = order[i:i + per]
            chunk = [choices[r * K + k] for r in rows for k in range(K)]
            n = len(rows)
            batch = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in encoder.collate(chunk).items()}
            inputs, labels = _scoring_inputs(model, batch, encoder.family)
            if tangents is None:
                logits = model(**inputs, **use_cache).logits
                out.append(_label_logprobs(logits, labels, encoder.family).view(n, K).cpu())
            else:
                p_out, t_out = linearized_forward(model, primals, tangents, (), inputs)
                lp = _label_logprobs(p_out["logits"], labels, encoder.family, t_out["logits"], alphas)
                out.append(lp.view(n, K, len(alphas)).cpu())
    finally:
        model.train(was)
    scores = torch.cat(out)
    return scores[torch.argsort(torch.tensor(order))] if order else scores


@torch.no_grad()
def generate_scores(model: nn.Module, encoder: TextToTextEncoder, task: TextTask, prompts: list[dict], *,
                    batch_size: int = 32, tangents: Mapping[str, torch.Tensor] | None = None,
                    alphas: Sequence[float] = (1.0,), desc: str = "generating") -> torch.Tensor:
    """Greedy decoding of a seq2seq model, as the τJp authors decode T5: the prediction is the label word
    the generated text equals (after stripping), else "no label" (counted wrong).

    Returns one-hot scores (N, K + 1[, len(alphas)]): column K is "no label", so ``argmax(1)`` gives the
    predicted index. With ``tangents`` the model is the linearized f(x; θ0) + α·J f(x; θ0)·τ, decoded
    through :mod:`hf_taujp.generation` (tangent KV cache), once per α.
    """
    from ..linearize import linearize

    if encoder.family != "seq2seq":
        raise HfTaujpError("generation decoding is for seq2seq (T5) models; causal LMs use rank classification")
    words = [w.strip() for w in task.words]
    K = len(words)
    max_new = max(len(a) for a in encoder.answer_ids(task)) + 1
    dev = _device_of(model)
    was = model.training
    model.eval()
    cols = []
    try:
        for a in (alphas if tangents is not None else (None,)):
            gen_model = model if a is None else linearize(
                model, parameter_names=list(tangents), tangents={k: a * v for k, v in tangents.items()})
            preds = []
            for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
                batch = encoder.collate(prompts[i:i + batch_size])
                out = gen_model.generate(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                                         max_new_tokens=max_new, do_sample=False, num_beams=1)
                for text in encoder.tokenizer.batch_decode(out, skip_special_tokens=True):
                    text = text.strip()
                    preds.append(words.index(text) if text in words else K)
            cols.append(torch.nn.functional.one_hot(torch.tensor(preds), K + 1).float())
    finally:
        model.train(was)
        if tangents is not None:
            model.requires_grad_(False)
    return torch.stack(cols, -1) if tangents is not None else cols[0]


def predict_scores(scores: torch.Tensor) -> torch.Tensor:
    """Predicted label indices from rank-classification scores (N, K[, A]) → (N[, A])."""
    return scores.argmax(1)
