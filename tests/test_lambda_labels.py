"""Several τJp weights λ in one GLUE run (issue 19, section 4): two λ that %g writes alike (0.1 and 0.1000001)
get two labels and two folders, so the second run cannot overwrite the first's task vectors or results."""

import json

from test_recipe_glue import tiny_model_dir

from hf_taujp.recipes import glue as glue_recipe
from hf_taujp.recipes.lambda_options import lambda_text


def test_lambda_text_reads_back_as_the_same_number():
    for lam in (0.01, 0.1, 0.1000001, 1.0, 1e-5, 2.5e-7, 0.123456789, 1234567.0, 3.0000000000000004):
        text = lambda_text(lam)
        assert float(text) == lam
    assert lambda_text(0.1) == "0.1" and lambda_text(1.0) == "1"  # %g where exact
    assert lambda_text(0.1000001) == "0.1000001" != f"{0.1000001:g}"


def test_lambdas_that_format_alike_get_their_own_label_and_folder(tmp_path):
    lams = (0.1, 0.1000001)
    out = tmp_path / "o"
    res = glue_recipe.run_glue(tiny_model_dir(tmp_path, "llama"), ("sst2", "rte"), methods="taujp",
                               output_dir=str(out), steps=1, batch_size=4, max_train=60, max_dev=6,
                               alphas=(0.0, 1.0), shape_alphas=(), layers=1, matrix_examples=4, taujp_lambda=lams)
    labels = ["linear FT + τJp (λ=0.1)", "linear FT + τJp (λ=0.1000001)"]
    assert list(res["methods"]) == labels
    assert [res["methods"][label]["taujp_lambda"] for label in labels] == list(lams)
    for lam, folder in zip(lams, ("taujp_lambda0.1", "taujp_lambda0.1000001")):
        for task in ("sst2", "rte"):
            cfg = json.loads((out / "task_vectors" / folder / task / "config.json").read_text())
            assert cfg["training"]["taujp_lambda"] == lam  # the vector saved there is this λ's
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["methods"]) == labels
