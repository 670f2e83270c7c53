"""Choose the GLUE recipe's steps / lr on the VALIDATION split held out from GLUE train (dev never read).

    python scripts/glue_validation_sweep.py --data-dir ../shared/data/glue --configs \
        '[{"lr":3e-4,"steps":40},{"lr":3e-3,"steps":100},{"lr":3e-3,"steps":200},{"lr":3e-3,"steps":200,"method":"linear"}]'

Caches the frozen layers' outputs once (SmolLM2-135M, the last `--layers` decoder layers trained), then
fine-tunes every task with every config and prints each task's single-task validation score and the
mean, next to the zero-shot scores. The split is the recipe's own (`split_train_val`, same seeds), so a
choice made here is what `hf-taujp glue --max-train N` validates on.
"""
import argparse
import json
import time

import torch

from hf_taujp.recipes.common import subsample as _rows, weights_of as _weights_of
from hf_taujp.recipes.glue_parts import _prompt_part
from hf_taujp.recipes.models import trained_parameter_names as _trained_names
from hf_taujp.recipes.models import SMOLLM2, load_text_model
from hf_taujp.recipes.runner import finetune, parse_methods
from hf_taujp.recipes.tasks import GLUE_TASKS, load_task_data, split_train_val
from hf_taujp.recipes.text_to_text import (FrozenPrefix, TextToTextEncoder, answer_logits_output,
                                           first_trained_layer, rank_scores)
from hf_taujp.trainer import TauJpConfig


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="GLUE TSV folder")
    p.add_argument("--configs", required=True, help='JSON list of {"lr", "steps", "method" (default nonlinear), "lam"}')
    p.add_argument("--tasks", default="cola,sst2,mrpc,rte")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--max-train", type=int, default=2400, help="rows per task before 10%% is held out as validation")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    configs, tasks = json.loads(a.configs), a.tasks.split(",")
    base, tok, fam = load_text_model(SMOLLM2)
    base.eval()
    enc = TextToTextEncoder(tok, fam, max_length=96, keep_logits=True, penalized_output="answer")
    names = _trained_names(base, fam, a.layers, None)
    prefix = FrozenPrefix(base, enc, first_trained_layer(base, names), batch_size=32)
    model = prefix.suffix_model()
    n_rows = max(c["steps"] for c in configs) * a.batch_size
    val_rows, ex = {}, {}
    for i, n in enumerate(tasks):  # the recipe's split: same subsample and validation seeds as run_glue
        t = GLUE_TASKS[n]
        d = load_task_data(t, a.data_dir)
        train, val = split_train_val(_rows(d["train"], a.max_train, i), fraction=0.1, seed=i)
        val_rows[n] = val
        e = {"train": prefix.features(enc.encode_train(t, _rows(train, n_rows, 100 + i)), desc=f"{n}/train")}
        e["val"], _ = prefix.choice_features(enc.encode_prompts(t, val), enc.answer_ids(t), desc=f"{n}/val")
        e["reg"] = [_prompt_part(x, fam) for x in e["train"]]
        ex[n] = e

    def score(n, tangents=None):
        t = GLUE_TASKS[n]
        sc = rank_scores(model, enc, len(t.words), ex[n]["val"], batch_size=32, tangents=tangents)
        sc = sc[..., 0] if tangents is not None else sc
        return t.score([t.label_index(r) for r in val_rows[n]], sc.argmax(1).tolist())

    print("zero-shot (validation)", {n: round(score(n), 3) for n in tasks}, flush=True)
    for c in configs:
        m = parse_methods(c.get("method", "nonlinear"))[0]
        out, t0 = {}, time.time()
        for n in tasks:
            args = TauJpConfig(output_dir="/tmp/hf_taujp_sweep", per_device_train_batch_size=a.batch_size,
                               learning_rate=c["lr"], max_steps=c["steps"], weight_decay=0.0, lr_scheduler_type="linear",
                               logging_steps=10**6, save_strategy="no", report_to="none", seed=0, use_cpu=True,
                               remove_unused_columns=False, taujp_lambda=c.get("lam", 0.0), taujp_batch_ratio=0.25,
                               disable_tqdm=True)
            tv, _ = finetune(model, names, m, ex[n]["train"][: c["steps"] * a.batch_size], args, data_collator=enc,
                             regularization_datasets={o: ex[o]["reg"] for o in tasks if o != n},
                             taujp_output_fn=answer_logits_output)
            if m.linear:
                out[n] = round(score(n, tv.tensors), 3)
            else:
                with _weights_of(model) as set_weights:  # θ0 + τ inside the block, θ0 restored after
                    set_weights(1.0, tv)
                    out[n] = round(score(n), 3)
        print("config", json.dumps(c), "validation", out, "mean", round(sum(out.values()) / len(out), 3),
              f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
