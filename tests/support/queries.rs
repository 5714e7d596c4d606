//! The analyst queries ARCHIVE.md gives (`-- query: NAME` blocks), shared by the tests that
//! run them with DuckDB.

/// (name, SQL) of every documented query, in document order.
pub fn documented_queries() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../ARCHIVE.md"))
        .expect("ARCHIVE.md");
    doc.split("```sql\n")
        .skip(1)
        .filter_map(|block| {
            let sql = block.split("```").next()?;
            let name = sql
                .lines()
                .next()?
                .strip_prefix("-- query: ")?
                .trim()
                .to_owned();
            Some((name, sql.to_owned()))
        })
        .collect()
}
