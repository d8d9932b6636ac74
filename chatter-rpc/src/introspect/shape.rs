//! Shapes: what a type looks like on the wire, found by tracing its serde `Deserialize`.
//!
//! [`trace`] hands `T::deserialize` a deserializer of its own that answers every request
//! with a sample value (`false`, `0`, `""`, one element, the first unexplored variant) and
//! notes what was requested: `deserialize_f64` is an `f64`, `deserialize_struct("Point",
//! ["x", "y"])` a struct whose fields it then traces, `deserialize_enum` an enum whose every
//! variant it explores by tracing again with that variant chosen (the technique of the
//! serde-reflection crate). The result is the type's [`Shape`]: what serde sends, field
//! names and variant names as they are on the wire (after `#[serde(rename_all)]`), no
//! derive of ours needed.
//!
//! A recursive type refers to itself by name ([`Shape::Ref`]) instead of recursing, and
//! the work is bounded (types nested at most 64 deep, 100 000 requests, 4096 nodes in a
//! shape). Tracing fails, and [`trace`] returns an error, for what it cannot see: a type
//! that rejects the sample values (a `Deserialize` that validates, such as `NonZeroU32`),
//! one that asks for `deserialize_any` (untagged and internally tagged enums, `flatten`,
//! hand-written self-describing deserializers), or one too large. The introspection object
//! then describes the type by its Rust name alone ([`Shape::Opaque`]).
//!
//! ```
//! use chatter_rpc::introspect::shape::{trace, Content, Shape};
//!
//! #[derive(serde::Deserialize)]
//! struct Point { x: f64, y: f64 }
//!
//! let Shape::Struct { name, content: Content::Struct { fields } } = trace::<Point>()? else {
//!     panic!("a struct");
//! };
//! assert_eq!(name, "Point");
//! assert_eq!((&*fields[1].name, &fields[1].shape), ("y", &Shape::F64));
//! # Ok::<(), chatter_rpc::introspect::shape::TraceError>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, EnumAccess, MapAccess, SeqAccess, VariantAccess,
    Visitor,
};
use serde::{Deserialize, Deserializer, Serialize};

/// What a value of a type looks like on the wire, in serde's data model (chatter's
/// MessagePack form of each is in `PROTOCOL.md`, "Values").
///
/// On the wire, a map whose `kind` entry says which variant, with the variant's fields
/// beside it: `{"kind": "f64"}`, `{"kind": "seq", "item": {"kind": "u8"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Shape {
    /// `bool`.
    Bool,
    /// `i8`.
    I8,
    /// `i16`.
    I16,
    /// `i32`.
    I32,
    /// `i64`.
    I64,
    /// `i128`.
    I128,
    /// `u8`.
    U8,
    /// `u16`.
    U16,
    /// `u32`.
    U32,
    /// `u64`.
    U64,
    /// `u128`.
    U128,
    /// `f32`.
    F32,
    /// `f64`.
    F64,
    /// `char`: a string of one character.
    Char,
    /// A string.
    Str,
    /// A byte string (`bytes::Bytes`, `serde_bytes`; a `Vec<u8>` is a [`Shape::Seq`] of
    /// `u8` to serde).
    Bytes,
    /// `()`: nil.
    Unit,
    /// `Option<T>`: nil or the value.
    Option {
        /// `T`.
        item: Box<Shape>,
    },
    /// A sequence of any length (`Vec<T>`, sets).
    Seq {
        /// The elements' shape.
        item: Box<Shape>,
    },
    /// A tuple or fixed-size array: an array of exactly these.
    Tuple {
        /// The elements, in order.
        items: Vec<Shape>,
    },
    /// A map (`HashMap<K, V>`, `BTreeMap<K, V>`).
    Map {
        /// The keys' shape.
        key: Box<Shape>,
        /// The values' shape.
        value: Box<Shape>,
    },
    /// A struct (unit, newtype, tuple or with named fields).
    Struct {
        /// Its name as serde knows it.
        name: String,
        /// What it holds.
        content: Content,
    },
    /// An enum: one of its variants.
    Enum {
        /// Its name as serde knows it.
        name: String,
        /// Every variant that can be received, in declaration order.
        variants: Vec<Variant>,
    },
    /// The struct or enum `name`, described further out in the same shape: a recursive
    /// type.
    Ref {
        /// The type's name.
        name: String,
    },
    /// A type known by its name only: its `Deserialize` could not be traced.
    Opaque {
        /// The type's name (the Rust type as written, in a description).
        name: String,
    },
    /// A shape this version does not know (a newer peer's).
    #[serde(other)]
    Unknown,
}

/// What a struct or an enum variant holds.
///
/// On the wire, a map with a `kind` entry, like [`Shape`]: `{"kind": "unit"}`, `{"kind":
/// "struct", "fields": [..]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Content {
    /// Nothing: `struct Empty;`, `Enum::Empty`.
    Unit,
    /// One value: `struct Meters(f64)`, `Enum::Square(f64)`.
    Newtype {
        /// Its shape.
        item: Box<Shape>,
    },
    /// Values by position: `struct Pair(i64, i64)`, `Enum::Rect(u32, u32)`.
    Tuple {
        /// Their shapes, in order.
        items: Vec<Shape>,
    },
    /// Named fields: `struct Point { x: f64, y: f64 }`, `Enum::Circle { r: f64 }`.
    Struct {
        /// The fields, in declaration order.
        fields: Vec<Field>,
    },
    /// A content this version does not know (a newer peer's), or one the tracer did not
    /// see.
    #[serde(other)]
    Unknown,
}

