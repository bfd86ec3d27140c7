//! Pieces shared by `#[braid::remote]` and `#[braid::actor]`: signature
//! checks, argument lists and small type rewrites.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, ToTokens};
use syn::ext::IdentExt;
use syn::visit::Visit;
use syn::visit_mut::VisitMut;
use syn::{Attribute, FnArg, Ident, Pat, ReturnType, Signature, Type};

/// Collects every error found in one item so the user sees them all at once.
#[derive(Default)]
pub(crate) struct Errors {
    error: Option<syn::Error>,
    count: usize,
}

impl Errors {
    /// Records an error.
    pub(crate) fn push(&mut self, error: syn::Error) {
        self.count += 1;
        match &mut self.error {
            Some(first) => first.combine(error),
            None => self.error = Some(error),
        }
    }

    /// How many errors have been recorded so far.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// Records an error spanning `tokens`.
    pub(crate) fn spanned<T: ToTokens, M: std::fmt::Display>(&mut self, tokens: T, message: M) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    /// `Err` with every recorded error, or `Ok` if there were none.
    pub(crate) fn finish(self) -> syn::Result<()> {
        match self.error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// One argument of a remote function, actor method or actor constructor.
pub(crate) struct Param {
    /// The name used in the generated public signature (`remote`, handle
    /// methods): the user's own name unless it clashes with a generated one.
    pub(crate) name: Ident,
    /// The argument's type, as written.
    pub(crate) ty: Type,
}

/// What is being checked, for error messages.
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    /// A `#[braid::remote]` free function.
    Function,
    /// A method of a `#[braid::actor]` impl.
    Method,
    /// The `new` constructor of a `#[braid::actor]` impl.
    Constructor,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Function => "remote function",
            Kind::Method => "actor method",
            Kind::Constructor => "actor constructor",
        }
    }

    fn local_hint(self) -> &'static str {
        match self {
            Kind::Method => " (or mark the method `#[braid(local)]` to keep it local)",
            Kind::Function | Kind::Constructor => "",
        }
    }
}

/// Checks what every remote-callable signature must satisfy: no generics,
/// no `where` clause, not `unsafe`, not variadic, owned return type.
pub(crate) fn check_signature(sig: &Signature, kind: Kind, errors: &mut Errors) {
    let noun = kind.noun();
    let hint = kind.local_hint();
    if !sig.generics.params.is_empty() {
        errors.spanned(
            &sig.generics,
            format!(
                "{noun}s cannot be generic: the worker must know the concrete types to decode \
                 the arguments{hint}"
            ),
        );
    } else if let Some(where_clause) = &sig.generics.where_clause {
        errors.spanned(
            where_clause,
            format!("{noun}s cannot have a `where` clause{hint}"),
        );
    }
    if let Some(unsafety) = &sig.unsafety {
        errors.spanned(unsafety, format!("{noun}s cannot be `unsafe`{hint}"));
    }
    if let Some(variadic) = &sig.variadic {
        errors.spanned(variadic, format!("{noun}s cannot be variadic"));
    }
    if let ReturnType::Type(_, ty) = &sig.output {
        check_owned(ty, &format!("{noun} return types"), hint, errors);
    }
}

/// Reads the typed (non-receiver) arguments of `sig`.
///
/// Arguments must be plain identifiers (`x` or `mut x`; `_` is accepted and
/// given a generated name) of owned types. A name listed in `reserved`
/// (names the generated signature already uses) is replaced by
/// `__braid_argN` in the generated signature. Receivers are skipped: the
/// caller decides what to do with them.
pub(crate) fn params(
    sig: &Signature,
    kind: Kind,
    reserved: &[&str],
    errors: &mut Errors,
) -> Vec<Param> {
    let noun = kind.noun();
    let hint = kind.local_hint();
    let mut out = Vec::new();
    for (index, arg) in sig.inputs.iter().enumerate() {
        let FnArg::Typed(pat_type) = arg else {
            continue;
        };
        if let Some(attr) = pat_type.attrs.first() {
            errors.spanned(
                attr,
                format!("attributes on {noun} arguments are not supported"),
            );
        }
        let generated = || format_ident!("__braid_arg{}", index);
        let name = match &*pat_type.pat {
            Pat::Ident(pat) if pat.by_ref.is_none() && pat.subpat.is_none() => {
                let unraw = pat.ident.unraw().to_string();
                if reserved.contains(&unraw.as_str()) || unraw.starts_with("__braid") {
                    generated()
                } else {
                    pat.ident.clone()
                }
            }
            Pat::Wild(_) => generated(),
            other => {
                errors.spanned(
                    other,
                    format!(
                        "{noun} arguments must be plain identifiers (`name: Type` or \
                         `mut name: Type`); destructure inside the body instead"
                    ),
                );
                generated()
            }
        };
        check_owned(&pat_type.ty, &format!("{noun} arguments"), hint, errors);
        out.push(Param {
            name,
            ty: (*pat_type.ty).clone(),
        });
    }
    out
}

