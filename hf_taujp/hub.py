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

import contextlib
import dataclasses
import glob
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


def atomic_write_text(path: str | os.PathLike, text: str | bytes) -> None:
    """Write ``text`` (str, or bytes written as they are) to ``path`` through a temporary file and an atomic
    rename (mode from the umask)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    binary = isinstance(text, bytes)
    try:
        # open(..., "x") creates with 0o666 & ~umask (mkstemp would force 0o600).
        with open(tmp, "xb" if binary else "x", encoding=None if binary else "utf-8") as f:
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


def normalize_subfolder(subfolder: str | os.PathLike | None) -> str | None:
    """``subfolder`` as a POSIX path relative to a folder or repo root (``"linear/sst2"``); None for the root.

    ``None`` and ``""`` (transformers' default) mean the root; ``.`` parts, repeated and trailing ``/`` are
    dropped (``"linear//sst2/"`` → ``"linear/sst2"``). Raises ``HfTaujpError`` for anything that is not a
    path inside the root: not a string, absolute (``/x``, ``~/x``), a ``..`` part or a backslash.
    """
    if subfolder is None:
        return None
    if isinstance(subfolder, os.PathLike):
        subfolder = os.fspath(subfolder)
    if not isinstance(subfolder, str):
        raise HfTaujpError(f"subfolder must be a string such as 'linear/sst2', got "
                           f"{type(subfolder).__name__} {subfolder!r}.")
    if subfolder.startswith(("/", "~")) or "\\" in subfolder:
        raise HfTaujpError(f"subfolder {subfolder!r} must be a relative path with '/' separators inside the folder or "
                           "repo (such as 'linear/sst2').")
    parts = [p for p in subfolder.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise HfTaujpError(f"subfolder {subfolder!r} leaves the folder or repo ('..' is not allowed).")
    return "/".join(parts) or None


def _where(path: str, subfolder: str | None, revision: str | None = None) -> str:
    """``'org/repo'``, ``'org/repo' (sub-folder 'linear/a', revision 'v2')``: how errors name an artifact."""
    extra = [f"sub-folder {subfolder!r}"] if subfolder else []
    extra += [f"revision {revision!r}"] if revision else []
    return f"{path!r}" + (f" ({', '.join(extra)})" if extra else "")


def _local_or_repo(repo_id_or_dir: str | os.PathLike) -> tuple[str | None, str]:
    """``(folder, name)`` for an existing local folder, ``(None, repo_id)`` for a Hub repo id; raises
    ``ArtifactNotFoundError`` for a file, a missing path-like name and a name that is neither (the rules of
    :func:`resolve_pretrained_dir`)."""
    path = os.fspath(repo_id_or_dir)
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return expanded, path
    if os.path.exists(expanded):
        raise ArtifactNotFoundError(f"{path!r} is a file, not a folder: give the folder that holds it.")
    if not isinstance(repo_id_or_dir, str) or _looks_like_path(path):
        raise ArtifactNotFoundError(f"No such folder: {path!r}.")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError as e:
        raise ArtifactNotFoundError(
            f"{path!r} is neither an existing folder nor a valid Hub repo id ('name' or 'namespace/name')."
        ) from e
    return None, path


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection / timeout errors (``httpx``, or the ``httpx2`` huggingface_hub 2 uses)."""
    import importlib

    out = []
    for name in ("httpx2", "httpx"):
        try:
            out.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(out)


def _hub_error(e: BaseException, path: str, revision: str | None, local_files_only: bool = False,
               action: str = "fetch") -> ArtifactNotFoundError | None:
    """The one-line ``ArtifactNotFoundError`` for a huggingface_hub error about repo ``path``; None for others."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, HFValidationError):
        return ArtifactNotFoundError(
            f"{path!r} is neither an existing folder nor a valid Hub repo id ('name' or 'namespace/name')."
        )
    if isinstance(e, GatedRepoError):
        return ArtifactNotFoundError(f"Hub repo {path!r} is gated: accept its terms on the Hub and pass token=.")
    if isinstance(e, RevisionNotFoundError):
        return ArtifactNotFoundError(f"Hub repo {path!r} has no revision {revision!r}.")
    if isinstance(e, RepositoryNotFoundError):
        return ArtifactNotFoundError(
            f"No folder {path!r} here and no Hub repo {path!r}{f' with revision {revision!r}' if revision else ''} "
            "(or it is private: pass token=)."
        )
    offline = local_files_only or constants.HF_HUB_OFFLINE
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)) and offline:
        why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
        if action != "fetch":
            return ArtifactNotFoundError(f"Cannot {action} Hub repo {path!r} while the Hub is not consulted ({why}).")
        return ArtifactNotFoundError(
            f"No folder {path!r} here, and Hub repo {path!r}{f' (revision {revision!r})' if revision else ''} "
            f"is not in the local cache while the Hub is not consulted ({why})."
        )
    if isinstance(e, (LocalEntryNotFoundError, *_transport_errors())):
        first = (str(e).splitlines() or [type(e).__name__])[0]
        if action != "fetch":
            return ArtifactNotFoundError(f"Cannot {action} Hub repo {path!r}: the Hub could not be reached "
                                         f"({constants.ENDPOINT}: {first}).")
        return ArtifactNotFoundError(
            f"No folder {path!r} here, and the Hub could not be reached to fetch repo {path!r} "
            f"({constants.ENDPOINT}: {first}); it is not in the local cache either."
        )
    return None


def resolve_pretrained_dir(
    repo_id_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    allow_patterns: list[str] | None = None,
    subfolder: str | None = None,
) -> str:
    """The local folder of an artifact: a local folder as is, else a snapshot of the Hub repo.

    Args:
        repo_id_or_dir: a local folder, or a Hub repo id (``"name"`` / ``"namespace/name"``).
        revision, token, cache_dir, local_files_only: as in ``huggingface_hub.snapshot_download``
            (ignored for a local folder).
        allow_patterns: the file patterns fetched from the Hub, relative to the artifact's folder (default
            JSON, safetensors, card, YAML and text files; pickle files are never downloaded).
        subfolder: the artifact's folder inside the local folder or repo (``"linear/sst2"``, as
            transformers' and huggingface_hub's ``subfolder=``); None or ``""`` for the root.

    Only the files directly in the artifact's folder are fetched from the Hub, not those of its
    sub-folders (a repo holding many task vectors is not downloaded to read one). Respects
    ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` as huggingface_hub does.

    Raises:
        HfTaujpError: ``subfolder`` is not a relative path inside the folder / repo.
        ArtifactNotFoundError: naming the input, when a path-like input (a ``Path``, or a string starting
            with ``.``, ``/`` or ``~``, or with more than one ``/``) is not an existing folder, when a string
            is neither a folder nor a valid repo id, when the repo or revision does not exist, when the
            Hub cannot be reached (offline mode or a connection error) and the repo is not in the local
            cache, and when ``subfolder`` does not exist there (the message lists the folders that hold
            artifacts).
    """
    sub = normalize_subfolder(subfolder)
    path = os.fspath(repo_id_or_dir)
    local, _ = _local_or_repo(repo_id_or_dir)
    if local is not None:
        if sub is None:
            return local
        target = os.path.join(local, *sub.split("/"))
        if not os.path.isdir(target):
            what = "is a file, not a folder" if os.path.exists(target) else "does not exist"
            raise ArtifactNotFoundError(f"Folder {path!r} has no sub-folder {sub!r} (it {what})."
                                        f"{artifact_folders_hint(local)}")
        return target
    from huggingface_hub import constants, snapshot_download

    prefix = f"{glob.escape(sub)}/" if sub else ""
    try:
        snapshot = snapshot_download(
            repo_id=path,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=[prefix + p for p in (allow_patterns or _DEFAULT_ALLOW_PATTERNS)],
            ignore_patterns=[f"{prefix}*/*"],  # fnmatch's "*" crosses "/": this keeps sub-folders out
        )
    except Exception as e:  # noqa: BLE001 - mapped to one named error where we know it, else re-raised
        err = _hub_error(e, path, revision, local_files_only)
        if err is None:
            raise
        raise err from e
    if sub is None:
        return snapshot
    target = os.path.join(snapshot, *sub.split("/"))
    if not os.path.isdir(target):
        if local_files_only or constants.HF_HUB_OFFLINE:
            why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
            raise ArtifactNotFoundError(f"Hub repo {_where(path, None, revision)} has no sub-folder {sub!r} in the "
                                        f"local cache, and the Hub is not consulted ({why}).")
        raise ArtifactNotFoundError(
            f"Hub repo {_where(path, None, revision)} has no sub-folder {sub!r} (no JSON / safetensors / card file "
            f"directly in it).{artifact_folders_hint(path, revision=revision, token=token)}"
        )
    return target


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
    ``# title`` and ``body`` (Markdown). ``card.save(path)`` writes it (the text of :func:`model_card_text`).
    """
    from huggingface_hub import ModelCard

    return ModelCard(model_card_text(title, body, base_model=base_model, tags=tags))


def model_card_text(title: str, body: str, *, base_model: str | None = None, tags: Iterable[str] = ()) -> str:
    """The text of :func:`model_card` (YAML metadata between ``---`` lines, then Markdown), for writers
    that only save it: imports huggingface_hub's ``ModelCardData`` (~40 ms), not ``ModelCard``, which
    imports the whole Hub client (~0.4 s, a tenth of a streaming merge's CLI run)."""
    from huggingface_hub.repocard_data import ModelCardData

    tags = list(dict.fromkeys(["hf-taujp", *tags]))
    data = ModelCardData(library_name="hf-taujp", tags=tags, base_model=_hub_id(base_model))
    return f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{body.strip()}\n"


def check_repo_id(repo_id: str, option: str = "--push-to-hub") -> None:
    """Raise HfTaujpError unless ``repo_id`` is a valid Hub repo id (huggingface_hub's own rule), so that a
    run that will push fails before minutes of training, not after."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HfTaujpError(f"{option} {repo_id!r} is not a valid Hub repo id: {e}") from e


def _stale_patterns(folder: str) -> list[str]:
    """``delete_patterns`` for an upload of ``folder``: in it and in each of its sub-folders, every shard /
    index name our writer may have left for the tensor prefixes the folder holds (``x.safetensors``,
    ``x-0000i-of-0000n.safetensors``, ``x.safetensors.index.json``), relative to the folder."""
    digits = "[0-9]" * 5
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        rel = os.path.relpath(root, folder)
        pre = "" if rel == "." else glob.escape(rel.replace(os.sep, "/")) + "/"
        for fam in sorted({fam for f in files if (fam := _shard_family(f)) is not None}):
            e = glob.escape(fam)
            out += [f"{pre}{e}.safetensors", f"{pre}{e}-{digits}-of-{digits}.safetensors",
                    f"{pre}{e}.safetensors.index.json"]
    return out


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload with hf-taujp",
    revision: str | None = None,
    create_pr: bool = False,
    subfolder: str | None = None,
):
    """Create ``repo_id`` (and the branch ``revision``) if needed and upload ``folder`` to it in one commit;
    returns huggingface_hub's CommitInfo.

    Args:
        folder: the local folder to upload (its sub-folders too: the recipes push ``task_vectors/`` with
            one sub-folder per method and task).
        repo_id: the model repo, created with ``exist_ok=True`` (``private`` applies to a new repo only).
        revision: the branch to commit to (default ``main``). A branch that does not exist yet is created
            from ``main`` first, as transformers' ``push_to_hub``, ``datasets`` and ``hf upload`` do:
            ``HfApi.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)``, skipped for
            a ``refs/pr/…`` revision; with ``create_pr=True`` a 403 on that call is let pass (pushing a PR
            to a repo one cannot write to), as transformers does.
        create_pr: open a pull request with the commit instead of committing to the branch.
        subfolder: where the folder's files go in the repo (``upload_folder``'s ``path_in_repo``); None for
            the root. What else the repo holds is kept.
        token, commit_message: as in huggingface_hub.

    As with a local save, shards and indexes of a previous upload with the same prefix are deleted in
    the same commit (``delete_patterns``, in the folder and in each sub-folder): a stale
    ``<prefix>.safetensors.index.json`` left in the repo would otherwise shadow a new single-file
    ``<prefix>.safetensors`` on the next download. Nothing else in the repo is touched.

    Raises:
        HfTaujpError: ``subfolder`` is not a relative path; huggingface_hub's errors (authentication,
        permissions) otherwise propagate.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    sub = normalize_subfolder(subfolder)
    folder = os.fspath(folder)
    stale = _stale_patterns(folder)
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo_url, "repo_id", repo_id)
    if revision is not None and not revision.startswith("refs/pr"):
        try:
            api.create_branch(repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True)
        except HfHubHTTPError as e:
            if not (create_pr and e.response is not None and e.response.status_code == 403):
                raise
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        path_in_repo=sub,
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
