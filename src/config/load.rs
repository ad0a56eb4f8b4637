//! Layering: defaults, then the TOML file, then `LLMQ_*` variables; every problem named by
//! its key, without quoting secret values.

use std::path::{Path, PathBuf};

use super::{Config, ConfigError, ENV_PREFIX, Secret, env_name, fields};
use figment::{
    Figment,
    providers::{Env, Format, Toml},
    value::{Dict, Value},
};

impl Config {
    /// Loads defaults, then `path` (or `./config.toml` if it exists), then `LLMQ_*`
    /// environment variables, then the `OPENAI_API_KEY` fallback.
    ///
    /// An explicit `path` that does not exist is an error; the implicit `./config.toml` is
    /// optional.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let file: Option<PathBuf> = match path {
            Some(p) if !p.exists() => {
                problems.push(format!("config file {}: not found", p.display()));
                None
            }
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from("config.toml")).filter(|p| p.exists()),
        };
        let mut figment = Figment::new();
        if let Some(file) = &file {
            figment = figment.merge(Toml::file_exact(file));
        }
        // Only nested names are keys (every key lives in a section), so that an unrelated
        // LLMQ_SOMETHING in the environment is no error, while a typo such as
        // LLMQ_WORKER__PREFECH still is.
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|k| k.as_str().contains("__"))
                .split("__"),
        );
        let mut config = Self::from_figment(&figment, &mut problems);
        config.resolve_references(&mut problems);
        // The fallback serves the one deployment of `[llm]`, and each of `[upstreams]` that
        // is OpenAI's own and names no key of its own.
        if let Some(key) = std::env::var("OPENAI_API_KEY")
            .ok()
            .filter(|k| !k.is_empty())
        {
            if config.llm.api_key.is_empty() && config.upstreams.is_empty() {
                config.llm.api_key = Secret::new(key.clone());
            }
            for upstream in config.upstreams.values_mut() {
                if upstream.api_key.is_empty() && is_openai(upstream.base_url.expose()) {
                    upstream.api_key = Secret::new(key.clone());
                }
            }
        }
        problems.extend(config.validate());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Replaces every secret given by reference, `env:NAME`, with the value of the
    /// environment variable `NAME`: `llm.api_key`, and each of `[upstreams]`'s `api_key`
    /// and header values. A variable that is unset or empty is a problem naming the key and
    /// the variable, never a value.
    fn resolve_references(&mut self, problems: &mut Vec<String>) {
        resolve(&mut self.llm.api_key, "llm.api_key", problems);
        for (name, upstream) in &mut self.upstreams {
            resolve(
                &mut upstream.api_key,
                &format!("upstreams.{name}.api_key"),
                problems,
            );
            for (header, value) in &mut upstream.headers {
                resolve(
                    value,
                    &format!("upstreams.{name}.headers.{header}"),
                    problems,
                );
            }
        }
    }

    /// Extracts each section on its own, so that a problem in one does not hide the others.
    /// The sections are [`Config`]'s fields, as its `Deserialize` names them: a new section
    /// is loaded, and named in the error for an unknown one, without being listed here.
    fn from_figment(figment: &Figment, problems: &mut Vec<String>) -> Self {
        let root: Dict = match figment.extract() {
            Ok(root) => root,
            Err(e) => {
                problems.push(without_source(&e.to_string()));
                return Config::default();
            }
        };
        let sections = fields::of::<Config>();
        let mut good = Dict::new();
        for (key, value) in &root {
            if !sections.contains(&key.as_str()) {
                problems.push(format!(
                    "{key} ({}): unknown key; sections are {}",
                    env_name(key),
                    sections.join(", ")
                ));
            } else if let Some(value) = section(key, value, problems) {
                good.insert(key.clone(), value);
            }
        }
        match Value::from(good).deserialize::<Config>() {
            Ok(config) => config,
            // Each section deserializes alone, and sections do not depend on each other.
            Err(e) => {
                problems.push(without_source(&e.to_string()));
                Config::default()
            }
        }
    }
}

