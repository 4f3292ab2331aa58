//! The node's event journal: what an operator should learn of (takeovers, fencing, failed
//! drives, rebuilds, configuration changes, service crashes, refused hosts), numbered, kept in
//! the state directory (`events.jsonl`, one JSON object per line) so that it survives restarts
//! of every service and of duplexd, and read by `duplexctl events` through mgmt's admin channel.
//!
//! Services send events on their lifecycle channel; duplexd records its own (service crashes,
//! restarts, crash loops). Each service may record at most [`PER_SECOND`] events a second; the
//! rest are counted and the count recorded with the next one let through. The file keeps the
//! newest [`KEEP`] events: once it holds twice that many it is rewritten with the newest.
//! A line that does not parse (a torn last line after a power cut) is skipped when the journal
//! is read back.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// File name in the state directory.
pub const FILE: &str = "events.jsonl";
/// Events kept.
pub const KEEP: usize = 4096;
/// Events one source may record per second.
pub const PER_SECOND: u32 = 20;

/// One recorded event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Grows by one with every event of this node (across restarts).
    pub seq: u64,
    /// When (milliseconds since the Unix epoch).
    pub at_unix_ms: u64,
    /// The node's name.
    pub node: String,
    /// Who reported it (`duplexd` or a service's name).
    pub source: String,
    /// `info`, `warning` or `error`.
    pub level: String,
    /// Machine-readable kind.
    pub kind: String,
    /// One line for the operator.
    pub message: String,
}

#[derive(Debug)]
struct Limit {
    second: Instant,
    used: u32,
    suppressed: u64,
}

/// The journal.
#[derive(Debug)]
pub struct Journal {
    node: String,
    path: Option<PathBuf>,
    file: Option<File>,
    lines: usize,
    recent: VecDeque<Event>,
    next_seq: u64,
    limits: HashMap<String, Limit>,
}

impl Journal {
    /// Opens (or starts) the journal of node `node` in `dir`; `None`: kept in memory only.
    pub fn open(node: &str, dir: Option<PathBuf>) -> Self {
        let path = dir.map(|d| d.join(FILE));
        let mut recent = VecDeque::new();
        let mut lines = 0;
        // The highest number seen, parsed or not: a torn line's event may have been read by
        // someone before the power cut, so its number is never given again.
        let mut high = 0u64;
        let mut torn_tail = false;
        if let Some(p) = &path {
            if let Ok(bytes) = std::fs::read(p) {
                torn_tail = !bytes.is_empty() && bytes.last() != Some(&b'\n');
                for raw in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    lines += 1;
                    match serde_json::from_slice::<Event>(raw) {
                        Ok(e) => {
                            high = high.max(e.seq);
                            if recent.len() == KEEP {
                                recent.pop_front();
                            }
                            recent.push_back(e);
                        }
                        Err(e) => {
                            high = high.max(leading_seq(raw));
                            tracing::warn!(path = %p.display(), error = %e, "skipping an event journal line that does not parse");
                        }
                    }
                }
            }
        }
        let next_seq = high + 1;
        let file = path.as_ref().and_then(|p| {
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| {
                    tracing::error!(path = %p.display(), error = %e, "cannot open the event journal: events are kept in memory only");
                })
                .ok()?;
            // A torn last line is ended, so the next event starts a line of its own.
            if torn_tail {
                if let Err(e) = f.write_all(b"\n") {
                    tracing::error!(path = %p.display(), error = %e, "cannot end the torn last line of the event journal");
                }
            }
            Some(f)
        });
        Self {
            node: node.to_owned(),
            path,
            file,
            lines,
            recent,
            next_seq,
            limits: HashMap::new(),
        }
    }

    /// Records an event from `source` (rate-limited per source). Returns its number, or
    /// `None` when the source is over its rate.
    pub fn record(&mut self, source: &str, level: &str, kind: &str, message: &str) -> Option<u64> {
        self.record_at(Instant::now(), source, level, kind, message)
    }

    /// [`Journal::record`] at `now` (for the rate limit).
    fn record_at(
        &mut self,
        now: Instant,
        source: &str,
        level: &str,
        kind: &str,
        message: &str,
    ) -> Option<u64> {
        let limit = self.limits.entry(source.to_owned()).or_insert(Limit {
            second: now,
            used: 0,
            suppressed: 0,
        });
        if now.duration_since(limit.second).as_secs() >= 1 {
            limit.second = now;
            limit.used = 0;
        }
        if limit.used >= PER_SECOND {
            limit.suppressed += 1;
            return None;
        }
        limit.used += 1;
        let suppressed = std::mem::take(&mut limit.suppressed);
        let message = if suppressed > 0 {
            format!("{message} ({suppressed} earlier events of {source} not recorded: over {PER_SECOND} a second)")
        } else {
            message.to_owned()
        };
        let e = Event {
            seq: self.next_seq,
            at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            node: self.node.clone(),
            source: source.to_owned(),
            level: level.to_owned(),
            kind: kind.to_owned(),
            message,
        };
        self.next_seq += 1;
        tracing::info!(seq = e.seq, source, level, kind, message = %e.message, "event");
        self.append(&e);
        if self.recent.len() == KEEP {
            self.recent.pop_front();
        }
        self.recent.push_back(e);
        Some(self.next_seq - 1)
    }

    fn append(&mut self, e: &Event) {
        let Some(f) = self.file.as_mut() else { return };
        let Ok(mut line) = serde_json::to_string(e) else {
            return;
        };
        line.push('\n');
        if let Err(err) = f.write_all(line.as_bytes()) {
            tracing::error!(error = %err, "cannot write the event journal");
            return;
        }
        self.lines += 1;
        if self.lines >= 2 * KEEP {
            self.compact();
        }
    }

    /// Rewrites the file with the newest events (a new file renamed over the old one).
    fn compact(&mut self) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let tmp = path.with_extension("jsonl.new");
        let write = || -> std::io::Result<File> {
            let mut f = File::create(&tmp)?;
            for e in &self.recent {
                let mut line = serde_json::to_string(e).map_err(std::io::Error::other)?;
                line.push('\n');
                f.write_all(line.as_bytes())?;
            }
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            OpenOptions::new().append(true).open(&path)
        };
        match write() {
            Ok(f) => {
                self.file = Some(f);
                self.lines = self.recent.len();
            }
            Err(e) => tracing::error!(error = %e, "cannot compact the event journal"),
        }
    }

    /// Events numbered above `after`, oldest first, at most `max`.
    pub fn after(&self, after: u64, max: usize) -> Vec<Event> {
        self.recent
            .iter()
            .filter(|e| e.seq > after)
            .take(max)
            .cloned()
            .collect()
    }
}

