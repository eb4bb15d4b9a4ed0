"""The Ray Serve request router that honours placement: calls pinned to one replica.

The ingress decides placement once (router/policies.py) and names the chosen replica in
the call itself, as the keyword argument PIN_KWARG:

    handle.options(stream=True).generate.remote(request_json, tandem_replica="x7k2...")

Ray Serve runs this router in the caller's process for every call through a handle of
the deployment (it is set in the deployment's `request_router_config`). For each pending
request `choose_replicas` returns one rank of candidates; Serve then probes their queue
lengths and sends the request to the shortest queue that still has room
(`max_ongoing_requests`), backing off and asking again when none has:

    pin names a live replica    -> [[that replica]]   it alone; the request waits for room
                                                      there rather than losing its placement
    no pin, or the pinned one   -> [[two at random]]  Serve's power-of-two choices: the
    is gone (died, scaled down)                       shorter of two random queues

A replica that died stays among the candidates until the controller notices; its queue
probe fails meanwhile, so the request backs off and is routed again, by then to a live
replica. The callee learns where it landed (serve.get_replica_context()) and reports it
in its reply, which is how the caller notices a fallback.

Requests are matched to their own routing decision (no FIFOMixin): with FIFO matching a
replica chosen for one pinned request could be handed to another request.

Serve pickles this module by value into every caller (RequestRouterConfig), so it
imports nothing of ours.
"""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

PIN_KWARG = "tandem_replica"
# The keyword argument that carries the target replica's id (ReplicaID.unique_id).


def pinned_replica(pending_request: PendingRequest | None) -> str:
    """The replica id a request is pinned to, or "" when it names none."""
    if pending_request is None:
        return ""
    pin = pending_request.kwargs.get(PIN_KWARG, "")
    return pin if isinstance(pin, str) else ""


class PinnedReplicaRouter(RequestRouter):
    """Routes a call to the replica its PIN_KWARG names; falls back to power-of-two
    choices when it names none or that replica is not among the live ones."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        pin = pinned_replica(pending_request)
        if pin:
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == pin:
                    return [[replica]]
        if len(candidate_replicas) <= 2:
            return [list(candidate_replicas)]
        return [random.sample(candidate_replicas, 2)]
