"""cluster: Ray as the engine of `batch --backend ray` and `tune --backend ray`. Ray is the `ray` extra
(pip install 'fgcompile[ray]') and is imported here only, and only when a command asks for it.

    address    --address, else RAY_ADDRESS (as Ray's own tools read it), else none: ray.init() starts a local
               instance (or joins the one `ray start` began on this machine). An address that does not
               answer within PROBE seconds is refused before Ray's own retries, which wait for minutes.
    tasks      one CPU each, retried up to RETRIES times when their worker is lost (killed, out of memory)
    paths      workers read the models and compiled folders at the driver's paths, in its working folder: one
               host, or a shared filesystem; every file is written by the driver
    env        FGCOMPILE_* variables (FGCOMPILE_MAX_NODES) go to the workers, so a task runs as a local one
A ray.init() the caller made (a notebook, the tests) is used as it is and left running.
"""
from __future__ import annotations

import contextlib
import os
import socket

from fgcompile.errors import BackendError, SpecError

BACKENDS = ("local", "ray")
INSTALL = "pip install 'fgcompile[ray]'"
RETRIES = 3          # Ray's own default for tasks, written down: a lost worker costs a rerun, not the model
PROBE = 5.0          # seconds an address has to accept a connection


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise BackendError(f"--backend ray: Ray is not installed here ({exc}). Install it with `{INSTALL}`, or "
                           "leave out --backend ray to run on local processes.") from None
    return ray


def check_backend(backend: str, address: str | None) -> None:
    if backend not in BACKENDS:
        raise SpecError(f"--backend {backend!r}: choose {' or '.join(BACKENDS)}.")
    if address is not None and backend != "ray":
        raise SpecError(f"--address {address}: only --backend ray connects to a cluster. Add --backend ray, or "
                        "leave out --address.")


@contextlib.contextmanager
def connected(address: str | None = None):
    """Ray, connected to the cluster at `address` (see the module), for the length of the block."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    address = checked_address(address)
    env = {k: v for k, v in os.environ.items() if k.startswith("FGCOMPILE_")}
    try:
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, logging_level="WARNING",
                 log_to_driver=False)
    except Exception as exc:   # ConnectionError, RuntimeError, Ray's AuthenticationError, ValueError
        raise BackendError(_refusal(address, exc)) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def checked_address(address: str | None) -> str | None:
    """--address, else RAY_ADDRESS, else None; a cluster's address must answer within PROBE seconds."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address not in (None, "auto", "local"):
        probe(address)
    return address


def probe(address: str) -> None:
    """BackendError unless the Ray address answers within PROBE seconds."""
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise BackendError(f"--address {address}: not a Ray address; give the head node's HOST:PORT (e.g. "
                           "127.0.0.1:6379, as `ray start --head` prints it) or ray://HOST:PORT.")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE).close()
    except OSError as exc:
        raise BackendError(_refusal(address, exc)) from None


def _refusal(address: str | None, exc: Exception) -> str:
    where = f"the Ray cluster at {address}" if address else "a local Ray instance"
    why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    auth = (" A cluster with token authentication also needs RAY_AUTH_MODE=token here."
            if "auth" in str(exc).lower() else "")
    return (f"--backend ray: cannot connect to {where} ({why}).{auth} Start a cluster with `ray start --head` and "
            "pass its address (--address HOST:PORT or RAY_ADDRESS), or give neither to start a local instance.")


def task(fn):
    """submit(*args) -> ObjectRef: fn(*args) as a Ray task of one CPU, rerun when its worker is lost, run in
    the driver's working folder (relative paths, and the messages that name them, read as in a local run)."""
    remote, cwd = import_ray().remote(num_cpus=1, max_retries=RETRIES)(_in_folder), os.getcwd()
    return lambda *args: remote.remote(cwd, fn, *args)


def _in_folder(cwd: str, fn, *args):
    old = os.getcwd()
    try:
        os.chdir(cwd)
    except OSError:
        raise BackendError(f"{cwd}: the driver's working folder is not on this Ray worker's host; the workers read "
                           "the inputs at the driver's paths (run on one host, or on a shared filesystem).") from None
    try:
        return fn(*args)
    finally:
        os.chdir(old)


def cpus(ray) -> int:
    """The CPUs of the connected cluster (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
