//! The deployment manifests under `deploy/`: every YAML file parses, the Kubernetes Deployment,
//! the ConfigMap, the compose file and `config.ha.yaml` agree on ports and environment, and both
//! configs load with `Config::load` as the relay would load them.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use report_relay::config::Config;
use serde_norway::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            out.push(path);
        }
    }
}

fn parse(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn manifest(name: &str) -> Value {
    parse(&deploy_dir().join(name))
}

/// `value[key][key]...`, panicking with the path when a key is missing.
fn at<'a>(value: &'a Value, keys: &[&str]) -> &'a Value {
    let mut current = value;
    for (i, key) in keys.iter().enumerate() {
        current = current
            .get(*key)
            .unwrap_or_else(|| panic!("missing key {}", keys[..=i].join(".")));
    }
    current
}

fn str_at<'a>(value: &'a Value, keys: &[&str]) -> &'a str {
    at(value, keys)
        .as_str()
        .unwrap_or_else(|| panic!("{} is not a string", keys.join(".")))
}

fn seq(value: &Value) -> &Vec<Value> {
    value.as_sequence().expect("a sequence")
}

/// The variable names referenced as `${NAME}` or `${NAME:-default}` (`$$` is a literal `$`).
fn referenced_vars(text: &str) -> BTreeSet<String> {
    let mut vars = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        rest = &rest[i + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            rest = after;
        } else if let Some(after) = rest.strip_prefix('{') {
            let end = after.find('}').expect("unterminated ${");
            let name = after[..end].split(":-").next().unwrap();
            vars.insert(name.to_owned());
            rest = &after[end + 1..];
        }
    }
    vars
}

/// `text` with each `${NAME}` of `vars` replaced by a dummy value.
fn substitute(text: &str, vars: &BTreeSet<String>) -> String {
    vars.iter().fold(text.to_owned(), |text, name| {
        text.replace(
            &format!("${{{name}}}"),
            &format!("dummy-{}", name.to_lowercase()),
        )
    })
}

/// Loads config text the way the relay does, with the variables given dummy values.
fn load_config(text: &str) -> Config {
    let vars = referenced_vars(text);
    let expanded = substitute(text, &vars);
    assert!(
        referenced_vars(&expanded).is_empty(),
        "only plain ${{VAR}} references are expected"
    );
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(expanded.as_bytes()).unwrap();
    file.flush().unwrap();
    Config::load(file.path()).unwrap_or_else(|e| panic!("{e}"))
}

fn configmap_text() -> String {
    let configmap = manifest("kubernetes/configmap.yaml");
    assert_eq!(str_at(&configmap, &["kind"]), "ConfigMap");
    assert_eq!(
        str_at(&configmap, &["metadata", "name"]),
        "report-relay-config"
    );
    str_at(&configmap, &["data", "config.yaml"]).to_owned()
}

fn ha_text() -> String {
    std::fs::read_to_string(deploy_dir().join("config.ha.yaml")).unwrap()
}

fn container(deployment: &Value) -> &Value {
    let containers = seq(at(deployment, &["spec", "template", "spec", "containers"]));
    assert_eq!(containers.len(), 1);
    &containers[0]
}

#[test]
fn every_yaml_file_parses() {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    files.sort();
    let names: Vec<_> = files
        .iter()
        .map(|f| f.strip_prefix(deploy_dir()).unwrap().to_owned())
        .collect();
    for expected in [
        "config.ha.yaml",
        "docker-compose.yml",
        "kubernetes/configmap.yaml",
        "kubernetes/deployment.yaml",
        "kubernetes/pdb.yaml",
        "kubernetes/secret.example.yaml",
    ] {
        assert!(
            names.contains(&PathBuf::from(expected)),
            "{expected} missing"
        );
    }
    for file in &files {
        let value = parse(file);
        assert!(value.is_mapping(), "{} is not a mapping", file.display());
    }
    // The ConfigMap's embedded config.yaml is YAML too.
    let inner: Value = serde_norway::from_str(&configmap_text()).unwrap();
    assert!(inner.is_mapping());
}

