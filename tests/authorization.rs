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

    // A broken file is rejected: the previous policy (newcomer may read) stays in force. Each
    // rejection is awaited as evidence (the failed-reload count moves), not assumed after a
    // sleep: a dead file watcher would fail here.
    let failed_reloads = || {
        common::ops::Scrape::parse(&proxy.telemetry().encode()).sum(
            "portcullis_config_reloads_total",
            &[("what", "policies"), ("outcome", "failure")],
        )
    };
    for broken in [
        "[[namespaces]]\nname = \"alpha\"\nreaders = [\"group:missing\"]\n",
        "this is not toml [",
    ] {
        let before = failed_reloads();
        std::fs::write(&policy_file, broken).expect("write");
        let deadline = Instant::now() + Duration::from_secs(10);
        while failed_reloads() <= before {
            assert!(
                Instant::now() < deadline,
                "the broken policy file was never rejected: {broken:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        client
            .describe_namespace(describe())
            .await
            .expect("old policy still in force");
    }

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

mod cross_namespace {
    //! Commands of a workflow task that act on another namespace (start a child, signal or
    //! cancel a workflow there), against a dev server that runs them
    //! (`system.enableCrossNamespaceCommands`). Workflow tasks are driven with raw gRPC.

    use std::time::{Duration, Instant};

    use prost::Message;
    use temporalio_protos::protos::temporal::api::command::v1::{
        command::Attributes, Command, CompleteWorkflowExecutionCommandAttributes,
        RequestCancelExternalWorkflowExecutionCommandAttributes,
        SignalExternalWorkflowExecutionCommandAttributes,
    };
    use temporalio_protos::protos::temporal::api::enums::v1::{CommandType, EventType};
    use temporalio_protos::protos::temporal::api::history::v1::HistoryEvent;
    use temporalio_protos::protos::temporal::api::workflowservice::v1::execute_multi_operation_request::{
        operation, Operation,
    };
    use tonic::Code;

    use super::common::tasks::*;
    use super::common::*;

    const POLICY: &str = r#"
audit_log = "AUDIT"
identity = ["cn"]
[system]
admins = ["cn:root"]
[[namespaces]]
name = "alpha"
writers = ["cn:writer-a", "cn:writer-ab"]
[[namespaces]]
name = "beta"
writers = ["cn:writer-ab", "cn:writer-b"]
"#;

    fn complete_in_alpha(
        token: &[u8],
        commands: Vec<Command>,
    ) -> wf::RespondWorkflowTaskCompletedRequest {
        completion(token, "alpha", commands)
    }

    #[allow(deprecated)]
    fn signal(namespace: &str, input: &str) -> Command {
        Command {
            command_type: CommandType::SignalExternalWorkflowExecution as i32,
            attributes: Some(
                Attributes::SignalExternalWorkflowExecutionCommandAttributes(
                    SignalExternalWorkflowExecutionCommandAttributes {
                        namespace: namespace.into(),
                        execution: execution("target"),
                        signal_name: "poke".into(),
                        input: json(input),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }
    }

    #[allow(deprecated)]
    fn cancel(namespace: &str) -> Command {
        Command {
            command_type: CommandType::RequestCancelExternalWorkflowExecution as i32,
            attributes: Some(
                Attributes::RequestCancelExternalWorkflowExecutionCommandAttributes(
                    RequestCancelExternalWorkflowExecutionCommandAttributes {
                        namespace: namespace.into(),
                        workflow_id: "target".into(),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }
    }

    /// A signal-with-start through the system Nexus endpoint (as the Python SDK 1.35 sends it
    /// for `workflow.signal_with_start_workflow`), of a workflow in `namespace`.
    fn system_signal_with_start(namespace: &str, input: &str) -> Command {
        use temporalio_protos::protos::temporal::api::command::v1::ScheduleNexusOperationCommandAttributes;
        use temporalio_protos::protos::temporal::api::common::v1::{Payload, WorkflowType};
        const REQUEST: &str =
            "temporal.api.workflowservice.v1.SignalWithStartWorkflowExecutionRequest";
        let request = wf::SignalWithStartWorkflowExecutionRequest {
            namespace: namespace.into(),
            workflow_id: "sws-target".into(),
            workflow_type: Some(WorkflowType { name: "T".into() }),
            task_queue: queue("beta-q"),
            input: json(input),
            signal_name: "poke".into(),
            signal_input: json(input),
            ..Default::default()
        };
        Command {
            command_type: CommandType::ScheduleNexusOperation as i32,
            attributes: Some(Attributes::ScheduleNexusOperationCommandAttributes(
                ScheduleNexusOperationCommandAttributes {
                    endpoint: "__temporal_system".into(),
                    service: "temporal.api.workflowservice.v1.WorkflowService".into(),
                    operation: "SignalWithStartWorkflowExecution".into(),
                    input: Some(Payload {
                        metadata: [
                            ("encoding".to_string(), b"binary/protobuf".to_vec()),
                            ("messageType".to_string(), REQUEST.as_bytes().to_vec()),
                            ("__temporal_system_payload".to_string(), b"true".to_vec()),
                        ]
                        .into(),
                        data: request.encode_to_vec(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }
    }

    fn has(events: &[HistoryEvent], kind: EventType) -> bool {
        events.iter().any(|e| e.event_type == kind as i32)
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    /// Occurrences of `needle` in the dev server's SQLite files, in any encoding.
    fn stored(server: &DevServer, needle: &str) -> usize {
        occurrences(&server.dir.path().join("temporal.db"), needle)
    }

    /// Beta's state, read straight from the server: (target signaled, target asked to cancel,
    /// child exists).
    async fn beta_state(direct: &mut Client) -> (bool, bool, bool) {
        let target = history(direct, "beta", "target")
            .await
            .expect("target history");
        let child = direct
            .describe_workflow_execution(wf::DescribeWorkflowExecutionRequest {
                namespace: "beta".into(),
                execution: execution("child-1"),
            })
            .await;
        if let Err(status) = &child {
            assert_eq!(status.code(), Code::NotFound, "{status:?}");
        }
        (
            has(&target, EventType::WorkflowExecutionSignaled),
            has(&target, EventType::WorkflowExecutionCancelRequested),
            child.is_ok(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commands_aimed_at_another_namespace_need_the_writer_role_there() {
        let server = DevServer::start_with(
            &["alpha", "beta"],
            &[
                "--dynamic-config-value",
                "system.enableCrossNamespaceCommands=true",
                "--dynamic-config-value",
                "history.enableSignalWithStartFromWorkflow=true",
            ],
        )
        .await;
        let pki = Pki::new();
        let audit = pki.dir.path().join("audit.jsonl");
        let mut config = proxy_config_with_authz(
            &pki,
            &server.address(),
            &["alpha", "beta"],
            &POLICY.replace("AUDIT", &audit.display().to_string()),
        );
        // "delta" is served by another upstream block (the same server, other credentials).
        let same = config.upstreams["temporal"].clone();
        config.upstreams.insert("other".into(), same);
        let mut delta = config.namespaces[0].clone();
        delta.name = "delta".into();
        delta.upstream = "other".into();
        config.namespaces.push(delta);
        let proxy = start_proxy(config).await;
        let address = proxy.local_addr().expect("tcp");
        let mut direct = server.direct_client().await;
        let mut writer_a = workflow_client(address, &pki, &pki.client_cert("writer-a")).await;
        let mut writer_ab = workflow_client(address, &pki, &pki.client_cert("writer-ab")).await;
        let mut writer_b = workflow_client(address, &pki, &pki.client_cert("writer-b")).await;
        let mut root = workflow_client(address, &pki, &pki.client_cert("root")).await;
        let marker = format!("cross-ns-{}", std::process::id());

        start(&mut writer_b, "beta", "target", "beta-idle").await;
        start(&mut writer_a, "alpha", "parent", "alpha-q").await;
        let task = poll(&mut writer_a, "alpha", "alpha-q").await;

        // A writer in alpha only: each command aimed at beta is refused, naming it and beta.
        for (command, name) in [
            (
                start_child("beta", "child-1", "beta-q", &marker),
                "StartChildWorkflowExecution",
            ),
            (signal("beta", &marker), "SignalExternalWorkflowExecution"),
            (cancel("beta"), "RequestCancelExternalWorkflowExecution"),
            // The system Nexus endpoint: the request inside its envelope names beta.
            (
                system_signal_with_start("beta", &marker),
                "SignalWithStartWorkflowExecution",
            ),
        ] {
            let status = writer_a
                .respond_workflow_task_completed(complete_in_alpha(&task.task_token, vec![command]))
                .await
                .expect_err("refused");
            assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
            for part in ["writer-a", name, "namespace beta", "writer role"] {
                assert!(status.message().contains(part), "{part}: {status:?}");
            }
        }
        // A command in its own namespace needs nothing more (the same task, still open).
        // Unknown and other-upstream targets are refused even for a system admin.
        let status = root
            .respond_workflow_task_completed(complete_in_alpha(
                &task.task_token,
                vec![signal("gamma", "x")],
            ))
            .await
            .expect_err("unknown target");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert!(status.message().contains("gamma"), "{status:?}");
        let status = root
            .respond_workflow_task_completed(complete_in_alpha(
                &task.task_token,
                vec![signal("delta", "x")],
            ))
            .await
            .expect_err("other upstream");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("upstream other"), "{status:?}");

        // Nothing reached beta: read straight from the server.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(beta_state(&mut direct).await, (false, false, false));

        // Nested requests of ExecuteMultiOperation must stay in the request's namespace.
        let status = writer_a
            .execute_multi_operation(wf::ExecuteMultiOperationRequest {
                namespace: "alpha".into(),
                operations: vec![
                    Operation {
                        operation: Some(operation::Operation::StartWorkflow(
                            wf::StartWorkflowExecutionRequest {
                                namespace: "beta".into(),
                                workflow_id: "multi".into(),
                                ..Default::default()
                            },
                        )),
                    },
                    Operation {
                        operation: Some(operation::Operation::UpdateWorkflow(
                            wf::UpdateWorkflowExecutionRequest {
                                namespace: "alpha".into(),
                                ..Default::default()
                            },
                        )),
                    },
                ],
                ..Default::default()
            })
            .await
            .expect_err("nested namespace");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("\"beta\""), "{status:?}");

        // A writer in both: the same three commands go through, and beta sees them.
        writer_ab
            .respond_workflow_task_completed(complete_in_alpha(
                &task.task_token,
                vec![
                    start_child("beta", "child-1", "beta-q", &marker),
                    signal("beta", &marker),
                    cancel("beta"),
                ],
            ))
            .await
            .expect("a writer in both namespaces");
        let deadline = Instant::now() + Duration::from_secs(20);
        while beta_state(&mut direct).await != (true, true, true) {
            assert!(
                Instant::now() < deadline,
                "beta never saw the commands: {:?}",
                beta_state(&mut direct).await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // A signal-with-start into beta through the system Nexus endpoint passes the proxy for
        // a writer in both (sealed for beta); server 1.32 itself refuses it across namespaces.
        start(&mut writer_a, "alpha", "parent-2", "alpha-q2").await;
        let task_2 = poll(&mut writer_a, "alpha", "alpha-q2").await;
        let status = writer_ab
            .respond_workflow_task_completed(complete_in_alpha(
                &task_2.task_token,
                vec![system_signal_with_start("beta", &marker)],
            ))
            .await
            .expect_err("server 1.32 keeps system Nexus operations in their namespace");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            !status.message().starts_with("portcullis")
                && status.message().contains("does not match namespace"),
            "the server's own answer: {status:?}"
        );

        // The child runs in beta, on a worker there with rights in beta only: its input opens
        // (it was sealed under beta's key), and it completes.
        let child_task = poll(&mut writer_b, "beta", "beta-q").await;
        let events = child_task.history.clone().unwrap_or_default().events;
        let input = started_input(&events).expect("the child's input");
        assert_eq!(
            input,
            json(&marker).unwrap(),
            "the worker in beta sees the plaintext input"
        );
        writer_b
            .respond_workflow_task_completed(wf::RespondWorkflowTaskCompletedRequest {
                namespace: "beta".into(),
                task_token: child_task.task_token,
                commands: vec![Command {
                    command_type: CommandType::CompleteWorkflowExecution as i32,
                    attributes: Some(Attributes::CompleteWorkflowExecutionCommandAttributes(
                        CompleteWorkflowExecutionCommandAttributes {
                            result: json(&format!("{marker}-result")),
                        },
                    )),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .expect("complete the child");

        // The server holds the child's input and the signal sealed: no marker in its database,
        // and the child's started event carries an envelope.
        let child_events = history(&mut direct, "beta", "child-1")
            .await
            .expect("child history");
        let stored_input = started_input(&child_events)
            .expect("stored input")
            .payloads
            .remove(0);
        assert_eq!(stored_input.metadata["encoding"], b"binary/encrypted");
        assert!(!contains(&stored_input.encode_to_vec(), &marker));
        assert_eq!(
            stored(&server, &marker),
            0,
            "the marker reached the server's database"
        );

        // The parent's history in alpha holds payloads sealed for beta (the child's input and
        // result): they open for a caller who may read beta, and only for one.
        let deadline = Instant::now() + Duration::from_secs(20);
        let events = loop {
            let events = history(&mut writer_ab, "alpha", "parent")
                .await
                .expect("parent history");
            if has(&events, EventType::ChildWorkflowExecutionCompleted) {
                break events;
            }
            assert!(
                Instant::now() < deadline,
                "the child's completion never reached the parent"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let page = wf::GetWorkflowExecutionHistoryResponse {
            history: Some(
                temporalio_protos::protos::temporal::api::history::v1::History { events },
            ),
            ..Default::default()
        }
        .encode_to_vec();
        assert!(
            contains(&page, &format!("\"{marker}\"")),
            "the child's input opens in the parent's history"
        );
        assert!(
            contains(&page, &format!("\"{marker}-result\"")),
            "the child's result opens in the parent's history"
        );
        let status = history(&mut writer_a, "alpha", "parent")
            .await
            .expect_err("beta's payloads");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("namespace beta"), "{status:?}");

        // Every command target was a decision of its own in the audit log.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
            .expect("audit log")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        let decision = |identity: &str, command: &str| {
            lines
                .iter()
                .filter(|l| l["identity"] == identity && l["command"] == command)
                .map(|l| {
                    assert_eq!(l["namespace"], "beta", "{l}");
                    assert_eq!(l["request_namespace"], "alpha", "{l}");
                    assert_eq!(l["access"], "write", "{l}");
                    assert!(
                        l["method"]
                            .as_str()
                            .unwrap()
                            .ends_with(&format!("/RespondWorkflowTaskCompleted/{command}")),
                        "{l}"
                    );
                    l["decision"].as_str().unwrap().to_string()
                })
                .collect::<Vec<_>>()
        };
        for command in [
            "StartChildWorkflowExecution",
            "SignalExternalWorkflowExecution",
            "RequestCancelExternalWorkflowExecution",
            "SignalWithStartWorkflowExecution",
        ] {
            assert_eq!(decision("cn:writer-a", command), ["deny"], "{command}");
            assert_eq!(decision("cn:writer-ab", command), ["allow"], "{command}");
        }
        assert!(lines.iter().any(|l| l["identity"] == "cn:writer-a"
            && l["namespace"] == "beta"
            && l["request_namespace"] == "alpha"
            && l["access"] == "read"
            && l["decision"] == "deny"));
        proxy.shutdown().await;
    }
}