/// A named field of a [`Content::Struct`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Field {
    /// Its name on the wire.
    pub name: String,
    /// Its shape.
    pub shape: Shape,
}

/// A variant of a [`Shape::Enum`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Variant {
    /// Its name on the wire.
    pub name: String,
    /// What it holds.
    pub content: Content,
}

/// Why [`trace`] could not find a type's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceError(String);

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TraceError {}

impl de::Error for TraceError {
    fn custom<M: fmt::Display>(msg: M) -> Self {
        TraceError(msg.to_string())
    }
}

/// The shape of `T`, traced through its `Deserialize` (see the [module](self) docs).
/// Deterministic: the same type gives the same shape.
pub fn trace<T: DeserializeOwned>() -> Result<Shape, TraceError> {
    let mut session = Session::default();
    let mut root = None;
    let mut explored = 0;
    for _ in 0..MAX_RUNS {
        let mut out = None;
        T::deserialize(Tracer {
            s: &mut session,
            out: &mut out,
            ghost: false,
        })?;
        session.depth = 0;
        // Every run gives the same root: they differ only in the variants chosen, inside
        // the definitions.
        let root = root.get_or_insert(out);
        let now = session.explored();
        if session.complete() {
            let mut budget = MAX_NODES;
            return Ok(session.expand(
                root.as_ref().unwrap_or(&Shape::Unknown),
                &mut Vec::new(),
                &mut budget,
            ));
        }
        if now == explored {
            return Err(TraceError("some enum variants are out of reach".into()));
        }
        explored = now;
    }
    Err(TraceError(format!(
        "more than {MAX_RUNS} enum variants to explore"
    )))
}

/// The shapes of the types of one trait, keyed by the type as written: what a
/// description's `shapes` holds. Generated code adds to it.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct ShapeList(pub(crate) BTreeMap<String, Shape>);

impl ShapeList {
    /// Adds the type written `ty`: its traced shape, or its name alone when `trace` is
    /// `None` or fails.
    pub fn add(&mut self, ty: &str, trace: Option<ShapeFn>) {
        if self.0.contains_key(ty) {
            return;
        }
        let shape = trace
            .and_then(|trace| trace().ok())
            .unwrap_or_else(|| Shape::Opaque {
                name: ty.to_owned(),
            });
        self.0.insert(ty.to_owned(), shape);
    }

    /// Adds the type written `ty`, the variant `part` (`Ok` or `Err`) of the `Result`
    /// that `trace` traces; its name alone when that is not a `Result`.
    pub fn add_part(&mut self, ty: &str, trace: Option<ShapeFn>, part: &str) {
        if self.0.contains_key(ty) {
            return;
        }
        let shape = match trace.and_then(|trace| trace().ok()) {
            Some(Shape::Enum { name, variants }) if name == "Result" => {
                variants.into_iter().find_map(|v| match v.content {
                    Content::Newtype { item } if v.name == part => Some(*item),
                    _ => None,
                })
            }
            _ => None,
        };
        let shape = shape.unwrap_or_else(|| Shape::Opaque {
            name: ty.to_owned(),
        });
        self.0.insert(ty.to_owned(), shape);
    }
}

/// The [`ShapeList`] of one trait, made on first use and kept: a `static` in generated
/// code (a type of ours, so that a wrong `crate` path in `#[remote]` is one error, not one
/// per std type named).
#[doc(hidden)]
#[derive(Debug)]
pub struct ShapeCache(std::sync::OnceLock<ShapeList>);

impl ShapeCache {
    /// An empty cache.
    #[allow(clippy::new_without_default)] // a `const` for a `static`
    pub const fn new() -> Self {
        ShapeCache(std::sync::OnceLock::new())
    }

    /// The list, made by `add` on the first call.
    pub fn get_or_trace(&self, add: impl FnOnce(&mut ShapeList)) -> &ShapeList {
        self.0.get_or_init(|| {
            let mut list = ShapeList::default();
            add(&mut list);
            list
        })
    }
}

/// [`trace`] of one type.
#[doc(hidden)]
pub type ShapeFn = fn() -> Result<Shape, TraceError>;

/// Picks [`trace`] for a `T` that is `DeserializeOwned` and `None` for another, without
/// a bound (generated code writes `(&&ShapeProbe::<T>::NEW).__chatter_shape_fn()`): a type
/// that cannot be received is reported once, where chatter receives it, and not again here.
#[doc(hidden)]
#[derive(Debug)]
pub struct ShapeProbe<T: ?Sized>(PhantomData<fn() -> PhantomData<T>>);

impl<T: ?Sized> ShapeProbe<T> {
    /// The probe.
    pub const NEW: Self = ShapeProbe(PhantomData);
}

/// [`ShapeProbe`] of a receivable type.
#[doc(hidden)]
pub trait ProbeTraced {
    /// `Some(trace::<T>)`.
    fn __chatter_shape_fn(&self) -> Option<ShapeFn>;
}

impl<T: DeserializeOwned> ProbeTraced for &ShapeProbe<T> {
    fn __chatter_shape_fn(&self) -> Option<ShapeFn> {
        Some(trace::<T>)
    }
}

/// [`ShapeProbe`] of any other type.
#[doc(hidden)]
pub trait ProbeUntraced {
    /// `None`.
    fn __chatter_shape_fn(&self) -> Option<ShapeFn>;
}

impl<T: ?Sized> ProbeUntraced for ShapeProbe<T> {
    fn __chatter_shape_fn(&self) -> Option<ShapeFn> {
        None
    }
}

