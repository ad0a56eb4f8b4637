//! The request contract: a message body and its AMQP properties parsed into a [`Job`].
//!
//! Accepted bodies (JSON objects):
//! - the seed form `{"prompt": "...", "timestamp": 1732000000.0}`;
//! - the full chat form `{"request_id", "model", "messages" | "prompt", "system",
//!   "max_tokens", "temperature", "params", "metadata"}`;
//! - embeddings `{"kind": "embedding", "input": "text" | ["a", "b"], "model"}`;
//! - any of these with OpenAI's own body fields (`seed`, `tools`, `dimensions`...) at the
//!   top level, taken as if they were in `params` ([`super::params`]).
//!
//! Anything else is an [`InvalidRequest`] with a reason precise enough to fix the sender,
//! and so is a request that breaks the operator's [`Rules`]: no identity where one is
//! required, a `reply_to` naming one of llmq's queues, a model or parameter (in `params` or
//! at the top level) off the allowlists, `max_tokens` or `n` over a cap.

use lapin::BasicProperties;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{Identity, error_kind::ErrorKind, params, rules::Rules};

/// Longest `request_id` accepted (it becomes the AMQP `message_id`, a short string).
pub const MAX_REQUEST_ID: usize = 255;
/// Most embedding inputs in one request (the OpenAI limit).
const MAX_EMBEDDING_INPUTS: usize = 2048;

/// What kind of upstream call a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `/chat/completions`.
    Chat,
    /// `/embeddings`.
    Embedding,
}

impl Kind {
    /// Every kind, in the order of their work queues.
    pub const ALL: [Kind; 2] = [Kind::Chat, Kind::Embedding];

    /// Its place in [`Kind::ALL`], for arrays kept per kind.
    pub const fn index(self) -> usize {
        match self {
            Kind::Chat => 0,
            Kind::Embedding => 1,
        }
    }

    /// The name used in results and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Embedding => "embedding",
        }
    }
}

/// A validated request, ready for the upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Stable id: the body's, else the AMQP `message_id`, else derived from the content.
    pub request_id: String,
    /// Model asked for, if any (the configured default applies otherwise).
    pub model: Option<String>,
    /// The call to make.
    pub call: Call,
    /// Echoed back in the result untouched.
    pub metadata: Option<Value>,
    /// AMQP priority, 0 when absent.
    pub priority: u8,
    /// Unix ms after which the request is not worth answering: its `deadline`, or its
    /// `timestamp` (else the AMQP `timestamp`) plus `worker.max_age_secs`, whichever comes
    /// first.
    pub deadline_ms: Option<i64>,
    /// The caller asked for the answer as it is generated (`"stream": true`): deltas go to
    /// its `reply_to` before the result. Without a `reply_to` it is ignored.
    pub stream: bool,
}

impl Job {
    /// Tokens this job is expected to use, for the token budget: prompt characters / 4 plus
    /// the completion allowance for chat, which is `max_tokens` or `max_completion_tokens`
    /// (the larger; else `default_max_tokens`) for each of its `n` choices; input characters
    /// / 4 for embeddings.
    pub fn token_estimate(&self, default_max_tokens: u64) -> u64 {
        match &self.call {
            Call::Chat { messages, params } => {
                let chars: usize = messages
                    .iter()
                    .map(|m| match &m["content"] {
                        Value::String(s) => s.len(),
                        other => other.to_string().len(),
                    })
                    .sum();
                let asked = ["max_tokens", "max_completion_tokens"]
                    .iter()
                    .filter_map(|k| params.get(*k).and_then(Value::as_u64))
                    .max();
                let choices = params.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
                let completion = asked.unwrap_or(default_max_tokens).saturating_mul(choices);
                ((chars / 4) as u64).saturating_add(completion)
            }
            Call::Embedding { input, .. } => {
                (input.iter().map(String::len).sum::<usize>() / 4).max(1) as u64
            }
        }
    }

    /// The most prompt tokens the call can be billed for: a token is at least a byte of
    /// text, so the bytes of every message's content (as JSON when it is not text) and
    /// of the tools it offers, plus 8 for each message's framing; the bytes of every
    /// input for embeddings. Images are counted by the size of their reference only.
    pub fn input_bound(&self) -> u64 {
        let bytes = match &self.call {
            Call::Chat { messages, params } => {
                let content: usize = messages
                    .iter()
                    .map(|m| {
                        8 + match &m["content"] {
                            Value::String(s) => s.len(),
                            other => other.to_string().len(),
                        } + m.get("tool_calls").map_or(0, |t| t.to_string().len())
                    })
                    .sum();
                content + params.get("tools").map_or(0, |t| t.to_string().len())
            }
            Call::Embedding { input, .. } => input.iter().map(String::len).sum(),
        };
        u64::try_from(bytes).unwrap_or(u64::MAX)
    }

    /// The most completion tokens the call can be billed for: its output bound
    /// (`max_tokens` or `max_completion_tokens`, the larger) for each of its `n` choices;
    /// `None` for a chat request that sets no bound; 0 for embeddings.
    pub fn output_bound(&self) -> Option<u64> {
        match &self.call {
            Call::Chat { params, .. } => {
                let asked = ["max_tokens", "max_completion_tokens"]
                    .iter()
                    .filter_map(|k| params.get(*k).and_then(Value::as_u64))
                    .max()?;
                Some(asked.saturating_mul(self.choices().max(1)))
            }
            Call::Embedding { .. } => Some(0),
        }
    }

