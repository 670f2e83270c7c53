"""The CLIP vision recipe (hf_taujp.recipes.clip) on a tiny random CLIP, offline."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from hf_taujp import HfTaujpError, TaskVector
from hf_taujp.evaluation import _addition_protocol, evaluate_task_negation
from hf_taujp.linearize import linearize
from hf_taujp.recipes import clip as C
from hf_taujp.recipes import clip_recipe
from hf_taujp.recipes.runner import METHODS



@pytest.fixture(scope="module")
def tiny():
    return C.tiny_clip(image_size=28, patch_size=7, seed=0)


def _heads(clip, tok):
    return {"a": C.zero_shot_head(clip, tok, ["cat", "dog", "car"], ("a {c}.", "the {c}!")),
            "b": C.zero_shot_head(clip, tok, ["x", "y"], ("{c}",))}


def test_zero_shot_head_is_the_normalised_mean_of_template_embeddings(tiny):
    clip, tok, _ = tiny
    names, templates = ["cat", "dog", "car"], ("a photo of a {c}.", "the {c}!", "{c}")
    head = C.zero_shot_head(clip, tok, names, templates)
    m64 = copy.deepcopy(clip).double()
    rows = []
    with torch.no_grad():
        for c in names:  # one text at a time, no padding, float64
            embs = []
            for t in templates:
                ids = tok(t.replace("{c}", c), return_tensors="pt")["input_ids"]
                pooled = m64.text_model(input_ids=ids).pooler_output
                e = m64.text_projection(pooled)[0]
                embs.append(e / e.norm())
            h = torch.stack(embs).mean(0)
            rows.append(h / h.norm())
        want = m64.logit_scale.exp() * torch.stack(rows)
    assert head.shape == (3, clip.config.projection_dim)
    torch.testing.assert_close(head.double(), want, atol=1e-5, rtol=1e-5)


def test_classifier_logits_are_head_times_normalised_embedding(tiny):
    clip, tok, _ = tiny
    heads = _heads(clip, tok)
    clf = C.ZeroShotCLIP(C.image_encoder(clip), heads).eval()
    x = torch.randn(4, 3, 28, 28)
    out = clf(pixel_values=x, task_ids=torch.tensor([0, 1, 1, 0]), labels=torch.tensor([2, 1, 0, 0]))
    f = clip.get_image_features(pixel_values=x)
    f = f if isinstance(f, torch.Tensor) else f.pooler_output
    f = f / f.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out.logits[0], f[0] @ heads["a"].T)
    torch.testing.assert_close(out.logits[1, :2], f[1] @ heads["b"].T)
    assert out.logits[1, 2] == torch.finfo(out.logits.dtype).min  # task b has 2 classes
    assert not any(p.requires_grad for p in [clf.heads]) and "heads" in dict(clf.named_buffers())


def _fd_penalty(encoder, tau, x, h=1e-4):
    """mean_b ‖(f(θ0 + hτ) − f(θ0 − hτ)) / 2h‖ on image_embeds, float64."""
    enc = copy.deepcopy(encoder).double()
    outs = []
    with torch.no_grad():
        for s in (1, -1):
            e2 = copy.deepcopy(enc)
            p2 = dict(e2.named_parameters())
            for n, t in tau.items():
                p2[n].add_(s * h * t.double())
            outs.append(e2(pixel_values=x.double()).image_embeds)
    return ((outs[0] - outs[1]) / (2 * h)).norm(dim=-1).mean().item()


@pytest.mark.parametrize("linear", [True, False])
def test_penalty_on_image_embeddings_equals_finite_differences(tiny, tmp_path, linear):
    from hf_taujp.trainer import TauJpConfig, TauJpTrainer

    clip, tok, proc = tiny
    enc = C.image_encoder(copy.deepcopy(clip))
    clf = C.ZeroShotCLIP(enc, _heads(clip, tok)).eval()
    tau = {n: 0.05 * torch.randn_like(p) for n, p in enc.named_parameters()}
    rows = [{"image": np.random.randint(0, 255, (28, 28), dtype=np.uint8), "labels": 1, "task_ids": 0} for _ in range(4)]
    args = TauJpConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                       use_cpu=True, remove_unused_columns=False, taujp_lambda=0.1, taujp_output="image_embeds")
    if linear:
        clf.image_encoder = linearize(enc, parameter_names=list(tau))
        clf.image_encoder.set_tangents(tau)
    else:
        clf.requires_grad_(False)
        enc.requires_grad_(True)
    collator = C.ImageCollator(proc)
    trainer = TauJpTrainer(model=clf, args=args, train_dataset=rows, data_collator=collator,
                           regularization_datasets={"other": rows})
    if not linear:  # θ0 was snapshot by the trainer; now move the weights to θ0 + τ
        with torch.no_grad():
            for n, p in enc.named_parameters():
                p.add_(tau[n])
    batch = collator(rows)
    got = trainer.taujp_penalty_on(clf, {"pixel_values": batch["pixel_values"], "task_ids": batch["task_ids"]})
    if not linear:
        with torch.no_grad():
            for n, p in enc.named_parameters():
                p.sub_(tau[n])
    want = _fd_penalty(enc, tau, batch["pixel_values"])
    assert abs(got.item() - want) <= 1e-3 * want


def test_normalized_accuracy_and_best_alpha_on_fixed_accuracies():
    acc = {0.0: {"a": 0.2, "b": 0.4}, 0.5: {"a": 0.6, "b": 0.6}, 1.0: {"a": 0.5, "b": 0.3}}
    single = {s: {"a": 0.8, "b": 0.6} for s in ("val", "test")}
    r = _addition_protocol(["a", "b"], single, [0.0, 0.5, 1.0], True, lambda a, t, s, _m: acc[a][t])
    # by hand: α = 0.5 → (0.6/0.8 + 0.6/0.6)/2 = 0.875; α = 1 → (0.5/0.8 + 0.3/0.6)/2 = 0.5625
    assert r["best_alpha"] == 0.5
    assert r["best"]["avg_norm"] == pytest.approx(0.875)
    assert r["one_shot"]["avg_norm"] == pytest.approx(0.5625)
    assert r["one_shot"]["avg_abs"] == pytest.approx(0.4)


def test_negation_rule_on_fixed_accuracies():
    """α minimising target accuracy subject to control ≥ 0.95 × base control (Ilharco et al. 2023)."""
    base = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        base.weight.zero_()
    tv = TaskVector({"weight": -torch.ones(1, 1)}, kind="nonlinear")  # θ0 − α·τ has weight α
    target = {0.0: 0.9, 0.25: 0.6, 0.5: 0.3, 0.75: 0.1, 1.0: 0.05}
    control = {0.0: 0.8, 0.25: 0.79, 0.5: 0.77, 0.75: 0.70, 1.0: 0.5}  # 0.95 × 0.8 = 0.76: α ≤ 0.5 allowed

    def eval_fn(model, which, split):
        a = round(float(model.weight.detach()), 2)
        return (target if which == "target" else control)[a]

    r = evaluate_task_negation(base, tv, eval_fn, alphas=sorted(target))
    assert r["alpha"] == 0.5 and r["target"] == 0.3 and r["control"] == 0.77


def test_linear_addition_matches_apply_to(tiny):
    """The recipe's one-jvp evaluation of θ0 + α Σ τ (linear) equals TaskVector.apply_to(linear=True)."""
    clip, tok, _ = tiny
    enc = C.image_encoder(copy.deepcopy(clip))
    clf = C.ZeroShotCLIP(enc, _heads(clip, tok)).eval()
    vecs = {t: TaskVector({n: 0.3 * torch.randn_like(p) for n, p in enc.named_parameters()}, kind="linear")
            for t in ("a", "b")}
    pix = {(t, s): torch.randn(6, 3, 28, 28) for t in ("a", "b") for s in ("val", "test")}
    gold = {(t, s): torch.randint(0, 2, (6,)) for t in ("a", "b") for s in ("val", "test")}
    tid = {"a": 0, "b": 1}
    emb0 = {k: C._embed(enc, v, 4) for k, v in pix.items()}

    def acc(t, s, emb):
        return C._accuracy(clf, tid[t], emb, gold[(t, s)])

    res = C._evaluate_addition(enc, METHODS["linear"], vecs, ["a", "b"], pix, emb0, acc, [0.0, 0.5, 1.0], (), 4)
    merged = (vecs["a"] + vecs["b"]).apply_to(enc, 1.0, linear=True)
    for t in ("a", "b"):
        with torch.no_grad():
            e = merged(pixel_values=pix[(t, "test")]).image_embeds
        assert res["one_shot"]["abs"][t] == pytest.approx(acc(t, "test", e))
        with torch.no_grad():
            e1 = vecs[t].apply_to(enc, 1.0, linear=True)(pixel_values=pix[(t, "test")]).image_embeds
        assert res["single"]["test"][t] == pytest.approx(acc(t, "test", e1))


