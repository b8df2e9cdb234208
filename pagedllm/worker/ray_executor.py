"""Tensor parallelism over a Ray cluster: ranks 1..N-1 as Ray actors, possibly on other nodes.

A placement group reserves one bundle per rank ({"GPU": 1} on CUDA, {"CPU": 1} on the CPU)
packed on as few nodes as possible, bundle 0 on this node: rank 0 runs in the engine process
(it samples, next to the scheduler), so this node must hold one of the GPUs. On CUDA a small
actor holds bundle 0's GPU, so that Ray hands it to no one else, and tells which GPU it is.
Ranks meet through a TCP store on this node's address. The engine connects to the Ray
cluster that `ray.init()` finds (RAY_ADDRESS, or one started with `ray start` on this
machine) or starts a local one, which it stops again at shutdown.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.distributed.process_group import abort_tensor_parallel, destroy_tensor_parallel
from pagedllm.worker.distributed_executor import (
    WORKER_CALL_TIMEOUT_S,
    DistributedExecutor,
    WorkerFailure,
    WorkerHealth,
    register_finalizer,
)
from pagedllm.worker.worker import Worker

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120.0  # how long to wait for the cluster to fit the placement group
_ENV_PREFIXES = ("PAGEDLLM_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")  # copied to the actors


def import_ray() -> Any:
    """The ray module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("distributed_executor_backend='ray' needs Ray: "
                           "pip install 'pagedllm[ray]'") from e
    return ray


class RayWorkerActor:
    """One rank's Worker inside a Ray actor (Ray shows the actor only its own GPU)."""

    def __init__(self, config: EngineConfig, rank: int, init_method: str,
                 env: dict[str, str]) -> None:
        os.environ.update(env)
        self.worker = Worker(config, rank, init_method, gpu=0)

    def pid(self) -> int:
        return os.getpid()

    def call(self, message: bytes) -> Any:
        """Run a pickled (method, args) call; pickled once by the driver for all actors."""
        method, args = pickle.loads(message)
        return self.worker.call(method, *args)


class GpuHolder:
    """Keeps the driver's GPU bundle taken; says which GPU of the node Ray gave it."""

    def gpu_id(self) -> str:
        import ray

        return str(ray.get_gpu_ids()[0])


@dataclass
class _RayState:
    """What the executor holds in the Ray cluster, and the calls its monitor watches."""

    ray: Any
    owns_ray: bool
    placement_group: Any = None
    holder: Any = None
    actors: list[Any] = field(default_factory=list)
    pending: list[tuple[int, Any]] = field(default_factory=list)  # (rank, ObjectRef)
    lock: threading.Lock = field(default_factory=threading.Lock)
    new_calls: threading.Event = field(default_factory=threading.Event)

    def track(self, refs: list[Any]) -> None:
        with self.lock:
            self.pending.extend(enumerate(refs, start=1))
        self.new_calls.set()


