"""Following the controller's membership: one long poll at a time, a membership fetched only when it changed.

Every coordinator replica runs one `MembershipFollower`. `watch` returns at once
when the controller's epoch or incarnation differs from the follower's (a
restarted controller answers at once whatever its epoch), else after
`timeout_s`; the membership comes in the answer, encoded once per epoch by
the controller (no second call to fetch it), and is decoded here only when it
is new. A controller that
cannot be reached is retried; the follower keeps the last membership meanwhile,
so a controller's restart never empties a coordinator's ring.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from failover.membership import Membership, decode

log = logging.getLogger("ringpipe.coordinator")


class MembershipFollower:
    def __init__(self, controller, on_change: Callable[[Membership], None], epoch: int = 0,
                 timeout_s: float = 10.0, retry_s: float = 0.2) -> None:
        self.controller, self.on_change = controller, on_change
        self.epoch, self.incarnation = epoch, ""
        self.timeout_s, self.retry_s = timeout_s, retry_s

    async def run(self) -> None:
        while True:
            try:
                epoch, incarnation, blob = await self.controller.watch.remote(
                    self.epoch, self.incarnation, self.timeout_s
                )
                if blob is not None and (epoch, incarnation) != (self.epoch, self.incarnation):
                    membership = decode(blob)
                    self.epoch, self.incarnation = membership.epoch, incarnation
                    self.on_change(membership)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — keep routing by the last membership
                log.warning("membership watch failed (%s); retrying", exc)
                await asyncio.sleep(self.retry_s)  # a restarting controller is back within seconds
