"""The daemon's counters in Prometheus text format (`GET /metrics` on the control API, bearer token as every
route), with prometheus-client.

What is counted, and where the count comes from:

    kvswap_bytes_total{protocol, direction}     every frame and data-plane transfer (the ledger's own events)
    kvswap_chunks_verified_total                chunks that arrived and matched their CID (then stored)
    kvswap_integrity_failures_total             chunks that arrived and did not (the provider is penalised)
    kvswap_fetches_total{outcome}               `kvswap get` jobs: done, failed, cancelled
    kvswap_generations_total{mode}              local (ship), hosted (for a peer), remote (asked of a host),
                                                door (a local agent's /v1/completions)
    kvswap_prefill_seconds_total, _tokens_total this node's prefills (publishing)
    kvswap_audits_total{outcome}                audits run by this node: passed, failed
    kvswap_artifacts_stored, kvswap_stored_bytes  the store now (read at each scrape)
    kvswap_host_tier_{hits,misses}_total,        this daemon's loads from the host-memory tier (kvswap/hosttier.py),
      _hit_bytes_total, _bytes                   the bytes they copied, and what the tier holds now

Each daemon has its own registry (several daemons may live in one test process).
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .accounting import TransferEvent

#: the Content-Type of the text exposition format prometheus-client writes
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class NodeMetrics:
    def __init__(self, artifacts: Callable[[], int], stored_bytes: Callable[[], int], tier: Any = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.bytes = Counter("kvswap_bytes", "Bytes on the wire by protocol and direction",
                             ["protocol", "direction"], registry=r)
        self.chunks_verified = Counter("kvswap_chunks_verified", "Chunks that arrived and matched their CID",
                                       registry=r)
        self.integrity_failures = Counter("kvswap_integrity_failures", "Chunks that arrived and did not match",
                                          registry=r)
        self.fetches = Counter("kvswap_fetches", "Fetch jobs by outcome", ["outcome"], registry=r)
        self.generations = Counter("kvswap_generations", "Generations by mode", ["mode"], registry=r)
        self.prefill_seconds = Counter("kvswap_prefill_seconds", "Seconds spent prefilling", registry=r)
        self.prefill_tokens = Counter("kvswap_prefill_tokens", "Tokens prefilled", registry=r)
        self.audits = Counter("kvswap_audits", "Audits run by this node by outcome", ["outcome"], registry=r)
        Gauge("kvswap_artifacts_stored", "Artifacts in the store", registry=r).set_function(artifacts)
        Gauge("kvswap_stored_bytes", "Bytes of chunks (and raw local forms) in the store",
              registry=r).set_function(stored_bytes)
        if tier is not None:
            for name, what, read in (("hits", "Loads served from the host-memory tier", lambda: tier.hits),
                                     ("misses", "Loads the host-memory tier did not hold", lambda: tier.misses),
                                     ("hit_bytes", "Bytes loaded from the host-memory tier", lambda: tier.hit_bytes)):
                _CounterOf(f"kvswap_host_tier_{name}", what, read, r)
            Gauge("kvswap_host_tier_bytes", "Bytes the host-memory tier holds", registry=r).set_function(tier.usage)

    def on_transfer(self, event: TransferEvent) -> None:
        self.bytes.labels(event.protocol, event.direction).inc(event.wire_bytes)

    def on_chunk(self, verified: bool) -> None:
        (self.chunks_verified if verified else self.integrity_failures).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def watch_uploads(self, read: Callable[[], dict | None]) -> None:
        """Export the upload gate (node/uploads.py, node/ration.py): chunks being sent, waiting for a slot, slot
        waits that timed out and rationed answers, read at each scrape."""
        def field(name: str) -> Callable[[], float]:
            return lambda: float((read() or {}).get(name) or 0)

        Gauge("kvswap_uploads_sending", "Chunks being sent now (upload slots in use)",
              registry=self.registry).set_function(field("sending"))
        Gauge("kvswap_uploads_waiting", "Chunk sends waiting for an upload slot",
              registry=self.registry).set_function(field("waiting"))
        _CounterOf("kvswap_upload_slot_timeouts", "Chunk sends that got no upload slot in time",
                   field("slot_timeouts"), self.registry)
        _CounterOf("kvswap_rationed_answers", "Chunk requests answered 'rationed' (holders named, or come back)",
                   field("rationed_answers"), self.registry)

    def watch_nat(self, read: Callable[[], dict | None]) -> None:
        """Export reachability behind NAT (node/nat.py's snapshot, read at each scrape)."""
        _NatMetrics(read, self.registry)


class _CounterOf:
    """A counter whose value is read from elsewhere at each scrape (a count another object keeps)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float], registry: CollectorRegistry):
        self.name, self.documentation, self.read = name, documentation, read
        registry.register(self)

    def collect(self):
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())

    def describe(self):
        return [CounterMetricFamily(self.name, self.documentation)]


__all__ = ["CONTENT_TYPE", "NodeMetrics"]


class _NatMetrics:
    """kvswap_reachability{status}, the relay reservations this node holds, its relay service's load and
    refusals, hole punches by outcome and the peers connected through relays only (node/nat.py)."""

    def __init__(self, read: Callable[[], dict | None], registry: CollectorRegistry) -> None:
        self.read = read
        registry.register(self)

    def collect(self):
        snap = self.read() or {}
        if not snap:
            return
        reach = GaugeMetricFamily("kvswap_reachability", "1 for what AutoNAT (or the config) says this node is",
                                  labels=["status"])
        for status in ("public", "private", "unknown"):
            reach.add_metric([status], 1.0 if snap["reachability"]["status"] == status else 0.0)
        yield reach
        yield GaugeMetricFamily("kvswap_relay_reservations_held", "Relays holding a reservation for this node",
                                value=len(snap["reservations"]))
        yield GaugeMetricFamily("kvswap_relayed_peers", "Peers connected through a relay only",
                                value=snap["relayed_peers"])
        relay = snap.get("relay") or {}
        yield GaugeMetricFamily("kvswap_relay_service_reservations", "Reservations this node's relay holds for others",
                                value=relay.get("reservations", 0))
        yield GaugeMetricFamily("kvswap_relay_service_circuits", "Circuits this node's relay carries now",
                                value=relay.get("circuits", 0))
        yield CounterMetricFamily("kvswap_relay_service_refused", "Reservations and circuits this node's relay refused",
                                  value=relay.get("refused", 0))
        punches = CounterMetricFamily("kvswap_hole_punches", "Relayed connections by upgrade outcome (DCUtR)",
                                      labels=["outcome"])
        for outcome in ("succeeded", "failed"):
            punches.add_metric([outcome], snap["hole_punches"][outcome])
        yield punches

    def describe(self):
        return []
