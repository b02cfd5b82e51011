//! Exposure: what the uncertainty of provisional allocations means in money.
//!
//! Each provisional allocation of this node is a duplicate with probability
//! 1 − confidence, so the expected number of duplicates among them is the sum
//! of that, and the value at risk is the sum of (1 − confidence) × amount,
//! per currency. The payload itself never leaves the node and is not kept;
//! its amount and currency are read at allocation (at configurable JSON
//! pointers, default `/amount` and `/currency`) and kept beside the
//! allocation only while it is provisional. A payload without them never
//! fails an allocation: it counts under `unknown`. Everything here is pure.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Distinct currencies a node names; more are counted under [`OTHER`], so a
/// client sending made-up currencies cannot grow memory or metric labels.
pub const MAX_CURRENCIES: usize = 64;
/// Currency of an amount whose payload names no usable currency.
pub const UNKNOWN: &str = "unknown";
/// Currency of an amount past the first [`MAX_CURRENCIES`] currencies.
pub const OTHER: &str = "other";
/// Longest currency code taken as such.
const MAX_CURRENCY_LEN: usize = 16;
/// Largest amount taken as one: 10^15 (beyond any payment, even in the
/// minor units of a currency with many of them). A larger number, which
/// one request could send, would swamp or overflow the sums of every
/// other allocation of its currency; it counts as an allocation whose
/// amount is unknown.
pub const MAX_AMOUNT: f64 = 1e15;

/// Why a JSON pointer setting was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{0}' is not a JSON pointer: it must be empty or start with '/' (RFC 6901)")]
pub struct PointerError(pub String);

/// Index of a currency name in a [`Pricing`]'s table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CurrencyId(u16);

const UNKNOWN_ID: CurrencyId = CurrencyId(0);
const OTHER_ID: CurrencyId = CurrencyId(1);

/// An allocation's amount and currency, as read from its payload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    /// The amount in the payload's own units (its absolute value: a
    /// duplicated refund moves money too); `None` when the payload has no
    /// numeric amount.
    pub amount: Option<f64>,
    /// The currency.
    pub currency: CurrencyId,
}

impl Price {
    /// No amount and no currency: what an allocation made before a restart
    /// has (the payload is not kept).
    pub const UNKNOWN: Price = Price {
        amount: None,
        currency: UNKNOWN_ID,
    };
}

/// Reads prices from payloads and names currencies.
pub struct Pricing {
    amount_pointer: String,
    currency_pointer: String,
    currencies: Mutex<Vec<Arc<str>>>,
}

impl Pricing {
    /// Reads the amount and the currency at these JSON pointers (RFC 6901).
    pub fn new(amount_pointer: &str, currency_pointer: &str) -> Result<Self, PointerError> {
        for pointer in [amount_pointer, currency_pointer] {
            if !(pointer.is_empty() || pointer.starts_with('/')) {
                return Err(PointerError(pointer.to_owned()));
            }
        }
        Ok(Self {
            amount_pointer: amount_pointer.to_owned(),
            currency_pointer: currency_pointer.to_owned(),
            currencies: Mutex::new(vec![UNKNOWN.into(), OTHER.into()]),
        })
    }

    /// The price of `payload`; never fails (see [`Price`]).
    pub fn price(&self, payload: &Value) -> Price {
        let amount = payload
            .pointer(&self.amount_pointer)
            .and_then(Value::as_f64)
            .map(f64::abs)
            .filter(|a| *a <= MAX_AMOUNT);
        let currency = payload
            .pointer(&self.currency_pointer)
            .and_then(Value::as_str)
            .filter(|c| {
                (1..=MAX_CURRENCY_LEN).contains(&c.len())
                    && c.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            })
            .map_or(UNKNOWN_ID, |c| self.intern(c));
        Price { amount, currency }
    }

    fn intern(&self, name: &str) -> CurrencyId {
        let mut names = self.currencies.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = names.iter().position(|n| **n == *name) {
            return CurrencyId(at as u16);
        }
        if names.len() >= MAX_CURRENCIES + 2 {
            return OTHER_ID;
        }
        names.push(name.into());
        CurrencyId((names.len() - 1) as u16)
    }

