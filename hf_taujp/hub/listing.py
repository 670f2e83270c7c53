"""What a folder or Hub repo holds, told from its file names: the sub-folders holding artifacts
(``artifact_folders_hint``, for error messages) and the task vectors at any depth
(:func:`list_task_vectors`, :class:`TaskVectorInfo`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from ..safetensors_io import read_json
from .atomic import _shard_family
from .locations import _hub_error, _local_or_repo

# What a folder holds, told from its file names: (tensor prefix, config file, name).
_ARTIFACT_KINDS = (
    ("task_vector", "config.json", "task vector"),
    ("fisher", "config.json", "Fisher statistics"),
    ("gram", "config.json", "Gram statistics"),
    ("adapter_model", "adapter_config.json", "PEFT adapter"),
    ("model", "config.json", "model"),
)


def _list_files(repo_id_or_dir: str | os.PathLike, *, revision: str | None = None,
                token: str | bool | None = None) -> tuple[str | None, list[str]]:
    """``(local folder or None, files)``: every file of a local folder (hidden entries and symlinked folders
    skipped) or of a Hub repo at ``revision``, as POSIX paths relative to the root."""
    local, path = _local_or_repo(repo_id_or_dir)
    if local is not None:
        files = []
        for root, dirs, names in os.walk(local):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = os.path.relpath(root, local)
            for n in sorted(names):
                if not n.startswith("."):
                    files.append(n if rel == "." else f"{rel.replace(os.sep, '/')}/{n}")
        return local, files
    from huggingface_hub import HfApi

    try:
        return None, HfApi(token=token).list_repo_files(path, revision=revision, repo_type="model")
    except Exception as e:  # noqa: BLE001 - mapped to one named error where we know it, else re-raised
        err = _hub_error(e, path, revision, action="list the files of")
        if err is None:
            raise
        raise err from e


def _artifact_folders(files: Iterable[str]) -> dict[str, str]:
    """``{folder: what it holds}`` for the folders (``""`` = the root) of ``files`` that hold an artifact: a
    config file beside safetensors weights of the matching prefix (see ``_ARTIFACT_KINDS``)."""
    by_dir: dict[str, set[str]] = {}
    for f in files:
        d, _, name = f.rpartition("/")
        by_dir.setdefault(d, set()).add(name)
    out = {}
    for d in sorted(by_dir):
        names = by_dir[d]
        families = {_shard_family(n) for n in names}
        for prefix, config, what in _ARTIFACT_KINDS:
            if config in names and prefix in families:
                out[d] = what
                break
    return out


_PLURAL = {"task vector": "task vectors", "PEFT adapter": "PEFT adapters", "model": "models"}


def artifact_folders_hint(repo_id_or_dir: str | os.PathLike, *, revision: str | None = None,
                          token: str | bool | None = None, under: str | None = None, kind: str | None = None) -> str:
    """A sentence for an error message: the sub-folders (below ``under``) that hold artifacts (of ``kind``:
    ``"task vector"``, ``"Fisher statistics"``, ``"Gram statistics"``, …), each with what it holds; ``""``
    when there are none. A listing that fails (the Hub unreachable) is said in the sentence, not hidden."""
    try:
        _, files = _list_files(repo_id_or_dir, revision=revision, token=token)
    except Exception as e:  # noqa: BLE001 - this only words an error; the failure to list is reported in it
        first = (str(e).splitlines() or [""])[0] or type(e).__name__
        return f" (Its sub-folders could not be listed: {first})"
    prefix = f"{under}/" if under else ""
    found = {d: w for d, w in _artifact_folders(files).items()
             if d.startswith(prefix) and d != (under or "") and (kind is None or w == kind)}
    if not found:
        return ""
    shown = list(found)[:20]
    more = f" and {len(found) - 20} more" if len(found) > 20 else ""
    if kind is None:
        return " Sub-folders that hold artifacts: " + ", ".join(f"{d!r} ({found[d]})" for d in shown) + more + "."
    tip = " (hf_taujp.hub.list_task_vectors lists them with their metadata)" if kind == "task vector" else ""
    return (f" It holds {_PLURAL.get(kind, kind)} in sub-folders {', '.join(repr(d) for d in shown)}{more}: "
            f"pass subfolder={shown[0]!r}{tip}.")


@dataclasses.dataclass(frozen=True)
class TaskVectorInfo:
    """One task vector found by :func:`list_task_vectors`.

    ``subfolder``: its folder relative to the root (``""`` for the root itself), to pass as
    ``TaskVector.from_pretrained(repo, subfolder=...)`` or as ``subfolder:`` in a merge recipe; ``kind``
    (``"nonlinear"`` / ``"linear"``), ``task``, ``method`` (``training["method"]``, as the recipes record
    it), ``base_model`` and ``num_parameters`` from its ``config.json`` (None where not recorded).
    """

    subfolder: str
    kind: str | None = None
    task: str | None = None
    method: str | None = None
    base_model: str | None = None
    num_parameters: int | None = None


def list_task_vectors(repo_id_or_dir: str | os.PathLike, revision: str | None = None, *,
                      token: str | bool | None = None, cache_dir: str | None = None) -> list[TaskVectorInfo]:
    """The task vectors in a local folder or Hub repo, at any depth: the layout the recipes push
    (``<method>/<task>/``), a Trainer's output folder, a single vector at the root.

    Args:
        repo_id_or_dir: a local folder or a Hub repo id (the rules of :func:`resolve_pretrained_dir`).
        revision: the Hub revision to list (branch, tag or commit; ignored for a local folder).
        token, cache_dir: as in huggingface_hub.

    Returns a list of :class:`TaskVectorInfo` sorted by ``subfolder``: the folders that hold a
    ``config.json`` declaring ``"format": "hf-taujp/task_vector"`` beside ``task_vector*.safetensors``
    (a Hub repo is listed with ``list_repo_files``; only those ``config.json`` files are downloaded).
    Hidden folders (``.git``, staging folders) are skipped; an empty list means there is none.

    Raises:
        ArtifactNotFoundError: the folder / repo / revision does not exist or the Hub cannot be reached
            (listing a Hub repo needs the Hub, also with ``HF_HUB_OFFLINE`` set).
        CorruptFileError: a candidate ``config.json`` is not valid JSON.
    """
    local, files = _list_files(repo_id_or_dir, revision=revision, token=token)
    path = os.fspath(repo_id_or_dir)
    out = []
    for d, what in _artifact_folders(files).items():
        if what != "task vector":
            continue
        name = f"{d}/config.json" if d else "config.json"
        if local is not None:
            cfg_path = os.path.join(local, *name.split("/"))
        else:
            from huggingface_hub import hf_hub_download

            try:
                cfg_path = hf_hub_download(path, name, revision=revision, token=token, cache_dir=cache_dir)
            except Exception as e:  # noqa: BLE001 - mapped to one named error where we know it, else re-raised
                err = _hub_error(e, path, revision)
                if err is None:
                    raise
                raise err from e
        cfg = read_json(cfg_path, what=f"config of {d or 'the root'!r}")
        if cfg.get("format") != "hf-taujp/task_vector":
            continue
        training = cfg.get("training") if isinstance(cfg.get("training"), dict) else {}
        n = cfg.get("num_parameters")
        out.append(TaskVectorInfo(subfolder=d, kind=cfg.get("kind"), task=cfg.get("task"),
                                  method=training.get("method"), base_model=cfg.get("base_model"),
                                  num_parameters=int(n) if isinstance(n, int) else None))
    return out
