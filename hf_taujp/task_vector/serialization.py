"""A task vector as a Hub artifact: the folder layout of docs/modules.md (``config.json`` +
``task_vector*.safetensors`` + model card, factored entries as ``<name>.lora_A`` / ``<name>.lora_B``),
``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``, and the checked reading of a folder's
``config.json`` (:func:`read_task_vector_config`, also used by the merges).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .. import hub
from ..errors import CorruptFileError, HfTaujpError
from ..low_rank_tau import FACTOR_KEYS, LowRankTau, factored_specs, factors_from
from .entries import _few, _rank_text

if TYPE_CHECKING:
    from .core import TaskVector

FORMAT = "hf-taujp/task_vector"
# 2: factored (low-rank) entries, listed in config.json's ``low_rank``; a vector without any is written as 1.
FORMAT_VERSION = 2
PREFIX = "task_vector"


class TaskVectorSerialization:
    """Mixin of :class:`~hf_taujp.task_vector.TaskVector`: the Hub artifact (save, load, push, model card)."""

    # ---------------------------------------------------------------- Hub
    def _stored_tensors(self) -> dict[str, torch.Tensor]:
        """The safetensors content: full entries under their names, a factored entry ``<name>`` as
        ``<name>.lora_A`` (r × in) and ``<name>.lora_B`` (out × r). ``HfTaujpError`` when a full entry's name
        is also a factor key (the file could not tell them apart)."""
        out: dict[str, torch.Tensor] = {}
        for k, e in self._entries.items():
            if isinstance(e, LowRankTau):
                out[f"{k}.{FACTOR_KEYS[0]}"], out[f"{k}.{FACTOR_KEYS[1]}"] = e.A, e.B
        clash = [k for k, e in self._entries.items() if not isinstance(e, LowRankTau) and k in out]
        if clash:
            raise HfTaujpError(f"Entries {_few(clash)} have the names of another entry's saved factors; rename them.")
        out.update({k: e for k, e in self._entries.items() if not isinstance(e, LowRankTau)})
        return out

    def _config(self, stored: Mapping[str, torch.Tensor] | None = None) -> dict:
        stored = self._stored_tensors() if stored is None else stored
        dts = sorted({str(t.dtype).replace("torch.", "") for t in stored.values()})
        cfg = {
            "format": FORMAT,
            # version 1 for a full vector: an older hf-taujp reads it as before
            "format_version": FORMAT_VERSION if self.is_low_rank else 1,
            **self.metadata(),
            "dtype": dts[0] if len(dts) == 1 else dts,
            "num_parameters": self.num_parameters,
        }
        factors = self.factors
        if factors:
            cfg["num_dense_parameters"] = self.num_dense_parameters
            cfg["low_rank"] = {k: {"rank": e.rank, "scale": e.scale, "layout": e.layout, "shape": list(e.shape)}
                               for k, e in factors.items()}
        return cfg

    def model_card(self):
        """A ``huggingface_hub.ModelCard`` describing the vector (``hub.model_card``: base_model link, tags, summary)."""
        tags = ["task-vector", "task-arithmetic"]
        lam = self.training.get("taujp_lambda", self.training.get("lambda"))
        if isinstance(lam, (int, float)) and lam > 0:
            tags.append("taujp")
        if self.kind == "linear":
            tags.append("linearized")
        modules = sorted({k.rsplit(".", 1)[0] for k in self._entries})
        shown = ", ".join(f"`{m}`" for m in modules[:20]) + (f" and {len(modules) - 20} more" if len(modules) > 20 else "")
        training = "\n".join(f"- `{k}`: {v}" for k, v in sorted(self.training.items())) or "- (not recorded)"
        apply = "tv.apply_to(base, alpha=1.0, linear=True)" if self.kind == "linear" else "tv.apply_to(base, alpha=1.0)"
        base = f"`{self.base_model}`" if self.base_model else "a model without a Hub id"
        revision = f" (revision `{self.base_model_revision}`)" if self.base_model_revision else ""
        factors = self.factors
        if factors:
            storage = (f"- storage: low-rank, rank {_rank_text(factors)}: {len(factors)} of {len(self)} tensors kept as factors "
                       f"τ = s·B·A (`<name>.lora_A` r × in, `<name>.lora_B` out × r), {self.num_parameters:,} values "
                       "stored\n")
            tags.append("low-rank")
        else:
            storage = ""
        body = f"""A {"linearized (tangent-space)" if self.kind == "linear" else "weight-space"} task vector
τ for base model {base}{revision}, made with
hf-taujp (task arithmetic{", τJp-regularized" if "taujp" in tags else ""}).

