//! Twin validation (service-api §4, device-protocol §5.2): key and value rules checked on what a
//! client sends, section sizes checked on what the twin would hold after the change.
//!
//! Sizes follow the hub's accounting, not the JSON text: every key counts its UTF-8 length,
//! strings their UTF-8 length, numbers 8 bytes, booleans 4 bytes; `$version` and `$metadata`
//! are not part of a section's data and so never count.

use serde_json::{Map, Value};

/// Longest property name, in UTF-8 bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest string value, in UTF-8 bytes.
pub const MAX_STRING_BYTES: usize = 4096;
/// Deepest nesting of objects below a section's root.
pub const MAX_DEPTH: usize = 10;
/// Integer range: what an IEEE double holds exactly, minus the top bit (−2^52 … 2^52−1).
pub const MIN_INTEGER: i64 = -4_503_599_627_370_496;
pub const MAX_INTEGER: i64 = 4_503_599_627_370_495;

const NUMBER_BYTES: usize = 8;
const BOOLEAN_BYTES: usize = 4;
/// Path segments longer than this are cut in error messages, which a 1 KB key would flood.
const PATH_SEGMENT_SHOWN: usize = 64;

/// The three property sections of a twin, each with its own size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Tags,
    Desired,
    Reported,
}

impl Section {
    /// Largest size of the section's data (service-api §4, §12).
    pub fn max_bytes(self) -> usize {
        match self {
            Self::Tags => 8 * 1024,
            Self::Desired | Self::Reported => 32 * 1024,
        }
    }

    /// Where the section sits in the service's twin JSON, the root of paths in error messages.
    pub fn path(self) -> &'static str {
        match self {
            Self::Tags => "tags",
            Self::Desired => "properties.desired",
            Self::Reported => "properties.reported",
        }
    }
}

impl std::fmt::Display for Section {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path())
    }
}

/// Why a twin change is refused; the REST layer answers 400 `ArgumentInvalid`, MQTT and AMQP
/// answer status 400. A refused change leaves the twin as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinError {
    #[error("the property name at '{path}' is longer than {MAX_KEY_BYTES} bytes")]
    KeyTooLong { path: String },
    #[error("the property name at '{path}' may not contain '.', '$', spaces or control characters")]
    InvalidKey { path: String },
    #[error("the string at '{path}' is {bytes} bytes long, over the {MAX_STRING_BYTES}-byte limit")]
    StringTooLong { path: String, bytes: usize },
    #[error("the integer at '{path}' is outside {MIN_INTEGER}..{MAX_INTEGER}")]
    IntegerOutOfRange { path: String },
    #[error("'{path}' is nested more than {MAX_DEPTH} levels deep")]
    TooDeep { path: String },
    #[error("{section} would be {bytes} bytes, over the {limit}-byte limit")]
    TooLarge { section: Section, bytes: usize, limit: usize },
}

#[derive(Clone, Copy)]
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// Tracks where the walk is, to name the offending property in an error.
struct Path<'a> {
    section: Section,
    segments: Vec<Segment<'a>>,
}

impl Path<'_> {
    fn render(&self) -> String {
        let mut out = self.section.path().to_owned();
        for segment in &self.segments {
            match segment {
                Segment::Key(key) if key.chars().count() > PATH_SEGMENT_SHOWN => {
                    out.push('.');
                    out.extend(key.chars().take(PATH_SEGMENT_SHOWN));
                    out.push('…');
                }
                Segment::Key(key) => {
                    out.push('.');
                    out.push_str(key);
                }
                Segment::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }
}

/// Checks every key and value of `data` (a patch or a whole section) against the key, string,
/// integer and depth rules. `null` is accepted anywhere: in a patch it deletes.
pub fn check_content(section: Section, data: &Map<String, Value>) -> Result<(), TwinError> {
    check_object(data, 0, &mut Path { section, segments: Vec::new() })
}

fn check_object<'a>(object: &'a Map<String, Value>, depth: usize, path: &mut Path<'a>) -> Result<(), TwinError> {
    for (key, value) in object {
        path.segments.push(Segment::Key(key));
        if key.len() > MAX_KEY_BYTES {
            return Err(TwinError::KeyTooLong { path: path.render() });
        }
        if key.chars().any(|c| matches!(c, '.' | '$' | ' ') || c.is_control()) {
            return Err(TwinError::InvalidKey { path: path.render() });
        }
        check_value(value, depth, path)?;
        path.segments.pop();
    }
    Ok(())
}

