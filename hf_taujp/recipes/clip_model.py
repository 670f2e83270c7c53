"""The CLIP model of the CLIP recipe (:mod:`hf_taujp.recipes.clip`): loading a CLIPModel or building a tiny
random one (:func:`load_clip`, :func:`tiny_clip`), its image tower as the trained encoder (:func:`image_encoder`),
the frozen zero-shot heads (:func:`zero_shot_head`, Ilharco et al. 2023), the classifier that applies them to the
encoder's embeddings (:class:`ZeroShotCLIP`) and one task's fine-tune of the encoder (:func:`finetune_clip`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from ..hub import HfTaujpError
from ..linearize import LinearizedModule
from .runner import Method, finetune
from .vision_tasks import VISION_TASKS

__all__ = ["TINY", "tiny_clip", "load_clip", "image_encoder", "zero_shot_head", "ZeroShotOutput", "ZeroShotCLIP",
           "finetune_clip"]

TINY = "tiny"


# ----------------------------------------------------------------------------------------- model
def tiny_clip(image_size: int = 28, patch_size: int = 7, seed: int = 0):
    """(CLIPModel, tokenizer, CLIPImageProcessor) of a tiny random CLIP, built offline (tests, CI).

    The tokenizer is character-level (`tokenizers` WordLevel over printable ASCII) with an end token whose
    position the text tower pools, as CLIP's BPE tokenizer does."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)]
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", model_max_length=64)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size, projection_dim=16),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = CLIPModel._from_config(cfg, attn_implementation="eager").eval()
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return model, tokenizer, processor


def load_clip(model: str = TINY, seed: int = 0):
    """(CLIPModel, tokenizer, image processor) of a Hub id / folder, or `"tiny"` (:func:`tiny_clip`)."""
    if model == TINY:
        return tiny_clip(seed=seed)
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(model, attn_implementation="eager").eval()
    return clip, AutoTokenizer.from_pretrained(model), AutoImageProcessor.from_pretrained(model)


def image_encoder(clip) -> nn.Module:
    """The image tower of a CLIPModel as a `CLIPVisionModelWithProjection` sharing its weights: parameter
    names `vision_model.*` and `visual_projection.weight`, the CLIPModel's own, so task vectors apply to both."""
    from transformers import CLIPVisionModelWithProjection

    cfg = copy.deepcopy(clip.config.vision_config)
    cfg.projection_dim = clip.config.projection_dim  # a CLIPConfig keeps it at the top level only
    enc = CLIPVisionModelWithProjection._from_config(cfg, attn_implementation="eager")
    enc.vision_model = clip.vision_model
    enc.visual_projection = clip.visual_projection
    return enc.eval()


def _text_features(clip, tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    feats = []
    dev = next(clip.parameters()).device
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True, return_tensors="pt").to(dev)
        out = clip.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        feats.append(out if isinstance(out, torch.Tensor) else out.pooler_output)
    return torch.cat(feats)


