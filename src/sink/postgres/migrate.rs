//! The shipped schema migrations (`schemas/postgres/*.sql`, embedded at build time) and how
//! they are applied: in one transaction holding an advisory lock, so replicas that start
//! together apply each migration once, and recorded in `attrstream_schema_migrations` with a
//! checksum so an edited migration is noticed instead of silently skipped.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

/// One migration: applied in `version` order, exactly once per database.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its number (the file's prefix).
    pub version: i32,
    /// A short name (the rest of the file name).
    pub name: &'static str,
    /// The SQL, run as one batch inside the migration transaction.
    pub sql: &'static str,
}

/// Every migration attrstream ships, oldest first. Add new files; never edit applied ones.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "product_attributes",
    sql: include_str!("../../../schemas/postgres/0001_product_attributes.sql"),
}];

/// The table the sink writes (created by migration 1).
pub const TABLE: &str = "product_attributes";

/// Where applied migrations are recorded.
pub const MIGRATIONS_TABLE: &str = "attrstream_schema_migrations";

/// The `pg_advisory_xact_lock` key that serialises migrations across replicas
/// (the bytes of "attrstrm" as a big-endian integer).
pub const MIGRATION_LOCK_KEY: i64 = i64::from_be_bytes(*b"attrstrm");

/// A schema the sink cannot use and that waiting does not fix (an edited migration, a
/// missing table with `run_migrations = false`): start-up stops at once instead of retrying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SchemaRefused(pub String);

/// A migration's checksum as recorded: hex SHA-256 of its SQL.
pub fn checksum(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

/// Applies every shipped migration the database lacks; returns the versions applied now
/// (empty when it was up to date). Safe to run from several replicas at once.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>> {
    let tx = client
        .transaction()
        .await
        .context("starting the migration transaction")?;
    // Held until commit or rollback, so a replica that dies mid-way cannot leave it locked.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .context("taking the migration lock")?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (
             version    integer     PRIMARY KEY,
             name       text        NOT NULL,
             checksum   text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )"
    ))
    .await
    .with_context(|| format!("creating {MIGRATIONS_TABLE} (may the database user CREATE tables in its schema?)"))?;
    let recorded = tx
        .query(&format!("SELECT version, checksum FROM {MIGRATIONS_TABLE}"), &[])
        .await
        .with_context(|| format!("reading {MIGRATIONS_TABLE}"))?;
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        let expected = checksum(m.sql);
        match recorded.iter().find(|r| r.get::<_, i32>(0) == m.version) {
            Some(row) => {
                let found: String = row.get(1);
                if found != expected {
                    return Err(SchemaRefused(format!(
                        "migration {:04}_{} was applied with checksum {found} but the shipped file has \
                         {expected}: a migration was edited after it was applied; restore it and ship \
                         the change as a new migration",
                        m.version, m.name
                    ))
                    .into());
                }
            }
            None => {
                tx.batch_execute(m.sql)
                    .await
                    .with_context(|| format!("applying migration {:04}_{}", m.version, m.name))?;
                tx.execute(
                    &format!("INSERT INTO {MIGRATIONS_TABLE} (version, name, checksum) VALUES ($1, $2, $3)"),
                    &[&m.version, &m.name, &expected],
                )
                .await
                .with_context(|| format!("recording migration {:04}_{}", m.version, m.name))?;
                applied.push(m.version);
            }
        }
    }
    tx.commit().await.context("committing the migrations")?;
    Ok(applied)
}

/// With `run_migrations = false`: fails unless the sink's table exists, saying how to create it.
pub async fn check_schema(client: &Client) -> Result<()> {
    let row = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&TABLE])
        .await
        .context("checking for the product_attributes table")?;
    if !row.get::<_, bool>(0) {
        return Err(SchemaRefused(format!(
            "table {TABLE} does not exist and database.run_migrations is false: set it to true \
             (attrstream applies schemas/postgres/*.sql under a lock) or apply those files by hand"
        ))
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_and_create_the_table() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.name);
        }
        assert!(MIGRATIONS[0]
            .sql
            .contains("CREATE TABLE IF NOT EXISTS product_attributes"));
        assert_eq!(checksum("x").len(), 64);
        assert_ne!(checksum("x"), checksum("y"));
    }

    #[test]
    fn every_shipped_sql_file_is_a_migration() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/postgres");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let names: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{:04}_{}.sql", m.version, m.name))
            .collect();
        assert_eq!(
            files, names,
            "schemas/postgres/*.sql and MIGRATIONS must list the same files"
        );
    }
}
