"""Keeping a failure to the request that caused it. Sampling is batched over every request of a
tick; if the batch raises, each row is sampled alone (the sampler computes a row the same whatever
else is in its batch), so only the rows that fail again fail, and only their requests end, with
the error delivered to their streams as a `RequestFailedError`."""

from __future__ import annotations

import torch

from morserve.engine.sampler import Sampled, SamplingRow, sample


class RequestFailedError(RuntimeError):
    """This request failed inside the engine; the engine and every other request go on."""


def sample_each(logits: torch.Tensor, rows: list[SamplingRow]) -> list[Sampled | None | Exception]:
    """`sample(logits, rows)`, with the exception in place of the result of each row that fails."""
    try:
        return sample(logits, rows)
    except Exception:                   # noqa: BLE001 - found row by row below
        if len(rows) == 1:
            raise
    out: list[Sampled | None | Exception] = []
    for i, row in enumerate(rows):
        try:
            out.append(sample(logits[i:i + 1], [row])[0])
        except Exception as exc:        # noqa: BLE001 - this row's request fails alone
            out.append(exc)
    return out