/// Rejects types that cannot be decoded into an owned value on a worker:
/// references, non-`'static` lifetimes and `impl Trait`.
pub(crate) fn check_owned(ty: &Type, what: &str, hint: &str, errors: &mut Errors) {
    struct Owned<'a> {
        what: &'a str,
        hint: &'a str,
        error: Option<syn::Error>,
    }

    impl<'ast> Visit<'ast> for Owned<'_> {
        fn visit_type(&mut self, ty: &'ast Type) {
            if self.error.is_some() {
                return;
            }
            match ty {
                Type::Reference(_) => {
                    self.error = Some(syn::Error::new_spanned(
                        ty,
                        format!(
                            "{} must be owned types: a reference cannot be decoded on a worker; \
                             use an owned type such as `String` or `Vec<T>`{}",
                            self.what, self.hint
                        ),
                    ));
                }
                Type::ImplTrait(_) => {
                    self.error = Some(syn::Error::new_spanned(
                        ty,
                        format!(
                            "`impl Trait` is not supported in {}; use a concrete type{}",
                            self.what, self.hint
                        ),
                    ));
                }
                _ => syn::visit::visit_type(self, ty),
            }
        }

        fn visit_lifetime(&mut self, lifetime: &'ast syn::Lifetime) {
            if self.error.is_none() && lifetime.ident != "static" {
                self.error = Some(syn::Error::new_spanned(
                    lifetime,
                    format!(
                        "{} must be owned types: borrowed data cannot be decoded on a worker{}",
                        self.what, self.hint
                    ),
                ));
            }
        }
    }

    let mut visitor = Owned {
        what,
        hint,
        error: None,
    };
    visitor.visit_type(ty);
    if let Some(error) = visitor.error {
        errors.push(error);
    }
}

/// The type a signature returns, `()` when it has no return type.
pub(crate) fn return_type(sig: &Signature) -> Type {
    match &sig.output {
        ReturnType::Default => syn::parse_quote!(()),
        ReturnType::Type(_, ty) => (**ty).clone(),
    }
}

/// `T` and `E` of a return type written `Result<T, E>` (any path ending in
/// `Result` with two type arguments): a task or method returning it
/// yields `T`, and its `Err` becomes the caller's `braid::Error`.
pub(crate) fn result_parts(ty: &Type) -> Option<(Type, Type)> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let mut types = args.args.iter().filter_map(|a| match a {
        syn::GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    });
    let (ok, err) = (types.next()?, types.next()?);
    types.next().is_none().then_some((ok, err))
}

/// The type a caller gets from a function returning `ty`: `T` of a
/// `Result<T, E>`, else `ty` itself.
pub(crate) fn public_return(ty: &Type) -> Type {
    result_parts(ty).map_or_else(|| ty.clone(), |(ok, _)| ok)
}

/// Encodes `__braid_ret`, of type `ty`, as the call's outcome: the value,
/// or for a `Result` its `Ok` value and its `Err` as
/// `braid::Error::Application` naming `function`.
pub(crate) fn encode_outcome(ty: &Type, function: &TokenStream) -> TokenStream {
    if result_parts(ty).is_some() {
        quote! {
            match __braid_ret {
                ::core::result::Result::Ok(__braid_ok) => {
                    ::braid::__private::encode_return(&__braid_ok)
                }
                ::core::result::Result::Err(__braid_err) => ::core::result::Result::Err(
                    ::braid::__app_error!(#function, __braid_err),
                ),
            }
        }
    } else {
        quote!(::braid::__private::encode_return(&__braid_ret))
    }
}

/// Replaces every bare `Self` type inside `ty` by `self_ty`, for signatures
/// copied out of an impl block into an impl of another type.
pub(crate) fn replace_self(ty: &Type, self_ty: &Type) -> Type {
    struct ReplaceSelf<'a>(&'a Type);

    impl VisitMut for ReplaceSelf<'_> {
        fn visit_type_mut(&mut self, ty: &mut Type) {
            if let Type::Path(path) = ty {
                if path.qself.is_none() && path.path.is_ident("Self") {
                    *ty = self.0.clone();
                    return;
                }
            }
            syn::visit_mut::visit_type_mut(self, ty);
        }
    }

    let mut ty = ty.clone();
    ReplaceSelf(self_ty).visit_type_mut(&mut ty);
    ty
}

