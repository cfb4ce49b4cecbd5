//! Temporal's API schema, embedded at build time from `temporalio-protos`, and the per-method
//! table derived from it once at start-up.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, Kind, MessageDescriptor, MethodDescriptor};

use crate::identity::IdentityFieldIndex;
use crate::payload::namespaces::NamespaceFieldIndex;
use crate::payload::targets::TargetIndex;
use crate::payload::unknown::KnownMessages;
use crate::payload::walker::PayloadIndex;
use serde::{Deserialize, Serialize};

mod strip;

pub use strip::strip_source_info;

/// The compiled FileDescriptorSet of Temporal's API (see build.rs), without its comments and
/// source positions ([`strip_source_info`]).
pub static DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/temporal_descriptors.bin"));

/// The services the proxy forwards. Anything else is UNIMPLEMENTED.
pub const FORWARDED_SERVICES: &[&str] = &[
    "temporal.api.workflowservice.v1.WorkflowService",
    "temporal.api.operatorservice.v1.OperatorService",
    "grpc.health.v1.Health",
];

/// Whether a method acts on one namespace (routed by it) or on the cluster (system upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Namespace,
    Cluster,
}

#[derive(Debug, Clone)]
pub struct MethodInfo {
    /// `/package.Service/Method`
    pub path: String,
    pub service: String,
    pub name: String,
    pub input: MessageName,
    pub output: MessageName,
    pub scope: Scope,
    /// Field number of the request's top-level `namespace` string, when the method has one.
    pub namespace_field: Option<u32>,
    /// Streaming methods (only `grpc.health.v1.Health/Watch`) are not proxied.
    pub streaming: bool,
}

/// A message type by its full name (`temporal.api.common.v1.Payloads`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageName(Box<str>);

impl MessageName {
    pub fn full_name(&self) -> &str {
        &self.0
    }

    /// The name without its package (`Payloads`).
    pub fn name(&self) -> &str {
        self.0.rsplit('.').next().unwrap_or(&self.0)
    }
}

/// The `[schema]` section: which description of Temporal's API the proxy runs with.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SchemaConfig {
    /// A binary `FileDescriptorSet` of Temporal's API (with its imports), newer than the one
    /// built in: e.g. `buf build -o temporal-api.binpb` in temporalio/api. Unset: the built-in.
    #[serde(default)]
    pub descriptor_set: Option<PathBuf>,
}

/// Where the schema in force came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaOrigin {
    /// Built into the binary (`temporalio-protos`).
    Embedded,
    /// A descriptor set loaded at start.
    File { path: PathBuf, sha256: String },
}

/// All forwarded methods, by HTTP/2 path, and the indexes the proxy walks messages with.
///
/// The descriptor pool they are derived from is dropped once they are built: decoded, it is
/// ~5 MiB, most of an idle proxy's heap, and no call needs it (BENCHMARKS.md, "Idle RSS").
/// [`Schema::descriptors`] decodes it again for the rare caller that does (tests, tools).
pub struct Schema {
    methods: HashMap<String, MethodInfo>,
    pub origin: SchemaOrigin,
    payloads: PayloadIndex,
    targets: TargetIndex,
    namespaces: NamespaceFieldIndex,
    identity: IdentityFieldIndex,
    known: KnownMessages,
    /// `temporal.api.common.v1.Payloads` in a pool of its own (a few messages), for the codec
    /// endpoint's JSON.
    payloads_json: Option<MessageDescriptor>,
    /// Decoded on demand by [`Schema::descriptors`], never on a call's path.
    descriptors: OnceLock<DescriptorPool>,
}

/// The schema of this process: installed once at start (a newer descriptor set), or the
/// embedded one from its first use on. Everything derived from it (the payload index, the
/// namespace field index, the method table) is computed from whichever is in force.
static SCHEMA: OnceLock<Schema> = OnceLock::new();

const HEALTH_FILE: &str = "grpc/health/v1/health.proto";

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("not a valid descriptor set: {0}")]
    Invalid(String),
    #[error("the API schema is process-wide and already in use ({0}); it can only be chosen before anything uses it")]
    AlreadyInUse(String),
}

