//! Metrics regions: the counters, gauges and latency histograms a service keeps in shared
//! memory for mgmt to read when Prometheus scrapes it.
//!
//! duplexd creates one region per service (resource [`METRICS_RESOURCE`]) and keeps it across
//! the service's restarts, so counters go on rising through a crash (Prometheus counters must
//! not go backwards except on a reset of the whole node). The service is the region's only
//! writer; mgmt attaches every service's region (resources `metrics:<service>`) and only reads.
//!
//! Layout: the region header, then [`SLOT_SIZE`]-byte slots, each made of 64-bit words accessed
//! only as atomics:
//!
//! | word   | what                                                                 |
//! |--------|----------------------------------------------------------------------|
//! | 0      | state (low 32 bits: 0 free, 1 live) and metric id (high 32 bits)     |
//! | 1      | length of the label bytes                                            |
//! | 2..96  | label bytes (`key\0value\0key\0value`, at most [`MAX_LABEL_BYTES`]) |
//! | 96..128 | values: a counter or gauge in word 96; a histogram's count, sum (ns) and buckets |
//!
//! The writer fills a free slot's labels and id before it sets the state live (release); the
//! reader takes a slot only when it reads it live (acquire), and checks everything it reads: a
//! region scribbled on by a misbehaving service makes entries disappear from the exposition,
//! never makes mgmt fail. The metric ids index [`CATALOG`], which gives each its Prometheus
//! name, type and help; an id mgmt does not know is skipped.
//!
//! The cost on the I/O path is a few relaxed atomic adds on words no other core writes.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::region::{Region, RegionError, RegionKind, HEADER_SIZE};

/// The resource name of a service's own metrics region.
pub const METRICS_RESOURCE: &str = "metrics";
/// The prefix of the resources that hand mgmt the other services' regions (`metrics:fabric`).
pub const METRICS_READER_PREFIX: &str = "metrics:";
/// `params[0]` of a metrics region says it is one.
const METRICS_TAG: u64 = u64::from_le_bytes(*b"METRICS\x01");
/// Bytes per slot.
pub const SLOT_SIZE: usize = 1024;
/// Slots in a region duplexd creates.
pub const DEFAULT_SLOTS: usize = 1024;
/// Longest label text of one entry (`key\0value\0…`; room for an NQN of 223 bytes and more).
pub const MAX_LABEL_BYTES: usize = 752;
const WORDS: usize = SLOT_SIZE / 8;
const LABEL_WORD: usize = 2;
const VALUE_WORD: usize = 96;
const STATE_FREE: u64 = 0;
const STATE_LIVE: u64 = 1;

/// Upper bounds of the latency histograms' buckets, in nanoseconds (10 µs to 10 s; a last
/// bucket, `+Inf`, takes the rest).
pub const LATENCY_BOUNDS_NS: [u64; 19] = [
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
    2_000_000_000,
    5_000_000_000,
    10_000_000_000,
];
const BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;

/// What a metric is, in Prometheus terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only rises (`_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Latency in seconds, in [`LATENCY_BOUNDS_NS`] buckets.
    Histogram,
}

