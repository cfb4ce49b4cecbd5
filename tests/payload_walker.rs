//! The payload walker against Temporal's typed messages: whatever the walker rewrites must decode
//! (prost) to the same message with exactly the payloads replaced.

use std::collections::HashMap;

use portcullis::payload::walker::{
    plan_named, rewrite, rewrite_named, rewrite_status_details, rewrite_status_details_with,
    rewrite_with, visit_payloads, FailureMode, PayloadContext, PayloadIndex, Visit, WalkError,
    WalkOptions, ENCODED_FAILURE_MESSAGE, FAILURE_MARKER_KEY,
};
use portcullis::payload::wire;
use portcullis::schema::Schema;
use proptest::prelude::*;
use prost::Message as _;
use prost_reflect::MessageDescriptor;
use temporalio_protos::protos::google::rpc::Status;
use temporalio_protos::protos::temporal::api::{
    command::v1::{command, Command, ScheduleNexusOperationCommandAttributes},
    common::v1::{DataBlob, Header, Memo, Payload, Payloads, SearchAttributes},
    errordetails::v1::QueryFailedFailure,
    failure::v1::{failure::FailureInfo, ApplicationFailureInfo, Failure},
    history::v1::{self as history, history_event::Attributes, History, HistoryEvent},
    protocol::v1::Message as ProtocolMessage,
    sdk::v1::UserMetadata,
    update::v1::{Input as UpdateInput, Meta as UpdateMeta, Request as UpdateRequest},
    workflowservice::v1::{
        GetWorkflowExecutionHistoryResponse, PollWorkflowTaskQueueResponse,
        RespondActivityTaskFailedRequest, RespondWorkflowTaskCompletedRequest,
        SignalWithStartWorkflowExecutionRequest, StartWorkflowExecutionRequest,
    },
};

const WS: &str = "temporal.api.workflowservice.v1.";
const UPDATE_REQUEST_URL: &str = "type.googleapis.com/temporal.api.update.v1.Request";

fn desc(name: &str) -> MessageDescriptor {
    Schema::global()
        .message(name)
        .unwrap_or_else(|| panic!("{name} is in the schema"))
}

fn ws(name: &str) -> MessageDescriptor {
    desc(&format!("{WS}{name}"))
}

fn index() -> &'static PayloadIndex {
    PayloadIndex::global()
}

/// What the test "sealer" does to a typed payload: prefix the data with X.
fn wrap(p: &Payload) -> Payload {
    let mut p = p.clone();
    p.data.insert(0, b'X');
    p
}

fn unwrap_payload(p: &Payload) -> Payload {
    let mut p = p.clone();
    assert_eq!(p.data.first(), Some(&b'X'), "payload was wrapped");
    p.data.remove(0);
    p
}

fn bad(e: prost::DecodeError) -> WalkError {
    WalkError::visitor(e)
}

/// A visitor that wraps every payload and records where it found them.
#[derive(Default)]
struct Wrapper {
    paths: Vec<String>,
}

impl portcullis::payload::PayloadVisitor for Wrapper {
    fn payload(
        &mut self,
        ctx: &PayloadContext<'_>,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, WalkError> {
        self.paths.push(ctx.to_string());
        let p = Payload::decode(payload).map_err(bad)?;
        Ok(Some(wrap(&p).encode_to_vec()))
    }
}

fn unwrapper(_: &PayloadContext<'_>, payload: &[u8]) -> Result<Option<Vec<u8>>, WalkError> {
    let p = Payload::decode(payload).map_err(bad)?;
    Ok(Some(unwrap_payload(&p).encode_to_vec()))
}

fn identity(_: &PayloadContext<'_>, _: &[u8]) -> Result<Option<Vec<u8>>, WalkError> {
    Ok(None)
}

fn rewrite_wrapped(message: &MessageDescriptor, input: &[u8]) -> (Vec<u8>, Vec<String>) {
    let mut wrapper = Wrapper::default();
    let out = rewrite(index(), message, input, &mut wrapper).expect("rewrite succeeds");
    assert_eq!(out.is_some(), !wrapper.paths.is_empty());
    (out.unwrap_or_else(|| input.to_vec()), wrapper.paths)
}

// ---------------------------------------------------------------------------------------------
// Strategies: parameters from which a message is built twice, once with the original payloads
// and once with every payload that must be sealed passed through `wrap`.

fn payload_strategy() -> impl Strategy<Value = Payload> {
    (
        // At most one metadata entry: the test visitor re-encodes payloads, and prost writes a
        // HashMap in no fixed order, which would break the byte-for-byte comparisons.
        prop::collection::hash_map("[a-z]{1,8}", prop::collection::vec(any::<u8>(), 0..8), 0..2),
        // Never the default Payload: prost leaves a default map value out of the entry.
        prop::collection::vec(any::<u8>(), 1..48),
    )
        .prop_map(|(metadata, data)| Payload {
            metadata,
            data,
            ..Default::default()
        })
}

fn payloads_strategy() -> impl Strategy<Value = Vec<Payload>> {
    prop::collection::vec(payload_strategy(), 0..3)
}

fn map_strategy() -> impl Strategy<Value = Vec<(String, Payload)>> {
    prop::collection::vec(("[a-z]{1,6}", payload_strategy()), 0..3).prop_map(|mut v| {
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.dedup_by(|a, b| a.0 == b.0);
        v
    })
}

type F<'a> = &'a dyn Fn(&Payload) -> Payload;

fn payloads(v: &[Payload], f: F<'_>) -> Option<Payloads> {
    Some(Payloads {
        payloads: v.iter().map(f).collect(),
    })
}

fn map(v: &[(String, Payload)], f: F<'_>) -> HashMap<String, Payload> {
    v.iter().map(|(k, p)| (k.clone(), f(p))).collect()
}

fn search_attributes(v: &[(String, Payload)]) -> Option<SearchAttributes> {
    Some(SearchAttributes {
        indexed_fields: v.iter().cloned().collect(),
    })
}

#[derive(Debug, Clone)]
struct StartParams {
    workflow_id: String,
    input: Vec<Payload>,
    memo: Vec<(String, Payload)>,
    header: Vec<(String, Payload)>,
    search: Vec<(String, Payload)>,
    summary: Option<Payload>,
}

fn start_strategy() -> impl Strategy<Value = StartParams> {
    (
        "[a-z0-9-]{0,12}",
        payloads_strategy(),
        map_strategy(),
        map_strategy(),
        map_strategy(),
        prop::option::of(payload_strategy()),
    )
        .prop_map(
            |(workflow_id, input, memo, header, search, summary)| StartParams {
                workflow_id,
                input,
                memo,
                header,
                search,
                summary,
            },
        )
}

