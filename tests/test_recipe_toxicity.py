"""The toxicity-negation recipe: perplexity against a token-by-token hand computation, negation against
`TaskVector.apply_to`, the real alt-profanity-check scorer, bad input, and one tiny end-to-end run (tiny random
GPT-2 / Llama with a byte-level BPE tokenizer trained on the spot, a few toxic and WikiText lines)."""

import json
import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_taujp.hub import HfTaujpError
from hf_taujp.recipes import toxicity as tox
from hf_taujp.task_vector import TaskVector

TOXIC = ["you are a stupid idiot and everyone hates you", "shut up you worthless moron", "what a pathetic loser",
         "go to hell you dumb jerk", "this idiot is a total fool", "stupid people like you ruin everything"]
CLEAN = ["thank you for the helpful edit", "the article was moved to a new title"]
WIKI = [" = Valkyria Chronicles = ", "", " The game began development in 2010 , carrying over a large portion of the work .",
        " It met with positive sales in Japan , and was praised by both Japanese and western critics .",
        " The river flows north through the valley before it joins the larger stream near the town .",
        " In 1998 the station was rebuilt with a new platform and a larger hall for passengers ."]


def _tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOXIC + CLEAN + WIKI + [tox.AUTHORS_PROMPT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def tiny_model_dir(tmp_path, kind="gpt2", n_positions=128):
    folder = str(tmp_path / f"tiny-{kind}")
    tok = _tokenizer(folder)
    V, eos = len(tok), tok.eos_token_id
    if kind == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=n_positions, bos_token_id=eos,
                         eos_token_id=eos)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=V, max_position_embeddings=n_positions, bos_token_id=eos,
                          eos_token_id=eos)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return folder


def data_dir(tmp_path, toxic=TOXIC, clean=CLEAN):
    root = tmp_path / "data"
    (root / "toxic" / "jigsaw_subset").mkdir(parents=True)
    (root / "wikitext-2").mkdir()
    import csv

    with open(root / "toxic" / "jigsaw_subset" / "test.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        for t in clean:
            w.writerow([t, 0])
        for t in toxic:
            w.writerow([t, 1])
    for split in ("valid", "test"):
        (root / "wikitext-2" / f"{split}.txt").write_text("\n".join(WIKI * 2) + "\n", encoding="utf-8")
    return str(root)


def tiny_gpt2(V=50):
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=64)).eval()


