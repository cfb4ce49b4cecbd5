//! portcullis: an authenticating, encrypting gRPC proxy for Temporal.
#![forbid(unsafe_code)]

pub mod api;
pub mod authz;
pub mod check;
pub mod codec;
pub mod config;
pub mod crypto;
pub mod deadlines;
pub mod dev;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod identity;
pub mod offload;
pub mod payload;
pub mod proxy;
pub mod reload;
pub mod schema;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod workers;
