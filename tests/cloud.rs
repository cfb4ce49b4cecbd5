//! Temporal Cloud-grade operation against real parts: the verified identity in Temporal's
//! history (Python SDK worker and the CLI, history read straight at the dev server), two dev
//! servers standing in for two Cloud namespace endpoints (nginx requiring a client certificate,
//! nginx checking an API key, nginx as a regional API-key endpoint routing by
//! `temporal-namespace`) with the namespace list answered by the proxy, and failover by DNS
//! with a maximum upstream connection age.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::nginx::{NamespaceRoute, Nginx, Site};
use common::ops::{scrape, with_admin};
use common::tasks::{self, history};
use common::*;
use portcullis::config::Config;
use temporalio_protos::protos::temporal::api::history::v1::{
    history_event::Attributes, HistoryEvent,
};

const VIA: &str = " (via portcullis: cn:test-client)";

fn toml_config(text: &str) -> Config {
    Config::from_toml(text).unwrap_or_else(|e| panic!("config: {e}\n{text}"))
}

/// The proxy's listener, test PKI, keyring and the default authorization of the harness, with
/// the given upstream/routing/namespace sections.
fn config_with(pki: &Pki, sections: &str, authorization: &str) -> Config {
    let keyring = pki.dir.path().join("keyring.toml");
    if !keyring.exists() {
        portcullis::crypto::Keyring::init(&keyring).expect("keyring");
    }
    toml_config(&format!(
        r#"
[listener]
address = "127.0.0.1:0"
[listener.tls]
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"
[limits]
shutdown_grace_seconds = 5
{sections}
[authorization]
audit_log = "off"
identity = ["spiffe", "dns", "email", "cn"]
{authorization}
[encryption]
default_key = "local"
keys.local = {{ provider = "local", keyring = "{keyring}" }}
"#,
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
        ca = pki.ca_path.display(),
        keyring = keyring.display(),
    ))
}

/// (identity of every event kind we look at) in a history.
fn identities(events: &[HistoryEvent]) -> Vec<(&'static str, String)> {
    events
        .iter()
        .filter_map(|e| {
            Some(match e.attributes.as_ref()? {
                Attributes::WorkflowExecutionStartedEventAttributes(a) => {
                    ("started", a.identity.clone())
                }
                Attributes::WorkflowExecutionSignaledEventAttributes(a) => {
                    ("signaled", a.identity.clone())
                }
                Attributes::WorkflowExecutionTerminatedEventAttributes(a) => {
                    ("terminated", a.identity.clone())
                }
                Attributes::WorkflowTaskStartedEventAttributes(a) => {
                    ("workflow-task-started", a.identity.clone())
                }
                Attributes::WorkflowTaskCompletedEventAttributes(a) => {
                    ("workflow-task-completed", a.identity.clone())
                }
                Attributes::ActivityTaskStartedEventAttributes(a) => {
                    ("activity-started", a.identity.clone())
                }
                Attributes::ActivityTaskCompletedEventAttributes(a) => {
                    ("activity-completed", a.identity.clone())
                }
                Attributes::WorkflowExecutionUpdateAcceptedEventAttributes(a) => (
                    "update-accepted",
                    a.accepted_request
                        .as_ref()
                        .and_then(|r| r.meta.as_ref())
                        .map(|m| m.identity.clone())
                        .unwrap_or_default(),
                ),
                _ => return None,
            })
        })
        .collect()
}