/// Checks one section by deserializing a configuration of it alone; on failure, finds every
/// bad key by deserializing each key alone (all fields have defaults, so a one-key section
/// fails only for that key). Returns what of the section applies: all of it, or its good
/// keys, so that validation still sees (and reports) their values.
fn section(name: &str, value: &Value, problems: &mut Vec<String>) -> Option<Value> {
    // Boxed: figment's error is large, and most sections have none.
    let alone = |value: Value| {
        let config = Value::from(Dict::from([(name.to_string(), value)]));
        config.deserialize::<Config>().map_err(Box::new)
    };
    if alone(value.clone()).is_ok() {
        return Some(value.clone());
    }
    let Value::Dict(_, dict) = value else {
        problems.push(format!(
            "{name} ({}): must be a table of keys",
            env_name(name)
        ));
        return None;
    };
    let mut good = Dict::new();
    for (key, v) in dict {
        let Err(e) = alone(Value::from(Dict::from([(key.clone(), v.clone())]))) else {
            good.insert(key.clone(), v.clone());
            continue;
        };
        // The error's path below the section; the nested key, where there is one
        // (`upstreams.openai.weight`).
        let below = match e.path.split_first() {
            Some((first, rest)) if first == name => rest,
            _ => &e.path[..],
        };
        let path = if below.len() > 1 && below[0] == *key {
            below.to_vec()
        } else {
            vec![key.clone()]
        };
        let full = format!("{name}.{}", path.join("."));
        let secret = name == "upstreams" || path.iter().any(|k| SECRET_KEYS.contains(&k.as_str()));
        problems.push(format!(
            "{full} ({}): {}",
            env_name(&full),
            describe(secret, &e)
        ));
    }
    let good = Value::from(good);
    alone(good.clone()).is_ok().then_some(good)
}

/// Keys whose values are secret or may hold one: their errors never quote the value. Every
/// value of `[upstreams]` is treated so (keys, headers and URLs live there).
const SECRET_KEYS: [&str; 6] = ["api_key", "url", "urls", "redis_url", "base_url", "headers"];

/// A key's error, without its value when the key is `secret`.
fn describe(secret: bool, e: &figment::Error) -> String {
    if secret {
        use figment::error::Kind;
        match &e.kind {
            Kind::InvalidType(_, expected) => {
                format!("invalid type (value hidden), expected {expected}")
            }
            Kind::InvalidValue(_, expected) => {
                format!("invalid value (hidden), expected {expected}")
            }
            _ => "invalid value (hidden)".into(),
        }
    } else {
        e.kind.to_string()
    }
}

/// A configuration file error without the quoted source line (it may hold a secret).
fn without_source(message: &str) -> String {
    let mut lines = message.lines().filter(|l| {
        let t = l.trim_start();
        !(t.starts_with('|')
            || t.chars().next().is_some_and(|c| c.is_ascii_digit()) && t.contains(" | "))
    });
    let first = lines.next().unwrap_or("").trim();
    let rest: Vec<&str> = lines
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('^'))
        .collect();
    if rest.is_empty() {
        first.to_string()
    } else {
        format!("{first}: {}", rest.join(" "))
    }
}

/// The prefix of a secret given by reference to an environment variable.
pub const ENV_REFERENCE: &str = "env:";

/// `secret`, when it reads `env:NAME`, replaced by the variable `NAME`'s value; `key` names
/// it in a problem.
fn resolve(secret: &mut Secret, key: &str, problems: &mut Vec<String>) {
    let Some(name) = secret.expose().strip_prefix(ENV_REFERENCE) else {
        return;
    };
    let name = name.trim();
    match std::env::var(name) {
        Ok(value) if !name.is_empty() && !value.is_empty() => *secret = Secret::new(value),
        _ if name.is_empty() => problems.push(format!(
            "{key} ({}): `env:` names no variable",
            env_name(key)
        )),
        _ => problems.push(format!(
            "{key} ({}): refers to the environment variable {name}, which is unset or empty",
            env_name(key)
        )),
    }
}

/// Whether `base_url` is OpenAI's own API (`api.openai.com`), which `OPENAI_API_KEY` serves.
fn is_openai(base_url: &str) -> bool {
    url::Url::parse(base_url).is_ok_and(|u| u.host_str() == Some("api.openai.com"))
}

