//! The parameters a request sends to the API: its `params`, and the fields of OpenAI's own
//! chat and embeddings bodies given at the top level, as a body posted to
//! `/v1/chat/completions` has them. A top-level field that is not llmq's is taken exactly
//! as if it were in `params`, and held to the same allowlist; none is dropped in silence.
//!
//! The top-level fields llmq reads itself are those of the request's raw form in
//! [`super::request`]; everything else at the top level comes here.

use serde_json::{Map, Value};

use super::rules::Rules;

/// The one value of `stream_options` a request may give: what llmq asks for itself when it
/// streams. Any other is refused, since llmq sets the field.
fn stream_options_accepted(value: &Value) -> bool {
    match value.as_object() {
        Some(options) => options
            .iter()
            .all(|(k, v)| k == "include_usage" && v == &Value::Bool(true)),
        None => false,
    }
}

/// The parameters of a request: `params` with the top-level `max_tokens` and `temperature`
/// (typed, and the temperature checked for its range) and every other top-level field that
/// is not llmq's (`rest`) merged in by [`merge`].
pub fn gather(
    params: Option<Map<String, Value>>,
    max_tokens: Option<u32>,
    temperature: Option<f64>,
    rest: Map<String, Value>,
    rules: &Rules,
) -> Result<Map<String, Value>, String> {
    if let Some(t) = temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(format!("field `temperature`: {t} is outside 0..=2"));
    }
    let typed = [
        max_tokens.map(|m| ("max_tokens".to_string(), Value::from(m))),
        temperature.map(|t| ("temperature".to_string(), Value::from(t))),
    ];
    merge(params, typed.into_iter().flatten().chain(rest), rules)
}

/// `params` with the top-level fields `top` merged in.
///
/// A field given at both levels with the same value is sent once; with different values it
/// is refused as ambiguous. A top-level field off the allowlist is refused by name. (Every
/// parameter, wherever it came from, is then held to [`Rules::check_param`]: reserved
/// names, the allowlist, the caps.)
fn merge(
    params: Option<Map<String, Value>>,
    top: impl IntoIterator<Item = (String, Value)>,
    rules: &Rules,
) -> Result<Map<String, Value>, String> {
    let mut params = params.unwrap_or_default();
    for (key, value) in top {
        if key == "stream_options" {
            if stream_options_accepted(&value) {
                continue;
            }
            return Err(format!(
                "field `stream_options`: set by llmq ({{\"include_usage\": true}} when \
                 `\"stream\": true`); no other value is accepted, got {value}"
            ));
        }
        if !rules.allowed_params.contains(&key) {
            return Err(format!(
                "field `{key}`: not a field of llmq's requests, nor a parameter in \
                 llm.allowed_params or llm.extra_allowed_params"
            ));
        }
        match params.get(&key) {
            Some(inner) if inner != &value => {
                return Err(format!(
                    "field `{key}`: given at the top level and in `params` with different \
                     values ({value} and {inner}); give it once"
                ));
            }
            Some(_) => {}
            None => {
                params.insert(key, value);
            }
        }
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn top(fields: Value) -> Vec<(String, Value)> {
        match fields {
            Value::Object(map) => map.into_iter().collect(),
            _ => Vec::new(),
        }
    }

    fn params(fields: Value) -> Option<Map<String, Value>> {
        fields.as_object().cloned()
    }

    #[test]
    fn top_level_fields_join_params() {
        let rules = Rules::default();
        let got = merge(
            params(json!({"top_p": 0.9})),
            top(json!({"seed": 7, "stop": ["\n"]})),
            &rules,
        )
        .expect("allowed");
        assert_eq!(
            Value::Object(got),
            json!({"top_p": 0.9, "seed": 7, "stop": ["\n"]})
        );
    }

    #[test]
    fn the_same_field_twice_is_one_if_equal_and_refused_if_not() {
        let rules = Rules::default();
        let got = merge(params(json!({"seed": 7})), top(json!({"seed": 7})), &rules)
            .expect("the same value");
        assert_eq!(Value::Object(got), json!({"seed": 7}));
        assert_eq!(
            merge(params(json!({"seed": 7})), top(json!({"seed": 8})), &rules),
            Err(
                "field `seed`: given at the top level and in `params` with different values \
                 (8 and 7); give it once"
                    .into()
            )
        );
    }

    #[test]
    fn a_top_level_field_off_the_allowlist_is_refused_by_name() {
        let rules = Rules::default();
        for field in ["store", "service_tier", "colour"] {
            let e = merge(None, top(json!({ field: true })), &rules).expect_err("refused");
            assert!(
                e.starts_with(&format!("field `{field}`: not a field")),
                "{e}"
            );
        }
        let mut rules = Rules::default();
        rules.allowed_params.insert("store".into());
        assert!(merge(None, top(json!({"store": true})), &rules).is_ok());
    }

    #[test]
    fn stream_options_may_only_ask_for_what_llmq_sends() {
        let rules = Rules::default();
        for accepted in [json!({"include_usage": true}), json!({})] {
            let got = merge(None, top(json!({ "stream_options": accepted })), &rules);
            assert_eq!(got, Ok(Map::new()), "llmq sets it itself");
        }
        for refused in [
            json!({"include_usage": false}),
            json!({"x": 1}),
            json!(true),
        ] {
            let e = merge(None, top(json!({ "stream_options": refused })), &rules)
                .expect_err("refused");
            assert!(e.starts_with("field `stream_options`"), "{e}");
        }
    }
}
