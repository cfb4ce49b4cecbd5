//! Sealing and opening every payload of a whole message: the payload walker driven by a data
//! key. This is what the proxy's encryption stage runs on each request and response.
//!
//! Both directions write each payload straight into the output buffer, which the walk has
//! already sized exactly: a payload's plaintext is copied once (into place, then encrypted or
//! decrypted there) and no buffer is allocated per payload.
//!
//! - Sealing is one walk. Nonces come from [`Nonces`], one `getrandom` per batch.
//! - Opening needs the data keys before it can decrypt, and fetching them is async, so it is
//!   split: [`plan_open`] walks once, collecting the distinct keys and planning the output;
//!   after the caller resolved the keys, [`OpenPlan::open`] writes the output without walking
//!   again. Two cases walk a second time (as everything did before): a sealed Failure
//!   `encoded_attributes` when failure attributes are decoded (the walker must read what it
//!   opens to restore message and stack trace), and the `pass-through` open-failure policy
//!   (a payload that does not open must then stay as it is, which is only known once tried).

use std::collections::HashSet;

use super::envelope::{self, EnvelopeRef, Nonces};
use super::error::CryptoError;
use super::manager::{OpeningKeys, SealingKey};
use crate::payload::walker::{
    self, FailureMode, PayloadContext, PayloadIndex, PayloadVisitor, RewritePlan, Visit, WalkError,
    WalkLimits, WalkOptions,
};

/// Seals every payload of `message` (a serialized `message_type`) under `key`. With
/// [`FailureMode::Encode`], Failure messages and stack traces are moved into sealed
/// `encoded_attributes` first. `None`: nothing to seal. A message that sealing would push past
/// `limits` is refused during the walk, before its output is allocated.
pub fn seal_message(
    index: &PayloadIndex,
    message_type: &str,
    message: &[u8],
    key: &SealingKey,
    failures: FailureMode,
    limits: WalkLimits,
) -> Result<Option<Vec<u8>>, WalkError> {
    let mut sealing = Sealing {
        key,
        nonces: Nonces::new(),
    };
    walker::rewrite_named(
        index,
        message_type,
        message,
        &mut sealing,
        &WalkOptions::with_failures(failures).limited(limits),
    )
}

struct Sealing<'k> {
    key: &'k SealingKey,
    nonces: Nonces,
}

impl PayloadVisitor for Sealing<'_> {
    /// Payloads the walker builds (encoded failure attributes) are sealed on the spot.
    fn payload(
        &mut self,
        _: &PayloadContext<'_>,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, WalkError> {
        self.key.seal(payload).map(Some).map_err(WalkError::visitor)
    }

    fn visit(&mut self, _: &PayloadContext<'_>, payload: &[u8]) -> Result<Visit, WalkError> {
        Ok(Visit::Deferred(self.key.sealed_len(payload.len())))
    }

    fn write(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), WalkError> {
        self.key
            .seal_into(payload, &mut self.nonces, out)
            .map_err(WalkError::visitor)
    }
}

/// How to open a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenOptions {
    /// Restore Failure message and stack trace from sealed `encoded_attributes` that the proxy
    /// encoded ([`FailureMode::Decode`]).
    pub decode_failures: bool,
    /// A sealed payload that cannot be opened (malformed, or its key will not unwrap) is left
    /// as it is instead of failing the call.
    pub pass_through: bool,
    pub limits: WalkLimits,
}

/// The first half of opening a message: the data keys it needs, and (usually) its output,
/// planned.
#[derive(Debug)]
pub struct OpenPlan {
    refs: Vec<EnvelopeRef>,
    /// `None` when the second half must walk again (see the module comment), or when nothing
    /// is sealed.
    plan: Option<RewritePlan>,
    rewalk: bool,
    options: OpenOptions,
}

/// Walks `message` once: finds the sealed payloads, the distinct data keys they need, and
/// where each opened payload goes. A payload marked as sealed by portcullis that is not a
/// readable envelope fails the walk (unless `pass_through`).
pub fn plan_open(
    index: &PayloadIndex,
    message_type: &str,
    message: &[u8],
    options: OpenOptions,
) -> Result<OpenPlan, WalkError> {
    let mut collect = Collect {
        refs: Vec::new(),
        seen: HashSet::new(),
        pass_through: options.pass_through,
        sealed_failure_attributes: false,
    };
    // Failure attributes are not decoded in this walk: it cannot read what it does not open.
    let plan = walker::plan_named(
        index,
        message_type,
        message,
        &mut collect,
        &WalkOptions::default().limited(options.limits),
    )?;
    let rewalk =
        options.pass_through || (options.decode_failures && collect.sealed_failure_attributes);
    Ok(OpenPlan {
        refs: collect.refs,
        plan: if rewalk { None } else { plan },
        rewalk,
        options,
    })
}

