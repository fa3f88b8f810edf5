"""The model cache: which registered versions are resident on their devices, within each
device's memory budget (`--device-memory-budget`).

A registered version is in one tier:

    resident  on its device, serving
    host      its weights in host memory (pinned, for a GPU): a page-in is one copy
    store     only its checkpoint: a page-in loads it again (meta device + mmap + assign)

Loads and page-ins make room by evicting the least recently used on-demand resident
versions that no request holds (a request holds a lease from the moment it finds its
version until it has its answer, queued requests included): evicted GPU weights move to
the host tier while `--host-memory-budget` has room, the rest drop to the store tier. A
version loaded with `residency=pinned` never leaves, nor does one compiled with CUDA graphs
(their memory pool stays with torch's compiled function). Idle versions leave only when
that makes room now. When the room is held by versions that are busy, the caller waits for
them to become idle, up to its deadline and at most ROOM_WAIT_SECONDS; when pinned
versions alone leave no room, it fails at once with RESOURCE_EXHAUSTED saying why.

A caller that has waited CLAIM_AFTER claims the room it needs (`RoomClaim`): the least
recently used versions that would make it are drained (their new requests wait, those
already queued or running finish) and evicted once idle together, and no other load or
page-in takes the room it needs meanwhile. Without a claim, versions in constant use are
never idle together, and a version that needs their room would never get in (red team
15, F1). A claim lapses after CLAIM_SECONDS (a drained version held by a long request),
unless its versions are idle together by then (it is evicting them). A claim that ends
without evicting all its versions (it lapsed, its requests left, or room came free
otherwise) keeps its device from claiming again for CLAIM_BACKOFF per CLAIM_SECONDS it
drained them: each such pause (at most CLAIM_SECONDS) is followed by four times as long
without one, so claims that evict nothing pause a device's versions at most a fifth of
the time. Claims that evict their versions are not limited: two groups of versions in
constant use that do not fit together take turns.

A Predict on a version that is not resident pages it in on its device's page-in thread
(never on a lane or the event loop); concurrent requests share one page-in. Each device
pages in one version at a time: concurrent page-ins would each hold room they reserved,
which evicts more of the versions in use (on 16 resnet18 variants with room for 4 and
16 clients, two at a time cut the hit ratio from 0.42 to 0.34), and on the CPU they
compete with the models serving. Page-in threads run at a lower CPU priority
(devices.lower_priority), so on a busy CPU resident models keep their speed. All
residency changes happen under the cache's one lock; moving weights to the host happens
under it too, a page-in from the store does not (it reserves its bytes first). The
per-request calls on the event loop (finding a page-in to wait for, a version turning
idle) never wait for that lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from modelhost.server.devices import (
    host_memory_bytes,
    lower_priority,
    oom_while,
    pinned_host_bytes,
    release_host_memory,
    release_memory,
    reported,
)
from modelhost.server.errors import (
    DeadlineExpired,
    ModelHostFailure,
    OutOfMemory,
    VersionUnloaded,
)
from modelhost.server.host_tier import HostCopy, held_bytes, hostable, layout, to_device, to_host
from modelhost.server.hosted import HOST, RESIDENT, STORE, HostedModel
from modelhost.server.metrics import Metrics
from modelhost.server.names import listing
from modelhost.server.registry import Registry

log = logging.getLogger(__name__)

DEFAULT_GPU_FRACTION = 0.9
WAIT_STEP = 0.1
"""Seconds between looks of a load or page-in that waits for busy versions to leave."""
ROOM_WAIT_SECONDS = 30.0
"""How long a load or page-in waits for busy versions to make room, whatever its
deadline: then RESOURCE_EXHAUSTED, "try again"."""
CLAIM_AFTER = 1.0
"""Seconds a load or page-in waits for busy versions before it claims their room."""
CLAIM_SECONDS = 1.0
"""How long a claim's versions may take to drain (their new requests wait meanwhile)."""
CLAIM_BACKOFF = 4.0
"""Seconds a claim that evicted nothing bars its device from claiming, per CLAIM_SECONDS
it drained its versions (4 s after one that lapsed)."""
HOST_TIER_DEVICES = frozenset({"cuda"})
"""Device types whose evicted versions keep their weights in host memory (pinned). A CPU
version would gain nothing (its weights are in host memory already); tests add "cpu" to
run the host tier's bookkeeping without a GPU."""
Key = tuple[str, int]
Deadline = float | None
"""Until when a reservation waits for room: a monotonic time, or None (no end)."""
Rebuild = Callable[[HostedModel], nn.Module]
"""Loads a version's module again from the store, on its device (models.py): within the
room reserved for it; NoRoomInTime, at once, if it finds it needs more than there is."""


