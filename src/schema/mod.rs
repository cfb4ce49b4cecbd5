//! Temporal's API schema, embedded at build time from `temporalio-protos`, and the per-method
//! table derived from it once at start-up.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, Kind, MessageDescriptor, MethodDescriptor};
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
    pub input: MessageDescriptor,
    pub output: MessageDescriptor,
    pub scope: Scope,
    /// Field number of the request's top-level `namespace` string, when the method has one.
    pub namespace_field: Option<u32>,
    /// Streaming methods (only `grpc.health.v1.Health/Watch`) are not proxied.
    pub streaming: bool,
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

/// All forwarded methods, by HTTP/2 path.
pub struct Schema {
    pub pool: DescriptorPool,
    methods: HashMap<String, MethodInfo>,
    pub origin: SchemaOrigin,
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
        Schema::from_descriptor_set(DESCRIPTOR_SET)
            .expect("embedded Temporal descriptor set is valid")
    }

    /// A schema from a descriptor set given at run time. A set without `grpc.health.v1`
    /// (Temporal's API repository does not carry it) gets the built-in health service.
    pub fn from_runtime_set(bytes: &[u8], origin: SchemaOrigin) -> Result<Schema, SchemaError> {
        // `buf build` keeps comments and source positions by default: they are never read, and
        // decoded they are most of the pool's memory.
        let stripped = strip_source_info(bytes);
        let mut pool = decode_pool(stripped.as_deref().unwrap_or(bytes))
            .map_err(|e| SchemaError::Invalid(e.to_string()))?;
        if pool.get_service_by_name("grpc.health.v1.Health").is_none() {
            let embedded =
                decode_pool(DESCRIPTOR_SET).map_err(|e| SchemaError::Invalid(e.to_string()))?;
            if let Some(health) = embedded.get_file_by_name(HEALTH_FILE) {
                pool.add_file_descriptor_proto(health.file_descriptor_proto().clone())
                    .map_err(|e| SchemaError::Invalid(format!("adding {HEALTH_FILE}: {e}")))?;
            }
        }
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

    pub fn from_descriptor_set(bytes: &[u8]) -> Result<Schema, prost_reflect::DescriptorError> {
        Ok(Schema::from_pool(decode_pool(bytes)?))
    }

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
        Schema {
            pool,
            methods,
            origin: SchemaOrigin::Embedded,
        }
    }

    pub fn method(&self, path: &str) -> Option<&MethodInfo> {
        self.methods.get(path)
    }

    pub fn methods(&self) -> impl Iterator<Item = &MethodInfo> {
        self.methods.values()
    }

    pub fn message(&self, full_name: &str) -> Option<MessageDescriptor> {
        self.pool.get_message_by_name(full_name)
    }
}

/// Decodes a descriptor set one file at a time. prost-reflect's `DescriptorPool::decode` holds
/// the whole set decoded twice at its peak, ~1.3 MiB above the pool, and glibc keeps that memory
/// resident between the pool's blocks afterwards; file by file the peak is the pool and one
/// file (idle RSS -1.4 MiB, BENCHMARKS.md "Idle RSS"). Falls back to `decode`, which takes the
/// files in any order, when a file comes before one it imports or the set is not well formed.
fn decode_pool(bytes: &[u8]) -> Result<DescriptorPool, prost_reflect::DescriptorError> {
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
    DescriptorPool::decode(bytes)
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
        input,
        output: method.output(),
        scope,
        namespace_field,
        streaming: method.is_client_streaming() || method.is_server_streaming(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let schema = Schema::global();
        assert!(schema
            .pool
            .files()
            .all(|f| f.file_descriptor_proto().source_code_info.is_none()));
        assert!(schema.pool.all_messages().count() > 700);
        assert!(DESCRIPTOR_SET.len() < 400_000, "{}", DESCRIPTOR_SET.len());
    }

    /// The embedded set leaves out what the proxy never serves, and keeps every forwarded
    /// service and what the payload walker reaches behind an `Any` or in status details.
    #[test]
    fn the_embedded_set_leaves_out_what_is_not_served() {
        let pool = &Schema::global().pool;
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
