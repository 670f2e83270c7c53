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
(:class:`TextTask` + :func:`read_rows`) or as a YAML / JSON spec (:func:`load_task_spec`). Files are read by
:mod:`hf_taujp.recipes.datafiles` (pandas for CSV / TSV, TSV without quoting; every value a string as written)
and checked before any model is loaded, each error naming the file and line.
"""

from __future__ import annotations

import functools
import os
import random
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..hub import HfTaujpError
from .datafiles import read_data_file

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
            Words are text: a bool or None word is refused (YAML reads unquoted ``yes`` / ``no`` as booleans;
            :func:`load_task_spec` keeps them as the words "yes" / "no").
        metric: a key of :data:`METRICS`.
        label_column: the row field holding the label.
        positive_label: the label value F1 is computed for (``f1_accuracy``); it must be one of the labels.
    Raises HfTaujpError: a template naming no field, fewer than 2 / duplicate / empty / non-text label words,
    two label values that are the same string, an unknown metric, an ``f1_accuracy`` positive label that is
    not one of the labels.
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
        odd = {k: v for k, v in self.label_words.items() if k is None or v is None or isinstance(v, bool)}
        if odd:  # str() would make them the words "True" / "None", which no user means
            raise HfTaujpError(f"task {self.name!r}: label words must be text, got {odd} (YAML reads unquoted "
                               "yes / no / on / off as booleans: quote them, or use load_task_spec)")
        words = [str(w).strip() for w in self.label_words.values()]
        if any(not w for w in words) or len(set(words)) != len(words):
            raise HfTaujpError(f"task {self.name!r}: label words must be distinct and non-empty, got {words}")
        keys = [str(k) for k in self.label_words]
        if len(set(keys)) != len(keys):
            raise HfTaujpError(f"task {self.name!r}: label values {list(self.label_words)} repeat one another as "
                               "strings (labels are compared as strings)")
        self.label_words = {str(k): str(v).strip() for k, v in self.label_words.items()}
        if self.metric == "f1_accuracy":
            self._positive_index()

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

    def validate(self, rows: Sequence[Mapping[str, Any]], split: str = "data",
                 where: Callable[[int], str] | None = None) -> None:
        """Check rows against the task before any model is loaded.

        Raises HfTaujpError for an empty split, a row that lacks a template field or the label column or
        leaves one empty (blank), or a label that is not in the label-word map, naming the first offending row:
        ``where(i)`` (e.g. ``"train.csv, line 7"``, see :class:`~hf_taujp.recipes.datafiles.DataFile`), else
        ``"<split> row <i>"`` with ``i`` the index in ``rows``.
        """
        if not rows:
            raise HfTaujpError(f"task {self.name!r}: the {split} split is empty")
        loc = where or (lambda i: f"{split} row {i}")
        for i, row in enumerate(rows):
            missing = [f for f in self.fields if f not in row]
            if missing:
                raise HfTaujpError(f"task {self.name!r}: template field(s) {missing} missing in {loc(i)} "
                                   f"(row fields: {sorted(row)})")
            if self.label_column not in row:
                raise HfTaujpError(f"task {self.name!r}: {loc(i)} has no label column {self.label_column!r} "
                                   f"(row fields: {sorted(row)}; set label_column)")
            empty = [f for f in (*self.fields, self.label_column) if row[f] is None or not str(row[f]).strip()]
            if empty:
                raise HfTaujpError(f"task {self.name!r}: {loc(i)} leaves {empty} empty")
            if str(row[self.label_column]) not in self.label_words:
                raise HfTaujpError(f"task {self.name!r}: {loc(i)} has label {row[self.label_column]!r}, "
                                   f"which is not in the label words {dict(self.label_words)}")

    def _positive_index(self) -> int:
        pos = str(self.positive_label)
        if pos not in self.label_words:
            raise HfTaujpError(f"task {self.name!r}: positive_label {self.positive_label!r} (the class f1_accuracy "
                               f"scores) is not one of the labels {self.labels}")
        return self.labels.index(pos)

    def score(self, gold_idx: Sequence[int], pred_idx: Sequence[int]) -> float:
        """The task metric from label indices (positions in :attr:`labels`); ``f1_accuracy`` scores F1 of
        ``positive_label`` (HfTaujpError when it is not one of the labels)."""
        pos = self._positive_index() if self.metric == "f1_accuracy" else 1  # other metrics ignore it
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
    "cola": ("CoLA", False, {"1": "label", "3": "sentence"}),  # no header: columns by position
    "sst2": ("SST-2", True, {"sentence": "sentence", "label": "label"}),
    "mrpc": ("MRPC", True, {"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"}),
    "rte": ("RTE", True, {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}),
}
_RTE_LABELS = {"entailment": 0, "not_entailment": 1}


def embedded_glue_dir() -> str:
    """The GLUE sample shipped in the package (see its SOURCE.md: sizes, source, licences)."""
    return os.path.join(os.path.dirname(__file__), "data", "glue_sample")


def _read_glue_tsv(path: str, task: str) -> list[Row]:
    """Rows of one GLUE TSV file (no quoting, as GLUE writes them; the shared reader's choices), labels as GLUE's
    integers; HfTaujpError naming the file and line for an absent column, an empty cell or an unknown label."""
    _, header, cols = _GLUE_TSV[task]
    if not os.path.isfile(path):
        raise HfTaujpError(f"GLUE file {path!r} not found (expected the glue_data layout: {_GLUE_TSV[task][0]}/train.tsv, dev.tsv)")
    data = read_data_file(path, "tsv", header=header, required={c: f"GLUE {task} {name}" for c, name in cols.items()})
    rows = []
    for i, line in enumerate(data.rows):
        row = {name: line[c] for c, name in cols.items()}
        label = row["label"]
        if task == "rte" and label in _RTE_LABELS:
            row["label"] = _RTE_LABELS[label]
        elif task != "rte" and label in ("0", "1"):
            row["label"] = int(label)
        else:
            raise HfTaujpError(f"{data.where(i)}: GLUE {task} label {label!r}; expected "
                               f"{sorted(_RTE_LABELS) if task == 'rte' else ['0', '1']}")
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


def read_rows(path: str, fmt: str | None = None, *, required: Mapping[str, str] | Sequence[str] = ()) -> list[Row]:
    """Rows of a CSV / TSV (header line) or JSON-lines file, every value a string as written; ``fmt`` defaults
    to the extension. Reading choices (UTF-8; CSV quoting as RFC 4180, TSV without quoting; no NA markers,
    no type inference): :mod:`hf_taujp.recipes.datafiles`. ``required``: columns every row must fill.

    Raises HfTaujpError naming the file and line (:func:`~hf_taujp.recipes.datafiles.read_data_file`)."""
    return read_data_file(path, fmt, required=required).rows


_SPEC_KEYS = ("name", "train", "dev", "template", "label_words", "label_column", "metric", "positive_label", "format")


@functools.cache
def _spec_loader():
    """A YAML SafeLoader under which plain scalars stay the strings the user wrote: only ``null`` / ``~`` /
    an empty value (None) and ``<<`` merges are resolved. YAML 1.1 would make ``no`` / ``yes`` / ``on`` /
    ``off`` booleans (label words "False" / "True"), ``010`` the number 8 and ``1_000`` 1000; every field of a
    spec is text, and labels are compared as strings, so nothing is lost."""
    import yaml

    class SpecLoader(yaml.SafeLoader):
        pass

    keep = {"tag:yaml.org,2002:null", "tag:yaml.org,2002:merge"}
    SpecLoader.yaml_implicit_resolvers = {c: [r for r in rs if r[0] in keep]
                                          for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    return SpecLoader


def _spec_text(e: Mapping, key: str, where: str, default: str | None = None) -> str | None:
    v = e.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):  # a list / mapping / explicit !!bool
        raise HfTaujpError(f"{where}: {key!r} must be text, got {v!r}")
    return str(v)


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
            positive_label: 1                 # f1_accuracy only: the class F1 is computed for (default 1)
            format: csv                       # csv | tsv | jsonl (json = JSON lines); default: the extension

    Every value is read as the text written (a YAML loader that resolves nothing but null), so
    ``label_words: {0: no, 1: yes}`` gives the words "no" / "yes", not booleans. The data files are read
    by :func:`read_rows` and checked before anything else: every template field and the label column present
    and non-empty in every row, every label one of the label words.

    Raises HfTaujpError (one line, naming the spec / data file, line and key): no such file, invalid YAML,
    no ``tasks:`` list, an unknown key (top level or entry), a missing key, a value that is not text, two
    tasks with one name, any :class:`TextTask` error, any reading error, a data row that fails the checks,
    a train file too small to hold out a dev row.
    """
    if isinstance(path_or_dict, Mapping):
        spec, root, src = dict(path_or_dict), os.getcwd(), "task spec"
    else:
        import yaml

        if not os.path.isfile(path_or_dict):
            raise HfTaujpError(f"no such task spec file: {path_or_dict!r}")
        with open(path_or_dict, encoding="utf-8-sig") as f:
            try:
                spec = yaml.load(f, Loader=_spec_loader())  # noqa: S506 - a SafeLoader subclass
            except yaml.YAMLError as e:
                raise HfTaujpError(f"task spec {path_or_dict!r} is not valid YAML/JSON: "
                                   f"{' '.join(str(e).split())}") from None
            except UnicodeDecodeError as e:
                raise HfTaujpError(f"task spec {path_or_dict!r} is not UTF-8 ({e.reason})") from None
        root, src = os.path.dirname(os.path.abspath(path_or_dict)), f"task spec {path_or_dict}"
    entries = spec.get("tasks") if isinstance(spec, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise HfTaujpError(f"{src}: needs a non-empty list under 'tasks:'")
    if set(spec) - {"tasks"}:
        raise HfTaujpError(f"{src}: unknown top-level key(s) {sorted(set(spec) - {'tasks'})}; allowed ['tasks']")
    out, seen = [], set()
    for n, e in enumerate(entries, 1):
        if not isinstance(e, Mapping):
            raise HfTaujpError(f"{src}: task entry {n} must be a mapping, got {e!r}")
        where = f"{src}, task {e.get('name', n)!r}"
        unknown = set(e) - set(_SPEC_KEYS)
        if unknown:
            raise HfTaujpError(f"{where}: unknown key(s) {sorted(map(str, unknown))}; allowed {sorted(_SPEC_KEYS)}")
        for k in ("name", "train", "template", "label_words"):
            if e.get(k) is None:
                raise HfTaujpError(f"{where}: lacks {k!r}")
        if not isinstance(e["label_words"], Mapping):
            raise HfTaujpError(f"{where}: label_words must map label -> word, got {e['label_words']!r}")
        name = _spec_text(e, "name", where)
        if name in seen:
            raise HfTaujpError(f"{src}: two tasks are named {name!r}")
        seen.add(name)
        task = TextTask(name, _spec_text(e, "template", where), e["label_words"],
                        _spec_text(e, "metric", where, "accuracy"), _spec_text(e, "label_column", where, "label"),
                        _spec_text(e, "positive_label", where, "1"))
        fmt = _spec_text(e, "format", where)
        required = {**{f: "a template field" for f in task.fields}, task.label_column: "the label_column"}
        data = {}
        for split in ("train", "dev"):
            rel = _spec_text(e, split, where)
            if rel:
                f = read_data_file(os.path.join(root, rel), fmt, required=required, what=f"{where}: {split} file")
                if not f.rows:
                    raise HfTaujpError(f"{where}: the {split} file {f.path} has no data rows")
                task.validate(f.rows, split, where=f.where)
                data[split] = f.rows
        if "dev" not in data:
            if len(data["train"]) < 2:
                raise HfTaujpError(f"{where}: no dev file, and train has {len(data['train'])} row(s): 20% of it is "
                                   "held out as dev, so it needs at least 2")
            data["train"], data["dev"] = split_train_val(data["train"], fraction=0.2, max_size=None, min_size=1, seed=0)
        out.append((task, data))
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
