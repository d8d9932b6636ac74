//! The model of a `#[remote]` trait, built from syn's AST. Shape errors of single items
//! (non-async methods, receivers, generics, argument types) are recorded here; checks
//! across items live in `check`.

use syn::{
    Attribute, Block, FnArg, GenericArgument, Ident, ItemTrait, Pat, PathArguments, ReturnType,
    Signature, TraitItem, Type, TypeParamBound, Visibility,
};

use crate::attr;
use crate::ctxt::Ctxt;
use crate::stream::{self, End};

/// A remote trait.
pub(crate) struct Trait {
    pub(crate) attrs: Vec<Attribute>,
    pub(crate) vis: Visibility,
    pub(crate) ident: Ident,
    pub(crate) supertraits: Vec<TypeParamBound>,
    pub(crate) methods: Vec<Method>,
    /// The path to chatter-rpc (`::chatter_rpc` unless `#[remote(crate = "..")]`).
    pub(crate) krate: syn::Path,
}

/// One method of a remote trait.
pub(crate) struct Method {
    pub(crate) ident: Ident,
    /// Docs and lint attributes, copied onto the trait method and the client method.
    pub(crate) attrs: Vec<Attribute>,
    /// `Some` for a signal: its TTL and whether it is persistent.
    pub(crate) signal: Option<crate::attr::SignalAttr>,
    /// `#[idempotent]` (its attribute, for error spans).
    pub(crate) idempotent: Option<Attribute>,
    pub(crate) args: Vec<Arg>,
    pub(crate) output: Output,
    /// `Some(T)` when the method returns a stream: `Receiver<T>`, or `Result<Receiver<T>, E>`
    /// (`output` says which).
    pub(crate) result_stream: Option<Type>,
    /// The return type as written (`None` for `()`), for error spans.
    pub(crate) return_type: Option<Type>,
    pub(crate) default: Option<Block>,
}

/// One argument (after `&self`).
pub(crate) struct Arg {
    pub(crate) pat: Pat,
    pub(crate) ty: Type,
    /// `Some(T)` for an argument stream (`Receiver<T>`), which travels beside the call
    /// instead of in its argument array.
    pub(crate) stream: Option<Type>,
}

/// What a method returns.
#[allow(clippy::large_enum_variant)] // one per method, built once per compile
pub(crate) enum Output {
    /// Nothing (`()`).
    Unit,
    /// A plain value.
    Plain(Type),
    /// `Result<T, E>`: `E` is the application error.
    Result { ok: Type, err: Type },
}

