"""The statistics estimators read the batches the recipes' forward reads (issue 25).

- The diagonal Fisher on ``inputs_embeds`` batches (what the frozen-prefix cache gives) equals the Fisher on
  ``input_ids`` of the same rows, and both equal a per-example autograd loop written here: for each example
  alone (no padding), log p(y | x) summed over its answer tokens, its gradient, squared, averaged (float64).
- The RegMean Gram on ``inputs_embeds`` equals the Gram on ``input_ids`` and the Gram of the unpadded rows
  taken one by one.
- A model with learned absolute positions (GPT-2) on a left-padded batch without ``position_ids`` gets the
  positions of its real tokens (cumsum of the mask − 1): its statistics equal the unpadded rows'. A rotary
  model (Llama) is left as it is: relative positions are kept on left-padded rows.
"""
import pytest
import torch

from hf_taujp.errors import HfTaujpError
from hf_taujp.merging import estimate_fisher, estimate_gram
from hf_taujp.merging.regmean import linear_layers
from hf_taujp.merging.statistics import position_ids_from_mask, uses_absolute_positions, with_position_ids
from tests.tiny_models import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

V = 20
GPT2_CFG = dict(n_layer=1, n_embd=8, n_head=2, vocab_size=V, n_positions=16, attn_implementation="eager",
                bos_token_id=0, eos_token_id=0, pad_token_id=0)
LLAMA_CFG = dict(vocab_size=V, num_hidden_layers=1, pad_token_id=0)
INPUT_TABLE = {"gpt2": "transformer.wte.weight", "llama": "model.embed_tokens.weight"}


def _model(kind, seed=0):
    m = tiny_gpt2(seed=seed, **GPT2_CFG) if kind == "gpt2" else tiny_llama(seed=seed, **LLAMA_CFG)
    return m.double().eval()


def _rows(seed=0):
    """Four prompt + answer rows of different lengths: (tokens, labels with -100 on the prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for prompt, answer in ((5, 1), (3, 2), (6, 1), (2, 2)):
        ids = torch.randint(1, V, (prompt + answer,), generator=g)
        out.append((ids, torch.cat([torch.full((prompt,), -100), ids[prompt:]])))
    return out


def _left_padded(rows, positions=True):
    """The rows left-padded (pad id 0) as the recipes' collator pads them: mask, labels -100 on the padding, and
    (``positions``) position ids counted from each row's first real token."""
    L = max(len(x) for x, _ in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    labels = torch.full((len(rows), L), -100)
    for i, (x, y) in enumerate(rows):
        ids[i, L - len(x):], mask[i, L - len(x):], labels[i, L - len(x):] = x, 1, y
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if positions:
        batch["position_ids"] = position_ids_from_mask(mask)
    return batch


def _as_embeds(model, batch):
    out = {k: v for k, v in batch.items() if k != "input_ids"}
    with torch.no_grad():
        out["inputs_embeds"] = model.get_input_embeddings()(batch["input_ids"])
    return out


def _loop_fisher(model, rows, names):
    """The slow, obvious Fisher: each example alone (unpadded), log p(answer | prompt) = Σ over its answer
    tokens of log softmax(logits at j)[token j + 1], autograd gradient, squared, mean over the examples."""
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n]) for n in names}
    for x, y in rows:
        logp = torch.log_softmax(model(input_ids=x[None]).logits[0, :-1], -1)
        nxt = y[1:]
        scored = nxt != -100
        ll = logp[scored].gather(-1, nxt[scored, None]).sum()
        grads = torch.autograd.grad(ll, [params[n] for n in names], allow_unused=True)
        for n, gr in zip(names, grads):
            if gr is not None:
                sums[n] += gr ** 2
    return {n: s / len(rows) for n, s in sums.items()}


def _loop_gram(model, rows):
    """The Gram of every Linear / Conv1D input over the unpadded rows taken one by one: Σ x xᵀ / (rows)."""
    layers = linear_layers(model)
    acc = {n: 0 for n in layers}
    count = {n: 0 for n in layers}
    handles = []
    for n, (mod, _) in layers.items():
        def hook(_m, args, n=n):
            x = args[0].reshape(-1, args[0].shape[-1])
            acc[n] = acc[n] + x.T @ x
            count[n] += x.shape[0]
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for x, _ in rows:
                model(input_ids=x[None])
    finally:
        for h in handles:
            h.remove()
    return {f"{n}.weight": acc[n] / count[n] for n in layers}


