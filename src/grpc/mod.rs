//! gRPC over HTTP/2 details: framing and compression, header rules, timeouts, response bodies.

pub mod body;
pub mod frame;
pub mod headers;

pub use body::GrpcBody;
pub use frame::Encoding;
