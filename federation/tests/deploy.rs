//! The packaging stays honest.
//!
//! - Kubernetes: `kubectl kustomize deploy/kubernetes` renders every region;
//!   the result passes the Kubernetes schemas (`kubernetes-validate --strict`
//!   from PyPI, installed into a virtualenv under `target/` on first use) and
//!   the checks below: Pod Security "restricted", NetworkPolicy, PDB,
//!   headless Service, probes on the health port, a policy mount that
//!   updates and is reloaded, a released image tag, a ServiceMonitor, and the
//!   ConfigMap's policy loading with this build's schema. The highly
//!   available variant (`deploy/kubernetes/ha`: europe as three replicas on
//!   a CloudNativePG database) passes the schemas and is wired: selectors,
//!   anti-affinity, the probed port, the Secret key of the store URL, the
//!   replica's name from the pod, the PDB, the database's CA and Services.
//! - systemd: `systemd-analyze verify` passes, `systemd-analyze security`
//!   rates the unit at most 3, and the controller traced with `strace` from
//!   start to SIGTERM makes only system calls the unit's filter allows.
//! - Docker: the image opens and checks the health port the manifests probe.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Runs `cmd`, failing the test with a clear message when `tool` is missing
/// (`.ci/run` and the machine image provide them).
fn output(cmd: &mut Command, tool: &str) -> std::process::Output {
    cmd.output().unwrap_or_else(|e| {
        panic!("{tool} is needed by this test and could not be run ({e}); .ci/run installs it")
    })
}

// ---------------------------------------------------------------- Kubernetes

/// The rendered manifests (every region), as text and parsed.
fn render() -> (String, Vec<Yaml>) {
    render_dir("deploy/kubernetes")
}

/// The manifests of the kustomization in `dir`, as text and parsed.
fn render_dir(dir: &str) -> (String, Vec<Yaml>) {
    let out = output(
        Command::new("kubectl")
            .arg("kustomize")
            .arg(repo().join(dir)),
        "kubectl (with its built-in kustomize)",
    );
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let docs = YamlLoader::load_from_str(&text).expect("rendered manifests are YAML");
    (text, docs)
}

fn kind<'a>(docs: &'a [Yaml], k: &str) -> Vec<&'a Yaml> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(k))
        .collect()
}

fn name(doc: &Yaml) -> &str {
    doc["metadata"]["name"].as_str().expect("metadata.name")
}

fn labels(y: &Yaml) -> BTreeMap<String, String> {
    y.as_hash()
        .map(|h| {
            h.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a `matchLabels`-style selector (non-empty) selects `target`.
fn selects(selector: &Yaml, target: &BTreeMap<String, String>) -> bool {
    let sel = labels(selector);
    !sel.is_empty() && sel.iter().all(|(k, v)| target.get(k) == Some(v))
}

fn strings(y: &Yaml) -> Vec<&str> {
    y.as_vec()
        .map(|v| v.iter().filter_map(Yaml::as_str).collect())
        .unwrap_or_default()
}

fn flag<'a>(args: &[&'a str], name: &str) -> Option<&'a str> {
    args.windows(2).find(|w| w[0] == name).map(|w| w[1])
}

fn port_of(addr: &str) -> i64 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("`{addr}` has no port"))
}

/// A virtualenv with `kubernetes-validate` (Kubernetes JSON schemas
/// bundled), created once per target dir.
/// The kubernetes-validate executable, installed once per target directory.
/// Tests run in parallel: the first caller installs it while the others wait
/// (two pip installs into one venv corrupt its schema files).
fn kubernetes_validate() -> PathBuf {
    static INSTALLED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(install_kubernetes_validate).clone()
}

fn install_kubernetes_validate() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kubernetes-validate-venv");
    let exe = venv.join("bin").join("kubernetes-validate");
    let ready = venv.join(".installed-1.37.0");
    if !ready.exists() {
        let status = output(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3",
        )
        .status;
        assert!(status.success(), "creating {}", venv.display());
        let out = output(
            Command::new(venv.join("bin").join("python")).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "kubernetes-validate==1.37.0",
            ]),
            "pip",
        );
        assert!(
            out.status.success(),
            "pip install kubernetes-validate failed (PyPI unreachable?): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&ready, "ok").expect("marker");
    }
    exe
}

#[test]
fn kubernetes_manifests_pass_the_schemas() {
    let (text, docs) = render();
    passes_the_schemas(&text, &docs);
}

fn passes_the_schemas(text: &str, docs: &[Yaml]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, text).expect("write");
    let exe = kubernetes_validate();
    // The newest schemas bundled, and the oldest Kubernetes we support.
    for version in [None, Some("1.29.0")] {
        let mut cmd = Command::new(&exe);
        cmd.arg("--strict");
        if let Some(v) = version {
            cmd.args(["-k", v]);
        }
        let out = output(cmd.arg(&file), "kubernetes-validate");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !report.contains("ERROR"),
            "schema check ({version:?}) failed:\n{report}"
        );
        // Every built-in object was checked against a schema; only the
        // custom resources (ServiceMonitor, CloudNativePG's Cluster, checked
        // by hand below) have none.
        let passed = report.matches(" passed for resource ").count();
        let custom = kind(docs, "ServiceMonitor").len() + kind(docs, "Cluster").len();
        assert_eq!(passed + custom, docs.len(), "{report}");
    }
}

