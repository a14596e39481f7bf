"""Index patterns and inputs shared by the kernel tests (imported by the test modules here)."""

from __future__ import annotations

import torch
from torch import Tensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# name -> (num_rows, num_slots) and how index is drawn; see make_index.
CASES = ("random", "rows_without_slots", "all_to_one_row", "dropped_slots", "single_row")


def make_index(case: str, gen: torch.Generator) -> tuple[Tensor, int]:
    """index [S] int64 into [0, num_rows) following an edge-case pattern -> (index, num_rows)."""
    if case == "random":  # about k = 2 slots per row, in random order
        rows = 300
        index = torch.randint(0, rows, (2 * rows,), generator=gen)
    elif case == "rows_without_slots":  # empty experts: only every third row gets slots
        rows = 90
        index = 3 * torch.randint(0, rows // 3, (150,), generator=gen)
    elif case == "all_to_one_row":  # one hot expert
        rows = 40
        index = torch.full((120,), 7, dtype=torch.int64)
    elif case == "dropped_slots":  # fewer slots than rows: most rows receive nothing
        rows = 200
        index = torch.randperm(rows, generator=gen)[:50]
    elif case == "single_row":  # T = 1
        rows = 1
        index = torch.zeros(3, dtype=torch.int64)
    else:
        raise ValueError(case)
    return index, rows


def randn(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def layouts(t: Tensor) -> dict[str, Tensor]:
    """The same values in three layouts: contiguous, a column slice (row stride > d) and a
    transposed copy (column stride != 1)."""
    wide = torch.zeros(t.shape[0], t.shape[1] + 5, dtype=t.dtype)
    wide[:, 2 : 2 + t.shape[1]] = t
    return {
        "contiguous": t,
        "row_strided": wide[:, 2 : 2 + t.shape[1]],
        "transposed": t.t().contiguous().t(),
    }
