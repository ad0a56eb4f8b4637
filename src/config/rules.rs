//! The request [`Rules`] derived from the configuration, once at start-up.

use super::{Config, TopologyConfig};
use crate::contract::{
    IdentityRule, Rules,
    reply_to::{OwnedQueue, ReplyToPolicy, TENANT_PATTERN},
};

impl TopologyConfig {
    /// Every queue name llmq declares or will declare, and the families under them: a
    /// `reply_to` naming one is refused. A new kind of queue (a control queue prefix, say)
    /// is one more line here.
    pub fn owned_queues(&self) -> Vec<OwnedQueue> {
        vec![
            // The work queues, and everything under them: their fair-share lanes
            // (`<queue>.lane.<nn>`).
            OwnedQueue::subtree(&self.processing_queue, "topology.processing_queue"),
            OwnedQueue::subtree(&self.embeddings_queue, "topology.embeddings_queue"),
            // The delayed-retry tiers, `<prefix>.<tier>`.
            OwnedQueue::subtree(&self.retry_queue_prefix, "topology.retry_queue_prefix"),
            // Every queue named under the request exchange: the classic retry tiers of
            // earlier versions (`llm_requests.retry.5s`, still there after an upgrade) too.
            OwnedQueue::subtree(&self.request_exchange, "topology.request_exchange"),
            OwnedQueue::exact(&self.unroutable_queue, "topology.unroutable_queue"),
            OwnedQueue::exact(&self.dead_letter_queue, "topology.dead_letter_queue"),
            // Even when not declared (`keep_results = "never"`): it is llmq's name.
            OwnedQueue::exact(&self.results_queue, "topology.results_queue"),
            // Each worker's control queue, `<control_exchange>.<uuid>`.
            OwnedQueue::subtree(&self.control_exchange, "topology.control_exchange"),
        ]
    }
}

impl Config {
    /// The `worker.reply_to_pattern` in force: as set; when empty, [`TENANT_PATTERN`] where
    /// identities are required, so that no tenant has the worker write into another's
    /// queues; else none (empty).
    pub fn reply_to_pattern(&self) -> &str {
        match self.worker.reply_to_pattern.as_str() {
            "" if self.requires_user_id() => TENANT_PATTERN,
            set => set,
        }
    }

    /// The rules every request is checked against. Fails only on a `worker.reply_to_pattern`
    /// that does not compile, which [`Config::validate`] reports first.
    pub fn request_rules(&self) -> Result<Rules, regex::Error> {
        Ok(Rules {
            max_body_bytes: self.worker.max_body_bytes,
            max_tokens_cap: self.llm.max_tokens_cap,
            max_n: self.llm.max_n,
            allowed_models: self.llm.allowed_models.iter().cloned().collect(),
            allowed_params: (self.llm.allowed_params.iter())
                .chain(&self.llm.extra_allowed_params)
                .cloned()
                .collect(),
            identity: IdentityRule {
                header: self.tenancy.header.clone(),
                required: self.requires_user_id(),
            },
            reply_to: ReplyToPolicy::new(self.topology.owned_queues(), self.reply_to_pattern())?,
            max_age_secs: self.worker.max_age_secs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rules_refuse_every_default_queue() {
        let config = Config::default();
        let rules = config.request_rules().expect("default pattern");
        let t = &config.topology;
        for queue in [
            t.processing_queue.clone(),
            t.embeddings_queue.clone(),
            t.dead_letter_queue.clone(),
            t.results_queue.clone(),
            format!("{}.5s", t.retry_queue_prefix),
            "llm_requests.retry.5s".to_string(),
            t.unroutable_queue.clone(),
            format!("{}.lane.0f3a", t.processing_queue),
            format!("{}.lane.0f3a", t.embeddings_queue),
            // The fair-share lanes as declared (`topology::lane_queue`).
            "llm_processing.lane.0a".to_string(),
            "llm_embeddings.lane.ff".to_string(),
        ] {
            assert!(!rules.reply_to.allows(&queue, "alice"), "{queue}");
        }
        assert!(rules.reply_to.allows("amq.gen-abc", "alice"));
        assert!(rules.reply_to.allows("my-replies", "alice"));
        assert_eq!(rules.max_tokens_cap, 32_768);
        assert_eq!(rules.max_n, 4);
        assert!(rules.allowed_models.is_empty());
        assert!(rules.allowed_params.contains("temperature"));
        assert!(!rules.allowed_params.contains("store"));
    }

    #[test]
    fn prefixed_topologies_are_covered_too() {
        let mut config = Config::default();
        config.topology = config.topology.with_prefix("t1");
        config.worker.reply_to_pattern = "replies\\..*".into();
        let rules = config.request_rules().expect("pattern compiles");
        for queue in [
            "t1.processing",
            "t1.processing.lane.0a",
            "t1.embeddings.lane.00",
            "t1.dlq",
            "t1.retry.30s",
            "t1.results",
        ] {
            assert!(!rules.reply_to.allows(queue, "alice"), "{queue}");
        }
        assert!(rules.reply_to.allows("replies.x", "alice"));
        assert!(!rules.reply_to.allows("other", "alice"));
    }

    #[test]
    fn where_identities_are_required_an_empty_pattern_keeps_tenants_apart() {
        let mut config = Config::default();
        config
            .tenants
            .insert("alice".into(), crate::config::TenantConfig::default());
        assert!(config.requires_user_id());
        assert_eq!(config.reply_to_pattern(), TENANT_PATTERN);
        let rules = config.request_rules().expect("the default compiles");
        assert!(rules.reply_to.allows("alice.replies", "alice"));
        assert!(!rules.reply_to.allows("bob.replies", "alice"));
        assert!(rules.reply_to.allows("amq.gen-abc", "alice"));
        assert!(rules.reply_to.allows("amq.rabbitmq.reply-to", "alice"));
        assert!(!rules.reply_to.allows("my-replies", "alice"));
        // A pattern the operator sets wins, and `false` leaves it unrestricted.
        config.worker.reply_to_pattern = ".*".into();
        assert_eq!(config.reply_to_pattern(), ".*");
        config.worker.reply_to_pattern.clear();
        config.tenancy.require_user_id = crate::config::Switch::Off;
        assert_eq!(config.reply_to_pattern(), "");
        let rules = config.request_rules().expect("no pattern");
        assert!(rules.reply_to.allows("bob.replies", "alice"));
    }
}
