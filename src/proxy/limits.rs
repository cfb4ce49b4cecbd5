//! Budgets that bound what callers can make the proxy hold: buffered request bytes (per
//! connection and for the whole process), open client connections, and the counters behind
//! their metrics.
//!
//! Request bytes are reserved as they arrive, before their HTTP/2 flow-control capacity is given
//! back to the caller, and held until the call is answered. A call that would go past a budget
//! is refused with RESOURCE_EXHAUSTED and its buffer freed at once. Refusing rather than waiting
//! (not releasing flow-control capacity until the budget frees up) is deliberate: partly received
//! bodies that each wait for the others' bytes to be freed would hold the budget together until
//! the body timeout, and the caller would learn nothing. Temporal SDKs retry RESOURCE_EXHAUSTED.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::ProxyError;

/// A number of bytes that reservations may hold at once.
#[derive(Debug)]
pub struct BufferBudget {
    used: AtomicUsize,
    limit: usize,
    /// "connection" or "process", for the refusal message.
    scope: &'static str,
}

impl BufferBudget {
    pub fn new(limit: usize, scope: &'static str) -> BufferBudget {
        BufferBudget {
            used: AtomicUsize::new(0),
            limit,
            scope,
        }
    }

    /// Bytes held now.
    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Which budget refused a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetScope {
    Connection,
    Process,
}

/// Bytes held against a connection's budget and the process's, given back when dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    connection: &'a BufferBudget,
    process: &'a BufferBudget,
    bytes: usize,
}

impl<'a> Reservation<'a> {
    pub fn new(connection: &'a BufferBudget, process: &'a BufferBudget) -> Reservation<'a> {
        Reservation {
            connection,
            process,
            bytes: 0,
        }
    }

    /// Holds `bytes` more, or holds nothing more and says which budget is full.
    pub fn grow(&mut self, bytes: usize) -> Result<(), BudgetScope> {
        if !self.connection.take(bytes) {
            return Err(BudgetScope::Connection);
        }
        if !self.process.take(bytes) {
            self.connection.give(bytes);
            return Err(BudgetScope::Process);
        }
        self.bytes += bytes;
        Ok(())
    }

    /// Gives back `bytes` (at most what is held).
    pub fn shrink(&mut self, bytes: usize) {
        let bytes = bytes.min(self.bytes);
        self.connection.give(bytes);
        self.process.give(bytes);
        self.bytes -= bytes;
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The error for a refusal by `scope`.
    pub fn refusal(&self, scope: BudgetScope) -> ProxyError {
        let budget = match scope {
            BudgetScope::Connection => self.connection,
            BudgetScope::Process => self.process,
        };
        ProxyError::BufferLimit {
            scope: budget.scope,
            limit: budget.limit,
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.connection.give(self.bytes);
            self.process.give(self.bytes);
        }
    }
}

/// The bytes a request's header block holds, as HTTP/2 counts them for
/// SETTINGS_MAX_HEADER_LIST_SIZE (name + value + 32 per field).
pub fn header_bytes(parts: &http::request::Parts) -> usize {
    parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum::<usize>()
        + parts.uri.path().len()
        + 32
}

/// Open client connections (TLS handshakes included), at most `limit`.
#[derive(Debug)]
pub struct ConnectionGate {
    open: AtomicUsize,
    limit: usize,
}

impl ConnectionGate {
    pub fn new(limit: usize) -> Arc<ConnectionGate> {
        Arc::new(ConnectionGate {
            open: AtomicUsize::new(0),
            limit,
        })
    }

