//! Validated names that cross the wire: dataset names and object paths.
//!
//! Both are checked when decoded, so the rest of the code never sees `..`, an absolute
//! path, a NUL byte or the store's own reserved names. The store still opens files so that
//! symlinks cannot leave the dataset; these checks are the first of two fences.

use std::fmt;

/// A dataset name: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most [`MAX_DATASET_NAME_BYTES`] bytes.
///
/// A dataset is a directory of that name under the store's root.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DatasetName(String);

impl DatasetName {
    /// Validates a dataset name.
    pub fn new(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > MAX_DATASET_NAME_BYTES {
            return Err(NameError::TooLong {
                len: name.len(),
                max: MAX_DATASET_NAME_BYTES,
            });
        }
        let mut chars = name.chars();
        let first = chars.next().unwrap_or('.');
        if !first.is_ascii_alphanumeric() {
            return Err(NameError::DatasetStart);
        }
        if let Some(c) =
            chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NameError::Char(c));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatasetName({})", self.0)
    }
}

impl serde::Serialize for DatasetName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for DatasetName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for DatasetName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// An object's path inside its dataset: relative, `/`-separated, no empty, `.` or `..`
/// segment, no NUL or control characters, not under the reserved `.transportd` prefix.
///
/// Object names can carry patient identifiers: log the object's digest, not its path.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectPath(String);

impl ObjectPath {
    /// Validates an object path.
    pub fn new(path: &str) -> Result<Self, NameError> {
        if path.is_empty() {
            return Err(NameError::Empty);
        }
        if path.len() > MAX_OBJECT_PATH_BYTES {
            return Err(NameError::TooLong {
                len: path.len(),
                max: MAX_OBJECT_PATH_BYTES,
            });
        }
        if path.starts_with('/') {
            return Err(NameError::Absolute);
        }
        let mut depth = 0;
        for segment in path.split('/') {
            depth += 1;
            if segment.is_empty() {
                return Err(NameError::EmptySegment);
            }
            if segment == "." || segment == ".." {
                return Err(NameError::DotSegment);
            }
            if segment.len() > MAX_SEGMENT_BYTES {
                return Err(NameError::TooLong {
                    len: segment.len(),
                    max: MAX_SEGMENT_BYTES,
                });
            }
            if let Some(c) = segment.chars().find(|c| c.is_control()) {
                return Err(NameError::Char(c));
            }
            if segment.starts_with(RESERVED_PREFIX) {
                return Err(NameError::Reserved);
            }
        }
        if depth > MAX_DEPTH {
            return Err(NameError::TooDeep {
                depth,
                max: MAX_DEPTH,
            });
        }
        Ok(Self(path.to_owned()))
    }

    /// The path.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path's segments.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// A stable digest of the path, for logs: names can carry patient identifiers.
    pub fn digest(&self) -> super::manifest::Digest {
        super::manifest::Digest(blake3::hash(self.0.as_bytes()).into())
    }
}

impl fmt::Display for ObjectPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ObjectPath {
    // Debug output ends up in logs more easily than Display: show the digest only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectPath(#{})", self.digest().short())
    }
}

impl serde::Serialize for ObjectPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl std::str::FromStr for ObjectPath {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Why a dataset name or object path is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("name is empty")]
    Empty,
    /// The name or one of its segments is too long.
    #[error("name is {len} bytes; at most {max} are allowed")]
    TooLong {
        /// Actual length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A dataset name must start with a letter or digit.
    #[error("dataset name must start with a letter or digit")]
    DatasetStart,
    /// A character that is not allowed.
    #[error("name holds the character {0:?}, which is not allowed")]
    Char(char),
    /// An object path starting with `/`.
    #[error("object path must be relative to its dataset")]
    Absolute,
    /// `a//b` or a trailing `/`.
    #[error("object path has an empty segment")]
    EmptySegment,
    /// `.` or `..`.
    #[error("object path has a '.' or '..' segment")]
    DotSegment,
    /// Too many segments.
    #[error("object path has {depth} segments; at most {max} are allowed")]
    TooDeep {
        /// Actual depth.
        depth: usize,
        /// The limit.
        max: usize,
    },
    /// A segment starting with `.transportd`, which the store keeps for itself.
    #[error("names starting with .transportd are reserved")]
    Reserved,
}

/// Names starting with this are the store's own (temporary files, metadata).
pub const RESERVED_PREFIX: &str = ".transportd";

/// Dataset names are directory names; 128 bytes is plenty and keeps listings small.
pub const MAX_DATASET_NAME_BYTES: usize = 128;

/// Object paths are bounded so a request cannot make us hold or walk arbitrary strings.
pub const MAX_OBJECT_PATH_BYTES: usize = 1024;

/// Linux's own limit on a file name.
const MAX_SEGMENT_BYTES: usize = 255;

