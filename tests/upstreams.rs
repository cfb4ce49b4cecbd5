//! Per-namespace upstreams with short-lived, rotating credentials, against real parts: nginx as
//! an mTLS-enforcing gRPC upstream in front of a real Temporal dev server, the Python SDK as the
//! load. Plus the API key and run-time routing changes (nginx / focused fake upstreams).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::nginx::{Nginx, Site};
use common::*;
use portcullis::config::Config;
use portcullis::tls::pki::{CertAuthority, IssuedCert, LeafSpec, Usage};
use tempfile::TempDir;

/// The upstream side's PKI: a server CA and certificate for nginx (valid for
/// `*.upstream.test` names used by the templated server names), and two client CAs, one per
/// nginx listener.
struct UpstreamPki {
    dir: TempDir,
    server_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cas: Vec<(CertAuthority, PathBuf, PathBuf)>,
}

impl UpstreamPki {
    fn new() -> UpstreamPki {
        let dir = tempfile::tempdir().expect("tempdir");
        let server_ca = CertAuthority::generate("upstream server CA", Duration::from_secs(3600))
            .expect("server CA");
        let mut spec = LeafSpec::new("upstream", Usage::Server, Duration::from_secs(3600));
        spec.dns_names = ["ns1", "ns2", "ns3", "edge"]
            .iter()
            .map(|n| format!("{n}.upstream.test"))
            .collect();
        let server = server_ca.issue(&spec).expect("server cert");
        let server_ca_path = write(dir.path(), "server-ca.pem", &server_ca.cert_pem);
        let (server_cert, server_key) = write_pair(dir.path(), "server", &server);
        let mut client_cas = Vec::new();
        for name in ["client-ca-a", "client-ca-b"] {
            let ca = CertAuthority::generate(name, Duration::from_secs(3600)).expect("client CA");
            let cert = write(dir.path(), &format!("{name}.pem"), &ca.cert_pem);
            let key = write_private(dir.path(), &format!("{name}-key.pem"), &ca.key_pem);
            client_cas.push((ca, cert, key));
        }
        UpstreamPki {
            dir,
            server_ca: server_ca_path,
            server_cert,
            server_key,
            client_cas,
        }
    }

    fn site(&self, client_ca: Option<usize>, backend: &str) -> Site {
        Site {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            client_ca: client_ca.map(|i| self.client_cas[i].1.clone()),
            backend: backend.to_string(),
            allowed_authorization: Vec::new(),
            namespace_routes: Vec::new(),
        }
    }

    /// A client certificate from client CA `ca`, valid from a second ago for `lifetime`.
    fn client_cert(&self, ca: usize, name: &str, lifetime: Duration) -> IssuedCert {
        let mut spec = LeafSpec::new(name, Usage::Client, lifetime);
        spec.not_before = time::OffsetDateTime::now_utc() - time::Duration::seconds(1);
        self.client_cas[ca].0.issue(&spec).expect("client cert")
    }
}

/// Failed reloads of `what` counted so far (process-wide), for waiting on evidence that a
/// rejected file was actually tried.
fn failed_reloads(proxy: &portcullis::server::RunningProxy, what: &str) -> f64 {
    common::ops::Scrape::parse(&proxy.telemetry().encode()).sum(
        "portcullis_config_reloads_total",
        &[("what", what), ("outcome", "failure")],
    )
}

