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
    fn scoped_keys_never_collide_across_identities() {
        let a = Identity("a:b".into()).scope("c");
        let b = Identity("a".into()).scope("b:c");
        assert_ne!(a, b);
        assert_eq!(a, "a%3Ab:c");
        assert_eq!(Identity("50%".into()).scope("x"), "50%25:x");
    }
}
