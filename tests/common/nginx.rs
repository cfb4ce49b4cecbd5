//! nginx (Debian `nginx-light`) as a real TLS / mTLS-enforcing gRPC upstream: one process with
//! one listener per [`Site`], each with its own server certificate, client CA and backend.
//! Every request is logged as a JSON line with the client certificate's serial, fingerprint and
//! expiry, the gRPC status and the `authorization` header. The process is killed when the
//! handle drops (also when a test panics); its directory is a temp dir.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use portcullis::dev::free_port;
use serde_json::Value;
use tempfile::TempDir;

pub const NGINX: &str = "/usr/sbin/nginx";

/// One listener.
#[derive(Clone, Debug)]
pub struct Site {
    /// PEM server certificate and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With a client CA, client certificates are required (`ssl_verify_client on`).
    pub client_ca: Option<PathBuf>,
    /// The gRPC backend (plaintext HTTP/2), `HOST:PORT`.
    pub backend: String,
    /// Only these `authorization` header values pass (others: HTTP 401). Empty: no check.
    pub allowed_authorization: Vec<String>,
    /// A regional endpoint: requests go to the backend of their `temporal-namespace` header
    /// (without one: `backend`), and must carry that namespace's `authorization` value (without
    /// a namespace header: any of them). Empty: no routing.
    pub namespace_routes: Vec<NamespaceRoute>,
}

/// One namespace of a regional endpoint (see [`Site::namespace_routes`]).
#[derive(Clone, Debug)]
pub struct NamespaceRoute {
    pub namespace: String,
    pub backend: String,
    pub authorization: String,
}

