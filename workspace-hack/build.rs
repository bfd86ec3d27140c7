//! Present only so that cargo takes this crate's build dependencies
//! (unified like its dependencies) into account.
fn main() {}
