//! Which description of Temporal's API the proxy runs with: the one built in, or a newer
//! descriptor set named in `[schema]`, so an SDK or server upgrade does not have to wait for a
//! new portcullis. A set is accepted only if it keeps everything the built-in one protects:
//! every method with the same messages, and every field that can reach a payload (else such a
//! field would go upstream unsealed). What it adds (methods, payload fields) is reported.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::authz::AccessLevel;
use crate::payload::walker::PayloadIndex;
use crate::schema::{Schema, SchemaConfig, SchemaError, SchemaOrigin};

/// What the schema in force is, and what it adds to the built-in one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaReport {
    /// "embedded" or "file".
    pub source: &'static str,
    pub sha256: Option<String>,
    pub methods: usize,
    /// Methods (HTTP/2 paths) the built-in schema does not have.
    pub added_methods: Vec<String>,
    /// Fields that can reach a payload and that the built-in schema does not know
    /// (`message.field`).
    pub added_payload_fields: Vec<String>,
}

impl SchemaReport {
    pub fn summary(&self) -> String {
        match &self.sha256 {
            None => format!("built-in API schema, {} methods", self.methods),
            Some(sha) => format!(
                "descriptor set (sha256 {sha}): {} methods, {} more than built in, {} more payload fields",
                self.methods,
                self.added_methods.len(),
                self.added_payload_fields.len()
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiSchemaError {
    #[error("cannot read the descriptor set {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("descriptor set {path}: {source}")]
    Schema {
        path: String,
        #[source]
        source: SchemaError,
    },
    #[error("descriptor set {path} is not a superset of the built-in API: {problems}")]
    NotASuperset { path: String, problems: String },
    #[error("authorization.method_access: {0}")]
    MethodAccess(String),
    #[error(transparent)]
    Install(SchemaError),
}

/// Reads and checks a descriptor set without installing it (`portcullis check`, and the first
/// half of [`install`]).
pub fn load(path: &Path) -> Result<(Schema, SchemaReport), ApiSchemaError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| ApiSchemaError::Read {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let sha256 = hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
    let origin = SchemaOrigin::File {
        path: path.to_path_buf(),
        sha256: sha256.clone(),
    };
    let schema =
        Schema::from_runtime_set(&bytes, origin).map_err(|source| ApiSchemaError::Schema {
            path: shown.clone(),
            source,
        })?;
    let embedded = Schema::embedded();
    let mut problems = Vec::new();
    let mut added_methods = Vec::new();
    for method in embedded.methods() {
        match schema.method(&method.path) {
            None => problems.push(format!("method {} is missing", method.path)),
            Some(m)
                if m.input.full_name() != method.input.full_name()
                    || m.output.full_name() != method.output.full_name() =>
            {
                problems.push(format!("method {} changed its messages", method.path))
            }
            Some(m) if m.namespace_field != method.namespace_field => problems.push(format!(
                "method {} keeps its namespace elsewhere",
                method.path
            )),
            Some(_) => {}
        }
    }
    for method in schema.methods() {
        if embedded.method(&method.path).is_none() {
            added_methods.push(method.path.clone());
        }
    }
    let (old, new) = (embedded.payload_index(), schema.payload_index());
    let fields = |index: &PayloadIndex, message: &str| -> BTreeSet<(u32, String)> {
        index
            .payload_fields(message)
            .unwrap_or_default()
            .into_iter()
            .map(|f| (f.number, f.type_name.to_string()))
            .collect()
    };
    for message in old.reaching_messages() {
        let kept = fields(new, message);
        for (number, type_name) in fields(old, message) {
            if !kept.contains(&(number, type_name.clone())) {
                problems.push(format!(
                    "{message} field {number} ({type_name}) would no longer be sealed"
                ));
            }
        }
    }
    let mut added_payload_fields = Vec::new();
    for message in new.reaching_messages() {
        let known = fields(old, message);
        for field in new.payload_fields(message).unwrap_or_default() {
            if !known.contains(&(field.number, field.type_name.to_string())) {
                added_payload_fields.push(format!("{message}.{}", field.name));
            }
        }
    }
    if !problems.is_empty() {
        problems.sort();
        return Err(ApiSchemaError::NotASuperset {
            path: shown,
            problems: problems.join("; "),
        });
    }
    added_methods.sort();
    added_payload_fields.sort();
    let report = SchemaReport {
        source: "file",
        sha256: Some(sha256),
        methods: schema.methods().count(),
        added_methods,
        added_payload_fields,
    };
    Ok((schema, report))
}

/// Puts the configured schema in force for this process (before anything uses the schema),
/// and checks that every method given an access level exists and is one Temporal's table does
/// not already classify.
pub fn install(
    config: &SchemaConfig,
    method_access: &BTreeMap<String, AccessLevel>,
) -> Result<SchemaReport, ApiSchemaError> {
    let report = match &config.descriptor_set {
        Some(path) => {
            let (schema, report) = load(path)?;
            Schema::install(schema).map_err(ApiSchemaError::Install)?;
            report
        }
        None => {
            let schema = Schema::global();
            if schema.origin != SchemaOrigin::Embedded {
                return Err(ApiSchemaError::Install(SchemaError::AlreadyInUse(
                    schema.origin.describe(),
                )));
            }
            SchemaReport {
                source: "embedded",
                sha256: None,
                methods: schema.methods().count(),
                added_methods: Vec::new(),
                added_payload_fields: Vec::new(),
            }
        }
    };
    check_method_access(Schema::global(), method_access)?;
    Ok(report)
}

fn check_method_access(
    schema: &Schema,
    method_access: &BTreeMap<String, AccessLevel>,
) -> Result<(), ApiSchemaError> {
    for path in method_access.keys() {
        if schema.method(path).is_none() {
            return Err(ApiSchemaError::MethodAccess(format!(
                "{path} is not a method of the API schema in force ({})",
                schema.origin.describe()
            )));
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
