//! A payload's JSON, read without copying its text: names and strings borrow from the payload.
//!
//! `serde_json::Value` owns every key and string, so reading a firmware message into it cost an
//! allocation (and a free) for each of its keys and strings, about a third of the intake's
//! instructions (`mqtt-ingest-intake-cost`). serde_json has no borrowing counterpart of `Value`,
//! so this is one, built on serde's own visitor machinery: it keeps serde_json's parser, its
//! errors and its nesting limit (128), and only the tree is ours. An object gives the answers
//! `serde_json::Map` gives (a repeated key keeps its last value; its members in an order of its
//! own), so the payload readers see the same object as before. For a message of which only a
//! field or two are read, [`pick`] reads those and checks the rest without building a tree.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// A JSON value whose text borrows from the payload where it can (a string with escapes is
/// unescaped into its own copy).
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number, as serde_json reads it (integers stay integers).
    Number(Number),
    /// A string.
    Str(Cow<'a, str>),
    /// An array.
    Array(Vec<Json<'a>>),
    /// An object.
    Object(Object<'a>),
}

/// An object's members, each name once (the last value of a repeated name), as
/// `serde_json::Map` holds them: in the document's order in an object of up to
/// [`SMALL_OBJECT`] members, sorted by name in a larger one. A vector: the payloads' objects
/// have a handful of members.
#[derive(Debug, Clone, Default)]
pub struct Object<'a>(Vec<(Cow<'a, str>, Json<'a>)>);

/// Objects are equal when they hold the same members, in whatever order each keeps them.
impl PartialEq for Object<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(name, v)| other.get(name) == Some(v))
    }
}

/// Up to this many members, an object is kept in the document's order and searched one member
/// at a time: sorting the members cost more than the few lookups it spares (the firmware's
/// objects have six or seven members, the seed's three or four).
const SMALL_OBJECT: usize = 8;

/// Reads `text` as one JSON value (serde_json's grammar and errors).
pub fn parse(text: &str) -> Result<Json<'_>, serde_json::Error> {
    serde_json::from_str(text)
}

impl<'a> Json<'a> {
    /// Whether this is `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }

    /// The value as an owned `serde_json::Value` (for the parts that are kept: a status).
    pub fn to_value(&self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => Value::Number(n.clone()),
            Json::Str(s) => Value::String(s.as_ref().to_owned()),
            Json::Array(items) => Value::Array(items.iter().map(Json::to_value).collect()),
            Json::Object(o) => Value::Object(o.to_map()),
        }
    }
}

impl<'a> Object<'a> {
    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&Json<'a>> {
        // A payload's objects have a handful of members, whose names often share a first byte
        // (`sensor`, `sensors`, `status`; `sensor_name`, `sensor_type`): looked at one by one,
        // by length before text, they cost fewer instructions than a binary search's
        // comparisons.
        if self.0.len() <= SMALL_OBJECT {
            return self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        }
        self.0
            .binary_search_by(|(k, _)| name_cmp(k, name))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// The values of `names` (each a different name), in one pass over the members (for a few
    /// names, cheaper than a lookup for each).
    pub fn pick<const N: usize>(&self, names: [&str; N]) -> [Option<&Json<'a>>; N] {
        let mut picked = [None; N];
        for (name, value) in &self.0 {
            if let Some(i) = names.iter().position(|n| *n == name) {
                picked[i] = Some(value);
            }
        }
        picked
    }

    /// The members, each name once: in no order a caller may count on (see [`Object`]).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Json<'a>)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v))
    }

    /// The object as an owned `serde_json::Map`.
    pub fn to_map(&self) -> Map<String, Value> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_value()))
            .collect()
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No members.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Members in document order, each name once with its last value (what inserting them
    /// one by one into a `serde_json::Map` gives); put in name order if there are many.
    fn from_members(mut members: Vec<(Cow<'a, str>, Json<'a>)>) -> Self {
        if members.len() > SMALL_OBJECT {
            in_name_order_last_wins(&mut members, |(name, _)| name);
            return Self(members);
        }
        // A name given again later is dropped here (rare: one scan of the few members after
        // it, by length before text).
        let mut i = 0;
        while i < members.len() {
            let name = &members[i].0;
            if members[i + 1..].iter().any(|(later, _)| later == name) {
                members.remove(i);
            } else {
                i += 1;
            }
        }
        Self(members)
    }
}

/// Puts `items` in the order of their names (`name`), each name once with the last of its items,
/// in place: what inserting them one by one into a map gives (a payload's object, a message's
/// readings).
pub fn in_name_order_last_wins<T>(items: &mut Vec<T>, name: impl Fn(&T) -> &str) {
    // Stable: a repeated name's items stay in their order, and the last one is moved into the
    // slot that is kept.
    items.sort_by(|a, b| name_cmp(name(a), name(b)));
    items.dedup_by(|later, kept| {
        let same = name(later) == name(kept);
        if same {
            std::mem::swap(later, kept);
        }
        same
    });
}