impl Kind {
    /// The `# TYPE` word.
    pub fn name(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// One metric of the catalog.
#[derive(Debug, PartialEq, Eq)]
pub struct Def {
    /// The Prometheus name.
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// Its `# HELP` text.
    pub help: &'static str,
}

macro_rules! catalog {
    ($($id:ident = $name:literal, $kind:ident, $help:literal;)*) => {
        /// The metrics services keep in their regions (the id is the position in [`CATALOG`];
        /// new ones are only ever appended).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u32)]
        pub enum Metric { $(#[doc = $help] $id,)* }
        /// Name, type and help of every [`Metric`], by id.
        pub static CATALOG: &[Def] = &[$(Def { name: $name, kind: Kind::$kind, help: $help },)*];
    };
}

catalog! {
    NsCommands = "duplex_namespace_commands_total", Counter,
        "I/O commands completed on a namespace through a port of this node, by operation.";
    NsBytes = "duplex_namespace_bytes_total", Counter,
        "Bytes moved for hosts on a namespace through a port of this node, by operation.";
    NsErrors = "duplex_namespace_errors_total", Counter,
        "I/O commands on a namespace completed with an error status, by operation.";
    NsLatency = "duplex_namespace_latency_seconds", Histogram,
        "Time from a command's arrival to its completion on a namespace, by operation.";
    AnaState = "duplex_ana_state", Gauge,
        "1 for the ANA state an ANA group has on a port of this node (one series per state).";
    HostConnects = "duplex_host_connects_total", Counter,
        "Host connections (Fabrics Connect) accepted, by subsystem.";
    HostRefusals = "duplex_host_refusals_total", Counter,
        "Host connections refused, by reason.";
    DriveCommands = "duplex_drive_commands_total", Counter,
        "Commands completed by a drive, by operation.";
    DriveErrors = "duplex_drive_errors_total", Counter,
        "Commands a drive completed with an error, or that failed with it.";
    DriveLatency = "duplex_drive_latency_seconds", Histogram,
        "Time from submission to completion of a drive command, by operation.";
    DriveIntegrityErrors = "duplex_drive_integrity_errors_total", Counter,
        "Blocks read from a drive whose protection record did not match their data.";
    DriveResets = "duplex_drive_resets_total", Counter,
        "Controller resets of a drive after it failed.";
    DriveUp = "duplex_drive_up", Gauge,
        "1 while a drive is reachable, 0 once it is lost.";
    HeartbeatsSent = "duplex_cluster_heartbeats_sent_total", Counter,
        "Heartbeats sent to the peer, by path (interconnect or disk).";
    HeartbeatsReceived = "duplex_cluster_heartbeats_received_total", Counter,
        "Heartbeats heard from the peer, by path (interconnect or disk).";
    PeerUp = "duplex_cluster_peer_up", Gauge,
        "1 for the state this node sees its peer in (one series per state).";
    PeerDeaths = "duplex_cluster_peer_deaths_total", Counter,
        "Times this node judged its peer dead.";
    Fences = "duplex_cluster_fences_total", Counter,
        "Fencing of the peer off the drives, by outcome.";
    Fenced = "duplex_cluster_fenced", Gauge,
        "1 once this node was fenced off the drives by its peer.";
    Takeovers = "duplex_cluster_takeovers_total", Counter,
        "Takeovers of the peer's pools by this node.";
    PoolState = "duplex_pool_state", Gauge,
        "1 for the state a pool is in (one series per state).";
    PoolServedHere = "duplex_pool_served_here", Gauge,
        "1 when this node owns and serves the pool.";
    PoolRebuildProgress = "duplex_pool_rebuild_progress_ratio", Gauge,
        "Fraction of a pool's rebuild done (0 to 1); absent when no rebuild runs.";
    PoolMembersFailed = "duplex_pool_failed_members", Gauge,
        "Members of a pool that are failed or missing.";
    ReservationChanges = "duplex_reservation_changes_total", Counter,
        "Host reservation commands (Register, Acquire, Release) carried out, by outcome.";
    ServiceRestarts = "duplex_service_restarts_total", Counter,
        "Restarts of a service by duplexd after it exited, hung or was restarted.";
    ServiceCrashLoops = "duplex_service_crash_loops_total", Counter,
        "Times a service was marked failed for exiting too often.";
    ServiceUp = "duplex_service_up", Gauge,
        "1 while a service runs (started and not exited).";
    PoolIntegrityRecovered = "duplex_pool_integrity_recovered_total", Counter,
        "Reads of a pool served from a good copy after a bad one (since the datapath started).";
    PoolIntegrityHealed = "duplex_pool_integrity_healed_total", Counter,
        "Bad copies in a pool rewritten from a good one (since the datapath started).";
    PoolIntegrityUnrecoverable = "duplex_pool_integrity_unrecoverable_total", Counter,
        "Reads of a pool with no good copy (since the datapath started).";
    FabricThreadConnections = "duplex_fabric_thread_connections_total", Counter,
        "Host connections (TCP) a fabric I/O thread took, by thread.";
    SourceUp = "duplex_metrics_source_up", Gauge,
        "1 when mgmt could read a source of these metrics in this scrape (a service, duplexd).";
}

impl Metric {
    /// Its catalog entry.
    pub fn def(self) -> &'static Def {
        &CATALOG[self as usize]
    }

    fn kind(self) -> Kind {
        self.def().kind
    }
}

/// A service's metrics region.
#[derive(Clone, Debug)]
pub struct Metrics {
    region: Arc<Region>,
    slots: usize,
}

/// Why a metric could not be registered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetricsError {
    /// Every slot is taken.
    #[error("the metrics region is full ({0} entries)")]
    Full(usize),
    /// The labels do not fit or are not well formed.
    #[error("bad labels: {0}")]
    BadLabels(String),
}

impl Metrics {
    /// Supervisor side: a new, empty region for `service`.
    pub fn create(service: &str) -> Result<Self, RegionError> {
        Self::create_with(service, DEFAULT_SLOTS)
    }

    /// A new region of `slots` slots (tests).
    pub fn create_with(service: &str, slots: usize) -> Result<Self, RegionError> {
        let region = Region::create(
            &format!("metrics:{service}"),
            RegionKind::Plain,
            HEADER_SIZE + slots * SLOT_SIZE,
            [METRICS_TAG, slots as u64, 0, 0, 0],
        )?;
        Ok(Self {
            region: Arc::new(region),
            slots,
        })
    }

    /// Attaches a handed-over region, checking it is a metrics region of a sane size.
    pub fn attach(fd: OwnedFd) -> Result<Self, RegionError> {
        let region = Region::attach(fd, RegionKind::Plain)?;
        let params = region.params();
        let slots = usize::try_from(params[1]).unwrap_or(usize::MAX);
        let needed = slots
            .checked_mul(SLOT_SIZE)
            .and_then(|n| n.checked_add(HEADER_SIZE));
        if params[0] != METRICS_TAG || slots == 0 || needed.is_none_or(|n| n > region.len()) {
            return Err(RegionError::BadLayout(
                "not a metrics region (tag or slot count)".into(),
            ));
        }
        Ok(Self {
            region: Arc::new(region),
            slots,
        })
    }

    /// Writer side, once at the start of each incarnation: gauges the previous incarnation set
    /// are dropped (this one sets what holds now); counters and histograms are kept.
    pub fn start_writing(&self) {
        for s in 0..self.slots {
            let head = self.word(s, 0).load(Ordering::Acquire);
            if head & 0xffff_ffff == STATE_LIVE {
                let id = (head >> 32) as usize;
                if CATALOG.get(id).is_none_or(|d| d.kind == Kind::Gauge) {
                    self.word(s, 0).store(STATE_FREE, Ordering::Release);
                }
            }
        }
    }

    /// The region (duplexd keeps its fd across restarts).
    pub fn region(&self) -> &Region {
        &self.region
    }

    fn word(&self, slot: usize, word: usize) -> &std::sync::atomic::AtomicU64 {
        self.region
            .atomic_u64(HEADER_SIZE + slot * SLOT_SIZE + word * 8)
    }

    /// The slot of `metric` with `labels`: the existing one (a restarted writer finds its
    /// predecessor's counters) or a free one made live.
    fn entry(&self, metric: Metric, labels: &[(&str, &str)]) -> Result<Entry, MetricsError> {
        let text = encode_labels(labels)?;
        let head = (u64::from(metric as u32) << 32) | STATE_LIVE;
        let mut free = None;
        for s in 0..self.slots {
            let h = self.word(s, 0).load(Ordering::Acquire);
            if h == head && self.labels_of(s).as_deref() == Some(text.as_slice()) {
                return Ok(Entry {
                    metrics: self.clone(),
                    slot: s,
                });
            }
            if h & 0xffff_ffff == STATE_FREE && free.is_none() {
                free = Some(s);
            }
        }
        let s = free.ok_or(MetricsError::Full(self.slots))?;
        for w in VALUE_WORD..WORDS {
            self.word(s, w).store(0, Ordering::Relaxed);
        }
        self.word(s, 1).store(text.len() as u64, Ordering::Relaxed);
        let mut padded = text.clone();
        padded.resize(MAX_LABEL_BYTES, 0);
        for (i, chunk) in padded.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            self.word(s, LABEL_WORD + i)
                .store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        self.word(s, 0).store(head, Ordering::Release);
        Ok(Entry {
            metrics: self.clone(),
            slot: s,
        })
    }

    /// A counter (registered now, or found from an earlier incarnation).
    pub fn counter(
        &self,
        metric: Metric,
        labels: &[(&str, &str)],
    ) -> Result<Counter, MetricsError> {
        debug_assert_eq!(metric.kind(), Kind::Counter);
        self.entry(metric, labels).map(Counter)
    }

    /// A gauge.
    pub fn gauge(&self, metric: Metric, labels: &[(&str, &str)]) -> Result<Gauge, MetricsError> {
        debug_assert_eq!(metric.kind(), Kind::Gauge);
        self.entry(metric, labels).map(Gauge)
    }

    /// A latency histogram.
    pub fn histogram(
        &self,
        metric: Metric,
        labels: &[(&str, &str)],
    ) -> Result<Histogram, MetricsError> {
        debug_assert_eq!(metric.kind(), Kind::Histogram);
        self.entry(metric, labels).map(Histogram)
    }

    /// The label bytes of live slot `s`, if they are well formed.
    fn labels_of(&self, s: usize) -> Option<Vec<u8>> {
        let len = usize::try_from(self.word(s, 1).load(Ordering::Relaxed)).ok()?;
        if len > MAX_LABEL_BYTES {
            return None;
        }
        let mut bytes = Vec::with_capacity(MAX_LABEL_BYTES);
        for w in 0..MAX_LABEL_BYTES / 8 {
            bytes.extend_from_slice(
                &self
                    .word(s, LABEL_WORD + w)
                    .load(Ordering::Relaxed)
                    .to_le_bytes(),
            );
        }
        bytes.truncate(len);
        Some(bytes)
    }

    /// Reader side: every live entry that reads well formed.
    pub fn snapshot(&self) -> Vec<Sample> {
        let mut out = Vec::new();
        for s in 0..self.slots {
            let head = self.word(s, 0).load(Ordering::Acquire);
            if head & 0xffff_ffff != STATE_LIVE {
                continue;
            }
            let Some(def) = CATALOG.get((head >> 32) as usize) else {
                continue;
            };
            let Some(labels) = self.labels_of(s).and_then(|b| decode_labels(&b)) else {
                continue;
            };
            let value = match def.kind {
                Kind::Counter | Kind::Gauge => {
                    Value::Scalar(self.word(s, VALUE_WORD).load(Ordering::Relaxed))
                }
                Kind::Histogram => {
                    let mut buckets = [0u64; BUCKETS];
                    for (i, b) in buckets.iter_mut().enumerate() {
                        *b = self.word(s, VALUE_WORD + 2 + i).load(Ordering::Relaxed);
                    }
                    Value::Histogram {
                        count: self.word(s, VALUE_WORD).load(Ordering::Relaxed),
                        sum_ns: self.word(s, VALUE_WORD + 1).load(Ordering::Relaxed),
                        buckets,
                    }
                }
            };
            // The head again: a slot freed and reused while we read it is left for next time.
            if self.word(s, 0).load(Ordering::Acquire) != head {
                continue;
            }
            out.push(Sample { def, labels, value });
        }
        out
    }
}

/// A registered slot.
#[derive(Clone, Debug)]
struct Entry {
    metrics: Metrics,
    slot: usize,
}

impl Entry {
    fn value(&self, i: usize) -> &std::sync::atomic::AtomicU64 {
        self.metrics.word(self.slot, VALUE_WORD + i)
    }

    fn remove(&self) {
        self.metrics
            .word(self.slot, 0)
            .store(STATE_FREE, Ordering::Release);
    }
}

/// A counter in a metrics region.
#[derive(Clone, Debug)]
pub struct Counter(Entry);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.value(0).fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Sets the count, for a writer that keeps it itself (it must only rise while the region
    /// lives).
    pub fn store(&self, v: u64) {
        self.0.value(0).store(v, Ordering::Relaxed);
    }

    /// The value now.
    pub fn get(&self) -> u64 {
        self.0.value(0).load(Ordering::Relaxed)
    }
}

/// A gauge in a metrics region (an unsigned value; ratios are kept in millionths, see
/// [`Gauge::set_ratio`]).
#[derive(Clone, Debug)]
pub struct Gauge(Entry);

/// Gauge values are fixed-point: this many units are 1.
pub const GAUGE_ONE: u64 = 1_000_000;

impl Gauge {
    /// Sets a whole value.
    pub fn set(&self, v: u64) {
        self.0
            .value(0)
            .store(v.saturating_mul(GAUGE_ONE), Ordering::Relaxed);
    }

    /// Sets a fraction (clamped to 0..=1).
    pub fn set_ratio(&self, r: f64) {
        let v = (r.clamp(0.0, 1.0) * GAUGE_ONE as f64).round() as u64;
        self.0.value(0).store(v, Ordering::Relaxed);
    }

    /// Drops the series (the thing it describes is gone).
    pub fn remove(&self) {
        self.0.remove();
    }
}

/// A latency histogram in a metrics region.
#[derive(Clone, Debug)]
pub struct Histogram(Entry);

impl Histogram {
    /// Records one latency of `ns` nanoseconds.
    pub fn observe_ns(&self, ns: u64) {
        let bucket = LATENCY_BOUNDS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(LATENCY_BOUNDS_NS.len());
        self.0.value(2 + bucket).fetch_add(1, Ordering::Relaxed);
        self.0.value(1).fetch_add(ns, Ordering::Relaxed);
        self.0.value(0).fetch_add(1, Ordering::Relaxed);
    }
}

/// One entry as read.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// What it is.
    pub def: &'static Def,
    /// Its labels.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: Value,
}

/// A value as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// A counter, or a gauge in millionths.
    Scalar(u64),
    /// A histogram: observations, their sum in nanoseconds, the per-bucket counts (not
    /// cumulative; the last is above every bound).
    Histogram {
        /// Observations.
        count: u64,
        /// Their sum, ns.
        sum_ns: u64,
        /// Per bucket.
        buckets: [u64; BUCKETS],
    },
}