impl OpenPlan {
    /// The data keys to resolve (each once) before [`OpenPlan::open`]. Empty: nothing in the
    /// message is sealed by portcullis.
    pub fn refs(&self) -> &[EnvelopeRef] {
        &self.refs
    }

    /// Whether [`OpenPlan::open`] will walk the message again.
    pub fn rewalks(&self) -> bool {
        self.rewalk
    }

    /// Opens every sealed payload of `message` (the same bytes [`plan_open`] walked) with
    /// `keys`. `None`: nothing changed.
    pub fn open(
        &self,
        index: &PayloadIndex,
        message_type: &str,
        message: &[u8],
        keys: &OpeningKeys,
    ) -> Result<Option<Vec<u8>>, WalkError> {
        if self.refs.is_empty() {
            return Ok(None);
        }
        let mut opening = Opening {
            keys,
            pass_through: self.options.pass_through,
        };
        if self.rewalk {
            let failures = if self.options.decode_failures {
                FailureMode::Decode
            } else {
                FailureMode::Keep
            };
            return walker::rewrite_named(
                index,
                message_type,
                message,
                &mut opening,
                &WalkOptions::with_failures(failures).limited(self.options.limits),
            );
        }
        match &self.plan {
            Some(plan) => plan.apply(message, &mut opening).map(Some),
            None => Ok(None),
        }
    }
}

/// The first walk of opening: records each distinct data key once, and defers every sealed
/// payload to the second half.
struct Collect {
    refs: Vec<EnvelopeRef>,
    /// Wrapped keys already in `refs`: a page of thousands of payloads usually needs one key,
    /// and hashing and allocating per payload would cost more than finding them.
    seen: HashSet<Vec<u8>>,
    pass_through: bool,
    sealed_failure_attributes: bool,
}

impl PayloadVisitor for Collect {
    fn payload(
        &mut self,
        ctx: &PayloadContext<'_>,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, WalkError> {
        self.visit(ctx, payload).map(|_| None)
    }

    fn visit(&mut self, ctx: &PayloadContext<'_>, payload: &[u8]) -> Result<Visit, WalkError> {
        let view = match envelope::parse(payload) {
            Ok(Some(view)) => view,
            Ok(None) => return Ok(Visit::Keep),
            Err(_) if self.pass_through => return Ok(Visit::Keep),
            Err(e) => return Err(WalkError::visitor(e)),
        };
        let last = self.refs.last().map(|r| r.wrapped_data_key.as_slice());
        if last != Some(view.wrapped()) && !self.seen.contains(view.wrapped()) {
            self.seen.insert(view.wrapped().to_vec());
            self.refs.push(view.envelope_ref());
        }
        self.sealed_failure_attributes |= ctx.is_failure_attributes();
        Ok(if self.pass_through {
            // Opened (or not) by the second walk.
            Visit::Keep
        } else {
            Visit::Deferred(view.opened_len())
        })
    }
}

/// The second half of opening, with the resolved keys.
struct Opening<'k> {
    keys: &'k OpeningKeys,
    pass_through: bool,
}

