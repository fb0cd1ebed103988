"""Running work on a Ray cluster (`--ray ADDRESS|local`), for the distributed pack and merge.

Ray is an optional extra (`pip install 'tvq-cli[ray]'`); it is imported only here and only
when asked for. Every node reads the inputs and writes the output files on shared storage:
tasks receive paths and small descriptions, never tensors, and send back checksums and digests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from .errors import TvqError

LOCAL = "local"
OBJECT_STORE_BYTES = 200 * 2**20  # only small results cross: keep the store small
CONNECT_SECONDS = 5.0


def _check_reachable(address: str) -> None:
    """Fail fast on a HOST:PORT (or ray://HOST:PORT) nobody listens on: Ray itself retries
    for minutes before it gives up."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise TvqError(f"--ray: cannot reach Ray at {address}: {reason}") from None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise TvqError("--ray needs Ray: pip install 'tvq-cli[ray]'") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str) -> Iterator[Any]:
    """The `ray` module connected to the cluster at `address` ("local": a cluster of this
    machine's cores, started here and stopped after). A session already open in this process
    is used as it is."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster needs no token
    # a short folder: Ray's unix sockets live under it, and their paths are limited
    temp = tempfile.mkdtemp(prefix="tvqray-", dir="/tmp") if address == LOCAL else None
    if address != LOCAL:
        _check_reachable(address)
    try:
        if temp is not None:
            ray.init(
                object_store_memory=OBJECT_STORE_BYTES,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,  # no "Started a local Ray instance" line
                _temp_dir=temp,
            )
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as exc:  # ray raises ConnectionError, RuntimeError, ValueError, ...
        where = "start a local Ray cluster" if address == LOCAL else f"reach Ray at {address}"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TvqError(f"--ray: cannot {where}: {reason}") from None
    try:
        yield ray
    finally:
        ray.shutdown()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def run_tasks(ray: Any, work: Callable, jobs: list, cpus: int) -> list:
    """`work(job)` for every job as Ray tasks of `cpus` cores each; the results in job order.
    A task's TvqError comes back as itself (one line for the user)."""
    remote = ray.remote(num_cpus=cpus, max_retries=0)(work)
    refs = [remote.remote(job) for job in jobs]
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, TvqError):
            raise exc.cause from None
        raise