class RayExecutor(DistributedExecutor):
    """Ranks 1..N-1 as Ray actors placed by a placement group."""

    backend_name = "ray"

    def _prepare(self) -> tuple[str, int | None]:
        ray = import_ray()
        owns = not ray.is_initialized()
        if owns:
            ray.init()  # RAY_ADDRESS, a `ray start` cluster of this machine, or a new one
        self.state = _RayState(ray, owns)
        self._pids: list[int] = []
        register_finalizer(self, _stop_ray, self.state, self.health)
        cuda = self.config.device.device == "cuda"
        resource = "GPU" if cuda else "CPU"
        total = ray.cluster_resources().get(resource, 0)
        if total < self.world_size:
            raise RuntimeError(
                f"tensor_parallel_size={self.world_size} needs {self.world_size} {resource}s in "
                f"the Ray cluster, which has {total:g}. Add nodes (`ray start --address=...`) "
                "or lower tensor_parallel_size.")
        ip = ray.util.get_node_ip_address()
        bundles: list[dict[str, float]] = [{resource: 1.0} for _ in range(self.world_size)]
        bundles[0][f"node:{ip}"] = 0.001  # rank 0 is this process
        from ray.util.placement_group import placement_group

        self.state.placement_group = placement_group(bundles, strategy="PACK")
        ready, _ = ray.wait([self.state.placement_group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise RuntimeError(
                f"Ray could not reserve {self.world_size} bundles of {{'{resource}': 1}} with "
                f"one on this node ({ip}) within {PLACEMENT_TIMEOUT_S:.0f} s; available: "
                f"{ray.available_resources()}.")
        if not cuda:
            return ip, None
        holder_cls = ray.remote(num_gpus=1, num_cpus=0)(GpuHolder)
        self.state.holder = holder_cls.options(scheduling_strategy=self._bundle(0)).remote()
        gpu_id = ray.get(self.state.holder.gpu_id.remote(), timeout=PLACEMENT_TIMEOUT_S)
        return ip, _local_ordinal(gpu_id)

    def _bundle(self, index: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(placement_group=self.state.placement_group,
                                                placement_group_bundle_index=index)

    def _start_workers(self, init_method: str) -> None:
        ray = self.state.ray
        cuda = self.config.device.device == "cuda"
        resources = dict(num_gpus=1, num_cpus=0) if cuda else dict(num_cpus=1)
        actor_cls = ray.remote(RayWorkerActor)
        env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
        self.state.actors = [
            actor_cls.options(**resources, scheduling_strategy=self._bundle(rank)).remote(
                self.config, rank, init_method, env)
            for rank in range(1, self.world_size)]
        self._pids = self._collect([a.pid.remote() for a in self.state.actors], "start-up")
        threading.Thread(target=_monitor, args=(self.state, self.health),
                         name="pagedllm-ray-monitor", daemon=True).start()

    def _send(self, method: str, args: tuple[Any, ...], reply: bool) -> list[Any]:
        message = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        refs = [a.call.remote(message) for a in self.state.actors]
        self.state.track(refs)
        return refs

    def _collect(self, pending: list[Any], method: str) -> list[Any]:
        ray = self.state.ray
        deadline = time.monotonic() + WORKER_CALL_TIMEOUT_S
        waiting = list(pending)
        while waiting:
            if self.health.error is not None:
                raise WorkerFailure(self.health.error)
            if time.monotonic() > deadline:
                raise WorkerFailure(f"the Ray workers did not finish {method} in "
                                    f"{WORKER_CALL_TIMEOUT_S:.0f} s")
            _, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0.2)
        try:
            return ray.get(pending)
        except ray.exceptions.RayError as e:
            rank = 1 + next((i for i, ref in enumerate(pending) if _failed(ray, ref)), 0)
            raise WorkerFailure(f"rank {rank} failed in {method}: {e}") from e

    def _find_failure(self, wait_s: float) -> str | None:
        deadline = time.monotonic() + wait_s
        while self.health.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.health.error

    def worker_pids(self) -> list[int]:
        return list(self._pids)


def _failed(ray: Any, ref: Any) -> bool:
    try:
        ray.get(ref, timeout=0)
    except Exception:  # noqa: BLE001 - any error marks the failed call
        return True
    return False


def _local_ordinal(gpu_id: str) -> int:
    """CUDA ordinal in this process of the node's GPU `gpu_id` (as Ray numbers them)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    return visible.index(gpu_id) if gpu_id in visible else int(gpu_id)


def _monitor(state: _RayState, health: WorkerHealth) -> None:
    """Watch the workers' calls; on the first that fails, kill every actor (their peers'
    gloo collectives then fail) and abort NCCL, so that the driver does not hang."""
    ray = state.ray
    while not health.closing:
        with state.lock:
            calls = dict((ref, rank) for rank, ref in state.pending)
        if not calls:
            state.new_calls.wait(timeout=1.0)
            state.new_calls.clear()
            continue
        try:
            ready, _ = ray.wait(list(calls), num_returns=len(calls), timeout=0.5)
        except Exception:  # noqa: BLE001 - Ray is shutting down
            return
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a worker's failure, whatever it is
                if health.fail(f"rank {calls[ref]} failed: {e}"):
                    logger.error("Tensor-parallel worker failed: %s", health.error)
                    _kill_actors(state)
                    abort_tensor_parallel(health.communicator)
                return
        with state.lock:
            done = set(ready)
            state.pending = [(rank, ref) for rank, ref in state.pending if ref not in done]


def _kill_actors(state: _RayState) -> None:
    for actor in [*state.actors, state.holder]:
        if actor is not None:
            try:
                state.ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass


def _stop_ray(state: _RayState, health: WorkerHealth) -> None:
    """Stop the actors, release the placement group, leave the process group, and stop
    the Ray instance if this engine started it."""
    health.closing = True
    ray = state.ray
    try:
        if ray.is_initialized():
            message = pickle.dumps(("shutdown", ()))
            refs = [a.call.remote(message) for a in state.actors]
            ray.wait(refs, num_returns=len(refs), timeout=10.0)
            _kill_actors(state)
            if state.placement_group is not None:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(state.placement_group)
    except Exception:  # noqa: BLE001 - best effort: the cluster may be gone already
        logger.warning("Could not release every Ray resource", exc_info=True)
    if health.joined:
        destroy_tensor_parallel()
    if state.owns_ray and ray.is_initialized():
        ray.shutdown()