impl Schema {
    /// The schema in force (the embedded one unless another was installed first).
    pub fn global() -> &'static Schema {
        SCHEMA.get_or_init(Schema::embedded)
    }

    /// The schema built into the binary.
    pub fn embedded() -> Schema {
        // The descriptor set is produced by our own build; failing here is a build defect, not input.
        decode_apart(|| decode_pool(DESCRIPTOR_SET))
            .map(Schema::from_pool)
            .expect("embedded Temporal descriptor set is valid")
    }

    /// A schema from a descriptor set given at run time. A set without `grpc.health.v1`
    /// (Temporal's API repository does not carry it) gets the built-in health service.
    pub fn from_runtime_set(bytes: &[u8], origin: SchemaOrigin) -> Result<Schema, SchemaError> {
        let pool = decode_apart(|| runtime_pool(bytes))?;
        let mut schema = Schema::from_pool(pool);
        schema.origin = origin;
        Ok(schema)
    }

    /// Makes `schema` the process's schema. Refused once anything used the schema, unless the
    /// same one is in force already (a second proxy in one process with the same config).
    pub fn install(schema: Schema) -> Result<&'static Schema, SchemaError> {
        let wanted = schema.origin.clone();
        if let Err(schema) = SCHEMA.set(schema) {
            let current = Schema::global();
            let same = match (&current.origin, &wanted) {
                (SchemaOrigin::File { sha256: a, .. }, SchemaOrigin::File { sha256: b, .. }) => {
                    a == b
                }
                (SchemaOrigin::Embedded, SchemaOrigin::Embedded) => true,
                _ => false,
            };
            drop(schema);
            if !same {
                return Err(SchemaError::AlreadyInUse(current.origin.describe()));
            }
        }
        Ok(Schema::global())
    }

    /// Derives everything from `pool`, then lets it go (on a thread of its own: see
    /// [`decode_apart`]).
    fn from_pool(pool: DescriptorPool) -> Schema {
        let mut methods = HashMap::new();
        for service_name in FORWARDED_SERVICES {
            let Some(service) = pool.get_service_by_name(service_name) else {
                continue;
            };
            for method in service.methods() {
                let info = method_info(service_name, &method);
                methods.insert(info.path.clone(), info);
            }
        }
        let payloads = PayloadIndex::new(&pool);
        let targets = TargetIndex::new(&pool, &payloads);
        let known = KnownMessages::new(&pool, &payloads);
        let schema = Schema {
            methods,
            origin: SchemaOrigin::Embedded,
            targets,
            payloads,
            namespaces: NamespaceFieldIndex::new(&pool),
            identity: IdentityFieldIndex::new(&pool),
            known,
            // A set whose Payloads reaches into other files keeps the whole pool for it.
            payloads_json: payloads_alone(&pool).or_else(|| pool.get_message_by_name(PAYLOADS)),
            descriptors: OnceLock::new(),
        };
        // The pool's last reference goes on another thread too: its blocks then go back to the
        // decoding thread's arena without passing through this thread's cache, and that arena,
        // all free, is given back to the system.
        let dropped = schema_thread().spawn(move || drop(pool));
        if let Ok(dropping) = dropped {
            let _ = dropping.join();
        }
        schema
    }

    pub fn method(&self, path: &str) -> Option<&MethodInfo> {
        self.methods.get(path)
    }

    pub fn methods(&self) -> impl Iterator<Item = &MethodInfo> {
        self.methods.values()
    }

    pub fn payload_index(&self) -> &PayloadIndex {
        &self.payloads
    }

    pub fn target_index(&self) -> &TargetIndex {
        &self.targets
    }

    pub fn namespace_fields(&self) -> &NamespaceFieldIndex {
        &self.namespaces
    }

    pub fn identity_fields(&self) -> &IdentityFieldIndex {
        &self.identity
    }

    pub fn known_messages(&self) -> &KnownMessages {
        &self.known
    }

    /// `temporal.api.common.v1.Payloads` (and the messages it holds), for proto3 JSON.
    pub fn payloads_json(&self) -> Option<&MessageDescriptor> {
        self.payloads_json.as_ref()
    }

    /// The whole descriptor pool of this schema, decoded on first use and then kept. For tests
    /// and tools: nothing on a call's path uses it, so a serving proxy never holds it.
    pub fn descriptors(&self) -> Result<&DescriptorPool, SchemaError> {
        if let Some(pool) = self.descriptors.get() {
            return Ok(pool);
        }
        let pool = match &self.origin {
            SchemaOrigin::Embedded => decode_pool(DESCRIPTOR_SET)?,
            SchemaOrigin::File { path, .. } => {
                let bytes = std::fs::read(path)
                    .map_err(|e| SchemaError::Invalid(format!("{}: {e}", path.display())))?;
                runtime_pool(&bytes)?
            }
        };
        Ok(self.descriptors.get_or_init(|| pool))
    }

    /// Whether [`Schema::descriptors`] was called (and the whole pool is resident).
    pub fn holds_descriptors(&self) -> bool {
        self.descriptors.get().is_some()
    }

    /// A message of [`Schema::descriptors`].
    pub fn message(&self, full_name: &str) -> Option<MessageDescriptor> {
        self.descriptors().ok()?.get_message_by_name(full_name)
    }
}

