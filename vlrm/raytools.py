"""Small helpers every Ray role uses."""
from __future__ import annotations

import socket


def node_id() -> str:
    """The Ray node id of this process, or the host name outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # Ray missing or half shut down: the host name still identifies the node
        pass
    return socket.gethostname()