# ------------------------------------------------------------------------------------- bad input
def test_unknown_task_and_bad_control(tmp_path):
    from clip_offline import offline_data_dir

    data = offline_data_dir(tmp_path, held_out=None)  # mnist/, fashion_mnist/ only
    with pytest.raises(HfTaujpError, match="unknown task"):
        C.run_clip(C.TINY, "mnist,imagenet9000", data_dir=data)
    with pytest.raises(HfTaujpError, match="at least 2"):
        C.run_clip(C.TINY, "mnist", data_dir=data)
    with pytest.raises(HfTaujpError, match="no offline data"):
        C.load_vision_task(C.VISION_TASKS["cars"], data)
    with pytest.raises(HfTaujpError, match="global batch"):
        C.run_clip(C.TINY, "mnist,fashion_mnist", data_dir=data, negation_control="none", batch_size=0)


def test_negation_control_is_held_out_of_the_targets(tmp_path):
    from clip_offline import offline_data_dir

    tasks = ["mnist", "fashion_mnist"]
    assert C.negation_control_task(None, tasks, C.HUB) == C.IMAGENET  # online: ImageNet, as the authors
    targets_only = offline_data_dir(tmp_path / "targets", held_out=None)  # like the data kit: the two targets only
    assert C.negation_control_task("none", tasks, targets_only) is None
    with_control = offline_data_dir(tmp_path)  # + a fake "svhn" folder
    assert C.negation_control_task(None, tasks, with_control) == "svhn"  # offline: the held-out task with data
    with pytest.raises(HfTaujpError, match="also a target task"):
        C.negation_control_task("fashion_mnist", tasks, with_control)
    with pytest.raises(HfTaujpError, match="also a target task"):
        C.negation_control_task(None, ["mnist", "imagenet"], C.HUB)
    with pytest.raises(HfTaujpError, match="unknown task"):
        C.negation_control_task("svhn9", tasks, with_control)
    with pytest.raises(HfTaujpError, match="'cars' has no data"):
        C.negation_control_task("cars", tasks, with_control)
    # only the two targets: no held-out task, and run_clip says so before loading anything
    with pytest.raises(HfTaujpError, match="held out of the targets"):
        C.run_clip(C.TINY, tasks, data_dir=targets_only)
    with pytest.raises(HfTaujpError, match="also a target task"):
        C.run_clip(C.TINY, tasks, data_dir=targets_only, negation_control="fashion_mnist")


