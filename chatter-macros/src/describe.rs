//! The static description of a remote trait (chatter-rpc's `introspect` module):
//! `{Trait}Server`'s `Service::description`, a `static` built at compile time from the
//! model: names, doc comments, argument names and types as written, return and error
//! types, signal options, stream item types; and `Service::__shapes`, which traces the
//! serde shape of each of those types when first asked (chatter-rpc's `introspect::shape`).

use proc_macro2::{Delimiter, Spacing, TokenStream, TokenTree};
use quote::{quote, ToTokens};
use syn::ext::IdentExt;
use syn::{Attribute, Expr, Lit, Meta, Pat, Type};

use crate::ast::{Method, Output, Trait};

/// `fn description(&self) -> Option<&'static InterfaceDescription>` of the server's
/// `Service` impl.
pub(crate) fn description_fn(tr: &Trait) -> TokenStream {
    let krate = &tr.krate;
    let p = quote!(#krate::__private);
    let name = tr.ident.unraw().to_string();
    let docs = docs(&tr.attrs);
    let methods: Vec<_> = tr.methods.iter().map(|m| method(&p, m)).collect();
    let methods = static_slice(quote!(#p::MethodDescription), &methods);
    quote! {
        fn description(&self) -> #p::Option<&'static #p::InterfaceDescription> {
            static __DESCRIPTION: #p::InterfaceDescription =
                #p::describe_interface(#name, #docs, #methods);
            #p::Some(&__DESCRIPTION)
        }
    }
}

/// `&[items..]` as a `'static` slice: a `static` of its own, since values with a
/// destructor (owned `Cow`s, though never owned here) are not promoted to `'static`.
fn static_slice(ty: TokenStream, items: &[TokenStream]) -> TokenStream {
    let len = items.len();
    quote!({
        static __ITEMS: [#ty; #len] = [#(#items),*];
        &__ITEMS
    })
}

fn method(p: &TokenStream, m: &Method) -> TokenStream {
    let name = m.ident.unraw().to_string();
    let docs = docs(&m.attrs);
    let args: Vec<_> = m
        .args
        .iter()
        .map(|a| {
            let (name, ty) = (pattern_name(&a.pat), type_name(&a.ty));
            match &a.stream {
                Some(item) => {
                    let item = type_name(item);
                    quote!(#p::describe_stream_arg(#name, #ty, #item))
                }
                None => quote!(#p::describe_arg(#name, #ty)),
            }
        })
        .collect();
    let args = static_slice(quote!(#p::ArgDescription), &args);
    if let Some(signal) = m.signal {
        let ttl = match signal.ttl_ms {
            Some(ms) => quote!(#p::Some(#ms)),
            None => quote!(#p::None),
        };
        let persistent = signal.persistent;
        return quote!(#p::describe_signal(#name, #docs, #args, #ttl, #persistent));
    }
    let (returns, error) = returns_and_error(m);
    let error = match error {
        Some(error) => quote!(#p::Some(#error)),
        None => quote!(#p::None),
    };
    let idempotent = m.idempotent.is_some();
    if m.result_stream.is_some() || m.args.iter().any(|a| a.stream.is_some()) {
        let item = match &m.result_stream {
            Some(item) => {
                let item = type_name(item);
                quote!(#p::Some(#item))
            }
            None => quote!(#p::None),
        };
        return quote!(#p::describe_stream(
            #name, #docs, #args, #returns, #error, #idempotent, #item
        ));
    }
    quote!(#p::describe_call(#name, #docs, #args, #returns, #error, #idempotent))
}

/// A call's `returns` and `error` as the description writes them.
fn returns_and_error(m: &Method) -> (String, Option<String>) {
    match (&m.output, &m.return_type) {
        (Output::Unit, _) => ("()".to_owned(), None),
        (Output::Plain(ty), _) => (type_name(ty), None),
        // `#[result]` on an alias: its parts named through the alias, as the reader wrote it.
        (Output::Result { ok, .. }, Some(written)) if is_qualified(ok) => {
            let written = type_name(written);
            (
                format!("<{written} as Result>::Ok"),
                Some(format!("<{written} as Result>::Err")),
            )
        }
        (Output::Result { ok, err }, _) => (type_name(ok), Some(type_name(err))),
    }
}

/// `fn __shapes(&self)` of the server's `Service` impl: the shape of each type the
/// description names (keyed by the name it has there), traced on the first call and kept
/// in a `static` (per trait, not per peer). Each type goes through a `ShapeProbe`, which
/// picks the tracer for a `DeserializeOwned` type and nothing for another: a type that
/// cannot be received is reported once, where it is received, and not again here.
pub(crate) fn shapes_fn(tr: &Trait) -> TokenStream {
    let krate = &tr.krate;
    let p = quote!(#krate::__private);
    let mut seen = std::collections::HashSet::new();
    let adds: Vec<_> = tr
        .methods
        .iter()
        .flat_map(described_types)
        .filter(|t| seen.insert(t.name.clone()))
        .map(|Described { name, ty, part }| {
            let probe = quote!((&&#p::ShapeProbe::<#ty>::NEW).__chatter_shape_fn());
            match part {
                Some(part) => quote!(__shapes.add_part(#name, #probe, #part);),
                None => quote!(__shapes.add(#name, #probe);),
            }
        })
        .collect();
    quote! {
        fn __shapes(&self) -> #p::Option<&'static #p::ShapeList> {
            static __SHAPES: #p::ShapeCache = #p::ShapeCache::new();
            #p::Some(__SHAPES.get_or_trace(|__shapes| {
                #[allow(unused_imports)]
                use #p::{ProbeTraced as _, ProbeUntraced as _};
                #(#adds)*
            }))
        }
    }
}

/// A type a description names, and how to trace it.
struct Described {
    /// The name the description gives it.
    name: String,
    /// The type to trace.
    ty: TokenStream,
    /// `Some("Ok")` or `Some("Err")`: the named type is that part of the `Result` `ty`
    /// (a `#[result]` alias, whose parts are traced through the alias as written, so that
    /// an alias that is not a `Result` is reported once, by the server, and not here too).
    part: Option<&'static str>,
}

/// The types a method's description names, with those names: each argument's (an
/// argument stream's item), the return type (a returned stream's item instead), the error.
fn described_types(m: &Method) -> Vec<Described> {
    let plain = |name: String, ty: TokenStream| Described {
        name,
        ty,
        part: None,
    };
    let mut types: Vec<Described> = m
        .args
        .iter()
        .map(|a| {
            let ty = a.stream.as_ref().unwrap_or(&a.ty);
            plain(type_name(ty), ty.to_token_stream())
        })
        .collect();
    if m.signal.is_some() {
        types.push(plain("()".to_owned(), quote!(())));
        return types;
    }
    let (returns, error) = returns_and_error(m);
    match (&m.output, &m.result_stream, &m.return_type) {
        (_, Some(item), _) => types.push(plain(type_name(item), item.to_token_stream())),
        (Output::Unit, None, _) => types.push(plain(returns, quote!(()))),
        (Output::Plain(ty), None, _) => types.push(plain(returns, ty.to_token_stream())),
        (Output::Result { ok, .. }, None, Some(written)) if is_qualified(ok) => {
            types.push(Described {
                name: returns,
                ty: written.to_token_stream(),
                part: Some("Ok"),
            })
        }
        (Output::Result { ok, .. }, None, _) => types.push(plain(returns, ok.to_token_stream())),
    }
    match (&m.output, error, &m.return_type) {
        (Output::Result { err, .. }, Some(error), Some(written)) if is_qualified(err) => types
            .push(Described {
                name: error,
                ty: written.to_token_stream(),
                part: Some("Err"),
            }),
        (Output::Result { err, .. }, Some(error), _) => {
            types.push(plain(error, err.to_token_stream()))
        }
        _ => {}
    }
    types
}

fn is_qualified(ty: &Type) -> bool {
    matches!(ty, Type::Path(p) if p.qself.is_some())
}

/// The doc comment in `attrs` (`#[doc = ".."]` lines), as rustdoc reads it: one leading
/// space of each line dropped, lines joined, outer blank lines trimmed. Docs that are not
/// string literals (`#[doc = include_str!(..)]`) are left out.
fn docs(attrs: &[Attribute]) -> String {
    let lines: Vec<String> = attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .filter_map(|a| match &a.meta {
            Meta::NameValue(nv) => match &nv.value {
                Expr::Lit(lit) => match &lit.lit {
                    Lit::Str(s) => Some(s.value()),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        })
        .flat_map(|doc| {
            doc.split('\n')
                .map(|line| line.strip_prefix(' ').unwrap_or(line).trim_end().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    lines.join("\n").trim_matches('\n').to_owned()
}

/// An argument's name: the identifier of `name: T` or `mut name: T`, else the pattern as
/// written (`_`, `(a, b)`).
fn pattern_name(pat: &Pat) -> String {
    match pat {
        Pat::Ident(p) if p.subpat.is_none() => p.ident.unraw().to_string(),
        other => tokens_text(other.to_token_stream()),
    }
}

/// A type as a person writes it: `Vec<u8>`, `Option<(i64, String)>`, `[u8; 4]`.
pub(crate) fn type_name(ty: &Type) -> String {
    tokens_text(ty.to_token_stream())
}

/// What a token's neighbours see when spacing it.
#[derive(Clone, Copy, PartialEq)]
enum Piece {
    Start,
    /// An identifier, literal or keyword.
    Word,
    /// A keyword that takes spaces on both sides (`as`, `dyn`, `impl`, `mut`).
    Spaced,
    /// `,` or `;`: a space after.
    Separator,
    /// `+`, `=`, `->`: spaces around.
    Operator,
    /// Other punctuation and brackets: no spaces.
    Tight,
}

/// `tokens` printed with rustfmt's spacing for types (token streams print with a space
/// between every two tokens, and differently in and outside the compiler).
fn tokens_text(tokens: TokenStream) -> String {
    let mut out = String::new();
    let mut last = Piece::Start;
    write_tokens(tokens, &mut out, &mut last);
    out
}

fn write_tokens(tokens: TokenStream, out: &mut String, last: &mut Piece) {
    let mut tokens = tokens.into_iter().peekable();
    while let Some(token) = tokens.next() {
        match token {
            TokenTree::Group(g) => {
                let (open, close) = match g.delimiter() {
                    Delimiter::Parenthesis => ("(", ")"),
                    Delimiter::Bracket => ("[", "]"),
                    Delimiter::Brace => ("{", "}"),
                    Delimiter::None => ("", ""),
                };
                push(out, last, open, Piece::Tight);
                let mut inner = Piece::Start;
                write_tokens(g.stream(), out, &mut inner);
                out.push_str(close);
                *last = if close.is_empty() {
                    inner
                } else {
                    Piece::Tight
                };
            }
            TokenTree::Ident(i) => {
                let text = i.to_string();
                let piece = match text.as_str() {
                    "as" | "dyn" | "impl" | "mut" => Piece::Spaced,
                    _ => Piece::Word,
                };
                push(out, last, &text, piece);
            }
            TokenTree::Literal(l) => push(out, last, &l.to_string(), Piece::Word),
            TokenTree::Punct(p) => {
                let c = p.as_char();
                // `->` is one operator; `'a` a lifetime, which reads as a word.
                if c == '-' && p.spacing() == Spacing::Joint {
                    if let Some(TokenTree::Punct(next)) = tokens.peek() {
                        if next.as_char() == '>' {
                            tokens.next();
                            push(out, last, "->", Piece::Operator);
                            continue;
                        }
                    }
                }
                let piece = match c {
                    ',' | ';' => Piece::Separator,
                    '+' | '=' => Piece::Operator,
                    '\'' => {
                        push(out, last, "'", Piece::Word);
                        *last = Piece::Tight;
                        continue;
                    }
                    _ => Piece::Tight,
                };
                push(out, last, &c.to_string(), piece);
            }
        }
    }
}

fn push(out: &mut String, last: &mut Piece, text: &str, piece: Piece) {
    let space = match (*last, piece) {
        (Piece::Start, _) => false,
        (Piece::Word | Piece::Spaced, Piece::Word | Piece::Spaced) => true,
        (Piece::Separator, _) => true,
        (Piece::Operator, _) | (_, Piece::Operator) => true,
        (Piece::Spaced, _) => text != ")" && text != "]" && text != ">",
        // `> as`, `) as`, but `<dyn`, `&mut`, `(impl`.
        (_, Piece::Spaced) => out.ends_with(['>', ')', ']']),
        _ => false,
    };
    if space {
        out.push(' ');
    }
    out.push_str(text);
    *last = piece;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(ty: &str) -> String {
        type_name(&syn::parse_str(ty).expect("a type"))
    }

    #[test]
    fn types_print_as_written() {
        for ty in [
            "i64",
            "()",
            "Vec<u8>",
            "Option<Vec<(i64, String)>>",
            "std::collections::HashMap<String, u32>",
            "::std::string::String",
            "[u8; 4]",
            "<Res<String> as ::chatter_rpc::__private::RemoteResult>::Ok",
            "Box<dyn std::error::Error + Send>",
            "Box<dyn Fn(u8) -> u8>",
            "&'static str",
            "Cow<'static, str>",
            "r#type::Thing",
        ] {
            assert_eq!(name(ty), ty);
        }
        assert_eq!(name("Vec < u8 >"), "Vec<u8>");
        assert_eq!(name("( i64 , String , )"), "(i64, String,)");
    }

    #[test]
    fn docs_read_like_rustdoc() {
        let attrs: Vec<Attribute> = vec![
            syn::parse_quote!(#[doc = " Adds two numbers."]),
            syn::parse_quote!(#[doc = ""]),
            syn::parse_quote!(#[doc = "  Indented."]),
            syn::parse_quote!(#[allow(dead_code)]),
            syn::parse_quote!(#[doc = include_str!("x")]),
        ];
        assert_eq!(docs(&attrs), "Adds two numbers.\n\n Indented.");
        assert_eq!(docs(&[]), "");
    }

    #[test]
    fn argument_names() {
        let pat = |p: &str| -> Pat {
            let arg: syn::FnArg = syn::parse_str(&format!("{p}: u8")).expect("an argument");
            match arg {
                syn::FnArg::Typed(t) => *t.pat,
                _ => unreachable!(),
            }
        };
        assert_eq!(pattern_name(&pat("a")), "a");
        assert_eq!(pattern_name(&pat("mut a")), "a");
        assert_eq!(pattern_name(&pat("r#type")), "type");
        assert_eq!(pattern_name(&pat("_")), "_");
        assert_eq!(pattern_name(&pat("(a, b)")), "(a, b)");
    }
}
