//! Every example in config/ is loaded and checked, so the docs cannot drift from the code: TOML
//! configs load and validate; the Kubernetes manifests parse and carry the TOML examples
//! verbatim, probe /readyz and /healthz on the configured admin port and give long polls time
//! to drain; the systemd unit and the load balancer config agree with the proxy's settings. (The
//! Grafana dashboard's queries are checked against a real scrape in tests/operations.rs.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use portcullis::config::{Config, ListenAddress};
use serde::Deserialize as _;
use serde_json::Value;

fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config")
}

fn load(name: &str) -> Config {
    let path = config_dir().join(name);
    Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn admin_port(config: &Config) -> u16 {
    let admin = config.admin.as_ref().expect("[admin] configured");
    admin
        .listen
        .parse::<SocketAddr>()
        .expect("admin address")
        .port()
}

fn check_toml(path: &Path) {
    let config = Config::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(!config.upstreams.is_empty());
    config.listen_address().expect("listen address");
    // Every example runs with the admin listener: metrics and readiness are not optional in
    // production.
    admin_port(&config);
}

/// All documents of a YAML file, as JSON values.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("read yaml");
    let mut docs = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = Value::deserialize(document)
            .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()));
        for key in ["apiVersion", "kind"] {
            assert!(
                value[key].is_string(),
                "{}: a document lacks {key}",
                path.display()
            );
        }
        assert!(
            value["metadata"]["name"].is_string(),
            "{}: a document lacks metadata.name",
            path.display()
        );
        docs.push(value);
    }
    docs
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The named port's number in a container.
fn container_port(container: &Value, name: &str) -> u64 {
    container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no port {name}"))
}

/// Checks the portcullis container of a pod spec against the config it runs with.
fn check_portcullis_container(
    pod: &Value,
    container: &Value,
    config: &Config,
    config_map_key: &str,
) {
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg"))
        .collect();
    assert_eq!(args[..2], ["serve", "--config"], "{args:?}");
    let config_path = args[2];
    // Probes hit the admin listener's port.
    let admin = container_port(container, "admin");
    assert_eq!(admin, u64::from(admin_port(config)));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    // The config file is mounted where --config points, from the ConfigMap key.
    let mounts = container["volumeMounts"].as_array().expect("mounts");
    let config_mount = mounts
        .iter()
        .find(|m| m["mountPath"] == config_path)
        .expect("the config file is mounted at the --config path");
    assert_eq!(config_mount["subPath"], config_map_key);
    // Every mount has a volume; every file the config names is under some mount.
    let volumes: Vec<&str> = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| v["name"].as_str().expect("volume name"))
        .collect();
    for mount in mounts {
        let name = mount["name"].as_str().expect("mount name");
        assert!(volumes.contains(&name), "mount {name} has no volume");
    }
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(tls) = &config.listener.tls {
        files.extend([tls.cert.clone(), tls.key.clone(), tls.client_ca.clone()]);
    }
    for upstream in config.upstreams.values() {
        if let Some(tls) = &upstream.tls {
            files.extend(tls.ca.clone());
            files.extend(tls.cert.clone());
            files.extend(tls.key.clone());
        }
    }
    files.extend(config.authorization.policy_dir.clone());
    for file in files {
        assert!(
            mounts
                .iter()
                .any(|m| file.starts_with(m["mountPath"].as_str().expect("mount path"))),
            "{} is not under any volume mount",
            file.display()
        );
    }
    // The pod waits for long polls: longer than the proxy's grace period.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    assert!(
        grace > config.limits.shutdown_grace_seconds,
        "terminationGracePeriodSeconds {grace} <= shutdown_grace_seconds {}",
        config.limits.shutdown_grace_seconds
    );
}