/// Named types nested deeper than this along one path fail the trace.
const MAX_DEPTH: usize = 64;
/// Deserializer calls over all the runs of one trace.
const MAX_STEPS: usize = 100_000;
/// Runs of one trace (each explores at least one more enum variant).
const MAX_RUNS: usize = 1_000;
/// Nodes of one expanded shape; named types beyond it are [`Shape::Opaque`].
const MAX_NODES: usize = 4_096;

/// What the runs of one [`trace`] learned: the definitions of the named types met, and
/// the path of the current run.
#[derive(Default)]
struct Session {
    /// Structs and enums by serde name. Their shapes refer to other named types as
    /// [`Shape::Ref`], expanded at the end.
    defs: BTreeMap<&'static str, Def>,
    /// The named types being traced (not in ghost mode) on the current path.
    stack: Vec<&'static str>,
    /// The enum variants chosen on the current path.
    chosen: Vec<(&'static str, usize)>,
    depth: usize,
    steps: usize,
}

enum Def {
    Struct(Content),
    Enum {
        variants: &'static [&'static str],
        contents: Vec<Option<Content>>,
    },
    /// Two different types of one name (instances of one generic type): shown by name.
    Ambiguous,
}

impl Session {
    fn step(&mut self) -> Result<(), TraceError> {
        self.steps += 1;
        if self.steps > MAX_STEPS {
            return Err(TraceError(format!("more than {MAX_STEPS} steps to trace")));
        }
        Ok(())
    }

    fn enter(&mut self) -> Result<(), TraceError> {
        self.step()?;
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(TraceError(format!(
                "types nested more than {MAX_DEPTH} deep"
            )));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    /// How many enum variants have been explored.
    fn explored(&self) -> usize {
        self.defs
            .values()
            .map(|d| match d {
                Def::Enum { contents, .. } => contents.iter().filter(|c| c.is_some()).count(),
                _ => 0,
            })
            .sum()
    }

    fn complete(&self) -> bool {
        self.defs.values().all(|d| match d {
            Def::Enum { contents, .. } => contents.iter().all(Option::is_some),
            _ => true,
        })
    }

    /// Records the definition of a struct `name`.
    fn define_struct(&mut self, name: &'static str, content: Content) {
        match self.defs.get(name) {
            None => {
                self.defs.insert(name, Def::Struct(content));
            }
            Some(Def::Struct(known)) if *known == content => {}
            Some(_) => {
                self.defs.insert(name, Def::Ambiguous);
            }
        }
    }

    /// The variant of the enum `name` to trace: when recording, the first unexplored one,
    /// else one whose content leads to an enum with unexplored variants; in ghost mode,
    /// one not already chosen on this path, the simplest known first.
    fn choose(
        &mut self,
        name: &'static str,
        variants: &'static [&'static str],
        ghost: bool,
    ) -> Result<usize, TraceError> {
        if variants.is_empty() {
            return Err(TraceError(format!("enum {name} has no variants")));
        }
        if !ghost {
            let def = self.defs.entry(name).or_insert_with(|| Def::Enum {
                variants,
                contents: vec![None; variants.len()],
            });
            match def {
                Def::Enum { contents, .. } if contents.len() == variants.len() => {
                    if let Some(i) = contents.iter().position(Option::is_none) {
                        return Ok(i);
                    }
                    let contents = contents.clone();
                    let reaches = contents.iter().position(|c| {
                        c.as_ref()
                            .is_some_and(|c| self.reaches_incomplete(c, &mut Vec::new()))
                    });
                    return Ok(reaches.unwrap_or(0));
                }
                _ => {
                    self.defs.insert(name, Def::Ambiguous);
                }
            }
        }
        let known = match self.defs.get(name) {
            Some(Def::Enum { contents, .. }) if contents.len() == variants.len() => {
                contents.clone()
            }
            _ => vec![None; variants.len()],
        };
        let free = |i: &usize| !self.chosen.contains(&(name, *i));
        let rank = |i: &usize| match &known[*i] {
            Some(Content::Unit) => 0,
            Some(c) if !has_ref(c) => 1,
            Some(_) => 2,
            None => 3,
        };
        (0..variants.len())
            .filter(free)
            .min_by_key(rank)
            .ok_or_else(|| TraceError(format!("enum {name} has no variant that ends")))
    }

    /// Whether `content` leads to an enum with unexplored variants.
    fn reaches_incomplete(&self, content: &Content, seen: &mut Vec<String>) -> bool {
        content_shapes(content).any(|s| self.shape_reaches_incomplete(s, seen))
    }

    fn shape_reaches_incomplete(&self, shape: &Shape, seen: &mut Vec<String>) -> bool {
        match shape {
            Shape::Ref { name } => {
                if seen.contains(name) {
                    return false;
                }
                seen.push(name.clone());
                match self.defs.get(name.as_str()) {
                    Some(Def::Struct(c)) => self.reaches_incomplete(c, seen),
                    Some(Def::Enum { contents, .. }) => contents.iter().any(|c| match c {
                        None => true,
                        Some(c) => self.reaches_incomplete(c, seen),
                    }),
                    _ => false,
                }
            }
            other => child_shapes(other).any(|s| self.shape_reaches_incomplete(s, seen)),
        }
    }

