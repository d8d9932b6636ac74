//! Attribute parsing: `#[remote(..)]` arguments and the attributes of trait methods.

use proc_macro2::TokenStream;
use syn::{Attribute, LitStr, Meta};

use crate::ctxt::Ctxt;

/// What the attributes of one trait method say.
#[derive(Default)]
pub(crate) struct MethodAttrs {
    /// `Some` when the method is a signal.
    pub(crate) signal: Option<SignalAttr>,
    /// `#[idempotent]`: calls may be re-sent when their outcome is unknown.
    pub(crate) idempotent: Option<Attribute>,
    /// `#[result]`: the return type is a `Result` (an alias the macro cannot see through);
    /// its `Err` is the application error.
    pub(crate) result: Option<Attribute>,
    /// `#[plain]`: the return type is sent as a value, even if it is a `Result`.
    pub(crate) plain: Option<Attribute>,
    /// Attributes copied onto the generated items (docs, lints).
    pub(crate) passthrough: Vec<Attribute>,
}

/// What `#[signal(..)]` says.
#[derive(Default, Clone, Copy)]
pub(crate) struct SignalAttr {
    /// `ttl = ".."`, in milliseconds.
    pub(crate) ttl_ms: Option<u64>,
    /// `persistent`: stored before sending returns (with a store).
    pub(crate) persistent: bool,
}

/// The arguments of `#[remote]`: none, or `crate = "path"` (the path to chatter-rpc when
/// it is not `::chatter_rpc`, as serde's `#[serde(crate = "..")]`).
pub(crate) fn remote_args(cx: &Ctxt, args: TokenStream) -> syn::Path {
    let mut krate: Option<syn::Path> = None;
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("crate") {
            let lit: LitStr = meta.value()?.parse()?;
            if krate.is_some() {
                cx.error_spanned_by(&lit, "duplicate `crate`; keep one");
            }
            match lit.parse::<syn::Path>() {
                Ok(path) => krate = Some(path),
                Err(_) => cx.error_spanned_by(
                    &lit,
                    format!(
                        "`crate` takes the path to chatter-rpc, for example \
                         `crate = \"rpc\"` when Cargo.toml renames it; {:?} is not a path",
                        lit.value()
                    ),
                ),
            }
            Ok(())
        } else {
            Err(meta.error(
                "unsupported #[remote] option; the only option is `crate = \"path\"` \
                 (the path to chatter-rpc when it is renamed)",
            ))
        }
    });
    if let Err(e) = syn::parse::Parser::parse2(parser, args) {
        cx.syn_error(e);
    }
    krate.unwrap_or_else(|| syn::parse_quote!(::chatter_rpc))
}

/// Lint and documentation attributes that are copied through unchanged.
const PASSTHROUGH: &[&str] = &[
    "doc",
    "allow",
    "warn",
    "deny",
    "expect",
    "forbid",
    "deprecated",
];

/// Parses the attributes of one method.
pub(crate) fn method_attrs(cx: &Ctxt, attrs: &[Attribute]) -> MethodAttrs {
    let mut out = MethodAttrs::default();
    for attr in attrs {
        let path = attr.path();
        if path.is_ident("signal") {
            if out.signal.is_some() {
                cx.error_spanned_by(attr, "duplicate #[signal] attribute; keep one");
                continue;
            }
            out.signal = Some(signal_attr(cx, attr));
        } else if path.is_ident("idempotent") {
            if !matches!(attr.meta, Meta::Path(_)) {
                cx.error_spanned_by(attr, "write #[idempotent], without arguments");
            } else if out.idempotent.is_some() {
                cx.error_spanned_by(attr, "duplicate #[idempotent] attribute; keep one");
            }
            out.idempotent = Some(attr.clone());
        } else if path.is_ident("result") || path.is_ident("plain") {
            let name = if path.is_ident("result") {
                "result"
            } else {
                "plain"
            };
            let slot = if name == "result" {
                &mut out.result
            } else {
                &mut out.plain
            };
            if !matches!(attr.meta, Meta::Path(_)) {
                cx.error_spanned_by(attr, format!("write #[{name}], without arguments"));
            } else if slot.is_some() {
                cx.error_spanned_by(attr, format!("duplicate #[{name}] attribute; keep one"));
            }
            *slot = Some(attr.clone());
        } else if PASSTHROUGH.iter().any(|p| path.is_ident(p)) {
            out.passthrough.push(attr.clone());
        } else {
            cx.error_spanned_by(
                attr,
                "unsupported attribute on a remote method; supported are #[signal], \
                 #[signal(ttl = \"30s\", persistent)], #[idempotent], #[result], #[plain], doc \
                 comments and lint attributes",
            );
        }
    }
    out
}

/// The options of `#[signal]` / `#[signal(ttl = "..", persistent)]`.
fn signal_attr(cx: &Ctxt, attr: &Attribute) -> SignalAttr {
    match &attr.meta {
        Meta::Path(_) => SignalAttr::default(),
        Meta::NameValue(nv) => {
            cx.error_spanned_by(
                nv,
                "write #[signal], #[signal(ttl = \"30s\")] or #[signal(persistent)]",
            );
            SignalAttr::default()
        }
        Meta::List(_) => {
            let mut ttl = None;
            let mut persistent = false;
            let parsed = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("ttl") {
                    let lit: LitStr = meta.value()?.parse()?;
                    if ttl.is_some() {
                        cx.error_spanned_by(&lit, "duplicate `ttl`; keep one");
                    }
                    match parse_duration(&lit.value()) {
                        Some(ms) => ttl = Some(ms),
                        None => cx.error_spanned_by(
                            &lit,
                            format!(
                                "invalid duration {:?}: write a whole number followed by \
                                 `ms`, `s`, `m` or `h`, for example \"30s\"",
                                lit.value()
                            ),
                        ),
                    }
                    Ok(())
                } else if meta.path.is_ident("persistent") {
                    if meta.input.peek(syn::Token![=]) || meta.input.peek(syn::token::Paren) {
                        return Err(meta.error("write `persistent` without a value"));
                    }
                    if persistent {
                        cx.error_spanned_by(&meta.path, "duplicate `persistent`; keep one");
                    }
                    persistent = true;
                    Ok(())
                } else {
                    Err(meta.error(
                        "unsupported signal option; the options are `ttl = \"30s\"` and \
                         `persistent`",
                    ))
                }
            });
            if let Err(e) = parsed {
                cx.syn_error(e);
            }
            SignalAttr {
                ttl_ms: ttl,
                persistent,
            }
        }
    }
}

/// Parses `"500ms"`, `"30s"`, `"2m"`, `"1h"` into milliseconds.
pub(crate) fn parse_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = s.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let scale = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    number.checked_mul(scale)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(30_000));
        assert_eq!(parse_duration("500ms"), Some(500));
        assert_eq!(parse_duration("2m"), Some(120_000));
        assert_eq!(parse_duration("1h"), Some(3_600_000));
        assert_eq!(parse_duration("1 s"), Some(1_000));
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("1.5s"), None);
        assert_eq!(parse_duration("5d"), None);
    }
}
