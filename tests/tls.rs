//! Mutual TLS, attested tags, roles and input limits, over real TLS
//! connections to real controller processes on loopback. Every refusal the
//! security design promises is exercised here and must be observed.

mod support;

use std::time::Duration;

use federation_api as api;
use federation_sandbox::{Sandbox, string_attrs};
use federation_tls::dev::{DevCa, Validity, write_pair};
use federation_tls::{ClientTls, Expect, Role};
use support::{formed, seed_requires_gdpr, seed_sandbox};
use tonic::Code;

const TIMEOUT: Duration = Duration::from_secs(10);

fn submit(pairs: &[(&str, &str)]) -> api::SubmitTaskRequest {
    api::SubmitTaskRequest {
        attributes: string_attrs(pairs),
        payload: b"x".to_vec(),
        ..Default::default()
    }
}

/// Client TLS for a certificate issued now by `ca` into the sandbox folder.
fn issued_tls(sandbox: &Sandbox, stem: &str, issued: &federation_tls::dev::Issued) -> ClientTls {
    let tls = sandbox.tls().expect("tls on");
    let dir = &tls.layout.dir;
    write_pair(dir, stem, issued).expect("write");
    let (cert, key) = tls.layout.pair(stem);
    ClientTls::load(&tls.layout.ca(), Some((&cert, &key)), tls.ca.federation()).expect("load")
}

