"""Reading the user's data files: CSV, TSV and JSON lines as tables of strings, every error naming file and line.

One reader for every recipe that takes a file from the user (task specs, the GLUE TSV folder, the toxicity
recipe's Jigsaw CSV, WikiText and prompt files), with these choices, stated once:

- **Encoding**: UTF-8, strictly (a byte that is not UTF-8 is an error naming its line); a leading byte-order
  mark is dropped.
- **CSV** (``.csv``): RFC 4180 through ``pandas.read_csv`` — delimiter ``,``, a field that starts with ``"`` is
  quoted (it may hold commas and line breaks; ``""`` inside it is one ``"``), no escape character, no comment
  lines, spaces kept.
- **TSV** (``.tsv``): tab-separated with **no quoting** (``csv.QUOTE_NONE``), as GLUE and the IANA
  ``text/tab-separated-values`` type define it: ``"`` is an ordinary character, a line is a row, a field
  cannot hold a tab or a line break. (A reader that honours quotes in a TSV merges the rows after a text
  that starts with ``"``: 8 lines became 5 rows.)
- CSV / TSV: the first line is the header (names non-empty and distinct: pandas would rename a repeated
  name silently) and sets the number of fields, so it may not be empty; every cell is a string exactly as written (no NA markers: ``NA``, ``null``, ``""`` stay
  text, no number or date parsing, no stripping), a row with more fields than the header is an error, a
  row with fewer gets empty cells, and empty lines are skipped.
- **JSON lines** (``.jsonl``, also ``.json``): one JSON object per line, decoded by Python's ``json`` (strict
  JSON; a key given twice in one object is an error); blank lines are skipped. Values become strings as
  written: strings as they are, numbers as their literal text (``1`` → ``"1"``, ``1.0`` → ``"1.0"``),
  ``true`` / ``false`` → ``"true"`` / ``"false"``, ``null`` → ``""``, arrays and objects → their compact JSON
  text (re-serialised). (pandas' and datasets' JSON readers infer a type per column, which turns ``1`` into
  ``1.0`` once a row lacks the key.)

Required columns (``required=``) are checked on every row as the file is read: present (a header name /
a key of every object), not empty or blank, and, in JSON lines, a string, number or boolean.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import HfTaujpError

__all__ = ["DataFile", "read_data_file", "read_text_lines", "FORMATS"]

# extension / `format` value -> reader; ".json" is read as JSON lines, as before this module existed
FORMATS = {"csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "json": "jsonl"}
_BREAK = re.compile(r"\r\n|\r|\n")  # the line ends pandas' C tokenizer recognises
_PANDAS_FIELDS = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")
_PANDAS_EOF = re.compile(r"EOF inside string starting at row (\d+)")


@dataclass(frozen=True)
class DataFile:
    """A data file read as a table of strings.

    Attributes:
        path: the file as given.
        format: ``"csv"``, ``"tsv"`` or ``"jsonl"``.
        columns: the header names (CSV / TSV; ``"0"``, ``"1"``, … when read with ``header=False``), None for
            JSON lines (each object has its own keys).
        rows: one ``{column: text}`` per data row, in file order.
        lines: the 1-based line on which each row starts, as an editor shows it.
    """

    path: str
    format: str
    columns: tuple[str, ...] | None
    rows: list[dict[str, str]]
    lines: list[int]

    def where(self, i: int) -> str:
        """``"<path>, line <n>"`` of row ``i``: the location error messages name."""
        return f"{self.path}, line {self.lines[i]}"


def _decode(path: str, what: str) -> str:
    """The file's text: UTF-8 (strict), a leading byte-order mark dropped. Raises HfTaujpError naming the
    line of the first byte that is not UTF-8, or why the file cannot be read."""
    if not os.path.isfile(path):
        raise HfTaujpError(f"{what} {path!r}: no such file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise HfTaujpError(f"{what} {path!r}: cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise HfTaujpError(f"{path}, line {line}: byte 0x{raw[e.start]:02x} (byte {col} of the line) is not UTF-8 "
                           "(save the file as UTF-8)") from None
    return text[1:] if text.startswith("\ufeff") else text


def read_text_lines(path: str, what: str = "text file") -> list[str]:
    """The lines of a UTF-8 text file, without their line ends (``\\n``, ``\\r\\n`` or ``\\r``; the text after
    the last line end is the last line, ``""`` when the file ends with one). Raises HfTaujpError: no such file,
    unreadable, not UTF-8 (naming the line)."""
    return _BREAK.split(_decode(path, what))


def _record_lines(records: Sequence[Sequence[str]], count_breaks: bool) -> list[int]:
    """1-based start line of each record, and after them the line after the last one: a quoted CSV field
    may hold line breaks, so a record can span several lines."""
    starts, line = [], 1
    for rec in records:
        starts.append(line)
        line += 1 + (sum(len(_BREAK.findall(v)) for v in rec) if count_breaks else 0)
    starts.append(line)
    return starts


def _pandas_records(path: str, text: str, fmt: str, nrows: int | None = None) -> list[list[str]]:
    """The file's records (lists of field texts, the header included) through ``pandas.read_csv``; ``nrows``:
    only the first ones (to find the line of a record pandas refused)."""
    import pandas as pd

    opts = dict(sep="," if fmt == "csv" else "\t", quoting=csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE,
                quotechar='"', doublequote=True, escapechar=None, comment=None, skipinitialspace=False,
                header=None, index_col=False, dtype=str, keep_default_na=False, na_filter=False,
                skip_blank_lines=False,  # kept, so records map onto lines; empty lines are dropped by the caller
                engine="c", nrows=nrows)
    try:
        return pd.read_csv(io.StringIO(text), **opts).values.tolist()
    except pd.errors.EmptyDataError:
        return []
    except pd.errors.ParserError as e:
        msg = str(e).strip()
        m, eof = _PANDAS_FIELDS.search(msg), _PANDAS_EOF.search(msg)
        if (m is None and eof is None) or nrows is not None:  # an unknown message: pass it on, with the file
            raise HfTaujpError(f"{path}: not a valid {fmt.upper()} file ({msg})") from None
        before = int(m.group(2)) - 1 if m else int(eof.group(1))  # records read fine before the bad one
        line = _record_lines(_pandas_records(path, text, fmt, nrows=before), fmt == "csv")[-1] if before else 1
        if m:
            raise HfTaujpError(f"{path}, line {line}: {m.group(3)} fields where line 1 has {m.group(1)}"
                               + (" (a tab inside a text?)" if fmt == "tsv" else " (an unquoted comma?)")) from None
        raise HfTaujpError(f"{path}, line {line}: a quoted field starts here and is never closed (in CSV a field "
                           'that starts with " runs to the next lone "; write TSV for texts with stray quotes)') from None


def _read_delimited(path: str, text: str, fmt: str, header: bool, required: Mapping[str, str]) -> DataFile:
    physical = _BREAK.split(text)
    if physical[0] == "" and (header or len(physical) > 1):  # pandas would take its 1 field as the row width
        raise HfTaujpError(f"{path}, line 1: empty; the first line must be "
                           + ("the header" if header else "a row (it sets the number of fields)"))
    records = _pandas_records(path, text, fmt)
    starts = _record_lines(records, fmt == "csv")
    if header:
        if not records:
            raise HfTaujpError(f"{path}: empty file (the first line must be the header)")
        names = tuple(records[0])
        bad = [n for n in names if not n.strip()]
        dup = sorted({n for n in names if names.count(n) > 1})
        if bad or dup:
            raise HfTaujpError(f"{path}, line 1: the header {list(names)} has "
                               + ("an empty column name" if bad else f"repeated column name(s) {dup}"))
        body = range(1, len(records))
    else:
        if not records:  # nothing to check a column of: an empty table (the caller decides if that is an error)
            return DataFile(path, fmt, (), [], [])
        names = tuple(str(i) for i in range(len(records[0])))
        body = range(len(records))
    absent = [c for c in required if c not in names]
    if absent:
        c = absent[0]
        has = f"the header has {list(names)}" if header else f"line 1 has {len(names)} field(s)"
        raise HfTaujpError(f"{path}: no column {c!r} ({required[c]}); {has}")
    rows, lines = [], []
    for r in body:
        rec = records[r]
        if not physical[starts[r] - 1]:  # an empty line (a quoted empty field "" is not one)
            continue
        row = dict(zip(names, rec))
        for c, role in required.items():
            if not row[c].strip():
                raise HfTaujpError(f"{path}, line {starts[r]}: empty {c!r} cell ({role})")
        rows.append(row)
        lines.append(starts[r])
    return DataFile(path, fmt, names, rows, lines)


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"key(s) {dup} given twice in one object")
    return dict(pairs)


def _json_text(value) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))  # arrays and objects as JSON text


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _read_jsonl(path: str, text: str, required: Mapping[str, str]) -> DataFile:
    rows, lines = [], []
    for n, line in enumerate(text.split("\n"), 1):  # JSON lines ends lines with \n (a \r before it is whitespace)
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_int=str, parse_float=str, parse_constant=_reject_constant,
                             object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as e:
            raise HfTaujpError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        except ValueError as e:
            raise HfTaujpError(f"{path}, line {n}: {e}") from None
        if not isinstance(obj, dict):
            raise HfTaujpError(f"{path}, line {n}: not a JSON object (JSON lines: one {{...}} object per line)")
        for c, role in required.items():
            if c not in obj:
                raise HfTaujpError(f"{path}, line {n}: no key {c!r} ({role}); the object has {sorted(obj)}")
            v = obj[c]
            if isinstance(v, (list, dict)):
                kind = "array" if isinstance(v, list) else "object"
                raise HfTaujpError(f"{path}, line {n}: {c!r} ({role}) is a JSON {kind}; expected a string, number or "
                                   "boolean")
            if v is None or not _json_text(v).strip():
                raise HfTaujpError(f"{path}, line {n}: {c!r} ({role}) is {'null' if v is None else 'empty'}")
        if any(isinstance(v, (list, dict)) for v in obj.values()):  # numbers inside them as JSON writes them
            obj = {**obj, **{k: v for k, v in json.loads(line).items() if isinstance(v, (list, dict))}}
        rows.append({k: _json_text(v) for k, v in obj.items()})
        lines.append(n)
    return DataFile(path, "jsonl", None, rows, lines)


def read_data_file(path: str, fmt: str | None = None, *, header: bool = True,
                   required: Mapping[str, str] | Sequence[str] = (), what: str = "data file") -> DataFile:
    """Read a CSV / TSV / JSON-lines file as a :class:`DataFile` of strings (choices: the module docstring).

    Args:
        path: the file.
        fmt: ``"csv"``, ``"tsv"``, ``"jsonl"`` or ``"json"`` (JSON lines); None = the file's extension.
        header: CSV / TSV: the first line names the columns (default); False = every line is data and the
            columns are ``"0"``, ``"1"``, … (GLUE's CoLA files).
        required: the columns every row must fill, ``{column: role}`` (the role is named in errors, e.g.
            ``"label_column"``) or a list of columns.
        what: what the file is, for the "no such file" error (e.g. ``"--prompts-file"``).
    Raises:
        HfTaujpError (one line, naming the file and, where there is one, the line): no such / unreadable file,
        an unknown format, not UTF-8, an empty line where the header belongs, an empty / repeated header name,
        a row with more fields than the header, a quoted CSV field never closed, invalid JSON, a JSON line that
        is not an object or repeats a key, a required column absent, empty or (JSON) an array / object / null.
    """
    fmt_key = (fmt or os.path.splitext(path)[1].lstrip(".")).lower()
    if fmt_key not in FORMATS:
        raise HfTaujpError(f"{path!r}: unknown data format {fmt_key!r}; choose from {sorted(FORMATS)}")
    fmt = FORMATS[fmt_key]
    if fmt == "jsonl" and not header:
        raise HfTaujpError(f"{path!r}: header=False is for CSV / TSV files")
    req = dict(required) if isinstance(required, Mapping) else {c: "required column" for c in required}
    text = _decode(path, what)
    if fmt == "jsonl":
        return _read_jsonl(path, text, req)
    return _read_delimited(path, text, fmt, header, req)