- kind: `{self.kind}`
- norm ‖τ‖₂: {self.norm():.6g}
- parameters: {self.num_dense_parameters:,} in {len(self)} tensors
{storage}- base fingerprint: {f'`{self.base_fingerprint}`' if self.base_fingerprint else 'not recorded'}
- covered modules ({len(modules)}): {shown}

## Training settings
{training}

## Use
```python
from hf_taujp import TaskVector
tv = TaskVector.from_pretrained("<this repo>")
model = {apply}
```
"""
        return hub.model_card(f"Task vector{f': {self.task}' if self.task else ''}", body,
                              base_model=self.base_model, tags=tags)

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> str:
        """Write config.json, task_vector[-0000i-of-0000n].safetensors (+ index) and README.md atomically.

        A factored entry ``<name>`` is written as its factors ``<name>.lora_A`` (r × in) and ``<name>.lora_B``
        (out × r), listed in config.json's ``low_rank`` (rank, scale, layout, shape; format_version 2), so the
        folder's size is ∝ r. Raises ``HfTaujpError`` for an empty vector, NaN / inf values (factors checked
        as stored) or a full entry named like another entry's factor."""
        self._check_finite()
        if not self._entries:
            raise HfTaujpError("Refusing to save an empty task vector.")
        import json

        stored = self._stored_tensors()
        save_directory = os.fspath(save_directory)
        with hub.atomic_dir(save_directory) as tmp:
            hub.save_safetensors_sharded(stored, tmp, PREFIX, max_shard_size=max_shard_size)
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(self._config(stored), f, indent=2, sort_keys=True)
            self.model_card().save(os.path.join(tmp, "README.md"))
        return save_directory

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: str | os.PathLike,
        revision: str | None = None,
        token: str | bool | None = None,
        *,
        subfolder: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        device: str = "cpu",
    ) -> TaskVector:
        """Load a task vector from a folder or a Hub repo (only JSON / safetensors / card files are fetched).

        Args:
            repo_id_or_dir: a local folder or a Hub repo id.
            revision, token, cache_dir, local_files_only: as in huggingface_hub (Hub repos only).
            subfolder: the vector's folder inside the folder / repo, as transformers' ``subfolder=``: the
                recipes push one repo with ``<method>/<task>/`` folders, read back with
                ``subfolder="linear_ft/sst2"`` (``hf_taujp.hub.list_task_vectors`` lists them).
            device: where the tensors are loaded.

        Raises:
            ArtifactNotFoundError: no such folder / repo / revision / sub-folder, or the Hub unreachable
                (see ``hub.resolve_pretrained_dir``); a missing sub-folder's message lists the artifacts there.
            CorruptFileError: no ``config.json`` (the message lists the sub-folders holding task vectors
                when the root is not one but holds some, and points a PEFT adapter to :meth:`from_peft`),
                truncated / inconsistent files.
            HfTaujpError: a ``config.json`` of another format, a newer ``format_version``, NaN / inf entries.

        A factored vector (format_version 2, config.json ``low_rank``) loads as factors (``is_low_rank``),
        bit for bit as saved; a factor listed there but missing, or factors whose rank / shape / layout
        disagree with it, raise ``CorruptFileError``.
        """
        directory = hub.resolve_pretrained_dir(
            repo_id_or_dir, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
            subfolder=subfolder,
        )
        cfg = read_task_vector_config(directory, repo_id_or_dir, subfolder=subfolder, revision=revision, token=token)
        tensors = hub.load_safetensors(directory, PREFIX, device=device)
        n = sum(t.numel() for t in tensors.values())  # stored values: factors count r·(in + out)
        if cfg.get("num_parameters") is not None and int(cfg["num_parameters"]) != n:
            raise CorruptFileError(f"config.json says {cfg['num_parameters']} parameters, the files hold {n}.")
        declared = cfg.get("dtype")
        if declared is not None:
            declared = sorted([declared] if isinstance(declared, str) else declared)
            found = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
            if declared != found:
                raise CorruptFileError(f"config.json declares dtype {declared}, the safetensors files hold {found}.")
        where = hub._where(os.fspath(repo_id_or_dir), hub.normalize_subfolder(subfolder))
        hub.check_finite(tensors, what=f"Task vector loaded from {where}")
        entries = _entries_from_files(tensors, cfg, where)
        return cls(
            entries,
            base_model=cfg.get("base_model"),
            base_model_revision=cfg.get("base_model_revision"),
            base_fingerprint=cfg.get("base_fingerprint"),
            kind=cfg.get("kind", "nonlinear"),
            task=cfg.get("task"),
            training=cfg.get("training") or {},
        )

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload task vector with hf-taujp",
        revision: str | None = None,
        max_shard_size: int | str = "5GB",
        *,
        create_pr: bool = False,
        subfolder: str | None = None,
    ):
        """Save into a temporary folder and upload it in one commit (``hub.push_folder_to_hub``); returns the
        CommitInfo.

        ``revision``: the branch to push to; created from ``main`` when the repo lacks it, as transformers'
        ``push_to_hub`` does. ``create_pr``: open a pull request instead. ``subfolder``: the folder of the repo
        the vector goes to (``"linear_ft/sst2"``), next to what the repo already holds, read back with
        ``from_pretrained(repo_id, subfolder=...)``. Raises ``HfTaujpError`` for an empty or non-finite
        vector or a bad ``subfolder``; huggingface_hub's errors (authentication, permissions) propagate.
        """
        sub = hub.normalize_subfolder(subfolder)
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "task_vector")
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            return hub.push_folder_to_hub(
                folder, repo_id, private=private, token=token, commit_message=commit_message, revision=revision,
                create_pr=create_pr, subfolder=sub,
            )


