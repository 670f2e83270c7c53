"""Folders and the Hub, shared by every hf-taujp artifact (task vectors, Fisher/Gram statistics, merges):
atomic saves, resolving a local folder or Hub repo (and a ``subfolder=`` in it), listing the task
vectors a folder or repo holds (:func:`list_task_vectors`), model cards and uploads (a new branch is
created before the commit, as transformers does).

The tensor files themselves (sharded safetensors, one reader, one writer) are
:mod:`hf_taujp.safetensors_io`; their names are re-exported here.

Saving follows transformers / PEFT: an artifact writes only its own files into a folder, which may
hold other things (a PEFT adapter, ``trainer_state.json``, ``checkpoint-500/``). Files are staged in a
temporary folder and each is moved into place with ``os.replace`` only when all were written, so an
error never leaves a half-written artifact nor touches the previous files; shards and indexes of our
own previous save with the same prefix are removed, nothing else is. Files and folders follow the
user's umask. Pickle-based files are never loaded.
"""

from __future__ import annotations

# The package's modules, one concept each: atomic (atomic writes), locations (folders vs repo ids,
# sub-folders, Hub errors), resolve (resolve_pretrained_dir), listing (artifact folders, list_task_vectors),
# cards (model cards), upload (push_folder_to_hub), checks (check_finite). Every name stays importable
# from hf_taujp.hub.
from ..errors import ArtifactNotFoundError, BaseModelMismatchError, CorruptFileError, HfTaujpError, UnsafeFileError
# Tensor files live in safetensors_io; re-exported here, where they were first defined.
from ..safetensors_io import (PICKLE_SUFFIXES, SafetensorsReader, load_safetensors, parse_size, read_json,
                              save_safetensors_sharded)
from ..safetensors_io import index_name as _index_name  # noqa: F401
from ..safetensors_io import refuse_pickles as _refuse_pickles  # noqa: F401
from .atomic import (_STAGE_PREFIX, _commit_into, _follow_umask, _json_format, _make_dir,  # noqa: F401
                     _shard_family, _umask, atomic_dir, atomic_write_text, is_hf_taujp_card)
from .cards import _hub_id, describe_model, model_card, model_card_text  # noqa: F401
from .checks import check_finite
from .listing import (_ARTIFACT_KINDS, _PLURAL, TaskVectorInfo, _artifact_folders, _list_files,  # noqa: F401
                      artifact_folders_hint, list_task_vectors)
from .locations import (_hub_error, _local_or_repo, _looks_like_path, _transport_errors, _where,  # noqa: F401
                        normalize_subfolder)
from .resolve import _DEFAULT_ALLOW_PATTERNS, resolve_pretrained_dir  # noqa: F401
from .upload import _stale_patterns, check_repo_id, push_folder_to_hub  # noqa: F401

__all__ = [
    "HfTaujpError",
    "BaseModelMismatchError",
    "CorruptFileError",
    "UnsafeFileError",
    "ArtifactNotFoundError",
    "atomic_dir",
    "atomic_write_text",
    "parse_size",
    "save_safetensors_sharded",
    "SafetensorsReader",
    "load_safetensors",
    "read_json",
    "resolve_pretrained_dir",
    "normalize_subfolder",
    "list_task_vectors",
    "TaskVectorInfo",
    "model_card",
    "model_card_text",
    "describe_model",
    "push_folder_to_hub",
    "check_finite",
    "PICKLE_SUFFIXES",
]