impl PayloadVisitor for Opening<'_> {
    fn payload(
        &mut self,
        _: &PayloadContext<'_>,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, WalkError> {
        match self.keys.open_if_sealed(payload) {
            Ok(opened) => Ok(opened),
            Err(CryptoError::CannotOpen { .. } | CryptoError::MalformedEnvelope(_))
                if self.pass_through =>
            {
                Ok(None)
            }
            Err(e) => Err(WalkError::visitor(e)),
        }
    }

    fn write(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), WalkError> {
        self.keys
            .open_into(payload, out)
            .map_err(WalkError::visitor)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prost::Message;
    use temporalio_protos::temporal::api::common::v1::{ActivityType, Payload, Payloads};
    use temporalio_protos::temporal::api::failure::v1::Failure;
    use temporalio_protos::temporal::api::history::v1::{
        self as history, history_event::Attributes, History, HistoryEvent,
    };
    use temporalio_protos::temporal::api::workflowservice::v1::GetWorkflowExecutionHistoryResponse;

    use super::*;
    use crate::crypto::proto::Envelope;
    use crate::crypto::{DataKeyManager, DataKeyPolicy, Keyring, LocalKeyProvider, OpenFailure};

    const PAGE: &str = "temporal.api.workflowservice.v1.GetWorkflowExecutionHistoryResponse";
    const SECRET: &str = "secret-marker";

    fn payloads(data: &str) -> Option<Payloads> {
        Some(Payloads {
            payloads: vec![Payload {
                metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
                data: format!("\"{SECRET} {data}\"").into_bytes(),
                ..Default::default()
            }],
        })
    }

    fn event(id: i64, attributes: Attributes) -> HistoryEvent {
        HistoryEvent {
            event_id: id,
            attributes: Some(attributes),
            ..Default::default()
        }
    }

    /// A history page; with `failure`, one activity failed with a message and stack trace.
    fn page(failure: bool) -> Vec<u8> {
        let mut events = Vec::new();
        for round in 0..20 {
            events.push(event(
                round * 2 + 1,
                Attributes::ActivityTaskScheduledEventAttributes(
                    history::ActivityTaskScheduledEventAttributes {
                        activity_id: round.to_string(),
                        activity_type: Some(ActivityType {
                            name: "charge".into(),
                        }),
                        input: payloads(&format!("input {round}")),
                        ..Default::default()
                    },
                ),
            ));
            events.push(event(
                round * 2 + 2,
                Attributes::ActivityTaskCompletedEventAttributes(
                    history::ActivityTaskCompletedEventAttributes {
                        result: payloads(&format!("result {round}")),
                        ..Default::default()
                    },
                ),
            ));
        }
        if failure {
            events.push(event(
                100,
                Attributes::ActivityTaskFailedEventAttributes(
                    history::ActivityTaskFailedEventAttributes {
                        failure: Some(Failure {
                            message: format!("{SECRET} failed"),
                            stack_trace: format!("{SECRET} at line 1"),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ),
            ));
        }
        GetWorkflowExecutionHistoryResponse {
            history: Some(History { events }),
            next_page_token: b"next".to_vec(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    fn manager() -> DataKeyManager {
        DataKeyManager::new(
            Arc::new(LocalKeyProvider::new(&Keyring::generate())),
            DataKeyPolicy::default(),
        )
        .unwrap()
    }

    fn index() -> &'static PayloadIndex {
        PayloadIndex::global()
    }

    const STRICT: OpenOptions = OpenOptions {
        decode_failures: true,
        pass_through: false,
        limits: WalkLimits {
            max_payloads: crate::payload::walker::DEFAULT_MAX_PAYLOADS,
            max_output: usize::MAX,
        },
    };

    async fn open(
        manager: &DataKeyManager,
        message: &[u8],
        options: OpenOptions,
    ) -> Result<(Option<Vec<u8>>, bool), WalkError> {
        let plan = plan_open(index(), PAGE, message, options)?;
        let keys = manager
            .opening_keys("ns", plan.refs().iter().cloned())
            .await
            .map_err(WalkError::visitor)?;
        Ok((plan.open(index(), PAGE, message, &keys)?, plan.rewalks()))
    }

    /// Every sealed payload decodes (prost) as a Payload whose data is a v1 Envelope.
    fn assert_sealed_with_prost(sealed: &[u8]) -> usize {
        let mut count = 0;
        let message = crate::schema::Schema::global().message(PAGE).unwrap();
        walker::visit_payloads(index(), &message, sealed, |_, p| {
            let payload = Payload::decode(p).unwrap();
            assert_eq!(payload.metadata["encoding"], b"binary/encrypted");
            assert_eq!(payload.metadata["portcullis-envelope"], b"v1");
            let envelope = Envelope::decode(payload.data.as_slice()).unwrap();
            assert_eq!(envelope.version, 1);
            assert_eq!(envelope.nonce.len(), 12);
            // The hand-written encoding is the one prost writes.
            assert_eq!(envelope.encode_to_vec(), payload.data);
            count += 1;
            Ok(())
        })
        .unwrap();
        count
    }

    /// A QueryWorkflow request whose `query_args` holds `count` empty payloads: 2 bytes each on
    /// the wire, an envelope of ~150 bytes each once sealed.
    fn empty_payload_query(count: usize) -> Vec<u8> {
        use temporalio_protos::temporal::api::query::v1::WorkflowQuery;
        use temporalio_protos::temporal::api::workflowservice::v1::QueryWorkflowRequest;
        QueryWorkflowRequest {
            namespace: "ns".into(),
            query: Some(WorkflowQuery {
                query_type: "q".into(),
                query_args: Some(Payloads {
                    payloads: vec![Payload::default(); count],
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    const QUERY: &str = "temporal.api.workflowservice.v1.QueryWorkflowRequest";

    #[tokio::test]
    async fn sealing_stops_as_soon_as_the_output_would_pass_the_limit() {
        let manager = manager();
        let key = manager.sealing_key("ns").await.unwrap();
        let message = empty_payload_query(200_000);
        let limits = WalkLimits {
            max_payloads: 1_000_000,
            max_output: 4 << 20,
        };
        let err =
            seal_message(index(), QUERY, &message, &key, FailureMode::Keep, limits).unwrap_err();
        let WalkError::OutputTooLarge { size, limit } = err else {
            panic!("{err}");
        };
        assert_eq!(limit, 4 << 20);
        // Refused on the first payload past the limit, not after sealing the rest.
        assert!(size <= limit + 1024, "{size}");
        // Nothing was sealed: the sizes come from the plan.
        assert_eq!(manager.metrics().snapshot().seals, 0);

        // Within the limit the same kind of message seals.
        let small = empty_payload_query(100);
        assert!(
            seal_message(index(), QUERY, &small, &key, FailureMode::Keep, limits)
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn too_many_payloads_are_refused_in_both_directions() {
        let manager = manager();
        let key = manager.sealing_key("ns").await.unwrap();
        let limits = WalkLimits {
            max_payloads: 1000,
            max_output: usize::MAX,
        };
        let at_limit = empty_payload_query(1000);
        let sealed = seal_message(index(), QUERY, &at_limit, &key, FailureMode::Keep, limits)
            .unwrap()
            .unwrap();
        let over = empty_payload_query(1001);
        let err = seal_message(index(), QUERY, &over, &key, FailureMode::Keep, limits).unwrap_err();
        assert!(
            matches!(err, WalkError::TooManyPayloads { limit: 1000 }),
            "{err}"
        );

        let options = |max_payloads| OpenOptions {
            decode_failures: false,
            pass_through: false,
            limits: WalkLimits {
                max_payloads,
                max_output: usize::MAX,
            },
        };
        assert!(plan_open(index(), QUERY, &sealed, options(1000)).is_ok());
        let err = plan_open(index(), QUERY, &sealed, options(999)).unwrap_err();
        assert!(
            matches!(err, WalkError::TooManyPayloads { limit: 999 }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_page_seals_and_opens_in_one_walk_each() {
        let manager = manager();
        let key = manager.sealing_key("ns").await.unwrap();
        let original = page(false);
        let sealed = seal_message(
            index(),
            PAGE,
            &original,
            &key,
            FailureMode::Encode,
            WalkLimits::default(),
        )
        .unwrap()
        .unwrap();
        assert!(!contains(&sealed, SECRET));
        assert_eq!(assert_sealed_with_prost(&sealed), 40);
        assert_eq!(manager.metrics().snapshot().seals, 40);

        let plan = plan_open(index(), PAGE, &sealed, STRICT).unwrap();
        assert_eq!(plan.refs().len(), 1, "one data key, listed once");
        let (opened, rewalked) = open(&manager, &sealed, STRICT).await.unwrap();
        assert!(!rewalked);
        assert_eq!(opened.unwrap(), original);

        // Nothing sealed: nothing to do.
        let plan = plan_open(index(), PAGE, &original, STRICT).unwrap();
        assert!(plan.refs().is_empty());
    }

    #[tokio::test]
    async fn sealed_failure_attributes_are_restored_by_a_second_walk() {
        let manager = manager();
        let key = manager.sealing_key("ns").await.unwrap();
        let original = page(true);
        let sealed = seal_message(
            index(),
            PAGE,
            &original,
            &key,
            FailureMode::Encode,
            WalkLimits::default(),
        )
        .unwrap()
        .unwrap();
        assert!(!contains(&sealed, SECRET));
        assert_eq!(assert_sealed_with_prost(&sealed), 41);
        let (opened, rewalked) = open(&manager, &sealed, STRICT).await.unwrap();
        assert!(rewalked);
        assert_eq!(opened.unwrap(), original);

        // Not decoding failures: opened in one walk, the attributes stay encoded (in plaintext).
        let keep = OpenOptions {
            decode_failures: false,
            pass_through: false,
            limits: WalkLimits::default(),
        };
        let (opened, rewalked) = open(&manager, &sealed, keep).await.unwrap();
        assert!(!rewalked);
        let opened = opened.unwrap();
        assert_ne!(opened, original);
        assert!(contains(&opened, "Encoded failure"));
        assert!(contains(&opened, &format!("{SECRET} failed")));
    }

    /// Data sealed payload by payload (the earlier way, one Vec each) opens the new way, and
    /// the new output opens the earlier way.
    #[tokio::test]
    async fn earlier_sealed_data_opens_and_new_data_opens_the_earlier_way() {
        let manager = manager();
        let key = manager.sealing_key("ns").await.unwrap();
        let original = page(false);
        let mut seal_each =
            |_: &PayloadContext<'_>, p: &[u8]| key.seal(p).map(Some).map_err(WalkError::visitor);
        let sealed_each = walker::rewrite_named(
            index(),
            PAGE,
            &original,
            &mut seal_each,
            &WalkOptions::default(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            open(&manager, &sealed_each, STRICT)
                .await
                .unwrap()
                .0
                .unwrap(),
            original
        );

        let sealed = seal_message(
            index(),
            PAGE,
            &original,
            &key,
            FailureMode::Keep,
            WalkLimits::default(),
        )
        .unwrap()
        .unwrap();
        let plan = plan_open(index(), PAGE, &sealed, STRICT).unwrap();
        let keys = manager
            .opening_keys("ns", plan.refs().iter().cloned())
            .await
            .unwrap();
        let mut open_each =
            |_: &PayloadContext<'_>, p: &[u8]| keys.open_if_sealed(p).map_err(WalkError::visitor);
        let opened = walker::rewrite_named(
            index(),
            PAGE,
            &sealed,
            &mut open_each,
            &WalkOptions::default(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(opened, original);
    }

    /// A tampered payload fails the call (strict) or stays sealed (pass-through) while the
    /// others open; nothing unauthenticated is ever returned.
    #[tokio::test]
    async fn tampered_payloads_fail_or_pass_through() {
        let manager = manager();
        let key = manager.sealing_key("ns").await.unwrap();
        let original = page(false);
        let mut sealed = seal_message(
            index(),
            PAGE,
            &original,
            &key,
            FailureMode::Keep,
            WalkLimits::default(),
        )
        .unwrap()
        .unwrap();
        // The last byte of the page is in the last payload's tag.
        let position = sealed.len() - b"next".len() - 3;
        sealed[position] ^= 1;
        let err = open(&manager, &sealed, STRICT).await.unwrap_err();
        let WalkError::Visitor(inner) = err else {
            panic!("{err}")
        };
        assert!(matches!(
            inner.downcast_ref::<CryptoError>(),
            Some(CryptoError::CannotOpen {
                reason: OpenFailure::Authentication,
                ..
            })
        ));

        let lenient = OpenOptions {
            decode_failures: true,
            pass_through: true,
            limits: WalkLimits::default(),
        };
        let (opened, rewalked) = open(&manager, &sealed, lenient).await.unwrap();
        assert!(rewalked);
        let opened = opened.unwrap();
        let message = crate::schema::Schema::global().message(PAGE).unwrap();
        let (mut plain, mut still_sealed) = (0, 0);
        walker::visit_payloads(index(), &message, &opened, |_, p| {
            match crate::crypto::inspect(p).unwrap() {
                Some(_) => still_sealed += 1,
                None => plain += 1,
            }
            Ok(())
        })
        .unwrap();
        assert_eq!((plain, still_sealed), (39, 1));
    }

    /// A payload marked as a portcullis envelope that is not one fails the first walk, unless
    /// the policy passes it through.
    #[test]
    fn marked_but_malformed_payloads_fail_the_plan() {
        let bogus = Payload {
            metadata: [
                ("encoding".to_string(), b"binary/encrypted".to_vec()),
                ("portcullis-envelope".to_string(), b"v1".to_vec()),
                ("encryption-key-id".to_string(), b"00".to_vec()),
            ]
            .into(),
            data: vec![0xff, 0xff],
            ..Default::default()
        };
        let message = GetWorkflowExecutionHistoryResponse {
            history: Some(History {
                events: vec![event(
                    1,
                    Attributes::ActivityTaskCompletedEventAttributes(
                        history::ActivityTaskCompletedEventAttributes {
                            result: Some(Payloads {
                                payloads: vec![bogus],
                            }),
                            ..Default::default()
                        },
                    ),
                )],
            }),
            ..Default::default()
        }
        .encode_to_vec();
        assert!(plan_open(index(), PAGE, &message, STRICT).is_err());
        let lenient = OpenOptions {
            decode_failures: true,
            pass_through: true,
            limits: WalkLimits::default(),
        };
        let plan = plan_open(index(), PAGE, &message, lenient).unwrap();
        assert!(plan.refs().is_empty());
    }
}