#[test]
fn deployment_probes_and_ports_match_the_config() {
    let deployment = manifest("kubernetes/deployment.yaml");
    assert_eq!(str_at(&deployment, &["kind"]), "Deployment");
    assert_eq!(str_at(&deployment, &["metadata", "name"]), "report-relay");
    assert_eq!(at(&deployment, &["spec", "replicas"]).as_u64(), Some(2));
    assert_eq!(
        at(
            &deployment,
            &["spec", "template", "spec", "terminationGracePeriodSeconds"]
        )
        .as_u64(),
        Some(30)
    );
    let c = container(&deployment);
    assert_eq!(str_at(c, &["image"]), "report-relay:latest");
    let args: Vec<_> = seq(at(c, &["args"]))
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args, ["run", "--config", "/etc/report-relay/config.yaml"]);

    let ports = seq(at(c, &["ports"]));
    assert_eq!(ports.len(), 1);
    assert_eq!(str_at(&ports[0], &["name"]), "http");
    let container_port = at(&ports[0], &["containerPort"]).as_u64().unwrap();

    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(str_at(c, &[probe, "httpGet", "path"]), path);
        let port = at(c, &[probe, "httpGet", "port"]);
        let resolved = match port {
            Value::String(name) => ports
                .iter()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
                .and_then(|p| p.get("containerPort"))
                .and_then(Value::as_u64)
                .unwrap_or_else(|| panic!("{probe} names unknown port {name}")),
            other => other.as_u64().unwrap(),
        };
        assert_eq!(resolved, container_port, "{probe} port");
    }

    for text in [configmap_text(), ha_text()] {
        let config = load_config(&text);
        assert_eq!(u64::from(config.http.listen.port()), container_port);
        assert_eq!(container_port, 9464);
        assert!(
            config.http.listen.ip().is_unspecified(),
            "listen on all interfaces"
        );
    }

    // The config comes from the ConfigMap, mounted where --config points.
    let mounts = seq(at(c, &["volumeMounts"]));
    let mount = mounts
        .iter()
        .find(|m| str_at(m, &["mountPath"]) == "/etc/report-relay")
        .expect("a mount at /etc/report-relay");
    let volume_name = str_at(mount, &["name"]);
    let volume = seq(at(&deployment, &["spec", "template", "spec", "volumes"]))
        .iter()
        .find(|v| str_at(v, &["name"]) == volume_name)
        .expect("the mounted volume");
    assert_eq!(
        str_at(volume, &["configMap", "name"]),
        "report-relay-config"
    );

    let pdb = manifest("kubernetes/pdb.yaml");
    assert_eq!(str_at(&pdb, &["kind"]), "PodDisruptionBudget");
    assert_eq!(at(&pdb, &["spec", "minAvailable"]).as_u64(), Some(1));
    assert_eq!(
        str_at(&pdb, &["spec", "selector", "matchLabels", "app"]),
        "report-relay"
    );
    assert_eq!(
        str_at(
            &deployment,
            &["spec", "template", "metadata", "labels", "app"]
        ),
        "report-relay"
    );
}

