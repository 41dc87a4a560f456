//! Where each value of a configuration file sits (line and column), so that
//! errors found after deserialization can still point into the file.
//!
//! Paths use the notation of `serde_path_to_error`: `federation.routing_rules[1].primary_region`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A place in a file, 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Position {
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// The position of every key and scalar of one file, by path.
#[derive(Debug, Clone, Default)]
pub struct SourceMap {
    file: PathBuf,
    /// Path to the position of the value (or, for containers, where they start).
    values: HashMap<String, (usize, usize)>,
    /// Path to the position of the key that introduces the value.
    keys: HashMap<String, (usize, usize)>,
    /// Path to the scalar's style: true when the scalar was quoted.
    quoted: HashMap<String, bool>,
}

/// A YAML (or JSON) syntax error with its position.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    /// Where the parser stopped.
    pub position: Position,
    /// What the parser said.
    pub message: String,
}

impl SourceMap {
    /// An empty map for a file whose positions are unknown (for example TOML,
    /// or configuration that came from the environment).
    pub fn empty(file: &Path) -> Self {
        Self {
            file: file.to_path_buf(),
            ..Self::default()
        }
    }

    /// Indexes a YAML or JSON document.
    pub fn from_yaml(file: &Path, text: &str) -> Result<Self, SyntaxError> {
        let mut builder = Builder {
            map: Self::empty(file),
            stack: Vec::new(),
        };
        let mut parser = Parser::new_from_str(text);
        parser.load(&mut builder, false).map_err(|e| SyntaxError {
            position: Position {
                file: file.to_path_buf(),
                line: e.marker().line(),
                column: e.marker().col() + 1,
            },
            message: e.info().to_string(),
        })?;
        Ok(builder.map)
    }

    /// The file this map describes.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Position of the value at `path`, or of its nearest ancestor that has one.
    pub fn locate(&self, path: &str) -> Option<Position> {
        self.lookup(&self.values, path)
    }

    /// Position of the key that introduces `path` (for unknown-field errors),
    /// falling back to the value's position.
    pub fn locate_key(&self, path: &str) -> Option<Position> {
        self.lookup(&self.keys, path).or_else(|| self.locate(path))
    }

    /// Position of character `offset` (in chars) inside the scalar at `path`,
    /// for errors inside a CEL condition. Exact for single-line scalars.
    pub fn locate_in_scalar(&self, path: &str, offset: usize) -> Option<Position> {
        let (line, column) = *self.values.get(path)?;
        let quote = usize::from(self.quoted.get(path).copied().unwrap_or(false));
        Some(Position {
            file: self.file.clone(),
            line,
            column: column + quote + offset,
        })
    }

    fn lookup(&self, table: &HashMap<String, (usize, usize)>, path: &str) -> Option<Position> {
        let mut candidate = path;
        loop {
            if let Some(&(line, column)) = table.get(candidate) {
                return Some(Position {
                    file: self.file.clone(),
                    line,
                    column,
                });
            }
            candidate = parent_path(candidate)?;
        }
    }
}

/// `a.b[2].c` → `a.b[2]` → `a.b` → `a` → None.
fn parent_path(path: &str) -> Option<&str> {
    let cut = path.rfind(['.', '['])?;
    Some(&path[..cut])
}

enum Frame {
    Mapping {
        path: String,
        pending_key: Option<String>,
    },
    Sequence {
        path: String,
        next_index: usize,
    },
}

struct Builder {
    map: SourceMap,
    stack: Vec<Frame>,
}

impl Builder {
    /// The path of the next value in the innermost container, and whether the
    /// next scalar there is a key.
    fn next_value_path(&mut self) -> (Option<String>, bool) {
        match self.stack.last_mut() {
            None => (Some(String::new()), false),
            Some(Frame::Mapping { path, pending_key }) => match pending_key.take() {
                None => (None, true),
                Some(key) => (Some(join_key(path, &key)), false),
            },
            Some(Frame::Sequence { path, next_index }) => {
                let p = format!("{path}[{next_index}]");
                *next_index += 1;
                (Some(p), false)
            }
        }
    }
}

fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let pos = (mark.line(), mark.col() + 1);
        match event {
            Event::Scalar(value, style, _, _) => {
                let (path, is_key) = self.next_value_path();
                if is_key {
                    if let Some(Frame::Mapping { path, pending_key }) = self.stack.last_mut() {
                        let full = join_key(path, &value);
                        self.map.keys.insert(full, pos);
                        *pending_key = Some(value);
                    }
                } else if let Some(path) = path {
                    let quoted = !matches!(style, yaml_rust2::scanner::TScalarStyle::Plain);
                    self.map.quoted.insert(path.clone(), quoted);
                    self.map.values.insert(path, pos);
                }
            }
            Event::MappingStart(..) => {
                let (path, _) = self.next_value_path();
                let path = path.unwrap_or_default();
                self.map.values.entry(path.clone()).or_insert(pos);
                self.stack.push(Frame::Mapping {
                    path,
                    pending_key: None,
                });
            }
            Event::SequenceStart(..) => {
                let (path, _) = self.next_value_path();
                let path = path.unwrap_or_default();
                self.map.values.entry(path.clone()).or_insert(pos);
                self.stack.push(Frame::Sequence {
                    path,
                    next_index: 0,
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "federation:\n  name: \"x\"\n  routing_rules:\n    - condition: \"a == 'b'\"\n      primary_region: eu\n    - condition: c\n";

    #[test]
    fn locates_values_keys_and_scalar_offsets() {
        let map = SourceMap::from_yaml(Path::new("f.yaml"), DOC).expect("valid yaml");
        let p = map
            .locate("federation.routing_rules[0].primary_region")
            .expect("found");
        assert_eq!((p.line, p.column), (5, 23));
        let k = map
            .locate_key("federation.routing_rules[1].condition")
            .expect("found");
        assert_eq!((k.line, k.column), (6, 7));
        // Offset 5 inside the quoted condition "a == 'b'" points at the quote before b.
        let c = map
            .locate_in_scalar("federation.routing_rules[0].condition", 5)
            .expect("found");
        assert_eq!((c.line, c.column), (4, 24));
        // Unknown leaves fall back to the nearest ancestor.
        let a = map
            .locate("federation.routing_rules[1].nope")
            .expect("ancestor");
        assert_eq!(a.line, 6);
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err =
            SourceMap::from_yaml(Path::new("f.yaml"), "a: [1, 2\nb: c\n").expect_err("broken");
        assert_eq!(err.position.file, Path::new("f.yaml"));
        assert!(err.position.line >= 1);
    }
}