    /// `shape` with the named types it refers to written out, except those being written
    /// out further out on `path` (left as [`Shape::Ref`]) and those past the node budget
    /// (made [`Shape::Opaque`]).
    fn expand(&self, shape: &Shape, path: &mut Vec<String>, budget: &mut usize) -> Shape {
        *budget = budget.saturating_sub(1);
        match shape {
            Shape::Ref { name } => {
                if path.contains(name) {
                    return shape.clone();
                }
                let opaque = || Shape::Opaque { name: name.clone() };
                if *budget == 0 {
                    return opaque();
                }
                path.push(name.clone());
                let expanded = match self.defs.get(name.as_str()) {
                    Some(Def::Struct(content)) => Shape::Struct {
                        name: name.clone(),
                        content: self.expand_content(content, path, budget),
                    },
                    Some(Def::Enum { variants, contents }) => Shape::Enum {
                        name: name.clone(),
                        variants: variants
                            .iter()
                            .zip(contents)
                            .map(|(variant, content)| Variant {
                                name: (*variant).to_owned(),
                                content: match content {
                                    Some(c) => self.expand_content(c, path, budget),
                                    None => Content::Unknown,
                                },
                            })
                            .collect(),
                    },
                    Some(Def::Ambiguous) | None => opaque(),
                };
                path.pop();
                expanded
            }
            Shape::Option { item } => Shape::Option {
                item: Box::new(self.expand(item, path, budget)),
            },
            Shape::Seq { item } => Shape::Seq {
                item: Box::new(self.expand(item, path, budget)),
            },
            Shape::Tuple { items } => Shape::Tuple {
                items: items.iter().map(|s| self.expand(s, path, budget)).collect(),
            },
            Shape::Map { key, value } => Shape::Map {
                key: Box::new(self.expand(key, path, budget)),
                value: Box::new(self.expand(value, path, budget)),
            },
            other => other.clone(),
        }
    }

    fn expand_content(
        &self,
        content: &Content,
        path: &mut Vec<String>,
        budget: &mut usize,
    ) -> Content {
        match content {
            Content::Newtype { item } => Content::Newtype {
                item: Box::new(self.expand(item, path, budget)),
            },
            Content::Tuple { items } => Content::Tuple {
                items: items.iter().map(|s| self.expand(s, path, budget)).collect(),
            },
            Content::Struct { fields } => Content::Struct {
                fields: fields
                    .iter()
                    .map(|f| Field {
                        name: f.name.clone(),
                        shape: self.expand(&f.shape, path, budget),
                    })
                    .collect(),
            },
            other => other.clone(),
        }
    }
}

/// The shapes directly inside `shape`.
fn child_shapes(shape: &Shape) -> Box<dyn Iterator<Item = &Shape> + '_> {
    match shape {
        Shape::Option { item } | Shape::Seq { item } => Box::new(std::iter::once(&**item)),
        Shape::Tuple { items } => Box::new(items.iter()),
        Shape::Map { key, value } => Box::new([&**key, &**value].into_iter()),
        Shape::Struct { content, .. } => content_shapes(content),
        Shape::Enum { variants, .. } => {
            Box::new(variants.iter().flat_map(|v| content_shapes(&v.content)))
        }
        _ => Box::new(std::iter::empty()),
    }
}

/// The shapes directly inside `content`.
fn content_shapes(content: &Content) -> Box<dyn Iterator<Item = &Shape> + '_> {
    match content {
        Content::Newtype { item } => Box::new(std::iter::once(&**item)),
        Content::Tuple { items } => Box::new(items.iter()),
        Content::Struct { fields } => Box::new(fields.iter().map(|f| &f.shape)),
        _ => Box::new(std::iter::empty()),
    }
}

/// Whether `content` refers to a named type (anywhere inside).
fn has_ref(content: &Content) -> bool {
    fn shape_has_ref(shape: &Shape) -> bool {
        matches!(shape, Shape::Ref { .. }) || child_shapes(shape).any(shape_has_ref)
    }
    content_shapes(content).any(shape_has_ref)
}

/// The deserializer handed to a type's `Deserialize`: answers each request with a sample
/// and writes what was requested to `out`. In ghost mode (inside a recursive type, whose
/// shape is already being recorded further out) it records nothing and answers with the
/// smallest value: no elements, `None`, a variant that ends.
struct Tracer<'a> {
    s: &'a mut Session,
    out: &'a mut Option<Shape>,
    ghost: bool,
}

impl Tracer<'_> {
    fn record(&mut self, shape: Shape) -> Result<(), TraceError> {
        self.s.step()?;
        if !self.ghost {
            *self.out = Some(shape);
        }
        Ok(())
    }

    /// Traces the struct or enum `name` with `f`, which gets whether it is in ghost
    /// mode: in ghost mode too if `name` is being recorded further out (a recursive type).
    /// Records a [`Shape::Ref`] to it.
    fn named<R>(
        self,
        name: &'static str,
        f: impl FnOnce(&mut Session, bool) -> Result<R, TraceError>,
    ) -> Result<R, TraceError> {
        let Tracer { s, out, ghost } = self;
        s.enter()?;
        let inner = ghost || s.stack.contains(&name);
        if !ghost {
            *out = Some(Shape::Ref {
                name: name.to_owned(),
            });
        }
        if !inner {
            s.stack.push(name);
        }
        let result = f(&mut *s, inner);
        if !inner {
            s.stack.pop();
        }
        s.leave();
        result
    }

    /// Traces a struct `name` whose content `f` traces into its slot.
    fn structure<R>(
        self,
        name: &'static str,
        f: impl FnOnce(&mut Session, bool, &mut Option<Content>) -> Result<R, TraceError>,
    ) -> Result<R, TraceError> {
        self.named(name, |s, ghost| {
            let mut content = None;
            let result = f(s, ghost, &mut content);
            if let (false, Some(content)) = (ghost, content) {
                s.define_struct(name, content);
            }
            result
        })
    }
}

