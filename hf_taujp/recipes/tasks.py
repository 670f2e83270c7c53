"""Text-to-text classification tasks: a prompt template, label words (a verbalizer) and a metric.

A task turns a labelled row ``{"sentence": ..., "label": 1}`` into a prompt (``"cola sentence: ..."``)
and an answer word (``"acceptable"``); a model is scored by *rank classification* over the task's label
words (see :mod:`hf_taujp.recipes.text_to_text`). GLUE CoLA, SST-2, MRPC and RTE are built in with the
T5 prompts and label words the τJp authors used (Raffel et al. 2020, App. D; Yoshida et al. 2025) and
GLUE's metrics (Wang et al. 2019): CoLA Matthews correlation, MRPC the mean of accuracy and F1 (positive
class = equivalent), SST-2 and RTE accuracy. Metrics are scikit-learn's.

Data: ``datasets.load_dataset("nyu-mll/glue", name)`` online, or a GLUE TSV folder (``--data-dir``,
the layout of the original ``glue_data/``: ``CoLA/train.tsv``, ``SST-2/dev.tsv``, ...). GLUE's test
labels are hidden, so results are reported on the dev set, and the validation split that chooses α
is carved out of train (:func:`split_train_val`).

User tasks come from a file (CSV / TSV / JSON lines) with a template and label words, in Python
(:class:`TextTask` + :func:`read_rows`) or as a YAML / JSON spec (:func:`load_task_spec`).
"""

from __future__ import annotations

import csv
import json
import os
import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..hub import HfTaujpError

__all__ = [
    "TextTask", "GLUE_TASKS", "METRICS", "compute_metric", "read_rows", "load_glue", "load_task_data",
    "load_task_spec", "split_train_val", "embedded_glue_dir",
]

Row = dict[str, Any]


def _accuracy(y, p):
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(y, p))


def _matthews(y, p):
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(y, p))


def _f1_accuracy(y, p, positive=1):
    from sklearn.metrics import accuracy_score, f1_score

    return float((accuracy_score(y, p) + f1_score(y, p, pos_label=positive, zero_division=0.0)) / 2)


# metric name -> fn(gold labels, predicted labels) -> float (GLUE's definitions, scikit-learn's implementations)
METRICS = {"accuracy": _accuracy, "matthews_correlation": _matthews, "f1_accuracy": _f1_accuracy}


def compute_metric(name: str, gold: Sequence, pred: Sequence, positive_label: Any = 1) -> float:
    """The task metric on label values: ``accuracy``, ``matthews_correlation`` (CoLA) or
    ``f1_accuracy`` = (accuracy + F1 of ``positive_label``) / 2 (MRPC, as GLUE reports it)."""
    if name not in METRICS:
        raise HfTaujpError(f"unknown metric {name!r}; choose from {sorted(METRICS)}")
    if len(gold) != len(pred) or not len(gold):
        raise HfTaujpError(f"metric {name}: {len(gold)} gold labels and {len(pred)} predictions")
    if name == "f1_accuracy":
        return _f1_accuracy(list(gold), list(pred), positive_label)
    return METRICS[name](list(gold), list(pred))


@dataclass
class TextTask:
    """A labelled text set as a text-to-text task.

    Args:
        name: task id (used in file names and tables).
        template: ``str.format`` template over the row's fields, e.g. ``"rte sentence1: {sentence1} sentence2: {sentence2}"``.
        label_words: ``{label value: answer word}`` (the verbalizer), e.g. ``{0: "entailment", 1: "not_entailment"}``.
            Label values are compared as strings, so ``1`` and ``"1"`` from a CSV file are the same label.
        metric: a key of :data:`METRICS`.
        label_column: the row field holding the label.
        positive_label: the label value F1 is computed for (``f1_accuracy``).
    Raises HfTaujpError: a template naming no field, duplicate label words, an unknown metric.
    """

    name: str
    template: str
    label_words: Mapping[Any, str]
    metric: str = "accuracy"
    label_column: str = "label"
    positive_label: Any = 1
    fields: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        if self.metric not in METRICS:
            raise HfTaujpError(f"task {self.name!r}: unknown metric {self.metric!r}; choose from {sorted(METRICS)}")
        names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        if not names or any(not n or not n.isidentifier() for n in names):
            raise HfTaujpError(f"task {self.name!r}: template {self.template!r} must name row fields, e.g. '{{sentence}}'")
        self.fields = tuple(dict.fromkeys(names))
        if len(self.label_words) < 2:
            raise HfTaujpError(f"task {self.name!r}: needs at least 2 label words, got {dict(self.label_words)}")
        words = [str(w).strip() for w in self.label_words.values()]
        if any(not w for w in words) or len(set(words)) != len(words):
            raise HfTaujpError(f"task {self.name!r}: label words must be distinct and non-empty, got {words}")
        self.label_words = {str(k): str(v).strip() for k, v in self.label_words.items()}

    @property
    def labels(self) -> list[str]:
        """Label values (as strings) in verbalizer order; predictions are indices into this list."""
        return list(self.label_words)

    @property
    def words(self) -> list[str]:
        return list(self.label_words.values())

    def prompt(self, row: Mapping[str, Any]) -> str:
        return self.template.format(**{f: str(row[f]).strip() for f in self.fields})

    def label_index(self, row: Mapping[str, Any]) -> int:
        return self.labels.index(str(row[self.label_column]))

    def validate(self, rows: Sequence[Mapping[str, Any]], split: str = "data") -> None:
        """Raise HfTaujpError for an empty split, a field the template names but a row lacks, or a label
        that is not in the label-word map (naming the first offending row)."""
        if not rows:
            raise HfTaujpError(f"task {self.name!r}: the {split} split is empty")
        for i, row in enumerate(rows):
            missing = [f for f in self.fields if f not in row]
            if missing:
                raise HfTaujpError(f"task {self.name!r}: template field(s) {missing} missing in {split} row {i} "
                                   f"(row fields: {sorted(row)})")
            if self.label_column in row and str(row[self.label_column]) not in self.label_words:
                raise HfTaujpError(f"task {self.name!r}: {split} row {i} has label {row[self.label_column]!r}, "
                                   f"which is not in the label words {dict(self.label_words)}")

    def score(self, gold_idx: Sequence[int], pred_idx: Sequence[int]) -> float:
        """The task metric from label indices (positions in :attr:`labels`)."""
        pos = self.labels.index(str(self.positive_label)) if str(self.positive_label) in self.labels else 1
        return compute_metric(self.metric, list(gold_idx), list(pred_idx), positive_label=pos)

    def to_dict(self) -> dict:
        return {"name": self.name, "template": self.template, "label_words": dict(self.label_words),
                "metric": self.metric, "label_column": self.label_column, "positive_label": self.positive_label}


