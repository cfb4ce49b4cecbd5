//! A recording relay for real gRPC traffic: clients speak plaintext HTTP/2 (h2c) to it, it
//! forwards every call unchanged to an upstream (a Temporal dev server) and writes the request
//! message of every call to the listed methods into a directory, one file each
//! (`<Method>-<n>.bin`, the message without its 5-byte gRPC frame). `fuzz/gen_target_seeds.py`
//! turns them into fuzz seeds. Clients must not compress requests (the Python SDK:
//! `--grpc-compression none`).
//!
//! Usage: portcullis-capture LISTEN UPSTREAM OUT_DIR METHOD[,METHOD...]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use tokio::net::{TcpListener, TcpStream};

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Recorder {
    dir: PathBuf,
    methods: Vec<String>,
    count: AtomicUsize,
}

impl Recorder {
    fn record(&self, path: &str, body: &[u8]) {
        let Some(method) = path.rsplit('/').next() else {
            return;
        };
        // A unary request: one uncompressed frame.
        if !self.methods.iter().any(|m| m == method) || body.len() < 5 || body[0] != 0 {
            return;
        }
        let n = self.count.fetch_add(1, Ordering::Relaxed);
        let file = self.dir.join(format!("{method}-{n}.bin"));
        if let Err(e) = std::fs::write(&file, &body[5..]) {
            eprintln!("cannot write {}: {e}", file.display());
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream, dir, methods] = args.as_slice() else {
        return Err("usage: portcullis-capture LISTEN UPSTREAM OUT_DIR METHOD[,METHOD...]".into());
    };
    std::fs::create_dir_all(dir)?;
    let recorder = Arc::new(Recorder {
        dir: PathBuf::from(dir),
        methods: methods.split(',').map(str::to_string).collect(),
        count: AtomicUsize::new(0),
    });
    let listener = TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (socket, _) = listener.accept().await?;
        let (recorder, upstream) = (recorder.clone(), upstream.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(socket, &upstream, recorder).await {
                eprintln!("connection: {e}");
            }
        });
    }
}

async fn connection(
    socket: TcpStream,
    upstream: &str,
    recorder: Arc<Recorder>,
) -> Result<(), Error> {
    let mut server = h2::server::handshake(socket).await?;
    let (client, driver) = h2::client::handshake(TcpStream::connect(upstream).await?).await?;
    tokio::spawn(async move {
        let _ = driver.await;
    });
    while let Some(call) = server.accept().await {
        let (request, respond) = call?;
        let (client, recorder) = (client.clone(), recorder.clone());
        let path = request.uri().path().to_string();
        tokio::spawn(async move {
            if let Err(e) = relay(request, respond, client, &recorder).await {
                eprintln!("{path}: {e}");
            }
        });
    }
    Ok(())
}

async fn relay(
    request: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    client: h2::client::SendRequest<Bytes>,
    recorder: &Recorder,
) -> Result<(), Error> {
    let (parts, mut body) = request.into_parts();
    let mut message = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        message.extend_from_slice(&chunk);
    }
    recorder.record(parts.uri.path(), &message);
    let mut client = client.ready().await?;
    let (response, mut send) = client.send_request(Request::from_parts(parts, ()), false)?;
    send.send_data(message.freeze(), true)?;
    let (parts, mut answer) = response.await?.into_parts();
    // A trailers-only answer (an error) ends with its headers.
    let end = answer.is_end_stream();
    let mut back = respond.send_response(Response::from_parts(parts, ()), end)?;
    if end {
        return Ok(());
    }
    while let Some(chunk) = answer.data().await {
        let chunk = chunk?;
        let _ = answer.flow_control().release_capacity(chunk.len());
        back.send_data(chunk, false)?;
    }
    match answer.trailers().await? {
        Some(trailers) => back.send_trailers(trailers)?,
        None => back.send_data(Bytes::new(), true)?,
    }
    Ok(())
}
