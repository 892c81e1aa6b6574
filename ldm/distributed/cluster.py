"""Connecting to Ray: ``local`` starts a cluster of this machine alone, on loopback (127.0.0.1), and
stops it afterwards; an ADDRESS (``HOST:PORT`` of a running cluster's head, or ``ray://HOST:PORT``
through Ray Client) joins one that others run. A process already connected keeps its connection."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

log = logging.getLogger(__name__)

INSTALL_HINT = ("Ray is not installed; --ray local|ADDRESS needs the optional extra: "
                "pip install -r requirements-ray.txt, or run through ./launch.sh --ray ...")


def import_ray():
    """The ``ray`` module, or a ValueError that says how to install it."""
    try:
        import ray
    except ImportError as error:
        raise ValueError(f"{INSTALL_HINT} ({error})") from None
    return ray


def _local_environment() -> None:
    """A local cluster binds to loopback only (Ray's default node address is the machine's network
    address) and sends no usage statistics. Ray reads the first at import, so this runs before it."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@contextmanager
def connected(address: str, *, num_cpus: int | None = None):
    """Ray, connected to ``address`` ("local" or a cluster's address) for the ``with`` block; a cluster
    it started is stopped at the end, a connection it opened closed."""
    if address == "local":
        _local_environment()
    ray = import_ray()
    if ray.is_initialized():
        log.info("using this process's Ray connection (%s)", address)
        yield ray
        return
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
    else:
        try:
            ray.init(address=address, configure_logging=False)
        except ConnectionError as error:
            raise ValueError(f"--ray {address}: cannot connect to a Ray cluster there ({error}); give the head's "
                             "HOST:PORT (ray start --head prints it), ray://HOST:PORT, local or none") from None
        except ImportError as error:  # ray:// goes through Ray Client, which needs the client extra
            raise ValueError(f"--ray {address}: {error}; a ray:// address needs Ray Client: pip install "
                             "'ray[client]' at the version of requirements-ray.txt, or give the head's HOST:PORT") from None
    try:
        yield ray
    finally:
        ray.shutdown()
