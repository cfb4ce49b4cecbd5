//! Long polls pass through untouched, and a caller that goes away takes its upstream poll with it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use temporalio_protos::protos::temporal::api::common::v1::WorkflowType;
use temporalio_protos::protos::temporal::api::taskqueue::v1::TaskQueue;

fn task_queue(name: &str) -> Option<TaskQueue> {
    Some(TaskQueue {
        name: name.into(),
        ..Default::default()
    })
}

fn poll_request(queue: &str, identity: &str) -> tonic::Request<wf::PollWorkflowTaskQueueRequest> {
    let mut request = tonic::Request::new(wf::PollWorkflowTaskQueueRequest {
        namespace: "default".into(),
        task_queue: task_queue(queue),
        identity: identity.into(),
        ..Default::default()
    });
    // What the SDKs use for long polls.
    request.set_timeout(Duration::from_secs(90));
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_held_past_sixty_seconds_completes_normally() {
    // Temporal answers an idle poll just before a minute by default; make it hold for 75 s so
    // the call outlives any 60 s idle timer on the way.
    let server = DevServer::start_with(
        &[],
        &[
            "--dynamic-config-value",
            "matching.longPollExpirationInterval=\"75s\"",
        ],
    )
    .await;
    let pki = Pki::new();
    let proxy = start_proxy(proxy_config(&pki, &server.address(), &["default"])).await;
    let mut client = workflow_client(proxy.local_addr().expect("tcp"), &pki, &pki.client).await;

    let started = Instant::now();
    let response = client
        .poll_workflow_task_queue(poll_request("idle-queue", "long-poller"))
        .await
        .expect("an expiring long poll is a normal, empty answer");
    let held = started.elapsed();
    assert!(response.get_ref().task_token.is_empty());
    assert!(
        // Past any 60 s idle timer; under heavy load the server has answered as early as 64.6 s.
        held >= Duration::from_secs(62),
        "the poll came back early ({held:?}): something cut it"
    );

    // The connection that carried it is still good.
    client
        .get_system_info(wf::GetSystemInfoRequest::default())
        .await
        .expect("connection still usable");
    proxy.shutdown().await;
}

/// The decisive check, at the upstream: when the caller resets its call or drops its connection,
/// the proxy's upstream stream is cancelled at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_call_is_cancelled_the_moment_the_caller_goes_away() {
    use std::sync::atomic::Ordering::SeqCst;
    let upstream = FakeUpstream::start().await;
    let pki = Pki::new();
    let proxy = start_proxy(proxy_config(
        &pki,
        &upstream.address.to_string(),
        &["default"],
    ))
    .await;
    let address = proxy.local_addr().expect("tcp");

    let wait_for = |counter: &std::sync::Arc<std::sync::atomic::AtomicUsize>, n: usize| {
        let counter = counter.clone();
        async move {
            for _ in 0..100 {
                if counter.load(SeqCst) >= n {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        }
    };

    // A reset call (the connection stays).
    let client = workflow_client(address, &pki, &pki.client).await;
    let mut caller = client.clone();
    let call = tokio::spawn(async move {
        caller
            .poll_workflow_task_queue(poll_request("q", "a"))
            .await
    });
    assert!(
        wait_for(&upstream.held, 1).await,
        "the poll never reached the upstream"
    );
    assert_eq!(upstream.cancelled.load(SeqCst), 0);
    call.abort();
    assert!(
        wait_for(&upstream.cancelled, 1).await,
        "upstream call not cancelled after the caller reset it"
    );

    // A dropped connection.
    let mut caller = workflow_client(address, &pki, &pki.client).await;
    let call = tokio::spawn(async move {
        caller
            .poll_workflow_task_queue(poll_request("q", "b"))
            .await
    });
    assert!(
        wait_for(&upstream.held, 2).await,
        "the poll never reached the upstream"
    );
    call.abort();
    assert!(
        wait_for(&upstream.cancelled, 2).await,
        "upstream call not cancelled after the caller disconnected"
    );

    // The caller's deadline passing cancels it too, and the caller hears DEADLINE_EXCEEDED from
    // the proxy (a raw client, because tonic would enforce the deadline on its own).
    let raw = RawClient::new(address, &pki, &pki.client);
    let poll = prost::Message::encode_to_vec(&poll_request("q", "c").into_inner());
    let response = raw
        .call(
            &format!("{WORKFLOW_SERVICE}/PollWorkflowTaskQueue"),
            &[("grpc-timeout", "500m")],
            grpc_frame(&poll),
        )
        .await;
    assert_eq!(
        response.grpc_status(),
        Some(tonic::Code::DeadlineExceeded as i32),
        "{}",
        response.grpc_message()
    );
    assert!(
        wait_for(&upstream.cancelled, 3).await,
        "upstream call not cancelled at the deadline"
    );
    proxy.shutdown().await;
}

/// Starts pollers A1..A3, makes them vanish (`how`), starts a workflow, then poller B. B must get
/// the task promptly from the backlog: had the proxy kept the A polls alive upstream, Temporal
/// would hand the task to one of those dead polls and B would wait for the 10 s workflow-task
/// timeout.
async fn dead_poller_does_not_swallow_a_task(how: &str) -> Duration {
    // One partition, so every poll and the task meet in the same place.
    let server = DevServer::start_with(
        &[],
        &[
            "--dynamic-config-value",
            "matching.numTaskqueueReadPartitions=1",
            "--dynamic-config-value",
            "matching.numTaskqueueWritePartitions=1",
        ],
    )
    .await;
    let pki = Pki::new();
    let proxy = start_proxy(proxy_config(&pki, &server.address(), &["default"])).await;
    let address = proxy.local_addr().expect("tcp");
    let queue = format!("cancel-{how}");

    // "sigkill": a real worker process (the Python SDK, several pollers) is killed outright.
    // The kernel closes its sockets: no HTTP/2 frame, no stream reset reaches the proxy, only
    // the end of the connection.
    let mut killed_worker = None;
    if how == "sigkill" {
        use tokio::io::AsyncBufReadExt;
        let mut worker = tokio::process::Command::new(python())
            .arg(repo_root().join("tests/clients/python/worker.py"))
            .args(client_args(address, &pki, &pki.client))
            .args(["--task-queue", &queue, "--seconds", "120"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the Python worker");
        let stdout = worker.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("\"ready\"") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(ready, Ok(true), "the worker never got ready");
        // Its polls are in flight at the upstream.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pid = worker.id().expect("running").to_string();
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .expect("kill");
        assert!(killed.success());
        let _ = worker.wait().await;
        killed_worker = Some(worker);
    }
    let mut dead = Vec::new();
    for i in 0..if how == "sigkill" { 0 } else { 3 } {
        let poller = workflow_client(address, &pki, &pki.client).await;
        let mut client = poller.clone();
        let queue = queue.clone();
        let call = tokio::spawn(async move {
            client
                .poll_workflow_task_queue(poll_request(&queue, &format!("poller-a{i}")))
                .await
        });
        dead.push((poller, call));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (poller, call) in dead {
        assert!(!call.is_finished(), "poller A should be waiting");
        // "reset": the call is abandoned (HTTP/2 RST_STREAM) and the connection stays;
        // otherwise the whole connection goes away.
        call.abort();
        if how == "reset" {
            std::mem::forget(poller);
        } else {
            drop(poller);
        }
    }
    drop(killed_worker);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut starter = workflow_client(address, &pki, &pki.client).await;
    let started = Instant::now();
    starter
        .start_workflow_execution(wf::StartWorkflowExecutionRequest {
            namespace: "default".into(),
            workflow_id: format!("cancel-wf-{how}"),
            workflow_type: Some(WorkflowType {
                name: "AnyWorkflow".into(),
            }),
            task_queue: task_queue(&queue),
            request_id: format!("cancel-req-{how}"),
            ..Default::default()
        })
        .await
        .expect("start workflow");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut poller_b = workflow_client(address, &pki, &pki.client).await;
    let queue_b = queue.clone();
    let b = tokio::spawn(async move {
        poller_b
            .poll_workflow_task_queue(poll_request(&queue_b, "poller-b"))
            .await
    });
    let response = tokio::time::timeout(Duration::from_secs(30), b)
        .await
        .expect("poller B got nothing within 30 s")
        .expect("join")
        .expect("poll B");
    let waited = started.elapsed();
    assert!(
        !response.get_ref().task_token.is_empty(),
        "poller B got an empty poll"
    );
    proxy.shutdown().await;
    waited
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_poll_is_cancelled_upstream() {
    let waited = dead_poller_does_not_swallow_a_task("reset").await;
    assert!(
        waited < Duration::from_secs(5),
        "task reached the live poller only after {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_pollers_upstream_poll_is_cancelled() {
    let waited = dead_poller_does_not_swallow_a_task("disconnect").await;
    assert!(
        waited < Duration::from_secs(5),
        "task reached the live poller only after {waited:?}"
    );
}

/// A true connection loss: a worker process killed mid-poll sends no stream reset, only the
/// end of its connections; its polls must be cancelled upstream all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_upstream_polls_are_cancelled() {
    let waited = dead_poller_does_not_swallow_a_task("sigkill").await;
    assert!(
        waited < Duration::from_secs(5),
        "task reached the live poller only after {waited:?}"
    );
}

/// `portcullis_closed_connections_total{reason}` from an in-process proxy.
fn closed(proxy: &portcullis::server::RunningProxy, reason: &str) -> f64 {
    let needle = format!("portcullis_closed_connections_total{{reason=\"{reason}\"}} ");
    proxy
        .telemetry()
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(needle.as_str())?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reach_their_maximum_age_without_failing_calls() {
    // Polls expire after 6 s here, so one is in flight when its connection's GOAWAY goes out.
    let server = DevServer::start_with(
        &[],
        &[
            "--dynamic-config-value",
            "matching.longPollExpirationInterval=\"6s\"",
        ],
    )
    .await;
    let pki = Pki::new();
    let mut config = proxy_config(&pki, &server.address(), &["default"]);
    config.limits.max_connection_age_seconds = 3;
    config.limits.max_connection_age_grace_seconds = 20;
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let mut client = workflow_client(address, &pki, &pki.client).await;
    client
        .get_system_info(wf::GetSystemInfoRequest::default())
        .await
        .expect("first call");

    let started = Instant::now();
    let response = client
        .poll_workflow_task_queue(poll_request("age-queue", "age-poller"))
        .await
        .expect("the long poll in flight at the GOAWAY completes normally");
    let held = started.elapsed();
    assert!(response.get_ref().task_token.is_empty());
    assert!(
        held >= Duration::from_secs(5),
        "the poll came back after {held:?}"
    );
    assert!(closed(&proxy, "max_age") >= 1.0, "no GOAWAY for age");

    // The same tonic channel reconnects: calls keep succeeding across further GOAWAYs.
    let until = Instant::now() + Duration::from_secs(4);
    let mut calls = 0;
    let mut never_sent = 0;
    while Instant::now() < until {
        match client
            .get_system_info(wf::GetSystemInfoRequest::default())
            .await
        {
            Ok(_) => {}
            // A request hyper dispatched to a connection that had just received the GOAWAY was
            // never sent ("connection was not ready", or queued as it closed: "connection
            // closed"; the SIGTERM test in process.rs meets the same): a client-side race that
            // a retry on the new connection answers. Anything else, or a retry that fails, is a
            // failure.
            Err(status)
                if status.code() == tonic::Code::Cancelled
                    && (format!("{status:?}").contains("not ready")
                        || format!("{status:?}").contains("connection closed")) =>
            {
                never_sent += 1;
                client
                    .get_system_info(wf::GetSystemInfoRequest::default())
                    .await
                    .expect("the retry on the new connection");
            }
            Err(status) => panic!("a call across a GOAWAY: {status:?}"),
        }
        calls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(never_sent <= 2, "{never_sent} calls were never sent");
    assert!(calls > 10);
    // The Python SDK runs a whole scenario (worker polls included) across several of them.
    let before = closed(&proxy, "max_age");
    run_python("scenario.py", &client_args(address, &pki, &pki.client)).await;
    assert!(closed(&proxy, "max_age") > before);
    proxy.shutdown().await;

    // Past the grace period, a call still running is cut with UNAVAILABLE and its upstream call
    // cancelled.
    let upstream = FakeUpstream::start().await;
    let mut config = proxy_config(&pki, &upstream.address.to_string(), &["default"]);
    config.limits.max_connection_age_seconds = 1;
    config.limits.max_connection_age_grace_seconds = 1;
    let proxy = start_proxy(config).await;
    let mut client = workflow_client(proxy.local_addr().expect("tcp"), &pki, &pki.client).await;
    let started = Instant::now();
    let status = client
        .poll_workflow_task_queue(poll_request("held", "held-poller"))
        .await
        .expect_err("held forever upstream");
    let took = started.elapsed();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("maximum age"),
        "{:?}",
        status.message()
    );
    assert!(took < Duration::from_secs(5), "cut after {took:?}");
    assert_eq!(upstream.held.load(std::sync::atomic::Ordering::SeqCst), 1);
    let deadline = Instant::now() + Duration::from_secs(2);
    while upstream.cancelled.load(std::sync::atomic::Ordering::SeqCst) < 1 {
        assert!(
            Instant::now() < deadline,
            "the upstream poll was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.shutdown().await;
}
