"""`compare_merges` (issue 22 §3): every method swept over its grid on validation, the setting chosen on the
validation split only, its test scores reported with time and memory; the table / JSON / plot outputs; and
the YAML recipes' `weight_layout:` key."""
import json
import math
import os

import pytest
import torch

from hf_taujp.errors import HfTaujpError, MergeConfigError, MissingStatisticsError
from hf_taujp.evaluation import DEFAULT_GRIDS, DEFAULT_METHODS, MergeComparison, compare_merges
from hf_taujp.merging import FisherStatistics, load_recipe, merge, merge_from_config, merge_streaming
from hf_taujp.task_vector import TaskVector
from tests.tiny_models import GPT2_MINI, tiny_gpt2


# ------------------------------------------------------------------------------ a synthetic benchmark
def _linear_setup(T=2, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(4, 3)
    g = torch.Generator().manual_seed(seed + 1)
    vecs = {t: {n: 0.5 * torch.randn(p.shape, generator=g) for n, p in base.named_parameters()}
            for t in "abcdefgh"[:T]}
    return base, vecs


def _flat(model_or_sd):
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else model_or_sd
    return torch.cat([sd[k].detach().reshape(-1).double() for k in sorted(sd)])


def _distance_eval(base, vecs, targets, scale=None, calls=None):
    """score_t(θ, split) = 10 − k_t·‖θ − (θ0 + c_{t,split}·Σ τ)‖ (higher is better): task arithmetic's best λ on
    a split is c_{t,split} (one target per task and split)."""
    theta0 = _flat(base)
    total = _flat({k: sum(v[k] for v in vecs.values()) for k in base.state_dict()})
    scale = scale or {t: 1.0 for t in vecs}

    def evaluate(model, split):
        if calls is not None:
            calls.append((split, _flat(model)))
        th = _flat(model)
        return {t: 10.0 - scale[t] * float(torch.linalg.vector_norm(th - theta0 - targets[t][split] * total))
                for t in vecs}
    return evaluate, float(torch.linalg.vector_norm(total))


def test_the_setting_is_chosen_on_validation_only():
    base, vecs = _linear_setup()
    calls = []
    targets = {t: {"val": 0.3, "test": 0.7} for t in vecs}
    evaluate, norm = _distance_eval(base, vecs, targets, scale={"a": 1.0, "b": 2.0}, calls=calls)
    res = compare_merges(base, vecs, evaluate, methods=["task_arithmetic"], normalize_by={"a": 10.0, "b": 5.0},
                         progress=False)
    r = res.methods["task_arithmetic"]
    calls = list(calls)
    grid = DEFAULT_GRIDS["task_arithmetic"]["lambda_"]
    assert r["chosen"] == {"lambda_": 0.3} and [c["setting"]["lambda_"] for c in r["curve"]] == list(grid)
    # choosing on test would have given another λ: the test curve peaks at 0.7
    test_curve = [evaluate(merge(base, list(vecs.values()), lambda_=lam, progress=False), "test") for lam in grid]
    assert grid[max(range(len(grid)), key=lambda i: sum(test_curve[i].values()))] == 0.7
    # evaluate saw every setting on "val" and only the chosen one on "test"
    assert [s for s, _ in calls] == ["val"] * len(grid) + ["test"]
    want = _flat(merge(base, list(vecs.values()), lambda_=0.3, progress=False))
    assert torch.allclose(calls[-1][1], want)
    assert r["test"]["a"] == pytest.approx(10 - 0.4 * norm) and r["test"]["b"] == pytest.approx(10 - 0.8 * norm)
    assert r["test_mean"] == pytest.approx(10 - 0.6 * norm)
    assert r["test_norm"]["a"] == pytest.approx(r["test"]["a"] / 10) and r["test_norm"]["b"] == pytest.approx(
        r["test"]["b"] / 5)
    assert r["test_norm_mean"] == pytest.approx((r["test"]["a"] / 10 + r["test"]["b"] / 5) / 2)
    assert r["val_score"] == pytest.approx(r["curve"][2]["val_mean"]) and res.selected_by == "val_mean"
    assert r["merge_seconds"] > 0 and all(c["merge_seconds"] > 0 for c in r["curve"])
    if os.path.exists("/proc/self/clear_refs"):
        assert r["peak_mib"] is not None and r["peak_mib"] >= 0


def test_normalized_validation_choice_and_ties():
    base, vecs = _linear_setup()
    targets = {"a": {"val": 0.2, "test": 0.2}, "b": {"val": 0.6, "test": 0.6}}
    evaluate, _ = _distance_eval(base, vecs, targets, scale={"a": 1.0, "b": 3.0})
    grids = {"task_arithmetic": {"lambda_": [0.2, 0.4, 0.6, 0.8]}}
    # the absolute mean weighs task b three times: λ = 0.6
    res = compare_merges(base, vecs, evaluate, methods=["task_arithmetic"], grids=grids, progress=False)
    assert res.methods["task_arithmetic"]["chosen"] == {"lambda_": 0.6}
    # normalized by per-task validation scores, task a (small single score) dominates: λ = 0.2
    single = {"val": {"a": 1.0, "b": 100.0}, "test": {"a": 1.0, "b": 100.0}}
    res = compare_merges(base, vecs, evaluate, methods=["task_arithmetic"], grids=grids, normalize_by=single,
                         progress=False)
    assert res.selected_by == "val_norm_mean" and res.methods["task_arithmetic"]["chosen"] == {"lambda_": 0.2}
    # a flat curve: task arithmetic's one-shot λ = 1; TIES knob by knob: density nearest its default 1, λ = 1
    flat = compare_merges(base, vecs, lambda m, s: {"a": 1.0, "b": 1.0}, methods=["task_arithmetic", "ties"],
                          progress=False)
    assert flat.methods["task_arithmetic"]["chosen"] == {"lambda_": 1.0}
    assert flat.methods["ties"]["chosen"] == {"density": 0.3, "lambda_": 1.0}
    assert len(flat.methods["ties"]["curve"]) == 12


def test_default_methods_run_and_random_methods_get_a_seed():
    base, vecs = _linear_setup(T=3)
    evaluate, _ = _distance_eval(base, vecs, {t: {"val": 0.4, "test": 0.4} for t in vecs})
    res = compare_merges(base, vecs, evaluate, progress=False)
    assert list(res.methods) == list(DEFAULT_METHODS)
    for name in ("tsv", "iso_c", "iso_cts", "wudi"):
        assert res.methods[name]["main_knob"] == "lambda_"
    res = compare_merges(base, vecs, evaluate, methods=["dare_ties", "model_stock"], progress=False)
    assert res.methods["dare_ties"]["fixed"] == {"seed": 0}
    chosen = res.methods["dare_ties"]["chosen"]
    again = merge(base, list(vecs.values()), "dare_ties", seed=0, progress=False, **chosen)
    assert res.methods["dare_ties"]["test"] == evaluate(again, "test")  # the validated masks, redrawn
    ms = res.methods["model_stock"]  # no knob: one setting at the method's defaults
    assert ms["main_knob"] is None and ms["chosen"] == {} and len(ms["curve"]) == 1


def test_bad_arguments_are_refused_before_any_merge():
    base, vecs = _linear_setup()
    calls = []

    def evaluate(model, split):
        calls.append(split)
        return {"a": 1.0, "b": 1.0}

    cases = [
        (dict(methods=["tie"]), MergeConfigError, "unknown merge method 'tie'"),
        (dict(methods=["ties"], grids={"ties": {"densty": [0.1]}}), MergeConfigError, r"'densty'.*'ties'.*density"),
        (dict(methods=["ties"], grids={"ties": {"density": []}}), MergeConfigError, "empty grid for ties.density"),
        (dict(methods=["ties"], grids={"ties": {"density": 0.2}}), MergeConfigError, "must be a list"),
        (dict(methods=["ties"], grids={"tsv": {"lambda_": [1.0]}}), MergeConfigError, r"\['tsv'\].*not among"),
        (dict(methods=["ties", "ties"]), MergeConfigError, "each once"),
        (dict(methods=[]), MergeConfigError, "at least one"),
        (dict(methods=["fisher_average"]), MissingStatisticsError, "'fisher_average' needs one fisher"),
        (dict(methods=["regmean"]), MissingStatisticsError, "'regmean' needs one gram"),
        (dict(methods=["gradient_matching"], statistics={"fisher": {"a": {}, "b": {}}}), MissingStatisticsError,
         "base_fisher"),
        (dict(methods=["fisher_average"], statistics={"fisher": {"a": {}}}), MissingStatisticsError,
         r"exactly the tasks \['a', 'b'\]"),
        (dict(methods=["ties"], statistics={"fishers": {}}), MergeConfigError, "unknown statistics keys"),
        (dict(methods=["ties"], normalize_by={"a": 1.0}), MergeConfigError, "normalize_by"),
        (dict(methods=["ties"], normalize_by={"a": 1.0, "b": float("nan")}), MergeConfigError, "finite"),
        (dict(methods=["ties"], normalize_by={"val": {"a": 1.0, "b": 1.0}}), MergeConfigError, '"test"'),
        (dict(methods=["tsv"], weight_layout="rows"), MergeConfigError, "weight_layout must be"),
    ]
    for kw, err, match in cases:
        with pytest.raises(err, match=match):
            compare_merges(base, vecs, evaluate, progress=False, **kw)
    with pytest.raises(MergeConfigError, match="non-empty mapping"):
        compare_merges(base, {}, evaluate, progress=False)
    assert calls == []
    # a value the method refuses: the merge's error, named with the method and the setting
    with pytest.raises(MergeConfigError, match=r"ties at \{'density': 1.5\}.*\(0, 1\]"):
        compare_merges(base, vecs, evaluate, methods=["ties"], grids={"ties": {"density": [1.5]}}, progress=False)


@pytest.mark.parametrize("answer, match", [({"a": 1.0}, r"missing \['b'\]"),
                                           ({"a": 1.0, "b": 1.0, "c": 0.0}, r"unexpected \['c'\]"),
                                           ({"a": 1.0, "b": "high"}, "not a number"),
                                           ([1.0, 1.0], "must return")])
def test_evaluate_must_score_exactly_the_tasks(answer, match):
    base, vecs = _linear_setup()
    with pytest.raises(HfTaujpError, match=match):
        compare_merges(base, vecs, lambda m, s: answer, methods=["task_arithmetic"], progress=False)


def test_undefined_scores_are_never_chosen():
    base, vecs = _linear_setup()
    lam = iter([None, 2.0, 3.0, float("nan")])

    def evaluate(model, split):
        return {"a": next(lam) if split == "val" else 1.0, "b": 1.0}
    res = compare_merges(base, vecs, evaluate, methods=["task_arithmetic"],
                         grids={"task_arithmetic": {"lambda_": [0.1, 0.2, 0.3, 0.4]}}, progress=False)
    r = res.methods["task_arithmetic"]
    assert r["chosen"] == {"lambda_": 0.3} and r["curve"][0]["score"] is None and r["curve"][3]["val"]["a"] is None
    with pytest.raises(MergeConfigError, match="task_arithmetic: no defined score"):
        compare_merges(base, vecs, lambda m, s: {"a": None, "b": 1.0}, methods=["task_arithmetic"], progress=False)


def test_statistics_methods_take_their_statistics():
    base, vecs = _linear_setup()
    g = torch.Generator().manual_seed(5)
    fishers = {t: FisherStatistics({n: torch.rand(p.shape, generator=g) + 0.1 for n, p in base.named_parameters()},
                                   num_examples=10) for t in vecs}
    evaluate, _ = _distance_eval(base, vecs, {t: {"val": 0.4, "test": 0.5} for t in vecs})
    res = compare_merges(base, vecs, evaluate, methods=["fisher_average"], statistics={"fisher": fishers},
                         progress=False)
    r = res.methods["fisher_average"]
    assert r["chosen"] == {} and len(r["curve"]) == 1
    direct = merge(base, list(vecs.values()), "fisher_average", fishers=list(fishers.values()), progress=False)
    assert r["test"] == evaluate(direct, "test")


# ------------------------------------------------------------------------------ outputs
@pytest.fixture(scope="module")
def comparison():
    base, vecs = _linear_setup()
    evaluate, _ = _distance_eval(base, vecs, {"a": {"val": 0.3, "test": 0.5}, "b": {"val": 0.5, "test": 0.5}})
    return compare_merges(base, vecs, evaluate, methods=["task_arithmetic", "ties", "tsv", "model_stock"],
                          grids={"ties": {"density": [0.2, 0.5], "lambda_": [0.8, 1.0]}},
                          normalize_by={"a": 10.0, "b": 10.0}, progress=False)


def test_table_and_json(comparison):
    text = comparison.table()
    header = text.splitlines()[0]
    for col in ("method", "setting (by val)", "val abs", "test abs", "test norm", "merge s", "peak MiB"):
        assert col in header
    for name, r in comparison.methods.items():
        line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
        assert f"{r['test_mean']:.3f}" in line
    assert "density=" in text and "λ=" in text and "(defaults)" in text
    assert "a" in comparison.task_table().splitlines()[0]
    d = json.loads(json.dumps(comparison.to_dict(), allow_nan=False))
    assert d["format"] == "hf-taujp/merge-bench" and d["tasks"] == ["a", "b"]
    curve = d["methods"]["ties"]["curve"]  # every setting's validation scores: the curve
    assert [c["setting"] for c in curve] == [{"density": x, "lambda_": y} for x in (0.2, 0.5) for y in (0.8, 1.0)]
    assert all(set(c["val"]) == {"a", "b"} for c in curve)
    assert MergeComparison.from_dict(d).to_dict() == d


def test_plot_and_save(comparison, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    png = comparison.plot(tmp_path / "p.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "report"
    out.mkdir()
    (out / "results.json").write_text("{}")  # a recipe's own files stay
    paths = comparison.save(out)
    assert sorted(os.listdir(out)) == ["merge_bench.json", "merge_bench.md", "merge_bench.png", "results.json"]
    assert json.load(open(paths["json"]))["methods"].keys() == comparison.methods.keys()
    md = open(paths["markdown"]).read()
    assert comparison.table() in md and "validation score only" in md
    # nothing is written when a step fails
    import hf_taujp.evaluation.merge_bench as bench

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(bench, "atomic_write_text", boom)
    with pytest.raises(OSError, match="disk full"):
        comparison.save(tmp_path / "never")
    assert not (tmp_path / "never").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".never")]


# ------------------------------------------------------------------------------ a real tiny model
def _gpt2_bench():
    m = tiny_gpt2(**GPT2_MINI).eval()
    g = torch.Generator().manual_seed(1)
    vecs = {t: {n: 0.1 * torch.randn(p.shape, generator=g) for n, p in m.named_parameters()} for t in "xyz"}
    ids = {(t, s): torch.randint(0, GPT2_MINI["vocab_size"], (3, 6), generator=g)
           for t in vecs for s in ("val", "test")}
    with torch.no_grad():
        fine = {k: TaskVector(vecs[k[0]]).apply_to(m, 1.0)(ids[k]).logits for k in ids}

    def evaluate(model, split):  # closeness of the merged model's logits to task t's fine-tuned model, on t's inputs
        if not isinstance(model, torch.nn.Module):  # a state-dict base merges into a state dict
            sd, model = model, tiny_gpt2(**GPT2_MINI).eval()
            model.load_state_dict(sd)
        with torch.no_grad():
            return {t: float(torch.exp(-(model(ids[t, split]).logits - fine[t, split]).pow(2).mean())) for t in vecs}
    return m, vecs, evaluate


def test_tiny_gpt2_end_to_end():
    m, vecs, evaluate = _gpt2_bench()
    grids = {"task_arithmetic": {"lambda_": [0.3, 0.6, 1.0]}, "ties": {"density": [0.2, 0.5], "lambda_": [1.0]},
             "tsv": {"lambda_": [0.5, 1.0]}, "iso_cts": {"lambda_": [0.5, 1.0]}}
    res = compare_merges(m, vecs, evaluate, methods=list(grids), grids=grids, progress=False)
    for name, r in res.methods.items():
        assert len(r["curve"]) == math.prod(len(v) for v in grids[name].values())
        assert r["merge_seconds"] > 0 and 0 < r["test_mean"] <= 1
        # the reported test scores are those of a fresh merge of the chosen setting
        assert r["test"] == evaluate(merge(m, list(vecs.values()), name, progress=False, **r["chosen"]), "test")
        best = max(c["score"] for c in r["curve"])
        assert r["val_score"] == best
    assert "iso_cts" in res.table()
    # a state-dict base: iso_cts needs to be told the layout (GPT-2's Conv1D weights look like (out, in) ones)
    only = {"iso_cts": {"lambda_": [1.0]}}
    with pytest.raises(MergeConfigError, match="nothing says it"):
        compare_merges(m.state_dict(), vecs, evaluate, methods=["iso_cts"], grids=only, progress=False)
    layouts = {n: ("in_out" if ".h.0." in n and n.endswith("weight") and p.dim() == 2 else "out_in")
               for n, p in m.named_parameters() if p.dim() == 2}
    sd_res = compare_merges(m.state_dict(), vecs, evaluate, methods=["iso_cts"], grids=only, weight_layout=layouts,
                            progress=False)
    mod_res = compare_merges(m, vecs, evaluate, methods=["iso_cts"], grids=only, progress=False)
    assert sd_res.methods["iso_cts"]["test"] == pytest.approx(mod_res.methods["iso_cts"]["test"], rel=1e-5)


# ------------------------------------------------------------------------------ recipes: weight_layout
@pytest.fixture()
def bare_folders(tmp_path):
    """A base folder of weights without a config.json (no architecture to read layouts from) and 2 vectors."""
    from safetensors.torch import save_file

    m = tiny_gpt2(**GPT2_MINI)
    g = torch.Generator().manual_seed(2)
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({n: p.detach().contiguous() for n, p in m.state_dict().items() if n != "lm_head.weight"},
              str(bare / "model.safetensors"))
    dirs = []
    for k in range(2):
        TaskVector({n: 0.1 * torch.randn(p.shape, generator=g) for n, p in m.named_parameters()}).save_pretrained(
            tmp_path / f"tv{k}")
        dirs.append(str(tmp_path / f"tv{k}"))
    return str(bare), dirs, tmp_path


def _tensors(folder):
    from safetensors.torch import load_file

    return {k: v for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(folder, f)).items()}


