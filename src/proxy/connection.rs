//! Serves one client-facing HTTP/2 connection with `h2` directly. Each call runs inside the
//! connection's own task (a `FuturesUnordered`), not in a task of its own: a unary call is read,
//! forwarded and answered without waking another task or hopping to another thread, which on a
//! busy machine is most of what a proxy adds to a small call. Heavy work inside a call (sealing
//! or opening large messages) is moved off this task by the encryption stage, so one large call
//! does not hold up the connection's other calls.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::Ping;
use http::Response;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;
use tower::Service;

use super::edge::error_response;
use super::limits::CloseReason;
use super::{CallFuture, GrpcEdge, GrpcRequest, GrpcResponse};
use crate::error::ProxyError;
use crate::grpc::h2_settings::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};
use crate::grpc::GrpcBody;

/// After a GOAWAY because the client certificate expired or was revoked, calls in flight get
/// this long to finish; then they are cut.
pub const CREDENTIAL_CUT_DELAY: Duration = Duration::from_secs(1);
/// After calls are cut, how long their answers get to reach the caller before the connection
/// is dropped.
const FLUSH_AFTER_CUT: Duration = Duration::from_secs(2);

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
    /// Calls (streams) open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Largest request header block (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE).
    pub max_header_list_bytes: u32,
    /// A connection this old gets a GOAWAY; `None`: no limit.
    pub max_age: Option<Duration>,
    /// Calls in flight at that GOAWAY get this long before they are cut.
    pub max_age_grace: Duration,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            max_concurrent_streams: 1000,
            max_header_list_bytes: 64 * 1024,
            max_age: None,
            max_age_grace: Duration::from_secs(80),
        }
    }
}

