"""fed-distill: federated learning where clients share knowledge, not gradients."""

import os as _os

# OpenMP threads that spin while waiting turn a busy 2-core machine into a 10x slowdown for
# small models; passive waiting costs nothing when the machine is idle. Must precede torch import.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
