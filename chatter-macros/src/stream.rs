//! Recognising chatter's stream types in a trait's signatures.
//!
//! A macro sees tokens, not types, so a stream is recognised by its path: `Receiver<T>`,
//! `stream::Receiver<T>`, `chatter_rpc::stream::Receiver<T>` or, with
//! `#[remote(crate = "path")]`, `path::stream::Receiver<T>` or the path's last segments
//! (`shim::stream::Receiver<T>` for `crate = "crate::shim"`) (likewise `Sender<T>`, which is
//! recognised only to be refused). A type of another path (`mpsc::Receiver<T>`) is an
//! ordinary value.

use syn::{GenericArgument, PathArguments, Type};

/// Which end of a stream a type names.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// `Receiver<T>`: passed as an argument or returned, it carries a stream.
    Receiver,
    /// `Sender<T>`: not supported in signatures (pass a `Receiver` instead).
    Sender,
}

/// A stream type found in a signature.
pub(crate) struct Found<'a> {
    pub(crate) end: End,
    /// The whole type (`Receiver<T>`), for error spans.
    pub(crate) ty: &'a Type,
    /// `T`.
    pub(crate) item: &'a Type,
}

/// The stream type `ty` is, if it is one itself (not one inside another type).
pub(crate) fn top<'a>(ty: &'a Type, krate: &syn::Path) -> Option<Found<'a>> {
    let ty = unwrap(ty);
    let Type::Path(p) = ty else {
        return None;
    };
    if p.qself.is_some() {
        return None;
    }
    let segments: Vec<_> = p.path.segments.iter().collect();
    let (last, prefix) = segments.split_last()?;
    let end = if last.ident == "Receiver" {
        End::Receiver
    } else if last.ident == "Sender" {
        End::Sender
    } else {
        return None;
    };
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let [GenericArgument::Type(item)] = args.args.iter().collect::<Vec<_>>()[..] else {
        return None;
    };
    let prefix: Vec<String> = prefix.iter().map(|s| s.ident.to_string()).collect();
    let krate: Vec<String> = krate.segments.iter().map(|s| s.ident.to_string()).collect();
    let known = match prefix.split_last() {
        None => true,
        Some((stream, before)) if stream == "stream" => {
            // `chatter_rpc`, or the `crate = ".."` path or its end (`rpc` for `self::rpc`).
            before.is_empty() || before == ["chatter_rpc"] || krate.ends_with(before)
        }
        Some(_) => false,
    };
    known.then_some(Found { end, ty, item })
}

/// Every stream type inside `ty` (not `ty` itself, but in its item if it is one), outermost
/// first, not searching inside those found. References are not
/// searched: a borrowed type is refused already.
pub(crate) fn nested<'a>(ty: &'a Type, krate: &syn::Path) -> Vec<Found<'a>> {
    let mut found = Vec::new();
    inner(unwrap(ty), krate, &mut found);
    found
}

/// Pushes the stream types in the parts of `ty`.
fn inner<'a>(ty: &'a Type, krate: &syn::Path, found: &mut Vec<Found<'a>>) {
    let mut visit = |part: &'a Type| match top(part, krate) {
        Some(f) => found.push(f),
        None => inner(unwrap(part), krate, found),
    };
    match ty {
        Type::Path(p) => {
            if let Some(q) = &p.qself {
                visit(&q.ty);
            }
            for segment in &p.path.segments {
                if let PathArguments::AngleBracketed(args) = &segment.arguments {
                    for arg in &args.args {
                        match arg {
                            GenericArgument::Type(t) => visit(t),
                            GenericArgument::AssocType(a) => visit(&a.ty),
                            _ => {}
                        }
                    }
                }
            }
        }
        Type::Tuple(t) => t.elems.iter().for_each(visit),
        Type::Array(a) => visit(&a.elem),
        Type::Slice(s) => visit(&s.elem),
        Type::Ptr(p) => visit(&p.elem),
        _ => {}
    }
}

/// `ty` without parentheses and invisible groups.
fn unwrap(ty: &Type) -> &Type {
    match ty {
        Type::Paren(p) => unwrap(&p.elem),
        Type::Group(g) => unwrap(&g.elem),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn krate() -> syn::Path {
        syn::parse_quote!(crate::shim)
    }

    fn top_end(ty: Type) -> Option<End> {
        top(&ty, &krate()).map(|f| f.end)
    }

    #[test]
    fn recognised_paths() {
        for ty in [
            syn::parse_quote!(Receiver<u8>),
            syn::parse_quote!(stream::Receiver<u8>),
            syn::parse_quote!(chatter_rpc::stream::Receiver<u8>),
            syn::parse_quote!(::chatter_rpc::stream::Receiver<u8>),
            syn::parse_quote!(crate::shim::stream::Receiver<u8>),
            syn::parse_quote!(shim::stream::Receiver<u8>),
            syn::parse_quote!((Receiver<u8>)),
        ] {
            assert!(top_end(ty) == Some(End::Receiver));
        }
        assert!(top_end(syn::parse_quote!(stream::Sender<Vec<u8>>)) == Some(End::Sender));
        for ty in [
            syn::parse_quote!(mpsc::Receiver<u8>),
            syn::parse_quote!(Receiver),
            syn::parse_quote!(Receiver<u8, u16>),
            syn::parse_quote!(other::stream::Receiver<u8>),
            syn::parse_quote!(crate::stream::Receiver<u8>),
            syn::parse_quote!(Vec<Receiver<u8>>),
        ] {
            assert!(top_end(ty).is_none());
        }
    }

    #[test]
    fn nested_streams_are_found_at_any_depth() {
        let ty: Type = syn::parse_quote!((
            Vec<Receiver<u8>>,
            Option<[stream::Sender<u8>; 2]>,
            HashMap<u8, Receiver<u8>>
        ));
        let ends: Vec<_> = nested(&ty, &krate()).iter().map(|f| f.end).collect();
        assert!(ends == [End::Receiver, End::Sender, End::Receiver]);
        let plain: Type = syn::parse_quote!(Vec<mpsc::Receiver<u8>>);
        assert!(nested(&plain, &krate()).is_empty());
        // A stream's item is searched too: a stream of streams is refused.
        let top: Type = syn::parse_quote!(Receiver<u8>);
        assert!(nested(&top, &krate()).is_empty());
        let streams: Type = syn::parse_quote!(Receiver<Receiver<u8>>);
        assert!(nested(&streams, &krate()).len() == 1);
    }
}
