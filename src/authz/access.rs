//! The access level every method needs, following Temporal's own classification
//! (temporalio/temporal `common/api/metadata.go`).

use crate::schema::{MethodInfo, Scope};

/// What a caller must hold to call a method.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum AccessLevel {
    /// Any authenticated caller (GetSystemInfo, health checks).
    Open,
    Read,
    Write,
    Admin,
}

impl AccessLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessLevel::Open => "open",
            AccessLevel::Read => "read",
            AccessLevel::Write => "write",
            AccessLevel::Admin => "admin",
        }
    }
}

const WORKFLOW: &str = "temporal.api.workflowservice.v1.WorkflowService";
const OPERATOR: &str = "temporal.api.operatorservice.v1.OperatorService";
const HEALTH: &str = "grpc.health.v1.Health";

/// Every caller that passed the handshake may call these.
const OPEN: &[(&str, &str)] = &[
    (WORKFLOW, "GetSystemInfo"),
    (HEALTH, "Check"),
    (HEALTH, "Watch"),
];

const WORKFLOW_READ: &[&str] = &[
    "DescribeNamespace",
    "ListNamespaces",
    "GetWorkflowExecutionHistory",
    "GetWorkflowExecutionHistoryReverse",
    "CountActivityExecutions",
    "CountNexusOperationExecutions",
    "DescribeActivityExecution",
    "DescribeNexusOperationExecution",
    "PollActivityExecution",
    "PollNexusOperationExecution",
    "ListActivityExecutions",
    "ListNexusOperationExecutions",
    "ListOpenWorkflowExecutions",
    "ListClosedWorkflowExecutions",
    "ListWorkflowExecutions",
    "ListArchivedWorkflowExecutions",
    "ScanWorkflowExecutions",
    "CountWorkflowExecutions",
    "GetSearchAttributes",
    "QueryWorkflow",
    "DescribeWorkflowExecution",
    "DescribeTaskQueue",
    "GetClusterInfo",
    "ListTaskQueuePartitions",
    "DescribeSchedule",
    "ListScheduleMatchingTimes",
    "ListSchedules",
    "CountSchedules",
    "GetWorkerBuildIdCompatibility",
    "GetWorkerVersioningRules",
    "GetWorkerTaskReachability",
    "PollWorkflowExecutionUpdate",
    // Not in Temporal's table (newer than it); it observes a workflow like PollWorkflowExecutionUpdate.
    "PollWorkflowExecutionTimeSkipping",
    "DescribeBatchOperation",
    "ListBatchOperations",
    "DescribeDeployment",
    "ListDeployments",
    "GetDeploymentReachability",
    "GetCurrentDeployment",
    "DescribeWorkerDeploymentVersion",
    "DescribeWorkerDeployment",
    "ValidateWorkerDeploymentVersionComputeConfig",
    "ListWorkerDeployments",
    "DescribeWorkflowRule",
    "ListWorkflowRules",
    "ListWorkers",
    "CountWorkers",
    "DescribeWorker",
    "FetchWorkerConfig",
];

const WORKFLOW_WRITE: &[&str] = &[
    "StartWorkflowExecution",
    "PollWorkflowTaskQueue",
    "RespondWorkflowTaskCompleted",
    "RespondWorkflowTaskFailed",
    "PollActivityTaskQueue",
    "RecordActivityTaskHeartbeat",
    "RecordActivityTaskHeartbeatById",
    "RespondActivityTaskCompleted",
    "RespondActivityTaskCompletedById",
    "RespondActivityTaskFailed",
    "RespondActivityTaskFailedById",
    "RespondActivityTaskCanceled",
    "RespondActivityTaskCanceledById",
    "DeleteActivityExecution",
    "DeleteNexusOperationExecution",
    "RequestCancelActivityExecution",
    "RequestCancelNexusOperationExecution",
    "StartActivityExecution",
    "StartNexusOperationExecution",
    "TerminateActivityExecution",
    "TerminateNexusOperationExecution",
    "PollNexusTaskQueue",
    "RespondNexusTaskCompleted",
    "RespondNexusTaskFailed",
    "RequestCancelWorkflowExecution",
    "SignalWorkflowExecution",
    "SignalWithStartWorkflowExecution",
    "ResetWorkflowExecution",
    "TerminateWorkflowExecution",
    "DeleteWorkflowExecution",
    "RespondQueryTaskCompleted",
    "ResetStickyTaskQueue",
    "ShutdownWorker",
    "ExecuteMultiOperation",
    "CreateSchedule",
    "UpdateSchedule",
    "PatchSchedule",
    "DeleteSchedule",
    "UpdateWorkerBuildIdCompatibility",
    "UpdateWorkerVersioningRules",
    "UpdateWorkflowExecution",
    "StartBatchOperation",
    "StopBatchOperation",
    "UpdateActivityOptions",
    "PauseActivity",
    "UnpauseActivity",
    "ResetActivity",
    "UpdateActivityExecutionOptions",
    "PauseActivityExecution",
    "UnpauseActivityExecution",
    "ResetActivityExecution",
    "UpdateWorkflowExecutionOptions",
    "SetCurrentDeployment",
    "SetWorkerDeploymentCurrentVersion",
    "SetWorkerDeploymentRampingVersion",
    "SetWorkerDeploymentManager",
    "CreateWorkerDeployment",
    "DeleteWorkerDeployment",
    "CreateWorkerDeploymentVersion",
    "UpdateWorkerDeploymentVersionComputeConfig",
    "DeleteWorkerDeploymentVersion",
    "UpdateWorkerDeploymentVersionMetadata",
    "CreateWorkflowRule",
    "DeleteWorkflowRule",
    "TriggerWorkflowRule",
    "RecordWorkerHeartbeat",
    "UpdateTaskQueueConfig",
    "UpdateWorkerConfig",
    "PauseWorkflowExecution",
    "UnpauseWorkflowExecution",
];

