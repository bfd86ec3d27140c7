//! Expansion tests: run the macros on sample items, check that the output
//! parses as a Rust file and holds the expected items or errors.

use proc_macro2::TokenStream;
use quote::{quote, ToTokens};
use syn::{File, ImplItem, Item, ItemImpl, ItemMod};

fn parse(tokens: TokenStream) -> File {
    match syn::parse2::<File>(tokens.clone()) {
        Ok(file) => file,
        Err(error) => panic!("expansion does not parse: {error}\n{tokens}"),
    }
}

fn remote(item: TokenStream) -> File {
    parse(crate::remote::expand(TokenStream::new(), item))
}

fn actor(item: TokenStream) -> File {
    parse(crate::actor::expand(TokenStream::new(), item))
}

/// Messages of the `compile_error!` invocations in an expansion.
fn errors(file: &File) -> Vec<String> {
    file.items
        .iter()
        .filter_map(|item| match item {
            Item::Macro(mac) if mac.mac.path.segments.last()?.ident == "compile_error" => {
                let message: syn::LitStr = mac.mac.parse_body().ok()?;
                Some(message.value())
            }
            _ => None,
        })
        .collect()
}

fn assert_error(file: &File, needle: &str) {
    let errors = errors(file);
    assert!(
        errors.iter().any(|error| error.contains(needle)),
        "expected an error containing {needle:?}, got {errors:?}"
    );
}

fn assert_no_errors(file: &File) {
    assert_eq!(errors(file), Vec::<String>::new());
}

fn text<T: ToTokens>(tokens: &T) -> String {
    tokens.to_token_stream().to_string()
}

fn find_mod<'a>(file: &'a File, name: &str) -> &'a ItemMod {
    file.items
        .iter()
        .find_map(|item| match item {
            Item::Mod(module) if module.ident == name => Some(module),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no module `{name}` in {}", text(file)))
}

fn mod_items(module: &ItemMod) -> &[Item] {
    &module.content.as_ref().expect("inline module").1
}

fn fn_names(items: &[Item]) -> Vec<String> {
    items
        .iter()
        .filter_map(|item| match item {
            Item::Fn(function) => Some(function.sig.ident.to_string()),
            _ => None,
        })
        .collect()
}

/// Inherent or trait impls whose self type prints as `self_ty`.
fn impls_for<'a>(file: &'a File, self_ty: &str) -> Vec<&'a ItemImpl> {
    file.items
        .iter()
        .filter_map(|item| match item {
            Item::Impl(block) if text(&block.self_ty) == self_ty => Some(block),
            _ => None,
        })
        .collect()
}

fn impl_fn_names(block: &ItemImpl) -> Vec<String> {
    block
        .items
        .iter()
        .filter_map(|item| match item {
            ImplItem::Fn(function) => Some(function.sig.ident.to_string()),
            _ => None,
        })
        .collect()
}

fn count_compile_errors(tokens: &TokenStream) -> usize {
    tokens.to_string().matches("compile_error").count()
}

// ---------------------------------------------------------------- remote ---

