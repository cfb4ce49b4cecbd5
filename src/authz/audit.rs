//! The audit log: one JSON line per authorization decision, on its own sink, written by a
//! background thread so the call path never waits for the disk.

use std::io::Write;
use std::sync::mpsc;

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
        }
    }
}

pub struct AuditLog {
    sender: Option<std::sync::Mutex<mpsc::Sender<String>>>,
}

impl AuditLog {
    /// "stdout", "stderr", "off", or a file path (appended to).
    pub fn open(target: &str) -> std::io::Result<AuditLog> {
        let writer: Box<dyn Write + Send> = match target {
            "off" => return Ok(AuditLog { sender: None }),
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
        std::thread::Builder::new()
            .name("portcullis-audit".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(writer);
                while let Ok(line) = receiver.recv() {
                    let _ = out.write_all(line.as_bytes());
                    // Flush whenever the queue is drained, so lines are visible promptly.
                    while let Ok(line) = receiver.try_recv() {
                        let _ = out.write_all(line.as_bytes());
                    }
                    let _ = out.flush();
                }
            })?;
        Ok(AuditLog {
            sender: Some(std::sync::Mutex::new(sender)),
        })
    }

    pub fn disabled() -> AuditLog {
        AuditLog { sender: None }
    }

    pub fn record(&self, event: &AuditEvent) {
        let Some(sender) = &self.sender else { return };
        let Ok(mut line) = serde_json::to_string(event) else {
            return;
        };
        line.push('\n');
        if let Ok(sender) = sender.lock() {
            let _ = sender.send(line);
        }
    }
}