#[cfg(test)]
// figment's Jail API fixes the closure's error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use crate::config::{KeepResults, QueueType, redact_url};
    use figment::Jail;

    /// The repository's `config.toml` (copied into the Docker image) holds the defaults and
    /// nothing else, so it never pins a value the code has moved on from (a retry tier's
    /// name, say).
    #[test]
    fn the_shipped_config_toml_is_the_defaults() {
        let text = include_str!("../../config.toml");
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("config.toml", text)?;
            let loaded = Config::load(None).map_err(|e| e.problems.join("; "))?;
            assert_eq!(loaded, Config::default());
            Ok(())
        });
    }

    /// The Docker image reads the shipped `config.toml`: a deployment that gives the broker
    /// addresses as `LLMQ_AMQP__URLS` must not find `amqp.url` set there too.
    #[test]
    fn the_shipped_config_toml_takes_broker_urls_from_the_environment() {
        let text = include_str!("../../config.toml");
        let urls = "[amqp://u:pw@rabbitmq-1:5672/%2f, amqp://u:pw@rabbitmq-2:5672/%2f]";
        assert_eq!(
            problems(Some(text), &[("LLMQ_AMQP__URLS", urls)]),
            Vec::<String>::new()
        );
    }

    /// Loads inside a jail (its own cwd and environment) with `file` as `./config.toml`.
    fn problems(file: Option<&str>, vars: &[(&str, &str)]) -> Vec<String> {
        let mut out = Vec::new();
        Jail::expect_with(|jail| {
            jail.clear_env();
            if let Some(text) = file {
                jail.create_file("config.toml", text)?;
            }
            for (k, v) in vars {
                jail.set_env(k, v);
            }
            if let Err(e) = Config::load(None) {
                out = e.problems;
            }
            Ok(())
        });
        out
    }

    #[test]
    fn defaults_are_valid() {
        assert!(problems(None, &[]).is_empty());
        let c = Config::default();
        assert_eq!(c.topology.request_exchange, "llm_requests");
        assert_eq!(c.topology.max_priority, 10);
        assert_eq!(c.worker.consumers, 4);
        assert_eq!(c.worker.prefetch, 0, "follows the concurrency limit");
        assert_eq!(c.worker.max_inflight, 256);
        assert_eq!(c.llm.timeout_secs, 60);
        assert_eq!(c.worker.shutdown_grace_secs, 75, "a call and its confirm");
        assert!(c.validate().is_empty());
    }

    #[test]
    fn env_overrides_file() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("c.toml", "[worker]\nprefetch = 7\nconsumers = 2\n")?;
            jail.set_env("LLMQ_WORKER__PREFETCH", "9");
            let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.worker.prefetch, 9);
            assert_eq!(c.worker.consumers, 2);
            Ok(())
        });
    }

    #[test]
    fn upstreams_load_from_the_file_and_the_environment() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "c.toml",
                r#"
[upstreams.openai]
base_url = "https://api.openai.com/v1"
models = ["gpt-4o", "gpt-4o-mini"]
weight = 3

[upstreams.azure]
base_url = "https://res.openai.azure.com/openai/deployments/mini"
model_names = { "gpt-4o-mini" = "mini" }
headers = { "api-key" = "azure-secret" }
query = { "api-version" = "2024-10-21" }