/// Deep enough for any sane dataset layout; bounds the work of resolving a path.
const MAX_DEPTH: usize = 32;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn dataset_names() {
        for ok in ["mnist", "ct-scans_2026.v1", "A", "9x"] {
            assert!(DatasetName::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(DatasetName::new(""), Err(NameError::Empty));
        assert_eq!(DatasetName::new(".hidden"), Err(NameError::DatasetStart));
        assert_eq!(DatasetName::new(".."), Err(NameError::DatasetStart));
        assert_eq!(DatasetName::new("a/b"), Err(NameError::Char('/')));
        assert_eq!(DatasetName::new("a b"), Err(NameError::Char(' ')));
        assert!(matches!(
            DatasetName::new(&"a".repeat(129)),
            Err(NameError::TooLong { .. })
        ));
    }

    #[test]
    fn object_paths_refuse_traversal() {
        for ok in ["a", "train/shard-0001.bin", "x y/ü.npz", ".hidden", "a/.b"] {
            assert!(ObjectPath::new(ok).is_ok(), "{ok}");
        }
        let bad: &[(&str, NameError)] = &[
            ("", NameError::Empty),
            ("/etc/passwd", NameError::Absolute),
            ("..", NameError::DotSegment),
            ("../other/x", NameError::DotSegment),
            ("a/../../x", NameError::DotSegment),
            ("a/./b", NameError::DotSegment),
            ("a//b", NameError::EmptySegment),
            ("a/", NameError::EmptySegment),
            ("a\0b", NameError::Char('\0')),
            ("a\nb", NameError::Char('\n')),
            (".transportd/partial/x", NameError::Reserved),
            ("a/.transportd-tmp", NameError::Reserved),
        ];
        for (input, want) in bad {
            assert_eq!(ObjectPath::new(input).as_ref(), Err(want), "{input:?}");
        }
        let deep = vec!["d"; 33].join("/");
        assert!(matches!(
            ObjectPath::new(&deep),
            Err(NameError::TooDeep { .. })
        ));
    }

    #[test]
    fn object_path_debug_hides_the_name() {
        let p = ObjectPath::new("patient-4711/scan.dcm").unwrap();
        let shown = format!("{p:?}");
        assert!(!shown.contains("patient"), "{shown}");
    }

    proptest! {
        #[test]
        fn accepted_paths_never_escape(s in "[a-z./]{0,24}") {
            if let Ok(p) = ObjectPath::new(&s) {
                prop_assert!(!p.as_str().starts_with('/'));
                prop_assert!(p.segments().all(|seg| seg != ".." && seg != "." && !seg.is_empty()));
            }
        }

        #[test]
        fn valid_names_round_trip(
            dataset in "[A-Za-z0-9][A-Za-z0-9._-]{0,127}",
            segs in proptest::collection::vec("[^/\\p{Cc}]{1,20}", 1..8),
        ) {
            let d = DatasetName::new(&dataset).unwrap();
            prop_assert_eq!(d.as_str(), dataset.as_str());
            prop_assert_eq!(d.to_string().parse::<DatasetName>(), Ok(d));
            let path = segs.join("/");
            match ObjectPath::new(&path) {
                Ok(p) => {
                    prop_assert_eq!(p.as_str(), path.as_str());
                    prop_assert_eq!(p.segments().count(), segs.len());
                    prop_assert_eq!(p.to_string().parse::<ObjectPath>(), Ok(p));
                }
                // Generated segments may still be "." or "..", reserved, or too long.
                Err(e) => prop_assert!(matches!(
                    e,
                    NameError::DotSegment | NameError::Reserved | NameError::TooLong { .. }
                ), "{e}"),
            }
        }

        #[test]
        fn any_text_never_panics_and_what_is_accepted_keeps_the_rules(s in "\\PC{0,300}|(\\.\\./|/|[a-z]{1,3}/){0,40}") {
            if let Ok(d) = DatasetName::new(&s) {
                prop_assert!(d.as_str().len() <= MAX_DATASET_NAME_BYTES);
                prop_assert!(!d.as_str().contains(['/', '\\', '\0']));
                prop_assert!(d.as_str().starts_with(|c: char| c.is_ascii_alphanumeric()));
            }
            if let Ok(p) = ObjectPath::new(&s) {
                prop_assert!(p.as_str().len() <= MAX_OBJECT_PATH_BYTES);
                prop_assert!(p.segments().count() <= MAX_DEPTH);
                let segments_ok = p.segments().all(|seg| {
                    !seg.is_empty()
                        && seg != "."
                        && seg != ".."
                        && seg.len() <= MAX_SEGMENT_BYTES
                        && !seg.starts_with(RESERVED_PREFIX)
                        && !seg.chars().any(char::is_control)
                });
                prop_assert!(segments_ok, "accepted {:?}", s);
            }
        }
    }
}
