//! Wire-level protobuf access: reading fields without decoding whole messages, the walker
//! that finds and rewrites every Payload, and the rewriter of namespace names.

pub mod namespaces;
pub mod system_nexus;
pub mod targets;
pub mod unknown;
pub mod walker;
pub mod wire;

pub use walker::{
    plan_named, rewrite, rewrite_status_details, rewrite_with, visit_payloads, Direction,
    FailureMode, PayloadContext, PayloadIndex, PayloadVisitor, RewritePlan, Visit, WalkError,
    WalkOptions,
};