/// The pool of a descriptor set given at run time. A set without `grpc.health.v1` (Temporal's
/// API repository does not carry it) gets the built-in health service.
fn runtime_pool(bytes: &[u8]) -> Result<DescriptorPool, SchemaError> {
    // `buf build` keeps comments and source positions by default: they are never read, and
    // decoded they are most of the pool's memory.
    let stripped = strip_source_info(bytes);
    let mut pool = decode_pool(stripped.as_deref().unwrap_or(bytes))?;
    if pool.get_service_by_name("grpc.health.v1.Health").is_none() {
        let embedded = decode_pool(DESCRIPTOR_SET)?;
        if let Some(health) = embedded.get_file_by_name(HEALTH_FILE) {
            pool.add_file_descriptor_proto(health.file_descriptor_proto().clone())
                .map_err(|e| SchemaError::Invalid(format!("adding {HEALTH_FILE}: {e}")))?;
        }
    }
    Ok(pool)
}

/// Runs `decode` on a thread of its own. glibc gives that thread its own malloc arena, so the
/// pool lives in an arena nothing else uses: when it is dropped the arena is all free and glibc
/// returns it to the system. Decoded here, the pool's ~5 MiB would stay resident after it is
/// dropped, in holes between the blocks allocated next to it that outlive it. Decodes on this
/// thread when no thread can be started.
fn decode_apart(
    decode: impl Fn() -> Result<DescriptorPool, SchemaError> + Sync,
) -> Result<DescriptorPool, SchemaError> {
    std::thread::scope(|scope| match schema_thread().spawn_scoped(scope, &decode) {
        Ok(decoding) => decoding
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
        Err(_) => decode(),
    })
}

fn schema_thread() -> std::thread::Builder {
    std::thread::Builder::new().name("portcullis-schema".into())
}

const PAYLOADS: &str = "temporal.api.common.v1.Payloads";