/// `depth` is the number of objects enclosing `value` below the section root.
fn check_value<'a>(value: &'a Value, depth: usize, path: &mut Path<'a>) -> Result<(), TwinError> {
    match value {
        Value::Object(object) => {
            if depth + 1 > MAX_DEPTH {
                return Err(TwinError::TooDeep { path: path.render() });
            }
            check_object(object, depth + 1, path)
        }
        // Arrays are not objects: only the objects inside them add to the depth.
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.segments.push(Segment::Index(i));
                check_value(item, depth, path)?;
                path.segments.pop();
            }
            Ok(())
        }
        Value::String(s) if s.len() > MAX_STRING_BYTES => {
            Err(TwinError::StringTooLong { path: path.render(), bytes: s.len() })
        }
        Value::Number(n) if !n.is_f64() && !n.as_i64().is_some_and(|i| (MIN_INTEGER..=MAX_INTEGER).contains(&i)) => {
            Err(TwinError::IntegerOutOfRange { path: path.render() })
        }
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => Ok(()),
    }
}

/// Refuses a section that would exceed its limit.
pub fn check_size(section: Section, bytes: usize) -> Result<(), TwinError> {
    let limit = section.max_bytes();
    if bytes > limit { Err(TwinError::TooLarge { section, bytes, limit }) } else { Ok(()) }
}

/// Size of an object's data. A `null` member counts as absent, since in a patch it deletes and a
/// stored object never holds one.
pub fn object_size(object: &Map<String, Value>) -> usize {
    object.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| k.len() + value_size(v)).sum()
}

fn value_size(value: &Value) -> usize {
    match value {
        Value::Null => 0,
        Value::Bool(_) => BOOLEAN_BYTES,
        Value::Number(_) => NUMBER_BYTES,
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(value_size).sum(),
        Value::Object(object) => object_size(object),
    }
}

/// Size `current` would have once `patch` is merged into it, computed without building the
/// result: the current size, less what the patch replaces or deletes, plus what it writes.
pub fn merged_size(current: &Map<String, Value>, patch: &Map<String, Value>) -> usize {
    let (removed, added) = merge_delta(current, patch);
    object_size(current) - removed + added
}

