//! Driving workflow tasks with raw gRPC (tonic clients from `temporalio-protos`): start a
//! workflow, poll its task, complete it with hand-made commands.

use std::time::Duration;

use temporalio_protos::protos::temporal::api::command::v1::{
    command::Attributes, Command, StartChildWorkflowExecutionCommandAttributes,
};
use temporalio_protos::protos::temporal::api::common::v1::{
    Payload, Payloads, WorkflowExecution, WorkflowType,
};
use temporalio_protos::protos::temporal::api::enums::v1::CommandType;
use temporalio_protos::protos::temporal::api::history::v1::{history_event, HistoryEvent};
use temporalio_protos::protos::temporal::api::taskqueue::v1::TaskQueue;
use tonic::transport::Channel;

use super::wf;

pub type Client = wf::workflow_service_client::WorkflowServiceClient<Channel>;

/// One `json/plain` payload holding the JSON string `text`.
pub fn json(text: &str) -> Option<Payloads> {
    Some(Payloads {
        payloads: vec![Payload {
            metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
            data: format!("\"{text}\"").into_bytes(),
            ..Default::default()
        }],
    })
}

pub fn queue(name: &str) -> Option<TaskQueue> {
    Some(TaskQueue {
        name: name.into(),
        kind: 1,
        ..Default::default()
    })
}

pub fn execution(id: &str) -> Option<WorkflowExecution> {
    Some(WorkflowExecution {
        workflow_id: id.into(),
        ..Default::default()
    })
}

/// Starts workflow `id` (type `T`, no input) on `task_queue`.
pub async fn start(client: &mut Client, namespace: &str, id: &str, task_queue: &str) {
    client
        .start_workflow_execution(wf::StartWorkflowExecutionRequest {
            namespace: namespace.into(),
            workflow_id: id.into(),
            workflow_type: Some(WorkflowType { name: "T".into() }),
            task_queue: queue(task_queue),
            request_id: format!("{namespace}-{id}"),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("start {id} in {namespace}: {e:?}"));
}

/// Polls one workflow task (there must be one).
pub async fn poll(
    client: &mut Client,
    namespace: &str,
    task_queue: &str,
) -> wf::PollWorkflowTaskQueueResponse {
    let mut request = tonic::Request::new(wf::PollWorkflowTaskQueueRequest {
        namespace: namespace.into(),
        task_queue: queue(task_queue),
        identity: "raw-worker".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(30));
    let task = client
        .poll_workflow_task_queue(request)
        .await
        .expect("poll")
        .into_inner();
    assert!(
        !task.task_token.is_empty(),
        "no workflow task in {namespace}/{task_queue}"
    );
    task
}

/// Completes the workflow task `token` of a workflow in `namespace` with `commands`.
pub fn completion(
    token: &[u8],
    namespace: &str,
    commands: Vec<Command>,
) -> wf::RespondWorkflowTaskCompletedRequest {
    wf::RespondWorkflowTaskCompletedRequest {
        task_token: token.to_vec(),
        namespace: namespace.into(),
        identity: "raw-worker".into(),
        commands,
        ..Default::default()
    }
}

/// Starts child `id` (type `Child`, on task queue `child_queue`) in `namespace` with `input`.
#[allow(deprecated)] // the command's namespace field: deprecated, still honoured
pub fn start_child(namespace: &str, id: &str, child_queue: &str, input: &str) -> Command {
    Command {
        command_type: CommandType::StartChildWorkflowExecution as i32,
        attributes: Some(Attributes::StartChildWorkflowExecutionCommandAttributes(
            StartChildWorkflowExecutionCommandAttributes {
                namespace: namespace.into(),
                workflow_id: id.into(),
                workflow_type: Some(WorkflowType {
                    name: "Child".into(),
                }),
                task_queue: queue(child_queue),
                input: json(input),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// The input of a workflow's started event, if the history has one.
pub fn started_input(events: &[HistoryEvent]) -> Option<Payloads> {
    events.iter().find_map(|e| match &e.attributes {
        Some(history_event::Attributes::WorkflowExecutionStartedEventAttributes(a)) => {
            a.input.clone()
        }
        _ => None,
    })
}

pub async fn history(
    client: &mut Client,
    namespace: &str,
    id: &str,
) -> Result<Vec<HistoryEvent>, tonic::Status> {
    client
        .get_workflow_execution_history(wf::GetWorkflowExecutionHistoryRequest {
            namespace: namespace.into(),
            execution: execution(id),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().history.unwrap_or_default().events)
}
