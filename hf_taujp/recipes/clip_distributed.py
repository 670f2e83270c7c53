"""The CLIP recipe's evaluation under DDP (:mod:`hf_taujp.recipes.clip`): every process joins the same
collectives on equal shares and ends with the same full result — image embeddings (:func:`_embed`), τJp matrix
rows (:func:`_taujp_matrix`) — computed once; outside a `torch.distributed` job they run in this process alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..evaluation import taujp_matrix
from ..linearize import linearized_forward

__all__: list[str] = []  # private helpers of the recipe (hf_taujp.recipes.clip re-exports what tests use)


# ------------------------------------------------------------------------------------ processes
def _world() -> tuple[int, int]:
    """(number of processes, rank of this one) of the running `torch.distributed` job, (1, 0) outside one.

    Under `accelerate launch --num_processes N` / torchrun the Trainer's arguments start the process group
    (:func:`run_clip` builds its `TauJpConfig` before any evaluation)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(N·n, ...): the equal-shaped (n, ...) tensors of all N processes, concatenated in rank order."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _barrier() -> None:
    import torch.distributed as dist

    if _world()[0] > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def _embed(encoder, pixels: torch.Tensor, batch_size: int, tangents: Mapping | None = None):
    """f(x) (N, D), or (f(x; θ0), J f(x; θ0)·τ) with `tangents` — one jvp per batch.

    Under DDP (N processes) process r embeds rows [r·s, (r+1)·s), s = ceil(N_rows / N) (the last row repeated
    so every share has s rows: every process joins the same collectives, none waits on a shorter one), and
    the shares are all-gathered: every process returns the same full (N_rows, D) result, computed once."""
    world, rank = _world()
    n = len(pixels)
    if world == 1 or n == 0:
        out = _embed_local(encoder, pixels, batch_size, tangents)
        return out.cpu() if tangents is None else tuple(t.cpu() for t in out)
    share = -(-n // world)
    if share * world > n:
        pixels = torch.cat([pixels, pixels[-1:].expand(share * world - n, *pixels.shape[1:])])
    out = _embed_local(encoder, pixels[rank * share:(rank + 1) * share], batch_size, tangents)
    if tangents is None:
        return _all_gather_rows(out)[:n].cpu()
    return tuple(_all_gather_rows(t)[:n].cpu() for t in out)


def _embed_local(encoder, pixels: torch.Tensor, batch_size: int, tangents: Mapping | None = None):
    """:func:`_embed` on this process's rows, results on the encoder's device (float32)."""
    dev = next(encoder.parameters()).device
    params = dict(encoder.named_parameters())
    outs, tans = [], []
    for i in range(0, len(pixels), batch_size):
        x = pixels[i:i + batch_size].to(dev)
        if tangents is None:
            outs.append(encoder(pixel_values=x).image_embeds.float())
        else:
            p, t = linearized_forward(encoder, {k: params[k] for k in tangents}, tangents, (), {"pixel_values": x})
            outs.append(p.image_embeds.float())
            tans.append(t.image_embeds.float())
    return torch.cat(outs) if tangents is None else (torch.cat(outs), torch.cat(tans))


def _taujp_matrix(encoder, vectors: Mapping, heldout: Mapping, batch_size: int) -> list[list[float]]:
    """:func:`hf_taujp.evaluation.taujp_matrix` rows (one per task vector, on `image_embeds`); under DDP row i
    is computed by process i mod N and the rows are all-gathered (every process returns the whole matrix)."""
    world, rank = _world()
    names = list(vectors)
    mine = [i for i in range(len(names)) if i % world == rank]
    rows = taujp_matrix(encoder, {names[i]: vectors[names[i]] for i in mine}, heldout, output="image_embeds",
                        batch_size=batch_size)["matrix"] if mine else []
    if world == 1:
        return rows
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, list(zip(mine, rows)))
    got = dict(pair for part in parts for pair in part)
    return [got[i] for i in range(len(names))]
