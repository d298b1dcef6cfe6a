"""Sending messages to sites and waiting for replies, every wait bounded by a timeout.

Flower's ``grid.send_and_receive`` polls every 3 s; a push/pull loop polling every
``poll_interval`` (0.1 s) saves ~2.5 s a link. Sites are identified by their registered SuperNode
name (``NodeInfo.name``), never by what a node claims about itself.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from weckd.chain.errors import LinkError

from .wire import WireLog, content_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    ttl: float
    timeout: float
    poll: float


@dataclass(frozen=True)
class Reply:
    site: str
    message: Message
    seconds: float
    bytes_out: int
    bytes_in: int


def wait_for_sites(grid: Grid, sites: Sequence[str], timeout: float, poll: float) -> dict[str, int]:
    """Map every configured site to its node id once all are online; fail after ``timeout``."""
    start = time.monotonic()
    announced: set[str] = set()
    while True:
        online = {n.name: n.node_id for n in grid.get_nodes() if n.name}
        for name in sorted(set(online) & set(sites) - announced):
            log.info("site %s online (node %d)", name, online[name])
            announced.add(name)
        if all(s in online for s in sites):
            return {s: online[s] for s in sites}
        if time.monotonic() - start > timeout:
            missing = [s for s in sites if s not in online]
            raise LinkError(f"discovery: site(s) {', '.join(missing)} not online after {timeout:.0f}s; start "
                            "weckd-client there, check its fleet address, CA and auth key, or raise "
                            "federation.discovery_timeout")
        time.sleep(poll)


class Transport:
    """Push messages to named sites and pull their replies (records both directions on the wire log)."""

    def __init__(self, grid: Grid, nodes: dict[str, int], timing: Timing, wire: WireLog) -> None:
        self.grid, self.nodes, self.timing, self.wire = grid, nodes, timing, wire

    def exchange(self, kind: str, contents: dict[str, RecordDict], group: str, timeout: float | None = None
                 ) -> dict[str, Reply]:
        """Send ``contents[site]`` to each site; return every site's reply or raise on error/timeout."""
        limit = timeout or self.timing.timeout
        msgs = {site: Message(c, self.nodes[site], kind, ttl=self.timing.ttl, group_id=group)
                for site, c in contents.items()}
        for site, m in msgs.items():
            self.wire.record("sent", site, m)
        start = time.monotonic()
        ids = list(self.grid.push_messages(list(msgs.values())))
        site_of = dict(zip(ids, msgs))
        replies: dict[str, Reply] = {}
        while len(replies) < len(ids):
            pending = [i for i in ids if site_of[i] not in replies]
            for rep in self.grid.pull_messages(pending):
                site = site_of.get(rep.metadata.reply_to_message_id)
                if site is None or site in replies:
                    continue
                self.wire.record("received", site, rep)
                if rep.has_error():
                    raise LinkError(f"{kind} at site {site} failed: {rep.error.reason} (code {rep.error.code}); "
                                    "see that site's weckd-client log")
                replies[site] = Reply(site, rep, time.monotonic() - start, content_bytes(msgs[site].content),
                                      content_bytes(rep.content))
            if len(replies) < len(ids):
                if time.monotonic() - start > limit:
                    late = [site_of[i] for i in pending]
                    raise LinkError(f"{kind}: no reply from site(s) {', '.join(late)} within {limit:.0f}s; "
                                    "check the site or raise federation.link_timeout")
                time.sleep(self.timing.poll)
        return replies