def _fake_hub(monkeypatch, sets):
    """datasets.load_dataset → the DatasetDicts in `sets` (by Hub id); records the calls; no network."""
    import datasets

    calls = []

    def load_dataset(path, name=None, *a, **k):
        calls.append((path, name))
        if path not in sets:
            raise AssertionError(f"unexpected dataset {path}")
        return sets[path]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def _image_set(n, classes, split_names=("train", "test"), mode="L", size=(28, 28), seed=0):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.DatasetDict({s: datasets.Dataset.from_dict(
        {"image": [Image.fromarray(rng.integers(0, 256, (*size[::-1], 3) if mode == "RGB" else size[::-1],
                                                dtype=np.uint8), mode) for _ in range(n)],
         "label": [int(v) for v in rng.integers(0, classes, n)]}, features=feats) for s in split_names})


def test_imagenet_lists_are_openai_clip_s():
    from hf_taujp.recipes.imagenet_classes import IMAGENET_CLASSNAMES, IMAGENET_TEMPLATES

    task = C.VISION_TASKS[C.IMAGENET]
    assert task.hub_id == "ILSVRC/imagenet-1k" and task.test_split == "validation"
    assert task.classnames == IMAGENET_CLASSNAMES and task.templates == IMAGENET_TEMPLATES
    assert len(IMAGENET_CLASSNAMES) == 1000 and len(IMAGENET_TEMPLATES) == 80
    assert (IMAGENET_CLASSNAMES[0], IMAGENET_CLASSNAMES[1], IMAGENET_CLASSNAMES[999]) == ("tench", "goldfish", "toilet paper")
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {c}." and all("{c}" in t for t in IMAGENET_TEMPLATES)