const WORKFLOW_ADMIN: &[&str] = &["RegisterNamespace", "UpdateNamespace", "DeprecateNamespace"];

const OPERATOR_READ: &[&str] = &["ListSearchAttributes"];

const OPERATOR_ADMIN: &[&str] = &[
    "AddSearchAttributes",
    "RemoveSearchAttributes",
    "DeleteNamespace",
    "AddOrUpdateRemoteCluster",
    "RemoveRemoteCluster",
    "ListClusters",
    "CreateNexusEndpoint",
    "UpdateNexusEndpoint",
    "DeleteNexusEndpoint",
    "GetNexusEndpoint",
    "ListNexusEndpoints",
];

/// The level Temporal assigns to a method, if it has classified it.
pub fn classified_level(service: &str, method: &str) -> Option<AccessLevel> {
    if OPEN.contains(&(service, method)) {
        return Some(AccessLevel::Open);
    }
    let (read, write, admin): (&[&str], &[&str], &[&str]) = match service {
        WORKFLOW => (WORKFLOW_READ, WORKFLOW_WRITE, WORKFLOW_ADMIN),
        OPERATOR => (OPERATOR_READ, &[], OPERATOR_ADMIN),
        _ => return None,
    };
    if read.contains(&method) {
        Some(AccessLevel::Read)
    } else if write.contains(&method) {
        Some(AccessLevel::Write)
    } else if admin.contains(&method) {
        Some(AccessLevel::Admin)
    } else {
        None
    }
}

/// What a call needs: its level, and whether the namespace's or the cluster's roles apply.
/// A method Temporal has not classified needs cluster admin (fail closed).
/// Checks a configured level for a method Temporal's table does not know (a newer API):
/// `/package.Service/Method`, and never one the table classifies (its level is Temporal's).
pub fn check_configured_method(path: &str) -> Result<(), String> {
    let (service, method) = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .filter(|(s, m)| !s.is_empty() && !m.is_empty() && !m.contains('/'))
        .ok_or_else(|| format!("{path:?} is not a method path (/package.Service/Method)"))?;
    if let Some(level) = classified_level(service, method) {
        return Err(format!(
            "{path} already needs {} in Temporal's own table; only methods it does not know can be given a level",
            level.as_str()
        ));
    }
    Ok(())
}

