//! Field paths and positions in a YAML document, and how to find the line and column of a path.
//!
//! serde_yaml_ng records where a value starts only in the errors it returns, so the document is
//! walked again along the path and a marker error is raised at the value: the parser stamps it with
//! the value's position. Used only to place validation errors and warnings, after the document parsed
//! once.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A position in the configuration document: line and column, both starting at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    /// The line, from 1.
    pub line: usize,
    /// The column, from 1.
    pub column: usize,
}

impl Location {
    pub(super) fn from_yaml(location: &serde_yaml_ng::Location) -> Self {
        Self {
            line: location.line(),
            column: location.column(),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// One step of a field path: a mapping key or a sequence index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

impl From<&str> for Seg {
    fn from(key: &str) -> Self {
        Seg::Key(key.to_owned())
    }
}

impl From<usize> for Seg {
    fn from(index: usize) -> Self {
        Seg::Index(index)
    }
}

const FOUND: &str = "meshwire-locate: found the value";

/// The location of the value at `path`, if the document has it.
pub(super) fn locate(yaml: &str, path: &[Seg]) -> Option<Location> {
    run(yaml, Seek { path, key: false })
}

/// The location of the key that ends `path` (a mapping key, not its value), if the document has it.
pub(super) fn locate_key(yaml: &str, path: &[Seg]) -> Option<Location> {
    match path.last() {
        Some(Seg::Key(_)) => run(yaml, Seek { path, key: true }),
        _ => locate(yaml, path),
    }
}

fn run(yaml: &str, seek: Seek<'_>) -> Option<Location> {
    let deserializer = serde_yaml_ng::Deserializer::from_str(yaml);
    match seek.deserialize(deserializer) {
        Err(err) if err.to_string().contains(FOUND) => err.location().map(|location| Location::from_yaml(&location)),
        _ => None,
    }
}

/// Walks to the value at `path` (or, with `key`, to the key that ends it) and fails there.
struct Seek<'p> {
    path: &'p [Seg],
    key: bool,
}

impl Seek<'_> {
    fn scalar<E: de::Error>(self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(E::custom(FOUND))
        } else {
            Ok(())
        }
    }
}

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seek<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.scalar()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.scalar()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.scalar()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.scalar()
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.scalar()
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged value: found if it is the target, else not searched further. Its content is
        // consumed all the same: serde_yaml_ng panics ("unexpected end of mapping") when the
        // enclosing collection is drained after a tagged collection was left half read.
        self.scalar()?;
        IgnoredAny.visit_enum(data).map(|_| ())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        let Seg::Key(want) = first else {
            return Ok(());
        };
        if self.key && rest.is_empty() {
            // Fails inside the key's own deserialization, so that the parser stamps the key's place.
            while map.next_key_seed(KeyProbe(want))?.is_some() {
                map.next_value::<IgnoredAny>()?;
            }
            return Ok(());
        }
        while let Some(KeyText(key)) = map.next_key()? {
            if key.as_deref() == Some(want.as_str()) {
                return map.next_value_seed(Seek {
                    path: rest,
                    key: self.key,
                });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        let Seg::Index(want) = first else {
            return Ok(());
        };
        for _ in 0..*want {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(Seek {
            path: rest,
            key: self.key,
        })
        .map(|_| ())
    }
}

/// A mapping key that fails when it is `.0` (its text, as [`KeyText`] gives it).
struct KeyProbe<'w>(&'w str);

impl<'de> DeserializeSeed<'de> for KeyProbe<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyProbe<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<(), E> {
        self.visit_str(&value.to_string())
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<(), E> {
        self.visit_str(&value.to_string())
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<(), E> {
        self.visit_str(&value.to_string())
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<(), E> {
        self.visit_str(&value.to_string())
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<(), E> {
        if value == self.0 { Err(E::custom(FOUND)) } else { Ok(()) }
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        IgnoredAny.visit_enum(data).map(|_| ())
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        IgnoredAny.visit_map(map).map(|_| ())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| ())
    }
}

/// A mapping key as text (`80` for an integer key), or `None` for a key that is a collection.
struct KeyText(Option<String>);

impl<'de> de::Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(KeyTextVisitor)
    }
}

struct KeyTextVisitor;

impl<'de> Visitor<'de> for KeyTextVisitor {
    type Value = KeyText;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<KeyText, E> {
        Ok(KeyText(Some(value.to_string())))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<KeyText, E> {
        Ok(KeyText(Some(value.to_string())))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<KeyText, E> {
        Ok(KeyText(Some(value.to_string())))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<KeyText, E> {
        Ok(KeyText(Some(value.to_string())))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<KeyText, E> {
        Ok(KeyText(Some(value.to_owned())))
    }

    fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
        Ok(KeyText(None))
    }

    fn visit_none<E: de::Error>(self) -> Result<KeyText, E> {
        Ok(KeyText(None))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<KeyText, A::Error> {
        IgnoredAny.visit_enum(data).map(|_| KeyText(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<KeyText, A::Error> {
        IgnoredAny.visit_map(map).map(|_| KeyText(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<KeyText, A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| KeyText(None))
    }
}