    /// The name of a currency.
    pub fn name(&self, id: CurrencyId) -> Arc<str> {
        let names = self.currencies.lock().unwrap_or_else(|p| p.into_inner());
        names
            .get(usize::from(id.0))
            .cloned()
            .unwrap_or_else(|| UNKNOWN.into())
    }

    /// The exposure that `sums` add up to, with currencies named.
    pub fn report(&self, sums: &ExposureSums) -> Exposure {
        let mut value_at_risk = BTreeMap::new();
        for (i, value) in sums.value.iter().enumerate() {
            if sums.priced[i] > 0 {
                let name = self.name(CurrencyId(i as u16));
                *value_at_risk.entry(name.to_string()).or_insert(0.0) += value.max(0.0);
            }
        }
        if sums.unpriced > 0 {
            value_at_risk.entry(UNKNOWN.to_owned()).or_insert(0.0);
        }
        Exposure {
            expected_duplicates: sums.expected.max(0.0),
            value_at_risk,
            unpriced_expected_duplicates: sums.unpriced_expected.max(0.0),
            provisional: sums.open,
        }
    }
}

/// Running sums over this node's provisional allocations: added when an
/// allocation is made, taken away when it settles, conflicts or expires.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExposureSums {
    /// Σ (1 − confidence).
    expected: f64,
    /// Σ (1 − confidence) over allocations without an amount.
    unpriced_expected: f64,
    /// Σ (1 − confidence) × amount, by currency id.
    value: Vec<f64>,
    /// Provisional allocations with an amount, by currency id.
    priced: Vec<u64>,
    /// Provisional allocations without an amount.
    unpriced: u64,
    /// Provisional allocations counted.
    open: u64,
}

impl ExposureSums {
    /// Counts a new provisional allocation.
    pub fn add(&mut self, confidence: f64, price: Price) {
        self.change(confidence, price, 1.0);
    }

    /// Takes a provisional allocation out again (settled, conflicted or expired).
    pub fn remove(&mut self, confidence: f64, price: Price) {
        self.change(confidence, price, -1.0);
    }

    fn change(&mut self, confidence: f64, price: Price, sign: f64) {
        let risk = if confidence.is_finite() {
            (1.0 - confidence).clamp(0.0, 1.0)
        } else {
            1.0
        };
        let count = |n: &mut u64| {
            *n = if sign > 0.0 {
                n.saturating_add(1)
            } else {
                n.saturating_sub(1)
            }
        };
        count(&mut self.open);
        self.expected += sign * risk;
        match price.amount {
            Some(amount) => {
                let at = usize::from(price.currency.0);
                if self.value.len() <= at {
                    self.value.resize(at + 1, 0.0);
                    self.priced.resize(at + 1, 0);
                }
                self.value[at] += sign * risk * amount;
                count(&mut self.priced[at]);
            }
            None => {
                self.unpriced_expected += sign * risk;
                count(&mut self.unpriced);
            }
        }
        // Sums of many small additions and removals drift; a set that is
        // empty again is exactly zero.
        if self.open == 0 {
            *self = Self::default();
        }
    }

    /// Adds another set of sums (e.g. another shard's) to these.
    pub fn merge(&mut self, other: &ExposureSums) {
        self.expected += other.expected;
        self.unpriced_expected += other.unpriced_expected;
        self.unpriced += other.unpriced;
        self.open += other.open;
        if self.value.len() < other.value.len() {
            self.value.resize(other.value.len(), 0.0);
            self.priced.resize(other.value.len(), 0);
        }
        for (i, v) in other.value.iter().enumerate() {
            self.value[i] += v;
            self.priced[i] += other.priced[i];
        }
    }
}

