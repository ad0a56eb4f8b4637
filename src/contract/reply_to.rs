//! Where a result may go: a request's `reply_to` checked against the queues llmq owns and
//! the operator's `worker.reply_to_pattern`.
//!
//! A result published to a retry tier would sit there without an expiration and block the
//! tier; one published to a work queue or the dead-letter queue would be taken for a
//! request or a dead letter. So a `reply_to` naming any queue llmq owns is refused, and the
//! request is dead-lettered with the reason (its error result still goes to the results
//! exchange, never to the refused queue).

use regex::Regex;

/// RabbitMQ's Direct Reply-to pseudo-queue; `amq.rabbitmq.reply-to.<suffix>` are its
/// per-channel forms. Always allowed: nothing can be planted there but a reply.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// A queue name, or a family of names, that llmq declares or will declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedQueue {
    /// The name itself.
    pub name: String,
    /// Every `<name>.<anything>` is owned too (retry tiers, lanes of a work queue).
    pub subtree: bool,
    /// The configuration key the name comes from, for the refusal's reason.
    pub key: &'static str,
}

impl OwnedQueue {
    /// Just `name`.
    pub fn exact(name: &str, key: &'static str) -> Self {
        Self {
            name: name.to_string(),
            subtree: false,
            key,
        }
    }

    /// `name` and everything under `name.`.
    pub fn subtree(name: &str, key: &'static str) -> Self {
        Self {
            name: name.to_string(),
            subtree: true,
            key,
        }
    }

    fn covers(&self, queue: &str) -> bool {
        match queue.strip_prefix(self.name.as_str()) {
            Some("") => true,
            Some(rest) => self.subtree && rest.starts_with('.'),
            None => false,
        }
    }
}

/// The rule a `reply_to` must pass, built once at start-up.
#[derive(Debug, Clone, Default)]
pub struct ReplyToPolicy {
    owned: Vec<OwnedQueue>,
    /// `worker.reply_to_pattern` anchored to the whole name; `None` when it is empty.
    pattern: Option<Regex>,
}

impl ReplyToPolicy {
    /// Refuses `owned`, and, unless `pattern` is empty, every name it does not match whole.
    pub fn new(owned: Vec<OwnedQueue>, pattern: &str) -> Result<Self, regex::Error> {
        let pattern = match pattern {
            "" => None,
            p => Some(whole_name(p)?),
        };
        Ok(Self { owned, pattern })
    }

    /// `Ok` when results may be published to `reply_to`; otherwise why not.
    pub fn check(&self, reply_to: &str) -> Result<(), String> {
        if is_direct_reply_to(reply_to) {
            return Ok(());
        }
        if let Some(owned) = self.owned.iter().find(|o| o.covers(reply_to)) {
            let under = if owned.subtree && owned.name != reply_to {
                " or a queue under it"
            } else {
                ""
            };
            return Err(format!(
                "reply_to {reply_to:?} names one of llmq's own queues ({}{under}); \
                 use a queue of your own or amq.rabbitmq.reply-to",
                owned.key
            ));
        }
        match &self.pattern {
            Some(p) if !p.is_match(reply_to) => Err(format!(
                "reply_to {reply_to:?} does not match worker.reply_to_pattern {:?}",
                unanchored(p)
            )),
            _ => Ok(()),
        }
    }

    /// Whether results may be published to `reply_to`.
    pub fn allows(&self, reply_to: &str) -> bool {
        self.check(reply_to).is_ok()
    }
}

/// `pattern` compiled so that it must match the whole name (also what validation checks).
/// It must compile on its own first: `a)|(b` would otherwise escape the anchoring group.
pub fn whole_name(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(pattern)?;
    Regex::new(&format!(r"\A(?:{pattern})\z"))
}

/// The operator's pattern as written, for messages.
fn unanchored(p: &Regex) -> &str {
    let s = p.as_str();
    s.strip_prefix(r"\A(?:")
        .and_then(|s| s.strip_suffix(r")\z"))
        .unwrap_or(s)
}

/// Whether `name` is the Direct Reply-to pseudo-queue or one of its per-channel forms. The
/// broker hands a reply there straight to the caller's channel and counts it as routed to no
/// queue, so a mandatory publish there is returned even when it was delivered.
pub fn is_direct_reply_to(name: &str) -> bool {
    match name.strip_prefix(DIRECT_REPLY_TO) {
        Some(rest) => rest.is_empty() || rest.starts_with('.'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(pattern: &str) -> ReplyToPolicy {
        ReplyToPolicy::new(
            vec![
                OwnedQueue::subtree("llm_processing", "topology.processing_queue"),
                OwnedQueue::subtree("llm_requests.retry", "topology.retry_queue_prefix"),
                OwnedQueue::exact("llm_results", "topology.results_queue"),
                OwnedQueue::exact("dlq", "topology.dead_letter_queue"),
            ],
            pattern,
        )
        .expect("pattern compiles")
    }

    #[test]
    fn own_queues_are_refused() {
        let p = policy("");
        for name in [
            "llm_processing",
            "llm_processing.dlq",
            "llm_processing.lane.ab12",
            "llm_requests.retry",
            "llm_requests.retry.5s",
            "llm_results",
            "dlq",
        ] {
            assert!(!p.allows(name), "{name}");
        }
        assert_eq!(
            p.check("llm_requests.retry.30s"),
            Err(
                "reply_to \"llm_requests.retry.30s\" names one of llmq's own queues \
                 (topology.retry_queue_prefix or a queue under it); use a queue of your own \
                 or amq.rabbitmq.reply-to"
                    .into()
            )
        );
    }

    #[test]
    fn names_that_only_share_a_prefix_are_allowed() {
        let p = policy("");
        for name in [
            "llm_processing2",
            "llm_processing-replies",
            "llm_results.mine",
            "dlq.copy",
            "my-replies",
            "amq.gen-JzTY20BRgKO-HjmUJj0wLg",
        ] {
            assert!(p.allows(name), "{name}");
        }
    }

    #[test]
    fn direct_reply_to_is_always_allowed() {
        let p = policy("replies\\..*");
        assert!(p.allows("amq.rabbitmq.reply-to"));
        assert!(p.allows("amq.rabbitmq.reply-to.g1h2AA==.abc"));
        assert!(!p.allows("amq.rabbitmq.reply-tox"));
    }

    #[test]
    fn pattern_must_match_the_whole_name() {
        let p = policy("replies\\.[a-z]+");
        assert!(p.allows("replies.alice"));
        assert!(!p.allows("x.replies.alice"));
        assert!(!p.allows("replies.alice2"));
        assert!(
            !p.allows("amq.gen-abc"),
            "the pattern can exclude server-named queues"
        );
        assert_eq!(
            p.check("other"),
            Err(
                "reply_to \"other\" does not match worker.reply_to_pattern \"replies\\\\.[a-z]+\""
                    .into()
            )
        );
        // Alternation stays inside the anchors, and nothing can close them.
        let p = policy("a|b");
        assert!(p.allows("a") && p.allows("b") && !p.allows("ab") && !p.allows("xa"));
        assert!(whole_name("a)|(b").is_err());
        let p = policy("(?m)a$");
        assert!(!p.allows("a\nb"), "flags stay inside the group");
    }

    #[test]
    fn own_queues_are_refused_even_when_the_pattern_matches() {
        assert!(!policy(".*").allows("llm_processing"));
    }

    #[test]
    fn control_characters_are_quoted_in_the_reason() {
        let reason = policy("ok").check("bad\nname").expect_err("refused");
        assert!(reason.contains("\"bad\\nname\""), "{reason}");
    }
}