def _entries_from_files(tensors: dict[str, torch.Tensor], cfg: Mapping[str, Any], where: str) -> dict:
    """The vector's entries from its loaded safetensors: the factors config.json's ``low_rank`` lists
    folded into :class:`LowRankTau` entries (``CorruptFileError`` when one is missing or disagrees)."""
    specs = factored_specs(dict(cfg))
    if not specs:
        return tensors
    if int(cfg.get("format_version", 1)) < 2:
        raise CorruptFileError(f"{where}: config.json lists low-rank factors but declares format_version "
                               f"{cfg.get('format_version', 1)} (factors need 2).")
    owner = {f"{n}.{k}": n for n in specs for k in FACTOR_KEYS}
    for name in specs:
        missing = [k for k in (f"{name}.{f}" for f in FACTOR_KEYS) if k not in tensors]
        if missing:
            raise CorruptFileError(f"{where}: config.json lists {name!r} as factored but the files lack {missing}.")
        if name in tensors:
            raise CorruptFileError(f"{where}: {name!r} is stored both as a full tensor and as factors.")
    out = {}
    for k, t in tensors.items():  # in the files' order, a factored entry where its first factor is
        name = owner.get(k)
        if name is None:
            out[k] = t
        elif name not in out:
            out[name] = factors_from(name, specs[name], tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"])
    return out


def read_task_vector_config(
    directory: str,
    source: str | os.PathLike | None = None,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    label: str | None = None,
) -> dict:
    """The ``config.json`` of the task vector in ``directory`` (a resolved local folder), checked.

    ``source`` (the folder or repo id the user gave, ``directory`` by default), ``subfolder`` and
    ``revision`` only word the errors: when ``directory`` is not a task vector, the sub-folders of
    ``source`` (below ``subfolder``) that hold task vectors are listed. ``label`` (``"vector 0"``) prefixes
    the message.

    Raises:
        UnsafeFileError: no config.json but pickle-based weights.
        CorruptFileError: no / unreadable config.json (with the sub-folder listing, or the hint to use
            :meth:`TaskVector.from_peft` for a PEFT adapter folder).
        HfTaujpError: a config.json of another format (a model's config, a Fisher's) or a ``format_version``
            newer than this hf-taujp.
    """
    source = directory if source is None else source
    sub = hub.normalize_subfolder(subfolder)
    where = (f"{label} " if label else "") + hub._where(os.fspath(source), sub, revision)
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        if os.path.isdir(directory):
            hub._refuse_pickles(directory, "Task vector")
        if os.path.isfile(os.path.join(directory, "adapter_config.json")):
            hint = " It holds a PEFT adapter: use TaskVector.from_peft(dir, base=...)."
        else:
            hint = hub.artifact_folders_hint(source, revision=revision, token=token, under=sub, kind="task vector")
        raise CorruptFileError(f"{where} has no config.json: not an hf-taujp task vector.{hint}")
    cfg = hub.read_json(cfg_path, what="task vector config")
    if cfg.get("format") != FORMAT:
        hint = hub.artifact_folders_hint(source, revision=revision, token=token, under=sub, kind="task vector")
        raise HfTaujpError(
            f"{where}: {cfg_path!r} declares format {cfg.get('format')!r}, expected {FORMAT!r}: not an hf-taujp "
            f"task vector.{hint}"
        )
    if int(cfg.get("format_version", 1)) > FORMAT_VERSION:
        raise HfTaujpError(f"Task vector format_version {cfg['format_version']} is newer than this hf-taujp ({FORMAT_VERSION}).")
    return cfg
