"""Cap how often one task message is redelivered after its worker process died.

With ``task_acks_late`` and ``task_reject_on_worker_lost`` a task whose process
is killed (the kernel's OOM killer, a SIGKILL) goes back to its queue, so no
work is lost. A task that kills its process EVERY time, though, comes back
forever: a poison message that keeps a worker busy dying. ``DeliveryCappedTask``
counts the deliveries of each task id in Redis and fails the task permanently,
without running its body, once it has been delivered more than
``max_deliveries`` times.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task

logger = logging.getLogger(__name__)

# Schemes redis-py can open; any other result backend leaves the cap off.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# A counter must outlive the longest wait between two deliveries: a message
# requeued behind a backlog, or one Redis redelivers after the visibility timeout.
MIN_COUNTER_TTL = 24 * 3600

# One client (and connection pool) per Redis URL and process; redis-py resets a pool after a fork.
_clients: dict[str, redis.Redis] = {}


class DeliveryLimitExceeded(Exception):
    """A task was delivered more than its max_deliveries; it fails instead of running again."""


class DeliveryCappedTask(Task):
    """A Task base that fails a task delivered more than ``max_deliveries`` times.

    Set it per app (``Celery(task_cls=DeliveryCappedTask)``) or per task
    (``@app.task(base=DeliveryCappedTask)``); override the cap per task with
    ``@app.task(max_deliveries=5)``. ``None`` or 0 turns it off.
    """

    max_deliveries: int | None = 3
    # Redis key of a counter: <prefix>:<task id>:<retries>. A retry reuses the
    # task id, so each retry counts its own deliveries.
    delivery_key_prefix = "celery:deliveries"
    # Seconds a counter lives; None derives it from the visibility timeout.
    delivery_counter_ttl: int | None = None

    _delivery_warned = False

    def delivery_key(self, task_id: str) -> str:
        return f"{self.delivery_key_prefix}:{task_id}:{self.request.retries or 0}"

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        if not self.max_deliveries or self.request.is_eager:
            return
        count = self._count_delivery(task_id)
        if count is not None and count > self.max_deliveries:
            raise DeliveryLimitExceeded(
                f"task {task_id} ({self.name}) was delivered {count} times; each of the first {count - 1} "
                "deliveries killed its worker process before the task finished (an OOM kill?), so it "
                f"fails now instead of running again (max_deliveries={self.max_deliveries})"
            )

    def after_return(  # noqa: PLR0917 -- Celery's own signature
        self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        # The body ended (or was refused): the counter is only needed by deliveries
        # that never get here, so drop it rather than keep a key per task in the broker.
        if not self.max_deliveries or self.request.is_eager:
            return
        client = self._delivery_client()
        if client is None:
            return
        try:
            client.delete(self.delivery_key(task_id))
        except redis.RedisError as exc:
            logger.warning("could not drop the delivery counter of task %s: %s", task_id, exc)

    def _count_delivery(self, task_id: str) -> int | None:
        """This delivery's number, or None when Redis cannot say (the task then runs: fail open)."""
        client = self._delivery_client()
        if client is None:
            return None
        try:
            with client.pipeline(transaction=True) as pipe:
                pipe.incr(self.delivery_key(task_id))
                pipe.expire(self.delivery_key(task_id), self._counter_ttl())
                count, _ = pipe.execute()
        except redis.RedisError as exc:
            logger.warning("delivery cap skipped for task %s: Redis did not answer: %s", task_id, exc)
            return None
        return int(count)

    def _counter_ttl(self) -> int:
        if self.delivery_counter_ttl:
            return int(self.delivery_counter_ttl)
        visibility = (self.app.conf.broker_transport_options or {}).get("visibility_timeout", 3600)
        return max(MIN_COUNTER_TTL, int(visibility) * ((self.max_deliveries or 0) + 1))

    def _delivery_client(self) -> redis.Redis | None:
        """A client of the result backend's Redis, or None when the backend is not Redis."""
        url = str(self.app.conf.result_backend or "")
        if not url.startswith(REDIS_SCHEMES):
            if not DeliveryCappedTask._delivery_warned:
                DeliveryCappedTask._delivery_warned = True
                logger.warning(
                    "delivery cap is off: the result backend %r is not Redis", url.split(":", maxsplit=1)[0]
                )
            return None
        if url not in _clients:
            # Timeouts: a paused Redis must not hang the task it guards.
            _clients[url] = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        return _clients[url]
