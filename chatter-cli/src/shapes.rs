//! Shapes (chatter-rpc's `introspect::shape`) as a person reads them: `Point { x: f64,
//! y: f64 }`, `Figure = Circle { r: f64 } | Square(f64) | Empty`, and a JSON value that
//! fits each.

use chatter_rpc::introspect::shape::{Content, Shape, Variant};
use serde_json::{json, Map, Value};

/// How a value of the type written `ty` looks, in lines: `name: <shape>` first, then the
/// definitions of the structs and enums inside it (indented by two spaces). Empty when the
/// shape says no more than `ty` does (`a: i64`).
pub(crate) fn lines(name: &str, ty: &str, shape: &Shape) -> Vec<String> {
    let head = definition(shape).unwrap_or_else(|| inline(shape));
    let mut nested = Vec::new();
    named_inside(shape, &mut nested);
    let mut seen = vec![own_name(shape)];
    let mut out = Vec::new();
    if head == ty && nested.is_empty() {
        return out;
    }
    out.push(format!("{name}: {head}"));
    for inner in nested {
        let key = own_name(inner);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        if let Some(definition) = definition(inner) {
            out.push(format!("  {definition}"));
        }
    }
    out
}

/// A JSON value that fits `shape` (zeros, empty strings, the first variant), to show what
/// to write; `null` where the shape does not say (a recursive or opaque type).
pub(crate) fn example(shape: &Shape) -> Value {
    match shape {
        Shape::Bool => json!(false),
        Shape::I8
        | Shape::I16
        | Shape::I32
        | Shape::I64
        | Shape::I128
        | Shape::U8
        | Shape::U16
        | Shape::U32
        | Shape::U64
        | Shape::U128 => json!(0),
        Shape::F32 | Shape::F64 => json!(0.0),
        Shape::Char => json!("a"),
        Shape::Str => json!(""),
        Shape::Bytes => json!([]),
        Shape::Option { item } => example(item),
        // A recursive type's sequence: empty, where the recursion ends.
        Shape::Seq { item } => match **item {
            Shape::Ref { .. } | Shape::Opaque { .. } => json!([]),
            _ => json!([example(item)]),
        },
        Shape::Tuple { items } => Value::Array(items.iter().map(example).collect()),
        Shape::Map { key, value } => {
            let key = match example(key) {
                Value::String(s) if !s.is_empty() => s,
                Value::String(_) => "key".to_owned(),
                other => other.to_string(),
            };
            let mut map = Map::new();
            map.insert(key, example(value));
            Value::Object(map)
        }
        Shape::Struct { content, .. } => content_example(content),
        Shape::Enum { variants, .. } => match variants.first() {
            Some(Variant {
                name,
                content: Content::Unit,
                ..
            }) => json!(name),
            Some(v) => {
                let mut map = Map::new();
                map.insert(v.name.clone(), content_example(&v.content));
                Value::Object(map)
            }
            None => Value::Null,
        },
        _ => Value::Null,
    }
}

/// `shape` in one piece, structs and enums by name: `Vec<Point>`, `Option<u64>`.
pub(crate) fn inline(shape: &Shape) -> String {
    match shape {
        Shape::Bool => "bool".into(),
        Shape::I8 => "i8".into(),
        Shape::I16 => "i16".into(),
        Shape::I32 => "i32".into(),
        Shape::I64 => "i64".into(),
        Shape::I128 => "i128".into(),
        Shape::U8 => "u8".into(),
        Shape::U16 => "u16".into(),
        Shape::U32 => "u32".into(),
        Shape::U64 => "u64".into(),
        Shape::U128 => "u128".into(),
        Shape::F32 => "f32".into(),
        Shape::F64 => "f64".into(),
        Shape::Char => "char".into(),
        Shape::Str => "String".into(),
        Shape::Bytes => "bytes".into(),
        Shape::Unit => "()".into(),
        Shape::Option { item } => format!("Option<{}>", inline(item)),
        Shape::Seq { item } => format!("Vec<{}>", inline(item)),
        Shape::Tuple { items } => match items.first() {
            Some(first) if items.len() > 3 && items.iter().all(|i| i == first) => {
                format!("[{}; {}]", inline(first), items.len())
            }
            _ => tuple(items),
        },
        Shape::Map { key, value } => format!("Map<{}, {}>", inline(key), inline(value)),
        Shape::Struct { name, .. }
        | Shape::Enum { name, .. }
        | Shape::Ref { name }
        | Shape::Opaque { name } => name.clone(),
        _ => "?".into(),
    }
}

/// A struct's or enum's definition: `Point { x: f64, y: f64 }`, `Meters(f64)`, `Figure =
/// Circle { r: f64 } | Square(f64) | Empty`; `None` for other shapes.
fn definition(shape: &Shape) -> Option<String> {
    match shape {
        Shape::Struct { name, content } => Some(format!("{name}{}", content_text(content))),
        Shape::Enum { name, variants } => {
            let variants: Vec<String> = variants
                .iter()
                .map(|v| format!("{}{}", v.name, content_text(&v.content)))
                .collect();
            Some(format!("{name} = {}", variants.join(" | ")))
        }
        _ => None,
    }
}

/// What follows a struct's or variant's name: nothing, `(f64)`, `(u32, u32)`, ` { r: f64 }`.
fn content_text(content: &Content) -> String {
    match content {
        Content::Unit => String::new(),
        Content::Newtype { item } => format!("({})", inline(item)),
        Content::Tuple { items } => tuple(items),
        Content::Struct { fields } => {
            let fields: Vec<String> = fields
                .iter()
                .map(|f| format!("{}: {}", f.name, inline(&f.shape)))
                .collect();
            if fields.is_empty() {
                " {}".to_owned()
            } else {
                format!(" {{ {} }}", fields.join(", "))
            }
        }
        _ => "(?)".to_owned(),
    }
}