impl Output {
    /// The type the trait method's future resolves to.
    pub(crate) fn full_type(&self, written: &Option<Type>) -> proc_macro2::TokenStream {
        match (self, written) {
            (_, Some(ty)) => quote::quote!(#ty),
            _ => quote::quote!(()),
        }
    }
}

impl Trait {
    /// Builds the model, recording every problem in `cx`.
    pub(crate) fn from_ast(cx: &Ctxt, item: &ItemTrait, krate: syn::Path) -> Trait {
        if let Some(unsafety) = &item.unsafety {
            cx.error_spanned_by(unsafety, "a remote trait cannot be `unsafe`");
        }
        if let Some(auto) = &item.auto_token {
            cx.error_spanned_by(auto, "a remote trait cannot be an auto trait");
        }
        if !item.generics.params.is_empty() || item.generics.where_clause.is_some() {
            cx.error_spanned_by(
                &item.generics,
                "a remote trait cannot be generic: name concrete argument and return types",
            );
        }
        let mut methods = Vec::new();
        for trait_item in &item.items {
            match trait_item {
                TraitItem::Fn(f) => {
                    let default = f.default.as_ref();
                    methods.push(Method::from_ast(cx, &f.attrs, &f.sig, default, &krate));
                }
                other => cx.error_spanned_by(
                    other,
                    "a remote trait can only contain methods (`async fn name(&self, ..)`)",
                ),
            }
        }
        Trait {
            attrs: item.attrs.clone(),
            vis: item.vis.clone(),
            ident: item.ident.clone(),
            supertraits: item.supertraits.iter().cloned().collect(),
            methods,
            krate,
        }
    }
}

impl Method {
    fn from_ast(
        cx: &Ctxt,
        attrs: &[Attribute],
        sig: &Signature,
        default: Option<&Block>,
        krate: &syn::Path,
    ) -> Method {
        let attrs = attr::method_attrs(cx, attrs);
        let name = &sig.ident;
        if sig.asyncness.is_none() {
            cx.error_spanned_by(
                sig.fn_token,
                format!("remote methods must be async: write `async fn {name}(&self, ..)`"),
            );
        }
        if let Some(c) = &sig.constness {
            cx.error_spanned_by(c, "remote methods cannot be `const`");
        }
        if let Some(u) = &sig.unsafety {
            cx.error_spanned_by(u, "remote methods cannot be `unsafe`");
        }
        if let Some(abi) = &sig.abi {
            cx.error_spanned_by(abi, "remote methods cannot have an ABI");
        }
        if let Some(v) = &sig.variadic {
            cx.error_spanned_by(v, "remote methods cannot be variadic");
        }
        if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
            cx.error_spanned_by(
                &sig.generics,
                format!(
                    "remote method `{name}` cannot be generic: both sides must agree on \
                     concrete argument types"
                ),
            );
        }

        let mut inputs = sig.inputs.iter();
        match inputs.next() {
            Some(FnArg::Receiver(r)) => {
                if r.colon_token.is_some() {
                    cx.error_spanned_by(r, "write the receiver as `&self`");
                } else if r.reference.is_none() {
                    cx.error_spanned_by(
                        r,
                        "remote methods take `&self`; `self` by value is not supported \
                         because the object serves many calls",
                    );
                } else if r.mutability.is_some() {
                    cx.error_spanned_by(
                        r,
                        "remote methods take `&self`, not `&mut self`: calls run \
                         concurrently; use interior mutability (e.g. a Mutex) for state",
                    );
                }
            }
            _ => cx.error_spanned_by(
                name,
                format!(
                    "remote method `{name}` needs a `&self` receiver: `async fn {name}(&self, ..)`"
                ),
            ),
        }
        let mut args = Vec::new();
        for input in inputs {
            match input {
                FnArg::Typed(pt) => {
                    check_owned(cx, &pt.ty, "argument");
                    args.push(Arg {
                        pat: (*pt.pat).clone(),
                        ty: (*pt.ty).clone(),
                        stream: value_stream(cx, &pt.ty, krate),
                    });
                }
                FnArg::Receiver(r) => cx.error_spanned_by(r, "unexpected receiver"),
            }
        }