/// `visitor.visit_seq` with `len` elements traced into `slots`.
fn visit_elements<'de, V: Visitor<'de>>(
    s: &mut Session,
    ghost: bool,
    len: usize,
    slots: &mut Vec<Option<Shape>>,
    visitor: V,
) -> Result<V::Value, TraceError> {
    s.enter()?;
    let result = visitor.visit_seq(Elements {
        s: &mut *s,
        ghost,
        remaining: len,
        slots,
    });
    s.leave();
    result
}

/// `visitor.visit_map` with `fields`, their values traced into `slots`.
fn visit_fields<'de, V: Visitor<'de>>(
    s: &mut Session,
    ghost: bool,
    fields: &'static [&'static str],
    slots: &mut Vec<Option<Shape>>,
    visitor: V,
) -> Result<V::Value, TraceError> {
    s.enter()?;
    let result = visitor.visit_map(Fields {
        s: &mut *s,
        ghost,
        fields,
        next: 0,
        slots,
    });
    s.leave();
    result
}

fn or_unknown(slot: Option<Shape>) -> Shape {
    slot.unwrap_or(Shape::Unknown)
}

fn tuple_content(slots: Vec<Option<Shape>>) -> Content {
    Content::Tuple {
        items: slots.into_iter().map(or_unknown).collect(),
    }
}

fn struct_content(fields: &[&str], slots: Vec<Option<Shape>>) -> Content {
    Content::Struct {
        fields: fields
            .iter()
            .zip(slots.into_iter().chain(std::iter::repeat(None)))
            .map(|(name, slot)| Field {
                name: (*name).to_owned(),
                shape: or_unknown(slot),
            })
            .collect(),
    }
}

macro_rules! primitives {
    ($($method:ident => $shape:ident, $visit:ident($($sample:expr)?);)*) => {$(
        fn $method<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
            self.record(Shape::$shape)?;
            visitor.$visit($($sample)?)
        }
    )*};
}

impl<'de> Deserializer<'de> for Tracer<'_> {
    type Error = TraceError;

    primitives! {
        deserialize_bool => Bool, visit_bool(false);
        deserialize_i8 => I8, visit_i8(0);
        deserialize_i16 => I16, visit_i16(0);
        deserialize_i32 => I32, visit_i32(0);
        deserialize_i64 => I64, visit_i64(0);
        deserialize_i128 => I128, visit_i128(0);
        deserialize_u8 => U8, visit_u8(0);
        deserialize_u16 => U16, visit_u16(0);
        deserialize_u32 => U32, visit_u32(0);
        deserialize_u64 => U64, visit_u64(0);
        deserialize_u128 => U128, visit_u128(0);
        deserialize_f32 => F32, visit_f32(0.0);
        deserialize_f64 => F64, visit_f64(0.0);
        deserialize_char => Char, visit_char('a');
        deserialize_str => Str, visit_str("");
        deserialize_string => Str, visit_str("");
        deserialize_identifier => Str, visit_str("");
        deserialize_bytes => Bytes, visit_bytes(&[]);
        deserialize_byte_buf => Bytes, visit_bytes(&[]);
        deserialize_unit => Unit, visit_unit();
    }

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, TraceError> {
        Err(TraceError(
            "the type decides by what arrives (deserialize_any: an untagged or internally \
             tagged enum, flatten, or a self-describing Deserialize)"
                .into(),
        ))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        if self.ghost {
            self.s.step()?;
            return visitor.visit_none();
        }
        self.s.enter()?;
        let mut item = None;
        let result = visitor.visit_some(Tracer {
            s: &mut *self.s,
            out: &mut item,
            ghost: false,
        });
        self.s.leave();
        *self.out = Some(Shape::Option {
            item: Box::new(or_unknown(item)),
        });
        result
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        let mut slots = Vec::new();
        let len = if self.ghost { 0 } else { 1 };
        let result = visit_elements(self.s, self.ghost, len, &mut slots, visitor);
        if !self.ghost {
            *self.out = Some(Shape::Seq {
                item: Box::new(or_unknown(slots.into_iter().next().flatten())),
            });
        }
        result
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        let mut slots = Vec::new();
        let result = visit_elements(self.s, self.ghost, len, &mut slots, visitor);
        if !self.ghost {
            slots.resize(len, None);
            *self.out = Some(Shape::Tuple {
                items: slots.into_iter().map(or_unknown).collect(),
            });
        }
        result
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        self.s.enter()?;
        let (mut key, mut value) = (None, None);
        let result = visitor.visit_map(Entry {
            s: &mut *self.s,
            ghost: self.ghost,
            done: self.ghost,
            key: &mut key,
            value: &mut value,
        });
        self.s.leave();
        if !self.ghost {
            *self.out = Some(Shape::Map {
                key: Box::new(or_unknown(key)),
                value: Box::new(or_unknown(value)),
            });
        }
        result
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.structure(name, |_, _, content| {
            *content = Some(Content::Unit);
            visitor.visit_unit()
        })
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.structure(name, |s, ghost, content| {
            let mut item = None;
            let result = visitor.visit_newtype_struct(Tracer {
                s,
                out: &mut item,
                ghost,
            });
            *content = Some(Content::Newtype {
                item: Box::new(or_unknown(item)),
            });
            result
        })
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.structure(name, |s, ghost, content| {
            let mut slots = Vec::new();
            let result = visit_elements(s, ghost, len, &mut slots, visitor);
            slots.resize(len, None);
            *content = Some(tuple_content(slots));
            result
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.structure(name, |s, ghost, content| {
            let mut slots = Vec::new();
            let result = visit_fields(s, ghost, fields, &mut slots, visitor);
            *content = Some(struct_content(fields, slots));
            result
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.named(name, |s, ghost| {
            let index = s.choose(name, variants, ghost)?;
            s.chosen.push((name, index));
            let mut content = None;
            let result = visitor.visit_enum(Choice {
                s: &mut *s,
                ghost,
                variant: variants[index],
                content: &mut content,
            });
            s.chosen.pop();
            if let (false, Some(content)) = (ghost, content) {
                if let Some(Def::Enum { contents, .. }) = s.defs.get_mut(name) {
                    match &contents[index] {
                        None => contents[index] = Some(content),
                        Some(known) if *known == content => {}
                        Some(_) => {
                            s.defs.insert(name, Def::Ambiguous);
                        }
                    }
                }
            }
            result
        })
    }

    fn is_human_readable(&self) -> bool {
        // As chatter's MessagePack decoder: types with two forms take their compact one.
        false
    }
}

/// The elements of a sequence or tuple.
struct Elements<'a> {
    s: &'a mut Session,
    ghost: bool,
    remaining: usize,
    slots: &'a mut Vec<Option<Shape>>,
}

impl<'de> SeqAccess<'de> for Elements<'_> {
    type Error = TraceError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, TraceError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        self.remaining -= 1;
        self.slots.push(None);
        let out = self
            .slots
            .last_mut()
            .ok_or_else(|| TraceError("no slot".into()))?;
        seed.deserialize(Tracer {
            s: &mut *self.s,
            out,
            ghost: self.ghost,
        })
        .map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.remaining)
    }
}

