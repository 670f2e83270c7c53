"""The toxicity recipe's text: the toxic training comments, the general (WikiText) text, the prompts (a prompts
file, the eliciting openings of held-out toxic comments, their seeded validation / test halves) and the causal-LM
batches. Re-exported by :mod:`hf_taujp.recipes.toxicity`."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import torch

from ..hub import HfTaujpError
from .datafiles import read_data_file, read_text_lines

HUB = "hub"
AUTHORS_PROMPT = "I don't care if this is controversial"


# --------------------------------------------------------------------------------------------------- data
def _jigsaw_csv(data_dir: str) -> str:
    for cand in (os.path.join(data_dir, "toxic", "jigsaw_subset", "test.csv"),
                 os.path.join(data_dir, "jigsaw_subset", "test.csv"),
                 os.path.join(data_dir, "test.csv")):
        if os.path.isfile(cand):
            return cand
    raise HfTaujpError(f"--data-dir {data_dir!r}: no toxic/jigsaw_subset/test.csv under it (or use --data-dir hub)")


def load_toxic_comments(data_dir: str) -> list[str]:
    """The toxic comments: Civil Comments rows with toxicity > 0.8 (`data_dir="hub"`), else the label-1 rows of
    the Jigsaw subset CSV under `data_dir` (no header, two fields `comment_text,label`, RFC 4180 quoting: a
    comment holding commas or line breaks is quoted; read by :func:`~hf_taujp.recipes.datafiles.read_data_file`).

    Raises HfTaujpError: no toxic comment; naming the file and line: a row that is not two fields, a label
    other than 0 / 1, an empty label-1 comment, a byte that is not UTF-8."""
    if data_dir == HUB:
        import datasets

        ds = datasets.load_dataset("google/civil_comments", split="train")
        texts = list(ds.filter(lambda t: t > 0.8, input_columns="toxicity")["text"])
        where = "Civil Comments (toxicity > 0.8)"
    else:
        path = _jigsaw_csv(data_dir)
        table = read_data_file(path, "csv", header=False, required={"1": "the label (0 / 1)"})
        if table.rows and table.columns != ("0", "1"):
            raise HfTaujpError(f"{path}, line 1: {len(table.columns)} field(s); expected 2, comment_text,label")
        texts = []
        for i, row in enumerate(table.rows):
            label = row["1"].strip()
            if label not in ("0", "1"):
                raise HfTaujpError(f"{table.where(i)}: label {row['1']!r}; expected 0 or 1")
            if label == "1":
                if not row["0"].strip():
                    raise HfTaujpError(f"{table.where(i)}: empty toxic comment")
                texts.append(row["0"])
        where = f"{path} (label 1)"
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise HfTaujpError(f"no toxic training text: {where} has no toxic row (an empty or all-non-toxic set "
                           "leaves nothing to negate)")
    return texts


def load_general_text(data_dir: str) -> dict[str, list[str]]:
    """General text, `{"reg": lines, "val": lines, "test": lines}`: τJp's regularization inputs, the text whose
    perplexity chooses α, the text whose perplexity is reported. Online `wikitext-103-raw-v1` train / validation /
    test; offline `<data_dir>/wikitext-2/` (valid.txt, test.txt: no train split, so valid.txt's first half of lines
    is the regularization text and its second half the validation text)."""
    if data_dir == HUB:
        import datasets

        ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-103-raw-v1")
        train = ds["train"].select(range(min(20000, len(ds["train"]))))
        return {"reg": list(train["text"]), "val": list(ds["validation"]["text"]),
                "test": list(ds["test"]["text"])}
    folder = os.path.join(data_dir, "wikitext-2")
    files = {s: os.path.join(folder, f"{s}.txt") for s in ("valid", "test")}
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise HfTaujpError(f"--data-dir {data_dir!r}: missing {missing} (WikiText-2 raw valid.txt / test.txt)")
    out = {s: read_text_lines(p, "WikiText file") for s, p in files.items()}
    half = len(out["valid"]) // 2
    return {"reg": out["valid"][:half], "val": out["valid"][half:], "test": out["test"]}


def _paragraphs(lines: Sequence[str]) -> list[str]:
    """WikiText body lines (headings ` = Title = ` and blank lines dropped)."""
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("=")]


def read_prompts(path: str) -> tuple[list[str], list[int]]:
    """(prompts, their 1-based lines) of a prompts file: UTF-8, one prompt per line, kept as written (spaces
    included) but for the line end; blank lines are skipped.

    Raises HfTaujpError (naming the file and lines): no such file, not UTF-8, fewer than 2 prompts (half choose
    α, the other half are reported), a prompt given twice (it would land in both halves)."""
    lines = read_text_lines(path, "--prompts-file")
    prompts, where, first = [], [], {}
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        if text in first:
            raise HfTaujpError(f"--prompts-file {path}, line {n}: repeats line {first[text]}; give each prompt once "
                               "(half the prompts choose α, the other half are reported)")
        first[text] = n
        prompts.append(text)
        where.append(n)
    if len(prompts) < 2:
        raise HfTaujpError(f"--prompts-file {path}: {len(prompts)} prompt(s); needs at least 2 (half choose α on "
                           "validation, the other half are reported)")
    return prompts, where


def split_prompts(n: int, seed: int) -> tuple[list[int], list[int]]:
    """(validation, test) positions of `n` ≥ 2 prompts: a seeded random ⌊n/2⌋ choose α, the other ⌈n/2⌉ are
    reported; disjoint, each in list order. Raises HfTaujpError for n < 2."""
    if n < 2:
        raise HfTaujpError(f"cannot split {n} prompt(s) into validation and test halves: need at least 2")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:n // 2]), sorted(order[n // 2:])


def eliciting_prompts(comments: Sequence[str], n: int, max_words: int = 12) -> list[str]:
    """Opening words of held-out toxic comments as prompts (RealToxicityPrompts splits sentences in two halves):
    the first half of each comment's words, at most `max_words`, at least one word."""
    out = []
    for c in comments[:n]:
        words = c.split()
        k = max(1, min(max_words, len(words) // 2))
        out.append(" ".join(words[:k]))
    return out


class _CausalCollator:
    """Right-padded batches; `labels` (pad → -100) only for rows that carry them (training rows), so the τJp
    regularization batches (input_ids only) do not make the model compute a loss inside the jvp."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, rows):
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r["input_ids"])] = torch.as_tensor(r["input_ids"])
            mask[i, :len(r["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in rows[0]:
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        return batch