/// History read straight at the dev server shows the verified certificate identity next to
/// the client's own: for the Python SDK (start, signal, update, workflow and activity task
/// polls and completions) and the CLI (start, signal, terminate). Controls: a namespace with
/// `identity = "keep"` records the client's identity alone, one with `replace` only the
/// verified one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_records_the_verified_identity_next_to_the_clients() {
    let server = DevServer::start(&["kept", "replaced"]).await;
    let pki = Pki::new();
    let config = config_with(
        &pki,
        &format!(
            r#"
[upstreams.temporal]
address = "{}"
[routing]
system_upstream = "temporal"
[[namespaces]]
name = "default"
upstream = "temporal"
[[namespaces]]
name = "kept"
upstream = "temporal"
identity = "keep"
[[namespaces]]
name = "replaced"
upstream = "temporal"
identity = "replace"
"#,
            server.address()
        ),
        r#"system.admins = ["cn:test-client"]"#,
    );
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let mut direct = server.direct_client().await;

    // The Python SDK: worker and client through the proxy.
    let result = run_python("scenario.py", &client_args(address, &pki, &pki.client)).await;
    assert_eq!(result["ok"], true, "{result}");
    let workflow_id = result["workflow_id"].as_str().expect("workflow id");
    let events = history(&mut direct, "default", workflow_id)
        .await
        .expect("history straight from the server");
    let seen = identities(&events);
    for kind in [
        "started",
        "signaled",
        "workflow-task-started",
        "workflow-task-completed",
        "activity-started",
        "activity-completed",
        "update-accepted",
    ] {
        let of_kind: Vec<&String> = seen
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, i)| i)
            .collect();
        assert!(!of_kind.is_empty(), "no {kind} event in {seen:?}");
        for identity in of_kind {
            let client = identity
                .strip_suffix(VIA)
                .unwrap_or_else(|| panic!("{kind}: {identity:?} lacks the verified identity"));
            // The SDK's own identity (pid@host) is kept in front of it.
            assert!(client.contains('@'), "{kind}: {identity:?}");
        }
    }

    // The CLI: start, signal, terminate, in each mode.
    let cli = |args: &[&str]| {
        let (ok, out, err) = temporal_cli(address, &pki, &pki.client, args);
        assert!(ok, "temporal {args:?} failed:\n{out}\n{err}");
    };
    for namespace in ["default", "kept", "replaced"] {
        let id = format!("cli-identity-{namespace}");
        let base = ["--namespace", namespace, "--workflow-id", id.as_str()];
        cli(&[
            &[
                "workflow",
                "start",
                "--type",
                "Never",
                "--task-queue",
                "nobody",
            ],
            &base[..],
        ]
        .concat());
        cli(&[&["workflow", "signal", "--name", "poke"], &base[..]].concat());
        cli(&[&["workflow", "terminate", "--reason", "test"], &base[..]].concat());
        let events = history(&mut direct, namespace, &id).await.expect("history");
        let seen = identities(&events);
        assert_eq!(seen.len(), 3, "{namespace}: {seen:?}");
        for (kind, identity) in &seen {
            match namespace {
                "default" => {
                    let client = identity.strip_suffix(VIA).unwrap_or_else(|| {
                        panic!("{namespace} {kind}: {identity:?} lacks the verified identity")
                    });
                    assert!(
                        !client.is_empty() && !client.contains("portcullis"),
                        "{identity}"
                    );
                }
                "kept" => assert!(
                    !identity.is_empty() && !identity.contains("portcullis"),
                    "{kind}: {identity:?} is the CLI's own"
                ),
                _ => assert_eq!(identity, "cn:test-client", "{kind}"),
            }
        }
    }
    proxy.shutdown().await;
}

/// Writes `text` to `dir/name`.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// A client certificate for the proxy towards nginx (from the test CA, which nginx trusts).
fn upstream_pair(pki: &Pki) -> ClientCert {
    pki.client_cert("portcullis-upstream")
}

fn site(pki: &Pki, client_ca: bool, backend: &str) -> Site {
    Site {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_ca: client_ca.then(|| pki.ca_path.clone()),
        backend: backend.to_string(),
        allowed_authorization: Vec::new(),
        namespace_routes: Vec::new(),
    }
}

/// Namespace names in `temporal operator namespace list -o json` output.
fn listed(out: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut collect = |v: &serde_json::Value| {
        if let Some(name) = v["namespaceInfo"]["name"].as_str() {
            names.push(name.to_string());
        }
    };
    match serde_json::from_str::<serde_json::Value>(out) {
        Ok(serde_json::Value::Array(items)) => items.iter().for_each(&mut collect),
        Ok(one) => collect(&one),
        Err(_) => serde_json::Deserializer::from_str(out)
            .into_iter::<serde_json::Value>()
            .flatten()
            .for_each(|v| collect(&v)),
    }
    names.sort();
    names
}