    /// Bounds a chat call's output by `most` tokens a choice: a request that sets no bound
    /// is sent `max_tokens: most`, one that sets a larger one is sent `most` in its place.
    pub fn bound_output(&mut self, most: u64) {
        let Call::Chat { params, .. } = &mut self.call else {
            return;
        };
        let mut set = false;
        for key in ["max_tokens", "max_completion_tokens"] {
            if let Some(v) = params.get_mut(key) {
                set = true;
                if v.as_u64().is_none_or(|asked| asked > most) {
                    *v = Value::from(most);
                }
            }
        }
        if !set {
            params.insert("max_tokens".into(), Value::from(most));
        }
    }

    /// Choices a chat request asks for (`n`, 1 when unset); 1 for embeddings.
    pub fn choices(&self) -> u64 {
        match &self.call {
            Call::Chat { params, .. } => params.get("n").and_then(Value::as_u64).unwrap_or(1),
            Call::Embedding { .. } => 1,
        }
    }

    /// The kind of call.
    pub fn kind(&self) -> Kind {
        match self.call {
            Call::Chat { .. } => Kind::Chat,
            Call::Embedding { .. } => Kind::Embedding,
        }
    }
}

/// The upstream call a job makes.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// A chat completion.
    Chat {
        /// OpenAI-style messages, system prompt first when one was given.
        messages: Vec<Value>,
        /// Extra body fields: `params`, with the top-level `max_tokens`, `temperature` and
        /// OpenAI fields merged in.
        params: Map<String, Value>,
    },
    /// Embeddings of one or several inputs.
    Embedding {
        /// The texts.
        input: Vec<String>,
        /// Whether the caller sent a single string (the result then has `embedding`, not
        /// `embeddings`).
        single: bool,
        /// Extra body fields: `params`, with the top-level OpenAI fields merged in.
        params: Map<String, Value>,
    },
}

/// Why a message can never be processed; it goes to the dead-letter queue with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct InvalidRequest {
    /// [`ErrorKind::InvalidRequest`] or [`ErrorKind::TooLarge`].
    pub kind: ErrorKind,
    /// What is wrong, naming the field where there is one.
    pub message: String,
}

impl InvalidRequest {
    fn new(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::InvalidRequest,
            message: message.into(),
        }
    }
}

/// The body as sent; every field optional so that each absence gets its own message. These
/// are llmq's fields; every other top-level field is in `rest`.
#[derive(Deserialize)]
struct RawRequest {
    request_id: Option<String>,
    kind: Option<String>,
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<RawMessage>>,
    system: Option<String>,
    max_tokens: Option<u32>,
    temperature: Option<f64>,
    params: Option<Map<String, Value>>,
    metadata: Option<Value>,
    input: Option<RawInput>,
    /// Unix seconds after which the caller no longer wants an answer.
    deadline: Option<f64>,
    /// Unix seconds when the request was made (the seed form's field). Read leniently: it
    /// was an ignored field before `worker.max_age_secs`, so a value that is not a time is
    /// ignored rather than refused.
    timestamp: Option<Value>,
    /// Stream the answer to `reply_to` as it is generated.
    stream: Option<bool>,
    /// Every other top-level field: OpenAI's body fields (`seed`, `tools`, `user`...),
    /// taken as if they were in `params`, or refused by name.
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize)]
struct RawMessage {
    role: String,
    #[serde(default)]
    content: Value,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawInput {
    One(String),
    Many(Vec<String>),
}

const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];

/// Parses one delivery and checks it against `rules` (its `reply_to`, model, parameters and
/// their caps). `default_kind` is the kind its queue implies when the body names none.
pub fn parse(
    body: &[u8],
    props: &BasicProperties,
    default_kind: Kind,
    rules: &Rules,
) -> Result<Job, InvalidRequest> {
    rules.identity.check(props).map_err(InvalidRequest::new)?;
    if let Some(reply_to) = props.reply_to().as_ref().map(|r| r.as_str())
        && !reply_to.is_empty()
    {
        let identity = Identity::of(props, &rules.identity.header);
        rules
            .reply_to
            .check(reply_to, identity.as_str())
            .map_err(InvalidRequest::new)?;
    }
    let mut raw = deserialize(body, props, rules.max_body_bytes)?;
    let kind = match raw.kind.as_deref() {
        None => default_kind,
        Some("chat") => Kind::Chat,
        Some("embedding" | "embeddings") => Kind::Embedding,
        Some(other) => {
            return Err(InvalidRequest::new(format!(
                "unknown kind {other:?}; expected \"chat\" or \"embedding\""
            )));
        }
    };
    let request_id = match raw.request_id.take() {
        Some(id) if id.is_empty() => {
            return Err(InvalidRequest::new("field `request_id`: must not be empty"));
        }
        Some(id) if id.len() > MAX_REQUEST_ID => {
            return Err(InvalidRequest::new(format!(
                "field `request_id`: {} bytes, at most {MAX_REQUEST_ID}",
                id.len()
            )));
        }
        Some(id) => id,
        None => fallback_request_id(body, props),
    };
    match raw.model.as_deref() {
        Some("") => return Err(InvalidRequest::new("field `model`: must not be empty")),
        Some(model) => rules.check_model(model).map_err(InvalidRequest::new)?,
        None => {}
    }
    let (model, metadata) = (raw.model.take(), raw.metadata.take());
    let deadline_ms = deadline_of(&raw, props, rules.max_age_secs)?;
    let stream = raw.stream.unwrap_or(false);
    if stream && kind == Kind::Embedding {
        return Err(InvalidRequest::new(
            "field `stream`: only chat answers stream; embeddings come whole",
        ));
    }
    let call = match kind {
        Kind::Chat => chat_call(raw, rules)?,
        Kind::Embedding => embedding_call(raw, rules)?,
    };
    let (Call::Chat { params, .. } | Call::Embedding { params, .. }) = &call;
    for (key, value) in params {
        rules.check_param(key, value).map_err(InvalidRequest::new)?;
    }
    Ok(Job {
        request_id,
        model,
        call,
        metadata,
        priority: props.priority().unwrap_or(0),
        deadline_ms,
        stream,
    })
}

