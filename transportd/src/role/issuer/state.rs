//! The issuer's durable state, in SQLite: join tokens (hashes only), registration entries,
//! nodes (attested, banned), the CAs and where each stands in a rollover, and the ledger of
//! every SVID issued (serial, ID, expiry, which CA signed it, whether it was revoked), and
//! the audit checkpoints it witnessed for nodes (append-only: one row per node and seq).
//!
//! The database runs in WAL mode with `synchronous = FULL`, so whatever a call returned is
//! on disk: a crash or a restart keeps entries, unused tokens and the ledger. Each call is
//! one short transaction; a token is redeemed inside one, so it can be used only once even
//! with two nodes racing.

use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use certs::{RegistrationEntry, Selector, SpiffeId, TokenHash, TokenRecord, TokenRefusal};
use libtransport::audit::{Receipt, WitnessDecision, WitnessRefusal, WitnessedCheckpoint};
use rusqlite::{Connection, OptionalExtension, params};

/// The issuer's database.
#[derive(Debug)]
pub(crate) struct State {
    conn: Mutex<Connection>,
}

/// Where a CA stands in a rollover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CaState {
    /// Created and in the bundle, not signing yet.
    Prepared,
    /// Signing.
    Active,
    /// Replaced by the active CA; still in the bundle while SVIDs it signed live.
    Previous,
    /// Out of the bundle: SVIDs it signed are refused.
    Retired,
}

impl CaState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Previous => "previous",
            Self::Retired => "retired",
        }
    }

    fn parse(s: &str) -> rusqlite::Result<Self> {
        Ok(match s {
            "prepared" => Self::Prepared,
            "active" => Self::Active,
            "previous" => Self::Previous,
            "retired" => Self::Retired,
            other => {
                return Err(rusqlite::Error::InvalidColumnType(
                    0,
                    format!("ca state {other}"),
                    rusqlite::types::Type::Text,
                ));
            }
        })
    }

    /// Whether peers trust SVIDs this CA signed.
    pub(crate) fn in_bundle(self) -> bool {
        self != Self::Retired
    }
}

/// A CA as stored.
#[derive(Debug, Clone)]
pub(crate) struct CaRow {
    pub(crate) serial: String,
    pub(crate) state: CaState,
    pub(crate) cert_pem: String,
    /// The key file's name inside the issuer's CA directory.
    pub(crate) key_file: String,
    pub(crate) not_after: SystemTime,
    pub(crate) created_at: SystemTime,
}

/// An issued SVID, for the ledger.
#[derive(Debug, Clone)]
pub(crate) struct LedgerEntry {
    pub(crate) serial: String,
    pub(crate) spiffe_id: SpiffeId,
    /// `node`, `workload` or `issuer`.
    pub(crate) kind: &'static str,
    /// The node it was issued to or for.
    pub(crate) node: Option<SpiffeId>,
    pub(crate) ca_serial: String,
    pub(crate) issued_at: SystemTime,
    pub(crate) not_after: SystemTime,
}

/// A node the issuer knows.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct NodeRow {
    pub(crate) id: SpiffeId,
    #[serde(serialize_with = "rfc3339")]
    pub(crate) attested_at: SystemTime,
    #[serde(serialize_with = "rfc3339")]
    pub(crate) last_seen: SystemTime,
    #[serde(serialize_with = "rfc3339_opt")]
    pub(crate) banned_at: Option<SystemTime>,
}

/// Counts for `issuer status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct Counts {
    pub(crate) entries: u64,
    pub(crate) unused_tokens: u64,
    pub(crate) live_svids: u64,
    pub(crate) revoked_live_svids: u64,
}

