"""Recipes: applications of the library to the τJp paper's settings: GLUE text-to-text (the main job),
toxicity negation with causal LMs, CLIP vision task addition / negation.

Shared pieces: task definitions (:mod:`.tasks`), the reader of the user's data files (:mod:`.datafiles`), text-to-text encoding and rank classification
(:mod:`.text_to_text`), model loading incl. the offline SmolLM2 (:mod:`.models`), the one recipe shape and its
train-each-run loop (:mod:`.runner`: ``Recipe``, ``plan_runs``, ``run_methods``; docs/design.md), the fine-tuning
methods (:mod:`.finetuning`) and the report (:mod:`.report`).
"""

from .clip import run_clip
from .glue import run_glue
from .models import load_smollm2, load_text_model
from .runner import METHODS, Recipe, Run, finetune, plan_runs, run_methods
from .tasks import GLUE_TASKS, TextTask, load_task_spec
from .text_to_text import FrozenPrefix, TextToTextEncoder, rank_scores
from .toxicity import run_toxicity

__all__ = ["run_glue", "run_toxicity", "run_clip", "load_smollm2", "load_text_model", "METHODS", "finetune", "Recipe", "Run",
           "plan_runs", "run_methods", "GLUE_TASKS", "TextTask",
           "load_task_spec", "FrozenPrefix", "TextToTextEncoder", "rank_scores"]
