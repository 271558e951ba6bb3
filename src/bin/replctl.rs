fn main() -> anyhow::Result<()> {
    anyhow::bail!("replctl: not built yet")
}
