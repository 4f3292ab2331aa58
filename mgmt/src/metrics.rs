//! Prometheus metrics: the text exposition format (version 0.0.4) of what the node's services
//! and duplexd keep in their metrics regions ([`duplex_ipc::metrics`]) and of the pools as the
//! metadata service lists them, served over HTTP on the TCP listener duplexd hands mgmt.
//!
//! The HTTP side is deliberately small (one request per connection, `GET /metrics` and `GET /`,
//! a bounded request head, a deadline for it, a bounded number of connections): what Prometheus
//! needs and nothing a client could use to hold mgmt. Why not an HTTP crate: `docs/DECISIONS.md`.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::Duration;

use duplex_ipc::config::{DriveState, PoolInfo, PoolState};
use duplex_ipc::metrics::{Metric, Metrics, Sample, Value, CATALOG, GAUGE_ONE, LATENCY_BOUNDS_NS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest request head accepted.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a client has to send its request head.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Scrapes served at once; more connections are closed at once.
pub const MAX_SCRAPES: usize = 4;
/// The exposition's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The regions mgmt reads: each service's and duplexd's, by source name.
#[derive(Debug, Default)]
pub struct Regions(pub Vec<(String, Metrics)>);

impl Regions {
    /// Every sample of every region.
    pub fn samples(&self) -> Vec<Sample> {
        self.0.iter().flat_map(|(_, m)| m.snapshot()).collect()
    }
}

fn sample(metric: Metric, labels: &[(&str, &str)], value: Value) -> Sample {
    Sample {
        def: metric.def(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        value,
    }
}

fn gauge(v: u64) -> Value {
    Value::Scalar(v.saturating_mul(GAUGE_ONE))
}

/// The pools' samples: state, whether served here, rebuild progress, failed members, integrity
/// findings. `node` is this node's id in the cluster (`None`: a single node, which serves all).
pub fn pool_samples(pools: &[PoolInfo], node: Option<u64>) -> Vec<Sample> {
    let mut out = Vec::new();
    for p in pools {
        let pool = p.name.as_str();
        for st in [PoolState::Online, PoolState::Degraded, PoolState::Offline] {
            out.push(sample(
                Metric::PoolState,
                &[("pool", pool), ("state", st.name())],
                gauge(u64::from(p.state == st)),
            ));
        }
        let here = node.is_none_or(|n| u64::from(p.owner_node) + 1 == n);
        out.push(sample(
            Metric::PoolServedHere,
            &[("pool", pool)],
            gauge(u64::from(here)),
        ));
        if let Some((_, done)) = p.rebuild {
            let ratio = if p.member_bytes == 0 {
                0
            } else {
                u64::try_from(
                    u128::from(done.min(p.member_bytes)) * u128::from(GAUGE_ONE)
                        / u128::from(p.member_bytes),
                )
                .unwrap_or(GAUGE_ONE)
            };
            out.push(sample(
                Metric::PoolRebuildProgress,
                &[("pool", pool)],
                Value::Scalar(ratio),
            ));
        }
        let failed = p
            .members
            .iter()
            .filter(|m| matches!(m.state, DriveState::Failed | DriveState::Missing))
            .count() as u64;
        out.push(sample(
            Metric::PoolMembersFailed,
            &[("pool", pool)],
            gauge(failed),
        ));
        for (metric, v) in [
            (Metric::PoolIntegrityRecovered, p.integrity.recovered),
            (Metric::PoolIntegrityHealed, p.integrity.healed),
            (
                Metric::PoolIntegrityUnrecoverable,
                p.integrity.unrecoverable,
            ),
        ] {
            out.push(sample(metric, &[("pool", pool)], Value::Scalar(v)));
        }
    }
    out
}

/// Whether a source could be read in this scrape.
pub fn source_up(source: &str, up: bool) -> Sample {
    sample(
        Metric::SourceUp,
        &[("source", source)],
        gauge(u64::from(up)),
    )
}

/// The text exposition of `samples`: each metric once with its help and type, in catalog
/// order, its series in the order given (a series seen twice is kept once).
pub fn render(samples: &[Sample]) -> String {
    let mut out = String::new();
    let mut seen = HashSet::new();
    for def in CATALOG {
        let mut header = false;
        for s in samples.iter().filter(|s| s.def.name == def.name) {
            if !seen.insert((def.name, s.labels.clone())) {
                continue;
            }
            if !header {
                header = true;
                let _ = writeln!(out, "# HELP {} {}", def.name, escape_help(def.help));
                let _ = writeln!(out, "# TYPE {} {}", def.name, def.kind.name());
            }
            let labels = label_text(&s.labels);
            match &s.value {
                Value::Scalar(v) => {
                    let v = if def.kind == duplex_ipc::metrics::Kind::Gauge {
                        fixed(*v)
                    } else {
                        v.to_string()
                    };
                    let _ = writeln!(out, "{}{} {v}", def.name, braces(&labels));
                }
                Value::Histogram {
                    count,
                    sum_ns,
                    buckets,
                } => {
                    let mut cumulative = 0u64;
                    for (i, b) in buckets.iter().enumerate() {
                        cumulative = cumulative.saturating_add(*b);
                        let le = LATENCY_BOUNDS_NS
                            .get(i)
                            .map_or_else(|| "+Inf".to_owned(), |ns| seconds(*ns));
                        // The last bucket is the count itself (a reader may catch the count a
                        // beat ahead of the buckets; the exposition stays monotonic).
                        let n = if i + 1 == buckets.len() {
                            (*count).max(cumulative)
                        } else {
                            cumulative
                        };
                        let with_le = join(&labels, &format!("le=\"{le}\""));
                        let _ = writeln!(out, "{}_bucket{{{with_le}}} {n}", def.name);
                    }
                    let _ = writeln!(
                        out,
                        "{}_sum{} {}",
                        def.name,
                        braces(&labels),
                        seconds(*sum_ns)
                    );
                    let _ = writeln!(
                        out,
                        "{}_count{} {}",
                        def.name,
                        braces(&labels),
                        (*count).max(cumulative)
                    );
                }
            }
        }
    }
    out
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_owned()
    } else {
        format!("{a},{b}")
    }
}

fn label_text(labels: &[(String, String)]) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_value(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// A label value as the exposition format wants it: backslash, double quote and line feed
/// escaped.
fn escape_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Nanoseconds as seconds, exactly (no float rounding).
fn seconds(ns: u64) -> String {
    let whole = ns / 1_000_000_000;
    let frac = ns % 1_000_000_000;
    if frac == 0 {
        whole.to_string()
    } else {
        let f = format!("{frac:09}");
        format!("{whole}.{}", f.trim_end_matches('0'))
    }
}

/// A fixed-point gauge value (millionths) as a decimal.
fn fixed(v: u64) -> String {
    let whole = v / GAUGE_ONE;
    let frac = v % GAUGE_ONE;
    if frac == 0 {
        whole.to_string()
    } else {
        let f = format!("{frac:06}");
        format!("{whole}.{}", f.trim_end_matches('0'))
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics` (or `HEAD`).
    Metrics {
        /// `HEAD`: the headers only.
        head: bool,
    },
    /// `GET /`.
    Index,
    /// Another path.
    NotFound,
    /// Another method.
    BadMethod,
    /// Not an HTTP request head.
    Malformed,
}

/// The route of a request head (its first line).
pub fn route(head: &[u8]) -> Route {
    let Ok(text) = std::str::from_utf8(head) else {
        return Route::Malformed;
    };
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::Malformed;
    };
    if parts.next().is_some() || !version.starts_with("HTTP/1.") {
        return Route::Malformed;
    }
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return Route::BadMethod;
    }
    match path {
        "/metrics" => Route::Metrics { head: head_only },
        "/" => Route::Index,
        _ => Route::NotFound,
    }
}

/// One HTTP response, connection closed after it.
pub fn response(status: &str, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// Reads a request head (up to the blank line) within [`MAX_REQUEST_HEAD`] bytes.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Some(head);
        }
        if head.len() > MAX_REQUEST_HEAD {
            return None;
        }
    }
}

/// What a scrape gathers, besides the regions: given by the server (it owns the channels).
pub trait Gather {
    /// The samples gathered now (pools and the sources' state).
    fn gather(self: Rc<Self>) -> impl std::future::Future<Output = Vec<Sample>>;
}

/// Serves the exposition on `listener` until the runtime ends.
pub async fn serve<G: Gather + 'static>(
    listener: tokio::net::TcpListener,
    regions: Rc<Regions>,
    gather: Rc<G>,
) {
    let active = Rc::new(std::cell::Cell::new(0usize));
    let mut limiter = duplex_ipc::control::RateLimiter::new(5, Duration::from_secs(1));
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                if let Some(suppressed) = limiter.check(std::time::Instant::now()) {
                    tracing::warn!(error = %e, suppressed, "metrics listener: accept failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if active.get() >= MAX_SCRAPES {
            if let Some(suppressed) = limiter.check(std::time::Instant::now()) {
                tracing::warn!(%peer, suppressed, "metrics: too many connections; closed");
            }
            continue;
        }
        active.set(active.get() + 1);
        let (active, regions, gather) =
            (Rc::clone(&active), Rc::clone(&regions), Rc::clone(&gather));
        tokio::task::spawn_local(async move {
            let head = tokio::time::timeout(REQUEST_DEADLINE, read_head(&mut stream)).await;
            let reply = match head {
                Ok(Some(head)) => match route(&head) {
                    Route::Metrics { head } => {
                        let mut samples = regions.samples();
                        samples.extend(gather.gather().await);
                        response("200 OK", CONTENT_TYPE, &render(&samples), head)
                    }
                    Route::Index => response(
                        "200 OK",
                        "text/plain; charset=utf-8",
                        "duplex metrics: GET /metrics (Prometheus text format 0.0.4)\n",
                        false,
                    ),
                    Route::NotFound => response(
                        "404 Not Found",
                        "text/plain",
                        "not found: try /metrics\n",
                        false,
                    ),
                    Route::BadMethod => response(
                        "405 Method Not Allowed",
                        "text/plain",
                        "only GET and HEAD\n",
                        false,
                    ),
                    Route::Malformed => response(
                        "400 Bad Request",
                        "text/plain",
                        "not an HTTP request\n",
                        false,
                    ),
                },
                // Too long, closed, or too slow: nothing to answer.
                Ok(None) | Err(_) => Vec::new(),
            };
            if !reply.is_empty() {
                let _ = tokio::time::timeout(REQUEST_DEADLINE, stream.write_all(&reply)).await;
                let _ = stream.shutdown().await;
            }
            active.set(active.get() - 1);
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_help_type_and_escaped_labels() {
        let m = Metrics::create_with("t", 8).unwrap();
        m.counter(
            Metric::NsCommands,
            &[("subsystem", "nqn.a\"b\\c"), ("op", "read")],
        )
        .unwrap()
        .add(7);
        let h = m.histogram(Metric::NsLatency, &[("op", "read")]).unwrap();
        h.observe_ns(15_000);
        h.observe_ns(1_500_000);
        m.gauge(Metric::AnaState, &[("group", "1")]).unwrap().set(1);
        let text = render(&m.snapshot());
        assert!(text.contains(
            "# TYPE duplex_namespace_commands_total counter\nduplex_namespace_commands_total{subsystem=\"nqn.a\\\"b\\\\c\",op=\"read\"} 7\n"
        ), "{text}");
        assert!(
            text.contains(
                "duplex_namespace_latency_seconds_bucket{op=\"read\",le=\"0.00001\"} 0\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "duplex_namespace_latency_seconds_bucket{op=\"read\",le=\"0.00002\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("duplex_namespace_latency_seconds_bucket{op=\"read\",le=\"0.002\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("duplex_namespace_latency_seconds_bucket{op=\"read\",le=\"+Inf\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("duplex_namespace_latency_seconds_sum{op=\"read\"} 0.001515\n"),
            "{text}"
        );
        assert!(
            text.contains("duplex_namespace_latency_seconds_count{op=\"read\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE duplex_ana_state gauge\nduplex_ana_state{group=\"1\"} 1\n"),
            "{text}"
        );
        assert_eq!(text.matches("# HELP").count(), 3, "{text}");
    }

    #[test]
    fn requests_are_routed_and_junk_is_refused() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            route(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Route::Metrics { head: true }
        );
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::Index);
        assert_eq!(route(b"GET /x HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(b"\xff\xfe\r\n\r\n"), Route::Malformed);
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::Malformed);
        assert_eq!(route(b"GET /metrics SMTP/1.1\r\n\r\n"), Route::Malformed);
    }

    #[test]
    fn numbers_are_written_exactly() {
        assert_eq!(seconds(10_000), "0.00001");
        assert_eq!(seconds(2_000_000_000), "2");
        assert_eq!(seconds(1_500_000_001), "1.500000001");
        assert_eq!(fixed(GAUGE_ONE / 4), "0.25");
        assert_eq!(fixed(3 * GAUGE_ONE), "3");
    }
}