/// `str`'s order, decided on the first byte where that differs: names of one payload mostly
/// start with different letters, and a call to `memcmp` for each comparison was a tenth of the
/// intake's instructions (sorting an object's members, looking names up).
pub fn name_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.as_bytes().first(), b.as_bytes().first()) {
        (Some(x), Some(y)) if x != y => x.cmp(y),
        _ => a.cmp(b),
    }
}

/// A string that borrows from the input when the input has it unescaped (serde's own `Cow`
/// always copies).
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor<'a>(std::marker::PhantomData<Text<'a>>);
        impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(TextVisitor(std::marker::PhantomData))
    }
}

/// Any lifetime the input outlives, as serde's `#[serde(borrow)]` asks of a field's type.
impl<'de: 'a, 'a> Deserialize<'de> for Json<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor(std::marker::PhantomData))
    }
}

struct JsonVisitor<'a>(std::marker::PhantomData<Json<'a>>);

impl<'de: 'a, 'a> Visitor<'de> for JsonVisitor<'a> {
    type Value = Json<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        // What serde_json's own Value does: JSON text cannot hold a NaN or an infinity, but
        // a number too large for a double reads as one.
        Ok(Number::from_f64(v).map_or(Json::Null, Json::Number))
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Json::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Json::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Json::Str(Cow::Owned(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Json::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Json::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        Json::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0).clamp(8, 64));
        while let Some(Text(name)) = map.next_key()? {
            members.push((name, map.next_value()?));
        }
        Ok(Json::Object(Object::from_members(members)))
    }
}

/// Reads `text` as one JSON object and keeps only the members called `names` (the last value
/// of a name given twice, as [`parse`] keeps it), reading every other member the way
/// serde_json reads it (its numbers, strings and nesting limit) without building it: for the
/// messages of which the service reads a field or two (a heartbeat's and a status's
/// `timestamp`). Accepts the texts [`parse`] reads as an object, and only those (a property
/// test holds the two together); its error is not [`parse`]'s, so a caller that refuses the
/// text asks [`parse`] for the reason.
pub fn pick<'a, const N: usize>(
    text: &'a str,
    names: [&str; N],
) -> Result<[Option<Json<'a>>; N], serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let picked = de.deserialize_map(Picker {
        names,
        _text: std::marker::PhantomData,
    })?;
    de.end()?;
    Ok(picked)
}

struct Picker<'n, 'a, const N: usize> {
    names: [&'n str; N],
    _text: std::marker::PhantomData<Json<'a>>,
}

impl<'de: 'a, 'a, const N: usize> Visitor<'de> for Picker<'_, 'a, N> {
    type Value = [Option<Json<'a>>; N];

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut picked = std::array::from_fn(|_| None);
        while let Some(Text(name)) = map.next_key()? {
            match self.names.iter().position(|n| *n == name) {
                Some(i) => picked[i] = Some(map.next_value()?),
                None => {
                    map.next_value::<Checked>()?;
                }
            }
        }
        Ok(picked)
    }
}

/// A value read as serde_json reads one into its tree, then dropped. Not serde's `IgnoredAny`,
/// which only scans: it takes numbers that serde_json's tree refuses (`1e400` is out of range),
/// and a member nobody reads must not make a message acceptable that the full reading refuses.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Checked)
    }
}

