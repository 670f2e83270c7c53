"""scripts/make_heldout_text_tasks.py on a tiny fake data kit (no ../shared needed): the files it writes, the spec
the glue recipe reads, balanced classes, disjoint train / dev, real word swaps, a refused non-empty folder."""

import csv
import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from hf_taujp.recipes.tasks import load_task_spec

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_heldout_text_tasks.py"
ADJ = ["quiet", "broad", "narrow", "green", "stony", "misty", "sunny", "frozen", "muddy", "gentle", "wild", "deep"]
NOUN = ["valley", "forest", "meadow", "canyon", "plain", "marsh", "delta", "basin"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_heldout_text_tasks", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sentence(k: int) -> str:
    """A tokenized WikiText-like sentence (its number makes it unique), with @-@ / @,@ markers and a <unk>."""
    unk = " <unk>" if k % 5 == 0 else ""
    return (f"The {ADJ[k % len(ADJ)]} river{unk} number {k} flows slowly through the {NOUN[k % len(NOUN)]} "
            f"valley for 1 @,@ 20{k % 10} km , near a well @-@ known town")


def _wiki(path: Path, first: int, paragraphs: int) -> list[str]:
    """Two sentences per paragraph (one consecutive pair each), headings and blank lines between."""
    lines, sents = [" ", " = Fake Article = ", " "], []
    for p in range(paragraphs):
        a, b = _sentence(first + 2 * p), _sentence(first + 2 * p + 1)
        sents += [a, b]
        lines += [f" {a} . {b} . ", " ", " = = Section = = ", " "]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return sents


@pytest.fixture()
def data_dir(tmp_path):
    root = tmp_path / "data"
    (root / "toxic" / "jigsaw_subset").mkdir(parents=True)
    (root / "wikitext-2").mkdir()
    rows = [(f"you are a stupid idiot number {k} and everyone hates you", "1") for k in range(5)]
    rows += [(f"thanks for the   edit on\nthe article about topic {k}, it reads much better now", "0")
             for k in range(8)]  # a line break and runs of spaces inside a quoted field
    rows += [("ok", "0"), ("you are a stupid idiot number 0 and everyone hates you", "0")]  # too short; both labels
    with open(root / "toxic" / "jigsaw_subset" / "test.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    _wiki(root / "wikitext-2" / "valid.txt", 0, 8)
    _wiki(root / "wikitext-2" / "test.txt", 100, 6)
    return root


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_builds_a_spec_the_recipe_loads(script, data_dir, tmp_path, capsys):
    out = tmp_path / "tasks"
    assert script.main(["--data-dir", str(data_dir), "--out", str(out), "--train", "4", "--dev", "2"]) == 0
    assert "jigsaw_toxic" in capsys.readouterr().out
    names = ["jigsaw_toxic", "wiki_next", "wiki_order", "text_source"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["tasks.yaml"] + [f"{n}_{s}.csv" for n in names for s in ("train", "dev")])
    spec = load_task_spec(str(out / "tasks.yaml"))
    assert [t.name for t, _ in spec] == names
    for task, data in spec:
        assert len(set(w.split()[0] for w in task.words)) == 2 and all(" " not in w for w in task.words)
        for split, n in (("train", 4), ("dev", 2)):
            assert Counter(r["label"] for r in data[split]) == {"0": n // 2, "1": n // 2}, (task.name, split)
        seen = {r[f] for r in data["train"] for f in task.fields}
        assert not any(r[f] in seen for r in data["dev"] for f in task.fields), task.name
    # text_source's comments are none of jigsaw_toxic's; its wiki sentences carry no <unk>
    by = {t.name: v for t, v in spec}
    jig = {r["text"] for s in by["jigsaw_toxic"].values() for r in s}
    src = [r for s in by["text_source"].values() for r in s]
    assert not jig & {r["text"] for r in src if r["label"] == "0"}
    assert all("<unk>" not in r["text"] and "@" not in r["text"] for r in src if r["label"] == "1")
    assert all("\n" not in r["text"] and "  " not in r["text"] for r in src)


def test_swaps_two_adjacent_words_and_pairs_across_paragraphs(script, data_dir, tmp_path):
    out = tmp_path / "tasks"
    assert script.main(["--data-dir", str(data_dir), "--out", str(out), "--train", "4", "--dev", "2"]) == 0
    wiki = [_sentence(k) for k in [*range(16), *range(100, 112)]]
    source = {script.detokenize((s + " .").split()): s for s in wiki}

    def swaps(tokens):  # every swap of two adjacent distinct alphabetic tokens, the first token kept in place
        return {script.detokenize(tokens[:i] + [tokens[i + 1], tokens[i]] + tokens[i + 2:])
                for i in range(1, len(tokens) - 1) if tokens[i].isalpha() and tokens[i + 1].isalpha()
                and tokens[i].lower() != tokens[i + 1].lower()}

    used = []
    for split in ("train", "dev"):
        for r in _rows(out / f"wiki_order_{split}.csv"):
            if r["label"] == "1":
                assert r["sentence"] in source
                used.append(r["sentence"])
                continue
            assert r["sentence"] not in source  # the swap changed the text
            match = [t for t, tok in source.items() if r["sentence"] in swaps((tok + " .").split())]
            assert len(match) == 1, r
            used.append(match[0])
    assert len(used) == len(set(used))  # each sentence once, intact or swapped
    order = {t: k for k, t in enumerate(source)}  # sentence 2p and 2p+1 share paragraph p
    for split in ("train", "dev"):
        rows = _rows(out / f"wiki_next_{split}.csv")
        texts = [r[f] for r in rows for f in ("sentence1", "sentence2")]
        assert len(texts) == len(set(texts))
        for r in rows:
            i, j = order[r["sentence1"]], order[r["sentence2"]]
            assert (j == i + 1 and i % 2 == 0) == (r["label"] == "1")
            assert r["label"] == "1" or i // 2 != j // 2


def test_refuses_a_non_empty_folder_and_odd_sizes(script, data_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert script.main(["--data-dir", str(data_dir), "--out", str(out), "--train", "4", "--dev", "2"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert script.main(["--data-dir", str(data_dir), "--out", str(out), "--train", "4", "--dev", "2", "--force"]) == 0
    assert (out / "tasks.yaml").is_file() and (out / "keep.txt").read_text() == "mine"
    assert script.main(["--data-dir", str(data_dir), "--out", str(tmp_path / "odd"), "--train", "5"]) == 2
    assert "even" in capsys.readouterr().err
    assert script.main(["--data-dir", str(data_dir), "--out", str(tmp_path / "big"), "--train", "400"]) == 2
    assert "only" in capsys.readouterr().err
