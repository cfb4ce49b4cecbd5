//! Counters of the crypto layer, cheap enough to bump on every payload.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Monotonic counters, shared by a [`super::DataKeyManager`] and its handles.
        #[derive(Debug, Default)]
        pub struct CryptoMetrics {
            $($(#[$doc])* $name: AtomicU64,)*
        }

        /// The counters at one moment (each read on its own: not a consistent cut).
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct CryptoMetricsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl CryptoMetrics {
            pub fn snapshot(&self) -> CryptoMetricsSnapshot {
                CryptoMetricsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }

            $(
                pub(crate) fn $name(&self) {
                    self.$name.fetch_add(1, Ordering::Relaxed);
                }
            )*
        }
    };
}

counters! {
    /// Payloads sealed.
    seals,
    /// Payloads opened.
    opens,
    seal_failures,
    /// Payloads that did not open, and key resolutions that failed before opening.
    open_failures,
    /// New data keys put in use (the first one of a namespace included).
    data_key_rotations,
    /// Calls to the key provider (generate and unwrap).
    provider_calls,
    provider_errors,
    /// Key lookups for opening answered by the unwrapped-key cache.
    cache_hits,
    cache_misses,
}
