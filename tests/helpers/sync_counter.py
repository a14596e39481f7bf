"""Count the operations that would make the host wait for a GPU, while the code runs on CPU.

On CUDA these read device data on the host (a device-to-host copy and a stream sync):
item()/int()/float()/bool() of a tensor (`_local_scalar_dense`), `tolist`, `nonzero`, boolean
masks in indexing, `masked_select`, `unique`, `repeat_interleave` without an output size,
`equal`, and `bincount` (which reads its largest value to size the output). On CPU none of them
waits for anything, so the CPU tests count them instead; tests/gpu checks the same path with
torch.cuda.set_sync_debug_mode("error").

`bincount` is counted on non-CPU tensors only: moe_train.ops.indexing.count_values uses it on CPU by
design and a scatter-add on other devices (tests/model/test_host_syncs.py checks that branch on meta).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
ALWAYS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
}


def _bool_index(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


class HostSyncCounter(TorchDispatchMode):
    """`with HostSyncCounter() as c: ...`; then c.count and c.ops (op name -> count)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self._tolist = None

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def __enter__(self):
        original = torch.Tensor.tolist
        self._tolist = original
        counter = self

        def tolist(t):  # not dispatched on CPU tensors: count it here
            counter.ops["tolist"] += 1
            return original(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in ALWAYS and not (
            func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None
        ):
            self.ops[str(func)] += 1
        elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            if _bool_index(args[1]):
                self.ops[str(func) + " (bool mask)"] += 1
        elif func is aten.bincount.default and args[0].device.type != "cpu":
            self.ops[str(func)] += 1
        return func(*args, **kwargs)