#[test]
fn config_variables_are_provided_by_the_deployment_and_compose() {
    let configmap_vars = referenced_vars(&configmap_text());
    let ha_vars = referenced_vars(&ha_text());
    let expected: BTreeSet<String> = [
        "IMAP_PASSWORD",
        "PG_PASSWORD",
        "REPLICA_ID",
        "SEATABLE_API_TOKEN",
        "TELEGRAM_BOT_TOKEN",
    ]
    .map(String::from)
    .into();
    assert_eq!(configmap_vars, expected);
    assert_eq!(ha_vars, expected);

    // Kubernetes: each from the Secret, REPLICA_ID from the pod name.
    let deployment = manifest("kubernetes/deployment.yaml");
    let secret = manifest("kubernetes/secret.example.yaml");
    assert_eq!(str_at(&secret, &["kind"]), "Secret");
    assert_eq!(str_at(&secret, &["metadata", "name"]), "report-relay");
    let env = seq(at(container(&deployment), &["env"]));
    for var in &configmap_vars {
        let entry = env
            .iter()
            .find(|e| str_at(e, &["name"]) == var)
            .unwrap_or_else(|| panic!("Deployment env lacks {var}"));
        if var == "REPLICA_ID" {
            assert_eq!(
                str_at(entry, &["valueFrom", "fieldRef", "fieldPath"]),
                "metadata.name"
            );
        } else {
            let key_ref = at(entry, &["valueFrom", "secretKeyRef"]);
            assert_eq!(str_at(key_ref, &["name"]), "report-relay");
            let key = str_at(key_ref, &["key"]);
            assert!(
                secret.get("stringData").and_then(|d| d.get(key)).is_some(),
                "secret.example.yaml lacks {key}"
            );
        }
    }

    // Compose: each relay's environment.
    let compose = manifest("docker-compose.yml");
    for service in ["relay-a", "relay-b"] {
        let environment = at(&compose, &["services", service, "environment"]);
        for var in &ha_vars {
            assert!(
                environment.get(var.as_str()).is_some(),
                "{service} environment lacks {var}"
            );
        }
        assert_eq!(str_at(environment, &["REPLICA_ID"]), service);
    }
}

#[test]
fn both_configs_load_with_postgres_state() {
    for (name, text) in [
        ("configmap", configmap_text()),
        ("config.ha.yaml", ha_text()),
    ] {
        let config = load_config(&text);
        assert!(config.state.url.is_some(), "{name}: state.url");
        assert!(config.state.path.is_none(), "{name}: state.path");
        assert_eq!(config.state.lease_secs, 15, "{name}");
        assert_eq!(
            config.state.replica_id.as_deref(),
            Some("dummy-replica_id"),
            "{name}"
        );
        assert_eq!(config.seatable.server_url, "https://cloud.seatable.io");
        assert_eq!(config.imap.host.as_deref(), Some("imap.example.com"));
        assert!(config.imap.accounts.contains_key("reports@example.com"));
    }
    // The two differ only in state.url.
    let strip = |text: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("url:"))
            .map(String::from)
            .collect()
    };
    assert_eq!(strip(&configmap_text()), strip(&ha_text()));
}

#[test]
fn compose_runs_two_relays_after_postgres() {
    let compose = manifest("docker-compose.yml");
    let services = at(&compose, &["services"]);
    for service in ["postgres", "relay-a", "relay-b"] {
        assert!(services.get(service).is_some(), "service {service} missing");
    }
    assert_eq!(str_at(services, &["postgres", "image"]), "postgres:16");
    assert!(at(services, &["postgres", "healthcheck", "test"]).is_sequence());
    for (service, host_port) in [("relay-a", 9464), ("relay-b", 9465)] {
        let relay = at(services, &[service]);
        assert_eq!(
            str_at(relay, &["depends_on", "postgres", "condition"]),
            "service_healthy",
            "{service}"
        );
        assert_eq!(str_at(relay, &["build", "context"]), "..");
        let dockerfile = relay
            .get("build")
            .and_then(|b| b.get("dockerfile"))
            .and_then(Value::as_str)
            .unwrap_or("Dockerfile");
        assert!(
            deploy_dir().join("..").join(dockerfile).is_file(),
            "{service}: {dockerfile} not found"
        );
        let ports: Vec<_> = seq(at(relay, &["ports"]))
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(ports, [format!("{host_port}:9464")], "{service}");
        let volumes: Vec<_> = seq(at(relay, &["volumes"]))
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            volumes.contains(&"./config.ha.yaml:/etc/report-relay/config.yaml:ro"),
            "{service} volumes {volumes:?}"
        );
    }
}