async fn client_of(
    tls: &ClientTls,
    sandbox: &Sandbox,
    region: &str,
) -> Result<api::federation_client_client::FederationClientClient<tonic::transport::Channel>, String>
{
    tls.connect(
        &sandbox.url(region).expect("url"),
        Expect::Region(region.into()),
        TIMEOUT,
    )
    .await
    .map(api::federation_client_client::FederationClientClient::new)
    .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_checked_both_ways() {
    let sandbox = formed(seed_sandbox().agents(0, 1)).await;
    let ca = &sandbox.tls().expect("tls").ca;

    // A plaintext client is refused by a TLS controller.
    let plain = federation_sandbox::connect(sandbox.addr("europe").expect("addr")).await;
    if let Ok(ch) = plain {
        let mut c = api::federation_client_client::FederationClientClient::new(ch);
        c.submit_task(submit(&[("customer_region", "DE")]))
            .await
            .expect_err("plaintext refused");
    }

    // A client certificate of another CA: handshake refused.
    let other = DevCa::new("Global Enterprise Federation").expect("other ca");
    let foreign = issued_tls(
        &sandbox,
        "foreign",
        &other.role(Role::Operator, "mallory").expect("cert"),
    );
    // (Its trust store is the sandbox CA, so only the server can refuse.)
    let mut c = client_of(&foreign, &sandbox, "europe").await;
    if let Ok(cl) = c.as_mut() {
        let err = cl
            .submit_task(submit(&[("customer_region", "DE")]))
            .await
            .expect_err("foreign client cert refused");
        assert_ne!(err.code(), Code::Ok);
    }

    // An expired client certificate of the right CA: refused.
    let expired = issued_tls(
        &sandbox,
        "expired",
        &ca.issue(
            "expired operator",
            &[federation_tls::identity::role_uri(
                ca.federation(),
                Role::Operator,
                "old",
            )],
            false,
            Validity::Expired,
        )
        .expect("cert"),
    );
    let mut c = client_of(&expired, &sandbox, "europe").await;
    if let Ok(cl) = c.as_mut() {
        cl.submit_task(submit(&[("customer_region", "DE")]))
            .await
            .expect_err("expired client cert refused");
    }

    // The client refuses a server of another CA (our trust store is another CA).
    let dir = sandbox.dir().join("other-ca");
    std::fs::create_dir_all(&dir).expect("dir");
    federation_tls::dev::write_file(&dir.join("ca.pem"), &other.ca_pem(), false).expect("ca");
    let wrong_trust =
        ClientTls::load(&dir.join("ca.pem"), None, ca.federation()).expect("trust other ca");
    let err = wrong_trust
        .connect(
            &sandbox.url("europe").expect("url"),
            Expect::AnyController,
            TIMEOUT,
        )
        .await
        .expect_err("server of another CA refused");
    assert!(err.to_string().contains("cannot reach"), "{err}");

    // The client refuses a server whose certificate names another region
    // than the one it meant to call.
    let operator = sandbox.client_tls(Some("operator")).expect("operator");
    operator
        .connect(
            &sandbox.url("europe").expect("url"),
            Expect::Region("asia_pacific".into()),
            TIMEOUT,
        )
        .await
        .expect_err("europe answering as asia_pacific refused");
    operator
        .connect(
            &sandbox.url("europe").expect("url"),
            Expect::Region("europe".into()),
            TIMEOUT,
        )
        .await
        .expect("the right region is accepted");

    // The server refuses a peer whose certificate names another region than
    // the one its message claims.
    let ch = sandbox
        .peer_channel("europe", "asia_pacific")
        .await
        .expect("peer");
    let mut peer = api::federation_peer_client::FederationPeerClient::new(ch);
    let forged = api::RegionAdvertisement {
        region: "north_america".into(),
        compliance_tags: vec!["SOX".into()],
        epoch: 1,
        sequence: 1,
        ..Default::default()
    };
    let err = peer
        .advertise(api::AdvertiseRequest {
            origin: Some(forged),
            known: vec![],
            digest: None,
        })
        .await
        .expect_err("forged origin refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("origin.region"), "{}", err.message());
    let err = peer
        .forward_task(api::ForwardTaskRequest {
            task_id: federation::wire::new_task_id("europe"),
            submit: Some(submit(&[("customer_region", "DE")])),
            entry_region: "north_america".into(),
            decision: None,
            relayed_by: String::new(),
        })
        .await
        .expect_err("forged entry region refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // A peer certificate of a region, expired: refused at the handshake.
    let old_peer = issued_tls(
        &sandbox,
        "old-peer",
        &ca.region("asia_pacific", &[], Validity::Expired)
            .expect("cert"),
    );
    let r = old_peer
        .connect(
            &sandbox.url("europe").expect("url"),
            Expect::Region("europe".into()),
            TIMEOUT,
        )
        .await;
    if let Ok(ch) = r {
        let mut p = api::federation_peer_client::FederationPeerClient::new(ch);
        p.advertise(api::AdvertiseRequest {
            origin: Some(api::RegionAdvertisement {
                region: "asia_pacific".into(),
                ..Default::default()
            }),
            known: vec![],
            digest: None,
        })
        .await
        .expect_err("expired peer refused");
    }

    // Every refusal above is logged by europe with its reason.
    let log = sandbox.controller_log_text("europe").to_lowercase();
    for needle in [
        "client certificate refused",
        // The foreign CA shares the sandbox CA's name: its signature fails.
        "reason=invalid peer certificate: badsignature",
        "reason=invalid peer certificate: certificate expired",
        "peer claims another region than its certificate",
    ] {
        assert!(
            log.contains(needle),
            "europe's log lacks `{needle}`:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_credentials() {
    let token_client = "client-token-0123456789";
    let token_auditor = "auditor-token-0123456789";
    let token_agent = "agent-token-0123456789";
    let sandbox = formed(seed_sandbox().agents(0, 1).tokens(&format!(
        "{token_client} client\n{token_auditor} auditor\n{token_agent} agent europe\n"
    )))
    .await;

    // No credentials at all: UNAUTHENTICATED.
    let ch = sandbox
        .channel_as("europe", None)
        .await
        .expect("tls without cert");
    let mut anon = api::federation_client_client::FederationClientClient::new(ch.clone());
    let err = anon
        .submit_task(submit(&[("customer_region", "DE")]))
        .await
        .expect_err("anonymous refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    // A bad token: UNAUTHENTICATED; a good one: its role.
    let bad = federation_tls::Bearer::new(Some("not-a-token-at-all")).expect("header");
    let mut c =
        api::federation_client_client::FederationClientClient::with_interceptor(ch.clone(), bad);
    let err = c
        .submit_task(submit(&[("customer_region", "DE")]))
        .await
        .expect_err("bad token refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let good = federation_tls::Bearer::new(Some(token_client)).expect("header");
    let mut c = api::federation_client_client::FederationClientClient::with_interceptor(
        ch.clone(),
        good.clone(),
    );
    c.submit_task(submit(&[("customer_region", "DE")]))
        .await
        .expect("client token may submit");
    let mut admin =
        api::federation_admin_client::FederationAdminClient::with_interceptor(ch.clone(), good);
    let err = admin
        .drain(api::DrainRequest::default())
        .await
        .expect_err("client may not drain");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("operator"), "{}", err.message());

    // Auditor (token): status yes, submit no.
    let aud = federation_tls::Bearer::new(Some(token_auditor)).expect("header");
    let mut admin = api::federation_admin_client::FederationAdminClient::with_interceptor(
        ch.clone(),
        aud.clone(),
    );
    admin
        .federation_status(api::FederationStatusRequest {})
        .await
        .expect("auditor reads status");
    let mut c =
        api::federation_client_client::FederationClientClient::with_interceptor(ch.clone(), aud);
    let err = c
        .submit_task(submit(&[("customer_region", "DE")]))
        .await
        .expect_err("auditor may not submit");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("client"), "{}", err.message());

    // Client certificate: no admin.
    let ch = sandbox
        .channel_as("europe", Some("client"))
        .await
        .expect("client");
    let mut admin = api::federation_admin_client::FederationAdminClient::new(ch);
    let err = admin
        .reload_policy(api::ReloadPolicyRequest::default())
        .await
        .expect_err("client may not reload");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // An agent of asia_pacific may not register with europe.
    let ch = sandbox
        .channel_as("europe", Some("agent-asia_pacific"))
        .await
        .expect("agent");
    let mut agent = api::region_agent_api_client::RegionAgentApiClient::new(ch);
    let err = agent
        .register(api::RegisterRequest {
            name: "x".into(),
            slots: 1,
            ..Default::default()
        })
        .await
        .expect_err("agent of another region refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    // …but may with its own region.
    let ch = sandbox
        .channel_as("europe", Some("agent-europe"))
        .await
        .expect("agent");
    let mut agent = api::region_agent_api_client::RegionAgentApiClient::new(ch);
    let id = agent
        .register(api::RegisterRequest {
            name: "x".into(),
            slots: 1,
            ..Default::default()
        })
        .await
        .expect("own region's agent registers")
        .into_inner()
        .agent_id;
    // Registering again with that id keeps it (an agent whose controller
    // restarted keeps its leases)…
    let again = agent
        .register(api::RegisterRequest {
            name: "x".into(),
            slots: 1,
            agent_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("registers again")
        .into_inner()
        .agent_id;
    assert_eq!(again, id);
    // …but the id belongs to that identity: another agent of the region (a
    // token) cannot heartbeat under it, nor take it by registering.
    let ch = sandbox
        .channel_as("europe", None)
        .await
        .expect("tls without cert");
    let bearer = federation_tls::Bearer::new(Some(token_agent)).expect("header");
    let mut other =
        api::region_agent_api_client::RegionAgentApiClient::with_interceptor(ch, bearer);
    let err = other
        .heartbeat(api::HeartbeatRequest {
            agent_id: id.clone(),
            capacity: None,
        })
        .await
        .expect_err("another identity's agent id");
    assert_eq!(err.code(), Code::NotFound, "{err}");
    let taken = other
        .register(api::RegisterRequest {
            name: "y".into(),
            slots: 1,
            agent_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("token agent registers")
        .into_inner()
        .agent_id;
    assert_ne!(
        taken, id,
        "an id registered to another identity is not handed over"
    );

    // The operator may not call the peer service.
    let ch = sandbox.channel("europe").await.expect("operator");
    let mut peer = api::federation_peer_client::FederationPeerClient::new(ch);
    let err = peer
        .relay_get_task(api::GetTaskRequest {
            task_id: "x".into(),
        })
        .await
        .expect_err("operator is not a peer");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("peer"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unattested_tag_is_dropped_and_routing_refuses() {
    // europe's certificate does not attest GDPR although the policy grants
    // it and europe advertises it: peers must not trust it.
    let sandbox = formed(
        federation_sandbox::SandboxBuilder::new(support::federation_exe(), seed_requires_gdpr())
            .attested_tags("europe", &[])
            .agents(0, 1),
    )
    .await;
    let eu = sandbox
        .status_row("north_america", "europe")
        .await
        .expect("europe row");
    assert!(
        !eu.compliance_tags.iter().any(|t| t == "GDPR"),
        "unattested GDPR trusted: {:?}",
        eu.compliance_tags
    );
    let mut client = sandbox.client("north_america").await.expect("client");
    let err = client
        .submit_task(submit(&[("customer_region", "DE")]))
        .await
        .expect_err("no attested GDPR region");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("GDPR"), "{}", err.message());

    // The drop is logged, and the auditor's record of the refusal shows
    // europe judged on its attested tags only.
    let log = sandbox.controller_log_text("north_america");
    assert!(
        log.contains("advertised tags not attested by the region's certificate; dropped")
            && log.contains("GDPR"),
        "north_america's log:\n{log}"
    );
    let decisions = std::fs::read_to_string(
        sandbox
            .data_dir("north_america")
            .expect("data dir")
            .join("decisions.jsonl"),
    )
    .expect("decision log");
    let refused = decisions
        .lines()
        .rev()
        .find(|l| l.contains("\"DE\""))
        .expect("the DE decision is logged");
    assert!(
        refused.contains("europe") && refused.contains("lacks GDPR"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_over_the_wire() {
    let sandbox = formed(
        seed_sandbox()
            .agents(0, 1)
            .env("FEDERATION__NODE__LIMITS__MAX_MESSAGE_BYTES", "65536")
            .env("FEDERATION__NODE__LIMITS__MAX_PAYLOAD_BYTES", "1024")
            .env("FEDERATION__NODE__LIMITS__MAX_ATTRIBUTES", "4")
            .env("FEDERATION__NODE__LIMITS__MAX_ATTRIBUTE_LEN", "32")
            .env("FEDERATION__NODE__LIMITS__MAX_KNOWN_ADVERTISEMENTS", "2")
            .env("FEDERATION__NODE__LIMITS__MAX_SNAPSHOT_CHUNKS", "2")
            .env("FEDERATION__NODE__LIMITS__MAX_SNAPSHOT_CHUNK_BYTES", "1024"),
    )
    .await;
    let mut client = sandbox.client("europe").await.expect("client");

    let mut big = submit(&[("customer_region", "DE")]);
    big.payload = vec![0; 2048];
    let err = client.submit_task(big).await.expect_err("payload");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("payload"), "{}", err.message());

    let many = submit(&[
        ("a", "1"),
        ("b", "2"),
        ("c", "3"),
        ("d", "4"),
        ("customer_region", "DE"),
    ]);
    let err = client.submit_task(many).await.expect_err("attributes");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("attributes"), "{}", err.message());

    let long = "x".repeat(64);
    let err = client
        .submit_task(submit(&[("customer_region", long.as_str())]))
        .await
        .expect_err("attribute length");
    assert!(
        matches!(err.code(), Code::ResourceExhausted | Code::InvalidArgument),
        "{err}"
    );

    let mut huge = submit(&[("customer_region", "DE")]);
    huge.payload = vec![0; 100_000];
    let err = client.submit_task(huge).await.expect_err("message size");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        err.message().contains("max_message_bytes"),
        "{}",
        err.message()
    );

    let mut peer = api::federation_peer_client::FederationPeerClient::new(
        sandbox
            .peer_channel("europe", "asia_pacific")
            .await
            .expect("peer"),
    );
    let ad = |r: &str| api::RegionAdvertisement {
        region: r.into(),
        epoch: 1,
        sequence: 1,
        ..Default::default()
    };
    let err = peer
        .advertise(api::AdvertiseRequest {
            origin: Some(ad("asia_pacific")),
            known: vec![
                ad("north_america"),
                ad("north_america"),
                ad("north_america"),
            ],
            digest: None,
        })
        .await
        .expect_err("too many ads");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        err.message().contains("max_known_advertisements"),
        "{}",
        err.message()
    );

    // Snapshot pushes from a genuine peer: too many chunks, a chunk too big.
    let chunk = |index: u32, bytes: usize| api::SnapshotChunk {
        header: (index == 0).then(|| api::SnapshotHeader {
            source_region: "asia_pacific".into(),
            epoch: 1,
            sequence: 1,
            key_id: "k".into(),
            chunk_count: 3,
            compression: "zstd".into(),
            ..Default::default()
        }),
        index,
        ciphertext: vec![7; bytes],
        nonce: vec![0; 12],
    };
    for (chunks, limit) in [
        (vec![chunk(0, 16), chunk(1, 16), chunk(2, 16)], "max_chunks"),
        (vec![chunk(0, 4096)], "max_chunk_bytes"),
    ] {
        let err = peer
            .push_snapshot(futures::stream::iter(chunks))
            .await
            .expect_err("over the snapshot limit");
        assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
        assert!(err.message().contains(limit), "{limit}: {}", err.message());
    }

    // Malformed: a task id that is not one.
    let err = client
        .get_task(api::GetTaskRequest {
            task_id: "../etc".into(),
        })
        .await
        .expect_err("malformed id");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}
