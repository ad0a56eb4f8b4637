//! Where a result may go: a request's `reply_to` checked against the queues llmq owns and
//! the operator's `worker.reply_to_pattern`.
//!
//! A result published to a retry tier would sit there without an expiration and block the
//! tier; one published to a work queue or the dead-letter queue would be taken for a
//! request or a dead letter. So a `reply_to` naming any queue llmq owns is refused, and the
//! request is dead-lettered with the reason (its error result still goes to the results
//! exchange, never to the refused queue).
//!
//! The worker publishes as a privileged broker user: a `reply_to` that names another
//! tenant's queue would have it write there on the requester's behalf. So the pattern may
//! hold [`IDENTITY`], replaced by the request's identity (regex-escaped) before it is
//! matched; and where identities are required (`tenancy.require_user_id`), an empty pattern
//! means [`TENANT_PATTERN`]: a tenant's own `<identity>.<anything>` queues and exclusive
//! server-named `amq.gen-*` queues, besides Direct Reply-to.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError, RwLock},
};

use regex::Regex;

/// RabbitMQ's Direct Reply-to pseudo-queue; `amq.rabbitmq.reply-to.<suffix>` are its
/// per-channel forms. Always allowed: nothing can be planted there but a reply.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The placeholder in `worker.reply_to_pattern` that stands for the request's identity.
pub const IDENTITY: &str = "{identity}";

/// What an empty `worker.reply_to_pattern` means when identities are required: queues the
/// server named (`amq.gen-...`, exclusive to the connection that declared them, and
/// unguessable), and queues named `<identity>.<anything>`.
pub const TENANT_PATTERN: &str = r"amq\.gen-.+|{identity}\..+";

/// How many identities' compiled patterns are kept: compiling one takes some microseconds,
/// far more than matching it.
const COMPILED_PER_IDENTITY: usize = 1024;

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
    pattern: Option<Pattern>,
}

/// `worker.reply_to_pattern`, compiled once, or once per identity when it names one.
#[derive(Debug, Clone)]
enum Pattern {
    /// The same for every request.
    Fixed(Regex),
    /// With [`IDENTITY`] in it: compiled for each identity on first use, and kept (up to
    /// [`COMPILED_PER_IDENTITY`], then all let go at once).
    PerIdentity {
        /// The pattern as the operator wrote it.
        template: String,
        compiled: Arc<RwLock<HashMap<String, Arc<Regex>>>>,
    },
}

impl Pattern {
    fn new(pattern: &str) -> Result<Self, regex::Error> {
        if !pattern.contains(IDENTITY) {
            return Ok(Pattern::Fixed(whole_name(pattern)?));
        }
        // Compiles with any identity, since each is escaped: checked once with one.
        for_identity(pattern, "x")?;
        Ok(Pattern::PerIdentity {
            template: pattern.to_string(),
            compiled: Arc::default(),
        })
    }

    /// Whether `name` matches whole for a request of `identity`; `Err` only if the pattern
    /// does not compile for it (too large, with a long identity).
    fn matches(&self, name: &str, identity: &str) -> Result<bool, regex::Error> {
        let (template, compiled) = match self {
            Pattern::Fixed(p) => return Ok(p.is_match(name)),
            Pattern::PerIdentity { template, compiled } => (template, compiled),
        };
        // Plain maps: a panic while one was held left it whole.
        let known = compiled
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(identity)
            .cloned();
        let p = match known {
            Some(p) => p,
            None => {
                let p = Arc::new(for_identity(template, identity)?);
                let mut compiled = compiled.write().unwrap_or_else(PoisonError::into_inner);
                if compiled.len() >= COMPILED_PER_IDENTITY {
                    compiled.clear();
                }
                compiled.insert(identity.to_string(), p.clone());
                p
            }
        };
        Ok(p.is_match(name))
    }

    /// The pattern as the operator wrote it.
    fn as_written(&self) -> &str {
        match self {
            Pattern::Fixed(p) => unanchored(p),
            Pattern::PerIdentity { template, .. } => template,
        }
    }
}

/// `template` with every [`IDENTITY`] replaced by `identity`, regex-escaped, compiled to
/// match whole names.
fn for_identity(template: &str, identity: &str) -> Result<Regex, regex::Error> {
    whole_name(&template.replace(IDENTITY, &regex::escape(identity)))
}

impl ReplyToPolicy {
    /// Refuses `owned`, and, unless `pattern` is empty, every name it does not match whole
    /// (with [`IDENTITY`] standing for the request's identity).
    pub fn new(owned: Vec<OwnedQueue>, pattern: &str) -> Result<Self, regex::Error> {
        let pattern = match pattern {
            "" => None,
            p => Some(Pattern::new(p)?),
        };
        Ok(Self { owned, pattern })
    }

    /// `Ok` when results of a request from `identity` may be published to `reply_to`;
    /// otherwise why not.
    pub fn check(&self, reply_to: &str, identity: &str) -> Result<(), String> {
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
        let Some(p) = &self.pattern else {
            return Ok(());
        };
        match p.matches(reply_to, identity) {
            Ok(true) => Ok(()),
            Ok(false) if p.as_written().contains(IDENTITY) => Err(format!(
                "reply_to {reply_to:?} does not match worker.reply_to_pattern {:?} \
                 for identity {identity:?}",
                p.as_written()
            )),
            Ok(false) => Err(format!(
                "reply_to {reply_to:?} does not match worker.reply_to_pattern {:?}",
                p.as_written()
            )),
            Err(e) => Err(format!(
                "worker.reply_to_pattern {:?} cannot be used for identity {identity:?}: {e}",
                p.as_written()
            )),
        }
    }

