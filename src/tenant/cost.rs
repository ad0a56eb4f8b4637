//! What an answer cost: its usage priced by `[prices."<model>"]` (USD per million tokens,
//! `[prices.default]` for a model without a row of its own), in whole micro-dollars; and
//! what a call may cost at most, which a tenant's budget reserves before it is made.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::{
    config::{PriceConfig, Usd},
    contract::Usage,
};

/// The `[prices]` row of every model that has none of its own.
pub const DEFAULT_PRICE: &str = "default";

/// The price list, by routing model name.
#[derive(Debug, Clone, Default)]
pub struct Prices(BTreeMap<String, PriceConfig>);

impl Prices {
    /// `[prices]`.
    pub fn new(prices: &BTreeMap<String, PriceConfig>) -> Self {
        Self(prices.clone())
    }

    /// The price of `model`: its own row, else `[prices.default]`.
    pub fn of(&self, model: &str) -> Option<&PriceConfig> {
        self.0.get(model).or_else(|| self.0.get(DEFAULT_PRICE))
    }

    /// The most a call on `model` may cost: `input` prompt tokens at the input price and
    /// `output` completion tokens at the output price, rounded up to the micro-dollar;
    /// `None` when `model` has no price.
    pub fn at_most(&self, model: &str, input: u64, output: u64) -> Option<Usd> {
        let price = self.of(model)?;
        let scaled = u128::from(input) * u128::from(price.input_per_mtok.0)
            + u128::from(output) * u128::from(price.output_per_mtok.0);
        Some(Usd(
            u64::try_from(scaled.div_ceil(1_000_000)).unwrap_or(u64::MAX)
        ))
    }

    /// The cost of `usage` on `model` (the routing name that answered), when a price is
    /// known for it and the usage has counts: prompt tokens at the input price (cached ones
    /// at `cached_input_per_mtok` when it is set) plus completion tokens at the output
    /// price, divided by a million, rounded to the nearest micro-dollar.
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<Usd> {
        let price = self.of(model)?;
        if usage.prompt_tokens.is_none() && usage.completion_tokens.is_none() {
            return None;
        }
        let prompt = u128::from(usage.prompt_tokens.unwrap_or(0));
        let completion = u128::from(usage.completion_tokens.unwrap_or(0));
        let cached = usage
            .other
            .get("prompt_tokens_details")
            .and_then(|d| d.get("cached_tokens"))
            .and_then(Value::as_u64)
            .map_or(0, u128::from)
            .min(prompt);
        let cached_price = price.cached_input_per_mtok.unwrap_or(price.input_per_mtok);
        // Prices are micro-dollars per million tokens: tokens times price is in
        // micro-dollars times a million.
        let scaled = (prompt - cached) * u128::from(price.input_per_mtok.0)
            + cached * u128::from(cached_price.0)
            + completion * u128::from(price.output_per_mtok.0);
        let micros = (scaled + 500_000) / 1_000_000;
        Some(Usd(u64::try_from(micros).unwrap_or(u64::MAX)))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn usage(v: Value) -> Usage {
        serde_json::from_value(v).expect("usage")
    }

    #[test]
    fn prompt_cached_and_completion_tokens_at_their_prices() {
        let prices = Prices::new(&BTreeMap::from([(
            "gpt-4o-mini".to_string(),
            PriceConfig {
                input_per_mtok: Usd(150_000),
                output_per_mtok: Usd(600_000),
                cached_input_per_mtok: Some(Usd(75_000)),
                max_output_tokens: None,
            },
        )]));
        // 1000 x 0.15 + 500 x 0.60 = 450 micro-dollars.
        let plain = usage(json!({"prompt_tokens": 1000, "completion_tokens": 500}));
        assert_eq!(prices.cost("gpt-4o-mini", &plain), Some(Usd(450)));
        // 600 x 0.15 + 400 x 0.075 + 500 x 0.60 = 90 + 30 + 300.
        let cached = usage(
            json!({"prompt_tokens": 1000, "completion_tokens": 500, "prompt_tokens_details": {"cached_tokens": 400}}),
        );
        assert_eq!(prices.cost("gpt-4o-mini", &cached), Some(Usd(420)));
        // 3 x 0.15 + 1 x 0.60 = 1.05: rounded to 1.
        let tiny = usage(json!({"prompt_tokens": 3, "completion_tokens": 1}));
        assert_eq!(prices.cost("gpt-4o-mini", &tiny), Some(Usd(1)));
        assert_eq!(prices.cost("unpriced", &plain), None);
        // The most: 1000 x 0.15 + 500 x 0.60, rounded up.
        assert_eq!(prices.at_most("gpt-4o-mini", 1000, 500), Some(Usd(450)));
        assert_eq!(prices.at_most("gpt-4o-mini", 3, 1), Some(Usd(2)));
        assert_eq!(prices.at_most("unpriced", 1, 1), None);
        assert_eq!(prices.cost("gpt-4o-mini", &Usage::default()), None);
    }
}

#[cfg(test)]
mod default_tests {
    use super::*;

    #[test]
    fn a_model_without_a_row_takes_the_default_row() {
        let row = |input, output| PriceConfig {
            input_per_mtok: Usd(input),
            output_per_mtok: Usd(output),
            ..Default::default()
        };
        let only = Prices::new(&BTreeMap::from([("a".to_string(), row(1_000_000, 0))]));
        assert_eq!(only.at_most("b", 10, 10), None);
        let with_default = Prices::new(&BTreeMap::from([
            ("a".to_string(), row(1_000_000, 0)),
            (DEFAULT_PRICE.to_string(), row(0, 2_000_000)),
        ]));
        assert_eq!(with_default.at_most("a", 10, 10), Some(Usd(10)));
        assert_eq!(with_default.at_most("b", 10, 10), Some(Usd(20)));
    }
}