impl<'de> Visitor<'de> for Checked {
    type Value = Checked;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Checked)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Checked)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Checked)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Checked)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Checked)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Checked)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Checked)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        Checked::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_key::<Checked>()?.is_some() {
            map.next_value::<Checked>()?;
        }
        Ok(Checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Any JSON value, as serde_json's own tree (strings with escapes and repeated keys too).
    fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e12f64..1e12).prop_map(Value::from),
            "[a-z\"\\\\é\n]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec(("[a-c]{1,2}", inner), 0..6)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        })
    }

    /// An object's text with members in any order and names repeated.
    fn object_text() -> impl Strategy<Value = String> {
        prop::collection::vec(("[a-d]", any_value()), 0..8).prop_map(|members| {
            let body: Vec<String> = members
                .iter()
                .map(|(k, v)| format!("{}:{v}", Value::String(k.clone())))
                .collect();
            format!("{{{}}}", body.join(","))
        })
    }

    proptest! {
        /// The borrowed tree is serde_json's own reading of the same text.
        #[test]
        fn reads_what_serde_json_reads(text in prop_oneof![
            any_value().prop_map(|v| v.to_string()),
            object_text(),
        ]) {
            let ours = parse(&text).map(|j| j.to_value());
            let theirs = serde_json::from_str::<Value>(&text);
            prop_assert_eq!(ours.ok(), theirs.ok());
        }

        /// Picking members accepts what the full reading accepts as an object, and picks what
        /// it holds under those names.
        #[test]
        fn picks_what_the_full_reading_holds(text in prop_oneof![
            any_value().prop_map(|v| v.to_string()),
            object_text(),
            "[\\[\\]{}:,\"a0-9 .e-]{0,12}",
        ]) {
            let full = match parse(&text) {
                Ok(Json::Object(o)) => Some([o.get("a").cloned(), o.get("b").cloned()]),
                _ => None,
            };
            prop_assert_eq!(pick(&text, ["a", "b"]).ok(), full);
        }

        /// Names compare as `str` compares them, whether they share a first byte or not.
        #[test]
        fn names_compare_in_str_order(a in "[a-c\\x{e9}]{0,4}", b in "[a-c\\x{e9}]{0,4}") {
            prop_assert_eq!(name_cmp(&a, &b), a.cmp(&b));
        }

        /// Text that is not JSON fails with serde_json's own message.
        #[test]
        fn fails_as_serde_json_fails(text in "[\\[\\]{}:,\"a0-9 .e-]{0,12}") {
            let ours = parse(&text).map(|j| j.to_value()).map_err(|e| e.to_string());
            let theirs = serde_json::from_str::<Value>(&text).map_err(|e| e.to_string());
            prop_assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn names_and_strings_borrow_unless_escaped() {
        let Ok(Json::Object(o)) = parse(r#"{"b":"plain","a":"tab\tbed","b":"last"}"#) else {
            panic!("an object");
        };
        assert_eq!(o.iter().count(), 2);
        assert_eq!(o.iter().map(|(k, _)| k).collect::<Vec<_>>(), ["a", "b"]);
        assert!(matches!(o.get("b"), Some(Json::Str(Cow::Borrowed("last")))));
        assert!(matches!(o.get("a"), Some(Json::Str(Cow::Owned(s))) if s == "tab\tbed"));
        assert!(o.get("a").is_some() && o.get("c").is_none());
    }

    #[test]
    fn a_member_nobody_reads_is_still_read_as_serde_json_reads_it() {
        // serde's IgnoredAny would take the out-of-range number; serde_json's tree does not.
        for text in [r#"{"a":1,"x":1e400}"#, r#"{"x":[{"y":-1e999}],"a":1}"#] {
            assert!(serde_json::from_str::<Value>(text).is_err(), "{text}");
            assert!(parse(text).is_err() && pick(text, ["a"]).is_err(), "{text}");
        }
        let deep = format!(r#"{{"a":1,"x":{}{}}}"#, "[".repeat(200), "]".repeat(200));
        assert!(pick(&deep, ["a"]).is_err());
        assert_eq!(
            pick(r#"{"a":1,"b":"x\ty","a":[2],"c":{"a":3}}"#, ["a", "b", "d"]).unwrap(),
            [
                Some(Json::Array(vec![Json::Number(2.into())])),
                Some(Json::Str("x\ty".into())),
                None
            ]
        );
        assert!(pick("[1]", ["a"]).is_err() && pick(r#"{"a":1} x"#, ["a"]).is_err());
    }

    #[test]
    fn a_member_is_found_in_small_and_large_objects() {
        for n in [1, 8, 9, 40] {
            let text = format!(
                "{{{}}}",
                (0..n)
                    .rev()
                    .map(|i| format!(r#""k{i}":{i}"#))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let Ok(Json::Object(o)) = parse(&text) else {
                panic!("an object");
            };
            for i in 0..n {
                assert_eq!(
                    o.get(&format!("k{i}")),
                    Some(&Json::Number(i.into())),
                    "{text}"
                );
            }
            let name = format!("k{}", n.max(2) - 1);
            let [first, last, none] = o.pick(["k0", &name, "k"]);
            assert_eq!((first, last, none), (o.get("k0"), o.get(&name), None));
            assert_eq!(o.get("k"), None);
            assert_eq!(o.get(&format!("k{n}")), None);
        }
    }

    #[test]
    fn objects_are_equal_by_their_members_not_their_order() {
        fn p(text: &str) -> Json<'_> {
            parse(text).unwrap()
        }
        assert_eq!(
            p(r#"{"a":1,"b":{"x":[],"y":2}}"#),
            p(r#"{"b":{"y":2,"x":[]},"a":1}"#)
        );
        assert_eq!(p(r#"{"a":0,"b":2,"a":1}"#), p(r#"{"b":2,"a":1}"#));
        assert_ne!(p(r#"{"a":1,"b":2}"#), p(r#"{"a":1}"#));
        assert_ne!(p(r#"{"a":1,"b":2}"#), p(r#"{"a":1,"b":3}"#));
        assert_ne!(p(r#"{"a":1,"b":2}"#), p(r#"{"a":1,"c":2}"#));
    }

    #[test]
    fn nesting_is_limited_like_serde_json() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(parse(&deep).is_err());
        assert!(serde_json::from_str::<Value>(&deep).is_err());
    }
}
