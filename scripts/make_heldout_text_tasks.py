"""Build four held-out text-classification tasks from outside GLUE, as a task spec for ``hf-taujp glue``.

    python scripts/make_heldout_text_tasks.py --data-dir ../shared/data --out /tmp/heldout
    hf-taujp glue --task-spec /tmp/heldout/tasks.yaml --tasks jigsaw_toxic,wiki_next,wiki_order,text_source

These tasks are for checking the recipe (fine-tuning, linearization, τJp, task addition / negation) on tasks
that nothing in the project was tuned on: no template, label word, hyper-parameter or default was chosen by
looking at them. Each task is binary, with balanced classes in train and dev, seeded (``--seed``, default 0).

Tasks (label value: label word; the CSV columns are the template fields plus ``label``):

1. ``jigsaw_toxic`` -- a Jigsaw comment, "comment: {text}" -> 1: ``toxic`` / 0: ``clean``. Metric accuracy.
2. ``wiki_next`` -- "sentence1: {sentence1} sentence2: {sentence2} does sentence2 follow?" -> 1: ``yes``
   (two consecutive sentences of one WikiText paragraph) / 0: ``no`` (the first sentence of such a pair
   followed by the second sentence of a pair from another paragraph). Every sentence is used once: the pairs
   of a paragraph do not overlap (taken greedily from its start), and positives and negatives draw their first
   and their second sentences from the same pool of pairs. Metric accuracy.
3. ``wiki_order`` -- "sentence: {sentence} is the word order original?" -> 1: ``original`` (a WikiText sentence
   as written) / 0: ``scrambled`` (another such sentence with two adjacent content words swapped). Content words
   are purely alphabetic tokens (no punctuation, number, ``@-@`` / ``@,@`` / ``@.@`` marker or ``<unk>``), the
   first word of the sentence is never moved (its capital would give the swap away), and the two words differ
   (ignoring case), so the swapped sentence always differs from its source. Every candidate sentence has such
   a pair, and each sentence is used once, intact or corrupted, never both. Metric matthews_correlation.
4. ``text_source`` -- "text: {text} source:" -> 1: ``encyclopedia`` (a WikiText sentence) / 0: ``comment`` (a
   non-toxic Jigsaw comment of 6-40 words, none of those used by ``jigsaw_toxic``). Metric accuracy.

Sources (``--data-dir``, the offline data kit; see its MANIFEST.md):

- ``toxic/jigsaw_subset/test.csv``: no header, ``comment_text,label`` (1 = toxic, 0 = non-toxic), RFC 4180 CSV;
  a balanced 6090 / 6090 subset of the Jigsaw Toxic Comment Classification data (Kaggle 2018).
  Licence: labels CC0, comment text CC BY-SA 3.0 (Wikipedia talk pages).
- ``wikitext-2/valid.txt`` (train rows of the WikiText tasks) and ``wikitext-2/test.txt`` (their dev rows):
  tokenized WikiText-2 (Merity et al. 2016; ``<unk>`` applied), one paragraph or heading per line.
  Licence: CC BY-SA 3.0.
  The generated files are derived from these and carry the same licences (CC BY-SA 3.0 for the text).

Text rules (stated once):

- Jigsaw: whitespace (line breaks included) collapsed to single spaces, then cut to the first 40 words and
  to at most 200 characters, capital letters counting twice (at a word boundary; shouting takes more tokens
  per character). Skipped: comments with fewer than 3 words (6 for ``text_source``), with a word over 40
  characters, with under 90% ASCII characters or under 75% letters and spaces (another script, wiki table
  markup, keyboard noise: many tokens per character). Cleaned texts are de-duplicated (a text that occurs
  with both labels is dropped), so train and dev rows are distinct comments. The row order is not the
  file's: each task's rows are a seeded sample.
- WikiText sentences: lines that are empty or headings (`` = Title = ``, ``= = Section = =``) are skipped; a
  paragraph is split on `` . `` (the tokenized full stop between sentences; "H. americanus" is one token and
  does not split) and each piece gets its full stop back. A sentence is kept if it has 6-40 tokens (6-25
  for ``wiki_next``) and is at most 250 characters (160 for ``wiki_next``) after detokenizing. ``<unk>`` is
  kept as written in ``wiki_next`` / ``wiki_order`` (two thirds of the sentences hold one, in both classes
  alike), but ``text_source`` takes only sentences without ``<unk>`` (comments never hold it: it would
  give the source away). Detokenizing (so that encyclopedia text and comments do not differ by tokenization
  alone): ``@-@`` / ``@,@`` / ``@.@`` are joined (``2 @,@ 000`` -> ``2,000``), the space before ``, . ; : ! ? ) %``
  and clitics (``'s``, ``n't``, ...) and after ``(`` is removed. Sentences are de-duplicated, and dev
  sentences that also occur in valid.txt are dropped, so train and dev share no sentence.

Lengths fit the recipe's ``--max-length 96`` tokens (prompt + answer): with the SmolLM2 tokenizer the default
output's longest prompt is 90 tokens (medians 32-55 by task); every label word is one token there.

Output (``--out``, a folder outside the repository; an existing non-empty folder is refused unless
``--force``): ``<task>_train.csv`` and ``<task>_dev.csv`` (RFC 4180, header line, UTF-8, "\\n" line ends) per
task and ``tasks.yaml``, each written to a temporary file and renamed into place (``tasks.yaml`` last, so an
interrupted run leaves no spec). Sizes: ``--train`` / ``--dev`` rows per task (default 600 / 300, even).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JIGSAW = os.path.join("toxic", "jigsaw_subset", "test.csv")
WIKI_TRAIN = os.path.join("wikitext-2", "valid.txt")
WIKI_DEV = os.path.join("wikitext-2", "test.txt")
MAX_WORDS, MAX_PAIR_WORDS, MIN_WORDS = 40, 25, 6
MAX_CHARS, MAX_PAIR_CHARS, MAX_COMMENT_CHARS = 250, 160, 200
MARKERS = {"@-@", "@,@", "@.@"}

# name -> (template, {label: word}, metric, fields); label words: distinct single common words (first tokens differ)
TASKS = {
    "jigsaw_toxic": ("comment: {text}", {"0": "clean", "1": "toxic"}, "accuracy", ("text",)),
    "wiki_next": ("sentence1: {sentence1} sentence2: {sentence2} does sentence2 follow?", {"0": "no", "1": "yes"},
                  "accuracy", ("sentence1", "sentence2")),
    "wiki_order": ("sentence: {sentence} is the word order original?", {"0": "scrambled", "1": "original"},
                   "matthews_correlation", ("sentence",)),
    "text_source": ("text: {text} source:", {"0": "comment", "1": "encyclopedia"}, "accuracy", ("text",)),
}


class HeldoutError(Exception):
    """A one-line reason the tasks cannot be built (bad input, too little data, refused output folder)."""


# ------------------------------------------------------------------------------------------------- reading
def clean_comment(text: str, min_words: int = 3) -> str | None:
    """A Jigsaw comment collapsed and cut (module docstring), or None when it is skipped."""
    words = text.split()[:MAX_WORDS]
    if len(words) < min_words or max(map(len, words)) > 40:
        return None
    while len(" ".join(words)) + sum(map(str.isupper, " ".join(words))) > MAX_COMMENT_CHARS:
        words.pop()
    out = " ".join(words)
    if len(words) < min_words or sum(c.isascii() for c in out) < 0.9 * len(out) \
            or sum(c.isalpha() or c == " " for c in out) < 0.75 * len(out):
        return None  # another script, wiki table markup, keyboard noise: many tokens per character
    return out


def read_jigsaw(path: str) -> dict[str, list[str]]:
    """``{"1": toxic texts, "0": non-toxic texts}``, cleaned (at least 3 words) and de-duplicated, in file order."""
    if not os.path.isfile(path):
        raise HeldoutError(f"no Jigsaw file {path!r}")
    labels: dict[str, set[str]] = {}
    order: list[str] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            if len(row) != 2 or row[1].strip() not in ("0", "1"):
                raise HeldoutError(f"{path}: record {n} is not comment_text,label (0/1): {str(row)[:80]}")
            text = clean_comment(row[0])
            if text is None:
                continue
            if text not in labels:
                labels[text] = set()
                order.append(text)
            labels[text].add(row[1].strip())
    out = {"0": [], "1": []}
    for text in order:
        if len(labels[text]) == 1:
            out[next(iter(labels[text]))].append(text)
    return out


def detokenize(tokens: list[str]) -> str:
    """WikiText tokens as ordinary text (module docstring)."""
    s = " ".join(tokens)
    s = re.sub(r" @([-,.])@ ", r"\1", s)
    s = re.sub(r" ([,.;:!?)%])", r"\1", s)
    s = re.sub(r"\( ", "(", s)
    s = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", s)
    return s


def read_paragraphs(path: str) -> list[list[list[str]]]:
    """The paragraphs of a tokenized WikiText file, each a list of sentences (token lists, full stop included);
    headings and empty lines skipped, sentences not yet filtered."""
    if not os.path.isfile(path):
        raise HeldoutError(f"no WikiText file {path!r}")
    paras = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or (line.startswith("=") and line.endswith("=")):
                continue
            if line.endswith(" ."):
                line = line[:-2]
            sents = [s.split() + ["."] for s in line.split(" . ") if s.strip()]
            if sents:
                paras.append(sents)
    return paras


def keep(tokens: list[str], max_words: int, max_chars: int, unk: bool = True) -> bool:
    return MIN_WORDS <= len(tokens) <= max_words and (unk or "<unk>" not in tokens) \
        and len(detokenize(tokens)) <= max_chars


def swap_positions(tokens: list[str]) -> list[int]:
    """Positions i (≥ 1) where tokens i and i+1 are distinct purely alphabetic words (a possible swap)."""
    return [i for i in range(1, len(tokens) - 1)
            if tokens[i].isalpha() and tokens[i + 1].isalpha() and tokens[i].lower() != tokens[i + 1].lower()]


# ---------------------------------------------------------------------------------------------- building
def _need(task: str, split: str, have: int, need: int) -> None:
    if have < need:
        raise HeldoutError(f"{task} {split}: only {have} candidates for {need} rows; ask for fewer (--train / --dev)")


def sentences(paras, exclude: set[str], unk: bool = True) -> list[list[str]]:
    """Every kept sentence (≤ 40 tokens; with ``<unk>`` only if ``unk``) once, in file order, none whose text
    is in ``exclude``."""
    seen, out = set(exclude), []
    for p in paras:
        for s in p:
            text = detokenize(s)
            if keep(s, MAX_WORDS, MAX_CHARS, unk) and text not in seen:
                seen.add(text)
                out.append(s)
    return out


def wiki_next(paras, n: int, rng: random.Random, split: str, exclude: set[str]) -> list[dict]:
    """n/2 consecutive pairs (yes) and n/2 pairs whose second sentence comes from another paragraph (no)."""
    pairs, seen = [], set(exclude)
    for pid, p in enumerate(paras):
        i = 0
        while i < len(p) - 1:  # greedy, non-overlapping
            a, b = p[i], p[i + 1]
            ta, tb = detokenize(a), detokenize(b)
            if keep(a, MAX_PAIR_WORDS, MAX_PAIR_CHARS) and keep(b, MAX_PAIR_WORDS, MAX_PAIR_CHARS) \
                    and ta not in seen and tb not in seen and ta != tb:
                seen.update((ta, tb))
                pairs.append((pid, ta, tb))
                i += 2
            else:
                i += 1
    _need("wiki_next", split, len(pairs), n)
    rng.shuffle(pairs)
    half = n // 2
    pos, neg = pairs[:half], pairs[half:n]
    # Negatives: sorted into paragraph blocks (blocks in random order), pair i takes the second sentence of pair
    # i + g (cyclically), g the largest block: two pairs g apart are never in one block when g <= m / 2.
    blocks = list({pid for pid, _, _ in neg})
    rng.shuffle(blocks)
    rank = {pid: k for k, pid in enumerate(blocks)}
    neg.sort(key=lambda t: rank[t[0]])
    m, g = len(neg), max(Counter(pid for pid, _, _ in neg).values())
    rows = [{"sentence1": a, "sentence2": b, "label": "1"} for _, a, b in pos]
    if m == 1:  # a single negative takes its second sentence from one more pair, of another paragraph
        donor = next((b for pid, _, b in pairs[n:] if pid != neg[0][0]), None)
        if donor is None:
            raise HeldoutError(f"wiki_next {split}: too few paragraphs to pair sentences across them")
        return rows + [{"sentence1": neg[0][1], "sentence2": donor, "label": "0"}]
    if g > m // 2:
        raise HeldoutError(f"wiki_next {split}: too few paragraphs to pair sentences across them")
    return rows + [{"sentence1": neg[i][1], "sentence2": neg[(i + g) % m][2], "label": "0"} for i in range(m)]


def wiki_order(sents, n: int, rng: random.Random, split: str) -> list[dict]:
    """n/2 sentences as written (original) and n/2 other sentences with two adjacent words swapped (scrambled)."""
    cands = [s for s in sents if swap_positions(s)]
    _need("wiki_order", split, len(cands), n)
    cands = rng.sample(cands, n)
    rows = [{"sentence": detokenize(s), "label": "1"} for s in cands[: n // 2]]
    for s in cands[n // 2:]:
        i = rng.choice(swap_positions(s))
        t = s[:i] + [s[i + 1], s[i]] + s[i + 2:]
        rows.append({"sentence": detokenize(t), "label": "0"})
    return rows


def build(data_dir: str, n_train: int, n_dev: int, seed: int) -> dict[str, dict[str, list[dict]]]:
    """``{task: {"train": rows, "dev": rows}}`` (rows shuffled, labels as text)."""
    for n, what in ((n_train, "--train"), (n_dev, "--dev")):
        if n < 2 or n % 2:
            raise HeldoutError(f"{what} {n}: needs an even number >= 2 (the classes are balanced)")
    rng = {t: random.Random(f"{seed}:{t}") for t in TASKS}  # str seeds are deterministic across runs
    out: dict[str, dict[str, list[dict]]] = {t: {} for t in TASKS}

    jig = read_jigsaw(os.path.join(data_dir, JIGSAW))
    toxic, clean = jig["1"][:], jig["0"][:]
    r = rng["jigsaw_toxic"]
    r.shuffle(toxic)
    r.shuffle(clean)
    ht, hd = n_train // 2, n_dev // 2
    _need("jigsaw_toxic", "train+dev (toxic)", len(toxic), ht + hd)
    _need("jigsaw_toxic", "train+dev (clean)", len(clean), ht + hd)
    out["jigsaw_toxic"]["train"] = [{"text": x, "label": "1"} for x in toxic[:ht]] + \
                                   [{"text": x, "label": "0"} for x in clean[:ht]]
    out["jigsaw_toxic"]["dev"] = [{"text": x, "label": "1"} for x in toxic[ht:ht + hd]] + \
                                 [{"text": x, "label": "0"} for x in clean[ht:ht + hd]]
    comments = [x for x in clean[ht + hd:] if len(x.split()) >= MIN_WORDS]  # not used by jigsaw_toxic
    _need("text_source", "train+dev (comments)", len(comments), ht + hd)

    p_train = read_paragraphs(os.path.join(data_dir, WIKI_TRAIN))
    p_dev = read_paragraphs(os.path.join(data_dir, WIKI_DEV))
    train_texts = {detokenize(s) for p in p_train for s in p}
    s_train, s_dev = sentences(p_train, set()), sentences(p_dev, train_texts)
    c_train, c_dev = sentences(p_train, set(), unk=False), sentences(p_dev, train_texts, unk=False)

    out["wiki_next"]["train"] = wiki_next(p_train, n_train, rng["wiki_next"], "train", set())
    out["wiki_next"]["dev"] = wiki_next(p_dev, n_dev, rng["wiki_next"], "dev", train_texts)
    out["wiki_order"]["train"] = wiki_order(s_train, n_train, rng["wiki_order"], "train")
    out["wiki_order"]["dev"] = wiki_order(s_dev, n_dev, rng["wiki_order"], "dev")

    r = rng["text_source"]
    for split, sents, k, c in (("train", c_train, ht, comments[:ht]), ("dev", c_dev, hd, comments[ht:ht + hd])):
        _need("text_source", split, len(sents), k)
        out["text_source"][split] = [{"text": detokenize(s), "label": "1"} for s in r.sample(sents, k)] + \
                                    [{"text": x, "label": "0"} for x in c]
    for t, splits in out.items():
        for split, rows in splits.items():
            rng[t].shuffle(rows)
        check_disjoint(t, splits["train"], splits["dev"])
    return out


def check_disjoint(task: str, train: list[dict], dev: list[dict]) -> None:
    """No text of a dev row occurs in train (any field), every row's fields are non-empty single-line text."""
    fields = TASKS[task][3]
    seen = {r[f] for r in train for f in fields}
    for r in train + dev:
        for f in fields:
            if not r[f].strip() or "\n" in r[f] or "\r" in r[f]:
                raise HeldoutError(f"{task}: a row has an empty or multi-line {f!r}: {r}")
    clash = [r for r in dev if any(r[f] in seen for f in fields)]
    if clash:
        raise HeldoutError(f"{task}: {len(clash)} dev row(s) share a text with train, e.g. {clash[0]}")


