"""Every error hf-taujp raises on bad input, in one place.

All derive from `HfTaujpError` (itself a `ValueError`, so callers that catch ValueError keep working),
and each names one problem a user can fix. This module imports nothing from the package, so any
module may import it. The defining modules of earlier releases re-export their classes
(`hf_taujp.hub.HfTaujpError`, `hf_taujp.merging.methods.MergeConfigError`, ...).
"""

from __future__ import annotations

__all__ = [
    "HfTaujpError",
    # artifacts and I/O (hub, task_vector, merging)
    "ArtifactNotFoundError",
    "BaseModelMismatchError",
    "CorruptFileError",
    "UnsafeFileError",
    "TiedWeightsError",
    # τJp training (trainer)
    "TauJpConfigError",
    "TauJpUnsupportedError",
    "MissingRegularizationDataError",
    "RegularizationInputError",
    # the dataless KFAC regularizer (trainer.curvature)
    "CurvatureError",
    "MissingCurvatureError",
    "CurvatureBaseMismatchError",
    "CurvatureLayerMismatchError",
    "CurvatureValueError",
    "OwnCurvatureError",
    # linearized attention (attention_jvp)
    "UnsupportedAttentionError",
    # merging
    "MergeConfigError",
    "MissingStatisticsError",
]


class HfTaujpError(ValueError):
    """Base class of every error hf-taujp raises on bad input."""


# Artifacts and I/O ---------------------------------------------------------------------------
class ArtifactNotFoundError(HfTaujpError):
    """A local folder does not exist, or a Hub repo / revision could not be found or reached."""


class BaseModelMismatchError(HfTaujpError):
    """Two artifacts (or an artifact and a model) refer to different base models."""


class CorruptFileError(HfTaujpError):
    """A file is truncated, unreadable or inconsistent with its index / config."""


class UnsafeFileError(HfTaujpError):
    """A repository or folder offers only pickle-based weights, which hf-taujp refuses to load."""


class TiedWeightsError(HfTaujpError):
    """A task vector holds different values for parameters the base ties together."""


# τJp training --------------------------------------------------------------------------------
class TauJpConfigError(HfTaujpError):
    """A τJp setting is out of range (λ < 0, unknown mode / norm, batch ratio outside (0, 1])."""


class TauJpUnsupportedError(HfTaujpError):
    """The training setup cannot run the τJp penalty (FSDP, DeepSpeed ZeRO, PEFT adapters other than LINEARIZED / LoRA)."""


class MissingRegularizationDataError(HfTaujpError):
    """taujp_lambda > 0 but no (or an empty) regularization dataset was given."""


class RegularizationInputError(HfTaujpError):
    """A regularization dataset's inputs do not fit the model (checked on one batch before training)."""


# The dataless KFAC regularizer (Porrello et al., ICLR 2026) ------------------------------------
class CurvatureError(TauJpConfigError):
    """KFAC curvature factors (``taujp_regularizer="kfac"``) that cannot regularize this training run."""


class MissingCurvatureError(CurvatureError, MissingRegularizationDataError):
    """taujp_regularizer="kfac" with λ > 0 but an empty curvature list."""


class CurvatureBaseMismatchError(CurvatureError, BaseModelMismatchError):
    """Factors estimated at another base model θ0 (fingerprint or base model id differ)."""


class CurvatureLayerMismatchError(CurvatureError):
    """Factors that miss a trained linear layer, or whose A / G shapes do not fit the layer's (in + 1, out)."""


class CurvatureValueError(CurvatureError):
    """Factors holding NaN or inf."""


class CurvatureUnitsError(CurvatureError):
    """Other tasks' factors estimated for different outputs f or with different probes (Gaussian vs Fisher):
    their penalties are in different units, and their sum measures nothing."""


class OwnCurvatureError(CurvatureError):
    """The training task's own factors (or one task's twice) passed among the *other* tasks' factors."""


# Linearized attention ------------------------------------------------------------------------
class UnsupportedAttentionError(HfTaujpError):
    """The attention call uses a feature the linearized kernel does not cover (dropout, is_causal + mask)."""


# Merging -------------------------------------------------------------------------------------
class MergeConfigError(HfTaujpError):
    """Bad merge parameters (unknown method, density outside (0, 1], wrong number of weights, ...)."""


class MissingStatisticsError(HfTaujpError):
    """A method needs a per-task statistic (Fisher / Gram matrix) that was not given."""
