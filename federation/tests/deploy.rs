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
    // The probes use the standard gRPC health service the controller serves.
    let container = &docs[2]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["readinessProbe"]["grpc"]["port"].as_i64(),
        Some(7000)
    );
}
