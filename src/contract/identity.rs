//! Who sent a request: one [`Identity`] for the whole service. It scopes idempotency keys
//! (a `request_id` is one user's, not everyone's), and every republish of a request (a
//! retry tier, a redelivery count, a replay from the dead-letter queue) keeps it, so a
//! request is the same user's wherever it goes.
//!
//! It is the AMQP `user_id` property, which RabbitMQ checks against the publishing
//! connection's user, so nobody can claim another's. A request without one is
//! [`ANONYMOUS`]'s. Behind a trusted gateway that publishes for its tenants,
//! `tenancy.header` names a header that carries the identity instead.
//!
//! The identity is also the request's tenant: its fair share, its limits and its spend.
//! So that a tenant cannot shed its limits by leaving its identity out, an
//! [`IdentityRule`] with `required` (`tenancy.require_user_id`) refuses a request that
//! carries none.

use std::fmt;

use lapin::BasicProperties;

/// The identity of a request without a `user_id`.
pub const ANONYMOUS: &str = "anonymous";

/// Longest identity taken from a header (a `user_id` is an AMQP short string, at most 255
/// bytes, already).
const MAX_IDENTITY: usize = 255;

/// The broker-validated sender of a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity(String);

impl Identity {
    /// The identity a delivery carries: with `header` (`tenancy.header`) set, that
    /// header's text; else (or without it) its `user_id`; else [`ANONYMOUS`].
    pub fn of(props: &BasicProperties, header: &str) -> Self {
        if !header.is_empty()
            && let Some(named) = crate::contract::headers::get_str(props, header)
            && !named.is_empty()
        {
            return Identity(crate::truncate(&named, MAX_IDENTITY).to_string());
        }
        match props.user_id() {
            Some(user) if !user.as_str().is_empty() => Identity(user.to_string()),
            _ => Identity(ANONYMOUS.to_string()),
        }
    }

    /// Whether a delivery carries an identity of its own: with `header` set, that header
    /// (not empty); else a `user_id` (not empty). Without one it is [`ANONYMOUS`]'s, or, in
    /// header mode, the publishing gateway's.
    pub fn carried(props: &BasicProperties, header: &str) -> bool {
        if header.is_empty() {
            props
                .user_id()
                .as_ref()
                .is_some_and(|u| !u.as_str().is_empty())
        } else {
            crate::contract::headers::get_str(props, header).is_some_and(|h| !h.is_empty())
        }
    }

    /// The identity's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `request_id` scoped by this identity, as the idempotency store keys it. The name is
    /// escaped so that no two (identity, id) pairs give the same key: `%` and `:` become
    /// `%25` and `%3A`, and `:` separates the two.
    pub fn scope(&self, request_id: &str) -> String {
        let mut key = String::with_capacity(self.0.len() + request_id.len() + 1);
        for c in self.0.chars() {
            match c {
                '%' => key.push_str("%25"),
                ':' => key.push_str("%3A"),
                c => key.push(c),
            }
        }
        key.push(':');
        key.push_str(request_id);
        key
    }
}

/// How a request's identity is read (`tenancy.header`) and whether it must carry one
/// (`tenancy.require_user_id`): part of the [`crate::contract::Rules`] a request is checked
/// against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityRule {
    /// `tenancy.header`; empty: the `user_id` is the identity.
    pub header: String,
    /// A request without an identity is refused (`invalid_request`) instead of being
    /// [`ANONYMOUS`]'s.
    pub required: bool,
}

impl IdentityRule {
    /// Why a delivery may not be served for want of an identity, if it may not.
    pub fn check(&self, props: &BasicProperties) -> Result<(), String> {
        if !self.required || Identity::carried(props, &self.header) {
            return Ok(());
        }
        Err(if self.header.is_empty() {
            "no identity: the message has no AMQP `user_id` property, and \
             tenancy.require_user_id refuses requests without one"
                .to_string()
        } else {
            format!(
                "no identity: the message has no `{}` header (tenancy.header, which names the \
                 tenant in place of `user_id`), and tenancy.require_user_id refuses requests \
                 without one",
                self.header
            )
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_id_is_the_identity_else_anonymous() {
        let alice = BasicProperties::default().with_user_id("alice".into());
        assert_eq!(Identity::of(&alice, "").as_str(), "alice");
        assert_eq!(
            Identity::of(&BasicProperties::default(), "").as_str(),
            ANONYMOUS
        );
        let empty = BasicProperties::default().with_user_id("".into());
        assert_eq!(Identity::of(&empty, "").as_str(), ANONYMOUS);
    }

    #[test]
    fn a_trusted_header_names_the_identity_when_configured() {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            "x-tenant".into(),
            lapin::types::AMQPValue::LongString("bob".into()),
        );
        let props = BasicProperties::default()
            .with_user_id("gateway".into())
            .with_headers(headers);
        assert_eq!(Identity::of(&props, "x-tenant").as_str(), "bob");
        assert_eq!(
            Identity::of(&props, "").as_str(),
            "gateway",
            "off by default"
        );
        assert_eq!(
            Identity::of(&props, "x-other").as_str(),
            "gateway",
            "without the header, the user_id"
        );
    }

    #[test]
    fn a_required_identity_is_a_user_id_or_the_header_in_header_mode() {
        let off = IdentityRule::default();
        assert_eq!(off.check(&BasicProperties::default()), Ok(()));
        let rule = IdentityRule {
            header: String::new(),
            required: true,
        };
        let alice = BasicProperties::default().with_user_id("alice".into());
        assert_eq!(rule.check(&alice), Ok(()));
        let e = rule
            .check(&BasicProperties::default())
            .expect_err("no user_id");
        assert!(e.contains("`user_id`"), "{e}");
        let empty = BasicProperties::default().with_user_id("".into());
        assert!(rule.check(&empty).is_err(), "an empty user_id is none");

        let rule = IdentityRule {
            header: "x-tenant".into(),
            required: true,
        };
        let e = rule
            .check(&alice)
            .expect_err("the gateway's user_id is no tenant");
        assert!(e.contains("`x-tenant`") && e.contains("`user_id`"), "{e}");
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            "x-tenant".into(),
            lapin::types::AMQPValue::LongString("bob".into()),
        );
        assert_eq!(rule.check(&alice.with_headers(headers)), Ok(()));
    }

    #[test]
    fn scoped_keys_never_collide_across_identities() {
        let a = Identity("a:b".into()).scope("c");
        let b = Identity("a".into()).scope("b:c");
        assert_ne!(a, b);
        assert_eq!(a, "a%3Ab:c");
        assert_eq!(Identity("50%".into()).scope("x"), "50%25:x");
    }
}
