//! Ray's microbenchmark workloads.
pub fn run(_json: bool) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
