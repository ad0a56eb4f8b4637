//! How the mock behaves: [`MockOptions`], the `llmq mock-llm` command line, which tests
//! also build and change while it runs.

use axum::http::{HeaderName, HeaderValue};

/// How the mock behaves.
#[derive(Debug, Clone, clap::Args)]
pub struct MockOptions {
    /// Delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Up to this many milliseconds more, spread evenly and deterministically over the
    /// calls, as a provider's answer times vary: calls started together do not end together.
    #[arg(long, default_value_t = 0)]
    pub latency_jitter_ms: u64,
    /// Extra delay per embedding input, in microseconds (batched calls cost more).
    #[arg(long, default_value_t = 0)]
    pub per_item_us: u64,
    /// Fraction of calls that fail, spread evenly and deterministically (0.25 = every 4th).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// The first this many calls fail as injected failures, whatever `error_rate` (a
    /// glitch: `--fail-first 1 --status 401` refuses one call, then answers).
    #[arg(long, default_value_t = 0)]
    pub fail_first: u64,
    /// The status of injected failures.
    #[arg(long, default_value_t = 500)]
    pub status: u16,
    /// `Retry-After` seconds sent with injected failures.
    #[arg(long)]
    pub retry_after: Option<u64>,
    /// The `error.message` of injected failures (default `injected failure <status>`), e.g.
    /// to echo a key as some providers do.
    #[arg(long)]
    pub error_message: Option<String>,
    /// Require this bearer token (401 otherwise).
    #[arg(long)]
    pub require_key: Option<String>,
    /// Keep every prompt in [`MockStats::prompts`](super::MockStats::prompts), and when its call ended in
    /// [`MockStats::ends`](super::MockStats::ends) (tests; unbounded, so off by default).
    #[arg(skip)]
    pub record_prompts: bool,
    /// Note when each streamed answer's first content chunk goes out, in
    /// [`MockStats::first_chunks`](super::MockStats::first_chunks) (`llmq bench`; unbounded, so off by default).
    #[arg(skip)]
    pub record_first_chunks: bool,
    /// Keep every chat and embeddings body in
    /// [`MockStats::bodies`](super::MockStats::bodies) (tests; unbounded, so off by default).
    #[arg(skip)]
    pub record_bodies: bool,
    /// Answer chat calls with a reply of this many bytes, streamed in chunks without a
    /// `Content-Length` (made as it is sent, so a huge one costs the mock nothing); 0 = the
    /// usual short reply. Tests `llm.max_response_bytes`.
    #[arg(long, default_value_t = 0)]
    pub response_bytes: u64,
    /// Refuse (400, `context_length_exceeded`) chat calls whose messages are longer than
    /// this many bytes, as a model refuses a prompt beyond its context window.
    #[arg(long)]
    pub max_prompt_bytes: Option<usize>,
    /// The only models it serves (`--models a,b`): a chat or embeddings call for another
    /// gets 404 `model_not_found`, as a deployment that lacks the model answers. Empty: any.
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Answer every chat and embeddings call 429 `insufficient_quota`, without
    /// `Retry-After`: an account out of credit, which waiting does not cure.
    #[arg(long)]
    pub insufficient_quota: bool,
    /// Answer chat calls without `usage` (some self-hosted servers do), streamed or not.
    #[arg(long)]
    pub no_usage: bool,
    /// Calls it answers at once, each counted from its arrival to its answer (its latency
    /// included): a call beyond them is refused at once with 429 `rate_limit_exceeded` (no
    /// `Retry-After` unless `cap_retry_after`), as a provider enforces a concurrency cap it
    /// does not announce.
    /// Counted in [`MockStats::over_cap`](super::MockStats::over_cap) and [`MockStats::peak_in_flight`](super::MockStats::peak_in_flight).
    #[arg(long)]
    pub max_concurrency: Option<u64>,
    /// `Retry-After` seconds sent with refusals over `max_concurrency`, as a provider that
    /// caps concurrent calls and still says when to come back.
    #[arg(long)]
    pub cap_retry_after: Option<u64>,
    /// Send injected 429s with OpenAI's `x-ratelimit-remaining-requests: 0` and
    /// `x-ratelimit-reset-requests: <retry_after or 1>s` instead of `Retry-After`.
    #[arg(long)]
    pub rate_limit_headers: bool,
    /// Milliseconds between the chunks of a streamed answer (a request with
    /// `"stream": true` is answered with server-sent events).
    #[arg(long, default_value_t = 0)]
    pub chunk_ms: u64,
    /// Cut every streamed answer off after this many chunks (the connection drops without
    /// `[DONE]`), as an upstream failing mid-stream does.
    #[arg(long)]
    pub fail_mid_stream_after: Option<u64>,
    /// With `--fail-mid-stream-after`, the fraction of streamed answers cut off: the first
    /// of every 1/rate (0.5 cuts the 1st, 3rd, 5th...), so that a retry of a cut stream
    /// gets through.
    #[arg(long, default_value_t = 1.0)]
    pub fail_mid_stream_rate: f64,
    /// Break a stream off with an error event (`data: {"error": {...}}`, then the end of
    /// the body), as OpenAI and vLLM report a failure mid-stream, instead of dropping the
    /// connection.
    #[arg(long)]
    pub mid_stream_error: bool,
    /// Appended to the requested model in answers (`--model-suffix -2024-07-18`), as
    /// OpenAI reports the dated snapshot that served an alias.
    #[arg(long, allow_hyphen_values = true)]
    pub model_suffix: Option<String>,
    /// Require this header, `name: value` (401 otherwise), as Azure OpenAI requires
    /// `api-key`. A value without a `:` matches no call.
    #[arg(long, value_parser = header_requirement)]
    pub require_header: Option<String>,
    /// Require this query parameter, `name=value` (401 otherwise), as Azure OpenAI
    /// requires `api-version`. A value without a `=` matches no call.
    #[arg(long, value_parser = query_requirement)]
    pub require_query: Option<String>,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            latency_jitter_ms: 0,
            per_item_us: 0,
            error_rate: 0.0,
            fail_first: 0,
            status: 500,
            retry_after: None,
            error_message: None,
            require_key: None,
            record_prompts: false,
            record_first_chunks: false,
            record_bodies: false,
            response_bytes: 0,
            max_prompt_bytes: None,
            models: Vec::new(),
            insufficient_quota: false,
            no_usage: false,
            max_concurrency: None,
            cap_retry_after: None,
            rate_limit_headers: false,
            chunk_ms: 0,
            fail_mid_stream_after: None,
            fail_mid_stream_rate: 1.0,
            mid_stream_error: false,
            model_suffix: None,
            require_header: None,
            require_query: None,
        }
    }
}