[routing]
fallbacks = { "gpt-4o" = ["gpt-4o-mini"] }
"#,
            )?;
            jail.set_env("LLMQ_UPSTREAMS__OPENAI__API_KEY", "sk-from-env");
            jail.set_env("LLMQ_UPSTREAMS__OPENAI__MAX_INFLIGHT", "32");
            let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            let openai = &c.upstreams["openai"];
            assert_eq!(openai.api_key.expose(), "sk-from-env");
            assert_eq!((openai.weight, openai.max_inflight), (3, 32));
            assert!(openai.serves("gpt-4o") && !openai.serves("o1"));
            let azure = &c.upstreams["azure"];
            assert!(azure.serves("anything"), "no models: any");
            assert_eq!(azure.upstream_name("gpt-4o-mini"), "mini");
            assert_eq!(azure.headers["api-key"].expose(), "azure-secret");
            assert!(
                !format!("{c:?}").contains("azure-secret"),
                "secret in Debug"
            );
            assert_eq!(c.deployments().len(), 2, "[llm] is no deployment then");
            assert_eq!(c.routing.fallbacks["gpt-4o"], ["gpt-4o-mini"]);
            Ok(())
        });
    }

    #[test]
    fn without_upstreams_llm_is_the_default_deployment() {
        let mut c = Config::default();
        c.llm.timeout_secs = 20;
        c.worker.max_inflight = 99;
        let d = c.deployments();
        assert_eq!(d.len(), 1);
        let (name, spec) = &d[0];
        assert_eq!(name, "default");
        assert_eq!((spec.timeout_secs, spec.max_inflight), (20, 99));
        assert_eq!(spec.base_url, c.llm.base_url);
        assert!(spec.serves("any-model"));
        assert!(c.ignored_llm_keys().is_empty());
        c.upstreams
            .insert("a".into(), crate::config::UpstreamConfig::default());
        assert_eq!(
            c.ignored_llm_keys(),
            ["llm.timeout_secs"],
            "named in a warning"
        );
    }

    #[test]
    fn lists_load_from_the_environment() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("LLMQ_LLM__ALLOWED_PARAMS", "[temperature, seed]");
            jail.set_env("LLMQ_LLM__ALLOWED_MODELS", "[gpt-4o-mini]");
            jail.set_env("LLMQ_WORKER__REPLY_TO_PATTERN", "replies\\..+");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.llm.allowed_params, ["temperature", "seed"]);
            assert_eq!(c.llm.allowed_models, ["gpt-4o-mini"]);
            assert_eq!(c.worker.reply_to_pattern, "replies\\..+");
            jail.set_env("LLMQ_LLM__ALLOWED_MODELS", "[]");
            jail.set_env("LLMQ_LLM__EXTRA_ALLOWED_PARAMS", "[store]");
            jail.set_env("LLMQ_TENANCY__REQUIRE_USER_ID", "false");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert!(c.llm.allowed_models.is_empty());
            assert_eq!(c.llm.extra_allowed_params, ["store"]);
            assert_eq!(c.tenancy.require_user_id, crate::config::Switch::Off);
            jail.set_env("LLMQ_TENANCY__REQUIRE_USER_ID", "auto");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.tenancy.require_user_id, crate::config::Switch::Auto);
            Ok(())
        });
    }

    /// The addresses `Config::load` gives with these variables set.
    fn addresses(vars: &[(&str, &str)]) -> Result<Vec<String>, String> {
        let mut out = Err(String::new());
        Jail::expect_with(|jail| {
            jail.clear_env();
            for (k, v) in vars {
                jail.set_env(k, v);
            }
            out = Config::load(None)
                .map(|c| {
                    let urls = c.amqp.addresses().iter();
                    urls.map(|u| u.expose().to_string()).collect()
                })
                .map_err(|e| e.problems.join("; "));
            Ok(())
        });
        out
    }

    #[test]
    fn broker_urls_load_from_the_environment() {
        let (a, b) = (
            "amqp://u:pw@node-a:5672/%2f",
            "amqps://v:pw@node-b.example:5671/prod?heartbeat=5",
        );
        for list in [format!("[{a}, {b}]"), format!("[\"{a}\", \"{b}\"]")] {
            assert_eq!(
                addresses(&[("LLMQ_AMQP__URLS", &list)]),
                Ok(vec![a.to_string(), b.to_string()]),
                "{list}"
            );
        }
        assert_eq!(
            addresses(&[("LLMQ_AMQP__URLS", &format!("[{a}]"))]),
            Ok(vec![a.to_string()])
        );
        assert_eq!(addresses(&[("LLMQ_AMQP__URL", a)]), Ok(vec![a.to_string()]));
        assert_eq!(
            addresses(&[]),
            Ok(vec![crate::config::DEFAULT_AMQP_URL.to_string()])
        );
    }

    #[test]
    fn broker_url_and_urls_set_together_or_an_empty_list_are_refused() {
        let both = addresses(&[
            ("LLMQ_AMQP__URL", "amqp://u:pw@a/%2f"),
            ("LLMQ_AMQP__URLS", "[amqp://u:pw@b/%2f]"),
        ]);
        let problem = both.expect_err("both set");
        assert!(
            problem.starts_with("amqp.urls (LLMQ_AMQP__URLS): amqp.url and amqp.urls are both set"),
            "{problem}"
        );
        // The one in a file and the other in the environment, too.
        let p = problems(
            Some("[amqp]\nurls = [\"amqp://u:pw@a/%2f\"]\n"),
            &[("LLMQ_AMQP__URL", "amqp://u:pw@b/%2f")],
        );
        assert!(p.len() == 1 && p[0].contains("both set"), "{p:?}");
        let empty = addresses(&[("LLMQ_AMQP__URLS", "[]")]).expect_err("empty");
        assert!(
            empty.starts_with("amqp.urls (LLMQ_AMQP__URLS): must list at least one"),
            "{empty}"
        );
    }

    #[test]
    fn secrets_given_by_reference_are_read_from_the_environment() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "c.toml",
                r#"
