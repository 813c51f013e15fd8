"""A dispatch mode that records the ops which read a tensor's value on the host. On a GPU each such read makes the
CPU wait until everything queued before it has run, so the GPU then idles while the CPU queues the next kernels.
With `host_data=True` it also records tensors made from host data (`torch.tensor(list)`): a host-to-device copy."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

READS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "masked_select", "masked_scatter", "tolist"}
INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}  # a bool mask index is a nonzero inside
HOST_DATA = {"lift_fresh", "lift_fresh_copy"}


class HostReads(TorchDispatchMode):
    def __init__(self, host_data: bool = False):
        super().__init__()
        self.recorded = READS | (HOST_DATA if host_data else set())
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.recorded or (name in INDEXING and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))
