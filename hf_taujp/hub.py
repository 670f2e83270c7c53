"""Folders and the Hub, shared by every hf-taujp artifact (task vectors, Fisher/Gram statistics, merges):
atomic saves, resolving a local folder or Hub repo, model cards and uploads.

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

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping

import torch

from .errors import ArtifactNotFoundError, BaseModelMismatchError, CorruptFileError, HfTaujpError, UnsafeFileError
# Tensor files live in safetensors_io; re-exported here, where they were first defined.
from .safetensors_io import (PICKLE_SUFFIXES, SafetensorsReader, load_safetensors, parse_size, read_json,
                             save_safetensors_sharded)
from .safetensors_io import index_name as _index_name  # noqa: F401
from .safetensors_io import refuse_pickles as _refuse_pickles  # noqa: F401

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
    "model_card",
    "describe_model",
    "push_folder_to_hub",
    "check_finite",
    "PICKLE_SUFFIXES",
]

_DEFAULT_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.yaml", "*.txt"]


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------
_STAGE_PREFIX = ".hf-taujp-tmp-"


def _umask() -> int:
    """The process umask (read from /proc on Linux; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(folder: str) -> None:
    """chmod everything under ``folder`` to 0o666 / 0o777 & ~umask, as ``open`` / ``mkdir`` create them.

    Some writers force private modes (safetensors' ``save_file`` creates 0o600 files).
    """
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def _make_dir(path: str) -> str:
    # os.mkdir applies the umask (tempfile.mkdtemp would force 0o700 on a folder users then own).
    os.mkdir(path, 0o777)
    return path


def _shard_family(fname: str) -> str | None:
    """The artifact prefix of a safetensors file or index we write (``x.safetensors``,
    ``x-00001-of-00003.safetensors``, ``x.safetensors.index.json`` → ``x``), else None."""
    m = re.fullmatch(r"(.+?)(?:-\d{5}-of-\d{5})?\.safetensors(?:\.index\.json)?", fname)
    return m.group(1) if m else None


def _json_format(path: str) -> str | None:
    """``format`` of an hf-taujp config.json (``"hf-taujp/task_vector"`` …); None for any other JSON
    object (a transformers model config); ``"<unreadable>"`` when it is not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "<unreadable>"
    if not isinstance(data, dict):
        return "<unreadable>"
    fmt = data.get("format")
    return fmt if isinstance(fmt, str) and fmt.startswith("hf-taujp/") else None


def is_hf_taujp_card(path: str | os.PathLike) -> bool:
    """Whether the model card at ``path`` was written by hf-taujp (``library_name: hf-taujp``)."""
    from huggingface_hub.repocard import metadata_load

    try:
        meta = metadata_load(path) or {}
    except Exception:  # noqa: BLE001 - any unparsable card is, by definition, not one we wrote
        return False
    return meta.get("library_name") == "hf-taujp"


def _commit_into(stage: str, path: str) -> None:
    """Move every file of ``stage`` into the existing folder ``path`` (one ``os.replace`` each).

    Checked before anything moves: a ``config.json`` of another kind (a model's config, another
    hf-taujp artifact) is never replaced (error); a ``README.md`` not written by hf-taujp (PEFT's,
    the user's) is kept and ours is not written (warning). After the moves, shards / indexes of our own
    previous save with the same prefix that the new save does not have are removed.
    """
    import warnings

    new: list[str] = []
    for root, dirs, files in os.walk(stage):
        dirs.sort()
        for f in sorted(files):
            new.append(os.path.relpath(os.path.join(root, f), stage))
    skip: set[str] = set()
    for rel in new:
        target = os.path.join(path, rel)
        if os.path.isdir(target):
            raise HfTaujpError(f"Cannot write {target!r}: a folder of that name exists.")
        if not os.path.isfile(target):
            continue
        if rel == "config.json":
            old_fmt, new_fmt = _json_format(target), _json_format(os.path.join(stage, rel))
            if old_fmt != new_fmt:
                def what(fmt):
                    return "a model config (no hf-taujp format)" if fmt is None else f"format {fmt!r}"
                raise HfTaujpError(
                    f"{path!r} already holds a config.json of another artifact ({what(old_fmt)}); this save would "
                    f"replace it with {what(new_fmt)}. Nothing was written: save into another folder."
                )
        elif rel == "README.md" and not is_hf_taujp_card(target):
            skip.add(rel)
            warnings.warn(
                f"{target!r} is not an hf-taujp model card (e.g. PEFT's or your own); it is kept and the "
                "hf-taujp card is not written.",
                stacklevel=4,
            )
    families = {fam for rel in new if os.sep not in rel and (fam := _shard_family(rel)) is not None}
    stale = [
        f for f in os.listdir(path)
        if f not in new and os.path.isfile(os.path.join(path, f)) and _shard_family(f) in families
    ]

    def order(rel: str) -> tuple[int, str]:
        # tensors first, then indexes, other files, config.json last: a reader never finds a new
        # config or index pointing at tensors that are not there yet.
        if rel.endswith(".safetensors"):
            return (0, rel)
        if rel.endswith(".index.json"):
            return (1, rel)
        return (3 if rel == "config.json" else 2, rel)

    for rel in sorted(new, key=order):
        if rel in skip:
            continue
        target = os.path.join(path, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(stage, rel), target)
    for f in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, f))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[str]:
    """Yield an empty staging folder whose files are written into ``path`` only if the block finishes.

    A new ``path`` is created by renaming the staging folder. An existing ``path`` keeps everything
    that is not ours: each staged file replaces its namesake with ``os.replace``, and shards / indexes
    of a previous save with the same prefix (``<prefix>[-0000i-of-0000n].safetensors[.index.json]``)
    that the new save lacks are removed; see :func:`_commit_into` for ``config.json`` / ``README.md``.
    On an exception in the block nothing in ``path`` changes and the staging folder is removed.
    With ``overwrite=False`` an existing non-empty ``path`` is an error (raised before anything is written).
    Folders and files follow the process umask.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if os.path.isfile(path):
        raise HfTaujpError(f"Cannot write a folder to {path!r}: a file of that name exists.")
    exists = os.path.isdir(path)
    if not overwrite and exists and os.listdir(path):
        raise HfTaujpError(f"Output folder {path!r} exists and is not empty (pass overwrite=True to replace it).")
    tag = uuid.uuid4().hex[:12]
    if exists:  # staging inside the target: same filesystem, so os.replace is atomic
        stage = _make_dir(os.path.join(path, f"{_STAGE_PREFIX}{tag}"))
    else:
        os.makedirs(parent, exist_ok=True)
        stage = _make_dir(os.path.join(parent, f".{os.path.basename(path)}.tmp-{tag}"))
    try:
        yield stage
        _follow_umask(stage)
        if not exists:
            try:
                os.rename(stage, path)  # fails if someone created `path` meanwhile: then merge into it
                return
            except OSError:
                if not os.path.isdir(path):
                    raise
        _commit_into(stage, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename (mode from the umask)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        # open(..., "x") creates with 0o666 & ~umask (mkstemp would force 0o600).
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------------------------
# JSON, Hub resolution and upload
# --------------------------------------------------------------------------------------------
def _looks_like_path(name: str) -> bool:
    # A Hub repo id is "name" or "namespace/name": anything starting like a path, holding two
    # slashes or a Windows separator is meant as a folder.
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or (os.altsep is not None and os.altsep != "/" and os.altsep in name)
    )


def resolve_pretrained_dir(
    repo_id_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    allow_patterns: list[str] | None = None,
) -> str:
    """A local folder as is, else a snapshot of the Hub repo (only JSON/safetensors/card files).

    Pickle files are never downloaded. Respects ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` as
    huggingface_hub does. Raises ``ArtifactNotFoundError`` naming the input when a path-like input
    (a ``Path``, or a string starting with ``.``, ``/`` or ``~``, or with more than one ``/``) is not an
    existing folder, when a string is neither a folder nor a valid repo id, when the repo or revision
    does not exist, and when the Hub cannot be reached (offline mode or a connection error) and the
    repo is not in the local cache.
    """
    path = os.fspath(repo_id_or_dir)
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise ArtifactNotFoundError(f"{path!r} is a file, not a folder: give the folder that holds it.")
    if not isinstance(repo_id_or_dir, str) or _looks_like_path(path):
        raise ArtifactNotFoundError(f"No such folder: {path!r}.")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return snapshot_download(
            repo_id=path,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=allow_patterns or _DEFAULT_ALLOW_PATTERNS,
        )
    except HFValidationError as e:
        raise ArtifactNotFoundError(
            f"{path!r} is neither an existing folder nor a valid Hub repo id ('name' or 'namespace/name')."
        ) from e
    except GatedRepoError as e:
        raise ArtifactNotFoundError(f"Hub repo {path!r} is gated: accept its terms on the Hub and pass token=.") from e
    except RevisionNotFoundError as e:
        raise ArtifactNotFoundError(f"Hub repo {path!r} has no revision {revision!r}.") from e
    except RepositoryNotFoundError as e:
        raise ArtifactNotFoundError(
            f"No folder {path!r} here and no Hub repo {path!r} (or it is private: pass token=)."
        ) from e
    except LocalEntryNotFoundError as e:
        if local_files_only or constants.HF_HUB_OFFLINE:
            why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
            raise ArtifactNotFoundError(
                f"No folder {path!r} here, and Hub repo {path!r}{f' (revision {revision!r})' if revision else ''} "
                f"is not in the local cache while the Hub is not consulted ({why})."
            ) from e
        raise ArtifactNotFoundError(
            f"No folder {path!r} here, and the Hub could not be reached to fetch repo {path!r} "
            f"({constants.ENDPOINT}: {str(e).splitlines()[0]}); it is not in the local cache either."
        ) from e


def describe_model(name: str | None) -> str:
    """``'gpt2'`` → ``"'gpt2'"``; None (a model built from a config) → ``"a model without a Hub id"``."""
    return repr(name) if name else "a model without a Hub id"


def _hub_id(name: str | None) -> str | None:
    """``name`` when it can be a Hub repo id (for a card's ``base_model`` link), None for local paths."""
    if not name or os.path.isabs(name) or _looks_like_path(name) or os.path.isdir(name):
        return None
    return name


def model_card(title: str, body: str, *, base_model: str | None = None, tags: Iterable[str] = ()):
    """The one model-card builder of hf-taujp artifacts (task vectors, statistics, merges).

    Returns a ``huggingface_hub.ModelCard`` with metadata ``library_name: hf-taujp``, ``tags``
    (``hf-taujp`` first) and ``base_model`` when it is a Hub id (local paths are not linked), then
    ``# title`` and ``body`` (Markdown). ``card.save(path)`` writes it.
    """
    from huggingface_hub import ModelCard, ModelCardData

    tags = list(dict.fromkeys(["hf-taujp", *tags]))
    data = ModelCardData(library_name="hf-taujp", tags=tags, base_model=_hub_id(base_model))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{body.strip()}\n")


def check_repo_id(repo_id: str, option: str = "--push-to-hub") -> None:
    """Raise HfTaujpError unless ``repo_id`` is a valid Hub repo id (huggingface_hub's own rule), so that a
    run that will push fails before minutes of training, not after."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HfTaujpError(f"{option} {repo_id!r} is not a valid Hub repo id: {e}") from e


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload with hf-taujp",
    revision: str | None = None,
    create_pr: bool = False,
):
    """Create ``repo_id`` if needed and upload ``folder`` to it; returns huggingface_hub's CommitInfo.

    As with a local save, shards and indexes of a previous upload with the same prefix are deleted in
    the same commit (``delete_patterns``): a stale ``<prefix>.safetensors.index.json`` left in the repo
    would otherwise shadow a new single-file ``<prefix>.safetensors`` on the next download. Nothing
    else in the repo is touched.
    """
    from huggingface_hub import HfApi

    families = sorted({fam for f in os.listdir(folder) if (fam := _shard_family(f)) is not None})
    stale = [p for fam in families for p in (f"{fam}.safetensors", f"{fam}-*-of-*.safetensors", f"{fam}.safetensors.index.json")]
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=getattr(repo_url, "repo_id", repo_id),
        folder_path=os.fspath(folder),
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
        repo_type="model",
        delete_patterns=stale or None,
    )


def check_finite(tensors: Mapping[str, torch.Tensor], what: str = "tensors", raise_error: bool = True) -> list[str]:
    """Names of tensors holding NaN or inf; raises ``HfTaujpError`` listing them unless told not to."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad and raise_error:
        shown = ", ".join(repr(b) for b in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise HfTaujpError(f"{what} contain NaN or inf values in {len(bad)} tensor(s): {shown}.")
    return bad
