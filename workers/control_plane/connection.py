"""Redis connections for the control plane: client settings, key names, URL redaction.

Every control-plane object owns one `redis.Redis` client built by `make_client`. The
settings are chosen so that a Redis restart (RELIABILITY target 13) costs seconds, not
minutes: short connect and socket timeouts, a few quick retries with capped jittered
backoff, and a health-check PING on connections that sat idle (a connection to a Redis
that restarted is dead, and the PING finds out before a real command does). The objects
that run in a worker's engine process (registry heartbeats, the KV event publisher) do
their Redis I/O on their own background threads and loop on failures themselves, so the
client-level retries only smooth over blips.

Key layout (everything under one cluster prefix, so several clusters can share a Redis):

    tandem:{cluster}:epoch              string   random id; changes when Redis lost its data
    tandem:{cluster}:workers            set      replica ids that registered (lazily pruned)
    tandem:{cluster}:worker:{replica}   string   WorkerInfo JSON, expires after the TTL
    tandem:{cluster}:kv:{replica}       stream   the replica's KV block events
"""

from __future__ import annotations

import re
import uuid
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.retry import Retry

# A connection attempt to a live Redis on a LAN takes milliseconds; one second is a dead peer.
CONNECT_TIMEOUT_S = 1.0
# Non-blocking commands answer in milliseconds; a reply this late means the peer is gone.
SOCKET_TIMEOUT_S = 2.0
# Idle connections are PINGed before reuse after this long, catching ones a restart killed.
HEALTH_CHECK_INTERVAL_S = 5
# Retries of one command after a connection error: with the backoff capped at 0.25 s a
# command gives up within about a second, and the background loops try again later.
COMMAND_RETRIES = 3
BACKOFF_BASE_S = 0.02
BACKOFF_CAP_S = 0.25

_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_REDACTED = "***"


class ControlPlaneUnavailable(ConnectionError):
    """Redis could not be reached (after the client's retries); the caller may try later."""


def validate_cluster_name(cluster: str) -> str:
    """Return `cluster` if it can be a key segment; raise ValueError naming `cluster`."""
    if not isinstance(cluster, str) or not _CLUSTER_NAME.match(cluster):
        raise ValueError(f"cluster must match {_CLUSTER_NAME.pattern}, got {cluster!r}")
    return cluster


class KeySpace:
    """The Redis key names of one cluster (see the module docstring for the layout)."""

    def __init__(self, cluster: str = "default") -> None:
        self.cluster = validate_cluster_name(cluster)
        self.prefix = f"tandem:{cluster}:"
        self.epoch = self.prefix + "epoch"
        self.workers = self.prefix + "workers"
        self._worker_prefix = self.prefix + "worker:"
        self._stream_prefix = self.prefix + "kv:"

    def worker(self, replica_id: str) -> str:
        return self._worker_prefix + replica_id

    def kv_stream(self, replica_id: str) -> str:
        return self._stream_prefix + replica_id

    def replica_of_stream(self, stream: str) -> str:
        """Inverse of `kv_stream` (replica ids may contain ':', so strip, never split)."""
        if not stream.startswith(self._stream_prefix):
            raise ValueError(f"stream {stream!r} is not a KV stream of cluster {self.cluster!r}")
        return stream[len(self._stream_prefix) :]


def new_incarnation() -> str:
    """A fresh id for one life of a worker process (or of one Redis data set, for the epoch)."""
    return uuid.uuid4().hex


def redact_url(url: str) -> str:
    """`url` with any password (userinfo or `?password=`) replaced by `***`, for logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable redis url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostport = netloc.rsplit("@", 1)
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{_REDACTED}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, _REDACTED if k.lower() == "password" else v) for k, v in pairs], safe="*"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def make_client(url: str, *, socket_timeout_s: float = SOCKET_TIMEOUT_S) -> redis.Redis:
    """A Redis client for `url` with the control plane's timeouts and retry policy.

    `socket_timeout_s` must exceed the longest blocking command the client issues
    (the event reader's blocking XREAD raises it). Responses are decoded as UTF-8 str.
    """
    if not isinstance(url, str) or not url:
        raise ValueError("redis_url must be a non-empty redis:// or rediss:// URL")
    retry = Retry(
        ExponentialWithJitterBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S),
        COMMAND_RETRIES,
        supported_errors=(redis.ConnectionError, redis.TimeoutError),
    )
    try:
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            # RESP2 pinned: XREAD replies have another shape under RESP3 (a URL could ask).
            protocol=2,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=socket_timeout_s,
            socket_keepalive=True,
            health_check_interval=HEALTH_CHECK_INTERVAL_S,
            retry=retry,
        )
    except ValueError as error:
        # redis-py's message can quote the URL; ours never shows the password.
        shown = redact_url(url)
        raise ValueError(f"redis_url {shown} is not valid: {type(error).__name__}") from None
    if str(client.connection_pool.connection_kwargs.get("protocol")) != "2":
        raise ValueError(f"redis_url {redact_url(url)} must not set protocol (RESP2 is used)")
    return client


def is_connection_error(error: BaseException) -> bool:
    """True for failures that a later attempt may not see (Redis down, restarting, loading)."""
    if isinstance(error, AuthenticationError | AuthorizationError):
        return False
    return isinstance(error, redis.ConnectionError | redis.TimeoutError | OSError)


def raise_if_unavailable(error: BaseException) -> None:
    """Raise `ControlPlaneUnavailable` (chained to `error`) if `error` is a connection failure."""
    if is_connection_error(error):
        message = f"redis unavailable: {type(error).__name__}: {error}"
        raise ControlPlaneUnavailable(message) from error


def check_epoch(pipe: redis.client.Pipeline, keys: KeySpace) -> None:
    """Queue the epoch handshake on `pipe`: its last two replies are (set?, epoch).

    Redis runs without persistence, so a restart empties it. Whoever first finds the epoch
    missing writes a fresh one (SET NX); everyone compares the value to the one they saw
    last, and a change tells them that registry entries and streams were lost.
    """
    pipe.set(keys.epoch, new_incarnation(), nx=True)
    pipe.get(keys.epoch)


class OutageLog:
    """Logs the start and the end of a run of failures once each, not once per attempt.

    Background loops retry every fraction of a second while Redis is down; one warning
    when the outage starts and one line when it ends keep the log readable. Messages name
    the redacted URL and the error type and text (redis-py's texts carry host and port,
    never the password).
    """

    def __init__(self, logger, what: str, url: str) -> None:
        self._logger = logger
        self._what = what
        self._where = redact_url(url)
        self.failures = 0

    def failed(self, error: BaseException) -> None:
        if self.failures == 0:
            self._logger.warning(
                "%s: redis at %s unavailable (%s: %s); retrying in the background",
                self._what,
                self._where,
                type(error).__name__,
                error,
            )
        self.failures += 1

    def succeeded(self) -> None:
        if self.failures:
            self._logger.info(
                "%s: redis at %s reachable again after %d failed attempts",
                self._what,
                self._where,
                self.failures,
            )
        self.failures = 0
