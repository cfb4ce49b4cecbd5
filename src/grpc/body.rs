//! The response body the proxy sends: at most one data frame, then optional trailers.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

#[derive(Debug, Default)]
pub struct GrpcBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl GrpcBody {
    pub fn new(data: Option<Bytes>, trailers: Option<HeaderMap>) -> Self {
        GrpcBody {
            data: data.filter(|d| !d.is_empty()),
            trailers: trailers.filter(|t| !t.is_empty()),
        }
    }

    pub fn empty() -> Self {
        GrpcBody::default()
    }

    /// The data frame and the trailers still to be sent.
    pub fn into_parts(self) -> (Option<Bytes>, Option<HeaderMap>) {
        (self.data, self.trailers)
    }
}

impl Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// Why reading an HTTP/2 body failed.
#[derive(Debug)]
pub enum BodyError {
    /// More than the limit arrived.
    TooLarge,
    /// The stream or the connection broke off.
    Interrupted(String),
    /// The peer reset the stream (RST_STREAM) with this code.
    Reset(h2::Reason),
}

fn interrupted(error: h2::Error) -> BodyError {
    match error.reason() {
        Some(code) if error.is_reset() && error.is_remote() => BodyError::Reset(code),
        _ => BodyError::Interrupted(error.to_string()),
    }
}

/// Reads a whole HTTP/2 body (at most `limit` bytes) and its trailers, giving the flow-control
/// window back as data is consumed. A body of one DATA frame is returned without a copy.
pub async fn collect_h2(
    stream: &mut h2::RecvStream,
    limit: usize,
) -> Result<(Bytes, HeaderMap), BodyError> {
    let mut first: Option<Bytes> = None;
    let mut rest: Vec<u8> = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.data().await {
        let chunk = chunk.map_err(interrupted)?;
        let len = chunk.len();
        total += len;
        if total > limit {
            return Err(BodyError::TooLarge);
        }
        // A failure here only means the stream is already gone, which the next read reports.
        let _ = stream.flow_control().release_capacity(len);
        match &first {
            None if rest.is_empty() => first = Some(chunk),
            _ => {
                if let Some(f) = first.take() {
                    rest.extend_from_slice(&f);
                }
                rest.extend_from_slice(&chunk);
            }
        }
    }
    let trailers = stream
        .trailers()
        .await
        .map_err(interrupted)?
        .unwrap_or_default();
    let body = match first {
        Some(only) => only,
        None => Bytes::from(rest),
    };
    Ok((body, trailers))
}