#[test]
fn kubernetes_manifests_run_every_region_safely() {
    let (_, docs) = render();
    // The namespace enforces Pod Security "restricted"; everything is in it.
    let ns = kind(&docs, "Namespace");
    assert_eq!(ns.len(), 1);
    let namespace = name(ns[0]);
    assert_eq!(
        ns[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str(),
        Some("restricted")
    );
    for d in &docs {
        if d["kind"].as_str() != Some("Namespace") {
            assert_eq!(
                d["metadata"]["namespace"].as_str(),
                Some(namespace),
                "{} {} outside the namespace",
                d["kind"].as_str().unwrap_or("?"),
                name(d)
            );
        }
    }

    // The policy in the ConfigMap loads with this build's schema.
    let maps = kind(&docs, "ConfigMap");
    assert_eq!(maps.len(), 1, "one policy for the federation");
    let policy_map = name(maps[0]);
    let policy_text = maps[0]["data"]["federation.yaml"]
        .as_str()
        .expect("policy in the ConfigMap");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("federation.yaml");
    std::fs::write(&file, policy_text).expect("write");
    let policy =
        federation::policy::Policy::load_file(&file).expect("the ConfigMap's policy loads");

    let statefulsets = kind(&docs, "StatefulSet");
    let services = kind(&docs, "Service");
    assert_eq!(
        statefulsets.len(),
        policy.regions.len(),
        "one StatefulSet per region of the policy"
    );
    let pod_labels: Vec<BTreeMap<String, String>> = statefulsets
        .iter()
        .map(|s| labels(&s["spec"]["template"]["metadata"]["labels"]))
        .collect();
    let only_pods_of = |selector: &Yaml, index: usize| {
        pod_labels
            .iter()
            .enumerate()
            .all(|(i, l)| selects(selector, l) == (i == index))
    };

    for region in &policy.regions {
        let (index, sts) = statefulsets
            .iter()
            .enumerate()
            .find(|(_, s)| {
                s["spec"]["template"]["spec"]["containers"][0]["env"]
                    .as_vec()
                    .into_iter()
                    .flatten()
                    .any(|e| {
                        e["name"].as_str() == Some("FEDERATION__NODE__REGION")
                            && e["value"].as_str() == Some(region.name.as_str())
                    })
            })
            .unwrap_or_else(|| panic!("no StatefulSet serves region {}", region.name));
        let what = format!("{} ({})", name(sts), region.name);
        let spec = &sts["spec"];
        assert_eq!(spec["replicas"].as_i64(), Some(1), "{what}");
        assert!(
            selects(&spec["selector"]["matchLabels"], &pod_labels[index]),
            "{what}: selector"
        );
        let pod = &spec["template"]["spec"];
        let containers = pod["containers"].as_vec().expect("containers");
        assert_eq!(containers.len(), 1, "{what}");
        let c = &containers[0];

        // The region's endpoint in the policy is its client Service.
        let rest = region
            .endpoint
            .split_once("://")
            .map(|(_, r)| r)
            .expect("endpoint URL");
        let (host, port) = rest.rsplit_once(':').expect("endpoint with a port");
        let port: i64 = port.parse().expect("port");
        let svc = services
            .iter()
            .find(|s| name(s) == host)
            .unwrap_or_else(|| panic!("{what}: no Service `{host}` for its endpoint"));
        assert!(
            only_pods_of(&svc["spec"]["selector"], index),
            "{what}: Service {host} selects exactly its pods"
        );
        assert!(
            svc["spec"]["ports"]
                .as_vec()
                .expect("ports")
                .iter()
                .any(|p| p["port"].as_i64() == Some(port)),
            "{what}: Service {host} has port {port}"
        );

        // The headless Service governs the StatefulSet.
        let governing = spec["serviceName"].as_str().expect("serviceName");
        let headless = services
            .iter()
            .find(|s| name(s) == governing)
            .unwrap_or_else(|| panic!("{what}: no Service `{governing}`"));
        assert_eq!(
            headless["spec"]["clusterIP"].as_str(),
            Some("None"),
            "{what}: headless"
        );
        assert!(only_pods_of(&headless["spec"]["selector"], index), "{what}");

        // Pod Security "restricted".
        let psc = &pod["securityContext"];
        let csc = &c["securityContext"];
        let either = |key: &str| {
            if csc[key].is_badvalue() {
                &psc[key]
            } else {
                &csc[key]
            }
        };
        assert_eq!(either("runAsNonRoot").as_bool(), Some(true), "{what}");
        assert_ne!(either("runAsUser").as_i64(), Some(0), "{what}");
        assert_eq!(
            either("seccompProfile")["type"].as_str(),
            Some("RuntimeDefault"),
            "{what}"
        );
        assert_eq!(
            csc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{what}"
        );
        assert_ne!(csc["privileged"].as_bool(), Some(true), "{what}");
        assert_eq!(strings(&csc["capabilities"]["drop"]), ["ALL"], "{what}");
        assert!(csc["capabilities"]["add"].is_badvalue(), "{what}");
        assert_eq!(
            csc["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{what}"
        );
        for host in ["hostNetwork", "hostPID", "hostIPC"] {
            assert_ne!(pod[host].as_bool(), Some(true), "{what}: {host}");
        }
        let volumes = pod["volumes"].as_vec().expect("volumes");
        for v in volumes {
            let allowed = [
                "configMap",
                "secret",
                "emptyDir",
                "persistentVolumeClaim",
                "projected",
                "downwardAPI",
                "csi",
                "ephemeral",
            ];
            let types: Vec<&str> = v
                .as_hash()
                .expect("volume")
                .keys()
                .filter_map(Yaml::as_str)
                .filter(|k| *k != "name")
                .collect();
            assert!(
                types.iter().all(|t| allowed.contains(t)),
                "{what}: volume {types:?}"
            );
        }
        for p in c["ports"].as_vec().expect("ports") {
            assert!(p["hostPort"].is_badvalue(), "{what}: hostPort");
        }

        // Probes: startup, readiness and liveness on the plaintext health port.
        let args = strings(&c["args"]);
        let health_port = port_of(flag(&args, "--health-listen").expect("--health-listen"));
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(
                c[probe]["grpc"]["port"].as_i64(),
                Some(health_port),
                "{what}: {probe}"
            );
        }
        assert_eq!(
            port_of(flag(&args, "--listen").expect("--listen")),
            port,
            "{what}: listens on its endpoint's port"
        );
        assert!(
            !args.contains(&"--insecure"),
            "{what}: production runs on TLS"
        );

        // Mounts: where each path the container uses comes from.
        let mounts = c["volumeMounts"].as_vec().expect("volumeMounts");
        let volume_of = |path: &str| {
            let m = mounts
                .iter()
                .filter(|m| {
                    let at = m["mountPath"].as_str().unwrap_or("");
                    Path::new(path).starts_with(at)
                })
                .max_by_key(|m| m["mountPath"].as_str().unwrap_or("").len())
                .unwrap_or_else(|| panic!("{what}: nothing mounted at {path}"));
            let vname = m["name"].as_str().expect("mount name");
            let v = volumes
                .iter()
                .find(|v| v["name"].as_str() == Some(vname))
                .cloned();
            (m.clone(), vname.to_string(), v)
        };

        // The policy: the ConfigMap as a directory (no subPath, which never
        // updates), re-read by the controller.
        let config = flag(&args, "--config").expect("--config");
        let (m, _, v) = volume_of(config);
        assert!(m["subPath"].is_badvalue(), "{what}: subPath never updates");
        let v = v.expect("policy volume");
        assert_eq!(v["configMap"]["name"].as_str(), Some(policy_map), "{what}");
        assert_eq!(
            Path::new(m["mountPath"].as_str().expect("path")).join("federation.yaml"),
            Path::new(config),
            "{what}: --config is the ConfigMap's key"
        );
        let env: BTreeMap<&str, &str> = c["env"]
            .as_vec()
            .expect("env")
            .iter()
            .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
            .collect();
        let poll = env
            .get("FEDERATION__NODE__TIMERS__POLICY_POLL")
            .expect("policy_poll set: a ConfigMap update is reloaded");
        let poll = federation::config::parse_duration(poll).expect("a duration");
        assert!(!poll.is_zero(), "{what}: policy_poll on");

        // State on the claim; the root filesystem is read-only.
        let data = flag(&args, "--data-dir").expect("--data-dir");
        let (_, vname, v) = volume_of(data);
        assert!(v.is_none(), "{what}: data on a volume claim");
        assert!(
            spec["volumeClaimTemplates"]
                .as_vec()
                .expect("volumeClaimTemplates")
                .iter()
                .any(|t| t["metadata"]["name"].as_str() == Some(&vname)),
            "{what}: data volume is a claim"
        );
        let (_, _, tmp) = volume_of("/tmp/x");
        assert!(
            !tmp.expect("/tmp volume")["emptyDir"].is_badvalue(),
            "{what}: /tmp"
        );

        // TLS and the key ring come from the region's secrets.
        for var in [
            "FEDERATION__NODE__TLS__CA",
            "FEDERATION__NODE__TLS__CERT",
            "FEDERATION__NODE__TLS__KEY",
            "FEDERATION__NODE__KEYS__FILE",
        ] {
            let path = env.get(var).unwrap_or_else(|| panic!("{what}: {var}"));
            let (_, _, v) = volume_of(path);
            assert!(
                !v.expect("volume")["secret"].is_badvalue(),
                "{what}: {var} from a secret"
            );
        }
        let (_, _, tls) = volume_of(env["FEDERATION__NODE__TLS__KEY"]);
        let secret = tls.expect("tls volume")["secret"]["secretName"]
            .as_str()
            .expect("secretName")
            .to_string();
        assert!(
            secret.contains(&host.replace("federation-", "")),
            "{what}: its own TLS secret, not another region's ({secret})"
        );

        // A released image, never a moving tag.
        let image = c["image"].as_str().expect("image");
        let (_, tag) = image
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{what}: `{image}` has no tag"));
        assert!(!["dev", "latest"].contains(&tag), "{what}: {image}");
        assert_eq!(tag, env!("CARGO_PKG_VERSION"), "{what}: {image}");

        // A PodDisruptionBudget for exactly this region's pods.
        let pdbs: Vec<_> = kind(&docs, "PodDisruptionBudget")
            .into_iter()
            .filter(|p| only_pods_of(&p["spec"]["selector"]["matchLabels"], index))
            .collect();
        assert_eq!(pdbs.len(), 1, "{what}: one PDB");
    }

    // NetworkPolicy: peers and clients to the gRPC port, monitoring only to
    // the admin port, nothing else.
    let c0 = &statefulsets[0]["spec"]["template"]["spec"]["containers"][0];
    let named: BTreeMap<String, i64> = c0["ports"]
        .as_vec()
        .expect("ports")
        .iter()
        .filter_map(|p| {
            Some((
                p["name"].as_str()?.to_string(),
                p["containerPort"].as_i64()?,
            ))
        })
        .collect();
    let resolve = |p: &Yaml| -> i64 {
        p.as_i64()
            .or_else(|| p.as_str().and_then(|n| named.get(n).copied()))
            .unwrap_or_else(|| panic!("unknown port {p:?}"))
    };
    let netpols = kind(&docs, "NetworkPolicy");
    assert_eq!(netpols.len(), 1);
    let np = &netpols[0]["spec"];
    for l in &pod_labels {
        assert!(
            selects(&np["podSelector"]["matchLabels"], l),
            "the NetworkPolicy covers every controller"
        );
    }
    assert!(strings(&np["policyTypes"]).contains(&"Ingress"));
    let grpc = named["grpc"];
    let admin = named["admin"];
    let mut grpc_seen = false;
    let mut admin_seen = false;
    for rule in np["ingress"].as_vec().expect("ingress rules") {
        let ports: Vec<i64> = rule["ports"]
            .as_vec()
            .expect("every rule names its ports")
            .iter()
            .map(|p| resolve(&p["port"]))
            .collect();
        let from = rule["from"].as_vec().expect("every rule names its peers");
        assert!(!from.is_empty(), "a rule open to everyone");
        for p in &ports {
            if *p == grpc {
                grpc_seen = true;
                assert!(
                    from.iter().any(|f| f["namespaceSelector"].is_badvalue()
                        && pod_labels
                            .iter()
                            .all(|l| selects(&f["podSelector"]["matchLabels"], l))),
                    "peers (the controllers) reach the gRPC port"
                );
            } else if *p == admin {
                admin_seen = true;
                assert_eq!(ports, [admin], "the admin port has a rule of its own");
                for f in from {
                    assert_eq!(
                        f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                            .as_str(),
                        Some("monitoring"),
                        "only monitoring reaches the admin port"
                    );
                }
            } else {
                panic!("port {p} opened by the NetworkPolicy");
            }
        }
    }
    assert!(grpc_seen && admin_seen, "gRPC and admin rules");

    // ServiceMonitor: scrapes the admin port through the headless Services.
    let monitors = kind(&docs, "ServiceMonitor");
    assert_eq!(monitors.len(), 1);
    let sm = &monitors[0];
    assert_eq!(sm["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    let selected: Vec<&&Yaml> = services
        .iter()
        .filter(|s| {
            selects(
                &sm["spec"]["selector"]["matchLabels"],
                &labels(&s["metadata"]["labels"]),
            )
        })
        .collect();
    assert_eq!(
        selected.len(),
        statefulsets.len(),
        "one scraped Service per region"
    );
    let endpoints = sm["spec"]["endpoints"].as_vec().expect("endpoints");
    assert_eq!(endpoints.len(), 1);
    let port_name = endpoints[0]["port"].as_str().expect("endpoint port name");
    assert_eq!(endpoints[0]["path"].as_str(), Some("/metrics"));
    for s in selected {
        let p = s["spec"]["ports"]
            .as_vec()
            .expect("ports")
            .iter()
            .find(|p| p["name"].as_str() == Some(port_name))
            .unwrap_or_else(|| panic!("{} has no port `{port_name}`", name(s)));
        assert_eq!(p["port"].as_i64(), Some(admin), "{}", name(s));
    }
}

// ------------------------------------------- Kubernetes: a region highly available

#[test]
fn kubernetes_ha_manifests_pass_the_schemas() {
    let (text, docs) = render_dir("deploy/kubernetes/ha");
    passes_the_schemas(&text, &docs);
}

/// The value of env var `var` of container `c`, or its `valueFrom`.
fn env_of<'a>(c: &'a Yaml, var: &str) -> &'a Yaml {
    c["env"]
        .as_vec()
        .expect("env")
        .iter()
        .find(|e| e["name"].as_str() == Some(var))
        .unwrap_or_else(|| panic!("no env {var}"))
}

#[test]
fn kubernetes_ha_region_is_three_replicas_on_its_database_wired_together() {
    let (_, docs) = render_dir("deploy/kubernetes/ha");
    let deployments = kind(&docs, "Deployment");
    assert_eq!(deployments.len(), 1, "europe's replicas");
    let d = deployments[0];
    let what = name(d);
    let spec = &d["spec"];
    assert_eq!(spec["replicas"].as_i64(), Some(3), "{what}");
    let pod_labels = labels(&spec["template"]["metadata"]["labels"]);
    assert!(
        selects(&spec["selector"]["matchLabels"], &pod_labels),
        "{what}: selector"
    );
    // No other workload's pods carry these labels (the selectors below would
    // take them in).
    for sts in kind(&docs, "StatefulSet") {
        let other = labels(&sts["spec"]["template"]["metadata"]["labels"]);
        assert!(
            !selects(&spec["selector"]["matchLabels"], &other),
            "{what} selects {}'s pods",
            name(sts)
        );
    }
    let pod = &spec["template"]["spec"];
    let c = &pod["containers"][0];

    // One replica per node.
    let anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        .as_vec()
        .expect("required pod anti-affinity");
    assert!(
        anti.iter().any(
            |t| t["topologyKey"].as_str() == Some("kubernetes.io/hostname")
                && selects(&t["labelSelector"]["matchLabels"], &pod_labels)
        ),
        "{what}: anti-affinity on the host name over its own pods: {anti:?}"
    );

    // Readiness on the health port, which the container declares.
    let args = strings(&c["args"]);
    let health = port_of(flag(&args, "--health-listen").expect("--health-listen"));
    let declared: Vec<i64> = c["ports"]
        .as_vec()
        .expect("ports")
        .iter()
        .filter_map(|p| p["containerPort"].as_i64())
        .collect();
    assert!(declared.contains(&health), "{what}: health port declared");
    assert_eq!(
        c["readinessProbe"]["grpc"]["port"].as_i64(),
        Some(health),
        "{what}: readiness on the health port"
    );
    let live = &c["livenessProbe"];
    assert!(
        live["grpc"]["port"].as_i64() == Some(health)
            || live["tcpSocket"]["port"].as_i64() == Some(health),
        "{what}: liveness on the health port"
    );

    // The database store, its URL from a Secret that exists with that key,
    // the replica's name from its pod.
    assert_eq!(
        env_of(c, "FEDERATION__NODE__STORE__BACKEND")["value"].as_str(),
        Some("postgres")
    );
    assert_eq!(
        env_of(c, "FEDERATION__NODE__REPLICA")["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.name"),
        "{what}: node.replica from the pod name"
    );
    let secret_ref = &env_of(c, "FEDERATION__NODE__STORE__URL")["valueFrom"]["secretKeyRef"];
    let secret_name = secret_ref["name"].as_str().expect("secretKeyRef.name");
    let secret_key = secret_ref["key"].as_str().expect("secretKeyRef.key");
    let secret = kind(&docs, "Secret")
        .into_iter()
        .find(|s| name(s) == secret_name)
        .unwrap_or_else(|| panic!("{what}: no example Secret {secret_name}"));
    let url = secret["stringData"][secret_key]
        .as_str()
        .unwrap_or_else(|| panic!("Secret {secret_name} has no key {secret_key}"));
    federation::config::parse_duration(
        env_of(c, "FEDERATION__NODE__STORE__TIMEOUT")["value"]
            .as_str()
            .expect("node.store.timeout"),
    )
    .expect("a duration");

    // The URL names the CloudNativePG cluster's primary, verify-full, with
    // the cluster's CA mounted where sslrootcert says.
    let clusters = kind(&docs, "Cluster");
    assert_eq!(clusters.len(), 1, "europe's database");
    let db = clusters[0];
    assert_eq!(db["apiVersion"].as_str(), Some("postgresql.cnpg.io/v1"));
    assert_eq!(db["spec"]["instances"].as_i64(), Some(3), "three instances");
    assert!(
        db["spec"]["postgresql"]["synchronous"]["number"]
            .as_i64()
            .is_some_and(|n| n >= 1)
            || db["spec"]["minSyncReplicas"]
                .as_i64()
                .is_some_and(|n| n >= 1),
        "synchronous replication"
    );
    let host = url
        .split_once('@')
        .and_then(|(_, rest)| rest.split([':', '/']).next())
        .expect("a host in the URL");
    assert_eq!(host, format!("{}-rw", name(db)), "the primary's Service");
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    let param = |k: &str| {
        query
            .split('&')
            .find_map(|p| p.strip_prefix(&format!("{k}=")))
    };
    assert_eq!(param("sslmode"), Some("verify-full"), "{url}");
    let rootcert = param("sslrootcert").expect("sslrootcert");
    let mounts = c["volumeMounts"].as_vec().expect("volumeMounts");
    let mount = mounts
        .iter()
        .find(|m| Path::new(rootcert).starts_with(m["mountPath"].as_str().unwrap_or("/nowhere")))
        .unwrap_or_else(|| panic!("{what}: nothing mounted at {rootcert}"));
    let volume = pod["volumes"]
        .as_vec()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the CA's volume");
    assert_eq!(
        volume["secret"]["secretName"].as_str(),
        Some(format!("{}-ca", name(db)).as_str()),
        "{what}: the cluster's CA"
    );

    // The PDB selects the Deployment's pods and keeps two of three.
    let pdbs: Vec<_> = kind(&docs, "PodDisruptionBudget")
        .into_iter()
        .filter(|p| selects(&p["spec"]["selector"]["matchLabels"], &pod_labels))
        .collect();
    assert_eq!(pdbs.len(), 1, "{what}: one PDB");
    let pdb = &pdbs[0]["spec"];
    assert!(
        pdb["minAvailable"].as_i64() == Some(2) || pdb["maxUnavailable"].as_i64() == Some(1),
        "{what}: {pdb:?}"
    );

    // The policy's endpoint of europe is a Service over exactly these pods,
    // and a headless Service resolves to every replica.
    let maps = kind(&docs, "ConfigMap");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("federation.yaml");
    std::fs::write(
        &file,
        maps[0]["data"]["federation.yaml"].as_str().expect("policy"),
    )
    .expect("write");
    let policy = federation::policy::Policy::load_file(&file).expect("policy loads");
    let europe = policy.region("europe").expect("europe in the policy");
    let endpoint_host = europe
        .endpoint
        .split_once("://")
        .and_then(|(_, r)| r.rsplit_once(':'))
        .map(|(h, _)| h)
        .expect("endpoint host");
    let services = kind(&docs, "Service");
    let endpoint = services
        .iter()
        .find(|s| name(s) == endpoint_host)
        .unwrap_or_else(|| panic!("no Service {endpoint_host}"));
    assert!(selects(&endpoint["spec"]["selector"], &pod_labels));
    let headless: Vec<_> = services
        .iter()
        .filter(|s| {
            s["spec"]["clusterIP"].as_str() == Some("None")
                && selects(&s["spec"]["selector"], &pod_labels)
        })
        .collect();
    assert_eq!(headless.len(), 1, "one Service resolving to every replica");
    assert!(
        headless[0]["spec"]["ports"]
            .as_vec()
            .expect("ports")
            .iter()
            .any(|p| p["name"].as_str() == Some("grpc")),
        "its gRPC port"
    );
    // Every other Service of the render selects nobody of europe's.
    for s in &services {
        if name(s) != endpoint_host && name(s) != name(headless[0]) {
            assert!(
                !selects(&s["spec"]["selector"], &pod_labels),
                "{} selects europe's replicas",
                name(s)
            );
        }
    }

    // Pod Security "restricted", as the namespace enforces.
    let csc = &c["securityContext"];
    assert_eq!(csc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(csc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(strings(&csc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(csc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(
        csc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    assert!(!args.contains(&"--insecure"));
}

// ------------------------------------------------------------------- systemd

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/federation.service"))
        .expect("unit present");
    for line in [
        "Type=notify",
        "UMask=0077",
        "DynamicUser=yes",
        "CapabilityBoundingSet=",
        "PrivateDevices=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "StateDirectoryMode=0700",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing `{line}`");
    }
    assert!(
        unit.lines()
            .any(|l| l.starts_with("SystemCallFilter=@system-service")),
        "a system call filter"
    );
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let args: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(
        flag(&args, "--data-dir"),
        Some("/var/lib/federation"),
        "the data dir is the StateDirectory"
    );
    assert!(!args.contains(&"--insecure"));
    // `verify` checks that ExecStart exists: point it at this build.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("federation.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/federation",
            env!("CARGO_BIN_EXE_federation"),
        ),
    )
    .expect("write");
    let out = output(
        Command::new("systemd-analyze").arg("verify").arg(&path),
        "systemd-analyze (Debian package systemd)",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("federation.service"),
        "systemd-analyze verify: {stderr}"
    );
    let out = output(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&path),
        "systemd-analyze",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for federation.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure score in systemd-analyze security: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(score <= 3.0, "exposure {score} > 3:\n{text}");
}

// -------------------------------------------------------------------- Docker

#[test]
fn dockerfile_opens_and_checks_the_health_port_the_manifests_probe() {
    let dockerfile =
        std::fs::read_to_string(repo().join("deploy/Dockerfile")).expect("Dockerfile present");
    let exposed: Vec<i64> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| l.split_whitespace().filter_map(|p| p.parse().ok()))
        .collect();
    let cmd = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("CMD");
    let cmd: Vec<&str> = cmd
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|a| a.trim().trim_matches('"'))
        .collect();
    let health = port_of(flag(&cmd, "--health-listen").expect("CMD sets --health-listen"));
    let listen = port_of(flag(&cmd, "--listen").expect("--listen"));
    let admin = port_of(flag(&cmd, "--admin-listen").expect("--admin-listen"));
    for p in [health, listen, admin] {
        assert!(exposed.contains(&p), "port {p} not EXPOSEd ({exposed:?})");
    }
    // The manifests probe the same port.
    let (_, docs) = render();
    for sts in kind(&docs, "StatefulSet") {
        let c = &sts["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["readinessProbe"]["grpc"]["port"].as_i64(), Some(health));
    }
    // HEALTHCHECK runs `federation health` against it; the subcommand exists.
    let check = dockerfile
        .split("HEALTHCHECK")
        .nth(1)
        .and_then(|rest| rest.split("CMD").nth(1))
        .and_then(|rest| rest.lines().next())
        .expect("a HEALTHCHECK with a CMD");
    assert!(
        check.contains("\"health\"") && check.contains(&format!("127.0.0.1:{health}")),
        "HEALTHCHECK asks the health port: {check}"
    );
    let out = output(
        Command::new(env!("CARGO_BIN_EXE_federation")).args(["health", "--help"]),
        "federation",
    );
    assert!(out.status.success(), "`federation health` exists");
    // The image is the production build: no `demo` feature, so no test
    // harness (federation-sandbox) in the controller's binary.
    assert!(
        dockerfile.contains("cargo build --release --locked --no-default-features -p federation"),
        "the image builds federation with --no-default-features"
    );
    // The build context leaves build output and history out.
    let ignore =
        std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore present");
    for entry in ["target", ".git"] {
        assert!(ignore.lines().any(|l| l == entry), ".dockerignore: {entry}");
    }
}

/// The unit's `SystemCallFilter=` lines: (allowed, denied), groups expanded
/// by `systemd-analyze syscall-filter`.
fn unit_syscall_filter(unit: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    fn expand(item: &str, into: &mut BTreeSet<String>, depth: usize) {
        assert!(depth < 10, "syscall groups nest too deep at {item}");
        if !item.starts_with('@') {
            into.insert(item.to_string());
            return;
        }
        let out = output(
            Command::new("systemd-analyze").args(["syscall-filter", "--no-pager", item]),
            "systemd-analyze",
        );
        assert!(
            out.status.success(),
            "systemd-analyze syscall-filter {item}"
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        for line in text.lines().skip(1) {
            let entry = line.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            expand(entry, into, depth + 1);
        }
    }
    let mut allowed = BTreeSet::new();
    let mut denied = BTreeSet::new();
    for line in unit.lines() {
        let Some(rest) = line.strip_prefix("SystemCallFilter=") else {
            continue;
        };
        let (set, items) = match rest.strip_prefix('~') {
            Some(items) => (&mut denied, items),
            None => (&mut allowed, rest),
        };
        for item in items.split_whitespace() {
            expand(item, set, 0);
        }
    }
    (allowed, denied)
}

/// The controller, traced with `strace -f -c` from start to SIGTERM (ready,
/// a task submitted and stored, a health check), makes only system calls the
/// unit's filter allows: the filter will not kill (or EPERM) it in service.
#[test]
fn controller_system_calls_pass_the_units_filter() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/federation.service"))
        .expect("unit present");
    let (allowed, denied) = unit_syscall_filter(&unit);
    assert!(allowed.contains("read") && denied.contains("reboot"));

    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("federation.yaml");
    std::fs::write(
        &policy,
        r#"
federation:
  name: "Solo Federation"
  regions:
    - name: "solo"
      endpoint: "http://127.0.0.1:7000"
      compliance: ["GDPR"]
  routing_rules:
    - name: "everyone"
      default: true
      primary_region: "solo"
  data_synchronization:
    enabled: false
"#,
    )
    .expect("write policy");
    let notify = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&notify).expect("bind notify");
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    let summary = dir.path().join("strace.txt");
    // The controller's stdout stays empty (logs go to stderr): give it a port.
    let addr = federation_sandbox::free_port()
        .expect("a free port")
        .to_string();
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-c", "-o"])
        .arg(&summary)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_federation"))
        .args(["serve", "--insecure", "--region", "solo"])
        .arg("--config")
        .arg(&policy)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--listen")
        .arg(&addr)
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(["--health-listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &notify)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut strace = federation_sandbox::ChildGuard::spawn_group("strace federation", &mut cmd)
        .unwrap_or_else(|e| panic!("strace (Debian package strace) could not be run: {e:#}"));
    let mut buf = [0u8; 256];
    let mut ready = false;
    for _ in 0..10 {
        let n = socket.recv(&mut buf).expect("a notification within 30 s");
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "READY=1")
        {
            ready = true;
            break;
        }
    }
    assert!(ready, "READY=1");
    let out = output(
        Command::new(env!("CARGO_BIN_EXE_federation"))
            .args(["submit", "--insecure", "--controller", &addr])
            .args(["--attr", "customer_region=DE"]),
        "federation",
    );
    assert!(out.status.success(), "submit: {out:?}");
    // SIGTERM to the controller (strace's child), then strace writes the summary.
    let strace_pid = strace.pid().expect("pid");
    let children =
        std::fs::read_to_string(format!("/proc/{strace_pid}/task/{strace_pid}/children"))
            .expect("strace's children");
    let controller = children
        .split_whitespace()
        .next()
        .expect("the controller runs under strace");
    let status = Command::new("kill")
        .args(["-TERM", controller])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = strace
        .wait_timeout(std::time::Duration::from_secs(60))
        .expect("the controller stops on SIGTERM");
    assert!(exit.success(), "{exit:?}");
    let text = std::fs::read_to_string(&summary).expect("strace summary");
    let used: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('%') && !l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last())
        .filter(|s| *s != "total")
        .collect();
    assert!(
        used.contains(&"fsync") || used.contains(&"fdatasync"),
        "{text}"
    );
    let refused: Vec<&&str> = used
        .iter()
        .filter(|s| !allowed.contains(**s) || denied.contains(**s))
        .collect();
    assert!(
        refused.is_empty(),
        "system calls the unit's filter refuses: {refused:?}\n{text}"
    );
}

/// The agents' autoscaling example (`deploy/kubernetes/agents/europe`): it
/// renders, its built-in objects pass the schemas, the KEDA ScaledObject
/// scales the agents' Deployment, and its query names metrics a real
/// controller exports, selected by the label the ServiceMonitor adds.
#[test]
fn agent_autoscaling_is_wired_to_metrics_the_controller_exports() {
    let dir_arg = repo().join("deploy/kubernetes/agents/europe");
    let out = output(
        Command::new("kubectl").arg("kustomize").arg(&dir_arg),
        "kubectl (with its built-in kustomize)",
    );
    assert!(
        out.status.success(),
        "kubectl kustomize agents/europe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let docs = YamlLoader::load_from_str(&text).expect("YAML");
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("agents.yaml");
    std::fs::write(&file, &text).expect("write");
    let report = output(
        Command::new(kubernetes_validate())
            .arg("--strict")
            .arg(&file),
        "kubernetes-validate",
    );
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&report.stdout),
        String::from_utf8_lossy(&report.stderr)
    );
    assert!(!report.contains("ERROR"), "{report}");
    let scaled = kind(&docs, "ScaledObject");
    assert_eq!(
        report.matches(" passed for resource ").count() + scaled.len(),
        docs.len(),
        "{report}"
    );

    let deployments = kind(&docs, "Deployment");
    assert_eq!((deployments.len(), scaled.len()), (1, 1));
    let deployment = deployments[0];
    let so = scaled[0];
    assert_eq!(
        so["spec"]["scaleTargetRef"]["name"].as_str(),
        Some(name(deployment)),
        "the ScaledObject scales the agents"
    );
    let pod = &deployment["spec"]["template"]["spec"];
    let args = strings(&pod["containers"][0]["args"]);
    assert_eq!(flag(&args, "--region"), Some("europe"));
    assert!(args.contains(&"agent"), "{args:?}");
    let c = &pod["containers"][0]["securityContext"];
    assert_eq!(c["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(c["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(strings(&c["capabilities"]["drop"]), ["ALL"]);
    assert!(
        so["spec"]["minReplicaCount"].as_i64() >= Some(0)
            && so["spec"]["maxReplicaCount"].as_i64() > so["spec"]["minReplicaCount"].as_i64()
    );
    let trigger = &so["spec"]["triggers"][0];
    assert_eq!(trigger["type"].as_str(), Some("prometheus"));
    let threshold: f64 = trigger["metadata"]["threshold"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("a numeric threshold");
    assert!(threshold > 0.0);
    let query = trigger["metadata"]["query"].as_str().expect("query");
    let used: BTreeSet<&str> = query
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("federation_") && !w.starts_with("federation_io_"))
        .collect();
    assert!(!used.is_empty(), "{query}");
    assert!(
        query.contains("federation_io_region=\"europe\""),
        "selects europe by the scraped pod label: {query}"
    );
    // The ServiceMonitor puts that label on every series.
    let (_, fed) = render();
    let monitors = kind(&fed, "ServiceMonitor");
    assert!(
        strings(&monitors[0]["spec"]["podTargetLabels"]).contains(&"federation.io/region"),
        "the ServiceMonitor must copy the pod's region label"
    );

    // A real controller exports every metric the query names.
    let policy = tmp.path().join("federation.yaml");
    std::fs::write(
        &policy,
        "federation:\n  name: Solo\n  regions:\n    - name: europe\n      endpoint: http://127.0.0.1:7000\n  routing_rules:\n    - default: true\n      primary_region: europe\n  data_synchronization:\n    enabled: false\n",
    )
    .expect("policy");
    let admin = federation_sandbox::free_port().expect("port");
    let grpc = federation_sandbox::free_port().expect("port");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_federation"));
    cmd.args(["serve", "--insecure", "--region", "europe", "--config"])
        .arg(&policy)
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .arg("--listen")
        .arg(grpc.to_string())
        .arg("--admin-listen")
        .arg(admin.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _controller =
        federation_sandbox::ChildGuard::spawn("europe", &mut cmd).expect("controller starts");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let scrape = loop {
        let got = (|| {
            use std::io::{Read, Write};
            let mut s =
                std::net::TcpStream::connect_timeout(&admin, std::time::Duration::from_secs(2))
                    .ok()?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .ok()?;
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut raw = String::new();
            s.read_to_string(&mut raw).ok()?;
            raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
        })();
        if let Some(body) = got {
            break body;
        }
        assert!(
            std::time::Instant::now() < until,
            "the controller's /metrics never answered"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    for metric in used {
        assert!(
            scrape
                .lines()
                .any(|l| l.split(['{', ' ']).next() == Some(metric)),
            "the query names `{metric}`, which the controller does not export:\n{scrape}"
        );
    }
}