/// `exposure` in `GET /v1/health`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Exposure {
    /// Expected duplicates among this node's provisional allocations.
    pub expected_duplicates: f64,
    /// Σ (1 − confidence) × amount per currency; `unknown` collects amounts
    /// without a usable currency (and is listed, possibly at 0, when some
    /// provisional allocation has no amount at all).
    pub value_at_risk: BTreeMap<String, f64>,
    /// The part of `expected_duplicates` whose payloads carry no amount.
    pub unpriced_expected_duplicates: f64,
    /// This node's provisional allocations counted.
    pub provisional: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pricing() -> Pricing {
        Pricing::new("/amount", "/currency").unwrap()
    }

    #[test]
    fn prices_are_read_at_the_pointers() {
        let p = pricing();
        let eur = p.price(&json!({"amount": 12.5, "currency": "EUR"}));
        assert_eq!(eur.amount, Some(12.5));
        assert_eq!(&*p.name(eur.currency), "EUR");
        assert_eq!(
            p.price(&json!({"amount": -3, "currency": "EUR"})).amount,
            Some(3.0)
        );
        let nested = Pricing::new("/money/value", "/money/ccy").unwrap();
        let usd = nested.price(&json!({"money": {"value": 7, "ccy": "USD"}}));
        assert_eq!(
            (usd.amount, &*nested.name(usd.currency)),
            (Some(7.0), "USD")
        );
    }

    #[test]
    fn unusable_prices_count_under_unknown() {
        let p = pricing();
        for payload in [
            json!({}),
            json!({"amount": "12", "currency": "EUR"}),
            json!({"amount": 5, "currency": 978}),
            json!({"amount": 5, "currency": "not a currency"}),
            json!({"amount": 5, "currency": ""}),
            json!({"amount": 1e308, "currency": "EUR"}),
            json!({"amount": -2e15, "currency": "EUR"}),
        ] {
            let price = p.price(&payload);
            assert!(
                price.amount.is_none() || &*p.name(price.currency) == UNKNOWN,
                "{payload}: {price:?}"
            );
        }
        assert!(Pricing::new("amount", "/currency").is_err());
    }

    #[test]
    fn currencies_are_bounded() {
        let p = pricing();
        for i in 0..(MAX_CURRENCIES + 10) {
            p.price(&json!({"amount": 1, "currency": format!("C{i}")}));
        }
        let late = p.price(&json!({"amount": 1, "currency": "LATE"}));
        assert_eq!(&*p.name(late.currency), OTHER);
    }

    #[test]
    fn sums_add_up_per_currency_and_return_to_zero() {
        let p = pricing();
        let eur = p.price(&json!({"amount": 100, "currency": "EUR"}));
        let usd = p.price(&json!({"amount": 40, "currency": "USD"}));
        let none = p.price(&json!({"memo": "no amount"}));
        let mut sums = ExposureSums::default();
        sums.add(0.9, eur);
        sums.add(0.7, eur);
        sums.add(0.5, usd);
        sums.add(0.8, none);
        let r = p.report(&sums);
        assert!((r.expected_duplicates - 1.1).abs() < 1e-9, "{r:?}");
        assert!((r.value_at_risk["EUR"] - 40.0).abs() < 1e-9, "{r:?}");
        assert!((r.value_at_risk["USD"] - 20.0).abs() < 1e-9, "{r:?}");
        assert_eq!(r.value_at_risk[UNKNOWN], 0.0);
        assert!((r.unpriced_expected_duplicates - 0.2).abs() < 1e-9);
        assert_eq!(r.provisional, 4);
        let mut other = ExposureSums::default();
        other.add(0.5, eur);
        sums.merge(&other);
        assert!((p.report(&sums).value_at_risk["EUR"] - 90.0).abs() < 1e-9);
        for (c, price) in [(0.9, eur), (0.7, eur), (0.5, usd), (0.8, none), (0.5, eur)] {
            sums.remove(c, price);
        }
        assert_eq!(sums, ExposureSums::default());
        let empty = p.report(&sums);
        assert_eq!(empty.expected_duplicates, 0.0);
        assert!(empty.value_at_risk.is_empty());
    }
}