#[test]
fn remote_sync_function() {
    let file = remote(quote! {
        /// Adds.
        pub fn add(a: i64, b: i64) -> i64 {
            a + b
        }
    });
    assert_no_errors(&file);

    let original = file
        .items
        .iter()
        .find_map(|item| match item {
            Item::Fn(function) if function.sig.ident == "add" => Some(function),
            _ => None,
        })
        .expect("the function is kept");
    assert_eq!(text(&original.vis), "pub");
    assert!(text(original).contains("a + b"));

    let name_const = file.items.iter().find_map(|item| match item {
        Item::Const(constant) if constant.ident == "__BRAID_REMOTE_NAME_add" => Some(constant),
        _ => None,
    });
    let name_const = name_const.expect("name const at the outer level");
    let name_expr = text(&name_const.expr);
    assert!(name_expr.contains("module_path"), "{name_expr}");
    assert!(name_expr.contains("\"add\""), "{name_expr}");

    let module = find_mod(&file, "add");
    assert_eq!(text(&module.vis), "pub");
    let items = mod_items(module);
    assert!(items
        .iter()
        .any(|item| matches!(item, Item::Use(u) if text(u).contains("super :: *"))));
    let functions = fn_names(items);
    assert!(functions.contains(&"remote".to_string()), "{functions:?}");
    assert!(
        functions.contains(&"remote_with".to_string()),
        "{functions:?}"
    );

    let remote_fn = items
        .iter()
        .find_map(|item| match item {
            Item::Fn(function) if function.sig.ident == "remote" => Some(function),
            _ => None,
        })
        .expect("remote");
    let sig = text(&remote_fn.sig);
    assert!(sig.contains("rt : & :: braid :: Runtime"), "{sig}");
    assert!(
        sig.contains("a : impl :: braid :: IntoArg < i64 >"),
        "{sig}"
    );
    assert!(
        sig.contains("b : impl :: braid :: IntoArg < i64 >"),
        "{sig}"
    );
    assert!(
        sig.contains(":: braid :: Result < :: braid :: ObjectRef < i64 > >"),
        "{sig}"
    );
    let body = text(&remote_fn.block);
    assert!(body.contains("submit_task :: < i64 >"), "{body}");
    assert!(body.contains("TaskOptions :: default"), "{body}");

    let remote_with = items
        .iter()
        .find_map(|item| match item {
            Item::Fn(function) if function.sig.ident == "remote_with" => Some(function),
            _ => None,
        })
        .expect("remote_with");
    assert!(text(&remote_with.sig).contains("opts : & :: braid :: TaskOptions"));

    let module_text = text(module);
    assert!(module_text.contains("pub const NAME : & str = super :: __BRAID_REMOTE_NAME_add"));
    assert!(module_text.contains("distributed_slice (:: braid :: __private :: REMOTE_FUNCTIONS)"));
    assert!(module_text.contains("linkme (crate = :: braid :: __private :: linkme)"));
    assert!(module_text.contains("Invoke :: Sync (self :: __braid_invoke)"));
    assert!(module_text.contains("expect_len (2usize , self :: NAME)"));
    assert!(module_text.contains("let __braid_arg1 : i64 = __braid_args . decode (1usize) ?"));
    assert!(module_text.contains("super :: add (__braid_arg0 , __braid_arg1)"));
}

#[test]
fn remote_async_function() {
    let file = remote(quote! {
        pub(crate) async fn fetch(url: String) -> Vec<u8> {
            Vec::new()
        }
    });
    assert_no_errors(&file);
    let module = find_mod(&file, "fetch");
    assert_eq!(text(&module.vis), "pub (crate)");
    let module_text = text(module);
    assert!(module_text.contains("Invoke :: Async (self :: __braid_invoke)"));
    assert!(module_text.contains("BoxFuture < 'static"));
    assert!(module_text.contains("Box :: pin (async move"));
    assert!(module_text.contains("super :: fetch (__braid_arg0) . await"));
    assert!(module_text.contains("ObjectRef < Vec < u8 > >"));
}

#[test]
fn remote_unit_return_and_no_arguments() {
    let file = remote(quote! {
        fn tick() {}
    });
    assert_no_errors(&file);
    let module = find_mod(&file, "tick");
    let module_text = text(module);
    assert!(module_text.contains("ObjectRef < () >"), "{module_text}");
    assert!(
        module_text.contains("submit_task :: < () >"),
        "{module_text}"
    );
    assert!(module_text.contains("expect_len (0usize"), "{module_text}");
}

#[test]
fn remote_renames_arguments_that_clash_with_generated_names() {
    let file = remote(quote! {
        pub fn clash(rt: u8, opts: u8, args: u8, mut x: u8, _: u8) -> u8 {
            rt + opts + args + x
        }
    });
    assert_no_errors(&file);
    let module = find_mod(&file, "clash");
    let remote_with = mod_items(module)
        .iter()
        .find_map(|item| match item {
            Item::Fn(function) if function.sig.ident == "remote_with" => Some(function),
            _ => None,
        })
        .expect("remote_with");
    let names: Vec<String> = remote_with
        .sig
        .inputs
        .iter()
        .map(|arg| match arg {
            syn::FnArg::Typed(pat) => text(&pat.pat),
            syn::FnArg::Receiver(_) => panic!("receiver"),
        })
        .collect();
    assert_eq!(
        names,
        [
            "rt",
            "opts",
            "__braid_arg0",
            "__braid_arg1",
            "args",
            "x",
            "__braid_arg4"
        ]
    );
}