/// What ends one connection early, besides its age: the client certificate's expiry, and its
/// revocation by a reloaded CRL.
#[derive(Default)]
pub struct Lifetime {
    /// The client certificate's notAfter.
    pub certificate_expires: Option<SystemTime>,
    /// Completes when the client certificate is revoked.
    pub revoked: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
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

type ResponseFuture = Pin<Box<dyn Future<Output = Response<GrpcBody>> + Send>>;

/// One call in flight: its answer being computed, and where it goes. Dropping it (the caller
/// reset the stream, or the connection went away) cancels the call and its upstream call.
struct StreamTask {
    call: ResponseFuture,
    respond: SendResponse<Bytes>,
}

impl StreamTask {
    /// Ends the call now with UNAVAILABLE (its upstream call is cancelled).
    fn cut(self, reason: CloseReason) {
        let StreamTask { call, mut respond } = self;
        drop(call);
        answer(
            &mut respond,
            error_response(&ProxyError::ConnectionClosing(reason.message())),
        );
    }
}

impl Future for StreamTask {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if let Poll::Ready(response) = this.call.as_mut().poll(cx) {
            answer(&mut this.respond, response);
            return Poll::Ready(());
        }
        // The caller reset the stream: dropping the task cancels the call at once.
        match this.respond.poll_reset(cx) {
            Poll::Ready(_) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn answer(respond: &mut SendResponse<Bytes>, response: Response<GrpcBody>) {
    if let Err(e) = send_response(respond, response) {
        tracing::debug!(error = %e, "could not write the answer: the caller is gone");
    }
}

/// Serves calls on `io` until the peer closes the connection, the connection fails, or
/// `shutdown` turns true; then sends GOAWAY and lets the calls in flight finish (the caller
/// bounds how long). The connection also ends, with a GOAWAY, at `settings.max_age` (calls in
/// flight get `max_age_grace`) and when `lifetime` says its certificate expired or was revoked
/// (calls in flight get [`CREDENTIAL_CUT_DELAY`]); calls still running then are answered
/// UNAVAILABLE. `on_close` hears each such reason as the GOAWAY goes out. Dropping the returned
/// future cancels every call still running.
pub async fn serve<S, I>(
    io: I,
    edge: GrpcEdge<S>,
    settings: &ConnectionSettings,
    mut shutdown: watch::Receiver<bool>,
    lifetime: Lifetime,
    on_close: impl Fn(CloseReason),
) -> Result<(), ConnectionError>
where
    S: Service<GrpcRequest, Response = GrpcResponse, Error = ProxyError, Future = CallFuture>
        + Clone
        + Send
        + 'static,
    I: AsyncRead + AsyncWrite + Unpin,
{
    let opened = Instant::now();
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(settings.max_header_list_bytes)
        .handshake::<_, Bytes>(io);
    let mut connection = match tokio::time::timeout(settings.handshake_timeout, handshake).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => return Err(ConnectionError::Handshake(e)),
        Err(_) => return Err(ConnectionError::HandshakeTimeout),
    };
    let keepalive = keepalive(connection.ping_pong(), settings.clone());
    tokio::pin!(keepalive);
    let mut calls: FuturesUnordered<StreamTask> = FuturesUnordered::new();
    let mut server_closing = *shutdown.borrow();
    if server_closing {
        connection.graceful_shutdown();
    }

    // Deadlines: each fires once. A disabled one is never polled.
    let age_at = settings.max_age.map(|age| opened + age);
    let expiry_at = lifetime.certificate_expires.map(|at| {
        Instant::now()
            + at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
    });
    let age_timer = tokio::time::sleep_until(age_at.unwrap_or(opened));
    let expiry_timer = tokio::time::sleep_until(expiry_at.unwrap_or(opened));
    let cut_timer = tokio::time::sleep_until(opened);
    let flush_timer = tokio::time::sleep_until(opened);
    tokio::pin!(age_timer, expiry_timer, cut_timer, flush_timer);
    let (mut age_fired, mut expiry_fired, mut revoked_fired) = (false, false, false);
    let mut revoked = lifetime.revoked;
    // Set once the proxy decided to close: when calls in flight are cut, and why.
    let mut cut_at: Option<(Instant, CloseReason)> = None;
    // Set once they were cut: calls still arriving are answered at once.
    let mut cut: Option<CloseReason> = None;

    loop {
        let event = tokio::select! {
            // Finish calls before taking new ones: their answers are already waiting.
            biased;
            Some(()) = calls.next(), if !calls.is_empty() => None,
            accepted = connection.accept() => match accepted {
                Some(Ok((request, mut respond))) => {
                    match cut {
                        Some(reason) => answer(
                            &mut respond,
                            error_response(&ProxyError::ConnectionClosing(reason.message())),
                        ),
                        None => calls.push(StreamTask {
                            call: Box::pin(edge.clone().handle(Box::new(request))),
                            respond,
                        }),
                    }
                    None
                }
                Some(Err(e)) => {
                    // Answers still being written cannot reach the peer; dropping the calls
                    // cancels their upstream calls.
                    return if is_clean_close(&e) { Ok(()) } else { Err(ConnectionError::Protocol(e)) };
                }
                // Closed (after a GOAWAY: once every stream is done).
                None => return Ok(()),
            },
            changed = shutdown.changed(), if !server_closing => {
                // A dropped sender also means the server is going away.
                if changed.is_err() || *shutdown.borrow() {
                    server_closing = true;
                    connection.graceful_shutdown();
                }
                None
            }
            () = &mut expiry_timer, if expiry_at.is_some() && !expiry_fired => {
                expiry_fired = true;
                Some((CloseReason::CertificateExpired, CREDENTIAL_CUT_DELAY))
            }
            () = wait_for(&mut revoked), if revoked.is_some() && !revoked_fired => {
                revoked_fired = true;
                Some((CloseReason::CertificateRevoked, CREDENTIAL_CUT_DELAY))
            }
            () = &mut age_timer, if age_at.is_some() && !age_fired => {
                age_fired = true;
                Some((CloseReason::MaxAge, settings.max_age_grace))
            }
            () = &mut cut_timer, if cut_at.is_some() && cut.is_none() => {
                let reason = cut_at.map_or(CloseReason::MaxAge, |(_, reason)| reason);
                cut = Some(reason);
                if !calls.is_empty() {
                    tracing::debug!(calls = calls.len(), reason = reason.label(), "cutting the calls still running on a closing connection");
                }
                for call in std::mem::take(&mut calls) {
                    call.cut(reason);
                }
                flush_timer.as_mut().reset(Instant::now() + FLUSH_AFTER_CUT);
                None
            }
            () = &mut flush_timer, if cut.is_some() => return Ok(()),
            timeout = &mut keepalive => return Err(timeout),
        };
        if let Some((reason, delay)) = event {
            if cut.is_some() {
                continue;
            }
            if cut_at.is_none() {
                connection.graceful_shutdown();
            }
            on_close(reason);
            let at = Instant::now() + delay;
            if cut_at.is_none_or(|(current, _)| at < current) {
                cut_at = Some((at, reason));
                cut_timer.as_mut().reset(at);
            }
        }
    }
}

async fn wait_for(revoked: &mut Option<Pin<Box<dyn Future<Output = ()> + Send>>>) {
    match revoked {
        Some(revoked) => revoked.await,
        None => std::future::pending().await,
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
