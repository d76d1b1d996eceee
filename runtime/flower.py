"""flower: a fleet's federated rounds on Flower's simulation engine (its Ray backend), one simulated
SuperNode per device. Flower is the `fleet` extra (pip install 'fgcompile[fleet]'), imported here only.

    server   a ServerApp whose main runs fleet.federated: each round it sends every node the global state
             and the round number, collects their uploads and applies them (fleet.Server) in device order
    client   a ClientApp: the node's partition id is its device; it loads the compiled folder and the fleet
             data once per worker process (at the driver's paths: one host or a shared filesystem) and runs
             fleet.device_round
The bytes a device sends are the Upload's payload; what else Flower adds to a message is its own.
"""
from __future__ import annotations

import functools
import logging
import time

import numpy as np

from fgcompile import cluster
from fgcompile.errors import BackendError
from . import fleet

INSTALL = "pip install 'fgcompile[fleet]'"
REGISTER_TIMEOUT = 120.0   # seconds for the simulated nodes to register with the server


def import_flower():
    try:
        import flwr  # noqa: F401
        from flwr.simulation import run_simulation  # noqa: F401  (needs ray too)
    except ImportError as exc:
        raise BackendError(f"--backend flower: Flower is not installed here ({exc}). Install it with `{INSTALL}`, "
                           "or leave out --backend flower to simulate the devices in this process.") from None
    return flwr


def federated(setup, schedule: fleet.Schedule, kind: str, devices: int, address: str | None = None,
              echo=None) -> tuple[dict, list[list[fleet.Upload]]]:
    """fleet.federated on Flower. setup() -> (program, server, devices) builds what both sides need from the
    driver's files; it is called once here and once in each worker process."""
    import_flower()
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    result, cached = {}, functools.partial(_once, setup)
    server_app, client_app = ServerApp(), ClientApp()

    @server_app.main()
    def main(grid: Grid, context: Context):
        program, server, fleet_devices = cached()
        nodes = _registered(grid, devices)

        def run_round(tensors: dict, r: int) -> list[fleet.Upload]:
            state = ArrayRecord({name: _array(v) for name, v in tensors.items()})
            config = ConfigRecord({"round": r})
            replies = list(grid.send_and_receive([
                Message(RecordDict({"state": state, "config": config}), dst_node_id=n, message_type=MessageType.TRAIN)
                for n in nodes]))
            failed = [m.error for m in replies if m.has_error()]
            if failed or len(replies) != len(nodes):
                raise BackendError(f"--backend flower: round {r + 1}: {len(failed)} of {len(nodes)} devices failed "
                                   f"({failed[0].reason[:300] if failed else 'no reply'}).")
            return [_upload(m.content["upload"]) for m in replies]

        result["value"] = fleet.federated(program, server, fleet_devices, schedule, kind, run_round, echo)

    @client_app.train()
    def train(msg: Message, context: Context):
        program, _, fleet_devices = cached()
        d = int(context.node_config["partition-id"])
        tensors = {name: a.numpy() for name, a in msg.content["state"].items()}
        upload, _ = fleet.device_round(program, tensors, fleet_devices[d], int(msg.content["config"]["round"]),
                                       schedule, kind)
        return Message(RecordDict({"upload": ConfigRecord({
            "device": upload.device, "round": upload.round, "kind": upload.kind, "steps": upload.steps,
            "payload": upload.payload, "update_bytes": upload.update_bytes})}), reply_to=msg)

    quiet = [logging.getLogger(n) for n in ("flwr", "flwr.simulation")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)   # its banner and per-round INFO lines would bury fgcompile's progress
    try:
        with cluster.connected(address):
            run_simulation(server_app, client_app, num_supernodes=devices,
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    if "value" not in result:
        raise BackendError("--backend flower: the simulation ended without a result (its log above says why).")
    return result["value"]


_BUILT: dict = {}   # per process: what setup() built, keyed by its function and arguments


def _once(setup):
    """setup() once per process (a Flower worker serves many devices and rounds), keyed by value: each
    message's app may arrive unpickled anew."""
    key = (setup.func, setup.args, tuple(sorted(setup.keywords.items()))) if isinstance(setup, functools.partial) \
        else setup
    if key not in _BUILT:
        _BUILT.clear()
        _BUILT[key] = setup()
    return _BUILT[key]


def _registered(grid, n: int) -> list[int]:
    """The ids of the n simulated nodes, sorted, once they have all registered."""
    deadline = time.monotonic() + REGISTER_TIMEOUT
    while len(nodes := sorted(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise BackendError(f"--backend flower: {len(nodes)} of {n} simulated devices registered within "
                               f"{REGISTER_TIMEOUT:.0f} s.")
        time.sleep(0.05)
    return nodes


def _array(v: np.ndarray):
    from flwr.app import Array
    return Array(np.ascontiguousarray(v))


def _upload(record) -> fleet.Upload:
    return fleet.Upload(int(record["device"]), int(record["round"]), str(record["kind"]), int(record["steps"]),
                        bytes(record["payload"]), int(record["update_bytes"]))