pub fn required_access(method: &MethodInfo) -> (Scope, AccessLevel) {
    match classified_level(&method.service, &method.name) {
        Some(level) => (method.scope, level),
        None => (Scope::Cluster, AccessLevel::Admin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Schema;

    #[test]
    fn every_method_in_the_schema_is_classified() {
        let mut missing: Vec<String> = Schema::global()
            .methods()
            .filter(|m| classified_level(&m.service, &m.name).is_none())
            .map(|m| m.path.clone())
            .collect();
        missing.sort();
        assert!(
            missing.is_empty(),
            "methods without an access level: {missing:#?}"
        );
    }

    #[test]
    fn no_method_is_listed_twice() {
        let mut all: Vec<&str> = [WORKFLOW_READ, WORKFLOW_WRITE, WORKFLOW_ADMIN].concat();
        let before = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(before, all.len());
    }

    #[test]
    fn spot_checks_against_temporals_table() {
        let level = |s: &str, m: &str| classified_level(s, m);
        assert_eq!(
            level(WORKFLOW, "StartWorkflowExecution"),
            Some(AccessLevel::Write)
        );
        assert_eq!(
            level(WORKFLOW, "PollWorkflowTaskQueue"),
            Some(AccessLevel::Write)
        );
        assert_eq!(level(WORKFLOW, "QueryWorkflow"), Some(AccessLevel::Read));
        assert_eq!(
            level(WORKFLOW, "RegisterNamespace"),
            Some(AccessLevel::Admin)
        );
        assert_eq!(level(WORKFLOW, "GetSystemInfo"), Some(AccessLevel::Open));
        assert_eq!(level(OPERATOR, "ListClusters"), Some(AccessLevel::Admin));
        assert_eq!(level(HEALTH, "Check"), Some(AccessLevel::Open));
        assert_eq!(level(WORKFLOW, "SomethingNew"), None);
    }

    /// The methods the Python SDK 1.35 exposes beyond the basics, against Temporal's table
    /// (server `common/api/metadata.go`, checked by hand): standalone activities and Nexus
    /// operations, worker deployments, batch operations, task queue configuration, activity
    /// operations, Nexus endpoints (cluster admin, reads included).
    #[test]
    fn newer_sdk_methods_have_temporals_levels() {
        use AccessLevel::{Admin, Read, Write};
        let expected: &[(&str, &str, AccessLevel)] = &[
            (WORKFLOW, "StartActivityExecution", Write),
            (WORKFLOW, "DescribeActivityExecution", Read),
            (WORKFLOW, "PollActivityExecution", Read),
            (WORKFLOW, "ListActivityExecutions", Read),
            (WORKFLOW, "CountActivityExecutions", Read),
            (WORKFLOW, "RequestCancelActivityExecution", Write),
            (WORKFLOW, "TerminateActivityExecution", Write),
            (WORKFLOW, "PauseActivityExecution", Write),
            (WORKFLOW, "UnpauseActivityExecution", Write),
            (WORKFLOW, "UpdateActivityExecutionOptions", Write),
            (WORKFLOW, "StartNexusOperationExecution", Write),
            (WORKFLOW, "PollNexusOperationExecution", Read),
            (WORKFLOW, "DescribeNexusOperationExecution", Read),
            (WORKFLOW, "CountNexusOperationExecutions", Read),
            (WORKFLOW, "PollNexusTaskQueue", Write),
            (WORKFLOW, "RespondNexusTaskCompleted", Write),
            (WORKFLOW, "ExecuteMultiOperation", Write),
            (WORKFLOW, "StartBatchOperation", Write),
            (WORKFLOW, "DescribeBatchOperation", Read),
            (WORKFLOW, "ListBatchOperations", Read),
            (WORKFLOW, "PauseActivity", Write),
            (WORKFLOW, "UnpauseActivity", Write),
            (WORKFLOW, "ResetActivity", Write),
            (WORKFLOW, "UpdateActivityOptions", Write),
            (WORKFLOW, "UpdateTaskQueueConfig", Write),
            (WORKFLOW, "SetWorkerDeploymentCurrentVersion", Write),
            (WORKFLOW, "SetWorkerDeploymentRampingVersion", Write),
            (WORKFLOW, "UpdateWorkerDeploymentVersionMetadata", Write),
            (WORKFLOW, "DescribeWorkerDeployment", Read),
            (WORKFLOW, "DescribeWorkerDeploymentVersion", Read),
            (WORKFLOW, "ListWorkerDeployments", Read),
            (WORKFLOW, "GetWorkerBuildIdCompatibility", Read),
            (WORKFLOW, "UpdateWorkerBuildIdCompatibility", Write),
            (WORKFLOW, "GetWorkerTaskReachability", Read),
            (WORKFLOW, "PatchSchedule", Write),
            (WORKFLOW, "ListSchedules", Read),
            (OPERATOR, "CreateNexusEndpoint", Admin),
            (OPERATOR, "UpdateNexusEndpoint", Admin),
            (OPERATOR, "DeleteNexusEndpoint", Admin),
            (OPERATOR, "GetNexusEndpoint", Admin),
            (OPERATOR, "ListNexusEndpoints", Admin),
        ];
        for (service, method, level) in expected {
            assert_eq!(
                classified_level(service, method),
                Some(*level),
                "{service}/{method}"
            );
        }
        let schema = Schema::global();
        for method in [
            "CreateNexusEndpoint",
            "GetNexusEndpoint",
            "ListNexusEndpoints",
        ] {
            let info = schema
                .method(&format!("/{OPERATOR}/{method}"))
                .expect("in the schema");
            assert_eq!(
                required_access(info),
                (crate::schema::Scope::Cluster, Admin)
            );
        }
    }
}