/// The fields of a struct, as a map keyed by field name (chatter's form of a struct).
struct Fields<'a> {
    s: &'a mut Session,
    ghost: bool,
    fields: &'static [&'static str],
    next: usize,
    slots: &'a mut Vec<Option<Shape>>,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = TraceError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, TraceError> {
        match self.fields.get(self.next) {
            Some(field) => seed.deserialize(Name(field)).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<T::Value, TraceError> {
        self.next += 1;
        self.slots.push(None);
        let out = self
            .slots
            .last_mut()
            .ok_or_else(|| TraceError("no slot".into()))?;
        seed.deserialize(Tracer {
            s: &mut *self.s,
            out,
            ghost: self.ghost,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.fields.len() - self.next.min(self.fields.len()))
    }
}

/// The one entry of a map (none in ghost mode).
struct Entry<'a> {
    s: &'a mut Session,
    ghost: bool,
    done: bool,
    key: &'a mut Option<Shape>,
    value: &'a mut Option<Shape>,
}

impl<'de> MapAccess<'de> for Entry<'_> {
    type Error = TraceError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, TraceError> {
        if self.done {
            return Ok(None);
        }
        self.done = true;
        seed.deserialize(Tracer {
            s: &mut *self.s,
            out: &mut *self.key,
            ghost: self.ghost,
        })
        .map(Some)
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<T::Value, TraceError> {
        seed.deserialize(Tracer {
            s: &mut *self.s,
            out: &mut *self.value,
            ghost: self.ghost,
        })
    }
}

/// The variant chosen for an enum.
struct Choice<'a> {
    s: &'a mut Session,
    ghost: bool,
    variant: &'static str,
    content: &'a mut Option<Content>,
}

impl<'de, 'a> EnumAccess<'de> for Choice<'a> {
    type Error = TraceError;
    type Variant = Self;

    fn variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<(T::Value, Self), TraceError> {
        let value = seed.deserialize(Name(self.variant))?;
        Ok((value, self))
    }
}

impl<'de> VariantAccess<'de> for Choice<'_> {
    type Error = TraceError;

    fn unit_variant(self) -> Result<(), TraceError> {
        *self.content = Some(Content::Unit);
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, TraceError> {
        let mut item = None;
        let result = seed.deserialize(Tracer {
            s: self.s,
            out: &mut item,
            ghost: self.ghost,
        });
        *self.content = Some(Content::Newtype {
            item: Box::new(or_unknown(item)),
        });
        result
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        let mut slots = Vec::new();
        let result = visit_elements(self.s, self.ghost, len, &mut slots, visitor);
        slots.resize(len, None);
        *self.content = Some(tuple_content(slots));
        result
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        let mut slots = Vec::new();
        let result = visit_fields(self.s, self.ghost, fields, &mut slots, visitor);
        *self.content = Some(struct_content(fields, slots));
        result
    }
}