fn build_start(p: &StartParams, f: F<'_>) -> StartWorkflowExecutionRequest {
    StartWorkflowExecutionRequest {
        namespace: "ns1".into(),
        workflow_id: p.workflow_id.clone(),
        input: payloads(&p.input, f),
        memo: Some(Memo {
            fields: map(&p.memo, f),
        }),
        header: Some(Header {
            fields: map(&p.header, f),
        }),
        search_attributes: search_attributes(&p.search),
        user_metadata: Some(UserMetadata {
            summary: p.summary.as_ref().map(f),
            details: None,
        }),
        ..Default::default()
    }
}

#[derive(Debug, Clone)]
struct FailureParams {
    message: String,
    stack_trace: String,
    details: Vec<Payload>,
    cause: Option<Box<FailureParams>>,
}

fn failure_strategy() -> impl Strategy<Value = FailureParams> {
    let leaf = ("[ -~]{0,20}", "[ -~\n]{0,30}", payloads_strategy()).prop_map(
        |(message, stack_trace, details)| FailureParams {
            message,
            stack_trace,
            details,
            cause: None,
        },
    );
    leaf.prop_recursive(3, 6, 1, |inner| {
        ("[ -~]{0,20}", "[ -~\n]{0,30}", payloads_strategy(), inner).prop_map(
            |(message, stack_trace, details, cause)| FailureParams {
                message,
                stack_trace,
                details,
                cause: Some(Box::new(cause)),
            },
        )
    })
}

