//! An upstream tap: a recording h2c relay between the proxy and a real Temporal server. Every
//! request the proxy sends upstream is recorded, decoded (path, header values, body), and
//! forwarded unchanged; the answer goes back unchanged. Absence checks search what it recorded
//! with the leak detector: data in flight that the server never stores (query arguments and
//! results, failure texts, update arguments before acceptance) is covered too.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Tapped {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Tapped {
    /// Everything a reader of the wire could see of it: path, header names and values, body.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = self.path.as_bytes().to_vec();
        for (name, value) in &self.headers {
            out.push(b'\n');
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
        }
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        out
    }
}

pub struct UpstreamTap {
    pub address: SocketAddr,
    pub requests: Arc<Mutex<Vec<Tapped>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for UpstreamTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

impl UpstreamTap {
    /// Relays to the plaintext HTTP/2 server at `target`.
    pub async fn start(target: SocketAddr) -> UpstreamTap {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind tap");
        let address = listener.local_addr().expect("tap address");
        let requests: Arc<Mutex<Vec<Tapped>>> = Arc::default();
        let client: Client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http();
        let recorder = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (recorder, client) = (recorder.clone(), client.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: Request<hyper::body::Incoming>| {
                            relay(request, target, recorder.clone(), client.clone())
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        UpstreamTap {
            address,
            requests,
            task,
        }
    }

    /// Every recorded request, as a reader of the wire would see it, concatenated.
    pub fn wire(&self) -> Vec<u8> {
        let requests = self.requests.lock().expect("lock").clone();
        let mut out = Vec::new();
        for request in requests {
            out.extend(request.bytes());
            out.push(b'\n');
        }
        out
    }

    pub fn count(&self) -> usize {
        self.requests.lock().expect("lock").len()
    }
}

type Answer = Response<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>>;

/// An answer of one data frame (if any) and trailers (if any), as gRPC needs.
fn answer(parts: http::response::Parts, data: Bytes, trailers: Option<HeaderMap>) -> Answer {
    let mut frames = Vec::new();
    if !data.is_empty() {
        frames.push(Ok(hyper::body::Frame::data(data)));
    }
    if let Some(trailers) = trailers {
        frames.push(Ok(hyper::body::Frame::trailers(trailers)));
    }
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed();
    Response::from_parts(parts, body)
}

fn bad_gateway() -> Answer {
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = http::StatusCode::BAD_GATEWAY;
    answer(parts, Bytes::new(), None)
}

async fn relay(
    request: Request<hyper::body::Incoming>,
    target: SocketAddr,
    recorder: Arc<Mutex<Vec<Tapped>>>,
    client: Client,
) -> Result<Answer, std::convert::Infallible> {
    let (mut parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(bad_gateway()),
    };
    recorder.lock().expect("lock").push(Tapped {
        path: parts.uri.path().to_string(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let uri = format!(
        "http://{target}{}",
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    parts.uri = uri.parse().expect("uri");
    let Ok(response) = client
        .request(Request::from_parts(parts, Full::new(body)))
        .await
    else {
        return Ok(bad_gateway());
    };
    let (parts, body) = response.into_parts();
    let Ok(collected) = body.collect().await else {
        return Ok(bad_gateway());
    };
    let trailers = collected.trailers().cloned();
    Ok(answer(parts, collected.to_bytes(), trailers))
}