fn content_example(content: &Content) -> Value {
    match content {
        Content::Unit => Value::Null,
        Content::Newtype { item } => example(item),
        Content::Tuple { items } => Value::Array(items.iter().map(example).collect()),
        Content::Struct { fields } => Value::Object(
            fields
                .iter()
                .map(|f| (f.name.clone(), example(&f.shape)))
                .collect(),
        ),
        _ => Value::Null,
    }
}

fn tuple(items: &[Shape]) -> String {
    let items: Vec<String> = items.iter().map(inline).collect();
    format!("({})", items.join(", "))
}

/// The name of a struct or enum shape (empty for others).
fn own_name(shape: &Shape) -> String {
    match shape {
        Shape::Struct { name, .. } | Shape::Enum { name, .. } => name.clone(),
        _ => String::new(),
    }
}

/// The structs and enums inside `shape` (not `shape` itself), outermost first.
fn named_inside<'a>(shape: &'a Shape, out: &mut Vec<&'a Shape>) {
    let mut visit = |inner: &'a Shape, out: &mut Vec<&'a Shape>| {
        if matches!(inner, Shape::Struct { .. } | Shape::Enum { .. }) {
            out.push(inner);
        }
        named_inside(inner, out);
    };
    match shape {
        Shape::Option { item } | Shape::Seq { item } => visit(item, out),
        Shape::Tuple { items } => items.iter().for_each(|i| visit(i, out)),
        Shape::Map { key, value } => {
            visit(key, out);
            visit(value, out);
        }
        Shape::Struct { content, .. } => content_inside(content, out, &mut visit),
        Shape::Enum { variants, .. } => {
            for v in variants {
                content_inside(&v.content, out, &mut visit);
            }
        }
        _ => {}
    }
}

fn content_inside<'a>(
    content: &'a Content,
    out: &mut Vec<&'a Shape>,
    visit: &mut impl FnMut(&'a Shape, &mut Vec<&'a Shape>),
) {
    match content {
        Content::Newtype { item } => visit(item, out),
        Content::Tuple { items } => items.iter().for_each(|i| visit(i, out)),
        Content::Struct { fields } => fields.iter().for_each(|f| visit(&f.shape, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use chatter_rpc::introspect::shape::trace;
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Point {
        x: f64,
        y: f64,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    enum Figure {
        Circle { r: f64 },
        Square(f64),
        Rect(u32, u32),
        Empty,
        At(Point),
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Line {
        a: Point,
        b: Point,
        tags: Option<Vec<String>>,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Tree {
        children: Vec<Tree>,
    }

    fn shape<T: serde::de::DeserializeOwned>() -> Shape {
        trace::<T>().expect("traced")
    }

    #[test]
    fn structs_and_enums_read_like_rust() {
        assert_eq!(
            lines("p", "Point", &shape::<Point>()),
            ["p: Point { x: f64, y: f64 }"]
        );
        assert_eq!(
            lines("figure", "Figure", &shape::<Figure>()),
            [
                "figure: Figure = Circle { r: f64 } | Square(f64) | Rect(u32, u32) | Empty | At(Point)",
                "  Point { x: f64, y: f64 }"
            ]
        );
        // Each nested definition once.
        assert_eq!(
            lines("line", "Line", &shape::<Line>()),
            [
                "line: Line { a: Point, b: Point, tags: Option<Vec<String>> }",
                "  Point { x: f64, y: f64 }"
            ]
        );
        assert_eq!(
            lines("lines", "Vec<Line>", &shape::<Vec<Line>>()),
            [
                "lines: Vec<Line>",
                "  Line { a: Point, b: Point, tags: Option<Vec<String>> }",
                "  Point { x: f64, y: f64 }"
            ]
        );
        assert_eq!(
            lines("t", "Tree", &shape::<Tree>()),
            ["t: Tree { children: Vec<Tree> }"]
        );
        // Nothing to add to a plain type.
        assert!(lines("a", "i64", &Shape::I64).is_empty());
        assert!(lines("v", "Vec<u8>", &shape::<Vec<u8>>()).is_empty());
        assert_eq!(
            lines("id", "UserId", &Shape::U64),
            ["id: u64"],
            "an alias says what it is"
        );
        assert_eq!(inline(&shape::<[u8; 4]>()), "[u8; 4]");
        assert_eq!(inline(&shape::<(u8, String)>()), "(u8, String)");
    }

    #[test]
    fn examples_fit_the_shape() {
        assert_eq!(example(&shape::<Point>()), json!({"x": 0.0, "y": 0.0}));
        assert_eq!(example(&shape::<Figure>()), json!({"Circle": {"r": 0.0}}));
        assert_eq!(
            example(&shape::<Line>()),
            json!({"a": {"x": 0.0, "y": 0.0}, "b": {"x": 0.0, "y": 0.0}, "tags": [""]})
        );
        assert_eq!(example(&shape::<Tree>()), json!({"children": []}));
        #[derive(Deserialize)]
        #[allow(dead_code)]
        enum Mode {
            Fast,
            Slow(u8),
        }
        assert_eq!(example(&shape::<Mode>()), json!("Fast"));
        assert_eq!(
            example(&shape::<std::collections::BTreeMap<String, u8>>()),
            json!({"key": 0})
        );
    }
}