pub struct Nginx {
    child: Child,
    pub dir: TempDir,
    /// One address per site, in order.
    pub addresses: Vec<SocketAddr>,
    access_log: PathBuf,
    error_log: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One logged request.
#[derive(Debug, Clone)]
pub struct Logged {
    pub port: u16,
    pub serial: String,
    pub fingerprint: String,
    /// The client certificate's notAfter, seconds since the epoch (None without one).
    pub cert_not_after: Option<i64>,
    /// When nginx received the request, seconds since the epoch.
    pub started: f64,
    pub status: u16,
    pub grpc_status: String,
    pub uri: String,
    pub authorization: String,
    /// The `temporal-namespace` header (empty without one).
    pub namespace: String,
    /// The `portcullis-identity` header (empty without one).
    pub identity: String,
}

impl Nginx {
    pub fn start(sites: &[Site]) -> Nginx {
        assert!(
            Path::new(NGINX).is_file(),
            "nginx is missing at {NGINX}: run `bash scripts/setup.sh` (installs Debian's nginx-light)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let access_log = root.join("access.jsonl");
        let error_log = root.join("error.log");
        let mut addresses = Vec::new();
        let mut servers = String::new();
        for site in sites {
            let port = free_port().expect("free port");
            addresses.push(SocketAddr::from(([127, 0, 0, 1], port)));
            let verify = match &site.client_ca {
                Some(ca) => format!(
                    "ssl_verify_client on;\n        ssl_client_certificate {};\n        ssl_verify_depth 2;",
                    ca.display()
                ),
                None => String::new(),
            };
            let check = if site.allowed_authorization.is_empty() {
                String::new()
            } else {
                let allowed = site
                    .allowed_authorization
                    .iter()
                    .map(|v| format!("\"{v}\" 1;"))
                    .collect::<Vec<_>>()
                    .join(" ");
                servers.push_str(&format!(
                    "    map $http_authorization $auth_ok_{port} {{ default 0; {allowed} }}\n"
                ));
                format!("if ($auth_ok_{port} = 0) {{ return 401; }}")
            };
            let mut backend = site.backend.clone();
            let mut check = check;
            if !site.namespace_routes.is_empty() {
                let routes: String = site
                    .namespace_routes
                    .iter()
                    .map(|r| format!("\"{}\" {}; ", r.namespace, r.backend))
                    .collect();
                let keys: String = site
                    .namespace_routes
                    .iter()
                    .map(|r| {
                        format!(
                            "\"{ns}|{key}\" 1; \"|{key}\" 1; ",
                            ns = r.namespace,
                            key = r.authorization
                        )
                    })
                    .collect();
                servers.push_str(&format!(
                    "    map $http_temporal_namespace $backend_{port} {{ default {}; {routes}}}\n    map \"$http_temporal_namespace|$http_authorization\" $ns_key_ok_{port} {{ default 0; {keys}}}\n",
                    site.backend
                ));
                backend = format!("$backend_{port}");
                check = format!("if ($ns_key_ok_{port} = 0) {{ return 401; }}");
            }
            servers.push_str(&format!(
                r#"
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        {verify}
        location / {{
            {check}
            grpc_pass grpc://{backend};
            grpc_read_timeout 120s;
            grpc_send_timeout 120s;
        }}
    }}
"#,
                cert = site.cert.display(),
                key = site.key.display(),
            ));
        }
        // Running as root, nginx would switch its worker to an unprivileged user that cannot
        // reach the temp dir; a single process (master_process off) also dies with one kill.
        let user = if is_root() { "user root;" } else { "" };
        let config = format!(
            r#"
daemon off;
master_process off;
{user}
pid {root}/nginx.pid;
error_log {error_log} info;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    client_max_body_size 16m;
    keepalive_timeout 120s;
    log_format grpc escape=json '{{"port":"$server_port","serial":"$ssl_client_serial","fingerprint":"$ssl_client_fingerprint","v_end":"$ssl_client_v_end","msec":"$msec","request_time":"$request_time","status":"$status","grpc_status":"$upstream_trailer_grpc_status","uri":"$request_uri","authorization":"$http_authorization","namespace":"$http_temporal_namespace","identity":"$http_portcullis_identity"}}';
    access_log {access_log} grpc;
{servers}
}}
"#,
            root = root.display(),
            error_log = error_log.display(),
            access_log = access_log.display(),
        );
        let config_path = root.join("nginx.conf");
        std::fs::write(&config_path, config).expect("write nginx.conf");
        let child = Command::new(NGINX)
            .arg("-c")
            .arg(&config_path)
            .arg("-p")
            .arg(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let mut nginx = Nginx {
            child,
            dir,
            addresses,
            access_log,
            error_log,
        };
        nginx.wait_ready();
        nginx
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for address in self.addresses.clone() {
            loop {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!(
                        "nginx exited ({status}) at start:\n{}",
                        std::fs::read_to_string(&self.error_log).unwrap_or_default()
                    );
                }
                if std::net::TcpStream::connect(address).is_ok() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "nginx did not listen on {address}:\n{}",
                    std::fs::read_to_string(&self.error_log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Stops nginx and starts it again on the same ports with the same configuration, reading
    /// the certificate files anew (a server whose certificate rotated). Not a SIGHUP reload:
    /// with `master_process off` nginx does not reconfigure reliably (it starts refusing TLS).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let config_path = self.dir.path().join("nginx.conf");
        self.child = Command::new(NGINX)
            .arg("-c")
            .arg(&config_path)
            .arg("-p")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("restart nginx");
        self.wait_ready();
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(&self.error_log).unwrap_or_default()
    }

    /// Every request logged so far.
    pub fn requests(&self) -> Vec<Logged> {
        let text = std::fs::read_to_string(&self.access_log).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let v: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("nginx log line {line:?}: {e}"));
                let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                let msec: f64 = s("msec").parse().unwrap_or(0.0);
                let request_time: f64 = s("request_time").parse().unwrap_or(0.0);
                Logged {
                    port: s("port").parse().unwrap_or(0),
                    serial: s("serial"),
                    fingerprint: s("fingerprint"),
                    cert_not_after: parse_openssl_time(&s("v_end")),
                    started: msec - request_time,
                    status: s("status").parse().unwrap_or(0),
                    grpc_status: s("grpc_status"),
                    uri: s("uri"),
                    authorization: s("authorization"),
                    namespace: s("namespace"),
                    identity: s("identity"),
                }
            })
            .collect()
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Parses OpenSSL's `ASN1_TIME_print` format ("Nov 23 05:01:02 2025 GMT") to epoch seconds.
pub fn parse_openssl_time(text: &str) -> Option<i64> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    if parts.len() != 5 || parts[4] != "GMT" {
        return None;
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == parts[0])? as u8 + 1;
    let day: u8 = parts[1].parse().ok()?;
    let hms: Vec<u8> = parts[2]
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let year: i32 = parts[3].parse().ok()?;
    let date =
        time::Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day).ok()?;
    let time = time::Time::from_hms(*hms.first()?, *hms.get(1)?, *hms.get(2)?).ok()?;
    Some(
        time::PrimitiveDateTime::new(date, time)
            .assume_utc()
            .unix_timestamp(),
    )
}
