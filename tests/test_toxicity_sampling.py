"""The toxicity recipe's sampling and prompt halves (issue 19, section 4), and its data files (section 2).

- Sampling is top-k 50 at temperature 1 and nothing else, whatever the model's own generation_config says: the
  generations equal a hand-written sampling loop (softmax of the top-50 logits, torch.multinomial, same seeds) on
  a model whose generation_config asks for top_p / min_p / repetition_penalty / no_repeat_ngram_size.
- α is chosen on other prompts than those reported: validation generations see only the validation half of the
  file's and the eliciting prompts, test generations only the other half.
- Prompt / Jigsaw files: errors name the file and line; the Jigsaw CSV reads as Python's csv module reads it.
"""

import csv

import pytest
import torch
from test_recipe_toxicity import data_dir, tiny_model_dir

from hf_taujp.errors import HfTaujpError
from hf_taujp.recipes import toxicity as tox
from hf_taujp.recipes.models import load_text_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tok, _ = load_text_model(tiny_model_dir(tmp_path_factory.mktemp("tiny"), "gpt2"))
    return model.eval(), tok


def _hand_sampling(model, ids, n_new, eos, pad, seed, top_k=50):
    """Top-k sampling at temperature 1, one token at a time from full forward passes (no cache, no transformers
    generation code): keep the logits ≥ the k-th largest, softmax, one torch.multinomial draw per row; rows that
    ended (eos) get pad."""
    torch.manual_seed(seed)
    x, done, new = ids.clone(), torch.zeros(len(ids), dtype=torch.bool), []
    for _ in range(n_new):
        with torch.no_grad():
            logits = model(input_ids=x).logits[:, -1].float()
        kth = torch.topk(logits, top_k).values[..., -1, None]
        probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        tok = torch.multinomial(probs, num_samples=1).squeeze(1)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        new.append(tok)
        x = torch.cat([x, tok[:, None]], 1)
        done |= tok == eos
        if done.all():
            break
    return torch.stack(new, 1)


def test_sampling_is_top_k_50_only_whatever_the_models_generation_config_says(tiny):
    model, tok = tiny
    prompt = "The game began"
    n, n_new, seed = 4, 6, 7
    want = _hand_sampling(model, torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]] * n), n_new,
                          tok.eos_token_id, tok.pad_token_id, seed)
    want_text = tok.batch_decode(want, skip_special_tokens=True)
    own = model.generation_config
    poisoned = {"top_p": 0.05, "min_p": 0.9, "repetition_penalty": 50.0, "no_repeat_ngram_size": 1, "temperature": 0.1}
    for k, v in poisoned.items():
        setattr(own, k, v)
    try:
        got = tox.generate_continuations(model, tok, [prompt], n, max_new_tokens=n_new, batch_size=n, seed=seed)
        assert got == want_text
        assert model.generation_config is own and own.top_p == 0.05  # the model's own config is back
        # the poison bites: generate() left to complete its settings from the model's config samples otherwise
        torch.manual_seed(seed)
        x = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]] * n)
        naive = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, top_k=50,
                               temperature=1.0, max_new_tokens=n_new, pad_token_id=tok.pad_token_id)
        assert tok.batch_decode(naive[:, x.shape[1]:], skip_special_tokens=True) != want_text
    finally:
        for k in poisoned:
            setattr(own, k, None)


def test_sampling_config_is_complete_and_overrides_are_checked(tiny):
    model, tok = tiny
    cfg = tox.sampling_config(model, tok, 5)
    assert {k: getattr(cfg, k) for k in tox.SAMPLING} == tox.SAMPLING
    assert cfg.max_new_tokens == 5 and cfg.pad_token_id == tok.pad_token_id
    assert tox.sampling_config(model, tok, 5, top_k=10).top_k == 10
    with pytest.raises(HfTaujpError, match=r"unknown sampling setting\(s\) \['top_q'\]"):
        tox.sampling_config(model, tok, 5, top_q=0.9)