def _close(a, b, names, rtol=1e-9, atol=1e-12):
    for n in names:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------- Fisher
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fisher_on_inputs_embeds_equals_input_ids_and_a_per_example_loop(kind):
    m = _model(kind)
    rows = _rows()
    batch = _left_padded(rows)
    emb = _as_embeds(m, batch)
    # the input embedding table is outside the forward on inputs_embeds (GPT-2's is also its tied output layer)
    names = [n for n, _ in m.named_parameters() if n != INPUT_TABLE[kind]]
    data_ids = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    data_emb = [{k: v[:2] for k, v in emb.items()}, {k: v[2:] for k, v in emb.items()}]
    f_ids = estimate_fisher(m, data_ids, empirical=True, progress=False)
    f_emb = estimate_fisher(m, data_emb, empirical=True, progress=False)
    assert f_ids.num_examples == f_emb.num_examples == 4
    ref = _loop_fisher(m, rows, names)
    _close(f_emb.tensors, ref, names)
    _close(f_ids.tensors, ref, names)
    if kind == "llama":  # untied input table: no gradient reaches it from inputs_embeds
        assert float(f_emb.tensors[INPUT_TABLE[kind]].abs().max()) == 0.0
    # the true Fisher (labels sampled from the model, same seed) agrees as well
    t_ids = estimate_fisher(m, data_ids, seed=3, progress=False)
    t_emb = estimate_fisher(m, data_emb, seed=3, progress=False)
    _close(t_emb.tensors, t_ids.tensors, names)
    assert any(float((t_ids.tensors[n] - f_ids.tensors[n]).abs().max()) > 0 for n in names)


def test_fisher_with_logits_to_keep_equals_the_full_logits():
    """The recipes' collator cuts labels to the answer span and asks for those logits only (logits_to_keep):
    the same Fisher as every position's logits with the full labels."""
    m = _model("llama")
    rows = _rows(1)
    batch = _left_padded(rows)
    span = max(int((y != -100).sum()) for _, y in rows) + 1
    cut = {**_as_embeds(m, batch), "labels": batch["labels"][:, -span:], "logits_to_keep": span}
    full = estimate_fisher(m, [_as_embeds(m, batch)], empirical=True, progress=False)
    kept = estimate_fisher(m, [cut], empirical=True, progress=False)
    names = [n for n in full.tensors if n != INPUT_TABLE["llama"]]
    _close(kept.tensors, full.tensors, names)
    _close(kept.tensors, _loop_fisher(m, rows, names), names)
    with pytest.raises(HfTaujpError, match="logits_to_keep"):  # cut labels without it: named, not misaligned
        estimate_fisher(m, [{k: v for k, v in cut.items() if k != "logits_to_keep"}], empirical=True, progress=False)


def test_fisher_parameters_are_the_names_asked_for_even_when_frozen():
    m = _model("llama").requires_grad_(False)
    batch = _left_padded(_rows())
    names = ["model.layers.0.mlp.down_proj.weight", "lm_head.weight"]
    f = estimate_fisher(m, [_as_embeds(m, batch)], empirical=True, parameters=names, progress=False)
    assert sorted(f.tensors) == sorted(names) and all(float(t.abs().max()) > 0 for t in f.tensors.values())
    with pytest.raises(HfTaujpError, match="not in the model"):
        estimate_fisher(m, [batch], parameters=["nope.weight"], progress=False)


# --------------------------------------------------------------------------------------------------- Gram
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gram_on_inputs_embeds_equals_input_ids_and_the_rows_one_by_one(kind):
    m = _model(kind)
    rows = _rows(2)
    batch = _left_padded(rows)
    g_ids = estimate_gram(m, [batch], progress=False)
    g_emb = estimate_gram(m, [{**_as_embeds(m, batch), "logits_to_keep": 1}], progress=False)
    ref = _loop_gram(m, rows)
    assert set(g_emb.tensors) == set(ref)
    _close(g_emb.tensors, ref, ref)
    _close(g_ids.tensors, ref, ref)
    real = sum(len(x) for x, _ in rows)  # logits_to_keep is dropped: the output layer sees every real token too
    assert set(g_emb.extra["gram_rows"].values()) == {real}


