"""Rows through Ray Data: an actor pool of RowMakers (`--workers`), each making `--streams` rows at once. Ray is
imported here and only here, when a run starts: nothing else in csm_gguf needs it.

Without an address Ray starts inside this process (nothing to set up) and stops with the run; with one
(`auto`, a head's address, `ray://host:10001`) the run joins that cluster, whose every node must have
csm-gguf installed and the model at the same path. A worker process that dies is replaced by Ray Data,
which runs its unfinished batches again (actors restart, their tasks are retried).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from ..sampling import Sampling
from .worker import RowMaker

# Calls of one worker running at once: one being decoded and sent while the next one's rows generate.
CALLS_PER_WORKER = 2
QUIET_LOGGERS = {"ray.data._internal.progress": logging.ERROR,  # "progress bars disabled"
                 "ray.data._internal.execution.streaming_executor": logging.WARNING}  # "execution finished"
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
# The object store of a Ray started here: rows pass through it one batch at a time, a few MB.
OBJECT_STORE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Pool:
    """How rows are made: where, by how many workers, each with what."""

    model: str
    workers: int = 1
    streams: int = 4
    threads: int = 0  # llama.cpp threads per worker (0: all cores of its node)
    gpu_layers: int = 0
    gpus: float = 0  # GPUs Ray reserves per worker
    kv_type: str = "f16"
    address: str | None = None

    @property
    def cpus(self) -> int:
        """CPUs Ray reserves per worker."""
        return self.threads or 1


class RayMissing(ImportError):
    pass


class ClusterUnreachable(OSError):
    pass


CONNECT_S = 10  # how long joining a cluster may take to answer at all (Ray itself waits for it without end)


def check_address(address: str | None) -> None:
    """A cluster's address that answers: Ray waits without end, printing other addresses, for a head that is not
    there. 'auto' and 'local' are Ray's to find."""
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--address {address!r} is not a Ray address: give 'auto' (the cluster this machine is "
                         "part of), HOST:6379 (its head) or ray://HOST:10001 (Ray Client)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_S).close()
    except OSError as e:
        raise ClusterUnreachable(f"cannot reach the Ray cluster at {address} ({e.strerror or e}): is its head running "
                                 "(ray start --head) and its port open from here?") from None


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayMissing(f"batch synthesis runs on Ray Data, which is not installed ({e}): pip install "
                         "'csm-gguf[batch]' (or pip install 'ray[data]')") from None
    return ray


@contextmanager
def ray_session(pool: Pool) -> Iterator[None]:
    """Ray for the run: the session already open in this process, the cluster at `address`, or one started
    here (enough CPUs that every worker starts) and stopped afterwards."""
    ray = import_ray()

    if ray.is_initialized():
        yield
        return
    handler = signal.getsignal(signal.SIGTERM)
    if pool.address:
        try:
            ray.init(address=pool.address, logging_level="WARNING")
        except ConnectionError as e:  # 'auto' with no cluster on this machine: Ray's message names its own flags
            raise ClusterUnreachable(f"no Ray cluster at --address {pool.address} ({e}): start one (ray start "
                                     "--head), or leave --address out to run Ray inside this process") from None
    else:
        # Token authentication is Ray's default for a cluster it starts, and Ray warned so at every run.
        logging.getLogger(TOKEN_AUTH_LOGGER).setLevel(logging.ERROR)
        ray.init(num_cpus=max(os.cpu_count() or 1, pool.workers * pool.cpus), include_dashboard=False,
                 object_store_memory=OBJECT_STORE_BYTES, logging_level="WARNING")
    keep_sigterm(handler)
    try:
        if not pool.address:
            check_gpus(pool, ray.cluster_resources().get("GPU", 0))
        yield
    finally:
        ray.shutdown()


def check_gpus(pool: Pool, found: float) -> None:
    """A worker's --gpus on this machine, where no node can join: Ray waited for ever for a GPU it would never
    have. (A cluster's autoscaler may add GPU nodes: there Ray waits, and says so.)"""
    if pool.gpus > found:
        raise ValueError(f"--gpus {pool.gpus:g}: a worker asks for more GPUs than Ray finds on this machine "
                         f"({found:g}); leave --gpus out to run on the CPU, or run on a machine or cluster with GPUs")


def keep_sigterm(handler) -> None:
    """Put this process's Python SIGTERM handler back: ray.init installs Ray's native one over it, which ended the
    command (whose handler stops a run as Ctrl-C does, Ray shut down) with a stack dump and exit status 134."""
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def actor_pool(strategy, size: int):
    """`size` workers, each running CALLS_PER_WORKER calls at once where this Ray can (2.5x on: before, calls of an
    actor ran one at a time, and the engine waits between batches)."""
    try:
        return strategy(size=size, max_concurrent_calls_per_actor=CALLS_PER_WORKER, enable_true_multi_threading=True)
    except TypeError:
        return strategy(size=size)


def made_rows(rows: list[dict], pool: Pool, fmt: str, sampling: Sampling, voices: dict[str, Any]
              ) -> Iterator[tuple[dict, bytes | None]]:
    """(manifest entry, audio) of each row, as workers finish them, in no particular order."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # the run draws its own: rows and seconds of audio
    context.print_on_execution_start = False
    for name, level in QUIET_LOGGERS.items():  # a line for each of those, on every run, says nothing to our users
        logging.getLogger(name).setLevel(level)
    items = [{"row": json.dumps(row)} for row in rows]
    batches = math.ceil(len(items) / pool.streams)
    dataset = ray.data.from_items(items, override_num_blocks=batches)
    made = dataset.map_batches(
        RowMaker,
        batch_size=pool.streams,
        batch_format="numpy",
        compute=actor_pool(ActorPoolStrategy, min(pool.workers, batches)),  # no model loaded for nothing
        fn_constructor_kwargs=dict(model=pool.model, streams=pool.streams, threads=pool.threads,
                                   gpu_layers=pool.gpu_layers, kv_type=pool.kv_type, fmt=fmt, sampling=sampling,
                                   voices=voices),
        num_cpus=pool.cpus,
        num_gpus=pool.gpus or None,
    )
    for out in made.iter_rows():
        yield json.loads(out["row"]), out["audio"]
