//! Resolving references in an opened message, in two halves around the async fetch (as opening
//! resolves data keys): [`plan_resolve`] walks once, finds the references and sizes the answer
//! as the caller will get it (so the response limit is checked before anything is fetched);
//! the caller fetches the objects and resolves their keys; [`ResolvePlan::apply`] writes each
//! object's opened payload in its reference's place.

use std::collections::HashMap;

use bytes::Bytes;

use super::reference::{self, Reference};
use super::OffloadError;
use crate::crypto::OpeningKeys;
use crate::payload::walker::{
    self, PayloadContext, PayloadIndex, PayloadVisitor, RewritePlan, Visit, WalkError, WalkLimits,
    WalkOptions,
};

/// Whether `message` may hold a reference: a quick byte search for the reference marker, so
/// answers without one (nearly all) cost one scan and no walk.
pub fn may_hold_references(message: &[u8]) -> bool {
    memchr::memmem::find(message, reference::MARKER_KEY).is_some()
}

/// The references of one opened message, in order, and where their payloads go.
#[derive(Debug)]
pub struct ResolvePlan {
    /// Each with the namespace it belongs to (`None`: the call's own).
    refs: Vec<(Option<String>, Reference)>,
    plan: RewritePlan,
}

/// Finds the references in `message` (an opened `message_type`); `None`: there are none.
/// A payload marked as a reference that is not readable fails the walk (DATA_LOSS).
pub fn plan_resolve(
    index: &PayloadIndex,
    message_type: &str,
    message: &[u8],
    limits: WalkLimits,
) -> Result<Option<ResolvePlan>, WalkError> {
    let mut collect = Collect { refs: Vec::new() };
    let plan = walker::plan_named(
        index,
        message_type,
        message,
        &mut collect,
        &WalkOptions::default().limited(limits),
    )?;
    Ok(match plan {
        Some(plan) if !collect.refs.is_empty() => Some(ResolvePlan {
            refs: collect.refs,
            plan,
        }),
        _ => None,
    })
}

impl ResolvePlan {
    /// Every reference with the namespace it belongs to (`None`: the call's own), in order
    /// (an object referenced twice is listed twice).
    pub fn references(&self) -> &[(Option<String>, Reference)] {
        &self.refs
    }

    /// Writes `message` with every reference replaced by its object (`objects`: by key, digest
    /// already checked), opened with the keys of its namespace (`keys`: `None` for the call's
    /// own).
    pub fn apply(
        &self,
        message: &[u8],
        objects: &HashMap<String, Bytes>,
        keys: &[(Option<String>, OpeningKeys)],
    ) -> Result<Vec<u8>, WalkError> {
        let mut writer = Writer {
            refs: self.refs.iter(),
            objects,
            keys,
        };
        self.plan.apply(message, &mut writer)
    }
}

struct Collect {
    refs: Vec<(Option<String>, Reference)>,
}

impl PayloadVisitor for Collect {
    fn payload(&mut self, _: &PayloadContext<'_>, _: &[u8]) -> Result<Option<Vec<u8>>, WalkError> {
        Ok(None)
    }

    fn visit(&mut self, ctx: &PayloadContext<'_>, payload: &[u8]) -> Result<Visit, WalkError> {
        match Reference::from_payload(payload) {
            Ok(Some(reference)) => {
                let size = usize::try_from(reference.payload_size).unwrap_or(usize::MAX);
                self.refs
                    .push((ctx.namespace().map(str::to_owned), reference));
                Ok(Visit::Deferred(size))
            }
            Ok(None) => Ok(Visit::Keep),
            Err(e) => Err(WalkError::visitor(OffloadError::Malformed(e))),
        }
    }
}

struct Writer<'a> {
    refs: std::slice::Iter<'a, (Option<String>, Reference)>,
    objects: &'a HashMap<String, Bytes>,
    keys: &'a [(Option<String>, OpeningKeys)],
}

impl PayloadVisitor for Writer<'_> {
    fn payload(&mut self, _: &PayloadContext<'_>, _: &[u8]) -> Result<Option<Vec<u8>>, WalkError> {
        Ok(None)
    }

    fn write(&mut self, _: &[u8], out: &mut Vec<u8>) -> Result<(), WalkError> {
        let (namespace, reference) = self.refs.next().ok_or(WalkError::Internal(
            "more deferred payloads than references",
        ))?;
        let object = self
            .objects
            .get(&reference.key)
            .ok_or(WalkError::Internal("an object was not fetched"))?;
        let keys = self
            .keys
            .iter()
            .find(|(n, _)| n == namespace)
            .map(|(_, k)| k)
            .ok_or(WalkError::Internal("no keys for an object's namespace"))?;
        let start = out.len();
        keys.open_into(object, out).map_err(WalkError::visitor)?;
        if (out.len() - start) as u64 != reference.payload_size {
            out.truncate(start);
            return Err(WalkError::visitor(OffloadError::Corrupt {
                bucket: reference.bucket.clone(),
                key: reference.key.clone(),
                reason: "it opens to another size than the reference says".into(),
            }));
        }
        Ok(())
    }
}