        let (output, return_type) = match &sig.output {
            ReturnType::Default => (Output::Unit, None),
            ReturnType::Type(_, ty) => {
                check_owned(cx, ty, "return type");
                (classify(ty), Some((**ty).clone()))
            }
        };
        // Set in the `#[result]` branch: the stream inside an alias of `Result`.
        let mut alias_stream = None;
        let output = match (output, &attrs.result, &attrs.plain, &return_type) {
            (_, Some(result), Some(_), _) => {
                cx.error_spanned_by(result, "#[result] and #[plain] contradict; keep one");
                Output::Unit
            }
            (_, Some(attr), None, None) | (_, None, Some(attr), None) => {
                cx.error_spanned_by(attr, "this method returns nothing; remove the attribute");
                Output::Unit
            }
            (Output::Plain(ty), Some(_), None, _) => {
                // An alias of `Result` (`io::Result<T>`, `type Res<T> = Result<T, E>`):
                // its parts are named through the `RemoteResult` trait.
                // Spanned at the alias, so that errors about its parts point there.
                let result = quote::quote!(#krate::__private::RemoteResult);
                let span = syn::spanned::Spanned::span(&ty);
                alias_stream = Some(alias_ok_stream(cx, &ty, krate));
                Output::Result {
                    ok: syn::parse_quote_spanned!(span=> <#ty as #result>::Ok),
                    err: syn::parse_quote_spanned!(span=> <#ty as #result>::Err),
                }
            }
            (Output::Result { ok, err }, None, Some(plain), Some(_))
                if stream::top(&ok, krate).is_some_and(|f| f.end == End::Receiver) =>
            {
                cx.error_spanned_by(
                    plain,
                    "#[plain] sends the whole `Result` as one value, and a stream is not a \
                     value: remove #[plain] (the client then returns \
                     `Result<Receiver<T>, CallError<E>>`)",
                );
                Output::Result { ok, err }
            }
            (Output::Result { .. }, None, Some(_), Some(ty)) => Output::Plain(ty.clone()),
            (Output::Plain(ty), None, None, _) if looks_like_result(&ty) => {
                cx.error_spanned_by(
                    &ty,
                    "this return type looks like an alias of `Result`, which #[remote] cannot \
                     see through: mark the method #[result] to make its `Err` the application \
                     error (the client gets `Result<T, CallError<E>>`), or #[plain] to send \
                     the whole value as the return value",
                );
                Output::Plain(ty)
            }
            (output, ..) => output,
        };
        if let (Some(attr), Some(_)) = (
            attrs.result.as_ref().or(attrs.plain.as_ref()),
            &attrs.signal,
        ) {
            cx.error_spanned_by(
                attr,
                "a signal has no return value: #[result] and #[plain] apply to calls",
            );
        }
        let result_stream = match (alias_stream, &output) {
            (Some(stream), _) => stream,
            (None, Output::Unit) => None,
            (None, Output::Plain(ty)) => value_stream(cx, ty, krate),
            (None, Output::Result { ok, err }) => {
                refuse_streams(cx, err, krate);
                value_stream(cx, ok, krate)
            }
        };
        Method {
            ident: sig.ident.clone(),
            attrs: attrs.passthrough,
            signal: attrs.signal,
            idempotent: attrs.idempotent,
            args,
            output,
            result_stream,
            return_type,
            default: default.cloned(),
        }
    }
}

/// The item type if `ty` is a stream (`Receiver<T>`) itself, as an argument or result
/// value may be. A `Sender`, or a stream inside another type, is an error.
fn value_stream(cx: &Ctxt, ty: &Type, krate: &syn::Path) -> Option<Type> {
    refuse_streams_in(cx, ty, krate);
    refuse_sender(cx, ty, krate);
    match stream::top(ty, krate) {
        Some(found) if found.end == End::Receiver => Some(found.item.clone()),
        _ => None,
    }
}

/// The item type if the `Ok` of a `#[result]` alias (its first type argument, as in
/// `io::Result<T>` or `type Res<T> = Result<T, E>`) is a stream. An alias that hides the
/// stream (`type Feed = Result<Receiver<T>, E>`) is not seen: its `Receiver` is then
/// reported as a value that cannot be sent.
fn alias_ok_stream(cx: &Ctxt, alias: &Type, krate: &syn::Path) -> Option<Type> {
    let Type::Path(p) = alias else {
        refuse_streams_in(cx, alias, krate);
        return None;
    };
    let types = p
        .path
        .segments
        .last()
        .and_then(|last| match &last.arguments {
            PathArguments::AngleBracketed(a) => Some(&a.args),
            _ => None,
        })
        .into_iter()
        .flatten()
        .filter_map(|g| match g {
            GenericArgument::Type(t) => Some(t),
            _ => None,
        });
    let mut stream = None;
    for (i, ty) in types.enumerate() {
        if i == 0 {
            stream = value_stream(cx, ty, krate);
        } else {
            refuse_streams(cx, ty, krate);
        }
    }
    stream
}

/// Reports `ty` if it is a stream, and every stream inside it: where a plain value must
/// be (an application error).
fn refuse_streams(cx: &Ctxt, ty: &Type, krate: &syn::Path) {
    match stream::top(ty, krate) {
        Some(found) if found.end == End::Receiver => cx.error_spanned_by(found.ty, NESTED),
        _ => refuse_sender(cx, ty, krate),
    }
    refuse_streams_in(cx, ty, krate);
}

/// Where a `Receiver` cannot be.
const NESTED: &str = "a stream `Receiver` cannot be part of another type (a container, an \
                      `Option`, a tuple, a `Result`'s error, a stream's item): it must be \
                      an argument's whole type, or the return type or the `Ok` of a \
                      returned `Result`, where #[remote] can see it";

/// Reports every stream type inside `ty` (not `ty` itself): a stream is not a value.
fn refuse_streams_in(cx: &Ctxt, ty: &Type, krate: &syn::Path) {
    for found in stream::nested(ty, krate) {
        match found.end {
            End::Sender => refuse_sender(cx, found.ty, krate),
            End::Receiver => cx.error_spanned_by(found.ty, NESTED),
        }
    }
}

/// Reports `ty` if it is a stream `Sender`.
fn refuse_sender(cx: &Ctxt, ty: &Type, krate: &syn::Path) {
    if let Some(found) = stream::top(ty, krate).filter(|f| f.end == End::Sender) {
        cx.error_spanned_by(
            found.ty,
            "a stream `Sender` cannot be passed to or returned from a remote method: pass \
             a `Receiver` instead (make a pair with `stream::channel`, pass or return its \
             `Receiver`, and feed its `Sender`)",
        );
    }
}

/// A path whose last segment ends in `Result` (`io::Result<T>`, `MyResult<T>`,
/// `fmt::Result`) that [`classify`] did not take for `Result<T, E>`.
fn looks_like_result(ty: &Type) -> bool {
    match ty {
        Type::Path(p) if p.qself.is_none() => p
            .path
            .segments
            .last()
            .is_some_and(|last| last.ident.to_string().ends_with("Result")),
        _ => false,
    }
}

/// `Result<T, E>` (a path ending in `Result` with two type arguments) or a plain type.
fn classify(ty: &Type) -> Output {
    if let Type::Tuple(t) = ty {
        if t.elems.is_empty() {
            return Output::Unit;
        }
    }
    if let Type::Path(p) = ty {
        if p.qself.is_none() {
            if let Some(last) = p.path.segments.last() {
                if last.ident == "Result" {
                    if let PathArguments::AngleBracketed(a) = &last.arguments {
                        let types: Vec<&Type> = a
                            .args
                            .iter()
                            .filter_map(|g| match g {
                                GenericArgument::Type(t) => Some(t),
                                _ => None,
                            })
                            .collect();
                        if let [ok, err] = types[..] {
                            if a.args.len() == 2 {
                                return Output::Result {
                                    ok: ok.clone(),
                                    err: err.clone(),
                                };
                            }
                        }
                    }
                }
            }
        }
    }
    Output::Plain(ty.clone())
}

/// Arguments and results cross the wire: they must be owned, nameable types.
fn check_owned(cx: &Ctxt, ty: &Type, what: &str) {
    match ty {
        Type::Reference(r) => cx.error_spanned_by(
            r,
            format!(
                "a remote {what} must be an owned type (it is decoded from the wire): \
                 use `String` for `&str`, `Vec<T>` for `&[T]`, `T` for `&T`"
            ),
        ),
        Type::ImplTrait(t) => cx.error_spanned_by(
            t,
            format!("a remote {what} cannot be `impl Trait`: name a concrete serde type"),
        ),
        Type::Paren(p) => check_owned(cx, &p.elem, what),
        Type::Tuple(t) => t.elems.iter().for_each(|e| check_owned(cx, e, what)),
        _ => {}
    }
}