fn check_kubernetes(path: &Path) {
    let docs = yaml_documents(path);
    let text = std::fs::read_to_string(config_dir().join("replica.toml")).expect("replica.toml");
    let config_map = find(&docs, "ConfigMap", "portcullis-config");
    assert_eq!(
        config_map["data"]["portcullis.toml"].as_str(),
        Some(text.as_str()),
        "the ConfigMap must carry config/replica.toml verbatim"
    );
    let config = Config::from_toml(&text).expect("replica.toml");
    let deployment = find(&docs, "Deployment", "portcullis");
    assert!(deployment["spec"]["replicas"].as_u64().expect("replicas") >= 2);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    check_portcullis_container(pod, container, &config, "portcullis.toml");
    // A TCP load balancer in front, on the listener's port.
    let service = find(&docs, "Service", "portcullis");
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    let port = &service["spec"]["ports"][0];
    assert_eq!(port["protocol"], "TCP");
    let ListenAddress::Tcp(listen) = config.listen_address().expect("address") else {
        panic!("the shared service listens on TCP");
    };
    assert_eq!(container_port(container, "grpc"), u64::from(listen.port()));
    assert_eq!(port["targetPort"], "grpc");
    find(&docs, "PodDisruptionBudget", "portcullis");
    // The policy files it mounts are valid namespace resources.
    for (name, body) in find(&docs, "ConfigMap", "portcullis-policies")["data"]
        .as_object()
        .expect("policies")
    {
        let policy: portcullis::authz::NamespacePolicy =
            toml::from_str(body.as_str().expect("text")).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            config.namespaces.iter().any(|ns| ns.name == policy.name),
            "{name}"
        );
    }
}

fn check_sidecar_pod(path: &Path) {
    let docs = yaml_documents(path);
    let text = std::fs::read_to_string(config_dir().join("sidecar.toml")).expect("sidecar.toml");
    let config_map = find(&docs, "ConfigMap", "payments-portcullis");
    assert_eq!(
        config_map["data"]["sidecar.toml"].as_str(),
        Some(text.as_str()),
        "the ConfigMap must carry config/sidecar.toml verbatim"
    );
    let config = Config::from_toml(&text).expect("sidecar.toml");
    let pod = &find(&docs, "Pod", "payments-worker")["spec"];
    // A native sidecar: an init container that keeps running.
    let sidecar = pod["initContainers"]
        .as_array()
        .expect("initContainers")
        .iter()
        .find(|c| c["name"] == "portcullis")
        .expect("the portcullis sidecar");
    assert_eq!(sidecar["restartPolicy"], "Always");
    check_portcullis_container(pod, sidecar, &config, "sidecar.toml");
    // The application talks to the sidecar's loopback listener.
    let app = &pod["containers"][0];
    let address = app["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "TEMPORAL_ADDRESS")
        .and_then(|e| e["value"].as_str())
        .expect("TEMPORAL_ADDRESS");
    assert_eq!(address, config.listener.address);
    assert!(config.listener.plaintext);
    let namespace = app["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "TEMPORAL_NAMESPACE")
        .and_then(|e| e["value"].as_str())
        .expect("TEMPORAL_NAMESPACE");
    assert!(config.namespaces.iter().any(|ns| ns.name == namespace));
}

fn check_dashboard(path: &Path) {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("JSON");
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            assert!(expr.contains("portcullis_"), "{expr}");
            assert_eq!(
                expr.matches('(').count(),
                expr.matches(')').count(),
                "unbalanced: {expr}"
            );
        }
    }
}

/// `[Section]` → key → values (keys may repeat).
fn ini(path: &Path) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut sections: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut current = String::new();
    for line in std::fs::read_to_string(path).expect("read").lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_string();
            sections.entry(current.clone()).or_default();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{}: not KEY=VALUE: {line}", path.display()));
        assert!(!current.is_empty(), "{line} outside a section");
        sections
            .entry(current.clone())
            .or_default()
            .entry(key.to_string())
            .or_default()
            .push(value.to_string());
    }
    sections
}

fn check_systemd(path: &Path) {
    let unit = ini(path);
    for section in ["Unit", "Service", "Install"] {
        assert!(unit.contains_key(section), "no [{section}]");
    }
    let service = &unit["Service"];
    let one = |key: &str| {
        service
            .get(key)
            .and_then(|v| v.first())
            .unwrap_or_else(|| panic!("no {key}"))
            .as_str()
    };
    let start = one("ExecStart");
    let config_path = start
        .strip_prefix("/usr/local/bin/portcullis serve --config ")
        .expect("ExecStart runs portcullis serve --config FILE");
    assert!(one("ExecStartPre").contains(&format!("portcullis check --config {config_path}")));
    assert!(one("ExecReload").contains("-HUP $MAINPID"));
    assert_eq!(one("KillSignal"), "SIGTERM");
    let stop: u64 = one("TimeoutStopSec").parse().expect("seconds");
    assert!(stop > load("replica.toml").limits.shutdown_grace_seconds);
}

