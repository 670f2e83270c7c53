"""Recipes: applications of the library to the settings of the τJp paper (GLUE text-to-text first).

Shared pieces: task definitions (:mod:`.tasks`), text-to-text encoding and rank classification
(:mod:`.text_to_text`), model loading incl. the offline SmolLM2 (:mod:`.models`), the train-each-method
loop (:mod:`.runner`) and the report (:mod:`.report`).
"""

from .glue import run_glue
from .models import load_smollm2, load_text_model
from .runner import METHODS, finetune
from .tasks import GLUE_TASKS, TextTask, load_task_spec
from .text_to_text import FrozenPrefix, TextToTextEncoder, rank_scores

__all__ = ["run_glue", "load_smollm2", "load_text_model", "METHODS", "finetune", "GLUE_TASKS", "TextTask",
           "load_task_spec", "FrozenPrefix", "TextToTextEncoder", "rank_scores"]
