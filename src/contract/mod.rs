//! What crosses the wire: the request a publisher sends, the result llmq answers with, the
//! headers llmq reads and writes, and the error kinds both carry.

pub mod request;
pub mod response;