/// Bytes the merge removes from and adds to `current`, as two non-negative sums.
fn merge_delta(current: &Map<String, Value>, patch: &Map<String, Value>) -> (usize, usize) {
    let (mut removed, mut added) = (0, 0);
    for (key, new) in patch {
        match (current.get(key), new) {
            (Some(Value::Object(old)), Value::Object(sub)) => {
                let (r, a) = merge_delta(old, sub);
                removed += r;
                added += a;
            }
            (old, new) => {
                if let Some(old) = old {
                    removed += key.len() + value_size(old);
                }
                if !new.is_null() {
                    added += key.len() + value_size(new);
                }
            }
        }
    }
    (removed, added)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    /// `levels` objects, one inside the other, around a string.
    fn nested(levels: usize) -> Value {
        (0..levels).fold(json!("leaf"), |inner, i| json!({ format!("l{i}"): inner }))
    }

    #[test]
    fn size_counts_keys_strings_numbers_and_booleans() {
        let data = object(json!({"ab": "xyz", "n": 1.5, "b": true, "o": {"k": [1, "é"]}}));
        assert_eq!(object_size(&data), 2 + 3 + 1 + 8 + 1 + 4 + 1 + 1 + 8 + 2);
    }

    #[test]
    fn merged_size_matches_the_size_of_the_merged_object() {
        let current = object(json!({"a": {"x": "1234", "y": 1}, "b": "gone", "c": [1, 2]}));
        let patch = object(json!({"a": {"x": null, "z": true}, "b": null, "c": {"new": "v"}, "d": null}));
        let merged = object(json!({"a": {"y": 1, "z": true}, "c": {"new": "v"}}));
        assert_eq!(merged_size(&current, &patch), object_size(&merged));
    }

    #[test]
    fn keys_of_1024_bytes_pass_and_longer_fail() {
        let ok = object(json!({ "é".repeat(512): 1 }));
        assert_eq!(check_content(Section::Desired, &ok), Ok(()));
        let long = object(json!({ "a".repeat(1025): 1 }));
        assert!(matches!(check_content(Section::Desired, &long), Err(TwinError::KeyTooLong { .. })));
    }

    #[test]
    fn keys_with_dot_dollar_space_or_control_characters_fail() {
        for key in ["a.b", "$x", "a b", "a\u{1}b", "a\u{85}b"] {
            let data = object(json!({ "ok": { key: 1 } }));
            assert_eq!(
                check_content(Section::Tags, &data),
                Err(TwinError::InvalidKey { path: format!("tags.ok.{key}") }),
                "{key:?}"
            );
        }
        assert_eq!(check_content(Section::Tags, &object(json!({"ünïcode_-:#": 1}))), Ok(()));
    }

    #[test]
    fn keys_inside_arrays_follow_the_same_rules() {
        let data = object(json!({"list": [1, {"bad key": 2}]}));
        assert_eq!(
            check_content(Section::Reported, &data),
            Err(TwinError::InvalidKey { path: "properties.reported.list[1].bad key".into() })
        );
    }

    #[test]
    fn strings_of_4096_bytes_pass_and_longer_fail() {
        assert_eq!(check_content(Section::Desired, &object(json!({"s": "x".repeat(4096)}))), Ok(()));
        let long = object(json!({"s": "x".repeat(4097)}));
        assert_eq!(
            check_content(Section::Desired, &long),
            Err(TwinError::StringTooLong { path: "properties.desired.s".into(), bytes: 4097 })
        );
    }

    #[test]
    fn integers_are_bounded_and_floats_are_not() {
        let bounds = object(json!({"min": MIN_INTEGER, "max": MAX_INTEGER, "f": 1e300, "g": -1e300}));
        assert_eq!(check_content(Section::Desired, &bounds), Ok(()));
        for n in [json!(MIN_INTEGER - 1), json!(MAX_INTEGER + 1), json!(u64::MAX)] {
            let data = object(json!({ "n": n }));
            assert_eq!(
                check_content(Section::Desired, &data),
                Err(TwinError::IntegerOutOfRange { path: "properties.desired.n".into() })
            );
        }
    }

    #[test]
    fn ten_nested_objects_pass_and_eleven_fail() {
        assert_eq!(check_content(Section::Tags, &object(json!({ "d": nested(10) }))), Ok(()));
        let eleven = object(json!({ "d": nested(11) }));
        assert!(matches!(check_content(Section::Tags, &eleven), Err(TwinError::TooDeep { .. })));
    }

    #[test]
    fn objects_inside_arrays_count_towards_depth_but_arrays_do_not() {
        let ten = json!({ "a": [[nested(10)]] });
        assert_eq!(check_content(Section::Tags, &object(ten)), Ok(()));
        let eleven = json!({ "a": [nested(11)] });
        assert!(matches!(check_content(Section::Tags, &object(eleven)), Err(TwinError::TooDeep { .. })));
    }

    #[test]
    fn long_keys_are_shortened_in_error_paths() {
        let data = object(json!({ "a".repeat(2000): 1 }));
        let Err(TwinError::KeyTooLong { path }) = check_content(Section::Tags, &data) else {
            panic!("expected KeyTooLong");
        };
        assert_eq!(path, format!("tags.{}…", "a".repeat(64)));
    }

    #[test]
    fn section_limits_are_8_kb_for_tags_and_32_kb_for_properties() {
        assert_eq!(check_size(Section::Tags, 8192), Ok(()));
        assert!(check_size(Section::Tags, 8193).is_err());
        assert_eq!(check_size(Section::Desired, 32768), Ok(()));
        assert_eq!(
            check_size(Section::Reported, 32769),
            Err(TwinError::TooLarge { section: Section::Reported, bytes: 32769, limit: 32768 })
        );
    }
}