# The T5 GLUE prompts and label words (Raffel et al. 2020), as the τJp authors use them.
GLUE_TASKS: dict[str, TextTask] = {
    "cola": TextTask("cola", "cola sentence: {sentence}", {0: "unacceptable", 1: "acceptable"}, "matthews_correlation"),
    "sst2": TextTask("sst2", "sst2 sentence: {sentence}", {0: "negative", 1: "positive"}, "accuracy"),
    "mrpc": TextTask("mrpc", "mrpc sentence1: {sentence1} sentence2: {sentence2}", {0: "not_equivalent", 1: "equivalent"},
                     "f1_accuracy", positive_label=1),
    "rte": TextTask("rte", "rte sentence1: {sentence1} sentence2: {sentence2}", {0: "entailment", 1: "not_entailment"},
                    "accuracy"),
}
# GLUE TSV layout: task -> (folder, has header, column -> field name)
_GLUE_TSV = {
    "cola": ("CoLA", False, {1: "label", 3: "sentence"}),
    "sst2": ("SST-2", True, {"sentence": "sentence", "label": "label"}),
    "mrpc": ("MRPC", True, {"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"}),
    "rte": ("RTE", True, {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}),
}
_RTE_LABELS = {"entailment": 0, "not_entailment": 1}


def embedded_glue_dir() -> str:
    """The GLUE sample shipped in the package (see its SOURCE.md: sizes, source, licences)."""
    return os.path.join(os.path.dirname(__file__), "data", "glue_sample")


def _read_glue_tsv(path: str, task: str) -> list[Row]:
    _, header, cols = _GLUE_TSV[task]
    if not os.path.isfile(path):
        raise HfTaujpError(f"GLUE file {path!r} not found (expected the glue_data layout: {_GLUE_TSV[task][0]}/train.tsv, dev.tsv)")
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        head = next(reader) if header else None
        idx = {c: (head.index(c) if head else c) for c in cols} if header else dict((c, c) for c in cols)
        if header:
            absent = [c for c in cols if c not in head]
            if absent:
                raise HfTaujpError(f"{path!r}: missing column(s) {absent} (header {head})")
        for line in reader:
            if not line or all(not x for x in line):
                continue
            row = {name: line[idx[c]] for c, name in cols.items()}
            label = row["label"]
            row["label"] = _RTE_LABELS[label] if task == "rte" else int(label)
            rows.append(row)
    return rows


def load_glue(task: str, data_dir: str | None = None) -> dict[str, list[Row]]:
    """``{"train": rows, "dev": rows}`` of a GLUE task (cola, sst2, mrpc, rte).

    ``data_dir``: a GLUE TSV folder (offline); None reads ``datasets.load_dataset("nyu-mll/glue", task)``
    (train / validation). Labels are GLUE's integers (RTE: 0 entailment, 1 not_entailment).
    """
    if task not in GLUE_TASKS:
        raise HfTaujpError(f"unknown GLUE task {task!r}; built in: {sorted(GLUE_TASKS)}")
    if data_dir is not None:
        folder = os.path.join(data_dir, _GLUE_TSV[task][0])
        return {s: _read_glue_tsv(os.path.join(folder, f"{s}.tsv"), task) for s in ("train", "dev")}
    import datasets

    ds = datasets.load_dataset("nyu-mll/glue", task)
    keep = ["label", *GLUE_TASKS[task].fields]
    return {ours: [{k: r[k] for k in keep} for r in ds[theirs]] for ours, theirs in (("train", "train"), ("dev", "validation"))}