[upstreams.azure]
base_url = "https://res.openai.azure.com/openai/deployments/mini"
api_key = "env:AZURE_KEY"
headers = { "api-key" = "env:AZURE_HEADER", "x-plain" = "as-is" }
"#,
            )?;
            jail.set_env("AZURE_KEY", "sk-azure-from-env");
            jail.set_env("AZURE_HEADER", "header-from-env");
            jail.set_env("LLMQ_LLM__API_KEY", "env:LLM_KEY");
            jail.set_env("LLM_KEY", "sk-llm-from-env");
            let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            let azure = &c.upstreams["azure"];
            assert_eq!(azure.api_key.expose(), "sk-azure-from-env");
            assert_eq!(azure.headers["api-key"].expose(), "header-from-env");
            assert_eq!(azure.headers["x-plain"].expose(), "as-is");
            assert_eq!(c.llm.api_key.expose(), "sk-llm-from-env");
            Ok(())
        });
    }

    #[test]
    fn a_reference_to_an_unset_variable_is_a_problem_naming_both() {
        let problems = problems(
            Some("[upstreams.a]\nbase_url = \"http://a/v1\"\napi_key = \"env:NOT_SET_HERE\"\n"),
            &[("LLMQ_LLM__API_KEY", "env:")],
        );
        let all = problems.join("\n");
        assert!(
            all.contains(
                "upstreams.a.api_key (LLMQ_UPSTREAMS__A__API_KEY): refers to the environment \
                 variable NOT_SET_HERE, which is unset or empty"
            ),
            "{all}"
        );
        assert!(
            all.contains("llm.api_key (LLMQ_LLM__API_KEY): `env:` names no variable"),
            "{all}"
        );
    }

    #[test]
    fn openai_api_key_serves_openais_own_upstreams_without_a_key() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "c.toml",
                r#"
[upstreams.openai]
base_url = "https://api.openai.com/v1"

[upstreams.named]
base_url = "https://api.openai.com/v1"
api_key = "sk-its-own"