async fn wait_for_failed_reload(proxy: &portcullis::server::RunningProxy, what: &str, before: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while failed_reloads(proxy, what) <= before {
        assert!(
            Instant::now() < deadline,
            "no failed reload of {what} was counted: the rejection never happened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const CLIENT_CERT_RELOAD: &str = "upstream client certificate";
const CONFIG_RELOAD: &str = "config (upstreams, routing, namespaces)";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

fn write_private(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = write(dir, name, text);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

fn write_pair(dir: &Path, name: &str, issued: &IssuedCert) -> (PathBuf, PathBuf) {
    (
        write(dir, &format!("{name}.pem"), &issued.cert_pem),
        write_private(dir, &format!("{name}-key.pem"), &issued.key_pem),
    )
}

/// Replaces a file atomically (write aside, rename), as cert-manager and Vault agents do.
fn replace(path: &Path, text: &str) {
    let aside = path.with_extension("tmp");
    std::fs::write(&aside, text).expect("write aside");
    std::fs::rename(&aside, path).expect("rename");
}

/// The proxy's config file: mTLS listener for the test clients, the given upstream blocks and
/// namespaces, the test client as system admin, payloads sealed with a local keyring.
fn write_config(pki: &Pki, dir: &Path, upstreams: &str, routing: &str) -> PathBuf {
    let keyring = pki.dir.path().join("keyring.toml");
    if !keyring.exists() {
        portcullis::crypto::Keyring::init(&keyring).expect("keyring");
    }
    let text = format!(
        r#"
[listener]
address = "127.0.0.1:0"
[listener.tls]
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"

[limits]
shutdown_grace_seconds = 5

{upstreams}

{routing}

[authorization]
audit_log = "off"
identity = ["spiffe", "dns", "email", "cn"]
system.admins = ["cn:test-client"]

[encryption]
default_key = "local"
keys.local = {{ provider = "local", keyring = "{keyring}" }}
"#,
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
        ca = pki.ca_path.display(),
        keyring = keyring.display(),
    );
    let path = dir.join("portcullis.toml");
    // Atomic, so the running proxy never reads half a file.
    replace(&path, &text);
    path
}

fn describe(namespace: &str) -> wf::DescribeNamespaceRequest {
    wf::DescribeNamespaceRequest {
        namespace: namespace.into(),
        ..Default::default()
    }
}

/// Calls DescribeNamespace for each namespace in turn (and GetSystemInfo) until `until`,
/// without retries: every failure is counted and the first ones kept.
async fn steady_calls(
    address: std::net::SocketAddr,
    pki: &Pki,
    namespaces: &[&str],
    until: Instant,
) -> (usize, Vec<String>) {
    let mut client = workflow_client(address, pki, &pki.client).await;
    let (mut calls, mut errors) = (0usize, Vec::new());
    while Instant::now() < until {
        for ns in namespaces {
            calls += 1;
            match client.describe_namespace(describe(ns)).await {
                Ok(r) => assert_eq!(
                    r.get_ref().namespace_info.as_ref().map(|i| i.name.as_str()),
                    Some(*ns)
                ),
                Err(status) => errors.push(format!("{ns}: {status:?}")),
            }
        }
        calls += 1;
        if let Err(status) = client
            .get_system_info(wf::GetSystemInfoRequest::default())
            .await
        {
            errors.push(format!("GetSystemInfo: {status:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (calls, errors)
}

fn python_load_args(
    address: std::net::SocketAddr,
    pki: &Pki,
    namespace: &str,
    seconds: u64,
) -> Vec<String> {
    let mut args = client_args(address, pki, &pki.client);
    args.extend([
        "--namespace".into(),
        namespace.into(),
        "--seconds".into(),
        seconds.to_string(),
    ]);
    args
}

/// Everything nginx logged, checked: every request answered with HTTP 200 and none started
/// on a connection whose client certificate had already expired. Returns distinct serials per
/// listener port.
fn check_nginx_log(nginx: &Nginx) -> BTreeMap<u16, BTreeSet<String>> {
    let requests = nginx.requests();
    assert!(!requests.is_empty(), "nginx logged no request");
    let mut serials: BTreeMap<u16, BTreeSet<String>> = BTreeMap::new();
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for r in &requests {
        // 499: the caller went away. Only long polls, cancelled when a worker shuts down.
        let cancelled_poll = r.status == 499 && r.uri.contains("/Poll");
        assert!(r.status == 200 || cancelled_poll, "nginx answered {r:?}");
        *statuses.entry(r.grpc_status.clone()).or_default() += 1;
        assert_ne!(r.grpc_status, "14", "the upstream saw UNAVAILABLE: {r:?}");
        if let Some(not_after) = r.cert_not_after {
            assert!(
                r.started <= not_after as f64,
                "a call started at {} on a connection whose certificate expired at {not_after}: {r:?}",
                r.started
            );
        }
        serials.entry(r.port).or_default().insert(r.serial.clone());
    }
    eprintln!(
        "nginx: {} requests, grpc statuses {statuses:?}, distinct serials per port {:?}",
        requests.len(),
        serials
            .iter()
            .map(|(p, s)| (p, s.len()))
            .collect::<Vec<_>>()
    );
    serials
}

/// Two namespaces behind two nginx listeners that trust two different client CAs; the proxy
/// issues itself certificates that live 6 s (renewed at ~70 %) while the Python SDK runs
/// workflows in both namespaces for a minute and a raw client calls without retries. Not one
/// call fails, and nginx saw many different certificates, none used after it expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_certificates_rotate_under_load_without_a_failed_call() {
    let server = DevServer::start(&["ns1", "ns2"]).await;
    let pki = Pki::new();
    let up = UpstreamPki::new();
    let nginx = Nginx::start(&[
        up.site(Some(0), &server.address()),
        up.site(Some(1), &server.address()),
    ]);
    let issued = |ca: usize| {
        format!(
            r#"credentials = {{ type = "issued", ca_cert = "{}", ca_key = "{}", lifetime_seconds = 6, common_name = "portcullis-test", uris = ["spiffe://portcullis.test/proxy"] }}"#,
            up.client_cas[ca].1.display(),
            up.client_cas[ca].2.display()
        )
    };
    let upstreams = format!(
        r#"
[upstreams.east]
address = "{east}"
tls = {{ ca = "{ca}", server_name = "{{namespace}}.upstream.test" }}
{issued_east}

[upstreams.west]
address = "{west}"
tls = {{ ca = "{ca}", server_name = "{{namespace}}.upstream.test" }}
{issued_west}
"#,
        east = nginx.addresses[0],
        west = nginx.addresses[1],
        ca = up.server_ca.display(),
        issued_east = issued(0),
        issued_west = issued(1),
    );
    let routing = r#"
[routing]
system_upstream = "east"
system_namespace = "ns1"

[[namespaces]]
name = "ns1"
upstream = "east"

[[namespaces]]
name = "ns2"
upstream = "west"
"#;
    let config_path = write_config(&pki, up.dir.path(), &upstreams, routing);
    let proxy = start_proxy(Config::load(&config_path).expect("config")).await;
    let address = proxy.local_addr().expect("tcp");

    let seconds = 62;
    let until = Instant::now() + Duration::from_secs(seconds);
    let args1 = python_load_args(address, &pki, "ns1", seconds);
    let args2 = python_load_args(address, &pki, "ns2", seconds);
    let (load1, load2, (calls, errors)) = tokio::join!(
        run_python("steady_load.py", &args1),
        run_python("steady_load.py", &args2),
        steady_calls(address, &pki, &["ns1", "ns2"], until),
    );
    eprintln!("python ns1: {load1}\npython ns2: {load2}\nraw calls: {calls}");
    assert!(
        errors.is_empty(),
        "{} of {calls} raw calls failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(calls > 200, "too few raw calls: {calls}");
    for load in [&load1, &load2] {
        assert!(load["completed"].as_u64().unwrap_or(0) >= 10, "{load}");
    }

    let serials = check_nginx_log(&nginx);
    let ports: Vec<u16> = nginx.addresses.iter().map(|a| a.port()).collect();
    for port in &ports {
        let seen = serials.get(port).map_or(0, |s| s.len());
        // 62 s of 6 s certificates renewed at ~4.2 s: about 15 each.
        assert!(
            seen >= 8,
            "listener {port} saw only {seen} client certificates"
        );
        assert!(
            !serials[port].contains(""),
            "a request reached listener {port} without a client certificate"
        );
    }
    assert!(
        serials[&ports[0]].is_disjoint(&serials[&ports[1]]),
        "the two upstreams must use their own certificates"
    );
    let expiry = proxy.upstreams().certificate_expiry();
    assert_eq!(expiry.len(), 2, "{expiry:?}");
    for e in &expiry {
        assert!(
            e.seconds > 0.0 && e.seconds <= 6.5,
            "seconds until expiry out of range: {e:?}"
        );
    }
    proxy.shutdown().await;
}

/// `files` credentials: replaced mid-load, new connections use the new certificate and no call
/// fails; a corrupt or mismatched replacement is rejected and the last good pair kept. A
/// namespace added to the config file at run time is served without a restart (by the
/// templated endpoint), and a broken config change is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_credentials_reload_and_namespaces_change_at_run_time() {
    let server = DevServer::start(&["ns1", "ns2"]).await;
    let pki = Pki::new();
    let up = UpstreamPki::new();
    let nginx = Nginx::start(&[up.site(Some(0), &server.address())]);
    let first = up.client_cert(0, "files-one", Duration::from_secs(3600));
    let (cert, key) = write_pair(up.dir.path(), "client", &first);
    let upstreams = format!(
        r#"
[upstreams.edge]
address = "{address}"
tls = {{ ca = "{ca}", server_name = "{{namespace}}.upstream.test" }}
credentials = {{ type = "files", cert = "{cert}", key = "{key}" }}
"#,
        address = nginx.addresses[0],
        ca = up.server_ca.display(),
        cert = cert.display(),
        key = key.display(),
    );
    let routing = |namespaces: &[&str]| {
        let mut text =
            "[routing]\nsystem_upstream = \"edge\"\nsystem_namespace = \"ns1\"\n".to_string();
        for ns in namespaces {
            text.push_str(&format!(
                "\n[[namespaces]]\nname = \"{ns}\"\nupstream = \"edge\"\n"
            ));
        }
        text
    };
    let config_path = write_config(&pki, up.dir.path(), &upstreams, &routing(&["ns1"]));
    let proxy = start_proxy(Config::load(&config_path).expect("config")).await;
    let address = proxy.local_addr().expect("tcp");
    let serial_of = |issued: &IssuedCert| {
        portcullis::upstream::ClientCredential::from_pem(
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
            None,
        )
        .expect("pair")
        .serial
    };

    let until = Instant::now() + Duration::from_secs(14);
    let args = python_load_args(address, &pki, "ns1", 14);
    let load = run_python("steady_load.py", &args);
    let calls = steady_calls(address, &pki, &["ns1"], until);
    let scenario = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Replace the pair mid-load (key first: in between, the pair does not match and is
        // rejected; the cert's rename completes it).
        let second = up.client_cert(0, "files-two", Duration::from_secs(3600));
        replace(&key, &second.key_pem);
        replace(&cert, &second.cert_pem);
        let new_serial = serial_of(&second);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !nginx.requests().iter().any(|r| r.serial == new_serial) {
            let requests = nginx.requests();
            assert!(
                Instant::now() < deadline,
                "nginx never saw the replaced certificate {new_serial}; last requests: {:?}",
                &requests[requests.len().saturating_sub(3)..]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A corrupt certificate, then a mismatched pair: both rejected, each seen to be tried
        // (the failed-reload count moves), and the pair in force stays the second one.
        let before = failed_reloads(&proxy, CLIENT_CERT_RELOAD);
        replace(
            &cert,
            "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
        );
        wait_for_failed_reload(&proxy, CLIENT_CERT_RELOAD, before).await;
        let third = up.client_cert(0, "files-three", Duration::from_secs(3600));
        let before = failed_reloads(&proxy, CLIENT_CERT_RELOAD);
        replace(&cert, &third.cert_pem);
        wait_for_failed_reload(&proxy, CLIENT_CERT_RELOAD, before).await;
        let in_force = proxy
            .upstreams()
            .client_certificate("edge")
            .expect("a pair in force");
        assert_eq!(in_force.serial, new_serial, "a rejected pair took effect");

        // A namespace added to the config file: a new endpoint of the template, hence a new
        // connection, which must present the last good certificate.
        write_config(&pki, up.dir.path(), &upstreams, &routing(&["ns1", "ns2"]));
        let mut client = workflow_client(address, &pki, &pki.client).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match client.describe_namespace(describe("ns2")).await {
                Ok(_) => break,
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
                    assert!(Instant::now() < deadline, "ns2 never became available");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // A broken change (unknown upstream) is rejected: ns2 stays.
        let before = failed_reloads(&proxy, CONFIG_RELOAD);
        write_config(
            &pki,
            up.dir.path(),
            &upstreams,
            &routing(&["ns1", "ns2"]).replace(
                "name = \"ns2\"\nupstream = \"edge\"",
                "name = \"ns2\"\nupstream = \"nowhere\"",
            ),
        );
        wait_for_failed_reload(&proxy, CONFIG_RELOAD, before).await;
        client
            .describe_namespace(describe("ns2"))
            .await
            .expect("a rejected config leaves ns2 in place");
        (new_serial, serial_of(&third))
    };
    let (load, (calls, errors), (new_serial, rejected_serial)) =
        tokio::join!(load, calls, scenario);
    eprintln!("python: {load}\nraw calls: {calls}");
    assert!(
        errors.is_empty(),
        "{} of {calls} raw calls failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );

    let requests = nginx.requests();
    assert!(
        !requests.iter().any(|r| r.serial == rejected_serial),
        "nginx saw the rejected certificate {rejected_serial}"
    );
    let first_serial = serial_of(&first);
    let switched = requests
        .iter()
        .position(|r| r.serial == new_serial)
        .expect("the new certificate was used");
    assert!(requests[..switched]
        .iter()
        .any(|r| r.serial == first_serial));
    // Long polls that began on the old connection may finish after the switch; every request
    // that started after it uses the new certificate.
    let switch_time = requests[switched].started;
    for r in &requests[switched..] {
        if r.started > switch_time + 0.5 {
            assert_eq!(r.serial, new_serial, "after the switch: {r:?}");
        }
    }
    check_nginx_log(&nginx);

    // Removing the namespace again: it is no longer served.
    write_config(&pki, up.dir.path(), &upstreams, &routing(&["ns1"]));
    let mut client = workflow_client(address, &pki, &pki.client).await;
    wait_for_async(Duration::from_secs(10), "ns2 to be removed", || {
        let mut client = client.clone();
        async move {
            matches!(client.describe_namespace(describe("ns2")).await, Err(s) if s.code() == tonic::Code::NotFound)
        }
    })
    .await;
    client
        .describe_namespace(describe("ns1"))
        .await
        .expect("ns1 stays");
    proxy.shutdown().await;
}

/// A certificate that expires is never presented: calls fail with a clear UNAVAILABLE, nginx
/// logs no request with it after its expiry, and calls succeed again once a valid pair is in
/// place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_credential_is_unavailable_and_never_presented() {
    let upstream = FakeUpstream::start().await;
    let pki = Pki::new();
    let up = UpstreamPki::new();
    let nginx = Nginx::start(&[up.site(Some(0), &upstream.address.to_string())]);
    let short = up.client_cert(0, "short-lived", Duration::from_secs(4));
    let (cert, key) = write_pair(up.dir.path(), "client", &short);
    let upstreams = format!(
        r#"
[upstreams.edge]
address = "{address}"
tls = {{ ca = "{ca}", server_name = "edge.upstream.test" }}
credentials = {{ type = "files", cert = "{cert}", key = "{key}" }}
"#,
        address = nginx.addresses[0],
        ca = up.server_ca.display(),
        cert = cert.display(),
        key = key.display(),
    );
    let routing = "[routing]\nsystem_upstream = \"edge\"\n[[namespaces]]\nname = \"default\"\nupstream = \"edge\"\n";
    let config_path = write_config(&pki, up.dir.path(), &upstreams, routing);
    let proxy = start_proxy(Config::load(&config_path).expect("config")).await;
    let mut client = workflow_client(proxy.local_addr().expect("tcp"), &pki, &pki.client).await;
    client
        .describe_namespace(describe("default"))
        .await
        .expect("valid certificate");

    let not_after = portcullis::upstream::ClientCredential::from_pem(
        short.cert_pem.as_bytes(),
        short.key_pem.as_bytes(),
        None,
    )
    .expect("pair")
    .not_after;
    while SystemTime::now() < not_after + Duration::from_millis(300) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = client
        .describe_namespace(describe("default"))
        .await
        .expect_err("expired credential");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("upstream edge") && status.message().contains("expired"),
        "unclear message: {status:?}"
    );
    assert!(
        proxy
            .upstreams()
            .seconds_until_expiry("edge")
            .expect("expiry")
            < 0.0
    );
    let requests = nginx.requests();
    assert!(!requests.is_empty(), "nginx logged nothing");
    for r in requests {
        let end = r.cert_not_after.expect("client certificate logged");
        assert!(
            r.started <= end as f64,
            "expired certificate presented: {r:?}"
        );
    }
    // An already-expired replacement is refused too (seen to be tried, never in force)...
    let mut stale_spec = LeafSpec::new("stale", Usage::Client, Duration::from_secs(3600));
    stale_spec.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    stale_spec.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let stale = up.client_cas[0].0.issue(&stale_spec).expect("stale cert");
    let stale_serial = portcullis::upstream::ClientCredential::from_pem(
        stale.cert_pem.as_bytes(),
        stale.key_pem.as_bytes(),
        None,
    )
    .expect("pair")
    .serial;
    let before = failed_reloads(&proxy, CLIENT_CERT_RELOAD);
    replace(&key, &stale.key_pem);
    replace(&cert, &stale.cert_pem);
    wait_for_failed_reload(&proxy, CLIENT_CERT_RELOAD, before).await;
    // Let a reload triggered by the second rename run as well.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let in_force = proxy
        .upstreams()
        .client_certificate("edge")
        .expect("a pair in force");
    assert_ne!(in_force.serial, stale_serial, "an expired pair took effect");
    assert!(!nginx.requests().iter().any(|r| r.serial == stale_serial));
    // ... and a valid one brings calls back.
    let fresh = up.client_cert(0, "fresh", Duration::from_secs(3600));
    replace(&key, &fresh.key_pem);
    replace(&cert, &fresh.cert_pem);
    wait_for_async(Duration::from_secs(10), "calls to recover", || {
        let mut client = client.clone();
        async move { client.describe_namespace(describe("default")).await.is_ok() }
    })
    .await;
    proxy.shutdown().await;
}

/// An API key from a file goes upstream as `authorization: Bearer KEY` in place of the
/// caller's header, through nginx checking it (TLS, no client certificate, as Temporal Cloud
/// with API keys); a replaced key file is picked up, an empty one rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_replaces_the_callers_authorization() {
    let upstream = FakeUpstream::start().await;
    let pki = Pki::new();
    let up = UpstreamPki::new();
    let mut site = up.site(None, &upstream.address.to_string());
    site.allowed_authorization = vec!["Bearer key-one".into(), "Bearer key-two".into()];
    let nginx = Nginx::start(&[site]);
    let key_file = write_private(up.dir.path(), "api-key", "key-one\n");
    let upstreams = format!(
        r#"
[upstreams.cloud]
address = "{address}"
tls = {{ ca = "{ca}", server_name = "edge.upstream.test" }}
credentials = {{ type = "api-key", file = "{key}" }}
"#,
        address = nginx.addresses[0],
        ca = up.server_ca.display(),
        key = key_file.display(),
    );
    let routing = "[routing]\nsystem_upstream = \"cloud\"\n[[namespaces]]\nname = \"default\"\nupstream = \"cloud\"\n";
    let config_path = write_config(&pki, up.dir.path(), &upstreams, routing);
    let proxy = start_proxy(Config::load(&config_path).expect("config")).await;
    let mut client = workflow_client(proxy.local_addr().expect("tcp"), &pki, &pki.client).await;
    let call = |client: &mut wf::workflow_service_client::WorkflowServiceClient<
        tonic::transport::Channel,
    >| {
        let mut request = tonic::Request::new(describe("default"));
        request.metadata_mut().insert(
            "authorization",
            "Bearer the-callers-own".parse().expect("metadata"),
        );
        let mut client = client.clone();
        async move { client.describe_namespace(request).await }
    };
    call(&mut client)
        .await
        .expect("nginx accepts the proxy's key");
    let seen = |upstream: &FakeUpstream| -> Vec<Vec<String>> {
        upstream
            .seen
            .lock()
            .expect("lock")
            .iter()
            .map(|h| {
                h.get_all("authorization")
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect()
            })
            .collect()
    };
    assert_eq!(seen(&upstream), vec![vec!["Bearer key-one".to_string()]]);

    // An empty key file is rejected (seen to be tried): the last good key stays.
    let before = failed_reloads(&proxy, "upstream API key");
    replace(&key_file, "\n");
    wait_for_failed_reload(&proxy, "upstream API key", before).await;
    call(&mut client).await.expect("key-one still in force");
    assert_eq!(
        seen(&upstream).last(),
        Some(&vec!["Bearer key-one".to_string()])
    );
    replace(&key_file, "key-two\n");
    wait_for_async(Duration::from_secs(10), "the new key to be sent", || {
        let mut client = client.clone();
        let upstream = &upstream;
        async move {
            let _ = call(&mut client).await;
            seen(upstream)
                .last()
                .is_some_and(|h| h == &vec!["Bearer key-two".to_string()])
        }
    })
    .await;
    // nginx really checks: a key it does not know is refused.
    replace(&key_file, "key-unknown\n");
    wait_for_async(Duration::from_secs(10), "nginx to refuse an unknown key", || {
        let mut client = client.clone();
        async move {
            matches!(call(&mut client).await, Err(s) if s.code() == tonic::Code::Unauthenticated)
        }
    })
    .await;
    // nginx logs a request when it finalizes it, which can be just after the client has the
    // answer.
    wait_for_async(Duration::from_secs(10), "nginx to log its 401", || {
        let logged = nginx.requests().iter().any(|r| r.status == 401);
        async move { logged }
    })
    .await;
    let requests = nginx.requests();
    assert!(requests.len() >= 3, "nginx logged {requests:?}");
    assert!(
        requests
            .iter()
            .all(|r| r.authorization.starts_with("Bearer key-")),
        "nginx saw another authorization header: {requests:?}"
    );
    proxy.shutdown().await;
}

/// Upstream blocks and namespaces added, changed and removed in the config file take effect
/// without a restart; a config that does not validate is rejected and routing stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_and_namespaces_change_without_a_restart() {
    let (a, b, c) = (
        FakeUpstream::start().await,
        FakeUpstream::start().await,
        FakeUpstream::start().await,
    );
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |blocks: &[(&str, &FakeUpstream)], namespaces: &[(&str, &str)]| {
        let upstreams: String = blocks
            .iter()
            .map(|(name, u)| format!("[upstreams.{name}]\naddress = \"{}\"\n", u.address))
            .collect();
        let mut routing = format!("[routing]\nsystem_upstream = \"{}\"\n", blocks[0].0);
        for (ns, up) in namespaces {
            routing.push_str(&format!(
                "[[namespaces]]\nname = \"{ns}\"\nupstream = \"{up}\"\n"
            ));
        }
        write_config(&pki, dir.path(), &upstreams, &routing)
    };
    let path = config(&[("one", &a)], &[("alpha", "one")]);
    let proxy = start_proxy(Config::load(&path).expect("config")).await;
    let mut client = workflow_client(proxy.local_addr().expect("tcp"), &pki, &pki.client).await;
    let count = |u: &FakeUpstream| u.seen.lock().expect("lock").len();
    client
        .describe_namespace(describe("alpha"))
        .await
        .expect("alpha");
    let status = client
        .describe_namespace(describe("beta"))
        .await
        .expect_err("beta is not served yet");
    assert_eq!(status.code(), tonic::Code::NotFound);

    // Add an upstream and a namespace on it.
    config(
        &[("one", &a), ("two", &b)],
        &[("alpha", "one"), ("beta", "two")],
    );
    let served = Arc::new(AtomicUsize::new(0));
    wait_for_async(
        Duration::from_secs(10),
        "beta to be served by upstream two",
        || {
            let mut client = client.clone();
            let served = served.clone();
            async move {
                let ok = client.describe_namespace(describe("beta")).await.is_ok();
                served.fetch_add(usize::from(ok), Ordering::SeqCst);
                ok
            }
        },
    )
    .await;
    assert!(count(&b) >= 1);

    // Change upstream one's address: alpha's calls move to the new endpoint.
    let before = count(&c);
    config(
        &[("one", &c), ("two", &b)],
        &[("alpha", "one"), ("beta", "two")],
    );
    wait_for_async(
        Duration::from_secs(10),
        "alpha to move to the new address",
        || {
            let mut client = client.clone();
            let c = &c;
            async move {
                let _ = client.describe_namespace(describe("alpha")).await;
                count(c) > before
            }
        },
    )
    .await;

    // A config that does not validate is rejected: routing stays.
    let broken = std::fs::read_to_string(&path)
        .expect("read")
        .replace("upstream = \"two\"", "upstream = \"missing\"");
    let before = failed_reloads(&proxy, CONFIG_RELOAD);
    replace(&path, &broken);
    wait_for_failed_reload(&proxy, CONFIG_RELOAD, before).await;
    client
        .describe_namespace(describe("beta"))
        .await
        .expect("beta stays after a rejected config");

    // Remove the namespace and its upstream.
    config(&[("one", &c)], &[("alpha", "one")]);
    wait_for_async(Duration::from_secs(10), "beta to be removed", || {
        let mut client = client.clone();
        async move {
            matches!(client.describe_namespace(describe("beta")).await, Err(s) if s.code() == tonic::Code::NotFound)
        }
    })
    .await;
    client
        .describe_namespace(describe("alpha"))
        .await
        .expect("alpha stays");
    proxy.shutdown().await;
}

async fn wait_for_async<F, Fut>(limit: Duration, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An upstream that allows only 2 concurrent streams per connection (nginx allows 128; a
/// fleet's long polls can fill that): calls beyond it go out on more connections instead of
/// queueing behind long polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_do_not_queue_behind_long_polls_at_the_stream_limit() {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: http::Request<hyper::body::Incoming>| async move {
                        if request.uri().path().ends_with("/PollWorkflowTaskQueue") {
                            std::future::pending::<()>().await;
                        }
                        let _ = request.into_body().collect().await;
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().expect("value"));
                        let body =
                            http_body_util::StreamBody::new(futures_util::stream::iter(vec![
                                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                    bytes::Bytes::from(grpc_frame(&[])),
                                )),
                                Ok(hyper::body::Frame::trailers(trailers)),
                            ]));
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                                .expect("response"),
                        )
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .max_concurrent_streams(2)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        &pki,
        dir.path(),
        &format!("[upstreams.small]\naddress = \"{address}\"\n"),
        "[routing]\nsystem_upstream = \"small\"\n[[namespaces]]\nname = \"default\"\nupstream = \"small\"\n",
    );
    let proxy = start_proxy(Config::load(&path).expect("config")).await;
    let client = workflow_client(proxy.local_addr().expect("tcp"), &pki, &pki.client).await;
    client
        .clone()
        .describe_namespace(describe("default"))
        .await
        .expect("first call");
    // Five long polls: more than two connections' worth of streams.
    let mut polls = Vec::new();
    for _ in 0..5 {
        let mut client = client.clone();
        polls.push(tokio::spawn(async move {
            let _ = client
                .poll_workflow_task_queue(wf::PollWorkflowTaskQueueRequest {
                    namespace: "default".into(),
                    ..Default::default()
                })
                .await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(5),
        client.clone().describe_namespace(describe("default")),
    )
    .await
    .expect("a call must not queue behind the long polls")
    .expect("describe");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        connections.load(Ordering::SeqCst) >= 3,
        "expected extra connections, saw {}",
        connections.load(Ordering::SeqCst)
    );
    for poll in polls {
        poll.abort();
    }
    proxy.shutdown().await;
    server.abort();
}