def budget_bytes(setting: float, device: torch.device) -> int | None:
    """A device's budget: `setting` bytes, or a fraction (up to 1) of its total; 0: 0.9 of
    what is free now on a GPU, no limit on the CPU."""
    if setting > 1:
        return int(setting)
    if device.type != "cuda":
        return None if setting <= 0 else int(setting * host_memory_bytes())
    free, total = torch.cuda.mem_get_info(device)
    return int(DEFAULT_GPU_FRACTION * free) if setting <= 0 else int(setting * total)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n:,} bytes"


class NoRoomInTime(DeadlineExpired):
    """A load or page-in's deadline passed while others held the room it waits for."""

    def __init__(
        self,
        device: str,
        name: str,
        busy: list[HostedModel],
        loads: list[Key],
        claimed_by: Key | None = None,
    ) -> None:
        holders = [f"busy versions ({_names(busy)})"] if busy else []
        if loads:
            holders.append(f"loads and page-ins ({listing([f'{n}:{v}' for n, v in loads])})")
        if claimed_by is not None:  # the room another's claim keeps free for it
            holders.append(f"the room {claimed_by[0]}:{claimed_by[1]} claims")
        self.why = f"{' and '.join(holders) or 'nothing'} held it"
        self.device, self.name = device, name
        super().__init__(f"no room on {device} for {name!r} before the deadline: {self.why}")

    def waited_too_long(self) -> OutOfMemory:
        """The server's own wait (ROOM_WAIT_SECONDS) ended first, not the caller's."""
        return OutOfMemory(
            f"no room on {self.device} for {self.name!r} within {ROOM_WAIT_SECONDS:g} s: "
            f"{self.why}; try again"
        )


class _NoRoomYet(NoRoomInTime):
    """A page-in found its room held by busy versions: its requests wait for one of them
    to end, off the device's page-in thread, and try again (`_wait_for_page_in`); the last
    one found is what a request whose deadline passes meanwhile is told."""

    def __init__(self, found: NoRoomInTime) -> None:
        DeadlineExpired.__init__(self, str(found))
        self.why, self.device, self.name = found.why, found.device, found.name


@dataclass(eq=False)
class RoomClaim:
    """The room a load or page-in (`key`) claims on a device after waiting CLAIM_AFTER for
    busy versions: its `victims` (least recently used first) take no new requests until
    they are idle together and it evicts them, or until it lapses (`until`, unless it is
    `evicting` them by then); meanwhile others take only room it leaves free
    (`ModelCache._kept`). `over` is set as it ends, at `ended`."""

    key: Key
    nbytes: int
    victims: list[HostedModel]
    made: float  # monotonic times
    until: float
    evicting: bool = False  # its victims were idle together: it no longer lapses
    ended: float = 0.0
    over: Future[None] = field(default_factory=Future)

    @property
    def live(self) -> bool:
        return not self.over.done() and (self.evicting or time.monotonic() < self.until)

    def end(self) -> None:
        """Lets its victims take requests again (any thread, no lock)."""
        if not self.over.done():
            self.ended = time.monotonic()
        with contextlib.suppress(InvalidStateError):
            self.over.set_result(None)


@dataclass(eq=False)
class _Move:
    """An evicted version's weights on their way to the host tier, copied outside the
    cache's lock: they still hold `device_bytes` on `device` until the copy is done."""

    hosted: HostedModel
    device: str
    device_bytes: int
    host_bytes: int
    done: threading.Event = field(default_factory=threading.Event)