/// `temporal.api.common.v1.Payloads` in a pool of its own: its file with only the top-level
/// messages and enums `Payloads` reaches, and no imports. None when it reaches a type in another
/// file.
fn payloads_alone(pool: &DescriptorPool) -> Option<MessageDescriptor> {
    use prost_reflect::prost_types::FileDescriptorProto;
    let outermost = |mut message: MessageDescriptor| {
        while let Some(parent) = message.parent_message() {
            message = parent;
        }
        message.name().to_string()
    };
    let payloads = pool.get_message_by_name(PAYLOADS)?;
    let file = payloads.parent_file();
    let in_file = |other: &prost_reflect::FileDescriptor| {
        let same = *other == file;
        if !same {
            tracing::debug!(
                "{PAYLOADS} reaches {}, outside {}",
                other.name(),
                file.name()
            );
        }
        same
    };
    // Top-level names of the file to keep, and the messages still to look into.
    let mut kept = std::collections::HashSet::new();
    let mut seen = std::collections::HashSet::from([payloads.full_name().to_string()]);
    let mut reached = vec![payloads.clone()];
    while let Some(message) = reached.pop() {
        kept.insert(outermost(message.clone()));
        for field in message.fields() {
            match field.kind() {
                Kind::Message(child) => {
                    if !in_file(&child.parent_file()) {
                        return None;
                    }
                    if seen.insert(child.full_name().to_string()) {
                        reached.push(child);
                    }
                }
                Kind::Enum(e) => {
                    if !in_file(&e.parent_file()) {
                        return None;
                    }
                    kept.insert(e.parent_message().map_or(e.name().to_string(), outermost));
                }
                _ => {}
            }
        }
    }
    let proto = file.file_descriptor_proto();
    let keep = |name: &Option<String>| name.as_ref().is_some_and(|n| kept.contains(n));
    let alone = FileDescriptorProto {
        name: proto.name.clone(),
        package: proto.package.clone(),
        syntax: proto.syntax.clone(),
        message_type: proto
            .message_type
            .iter()
            .filter(|m| keep(&m.name))
            .cloned()
            .collect(),
        enum_type: proto
            .enum_type
            .iter()
            .filter(|e| keep(&e.name))
            .cloned()
            .collect(),
        ..Default::default()
    };
    let mut own = DescriptorPool::new();
    own.add_file_descriptor_proto(alone).ok()?;
    own.get_message_by_name(PAYLOADS)
}

/// Decodes a descriptor set one file at a time. prost-reflect's `DescriptorPool::decode` holds
/// the whole set decoded twice at its peak, ~1.3 MiB above the pool, and glibc keeps that memory
/// resident between the pool's blocks afterwards; file by file the peak is the pool and one
/// file (idle RSS -1.4 MiB, BENCHMARKS.md "Idle RSS"). Falls back to `decode`, which takes the
/// files in any order, when a file comes before one it imports or the set is not well formed.
fn decode_pool(bytes: &[u8]) -> Result<DescriptorPool, SchemaError> {
    use prost::Message;
    use prost_reflect::prost_types::FileDescriptorProto;
    if let Some(files) = strip::file_entries(bytes) {
        let mut pool = DescriptorPool::new();
        let added = files.into_iter().all(|file| {
            FileDescriptorProto::decode(file)
                .ok()
                .is_some_and(|proto| pool.add_file_descriptor_proto(proto).is_ok())
        });
        if added {
            return Ok(pool);
        }
    }
    DescriptorPool::decode(bytes).map_err(|e| SchemaError::Invalid(e.to_string()))
}

impl SchemaOrigin {
    pub fn describe(&self) -> String {
        match self {
            SchemaOrigin::Embedded => "the built-in API schema".into(),
            SchemaOrigin::File { path, sha256 } => {
                format!("descriptor set {} (sha256 {sha256})", path.display())
            }
        }
    }
}

