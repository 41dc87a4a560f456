//! Where a task is read: any controller answers for a task held elsewhere
//! (the id names the owner), and an id the live owner does not know is
//! NOT_FOUND.

use federation_api as api;
use tonic::Code;

use crate::federation::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_is_read_through_any_region_and_an_unknown_id_is_not_found() {
    let fed = Builder::new(SEED_POLICY).start_formed().await;
    let placed = fed
        .client("europe")
        .await
        .submit_task(submit("US"))
        .await
        .expect("placed")
        .into_inner();
    assert_eq!(placed.region, "north_america");
    for entry in fed.names() {
        let t = fed
            .get(&entry, &placed.task_id)
            .await
            .unwrap_or_else(|s| panic!("via {entry}: {s}"));
        assert_eq!(t.task_id, placed.task_id, "via {entry}");
        assert_eq!(t.owner_region, "north_america", "via {entry}");
        assert_eq!(t.state(), api::TaskState::Queued, "via {entry}");
    }
    // Well-formed, owned by a live region that does not know it.
    let unknown = "0190d6a4-1f55-7000-8000-000000000000.north_america";
    let err = fed
        .get("asia_pacific", unknown)
        .await
        .expect_err("unknown id");
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    // Malformed.
    let err = fed
        .get("asia_pacific", "not-a-task")
        .await
        .expect_err("malformed id");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
}
