//! Tenants: who a request belongs to (`[tenancy]`), what each may use (`[tenants.<name>]`,
//! with `[tenants.default]` for every tenant without a section of its own) and what a
//! model costs (`[prices."<model>"]`).
//!
//! Money is counted in whole micro-dollars ([`Usd`]), so budget arithmetic is exact.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The section of the tenant without one of its own, and the defaults of every other.
pub const DEFAULT_TENANT: &str = "default";
/// The metric label of every tenant not named in the configuration.
pub const OTHER_TENANTS: &str = "other";

/// Who a request belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenancyConfig {
    /// Empty: the tenant is the request's AMQP `user_id`, which the broker checks. Set
    /// (e.g. `x-tenant`): this header names it instead, for scoping too. Only for a
    /// trusted gateway that publishes on behalf of tenants and sets the header itself:
    /// anyone else could name any tenant.
    pub header: String,
    /// Most tenants one replica keeps state for (counters, limits, its fair-share
    /// bookkeeping); a header can name any number.
    pub max_tenants: u64,
    /// Refuse a request without an identity (no `user_id`; in header mode, no `header`) as
    /// `invalid_request`, rather than serve it as `anonymous`, outside every tenant's
    /// limits and budget. `auto` (the default): on when any `[tenants.<name>]` section is
    /// configured (budgets live there), off otherwise; see
    /// [`super::Config::requires_user_id`].
    pub require_user_id: Switch,
}

/// A switch whose default follows the rest of the configuration: `"auto"`, or `true` /
/// `false`, which always win. (An `Option<bool>` would do, but TOML has no `None`: the
/// configuration handed to a child process must name every key.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Switch {
    /// Decided by the rest of the configuration.
    #[default]
    Auto,
    /// `true`.
    On,
    /// `false`.
    Off,
}

impl Switch {
    /// On or off: as set, else `auto`.
    pub fn or(self, auto: bool) -> bool {
        match self {
            Switch::Auto => auto,
            Switch::On => true,
            Switch::Off => false,
        }
    }
}

impl Serialize for Switch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Switch::Auto => s.serialize_str("auto"),
            Switch::On => s.serialize_bool(true),
            Switch::Off => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for Switch {
    /// `true`, `false` (a boolean, or its text from an environment variable) or `"auto"`.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            Bool(bool),
            Text(String),
        }
        match Given::deserialize(d)? {
            Given::Bool(true) => Ok(Switch::On),
            Given::Bool(false) => Ok(Switch::Off),
            Given::Text(text) => match text.as_str() {
                "auto" => Ok(Switch::Auto),
                "true" => Ok(Switch::On),
                "false" => Ok(Switch::Off),
                other => Err(serde::de::Error::custom(format!(
                    "{other:?} is not true, false or \"auto\""
                ))),
            },
        }
    }
}

impl Default for TenancyConfig {
    fn default() -> Self {
        Self {
            header: String::new(),
            max_tenants: 10_000,
            require_user_id: Switch::Auto,
        }
    }
}

/// A `[tenants.<name>]` section: each key left out is `[tenants.default]`'s.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantConfig {
    /// Share of the fleet under contention (1 when no section sets it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Calls of its own at once; 0 = no cap of its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_inflight: Option<u64>,
    /// Requests per minute; 0 = no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_minute: Option<u64>,
    /// Tokens per minute (estimated, corrected by usage); 0 = no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens_per_minute: Option<u64>,
    /// Spend per UTC day; 0 = no budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_usd_per_day: Option<Usd>,
    /// Spend per UTC month; 0 = no budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_usd_per_month: Option<Usd>,
}

/// What one tenant may use, its section over `[tenants.default]` over the built-in
/// defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantLimits {
    /// Share under contention, at least 1.
    pub weight: u32,
    /// 0 = no cap of its own.
    pub max_inflight: u64,
    /// 0 = no limit.
    pub max_requests_per_minute: u64,
    /// 0 = no limit.
    pub max_tokens_per_minute: u64,
    /// Zero = no budget.
    pub max_usd_per_day: Usd,
    /// Zero = no budget.
    pub max_usd_per_month: Usd,
}

impl TenantConfig {
    /// These settings over `base`'s.
    fn over(&self, base: &TenantLimits) -> TenantLimits {
        TenantLimits {
            weight: self.weight.unwrap_or(base.weight),
            max_inflight: self.max_inflight.unwrap_or(base.max_inflight),
            max_requests_per_minute: self
                .max_requests_per_minute
                .unwrap_or(base.max_requests_per_minute),
            max_tokens_per_minute: self
                .max_tokens_per_minute
                .unwrap_or(base.max_tokens_per_minute),
            max_usd_per_day: self.max_usd_per_day.unwrap_or(base.max_usd_per_day),
            max_usd_per_month: self.max_usd_per_month.unwrap_or(base.max_usd_per_month),
        }
    }
}

impl Default for TenantLimits {
    /// No section at all: weight 1, no caps, no budgets.
    fn default() -> Self {
        Self {
            weight: 1,
            max_inflight: 0,
            max_requests_per_minute: 0,
            max_tokens_per_minute: 0,
            max_usd_per_day: Usd::ZERO,
            max_usd_per_month: Usd::ZERO,
        }
    }
}

/// Every tenant's limits, resolved once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenants {
    default: TenantLimits,
    named: BTreeMap<String, TenantLimits>,
}