fn build_failure(p: &FailureParams, f: F<'_>) -> Failure {
    Failure {
        message: p.message.clone(),
        stack_trace: p.stack_trace.clone(),
        source: "RustSDK".into(),
        cause: p.cause.as_ref().map(|c| Box::new(build_failure(c, f))),
        failure_info: Some(FailureInfo::ApplicationFailureInfo(
            ApplicationFailureInfo {
                r#type: "MyError".into(),
                details: payloads(&p.details, f),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

#[derive(Debug, Clone)]
enum EventParams {
    Started {
        input: Vec<Payload>,
        memo: Vec<(String, Payload)>,
        search: Vec<(String, Payload)>,
    },
    Scheduled {
        input: Vec<Payload>,
        header: Vec<(String, Payload)>,
    },
    Completed {
        result: Vec<Payload>,
    },
    Failed {
        failure: FailureParams,
    },
    Signaled {
        input: Vec<Payload>,
    },
    Marker {
        details: Vec<(String, Vec<Payload>)>,
    },
    Timer {
        id: String,
    },
    Upsert {
        search: Vec<(String, Payload)>,
    },
    UpdateAccepted {
        args: Vec<Payload>,
    },
}

fn event_strategy() -> impl Strategy<Value = EventParams> {
    prop_oneof![
        (payloads_strategy(), map_strategy(), map_strategy()).prop_map(|(input, memo, search)| {
            EventParams::Started {
                input,
                memo,
                search,
            }
        }),
        (payloads_strategy(), map_strategy())
            .prop_map(|(input, header)| EventParams::Scheduled { input, header }),
        payloads_strategy().prop_map(|result| EventParams::Completed { result }),
        failure_strategy().prop_map(|failure| EventParams::Failed { failure }),
        payloads_strategy().prop_map(|input| EventParams::Signaled { input }),
        prop::collection::vec(("[a-z]{1,5}", payloads_strategy()), 0..3).prop_map(|mut d| {
            d.sort_by(|a, b| a.0.cmp(&b.0));
            d.dedup_by(|a, b| a.0 == b.0);
            EventParams::Marker { details: d }
        }),
        "[0-9]{1,4}".prop_map(|id| EventParams::Timer { id }),
        map_strategy().prop_map(|search| EventParams::Upsert { search }),
        payloads_strategy().prop_map(|args| EventParams::UpdateAccepted { args }),
    ]
}

fn build_event(id: i64, p: &EventParams, f: F<'_>) -> HistoryEvent {
    let attributes = match p {
        EventParams::Started {
            input,
            memo,
            search,
        } => Attributes::WorkflowExecutionStartedEventAttributes(
            history::WorkflowExecutionStartedEventAttributes {
                input: payloads(input, f),
                memo: Some(Memo {
                    fields: map(memo, f),
                }),
                search_attributes: search_attributes(search),
                ..Default::default()
            },
        ),
        EventParams::Scheduled { input, header } => {
            Attributes::ActivityTaskScheduledEventAttributes(
                history::ActivityTaskScheduledEventAttributes {
                    activity_id: id.to_string(),
                    input: payloads(input, f),
                    header: Some(Header {
                        fields: map(header, f),
                    }),
                    ..Default::default()
                },
            )
        }
        EventParams::Completed { result } => Attributes::ActivityTaskCompletedEventAttributes(
            history::ActivityTaskCompletedEventAttributes {
                result: payloads(result, f),
                scheduled_event_id: id - 1,
                ..Default::default()
            },
        ),
        EventParams::Failed { failure } => Attributes::ActivityTaskFailedEventAttributes(
            history::ActivityTaskFailedEventAttributes {
                failure: Some(build_failure(failure, f)),
                ..Default::default()
            },
        ),
        EventParams::Signaled { input } => Attributes::WorkflowExecutionSignaledEventAttributes(
            history::WorkflowExecutionSignaledEventAttributes {
                signal_name: "sig".into(),
                input: payloads(input, f),
                ..Default::default()
            },
        ),
        EventParams::Marker { details } => {
            Attributes::MarkerRecordedEventAttributes(history::MarkerRecordedEventAttributes {
                marker_name: "m".into(),
                details: details
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            Payloads {
                                payloads: v.iter().map(f).collect(),
                            },
                        )
                    })
                    .collect(),
                ..Default::default()
            })
        }
        EventParams::Timer { id } => {
            Attributes::TimerStartedEventAttributes(history::TimerStartedEventAttributes {
                timer_id: id.clone(),
                ..Default::default()
            })
        }
        EventParams::Upsert { search } => {
            Attributes::UpsertWorkflowSearchAttributesEventAttributes(
                history::UpsertWorkflowSearchAttributesEventAttributes {
                    search_attributes: search_attributes(search),
                    ..Default::default()
                },
            )
        }
        EventParams::UpdateAccepted { args } => {
            Attributes::WorkflowExecutionUpdateAcceptedEventAttributes(
                history::WorkflowExecutionUpdateAcceptedEventAttributes {
                    protocol_instance_id: "u1".into(),
                    accepted_request: Some(update_request(args, f)),
                    ..Default::default()
                },
            )
        }
    };
    HistoryEvent {
        event_id: id,
        attributes: Some(attributes),
        ..Default::default()
    }
}

fn update_request(args: &[Payload], f: F<'_>) -> UpdateRequest {
    UpdateRequest {
        meta: Some(UpdateMeta {
            update_id: "u1".into(),
            identity: "me".into(),
        }),
        input: Some(UpdateInput {
            header: None,
            name: "upd".into(),
            args: payloads(args, f),
        }),
        ..Default::default()
    }
}

fn build_history(events: &[EventParams], f: F<'_>) -> History {
    History {
        events: events
            .iter()
            .enumerate()
            .map(|(i, e)| build_event(i as i64 + 1, e, f))
            .collect(),
    }
}

fn build_poll(
    events: &[EventParams],
    updates: &[Vec<Payload>],
    f: F<'_>,
) -> PollWorkflowTaskQueueResponse {
    let mut messages: Vec<ProtocolMessage> = updates
        .iter()
        .enumerate()
        .map(|(i, args)| ProtocolMessage {
            id: format!("m{i}"),
            protocol_instance_id: "u1".into(),
            body: Some(prost_wkt_types::Any {
                type_url: UPDATE_REQUEST_URL.into(),
                value: update_request(args, f).encode_to_vec(),
            }),
            ..Default::default()
        })
        .collect();
    // A body of a type the pool does not know: left exactly as it is.
    messages.push(ProtocolMessage {
        id: "unknown".into(),
        body: Some(prost_wkt_types::Any {
            type_url: "type.googleapis.com/example.v1.Unknown".into(),
            value: update_request(&updates.concat(), &|p| p.clone()).encode_to_vec(),
        }),
        ..Default::default()
    });
    PollWorkflowTaskQueueResponse {
        task_token: b"token".to_vec(),
        history: Some(build_history(events, f)),
        messages,
        ..Default::default()
    }
}

/// Replaces each Any body by its decoded form, so comparisons do not depend on map order.
fn split_bodies(
    mut r: PollWorkflowTaskQueueResponse,
) -> (PollWorkflowTaskQueueResponse, Vec<Option<UpdateRequest>>) {
    let bodies = r
        .messages
        .iter_mut()
        .map(|m| {
            let body = m.body.as_mut()?;
            if body.type_url != UPDATE_REQUEST_URL {
                return None;
            }
            let req = UpdateRequest::decode(body.value.as_slice()).ok();
            body.value.clear();
            req
        })
        .collect();
    (r, bodies)
}

fn count(f: impl Fn(F<'_>)) -> usize {
    let n = std::cell::Cell::new(0);
    f(&|p| {
        n.set(n.get() + 1);
        p.clone()
    });
    n.get()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// (b) StartWorkflowExecutionRequest: input, memo, header and summary are wrapped; search
    /// attributes are not.
    #[test]
    fn start_request_payloads_are_rewritten(p in start_strategy()) {
        let original = build_start(&p, &|x| x.clone());
        let expected = build_start(&p, &wrap);
        let (out, paths) = rewrite_wrapped(&ws("StartWorkflowExecutionRequest"), &original.encode_to_vec());
        prop_assert_eq!(StartWorkflowExecutionRequest::decode(out.as_slice()).unwrap(), expected);
        prop_assert_eq!(paths.len(), count(|f| { build_start(&p, f); }));
        prop_assert!(paths.iter().all(|p| !p.contains("search_attributes")));
    }

    /// (b) A history page with many kinds of events.
    #[test]
    fn history_payloads_are_rewritten(events in prop::collection::vec(event_strategy(), 0..12)) {
        let original = GetWorkflowExecutionHistoryResponse {
            history: Some(build_history(&events, &|x| x.clone())),
            next_page_token: b"next".to_vec(),
            ..Default::default()
        };
        let expected = GetWorkflowExecutionHistoryResponse {
            history: Some(build_history(&events, &wrap)),
            ..original.clone()
        };
        let input = original.encode_to_vec();
        let mut wrapper = Wrapper::default();
        let out = rewrite(index(), &ws("GetWorkflowExecutionHistoryResponse"), &input, &mut wrapper).unwrap();
        let calls = count(|f| { build_history(&events, f); });
        prop_assert_eq!(wrapper.paths.len(), calls);
        let out = out.unwrap_or(input);
        prop_assert_eq!(GetWorkflowExecutionHistoryResponse::decode(out.as_slice()).unwrap(), expected);
    }

    /// (b) Workflow task with history and protocol messages carrying update requests in Anys.
    #[test]
    fn poll_response_any_bodies_are_rewritten(
        events in prop::collection::vec(event_strategy(), 0..6),
        updates in prop::collection::vec(payloads_strategy(), 0..3),
    ) {
        let original = build_poll(&events, &updates, &|x| x.clone());
        let expected = build_poll(&events, &updates, &wrap);
        let input = original.encode_to_vec();
        let mut wrapper = Wrapper::default();
        let out = rewrite(index(), &ws("PollWorkflowTaskQueueResponse"), &input, &mut wrapper)
            .unwrap()
            .unwrap_or(input);
        let got = PollWorkflowTaskQueueResponse::decode(out.as_slice()).unwrap();
        // The unknown-type body is byte-identical.
        prop_assert_eq!(got.messages.last().and_then(|m| m.body.clone()), original.messages.last().and_then(|m| m.body.clone()));
        prop_assert_eq!(split_bodies(got), split_bodies(expected));
        let calls = count(|f| { build_poll(&events, &updates, f); });
        prop_assert_eq!(wrapper.paths.len(), calls);
    }

    /// (c) The identity visitor changes nothing and returns None.
    #[test]
    fn identity_visitor_returns_none(events in prop::collection::vec(event_strategy(), 0..6), p in start_strategy()) {
        let poll = build_poll(&events, &[vec![Payload::default()]], &|x| x.clone()).encode_to_vec();
        prop_assert!(rewrite(index(), &ws("PollWorkflowTaskQueueResponse"), &poll, &mut identity).unwrap().is_none());
        let start = build_start(&p, &|x| x.clone()).encode_to_vec();
        prop_assert!(rewrite(index(), &ws("StartWorkflowExecutionRequest"), &start, &mut identity).unwrap().is_none());
    }

    /// (d) Random bytes never panic, whatever the message type and failure mode.
    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400), which in 0usize..7, mode in 0usize..3) {
        let names = [
            "temporal.api.workflowservice.v1.StartWorkflowExecutionRequest",
            "temporal.api.workflowservice.v1.PollWorkflowTaskQueueResponse",
            "temporal.api.workflowservice.v1.GetWorkflowExecutionHistoryResponse",
            "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest",
            "temporal.api.history.v1.HistoryEvent",
            "temporal.api.failure.v1.Failure",
            "google.rpc.Status",
        ];
        let modes = [FailureMode::Keep, FailureMode::Encode, FailureMode::Decode];
        let options = WalkOptions::with_failures(modes[mode]);
        let mut wrapper = Wrapper::default();
        let _ = rewrite_named(index(), names[which], &bytes, &mut wrapper, &options);
        let _ = rewrite_named(index(), names[which], &bytes, &mut identity, &options);
    }

    /// (d) A truncated message is an error unless the cut falls between top-level fields.
    #[test]
    fn truncated_input_is_an_error(events in prop::collection::vec(event_strategy(), 1..6), cut in any::<prop::sample::Index>()) {
        let bytes = GetWorkflowExecutionHistoryResponse {
            history: Some(build_history(&events, &|x| x.clone())),
            next_page_token: b"next".to_vec(),
            ..Default::default()
        }.encode_to_vec();
        let at = cut.index(bytes.len());
        let boundaries: Vec<usize> = wire::fields(&bytes).map(|f| f.unwrap().offset).collect();
        let result = rewrite(index(), &ws("GetWorkflowExecutionHistoryResponse"), &bytes[..at], &mut Wrapper::default());
        if boundaries.contains(&at) {
            prop_assert!(result.is_ok());
        } else {
            prop_assert!(result.is_err(), "cut at {} of {}", at, bytes.len());
        }
    }

    /// (e) Encode then Decode gives back the original Failure, byte for byte.
    #[test]
    fn failure_encode_then_decode_restores(f in failure_strategy(), last_heartbeat in payloads_strategy()) {
        let original = RespondActivityTaskFailedRequest {
            namespace: "ns1".into(),
            task_token: b"t".to_vec(),
            failure: Some(build_failure(&f, &|x| x.clone())),
            last_heartbeat_details: payloads(&last_heartbeat, &|x| x.clone()),
            ..Default::default()
        };
        let input = original.encode_to_vec();
        let message = ws("RespondActivityTaskFailedRequest");
        let encoded = rewrite_with(index(), &message, &input, &mut Wrapper::default(), &WalkOptions::with_failures(FailureMode::Encode))
            .unwrap()
            .unwrap_or_else(|| input.clone());
        // Sealed form: no message or stack trace left in plaintext.
        let sealed = RespondActivityTaskFailedRequest::decode(encoded.as_slice()).unwrap();
        // Decided by the input, failure by failure down the cause chain: every failure that had
        // a message or a stack trace (and no encoded attributes of its own) has neither left.
        let (mut before, mut after) = (original.failure.clone(), sealed.failure.clone());
        while let Some(b) = before {
            let Some(a) = after else {
                return Err(TestCaseError::fail("a failure vanished from the cause chain"));
            };
            let had_text = !b.message.is_empty() || !b.stack_trace.is_empty();
            if b.encoded_attributes.is_none() && had_text {
                prop_assert_eq!(a.message.as_str(), ENCODED_FAILURE_MESSAGE);
                prop_assert!(a.stack_trace.is_empty());
                let Some(encoded) = a.encoded_attributes.as_ref() else {
                    return Err(TestCaseError::fail("text left without encoded attributes"));
                };
                let attrs = unwrap_payload(encoded);
                prop_assert_eq!(attrs.metadata.get(FAILURE_MARKER_KEY).map(Vec::as_slice), Some(&b"1"[..]));
            } else if b.encoded_attributes.is_none() {
                prop_assert!(a.message.is_empty() && a.stack_trace.is_empty());
                prop_assert!(a.encoded_attributes.is_none());
            }
            before = b.cause.map(|c| *c);
            after = a.cause.map(|c| *c);
        }
        prop_assert!(after.is_none(), "the sealed cause chain is longer");
        let decoded = rewrite_with(index(), &message, &encoded, &mut unwrapper, &WalkOptions::with_failures(FailureMode::Decode))
            .unwrap()
            .unwrap_or_else(|| encoded.clone());
        prop_assert_eq!(RespondActivityTaskFailedRequest::decode(decoded.as_slice()).unwrap(), original);
        prop_assert_eq!(decoded, input);
    }
}

// ---------------------------------------------------------------------------------------------

fn payload_of(data: &[u8]) -> Payload {
    Payload {
        data: data.to_vec(),
        ..Default::default()
    }
}

fn payload_bytes(data: &[u8]) -> Vec<u8> {
    Payload {
        metadata: [("encoding".to_string(), b"binary/plain".to_vec())].into(),
        data: data.to_vec(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// (a) Unknown fields next to and around payloads survive verbatim, in place.
#[test]
fn unknown_fields_are_kept_verbatim() {
    // Payloads { unknown varint 7, payload, unknown group 9, payload } inside field input (5),
    // between unknown fields of the request (999: bytes, 1000: fixed32).
    let mut inner = vec![7 << 3, 0x96, 0x01];
    wire::put_len_field(&mut inner, 1, &payload_bytes(b"one"));
    inner.extend_from_slice(&[(9 << 3) | 3, 1 << 3, 5, (9 << 3) | 4]);
    wire::put_len_field(&mut inner, 1, &payload_bytes(b"two"));
    let mut msg = Vec::new();
    wire::put_len_field(&mut msg, 1, b"ns1");
    wire::put_len_field(&mut msg, 999, b"from a newer client");
    wire::put_len_field(&mut msg, 5, &inner);
    msg.extend_from_slice(&[0xc5, 0x3e, 1, 2, 3, 4]); // field 1000, fixed32

    let (out, paths) = rewrite_wrapped(&ws("StartWorkflowExecutionRequest"), &msg);
    assert_eq!(
        paths,
        vec![
            format!("{WS}StartWorkflowExecutionRequest.input.payloads"),
            format!("{WS}StartWorkflowExecutionRequest.input.payloads"),
        ]
    );
    let wrapped =
        |d: &[u8]| wrap(&Payload::decode(payload_bytes(d).as_slice()).unwrap()).encode_to_vec();
    let mut inner = vec![7 << 3, 0x96, 0x01];
    wire::put_len_field(&mut inner, 1, &wrapped(b"one"));
    inner.extend_from_slice(&[(9 << 3) | 3, 1 << 3, 5, (9 << 3) | 4]);
    wire::put_len_field(&mut inner, 1, &wrapped(b"two"));
    let mut expected = Vec::new();
    wire::put_len_field(&mut expected, 1, b"ns1");
    wire::put_len_field(&mut expected, 999, b"from a newer client");
    wire::put_len_field(&mut expected, 5, &inner);
    expected.extend_from_slice(&[0xc5, 0x3e, 1, 2, 3, 4]);
    assert_eq!(out, expected);
}

/// Untouched fields keep even a non-minimal encoding; only changed lengths are re-encoded.
#[test]
fn untouched_bytes_keep_their_encoding() {
    let mut msg = Vec::new();
    // workflow_id (2) with a two-byte length prefix for 3 bytes.
    msg.extend_from_slice(&[2 << 3 | 2, 0x83, 0x00, b'w', b'i', b'd']);
    let mut input = Vec::new();
    wire::put_len_field(&mut input, 1, &payload_bytes(b"x"));
    wire::put_len_field(&mut msg, 5, &input);
    let (out, _) = rewrite_wrapped(&ws("StartWorkflowExecutionRequest"), &msg);
    assert_eq!(&out[..6], &msg[..6]);
}

#[test]
fn collect_pass_sees_every_payload_and_changes_nothing() {
    let p = StartParams {
        workflow_id: "w".into(),
        input: vec![Payload::default(); 2],
        memo: vec![("m".into(), payload_of(b"m"))],
        header: vec![],
        search: vec![("s".into(), payload_of(b"s"))],
        summary: None,
    };
    let bytes = build_start(&p, &|x| x.clone()).encode_to_vec();
    let mut seen = Vec::new();
    visit_payloads(
        index(),
        &ws("StartWorkflowExecutionRequest"),
        &bytes,
        |ctx, _| {
            seen.push(ctx.field_name().unwrap_or_default().to_string());
            Ok(())
        },
    )
    .unwrap();
    seen.sort();
    assert_eq!(seen, vec!["payloads", "payloads", "value"]);
}

/// (e) A Failure whose attributes the client encoded itself is left as it was on the way back
/// (only its payload opened); one without message and stack trace is not encoded.
#[test]
fn client_encoded_failures_are_not_touched() {
    let client_attrs = Payload {
        metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
        data: br#"{"message":"secret"}"#.to_vec(),
        ..Default::default()
    };
    let original = Failure {
        message: ENCODED_FAILURE_MESSAGE.into(),
        encoded_attributes: Some(client_attrs.clone()),
        cause: Some(Box::new(Failure {
            source: "x".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let failure = desc("temporal.api.failure.v1.Failure");
    let input = original.encode_to_vec();
    let encoded = rewrite_with(
        index(),
        &failure,
        &input,
        &mut Wrapper::default(),
        &WalkOptions::with_failures(FailureMode::Encode),
    )
    .unwrap()
    .unwrap();
    let sealed = Failure::decode(encoded.as_slice()).unwrap();
    assert_eq!(sealed.encoded_attributes, Some(wrap(&client_attrs)));
    assert_eq!(sealed.cause, original.cause);
    let decoded = rewrite_with(
        index(),
        &failure,
        &encoded,
        &mut unwrapper,
        &WalkOptions::with_failures(FailureMode::Decode),
    )
    .unwrap()
    .unwrap();
    assert_eq!(decoded, input);
    // A marker in plaintext that the visitor did not open is not trusted.
    let forged = Failure {
        message: ENCODED_FAILURE_MESSAGE.into(),
        encoded_attributes: Some(Payload {
            metadata: [(FAILURE_MARKER_KEY.to_string(), b"1".to_vec())].into(),
            data: br#"{"message":"forged"}"#.to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let out = rewrite_with(
        index(),
        &failure,
        &forged,
        &mut identity,
        &WalkOptions::with_failures(FailureMode::Decode),
    )
    .unwrap();
    assert_eq!(out, None);
}

/// (f) Payloads in gRPC error details (QueryFailedFailure in google.rpc.Status) are rewritten.
#[test]
fn status_details_are_rewritten() {
    let failure = |f: F<'_>| Failure {
        message: "query failed".into(),
        stack_trace: "at query()".into(),
        failure_info: Some(FailureInfo::ApplicationFailureInfo(
            ApplicationFailureInfo {
                details: payloads(
                    &[Payload {
                        data: b"why".to_vec(),
                        ..Default::default()
                    }],
                    f,
                ),
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    let status = |f: F<'_>| Status {
        code: 3,
        message: "query failed".into(),
        details: vec![prost_wkt_types::Any {
            type_url: "type.googleapis.com/temporal.api.errordetails.v1.QueryFailedFailure".into(),
            value: QueryFailedFailure {
                failure: Some(failure(f)),
            }
            .encode_to_vec(),
        }],
    };
    let input = status(&|x| x.clone()).encode_to_vec();
    let mut wrapper = Wrapper::default();
    let out = rewrite_status_details(index(), &input, &mut wrapper)
        .unwrap()
        .unwrap();
    assert_eq!(out, status(&wrap).encode_to_vec());
    assert_eq!(
        wrapper.paths,
        vec!["google.rpc.Status.details<temporal.api.errordetails.v1.QueryFailedFailure>.failure.application_failure_info.details.payloads"]
    );
    // Decode mode on the way out also works through the Any.
    let out = rewrite_status_details_with(
        index(),
        &input,
        &mut identity,
        &WalkOptions::with_failures(FailureMode::Decode),
    )
    .unwrap();
    assert_eq!(out, None);
}

#[test]
fn raw_history_proto3_is_walked_and_other_encodings_refused() {
    let events = [EventParams::Signaled {
        input: vec![Payload {
            data: b"s".to_vec(),
            ..Default::default()
        }],
    }];
    let response = |encoding: i32, f: F<'_>| GetWorkflowExecutionHistoryResponse {
        raw_history: vec![DataBlob {
            encoding_type: encoding,
            data: build_history(&events, f).encode_to_vec(),
        }],
        ..Default::default()
    };
    let message = ws("GetWorkflowExecutionHistoryResponse");
    let (out, paths) = rewrite_wrapped(&message, &response(1, &|x| x.clone()).encode_to_vec());
    assert_eq!(out, response(1, &wrap).encode_to_vec());
    assert_eq!(paths, vec![format!("{WS}GetWorkflowExecutionHistoryResponse.raw_history.data<History>.events.workflow_execution_signaled_event_attributes.input.payloads")]);
    for encoding in [0, 2] {
        let err = rewrite(
            index(),
            &message,
            &response(encoding, &|x| x.clone()).encode_to_vec(),
            &mut identity,
        )
        .unwrap_err();
        assert!(matches!(err, WalkError::Unsupported { .. }), "{err}");
    }
    // An empty blob is fine in any encoding.
    let empty = GetWorkflowExecutionHistoryResponse {
        raw_history: vec![DataBlob {
            encoding_type: 2,
            data: vec![],
        }],
        ..Default::default()
    };
    assert_eq!(
        rewrite(index(), &message, &empty.encode_to_vec(), &mut identity).unwrap(),
        None
    );
}

const SWS: &str = "temporal.api.workflowservice.v1.SignalWithStartWorkflowExecutionRequest";

/// A system Nexus envelope (as the Python SDK 1.35 writes it) around `inner`.
fn system_envelope(inner: &[u8], metadata: &[(&str, &str)]) -> Payload {
    Payload {
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        data: inner.to_vec(),
        ..Default::default()
    }
}

const ENVELOPE_METADATA: &[(&str, &str)] = &[
    ("__temporal_system_payload", "true"),
    ("encoding", "binary/protobuf"),
    ("messageType", SWS),
];

fn signal_with_start(namespace: &str) -> SignalWithStartWorkflowExecutionRequest {
    let p = |text: &str| Payload {
        metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
        data: format!("\"{text}\"").into_bytes(),
        ..Default::default()
    };
    SignalWithStartWorkflowExecutionRequest {
        namespace: namespace.into(),
        workflow_id: "target".into(),
        input: Some(Payloads {
            payloads: vec![p("input")],
        }),
        signal_name: "poke".into(),
        signal_input: Some(Payloads {
            payloads: vec![p("signal")],
        }),
        memo: Some(Memo {
            fields: [("m".to_string(), p("memo"))].into(),
        }),
        header: Some(Header {
            fields: [("h".to_string(), p("header"))].into(),
        }),
        search_attributes: Some(SearchAttributes {
            indexed_fields: [("sa".to_string(), p("search"))].into(),
        }),
        ..Default::default()
    }
}

fn schedule_nexus(
    endpoint: &str,
    operation: &str,
    input: Payload,
) -> RespondWorkflowTaskCompletedRequest {
    RespondWorkflowTaskCompletedRequest {
        namespace: "alpha".into(),
        commands: vec![Command {
            attributes: Some(
                command::Attributes::ScheduleNexusOperationCommandAttributes(
                    ScheduleNexusOperationCommandAttributes {
                        endpoint: endpoint.into(),
                        service: "temporal.api.workflowservice.v1.WorkflowService".into(),
                        operation: operation.into(),
                        input: Some(input),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Where the walker found each payload: its path and the namespace it belongs to.
type Seen = Vec<(String, Option<String>)>;

/// Every payload's path and namespace, each wrapped.
fn walk_recording(
    message: &str,
    input: &[u8],
    options: &WalkOptions,
) -> Result<(Option<Vec<u8>>, Seen), WalkError> {
    let mut seen = Vec::new();
    let mut visitor = |ctx: &PayloadContext<'_>, payload: &[u8]| {
        seen.push((ctx.to_string(), ctx.namespace().map(str::to_string)));
        let p = Payload::decode(payload).map_err(bad)?;
        Ok(Some(wrap(&p).encode_to_vec()))
    };
    let out = rewrite_named(index(), message, input, &mut visitor, options)?;
    Ok((out, seen))
}

/// The system Nexus endpoint's input is an envelope the server reads: it stays as it is, and
/// only the payloads of the request inside it are visited, in the namespace that request names.
#[test]
fn system_nexus_envelopes_are_walked_inside() {
    const COMPLETED: &str = "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest";
    const OPERATION: &str = "SignalWithStartWorkflowExecution";
    let inner = signal_with_start("beta");
    let request = schedule_nexus(
        "__temporal_system",
        OPERATION,
        system_envelope(&inner.encode_to_vec(), ENVELOPE_METADATA),
    );
    let (out, seen) = walk_recording(
        COMPLETED,
        &request.encode_to_vec(),
        &WalkOptions::default().request(),
    )
    .expect("an envelope is walked");
    let paths: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
    let envelope_path = format!(
        "{COMPLETED}.commands.schedule_nexus_operation_command_attributes.input.data<{SWS}>"
    );
    for field in [
        "input.payloads",
        "signal_input.payloads",
        "memo.fields.value",
        "header.fields.value",
    ] {
        assert!(
            paths.contains(&format!("{envelope_path}.{field}").as_str()),
            "{field} in {paths:?}"
        );
    }
    assert_eq!(seen.len(), 4, "search attributes stay plaintext: {paths:?}");
    assert!(
        seen.iter().all(|(_, ns)| ns.as_deref() == Some("beta")),
        "{seen:?}"
    );
    // The envelope is untouched but for its data, whose payloads are wrapped.
    let out =
        RespondWorkflowTaskCompletedRequest::decode(out.expect("changed").as_slice()).unwrap();
    let Some(command::Attributes::ScheduleNexusOperationCommandAttributes(attributes)) =
        &out.commands[0].attributes
    else {
        panic!("the command survives");
    };
    let envelope = attributes.input.as_ref().expect("input");
    assert_eq!(envelope.metadata.len(), 3);
    assert_eq!(envelope.metadata["__temporal_system_payload"], b"true");
    let walked = SignalWithStartWorkflowExecutionRequest::decode(envelope.data.as_slice()).unwrap();
    let mut expected = inner.clone();
    for payloads in [&mut expected.input, &mut expected.signal_input] {
        let p = payloads.as_mut().unwrap();
        p.payloads = p.payloads.iter().map(wrap).collect();
    }
    for map in [
        &mut expected.memo.as_mut().unwrap().fields,
        &mut expected.header.as_mut().unwrap().fields,
    ] {
        for value in map.values_mut() {
            *value = wrap(value);
        }
    }
    assert_eq!(walked, expected);
    // An inner request without a namespace is the call's own.
    let own = schedule_nexus(
        "__temporal_system",
        OPERATION,
        system_envelope(&signal_with_start("").encode_to_vec(), ENVELOPE_METADATA),
    );
    let (_, seen) = walk_recording(
        COMPLETED,
        &own.encode_to_vec(),
        &WalkOptions::default().request(),
    )
    .unwrap();
    assert!(seen.iter().all(|(_, ns)| ns.is_none()), "{seen:?}");

    // Requests: anything else at the system endpoint is refused, naming why.
    let inner = signal_with_start("alpha").encode_to_vec();
    let refused = [
        (
            "unmarked",
            system_envelope(&inner, &ENVELOPE_METADATA[1..]),
            OPERATION,
            "not marked",
        ),
        (
            "json",
            system_envelope(
                &inner,
                &[
                    ("__temporal_system_payload", "true"),
                    ("encoding", "json/protobuf"),
                    ("messageType", SWS),
                ],
            ),
            OPERATION,
            "json/protobuf",
        ),
        (
            "another type",
            system_envelope(
                &inner,
                &[
                    ("__temporal_system_payload", "true"),
                    ("encoding", "binary/protobuf"),
                    ("messageType", "temporal.api.common.v1.Payloads"),
                ],
            ),
            OPERATION,
            "messageType",
        ),
        (
            "extra metadata",
            system_envelope(
                &inner,
                &[
                    ("__temporal_system_payload", "true"),
                    ("encoding", "binary/protobuf"),
                    ("messageType", SWS),
                    ("secret", "x"),
                ],
            ),
            OPERATION,
            "secret",
        ),
        (
            "unknown operation",
            system_envelope(&inner, ENVELOPE_METADATA),
            "WaitExternalWorkflowCompletion",
            "does not know how to seal",
        ),
    ];
    for (what, input, operation, reason) in refused {
        let request = schedule_nexus("__temporal_system", operation, input);
        let err = walk_recording(
            COMPLETED,
            &request.encode_to_vec(),
            &WalkOptions::default().request(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, WalkError::Unsupported { reason: r, .. } if r.contains(reason)),
            "{what}: {err}"
        );
    }

    // Any other endpoint: the input is an ordinary payload.
    let plain = schedule_nexus(
        "my-endpoint",
        OPERATION,
        system_envelope(&inner, ENVELOPE_METADATA),
    );
    let (_, seen) = walk_recording(
        COMPLETED,
        &plain.encode_to_vec(),
        &WalkOptions::default().request(),
    )
    .unwrap();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0]
            .0
            .ends_with("schedule_nexus_operation_command_attributes.input"),
        "{seen:?}"
    );

    // Responses: the scheduled event opens inside the envelope; an input that is not one is
    // an ordinary payload there.
    let event = |input: Payload| GetWorkflowExecutionHistoryResponse {
        history: Some(History {
            events: vec![HistoryEvent {
                attributes: Some(Attributes::NexusOperationScheduledEventAttributes(
                    history::NexusOperationScheduledEventAttributes {
                        endpoint: "__temporal_system".into(),
                        service: "temporal.api.workflowservice.v1.WorkflowService".into(),
                        operation: OPERATION.into(),
                        input: Some(input),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }],
        }),
        ..Default::default()
    };
    const HISTORY: &str = "temporal.api.workflowservice.v1.GetWorkflowExecutionHistoryResponse";
    let (_, seen) = walk_recording(
        HISTORY,
        &event(system_envelope(&inner, ENVELOPE_METADATA)).encode_to_vec(),
        &WalkOptions::default(),
    )
    .unwrap();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(seen
        .iter()
        .all(|(p, ns)| p.contains(&format!(".data<{SWS}>")) && ns.as_deref() == Some("alpha")));
    let (_, seen) = walk_recording(
        HISTORY,
        &event(system_envelope(&inner, &ENVELOPE_METADATA[1..])).encode_to_vec(),
        &WalkOptions::default(),
    )
    .unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0]
            .0
            .ends_with("nexus_operation_scheduled_event_attributes.input"),
        "{seen:?}"
    );
}

#[test]
fn nesting_is_limited() {
    let mut failure = Failure {
        encoded_attributes: Some(Payload::default()),
        ..Default::default()
    };
    for _ in 0..150 {
        failure = Failure {
            cause: Some(Box::new(failure)),
            ..Default::default()
        };
    }
    let err = rewrite(
        index(),
        &desc("temporal.api.failure.v1.Failure"),
        &failure.encode_to_vec(),
        &mut identity,
    )
    .unwrap_err();
    assert!(
        matches!(err, WalkError::TooDeep { limit: 100, .. }),
        "{err}"
    );
}

#[test]
fn unknown_message_type_is_an_error() {
    let err = rewrite_named(
        index(),
        "no.such.Message",
        b"",
        &mut identity,
        &WalkOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, WalkError::UnknownMessage(_)));
}

#[test]
fn wrong_wire_type_on_a_payload_field_is_an_error() {
    // input (5) as a varint.
    let msg = [5 << 3, 1];
    let err = rewrite(
        index(),
        &ws("StartWorkflowExecutionRequest"),
        &msg,
        &mut identity,
    )
    .unwrap_err();
    assert!(matches!(err, WalkError::Malformed { .. }), "{err}");
}

/// (g) The WorkflowService methods whose request or response can carry payloads. A schema
/// change that adds or removes one fails here, to be reviewed.
#[test]
fn workflow_service_payload_methods_are_reviewed() {
    let index = index();
    let mut requests = Vec::new();
    let mut responses = Vec::new();
    for m in Schema::global().methods() {
        if m.service != "temporal.api.workflowservice.v1.WorkflowService" {
            continue;
        }
        if index.reaches(m.input.full_name()) == Some(true) {
            requests.push(m.input.name().to_string());
        }
        if index.reaches(m.output.full_name()) == Some(true) {
            responses.push(m.output.name().to_string());
        }
    }
    requests.sort();
    responses.sort();
    println!("requests ({}): {requests:#?}", requests.len());
    println!("responses ({}): {responses:#?}", responses.len());
    for r in [
        "StartWorkflowExecutionRequest",
        "SignalWithStartWorkflowExecutionRequest",
        "RespondWorkflowTaskCompletedRequest",
        "RespondActivityTaskFailedRequest",
        "UpdateWorkflowExecutionRequest",
        "ExecuteMultiOperationRequest",
        "CreateScheduleRequest",
        "QueryWorkflowRequest",
        "RespondQueryTaskCompletedRequest",
        "RespondNexusTaskCompletedRequest",
    ] {
        assert!(requests.iter().any(|x| x == r), "{r}");
    }
    for r in [
        "GetWorkflowExecutionHistoryResponse",
        "PollWorkflowTaskQueueResponse",
        "PollActivityTaskQueueResponse",
        "QueryWorkflowResponse",
        "DescribeWorkflowExecutionResponse",
        "ListWorkflowExecutionsResponse",
        "DescribeScheduleResponse",
        "PollWorkflowExecutionUpdateResponse",
    ] {
        assert!(responses.iter().any(|x| x == r), "{r}");
    }
    assert!(!responses
        .iter()
        .any(|x| x == "CountWorkflowExecutionsResponse"));
    assert_eq!((requests.len(), responses.len()), (28, 31), "snapshot");
}

// ---------------------------------------------------------------------------------------------
// Deferred writes: a visitor that announces the size of each replacement and writes it into the
// output after the walk must produce exactly what an eager visitor produces.

/// Wraps like [`Wrapper`], but defers every payload found in the input. `write` recomputes the
/// replacement from the bytes it is handed and checks them against what `visit` saw, in order.
#[derive(Default)]
struct DeferredWrapper {
    announced: std::collections::VecDeque<Vec<u8>>,
    written: usize,
}

fn wrapped_bytes(payload: &[u8]) -> Result<Vec<u8>, WalkError> {
    let p = Payload::decode(payload).map_err(bad)?;
    Ok(wrap(&p).encode_to_vec())
}

impl portcullis::payload::PayloadVisitor for DeferredWrapper {
    fn payload(
        &mut self,
        _: &PayloadContext<'_>,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, WalkError> {
        wrapped_bytes(payload).map(Some)
    }

    fn visit(&mut self, _: &PayloadContext<'_>, payload: &[u8]) -> Result<Visit, WalkError> {
        let bytes = wrapped_bytes(payload)?;
        let len = bytes.len();
        self.announced.push_back(bytes);
        Ok(Visit::Deferred(len))
    }

    fn write(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), WalkError> {
        let bytes = wrapped_bytes(payload)?;
        assert_eq!(
            self.announced.pop_front().as_ref(),
            Some(&bytes),
            "writes come in the order of the visits, with the same payload"
        );
        self.written += 1;
        out.extend_from_slice(&bytes);
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Deferred output = eager output, byte for byte, for histories, Any bodies and failures
    /// (encoded attributes, which the walker builds itself, go through `payload`).
    #[test]
    fn deferred_writes_equal_eager_replacements(
        events in prop::collection::vec(event_strategy(), 0..10),
        updates in prop::collection::vec(payloads_strategy(), 0..3),
        encode in any::<bool>(),
    ) {
        let options = WalkOptions::with_failures(if encode { FailureMode::Encode } else { FailureMode::Keep });
        for (name, input) in [
            ("GetWorkflowExecutionHistoryResponse", GetWorkflowExecutionHistoryResponse {
                history: Some(build_history(&events, &|x| x.clone())),
                ..Default::default()
            }.encode_to_vec()),
            ("PollWorkflowTaskQueueResponse", build_poll(&events, &updates, &|x| x.clone()).encode_to_vec()),
        ] {
            let message = ws(name);
            let eager = rewrite_with(index(), &message, &input, &mut Wrapper::default(), &options).unwrap();
            let mut deferred = DeferredWrapper::default();
            let out = rewrite_with(index(), &message, &input, &mut deferred, &options).unwrap();
            if encode {
                // The test visitor re-encodes the encoded attributes the walker builds (two
                // metadata entries) through prost, in HashMap order: compare decoded.
                let decode = |bytes: &Option<Vec<u8>>| {
                    bytes.as_deref().map(|b| {
                        let mut m = prost_reflect::DynamicMessage::new(message.clone());
                        m.merge(b).unwrap();
                        m
                    })
                };
                prop_assert_eq!(decode(&out), decode(&eager));
                prop_assert_eq!(out.as_ref().map(Vec::len), eager.as_ref().map(Vec::len));
            } else {
                prop_assert_eq!(&out, &eager);
            }
            prop_assert!(deferred.announced.is_empty(), "every deferred payload was written");
            if let Some(out) = out {
                let plan = plan_named(index(), message.full_name(), &input, &mut DeferredWrapper::default(), &options)
                    .unwrap()
                    .expect("something changes");
                prop_assert_eq!(plan.output_len(), out.len());
                prop_assert_eq!(plan.deferred(), deferred.written);
            }
        }
    }
}

/// A visitor that writes another length than it announced, or cannot write at all, fails the
/// rewrite with an error (never a panic, never a corrupt message).
#[test]
fn deferred_length_mismatch_is_an_error() {
    struct Liar(usize);
    impl portcullis::payload::PayloadVisitor for Liar {
        fn payload(
            &mut self,
            _: &PayloadContext<'_>,
            _: &[u8],
        ) -> Result<Option<Vec<u8>>, WalkError> {
            Ok(None)
        }
        fn visit(&mut self, _: &PayloadContext<'_>, p: &[u8]) -> Result<Visit, WalkError> {
            Ok(Visit::Deferred(p.len() + self.0))
        }
        fn write(&mut self, p: &[u8], out: &mut Vec<u8>) -> Result<(), WalkError> {
            out.extend_from_slice(p);
            Ok(())
        }
    }
    struct NoWriter;
    impl portcullis::payload::PayloadVisitor for NoWriter {
        fn payload(
            &mut self,
            _: &PayloadContext<'_>,
            _: &[u8],
        ) -> Result<Option<Vec<u8>>, WalkError> {
            Ok(None)
        }
        fn visit(&mut self, _: &PayloadContext<'_>, p: &[u8]) -> Result<Visit, WalkError> {
            Ok(Visit::Deferred(p.len()))
        }
    }
    let request = StartWorkflowExecutionRequest {
        namespace: "ns1".into(),
        input: Some(Payloads {
            payloads: vec![payload_of(b"a"), payload_of(b"bb")],
        }),
        ..Default::default()
    };
    let input = request.encode_to_vec();
    let message = ws("StartWorkflowExecutionRequest");
    for extra in [1, 200] {
        let err = rewrite(index(), &message, &input, &mut Liar(extra)).unwrap_err();
        assert!(matches!(err, WalkError::Internal(_)), "{err}");
    }
    // Announcing the same length and writing it is fine (and changes nothing).
    assert_eq!(
        rewrite(index(), &message, &input, &mut Liar(0)).unwrap(),
        Some(input.clone())
    );
    let err = rewrite(index(), &message, &input, &mut NoWriter).unwrap_err();
    assert!(matches!(err, WalkError::Internal(_)), "{err}");
    // A plan only applies to the input it was computed from.
    let plan = plan_named(
        index(),
        message.full_name(),
        &input,
        &mut Wrapper::default(),
        &WalkOptions::default(),
    )
    .unwrap()
    .unwrap();
    let mut longer = input.clone();
    longer.push(0);
    assert!(matches!(
        plan.apply(&longer, &mut Wrapper::default()),
        Err(WalkError::Internal(_))
    ));
    assert_eq!(plan.deferred(), 0);
}

/// `is_failure_attributes` marks exactly a Failure's `encoded_attributes`, wherever it sits.
#[test]
fn failure_attributes_are_flagged() {
    let failure = Failure {
        message: "m".into(),
        encoded_attributes: Some(payload_of(b"attrs")),
        failure_info: Some(FailureInfo::ApplicationFailureInfo(
            ApplicationFailureInfo {
                details: Some(Payloads {
                    payloads: vec![payload_of(b"details")],
                }),
                ..Default::default()
            },
        )),
        cause: Some(Box::new(Failure {
            encoded_attributes: Some(payload_of(b"cause-attrs")),
            ..Default::default()
        })),
        ..Default::default()
    };
    let request = RespondActivityTaskFailedRequest {
        namespace: "ns1".into(),
        failure: Some(failure),
        last_heartbeat_details: Some(Payloads {
            payloads: vec![payload_of(b"heartbeat")],
        }),
        ..Default::default()
    };
    let mut seen = Vec::new();
    visit_payloads(
        index(),
        &ws("RespondActivityTaskFailedRequest"),
        &request.encode_to_vec(),
        |ctx, p| {
            let data = Payload::decode(p).map_err(bad)?.data;
            seen.push((
                String::from_utf8(data).unwrap(),
                ctx.is_failure_attributes(),
            ));
            Ok(())
        },
    )
    .unwrap();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("attrs".to_string(), true),
            ("cause-attrs".to_string(), true),
            ("details".to_string(), false),
            ("heartbeat".to_string(), false),
        ]
    );
}