/// `--require-header`: `name: value` with a valid header name and value.
fn header_requirement(s: &str) -> Result<String, String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}` is not `name: value`"))?;
    HeaderName::try_from(name.trim()).map_err(|e| format!("header name `{name}`: {e}"))?;
    HeaderValue::try_from(value.trim()).map_err(|e| format!("header value: {e}"))?;
    Ok(s.to_string())
}

/// `--require-query`: `name=value`.
fn query_requirement(s: &str) -> Result<String, String> {
    match s.split_once('=') {
        Some((name, _)) if !name.is_empty() => Ok(s.to_string()),
        _ => Err(format!("`{s}` is not `name=value`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_command_line_s_and_every_flag_parses() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            mock: MockOptions,
        }
        let parse = |args: &[&str]| {
            <Cli as clap::Parser>::try_parse_from([&["mock-llm"], args].concat()).map(|c| c.mock)
        };
        let none = parse(&[]).unwrap();
        assert_eq!(format!("{none:?}"), format!("{:?}", MockOptions::default()));
        let all = parse(&[
            "--models",
            "a,b",
            "--insufficient-quota",
            "--max-concurrency",
            "3",
            "--rate-limit-headers",
            "--model-suffix",
            "-2024-07-18",
            "--require-header",
            "api-key: secret",
            "--require-query",
            "api-version=2024-10-21",
            "--fail-first",
            "2",
            "--cap-retry-after",
            "1",
        ])
        .unwrap();
        assert_eq!(all.models, ["a", "b"]);
        assert!(all.insufficient_quota && all.rate_limit_headers);
        assert_eq!(all.max_concurrency, Some(3));
        assert_eq!(all.fail_first, 2);
        assert_eq!(all.cap_retry_after, Some(1));
        assert_eq!(all.model_suffix.as_deref(), Some("-2024-07-18"));
        assert_eq!(all.require_header.as_deref(), Some("api-key: secret"));
        assert_eq!(all.require_query.as_deref(), Some("api-version=2024-10-21"));
        assert!(parse(&["--require-header", "api-key"]).is_err());
        assert!(parse(&["--require-header", "bad name: x"]).is_err());
        assert!(parse(&["--require-query", "api-version"]).is_err());
    }
}