[upstreams.vllm]
base_url = "http://vllm:8000/v1"
"#,
            )?;
            jail.set_env("OPENAI_API_KEY", "sk-x");
            let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.upstreams["openai"].api_key.expose(), "sk-x");
            assert_eq!(c.upstreams["named"].api_key.expose(), "sk-its-own");
            assert_eq!(c.upstreams["vllm"].api_key.expose(), "", "not OpenAI's");
            assert_eq!(c.llm.api_key.expose(), "", "[llm] is not a deployment here");
            Ok(())
        });
    }

    #[test]
    fn api_key_falls_back_to_openai_api_key() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("OPENAI_API_KEY", "sk-x");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.llm.api_key.expose(), "sk-x");
            jail.set_env("LLMQ_LLM__API_KEY", "sk-y");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.llm.api_key.expose(), "sk-y");
            Ok(())
        });
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let p = problems(
            Some("[worker]\nprefetch = \"many\"\nconsumers = -1\nbogus = 1\n[nope]\nx = 1\n"),
            &[
                ("LLMQ_LLM__BASE_URL", "not a url"),
                ("LLMQ_RETRY__MAX_ATTEMPTS", "0"),
            ],
        );
        let all = p.join("\n");
        assert!(
            all.contains("worker.prefetch (LLMQ_WORKER__PREFETCH)"),
            "{all}"
        );
        assert!(all.contains("worker.consumers"), "{all}");
        assert!(all.contains("worker.bogus"), "{all}");
        assert!(all.contains("nope"), "{all}");
        assert!(all.contains("llm.base_url"), "{all}");
        assert!(all.contains("retry.max_attempts"), "{all}");
        assert_eq!(p.len(), 6, "{all}");
        // Unrelated LLMQ_ variables are not keys; typos in a section are.
        assert!(problems(None, &[("LLMQ_HOME", "/x")]).is_empty());
        let p = problems(None, &[("LLMQ_WORKER__PREFECH", "1")]);
        assert!(p.len() == 1 && p[0].starts_with("worker.prefech"), "{p:?}");
        // A bad key does not hide a bad value next to it.
        let p = problems(
            Some("[worker]\nmax_inflight = 0\nconsumers = \"four\"\n"),
            &[],
        )
        .join("\n");
        assert!(
            p.contains("worker.max_inflight") && p.contains("worker.consumers"),
            "{p}"
        );
    }

    #[test]
    fn range_rules() {
        let cases = [
            ("LLMQ_WORKER__CONSUMERS", "0", "worker.consumers"),
            ("LLMQ_WORKER__MAX_INFLIGHT", "0", "worker.max_inflight"),
            ("LLMQ_WORKER__MIN_INFLIGHT", "300", "worker.min_inflight"),
            ("LLMQ_BATCH__MAX_ITEMS", "0", "batch.max_items"),
            ("LLMQ_LIMITS__REDIS_URL", "http://x", "limits.redis_url"),
            ("LLMQ_LLM__TIMEOUT_SECS", "0", "llm.timeout_secs"),
            ("LLMQ_AMQP__URL", "http://x", "amqp.url"),
            ("LLMQ_LLM__MODEL", "", "llm.model"),
            (
                "LLMQ_TOPOLOGY__PROCESSING_QUEUE",
                "amq.x",
                "topology.processing_queue",
            ),
            (
                "LLMQ_TOPOLOGY__EMBEDDINGS_KEY",
                "process",
                "topology.embeddings_key",
            ),
            ("LLMQ_LOG__FORMAT", "xml", "log.format"),
            ("LLMQ_LOG__LEVEL", "[[[", "log.level"),
            ("LLMQ_WORKER__MAX_BODY_BYTES", "1", "worker.max_body_bytes"),
        ];
        for (var, value, key) in cases {
            let p = problems(None, &[(var, value)]);
            assert!(
                p.len() == 1 && p[0].starts_with(key),
                "{var}={value}: {p:?}"
            );
        }
    }

    /// Loads `./config.toml` = `file` with `vars` set; the loaded `topology.keep_results`, or
    /// the problems.
    fn keep_results(file: Option<&str>, vars: &[(&str, &str)]) -> Result<KeepResults, String> {
        let mut out = Err(String::new());
        Jail::expect_with(|jail| {
            jail.clear_env();
            if let Some(text) = file {
                jail.create_file("config.toml", text)?;
            }
            for (k, v) in vars {
                jail.set_env(k, v);
            }
            out = Config::load(None)
                .map(|c| c.topology.keep_results)
                .map_err(|e| e.problems.join("; "));
            Ok(())
        });
        out
    }

    #[test]
    fn keep_results_reads_its_names_and_the_booleans_of_earlier_versions() {
        use KeepResults::*;
        assert_eq!(keep_results(None, &[]), Ok(WithoutReplyTo), "the default");
        let file = |v: &str| format!("[topology]\nkeep_results = {v}\n");
        for (value, expected) in [
            ("\"always\"", Always),
            ("\"without_reply_to\"", WithoutReplyTo),
            ("\"never\"", Never),
            ("true", Always),
            ("false", Never),
        ] {
            assert_eq!(
                keep_results(Some(&file(value)), &[]),
                Ok(expected),
                "{value}"
            );
        }
        let var = "LLMQ_TOPOLOGY__KEEP_RESULTS";
        for (value, expected) in [
            ("always", Always),
            ("without_reply_to", WithoutReplyTo),
            ("never", Never),
            ("true", Always),
            ("false", Never),
            ("\"never\"", Never),
        ] {
            assert_eq!(keep_results(None, &[(var, value)]), Ok(expected), "{value}");
        }
        // The environment wins over the file, whichever form each uses.
        assert_eq!(
            keep_results(Some(&file("true")), &[(var, "without_reply_to")]),
            Ok(WithoutReplyTo)
        );
    }

    #[test]
    fn keep_results_names_its_key_and_values_when_wrong() {
        let expected = "topology.keep_results (LLMQ_TOPOLOGY__KEEP_RESULTS): invalid value \
                        string \"sometimes\", expected \"always\", \"without_reply_to\" or \
                        \"never\" (true and false, from earlier versions, are always and never)";
        let from_file = problems(Some("[topology]\nkeep_results = \"sometimes\"\n"), &[]);
        assert_eq!(from_file, vec![expected.to_string()]);
        let from_env = problems(None, &[("LLMQ_TOPOLOGY__KEEP_RESULTS", "sometimes")]);
        assert_eq!(from_env, vec![expected.to_string()]);
        let number = problems(Some("[topology]\nkeep_results = 1\n"), &[]).join("; ");
        assert!(
            number.starts_with("topology.keep_results (LLMQ_TOPOLOGY__KEEP_RESULTS): invalid type")
                && number.contains("\"without_reply_to\""),
            "{number}"
        );
    }

    #[test]
    fn queue_type_is_classic_unless_set_in_the_file_or_the_environment() {
        let load = |file: Option<&str>, vars: &[(&str, &str)]| {
            let mut out = Err(String::new());
            Jail::expect_with(|jail| {
                jail.clear_env();
                if let Some(text) = file {
                    jail.create_file("config.toml", text)?;
                }
                for (k, v) in vars {
                    jail.set_env(k, v);
                }
                out = Config::load(None)
                    .map(|c| c.topology.queue_type)
                    .map_err(|e| e.problems.join("; "));
                Ok(())
            });
            out
        };
        let var = "LLMQ_TOPOLOGY__QUEUE_TYPE";
        assert_eq!(load(None, &[]), Ok(QueueType::Classic), "the default");
        let file = "[topology]\nqueue_type = \"quorum\"\n";
        assert_eq!(load(Some(file), &[]), Ok(QueueType::Quorum));
        assert_eq!(load(None, &[(var, "quorum")]), Ok(QueueType::Quorum));
        assert_eq!(
            load(Some(file), &[(var, "classic")]),
            Ok(QueueType::Classic),
            "the environment wins"
        );
        let wrong = load(None, &[(var, "stream")]).unwrap_err();
        assert!(
            wrong.starts_with("topology.queue_type (LLMQ_TOPOLOGY__QUEUE_TYPE)")
                && wrong.contains("classic")
                && wrong.contains("quorum"),
            "{wrong}"
        );
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let e = Config::load(Some(Path::new("/nonexistent/llmq.toml"))).expect_err("missing");
        assert!(e.problems[0].contains("not found"), "{e}");
    }

    #[test]
    fn secrets_never_print() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("LLMQ_AMQP__URL", "amqp://user:canary-pw@host:5672/%2f");
            jail.set_env("LLMQ_LLM__API_KEY", "sk-canary");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            let printed = format!("{c:?} {} {}", c.amqp.addresses()[0], c.llm.api_key);
            assert!(!printed.contains("canary"), "{printed}");
            assert!(
                printed.contains("amqp://user:***@host:5672/%2f"),
                "{printed}"
            );
            Ok(())
        });
        for (var, value) in [
            ("LLMQ_AMQP__URL", "amqp://u:canary-pw@[bad/"),
            ("LLMQ_AMQP__URL", "amqp:u:canary-pw@host"),
            ("LLMQ_AMQP__URLS", "[amqp://u:canary-pw@[bad/]"),
            ("LLMQ_AMQP__URLS", "amqp://u:canary-pw@host"),
            ("LLMQ_AMQP__URLS", "[[\"canary\"]]"),
            ("LLMQ_LLM__API_KEY", "12345canary"),
            ("LLMQ_LLM__API_KEY", "[\"canary\"]"),
        ] {
            let bad = problems(None, &[(var, value)]).join(" ");
            assert!(
                !bad.is_empty() || var.contains("API_KEY"),
                "{var}={value} accepted"
            );
            assert!(!bad.contains("canary"), "{bad}");
        }
        let bad = problems(Some("[llm]\napi_key = sk-canary-unquoted\n"), &[]).join(" ");
        assert!(bad.contains("line 2"), "{bad}");
        assert!(!bad.contains("canary"), "{bad}");
        assert_eq!(redact_url("amqp:u:canary@h"), "amqp://***");
    }
}
