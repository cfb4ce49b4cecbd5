//! Identity-based authorization against a real Temporal dev server, with several client
//! certificates, the `temporal` CLI, the Python SDK and raw gRPC.

mod common;

use std::time::{Duration, Instant};

use common::*;
use portcullis::tls::pki::{LeafSpec, Usage};
use prost::Message;
use tonic::Code;

const POLICY: &str = r#"
audit_log = "AUDIT"
identity = ["spiffe", "cn"]

[groups]
alpha-workers = ["spiffe://corp.example/ns/alpha/*"]

[system]
admins = ["cn:root"]

[[namespaces]]
name = "alpha"
owner = "team-alpha"
readers = ["cn:reader-a"]
writers = ["cn:writer-a", "group:alpha-workers"]

[[namespaces]]
name = "beta"
writers = ["cn:writer-b"]
"#;

struct Setup {
    _server: DevServer,
    pki: Pki,
    proxy: portcullis::server::RunningProxy,
    audit: std::path::PathBuf,
}

impl Setup {
    async fn new() -> Setup {
        let server = DevServer::start(&["alpha", "beta"]).await;
        let pki = Pki::new();
        let audit = pki.dir.path().join("audit.jsonl");
        let policy = POLICY.replace("AUDIT", &audit.display().to_string());
        let config = proxy_config_with_authz(
            &pki,
            &server.address(),
            &["alpha", "beta", "default"],
            &policy,
        );
        let proxy = start_proxy(config).await;
        Setup {
            _server: server,
            pki,
            proxy,
            audit,
        }
    }

    fn address(&self) -> std::net::SocketAddr {
        self.proxy.local_addr().expect("tcp")
    }

    fn cert(&self, name: &str) -> ClientCert {
        self.pki.client_cert(name)
    }

    fn spiffe_cert(&self, id: &str) -> ClientCert {
        let mut spec = LeafSpec::new("workload", Usage::Client, Duration::from_secs(3600));
        spec.uris.push(id.into());
        let cert = self.pki.client_cert_with(spec);
        // Keep each workload's files apart (client_cert_with names files by CN).
        let unique = ClientCert {
            cert: self
                .pki
                .dir
                .path()
                .join(format!("{}.pem", id.replace(['/', ':'], "_"))),
            key: self
                .pki
                .dir
                .path()
                .join(format!("{}-key.pem", id.replace(['/', ':'], "_"))),
        };
        std::fs::rename(&cert.cert, &unique.cert).expect("rename");
        std::fs::rename(&cert.key, &unique.key).expect("rename");
        unique
    }

    fn cli(&self, client: &ClientCert, args: &[&str]) -> (bool, String) {
        let (ok, out, err) = temporal_cli(self.address(), &self.pki, client, args);
        (ok, out + &err)
    }
}