def test_online_run_negates_against_imagenet(tmp_path, monkeypatch):
    """The online code path (`data_dir="hub"`) on small local fake datasets: the default control is ImageNet,
    loaded by its Hub id with its validation split as the test split, never trained, and every target is negated.
    (The 1000 × 80 head costs ~13 s on the tiny CLIP here: the control's class list is cut to 7, its labels < 7.)"""
    import dataclasses

    imagenet = C.VISION_TASKS[C.IMAGENET]
    monkeypatch.setitem(C.VISION_TASKS, C.IMAGENET, dataclasses.replace(
        imagenet, classnames=imagenet.classnames[:7], templates=imagenet.templates[:3]))
    calls = _fake_hub(monkeypatch, {
        "ylecun/mnist": _image_set(24, 10, seed=1),
        "zalando-datasets/fashion_mnist": _image_set(24, 10, seed=2),
        "ILSVRC/imagenet-1k": _image_set(12, 7, ("train", "validation", "test"), mode="RGB", size=(40, 30), seed=3)})
    out = str(tmp_path / "run")
    r = C.run_clip(C.TINY, "mnist,fashion_mnist", data_dir=C.HUB, methods="linear", output_dir=out, steps=1,
                   batch_size=4, warmup_steps=0, alphas=(0.0, 1.0), shape_alphas=(), eval_batch_size=64,
                   matrix_examples=4)
    assert ("ILSVRC/imagenet-1k", None) in calls
    ctrl = r["negation_control"]
    assert ctrl["name"] == "imagenet" and ctrl["classnames"] == list(imagenet.classnames[:7])
    assert r["sizes"]["imagenet"] == {"train": 0, "val": 3, "test": 12, "train_used": 0}  # never trained
    assert "imagenet" not in r["tasks"] and sorted(r["negation"]["linear FT"]) == ["fashion_mnist", "mnist"]
    for neg in r["negation"]["linear FT"].values():
        assert neg["base"]["test"]["control"] == pytest.approx(ctrl["zero_shot"])
    heads = json.load(open(os.path.join(out, "zero_shot_heads.json")))
    assert heads["imagenet"]["hub_id"] == "ILSVRC/imagenet-1k" and len(heads["imagenet"]["templates"]) == 3
    assert sorted(os.listdir(os.path.join(out, "task_vectors", "linear"))) == ["fashion_mnist", "mnist"]


def _no_model(monkeypatch):
    def load_clip(*a, **k):
        raise AssertionError("the model was loaded: the bad input was not caught before training")

    monkeypatch.setattr(clip_recipe, "load_clip", load_clip)  # where ClipRecipe loads the model


def test_bad_data_fails_before_the_model_loads(tmp_path, monkeypatch):
    import datasets
    from clip_offline import offline_data_dir, write_fake_task

    _no_model(monkeypatch)
    data = offline_data_dir(tmp_path, held_out=None)
    # offline: channels-first images, labels beyond the class names, no folder for the control
    write_fake_task(os.path.join(data, "svhn"), 20, 6, shape=(3, 28, 28))
    with pytest.raises(HfTaujpError, match=r"images of shape \(20, 3, 28, 28\)"):
        C.run_clip(C.TINY, "mnist,svhn", data_dir=data, negation_control="none")
    write_fake_task(os.path.join(data, "svhn"), 20, 6, classes=12)
    with pytest.raises(HfTaujpError, match="outside the 10 class names"):
        C.run_clip(C.TINY, "mnist,svhn", data_dir=data, negation_control="none")
    with pytest.raises(HfTaujpError, match="no folder"):
        C.run_clip(C.TINY, "mnist,fashion_mnist", data_dir=data, negation_control="gtsrb")
    # online: a dataset without the expected split; RGBA arrays (4 channels); empty image
    bad = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": [np.zeros((4, 4), np.uint8)] * 8,
                                                                     "label": [0] * 8})})
    _fake_hub(monkeypatch, {"ylecun/mnist": _image_set(24, 10), "zalando-datasets/fashion_mnist": bad})
    with pytest.raises(HfTaujpError, match="has no split 'test'"):
        C.run_clip(C.TINY, "mnist,fashion_mnist", data_dir=C.HUB, negation_control="none")
    for image, problem in ((np.zeros((8, 8, 4), np.uint8), r"\(8, 8, 4\)"), (np.zeros((0, 8), np.uint8), r"\(0,\)")):
        rgba = datasets.DatasetDict({s: datasets.Dataset.from_dict({"image": [image] * 8, "label": [1] * 8})
                                     for s in ("train", "test")})
        _fake_hub(monkeypatch, {"ylecun/mnist": _image_set(24, 10), "zalando-datasets/fashion_mnist": rgba})
        with pytest.raises(HfTaujpError, match="task 'fashion_mnist', .* images, row 0: image of shape " + problem):
            C.run_clip(C.TINY, "mnist,fashion_mnist", data_dir=C.HUB, negation_control="none")


