"""Both protocols on Flower (``pip install fed-distill[flower]``).

* :mod:`.client_app` -- the ``ClientApp``: one party/client, its private data and its model in
  the node's state; answers the server's messages with the protocol steps of ``federated/``.
* :mod:`.server_app` -- the ``ServerApp``: drives one-shot FL or FedMD (:mod:`.server_fedmd`)
  through Flower messages (:mod:`.exchange`), validates every reply on arrival and leaves faulty
  clients out with a logged reason.
* :mod:`.runner` -- ``fed-distill flower oneshot|fedmd``: Flower's simulation engine, or real
  processes (a SuperLink and N SuperNodes).

The core package never imports this subpackage; only it imports ``flwr``.
"""

from __future__ import annotations

import os

from fed_distill.errors import FlowerError

# Flower's telemetry and update checks off; Ray on loopback only. Set before flwr is imported.
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def quiet_flower_env() -> None:
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


def require_flower() -> None:
    """Raise FlowerError (one line) when flwr is not installed."""
    quiet_flower_env()
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise FlowerError("Flower is not installed; pip install fed-distill[flower]") from None
