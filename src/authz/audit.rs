//! The audit log: one JSON line per authorization decision, on its own sink, written by a
//! background thread so the call path never waits for the disk (nor wakes the thread per line).

use std::io::Write;
use std::sync::mpsc;
use std::time::Duration;

use serde::Serialize;

use super::access::AccessLevel;
use super::policy::Decision;

#[derive(Debug, Serialize)]
pub struct AuditEvent {
    pub time: String,
    pub identity: String,
    pub namespace: Option<String>,
    pub method: String,
    pub access: &'static str,
    pub decision: &'static str,
    pub reason: &'static str,
    pub required_role: Option<&'static str>,
    pub held_role: Option<&'static str>,
    pub peer: String,
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
    pub request_namespace: Option<String>,
}

impl AuditEvent {
    pub fn new(
        identity: &str,
        namespace: Option<&str>,
        method: &str,
        level: AccessLevel,
        decision: &Decision,
        peer: &str,
    ) -> AuditEvent {
        AuditEvent {
            time: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            identity: identity.to_string(),
            namespace: namespace.map(str::to_string),
            method: method.to_string(),
            access: level.as_str(),
            decision: if decision.allowed { "allow" } else { "deny" },
            reason: decision.reason,
            required_role: decision.required.map(|r| r.as_str()),
            held_role: decision.held.map(|r| r.as_str()),
            peer: peer.to_string(),
            credential: None,
            count: None,
            command: None,
            request_namespace: None,
        }
    }
}

/// How long the writer thread collects lines before writing them out. Under load the thread
/// wakes once per interval instead of once per line; an idle log is written this long after its
/// line at most.
const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

pub struct AuditLog {
    writer: Option<AuditWriter>,
}

struct AuditWriter {
    sender: mpsc::Sender<String>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AuditLog {
    /// "stdout", "stderr", "off", or a file path (appended to).
    pub fn open(target: &str) -> std::io::Result<AuditLog> {
        let writer: Box<dyn Write + Send> = match target {
            "off" => return Ok(AuditLog { writer: None }),
            "stdout" => Box::new(std::io::stdout()),
            "stderr" => Box::new(std::io::stderr()),
            path => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (sender, receiver) = mpsc::channel::<String>();
        let thread = std::thread::Builder::new()
            .name("portcullis-audit".into())
            .spawn(move || write_batches(receiver, writer))?;
        Ok(AuditLog {
            writer: Some(AuditWriter {
                sender,
                thread: Some(thread),
            }),
        })
    }

    pub fn disabled() -> AuditLog {
        AuditLog { writer: None }
    }

    pub fn record(&self, event: &AuditEvent) {
        let Some(writer) = &self.writer else { return };
        let Ok(mut line) = serde_json::to_string(event) else {
            return;
        };
        line.push('\n');
        let _ = writer.sender.send(line);
    }
}

impl Drop for AuditLog {
    /// Writes out every recorded line before the log goes away (at shutdown the pipeline, and
    /// with it the last reference to the log, is dropped before the process exits).
    fn drop(&mut self) {
        if let Some(mut writer) = self.writer.take() {
            let thread = writer.thread.take();
            drop(writer);
            if let Some(thread) = thread {
                let _ = thread.join();
            }
        }
    }
}

/// The writer thread: blocks while the log is idle; once a line arrives, sleeps for
/// [`FLUSH_INTERVAL`] (senders do not wake a sleeping thread), then writes everything queued in
/// one write of whole lines (a reader never sees half a line). Ends, after writing everything,
/// when the log is dropped.
fn write_batches(receiver: mpsc::Receiver<String>, mut out: Box<dyn Write + Send>) {
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
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > 1024 * 1024 {
            batch.shrink_to(64 * 1024);
        }
        if !open {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::Role;

    fn event(i: usize) -> AuditEvent {
        let decision = Decision {
            allowed: true,
            reason: "role",
            required: Some(Role::Reader),
            held: Some(Role::Admin),
        };
        AuditEvent::new(
            &format!("caller-{i}"),
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
        let log = AuditLog::open(path.to_str().unwrap()).unwrap();
        log.record(&event(0));
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
            log.record(&event(i));
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
}