fn assert_denied(result: (bool, String), what: &str, needs: &str) {
    let (ok, text) = result;
    assert!(!ok, "{what} should have been denied: {text}");
    assert!(
        text.contains("PermissionDenied")
            || text.contains("permission denied")
            || text.contains("may not call"),
        "{what}: {text}"
    );
    assert!(
        text.contains(needs),
        "{what}: denial does not name the role {needs}: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_readers_and_strangers_get_what_their_roles_allow() {
    let setup = Setup::new().await;
    let writer = setup.cert("writer-a");
    let reader = setup.cert("reader-a");
    let stranger = setup.cert("stranger");

    // The writer runs a complete workflow (worker and client) in alpha.
    let mut args = client_args(setup.address(), &setup.pki, &writer);
    args.extend(["--namespace".into(), "alpha".into()]);
    let result = run_python("scenario.py", &args).await;
    let workflow_id = result["workflow_id"].as_str().expect("id").to_string();

    // The writer starts one more for the reader to look at and try to change.
    let (ok, text) = setup.cli(
        &writer,
        &[
            "workflow",
            "start",
            "--namespace",
            "alpha",
            "--type",
            "Idle",
            "--task-queue",
            "none",
            "--workflow-id",
            "idle-1",
        ],
    );
    assert!(ok, "{text}");

    // The reader can list, describe and show ...
    let (ok, text) = setup.cli(
        &reader,
        &[
            "workflow",
            "describe",
            "--namespace",
            "alpha",
            "--workflow-id",
            &workflow_id,
        ],
    );
    assert!(ok && text.contains("COMPLETED"), "{text}");
    let (ok, text) = setup.cli(
        &reader,
        &[
            "workflow",
            "show",
            "--namespace",
            "alpha",
            "--workflow-id",
            &workflow_id,
        ],
    );
    assert!(ok, "{text}");
    let (ok, text) = setup.cli(&reader, &["workflow", "list", "--namespace", "alpha"]);
    assert!(ok, "{text}");
    // ... but not start, signal or terminate.
    assert_denied(
        setup.cli(
            &reader,
            &[
                "workflow",
                "start",
                "--namespace",
                "alpha",
                "--type",
                "X",
                "--task-queue",
                "q",
                "--workflow-id",
                "r-1",
            ],
        ),
        "reader start",
        "writer",
    );
    assert_denied(
        setup.cli(
            &reader,
            &[
                "workflow",
                "signal",
                "--namespace",
                "alpha",
                "--workflow-id",
                "idle-1",
                "--name",
                "s",
            ],
        ),
        "reader signal",
        "writer",
    );
    assert_denied(
        setup.cli(
            &reader,
            &[
                "workflow",
                "terminate",
                "--namespace",
                "alpha",
                "--workflow-id",
                "idle-1",
            ],
        ),
        "reader terminate",
        "writer",
    );

    // Rights in alpha give nothing in beta.
    assert_denied(
        setup.cli(&writer, &["workflow", "list", "--namespace", "beta"]),
        "alpha writer listing beta",
        "reader",
    );
    assert_denied(
        setup.cli(
            &writer,
            &[
                "workflow",
                "start",
                "--namespace",
                "beta",
                "--type",
                "X",
                "--task-queue",
                "q",
                "--workflow-id",
                "w-b",
            ],
        ),
        "alpha writer starting in beta",
        "writer",
    );
    // A stranger gets nothing anywhere, and the denial names who, where, what and the role.
    let (ok, text) = setup.cli(&stranger, &["workflow", "list", "--namespace", "alpha"]);
    assert!(!ok);
    assert!(
        text.contains("stranger")
            && text.contains("alpha")
            && text.contains("ListWorkflowExecutions")
            && text.contains("reader"),
        "{text}"
    );
    assert!(
        !text.contains(&workflow_id),
        "a denial leaked namespace data: {text}"
    );

    // Cluster admin methods need the system admin role.
    assert_denied(
        setup.cli(&writer, &["operator", "cluster", "list"]),
        "writer listing clusters",
        "admin",
    );
    let root = setup.cert("root");
    let (ok, text) = setup.cli(&root, &["operator", "cluster", "list"]);
    assert!(ok, "system admin: {text}");

    // Every authenticated caller may ask for the system info.
    let mut client = workflow_client(setup.address(), &setup.pki, &stranger).await;
    client
        .get_system_info(wf::GetSystemInfoRequest::default())
        .await
        .expect("GetSystemInfo is open to every authenticated caller");

    // The audit log has one JSON line per decision, denials included.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let audit = std::fs::read_to_string(&setup.audit).expect("audit log");
    let events: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let denial = events
        .iter()
        .find(|e| e["identity"] == "cn:stranger" && e["decision"] == "deny")
        .expect("the stranger's denial is audited");
    for field in [
        "time",
        "identity",
        "namespace",
        "method",
        "access",
        "decision",
        "reason",
    ] {
        assert!(
            !denial[field].is_null(),
            "audit line lacks {field}: {denial}"
        );
    }
    assert!(events
        .iter()
        .any(|e| e["identity"] == "cn:writer-a" && e["decision"] == "allow"));
    setup.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_identity_works_in_its_namespace_and_nowhere_else() {
    let setup = Setup::new().await;
    let worker = setup.spiffe_cert("spiffe://corp.example/ns/alpha/worker-7");
    let mut args = client_args(setup.address(), &setup.pki, &worker);
    args.extend(["--namespace".into(), "alpha".into()]);
    run_python("scenario.py", &args).await;

    let mut client = workflow_client(setup.address(), &setup.pki, &worker).await;
    let mut poll = tonic::Request::new(wf::PollActivityTaskQueueRequest {
        namespace: "beta".into(),
        task_queue: Some(
            temporalio_protos::protos::temporal::api::taskqueue::v1::TaskQueue {
                name: "q".into(),
                ..Default::default()
            },
        ),
        ..Default::default()
    });
    poll.set_timeout(Duration::from_secs(5));
    let status = client
        .poll_activity_task_queue(poll)
        .await
        .expect_err("no polling in beta");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("spiffe://corp.example/ns/alpha/worker-7"),
        "{status:?}"
    );

    // Names of different kinds never meet: a certificate whose only name is a subject CN
    // spelled like that SPIFFE ID is `cn:spiffe://…`, which the SPIFFE grant does not match.
    let impostor = setup.cert("spiffe://corp.example/ns/alpha/worker-7");
    let mut client = workflow_client(setup.address(), &setup.pki, &impostor).await;
    let status = client
        .describe_namespace(wf::DescribeNamespaceRequest {
            namespace: "alpha".into(),
            ..Default::default()
        })
        .await
        .expect_err("a CN is not a SPIFFE ID");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("cn:spiffe://corp.example/ns/alpha/worker-7"),
        "{status:?}"
    );
    setup.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_tricks_cannot_escape_a_policy_and_listing_is_filtered() {
    let setup = Setup::new().await;
    let reader = setup.cert("reader-a");
    let raw = RawClient::new(setup.address(), &setup.pki, &reader);
    let describe = |ns: &str| {
        grpc_frame(
            &wf::DescribeNamespaceRequest {
                namespace: ns.into(),
                ..Default::default()
            }
            .encode_to_vec(),
        )
    };
    const DESCRIBE: &str = "/temporal.api.workflowservice.v1.WorkflowService/DescribeNamespace";
    let ok = raw
        .call(
            DESCRIBE,
            &[("temporal-namespace", "alpha")],
            describe("alpha"),
        )
        .await;
    assert_eq!(ok.grpc_status(), Some(0), "{}", ok.grpc_message());
    // Claiming alpha in the header while asking about beta in the body.
    let trick = raw
        .call(
            DESCRIBE,
            &[("temporal-namespace", "alpha")],
            describe("beta"),
        )
        .await;
    assert_eq!(
        trick.grpc_status(),
        Some(Code::InvalidArgument as i32),
        "{}",
        trick.grpc_message()
    );
    // Without a header, beta is simply denied.
    let denied = raw.call(DESCRIBE, &[], describe("beta")).await;
    assert_eq!(
        denied.grpc_status(),
        Some(Code::PermissionDenied as i32),
        "{}",
        denied.grpc_message()
    );

    // ListNamespaces shows a caller only what it may read.
    let names = |response: wf::ListNamespacesResponse| {
        let mut names: Vec<String> = response
            .namespaces
            .into_iter()
            .filter_map(|n| n.namespace_info.map(|i| i.name))
            .collect();
        names.sort();
        names
    };
    let mut client = workflow_client(setup.address(), &setup.pki, &reader).await;
    let listed = client
        .list_namespaces(wf::ListNamespacesRequest::default())
        .await
        .expect("list");
    assert_eq!(names(listed.into_inner()), vec!["alpha".to_string()]);
    let mut root = workflow_client(setup.address(), &setup.pki, &setup.cert("root")).await;
    let listed = names(
        root.list_namespaces(wf::ListNamespacesRequest::default())
            .await
            .expect("list")
            .into_inner(),
    );
    assert!(
        listed.contains(&"alpha".to_string()) && listed.contains(&"beta".to_string()),
        "{listed:?}"
    );
    setup.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_file_changes_apply_without_restart_and_bad_files_are_refused() {
    let server = DevServer::start(&["alpha"]).await;
    let pki = Pki::new();
    let policy_file = pki.dir.path().join("policies.toml");
    std::fs::write(
        &policy_file,
        "[[namespaces]]\nname = \"alpha\"\nreaders = [\"cn:someone-else\"]\n",
    )
    .expect("write");
    let mut config = proxy_config_with_authz(
        &pki,
        &server.address(),
        &["alpha"],
        "audit_log = \"off\"\nidentity = [\"cn\"]\npolicy_file = \"policies.toml\"",
    );
    config.authorization.policy_file = Some(policy_file.clone());
    let config_path = pki.dir.path().join("portcullis.toml");
    std::fs::write(&config_path, config.to_toml()).expect("write config");
    let proxy = start_proxy(portcullis::config::Config::load(&config_path).expect("load")).await;
    let newcomer = pki.client_cert("newcomer");
    let mut client = workflow_client(proxy.local_addr().expect("tcp"), &pki, &newcomer).await;
    let describe = || wf::DescribeNamespaceRequest {
        namespace: "alpha".into(),
        ..Default::default()
    };
    let status = client
        .describe_namespace(describe())
        .await
        .expect_err("not yet allowed");
    assert_eq!(status.code(), Code::PermissionDenied);

    let shared = client.clone();
    let eventually = |expect_ok: bool| {
        let mut client = shared.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let result = client.describe_namespace(describe()).await;
                if result.is_ok() == expect_ok {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "policy change not applied within 10 s: {result:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // Grant the newcomer: the next calls are allowed, no restart.
    std::fs::write(
        &policy_file,
        "[[namespaces]]\nname = \"alpha\"\nreaders = [\"cn:newcomer\"]\n",
    )
    .expect("write");
    eventually(true).await;

    // A broken file is rejected: the previous policy (newcomer may read) stays in force.
    std::fs::write(
        &policy_file,
        "[[namespaces]]\nname = \"alpha\"\nreaders = [\"group:missing\"]\n",
    )
    .expect("write");
    tokio::time::sleep(Duration::from_secs(1)).await;
    client
        .describe_namespace(describe())
        .await
        .expect("old policy still in force");
    std::fs::write(&policy_file, "this is not toml [").expect("write");
    tokio::time::sleep(Duration::from_secs(1)).await;
    client
        .describe_namespace(describe())
        .await
        .expect("old policy still in force");

    // The deny list beats the grant, without a restart.
    std::fs::write(
        &policy_file,
        "deny = [\"cn:newcomer\"]\n[[namespaces]]\nname = \"alpha\"\nreaders = [\"cn:newcomer\"]\n",
    )
    .expect("write");
    eventually(false).await;
    let status = client
        .describe_namespace(describe())
        .await
        .expect_err("denied");
    assert!(status.message().contains("cn:newcomer"), "{status:?}");

    // Revoking the grant works the same way.
    std::fs::write(
        &policy_file,
        "[[namespaces]]\nname = \"alpha\"\nreaders = [\"cn:newcomer\"]\n",
    )
    .expect("write");
    eventually(true).await;
    std::fs::write(
        &policy_file,
        "[[namespaces]]\nname = \"alpha\"\nreaders = []\n",
    )
    .expect("write");
    eventually(false).await;
    proxy.shutdown().await;
}