class ModelCache:
    """Device budgets, the residency of every registered version, evictions and page-ins."""

    def __init__(
        self,
        registry: Registry,
        metrics: Metrics,
        *,
        device_budget: float = 0.0,
        host_budget: float = 0.0,
    ) -> None:
        self._registry = registry
        self._metrics = metrics
        # A thread per device: a page-in waiting for room holds up no load, no other device.
        self._page_ins: dict[str, ThreadPoolExecutor] = {}
        self._device_setting = device_budget
        self._host_limit = int(
            host_budget if host_budget > 1 else host_budget * host_memory_bytes()
        )
        self._limits: dict[str, int | None] = {}
        self._reserved: dict[Key, tuple[str, int]] = {}  # loads and page-ins in progress
        self._waiting: set[Key] = set()  # loads and page-ins waiting for room
        self._wanting: dict[Key, float] = {}  # since when each has found no room
        self._claims: dict[str, RoomClaim] = {}  # by device, at most one
        self._no_claim_until: dict[str, float] = {}  # by device (`_drop_claim`)
        self._moves: list[_Move] = []  # evictions copying weights to the host tier
        self._returning: list[HostCopy] = []  # host copies being copied back to a device
        self._leaving: list[HostedModel] = []  # unloaded, their last requests still running
        self._cond = threading.Condition()
        self._paging = threading.Lock()  # page-in jobs and deadlines (the event loop's)
        self._idle_count = itertools.count(1)
        self._idles = 0
        # Set as the next request ends (`idle`, on any thread): page-ins waiting for room.
        self._ended: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._clock = itertools.count(1)
        self.rebuild: Rebuild | None = None  # set by Models
        metrics.watch_cache(self)

    # Budgets and accounting

    def limit(self, device: torch.device) -> int | None:
        """The device's budget in bytes (None: no limit), fixed at its first use."""
        key = str(device)
        if key not in self._limits:
            self._limits[key] = budget_bytes(self._device_setting, device)
            if self._limits[key] is not None:
                log.info("device memory budget of %s: %s", key, _gib(self._limits[key] or 0))
        return self._limits[key]

    def usage(self) -> dict[str, tuple[int, int | None]]:
        """Bytes held (resident and being loaded) and the budget, by device."""
        with self._cond:
            return {device: (self._used(device), limit) for device, limit in self._limits.items()}

    def host_usage(self) -> tuple[int, int]:
        """Bytes the host tier holds (copies in progress included), and its budget."""
        with self._cond:
            return self._host_used(), self._host_limit

    def _resident(self, device: str) -> list[HostedModel]:
        return [
            h for h in self._registry.all() if h.tier == RESIDENT and str(h.loaded.device) == device
        ]

    def _leaving_from(self, device: str) -> list[HostedModel]:
        """Unloaded versions on `device` that requests still hold."""
        return [h for h in self._leaving if h.tier == RESIDENT and str(h.loaded.device) == device]

    def _used(self, device: str, exclude: Key | None = None) -> int:
        """Bytes on `device`: resident versions (unloaded ones still answering requests
        included), loads and page-ins in progress, and weights still being copied to the
        host tier."""
        held = {(h.name, h.version): h.device_bytes for h in self._resident(device)}
        for key, (where, nbytes) in self._reserved.items():
            if where == device:
                held[key] = max(held.get(key, 0), nbytes)
        held.pop(exclude, None)  # type: ignore[arg-type]
        moving = sum(m.device_bytes for m in self._moves if m.device == device)
        leaving = sum(h.device_bytes for h in self._leaving_from(device))
        return sum(held.values()) + moving + leaving

    def _host_used(self) -> int:
        copies = sum(h.host_copy.nbytes for h in self._registry.all() if h.host_copy)
        returning = sum(copy.nbytes for copy in self._returning)
        return copies + returning + sum(m.host_bytes for m in self._moves)

    def leaving(self, remove: Callable[[], list[HostedModel]]) -> list[HostedModel]:
        """Takes versions out of the registry (`remove`, under the cache's lock: no look
        counts them twice, nor misses them): they are still counted on their devices until
        `left` (their queued and running requests hold them). Returns them."""
        with self._cond:
            removed = remove()
            self._leaving.extend(removed)
        return removed

    def left(self, hosted: HostedModel) -> None:
        """An unloaded version has been freed: its room is free for others."""
        with self._cond:
            self._leaving = [h for h in self._leaving if h is not hosted]
            self._cond.notify_all()

    # Making room

    def reserve(
        self,
        key: Key,
        device: torch.device,
        nbytes: int,
        *,
        deadline: Deadline,
        asks_again: bool = False,
        caller_gone: Callable[[], bool] | None = None,
    ) -> None:
        """Counts `nbytes` for a load or page-in of `key` on `device`, evicting least
        recently used idle versions until they fit. Waits (up to `deadline`) while busy
        versions hold the room, claiming it after CLAIM_AFTER; OutOfMemory when it cannot
        fit at all. `asks_again`: a page-in, which asks again after NoRoomInTime, keeps its
        claim and its time waited (`no_longer_wanted` ends them). `caller_gone`: whether a
        load's caller has left (then it stops waiting, with NoRoomInTime, and claims
        nothing)."""
        limit = self.limit(device)
        where = str(device)
        stale: list[torch.device] = []  # evicted modules that only a collection frees
        try:
            self._reserve(
                key,
                where,
                nbytes,
                limit=limit,
                deadline=deadline,
                stale=stale,
                asks_again=asks_again,
                caller_gone=caller_gone,
            )
        finally:
            # After the lock is released: a collection takes about 0.2 s, and
            # release_memory must not hold up every load, page-in and metrics scrape.
            for gone in dict.fromkeys(stale):
                release_memory(gone)

    def _reserve(
        self,
        key: Key,
        where: str,
        nbytes: int,
        *,
        limit: int | None,
        deadline: Deadline,
        stale: list[torch.device],
        asks_again: bool,
        caller_gone: Callable[[], bool] | None,
    ) -> None:
        """`reserve`'s work, under the lock: evicts, or waits, until `nbytes` fit; evicted
        modules only a collection frees are added to `stale`."""
        with self._cond, self._looking_for_room(key, where, asks_again):
            while limit is not None:
                idles = self._idles
                claim = self._claim_on(where)
                theirs = claim if claim is not None and claim.key != key else None
                used = self._used(where, exclude=key) + (self._kept(theirs) if theirs else 0)
                if used + nbytes <= limit:
                    break
                # Idle versions leave only when that makes room now: evicted ahead of the
                # busy ones, they were asked for again, paged back in and evicted again at
                # each look, for as long as the busy ones stayed busy (red team 15, F2).
                candidates = self._evictable(where, key, theirs)
                freed = sum(h.device_bytes for h in candidates if h.idle)
                enough = used - freed + nbytes <= limit
                if claim is not None and claim is not theirs:
                    # Its victims idle together: while it evicts them (a copy to the host
                    # tier releases the lock) they take no request, whatever the clock
                    # says (red team 16, F1). Not for room made by others (review 18, 1).
                    claim.evicting = enough and all(
                        h.tier != RESIDENT or h.retiring or h.idle for h in claim.victims
                    )
                    if claim.over.done():  # it lapsed meanwhile (a parked request saw it)
                        claim.evicting = enough = False  # the next look drops it
                if enough and self._evict_one(candidates, stale):
                    continue
                held = self._resident(where)
                pinned_bytes = sum(h.device_bytes for h in held if h.stays)
                leaving = self._leaving_from(where)
                may_leave = [h for h in held if not h.stays] + leaving
                loading = [  # may register soon
                    other
                    for other, (device, _) in self._reserved.items()
                    if other != key and device == where
                ]
                if pinned_bytes + nbytes > limit or not (may_leave or loading or self._moves):
                    raise OutOfMemory(
                        f"{key[0]!r} needs {_gib(nbytes)} on {where}, whose budget "
                        f"(--device-memory-budget) is {_gib(limit)}: pinned versions hold "
                        f"{_gib(pinned_bytes)} ({_names(h for h in held if h.stays)}), "
                        f"{_gib(used - pinned_bytes)} more is in use"
                    )
                busy = [h for h in may_leave if not h.idle]  # what it waits for
                claimed_by = theirs.key if theirs is not None and self._kept(theirs) else None
                if caller_gone is not None and caller_gone():
                    raise NoRoomInTime(where, key[0], busy, loading, claimed_by)
                since = self._wanting.setdefault(key, time.monotonic())
                if claim is None:
                    self._claim(
                        key, where, nbytes, free=limit - used, candidates=candidates, since=since
                    )
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise NoRoomInTime(where, key[0], busy, loading, claimed_by)
                self._waiting.add(key)
                if key in self._reserved and loading and self._waiting.issuperset(loading):
                    # Two loads that each hold room for their weights and each want more for
                    # their workspace would wait for each other until one's deadline: this one
                    # waits without its room (its bytes are counted again once they fit).
                    del self._reserved[key]
                    self._cond.notify_all()
                if self._idles == idles:  # no request ended since the look above
                    self._cond.wait(timeout=min(remaining or WAIT_STEP, WAIT_STEP))
            self._reserved[key] = (where, nbytes)

    @contextlib.contextmanager
    def _looking_for_room(self, key: Key, where: str, asks_again: bool) -> Iterator[None]:
        """Clears what `key`'s look for room leaves (under the lock): its mark as waiting
        (`_waiting`); once it has its room, or gives up (unless it `asks_again`), its time
        waited and its claim (`_drop_claim` says when its device may claim again)."""
        try:
            yield
        except BaseException:
            claim = self._claims.get(where)
            if claim is not None and claim.key == key:
                claim.evicting = False  # it lapses again
            if not asks_again:
                self._end_wanting(key, where, "given_up")
            raise
        else:
            self._end_wanting(key, where, "got_room")
        finally:
            self._waiting.discard(key)

    def _end_wanting(self, key: Key, where: str, outcome: str) -> None:
        """`key` has its room, or gives up: forgets its time waited, drops its claim."""
        self._wanting.pop(key, None)
        claim = self._claims.get(where)
        if claim is not None and claim.key == key:
            self._drop_claim(where, outcome)

    def no_longer_wanted(self, key: Key, device: str) -> None:
        """A page-in whose requests have all gone: its claim ends and its time waited is
        forgotten. Called on the event loop (and the page-in thread) with `_paging` held:
        it never waits for the lock. If the lock is busy, the device's page-in thread drops
        the claim once it has the lock (not at the device's next look for room, which may
        not come for a long time: a CI run once)."""
        self._wanting.pop(key, None)
        claim = self._claims.get(device)
        if claim is None or claim.key != key:
            return
        claim.end()
        if self._cond.acquire(blocking=False):
            try:
                self._drop_ended_claims()
            finally:
                self._cond.release()
        else:
            with contextlib.suppress(RuntimeError):  # the server is closing
                self._pages_in(device).submit(self._drop_ended_claims)

    # Claims

    def _drop_ended_claims(self) -> None:
        """Drops (and counts) the claims that have ended or lapsed (the lock is reentrant:
        with it held or not)."""
        with self._cond:
            for device in list(self._claims):
                self._claim_on(device)

    def _claim_on(self, device: str) -> RoomClaim | None:
        """The device's claim, if one is live (one that ended or lapsed is dropped)."""
        claim = self._claims.get(device)
        if claim is not None and not claim.live:
            # Still wanting room: it lapsed; else its requests have left.
            self._drop_claim(device, "lapsed" if claim.key in self._wanting else "given_up")
            return None
        return claim

    def _kept(self, claim: RoomClaim) -> int:
        """The room others must leave free for `claim`: what it needs beyond its victims'
        bytes (it takes those) and the room it holds already (a load's weights)."""
        victims = sum(h.device_bytes for h in claim.victims if h.tier == RESIDENT)
        held = self._reserved.get(claim.key, ("", 0))[1]
        return max(0, claim.nbytes - victims - held)

    def _drop_claim(self, device: str, outcome: str) -> None:
        """Ends a claim. Unless it got its room by evicting all its victims (or they were
        unloaded), its device claims again only after CLAIM_BACKOFF per CLAIM_SECONDS it
        drained them: one that lapsed, 4 s; one whose requests left at once, hardly any;
        one that found room elsewhere, in proportion (red team 16, F3, F4)."""
        claim = self._claims.pop(device)
        claim.end()
        claim.evicting = False
        for hosted in claim.victims:
            if hosted.claim is claim:
                hosted.claim = None
        gone = all(h.tier != RESIDENT or h.retiring for h in claim.victims)
        if outcome == "got_room" and gone:
            self._no_claim_until.pop(device, None)
        else:
            drained = min(claim.ended, claim.until) - claim.made
            backoff = max(0.0, drained) * CLAIM_BACKOFF / CLAIM_SECONDS
            self._no_claim_until[device] = claim.ended + backoff
        self._metrics.room_claims.labels(outcome).inc()
        log.info("claim of %s:%d on %s: %s", *claim.key, device, outcome.replace("_", " "))

    def _claim(
        self,
        key: Key,
        where: str,
        nbytes: int,
        *,
        free: int,
        candidates: list[HostedModel],
        since: float,
    ) -> None:
        """Claims room for `key` once it has waited CLAIM_AFTER (`since`), unless its device
        is barred (`_no_claim_until`): drains the fewest least recently used `candidates`
        that would make `nbytes` with the `free` bytes. Makes none if they cannot (loads,
        page-ins or versions leaving hold the room: it comes back by itself)."""
        now = time.monotonic()
        if now < since + CLAIM_AFTER or now < self._no_claim_until.get(where, 0.0):
            return
        victims: list[HostedModel] = []
        for hosted in candidates:
            if free >= nbytes:
                break
            victims.append(hosted)
            free += hosted.device_bytes
        if free < nbytes:
            return
        claim = self._claims[where] = RoomClaim(key, nbytes, victims, now, now + CLAIM_SECONDS)
        for hosted in victims:
            hosted.claim = claim
        log.info("%s:%d claims room on %s: draining %s", *key, where, _names(victims))

    def unreserve(self, key: Key) -> None:
        """Gives back a reservation (a load or page-in that failed, or has registered)."""
        with self._cond:
            self._reserved.pop(key, None)
            self._cond.notify_all()

    def idle(self) -> None:
        """A version's last request ended: a waiting load or page-in may evict it now.
        Called as every request ends, on the event loop, so it never waits for the lock
        (an eviction to the host tier copies under it): a waiter that misses the wake-up
        sees the count change, or looks again within WAIT_STEP."""
        self._idles = next(self._idle_count)
        ended, self._ended = self._ended, None
        if ended is not None:
            loop, event = ended
            with contextlib.suppress(RuntimeError):  # its loop has closed: nobody waits
                loop.call_soon_threadsafe(event.set)
        if self._cond.acquire(blocking=False):
            try:
                self._cond.notify_all()
            finally:
                self._cond.release()

    def _evictable(
        self, device: str, exclude: Key, claim: RoomClaim | None = None
    ) -> list[HostedModel]:
        """The on-demand versions resident on `device` (but `exclude`, and `claim`'s
        victims: their room is claimed), least recently used first."""
        claimed = {id(h) for h in claim.victims} if claim else set()
        return sorted(
            (
                h
                for h in self._resident(device)
                if not h.stays and (h.name, h.version) != exclude and id(h) not in claimed
            ),
            key=lambda h: h.used_order,
        )

    def _evict_one(self, candidates: list[HostedModel], stale: list[torch.device]) -> bool:
        """Evicts the first of `candidates` that no request holds; False if none."""
        return any(self._evict(hosted, stale) for hosted in candidates)

    def _evict(self, hosted: HostedModel, stale: list[torch.device]) -> bool:
        """Takes an idle version off its device (to the host tier when its device type has
        one and the host budget has room, else to the store); False if a request holds it.
        Called with the lock held; a copy to the host releases it while it runs. A module
        that a reference cycle keeps alive adds its device to `stale`: the caller releases
        memory there once it has let go of the lock."""
        device = hosted.loaded.device
        module = hosted.loaded.module
        pin = device.type == "cuda"  # pinned memory: what makes a page-in one fast copy
        host_bytes = 0
        if device.type in HOST_TIER_DEVICES and module is not None and hostable(module):
            host_bytes = held_bytes(layout(module)[1], pinned=pin)
            if self._host_used() + host_bytes > self._host_limit:
                host_bytes = 0
        device_bytes = hosted.device_bytes
        module = hosted.leave_device(HOST if host_bytes else STORE)
        if module is None:
            return False
        if host_bytes:
            move = _Move(hosted, str(device), device_bytes, host_bytes)
            self._moves.append(move)
            self._cond.release()
            copy = None
            try:
                copy = self._copy_to_host(hosted, module, pin)
            finally:
                del module
                self._cond.acquire()
                self._moves.remove(move)
                if copy is not None and not hosted.retiring:
                    hosted.host_copy = copy
                else:  # no host memory to be had, or unloaded meanwhile
                    hosted.tier = STORE
                move.done.set()
                self._cond.notify_all()
        else:
            gone = weakref.ref(module)
            del module
            if gone() is not None:  # a reference cycle holds it: only a collection frees it
                stale.append(device)
        evictions = self._metrics.evictions.labels  # not for a version unloaded meanwhile
        hosted.record(lambda: evictions(hosted.name, str(hosted.version), hosted.tier).inc())
        log.info("evicted %s version %d to the %s tier", hosted.name, hosted.version, hosted.tier)
        return True

    @staticmethod
    def _copy_to_host(hosted: HostedModel, module: nn.Module, pin: bool) -> HostCopy | None:
        """The module's weights in one (pinned) host buffer; None if there is none to be
        had (the version drops to the store tier)."""
        try:
            return to_host(module, pin=pin)
        except Exception:
            log.exception(
                "%s version %d could not move to host memory", hosted.name, hosted.version
            )
            return None

    # Paging in

    def _reserve_page_in(self, hosted: HostedModel, key: Key, device: torch.device) -> None:
        """Reserves `hosted`'s room now or not at all. A version not built yet (registered at
        restart) knows its workspace only from its record, or from a build that found no
        room for it: if that does not fit beside the pinned versions, it reserves its
        weights and its build measures the workspace (review 19, 1: a record written under
        another budget, or on another replica's GPU, blocked it for good)."""
        while True:  # twice at most: the second time without a workspace
            try:
                self.reserve(
                    key, device, hosted.device_bytes, deadline=time.monotonic(), asks_again=True
                )
                return
            except OutOfMemory:
                if hosted.built or not hosted.workspace_bytes:
                    raise
                hosted.workspace_bytes = 0

    def touch(self, hosted: HostedModel) -> None:
        hosted.used_order = next(self._clock)
        hosted.last_used = time.time()

    async def ensure_resident(self, hosted: HostedModel, deadline: float | None) -> bool:
        """Returns once `hosted` is on its device, paging it in if needed (one page-in
        shared by every request that waits for it): False if it was resident (a hit).
        DeadlineExpired at the deadline; a page-in that ended at the deadlines of the
        others is started again while this request has time left. A request that waited
        for a page-in is a miss whether or not it got in, unless its version was unloaded
        meanwhile (VersionUnloaded: Host.predict may send it on, counted there)."""
        await self._while_drained(hosted, deadline)
        if hosted.tier == RESIDENT:
            self._metrics.cache_requests.labels("hit").inc()
            return False
        with self._paging:
            hosted.paging_waiters += 1
        try:
            await self._wait_for_page_in(hosted, deadline)
            if hosted.tier != RESIDENT:
                raise VersionUnloaded(
                    f"model {hosted.name!r} version {hosted.version} was unloaded while it "
                    "waited to be paged in"
                )
        except BaseException as error:  # its deadline, no room, a failed load, cancelled
            if not isinstance(error, VersionUnloaded):
                self._metrics.cache_requests.labels("miss").inc()
            raise
        finally:  # in time, at its deadline, or cancelled (its caller left)
            with self._paging:
                hosted.paging_waiters -= 1
                if not hosted.paging_waiters:
                    self.no_longer_wanted((hosted.name, hosted.version), str(hosted.loaded.device))
        self._metrics.cache_requests.labels("miss").inc()
        return True

    @staticmethod
    async def _while_drained(hosted: HostedModel, deadline: float | None) -> None:
        """Waits while a claim drains `hosted` (it may be evicted meanwhile), holding it on
        its device no longer: until the claim ends or lapses, the version is unloaded (its
        unload waits for this request: red team 16, F5), or the deadline passes. Looks
        again every WAIT_STEP."""
        claim = hosted.claim
        if claim is None or not claim.live or hosted.tier != RESIDENT or hosted.retiring:
            return
        over = asyncio.wrap_future(claim.over)
        until = math.inf if deadline is None else deadline
        with hosted.parked():
            while claim.live and not hosted.retiring and time.monotonic() < until:
                step = min(WAIT_STEP, until - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(over), max(0.0, step))
        if not claim.live:
            claim.end()  # lapsed: the others it holds go on too
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExpired(
                f"model {hosted.name!r} version {hosted.version} was making room for another "
                "when the deadline passed"
            )

    async def _wait_for_page_in(self, hosted: HostedModel, deadline: float | None) -> None:
        """Waits for `hosted`'s page-in, starting one if none is running (again, if one
        ended at the deadlines of the others while this request has time left, or found
        its room held by busy versions: then once a request has ended, or WAIT_STEP on)."""
        until = math.inf if deadline is None else deadline
        no_room: _NoRoomYet | None = None
        room_since = 0.0  # when it first found no room
        while hosted.tier != RESIDENT and not hosted.retiring:
            with self._paging:
                job = hosted.paging
                if job is None or job.done():
                    # Others still waiting keep their deadlines (they set them as they came).
                    others = hosted.paging_until if hosted.paging_waiters > 1 else 0.0
                    hosted.paging_until = max(until, others)
                    pages_in = self._pages_in(str(hosted.loaded.device))
                    job = hosted.paging = pages_in.submit(self._page_in, hosted)
                    job.add_done_callback(functools.partial(_log_failure, hosted))
                else:
                    hosted.paging_until = max(hosted.paging_until, until)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            waited = asyncio.wrap_future(job)
            # Retrieved even if this request leaves first (`_log_failure` logs it once).
            waited.add_done_callback(lambda f: f.cancelled() or f.exception())
            try:
                await asyncio.wait_for(asyncio.shield(waited), remaining)
            except TimeoutError:
                raise no_room or DeadlineExpired(
                    f"model {hosted.name!r} version {hosted.version} was still being paged "
                    "in when the deadline passed"
                ) from None
            except _NoRoomYet as error:
                no_room = error
                now = time.monotonic()
                room_since = room_since or now
                if now >= until:
                    raise
                if now >= room_since + ROOM_WAIT_SECONDS:  # a deadline far off, or none
                    raise error.waited_too_long() from None
                left = min(until, room_since + ROOM_WAIT_SECONDS) - now
                await self._a_request_ended(min(left, WAIT_STEP))
            except DeadlineExpired:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    async def _a_request_ended(self, seconds: float) -> None:
        """Returns once a request has ended (`idle`), or after `seconds`: room may have come
        (loads and page-ins that end give room back too, seen at the next look)."""
        ended = self._ended
        if ended is None:
            ended = self._ended = (asyncio.get_running_loop(), asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended[1].wait(), seconds)

    def _pages_in(self, device: str) -> ThreadPoolExecutor:
        """The device's page-in thread (call with `_paging` held)."""
        if device not in self._page_ins:
            self._page_ins[device] = ThreadPoolExecutor(
                1, thread_name_prefix=f"page-in-{device}", initializer=lower_priority
            )
        return self._page_ins[device]

    def close(self) -> None:
        """Stops the page-in threads: page-ins not started are cancelled, one running is
        not waited for (its requests have ended)."""
        with self._paging:
            executors = list(self._page_ins.values())
        for executor in executors:
            executor.shutdown(wait=False, cancel_futures=True)

    def _page_in(self, hosted: HostedModel) -> None:
        """Brings a version back to its device (on its device's page-in thread), unless
        every request that wanted it has left meanwhile (passed its deadline, or was
        cancelled): under overload, page-ins nobody waits for any more would evict versions
        that are in use. It never waits for room on this thread: without room it raises
        _NoRoomYet, and its requests look again as requests end (`_wait_for_page_in`)."""
        with self._paging:
            until = _wanted_until(hosted)
        if hosted.tier == RESIDENT or hosted.retiring:
            return
        if time.monotonic() >= until:
            self._metrics.page_ins_skipped.inc()
            log.info(
                "page-in of %s version %d skipped: its requests have left (deadlines "
                "passed, or cancelled)",
                hosted.name,
                hosted.version,
            )
            return
        key = (hosted.name, hosted.version)
        device = hosted.loaded.device
        with self._cond:
            move = next((m for m in self._moves if m.hosted is hosted), None)
        if move is not None:  # evicted a moment ago: its copy to the host is still running
            move.done.wait()
        try:  # never waits on this thread: page-ins that fit go on meanwhile
            self._reserve_page_in(hosted, key, device)
        except BaseException as error:
            self._forget_if_unwanted(hosted)
            if isinstance(error, NoRoomInTime):
                raise _NoRoomYet(error) from None
            raise
        started = time.perf_counter()  # the page-in itself, after any wait for room
        tier = hosted.tier
        try:
            module = reported(
                lambda: self._bring_back(hosted, device),
                device,
                oom_while(f"paging in {hosted.name!r}", device),
            )
            with self._cond:
                hosted.return_to_device(module)
        except NoRoomInTime as error:  # a first build needed more than it had reserved
            self._forget_if_unwanted(hosted)
            raise _NoRoomYet(error) from None
        finally:
            self.unreserve(key)
        seconds = time.perf_counter() - started
        if tier == HOST and device.type == "cuda":
            self._trim_pinned()
        page_ins = self._metrics.page_ins.labels  # not for a version unloaded meanwhile
        hosted.record(lambda: page_ins(hosted.name, str(hosted.version), tier).inc())
        self._metrics.page_in_seconds.labels(tier).observe(seconds)
        log.info(
            "paged in %s version %d from the %s tier (%.3fs)",
            hosted.name,
            hosted.version,
            tier,
            seconds,
        )

    def _forget_if_unwanted(self, hosted: HostedModel) -> None:
        """After a page-in's look for room failed: if its last request left while it looked,
        what the look noted for it (its time waited, its claim) is cleared here, as that
        request's `ensure_resident` would have, had it ended after the look."""
        with self._paging:
            if not hosted.paging_waiters:
                self.no_longer_wanted((hosted.name, hosted.version), str(hosted.loaded.device))

    def _trim_pinned(self) -> None:
        """After a page-in from the host tier (its pinned buffer is free now, kept cached by
        torch's host allocator): gives cached pinned blocks back to the driver once the
        pinned memory the allocator holds passes the host tier's budget. Below it they stay
        for the next eviction to reuse (a fresh pinned allocation of a resnet50 costs
        milliseconds); page-locked memory cannot be swapped, so it must not grow past the
        budget with models of many sizes. Not under the cache's lock (it may synchronise)."""
        held = pinned_host_bytes()
        if held is None or held > self._host_limit:
            release_host_memory()

    def _bring_back(self, hosted: HostedModel, device: torch.device) -> nn.Module:
        """The version's module on its device: its host copy moved back, or loaded again
        from the store. A host copy that could not move back stays (out of memory: it is
        still whole in host memory) or is gone (anything later: the store tier is left)."""
        with self._cond:
            copy, hosted.host_copy = hosted.host_copy, None
            if copy is not None:  # counted in the host tier until it is copied
                self._returning.append(copy)
        if copy is None:
            assert self.rebuild is not None
            return self.rebuild(hosted)
        try:
            return to_device(copy, device)
        except BaseException:
            with self._cond:
                if any(tensor.is_cuda for tensor, _ in copy.places):
                    hosted.tier = STORE
                else:
                    hosted.host_copy = copy
            raise
        finally:
            with self._cond:
                self._returning = [c for c in self._returning if c is not copy]


def _wanted_until(hosted: HostedModel) -> float:
    """Until when a page-in is wanted: the latest deadline of its requests, while any
    waits (read without the lock as the page-in starts: a stale value lets it run for
    requests that have just left)."""
    return hosted.paging_until if hosted.paging_waiters else 0.0


def _log_failure(hosted: HostedModel, job: Future[None]) -> None:
    """Logs a page-in that failed: the requests that waited for it may all have left."""
    error = None if job.cancelled() else job.exception()
    if isinstance(error, _NoRoomYet):  # its requests look again: said once, at their deadline
        return
    if isinstance(error, ModelHostFailure):
        log.info("page-in of %s version %d: %s", hosted.name, hosted.version, error)
    elif error is not None:
        log.error("page-in of %s version %d failed", hosted.name, hosted.version, exc_info=error)


def _names(versions: Iterable[HostedModel]) -> str:
    return listing([f"{h.name}:{h.version}" for h in versions]) or "none"
