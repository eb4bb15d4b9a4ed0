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

ServeActorLiveness does the Ray half for the ingress's registry reads: a worker whose
replica actor is dead leaves placement at the next registry poll (0.5 s), rather than
when its heartbeat is found stale (3 heartbeats) or a decode replica happens to probe it.
"""

from __future__ import annotations

import logging

import ray

from tandem.workers.control_plane import ControlPlaneUnavailable, WorkerInfo, WorkerRegistry

log = logging.getLogger(__name__)

SERVE_NAMESPACE = "serve"
_MAX_REMEMBERED = 4096


def replica_actor_name(app_name: str, deployment: str, replica_id: str) -> str:
    """The Ray actor name Serve gives a replica (ReplicaID.to_full_id_str)."""
    return f"SERVE_REPLICA::{app_name}#{deployment}#{replica_id}"


def actor_is_dead(app_name: str, deployment: str, replica_id: str) -> bool:
    """Whether Ray has no live actor for that Serve replica (its name is released when it
    dies). One GCS lookup, blocking."""
    try:
        ray.get_actor(replica_actor_name(app_name, deployment, replica_id), SERVE_NAMESPACE)
        return False
    except ValueError:
        return True


class ServeActorLiveness:
    """A registry reader's `alive` filter (WorkerRegistry(alive=...)): leaves out workers
    whose Serve replica actor Ray reports dead, remembered (Serve never reuses an id).
    Only a worker once seen alive here is judged dead by a failed lookup: one never seen
    (a name this app does not own) is left in, so a wrong name can only cost the fast
    path, never empty the view. One GCS lookup per listed worker and read, off the event
    loop."""

    def __init__(self, app_name: str, deployments: dict[str, str]) -> None:
        """app_name: the Serve app whose replicas the workers are (the decode handle's);
        deployments: worker role -> its Serve deployment name."""
        self._app_name = app_name
        self._deployments = deployments
        self._seen: set[str] = set()
        self._dead: set[str] = set()

    def __call__(self, workers: list[WorkerInfo]) -> list[WorkerInfo]:
        for remembered in (self._seen, self._dead):
            if len(remembered) > _MAX_REMEMBERED:
                remembered.clear()
        alive = []
        for w in workers:
            if w.replica_id in self._dead:
                continue
            deployment = self._deployments.get(w.role)
            if deployment is None:
                alive.append(w)
            elif not actor_is_dead(self._app_name, deployment, w.replica_id):
                self._seen.add(w.replica_id)
                alive.append(w)
            elif w.replica_id in self._seen:
                log.warning("%s replica %s is dead (Ray): left out", w.role, w.replica_id)
                self._dead.add(w.replica_id)
            else:
                alive.append(w)  # never seen alive: not ours to judge
        return alive


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
        if not actor_is_dead(self._app_name, self._deployment, peer):
            return False
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