    /// Whether results of a request from `identity` may be published to `reply_to`.
    pub fn allows(&self, reply_to: &str, identity: &str) -> bool {
        self.check(reply_to, identity).is_ok()
    }
}

/// Whether `pattern` is a usable `worker.reply_to_pattern` (what validation checks).
pub fn check_pattern(pattern: &str) -> Result<(), regex::Error> {
    Pattern::new(pattern).map(drop)
}

/// `pattern` compiled so that it must match the whole name. It must compile on its own
/// first: `a)|(b` would otherwise escape the anchoring group.
fn whole_name(pattern: &str) -> Result<Regex, regex::Error> {
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
            assert!(!p.allows(name, "alice"), "{name}");
        }
        assert_eq!(
            p.check("llm_requests.retry.30s", "alice"),
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
            assert!(p.allows(name, "alice"), "{name}");
        }
    }

    #[test]
    fn direct_reply_to_is_always_allowed() {
        let p = policy("replies\\..*");
        assert!(p.allows("amq.rabbitmq.reply-to", "alice"));
        assert!(p.allows("amq.rabbitmq.reply-to.g1h2AA==.abc", "alice"));
        assert!(!p.allows("amq.rabbitmq.reply-tox", "alice"));
    }

    #[test]
    fn pattern_must_match_the_whole_name() {
        let p = policy("replies\\.[a-z]+");
        assert!(p.allows("replies.alice", "alice"));
        assert!(!p.allows("x.replies.alice", "alice"));
        assert!(!p.allows("replies.alice2", "alice"));
        assert!(
            !p.allows("amq.gen-abc", "alice"),
            "the pattern can exclude server-named queues"
        );
        assert_eq!(
            p.check("other", "alice"),
            Err(
                "reply_to \"other\" does not match worker.reply_to_pattern \"replies\\\\.[a-z]+\""
                    .into()
            )
        );
        // Alternation stays inside the anchors, and nothing can close them.
        let p = policy("a|b");
        assert!(
            p.allows("a", "alice")
                && p.allows("b", "alice")
                && !p.allows("ab", "alice")
                && !p.allows("xa", "alice")
        );
        assert!(whole_name("a)|(b").is_err());
        let p = policy("(?m)a$");
        assert!(!p.allows("a\nb", "alice"), "flags stay inside the group");
    }

    #[test]
    fn own_queues_are_refused_even_when_the_pattern_matches() {
        assert!(!policy(".*").allows("llm_processing", "alice"));
    }

    #[test]
    fn control_characters_are_quoted_in_the_reason() {
        let reason = policy("ok")
            .check("bad\nname", "alice")
            .expect_err("refused");
        assert!(reason.contains("\"bad\\nname\""), "{reason}");
    }

    #[test]
    fn the_identity_placeholder_stands_for_the_request_s_identity() {
        let p = policy(r"replies\.{identity}\..+");
        assert!(p.allows("replies.alice.1", "alice"));
        assert!(!p.allows("replies.bob.1", "alice"), "another's");
        assert!(p.allows("replies.bob.1", "bob"));
        assert_eq!(
            p.check("replies.bob.1", "alice"),
            Err(
                "reply_to \"replies.bob.1\" does not match worker.reply_to_pattern \
                 \"replies\\\\.{identity}\\\\..+\" for identity \"alice\""
                    .into()
            )
        );
        // The identity is a literal: its dots and stars match only themselves.
        let p = policy(r"{identity}\..+");
        assert!(p.allows("a.b.x", "a.b"));
        assert!(!p.allows("aXb.x", "a.b"), "the dot is escaped");
        assert!(!p.allows("anything.x", ".*"));
        assert!(p.allows(".*.x", ".*"));
        assert!(
            !p.allows("anything.x", "x)|(.*"),
            "an identity cannot close the group"
        );
        assert!(p.allows("x)|(.*.x", "x)|(.*"));
    }

    #[test]
    fn the_tenant_pattern_keeps_each_tenant_to_its_own_queues() {
        let p = policy(TENANT_PATTERN);
        assert!(p.allows("alice.results", "alice"));
        assert!(!p.allows("bob.results", "alice"));
        assert!(!p.allows("alice", "alice"), "a name under the identity");
        assert!(!p.allows("alice-results", "alice"));
        assert!(!p.allows("alice.results", "alice2"));
        assert!(p.allows("amq.gen-JzTY20BRgKO-HjmUJj0wLg", "alice"));
        assert!(!p.allows("amq.genX", "alice"));
        assert!(p.allows("amq.rabbitmq.reply-to", "alice"));
        assert!(
            !p.allows("llm_processing.x", "llm_processing"),
            "never llmq's"
        );
    }

    #[test]
    fn a_pattern_with_the_placeholder_is_checked_as_it_will_be_used() {
        assert_eq!(check_pattern(TENANT_PATTERN), Ok(()));
        assert_eq!(check_pattern(r"replies\.{identity}"), Ok(()));
        assert!(check_pattern(r"{identity}\.(").is_err());
        assert!(check_pattern(r"{identity})|(x").is_err());
        assert!(check_pattern("{2}").is_err(), "a repetition of nothing");
    }
}
