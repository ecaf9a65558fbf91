//! Sizing a member of a JSON object while reading it, without keeping any
//! of it: a list that is too long is refused for the price of reading it,
//! not of holding it in memory first (a million `subscribe` patterns read
//! into `serde_json::Value`s take ~60 MiB, which the allocator then keeps).
//! Pure code.

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// What a value holds: its items (an array's elements or an object's
/// members; 0 for anything else), and the bytes of the strings among them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub items: usize,
    pub bytes: usize,
}

/// The size of member `key` of the object `json` (the largest, if the key
/// repeats); zero when absent. `None` when `json` is not an object
/// (which the caller's own checks then report).
pub fn member(json: &str, key: &str) -> Option<Size> {
    let mut de = serde_json::Deserializer::from_str(json);
    de.deserialize_map(Member(key)).ok()
}

struct Member<'k>(&'k str);

impl<'de> Visitor<'de> for Member<'_> {
    type Value = Size;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Size, A::Error> {
        let mut size = Size::default();
        while let Some(is_key) = map.next_key_seed(KeyIs(self.0))? {
            if is_key {
                let s = map.next_value_seed(Items)?;
                size.items = size.items.max(s.items);
                size.bytes = size.bytes.max(s.bytes);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(size)
    }
}

/// Whether a key is this one.
struct KeyIs<'k>(&'k str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E>(self, s: &str) -> Result<bool, E> {
        Ok(s == self.0)
    }
}

/// A value's items and the bytes of the strings among them.
struct Items;

impl<'de> DeserializeSeed<'de> for Items {
    type Value = Size;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Size, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Items {
    type Value = Size;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Size, A::Error> {
        let mut size = Size::default();
        while let Some(bytes) = seq.next_element_seed(Bytes)? {
            size.items += 1;
            size.bytes += bytes;
        }
        Ok(size)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Size, A::Error> {
        let mut size = Size::default();
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {
            size.items += 1;
        }
        Ok(size)
    }

    fn visit_str<E>(self, _: &str) -> Result<Size, E> {
        Ok(Size::default())
    }

    fn visit_bool<E>(self, _: bool) -> Result<Size, E> {
        Ok(Size::default())
    }

    fn visit_i64<E>(self, _: i64) -> Result<Size, E> {
        Ok(Size::default())
    }

    fn visit_u64<E>(self, _: u64) -> Result<Size, E> {
        Ok(Size::default())
    }

    fn visit_f64<E>(self, _: f64) -> Result<Size, E> {
        Ok(Size::default())
    }

    fn visit_unit<E>(self) -> Result<Size, E> {
        Ok(Size::default())
    }
}

/// An element's bytes of text: a string's length, else 0 (nested values
/// are skipped).
struct Bytes;

impl<'de> DeserializeSeed<'de> for Bytes {
    type Value = usize;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Bytes {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_str<E>(self, s: &str) -> Result<usize, E> {
        Ok(s.len())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<usize, A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| 0)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<usize, A::Error> {
        IgnoredAny.visit_map(map).map(|_| 0)
    }

    fn visit_bool<E>(self, _: bool) -> Result<usize, E> {
        Ok(0)
    }

    fn visit_i64<E>(self, _: i64) -> Result<usize, E> {
        Ok(0)
    }

    fn visit_u64<E>(self, _: u64) -> Result<usize, E> {
        Ok(0)
    }

    fn visit_f64<E>(self, _: f64) -> Result<usize, E> {
        Ok(0)
    }

    fn visit_unit<E>(self) -> Result<usize, E> {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_the_member_and_only_it() {
        let size = |json: &str| member(json, "events");
        assert_eq!(size("{}"), Some(Size::default()));
        assert_eq!(
            size(r#"{"since": [1, 2, 3], "events": ["STOP", "BLOCK_JOB_*", 5, [["x"]], {"a": "b"}]}"#),
            Some(Size { items: 5, bytes: 15 })
        );
        assert_eq!(
            size(r#"{"events": {"a": 1, "b": 2}}"#),
            Some(Size { items: 2, bytes: 0 })
        );
        assert_eq!(size(r#"{"events": "STOPSTOP"}"#), Some(Size::default()));
        // A repeated key counts at its largest; escapes count as decoded.
        assert_eq!(
            size(r#"{"events": ["a"], "ev\u0065nts": ["b", "c\"d"], "events": []}"#),
            Some(Size { items: 2, bytes: 4 })
        );
        assert_eq!(size(r#"["events"]"#), None);
        assert_eq!(size(r#"{"events": [1,"#), None);
    }
}
