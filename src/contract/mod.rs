//! What crosses the wire: the request a publisher sends, the result llmq answers with, the
//! deltas of a streamed answer, the control messages (cancel), the headers llmq reads and
//! writes (retry state, dead letters), the error kinds and the token usage both carry. Pure
//! types and functions; nothing here talks to the network.

pub mod control;
pub mod error_kind;
pub mod fingerprint;
pub mod headers;
pub mod identity;
pub mod params;
pub mod reply_to;
pub mod request;
pub mod response;
pub mod rules;
pub mod stream;
pub mod usage;

pub use error_kind::ErrorKind;
pub use identity::{ANONYMOUS, Identity, IdentityRule};
pub use rules::Rules;
pub use usage::Usage;