def test_class_names_missing(tiny, monkeypatch):
    clip, tok, _ = tiny
    with pytest.raises(HfTaujpError, match="class names missing"):
        C.zero_shot_head(clip, tok, [], ("a {c}",))
    with pytest.raises(HfTaujpError, match="templates"):
        C.zero_shot_head(clip, tok, ["x"], ("no slot",))
    import datasets

    ds = datasets.DatasetDict({s: datasets.Dataset.from_dict({"image": [np.zeros((4, 4), np.uint8)], "label": [0]})
                               for s in ("train", "test")})  # label is a plain int column: no ClassLabel names
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: ds)
    with pytest.raises(HfTaujpError, match="class names missing for task 'dtd'"):
        C.load_vision_task(C.VISION_TASKS["dtd"], C.HUB)


def test_dataset_without_the_expected_split(monkeypatch):
    import datasets

    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": [np.zeros((4, 4), np.uint8)], "label": [0]})})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: ds)
    with pytest.raises(HfTaujpError, match="has no split 'test'"):
        C.load_vision_task(C.VISION_TASKS["mnist"], C.HUB)


def test_hub_dataset_class_names_and_subsample(monkeypatch):
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["banded", "bubbly_x"])})
    imgs = [np.full((5, 5, 3), i, np.uint8) for i in range(10)]
    ds = datasets.DatasetDict({s: datasets.Dataset.from_dict({"image": imgs, "label": [i % 2 for i in range(10)]},
                                                             features=feats) for s in ("train", "test")})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: ds)
    data = C.load_vision_task(C.VISION_TASKS["dtd"], C.HUB, max_train=4, max_test=3, seed=1)
    assert data["classnames"] == ["banded", "bubbly x"]
    assert len(data["train"]) == 4 and len(data["test"]) == 3
    for im, y in data["train"]:  # each image still carries its own label
        assert y == int(np.asarray(im)[0, 0, 0]) % 2


def test_image_channels_and_sizes(tiny):
    from PIL import Image

    _, _, proc = tiny
    col = C.ImageCollator(proc)
    imgs = [np.zeros((40, 33), np.uint8), np.zeros((28, 28, 1), np.uint8), np.zeros((50, 60, 3), np.uint8),
            Image.new("L", (20, 20)), Image.new("RGBA", (31, 28))]
    out = col([{"image": im, "labels": 0, "task_ids": 0} for im in imgs])
    assert out["pixel_values"].shape == (5, 3, 28, 28)  # grayscale → RGB, any size → the processor's crop
    for bad in (np.zeros((28, 28, 4), np.uint8), np.zeros((3, 28, 28), np.uint8), np.zeros((2, 28, 28, 3), np.uint8)):
        with pytest.raises(HfTaujpError, match="image of shape"):
            col([{"image": bad}])


