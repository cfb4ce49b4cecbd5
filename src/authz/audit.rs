//! The audit log: one JSON line per authorization decision, authentication failure and
//! connection-level refusal, on its own sink, written by a background thread so the call path
//! never waits for the disk (nor wakes the thread per line).
//!
//! The queue between the callers and the writer is bounded (in bytes), and the log fails
//! closed: a decision line that does not fit, or that would wait behind a sink stuck for longer
//! than the stall timeout, is refused, and the call with it ([`AuditLog::record`]). Lines about
//! refused connections and failed authentications ([`AuditLog::record_best_effort`]) may only
//! use half of the queue: a flood of them is dropped (and counted) rather than crowding out the
//! decisions of the calls being served.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, LazyLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::access::AccessLevel;
use super::policy::Decision;

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// One decision's line. It borrows what it names (it is serialized at once, on every
/// authorized call: copying four strings into it was four allocations per call).
#[derive(Debug, Serialize)]
pub struct AuditEvent<'a> {
    pub time: String,
    /// Always "decision" for this kind of line.
    pub event: &'static str,
    pub identity: &'a str,
    pub namespace: Option<&'a str>,
    pub method: &'a str,
    pub access: &'static str,
    pub decision: &'static str,
    pub reason: &'static str,
    pub required_role: Option<&'static str>,
    pub held_role: Option<&'static str>,
    pub peer: &'a str,
    /// How the caller authenticated: "certificate", "bearer" or "none".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<&'static str>,
    /// Codec server: how many payloads were decoded or encoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    /// A decision about one command of a request, aimed at `namespace` (e.g.
    /// `StartChildWorkflowExecution`; `method` then ends in `/` and the command).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<&'static str>,
    /// For a command's decision: the namespace of the request that carries it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_namespace: Option<&'a str>,
}

impl<'a> AuditEvent<'a> {
    pub fn new(
        identity: &'a str,
        namespace: Option<&'a str>,
        method: &'a str,
        level: AccessLevel,
        decision: &Decision,
        peer: &'a str,
    ) -> AuditEvent<'a> {
        AuditEvent {
            time: now_rfc3339(),
            event: "decision",
            identity,
            namespace,
            method,
            access: level.as_str(),
            decision: if decision.allowed { "allow" } else { "deny" },
            reason: decision.reason,
            required_role: decision.required.map(|r| r.as_str()),
            held_role: decision.held.map(|r| r.as_str()),
            peer,
            credential: None,
            count: None,
            command: None,
            request_namespace: None,
        }
    }
}

/// What happened at the edge, before any authorization decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeEventKind {
    /// A call was refused at its headers: no credential, or a token that does not verify.
    AuthenticationFailed,
    /// A connection was refused: TLS handshake failed or timed out, connection limit.
    ConnectionRefused,
    /// An open connection was closed because its certificate expired or was revoked.
    ConnectionClosed,
}

/// A line about a refused call or connection. `reason` is one of a fixed set (see the
/// README's audit section); `detail` is the human-readable cause.
#[derive(Debug, Serialize)]
pub struct EdgeAuditEvent {
    pub time: String,
    pub event: EdgeEventKind,
    pub reason: &'static str,
    pub peer: String,
    /// The method path, for a refused call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The credential the caller presented: "certificate", "bearer" or "none".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<&'static str>,
    /// The client certificate's subject and serial (hex), when one is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl EdgeAuditEvent {
    pub fn new(event: EdgeEventKind, reason: &'static str, peer: &str) -> EdgeAuditEvent {
        EdgeAuditEvent {
            time: now_rfc3339(),
            event,
            reason,
            peer: peer.to_string(),
            method: None,
            credential: None,
            subject: None,
            serial: None,
            detail: None,
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// How long the writer thread collects lines before writing them out. Under load the thread
/// wakes once per interval instead of once per line; an idle log is written this long after its
/// line at most.
const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// A failed write is retried after this long (the batch is kept, not dropped).
const RETRY_INTERVAL: Duration = Duration::from_millis(500);
/// At shutdown, how long the writer may take to write out what is queued.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Bounds of the audit queue (`[limits]` audit_queue_bytes, audit_stall_seconds).
#[derive(Debug, Clone, Copy)]
pub struct AuditSettings {
    /// Bytes of lines queued for the writer, at most.
    pub queue_bytes: usize,
    /// A write pending longer than this means the sink is stuck.
    pub stall: Duration,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            queue_bytes: 16 * 1024 * 1024,
            stall: Duration::from_secs(5),
        }
    }
}

/// Why an audit line was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    #[error("the audit queue is full ({0} bytes waiting for the audit sink)")]
    Full(usize),
    #[error("the audit sink has not completed a write for {0:?}")]
    Stalled(Duration),
    #[error("the audit writer has stopped")]
    Closed,
}

