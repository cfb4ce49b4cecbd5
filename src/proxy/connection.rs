//! Serves one client-facing HTTP/2 connection with `h2` directly. Each call runs inside the
//! connection's own task (a `FuturesUnordered`), not in a task of its own: a unary call is read,
//! forwarded and answered without waking another task or hopping to another thread, which on a
//! busy machine is most of what a proxy adds to a small call. Heavy work inside a call (sealing
//! or opening large messages) is moved off this task by the encryption stage, so one large call
//! does not hold up the connection's other calls.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::{Ping, RecvStream};
use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tower::Service;

use super::{CallFuture, GrpcEdge, GrpcRequest, GrpcResponse};
use crate::error::ProxyError;
use crate::grpc::h2_settings::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};
use crate::grpc::GrpcBody;

const MAX_CONCURRENT_STREAMS: u32 = 1000;
const MAX_HEADER_LIST: u32 = 64 * 1024;

/// How a connection is served.
#[derive(Clone, Debug)]
pub struct ConnectionSettings {
    /// Time allowed for the client's connection preface and SETTINGS.
    pub handshake_timeout: Duration,
    /// Detect dead peers with a PING this often. There is deliberately no idle timeout: long
    /// polls sit quietly for ~70 s.
    pub keepalive_interval: Duration,
    /// A peer that does not answer a PING within this is gone.
    pub keepalive_timeout: Duration,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Why a connection ended other than by the peer closing it cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("HTTP/2 handshake: {0}")]
    Handshake(h2::Error),
    #[error("HTTP/2 handshake timed out")]
    HandshakeTimeout,
    #[error("HTTP/2: {0}")]
    Protocol(h2::Error),
    #[error("no answer to a keep-alive PING within {0:?}")]
    KeepaliveTimeout(Duration),
}

type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves calls on `io` until the peer closes the connection, the connection fails, or
/// `shutdown` turns true; then sends GOAWAY and lets the calls in flight finish (the caller
/// bounds how long). Dropping the returned future cancels every call still running.
pub async fn serve<S, I>(
    io: I,
    edge: GrpcEdge<S>,
    settings: &ConnectionSettings,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnectionError>
where
    S: Service<GrpcRequest, Response = GrpcResponse, Error = ProxyError, Future = CallFuture>
        + Clone
        + Send
        + 'static,
    I: AsyncRead + AsyncWrite + Unpin,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake::<_, Bytes>(io);
    let mut connection = match tokio::time::timeout(settings.handshake_timeout, handshake).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => return Err(ConnectionError::Handshake(e)),
        Err(_) => return Err(ConnectionError::HandshakeTimeout),
    };
    let keepalive = keepalive(connection.ping_pong(), settings.clone());
    tokio::pin!(keepalive);
    let mut calls: FuturesUnordered<StreamFuture> = FuturesUnordered::new();
    let mut closing = *shutdown.borrow();
    if closing {
        connection.graceful_shutdown();
    }
    loop {
        tokio::select! {
            // Finish calls before taking new ones: their answers are already waiting.
            biased;
            Some(()) = calls.next(), if !calls.is_empty() => {}
            accepted = connection.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    calls.push(Box::pin(serve_stream(edge.clone(), request, respond)));
                }
                Some(Err(e)) => {
                    // Answers still being written cannot reach the peer; dropping the calls
                    // cancels their upstream calls.
                    return if is_clean_close(&e) { Ok(()) } else { Err(ConnectionError::Protocol(e)) };
                }
                // Closed (after a GOAWAY: once every stream is done).
                None => return Ok(()),
            },
            changed = shutdown.changed(), if !closing => {
                // A dropped sender also means the server is going away.
                if changed.is_err() || *shutdown.borrow() {
                    closing = true;
                    connection.graceful_shutdown();
                }
            }
            timeout = &mut keepalive => return Err(timeout),
        }
    }
}

/// Pings the peer every interval (while the connection lives) and returns when one is not
/// answered in time. Without a ping handle (h2 hands it out once), it never returns.
async fn keepalive(
    ping_pong: Option<h2::PingPong>,
    settings: ConnectionSettings,
) -> ConnectionError {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(settings.keepalive_interval).await;
        match tokio::time::timeout(settings.keepalive_timeout, ping_pong.ping(Ping::opaque())).await
        {
            Ok(Ok(_pong)) => {}
            // The connection itself failed: the accept loop reports that.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return ConnectionError::KeepaliveTimeout(settings.keepalive_timeout),
        }
    }
}

/// A peer that hangs up between calls is not an error worth more than a debug line.
fn is_clean_close(error: &h2::Error) -> bool {
    error.is_io()
        && error.get_io().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::UnexpectedEof
            )
        })
        || error.is_go_away() && error.reason() == Some(h2::Reason::NO_ERROR)
}

/// Runs one call and writes its answer, unless the caller resets the stream first: then the
/// call is dropped, which cancels its upstream call at once.
async fn serve_stream<S>(
    edge: GrpcEdge<S>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) where
    S: Service<GrpcRequest, Response = GrpcResponse, Error = ProxyError, Future = CallFuture>
        + Clone
        + Send
        + 'static,
{
    let call = edge.handle(request);
    tokio::pin!(call);
    let response = tokio::select! {
        response = &mut call => response,
        _ = poll_fn(|cx| respond.poll_reset(cx)) => return,
    };
    if let Err(e) = send_response(&mut respond, response) {
        tracing::debug!(error = %e, "could not write the answer: the caller is gone");
    }
}

fn send_response(
    respond: &mut SendResponse<Bytes>,
    response: Response<GrpcBody>,
) -> Result<(), h2::Error> {
    let (head, body) = response.into_parts();
    let (data, trailers) = body.into_parts();
    let head = Response::from_parts(head, ());
    if data.is_none() && trailers.is_none() {
        respond.send_response(head, true)?;
        return Ok(());
    }
    let mut stream = respond.send_response(head, false)?;
    // h2 queues what the flow-control window does not take yet and sends it as the window opens.
    if let Some(data) = data {
        stream.send_data(data, trailers.is_none())?;
    }
    if let Some(trailers) = trailers {
        stream.send_trailers(trailers)?;
    }
    Ok(())
}