def test_read_idx_rejects_other_files(tmp_path):
    p = tmp_path / "x.gz"
    import gzip

    with gzip.open(p, "wb") as f:
        f.write(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(HfTaujpError, match="not an IDX uint8"):
        C.read_idx(str(p))
    with pytest.raises(HfTaujpError, match="not found"):
        C.read_idx(str(tmp_path / "missing.gz"))


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("kit", ["stand-in", pytest.param("real", marks=pytest.mark.shared_data("mnist", "fashion_mnist"))])
def test_recipe_end_to_end_tiny_clip(tmp_path, kit):
    """On MNIST-shaped random stand-ins (everywhere) and on the real MNIST / Fashion-MNIST files of the data kit."""
    from clip_offline import offline_data_dir

    # + "svhn": fake RGB 32 × 32 images, the held-out control
    data = offline_data_dir(tmp_path, SHARED_DATA if kit == "real" else None)
    out = str(tmp_path / "run")
    r = C.run_clip(C.TINY, "mnist,fashion_mnist", data_dir=data, methods="nonlinear,linear,taujp",
                   output_dir=out, steps=2, batch_size=8, learning_rate=1e-3, warmup_steps=1, max_train=40, max_test=16,
                   alphas=(0.0, 0.5, 1.0), shape_alphas=(1.5,), eval_batch_size=64, matrix_examples=8)
    for f in ("results.json", "results.md", "alpha_curves.png", "zero_shot_heads.safetensors", "zero_shot_heads.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["taujp"]["output"] == "image_embeds" and saved["taujp"]["reg_batch_size"] == 1
    assert saved["sizes"]["mnist"]["train"] + saved["sizes"]["mnist"]["val"] == 40
    heads = json.load(open(os.path.join(out, "zero_shot_heads.json")))
    assert heads["fashion_mnist"]["classnames"][-1] == "ankle boot" and heads["mnist"]["templates"]
    assert heads["svhn"]["templates"] == list(C.VISION_TASKS["svhn"].templates)  # the control's head is saved too
    from safetensors.torch import load_file

    clip, tok, _ = C.tiny_clip(seed=0)
    torch.testing.assert_close(load_file(os.path.join(out, "zero_shot_heads.safetensors"))["mnist"],
                               C.zero_shot_head(clip, tok, heads["mnist"]["classnames"], heads["mnist"]["templates"]))
    from transformers import CLIPVisionModelWithProjection

    clip.save_pretrained(str(tmp_path / "clip"))  # the vectors apply to the image tower loaded from the CLIP folder
    enc = CLIPVisionModelWithProjection.from_pretrained(str(tmp_path / "clip"))
    names = {n for n, _ in enc.named_parameters()}
    for m, kind in (("nonlinear", "nonlinear"), ("linear", "linear"), ("taujp", "linear")):
        for t in ("mnist", "fashion_mnist"):
            tv = TaskVector.from_pretrained(os.path.join(out, "task_vectors", m, t))
            assert tv.kind == kind and set(tv.keys()) == names and tv.task == t
            tv.check_compatible(enc)  # same base fingerprint
    for label, res in r["methods"].items():
        for key in ("one_shot", "best"):
            for t in ("mnist", "fashion_mnist"):
                single = res["single"]["test"][t]
                want = res[key]["abs"][t] / single if single > 0 else None
                assert res[key]["norm"][t] == pytest.approx(want)
        assert res["best_alpha"] in (0.0, 0.5, 1.0)
        assert res["one_shot"]["alpha"] == 1.0 and len(res["taujp_matrix"]) == 2
        assert sorted(r["negation"][label]) == ["fashion_mnist", "mnist"]  # every target; the control is held out
        for neg in r["negation"][label].values():
            assert neg["alpha"] in (0.0, 0.5, 1.0)
            ok = [c for c in neg["curve"] if c["control"] >= 0.95 * neg["base"]["val"]["control"]]
            assert neg["alpha"] in [c["alpha"] for c in ok if c["target"] == min(x["target"] for x in ok)]
            assert neg["base"]["test"]["control"] == pytest.approx(r["negation_control"]["zero_shot"])
    assert r["negation_control"]["name"] == "svhn" and "svhn" not in r["tasks"]
    assert not os.path.exists(os.path.join(out, "task_vectors", "linear", "svhn"))  # never trained
    assert r["table"][0]["method"] == "zero-shot θ0" and "norm (α=1)" in r["table"][0]


def test_cli_entry():
    from hf_taujp.cli import COMMANDS

    assert COMMANDS["clip"][0] == "hf_taujp.recipes.clip:main"
    with pytest.raises(SystemExit):
        C.main(["--help"])


def test_compare_merges_in_the_clip_recipe(tmp_path, monkeypatch):
    """`--compare-merges` on the linear vectors: task arithmetic at λ = 1 scores exactly the recipe's α = 1
    addition on validation (the same accuracy of the same merged tangent), and the comparison is saved."""
    _fake_hub(monkeypatch, {"ylecun/mnist": _image_set(24, 10, seed=1),
                            "zalando-datasets/fashion_mnist": _image_set(24, 10, seed=2)})
    out = str(tmp_path / "run")
    r = C.run_clip(C.TINY, "mnist,fashion_mnist", data_dir=C.HUB, methods="linear", output_dir=out, steps=1,
                   batch_size=4, warmup_steps=0, alphas=(0.0, 1.0), shape_alphas=(), eval_batch_size=64,
                   matrix_examples=4, negation_control="none", compare_merges="task_arithmetic,iso_c",
                   compare_sets="linear")
    mb = r["merge_bench"]["linear FT"]["methods"]
    assert set(mb) == {"task_arithmetic", "iso_c"}
    at_1 = next(c for c in mb["task_arithmetic"]["curve"] if c["setting"] == {"lambda_": 1.0})
    assert at_1["val_mean"] == pytest.approx(next(c["avg_abs"] for c in r["methods"]["linear FT"]["curve"]
                                                  if c["alpha"] == 1.0))
    assert os.path.isfile(os.path.join(out, "merge_bench", "linear", "merge_bench.json"))
    with pytest.raises(HfTaujpError, match="compare_sets"):
        C.run_clip(C.TINY, "mnist,fashion_mnist", data_dir=C.HUB, methods="linear", compare_merges="tsv",
                   compare_sets="taujp", output_dir=str(tmp_path / "o"))


def test_statistics_merges_in_the_clip_recipe(tmp_path, monkeypatch):
    """`--merge-methods` (issue 25): the non-linear vectors merged by fisher_average / gradient_matching / regmean
    with each task's Fisher (its classifier's logits w.r.t. the image encoder) and Grams at θ0 + τ_t, the base
    Fisher at θ0; reported beside task addition, statistics saved keyed like the task vectors."""
    from hf_taujp.merging.statistics import FisherStatistics, GramStatistics

    merges = ("fisher_average", "gradient_matching", "regmean")
    _fake_hub(monkeypatch, {"ylecun/mnist": _image_set(24, 10, seed=1),
                            "zalando-datasets/fashion_mnist": _image_set(24, 10, seed=2)})
    out = tmp_path / "run"
    r = C.run_clip(C.TINY, "mnist,fashion_mnist", data_dir=C.HUB, methods="nonlinear", output_dir=str(out), steps=1,
                   batch_size=4, warmup_steps=0, learning_rate=1e-3, alphas=(0.0, 1.0), shape_alphas=(),
                   eval_batch_size=64, matrix_examples=4, negation_control="none", merge_methods=",".join(merges),
                   fisher_examples=3, fisher_samples=2)
    assert sorted(r["merges"]) == sorted(f"non-linear FT · {m}" for m in merges)
    method = r["methods"]["non-linear FT"]
    at0 = method["curve"][0]
    assert at0["alpha"] == 0.0
    for key, res in r["merges"].items():
        assert res["single"] == method["single"]
        c0 = res["curve"][0]  # α = 0 is θ0, the zero-shot model, for every merge
        assert c0["alpha"] == 0.0 and c0["abs"] == pytest.approx(at0["abs"])
        if res["best_alpha"] == 0.0:
            assert res["best"]["abs"] == pytest.approx(r["zero_shot"])
    assert [row["method"] for row in r["table"]][2:] == [f"non-linear FT · {m}" for m in merges]
    gm = r["merges"]["non-linear FT · gradient_matching"]["merge"]
    assert gm["s_t"] == [4, 4] and gm["s0"] == 4.0 and r["statistics"]["s0_default"]
    st = out / "statistics"
    for t in ("mnist", "fashion_mnist"):
        tv = TaskVector.from_pretrained(str(out / "task_vectors" / "nonlinear" / t))
        f = FisherStatistics.from_pretrained(str(st), subfolder=f"fisher/nonlinear/{t}")
        assert set(f.tensors) == set(tv.keys()) and f.num_examples == 6 and f.task == t  # 3 examples × 2 samples
        assert f.base_fingerprint == tv.base_fingerprint and f.extra["at"] == "θ0 + τ_t"
        assert float(sum(v.sum() for v in f.tensors.values())) > 0
        g = GramStatistics.from_pretrained(str(st / "gram" / "nonlinear" / t))
        assert g.num_examples == 3 and g.tensors and set(g.tensors) <= set(tv.keys())
    h0 = FisherStatistics.from_pretrained(str(st / "fisher" / "base"))
    assert h0.num_examples == 12 and h0.extra["at"] == "θ0"
    assert "non-linear FT · regmean" in (out / "results.md").read_text()
    with pytest.raises(HfTaujpError, match="non-linear"):  # checked before any data or model is loaded
        C.run_clip(C.TINY, "mnist,fashion_mnist", data_dir=C.HUB, methods="linear", merge_methods="regmean",
                   output_dir=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def _kfac_penalty_of(tv, others):
    """R_KFAC of a saved encoder vector under saved factors of the classifier's ``image_encoder.*`` layers."""
    from hf_taujp.trainer import aggregate_kfac, kfac_penalty
    from hf_taujp.trainer.tangents import LayerDelta

    terms = aggregate_kfac(others, dtype=torch.float64)
    deltas = {}
    for p in terms:
        w = tv[p.removeprefix("image_encoder.") + ".weight"].double()
        bias = p.removeprefix("image_encoder.") + ".bias"
        b = tv[bias] if bias in tv else None
        deltas[p] = LayerDelta(w.shape[0], w.shape[1], weight=w, bias=None if b is None else b.double())
    return float(kfac_penalty(deltas, terms))


def test_kfac_methods_in_the_clip_recipe(tmp_path, monkeypatch):
    """`--methods kfac` (issue 23): each task's KFAC factors of the image encoder's Linear layers at θ0 (f =
    image_embeds, Gaussian probe), saved under curvature/<task>; each task trained against the other's. λ = 0
    reproduces linear FT exactly; non-linear FT + KFAC at a large λ lowers the vector's penalty under the other
    task's saved factors (recomputed here from the saved files) against plain non-linear FT."""
    from hf_taujp.trainer import KFACStatistics

    _fake_hub(monkeypatch, {"ylecun/mnist": _image_set(24, 10, seed=1),
                            "zalando-datasets/fashion_mnist": _image_set(24, 10, seed=2)})
    kw = dict(data_dir=C.HUB, steps=4, batch_size=4, warmup_steps=0, learning_rate=1e-3, alphas=(0.0, 1.0),
              shape_alphas=(), eval_batch_size=64, matrix_examples=4, negation_control="none", kfac_examples=8)
    out = tmp_path / "a"
    r = C.run_clip(C.TINY, "mnist,fashion_mnist", methods="linear,kfac", output_dir=str(out), kfac_lambda=0.0, **kw)
    assert set(r["methods"]) == {"linear FT", "linear FT + KFAC"} and r["curvature"]["probe"] == "gaussian"
    for t, o in (("mnist", "fashion_mnist"), ("fashion_mnist", "mnist")):
        st = KFACStatistics.from_pretrained(str(out / "curvature" / t))
        assert st.task == t and st.num_examples == 8 and all(p.startswith("image_encoder.") for p in st.layers)
        lin = TaskVector.from_pretrained(str(out / "task_vectors" / "linear" / t))
        zero = TaskVector.from_pretrained(str(out / "task_vectors" / "kfac" / t))
        assert zero.training["curvature_tasks"] == [o]
        for k in lin:
            torch.testing.assert_close(zero[k], lin[k], rtol=1e-5, atol=1e-7)
    out = tmp_path / "b"
    C.run_clip(C.TINY, "mnist,fashion_mnist", methods="nonlinear,nonlinear+kfac", output_dir=str(out),
               kfac_lambda=1e4, **kw)
    for t, o in (("mnist", "fashion_mnist"), ("fashion_mnist", "mnist")):
        other = [KFACStatistics.from_pretrained(str(out / "curvature" / o))]
        plain = TaskVector.from_pretrained(str(out / "task_vectors" / "nonlinear" / t))
        reg = TaskVector.from_pretrained(str(out / "task_vectors" / "nonlinear_kfac" / t))
        assert _kfac_penalty_of(reg, other) < 0.5 * _kfac_penalty_of(plain, other)
    with pytest.raises(HfTaujpError, match="one kfac_lambda"):
        C.run_clip(C.TINY, "mnist,fashion_mnist", methods="kfac", kfac_lambda=[1.0, 2.0], output_dir=str(tmp_path / "o"))