/// The queue's state, read by metrics.
#[derive(Debug, Default)]
pub struct AuditStats {
    /// Bytes of lines queued or being written.
    queued_bytes: AtomicUsize,
    /// Decision lines refused (their calls were refused).
    refused: AtomicU64,
    /// Best-effort lines dropped because the queue was more than half full.
    dropped: AtomicU64,
    /// Writes to the sink that failed (retried).
    write_errors: AtomicU64,
    /// Milliseconds since [`EPOCH`] (+1) when the write in progress began; 0 when idle.
    busy_since: AtomicU64,
}

impl AuditStats {
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn millis_since_epoch() -> u64 {
    EPOCH.elapsed().as_millis() as u64 + 1
}

pub struct AuditLog {
    writer: Option<AuditWriter>,
    stats: Arc<AuditStats>,
    settings: AuditSettings,
}

struct AuditWriter {
    sender: mpsc::Sender<String>,
    closing: Arc<AtomicBool>,
    /// Signalled by the writer thread when it has written everything (a Mutex: Sync).
    done: std::sync::Mutex<mpsc::Receiver<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AuditLog {
    /// "stdout", "stderr", "off", or a file path (appended to).
    pub fn open(target: &str, settings: AuditSettings) -> std::io::Result<AuditLog> {
        let sink = match target {
            "off" => return Ok(AuditLog::disabled()),
            "stdout" => Sink::Stream(Box::new(std::io::stdout())),
            "stderr" => Sink::Stream(Box::new(std::io::stderr())),
            path => Sink::File(AuditFile::open(path)?),
        };
        AuditLog::spawn(sink, settings)
    }

    /// A log writing to `out` (any sink; tests use one they can stall).
    pub fn with_writer(
        out: Box<dyn Write + Send>,
        settings: AuditSettings,
    ) -> std::io::Result<AuditLog> {
        AuditLog::spawn(Sink::Stream(out), settings)
    }

    fn spawn(out: Sink, settings: AuditSettings) -> std::io::Result<AuditLog> {
        let stats = Arc::new(AuditStats::default());
        let (sender, receiver) = mpsc::channel::<String>();
        let (done_tx, done) = mpsc::channel::<()>();
        let closing = Arc::new(AtomicBool::new(false));
        let (thread_stats, thread_closing) = (stats.clone(), closing.clone());
        let thread = std::thread::Builder::new()
            .name("portcullis-audit".into())
            .spawn(move || {
                write_batches(receiver, out, &thread_stats, &thread_closing);
                let _ = done_tx.send(());
            })?;
        Ok(AuditLog {
            writer: Some(AuditWriter {
                sender,
                closing,
                done: std::sync::Mutex::new(done),
                thread: Some(thread),
            }),
            stats,
            settings,
        })
    }

    pub fn disabled() -> AuditLog {
        AuditLog {
            writer: None,
            stats: Arc::default(),
            settings: AuditSettings::default(),
        }
    }

    /// The queue's counters, for metrics.
    pub fn stats(&self) -> Arc<AuditStats> {
        self.stats.clone()
    }

    /// Queues a line that must be written for the call it describes to go on. An error means
    /// the call must be refused: the queue is full or the sink is stuck (both counted).
    pub fn record<E: Serialize>(&self, event: &E) -> Result<(), AuditError> {
        self.enqueue(event, self.settings.queue_bytes)
            .inspect_err(|_| {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
            })
    }

    /// Queues a line about something already refused (a connection, a failed authentication),
    /// using at most half of the queue; beyond that the line is dropped and counted.
    pub fn record_best_effort<E: Serialize>(&self, event: &E) {
        if self.enqueue(event, self.settings.queue_bytes / 2).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn enqueue<E: Serialize>(&self, event: &E, bound: usize) -> Result<(), AuditError> {
        let Some(writer) = &self.writer else {
            return Ok(());
        };
        let since = self.stats.busy_since.load(Ordering::Relaxed);
        if since != 0 {
            let waited = Duration::from_millis(millis_since_epoch().saturating_sub(since));
            if waited > self.settings.stall {
                return Err(AuditError::Stalled(waited));
            }
        }
        let Ok(mut line) = serde_json::to_string(event) else {
            return Ok(());
        };
        line.push('\n');
        let len = line.len();
        self.stats
            .queued_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |queued| {
                (queued + len <= bound).then_some(queued + len)
            })
            .map_err(AuditError::Full)?;
        if writer.sender.send(line).is_err() {
            // The writer is gone (only at shutdown): nothing will write this line.
            self.stats.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            return Err(AuditError::Closed);
        }
        Ok(())
    }
}

/// An audit file that follows its path: when the file at the path is no longer the one open
/// (rotated by renaming, or deleted), the next batch goes to a new file at the path, so no line
/// is written where nobody will read it. Checked once per batch (one `stat`).
struct AuditFile {
    path: std::path::PathBuf,
    file: std::fs::File,
    /// (device, inode) of `file`.
    identity: (u64, u64),
}

impl AuditFile {
    fn open(path: &str) -> std::io::Result<AuditFile> {
        let path = std::path::PathBuf::from(path);
        let (file, identity) = Self::open_at(&path)?;
        Ok(AuditFile {
            path,
            file,
            identity,
        })
    }