/// `ns-a` behind nginx's first site (client certificate), `ns-b` behind its second (API key).
fn upstream_sections(nginx: &Nginx, tls: &str, cert: &str, key_b: &Path) -> String {
    format!(
        r#"
[upstreams.a]
address = "{a}"
[upstreams.a.tls]
{tls}
{cert}
[upstreams.b]
address = "{b}"
[upstreams.b.tls]
{tls}
[upstreams.b.credentials]
type = "api-key"
file = "{key_b}"
[routing]
system_upstream = "a"
[[namespaces]]
name = "ns-a"
upstream = "a"
[[namespaces]]
name = "ns-b"
upstream = "b"
"#,
        a = nginx.addresses[0],
        b = nginx.addresses[1],
        key_b = key_b.display(),
    )
}

/// A CONNECT relay: tunnels to `frontend_port` go to `proxy`, others where they asked.
async fn connect_relay(
    frontend_port: u16,
    proxy: SocketAddr,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind relay");
    let address = listener.local_addr().expect("relay address");
    let task = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if inbound.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head);
                let Some(target) = text.split_whitespace().nth(1) else {
                    return;
                };
                let Some(port) = target
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse::<u16>().ok())
                else {
                    return;
                };
                let to = if port == frontend_port {
                    proxy
                } else {
                    SocketAddr::from(([127, 0, 0, 1], port))
                };
                let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                if inbound
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    (address, task)
}

/// Aborts the relay when dropped.
struct Relay(tokio::task::JoinHandle<()>);

impl Drop for Relay {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A dev server whose Web UI's gRPC goes to `proxy` (see the namespace test); killed on drop.
async fn web_ui_through(
    proxy: SocketAddr,
) -> (String, tokio::process::Child, Relay, tempfile::TempDir) {
    let frontend = portcullis::dev::free_port().expect("port");
    let ui = portcullis::dev::free_port().expect("port");
    let (relay, task) = connect_relay(frontend, proxy).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = std::fs::File::create(dir.path().join("ui-host.log")).expect("log");
    let child = tokio::process::Command::new(temporal_binary())
        .args([
            "server",
            "start-dev",
            "--ip",
            "0.0.0.0",
            "--ui-ip",
            "127.0.0.1",
        ])
        .args([
            "--port",
            &frontend.to_string(),
            "--ui-port",
            &ui.to_string(),
        ])
        .args([
            "--http-port",
            &portcullis::dev::free_port().expect("port").to_string(),
        ])
        .args([
            "--metrics-port",
            &portcullis::dev::free_port().expect("port").to_string(),
        ])
        .arg("--db-filename")
        .arg(dir.path().join("ui-host.db"))
        .args(["--log-level", "error", "--namespace", "ui-host-only"])
        .env("HTTPS_PROXY", format!("http://{relay}"))
        .env_remove("https_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start the UI host");
    let url = format!("http://127.0.0.1:{ui}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", ui))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the UI host did not listen"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (url, child, Relay(task), dir)
}

/// Two dev servers stand in for two Cloud namespace endpoints: `ns-a` behind nginx requiring a
/// client certificate, `ns-b` behind nginx checking an API key. The CLI's namespace list
/// through the proxy shows both to a caller who may read both and one to a reader of one
/// (a single system upstream could not: straight at either server the other is missing);
/// GetClusterInfo answers for the system upstream. Then a regional API-key endpoint (nginx
/// routing by `temporal-namespace` to both servers, checking each namespace's own key, and a
/// client certificate too): each namespace's calls arrive with its own key, GetSystemInfo
/// without a namespace header, every call with the verified identity header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_endpoints_list_and_api_key_regional_routing() {
    let (server_a, server_b) =
        tokio::join!(DevServer::start(&["ns-a"]), DevServer::start(&["ns-b"]));
    let pki = Pki::new();
    let upstream_client = upstream_pair(&pki);
    let mut key_site = site(&pki, false, &server_b.address());
    key_site.allowed_authorization = vec!["Bearer key-b".into()];
    let mut regional = site(&pki, true, &server_a.address());
    regional.namespace_routes = vec![
        NamespaceRoute {
            namespace: "ns-a".into(),
            backend: server_a.address(),
            authorization: "Bearer key-a".into(),
        },
        NamespaceRoute {
            namespace: "ns-b".into(),
            backend: server_b.address(),
            authorization: "Bearer key-b".into(),
        },
    ];
    let nginx = Nginx::start(&[site(&pki, true, &server_a.address()), key_site, regional]);
    let keys = tempfile::tempdir().expect("tempdir");
    let key_a = write(keys.path(), "key-a", "key-a\n");
    let key_b = write(keys.path(), "key-b", "key-b\n");
    let tls = format!(
        "ca = \"{}\"\nserver_name = \"localhost\"",
        pki.ca_path.display()
    );
    let cert = format!(
        "cert = \"{}\"\nkey = \"{}\"",
        upstream_client.cert.display(),
        upstream_client.key.display()
    );
    let authorization = r#"
