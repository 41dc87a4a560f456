//! Gossip sends what the receiver lacks, over real processes: an Advertise
//! answer relays only what the caller's digest lists (everything to an older
//! peer that sends none), and a region heard only through a third one keeps
//! arriving every heartbeat.

mod support;

use federation_api as api;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advertise_answers_with_what_the_callers_digest_lacks() {
    let sandbox = formed(seed_sandbox().agents(0, 1)).await;
    let ch = sandbox
        .peer_channel("europe", "asia_pacific")
        .await
        .expect("peer channel");
    let mut peer = api::federation_peer_client::FederationPeerClient::new(ch);
    // An old advertisement of asia_pacific (the real one is fresher, so
    // europe's view of it does not change).
    let origin = api::RegionAdvertisement {
        region: "asia_pacific".into(),
        epoch: 1,
        sequence: 1,
        ..Default::default()
    };
    let ask = |digest: Option<api::GossipDigest>| api::AdvertiseRequest {
        origin: Some(origin.clone()),
        known: vec![],
        digest,
    };
    let regions =
        |r: &api::AdvertiseResponse| r.known.iter().map(|a| a.region.clone()).collect::<Vec<_>>();

    // An older peer (no digest): every advertisement europe holds.
    let old = peer
        .advertise(ask(None))
        .await
        .expect("advertise")
        .into_inner();
    assert!(
        regions(&old).contains(&"north_america".to_string()),
        "{:?}",
        regions(&old)
    );
    assert!(old.digest.is_some(), "europe sends its own digest");

    // A caller that lacks nothing: nothing relayed.
    let steady = peer
        .advertise(ask(Some(api::GossipDigest::default())))
        .await
        .expect("advertise")
        .into_inner();
    assert!(steady.known.is_empty(), "{:?}", regions(&steady));
    assert_eq!(
        steady.origin.as_ref().map(|o| o.region.as_str()),
        Some("europe")
    );

    // A caller that lacks north_america (and claims to be behind on
    // asia_pacific, its own region): north_america's advertisement only.
    let lacking = api::GossipDigest {
        stale: vec![
            api::DigestEntry {
                region: "north_america".into(),
                epoch: 0,
                sequence: 0,
                ..Default::default()
            },
            api::DigestEntry {
                region: "asia_pacific".into(),
                epoch: 0,
                sequence: 0,
                ..Default::default()
            },
        ],
    };
    let delta = peer
        .advertise(ask(Some(lacking)))
        .await
        .expect("advertise")
        .into_inner();
    assert_eq!(regions(&delta), vec!["north_america".to_string()]);
    let na = &delta.known[0];
    assert!(na.epoch > 0 && na.sequence > 0, "{na:?}");

    // A caller already as fresh as europe on north_america: nothing.
    let current = api::GossipDigest {
        stale: vec![api::DigestEntry {
            region: "north_america".into(),
            epoch: na.epoch,
            sequence: u64::MAX,
            ..Default::default()
        }],
    };
    let none = peer
        .advertise(ask(Some(current)))
        .await
        .expect("advertise")
        .into_inner();
    assert!(none.known.is_empty(), "{:?}", regions(&none));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_heard_only_through_gossip_keeps_arriving() {
    // north_america and europe cannot reach each other; only asia_pacific's
    // relays, asked for by north_america's digest, carry europe to it.
    // Every region sees every other alive through gossip.
    let sandbox = formed(
        seed_sandbox()
            .agents(0, 1)
            .block_link("north_america", "europe"),
    )
    .await;
    let first = sandbox
        .status_row("north_america", "europe")
        .await
        .expect("europe row");
    assert_eq!(first.state, "alive");
    // Fresh copies keep coming: the sequence moves on, europe stays alive.
    let later = sandbox
        .wait_for_row(
            "north_america",
            "europe",
            "five advertisements later, alive",
            PATIENCE,
            |r| r.state == "alive" && r.epoch == first.epoch && r.sequence >= first.sequence + 5,
        )
        .await
        .expect("europe's advertisements keep arriving by gossip");
    assert_eq!(later.state, "alive");
}
