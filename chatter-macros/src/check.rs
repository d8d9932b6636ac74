//! Checks across the whole trait, after the model is built.

use std::collections::HashSet;

use syn::ext::IdentExt;

use crate::ast::{Output, Trait};
use crate::ctxt::Ctxt;

/// Inherent methods of the generated client; a remote method with one of these names
/// would be shadowed or clash.
pub(crate) const CLIENT_METHODS: &[&str] = &[
    "new",
    "with_deadline",
    "with_ttl",
    "with_metadata",
    "with_trace_parent",
    "persistent",
    "peer",
    "object",
    "deadline",
    "clone",
    "fmt",
];

/// Runs every cross-item check.
pub(crate) fn check(cx: &Ctxt, tr: &Trait) {
    duplicate_names(cx, tr);
    generated_name_clashes(cx, tr);
    signals_return_nothing(cx, tr);
    signals_are_not_idempotent(cx, tr);
    one_argument_stream(cx, tr);
    signals_take_no_streams(cx, tr);
    streams_are_not_idempotent(cx, tr);
}

fn one_argument_stream(cx: &Ctxt, tr: &Trait) {
    for m in &tr.methods {
        for extra in m.args.iter().filter(|a| a.stream.is_some()).skip(1) {
            cx.error_spanned_by(
                &extra.ty,
                "a remote method takes at most one `Receiver` argument (one argument stream \
                 per call): send one stream whose item is an enum of what the streams carry",
            );
        }
    }
}

fn signals_take_no_streams(cx: &Ctxt, tr: &Trait) {
    for m in tr.methods.iter().filter(|m| m.signal.is_some()) {
        for arg in m.args.iter().filter(|a| a.stream.is_some()) {
            cx.error_spanned_by(
                &arg.ty,
                "a signal cannot take a stream: it is one message, without a reply or a \
                 conversation to carry items; remove #[signal] to make it a call",
            );
        }
    }
}

fn streams_are_not_idempotent(cx: &Ctxt, tr: &Trait) {
    for m in tr.methods.iter().filter(|m| m.signal.is_none()) {
        if let Some(attr) = &m.idempotent {
            if m.result_stream.is_some() || m.args.iter().any(|a| a.stream.is_some()) {
                cx.error_spanned_by(
                    attr,
                    "#[idempotent] does not apply to a method with a stream: a call that \
                     opens a stream is never sent again (its items cannot be replayed); \
                     remove #[idempotent]",
                );
            }
        }
    }
}

fn signals_are_not_idempotent(cx: &Ctxt, tr: &Trait) {
    for m in &tr.methods {
        if let (Some(_), Some(attr)) = (&m.signal, &m.idempotent) {
            cx.error_spanned_by(
                attr,
                "#[idempotent] applies to calls (it lets a call whose outcome is unknown be \
                 sent again); signals are re-sent only with duplicate detection: remove \
                 #[idempotent]",
            );
        }
    }
}

fn duplicate_names(cx: &Ctxt, tr: &Trait) {
    let mut seen = HashSet::new();
    for m in &tr.methods {
        let name = m.ident.unraw().to_string();
        if !seen.insert(name.clone()) {
            cx.error_spanned_by(
                &m.ident,
                format!("duplicate method name `{name}`: remote methods are called by name"),
            );
        }
    }
}

fn generated_name_clashes(cx: &Ctxt, tr: &Trait) {
    for m in &tr.methods {
        let name = m.ident.unraw().to_string();
        if CLIENT_METHODS.contains(&name.as_str()) {
            cx.error_spanned_by(
                &m.ident,
                format!(
                    "method name `{name}` clashes with `{}Client::{name}`, which #[remote] \
                     generates; rename the method",
                    tr.ident
                ),
            );
        } else if name.starts_with("__") {
            cx.error_spanned_by(
                &m.ident,
                format!("method name `{name}`: names starting with `__` are reserved"),
            );
        }
    }
}

fn signals_return_nothing(cx: &Ctxt, tr: &Trait) {
    for m in &tr.methods {
        if m.signal.is_some() && !matches!(m.output, Output::Unit) {
            if let Some(ty) = &m.return_type {
                cx.error_spanned_by(
                    ty,
                    "a signal has no reply, so it cannot return a value: remove the return \
                     type, or remove #[signal] to make it a call",
                );
            }
        }
    }
}
