//! Resolving an upstream's host name, anew for every connection: a short-TTL DNS record that
//! moves a namespace to another region (Temporal Cloud's high-availability namespaces) is
//! followed by the next connection.
//!
//! Resolution goes through tokio's `lookup_host` (the system resolver: `/etc/hosts`, DNS),
//! unless a test installed a hook ([`set_test_resolver`]) that answers for the name.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};

/// Answers `(host, port)` with addresses, or `None` to leave the name to the system resolver.
pub type ResolveHook = Arc<dyn Fn(&str, u16) -> Option<Vec<SocketAddr>> + Send + Sync>;

static HOOK: RwLock<Option<ResolveHook>> = RwLock::new(None);

/// For tests: resolve the names `hook` answers for through it (a stand-in for a DNS record the
/// test controls), the others as usual. `None` removes it. Process-wide.
#[doc(hidden)]
pub fn set_test_resolver(hook: Option<ResolveHook>) {
    *HOOK.write().unwrap_or_else(PoisonError::into_inner) = hook;
}

/// Every address `host:port` resolves to now, in the resolver's order.
pub async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let hook = HOOK.read().unwrap_or_else(PoisonError::into_inner).clone();
    if let Some(addresses) = hook.and_then(|hook| hook(host, port)) {
        return Ok(addresses);
    }
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    if addresses.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} resolves to no address"),
        ));
    }
    Ok(addresses)
}
