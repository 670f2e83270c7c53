"""Atomic writes of hf-taujp artifacts into a folder (:func:`atomic_dir`) and of one text file
(:func:`atomic_write_text`).

Files are staged in a temporary folder and each is moved into place with ``os.replace`` only when all
were written, so an error never leaves a half-written artifact nor touches the previous files; shards and
indexes of our own previous save with the same prefix are removed, nothing else is (``_shard_family``
names that prefix, also for the listing and the upload). Files and folders follow the user's umask.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator

from ..errors import HfTaujpError

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
