//! Quorum queues (`topology.queue_type = "quorum"`) on the broker at `AMQP_URL`, the broker's
//! version, and moving a topology from one queue type to the other.

use llmq::broker::version::{self, BrokerVersion};

use crate::helpers::amqp_url;

/// The version the broker announces in its handshake is read, and parses.
#[tokio::test]
async fn the_broker_version_is_read_from_its_handshake() {
    let raw = version::read(&amqp_url(), &Default::default())
        .await
        .expect("the broker answers");
    let parsed = BrokerVersion::parse(&raw).expect("a version");
    assert!(parsed >= BrokerVersion::new(3, 10, 0), "{raw}");
}
