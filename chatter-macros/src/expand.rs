//! Code generation: the rewritten trait, `{Trait}Client` and `{Trait}Server`.
//!
//! Generated code names dependencies only through `::chatter_rpc::__private` (and the
//! public `::chatter_rpc` API), so it survives a user's `struct Result;` in scope and needs
//! no other crate in the user's Cargo.toml.

use proc_macro2::{Ident, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::ItemTrait;

use crate::ast::{Method, Output, Trait};
use crate::{attr, check, ctxt::Ctxt};

/// The whole expansion of `#[remote]`.
pub(crate) fn remote(args: TokenStream, input: TokenStream) -> syn::Result<TokenStream> {
    let item: ItemTrait = match syn::parse2(input) {
        Ok(item) => item,
        Err(e) => {
            return Err(syn::Error::new(
                e.span(),
                "#[remote] applies to a trait: `#[remote] pub trait Name { async fn .. }`",
            ))
        }
    };
    let cx = Ctxt::default();
    let krate = attr::remote_args(&cx, args);
    let tr = Trait::from_ast(&cx, &item, krate);
    check::check(&cx, &tr);
    cx.check()?;

    let the_trait = rewrite_trait(&tr);
    let client = client(&tr);
    let server = server(&tr);
    Ok(quote! {
        #the_trait
        #client
        #server
    })
}

/// `::chatter_rpc::__private` (or the `crate = ".."` path's).
fn private(tr: &Trait) -> TokenStream {
    let krate = &tr.krate;
    quote!(#krate::__private)
}

/// The trait with `async fn` turned into `fn -> impl Future + Send`, so that the server
/// can spawn handler futures, and `#[signal]` removed.
fn rewrite_trait(tr: &Trait) -> TokenStream {
    let p = private(tr);
    let Trait {
        attrs,
        vis,
        ident,
        supertraits,
        ..
    } = tr;
    let colon = (!supertraits.is_empty()).then(|| quote!(:));
    let methods = tr.methods.iter().map(|m| {
        let Method {
            ident: name,
            attrs,
            args,
            ..
        } = m;
        let pats = args.iter().map(|a| &a.pat);
        let tys = args.iter().map(|a| &a.ty);
        let output = m.output.full_type(&m.return_type);
        let body = match &m.default {
            Some(block) => quote!({ async move #block }),
            None => quote!(;),
        };
        quote! {
            #(#attrs)*
            fn #name(&self, #(#pats: #tys),*)
                -> impl #p::Future<Output = #output> + #p::Send #body
        }
    });
    quote! {
        #(#attrs)*
        #vis trait #ident #colon #(#supertraits)+* {
            #(#methods)*
        }
    }
}

fn arg_idents(m: &Method) -> Vec<Ident> {
    (0..m.args.len())
        .map(|i| format_ident!("__arg{}", i))
        .collect()
}

/// The number of values a client method sends in its argument array and the closure that
/// writes them, one call per argument spanned at its type: a type that cannot be sent is
/// reported there. An argument stream is not among them: it travels beside the call.
fn write_args(p: &TokenStream, m: &Method) -> (u32, TokenStream) {
    let values: Vec<_> = arg_idents(m)
        .into_iter()
        .zip(&m.args)
        .filter(|(_, a)| a.stream.is_none())
        .collect();
    let count = values.len() as u32;
    if count == 0 {
        return (count, quote!(|_| #p::Ok(())));
    }
    let writes = values.into_iter().map(|(ident, a)| {
        let ty = &a.ty;
        quote_spanned!(ty.span()=> __writer.arg::<#ty>(&#ident)?;)
    });
    // `move`: the closure is a type argument of the call's future, which must be
    // `'static`; it owns the arguments until it has written them.
    (count, quote!(move |__writer| { #(#writes)* #p::Ok(()) }))
}

/// The argument stream of a method, if it takes one: its ident in the generated code
/// (`__argN`) and its item type.
fn input_stream(m: &Method) -> Option<(Ident, &syn::Type)> {
    arg_idents(m)
        .into_iter()
        .zip(&m.args)
        .find_map(|(ident, a)| a.stream.as_ref().map(|item| (ident, item)))
}

/// What a client method of a call returns and the `ClientCore` call that makes it: an
/// ordinary call, one returning a stream, or one taking an argument stream. Each type is
/// an explicit generic argument, so that one that cannot be sent or received is reported
/// at the type.
fn client_call(tr: &Trait, m: &Method, core: &TokenStream) -> (TokenStream, TokenStream) {
    let p = private(tr);
    let krate = &tr.krate;
    let method = method_static(&p, m);
    let (count, write) = write_args(&p, m);
    let input = input_stream(m);
    if let Some(item) = &m.result_stream {
        let (input_ty, input) = match &input {
            Some((ident, ty)) => (quote!(#ty), quote!(#p::Some(#ident))),
            None => (quote!(()), quote!(#p::None::<#krate::stream::Receiver<()>>)),
        };
        let receiver = quote!(#krate::stream::Receiver<#item>);
        return match &m.output {
            Output::Result { err, .. } => (
                quote!(#p::Result<#receiver, #krate::CallError<#err>>),
                quote!(#core.call_stream::<#item, #err, _, #input_ty>(
                    #method, #count, #write, #input
                )),
            ),
            _ => (
                quote!(#p::Result<#receiver, #krate::CallError>),
                quote!(#core.call_stream_plain::<#item, _, #input_ty>(
                    #method, #count, #write, #input
                )),
            ),
        };
    }
    if let Some((ident, item)) = &input {
        return match &m.output {
            Output::Result { ok, err } => (
                quote!(#p::Result<#ok, #krate::CallError<#err>>),
                quote!(#core.call_input::<#ok, #err, _, #item>(#method, #count, #write, #ident)),
            ),
            Output::Plain(ty) => (
                quote!(#p::Result<#ty, #krate::CallError>),
                quote!(#core.call_input_plain::<#ty, _, #item>(#method, #count, #write, #ident)),
            ),
            Output::Unit => (
                quote!(#p::Result<(), #krate::CallError>),
                quote!(#core.call_input_plain::<(), _, #item>(#method, #count, #write, #ident)),
            ),
        };
    }
    match &m.output {
        Output::Result { ok, err } => (
            quote!(#p::Result<#ok, #krate::CallError<#err>>),
            quote!(#core.call::<#ok, #err, _>(#method, #count, #write)),
        ),
        Output::Plain(ty) => (
            quote!(#p::Result<#ty, #krate::CallError>),
            quote!(#core.call_plain::<#ty, _>(#method, #count, #write)),
        ),
        Output::Unit => (
            quote!(#p::Result<(), #krate::CallError>),
            quote!(#core.call_plain::<(), _>(#method, #count, #write)),
        ),
    }
}

/// What the client method of a method with a stream adds to its docs.
fn stream_doc(m: &Method) -> Option<String> {
    let input = m.args.iter().any(|a| a.stream.is_some()).then(|| {
        "The `Receiver` argument is sent as the call's argument stream while the call runs: \
         dropping its `Sender` ends it normally; once the callee stops reading, the \
         `Sender` fails with `Closed`."
            .to_owned()
    });
    let result = m.result_stream.as_ref().map(|_| {
        "Resolves once the callee opened the result stream (the deadline covers this \
         only); the stream then runs until its end, until its `Receiver` is dropped (which \
         cancels it on the callee), the connection's close, or its idle timeout."
            .to_owned()
    });
    match (input, result) {
        (None, None) => None,
        (Some(one), None) | (None, Some(one)) => Some(one),
        (Some(input), Some(result)) => Some(format!("{input} {result}")),
    }
}

/// The method's `&'static Method`: its name, and its name as MessagePack.
fn method_static(p: &TokenStream, m: &Method) -> TokenStream {
    let name = &m.ident;
    let wire_name = name.unraw().to_string();
    let wire_bytes = syn::LitByteStr::new(&msgpack_str(&wire_name), name.span());
    // A `static`, not a promoted `&Method { .. }`: it stays `'static` whatever `Method`
    // holds.
    quote!({
        static METHOD: #p::Method = #p::Method { name: #wire_name, wire: #wire_bytes };
        &METHOD
    })
}

fn client(tr: &Trait) -> TokenStream {
    let p = private(tr);
    let krate = &tr.krate;
    let krate_doc = quote!(#krate).to_string().replace(' ', "");
    let vis = &tr.vis;
    let trait_ident = &tr.ident;
    let client = format_ident!("{}Client", tr.ident);
    let doc = format!(
        "Client of a remote [`{trait_ident}`] object, generated by `#[remote]`.\n\n\
         Create it with [`{client}::new`] from a [`Peer`]({krate_doc}::Peer) and the \
         name the object is registered under on the other side. Cheap to clone."
    );
    let methods = tr.methods.iter().map(|m| {
        let name = &m.ident;
        let method = method_static(&p, m);
        let attrs = &m.attrs;
        let idents = arg_idents(m);
        let tys: Vec<_> = m.args.iter().map(|a| &a.ty).collect();
        if let Some(signal) = m.signal {
            let ttl = match signal.ttl_ms {
                Some(ms) => quote!(#p::Some(#p::Duration::from_millis(#ms))),
                None => quote!(#p::None),
            };
            let persistent = signal.persistent;
            let kind = if persistent {
                "A persistent signal: stored (with a store) before the future resolves"
            } else {
                "A signal: queued when awaited"
            };
            let doc = format!(
                "{kind}, without a reply. While the peer's outbox is full the future waits \
                 for room (`WhenFull::Wait`, the default), at most the signal's TTL, then \
                 fails with `SignalError::Expired`."
            );
            let (count, write) = write_args(&p, m);
            quote! {
                #(#attrs)*
                ///
                #[doc = #doc]
                #vis fn #name(&self, #(#idents: #tys),*)
                    -> impl #p::Future<
                        Output = #p::Result<#krate::Sent, #krate::SignalError>,
                    > + #p::Send + 'static
                {
                    self.__core.signal(#method, #ttl, #persistent, #count, #write)
                }
            }
        } else {
            let core = if m.idempotent.is_some() {
                quote!(self.__core.idempotent())
            } else {
                quote!(self.__core)
            };
            let (ret, call) = client_call(tr, m, &core);
            let span = m
                .return_type
                .as_ref()
                .map_or_else(proc_macro2::Span::call_site, |t| t.span());
            let future = quote_spanned!(span=> impl #p::Future<Output = #ret> + #p::Send + 'static);
            let stream_doc = stream_doc(m).map(|doc| quote!(#[doc = ""] #[doc = #doc]));
            // The return type names the parts of a `#[result]` alias as
            // `<Alias as RemoteResult>::Err`: complex, but not the user's to simplify.
            quote! {
                #(#attrs)*
                #stream_doc
                #[allow(clippy::type_complexity)]
                #vis fn #name(&self, #(#idents: #tys),*) -> #future {
                    #call
                }
            }
        }
    });
    quote! {
        #[doc = #doc]
        #vis struct #client {
            __core: #p::ClientCore,
        }

        impl #p::Clone for #client {
            fn clone(&self) -> Self {
                #client { __core: #p::Clone::clone(&self.__core) }
            }
        }

        impl #p::fmt::Debug for #client {
            fn fmt(&self, f: &mut #p::fmt::Formatter<'_>) -> #p::fmt::Result {
                #p::fmt::Debug::fmt(&self.__core, f)
            }
        }

        impl #client {
            /// A client of the object registered as `object` on the other side of `peer`.
            #vis fn new(peer: &#krate::Peer, object: &str) -> Self {
                #client { __core: #p::ClientCore::new(peer, object) }
            }

            /// The same client with another deadline for its calls.
            #vis fn with_deadline(&self, deadline: #p::Duration) -> Self {
                #client { __core: self.__core.with_deadline(deadline) }
            }

            /// The same client with another TTL for its signals.
            #vis fn with_ttl(&self, ttl: #p::Duration) -> Self {
                #client { __core: self.__core.with_ttl(ttl) }
            }

            /// The same client, sending `key: value` as metadata with each call and
            /// signal (the handler reads it from its `CallContext`).
            #vis fn with_metadata(&self, key: &str, value: &str) -> Self {
                #client { __core: self.__core.with_metadata(key, value) }
            }

            /// The same client, sending `trace` as the W3C trace context of each call and
            /// signal.
            #vis fn with_trace_parent(&self, trace: #krate::TraceParent) -> Self {
                #client { __core: self.__core.with_trace_parent(trace) }
            }

            /// The same client with every signal persistent, as if each were marked
            /// `#[signal(persistent)]`.
            #vis fn persistent(&self) -> Self {
                #client { __core: self.__core.persistent() }
            }

            /// The deadline of this client's calls.
            #vis fn deadline(&self) -> #p::Duration {
                self.__core.deadline()
            }

            /// What this client calls through.
            #vis fn peer(&self) -> &#krate::Peer {
                self.__core.peer()
            }

            /// The name of the remote object.
            #vis fn object(&self) -> &str {
                self.__core.object()
            }

            #(#methods)*
        }
    }
}

fn server(tr: &Trait) -> TokenStream {
    let p = private(tr);
    let krate = &tr.krate;
    let krate_doc = quote!(#krate).to_string().replace(' ', "");
    let vis = &tr.vis;
    let trait_ident = &tr.ident;
    let server = format_ident!("{}Server", tr.ident);
    let server_name = server.to_string();
    let description = crate::describe::description_fn(tr);
    let shapes = crate::describe::shapes_fn(tr);
    let doc = format!(
        "Serves any `impl {trait_ident}` as a remote object, generated by `#[remote]`.\n\n\
         Register it on a [`Peer`]({krate_doc}::Peer) with \
         `peer.register(\"name\", {server}::new(object))`."
    );
    let arms = tr.methods.iter().map(|m| dispatch_arm(tr, m));
    quote! {
        #[doc = #doc]
        #vis struct #server<__T> {
            __object: #p::Arc<__T>,
        }

        impl<__T> #server<__T> {
            /// Wraps an object to register it on a peer.
            #vis fn new(object: __T) -> Self {
                #server { __object: #p::Arc::new(object) }
            }

            /// Wraps a shared object (to register it on many peers).
            #vis fn from_arc(object: #p::Arc<__T>) -> Self {
                #server { __object: object }
            }

            /// The wrapped object.
            #vis fn object(&self) -> &#p::Arc<__T> {
                &self.__object
            }
        }

        impl<__T> #p::Clone for #server<__T> {
            fn clone(&self) -> Self {
                #server { __object: #p::Clone::clone(&self.__object) }
            }
        }

        impl<__T> #p::fmt::Debug for #server<__T> {
            fn fmt(&self, f: &mut #p::fmt::Formatter<'_>) -> #p::fmt::Result {
                f.write_str(#server_name)
            }
        }

        impl<__T> #krate::Service for #server<__T>
        where
            __T: #trait_ident + #p::Send + #p::Sync + 'static,
        {
            fn __dispatch(
                &self,
                __method: &[u8],
                __args: &[u8],
                __handlers: &mut #p::Handlers,
            ) -> #p::Dispatch {
                match __method {
                    #(#arms)*
                    _ => #p::Dispatch::NoSuchMethod,
                }
            }

            #description

            #shapes
        }
    }
}

/// The `__dispatch` arm of one method: decode its arguments (and take its argument
/// stream), then put its handler in place.
fn dispatch_arm(tr: &Trait, m: &Method) -> TokenStream {
    let p = private(tr);
    let trait_ident = &tr.ident;
    let name = &m.ident;
    let wire_name = name.unraw().to_string();
    let idents = arg_idents(m);
    let invoke = quote!(<__T as #trait_ident>::#name(&*__this, #(#idents),*).await);
    let input = input_stream(m);
    let (variant, body) = if m.signal.is_some() {
        (quote!(signal), quote!({ #invoke; }))
    } else if let Some(item) = &m.result_stream {
        (quote!(stream), open_stream(&p, m, item, &invoke))
    } else if input.is_some() {
        let reply = reply(&p, m, &invoke);
        (quote!(stream), quote!(#p::StreamReply::reply(#reply)))
    } else {
        (quote!(call), reply(&p, m, &invoke))
    };
    let wire_bytes = syn::LitByteStr::new(wire_name.as_bytes(), name.span());
    let values: Vec<_> = idents
        .iter()
        .zip(&m.args)
        .filter(|(_, a)| a.stream.is_none())
        .collect();
    let decode = if values.is_empty() {
        quote!(#p::decode_no_args(#wire_name, __args))
    } else {
        // One call per argument, spanned at its type: a type that cannot be received
        // is reported there.
        let count = values.len() as u32;
        let reads = values.iter().map(|(_, a)| {
            let ty = &a.ty;
            quote_spanned!(ty.span()=> __reader.arg::<#ty>()?)
        });
        quote!(#p::decode_args(#wire_name, __args, #count, |__reader| {
            #p::Ok((#(#reads,)*))
        }))
    };
    let value_idents = values.iter().map(|(ident, _)| ident);
    let take_input = input.map(|(ident, item)| {
        let input = quote_spanned!(item.span()=> __handlers.input::<#item>());
        quote!(let #ident = #input;)
    });
    quote! {
        #wire_bytes => {
            let (#(#value_idents,)*) = match #decode {
                #p::Ok(__decoded) => __decoded,
                #p::Err(__failed) => return __failed,
            };
            #take_input
            let __this = #p::Clone::clone(&self.__object);
            __handlers.#variant(async move { #body })
        }
    }
}

/// The handler body of a call: the reply to `invoke`'s outcome. As on the client, each
/// type is an explicit generic argument: one that cannot be sent is reported at the type.
fn reply(p: &TokenStream, m: &Method, invoke: &TokenStream) -> TokenStream {
    match &m.output {
        Output::Result { ok, err } => {
            let reply_ok = quote_spanned!(ok.span()=> #p::reply_ok::<#ok>);
            let app_error = app_error(p, err);
            quote! {
                match #invoke {
                    #p::Ok(__value) => #reply_ok(&__value),
                    #p::Err(__error) => #app_error,
                }
            }
        }
        Output::Plain(ty) => {
            let reply_ok = quote_spanned!(ty.span()=> #p::reply_ok::<#ty>);
            quote!(#reply_ok(&#invoke))
        }
        Output::Unit => quote!(#p::reply_ok::<()>(&#invoke)),
    }
}

/// The handler body of a method returning a stream of `item`s: opens it, or replies with
/// the application error.
fn open_stream(p: &TokenStream, m: &Method, item: &syn::Type, invoke: &TokenStream) -> TokenStream {
    let open = quote_spanned!(item.span()=> #p::StreamReply::open::<#item>);
    match &m.output {
        Output::Result { err, .. } => {
            let app_error = app_error(p, err);
            quote! {
                match #invoke {
                    #p::Ok(__stream) => #open(__stream),
                    #p::Err(__error) => #p::StreamReply::reply(#app_error),
                }
            }
        }
        _ => quote!(#open(#invoke)),
    }
}

/// The reply to the application error `__error` of type `err`, with its context.
fn app_error(p: &TokenStream, err: &syn::Type) -> TokenStream {
    let reply_err = quote_spanned!(err.span()=> #p::reply_app_error::<#err>);
    quote!({
        #[allow(unused_imports, clippy::needless_borrow)]
        use #p::{CtxDisplay as _, CtxError as _, CtxNone as _};
        #[allow(clippy::needless_borrow)] // the borrows select the impl
        let __context = (&&&#p::Ctx(&__error)).__context();
        #reply_err(&__error, __context)
    })
}

/// `name` as a MessagePack string in its shortest form, as chatter-rpc's envelopes carry
/// method names (generated clients copy it into every request instead of encoding it).
fn msgpack_str(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + name.len());
    chatter_msgpack::write_str(&mut out, name);
    out
}

#[cfg(test)]
mod tests {
    use super::msgpack_str;

    #[test]
    fn method_names_are_encoded_as_msgpack_strings() {
        // chatter-msgpack's writers are checked against rmp's in that crate; this pins the
        // forms a generated client embeds.
        assert_eq!(msgpack_str("add"), b"\xa3add");
        assert_eq!(msgpack_str(&"m".repeat(32))[..2], [0xd9, 32]);
        assert_eq!(msgpack_str(&"m".repeat(256))[..3], [0xda, 0x01, 0x00]);
        assert_eq!(
            msgpack_str(&"m".repeat(70_000))[..5],
            [0xdb, 0x00, 0x01, 0x11, 0x70]
        );
        let name = "añadir_número";
        assert_eq!(msgpack_str(name)[0], 0xa0 | name.len() as u8);
        assert_eq!(msgpack_str(name)[1..], *name.as_bytes());
    }
}