    fn open_at(path: &std::path::Path) -> std::io::Result<(std::fs::File, (u64, u64))> {
        use std::os::unix::fs::MetadataExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let meta = file.metadata()?;
        Ok((file, (meta.dev(), meta.ino())))
    }

    /// Reopens when the path names another file or none.
    fn follow_path(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let current = std::fs::metadata(&self.path).map(|m| (m.dev(), m.ino()));
        if current.ok() != Some(self.identity) {
            let (file, identity) = Self::open_at(&self.path)?;
            tracing::warn!(path = %self.path.display(), "the audit log file was moved or deleted: writing to a new one at its path");
            self.file = file;
            self.identity = identity;
        }
        Ok(())
    }
}

/// Where the writer thread writes.
enum Sink {
    Stream(Box<dyn Write + Send>),
    File(AuditFile),
}

impl Sink {
    /// Before each batch (and each retry of one).
    fn start_batch(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stream(_) => Ok(()),
            Sink::File(file) => file.follow_path(),
        }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Stream(out) => out.write(buf),
            Sink::File(file) => file.file.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stream(out) => out.flush(),
            Sink::File(file) => file.file.flush(),
        }
    }
}

impl Drop for AuditLog {
    /// Writes out every recorded line before the log goes away (at shutdown the pipeline, and
    /// with it the last reference to the log, is dropped before the process exits). A sink
    /// that does not take them within [`DRAIN_TIMEOUT`] is left behind, with an error line.
    fn drop(&mut self) {
        if let Some(mut writer) = self.writer.take() {
            let thread = writer.thread.take();
            drop(writer.sender);
            let finished = writer
                .done
                .get_mut()
                .map(|done| done.recv_timeout(DRAIN_TIMEOUT).is_ok())
                .unwrap_or(false);
            writer.closing.store(true, Ordering::Relaxed);
            if finished {
                if let Some(thread) = thread {
                    let _ = thread.join();
                }
            } else {
                tracing::error!(
                    queued_bytes = self.stats.queued_bytes(),
                    "the audit sink did not take the last audit lines in time"
                );
            }
        }
    }
}

