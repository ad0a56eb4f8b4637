//! The keys of a section as its derived `Deserialize` knows them, in declaration order: the
//! one list of a section's keys, so that code which goes over every section or key (the
//! loader, the start-up warnings) lists none by hand and a new one cannot be left out.

use serde::{
    Deserialize,
    de::{self, Deserializer, Visitor},
    forward_to_deserialize_any,
};

/// The fields of the struct `T`, in declaration order; empty for anything but a struct with
/// derived (or struct-shaped) `Deserialize`.
pub(super) fn of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    // The derived impl hands its field names to `deserialize_struct`; the error that follows
    // is expected and carries nothing.
    let _ = T::deserialize(Names(&mut fields));
    fields
}

/// A deserializer that reads no data: it only keeps the field names a struct asks it for.
struct Names<'a>(&'a mut &'static [&'static str]);

impl<'de> Deserializer<'de> for Names<'_> {
    type Error = de::value::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("only the field names were asked for"))
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, TlsConfig};

    #[test]
    fn a_struct_gives_its_fields_in_declaration_order() {
        assert_eq!(of::<TlsConfig>(), ["ca_file", "client_cert", "client_key"]);
        let sections = of::<Config>();
        assert_eq!(sections.first(), Some(&"amqp"));
        assert_eq!(sections.last(), Some(&"log"));
        assert_eq!(sections.len(), 16, "{sections:?}");
    }

    #[test]
    fn anything_else_has_none() {
        assert!(of::<u64>().is_empty());
        assert!(of::<std::collections::BTreeMap<String, u64>>().is_empty());
    }
}