/// Rewrites relative `super::` paths inside `ty` as `super::super::`, for
/// types moved one module deeper (into the module `#[braid::remote]` adds).
pub(crate) fn deepen_super(ty: &Type) -> Type {
    struct DeepenSuper;

    impl VisitMut for DeepenSuper {
        fn visit_path_mut(&mut self, path: &mut syn::Path) {
            let starts_with_super = path.leading_colon.is_none()
                && path
                    .segments
                    .first()
                    .is_some_and(|segment| segment.ident == "super");
            if starts_with_super {
                path.segments.insert(
                    0,
                    syn::PathSegment::from(Ident::new("super", Span::call_site())),
                );
            }
            syn::visit_mut::visit_path_mut(self, path);
        }
    }

    let mut ty = ty.clone();
    DeepenSuper.visit_type_mut(&mut ty);
    ty
}

/// The expression that encodes `params` into a
/// `::braid::Result<Vec<::braid::Arg>>`, stopping at the first failure.
pub(crate) fn encode_args(params: &[(Ident, Type)]) -> TokenStream {
    if params.is_empty() {
        return quote! {
            ::core::result::Result::<::std::vec::Vec<::braid::Arg>, ::braid::Error>::Ok(
                ::std::vec::Vec::new(),
            )
        };
    }
    let encoded = params
        .iter()
        .map(|(name, ty)| quote!(::braid::IntoArg::<#ty>::into_arg(#name)?));
    quote! {
        (move || -> ::braid::Result<::std::vec::Vec<::braid::Arg>> {
            ::core::result::Result::Ok(::std::vec![#(#encoded),*])
        })()
    }
}

/// Statements decoding `count` arguments from `args` (an
/// `::braid::__private::Args` binding) into `__braid_arg0..`, after checking
/// the count against `name` (an expression of type `&'static str`).
pub(crate) fn decode_args(args: &Ident, types: &[Type], name: &TokenStream) -> TokenStream {
    let count = types.len();
    let decoded = types.iter().enumerate().map(|(index, ty)| {
        let local = decoded_ident(index);
        quote!(let #local: #ty = #args.decode(#index)?;)
    });
    quote! {
        #args.expect_len(#count, #name)?;
        #(#decoded)*
    }
}

/// The local bound to the `index`th decoded argument by [`decode_args`].
pub(crate) fn decoded_ident(index: usize) -> Ident {
    format_ident!("__braid_arg{}", index)
}

/// `#[cfg(..)]` attributes of an item, to repeat on what is generated from it.
pub(crate) fn cfg_attrs(attrs: &[Attribute]) -> Vec<&Attribute> {
    attrs
        .iter()
        .filter(|attr| attr.path().is_ident("cfg"))
        .collect()
}

/// `#[deprecated]` attributes of an item, to repeat on its remote stubs.
pub(crate) fn deprecated_attrs(attrs: &[Attribute]) -> Vec<&Attribute> {
    attrs
        .iter()
        .filter(|attr| attr.path().is_ident("deprecated"))
        .collect()
}

/// Doc attributes of an item.
pub(crate) fn doc_attrs(attrs: &[Attribute]) -> Vec<&Attribute> {
    attrs
        .iter()
        .filter(|attr| attr.path().is_ident("doc"))
        .collect()
}

/// Fails if the attribute was given arguments (`#[braid::remote(..)]`).
pub(crate) fn no_arguments(attr: &TokenStream, macro_name: &str) -> syn::Result<()> {
    if attr.is_empty() {
        Ok(())
    } else {
        Err(syn::Error::new_spanned(
            attr,
            format!("`#[braid::{macro_name}]` takes no arguments"),
        ))
    }
}