@torch.no_grad()
def zero_shot_head(clip, tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """W (C, D): row c = exp(logit_scale) · normalize(mean_k normalize(g(template_k.format(c=name_c)))).

    Ilharco et al. (2023), `src/modeling.py` / `zeroshot.py` (CLIP's zero-shot recipe, Radford et al. 2021).
    Raises HfTaujpError: no class names, no templates, a template without `{c}`."""
    if not classnames:
        raise HfTaujpError("class names missing: a zero-shot head needs one name per class")
    if not templates or any("{c}" not in t for t in templates):
        raise HfTaujpError(f"templates must be a non-empty list of strings with a '{{c}}' slot, got {list(templates)}")
    was = clip.training
    clip.eval()
    try:
        texts = [t.format(c=c) for c in classnames for t in templates]
        e = _text_features(clip, tokenizer, texts).float().reshape(len(classnames), len(templates), -1)
        e = e / e.norm(dim=-1, keepdim=True)
        h = e.mean(1)
        h = h / h.norm(dim=-1, keepdim=True)
        return (clip.logit_scale.exp().float() * h).detach().cpu()
    finally:
        clip.train(was)


@dataclass
class ZeroShotOutput(ModelOutput):
    """loss: CE of `logits` (with labels); logits: (B, C_max) (classes a task lacks at the finfo.min of the
    dtype); image_embeds: (B, D) projected image embedding f(x), before normalisation (what τJp penalises)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None


class ZeroShotCLIP(nn.Module):
    """Image encoder f (trainable or linearized) + frozen zero-shot heads: logits = W_t · normalize(f(x)).

    Args:
        encoder: a `CLIPVisionModelWithProjection` (:func:`image_encoder`) or a `LinearizedModule` around one.
        heads: `{task: W (C_t, D)}` from :func:`zero_shot_head`; task id t = position in this mapping.
    forward(pixel_values (B, 3, H, W), task_ids (B,) = 0, labels (B,) = None) → :class:`ZeroShotOutput`.
    """

    def __init__(self, encoder: nn.Module, heads: Mapping[str, torch.Tensor]):
        super().__init__()
        if not heads:
            raise HfTaujpError("ZeroShotCLIP needs at least one head")
        self.image_encoder = encoder
        self.task_names = list(heads)
        cmax = max(h.shape[0] for h in heads.values())
        dim = next(iter(heads.values())).shape[1]
        stacked = torch.zeros(len(heads), cmax, dim)
        mask = torch.zeros(len(heads), cmax, dtype=torch.bool)
        for i, h in enumerate(heads.values()):
            if h.shape[1] != dim:
                raise HfTaujpError(f"head {self.task_names[i]!r} has dim {h.shape[1]}, expected {dim}")
            stacked[i, :h.shape[0]] = h
            mask[i, :h.shape[0]] = True
        self.register_buffer("heads", stacked)
        self.register_buffer("head_mask", mask)

    @property
    def config(self):
        return getattr(self.image_encoder, "config", None)

    @property
    def jvp(self):
        """With a linearized encoder: `jvp(pixel_values, ...) → (f(x; θ0), J f(x; θ0)·τ)` as ZeroShotOutputs
        holding `image_embeds` (what TauJpTrainer penalises); None otherwise (the trainer then takes J itself)."""
        enc = self.image_encoder
        if not isinstance(enc, LinearizedModule):
            return None

        def jvp(pixel_values, **_):
            p, t = enc.jvp(pixel_values=pixel_values)
            return ZeroShotOutput(image_embeds=p.image_embeds), ZeroShotOutput(image_embeds=t.image_embeds)

        return jvp

    def classify(self, image_embeds: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """logits (B, C_max) = W_{task_b} · normalize(image_embeds_b)."""
        feats = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        w = self.heads[task_ids].to(feats.dtype)
        logits = torch.einsum("bd,bcd->bc", feats, w)
        return logits.masked_fill(~self.head_mask[task_ids], torch.finfo(logits.dtype).min)

    def forward(self, pixel_values, task_ids=None, labels=None):
        # no **kwargs: the Trainer then keeps scaling the (mean) loss for gradient accumulation itself
        emb = self.image_encoder(pixel_values=pixel_values).image_embeds
        if task_ids is None:
            task_ids = torch.zeros(emb.shape[0], dtype=torch.long, device=emb.device)
        logits = self.classify(emb, task_ids.to(emb.device))
        loss = nn.functional.cross_entropy(logits.float(), labels.to(logits.device)) if labels is not None else None
        return ZeroShotOutput(loss=loss, logits=logits, image_embeds=emb)


# -------------------------------------------------------------------------------------- training
def finetune_clip(clf: ZeroShotCLIP, method: Method, train_dataset, args, *, data_collator,
                  regularization_datasets: Mapping[str, object] | None = None, meta: Mapping | None = None,
                  curvature: Sequence[object] | None = None, lambda_score=None):
    """Fine-tune a copy of the classifier's image encoder on one task; returns (TaskVector, stats).

    :func:`hf_taujp.recipes.runner.finetune` with ``submodule="image_encoder"``: linear methods linearize
    the image encoder only (the head stays non-linear, as in tangent_task_arithmetic). Task-vector keys
    are the encoder's (= CLIPModel's) parameter names; τJp penalises ``image_embeds``; the kfac methods
    take the other tasks' factors (``curvature``) of ``clf``'s ``image_encoder.*`` Linear layers;
    ``lambda_score`` is finetune's (``taujp_lambda="auto"``: the task's validation accuracy of a τ).
    """
    names = [n for n, _ in clf.image_encoder.named_parameters()]
    meta = dict(meta or {})
    meta["training"] = {**dict(meta.get("training") or {}), **({"taujp_output": "image_embeds"} if method.taujp else {})}
    tv, stats = finetune(clf, names, method, train_dataset, args, data_collator=data_collator,
                         regularization_datasets=regularization_datasets, submodule="image_encoder", meta=meta,
                         curvature=curvature, lambda_score=lambda_score)
    stats.pop("log_history", None)
    return tv, stats


def _save_heads(output_dir, heads, classnames, task_names) -> None:
    """`zero_shot_heads.safetensors` ({task: W}) and `zero_shot_heads.json` (class names, templates, Hub ids)."""
    from safetensors.torch import save_file

    from ..evaluation import save_json

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "zero_shot_heads.safetensors")
    tmp = path + f".tmp{os.getpid()}"
    save_file({n: heads[n].contiguous() for n in task_names}, tmp)
    os.replace(tmp, path)
    save_json({n: {"classnames": classnames[n], "templates": list(VISION_TASKS[n].templates),
                   "hub_id": VISION_TASKS[n].hub_id, "formula": "exp(logit_scale) * normalize(mean_k normalize(g(t_k(c))))"}
               for n in task_names}, os.path.join(output_dir, "zero_shot_heads.json"))