# ---------------------------------------------------------------------------------------------- writing
def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def spec_text(args) -> str:
    """tasks.yaml: every value a JSON string (a valid YAML double-quoted scalar: read as the text written)."""
    q = json.dumps
    lines = ["# Held-out text tasks (not GLUE) made by scripts/make_heldout_text_tasks.py",
             f"# --train {args.train} --dev {args.dev} --seed {args.seed}; sources: Jigsaw Toxic Comment subset",
             "# (labels CC0, text CC BY-SA 3.0) and WikiText-2 valid/test (CC BY-SA 3.0).", "tasks:"]
    for name, (template, words, metric, _) in TASKS.items():
        lw = ", ".join(f"{q(k)}: {q(v)}" for k, v in words.items())
        lines += [f"  - name: {q(name)}", f"    train: {q(name + '_train.csv')}", f"    dev: {q(name + '_dev.csv')}",
                  f"    template: {q(template)}", f"    label_words: {{{lw}}}", '    label_column: "label"',
                  f"    metric: {q(metric)}", '    format: "csv"']
    return "\n".join(lines) + "\n"


def prepare_out(out: str, force: bool) -> Path:
    path = Path(out).expanduser().resolve()
    if path == REPO or REPO in path.parents:
        raise HeldoutError(f"--out {out!r} is inside the repository {REPO}; write the tasks elsewhere")
    if path.exists() and not path.is_dir():
        raise HeldoutError(f"--out {out!r} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise HeldoutError(f"--out {out!r} exists and is not empty; pass --force to overwrite its files")
    path.mkdir(parents=True, exist_ok=True)
    return path


def summary(data) -> str:
    lines = [f"{'task':<13} {'split':<5} {'rows':>5}  classes (label word: rows)"]
    for t, splits in data.items():
        words = TASKS[t][1]
        for split, rows in splits.items():
            c = Counter(r["label"] for r in rows)
            counts = ", ".join(f"{words[k]}: {c[k]}" for k in sorted(words))
            lines.append(f"{t:<13} {split:<5} {len(rows):>5}  {counts}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="the offline data kit (holds toxic/ and wikitext-2/)")
    p.add_argument("--out", required=True, help="output folder, outside the repository")
    p.add_argument("--train", type=int, default=600, help="train rows per task (even; classes balanced)")
    p.add_argument("--dev", type=int, default=300, help="dev rows per task (even; classes balanced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into an existing non-empty folder")
    a = p.parse_args(argv)
    try:
        out = prepare_out(a.out, a.force)  # refused before any data is read
        data = build(a.data_dir, a.train, a.dev, a.seed)
        for t, splits in data.items():
            columns = [*TASKS[t][3], "label"]
            for split, rows in splits.items():
                write_atomic(str(out / f"{t}_{split}.csv"), csv_text(rows, columns))
        write_atomic(str(out / "tasks.yaml"), spec_text(a))
    except HeldoutError as e:
        print(f"make_heldout_text_tasks: {e}", file=sys.stderr)
        return 2
    print(summary(data))
    print(f"wrote {out}/tasks.yaml and {2 * len(data)} CSV files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
