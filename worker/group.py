"""How the workers of one group find each other: a torch.distributed TCP store hosted by rank 0.

The store's address is given (`--dist-init-addr host:port`, e.g. the StatefulSet's pod 0 behind
a headless Service) or, with a Redis URL and no address, rank 0 picks a free port, publishes
`host:port` under the group's rendezvous key and the other ranks read it from there.
"""

from __future__ import annotations

import logging
import socket
import time

from common.ports import free_port
from worker.parallel import default_backend, init_worker_group, rank_device

logger = logging.getLogger(__name__)


def _advertised_host(bind_host: str) -> str:
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return socket.gethostname()


def _listening(addr: str) -> bool:
    host, port = addr.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def resolve_init_addr(config) -> str:
    """host:port of the group's TCP store, from the flag or through Redis."""
    if config.dist_init_addr:
        return config.dist_init_addr
    if not config.redis_url:
        raise ValueError("a worker group needs --dist-init-addr or --redis-url to meet")
    from common import redis_schema as schema
    from common.redis_client import connect_sync

    client = connect_sync(config.redis_url)
    key = schema.group_rendezvous(config.model_name, config.group)
    try:
        if config.rank == 0:
            addr = f"{_advertised_host(config.host)}:{free_port('')}"
            # Expires: a later group must not find a dead rank 0's address.
            client.set(key, addr, ex=max(int(config.dist_timeout_s), 1))
            return addr
        deadline = time.monotonic() + config.dist_timeout_s
        while time.monotonic() < deadline:
            addr = client.get(key)
            # A dead rank 0's address can linger (a restarted group): wait for one that answers.
            if addr is not None and _listening(schema.text(addr)):
                return schema.text(addr)
            time.sleep(0.2)
        raise TimeoutError(f"rank 0 of group {config.group} never published {key}")
    finally:
        client.close()


def group_device(config) -> str:
    """This rank's device (worker/parallel.py's rank_device), every rank of the group assumed
    on this host; a single worker keeps the configured device."""
    import torch

    if config.world_size == 1 or torch.device(config.device).type != "cuda":
        return config.device
    return str(rank_device(config.device, config.rank, config.world_size,
                           torch.cuda.device_count()))


async def join_group(config) -> None:
    """Block until every rank of the group has joined (the model is built after this).
    config.device is this rank's own device (group_device)."""
    import torch

    addr = resolve_init_addr(config)
    backend = default_backend(config.device)
    device = None
    if backend == "nccl":
        # Before init_process_group: NCCL binds each rank's communicator to the current GPU.
        device = torch.device(config.device)
        torch.cuda.set_device(device)
    logger.info("joining group %s as rank %d of %d at %s (%s, %s)", config.group, config.rank,
                config.world_size, addr, backend, config.device)
    init_worker_group(config.tensor_parallel_size, config.pipeline_parallel_size, config.rank,
                      f"tcp://{addr}", backend, config.dist_timeout_s, device)