/// The number a journal line starts with (`{"seq":N,...`), if it does (a torn line).
fn leading_seq(raw: &[u8]) -> u64 {
    let Some(rest) = raw.strip_prefix(b"{\"seq\":") else {
        return 0;
    };
    let digits: Vec<u8> = rest
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn events_are_numbered_kept_across_a_reopen_and_read_after_a_number() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open("n1", Some(dir.path().to_path_buf()));
        assert_eq!(
            j.record("metadata", "info", "pool-imported", "pool tank imported"),
            Some(1)
        );
        assert_eq!(
            j.record("duplexd", "warning", "service-crashed", "fabric died"),
            Some(2)
        );
        drop(j);
        // A torn last line (a power cut mid-write, cut inside a multi-byte character) is
        // skipped, its number not given again, and what follows is whole.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        f.write_all(
            "{\"seq\":3,\"at_unix_ms\":5,\"message\":\"h\u{e9}"
                .as_bytes()
                .split_last()
                .unwrap()
                .1,
        )
        .unwrap();
        drop(f);
        let mut j = Journal::open("n1", Some(dir.path().to_path_buf()));
        let all = j.after(0, 100);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(all[1].kind, "service-crashed");
        assert_eq!(
            j.record("cluster", "info", "takeover", "took over"),
            Some(4)
        );
        assert_eq!(j.after(2, 100).len(), 1);
        assert_eq!(j.after(0, 1).len(), 1);
        drop(j);
        // Read back again: the event after the torn line is whole.
        let j = Journal::open("n1", Some(dir.path().to_path_buf()));
        let all = j.after(0, 100);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 4]);
        assert_eq!(all[2].kind, "takeover");
    }

    #[test]
    fn a_source_over_its_rate_is_counted_and_said_with_the_next_event() {
        let mut j = Journal::open("n1", None);
        let t0 = Instant::now();
        let recorded = (0..(PER_SECOND + 5))
            .filter(|i| {
                j.record_at(
                    t0,
                    "fabric",
                    "warning",
                    "host-refused",
                    &format!("refused {i}"),
                )
                .is_some()
            })
            .count();
        assert_eq!(recorded, PER_SECOND as usize);
        // Another source is not limited by the first.
        assert!(j.record_at(t0, "metadata", "info", "config", "x").is_some());
        // A second later the source records again, saying what it lost.
        let later = t0 + std::time::Duration::from_secs(1);
        assert!(j
            .record_at(later, "fabric", "warning", "host-refused", "again")
            .is_some());
        let last = j.after(0, usize::MAX).pop().unwrap();
        assert!(
            last.message
                .contains("5 earlier events of fabric not recorded"),
            "{}",
            last.message
        );
    }

    #[test]
    fn the_file_is_compacted_to_the_newest_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open("n1", Some(dir.path().to_path_buf()));
        for i in 0..(2 * KEEP + 10) {
            // A source per event: no rate limit.
            j.record(&format!("s{i}"), "info", "k", "m");
        }
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(text.lines().count() < 2 * KEEP, "{}", text.lines().count());
        drop(j);
        let j = Journal::open("n1", Some(dir.path().to_path_buf()));
        let all = j.after(0, usize::MAX);
        assert_eq!(all.len(), KEEP);
        assert_eq!(all.last().unwrap().seq, (2 * KEEP + 10) as u64);
    }
}
