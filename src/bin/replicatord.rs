fn main() -> anyhow::Result<()> {
    anyhow::bail!("replicatord: not built yet")
}