/// Unix seconds as the wire carries them, in ms; `None` when not a usable time.
fn unix_secs_ms(secs: f64) -> Option<i64> {
    (secs.is_finite() && secs > 0.0 && secs < 1e12).then_some((secs * 1000.0) as i64)
}

/// The request's deadline: its `deadline`, or its age limit (`timestamp`, else the AMQP
/// `timestamp` property, plus `max_age_secs`), whichever comes first.
fn deadline_of(
    raw: &RawRequest,
    props: &BasicProperties,
    max_age_secs: u64,
) -> Result<Option<i64>, InvalidRequest> {
    let explicit = match raw.deadline {
        None => None,
        Some(secs) => Some(unix_secs_ms(secs).ok_or_else(|| {
            InvalidRequest::new(format!(
                "field `deadline`: {secs} is not a time in Unix seconds"
            ))
        })?),
    };
    let made = raw
        .timestamp
        .as_ref()
        .and_then(Value::as_f64)
        .and_then(unix_secs_ms)
        .or_else(|| {
            props
                .timestamp()
                .and_then(|secs| i64::try_from(secs).ok())
                .filter(|secs| *secs > 0)
                .map(|secs| secs.saturating_mul(1000))
        });
    let max_age_ms = i64::try_from(max_age_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let aged = made
        .filter(|_| max_age_secs > 0)
        .map(|made| made.saturating_add(max_age_ms));
    Ok(match (explicit, aged) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// The body checked for size, content type and encoding, then deserialized.
fn deserialize(
    body: &[u8],
    props: &BasicProperties,
    max_body_bytes: usize,
) -> Result<RawRequest, InvalidRequest> {
    if body.len() > max_body_bytes {
        return Err(InvalidRequest {
            kind: ErrorKind::TooLarge,
            message: format!(
                "body is {} bytes, over worker.max_body_bytes = {max_body_bytes}",
                body.len()
            ),
        });
    }
    if let Some(ct) = props.content_type() {
        let ct = ct.as_str().to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.is_empty() && essence != "application/json" && !essence.ends_with("+json") {
            return Err(InvalidRequest::new(format!(
                "content-type {essence:?} is not JSON; send application/json"
            )));
        }
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(InvalidRequest::new("empty body; expected a JSON object"));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        InvalidRequest::new(format!(
            "body is not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    // One plain pass on the happy path; a body that does not fit is parsed again, with the
    // path tracked, only to say why.
    serde_json::from_str(text).map_err(|_| explain(text))
}

/// A chat call: the messages (system prompt first) and the parameters.
fn chat_call(raw: RawRequest, rules: &Rules) -> Result<Call, InvalidRequest> {
    if raw.input.is_some() {
        return Err(InvalidRequest::new(
            "field `input`: a chat request takes `prompt` or `messages`; \
             set \"kind\": \"embedding\" for embeddings",
        ));
    }
    let mut messages = Vec::new();
    if let Some(system) = raw.system {
        messages.push(serde_json::json!({"role": "system", "content": system}));
    }
    match (raw.prompt, raw.messages) {
        (Some(_), Some(_)) => {
            return Err(InvalidRequest::new(
                "give either `prompt` or `messages`, not both",
            ));
        }
        (None, None) => {
            return Err(InvalidRequest::new(
                "missing `prompt` (a string) or `messages` (a list of {role, content})",
            ));
        }
        (Some(prompt), None) => {
            if prompt.trim().is_empty() {
                return Err(InvalidRequest::new("field `prompt`: must not be empty"));
            }
            messages.push(serde_json::json!({"role": "user", "content": prompt}));
        }
        (None, Some(list)) => {
            if list.is_empty() {
                return Err(InvalidRequest::new("field `messages`: must not be empty"));
            }
            for (i, m) in list.into_iter().enumerate() {
                messages.push(check_message(i, m)?);
            }
        }
    }
    let params = params::gather(raw.params, raw.max_tokens, raw.temperature, raw.rest, rules)
        .map_err(InvalidRequest::new)?;
    Ok(Call::Chat { messages, params })
}

/// An embeddings call: one input or several, none empty, at most the OpenAI limit.
fn embedding_call(raw: RawRequest, rules: &Rules) -> Result<Call, InvalidRequest> {
    for (field, given) in [
        ("prompt", raw.prompt.is_some()),
        ("messages", raw.messages.is_some()),
        ("system", raw.system.is_some()),
    ] {
        if given {
            return Err(InvalidRequest::new(format!(
                "field `{field}`: an embedding request takes `input`, not `{field}`"
            )));
        }
    }
    let (input, single) = match raw.input {
        None => {
            return Err(InvalidRequest::new(
                "missing `input` (a string or a list of strings) for an embedding",
            ));
        }
        Some(RawInput::One(s)) => (vec![s], true),
        Some(RawInput::Many(v)) => (v, false),
    };
    if input.is_empty() {
        return Err(InvalidRequest::new("field `input`: must not be empty"));
    }
    if input.len() > MAX_EMBEDDING_INPUTS {
        return Err(InvalidRequest::new(format!(
            "field `input`: {} items, at most {MAX_EMBEDDING_INPUTS}",
            input.len()
        )));
    }
    if let Some(i) = input.iter().position(|s| s.is_empty()) {
        return Err(InvalidRequest::new(format!(
            "field `input[{i}]`: must not be empty"
        )));
    }
    let params = params::gather(raw.params, raw.max_tokens, raw.temperature, raw.rest, rules)
        .map_err(InvalidRequest::new)?;
    Ok(Call::Embedding {
        input,
        single,
        params,
    })
}

/// Why a body did not deserialize: bad JSON, not an object, or a field of the wrong type.
fn explain(text: &str) -> InvalidRequest {
    match serde_json::from_str::<Value>(text) {
        Err(syntax) => InvalidRequest::new(format!("invalid JSON: {syntax}")),
        Ok(value) if !value.is_object() => InvalidRequest::new(format!(
            "body must be a JSON object, got {}",
            json_type(&value)
        )),
        Ok(_) => {
            let mut de = serde_json::Deserializer::from_str(text);
            match serde_path_to_error::deserialize::<_, RawRequest>(&mut de) {
                Err(e) => {
                    let path = e.path().to_string();
                    InvalidRequest::new(format!("field `{path}`: {}", e.into_inner()))
                }
                Ok(_) => InvalidRequest::new("invalid JSON: trailing data after the object"),
            }
        }
    }
}

fn check_message(i: usize, m: RawMessage) -> Result<Value, InvalidRequest> {
    if !ROLES.contains(&m.role.as_str()) {
        return Err(InvalidRequest::new(format!(
            "field `messages[{i}].role`: {:?} is not one of {}",
            m.role,
            ROLES.join(", ")
        )));
    }
    let has_tool_calls = match m.rest.get("tool_calls") {
        None | Some(Value::Null) => false,
        Some(Value::Array(calls)) if m.role == "assistant" => {
            if let Some(j) = calls.iter().position(|c| {
                c.get("id").and_then(Value::as_str).is_none()
                    || c.get("function")
                        .and_then(|f| f.get("name"))
                        .and_then(Value::as_str)
                        .is_none()
            }) {
                return Err(InvalidRequest::new(format!(
                    "field `messages[{i}].tool_calls[{j}]`: needs an `id` and a `function.name`"
                )));
            }
            true
        }
        Some(Value::Array(_)) => {
            return Err(InvalidRequest::new(format!(
                "field `messages[{i}].tool_calls`: only an assistant message makes tool calls"
            )));
        }
        Some(other) => {
            return Err(InvalidRequest::new(format!(
                "field `messages[{i}].tool_calls`: expected a list, got {}",
                json_type(other)
            )));
        }
    };
    let names_its_call = m
        .rest
        .get("tool_call_id")
        .and_then(Value::as_str)
        .is_some_and(|id| !id.is_empty());
    if m.role == "tool" && !names_its_call {
        return Err(InvalidRequest::new(format!(
            "field `messages[{i}].tool_call_id`: a tool message answers one tool call and names \
             its id"
        )));
    }
    match &m.content {
        Value::String(_) | Value::Array(_) => {}
        Value::Null if m.role == "assistant" && has_tool_calls => {}
        Value::Null => {
            return Err(InvalidRequest::new(format!(
                "field `messages[{i}].content`: missing"
            )));
        }
        other => {
            return Err(InvalidRequest::new(format!(
                "field `messages[{i}].content`: expected a string or a list of parts, got {}",
                json_type(other)
            )));
        }
    }
    let mut out = m.rest;
    out.insert("role".into(), Value::String(m.role));
    out.insert("content".into(), m.content);
    Ok(Value::Object(out))
}

/// The id of a message whose body names none: its `message_id`, else a digest of the body,
/// so that a redelivered copy maps to the same id.
pub fn fallback_request_id(body: &[u8], props: &BasicProperties) -> String {
    if let Some(id) = props
        .message_id()
        .as_ref()
        .filter(|s| !s.as_str().is_empty())
    {
        return id.to_string();
    }
    let digest = Sha256::digest(body);
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256-{hex}")
}

/// Best-effort id of a message that failed to parse, for its dead letter and error result.
pub fn request_id_of_invalid(body: &[u8], props: &BasicProperties) -> String {
    #[derive(Deserialize)]
    struct OnlyId {
        request_id: Option<String>,
    }
    serde_json::from_slice::<OnlyId>(body)
        .ok()
        .and_then(|o| o.request_id)
        .filter(|id| !id.is_empty() && id.len() <= MAX_REQUEST_ID)
        .unwrap_or_else(|| fallback_request_id(body, props))
}

/// The JSON type of a value, for error messages.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props() -> BasicProperties {
        BasicProperties::default()
    }

    /// `body` parsed as a delivery to the chat queue, with no properties, under `rules`.
    fn chat_under(body: &[u8], rules: &Rules) -> Result<Job, InvalidRequest> {
        parse(body, &props(), Kind::Chat, rules)
    }

    fn ok(body: &str) -> Job {
        chat_under(body.as_bytes(), &Rules::default()).expect("valid request")
    }

    fn err(body: &[u8]) -> String {
        chat_under(body, &Rules::default())
            .expect_err("invalid request")
            .message
    }

    /// Checks that each body is refused with a reason that contains what goes with it.
    fn refused_saying<'a>(cases: impl IntoIterator<Item = (&'a [u8], &'a str)>) {
        for (body, says) in cases {
            let e = err(body);
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn seed_form_works_as_is() {
        let job = ok(r#"{"prompt": "Hello", "timestamp": 1732000000.0}"#);
        assert_eq!(job.kind(), Kind::Chat);
        let Call::Chat { messages, params } = &job.call else {
            panic!("chat expected")
        };
        assert_eq!(
            messages,
            &vec![serde_json::json!({"role":"user","content":"Hello"})]
        );
        assert!(params.is_empty());
        assert!(job.request_id.starts_with("sha256-"));
        // A redelivered copy maps to the same id.
        assert_eq!(
            job.request_id,
            ok(r#"{"prompt": "Hello", "timestamp": 1732000000.0}"#).request_id
        );
    }

    #[test]
    fn full_form() {
        let job = ok(r#"{"request_id":"r1","model":"m","system":"be brief",
            "messages":[{"role":"user","content":"hi"}],"max_tokens":5,"temperature":0.5,
            "params":{"top_p":0.9},"metadata":{"k":[1]}}"#);
        assert_eq!(job.request_id, "r1");
        assert_eq!(job.model.as_deref(), Some("m"));
        assert_eq!(job.metadata, Some(serde_json::json!({"k":[1]})));
        let Call::Chat { messages, params } = &job.call else {
            panic!("chat expected")
        };
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0]["role"], "system");
        assert_eq!(params["max_tokens"], 5);
        assert_eq!(params["top_p"], 0.9);
    }

    #[test]
    fn embeddings() {
        let job = ok(r#"{"kind":"embedding","input":["a","b"]}"#);
        assert_eq!(
            job.call,
            Call::Embedding {
                input: vec!["a".into(), "b".into()],
                single: false,
                params: Map::new()
            }
        );
        let job = parse(
            br#"{"input":"a"}"#,
            &props(),
            Kind::Embedding,
            &Rules::default(),
        )
        .expect("valid");
        assert!(matches!(job.call, Call::Embedding { single: true, .. }));
    }

    #[test]
    fn ids_come_from_body_then_message_id() {
        let p = BasicProperties::default().with_message_id("m-1".into());
        let job = parse(br#"{"prompt":"x"}"#, &p, Kind::Chat, &Rules::default()).expect("valid");
        assert_eq!(job.request_id, "m-1");
        let job = parse(
            br#"{"prompt":"x","request_id":"b-1"}"#,
            &p,
            Kind::Chat,
            &Rules::default(),
        )
        .expect("valid");
        assert_eq!(job.request_id, "b-1");
    }

    #[test]
    fn bad_input_has_precise_reasons() {
        assert!(err(b"{\"prompt\": \n  nope}").contains("line 2 column"));
        assert!(err(b"").contains("empty body"));
        assert!(err(b"\xff\xfe{}").contains("not UTF-8"));
        assert!(err(b"[1,2]").contains("got an array"));
        assert!(err(b"{}").contains("missing `prompt`"));
        assert!(err(br#"{"prompt": 5}"#).contains("field `prompt`"));
        assert!(err(br#"{"max_tokens": "5", "prompt": "x"}"#).contains("field `max_tokens`"));
        assert!(err(br#"{"kind":"image","prompt":"x"}"#).contains("unknown kind"));
        assert!(
            err(br#"{"messages":[{"role":"wizard","content":"x"}]}"#).contains("messages[0].role")
        );
        assert!(
            err(br#"{"messages":[{"role":"user","content":5}]}"#).contains("messages[0].content")
        );
        assert!(err(br#"{"kind":"embedding"}"#).contains("missing `input`"));
        assert!(err(br#"{"prompt":"x","params":{"model":"y"}}"#).contains("params.model"));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(err(deep.as_bytes()).contains("recursion limit"));
    }

    #[test]
    fn bounds_of_what_a_call_can_be_billed_for() {
        let mut job = ok(r#"{"prompt": "12345678", "params": {"n": 3}}"#);
        assert_eq!(job.input_bound(), 16, "8 bytes and one message's framing");
        assert_eq!(job.output_bound(), None, "no bound set");
        job.bound_output(100);
        assert_eq!(job.output_bound(), Some(300), "every choice");
        job.bound_output(40);
        assert_eq!(job.output_bound(), Some(120), "a larger bound is lowered");
        job.bound_output(500);
        assert_eq!(job.output_bound(), Some(120), "a smaller one is kept");
        let mut both = ok(r#"{"prompt": "x", "params": {"max_completion_tokens": 900}}"#);
        both.bound_output(64);
        assert_eq!(both.output_bound(), Some(64));
        let Call::Chat { params, .. } = &both.call else {
            panic!("chat")
        };
        assert!(!params.contains_key("max_tokens"), "only the field it set");
        let embed = ok(r#"{"kind": "embedding", "input": ["abcd", "efgh"]}"#);
        assert_eq!((embed.input_bound(), embed.output_bound()), (8, Some(0)));
    }

    #[test]
    fn token_estimates() {
        let job = ok(r#"{"prompt": "12345678", "max_tokens": 10}"#);
        assert_eq!(job.token_estimate(256), 12);
        let job = ok(r#"{"prompt": "12345678"}"#);
        assert_eq!(job.token_estimate(256), 258);
        let job = ok(r#"{"kind": "embedding", "input": ["abcd", "efgh"]}"#);
        assert_eq!(job.token_estimate(256), 2);
        let job = ok(r#"{"prompt": "12345678", "params": {"max_completion_tokens": 100, "n": 3}}"#);
        assert_eq!(job.token_estimate(256), 302, "every choice is paid for");
        let job = ok(r#"{"prompt": "12345678", "params": {"n": 2}}"#);
        assert_eq!(job.token_estimate(256), 514);
    }

    #[test]
    fn too_large_is_rejected_without_parsing() {
        let rules = Rules {
            max_body_bytes: 64,
            ..Rules::default()
        };
        let e = chat_under(&[b'x'; 100], &rules).expect_err("too large");
        assert_eq!(e.kind, ErrorKind::TooLarge);
    }

    #[test]
    fn content_type() {
        let json =
            BasicProperties::default().with_content_type("application/json; charset=utf-8".into());
        assert!(parse(br#"{"prompt":"x"}"#, &json, Kind::Chat, &Rules::default()).is_ok());
        let text = BasicProperties::default().with_content_type("text/plain".into());
        let e = parse(br#"{"prompt":"x"}"#, &text, Kind::Chat, &Rules::default())
            .expect_err("not json");
        assert!(e.message.contains("text/plain"));
    }

    /// Rules that know `llm_processing` and the retry tiers as llmq's.
    fn rules_with_topology(pattern: &str) -> Rules {
        use crate::contract::reply_to::{OwnedQueue, ReplyToPolicy};
        Rules {
            reply_to: ReplyToPolicy::new(
                vec![
                    OwnedQueue::subtree("llm_processing", "topology.processing_queue"),
                    OwnedQueue::subtree("llm_requests.retry", "topology.retry_queue_prefix"),
                ],
                pattern,
            )
            .expect("compiles"),
            ..Rules::default()
        }
    }

    fn with_reply_to(reply_to: &str, rules: &Rules) -> Result<Job, InvalidRequest> {
        let p = BasicProperties::default().with_reply_to(reply_to.into());
        parse(br#"{"prompt":"x"}"#, &p, Kind::Chat, rules)
    }

    #[test]
    fn reply_to_is_checked() {
        let rules = rules_with_topology("replies\\..+");
        let e = with_reply_to("llm_requests.retry.5s", &rules).expect_err("own queue");
        assert_eq!(e.kind, ErrorKind::InvalidRequest);
        assert!(
            e.message.contains("topology.retry_queue_prefix"),
            "{}",
            e.message
        );
        let e = with_reply_to("elsewhere", &rules).expect_err("off pattern");
        assert!(
            e.message.contains("worker.reply_to_pattern"),
            "{}",
            e.message
        );
        assert!(with_reply_to("replies.a", &rules).is_ok());
        assert!(with_reply_to("amq.rabbitmq.reply-to", &rules).is_ok());
        // An empty reply_to is no reply_to.
        assert!(with_reply_to("", &rules).is_ok());
    }

    #[test]
    fn models_can_be_restricted() {
        let rules = Rules {
            allowed_models: ["m1".to_string()].into(),
            ..Rules::default()
        };
        let parse_model = |body: &str| chat_under(body.as_bytes(), &rules);
        assert!(parse_model(r#"{"prompt":"x","model":"m1"}"#).is_ok());
        assert!(
            parse_model(r#"{"prompt":"x"}"#).is_ok(),
            "the default applies"
        );
        let e = parse_model(r#"{"prompt":"x","model":"m2"}"#).expect_err("not allowed");
        assert_eq!(
            e.message,
            "field `model`: \"m2\" is not one of llm.allowed_models"
        );
        let e = parse_model(r#"{"kind":"embedding","input":"x","model":"m2"}"#)
            .expect_err("embeddings too");
        assert!(e.message.contains("llm.allowed_models"));
    }

    #[test]
    fn stream_is_a_top_level_switch_for_chat_only() {
        assert!(ok(r#"{"prompt":"x","stream":true}"#).stream);
        assert!(!ok(r#"{"prompt":"x","stream":false}"#).stream);
        assert!(!ok(r#"{"prompt":"x"}"#).stream);
        assert!(err(br#"{"prompt":"x","stream":"yes"}"#).contains("stream"));
        assert_eq!(
            err(br#"{"kind":"embedding","input":"x","stream":true}"#),
            "field `stream`: only chat answers stream; embeddings come whole"
        );
    }

    #[test]
    fn params_are_allowlisted_and_capped() {
        assert_eq!(
            err(br#"{"prompt":"x","params":{"store":true}}"#),
            "parameter `store` is not allowed (llm.allowed_params)"
        );
        assert!(
            err(br#"{"prompt":"x","params":{"service_tier":"priority"}}"#).contains("service_tier")
        );
        assert!(err(br#"{"prompt":"x","params":{"stream":true}}"#).contains("params.stream"));
        assert!(
            err(br#"{"prompt":"x","params":{"stream_options":{}}}"#)
                .contains("params.stream_options")
        );
        assert!(err(br#"{"prompt":"x","max_tokens":4294967295}"#).contains("llm.max_tokens_cap"));
        assert!(
            err(br#"{"prompt":"x","params":{"max_tokens":40000}}"#).contains("llm.max_tokens_cap")
        );
        assert!(
            err(br#"{"prompt":"x","params":{"max_completion_tokens":1e12}}"#)
                .contains("max_completion_tokens")
        );
        assert!(err(br#"{"prompt":"x","params":{"n":99}}"#).contains("llm.max_n"));
        assert!(
            err(br#"{"kind":"embedding","input":"x","params":{"store":true}}"#).contains("store")
        );
        let job = ok(
            r#"{"prompt":"x","max_tokens":32768,"params":{"n":4,"seed":1,
            "response_format":{"type":"json_object"}}}"#,
        );
        assert_eq!(job.kind(), Kind::Chat);
        let job = ok(r#"{"kind":"embedding","input":"x","params":{"dimensions":8,"user":"u"}}"#);
        assert_eq!(job.kind(), Kind::Embedding);
    }

    #[test]
    fn tool_fields_pass_through_from_the_top_level() {
        let job = ok(
            r#"{"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "auto", "parallel_tool_calls": false,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {}}}}"#,
        );
        let Call::Chat { params, .. } = &job.call else {
            panic!("chat");
        };
        assert_eq!(params["tools"][0]["function"]["name"], "f");
        assert_eq!(params["tool_choice"], "auto");
        assert_eq!(params["parallel_tool_calls"], false);
        assert_eq!(params["response_format"]["type"], "json_schema");
        assert!(
            err(br#"{"prompt": "x", "tools": [], "params": {"tools": [{}]}}"#)
                .contains("given at the top level and in `params` with different values")
        );
    }

    /// A body posted as to `/v1/chat/completions` reaches the API with every field it has.
    #[test]
    fn openai_s_chat_body_is_taken_as_it_is() {
        let job = ok(
            r#"{"model": "m", "messages": [{"role": "user", "content": "x"}],
            "seed": 7, "stop": ["\n"], "top_p": 0.5, "max_completion_tokens": 20,
            "logit_bias": {"50256": -100}, "user": "u-1", "reasoning_effort": "low",
            "n": 2, "max_tokens": 30, "temperature": 0.1, "stream_options": {"include_usage": true}}"#,
        );
        let Call::Chat { params, .. } = &job.call else {
            panic!("chat");
        };
        assert_eq!(
            Value::Object(params.clone()),
            serde_json::json!({"seed": 7, "stop": ["\n"], "top_p": 0.5,
                "max_completion_tokens": 20, "logit_bias": {"50256": -100}, "user": "u-1",
                "reasoning_effort": "low", "n": 2, "max_tokens": 30, "temperature": 0.1})
        );
        assert_eq!(
            job.token_estimate(256),
            60,
            "n x the larger bound, prompt 0"
        );
        let in_params = ok(
            r#"{"model": "m", "messages": [{"role": "user", "content": "x"}],
            "n": 2, "max_tokens": 30, "temperature": 0.1, "seed": 7, "params": {"seed": 7,
            "stop": ["\n"], "top_p": 0.5, "max_completion_tokens": 20,
            "logit_bias": {"50256": -100}, "user": "u-1", "reasoning_effort": "low"}}"#,
        );
        assert_eq!(
            job.call, in_params.call,
            "exactly as if in params; the same value twice is one"
        );
        // Caps hold at the top level as in params.
        assert!(err(br#"{"prompt": "x", "n": 99}"#).contains("llm.max_n"));
        assert!(
            err(br#"{"prompt": "x", "max_completion_tokens": 99999}"#)
                .contains("llm.max_tokens_cap")
        );
        assert!(
            err(br#"{"prompt": "x", "max_tokens": 5, "params": {"max_tokens": 6}}"#)
                .contains("field `max_tokens`: given at the top level and in `params`")
        );
    }

    #[test]
    fn a_top_level_field_neither_llmq_s_nor_allowed_is_refused_by_name() {
        assert_eq!(
            err(br#"{"prompt": "x", "store": true}"#),
            "field `store`: not a field of llmq's requests, nor a parameter in \
             llm.allowed_params or llm.extra_allowed_params"
        );
        assert!(err(br#"{"prompt": "x", "service_tier": "priority"}"#).contains("`service_tier`"));
        assert!(err(br#"{"prompt": "x", "promt": "typo"}"#).contains("field `promt`"));
        assert!(
            err(br#"{"kind": "embedding", "input": "x", "colour": 1}"#).contains("field `colour`")
        );
        assert!(
            err(br#"{"prompt": "x", "stream_options": {"include_usage": false}}"#)
                .contains("field `stream_options`")
        );
        let mut rules = Rules::default();
        rules.allowed_params.insert("store".into());
        assert!(chat_under(br#"{"prompt": "x", "store": true}"#, &rules).is_ok());
    }

    #[test]
    fn openai_s_embeddings_body_is_taken_as_it_is() {
        let job = ok(r#"{"kind": "embedding", "model": "e", "input": ["a", "b"],
            "encoding_format": "base64", "dimensions": 8, "user": "u"}"#);
        let Call::Embedding { params, .. } = &job.call else {
            panic!("embedding");
        };
        assert_eq!(
            Value::Object(params.clone()),
            serde_json::json!({"encoding_format": "base64", "dimensions": 8, "user": "u"})
        );
        refused_saying([
            (
                &br#"{"kind": "embedding", "input": "a", "prompt": "b"}"#[..],
                "field `prompt`: an embedding request takes `input`",
            ),
            (
                br#"{"kind": "embedding", "input": "a", "messages": []}"#,
                "field `messages`",
            ),
            (
                br#"{"kind": "embedding", "input": "a", "system": "s"}"#,
                "field `system`",
            ),
            (
                br#"{"prompt": "a", "input": "b"}"#,
                "field `input`: a chat request takes `prompt` or `messages`",
            ),
        ]);
    }

    #[test]
    fn a_required_identity_is_checked_first() {
        let rules = Rules {
            identity: crate::contract::IdentityRule {
                header: String::new(),
                required: true,
            },
            ..Rules::default()
        };
        let e = chat_under(br#"{"prompt": "x"}"#, &rules).expect_err("none");
        assert_eq!(e.kind, ErrorKind::InvalidRequest);
        assert!(e.message.contains("`user_id`"), "{e}");
        let alice = BasicProperties::default().with_user_id("alice".into());
        assert!(parse(br#"{"prompt": "x"}"#, &alice, Kind::Chat, &rules).is_ok());
        assert!(
            chat_under(br#"{"prompt": "x"}"#, &Rules::default()).is_ok(),
            "not required by default"
        );
    }

    #[test]
    fn tool_conversations_validate() {
        let job = ok(r#"{"messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "18"}]}"#);
        let Call::Chat { messages, .. } = &job.call else {
            panic!("chat");
        };
        assert!(messages[1]["content"].is_null());
        assert_eq!(messages[2]["tool_call_id"], "c1");
        refused_saying([
            (
                &br#"{"messages": [{"role": "tool", "content": "18"}]}"#[..],
                "messages[0].tool_call_id",
            ),
            (
                br#"{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"type": "function"}]}]}"#,
                "messages[0].tool_calls[0]",
            ),
            (
                br#"{"messages": [{"role": "user", "content": "x", "tool_calls": []}]}"#,
                "only an assistant message",
            ),
            (
                br#"{"messages": [{"role": "assistant", "content": null}]}"#,
                "messages[0].content",
            ),
        ]);
    }

    #[test]
    fn deadlines_come_from_the_body_or_the_age_limit() {
        let parse_with = |body: &str, props: &BasicProperties, max_age_secs: u64| {
            let rules = Rules {
                max_age_secs,
                ..Rules::default()
            };
            parse(body.as_bytes(), props, Kind::Chat, &rules)
        };
        let none = BasicProperties::default();
        let d = |body: &str, props: &BasicProperties, age: u64| {
            parse_with(body, props, age).expect("valid").deadline_ms
        };
        assert_eq!(d(r#"{"prompt":"x"}"#, &none, 0), None);
        assert_eq!(
            d(r#"{"prompt":"x","deadline":1700000000.5}"#, &none, 0),
            Some(1_700_000_000_500)
        );
        assert_eq!(
            d(r#"{"prompt":"x","timestamp":1700000000}"#, &none, 0),
            None,
            "no age limit configured"
        );
        assert_eq!(
            d(r#"{"prompt":"x","timestamp":1700000000}"#, &none, 60),
            Some(1_700_000_060_000)
        );
        let stamped = BasicProperties::default().with_timestamp(1_700_000_100);
        assert_eq!(
            d(r#"{"prompt":"x"}"#, &stamped, 60),
            Some(1_700_000_160_000),
            "else the AMQP timestamp"
        );
        assert_eq!(
            d(r#"{"prompt":"x","timestamp":1700000000}"#, &stamped, 60),
            Some(1_700_000_060_000),
            "the body's timestamp first"
        );
        assert_eq!(
            d(
                r#"{"prompt":"x","deadline":1700000010,"timestamp":1700000000}"#,
                &none,
                60
            ),
            Some(1_700_000_010_000),
            "whichever comes first"
        );
        let e = parse_with(r#"{"prompt":"x","deadline":-5}"#, &none, 0).expect_err("bad");
        assert!(e.message.contains("field `deadline`"), "{e}");
        assert_eq!(
            d(r#"{"prompt":"x","timestamp":"yesterday"}"#, &stamped, 60),
            Some(1_700_000_160_000),
            "a timestamp that is no time is ignored, not refused"
        );
    }
}
