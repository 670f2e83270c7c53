"""Value checks of an artifact's tensors: :func:`check_finite` (NaN / inf), before a save and after a load."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import HfTaujpError

def check_finite(tensors: Mapping[str, torch.Tensor], what: str = "tensors", raise_error: bool = True) -> list[str]:
    """Names of tensors holding NaN or inf; raises ``HfTaujpError`` listing them unless told not to."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad and raise_error:
        shown = ", ".join(repr(b) for b in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise HfTaujpError(f"{what} contain NaN or inf values in {len(bad)} tensor(s): {shown}.")
    return bad
