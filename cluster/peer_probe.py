"""How a decode replica tells that a prefill peer is gone (the probe of
tandem.workers.disagg.peers.PeerWatch), from what Ray and the registry know:

    Ray: the peer's Serve replica actor is dead     killed, crashed, its node lost:
         (its name is released at death)            known at once. Its registry record
                                                    is evicted, so every ingress stops
                                                    placing there at its next registry
                                                    poll, not at the record's TTL.
    registry: the peer's record was seen fresh      stopped (SIGSTOP, hung host) or
         here and now is stale or gone              deregistered: its heartbeat stands
                                                    still for stale_after_s

A peer the probe cannot judge (Redis down, never seen) is not gone: the transfer
deadline still bounds the wait.
"""

from __future__ import annotations

import logging

import ray

from tandem.workers.control_plane import ControlPlaneUnavailable, WorkerRegistry

log = logging.getLogger(__name__)

SERVE_NAMESPACE = "serve"
_MAX_REMEMBERED = 4096


def replica_actor_name(app_name: str, deployment: str, replica_id: str) -> str:
    """The Ray actor name Serve gives a replica (ReplicaID.to_full_id_str)."""
    return f"SERVE_REPLICA::{app_name}#{deployment}#{replica_id}"


class PrefillPeerProbe:
    """Callable: peer replica ids -> those gone now. Blocking; run off the event loop."""

    def __init__(self, registry: WorkerRegistry, app_name: str, deployment: str) -> None:
        """registry: a reader with `stale_after_s` set (this probe's own)."""
        if registry.stale_after_s is None:
            raise ValueError("PrefillPeerProbe needs a registry reader with stale_after_s")
        self._registry = registry
        self._app_name = app_name
        self._deployment = deployment
        self._seen: set[str] = set()
        # peers this probe has seen with a fresh heartbeat
        self._dead: set[str] = set()
        # peers Ray reported dead (Serve never reuses a replica id)

    def __call__(self, peers: frozenset[str]) -> frozenset[str]:
        fresh: set[str] | None
        try:
            fresh = {w.replica_id for w in self._registry.live_workers("prefill")}
        except ControlPlaneUnavailable:
            fresh = None  # Redis down: judge by Ray alone
        if fresh is not None:
            if len(self._seen) > _MAX_REMEMBERED:
                self._seen.clear()
            self._seen |= fresh
        gone = set()
        for peer in peers:
            if peer in self._dead or self._actor_dead(peer):
                gone.add(peer)
            elif fresh is not None and peer in self._seen and peer not in fresh:
                gone.add(peer)
        return frozenset(gone)

    def _actor_dead(self, peer: str) -> bool:
        name = replica_actor_name(self._app_name, self._deployment, peer)
        try:
            ray.get_actor(name, namespace=SERVE_NAMESPACE)
            return False
        except ValueError:
            pass  # no live actor of that name: it died (or never was one)
        if len(self._dead) > _MAX_REMEMBERED:
            self._dead.clear()
        self._dead.add(peer)
        self._evict(peer)
        return True

    def _evict(self, peer: str) -> None:
        try:
            record = self._registry.get(peer)
            if record is not None and self._registry.evict(peer, record.incarnation):
                log.warning("evicted the registry record of dead prefill replica %s", peer)
        except (ControlPlaneUnavailable, ValueError) as err:
            log.info("could not evict dead prefill replica %s: %s", peer, err)
