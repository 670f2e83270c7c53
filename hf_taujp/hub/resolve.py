"""Resolving an artifact to a local folder (:func:`resolve_pretrained_dir`): a local folder as is,
else a snapshot of the Hub repo (only the files directly in the artifact's folder; never pickles).
"""

from __future__ import annotations

import glob
import os

from ..errors import ArtifactNotFoundError
from .listing import artifact_folders_hint
from .locations import _hub_error, _local_or_repo, _where, normalize_subfolder

_DEFAULT_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.yaml", "*.txt"]


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