/// A field or variant name, as the identifier visitor of a derived `Deserialize` takes it.
struct Name(&'static str);

impl<'de> Deserializer<'de> for Name {
    type Error = TraceError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        visitor.visit_str(self.0)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn field(name: &str, shape: Shape) -> Field {
        Field {
            name: name.into(),
            shape,
        }
    }

    fn fields(fields: Vec<Field>) -> Content {
        Content::Struct { fields }
    }

    fn named(name: &str, content: Content) -> Shape {
        Shape::Struct {
            name: name.into(),
            content,
        }
    }

    fn variant(name: &str, content: Content) -> Variant {
        Variant {
            name: name.into(),
            content,
        }
    }

    fn boxed(shape: Shape) -> Box<Shape> {
        Box::new(shape)
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Point {
        x: f64,
        y: f64,
    }

    fn point() -> Shape {
        named(
            "Point",
            fields(vec![field("x", Shape::F64), field("y", Shape::F64)]),
        )
    }

    #[test]
    fn primitives_with_their_width() {
        assert_eq!(trace::<bool>(), Ok(Shape::Bool));
        assert_eq!(trace::<i8>(), Ok(Shape::I8));
        assert_eq!(trace::<u16>(), Ok(Shape::U16));
        assert_eq!(trace::<i64>(), Ok(Shape::I64));
        assert_eq!(trace::<u128>(), Ok(Shape::U128));
        assert_eq!(trace::<f32>(), Ok(Shape::F32));
        assert_eq!(trace::<char>(), Ok(Shape::Char));
        assert_eq!(trace::<String>(), Ok(Shape::Str));
        assert_eq!(trace::<()>(), Ok(Shape::Unit));
        assert_eq!(trace::<bytes::Bytes>(), Ok(Shape::Bytes));
        assert_eq!(
            trace::<(u8, String)>(),
            Ok(Shape::Tuple {
                items: vec![Shape::U8, Shape::Str]
            })
        );
    }

    #[test]
    fn structs_with_their_fields() {
        assert_eq!(trace::<Point>(), Ok(point()));

        #[derive(Deserialize)]
        struct Unit;
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Meters(f64);
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Pair(i32, Point);
        assert_eq!(trace::<Unit>(), Ok(named("Unit", Content::Unit)));
        assert_eq!(
            trace::<Meters>(),
            Ok(named(
                "Meters",
                Content::Newtype {
                    item: boxed(Shape::F64)
                }
            ))
        );
        assert_eq!(
            trace::<Pair>(),
            Ok(named(
                "Pair",
                Content::Tuple {
                    items: vec![Shape::I32, point()]
                }
            ))
        );
    }

    #[test]
    fn option_vec_and_hashmap() {
        assert_eq!(
            trace::<Option<Point>>(),
            Ok(Shape::Option {
                item: boxed(point())
            })
        );
        assert_eq!(
            trace::<Vec<Option<u32>>>(),
            Ok(Shape::Seq {
                item: boxed(Shape::Option {
                    item: boxed(Shape::U32)
                })
            })
        );
        assert_eq!(
            trace::<HashMap<String, Vec<Point>>>(),
            Ok(Shape::Map {
                key: boxed(Shape::Str),
                value: boxed(Shape::Seq {
                    item: boxed(point())
                })
            })
        );
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    enum Inner {
        A,
        B(u8),
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    enum Figure {
        Circle { r: f64 },
        Square(f64),
        Rect(u32, u32),
        Empty,
        Nested(Inner),
    }

    #[test]
    fn enums_with_every_variant_of_each_kind_nested_too() {
        let inner = Shape::Enum {
            name: "Inner".into(),
            variants: vec![
                variant("A", Content::Unit),
                variant(
                    "B",
                    Content::Newtype {
                        item: boxed(Shape::U8),
                    },
                ),
            ],
        };
        let figure = Shape::Enum {
            name: "Figure".into(),
            variants: vec![
                variant("Circle", fields(vec![field("r", Shape::F64)])),
                variant(
                    "Square",
                    Content::Newtype {
                        item: boxed(Shape::F64),
                    },
                ),
                variant(
                    "Rect",
                    Content::Tuple {
                        items: vec![Shape::U32, Shape::U32],
                    },
                ),
                variant("Empty", Content::Unit),
                variant(
                    "Nested",
                    Content::Newtype {
                        item: boxed(inner.clone()),
                    },
                ),
            ],
        };
        assert_eq!(trace::<Figure>(), Ok(figure.clone()));
        // An enum reached only through a variant of another, and one met twice in a run.
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Two {
            a: Figure,
            b: Vec<Figure>,
        }
        assert_eq!(
            trace::<Two>(),
            Ok(named(
                "Two",
                fields(vec![
                    field("a", figure.clone()),
                    field(
                        "b",
                        Shape::Seq {
                            item: boxed(figure)
                        }
                    )
                ])
            ))
        );
        // Deterministic.
        assert_eq!(trace::<Two>(), trace::<Two>());
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    enum List {
        Cons(u32, Box<List>),
        Nil,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Tree {
        value: i64,
        children: Vec<Tree>,
        parent: Option<Box<Tree>>,
    }

    #[test]
    fn recursive_types_refer_to_themselves() {
        let list_ref = Shape::Ref {
            name: "List".into(),
        };
        assert_eq!(
            trace::<List>(),
            Ok(Shape::Enum {
                name: "List".into(),
                variants: vec![
                    variant(
                        "Cons",
                        Content::Tuple {
                            items: vec![Shape::U32, list_ref]
                        }
                    ),
                    variant("Nil", Content::Unit),
                ],
            })
        );
        let tree_ref = || Shape::Ref {
            name: "Tree".into(),
        };
        assert_eq!(
            trace::<Vec<Tree>>(),
            Ok(Shape::Seq {
                item: boxed(named(
                    "Tree",
                    fields(vec![
                        field("value", Shape::I64),
                        field(
                            "children",
                            Shape::Seq {
                                item: boxed(tree_ref())
                            }
                        ),
                        field(
                            "parent",
                            Shape::Option {
                                item: boxed(tree_ref())
                            }
                        ),
                    ])
                ))
            })
        );
        // A type with no value at all: no shape, and no endless loop.
        #[derive(Deserialize)]
        #[allow(dead_code)]
        enum Endless {
            More(Box<Endless>),
        }
        assert!(trace::<Endless>().is_err());
    }

    #[test]
    fn rename_all_shows_wire_names() {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        #[allow(dead_code)]
        struct Job {
            job_id: u64,
            #[serde(rename = "when")]
            run_at: String,
            kind: JobKind,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        #[allow(dead_code)]
        enum JobKind {
            RunOnce,
            RunEvery { every_secs: u32 },
        }
        assert_eq!(
            trace::<Job>(),
            Ok(named(
                "Job",
                fields(vec![
                    field("jobId", Shape::U64),
                    field("when", Shape::Str),
                    field(
                        "kind",
                        Shape::Enum {
                            name: "JobKind".into(),
                            variants: vec![
                                variant("RUN_ONCE", Content::Unit),
                                variant("RUN_EVERY", fields(vec![field("every_secs", Shape::U32)])),
                            ]
                        }
                    ),
                ])
            ))
        );
    }

    /// An email address: refuses a string without `@`.
    #[derive(Debug)]
    struct Email(#[allow(dead_code)] String);

    impl<'de> Deserialize<'de> for Email {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let s = String::deserialize(d)?;
            if s.contains('@') {
                Ok(Email(s))
            } else {
                Err(de::Error::custom("not an email address"))
            }
        }
    }

    #[test]
    fn what_cannot_be_traced_is_an_error_not_a_panic() {
        assert_eq!(
            trace::<Email>(),
            Err(TraceError("not an email address".into()))
        );
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Contact {
            name: String,
            email: Email,
        }
        assert!(trace::<Contact>().is_err());
        assert!(trace::<std::num::NonZeroU32>().is_err());
        #[derive(Deserialize)]
        #[serde(untagged)]
        #[allow(dead_code)]
        enum Either {
            A(u8),
            B(String),
        }
        let err = trace::<Either>().unwrap_err();
        assert!(err.to_string().contains("deserialize_any"), "{err}");
        // The description falls back to the name as written.
        let mut list = ShapeList::default();
        list.add("Email", Some(trace::<Email>));
        list.add("Point", Some(trace::<Point>));
        list.add("Point", None);
        list.add("NotSerde", None);
        assert_eq!(
            list.0.into_iter().collect::<Vec<_>>(),
            [
                (
                    "Email".to_owned(),
                    Shape::Opaque {
                        name: "Email".into()
                    }
                ),
                (
                    "NotSerde".to_owned(),
                    Shape::Opaque {
                        name: "NotSerde".into()
                    }
                ),
                ("Point".to_owned(), point()),
            ]
        );
    }

    #[test]
    fn generic_instances_of_one_name_are_not_confused() {
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Page<T> {
            items: Vec<T>,
        }
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Both {
            numbers: Page<u32>,
            names: Page<String>,
        }
        let page = Shape::Opaque {
            name: "Page".into(),
        };
        assert_eq!(
            trace::<Both>(),
            Ok(named(
                "Both",
                fields(vec![field("numbers", page.clone()), field("names", page)])
            ))
        );
    }

    #[test]
    fn large_and_deep_types_are_bounded() {
        // 2^12 leaves if written out: the node budget cuts it, deterministically.
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct L0(f64, f64);
        macro_rules! level {
            ($name:ident, $inner:ident) => {
                #[derive(Deserialize)]
                #[allow(dead_code)]
                struct $name($inner, $inner);
            };
        }
        level!(L1, L0);
        level!(L2, L1);
        level!(L3, L2);
        level!(L4, L3);
        level!(L5, L4);
        level!(L6, L5);
        level!(L7, L6);
        level!(L8, L7);
        level!(L9, L8);
        level!(L10, L9);
        level!(L11, L10);
        let shape = trace::<L11>().expect("traced");
        fn nodes(shape: &Shape) -> usize {
            1 + child_shapes(shape).map(nodes).sum::<usize>()
        }
        assert!(nodes(&shape) <= 2 * MAX_NODES, "{}", nodes(&shape));
        assert!(format!("{shape:?}").contains("Opaque"));
        assert_eq!(trace::<L11>(), Ok(shape));
        // Deeper than the depth bound (72 nested sequences): an error, not a stack
        // overflow.
        macro_rules! deeper {
            ($name:ident, $inner:ty) => {
                type $name = Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<$inner>>>>>>>>;
            };
        }
        deeper!(D1, u8);
        deeper!(D2, D1);
        deeper!(D3, D2);
        deeper!(D4, D3);
        deeper!(D5, D4);
        deeper!(D6, D5);
        deeper!(D7, D6);
        deeper!(D8, D7);
        deeper!(D9, D8);
        assert!(trace::<D7>().is_ok());
        let err = trace::<D9>().unwrap_err();
        assert!(err.to_string().contains("nested more than 64"), "{err}");
    }

    #[test]
    fn shapes_round_trip_through_the_wire() {
        let shape = trace::<(Figure, Option<Tree>, HashMap<String, Point>)>().expect("traced");
        let bytes = crate::wire::encode_ok(&shape).expect("encode");
        let crate::wire::Reply::Ok(value) = crate::wire::decode_reply(&bytes).expect("reply")
        else {
            panic!("not ok");
        };
        let back: Shape = crate::wire::decode_value(value).expect("decodes");
        assert_eq!(back, shape);
        // A newer peer's kinds read as unknown.
        #[derive(Serialize)]
        struct Newer {
            kind: &'static str,
            extra: u8,
        }
        let bytes = crate::wire::encode_ok(&vec![Newer {
            kind: "decimal",
            extra: 1,
        }])
        .expect("encode");
        let crate::wire::Reply::Ok(value) = crate::wire::decode_reply(&bytes).expect("reply")
        else {
            panic!("not ok");
        };
        let back: Vec<Shape> = crate::wire::decode_value(value).expect("decodes");
        assert_eq!(back, [Shape::Unknown]);
    }
}
