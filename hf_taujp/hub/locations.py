"""Where an artifact is: a local folder or a Hub repo id (:func:`normalize_subfolder` for a
``subfolder=`` inside either), how errors name it (``_where``), and huggingface_hub's errors mapped to
one-line ``ArtifactNotFoundError`` messages (``_hub_error``). Shared by resolution, listing, cards and
upload.
"""

from __future__ import annotations

import os

from ..errors import ArtifactNotFoundError, HfTaujpError

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
