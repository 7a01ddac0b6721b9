"""RecordKdopsOps: the kdops operators that reach the dispatcher inside a block (shared by the
test modules that check which ops a call runs, and with which arguments)."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class RecordKdopsOps(TorchDispatchMode):
    """Records every kdops::* operator call inside the block: ``ops`` their names, ``calls``
    (name, args) pairs."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "kdops":
            self.ops.append(str(func))
            self.calls.append((str(func), args))
        return func(*args, **(kwargs or {}))
