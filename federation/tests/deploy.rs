//! The packaging stays honest: the Kubernetes manifests parse and the policy
//! their ConfigMap carries loads with this build's schema.

use yaml_rust2::YamlLoader;

#[test]
fn kubernetes_manifests_parse_and_carry_a_valid_policy() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kubernetes/federation.yaml"
    );
    let text = std::fs::read_to_string(path).expect("manifest present");
    let docs = YamlLoader::load_from_str(&text).expect("manifests are valid YAML");
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["ConfigMap", "Service", "StatefulSet"]);
    let policy = docs[0]["data"]["federation.yaml"]
        .as_str()
        .expect("policy in the ConfigMap");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("federation.yaml");
    std::fs::write(&file, policy).expect("write");
    let policy =
        federation::policy::Policy::load_file(&file).expect("the ConfigMap's policy loads");
    assert_eq!(policy.regions.len(), 3);
    // The probes use the standard gRPC health service on the plaintext
    // health-only port the container opens (the gRPC port is mutual TLS,
    // which Kubernetes gRPC probes cannot speak).
    let container = &docs[2]["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_vec()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    let health_port = args
        .windows(2)
        .find(|w| w[0] == "--health-listen")
        .and_then(|w| w[1].rsplit_once(':'))
        .and_then(|(_, p)| p.parse::<i64>().ok())
        .expect("--health-listen HOST:PORT in the container args");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            container[probe]["grpc"]["port"].as_i64(),
            Some(health_port),
            "{probe}"
        );
    }
    // TLS and the key ring come from mounted secrets.
    let env: Vec<&str> = container["env"]
        .as_vec()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for var in [
        "FEDERATION__NODE__TLS__CA",
        "FEDERATION__NODE__TLS__CERT",
        "FEDERATION__NODE__TLS__KEY",
        "FEDERATION__NODE__KEYS__FILE",
    ] {
        assert!(env.contains(&var), "{var} not set");
    }
    assert!(!args.contains(&"--insecure"), "production runs on TLS");
}