impl State {
    /// Opens (creating if needed) the database at `path`.
    pub(crate) fn open(path: &Path) -> anyhow::Result<Self> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening the issuer database {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)
            .context("creating the issuer database's tables")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        match version {
            0 => conn.pragma_update(None, "user_version", SCHEMA_VERSION)?,
            SCHEMA_VERSION => {}
            other => anyhow::bail!(
                "{}: database schema version {other} is newer than this transportd knows \
                 ({SCHEMA_VERSION}); run the newer transportd",
                path.display()
            ),
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    // Join tokens.

    /// Stores a new token's hash.
    pub(crate) fn token_insert(
        &self,
        hash: &TokenHash,
        node: &SpiffeId,
        now: SystemTime,
        expires_at: SystemTime,
    ) -> anyhow::Result<()> {
        self.db().execute(
            "INSERT INTO tokens (hash, node, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![hash.as_str(), node.as_str(), secs(now), secs(expires_at)],
        )?;
        Ok(())
    }

    /// Redeems a token at `now`, once: returns the node ID it grants. The check and the
    /// marking happen in one transaction.
    pub(crate) fn token_redeem(
        &self,
        hash: &TokenHash,
        now: SystemTime,
    ) -> anyhow::Result<Result<SpiffeId, TokenRefusal>> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let record = tx
            .query_row(
                "SELECT node, expires_at, used_at FROM tokens WHERE hash = ?1",
                params![hash.as_str()],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                    ))
                },
            )
            .optional()?
            .map(|(node, expires, used)| -> anyhow::Result<TokenRecord> {
                Ok(TokenRecord {
                    hash: hash.clone(),
                    node: SpiffeId::parse(&node)?,
                    expires_at: time(expires),
                    used_at: used.map(time),
                })
            })
            .transpose()?;
        let node = match certs::redeem(record.as_ref(), now) {
            Ok(node) => node.clone(),
            Err(refusal) => return Ok(Err(refusal)),
        };
        tx.execute(
            "UPDATE tokens SET used_at = ?2 WHERE hash = ?1",
            params![hash.as_str(), secs(now)],
        )?;
        tx.commit()?;
        Ok(Ok(node))
    }

    /// Tokens not yet used and not expired, as (hash prefix, node, expiry).
    pub(crate) fn tokens_pending(
        &self,
        now: SystemTime,
    ) -> anyhow::Result<Vec<(String, SpiffeId, SystemTime)>> {
        let db = self.db();
        let mut q = db.prepare(
            "SELECT hash, node, expires_at FROM tokens
             WHERE used_at IS NULL AND expires_at > ?1 ORDER BY expires_at",
        )?;
        let rows = q.query_map(params![secs(now)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (hash, node, exp) = row?;
            out.push((hash[..12].to_owned(), SpiffeId::parse(&node)?, time(exp)));
        }
        Ok(out)
    }

    // Registration entries.

    /// Stores an entry (validated by the caller).
    pub(crate) fn entry_insert(
        &self,
        entry: &RegistrationEntry,
        now: SystemTime,
    ) -> anyhow::Result<()> {
        let selectors: Vec<String> = entry.selectors.iter().map(ToString::to_string).collect();
        self.db().execute(
            "INSERT INTO entries (id, spiffe_id, parent_id, selectors, ttl, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                entry.id,
                entry.spiffe_id.as_str(),
                entry.parent_id.as_str(),
                serde_json::to_string(&selectors)?,
                entry.ttl.map(|t| t.as_secs() as i64),
                secs(now)
            ],
        )?;
        Ok(())
    }

    /// Deletes an entry; returns it if it existed.
    pub(crate) fn entry_delete(&self, id: &str) -> anyhow::Result<Option<RegistrationEntry>> {
        let Some(entry) = self.entry(id)? else {
            return Ok(None);
        };
        self.db()
            .execute("DELETE FROM entries WHERE id = ?1", params![id])?;
        Ok(Some(entry))
    }

    /// One entry.
    pub(crate) fn entry(&self, id: &str) -> anyhow::Result<Option<RegistrationEntry>> {
        Ok(self
            .entries_where("WHERE id = ?1", params![id])?
            .into_iter()
            .next())
    }

    /// Every entry, in creation order.
    pub(crate) fn entries(&self) -> anyhow::Result<Vec<RegistrationEntry>> {
        self.entries_where("", params![])
    }

    /// The entries a node may hand out.
    pub(crate) fn entries_for_node(
        &self,
        node: &SpiffeId,
    ) -> anyhow::Result<Vec<RegistrationEntry>> {
        self.entries_where("WHERE parent_id = ?1", params![node.as_str()])
    }

    fn entries_where(
        &self,
        filter: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> anyhow::Result<Vec<RegistrationEntry>> {
        let db = self.db();
        let mut q = db.prepare(&format!(
            "SELECT id, spiffe_id, parent_id, selectors, ttl FROM entries {filter}
             ORDER BY created_at, id"
        ))?;
        let rows = q.query_map(args, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<i64>>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, spiffe_id, parent_id, selectors, ttl) = row?;
            let selectors: Vec<String> = serde_json::from_str(&selectors)?;
            out.push(RegistrationEntry {
                id,
                spiffe_id: SpiffeId::parse(&spiffe_id)?,
                parent_id: SpiffeId::parse(&parent_id)?,
                selectors: selectors
                    .iter()
                    .map(|s| s.parse::<Selector>())
                    .collect::<Result<_, _>>()?,
                ttl: ttl.map(|t| Duration::from_secs(t.max(0) as u64)),
            });
        }
        Ok(out)
    }

    // Nodes.

    /// Records that a node attested (or re-attested with a new token).
    pub(crate) fn node_attested(&self, id: &SpiffeId, now: SystemTime) -> anyhow::Result<()> {
        self.db().execute(
            "INSERT INTO nodes (id, attested_at, last_seen) VALUES (?1, ?2, ?2)
             ON CONFLICT(id) DO UPDATE SET attested_at = ?2, last_seen = ?2",
            params![id.as_str(), secs(now)],
        )?;
        Ok(())
    }

    /// Records that a node called in.
    pub(crate) fn node_seen(&self, id: &SpiffeId, now: SystemTime) -> anyhow::Result<()> {
        self.db().execute(
            "UPDATE nodes SET last_seen = ?2 WHERE id = ?1",
            params![id.as_str(), secs(now)],
        )?;
        Ok(())
    }

    /// One node.
    pub(crate) fn node(&self, id: &SpiffeId) -> anyhow::Result<Option<NodeRow>> {
        Ok(self
            .nodes_where("WHERE id = ?1", params![id.as_str()])?
            .into_iter()
            .next())
    }

    /// Every node.
    pub(crate) fn nodes(&self) -> anyhow::Result<Vec<NodeRow>> {
        self.nodes_where("", params![])
    }

    fn nodes_where(
        &self,
        filter: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> anyhow::Result<Vec<NodeRow>> {
        let db = self.db();
        let mut q = db.prepare(&format!(
            "SELECT id, attested_at, last_seen, banned_at FROM nodes {filter} ORDER BY id"
        ))?;
        let rows = q.query_map(args, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, attested, seen, banned) = row?;
            out.push(NodeRow {
                id: SpiffeId::parse(&id)?,
                attested_at: time(attested),
                last_seen: time(seen),
                banned_at: banned.map(time),
            });
        }
        Ok(out)
    }

    /// Bans a node (recorded even if it never attested, so a token for it cannot be
    /// redeemed later) and revokes every live SVID issued to it or for its workloads.
    /// Returns the revoked serials.
    pub(crate) fn node_ban(&self, id: &SpiffeId, now: SystemTime) -> anyhow::Result<Vec<String>> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "INSERT INTO nodes (id, attested_at, last_seen, banned_at) VALUES (?1, ?2, ?2, ?2)
             ON CONFLICT(id) DO UPDATE SET banned_at = COALESCE(banned_at, ?2)",
            params![id.as_str(), secs(now)],
        )?;
        let mut serials = Vec::new();
        {
            let mut q = tx.prepare(
                "SELECT serial FROM svids
                 WHERE (node = ?1 OR spiffe_id = ?1) AND not_after > ?2 AND revoked_at IS NULL",
            )?;
            for s in q.query_map(params![id.as_str(), secs(now)], |r| r.get::<_, String>(0))? {
                serials.push(s?);
            }
        }
        tx.execute(
            "UPDATE svids SET revoked_at = ?2
             WHERE (node = ?1 OR spiffe_id = ?1) AND not_after > ?2 AND revoked_at IS NULL",
            params![id.as_str(), secs(now)],
        )?;
        tx.commit()?;
        Ok(serials)
    }

    // CAs.

    /// Stores a CA.
    pub(crate) fn ca_insert(&self, row: &CaRow) -> anyhow::Result<()> {
        self.db().execute(
            "INSERT INTO cas (serial, state, cert_pem, key_file, not_after, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                row.serial,
                row.state.as_str(),
                row.cert_pem,
                row.key_file,
                secs(row.not_after),
                secs(row.created_at)
            ],
        )?;
        Ok(())
    }

    /// Moves CAs between states, all in one transaction.
    pub(crate) fn ca_transition(&self, changes: &[(&str, CaState)]) -> anyhow::Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for (serial, state) in changes {
            let n = tx.execute(
                "UPDATE cas SET state = ?2 WHERE serial = ?1",
                params![serial, state.as_str()],
            )?;
            anyhow::ensure!(n == 1, "no CA with serial {serial}");
        }
        tx.commit()?;
        Ok(())
    }

    /// Every CA, oldest first.
    pub(crate) fn cas(&self) -> anyhow::Result<Vec<CaRow>> {
        let db = self.db();
        let mut q = db.prepare(
            "SELECT serial, state, cert_pem, key_file, not_after, created_at FROM cas
             ORDER BY created_at, serial",
        )?;
        let rows = q.query_map([], |r| {
            Ok(CaRow {
                serial: r.get(0)?,
                state: CaState::parse(&r.get::<_, String>(1)?)?,
                cert_pem: r.get(2)?,
                key_file: r.get(3)?,
                not_after: time(r.get(4)?),
                created_at: time(r.get(5)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // The ledger.

    /// Records an issued SVID.
    pub(crate) fn ledger_insert(&self, e: &LedgerEntry) -> anyhow::Result<()> {
        self.db().execute(
            "INSERT INTO svids (serial, spiffe_id, kind, node, ca_serial, issued_at, not_after)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                e.serial,
                e.spiffe_id.as_str(),
                e.kind,
                e.node.as_ref().map(SpiffeId::as_str),
                e.ca_serial,
                secs(e.issued_at),
                secs(e.not_after)
            ],
        )?;
        Ok(())
    }

    /// Serials revoked and not yet expired: the deny list nodes enforce.
    pub(crate) fn revoked_live(&self, now: SystemTime) -> anyhow::Result<Vec<String>> {
        let db = self.db();
        let mut q = db.prepare(
            "SELECT serial FROM svids WHERE revoked_at IS NOT NULL AND not_after > ?1
             ORDER BY serial",
        )?;
        let rows = q.query_map(params![secs(now)], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many SVIDs signed by a CA are still valid at `now`, and when the last expires.
    pub(crate) fn live_by_ca(
        &self,
        ca_serial: &str,
        now: SystemTime,
    ) -> anyhow::Result<(u64, Option<SystemTime>)> {
        let (n, last): (i64, Option<i64>) = self.db().query_row(
            "SELECT COUNT(*), MAX(not_after) FROM svids WHERE ca_serial = ?1 AND not_after > ?2",
            params![ca_serial, secs(now)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((n.max(0) as u64, last.map(time)))
    }

    /// The most recent ledger entries, newest first.
    pub(crate) fn ledger(&self, limit: u32) -> anyhow::Result<Vec<LedgerEntry>> {
        let db = self.db();
        let mut q = db.prepare(
            "SELECT serial, spiffe_id, kind, node, ca_serial, issued_at, not_after FROM svids
             ORDER BY issued_at DESC, serial LIMIT ?1",
        )?;
        let rows = q.query_map(params![limit], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (serial, id, kind, node, ca, issued, not_after) = row?;
            out.push(LedgerEntry {
                serial,
                spiffe_id: SpiffeId::parse(&id)?,
                kind: match kind.as_str() {
                    "node" => "node",
                    "issuer" => "issuer",
                    _ => "workload",
                },
                node: node.map(|n| SpiffeId::parse(&n)).transpose()?,
                ca_serial: ca,
                issued_at: time(issued),
                not_after: time(not_after),
            });
        }
        Ok(out)
    }

    /// Counts for status.
    pub(crate) fn counts(&self, now: SystemTime) -> anyhow::Result<Counts> {
        let db = self.db();
        let one = |sql: &str| -> anyhow::Result<u64> {
            let n: i64 = db.query_row(sql, params![secs(now)], |r| r.get(0))?;
            Ok(n.max(0) as u64)
        };
        Ok(Counts {
            entries: one("SELECT COUNT(*) FROM entries WHERE ?1 = ?1")?,
            unused_tokens: one(
                "SELECT COUNT(*) FROM tokens WHERE used_at IS NULL AND expires_at > ?1",
            )?,
            live_svids: one("SELECT COUNT(*) FROM svids WHERE not_after > ?1")?,
            revoked_live_svids: one(
                "SELECT COUNT(*) FROM svids WHERE not_after > ?1 AND revoked_at IS NOT NULL",
            )?,
        })
    }
}

impl State {
    // Witnessed checkpoints.

    /// Takes `node`'s checkpoint `cp` if the append-only rule allows it: a new one above
    /// every one held is countersigned (`countersign`) and kept; one identical to a held one
    /// gets the receipt held; anything else is refused. Check and insert are one
    /// transaction.
    pub(crate) fn witness_append(
        &self,
        node: &SpiffeId,
        cp: &WitnessedCheckpoint,
        countersign: impl FnOnce() -> anyhow::Result<Receipt>,
    ) -> anyhow::Result<Result<Receipt, WitnessRefusal>> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let held: Option<String> = tx
            .query_row(
                "SELECT receipt FROM witnessed WHERE node = ?1 AND seq = ?2",
                params![node.as_str(), seq_sql(cp.seq)],
                |r| r.get(0),
            )
            .optional()?;
        let held: Option<Receipt> = held.map(|j| serde_json::from_str(&j)).transpose()?;
        let last: Option<i64> = tx.query_row(
            "SELECT MAX(seq) FROM witnessed WHERE node = ?1",
            params![node.as_str()],
            |r| r.get(0),
        )?;
        let decision = libtransport::audit::decide(
            held.as_ref().map(Receipt::checkpoint).as_ref(),
            last.map(|l| l.max(0) as u64),
            cp,
        );
        match decision {
            WitnessDecision::Held => Ok(Ok(held.context("held receipt")?)),
            WitnessDecision::Refuse(r) => Ok(Err(r)),
            WitnessDecision::Accept => {
                let receipt = countersign()?;
                tx.execute(
                    "INSERT INTO witnessed (node, seq, prev, hash, witnessed_at, receipt)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        node.as_str(),
                        seq_sql(cp.seq),
                        cp.prev.to_hex(),
                        cp.hash.to_hex(),
                        receipt.witnessed_at,
                        serde_json::to_string(&receipt)?
                    ],
                )?;
                tx.commit()?;
                Ok(Ok(receipt))
            }
        }
    }

    /// Every receipt held for `node`, by seq.
    pub(crate) fn witnessed(&self, node: &SpiffeId) -> anyhow::Result<Vec<Receipt>> {
        let db = self.db();
        let mut q = db.prepare("SELECT receipt FROM witnessed WHERE node = ?1 ORDER BY seq")?;
        let rows = q.query_map(params![node.as_str()], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(serde_json::from_str(&row?)?);
        }
        Ok(out)
    }
}

fn seq_sql(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn time(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_seconds(*t))
}

fn rfc3339_opt<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    selectors TEXT NOT NULL,
    ttl INTEGER,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_parent ON entries(parent_id);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    attested_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    banned_at INTEGER
);
CREATE TABLE IF NOT EXISTS cas (
    serial TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    cert_pem TEXT NOT NULL,
    key_file TEXT NOT NULL,
    not_after INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS svids (
    serial TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    node TEXT,
    ca_serial TEXT NOT NULL,
    issued_at INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX IF NOT EXISTS svids_node ON svids(node);
CREATE INDEX IF NOT EXISTS svids_ca ON svids(ca_serial);
CREATE INDEX IF NOT EXISTS svids_not_after ON svids(not_after);
CREATE TABLE IF NOT EXISTS witnessed (
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL,
    witnessed_at TEXT NOT NULL,
    receipt TEXT NOT NULL,
    PRIMARY KEY (node, seq)
);
";

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    #[test]
    fn witnessed_checkpoints_are_append_only_and_survive_reopening() {
        use libtransport::proto::Digest;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let node = id("spiffe://td/node/a");
        let cp = |seq: u64, b: u8| WitnessedCheckpoint {
            seq,
            prev: Digest([b; 32]),
            hash: Digest([b ^ 0xff; 32]),
        };
        let receipt = |c: &WitnessedCheckpoint| Receipt {
            node: node.clone(),
            seq: c.seq,
            prev: c.prev,
            hash: c.hash,
            witnessed_at: "2027-01-01T00:00:00Z".into(),
            witness: id("spiffe://td/issuer"),
            alg: "ed25519".into(),
            chain: Vec::new(),
            signature: format!("{:02x}", c.prev.0[0]),
        };
        {
            let s = State::open(&path).unwrap();
            for c in [cp(5, 1), cp(10, 2)] {
                let r = s.witness_append(&node, &c, || Ok(receipt(&c))).unwrap();
                assert_eq!(r.unwrap().seq, c.seq);
            }
        }
        let s = State::open(&path).unwrap();
        // A retry gets the receipt held, without a new countersignature.
        let again = s
            .witness_append(&node, &cp(10, 2), || anyhow::bail!("must not sign"))
            .unwrap();
        assert_eq!(again.unwrap(), receipt(&cp(10, 2)));
        // Another checkpoint for a held seq, or one below the latest: refused, nothing kept.
        let never = || -> anyhow::Result<Receipt> { anyhow::bail!("must not sign") };
        assert!(matches!(
            s.witness_append(&node, &cp(10, 9), never).unwrap(),
            Err(WitnessRefusal::Rewrite { .. })
        ));
        assert!(matches!(
            s.witness_append(&node, &cp(7, 9), never).unwrap(),
            Err(WitnessRefusal::Stale { last: 10, .. })
        ));
        // Another node's seqs are its own.
        let other = id("spiffe://td/node/b");
        let c = cp(3, 4);
        assert!(
            s.witness_append(&other, &c, || Ok(receipt(&c)))
                .unwrap()
                .is_ok()
        );
        let held: Vec<u64> = s.witnessed(&node).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(held, vec![5, 10]);
    }

    #[test]
    fn tokens_redeem_once_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let token = certs::JoinToken::generate().unwrap();
        let unused = certs::JoinToken::generate().unwrap();
        {
            let s = State::open(&path).unwrap();
            s.token_insert(&token.hash(), &id("spiffe://td/node/a"), t(0), t(600))
                .unwrap();
            s.token_insert(&unused.hash(), &id("spiffe://td/node/b"), t(0), t(600))
                .unwrap();
            assert_eq!(
                s.token_redeem(&token.hash(), t(10)).unwrap().unwrap(),
                id("spiffe://td/node/a")
            );
            assert_eq!(
                s.token_redeem(&token.hash(), t(11)).unwrap().unwrap_err(),
                TokenRefusal::Used { at: t(10) }
            );
        }
        // Reopened, as after a restart: the used token stays used, the other still works.
        let s = State::open(&path).unwrap();
        assert!(matches!(
            s.token_redeem(&token.hash(), t(12)).unwrap(),
            Err(TokenRefusal::Used { .. })
        ));
        assert_eq!(s.tokens_pending(t(20)).unwrap().len(), 1);
        assert!(matches!(
            s.token_redeem(&unused.hash(), t(600)).unwrap(),
            Err(TokenRefusal::Expired { .. })
        ));
        let stranger = certs::JoinToken::generate().unwrap();
        assert_eq!(
            s.token_redeem(&stranger.hash(), t(1)).unwrap().unwrap_err(),
            TokenRefusal::Unknown
        );
    }

    #[test]
    fn entries_and_the_ledger_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let entry = RegistrationEntry {
            id: "e1".into(),
            spiffe_id: id("spiffe://td/w/loader"),
            parent_id: id("spiffe://td/node/a"),
            selectors: vec!["unix:uid:1000".parse().unwrap()],
            ttl: Some(Duration::from_secs(60)),
        };
        {
            let s = State::open(&path).unwrap();
            s.entry_insert(&entry, t(0)).unwrap();
            s.ledger_insert(&LedgerEntry {
                serial: "aa".into(),
                spiffe_id: id("spiffe://td/w/loader"),
                kind: "workload",
                node: Some(id("spiffe://td/node/a")),
                ca_serial: "ca1".into(),
                issued_at: t(0),
                not_after: t(3600),
            })
            .unwrap();
        }
        let s = State::open(&path).unwrap();
        assert_eq!(s.entries().unwrap(), vec![entry.clone()]);
        assert_eq!(
            s.entries_for_node(&id("spiffe://td/node/a")).unwrap(),
            vec![entry]
        );
        assert!(
            s.entries_for_node(&id("spiffe://td/node/b"))
                .unwrap()
                .is_empty()
        );
        assert_eq!(s.live_by_ca("ca1", t(10)).unwrap(), (1, Some(t(3600))));
        assert_eq!(s.live_by_ca("ca1", t(3600)).unwrap().0, 0);
        assert_eq!(s.ledger(10).unwrap().len(), 1);
        assert!(s.entry_delete("e1").unwrap().is_some());
        assert!(s.entry_delete("e1").unwrap().is_none());
    }

    #[test]
    fn a_ban_revokes_the_nodes_live_svids_and_its_workloads() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(&dir.path().join("state.db")).unwrap();
        let node = id("spiffe://td/node/a");
        s.node_attested(&node, t(0)).unwrap();
        let add = |serial: &str, spiffe: &str, owner: Option<&SpiffeId>, until: u64| {
            s.ledger_insert(&LedgerEntry {
                serial: serial.into(),
                spiffe_id: id(spiffe),
                kind: "node",
                node: owner.cloned(),
                ca_serial: "ca".into(),
                issued_at: t(0),
                not_after: t(until),
            })
            .unwrap();
        };
        add("01", "spiffe://td/node/a", Some(&node), 3600);
        add("02", "spiffe://td/w/x", Some(&node), 3600);
        add("03", "spiffe://td/node/a", Some(&node), 50); // expired by the ban
        add("04", "spiffe://td/node/b", None, 3600); // someone else
        let revoked = s.node_ban(&node, t(100)).unwrap();
        assert_eq!(revoked, vec!["01".to_owned(), "02".to_owned()]);
        assert_eq!(s.revoked_live(t(101)).unwrap(), revoked);
        assert!(
            s.revoked_live(t(3600)).unwrap().is_empty(),
            "expired drop off"
        );
        assert_eq!(s.node(&node).unwrap().unwrap().banned_at, Some(t(100)));
        // Banning a node never seen records it, so its tokens cannot be used.
        s.node_ban(&id("spiffe://td/node/new"), t(5)).unwrap();
        assert!(
            s.node(&id("spiffe://td/node/new"))
                .unwrap()
                .unwrap()
                .banned_at
                .is_some()
        );
    }

    #[test]
    fn ca_states_move_together() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(&dir.path().join("state.db")).unwrap();
        for (serial, state) in [("a", CaState::Active), ("b", CaState::Prepared)] {
            s.ca_insert(&CaRow {
                serial: serial.into(),
                state,
                cert_pem: String::new(),
                key_file: format!("{serial}.key"),
                not_after: t(1000),
                created_at: t(0),
            })
            .unwrap();
        }
        s.ca_transition(&[("a", CaState::Previous), ("b", CaState::Active)])
            .unwrap();
        let states: Vec<_> = s.cas().unwrap().iter().map(|c| c.state).collect();
        assert_eq!(states, vec![CaState::Previous, CaState::Active]);
        assert!(s.ca_transition(&[("zz", CaState::Retired)]).is_err());
    }
}
