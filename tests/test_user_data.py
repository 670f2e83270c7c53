"""The user's data files (issue 19, section 2): CSV / TSV / JSON lines read as the user wrote them, checked before
any model is loaded, every error one line naming the file and line.

Each case is a tiny file written here; the reference is Python's own `csv` / `yaml` reading of the same file with
the settings the format calls for (TSV: no quoting; CSV: RFC 4180; YAML: every scalar a string), not our reader.
"""

import csv
import json
import os

import pytest
import yaml

from hf_taujp.errors import HfTaujpError
from hf_taujp.recipes import tasks as T
from hf_taujp.recipes.datafiles import read_data_file

# 8 lines: a header and 7 reviews; three start with a double quote, two hold a stray quote
REVIEWS_TSV = ('text\tlabel\n'
               '"Great" acting, weak plot\t1\n'
               '"Loved it\t1\n'
               'a dull film\t0\n'
               'the "director\'s cut" is better\t1\n'
               'say "hi to nobody\t0\n'
               '"Meh" at best\t0\n'
               'fine\t1\n')


def _write(path, text, encoding="utf-8"):
    with open(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return str(path)


def _spec(tmp_path, train, **entry):
    body = {"name": "reviews", "train": os.path.basename(train), "template": "'review: {text}'",
            "label_words": "{0: negative, 1: positive}", **entry}
    lines = ["tasks:", "  - " + "\n    ".join(f"{k}: {v}" for k, v in body.items())]
    return _write(tmp_path / "spec.yaml", "\n".join(lines) + "\n")


def _csv_reference(path, **fmt):
    """Rows and start lines of a delimited file read by Python's csv module with explicit settings."""
    with open(path, encoding="utf-8", newline="") as f:
        r = csv.reader(f, **fmt)
        out, start = [], 1
        for rec in r:
            if rec:
                out.append((start, rec))
            start = r.line_num + 1
    header = out[0][1]
    return [dict(zip(header, rec)) for _, rec in out[1:]], [n for n, _ in out[1:]]


# ------------------------------------------------------------------------------------------- TSV quoting
def test_tsv_text_that_starts_with_a_quote_stays_one_row_per_line(tmp_path):
    path = _write(tmp_path / "reviews.tsv", REVIEWS_TSV)
    want, want_lines = _csv_reference(path, delimiter="\t", quoting=csv.QUOTE_NONE)
    assert len(want) == 7
    # the reader of earlier releases (csv.DictReader with its default quoting): 8 lines, 5 rows, three reviews
    # merged into one text with one label
    with open(path, encoding="utf-8", newline="") as f:
        old = list(csv.DictReader(f, delimiter="\t"))
    assert len(old) == 5 and old[1]["text"].count("\n") == 2
    got = read_data_file(path)
    assert got.rows == want and got.lines == want_lines == list(range(2, 9))
    [(task, data)] = T.load_task_spec(_spec(tmp_path, path, dev="reviews.tsv"))
    assert data["dev"] == want
    assert task.prompt(data["dev"][0]) == 'review: "Great" acting, weak plot'


def test_tsv_row_with_a_tab_inside_a_text_names_its_line(tmp_path):
    path = _write(tmp_path / "t.tsv", "text\tlabel\nok\t1\nbad\ttext\t0\nfine\t1\n")
    _, lines = _csv_reference(path, delimiter="\t", quoting=csv.QUOTE_NONE)
    with pytest.raises(HfTaujpError, match=rf"t\.tsv, line {lines[1]}: 3 fields where line 1 has 2"):
        read_data_file(path)


# ------------------------------------------------------------------------------------------- CSV quoting
def test_csv_quoted_fields_and_line_numbers_match_python_csv(tmp_path):
    text = ('text,label\n'
            '"two\nlines, one review",1\n'
            '\n'
            '"she said ""no""",0\n'
            'plain, unquoted,1\n'.replace("plain, unquoted", '"plain, comma"')
            + 'NA,0\n'
            + '"",1\n')
    path = _write(tmp_path / "q.csv", text)
    want, lines = _csv_reference(path, delimiter=",", quotechar='"', doublequote=True, quoting=csv.QUOTE_MINIMAL,
                                 strict=True)
    got = read_data_file(path)
    assert got.rows == want and got.lines == lines == [2, 5, 6, 7, 8]
    assert got.rows[3]["text"] == "NA" and got.rows[4]["text"] == ""  # no NA markers: text as written
    with pytest.raises(HfTaujpError, match=r"q\.csv, line 8: empty 'text' cell \(a template field\)"):
        read_data_file(path, required={"text": "a template field"})


def test_csv_quote_never_closed_names_the_line_it_opens(tmp_path):
    path = _write(tmp_path / "u.csv", 'text,label\nfine,1\n"runs away,0\nmore,1\n')
    with pytest.raises(HfTaujpError, match=r"u\.csv, line 3: a quoted field starts here and is never closed"):
        read_data_file(path)


def test_header_problems_and_encoding(tmp_path):
    with pytest.raises(HfTaujpError, match=r"line 1: the header \['a', 'a'\] has repeated column name"):
        read_data_file(_write(tmp_path / "d.csv", "a,a\nx,y\n"))
    with pytest.raises(HfTaujpError, match=r"line 1: empty; the first line must be the header"):
        read_data_file(_write(tmp_path / "e.csv", "\ntext,label\nx,1\n"))
    p = tmp_path / "latin1.csv"
    p.write_bytes("text,label\nok,1\ncaf\xe9,0\n".encode("latin-1"))
    with pytest.raises(HfTaujpError, match=r"latin1\.csv, line 3: byte 0xe9 \(byte 4 of the line\) is not UTF-8"):
        read_data_file(str(p))
    bom = _write(tmp_path / "bom.csv", "\ufefftext,label\nx,1\n")
    assert read_data_file(bom).columns == ("text", "label")
    with pytest.raises(HfTaujpError, match=r"unknown data format 'txt'"):
        read_data_file(_write(tmp_path / "x.txt", "a\n"))


# ------------------------------------------------------------------------------------------- JSON lines
def test_jsonl_values_are_the_text_written(tmp_path):
    lines = ['{"text": "a", "label": 1}', "", '{"text": "b", "label": 1.50, "ok": true, "m": [1, 2]}',
             '{"text": "c", "label": "x", "n": null}']
    path = _write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    got = read_data_file(path, required=["text", "label"])
    # the reference: the literal text of each value in the line (json keeps strings; numbers as written)
    assert got.rows == [{"text": "a", "label": "1"},
                        {"text": "b", "label": "1.50", "ok": "true", "m": json.dumps([1, 2], separators=(",", ":"))},
                        {"text": "c", "label": "x", "n": ""}]
    assert got.lines == [1, 3, 4]


@pytest.mark.parametrize("line,match", [
    ('{"text": "a"}', r"line 2: no key 'label' \(required column\); the object has \['text'\]"),
    ('{"text": null, "label": 0}', r"line 2: 'text' \(required column\) is null"),
    ('{"text": ["a"], "label": 0}', r"line 2: 'text' \(required column\) is a JSON array"),
    ('{"text": "a", "label": 0,}', r"line 2: not valid JSON"),
    ('{"text": "a", "text": "b", "label": 0}', r"line 2: key\(s\) \['text'\] given twice"),
    ('["a", 0]', r"line 2: not a JSON object"),
    ('{"text": "a", "label": NaN}', r"line 2: NaN is not JSON"),
])
def test_jsonl_bad_lines_are_named(tmp_path, line, match):
    path = _write(tmp_path / "b.jsonl", '{"text": "ok", "label": 1}\n' + line + "\n")
    with pytest.raises(HfTaujpError, match=r"b\.jsonl, " + match):
        read_data_file(path, required=["text", "label"])


# ------------------------------------------------------------------------------------------- YAML spec
def test_yaml_yes_no_stay_words_and_label_values(tmp_path):
    _write(tmp_path / "d.csv", "text,answer\n" + "".join(f"item {i},{'yes' if i % 2 else 'no'}\n"
                                                                 for i in range(10)))
    spec = _write(tmp_path / "spec.yaml", "tasks:\n  - name: yn\n    train: d.csv\n    template: 'q: {text}'\n"
                  "    label_column: answer\n    label_words: {no: off, yes: on}\n")
    ref = yaml.load(open(spec, encoding="utf-8"), Loader=yaml.BaseLoader)["tasks"][0]["label_words"]
    assert ref == {"no": "off", "yes": "on"}  # YAML with no type resolution: the text as written
    assert yaml.safe_load(open(spec, encoding="utf-8"))["tasks"][0]["label_words"] == {False: False, True: True}
    [(task, d)] = T.load_task_spec(spec)
    assert task.label_words == ref and task.words == ["off", "on"]
    assert len(d["train"]) + len(d["dev"]) == 10
    assert {task.labels[task.label_index(r)] for r in d["train"] + d["dev"]} == {"no", "yes"}


def test_yaml_label_words_no_yes_with_integer_labels(tmp_path):
    data = _write(tmp_path / "d.csv", "text,label\n" + "".join(f"t {i},{i % 2}\n" for i in range(10)))
    spec = _spec(tmp_path, data, label_words="{0: no, 1: yes}", metric="f1_accuracy", positive_label="010")
    with pytest.raises(HfTaujpError, match="positive_label"):  # '010' is kept as text, not the YAML 1.1 octal 8
        T.load_task_spec(spec)
    [(task, _)] = T.load_task_spec(_spec(tmp_path, data, label_words="{0: no, 1: yes}"))
    assert task.label_words == {"0": "no", "1": "yes"}


def test_python_label_words_must_be_text():
    with pytest.raises(HfTaujpError, match="label words must be text"):
        T.TextTask("t", "{x}", {0: False, 1: True})
    with pytest.raises(HfTaujpError, match="repeat one another as strings"):
        T.TextTask("t", "{x}", {1: "a", "1": "b"})


def test_spec_entry_problems(tmp_path):
    _write(tmp_path / "d.csv", "text,label\na,0\nb,1\nc,0\n")
    base = "tasks:\n  - {name: a, train: d.csv, template: '{text}', label_words: {0: n, 1: p}}\n"
    with pytest.raises(HfTaujpError, match="two tasks are named 'a'"):
        T.load_task_spec(_write(tmp_path / "dup.yaml", base + "  - {name: a, train: d.csv, template: '{text}', "
                                "label_words: {0: n, 1: p}}\n"))
    with pytest.raises(HfTaujpError, match=r"unknown top-level key\(s\) \['version'\]"):
        T.load_task_spec(_write(tmp_path / "top.yaml", "version: 2\n" + base))
    with pytest.raises(HfTaujpError, match="'template' must be text"):
        T.load_task_spec(_write(tmp_path / "t.yaml", base.replace("'{text}'", "['{text}']")))
    with pytest.raises(HfTaujpError, match=r"train file '.*nope\.csv': no such file"):
        T.load_task_spec(_write(tmp_path / "n.yaml", base.replace("d.csv", "nope.csv")))


# ------------------------------------------------------------------------------------------- schema checks
def test_missing_label_column_is_named_before_any_model_loads(tmp_path):
    data = _write(tmp_path / "s.csv", "text,sentiment\ngood,1\nbad,0\n")
    spec = _spec(tmp_path, data)
    with pytest.raises(HfTaujpError, match=r"s\.csv: no column 'label' \(the label_column\); the header has "
                                           r"\['text', 'sentiment'\]"):
        T.load_task_spec(spec)
    from hf_taujp.recipes import glue

    with pytest.raises(HfTaujpError, match="no column 'label'"):  # a model that does not exist is never reached
        glue.run_glue(str(tmp_path / "no-such-model"), ("sst2", "reviews"), task_spec=spec,
                      output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_data_error_in_one_line_with_exit_2(tmp_path, capsys):
    from hf_taujp.cli import main

    data = _write(tmp_path / "r.tsv", "text\tlabel\nfine\t1\n\tbad\n")
    spec = _spec(tmp_path, data)
    assert main(["glue", "--task-spec", spec, "--tasks", "sst2,reviews", "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-taujp glue: error: ")
    assert "r.tsv, line 3: empty 'text' cell (a template field)" in err[0]


def test_label_outside_the_label_words_names_file_and_line(tmp_path):
    data = _write(tmp_path / "l.csv", "text,label\na,0\nb,1\nc,2\n")
    _, lines = _csv_reference(data)
    with pytest.raises(HfTaujpError, match=rf"l\.csv, line {lines[2]} has label '2', which is not in the label words"):
        T.load_task_spec(_spec(tmp_path, data))


def test_in_memory_rows_are_checked_too():
    t = T.TextTask("t", "{x}", {0: "a", 1: "b"})
    with pytest.raises(HfTaujpError, match="train row 1 has no label column 'label'"):
        t.validate([{"x": "ok", "label": 0}, {"x": "no label"}], "train")
    with pytest.raises(HfTaujpError, match=r"dev row 0 leaves \['x'\] empty"):
        t.validate([{"x": "  ", "label": 1}], "dev")


# ------------------------------------------------------------------------------------------- f1 positive label
def test_f1_accuracy_positive_label_must_be_a_label():
    from sklearn.metrics import accuracy_score, f1_score

    with pytest.raises(HfTaujpError, match=r"positive_label 1 .* is not one of the labels \['neg', 'pos'\]"):
        T.TextTask("t", "{x}", {"neg": "bad", "pos": "good"}, "f1_accuracy")
    task = T.TextTask("t", "{x}", {"pos": "good", "neg": "bad"}, "f1_accuracy", positive_label="neg")
    gold, pred = [0, 1, 1, 0, 1, 0], [0, 1, 0, 0, 0, 1]  # indices: 0 = pos, 1 = neg
    g = [task.labels[i] for i in gold]
    p = [task.labels[i] for i in pred]
    assert task.score(gold, pred) == pytest.approx((accuracy_score(g, p) + f1_score(g, p, pos_label="neg")) / 2)
    task.positive_label = "other"  # changed after construction: score refuses rather than scoring index 1
    with pytest.raises(HfTaujpError, match="positive_label 'other'"):
        task.score(gold, pred)


# ------------------------------------------------------------------------------------------- GLUE TSV reader
def test_glue_reader_equals_python_csv_and_names_bad_rows(tmp_path):
    sample = T.embedded_glue_dir()
    rows = T.load_glue("rte", sample)["train"]
    with open(os.path.join(sample, "RTE", "train.tsv"), encoding="utf-8-sig", newline="") as f:
        ref = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert [(r["sentence1"], r["sentence2"], r["label"]) for r in rows] == \
        [(r["sentence1"], r["sentence2"], {"entailment": 0, "not_entailment": 1}[r["label"]]) for r in ref]
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    _write(folder / "dev.tsv", "sentence\tlabel\nok\t1\n")
    _write(folder / "train.tsv", "sentence\tlabel\n\"quoted\" start\t1\nbad\tpositive\n")
    with pytest.raises(HfTaujpError, match=r"SST-2/train\.tsv, line 3: GLUE sst2 label 'positive'"):
        T.load_glue("sst2", str(tmp_path / "glue"))
    _write(folder / "train.tsv", "sentence\tlabel\nshort row\n")
    with pytest.raises(HfTaujpError, match=r"train\.tsv, line 2: empty 'label' cell"):
        T.load_glue("sst2", str(tmp_path / "glue"))
    _write(folder / "train.tsv", "text\tlabel\nx\t1\n")
    with pytest.raises(HfTaujpError, match=r"no column 'sentence'"):
        T.load_glue("sst2", str(tmp_path / "glue"))


def test_json_spec_jsonl_booleans_and_an_explicit_format(tmp_path):
    rows = [{"q": f"claim {i}", "ok": i % 2 == 1} for i in range(6)]
    _write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _write(tmp_path / "d.txt", "q\tok\n" + "".join(f"claim {i}\t{'true' if i % 2 else 'false'}\n" for i in range(6)))
    spec = {"tasks": [{"name": "j", "train": "d.jsonl", "dev": "d.jsonl", "template": "{q}",
                       "label_words": {"false": "wrong", "true": "right"}, "label_column": "ok", "metric": "f1_accuracy",
                       "positive_label": "true"},
                      {"name": "t", "train": "d.txt", "dev": "d.txt", "format": "tsv", "template": "{q}",
                       "label_words": {"false": "wrong", "true": "right"}, "label_column": "ok"}]}
    path = _write(tmp_path / "spec.json", json.dumps(spec))
    (j, dj), (t, dt) = T.load_task_spec(path)
    # JSON true / false are the label texts "true" / "false", as written (str(True) would be "True")
    assert [r["ok"] for r in dj["dev"]] == [json.dumps(r["ok"]) for r in rows]
    assert dj["dev"] == dt["dev"] and j.labels == ["false", "true"] and j.positive_label == "true"
    with pytest.raises(HfTaujpError, match="unknown data format 'xlsx'"):
        T.load_task_spec({"tasks": [{**spec["tasks"][1], "train": str(tmp_path / "d.txt"), "format": "xlsx"}]})