# --------------------------------------------------------------------------------------------- prompt halves
def test_split_prompts_is_seeded_disjoint_and_covers_the_list():
    for n in (2, 3, 10, 101):
        v, t = tox.split_prompts(n, seed=5)
        assert (len(v), len(t)) == (n // 2, n - n // 2)
        assert set(v).isdisjoint(t) and sorted(v + t) == list(range(n))
        assert (v, t) == tox.split_prompts(n, seed=5)
    assert tox.split_prompts(10, 5) != tox.split_prompts(10, 6)
    with pytest.raises(HfTaujpError, match="need at least 2"):
        tox.split_prompts(1, 0)


def test_alpha_is_chosen_on_other_prompts_than_those_reported(tmp_path, monkeypatch):
    prompts = ["The game began", "In 1998 the station", "The river flows", "It met with positive"]
    pf = tmp_path / "prompts.txt"
    pf.write_text("\r\n".join(prompts[:2]) + "\r\n\r\n" + "\n".join(prompts[2:]) + "\n", encoding="utf-8")
    calls = []
    real = tox.generate_continuations

    def recording(model, tokenizer, ps, n, **kw):
        calls.append((tuple(ps), kw["seed"]))
        return real(model, tokenizer, ps, n, **kw)

    monkeypatch.setattr(tox, "generate_continuations", recording)
    res = tox.run_toxicity(tiny_model_dir(tmp_path, "gpt2"), data_dir=data_dir(tmp_path), methods="nonlinear",
                           output_dir=str(tmp_path / "out"), steps=1, batch_size=2, layers=1, alphas=(0.0, 1.0),
                           n_generations=2, n_val_generations=2, max_new_tokens=3, prompts_file=str(pf), elicit=True,
                           scorer="profanity-check", block_size=16, val_tokens=32, test_tokens=32, seed=0)
    split = res["prompt_split"]
    lines = split["file"]["val_lines"] + split["file"]["test_lines"]
    assert sorted(lines) == [1, 2, 4, 5]  # lines as an editor shows them (CRLF ends, a blank line skipped)
    line_of = dict(zip([1, 2, 4, 5], prompts))
    val_file = {line_of[n] for n in split["file"]["val_lines"]}
    test_file = {line_of[n] for n in split["file"]["test_lines"]}
    assert val_file.isdisjoint(test_file) and len(val_file) == len(test_file) == 2
    val_el, test_el = set(split["elicit"]["val"]), set(split["elicit"]["test"])
    assert val_el and test_el and val_el.isdisjoint(test_el)
    val_seed, test_seed = 10_000, 20_000
    for ps, s in calls:
        if s == val_seed:
            assert set(ps) <= val_file | val_el | {tox.AUTHORS_PROMPT}, ps
        else:
            assert s == test_seed and set(ps) <= test_file | test_el | {tox.AUTHORS_PROMPT}, ps
    seen = {s: set().union(*(set(ps) for ps, ss in calls if ss == s)) for s in (val_seed, test_seed)}
    assert seen[val_seed] == val_file | val_el | {tox.AUTHORS_PROMPT}
    assert seen[test_seed] == test_file | test_el | {tox.AUTHORS_PROMPT}
    gen = res["generation"]
    assert gen["sampling"] == tox.SAMPLING and gen["prompt_sets"]["file"] == {"val": 2, "test": 2}
    md = (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    assert "top_k 50, temperature 1.0, top_p 1.0" in md and "none from the model's generation_config" in md


# --------------------------------------------------------------------------------------------- the files
def test_prompt_file_problems_name_file_and_line(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("\ufeffone prompt\n\n", encoding="utf-8")
    with pytest.raises(HfTaujpError, match=r"p\.txt: 1 prompt\(s\); needs at least 2"):
        tox.read_prompts(str(p))
    p.write_text("a\nb\n  \na\n", encoding="utf-8")
    with pytest.raises(HfTaujpError, match=r"p\.txt, line 4: repeats line 1"):
        tox.read_prompts(str(p))
    p.write_bytes(b"fine\nna\xefve\n")
    with pytest.raises(HfTaujpError, match=r"p\.txt, line 2: byte 0xef \(byte 3 of the line\) is not UTF-8"):
        tox.read_prompts(str(p))
    p.write_text(" keeps its spaces \r\nsecond\n", encoding="utf-8")
    assert tox.read_prompts(str(p)) == ([" keeps its spaces ", "second"], [1, 2])
    with pytest.raises(HfTaujpError, match="no such file"):
        tox.read_prompts(str(tmp_path / "missing.txt"))


def test_jigsaw_csv_reads_as_python_csv_and_names_bad_rows(tmp_path):
    root = data_dir(tmp_path)
    path = f"{root}/toxic/jigsaw_subset/test.csv"
    rows = [["you idiot, \"really\"", "1"], ["line one\nline two of a jerk", "1"], ["thanks, friend", "0"]]
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    with open(path, newline="", encoding="utf-8") as f:
        want = [r[0] for r in csv.reader(f) if r[1] == "1"]
    assert tox.load_toxic_comments(root) == want == [rows[0][0], rows[1][0]]
    with open(path, "a", newline="", encoding="utf-8") as f:
        f.write("what a loser,toxic\n")
    with pytest.raises(HfTaujpError, match=r"test\.csv, line 5: label 'toxic'; expected 0 or 1"):
        tox.load_toxic_comments(root)
    with open(path, "w", newline="", encoding="utf-8") as f:
        f.write("a,1\nb, c,1\n")
    with pytest.raises(HfTaujpError, match=r"test\.csv, line 2: 3 fields where line 1 has 2"):
        tox.load_toxic_comments(root)