/// The writer thread: blocks while the log is idle; once a line arrives, sleeps for
/// [`FLUSH_INTERVAL`] (senders do not wake a sleeping thread), then writes everything queued in
/// one write of whole lines (a reader never sees half a line). A failed write is retried (the
/// lines stay queued and count against the bound) until it succeeds or the log is dropped.
/// Ends, after writing everything, when the log is dropped.
fn write_batches(
    receiver: mpsc::Receiver<String>,
    mut out: Sink,
    stats: &AuditStats,
    closing: &AtomicBool,
) {
    let mut batch = Vec::with_capacity(64 * 1024);
    while let Ok(line) = receiver.recv() {
        batch.extend_from_slice(line.as_bytes());
        std::thread::sleep(FLUSH_INTERVAL);
        let mut open = true;
        loop {
            match receiver.try_recv() {
                Ok(line) => batch.extend_from_slice(line.as_bytes()),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        stats
            .busy_since
            .store(millis_since_epoch(), Ordering::Relaxed);
        let written = write_retrying(&mut out, &batch, stats, closing);
        stats.busy_since.store(0, Ordering::Relaxed);
        stats.queued_bytes.fetch_sub(batch.len(), Ordering::AcqRel);
        if !written {
            return;
        }
        batch.clear();
        if batch.capacity() > 1024 * 1024 {
            batch.shrink_to(64 * 1024);
        }
        if !open {
            break;
        }
    }
}

/// Writes the whole batch, retrying failures (from where the last attempt stopped, so no line
/// is written twice). False when the log was dropped while the sink kept failing.
fn write_retrying(out: &mut Sink, batch: &[u8], stats: &AuditStats, closing: &AtomicBool) -> bool {
    let mut offset = 0;
    let mut reported = false;
    loop {
        let attempt = (|| {
            out.start_batch()?;
            while offset < batch.len() {
                match out.write(&batch[offset..]) {
                    Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                    Ok(n) => offset += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            out.flush()
        })();
        match attempt {
            Ok(()) => {
                if reported {
                    tracing::warn!("the audit sink accepts writes again");
                }
                return true;
            }
            Err(e) => {
                stats.write_errors.fetch_add(1, Ordering::Relaxed);
                if !reported {
                    tracing::error!(error = %e, "cannot write the audit log: retrying; calls are refused while it stays stuck");
                    reported = true;
                }
                if closing.load(Ordering::Relaxed) {
                    return false;
                }
                std::thread::sleep(RETRY_INTERVAL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::Role;

    fn event(identity: &str) -> AuditEvent<'_> {
        let decision = Decision {
            allowed: true,
            reason: "role",
            required: Some(Role::Reader),
            held: Some(Role::Admin),
        };
        AuditEvent::new(
            identity,
            Some("ns"),
            "/m",
            AccessLevel::Read,
            &decision,
            "peer",
        )
    }

    #[test]
    fn every_line_is_written_by_drop_and_idle_lines_soon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(path.to_str().unwrap(), AuditSettings::default()).unwrap();
        log.record(&event("caller-0")).unwrap();
        // An idle log writes its line within about one interval.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::fs::read_to_string(&path).unwrap().lines().count() < 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "idle line not written"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        for i in 1..5000 {
            log.record(&event(&format!("caller-{i}"))).unwrap();
        }
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5000);
        for (i, line) in lines.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["identity"], format!("caller-{i}"));
        }
    }

    /// A rotated (renamed) or deleted audit file is not written to any more: the next batch
    /// goes to a new file at the path, and across the files no line is lost or repeated.
    #[test]
    fn a_moved_or_deleted_file_is_followed_by_a_new_one_at_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let rotated = dir.path().join("audit.jsonl.1");
        let log = AuditLog::open(path.to_str().unwrap(), AuditSettings::default()).unwrap();
        let wait_for = |path: &std::path::Path, lines: usize| {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::fs::read_to_string(path)
                .map(|t| t.lines().count())
                .unwrap_or(0)
                < lines
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{path:?}: {lines} lines"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        for i in 0..100 {
            log.record(&event(&format!("caller-{i}"))).unwrap();
        }
        wait_for(&path, 100);
        std::fs::rename(&path, &rotated).unwrap();
        for i in 100..200 {
            log.record(&event(&format!("caller-{i}"))).unwrap();
        }
        wait_for(&path, 100);
        std::fs::remove_file(&path).unwrap();
        for i in 200..300 {
            log.record(&event(&format!("caller-{i}"))).unwrap();
        }
        drop(log);
        let old = std::fs::read_to_string(&rotated).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        let identities = |text: &str| -> Vec<String> {
            text.lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["identity"].to_string()
                })
                .collect()
        };
        let expect = |range: std::ops::Range<usize>| -> Vec<String> {
            range.map(|i| format!("\"caller-{i}\"")).collect()
        };
        assert_eq!(identities(&old), expect(0..100));
        assert_eq!(identities(&new), expect(200..300));
    }

    /// Whether the gate is open, and what went through it.
    type GateState = (std::sync::Mutex<(bool, Vec<u8>)>, std::sync::Condvar);

    /// A sink that blocks every write until it is opened, then keeps what it was given.
    #[derive(Clone, Default)]
    struct GatedSink {
        state: Arc<GateState>,
    }

    impl GatedSink {
        fn open(&self) {
            let (lock, wake) = &*self.state;
            lock.lock().unwrap().0 = true;
            wake.notify_all();
        }
        fn text(&self) -> String {
            String::from_utf8(self.state.0.lock().unwrap().1.clone()).unwrap()
        }
    }

    impl Write for GatedSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, wake) = &*self.state;
            let mut state = lock.lock().unwrap();
            while !state.0 {
                state = wake.wait(state).unwrap();
            }
            state.1.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn edge_event(i: usize) -> EdgeAuditEvent {
        EdgeAuditEvent::new(
            EdgeEventKind::ConnectionRefused,
            "connection_limit",
            &format!("peer-{i}"),
        )
    }

    #[test]
    fn a_stuck_sink_fills_the_bounded_queue_then_calls_are_refused() {
        let sink = GatedSink::default();
        let settings = AuditSettings {
            queue_bytes: 64 * 1024,
            stall: Duration::from_millis(400),
        };
        let log = AuditLog::with_writer(Box::new(sink.clone()), settings).unwrap();
        let stats = log.stats();
        let mut accepted = 0;
        let error = loop {
            match log.record(&event(&format!("caller-{accepted}"))) {
                Ok(()) => accepted += 1,
                Err(e) => break e,
            }
            assert!(accepted < 10_000, "the queue never filled");
        };
        assert!(matches!(error, AuditError::Full(_)), "{error:?}");
        assert!(accepted > 100, "{accepted}");
        assert!(stats.queued_bytes() <= settings.queue_bytes);
        assert!(stats.queued_bytes() > settings.queue_bytes - 1024);
        assert_eq!(stats.refused(), 1);
        // Connection-level lines only get half the queue: dropped, counted, not refused.
        log.record_best_effort(&edge_event(0));
        assert_eq!(stats.dropped(), 1);
        assert_eq!(stats.refused(), 1);
        // Past the stall timeout the sink counts as stuck: refused even before the queue fills.
        std::thread::sleep(Duration::from_millis(500));
        assert!(matches!(
            log.record(&event("caller-0")),
            Err(AuditError::Stalled(_))
        ));
        assert_eq!(stats.refused(), 2);
        // The sink recovers: everything accepted is written once, in order, and the queue empties.
        sink.open();
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.queued_bytes() > 0 {
            assert!(Instant::now() < deadline, "the queue did not drain");
            std::thread::sleep(Duration::from_millis(10));
        }
        log.record(&event(&format!("caller-{accepted}"))).unwrap();
        log.record_best_effort(&edge_event(1));
        drop(log);
        let text = sink.text();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), accepted + 2);
        for (i, line) in lines.iter().take(accepted + 1).enumerate() {
            assert_eq!(line["identity"], format!("caller-{i}"));
            assert_eq!(line["event"], "decision");
        }
        assert_eq!(lines[accepted + 1]["event"], "connection_refused");
        assert_eq!(lines[accepted + 1]["reason"], "connection_limit");
        assert_eq!(lines[accepted + 1]["peer"], "peer-1");
    }

    /// Fails the first writes, then accepts, writing at most a few bytes per call.
    struct FlakySink {
        failures: usize,
        out: Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl Write for FlakySink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.failures > 0 {
                self.failures -= 1;
                return Err(std::io::Error::other("disk full"));
            }
            let n = buf.len().min(7);
            self.out.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn failed_writes_are_retried_without_losing_or_repeating_lines() {
        let out = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = FlakySink {
            failures: 2,
            out: out.clone(),
        };
        let log = AuditLog::with_writer(Box::new(sink), AuditSettings::default()).unwrap();
        let stats = log.stats();
        for i in 0..50 {
            log.record(&event(&format!("caller-{i}"))).unwrap();
        }
        drop(log);
        assert_eq!(stats.write_errors(), 2);
        assert_eq!(stats.queued_bytes(), 0);
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let identities: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["identity"].to_string())
            .collect();
        let expected: Vec<String> = (0..50).map(|i| format!("\"caller-{i}\"")).collect();
        assert_eq!(identities, expected);
    }
}
