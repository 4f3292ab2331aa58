//! Metrics scraped by a real Prometheus server (Debian's `prometheus`, installed by
//! `scripts/setup`): two controllers in their network namespaces, each serving its metrics on
//! the host network (`[[listener]] service = "mgmt"`), Prometheus in the host namespace
//! scraping both every second. Its query API must show the namespace's I/O counter rising
//! while the host's verifying workload runs, and the ANA state of the pool's group on the
//! survivor's port flipping to optimized after the owner is killed and the survivor takes over.
//! Prometheus accepting the targets (`up == 1`) is the proof that the exposition parses.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use duplex_tests::http_get;
use duplex_tests::netns::in_netns;
use duplex_tests::pair::{finish_multipath, Pair, METRICS_PORT};
use duplex_tests::{KillOnDrop, PATIENCE};

const BEAT_MS: u64 = 50;
const DEAD_MS: u64 = 600;
/// Where Prometheus listens, inside the host namespace.
const PROMETHEUS: &str = "127.0.0.1:9090";

/// A Prometheus server in the host namespace.
struct Prometheus {
    _child: KillOnDrop,
    ns: String,
    _dir: tempfile::TempDir,
}

/// One series of a query's answer: its labels and value.
type Series = (BTreeMap<String, String>, f64);

impl Prometheus {
    fn start(p: &Pair) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let targets: Vec<String> = p.at.metrics.iter().map(|a| format!("\"{a}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: duplex\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).expect("config");
        let child = p
            .host_command(std::path::Path::new("prometheus"))
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus runs (scripts/setup installs Debian's package)");
        Self {
            _child: KillOnDrop(child),
            ns: p.net().h.clone(),
            _dir: dir,
        }
    }

    /// The answer to instant query `q` (`None`: Prometheus not answering yet).
    fn query(&self, q: &str) -> Option<Vec<Series>> {
        let path = format!("/api/v1/query?query={}", percent(q));
        let body = in_netns(&self.ns, || http_get(PROMETHEUS, &path))?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        if v["status"] != "success" {
            return None;
        }
        Some(
            v["data"]["result"]
                .as_array()?
                .iter()
                .filter_map(|r| {
                    let labels = r["metric"]
                        .as_object()?
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                        .collect();
                    let value: f64 = r["value"][1].as_str()?.parse().ok()?;
                    Some((labels, value))
                })
                .collect(),
        )
    }

    /// Waits until query `q` answers something `ok` accepts; returns it.
    fn wait(&self, q: &str, what: &str, ok: impl Fn(&[Series]) -> bool) -> Vec<Series> {
        let deadline = Instant::now() + PATIENCE;
        let mut last = None;
        loop {
            if let Some(r) = self.query(q) {
                if ok(&r) {
                    return r;
                }
                last = Some(r);
            }
            assert!(
                Instant::now() < deadline,
                "{what}: query {q} last answered {last:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The single value of query `q`, once there is one that `ok` accepts.
    fn wait_value(&self, q: &str, what: &str, ok: impl Fn(f64) -> bool) -> f64 {
        self.wait(q, what, |r| r.len() == 1 && ok(r[0].1))[0].1
    }
}

fn percent(q: &str) -> String {
    q.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn prometheus_sees_the_io_counter_rise_and_the_ana_state_flip_after_a_takeover() {
    let mut p = Pair::new(BEAT_MS, DEAD_MS);
    let (a, b) = (p.at.metrics[0].to_string(), p.at.metrics[1].to_string());
    assert!(a.ends_with(&format!(":{METRICS_PORT}")));
    let stop = p.dir.path().join("stop");
    let mut bench = p.multipath(
        &[
            "--workload",
            "write",
            "--verify",
            "--qd",
            "8",
            "--span-blocks",
            "4096",
            "--seed",
            "31",
            "--io-timeout-ms",
            "3000",
        ],
        &stop,
    );
    let prom = Prometheus::start(&p);
    // Both targets scraped, their exposition parsed.
    prom.wait("up{job=\"duplex\"}", "both nodes scraped", |r| {
        r.len() == 2 && r.iter().all(|(_, v)| *v == 1.0)
    });
    // The namespace's write counter on the owner's port rises while the workload runs.
    let writes =
        format!("sum(duplex_namespace_commands_total{{instance=\"{a}\",op=\"write\",nsid=\"1\"}})");
    let first = prom.wait_value(&writes, "writes counted", |v| v > 0.0);
    let later = prom.wait_value(&writes, "writes still counted", |v| v > first);
    eprintln!("duplex_namespace_commands_total (writes, node 1): {first} then {later}");
    let bytes = format!("sum(duplex_namespace_bytes_total{{instance=\"{a}\",op=\"write\"}})");
    prom.wait_value(&bytes, "bytes counted", |v| v >= first * 4096.0);
    prom.wait(
        &format!("duplex_namespace_latency_seconds_count{{instance=\"{a}\",op=\"write\"}}"),
        "latency observed",
        |r| !r.is_empty() && r.iter().all(|(_, v)| *v > 0.0),
    );
    // What else a scrape holds: the drives, the cluster's heartbeats, the pool, the services.
    for q in [
        format!("sum(duplex_drive_commands_total{{instance=\"{a}\",op=\"write\"}})"),
        format!(
            "sum(duplex_cluster_heartbeats_received_total{{instance=\"{b}\",path=\"interconnect\"}})"
        ),
        format!("sum(duplex_cluster_heartbeats_sent_total{{instance=\"{b}\",path=\"disk\"}})"),
        format!("duplex_pool_state{{instance=\"{a}\",pool=\"tank\",state=\"online\"}}"),
        format!("duplex_pool_served_here{{instance=\"{a}\",pool=\"tank\"}}"),
        format!("duplex_service_up{{instance=\"{a}\",service=\"fabric\"}}"),
        format!("duplex_cluster_peer_up{{instance=\"{b}\",state=\"alive\"}}"),
    ] {
        prom.wait_value(&q, "a series of the scrape", |v| v > 0.0);
    }
    // The exposition as a scraper reads it, and what else the HTTP side answers.
    let ns = p.net().h.clone();
    let text = in_netns(&ns, || http_get(&a, "/metrics")).expect("GET /metrics answers 200");
    for line in [
        "# TYPE duplex_namespace_commands_total counter",
        "# TYPE duplex_namespace_latency_seconds histogram",
        "# TYPE duplex_ana_state gauge",
        "# TYPE duplex_drive_latency_seconds histogram",
        "# TYPE duplex_service_restarts_total counter",
        "duplex_metrics_source_up{source=\"metadata\"} 1",
    ] {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }
    eprintln!(
        "node 1's exposition (no buckets):\n{}",
        text.lines()
            .filter(|l| !l.contains("_bucket") && !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(in_netns(&ns, || http_get(&a, "/nothing")), None, "404");
    // ANA: optimized on the owner's port, not on the peer's.
    let optimized = |instance: &str| {
        format!("max(duplex_ana_state{{instance=\"{instance}\",state=\"optimized\"}})")
    };
    prom.wait_value(&optimized(&a), "optimized on node 1", |v| v == 1.0);
    prom.wait_value(&optimized(&b), "not optimized on node 2", |v| v == 0.0);
    prom.wait_value(
        &format!("max(duplex_ana_state{{instance=\"{b}\",state=\"inaccessible\"}})"),
        "inaccessible on node 2",
        |v| v == 1.0,
    );
    // The owner killed: the survivor fences it, takes the pool over, and its port turns
    // optimized in Prometheus.
    p.wait_more_writes(1, 100);
    p.node(0).kill_all();
    p.node(1).log.wait_for(&["pool taken over", "tank"]);
    prom.wait_value(
        &optimized(&b),
        "optimized on node 2 after the takeover",
        |v| v == 1.0,
    );
    prom.wait_value(
        &format!("duplex_cluster_takeovers_total{{instance=\"{b}\"}}"),
        "the takeover counted",
        |v| v == 1.0,
    );
    prom.wait_value(
        &format!("duplex_cluster_peer_deaths_total{{instance=\"{b}\"}}"),
        "the peer's death counted",
        |v| v >= 1.0,
    );
    prom.wait_value(
        &format!("up{{instance=\"{a}\"}}"),
        "the killed node unreachable",
        |v| v == 0.0,
    );
    // The I/O goes on through the survivor, and Prometheus counts it there.
    let writes_b =
        format!("sum(duplex_namespace_commands_total{{instance=\"{b}\",op=\"write\",nsid=\"1\"}})");
    let on_b = prom.wait_value(&writes_b, "writes counted on node 2", |v| v > 0.0);
    prom.wait_value(&writes_b, "writes still counted on node 2", |v| v > on_b);
    let r = finish_multipath(&mut bench, &stop);
    eprintln!(
        "workload: {} blocks checked, {} path switches",
        r["blocks_checked"], r["path_switches"]
    );
}