#[test]
fn remote_moves_super_paths_one_level_down() {
    let file = remote(quote! {
        pub fn up(x: super::Thing) -> crate::Other {
            todo!()
        }
    });
    assert_no_errors(&file);
    let module_text = text(find_mod(&file, "up"));
    assert!(module_text.contains("IntoArg < super :: super :: Thing >"));
    assert!(module_text.contains("ObjectRef < crate :: Other >"));
}

#[test]
fn remote_keeps_cfg_on_generated_items() {
    let file = remote(quote! {
        #[cfg(feature = "x")]
        pub fn gated() {}
    });
    let module = find_mod(&file, "gated");
    assert!(module.attrs.iter().any(|attr| attr.path().is_ident("cfg")));
}

#[test]
fn remote_rejects_self() {
    let file = remote(quote! {
        fn method(&self, x: u8) -> u8 { x }
    });
    assert_error(&file, "remote functions cannot take `self`");
}

#[test]
fn remote_rejects_generics() {
    let file = remote(quote! {
        fn id<T>(x: T) -> T { x }
    });
    assert_error(&file, "remote functions cannot be generic");
    let file = remote(quote! {
        fn show(x: impl std::fmt::Display) {}
    });
    assert_error(
        &file,
        "`impl Trait` is not supported in remote function arguments",
    );
    let file = remote(quote! {
        fn bounded(x: u8) where u8: Copy {}
    });
    assert_error(&file, "cannot have a `where` clause");
}

#[test]
fn remote_rejects_patterns() {
    let file = remote(quote! {
        fn pair((a, b): (u8, u8)) -> u8 { a + b }
    });
    assert_error(&file, "remote function arguments must be plain identifiers");
}

