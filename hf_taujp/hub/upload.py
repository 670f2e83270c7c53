"""Uploads to the Hub: :func:`push_folder_to_hub` (one commit; a new branch is created before the
commit, as transformers does; stale shards of the same prefix deleted in that commit) and
:func:`check_repo_id` (a bad repo id fails before training, not after).
"""

from __future__ import annotations

import glob
import os

from ..errors import HfTaujpError
from .atomic import _shard_family
from .locations import normalize_subfolder

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