/// Whether `key` is a Prometheus label name (and not reserved).
fn is_label_name(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !key.starts_with("__")
        && key != "le"
}

fn encode_labels(labels: &[(&str, &str)]) -> Result<Vec<u8>, MetricsError> {
    let mut out = Vec::new();
    for (k, v) in labels {
        if !is_label_name(k) {
            return Err(MetricsError::BadLabels(format!(
                "{k:?} is not a label name"
            )));
        }
        if v.contains('\0') {
            return Err(MetricsError::BadLabels(format!(
                "the value of {k} holds a NUL byte"
            )));
        }
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    if out.len() > MAX_LABEL_BYTES {
        return Err(MetricsError::BadLabels(format!(
            "{} bytes of labels, more than {MAX_LABEL_BYTES}",
            out.len()
        )));
    }
    Ok(out)
}

fn decode_labels(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let text = std::str::from_utf8(bytes.strip_suffix(&[0])?).ok()?;
    let parts: Vec<&str> = text.split('\0').collect();
    if parts.len() % 2 != 0 {
        return None;
    }
    parts
        .chunks_exact(2)
        .map(|kv| is_label_name(kv[0]).then(|| (kv[0].to_owned(), kv[1].to_owned())))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_sees_what_the_writer_counts() {
        let m = Metrics::create_with("t", 8).unwrap();
        let r = Metrics::attach(m.region().try_clone_fd().unwrap()).unwrap();
        let c = m
            .counter(Metric::NsCommands, &[("nsid", "1"), ("op", "read")])
            .unwrap();
        c.add(3);
        let h = m.histogram(Metric::NsLatency, &[("op", "read")]).unwrap();
        h.observe_ns(15_000);
        h.observe_ns(20_000_000_000);
        let g = m
            .gauge(Metric::PoolServedHere, &[("pool", "tank")])
            .unwrap();
        g.set(1);
        let s = r.snapshot();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].def.name, "duplex_namespace_commands_total");
        assert_eq!(
            s[0].labels,
            vec![("nsid".into(), "1".into()), ("op".into(), "read".into())]
        );
        assert_eq!(s[0].value, Value::Scalar(3));
        let Value::Histogram {
            count,
            sum_ns,
            buckets,
        } = s[1].value
        else {
            panic!("{:?}", s[1]);
        };
        assert_eq!((count, sum_ns), (2, 20_000_015_000));
        assert_eq!(buckets[1], 1, "15 µs is in the 20 µs bucket");
        assert_eq!(buckets[BUCKETS - 1], 1, "20 s is above every bound");
        assert_eq!(s[2].value, Value::Scalar(GAUGE_ONE));
        g.remove();
        assert_eq!(r.snapshot().len(), 2);
    }

    #[test]
    fn a_restarted_writer_finds_its_counters_and_drops_its_gauges() {
        let m = Metrics::create_with("t", 8).unwrap();
        m.counter(Metric::DriveErrors, &[("drive", "d0")])
            .unwrap()
            .add(5);
        m.gauge(Metric::DriveUp, &[("drive", "d0")]).unwrap().set(1);
        let again = Metrics::attach(m.region().try_clone_fd().unwrap()).unwrap();
        again.start_writing();
        let c = again
            .counter(Metric::DriveErrors, &[("drive", "d0")])
            .unwrap();
        assert_eq!(c.get(), 5);
        c.inc();
        let s = again.snapshot();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].value, Value::Scalar(6));
    }

    #[test]
    fn a_full_region_and_bad_labels_are_refused() {
        let m = Metrics::create_with("t", 2).unwrap();
        m.counter(Metric::DriveErrors, &[("drive", "a")]).unwrap();
        m.counter(Metric::DriveErrors, &[("drive", "b")]).unwrap();
        assert_eq!(
            m.counter(Metric::DriveErrors, &[("drive", "c")])
                .unwrap_err(),
            MetricsError::Full(2)
        );
        let m = Metrics::create_with("t", 2).unwrap();
        assert!(m.counter(Metric::DriveErrors, &[("le", "a")]).is_err());
        assert!(m.counter(Metric::DriveErrors, &[("9x", "a")]).is_err());
        let long = "x".repeat(800);
        assert!(m.counter(Metric::DriveErrors, &[("drive", &long)]).is_err());
    }

    #[test]
    fn scribbled_slots_are_skipped_not_trusted() {
        let m = Metrics::create_with("t", 4).unwrap();
        m.counter(Metric::DriveErrors, &[("drive", "a")])
            .unwrap()
            .inc();
        m.counter(Metric::DriveErrors, &[("drive", "b")])
            .unwrap()
            .inc();
        m.counter(Metric::DriveErrors, &[("drive", "c")])
            .unwrap()
            .inc();
        // Slot 0: a label length beyond the slot; slot 1: an unknown metric id; slot 2: label
        // bytes that are not key/value pairs.
        m.word(0, 1).store(10_000, Ordering::Relaxed);
        m.word(1, 0)
            .store((9999 << 32) | STATE_LIVE, Ordering::Relaxed);
        m.word(2, LABEL_WORD)
            .store(u64::from_le_bytes(*b"dr\xffve\0c\0"), Ordering::Relaxed);
        assert!(m.snapshot().is_empty());
    }
}