#[test]
fn remote_rejects_borrowed_types() {
    let file = remote(quote! {
        fn len(s: &str) -> usize { s.len() }
    });
    assert_error(&file, "remote function arguments must be owned types");
    let file = remote(quote! {
        fn nested(v: Vec<&'static str>) {}
    });
    assert_error(&file, "remote function arguments must be owned types");
    let file = remote(quote! {
        fn cow(v: std::borrow::Cow<'a, str>) {}
    });
    assert_error(&file, "remote function arguments must be owned types");
    let file = remote(quote! {
        fn name() -> &'static str { "x" }
    });
    assert_error(&file, "remote function return types must be owned types");
    // `'static` data that is owned is fine.
    let file = remote(quote! {
        fn text(v: std::borrow::Cow<'static, str>) -> usize { v.len() }
    });
    assert_no_errors(&file);
}

#[test]
fn remote_reports_every_error_and_keeps_the_function() {
    let tokens = crate::remote::expand(
        TokenStream::new(),
        quote! {
            unsafe fn bad<T>(s: &str, (a, b): (u8, u8)) {}
        },
    );
    assert_eq!(count_compile_errors(&tokens), 4, "{tokens}");
    let file = parse(tokens);
    assert!(file
        .items
        .iter()
        .any(|item| matches!(item, Item::Fn(f) if f.sig.ident == "bad")));
    assert!(!file.items.iter().any(|item| matches!(item, Item::Mod(_))));
}

#[test]
fn remote_rejects_other_items_and_arguments() {
    let file = remote(quote! {
        struct NotAFunction;
    });
    assert_error(&file, "`#[braid::remote]` applies to a free function");
    let file = parse(crate::remote::expand(
        quote!(name = "x"),
        quote! {
            fn f() {}
        },
    ));
    assert_error(&file, "`#[braid::remote]` takes no arguments");
}

// ----------------------------------------------------------------- actor ---

#[test]
fn actor_struct() {
    let file = actor(quote! {
        /// Counts.
        pub struct Counter {
            value: u64,
        }
    });
    assert_no_errors(&file);
    let structs: Vec<_> = file
        .items
        .iter()
        .filter_map(|item| match item {
            Item::Struct(item) => Some(item),
            _ => None,
        })
        .collect();
    assert_eq!(structs.len(), 2);
    assert_eq!(structs[0].ident, "Counter");
    let handle = structs[1];
    assert_eq!(handle.ident, "CounterHandle");
    assert_eq!(text(&handle.vis), "pub");
    let handle_text = text(handle);
    assert!(handle_text.contains("Handle to a remote [`Counter`] actor."));
    assert!(handle_text.contains(":: braid :: __private :: serde :: Serialize"));
    assert!(handle_text.contains(":: braid :: __private :: serde :: Deserialize"));
    assert!(handle_text.contains("serde (crate = \"::braid::__private::serde\" , transparent)"));
    assert!(handle_text.contains("raw : :: braid :: ActorHandle"));

    let typed = impls_for(&file, "CounterHandle");
    assert_eq!(typed.len(), 1);
    let typed_text = text(typed[0]);
    assert!(typed_text.contains("impl :: braid :: TypedHandle for CounterHandle"));
    assert!(typed_text.contains("const CLASS : & 'static str = Counter :: BRAID_CLASS"));
    assert_eq!(impl_fn_names(typed[0]), ["from_raw", "raw"]);

    let class = impls_for(&file, "Counter");
    assert_eq!(class.len(), 1);
    let class_text = text(class[0]);
    assert!(class_text.contains("pub const BRAID_CLASS : & 'static str"));
    assert!(class_text.contains("module_path"));
    assert!(class_text.contains("\"Counter\""));
}

#[test]
fn actor_enum_and_visibility() {
    let file = actor(quote! {
        pub(crate) enum Machine { On, Off }
    });
    assert_no_errors(&file);
    let handle = file
        .items
        .iter()
        .find_map(|item| match item {
            Item::Struct(item) if item.ident == "MachineHandle" => Some(item),
            _ => None,
        })
        .expect("handle");
    assert_eq!(text(&handle.vis), "pub (crate)");
}

#[test]
fn actor_struct_rejects_generics() {
    let file = actor(quote! {
        pub struct Cache<T> { items: Vec<T> }
    });
    assert_error(&file, "actor types cannot be generic");
}

fn counter_impl() -> TokenStream {
    quote! {
        impl Counter {
            /// Builds a counter.
            pub fn new(start: u64) -> Self {
                Counter { value: start }
            }

            /// Adds `by` and returns the new value.
            pub fn incr(&mut self, by: u64) -> u64 {
                self.value += by;
                self.value
            }

            fn get(&self) -> u64 {
                self.value
            }

            async fn slow(&self, x: u32) -> u32 {
                x
            }

            fn reset(&mut self) {
                self.value = 0;
            }

            #[braid(local)]
            fn peek(&self) -> &u64 {
                &self.value
            }

            fn helper(x: u64) -> u64 {
                x
            }
        }
    }
}

#[test]
fn actor_impl() {
    let tokens = crate::actor::expand(TokenStream::new(), counter_impl());
    assert!(!tokens.to_string().contains("braid (local)"), "marker kept");
    let file = parse(tokens);
    assert_no_errors(&file);

    let counter_impls = impls_for(&file, "Counter");
    // The user's impl, `remote`, and `Dispatch`.
    assert_eq!(counter_impls.len(), 3, "{}", text(&file));
    let original = counter_impls[0];
    assert_eq!(
        impl_fn_names(original),
        ["new", "incr", "get", "slow", "reset", "peek", "helper"]
    );

    let constructor = counter_impls
        .iter()
        .find(|block| block.trait_.is_none() && impl_fn_names(block) == ["remote"])
        .expect("impl Counter { fn remote }");
    let constructor_text = text(constructor);
    assert!(constructor_text.contains(
        "pub fn remote (rt : & :: braid :: Runtime , start : impl :: braid :: IntoArg < u64 >) \
         -> :: braid :: ActorBuilder < CounterHandle >"
    ));
    assert!(constructor_text.contains(
        ":: braid :: ActorBuilder :: < CounterHandle > :: new (rt , Self :: BRAID_CLASS"
    ));

    let dispatch = counter_impls
        .iter()
        .find(|block| block.trait_.is_some())
        .expect("Dispatch impl");
    let dispatch_text = text(dispatch);
    assert!(dispatch_text.contains("impl :: braid :: __private :: Dispatch for Counter"));
    assert!(dispatch_text.contains("const CLASS : & 'static str = < Counter > :: BRAID_CLASS"));
    for arm in ["\"incr\" =>", "\"get\" =>", "\"slow\" =>", "\"reset\" =>"] {
        assert!(
            dispatch_text.contains(arm),
            "missing {arm}: {dispatch_text}"
        );
    }
    for absent in ["\"peek\"", "\"helper\"", "\"new\""] {
        assert!(!dispatch_text.contains(absent), "unexpected {absent}");
    }
    assert!(dispatch_text.contains("expect_len (1usize , \"Counter::incr\")"));
    assert!(dispatch_text.contains("Method :: Mut"));
    assert!(dispatch_text.contains("move | __braid_this : & mut Self |"));
    assert!(dispatch_text.contains("< Self > :: incr (__braid_this , __braid_arg0)"));
    assert!(dispatch_text.contains("Method :: Ref"));
    assert!(
        dispatch_text.contains("< Self > :: get (__braid_this ,)")
            || dispatch_text.contains("< Self > :: get (__braid_this)")
    );
    assert!(dispatch_text.contains("Method :: Async"));
    assert!(dispatch_text.contains("< Self > :: slow (& * __braid_this , __braid_arg0) . await"));
    assert!(dispatch_text.contains(":: braid :: Error :: UnknownMethod"));

    let handle = impls_for(&file, "CounterHandle");
    assert_eq!(handle.len(), 1);
    assert_eq!(impl_fn_names(handle[0]), ["incr", "get", "slow", "reset"]);
    let handle_text = text(handle[0]);
    assert!(handle_text.contains(
        "pub fn incr (& self , by : impl :: braid :: IntoArg < u64 >) -> :: braid :: ActorCall < u64 >"
    ));
    assert!(
        handle_text.contains(":: braid :: TypedHandle :: raw (self) . call :: < u64 > (\"incr\"")
    );
    assert!(handle_text.contains("Adds `by` and returns the new value."));
    assert!(handle_text.contains("Calls `Counter::get` on the remote actor."));
    assert!(handle_text.contains("ActorCall < () >"));

    let registry = file
        .items
        .iter()
        .find_map(|item| match item {
            Item::Const(constant) if constant.ident == "_" => Some(constant),
            _ => None,
        })
        .expect("registry entry");
    let registry_text = text(registry);
    assert!(registry_text.contains("distributed_slice (:: braid :: __private :: ACTOR_CLASSES)"));
    assert!(registry_text.contains("name : < Counter > :: BRAID_CLASS"));
    assert!(registry_text.contains("expect_len (1usize , \"Counter::new\")"));
    assert!(registry_text.contains(
        ":: braid :: __private :: ActorCell :: < Counter > :: boxed (< Counter > :: new (__braid_arg0) ,)"
    ) || registry_text.contains(
        ":: braid :: __private :: ActorCell :: < Counter > :: boxed (< Counter > :: new (__braid_arg0))"
    ));
}

#[test]
fn actor_impl_with_path_and_self_types() {
    let file = actor(quote! {
        impl crate::model::Counter {
            fn new() -> crate::model::Counter { todo!() }
            fn merge(&mut self, other: Self, more: Vec<Self>) -> Option<Self> { None }
        }
    });
    assert_no_errors(&file);
    let handle = impls_for(&file, "crate :: model :: CounterHandle");
    assert_eq!(handle.len(), 1);
    let handle_text = text(handle[0]);
    assert!(handle_text.contains("other : impl :: braid :: IntoArg < crate :: model :: Counter >"));
    assert!(handle_text.contains("IntoArg < Vec < crate :: model :: Counter > >"));
    assert!(handle_text.contains("ActorCall < Option < crate :: model :: Counter > >"));
    assert!(!handle_text.contains("Self"), "{handle_text}");
    let file_text = text(&file);
    assert!(file_text.contains("ActorBuilder < crate :: model :: CounterHandle >"));
    assert!(file_text.contains("expect_len (0usize , \"Counter::new\")"));
}

#[test]
fn actor_impl_without_methods() {
    let file = actor(quote! {
        impl Unit {
            fn new() -> Self { Unit }
        }
    });
    assert_no_errors(&file);
    let dispatch = text(&file);
    assert!(dispatch.contains("let _ = __braid_args ;"));
    assert!(!dispatch.contains("match __braid_method"));
}

#[test]
fn actor_constructor_argument_named_rt_is_renamed() {
    let file = actor(quote! {
        impl Node {
            fn new(rt: u8) -> Self { todo!() }
        }
    });
    assert_no_errors(&file);
    assert!(text(&file).contains("__braid_arg0 : impl :: braid :: IntoArg < u8 >"));
}

#[test]
fn actor_impl_requires_new() {
    let file = actor(quote! {
        impl Counter {
            fn create() -> Self { todo!() }
            fn get(&self) -> u64 { 0 }
        }
    });
    assert_error(&file, "need a constructor");
    let file = actor(quote! {
        impl Counter {
            fn new() -> u64 { 0 }
        }
    });
    assert_error(&file, "the actor constructor `new` must return `Self`");
    let file = actor(quote! {
        impl Counter {
            async fn new() -> Self { todo!() }
        }
    });
    assert_error(&file, "must be synchronous");
}

#[test]
fn actor_rejects_async_mut_methods() {
    let file = actor(quote! {
        impl Counter {
            fn new() -> Self { todo!() }
            async fn bump(&mut self) {}
        }
    });
    assert_error(
        &file,
        "async actor methods take &self; keep mutable state behind a lock",
    );
}

#[test]
fn actor_rejects_self_by_value() {
    let file = actor(quote! {
        impl Counter {
            fn new() -> Self { todo!() }
            fn finish(self) -> u64 { 0 }
        }
    });
    assert_error(&file, "actor methods take `&self` or `&mut self`");
    let file = actor(quote! {
        impl Counter {
            fn new() -> Self { todo!() }
            fn boxed(self: Box<Self>) {}
        }
    });
    assert_error(&file, "actor methods take `&self` or `&mut self`");
    // Local methods may take any receiver and any types.
    let file = actor(quote! {
        impl Counter {
            fn new() -> Self { todo!() }
            #[braid(local)]
            fn finish(self) -> Self { self }
            #[braid(local)]
            fn name(&self) -> &str { "x" }
        }
    });
    assert_no_errors(&file);
}

#[test]
fn actor_rejects_borrowed_and_generic_methods() {
    let file = actor(quote! {
        impl Counter {
            fn new() -> Self { todo!() }
            fn name(&self, prefix: &str) -> String { prefix.to_string() }
        }
    });
    assert_error(&file, "actor method arguments must be owned types");
    let file = actor(quote! {
        impl Counter {
            fn new() -> Self { todo!() }
            fn apply<F>(&self, f: F) {}
        }
    });
    assert_error(&file, "actor methods cannot be generic");
    let file = actor(quote! {
        impl Counter {
            fn new(name: &str) -> Self { todo!() }
        }
    });
    assert_error(&file, "actor constructor arguments must be owned types");
}

#[test]
fn actor_rejects_generic_and_trait_impls() {
    let file = actor(quote! {
        impl<T> Cache<T> {
            fn new() -> Self { todo!() }
        }
    });
    assert_error(&file, "actor impl blocks cannot be generic");
    let file = actor(quote! {
        impl Default for Counter {
            fn default() -> Self { todo!() }
        }
    });
    assert_error(&file, "not to trait impls");
    let file = actor(quote! {
        impl Cache<u8> {
            fn new() -> Self { todo!() }
        }
    });
    assert_error(&file, "must be for a named type");
}

#[test]
fn actor_rejects_generated_names_and_bad_markers() {
    let file = actor(quote! {
        impl Counter {
            fn new() -> Self { todo!() }
            fn remote(&self) {}
        }
    });
    assert_error(&file, "`Counter::remote` is generated by `#[braid::actor]`");
    let tokens = crate::actor::expand(
        TokenStream::new(),
        quote! {
            impl Counter {
                fn new() -> Self { todo!() }
                #[braid(locale)]
                fn get(&self) -> u64 { 0 }
            }
        },
    );
    assert!(
        !tokens.to_string().contains("# [braid"),
        "marker kept: {tokens}"
    );
    assert_error(&parse(tokens), "expected `#[braid(local)]`");
}

#[test]
fn actor_rejects_other_items_and_arguments() {
    let file = actor(quote! {
        fn not_an_actor() {}
    });
    assert_error(
        &file,
        "`#[braid::actor]` applies to an actor's type definition",
    );
    let file = parse(crate::actor::expand(
        quote!(concurrency = 4),
        quote! {
            struct Counter;
        },
    ));
    assert_error(&file, "`#[braid::actor]` takes no arguments");
}

#[test]
fn actor_error_output_keeps_the_impl_without_markers() {
    let tokens = crate::actor::expand(
        TokenStream::new(),
        quote! {
            impl Counter {
                fn get(&self) -> u64 { 0 }
                #[braid(local)]
                fn peek(&self) -> &u64 { todo!() }
            }
        },
    );
    let file = parse(tokens.clone());
    assert_error(&file, "need a constructor");
    assert!(!tokens.to_string().contains("# [braid"), "{tokens}");
    assert_eq!(impls_for(&file, "Counter").len(), 1);
}

#[test]
fn remote_repeats_deprecation_on_stubs() {
    let file = remote(quote! {
        #[deprecated(note = "use add2")]
        pub fn old(x: u8) -> u8 { x }
    });
    assert_no_errors(&file);
    let module = find_mod(&file, "old");
    assert!(text(&module.attrs[1]).contains("deprecated"));
    for function in mod_items(module).iter().filter_map(|item| match item {
        Item::Fn(function) if function.sig.ident.to_string().starts_with("remote") => {
            Some(function)
        }
        _ => None,
    }) {
        assert!(
            function
                .attrs
                .iter()
                .any(|attr| attr.path().is_ident("deprecated")),
            "{}",
            text(function)
        );
    }
}

#[test]
fn actor_repeats_cfg_and_deprecation_per_method() {
    let file = actor(quote! {
        impl Counter {
            #[cfg(feature = "a")]
            fn new(x: u8) -> Self { todo!() }
            #[cfg(not(feature = "a"))]
            fn new() -> Self { todo!() }
            #[cfg(feature = "debug")]
            fn dump(&self) -> String { String::new() }
            #[deprecated]
            fn old(&self) {}
        }
    });
    assert_no_errors(&file);
    let file_text = text(&file);
    // One `remote` and one registry entry per constructor alternative.
    assert_eq!(file_text.matches("pub fn remote").count(), 2);
    assert_eq!(file_text.matches("ACTOR_CLASSES").count(), 2);
    assert!(file_text.contains("# [cfg (feature = \"debug\")] \"dump\" =>"));
    let handle = impls_for(&file, "CounterHandle");
    let dump = handle[0]
        .items
        .iter()
        .find_map(|item| match item {
            ImplItem::Fn(function) if function.sig.ident == "dump" => Some(function),
            _ => None,
        })
        .expect("dump");
    assert!(dump.attrs.iter().any(|attr| attr.path().is_ident("cfg")));
    let old = handle[0]
        .items
        .iter()
        .find_map(|item| match item {
            ImplItem::Fn(function) if function.sig.ident == "old" => Some(function),
            _ => None,
        })
        .expect("old");
    assert!(old
        .attrs
        .iter()
        .any(|attr| attr.path().is_ident("deprecated")));
}