def test_recipe_weight_layout(bare_folders):
    import yaml

    bare, dirs, tmp_path = bare_folders
    rec = {"base_model": bare, "method": "iso_cts", "vectors": dirs, "output_kind": "task_vector"}
    with pytest.raises(MergeConfigError, match="no config.json"):
        merge_from_config(rec, str(tmp_path / "o0"), progress=False)
    conv = {f"transformer.h.0.{k}.weight": "in_out" for k in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    for given in ("out_in", {**conv, "transformer.wte.weight": "out_in", "transformer.wpe.weight": "out_in"}):
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({**rec, "weight_layout": given}))
        assert load_recipe(str(tmp_path / "r.yaml"))["weight_layout"] == given
        tag = "str" if isinstance(given, str) else "map"
        out = merge_from_config(str(tmp_path / "r.yaml"), str(tmp_path / f"recipe-{tag}"), progress=False)
        want = merge_streaming(bare, dirs, str(tmp_path / f"direct-{tag}"), "iso_cts", weight_layout=given,
                               output_kind="task_vector", progress=False)
        got, ref = _tensors(out), _tensors(want)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    c_attn = list(conv)[0]  # the Conv1D weights were merged as their transposes: another result
    assert not torch.equal(_tensors(tmp_path / "recipe-str")[c_attn], _tensors(tmp_path / "recipe-map")[c_attn])
    # unknown values and methods whose result does not depend on the layout: refused when the recipe is read
    for bad in ("rows", {"transformer.wte.weight": "cols"}, ["out_in"]):
        with pytest.raises(MergeConfigError, match="weight_layout must be"):
            load_recipe({**rec, "weight_layout": bad})
    with pytest.raises(MergeConfigError, match="'task_arithmetic' takes no weight_layout"):
        load_recipe({**rec, "method": "task_arithmetic", "weight_layout": "out_in"})
    assert load_recipe({**rec, "weight_layout": None}).get("weight_layout") is None
    assert not (tmp_path / "o0").exists()


def test_cuda_measure_reads_the_allocator_peak(monkeypatch):
    """The CUDA branch (no GPU here): peak = max_memory_allocated − memory_allocated before, in MiB, after a reset."""
    import hf_taujp.evaluation.merge_bench as bench

    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: seen.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: seen.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 11 * 2**20)
    out, secs, peak = bench._measured(lambda: "merged", torch.device("cuda"))
    assert (out, peak) == ("merged", 8.0) and secs >= 0 and seen == ["sync", "reset", "sync"]