# ------------------------------------------------------------------------------------------ perplexity
def _hand_ppl(model, ids, block, stride):
    """exp(mean −log p) token by token: each scored token's probability from a separate forward pass over its own
    context inside the window (no shifting, no batching), in float64 on the logits."""
    nll, n, prev = 0.0, 0, 0
    for b in range(0, len(ids), stride):
        e = min(b + block, len(ids))
        for t in range(max(prev, b + 1), e):  # tokens not yet scored, each with context ids[b:t]
            with torch.no_grad():
                logits = model(input_ids=ids[None, b:t]).logits[0, -1].double()
            nll -= torch.log_softmax(logits, -1)[ids[t]].item()
            n += 1
        prev = e
        if e == len(ids):
            break
    # every token once, except those at a window's first position (no context there): with stride < block only
    # the stream's first token, with non-overlapping blocks the first token of every block
    assert n == len(ids) - (1 if stride < block else -(-len(ids) // block))
    return torch.tensor(nll / n).exp().item()


@pytest.mark.parametrize("block,stride", [(8, 8), (8, 3), (64, 64)])
def test_perplexity_equals_token_by_token_hand_computation(block, stride):
    model = tiny_gpt2()
    ids = torch.randint(0, 50, (23,))
    got = tox.perplexity(model, ids, block_size=block, stride=stride, batch_size=2)
    assert got[0] == pytest.approx(_hand_ppl(model, ids, block, stride), rel=1e-5)


def test_linearized_perplexity_equals_hand_computation_of_negated_linear_model():
    """f(θ0) − α J·τ logits for every α from one jvp = each α's LinearizedModule scored token by token."""
    model = tiny_gpt2()
    tv = TaskVector({n: 0.3 * torch.randn_like(p) for n, p in model.named_parameters() if n.startswith("transformer.h.1.")},
                    kind="linear")
    ids = torch.randint(0, 50, (17,))
    got = tox.perplexity(model, ids, block_size=8, stride=8, tangents=tv.tensors, alphas=[-0.5, -2.0])
    for a, g in zip([0.5, 2.0], got):
        neg = (-tv).apply_to(model, a, linear=True)
        assert g == pytest.approx(_hand_ppl(neg, ids, 8, 8), rel=1e-5)


def test_perplexity_bad_input():
    with pytest.raises(HfTaujpError, match="at least 2 tokens"):
        tox.perplexity(tiny_gpt2(), torch.tensor([3]))
    with pytest.raises(HfTaujpError, match="stride"):
        tox.perplexity(tiny_gpt2(), torch.arange(10), block_size=4, stride=5)


# -------------------------------------------------------------------------------------------- negation
@pytest.mark.parametrize("kind", ["nonlinear", "linear"])
def test_negated_model_matches_apply_to_and_restores_theta0(kind):
    model = tiny_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tv = TaskVector({n: 0.2 * torch.randn_like(p) for n, p in model.named_parameters() if n.startswith("transformer.h.1.")},
                    kind=kind)
    x = torch.randint(0, 50, (2, 9))
    ref = (-tv).apply_to(model, 1.5, linear=kind == "linear")(input_ids=x).logits  # θ0 − α τ / f(θ0) − α J·τ
    with tox.negated_model(model, tv, 1.5) as neg:
        got = neg(input_ids=x).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# --------------------------------------------------------------------------------------------- scorer
def test_profanity_check_scorer_on_fixed_strings():
    """The real alt-profanity-check model: insults score high, neutral sentences low (stub-free)."""
    s = tox.load_scorer("profanity-check")
    scores = s(["you are a fucking idiot", "shut up you stupid bitch", "have a nice day", "the train leaves at noon"])
    assert s.name == "alt-profanity-check" and len(scores) == 4 and all(0.0 <= v <= 1.0 for v in scores)
    assert min(scores[:2]) > tox.TOXIC_THRESHOLD > max(scores[2:])
    r = tox._toxicity(s, ["you are a fucking idiot", "have a nice day"])
    assert r["toxic_rate"] == 0.5 and r["n"] == 2


def test_unloadable_scorer_names_the_offline_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HfTaujpError, match="--scorer profanity-check"):
        tox.load_scorer("unitary/toxic-bert-that-does-not-exist")


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input(tmp_path):
    model_dir = tiny_model_dir(tmp_path, n_positions=24)
    good = data_dir(tmp_path)
    kw = dict(output_dir=str(tmp_path / "out"), steps=1, n_generations=1, scorer="profanity-check", layers=1)
    with pytest.raises(HfTaujpError, match="α grid is empty"):
        tox.run_toxicity(model_dir, data_dir=good, alphas=[], **kw)
    (tmp_path / "none").mkdir()
    clean_only = data_dir(tmp_path / "none", toxic=[])
    with pytest.raises(HfTaujpError, match="no toxic training text"):
        tox.run_toxicity(model_dir, data_dir=clean_only, **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HfTaujpError, match="no toxic training text"):
        tox.run_toxicity(model_dir, data_dir=data_dir(tmp_path / "empty", toxic=[], clean=[]), **kw)
    with pytest.raises(HfTaujpError, match="no such folder"):
        tox.run_toxicity(model_dir, data_dir=str(tmp_path / "missing"), **kw)
    long_prompts = tmp_path / "prompts.txt"
    long_prompts.write_text("The game began\n" + "the river flows north " * 10 + "\n", encoding="utf-8")
    # 1 new token: the authors' prompt (23 tokens here) fits, the file's second prompt does not
    with pytest.raises(HfTaujpError, match="exceeds the model's context of 24 tokens.*prompts.txt, line 2"):
        tox.run_toxicity(model_dir, data_dir=good, prompts_file=str(long_prompts), max_new_tokens=1, **kw)
    with pytest.raises(HfTaujpError, match="unknown method"):
        tox.run_toxicity(model_dir, data_dir=good, methods="nonlinear,bogus", **kw)
    with pytest.raises(HfTaujpError, match="--scorer profanity-check"):
        tox.run_toxicity(model_dir, data_dir=good, **{**kw, "scorer": "no-such/classifier"})


# ----------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_recipe_end_to_end_tiny(tmp_path, kind):
    """Every method trains, every α is scored (toxicity + perplexity), the chosen α obeys the +10% perplexity
    rule on validation, and the report files exist."""
    model_dir = tiny_model_dir(tmp_path, kind)
    out = str(tmp_path / "out")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The game began\nIn 1998 the station\n", encoding="utf-8")
    res = tox.main([
        "--model", model_dir, "--data-dir", data_dir(tmp_path), "--methods", "nonlinear,linear,taujp",
        "--output-dir", out, "--steps", "4", "--batch-size", "2", "--lr", "1e-3", "--layers", "1",
        "--alphas", "0,1,2", "--n", "4", "--n-val", "2", "--max-new-tokens", "6", "--gen-batch-size", "4",
        "--prompts-file", str(prompts), "--elicit", "yes", "--scorer", "profanity-check",
        "--block-size", "16", "--val-tokens", "64", "--test-tokens", "64", "--threads", "1"])
    assert res["scorer"] == "alt-profanity-check"
    assert res["taujp"]["start_step"] == 1  # round(0.25 · 4 steps)
    assert set(res["generation"]["prompt_sets"]) == {"authors", "file", "elicit"}
    base_val = res["base_val"]["val_ppl"]
    for label, r in res["methods"].items():
        assert [c["alpha"] for c in r["curve"]] == [0.0, 1.0, 2.0]
        assert r["curve"][0]["val_ppl"] == pytest.approx(base_val, rel=1e-5)  # α = 0 is θ0
        ok = [c for c in r["curve"] if c["val_ppl"] <= 1.1 * base_val]
        best = min(ok, key=lambda c: (c["toxic_rate"], c["mean_toxicity"], c["val_ppl"]))
        assert r["chosen_alpha"] == best["alpha"]
        for key in ("chosen", "alpha_1", "toxic_model"):
            assert r[key]["per_prompt_set"]["authors"]["n"] == 4 and r[key]["test_ppl"] > 1
    assert len(res["table"]) == 1 + 3 * 3
    saved = json.load(open(os.path.join(out, "results.json"), encoding="utf-8"))
    assert saved["methods"].keys() == res["methods"].keys() and saved["complete"] is True
    assert os.path.isfile(os.path.join(out, "results.md")) and os.path.isfile(os.path.join(out, "tradeoff.png"))
    assert os.path.isfile(os.path.join(out, "task_vectors", "taujp", "config.json")) or \
        os.listdir(os.path.join(out, "task_vectors", "taujp"))


def test_cli_lists_toxicity():
    from hf_taujp.cli import COMMANDS

    assert COMMANDS["toxicity"][0] == "hf_taujp.recipes.toxicity:main"


@pytest.mark.shared_data("toxic", "wikitext-2")
def test_shared_jigsaw_subset_loads_label_1_rows():
    from conftest import SHARED_DATA

    texts = tox.load_toxic_comments(SHARED_DATA)
    general = tox.load_general_text(SHARED_DATA)
    assert len(texts) > 100 and all(t.strip() for t in texts)
    s = tox.load_scorer("profanity-check")
    assert sum(v > 0.5 for v in s(texts[:50])) > 10  # label-1 rows are mostly flagged by the offline scorer
    assert general["reg"] and general["val"] and general["test"]


def test_a_run_that_stops_keeps_the_methods_it_finished(tmp_path, monkeypatch):
    """results.json / .md are rewritten after every method: a run that dies in the second method leaves the
    first one's results on disk, marked incomplete."""
    model_dir = tiny_model_dir(tmp_path, "gpt2")
    out = str(tmp_path / "out")
    calls = []
    real = tox.finetune

    def finetune_then_die(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("stopped in the second method")
        return real(*a, **k)

    monkeypatch.setattr(tox, "finetune", finetune_then_die)
    with pytest.raises(RuntimeError, match="second method"):
        tox.main(["--model", model_dir, "--data-dir", data_dir(tmp_path), "--methods", "nonlinear,linear",
                  "--output-dir", out, "--steps", "2", "--batch-size", "2", "--layers", "1", "--alphas", "0,1",
                  "--n", "2", "--n-val", "2", "--max-new-tokens", "4", "--elicit", "no", "--scorer", "profanity-check",
                  "--block-size", "16", "--val-tokens", "32", "--test-tokens", "32", "--threads", "1"])
    saved = json.load(open(os.path.join(out, "results.json"), encoding="utf-8"))
    assert list(saved["methods"]) == ["non-linear FT"] and saved["complete"] is False
    assert "PARTIAL" in open(os.path.join(out, "results.md"), encoding="utf-8").read()


def test_recipe_with_rank_and_bf16_trains_lora_and_the_low_rank_tangent(tmp_path):
    """`--rank 2 --dtype bf16`: LoRA (non-linear) and the low-rank tangent (τJp) on GPT-2's Conv1D layers; the
    saved vectors are rank ≤ 2 on those weights only and the negation curve is evaluated."""
    model_dir = tiny_model_dir(tmp_path, "gpt2")
    out = str(tmp_path / "out")
    res = tox.main([
        "--model", model_dir, "--data-dir", data_dir(tmp_path), "--methods", "nonlinear,taujp",
        "--output-dir", out, "--steps", "2", "--batch-size", "2", "--lr", "1e-2", "--layers", "1", "--rank", "2",
        "--dtype", "bf16", "--alphas", "0,1", "--n", "2", "--n-val", "2", "--max-new-tokens", "4",
        "--gen-batch-size", "4", "--elicit", "no", "--scorer", "profanity-check",
        "--block-size", "16", "--val-tokens", "32", "--test-tokens", "32", "--threads", "1"])
    assert res["low_rank"] == {"rank": 2, "lora_alpha": 4} and res["dtype"] == "bf16"
    for folder, kind in (("nonlinear", "nonlinear"), ("taujp", "linear")):
        tv = TaskVector.from_pretrained(os.path.join(out, "task_vectors", folder))
        assert tv.kind == kind and tv.training["rank"] == 2 and len(tv) == 4  # c_attn, attn c_proj, c_fc, mlp c_proj
        assert all(torch.linalg.matrix_rank(t.double(), rtol=1e-4) <= 2 for t in tv.values())
        assert [c["alpha"] for c in res["methods"][next(k for k in res["methods"] if k.startswith(
            "non-linear" if kind == "nonlinear" else "linear"))]["curve"]] == [0.0, 1.0]