def test_seq2seq_gram_reads_the_decoder_inputs_from_the_labels():
    """A T5 batch with labels (as the recipes' collator gives it): the decoder layers read the shifted labels,
    -100 positions are decoder padding, the encoder's padding is masked — the two masks share a shape here —,
    and the Grams equal those of each example alone."""
    m = tiny_t5(seed=5, vocab_size=V, d_model=8, d_kv=4, d_ff=16, num_layers=1).double().eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, V, (3, 4), generator=g)
    am = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    labels = torch.randint(1, V, (3, 4), generator=g)
    labels[0, 2:] = -100
    labels[2, 3:] = -100
    st = estimate_gram(m, [{"input_ids": ids * am, "attention_mask": am, "labels": labels}], progress=False)
    layers = linear_layers(m)
    acc, count, handles = {n: 0 for n in layers}, {n: 0 for n in layers}, []
    for n, (mod, _) in layers.items():
        def hook(_m, args, n=n):
            x = args[0].reshape(-1, args[0].shape[-1])
            acc[n] = acc[n] + x.T @ x
            count[n] += x.shape[0]
        handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for i in range(3):
            y = labels[i, labels[i] != -100][None]
            m(input_ids=ids[i:i + 1, :int(am[i].sum())], decoder_input_ids=m.prepare_decoder_input_ids_from_labels(labels=y))
    for h in handles:
        h.remove()
    ref = {f"{n}.weight": acc[n] / count[n] for n in layers}
    _close(st.tensors, ref, ref)
    assert st.extra["gram_rows"]["encoder.block.0.layer.0.SelfAttention.q.weight"] == 9
    assert st.extra["gram_rows"]["decoder.block.0.layer.0.SelfAttention.q.weight"] == 9
    assert st.extra["gram_rows"]["lm_head.weight"] == 9


# ------------------------------------------------------------------------------------------------ positions
def test_absolute_position_model_on_a_left_padded_batch_gets_its_positions():
    m = _model("gpt2")
    assert uses_absolute_positions(m)
    rows = _rows(3)
    batch = _left_padded(rows, positions=False)  # a mask, no position ids
    assert "position_ids" in with_position_ids(batch, True)
    torch.testing.assert_close(with_position_ids(batch, True)["position_ids"], position_ids_from_mask(batch["attention_mask"]))
    names = [n for n, _ in m.named_parameters() if n != INPUT_TABLE["gpt2"]]
    ref = _loop_fisher(m, rows, names)
    f = estimate_fisher(m, [batch], empirical=True, progress=False)
    f_emb = estimate_fisher(m, [_as_embeds(m, batch)], empirical=True, progress=False)
    _close(f.tensors, ref, names)
    _close(f_emb.tensors, ref, names)
    gref = _loop_gram(m, rows)
    _close(estimate_gram(m, [batch], progress=False).tensors, gref, gref)
    _close(estimate_gram(m, [_as_embeds(m, batch)], progress=False).tensors, gref, gref)
    # what GPT-2 does by default (positions 0..L-1 counted from the padding) is not the rows' statistics
    arange = {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])}
    wrong = estimate_fisher(m, [arange], empirical=True, progress=False)
    assert max(float((wrong.tensors[n] - ref[n]).abs().max()) for n in names) > 1e-6
    # an unpadded batch is left as it is
    plain = {k: v[:, -2:] for k, v in batch.items()}
    assert "position_ids" not in with_position_ids(plain, True)


def test_rotary_model_is_unaffected():
    m = _model("llama")
    assert not uses_absolute_positions(m)
    rows = _rows(4)
    batch = _left_padded(rows, positions=False)
    assert "position_ids" not in with_position_ids(batch, uses_absolute_positions(m))
    names = [n for n, _ in m.named_parameters() if n != INPUT_TABLE["llama"]]
    ref = _loop_fisher(m, rows, names)
    _close(estimate_fisher(m, [batch], empirical=True, progress=False).tensors, ref, names)
    _close(estimate_fisher(m, [_left_padded(rows)], empirical=True, progress=False).tensors, ref, names)
    gref = _loop_gram(m, rows)
    _close(estimate_gram(m, [batch], progress=False).tensors, gref, gref)


def test_which_models_use_absolute_positions():
    from transformers import BertForMaskedLM

    assert uses_absolute_positions(tiny_gpt2(seed=0, **GPT2_CFG))
    assert uses_absolute_positions(tiny_bert(BertForMaskedLM, seed=0))
    assert not uses_absolute_positions(tiny_llama(seed=0, **LLAMA_CFG))
    assert not uses_absolute_positions(tiny_t5(seed=0))


# ----------------------------------------------------------------------------------------------- bad input
def test_a_batch_without_token_input_is_a_named_error():
    m = _model("llama")
    batch = _left_padded(_rows())
    no_input = {k: v for k, v in batch.items() if k not in ("input_ids", "position_ids")}
    with pytest.raises(HfTaujpError, match="neither input_ids nor inputs_embeds"):
        estimate_fisher(m, [no_input], empirical=True, progress=False)
    with pytest.raises(HfTaujpError, match="neither input_ids nor inputs_embeds"):
        estimate_gram(m, [no_input], progress=False)
    unlabelled = {k: v for k, v in _as_embeds(m, batch).items() if k != "labels"}
    with pytest.raises(HfTaujpError, match="gold `labels`.*inputs_embeds"):  # no token ids to predict
        estimate_fisher(m, [unlabelled], empirical=True, progress=False)
    estimate_fisher(m, [unlabelled], progress=False)  # the true Fisher samples its labels: fine