impl Tenants {
    /// Resolves `[tenants]`: each section over `[tenants.default]`.
    pub fn new(sections: &BTreeMap<String, TenantConfig>) -> Self {
        let default = sections
            .get(DEFAULT_TENANT)
            .map(|d| d.over(&TenantLimits::default()))
            .unwrap_or_default();
        let named = sections
            .iter()
            .filter(|(name, _)| name.as_str() != DEFAULT_TENANT)
            .map(|(name, section)| (name.clone(), section.over(&default)))
            .collect();
        Self { default, named }
    }

    /// What `tenant` may use.
    pub fn limits(&self, tenant: &str) -> &TenantLimits {
        self.named.get(tenant).unwrap_or(&self.default)
    }

    /// `tenant` as a metric label: its name when it has a section, else
    /// [`OTHER_TENANTS`], so that labels stay few whoever sends.
    pub fn label<'a>(&'a self, tenant: &str) -> &'a str {
        match self.named.get_key_value(tenant) {
            Some((name, _)) => name,
            None => OTHER_TENANTS,
        }
    }

    /// The tenants with a section of their own.
    pub fn named(&self) -> impl Iterator<Item = &str> {
        self.named.keys().map(String::as_str)
    }
}

/// A `[prices."<model>"]` section: USD per million tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PriceConfig {
    /// Prompt tokens.
    pub input_per_mtok: Usd,
    /// Completion tokens.
    pub output_per_mtok: Usd,
    /// Cached prompt tokens (`usage.prompt_tokens_details.cached_tokens`); unset: the
    /// input price.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_input_per_mtok: Option<Usd>,
    /// The most completion tokens the model generates for one choice: the bound sent with
    /// a request of a tenant under a budget that sets none, and the most ever sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
}

/// An amount of US dollars, held in whole micro-dollars: written in the configuration as a
/// number of dollars (`50`, `0.15`), at most six decimals kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Usd(pub u64);

impl Usd {
    /// No money: no budget, or a free model.
    pub const ZERO: Usd = Usd(0);

    /// From dollars, rounded to the micro-dollar; `None` for a negative, non-finite or
    /// absurd amount (over a trillion).
    pub fn from_dollars(dollars: f64) -> Option<Self> {
        (dollars.is_finite() && (0.0..=1e12).contains(&dollars))
            .then(|| Usd((dollars * 1e6).round() as u64))
    }

    /// In dollars, for results and reports.
    pub fn dollars(self) -> f64 {
        self.0 as f64 / 1e6
    }

    /// Whether it is zero (no budget).
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${}.{:06}", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

impl Serialize for Usd {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.dollars())
    }
}

impl<'de> Deserialize<'de> for Usd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Number {
            Int(u64),
            Float(f64),
        }
        let dollars = match Number::deserialize(d)? {
            Number::Int(n) => n as f64,
            Number::Float(x) => x,
        };
        Usd::from_dollars(dollars).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{dollars} is not an amount of dollars (0 up to 1e12)"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_section_inherits_what_it_leaves_unset_from_default() {
        let sections: BTreeMap<String, TenantConfig> = toml::from_str(
            r#"
            [default]
            max_inflight = 10
            max_usd_per_day = 5
            [alice]
            weight = 3
            max_usd_per_day = 50
            [bob]
            max_inflight = 0
            "#,
        )
        .expect("parses");
        let tenants = Tenants::new(&sections);
        let alice = tenants.limits("alice");
        assert_eq!(
            (alice.weight, alice.max_inflight, alice.max_usd_per_day),
            (3, 10, Usd(50_000_000))
        );
        let bob = tenants.limits("bob");
        assert_eq!(
            (bob.weight, bob.max_inflight, bob.max_usd_per_day),
            (1, 0, Usd(5_000_000))
        );
        assert_eq!(tenants.limits("carol"), &tenants.default);
        assert_eq!(tenants.label("alice"), "alice");
        assert_eq!(tenants.label("carol"), OTHER_TENANTS);
        assert_eq!(tenants.label("default"), OTHER_TENANTS);
    }

    #[test]
    fn a_switch_is_true_false_or_auto() {
        #[derive(Deserialize, Serialize)]
        struct One {
            s: Switch,
        }
        for (text, switch) in [
            ("s = true", Switch::On),
            ("s = false", Switch::Off),
            ("s = \"auto\"", Switch::Auto),
        ] {
            let one: One = toml::from_str(text).expect("parses");
            assert_eq!(one.s, switch);
            assert_eq!(toml::to_string(&one).expect("serializes").trim(), text);
        }
        assert!(toml::from_str::<One>("s = \"sometimes\"").is_err());
        assert!(Switch::Auto.or(true) && !Switch::Auto.or(false));
        assert!(Switch::On.or(false) && !Switch::Off.or(true));
    }

    #[test]
    fn dollars_are_whole_micro_dollars() {
        assert_eq!(Usd::from_dollars(0.15), Some(Usd(150_000)));
        assert_eq!(Usd::from_dollars(0.0000004), Some(Usd(0)));
        assert_eq!(Usd::from_dollars(-1.0), None);
        assert_eq!(Usd::from_dollars(f64::NAN), None);
        let price: PriceConfig =
            toml::from_str("input_per_mtok = 0.15\noutput_per_mtok = 1").expect("parses");
        assert_eq!(price.input_per_mtok, Usd(150_000));
        assert_eq!(price.output_per_mtok, Usd(1_000_000));
        assert!(toml::from_str::<PriceConfig>("input_per_mtok = -2").is_err());
        assert_eq!(Usd(1_500_001).to_string(), "$1.500001");
    }
}
