"""Sending messages to sites and waiting for replies, every wait bounded by a timeout.

Flower's ``grid.send_and_receive`` polls every 3 s; a push/pull loop polling every
``poll_interval`` (0.1 s) saves ~2.5 s a link, and backs off while a site works (:meth:`Timing.wait`). Where the
ServerApp can see the SuperLink's database (its own host: always, in weckd), it pulls when the database changed
instead (:class:`ChangeWait`, woken by inotify): a reply is seen as soon as the SuperLink stored it, and a link that
trains for minutes costs the SuperLink one pull per write it makes meanwhile (mostly the sites' heartbeats: one
every ~20 s a site at the default 30 s period, and one every ``WATCH_MAX_S`` at least), not one a second.
Sites are identified by their registered SuperNode name (``NodeInfo.name``), never by what a node claims about itself.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from weckd.chain.errors import LinkError
from weckd.chain.protocol import Failure, Reason, reason_from_error
from weckd.chain.watch import FileWatch

from .wire import WireLog, content_bytes

log = logging.getLogger(__name__)


MAX_POLL_S = 1.0
WATCH_MAX_S = 5.0  # with ChangeWait, the longest wait between pulls whatever the database does


@dataclass(frozen=True)
class Timing:
    ttl: float
    timeout: float
    poll: float

    def wait(self, elapsed: float) -> float:
        """Seconds until the next pull, ``elapsed`` seconds into an exchange: ``poll`` at first, then a
        twentieth of the time waited so far (a reply is late by at most ~5%), at most ``MAX_POLL_S``. A link
        that trains for minutes is then polled once a second, not ten times: the SuperLink stays quiet."""
        return min(max(self.poll, elapsed / 20.0), max(self.poll, MAX_POLL_S))


class ChangeWait:
    """Waits between pulls until the SuperLink's database changed since the last pull (``FileWatch``: inotify,
    no wake-ups in between), at most ``longest`` seconds, so a change it cannot see delays a reply by no more."""

    def __init__(self, watch: FileWatch, longest: float = WATCH_MAX_S) -> None:
        self.watch, self.longest = watch, longest

    def before_pull(self) -> None:
        """Note the database as it is just before a pull: whatever the SuperLink stores from then on (a reply that
        lands while the pull runs too) ends the next wait."""
        self.watch.mark()

    def wait(self, shortest: float) -> None:
        """At least ``shortest`` seconds, then until the database changed (or ``longest`` passed)."""
        time.sleep(shortest)
        self.watch.wait(max(0.0, self.longest - shortest))


@dataclass(frozen=True)
class Reply:
    site: str
    message: Message
    seconds: float
    bytes_out: int
    bytes_in: int


def online_sites(grid: Grid) -> dict[str, int]:
    """Registered name → node id of every site online now."""
    return {n.name: n.node_id for n in grid.get_nodes() if n.name}


def wait_for_sites(grid: Grid, sites: Sequence[str], timeout: float, poll: float,
                   on_online: Callable[[str], None] | None = None) -> dict[str, int]:
    """Map every given site to its node id, waiting up to ``timeout`` for them; those still offline are
    left out (the caller decides: fail or skip). ``on_online`` hears of each site as it comes online."""
    start = time.monotonic()
    announced: set[str] = set()
    while True:
        online = online_sites(grid)
        for name in sorted(set(online) & set(sites) - announced):
            log.info("site %s online (node %d)", name, online[name])
            announced.add(name)
            if on_online is not None:
                on_online(name)
        if all(s in online for s in sites) or time.monotonic() - start > timeout:
            return {s: online[s] for s in sites if s in online}
        time.sleep(poll)


FAILURE_OF_KIND = {"security": Failure.SITE_REFUSED, "error": Failure.SITE_ERROR, "timeout": Failure.LINK_TIMEOUT,
                   "offline": Failure.SITE_FAILED, "unavailable": Failure.SITE_FAILED}


class SiteFailure(LinkError):
    """One site did not deliver: ``kind`` is offline, unavailable, timeout, error or security; ``reason`` a
    short label for metrics (the security reason, e.g. ``replay``, where the site refused a payload)."""

    def __init__(self, site: str, kind: str, reason: str, message: str) -> None:
        super().__init__(message, FAILURE_OF_KIND.get(kind, Failure.OTHER).value)
        self.site, self.kind, self.reason = site, kind, reason

    @property
    def transient(self) -> bool:
        """Worth a retry: the site vanished or was slow (not: it refused a payload or its data is bad)."""
        return self.kind in ("offline", "unavailable", "timeout")


def failure_from_error(site: str, kind: str, code: int, reason: str) -> SiteFailure:
    """Classify a site's error reply: Flower's codes for a vanished site, else the site's refusal code
    (``weckd.chain.protocol``: an exact lookup, never a search of the text)."""
    text = f"{kind} at site {site} failed: {reason[:300]} (code {code})"
    if code in (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE):
        return SiteFailure(site, "unavailable", "node-unavailable", f"{text}; the site went offline")
    refused = reason_from_error(reason)
    if refused is None or refused is Reason.INTERNAL:
        return SiteFailure(site, "error", "site-error", f"{text}; see that site's weckd-client log")
    return SiteFailure(site, "security", refused.value, f"{text}; site {site} refused the request ({refused.value})")


@dataclass(frozen=True)
class Exchange:
    replies: dict[str, Reply]
    failures: dict[str, SiteFailure]


class Transport:
    """Push messages to named sites and pull their replies (records both directions on the wire log)."""

    def __init__(self, grid: Grid, nodes: dict[str, int], timing: Timing, wire: WireLog,
                 changes: ChangeWait | None = None) -> None:
        self.grid, self.nodes, self.timing, self.wire, self.changes = grid, nodes, timing, wire, changes

    def exchange(self, kind: str, contents: dict[str, RecordDict], group: str, timeout: float | None = None
                 ) -> dict[str, Reply]:
        """Send ``contents[site]`` to each site; return every site's reply, or raise the first SiteFailure."""
        done = self.exchange_all(kind, contents, group, timeout)
        for failure in done.failures.values():
            raise failure
        return done.replies

    def exchange_all(self, kind: str, contents: dict[str, RecordDict], group: str, timeout: float | None = None
                     ) -> Exchange:
        """Send ``contents[site]`` to each site; wait (bounded) for every reply or error.

        ``contents`` is emptied, and the messages made of it dropped, once they are pushed: while the replies are
        awaited, what the messages carried (a teacher payload) is held by the SuperLink, not here as well."""
        limit = timeout or self.timing.timeout
        msgs = {site: Message(c, self.nodes[site], kind, ttl=self.timing.ttl, group_id=group)
                for site, c in contents.items()}
        contents.clear()
        sent = {site: content_bytes(m.content) for site, m in msgs.items()}
        for site in msgs:
            self.wire.record("sent", site, msgs[site])
        start = time.monotonic()
        ids = list(self.grid.push_messages(list(msgs.values())))
        site_of: dict[str, str] = dict(zip(ids, msgs))
        msgs.clear()
        replies: dict[str, Reply] = {}
        failures: dict[str, SiteFailure] = {}
        while len(replies) + len(failures) < len(ids):
            pending = [i for i in ids if site_of[i] not in replies and site_of[i] not in failures]
            if self.changes is not None:
                self.changes.before_pull()
            pulled = list(self.grid.pull_messages(pending))
            for rep in pulled:
                found = site_of.get(rep.metadata.reply_to_message_id)
                if found is None or found in replies or found in failures:
                    continue
                site = found
                self.wire.record("received", site, rep)
                if rep.has_error():
                    failures[site] = failure_from_error(site, kind, int(rep.error.code), str(rep.error.reason))
                    continue
                replies[site] = Reply(site, rep, time.monotonic() - start, sent[site], content_bytes(rep.content))
            if len(replies) + len(failures) < len(ids):
                if time.monotonic() - start > limit:
                    for i in pending:
                        site = site_of[i]
                        failures[site] = SiteFailure(site, "timeout", "link-timeout",
                                                     f"{kind}: no reply from site {site} within {limit:.0f}s; "
                                                     "check the site or raise federation.link_timeout")
                    break
                if self.changes is not None:
                    self.changes.wait(min(self.timing.poll, self.timing.wait(time.monotonic() - start)))
                else:
                    time.sleep(self.timing.wait(time.monotonic() - start))
        return Exchange(replies, failures)
