"""How the LINEARIZED method plugs into PEFT: everything hf-taujp does to PEFT, in one place.

The tuner itself follows PEFT's method layout (``hf_taujp/tuners/linearized/``: ``config.py``,
``layer.py``, ``model.py``). What PEFT's ``BaseTuner`` contract needs, and how we meet it:

* A type name PEFT dispatches on. ``peft.register_peft_method`` only accepts names of PEFT's closed
  ``PeftType`` enum, so :func:`register_linearized` adds the plain string ``"LINEARIZED"`` to the three
  dictionaries that ``register_peft_method`` itself fills (``peft.mapping``): the config class
  (``PeftConfig.from_pretrained``, ``AutoPeftModel``), the tuner class (``get_peft_model``, the
  save / load hooks) and the adapter key prefix. Not mixed-adapter compatible (that dictionary is
  left alone), like ``register_peft_method(..., is_mixed_compatible=False)``.
* Registration before the first PEFT lookup, without importing PEFT (and transformers) in every
  entry point: :func:`register_when_peft_is_imported` registers at once if ``peft`` is loaded, and
  otherwise installs a one-shot ``sys.meta_path`` finder that registers right after ``import peft``
  finishes. ``import hf_taujp`` calls it, so ``PeftModel.from_pretrained(base, dir)`` works in
  either import order.
* A tuner layer PEFT's helpers can find (``get_layer_status``, ``get_model_status``, the
  "already has adapters" check of ``get_peft_model`` use ``isinstance(m, BaseTunerLayer)``):
  ``layer.LinearizedTau`` is that layer. It holds τ for the parameters of one module and wraps no
  computation, because the linearization is one forward-mode pass of the whole model
  (``LinearizedModel.forward``), not a per-layer forward.
* ``BaseTuner.inject_adapter`` replaces modules through ``_create_and_replace``; ``LinearizedModel``
  overrides ``inject_adapter`` (it attaches τ containers beside the base parameters and replaces
  nothing), so ``_create_and_replace`` (abstract in ``BaseTuner``) is never called and raises.

Tested against the PEFT the package metadata admits (``peft>=0.21,<0.22``; tests/test_package.py).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ["register_linearized", "register_when_peft_is_imported"]

_TUNERS = "hf_taujp.tuners"


def register_linearized() -> None:
    """Register LINEARIZED in the installed PEFT's type dictionaries (idempotent; imports peft)."""
    from peft import mapping

    from .tuners.linearized.config import PEFT_TYPE_LINEARIZED, LinearizedConfig
    from .tuners.linearized.model import LinearizedModel

    entries = (
        (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, LinearizedConfig),
        (mapping.PEFT_TYPE_TO_TUNER_MAPPING, LinearizedModel),
        (mapping.PEFT_TYPE_TO_PREFIX_MAPPING, LinearizedModel.prefix),
    )
    for table, value in entries:
        current = table.get(PEFT_TYPE_LINEARIZED)
        # A re-imported module (e.g. importlib.reload) brings new class objects: replace them.
        if current is not None and current != value and getattr(current, "__qualname__", None) != getattr(value, "__qualname__", None):
            raise RuntimeError(f"PEFT type {PEFT_TYPE_LINEARIZED!r} is already registered to {current!r}.")
        table[PEFT_TYPE_LINEARIZED] = value


def register_when_peft_is_imported() -> None:
    """Register now if ``peft`` is loaded; otherwise right after its import finishes (one-shot import hook).

    Importing ``hf_taujp.tuners`` registers (its ``linearized`` package calls :func:`register_linearized`).
    """
    if "peft" in sys.modules:
        importlib.import_module(_TUNERS)
        return

    class _AfterPeftImport(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname != "peft":
                return None
            sys.meta_path.remove(self)  # one shot; the real finders resolve peft
            spec = importlib.util.find_spec("peft")
            if spec is None or spec.loader is None:
                return spec
            loader = spec.loader
            original_exec = loader.exec_module

            def exec_module(module):
                original_exec(module)
                importlib.import_module(_TUNERS)

            loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _AfterPeftImport())