def read_rows(path: str, fmt: str | None = None) -> list[Row]:
    """Rows of a CSV / TSV (header line) or JSON-lines file; ``fmt`` defaults to the extension."""
    if not os.path.isfile(path):
        raise HfTaujpError(f"no such data file: {path!r}")
    fmt = (fmt or os.path.splitext(path)[1].lstrip(".")).lower()
    if fmt in ("csv", "tsv"):
        with open(path, encoding="utf-8-sig", newline="") as f:
            return [dict(r) for r in csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")]
    if fmt in ("jsonl", "json"):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not all(isinstance(r, dict) for r in rows):
            raise HfTaujpError(f"{path!r}: every JSON line must be an object")
        return rows
    raise HfTaujpError(f"{path!r}: unknown data format {fmt!r} (csv, tsv or jsonl)")


def load_task_spec(path_or_dict) -> list[tuple[TextTask, dict[str, list[Row]]]]:
    """User tasks from a YAML / JSON spec: ``[(task, {"train": rows, "dev": rows}), ...]``.

    Format (one entry per task; ``dev`` optional: then 20% of train, seeded, is held out as dev)::

        tasks:
          - name: imdb
            train: data/imdb_train.csv        # CSV / TSV / JSON lines, relative to the spec file
            dev: data/imdb_test.csv
            template: "review: {text}"
            label_words: {0: negative, 1: positive}
            label_column: label               # default "label"
            metric: accuracy                  # accuracy | matthews_correlation | f1_accuracy
    """
    if isinstance(path_or_dict, Mapping):
        spec, root = dict(path_or_dict), os.getcwd()
    else:
        import yaml

        if not os.path.isfile(path_or_dict):
            raise HfTaujpError(f"no such task spec file: {path_or_dict!r}")
        with open(path_or_dict, encoding="utf-8") as f:
            try:
                spec = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise HfTaujpError(f"task spec {path_or_dict!r} is not valid YAML/JSON: {e}") from None
        root = os.path.dirname(os.path.abspath(path_or_dict))
    entries = spec.get("tasks") if isinstance(spec, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise HfTaujpError("a task spec needs a non-empty list under 'tasks:'")
    allowed = {"name", "train", "dev", "template", "label_words", "label_column", "metric", "positive_label", "format"}
    out = []
    for e in entries:
        if not isinstance(e, Mapping):
            raise HfTaujpError(f"task spec entries must be mappings, got {e!r}")
        unknown = set(e) - allowed
        if unknown:
            raise HfTaujpError(f"task spec entry {e.get('name')!r}: unknown key(s) {sorted(unknown)}; allowed {sorted(allowed)}")
        for k in ("name", "train", "template", "label_words"):
            if k not in e:
                raise HfTaujpError(f"task spec entry {e.get('name')!r} lacks {k!r}")
        if not isinstance(e["label_words"], Mapping):
            raise HfTaujpError(f"task {e['name']!r}: label_words must map label -> word")
        task = TextTask(str(e["name"]), str(e["template"]), e["label_words"], e.get("metric", "accuracy"),
                        e.get("label_column", "label"), e.get("positive_label", 1))
        train = read_rows(os.path.join(root, e["train"]), e.get("format"))
        if e.get("dev"):
            dev = read_rows(os.path.join(root, e["dev"]), e.get("format"))
        else:
            train, dev = split_train_val(train, fraction=0.2, max_size=None, min_size=1, seed=0)
        task.validate(train, "train")
        task.validate(dev, "dev")
        out.append((task, {"train": train, "dev": dev}))
    return out


def load_task_data(task: TextTask, data_dir: str | None) -> dict[str, list[Row]]:
    """Train / dev rows of a built-in GLUE task, validated against the task."""
    data = load_glue(task.name, data_dir)
    for split, rows in data.items():
        task.validate(rows, split)
    return data


def split_train_val(rows: Sequence[Row], fraction: float = 0.1, max_size: int | None = 5000, min_size: int = 32,
                    seed: int = 0) -> tuple[list[Row], list[Row]]:
    """(train, val): a seeded random ``fraction`` of ``rows`` (at least ``min_size``, at most ``max_size``)
    held out as the validation split that chooses α (tangent_task_arithmetic: 10% of train, ≤ 5000)."""
    n = len(rows)
    k = max(min_size, int(round(fraction * n)))
    if max_size is not None:
        k = min(k, max_size)
    if k >= n:
        raise HfTaujpError(f"cannot hold out {k} validation rows from {n} training rows")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = set(order[:k])
    return [r for i, r in enumerate(rows) if i not in val], [rows[i] for i in order[:k]]