system.admins = ["cn:test-client"]
[[authorization.namespaces]]
name = "ns-a"
readers = ["cn:reader-a"]
"#;
    let config = config_with(
        &pki,
        &upstream_sections(&nginx, &tls, &cert, &key_b),
        authorization,
    );
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let reader = pki.client_cert("reader-a");
    let list = |address: SocketAddr, client: &ClientCert| {
        let (ok, out, err) = temporal_cli(
            address,
            &pki,
            client,
            &["operator", "namespace", "list", "-o", "json"],
        );
        assert!(ok, "namespace list failed:\n{out}\n{err}");
        listed(&out)
    };
    assert_eq!(list(address, &pki.client), ["ns-a", "ns-b"]);
    assert_eq!(list(address, &reader), ["ns-a"]);
    // Control: each endpoint alone knows only its own (and its default namespace).
    for (server, own, other) in [(&server_a, "ns-a", "ns-b"), (&server_b, "ns-b", "ns-a")] {
        let names: Vec<String> = server
            .direct_client()
            .await
            .list_namespaces(wf::ListNamespacesRequest::default())
            .await
            .expect("list directly")
            .into_inner()
            .namespaces
            .into_iter()
            .filter_map(|n| n.namespace_info.map(|i| i.name))
            .collect();
        assert!(
            names.contains(&own.to_string()) && !names.contains(&other.to_string()),
            "{names:?}"
        );
    }
    // Pages as the API pages: one at a time, with a token.
    let mut client = workflow_client(address, &pki, &pki.client).await;
    let first = client
        .list_namespaces(wf::ListNamespacesRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("first page")
        .into_inner();
    assert_eq!(first.namespaces.len(), 1);
    assert!(!first.next_page_token.is_empty());
    let second = client
        .list_namespaces(wf::ListNamespacesRequest {
            page_size: 1,
            next_page_token: first.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .expect("second page")
        .into_inner();
    let name = |r: &wf::ListNamespacesResponse| {
        r.namespaces[0]
            .namespace_info
            .as_ref()
            .map(|i| i.name.clone())
    };
    assert_eq!(
        (name(&first), name(&second)),
        (Some("ns-a".into()), Some("ns-b".into()))
    );
    assert!(second.next_page_token.is_empty());
    // GetClusterInfo answers for the system upstream (ns-a's cluster).
    let via_proxy = client
        .get_cluster_info(wf::GetClusterInfoRequest::default())
        .await
        .expect("cluster info")
        .into_inner();
    let direct_a = server_a
        .direct_client()
        .await
        .get_cluster_info(wf::GetClusterInfoRequest::default())
        .await
        .expect("cluster info")
        .into_inner();
    assert_eq!(via_proxy.cluster_id, direct_a.cluster_id);
    proxy.shutdown().await;

    // The Web UI (headless Chromium) through the proxy: the dev server's UI always dials its
    // own frontend's address, so a UI host is started with its frontend on 0.0.0.0 and an HTTPS
    // proxy in its environment (grpc-go honours it for a non-loopback target): a CONNECT relay
    // sends the UI's gRPC to a plaintext loopback listener of the proxy (caller `anonymous`,
    // a system reader here), everything else to where it was going.
    let mut ui_config = config_with(
        &pki,
        &upstream_sections(&nginx, &tls, &cert, &key_b),
        r#"system.readers = ["anonymous"]"#,
    );
    ui_config.listener.tls = None;
    ui_config.listener.plaintext = true;
    let ui_proxy = start_proxy(ui_config).await;
    let ui_proxy_addr = ui_proxy.local_addr().expect("tcp");
    let (ui_url, _ui_host, _relay, _ui_dir) = web_ui_through(ui_proxy_addr).await;
    let page = common::browser::open_page(&common::browser::PageRequest {
        url: &format!("{ui_url}/namespaces"),
        expect: Some("ns-b"),
        wait_for: Some("ns-a"),
        click: None,
        codec: None,
        authorization: None,
        screenshot: Some(common::browser::artifact("cloud-web-ui-namespaces.png")),
        timeout: Duration::from_secs(40),
    })
    .await;
    assert_eq!(page["found"], true, "{page}");
    let text = page["text"].as_str().unwrap_or_default();
    assert!(text.contains("ns-a") && text.contains("ns-b"), "{text}");
    // Control: the UI host's own namespace is not what the page shows.
    assert!(!text.contains("ui-host-only"), "{text}");
    ui_proxy.shutdown().await;

    // The regional endpoint: both namespaces behind one address, each with its own key, and
    // the proxy's client certificate as well.
    let config = config_with(
        &pki,
        &format!(
            r#"
[upstreams.regional]
address = "{regional}"
[upstreams.regional.tls]
{tls}
{cert}
[routing]
system_upstream = "regional"
list_namespaces = "configured"
[[namespaces]]
name = "ns-a"
upstream = "regional"
api_key = {{ file = "{key_a}" }}
[[namespaces]]
name = "ns-b"
upstream = "regional"
api_key = {{ file = "{key_b}" }}
"#,
            regional = nginx.addresses[2],
            key_a = key_a.display(),
            key_b = key_b.display(),
        ),
        authorization,
    );
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let before = nginx.requests().len();
    for namespace in ["ns-a", "ns-b"] {
        let id = format!("regional-{namespace}");
        let (ok, out, err) = temporal_cli(
            address,
            &pki,
            &pki.client,
            &[
                "workflow",
                "start",
                "--namespace",
                namespace,
                "--type",
                "Never",
                "--task-queue",
                "nobody",
                "--workflow-id",
                &id,
            ],
        );
        assert!(ok, "start in {namespace}:\n{out}\n{err}");
    }
    assert_eq!(list(address, &pki.client), ["ns-a", "ns-b"]);
    // Each workflow landed on its namespace's server.
    for (server, namespace) in [(&server_a, "ns-a"), (&server_b, "ns-b")] {
        let mut direct = server.direct_client().await;
        history(&mut direct, namespace, &format!("regional-{namespace}"))
            .await
            .unwrap_or_else(|e| panic!("{namespace} on its own server: {e:?}"));
    }
    let port = nginx.addresses[2].port();
    let logged: Vec<_> = nginx
        .requests()
        .into_iter()
        .skip(before)
        .filter(|r| r.port == port)
        .collect();
    assert!(!logged.is_empty());
    let mut system_info = 0;
    for request in &logged {
        assert_eq!(request.status, 200, "{request:?}");
        assert_eq!(request.identity, "cn:test-client", "{request:?}");
        match request.namespace.as_str() {
            "ns-a" => assert_eq!(request.authorization, "Bearer key-a", "{request:?}"),
            "ns-b" => assert_eq!(request.authorization, "Bearer key-b", "{request:?}"),
            "" => {}
            other => panic!("unexpected namespace header {other:?}"),
        }
        if request.uri.ends_with("/GetSystemInfo") {
            system_info += 1;
            assert_eq!(
                request.namespace, "",
                "GetSystemInfo carries no namespace header"
            );
        }
    }
    assert!(system_info > 0, "the CLI asks GetSystemInfo: {logged:?}");
    for namespace in ["ns-a", "ns-b"] {
        assert!(
            logged
                .iter()
                .any(|r| r.namespace == namespace && r.uri.ends_with("/StartWorkflowExecution")),
            "{namespace}: {logged:?}"
        );
    }
    proxy.shutdown().await;
    drop(nginx);
}

/// A namespace's upstream host name resolves first to one dev server, then to another (a
/// resolver the test controls, standing in for a short-TTL DNS record). After the maximum
/// connection age new calls reach the second without a restart, while a long poll in flight
/// on the old connection finishes on the first; metrics show the resolved addresses and the
/// connection age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_by_dns_after_the_maximum_connection_age() {
    let (first, second) = tokio::join!(DevServer::start(&["ha"]), DevServer::start(&["ha"]));
    let first_addr: SocketAddr = first.address().parse().expect("address");
    let second_addr: SocketAddr = second.address().parse().expect("address");
    const HOST: &str = "ha.failover.portcullis.test";
    let target = Arc::new(Mutex::new(first_addr));
    let answer = target.clone();
    portcullis::upstream::resolve::set_test_resolver(Some(Arc::new(move |host, _port| {
        (host == HOST).then(|| vec![*answer.lock().expect("lock")])
    })));
    let pki = Pki::new();
    let mut config = config_with(
        &pki,
        &format!(
            r#"
[upstreams.ha]
address = "{HOST}:7233"
max_connection_age_seconds = 2
[routing]
system_upstream = "ha"
[[namespaces]]
name = "ha"
upstream = "ha"
"#
        ),
        r#"system.admins = ["cn:test-client"]"#,
    );
    with_admin(&mut config);
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let admin = proxy.admin_addr().expect("admin");
    let mut client = workflow_client(address, &pki, &pki.client).await;
    tasks::start(&mut client, "ha", "before", "tq-before").await;

    // A long poll on the first server, in flight across the switch.
    let mut poller = workflow_client(address, &pki, &pki.client).await;
    let poll = tokio::spawn(async move {
        let mut request = tonic::Request::new(wf::PollWorkflowTaskQueueRequest {
            namespace: "ha".into(),
            task_queue: tasks::queue("tq-held"),
            identity: "held-poller".into(),
            ..Default::default()
        });
        request.set_timeout(Duration::from_secs(60));
        poller.poll_workflow_task_queue(request).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = scrape(admin).await;
    assert_eq!(
        m.sum(
            "portcullis_upstream_resolved_address",
            &[("upstream", "ha"), ("address", &first_addr.to_string())]
        ),
        1.0
    );
    assert!(
        m.sum(
            "portcullis_upstream_connection_age_seconds",
            &[("upstream", "ha")]
        ) > 0.0
    );

    *target.lock().expect("lock") = second_addr;
    tokio::time::sleep(Duration::from_secs(3)).await;
    tasks::start(&mut client, "ha", "after", "tq-after").await;
    let mut on_first = first.direct_client().await;
    let mut on_second = second.direct_client().await;
    assert!(history(&mut on_first, "ha", "before").await.is_ok());
    assert!(
        history(&mut on_second, "ha", "before").await.is_err(),
        "control: only on the first"
    );
    assert!(
        history(&mut on_second, "ha", "after").await.is_ok(),
        "a new call reached the second"
    );
    assert!(history(&mut on_first, "ha", "after").await.is_err());
    let m = scrape(admin).await;
    assert_eq!(
        m.sum(
            "portcullis_upstream_resolved_address",
            &[("upstream", "ha"), ("address", &second_addr.to_string())]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "portcullis_upstream_address_connections",
            &[("upstream", "ha"), ("address", &first_addr.to_string())]
        ),
        0.0,
        "the aged connection to the first takes no new calls"
    );

    // The held poll is still on the first: a task started there reaches it.
    assert!(!poll.is_finished(), "the long poll is still held");
    tasks::start(&mut on_first, "ha", "for-the-held-poll", "tq-held").await;
    let task = tokio::time::timeout(Duration::from_secs(20), poll)
        .await
        .expect("the held poll answers")
        .expect("join")
        .expect("the held poll succeeds")
        .into_inner();
    assert_eq!(
        task.workflow_execution.map(|e| e.workflow_id).as_deref(),
        Some("for-the-held-poll")
    );
    portcullis::upstream::resolve::set_test_resolver(None);
    proxy.shutdown().await;
}
