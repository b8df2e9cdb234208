"""A NCCL communicator called directly (ctypes), for collectives inside CUDA graphs.

torch.distributed's NCCL process group tracks every collective for its watchdog thread, and
capturing a decode graph around its all-reduces hung on the first two-GPU run. Calling
libnccl's ncclAllReduce / ncclAllGather on the current stream leaves nothing to track: the
collective is one more kernel, captured like the others. The library is the one PyTorch
itself loaded (its wheels ship libnccl.so.2), so no second NCCL is installed.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys
import threading

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_NCCL_SUCCESS = 0
_NCCL_SUM = 0
_NCCL_DTYPES = {
    torch.int8: 0, torch.uint8: 1, torch.int32: 2, torch.int64: 4,
    torch.float16: 6, torch.float32: 7, torch.float64: 8, torch.bfloat16: 9,
}


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


def _library_candidates() -> list[str]:
    """Where libnccl may be: PAGEDLLM_NCCL_LIBRARY alone when set; else the soname (found if
    PyTorch already loaded it), then the nvidia-nccl wheels beside PyTorch."""
    chosen = os.environ.get("PAGEDLLM_NCCL_LIBRARY")
    if chosen:
        return [chosen]
    names = ["libnccl.so.2", "libnccl.so"]
    for base in sys.path:
        names += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libnccl.so*")))
    return names


def load_nccl() -> ctypes.CDLL:
    """libnccl with the signatures used here; RuntimeError naming where it looked."""
    torch.cuda.init()  # PyTorch's CUDA libraries (and its NCCL) are loaded from here on
    tried = []
    for name in _library_candidates():
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            tried.append(name)
            continue
        _declare(lib)
        return lib
    raise RuntimeError(
        f"could not load NCCL (libnccl.so.2); tried {', '.join(tried)}. PyTorch's CUDA "
        "wheels ship it; else set PAGEDLLM_NCCL_LIBRARY to its path")


def _declare(lib: ctypes.CDLL) -> None:
    c = ctypes
    lib.ncclGetErrorString.restype = c.c_char_p
    lib.ncclGetErrorString.argtypes = [c.c_int]
    lib.ncclGetVersion.argtypes = [c.POINTER(c.c_int)]
    lib.ncclGetUniqueId.argtypes = [c.POINTER(_UniqueId)]
    lib.ncclCommInitRank.argtypes = [c.POINTER(c.c_void_p), c.c_int, _UniqueId, c.c_int]
    lib.ncclAllReduce.argtypes = [c.c_void_p, c.c_void_p, c.c_size_t, c.c_int, c.c_int,
                                  c.c_void_p, c.c_void_p]
    lib.ncclAllGather.argtypes = [c.c_void_p, c.c_void_p, c.c_size_t, c.c_int, c.c_void_p,
                                  c.c_void_p]
    lib.ncclBroadcast.argtypes = [c.c_void_p, c.c_void_p, c.c_size_t, c.c_int, c.c_int,
                                  c.c_void_p, c.c_void_p]
    lib.ncclCommAbort.argtypes = [c.c_void_p]


class NcclCommunicator:
    """One NCCL communicator over the ranks of a torch.distributed group, each on its
    current CUDA device. Collectives run on the current stream (so they can be captured
    in a CUDA graph) and work in place or into a new tensor, like their torch equivalents."""

    def __init__(self, rank: int, world_size: int, process_group: object,
                 lib: ctypes.CDLL) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._lib = lib
        self._lock = threading.Lock()  # abort may come from a monitor thread
        uid = _UniqueId()
        if rank == 0:
            self._check(self._lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        box = [bytes(uid)]
        dist.broadcast_object_list(box, src=0, group=process_group, device=self.device)
        uid = _UniqueId.from_buffer_copy(box[0])
        comm = ctypes.c_void_p()
        with torch.cuda.device(self.device):
            self._check(self._lib.ncclCommInitRank(ctypes.byref(comm), world_size, uid, rank),
                        "ncclCommInitRank")
        self._comm: ctypes.c_void_p | None = comm
        version = ctypes.c_int()
        self._lib.ncclGetVersion(ctypes.byref(version))
        logger.debug("NCCL %d communicator: rank %d of %d on %s", version.value, rank,
                     world_size, self.device)

    def _check(self, result: int, call: str) -> None:
        if result != _NCCL_SUCCESS:
            reason = self._lib.ncclGetErrorString(result).decode(errors="replace")
            raise RuntimeError(f"{call} failed on rank {self.rank}: {reason} (NCCL error "
                               f"{result})")

    def _handle(self) -> ctypes.c_void_p:
        if self._comm is None:
            raise RuntimeError("The NCCL communicator was aborted (the engine stopped or a rank "
                               "failed).")
        return self._comm

    @staticmethod
    def _dtype(x: torch.Tensor) -> int:
        try:
            return _NCCL_DTYPES[x.dtype]
        except KeyError:
            raise TypeError(f"NCCL collectives do not take {x.dtype} tensors") from None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (x must be contiguous); returns x."""
        assert x.is_contiguous() and x.device == self.device, (x.device, self.device)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self._check(self._lib.ncclAllReduce(x.data_ptr(), x.data_ptr(), x.numel(),
                                            self._dtype(x), _NCCL_SUM, self._handle(),
                                            stream), "ncclAllReduce")
        return x

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """Rank src's x on every rank, in place (x must be contiguous); returns x."""
        assert x.is_contiguous() and x.device == self.device, (x.device, self.device)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self._check(self._lib.ncclBroadcast(x.data_ptr(), x.data_ptr(), x.numel(),
                                            self._dtype(x), src, self._handle(), stream),
                    "ncclBroadcast")
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x stacked along a new first dimension: [world_size, *x.shape]."""
        x = x.contiguous()
        out = torch.empty((self.world_size, *x.shape), dtype=x.dtype, device=x.device)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self._check(self._lib.ncclAllGather(x.data_ptr(), out.data_ptr(), x.numel(),
                                            self._dtype(x), self._handle(), stream),
                    "ncclAllGather")
        return out

    def abort(self) -> None:
        """Free the communicator without waiting on any peer (ncclCommAbort): collectives
        blocked on a dead peer return, and a clean shutdown never hangs on one. Safe from
        another thread and idempotent; the communicator is unusable afterwards."""
        with self._lock:
            comm, self._comm = self._comm, None
            if comm is not None:
                self._lib.ncclCommAbort(comm)