fn method_info(service: &str, method: &MethodDescriptor) -> MethodInfo {
    let input = method.input();
    let namespace_field = input
        .get_field_by_name("namespace")
        .filter(|f| matches!(f.kind(), Kind::String) && !f.is_list() && !f.is_map())
        .map(|f| f.number());
    let scope = if namespace_field.is_some() {
        Scope::Namespace
    } else {
        Scope::Cluster
    };
    MethodInfo {
        path: format!("/{service}/{}", method.name()),
        service: service.to_string(),
        name: method.name().to_string(),
        input: MessageName(input.full_name().into()),
        output: MessageName(method.output().full_name().into()),
        scope,
        namespace_field,
        streaming: method.is_client_streaming() || method.is_server_streaming(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: &str = "/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution";

    /// Methods without a top-level `namespace` field. If Temporal adds a method that has none,
    /// this list must be reviewed, so a new method is never routed by accident.
    const CLUSTER_METHODS: &[&str] = &[
        "/temporal.api.workflowservice.v1.WorkflowService/GetClusterInfo",
        "/temporal.api.workflowservice.v1.WorkflowService/GetSystemInfo",
        "/temporal.api.workflowservice.v1.WorkflowService/GetSearchAttributes",
        "/temporal.api.workflowservice.v1.WorkflowService/ListNamespaces",
        "/temporal.api.operatorservice.v1.OperatorService/AddOrUpdateRemoteCluster",
        "/temporal.api.operatorservice.v1.OperatorService/RemoveRemoteCluster",
        "/temporal.api.operatorservice.v1.OperatorService/ListClusters",
        "/temporal.api.operatorservice.v1.OperatorService/GetNexusEndpoint",
        "/temporal.api.operatorservice.v1.OperatorService/CreateNexusEndpoint",
        "/temporal.api.operatorservice.v1.OperatorService/UpdateNexusEndpoint",
        "/temporal.api.operatorservice.v1.OperatorService/DeleteNexusEndpoint",
        "/temporal.api.operatorservice.v1.OperatorService/ListNexusEndpoints",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
    ];

    #[test]
    fn every_service_is_present_and_large() {
        let schema = Schema::global();
        let workflow = schema
            .methods()
            .filter(|m| m.service == "temporal.api.workflowservice.v1.WorkflowService")
            .count();
        assert!(workflow >= 100, "only {workflow} WorkflowService methods");
        assert!(schema
            .method("/temporal.api.operatorservice.v1.OperatorService/ListClusters")
            .is_some());
        assert!(schema.method("/grpc.health.v1.Health/Check").is_some());
    }

    #[test]
    fn cluster_methods_are_exactly_the_reviewed_list() {
        let schema = Schema::global();
        let mut cluster: Vec<&str> = schema
            .methods()
            .filter(|m| m.scope == Scope::Cluster)
            .map(|m| m.path.as_str())
            .collect();
        cluster.sort_unstable();
        let mut expected = CLUSTER_METHODS.to_vec();
        expected.sort_unstable();
        assert_eq!(cluster, expected);
    }

    #[test]
    fn task_token_methods_find_their_namespace_field() {
        let schema = Schema::global();
        let ns = |m: &str| {
            schema
                .method(&format!(
                    "/temporal.api.workflowservice.v1.WorkflowService/{m}"
                ))
                .and_then(|m| m.namespace_field)
        };
        assert_eq!(ns("StartWorkflowExecution"), Some(1));
        assert_eq!(ns("RecordActivityTaskHeartbeat"), Some(4));
        assert_eq!(ns("RespondActivityTaskCompleted"), Some(4));
        assert_eq!(ns("RespondActivityTaskFailed"), Some(4));
        assert_eq!(ns("RespondActivityTaskCanceled"), Some(4));
        assert_eq!(ns("RespondWorkflowTaskFailed"), Some(6));
        assert_eq!(ns("RespondQueryTaskCompleted"), Some(6));
        assert_eq!(ns("RespondWorkflowTaskCompleted"), Some(9));
    }

    #[test]
    fn only_health_watch_streams() {
        let streaming: Vec<_> = Schema::global()
            .methods()
            .filter(|m| m.streaming)
            .map(|m| m.path.clone())
            .collect();
        assert_eq!(streaming, vec!["/grpc.health.v1.Health/Watch".to_string()]);
    }

    /// Comments and source positions are dropped, byte for byte nothing else: options and
    /// fields `prost-types` does not know survive.
    #[test]
    fn source_info_is_stripped_and_nothing_else() {
        use prost::Message;
        use prost_reflect::prost_types::{
            source_code_info::Location, DescriptorProto, FileDescriptorProto, FileDescriptorSet,
            FileOptions, SourceCodeInfo,
        };
        let file = |name: &str, info: bool| FileDescriptorProto {
            name: Some(name.into()),
            package: Some("p".into()),
            message_type: vec![DescriptorProto {
                name: Some("M".into()),
                ..Default::default()
            }],
            options: Some(FileOptions {
                go_package: Some("example.com/p".into()),
                ..Default::default()
            }),
            source_code_info: info.then(|| SourceCodeInfo {
                location: vec![Location {
                    path: vec![4, 0],
                    span: vec![1, 2, 3],
                    leading_comments: Some("a comment".repeat(100)),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        };
        let with = FileDescriptorSet {
            file: vec![file("a.proto", true), file("b.proto", false)],
        };
        let without = FileDescriptorSet {
            file: vec![file("a.proto", false), file("b.proto", false)],
        };
        let mut bytes = with.encode_to_vec();
        // A field descriptor.proto does not have (on the set itself): kept as it is.
        bytes.extend_from_slice(&[0xa0, 0x06, 0x2a]);
        let mut expected = without.encode_to_vec();
        expected.extend_from_slice(&[0xa0, 0x06, 0x2a]);
        assert_eq!(strip_source_info(&bytes).unwrap(), expected);
        assert!(
            strip_source_info(&[0x0a, 0x05, 0x01]).is_none(),
            "truncated"
        );
        assert!(strip_source_info(&[0x0b]).is_none(), "a group");
    }

    /// The embedded schema carries no comments, and the same methods and messages as the set
    /// `temporalio-protos` publishes.
    #[test]
    fn the_embedded_set_has_no_source_info() {
        let pool = Schema::global().descriptors().unwrap();
        assert!(pool
            .files()
            .all(|f| f.file_descriptor_proto().source_code_info.is_none()));
        assert!(pool.all_messages().count() > 700);
        assert!(DESCRIPTOR_SET.len() < 400_000, "{}", DESCRIPTOR_SET.len());
    }

    /// The embedded set leaves out what the proxy never serves, and keeps every forwarded
    /// service and what the payload walker reaches behind an `Any` or in status details.
    #[test]
    fn the_embedded_set_leaves_out_what_is_not_served() {
        let pool = Schema::global().descriptors().unwrap();
        let names: Vec<String> = pool.files().map(|f| f.name().to_string()).collect();
        for prefix in strip::NOT_SERVED {
            assert!(!names.iter().any(|n| n.starts_with(prefix)), "{prefix}");
        }
        for service in FORWARDED_SERVICES {
            assert!(pool.get_service_by_name(service).is_some(), "{service}");
        }
        for message in [
            "google.rpc.Status",
            "temporal.api.errordetails.v1.NotFoundFailure",
            "temporal.api.update.v1.Acceptance",
            "temporal.api.protocol.v1.Message",
        ] {
            assert!(pool.get_message_by_name(message).is_some(), "{message}");
        }
    }

    /// Decoding file by file gives the pool `DescriptorPool::decode` gives, and a set whose
    /// files come before their imports still decodes (the fallback).
    #[test]
    fn pools_decode_file_by_file_and_in_any_order() {
        let names = |pool: &DescriptorPool| {
            let mut names: Vec<String> = pool
                .all_messages()
                .map(|m| m.full_name().to_string())
                .chain(pool.all_enums().map(|e| e.full_name().to_string()))
                .chain(pool.services().map(|s| s.full_name().to_string()))
                .collect();
            names.sort_unstable();
            names
        };
        let whole = names(&DescriptorPool::decode(DESCRIPTOR_SET).unwrap());
        assert!(whole.len() > 700);
        assert_eq!(names(&decode_pool(DESCRIPTOR_SET).unwrap()), whole);
        let mut reversed = Vec::new();
        for file in strip::file_entries(DESCRIPTOR_SET).unwrap().iter().rev() {
            prost::encoding::encode_key(
                1,
                prost::encoding::WireType::LengthDelimited,
                &mut reversed,
            );
            prost::encoding::encode_varint(file.len() as u64, &mut reversed);
            reversed.extend_from_slice(file);
        }
        assert_eq!(names(&decode_pool(&reversed).unwrap()), whole);
        assert!(decode_pool(&[0x0a, 0x05, 0x01]).is_err());
    }

    /// The schema keeps no descriptor pool: the one for the codec's JSON holds Payloads and
    /// what it reaches, and renders and parses what the whole pool does.
    #[test]
    fn the_schema_keeps_only_a_small_pool_for_payloads_json() {
        use prost_reflect::{DeserializeOptions, DynamicMessage, SerializeOptions};
        let schema = Schema::embedded();
        assert!(schema.descriptors.get().is_none());
        let alone = schema.payloads_json().unwrap();
        let mut names: Vec<String> = alone
            .parent_pool()
            .all_messages()
            .map(|m| m.full_name().to_string())
            .collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "temporal.api.common.v1.Payload",
                "temporal.api.common.v1.Payload.ExternalPayloadDetails",
                "temporal.api.common.v1.Payload.MetadataEntry",
                "temporal.api.common.v1.Payloads",
            ]
        );
        let whole = schema.message(PAYLOADS).unwrap();
        let json = br#"{"payloads":[{"metadata":{"encoding":"anNvbi9wbGFpbg=="},"data":"MQ==","externalPayloads":[{"sizeBytes":"7"}]},{}]}"#;
        let parse = |descriptor: &MessageDescriptor| {
            let mut de = serde_json::Deserializer::from_slice(json);
            let message = DynamicMessage::deserialize_with_options(
                descriptor.clone(),
                &mut de,
                &DeserializeOptions::new(),
            )
            .unwrap();
            let mut out = Vec::new();
            message
                .serialize_with_options(
                    &mut serde_json::Serializer::new(&mut out),
                    &SerializeOptions::new(),
                )
                .unwrap();
            (prost::Message::encode_to_vec(&message), out)
        };
        assert_eq!(parse(alone), parse(&whole));
        assert_eq!(parse(alone).1, json.to_vec());
    }

    /// A schema from a file decodes its whole pool again from that file when asked.
    #[test]
    fn a_runtime_schema_decodes_its_pool_from_its_file_on_demand() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("set.binpb");
        std::fs::write(&path, DESCRIPTOR_SET).unwrap();
        let origin = SchemaOrigin::File {
            path: path.clone(),
            sha256: "-".into(),
        };
        let schema = Schema::from_runtime_set(DESCRIPTOR_SET, origin).unwrap();
        assert!(schema.descriptors.get().is_none());
        let pool = schema.descriptors().unwrap();
        assert!(pool.get_service_by_name("grpc.health.v1.Health").is_some());
        assert!(schema.message("temporal.api.common.v1.Payloads").is_some());
        assert_eq!(
            schema.method(START).unwrap().input.name(),
            "StartWorkflowExecutionRequest"
        );
        std::fs::remove_file(&path).unwrap();
        let gone = Schema::from_runtime_set(
            DESCRIPTOR_SET,
            SchemaOrigin::File {
                path,
                sha256: "-".into(),
            },
        )
        .unwrap();
        assert!(matches!(gone.descriptors(), Err(SchemaError::Invalid(_))));
    }

    /// Files go by prefix; a file that stays cannot lose one it imports.
    #[test]
    fn dropping_files_keeps_their_importers_whole() {
        use prost::Message;
        use prost_reflect::prost_types::{FileDescriptorProto, FileDescriptorSet};
        let file = |name: &str, imports: &[&str]| FileDescriptorProto {
            name: Some(name.into()),
            dependency: imports.iter().map(|i| i.to_string()).collect(),
            ..Default::default()
        };
        let set = FileDescriptorSet {
            file: vec![
                file("keep/a.proto", &["keep/b.proto"]),
                file("keep/b.proto", &[]),
                file("drop/c.proto", &["keep/b.proto"]),
            ],
        }
        .encode_to_vec();
        let kept = FileDescriptorSet::decode(
            strip::drop_files(&set, &["drop/"])
                .expect("nothing kept imports drop/")
                .as_slice(),
        )
        .expect("decode");
        assert_eq!(
            kept.file.iter().map(|f| f.name()).collect::<Vec<_>>(),
            ["keep/a.proto", "keep/b.proto"]
        );
        let refused = strip::drop_files(&set, &["keep/b"]).unwrap_err();
        assert!(
            refused.contains("keep/a.proto imports keep/b.proto"),
            "{refused}"
        );
        assert!(strip::drop_files(&[0x0a, 0x05, 0x01], &["x"]).is_err());
    }
}