    /// A slot for one more connection, held until the guard drops; None at the limit.
    pub fn enter(self: &Arc<Self>) -> Option<ConnectionSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |open| {
                (open < self.limit).then_some(open + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(self.clone()))
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// One connection's place under the [`ConnectionGate`].
#[derive(Debug)]
pub struct ConnectionSlot(Arc<ConnectionGate>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why the edge refused a call before it reached the pipeline (metric label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Unauthenticated = 0,
    ConnectionBudget = 1,
    ProcessBudget = 2,
    BodyTimeout = 3,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::Unauthenticated,
        Refusal::ConnectionBudget,
        Refusal::ProcessBudget,
        Refusal::BodyTimeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::ConnectionBudget => "connection_buffer_limit",
            Refusal::ProcessBudget => "process_buffer_limit",
            Refusal::BodyTimeout => "body_timeout",
        }
    }
}

/// Why the proxy closed a client connection (metric label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// `max_connection_age_seconds` passed.
    MaxAge = 0,
    /// The client certificate's notAfter passed.
    CertificateExpired = 1,
    /// A reloaded CRL revokes the client certificate.
    CertificateRevoked = 2,
}

impl CloseReason {
    pub const ALL: [CloseReason; 3] = [
        CloseReason::MaxAge,
        CloseReason::CertificateExpired,
        CloseReason::CertificateRevoked,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CloseReason::MaxAge => "max_age",
            CloseReason::CertificateExpired => "certificate_expired",
            CloseReason::CertificateRevoked => "certificate_revoked",
        }
    }

    /// What a call cut by the close is told.
    pub fn message(self) -> &'static str {
        match self {
            CloseReason::MaxAge => "it reached its maximum age",
            CloseReason::CertificateExpired => "its client certificate expired",
            CloseReason::CertificateRevoked => "its client certificate was revoked",
        }
    }
}

/// Counters of refused calls and connections, read by metrics.
#[derive(Debug, Default)]
pub struct EdgeStats {
    refused_calls: [AtomicU64; 4],
    closed_connections: [AtomicU64; 3],
    /// Connections closed at accept because `max_connections` were open.
    refused_connections: AtomicU64,
}

impl EdgeStats {
    pub fn call_refused(&self, why: Refusal) {
        self.refused_calls[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused_calls(&self, why: Refusal) -> u64 {
        self.refused_calls[why as usize].load(Ordering::Relaxed)
    }

    pub fn connection_closed(&self, why: CloseReason) {
        self.closed_connections[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn closed_connections(&self, why: CloseReason) -> u64 {
        self.closed_connections[why as usize].load(Ordering::Relaxed)
    }

    pub fn connection_refused(&self) {
        self.refused_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused_connections(&self) -> u64 {
        self.refused_connections.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_hold_both_budgets_and_give_back_on_drop() {
        let connection = BufferBudget::new(100, "connection");
        let process = BufferBudget::new(150, "process");
        let other = BufferBudget::new(100, "connection");
        let mut a = Reservation::new(&connection, &process);
        a.grow(60).unwrap();
        assert_eq!(a.grow(50), Err(BudgetScope::Connection));
        assert_eq!((connection.in_use(), process.in_use()), (60, 60));
        let mut b = Reservation::new(&other, &process);
        b.grow(80).unwrap();
        // The other connection has room, the process does not: nothing is held for the refusal.
        assert_eq!(b.grow(20), Err(BudgetScope::Process));
        assert_eq!((other.in_use(), process.in_use()), (80, 140));
        assert!(matches!(
            b.refusal(BudgetScope::Process),
            ProxyError::BufferLimit {
                scope: "process",
                limit: 150
            }
        ));
        a.shrink(1000);
        assert_eq!((connection.in_use(), a.bytes()), (0, 0));
        a.grow(10).unwrap();
        drop(a);
        drop(b);
        assert_eq!(
            (connection.in_use(), other.in_use(), process.in_use()),
            (0, 0, 0)
        );
    }

    #[test]
    fn the_gate_admits_up_to_its_limit() {
        let gate = ConnectionGate::new(2);
        let first = gate.enter().expect("first");
        let _second = gate.enter().expect("second");
        assert!(gate.enter().is_none());
        drop(first);
        assert!(gate.enter().is_some());
        assert_eq!(gate.open(), 1);
    }
}
