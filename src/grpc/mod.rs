//! gRPC over HTTP/2 details: framing and compression, header rules, timeouts, response bodies.

pub mod body;
pub mod frame;
pub mod headers;

/// HTTP/2 settings shared by the client-facing server and the upstream client.
pub mod h2_settings {
    /// Windows: a whole default-size message fits in one stream window, so a unary call needs
    /// no window-update round trip on a fast network.
    pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
    pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
    pub const MAX_FRAME: u32 = 1 << 20;
}

pub use body::GrpcBody;
pub use frame::Encoding;