fn check_haproxy(path: &Path) {
    let text = std::fs::read_to_string(path).expect("read");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(lines.contains(&"mode tcp"), "a TCP load balancer");
    assert!(lines.contains(&"option httpchk GET /readyz"));
    let replica = load("replica.toml");
    let check = lines
        .iter()
        .find(|l| l.starts_with("default-server"))
        .expect("default-server");
    assert!(check.contains(&format!("check port {}", admin_port(&replica))));
    assert!(
        !check.contains("shutdown-sessions"),
        "draining replicas keep their sessions"
    );
    let ListenAddress::Tcp(listen) = replica.listen_address().expect("address") else {
        panic!("TCP");
    };
    let servers: Vec<_> = lines.iter().filter(|l| l.starts_with("server ")).collect();
    assert!(servers.len() >= 2, "several replicas");
    for server in servers {
        assert!(server.ends_with(&format!(":{}", listen.port())), "{server}");
    }
    for side in ["client", "server"] {
        let timeout = lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("timeout {side} ")))
            .and_then(|t| t.strip_suffix('s'))
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("timeout {side} in seconds"));
        assert!(timeout > 75, "long polls need timeout {side} > 75 s");
    }
}

#[test]
fn every_example_in_config_is_checked() {
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(config_dir()).expect("config/") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => check_toml(&path),
            Some("json") => check_dashboard(&path),
            Some("service") => check_systemd(&path),
            Some("cfg") => check_haproxy(&path),
            Some("yaml") if name == "kubernetes.yaml" => check_kubernetes(&path),
            Some("yaml") if name == "sidecar-pod.yaml" => check_sidecar_pod(&path),
            _ => panic!("{name}: no test checks this example; add one"),
        }
        checked.push(name);
    }
    checked.sort();
    assert_eq!(
        checked,
        [
            "cloud-credentials.toml",
            "cloud.toml",
            "grafana-dashboard.json",
            "haproxy.cfg",
            "kubernetes.yaml",
            "portcullis.service",
            "replica.toml",
            "service.toml",
            "sidecar-pod.yaml",
            "sidecar-unix.toml",
            "sidecar.toml",
        ]
    );
}

/// The service example shows both payload services: offload with its object store and raised
/// request limits, compression on a namespace of its own.
#[test]
fn service_example_offloads_and_compresses() {
    let config = load("service.toml");
    let offload = config.offload.as_ref().expect("[offload]");
    assert_eq!(offload.bucket, "corp-portcullis-payloads");
    let orders = config.namespaces.iter().find(|n| n.name == "orders");
    assert!(orders.and_then(|n| n.offload).is_some());
    let reporting = config.namespaces.iter().find(|n| n.name == "reporting");
    assert!(reporting.and_then(|n| n.compression).is_some());
    assert!(config.limits.max_request_bytes > 4 << 20);
    // Offload without an object store is refused.
    let text = std::fs::read_to_string(config_dir().join("service.toml")).expect("read");
    let start = text.find("\n[offload]\n").expect("section") + 1;
    let end = start + text[start..].find("\n\n").expect("end of section");
    let without = format!("{}{}", &text[..start], &text[end..]);
    let err = Config::from_toml(&without).expect_err("offload without [offload]");
    assert!(err.to_string().contains("[offload]"), "{err}");
}

#[test]
fn sidecar_examples_are_local_only() {
    let sidecar = load("sidecar.toml");
    match sidecar.listen_address().expect("address") {
        ListenAddress::Tcp(addr) => assert!(addr.ip().is_loopback()),
        ListenAddress::Unix(_) => panic!("expected TCP"),
    }
    let unix = load("sidecar-unix.toml");
    assert!(matches!(
        unix.listen_address().expect("address"),
        ListenAddress::Unix(_)
    ));
    // Each serves one application's namespace with that application's upstream credentials.
    for config in [&sidecar, &unix] {
        assert_eq!(config.namespaces.len(), 1);
        assert!(config.routing.default_upstream.is_none());
        let upstream = &config.upstreams[&config.namespaces[0].upstream];
        let tls = upstream.tls.as_ref().expect("upstream TLS");
        assert!(
            tls.cert.is_some() && tls.key.is_some(),
            "a client certificate"
        );
    }
    // The same sidecar file on a public address is refused.
    let text = std::fs::read_to_string(config_dir().join("sidecar.toml")).expect("read");
    let public = text.replace("127.0.0.1:7233", "0.0.0.0:7233");
    assert!(Config::from_toml(&public).is_err());
}
